package dhcp

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/anvil-metal/cluster-api-provider-anvil/internal/boot/loadgen"
	"github.com/anvil-metal/cluster-api-provider-anvil/internal/netns"
)

// BenchmarkDHCPLoadgen measures full DHCP exchanges per second, Anvil (reservation mode)
// against dnsmasq, under one load generator that is not the bottleneck: package loadgen,
// which batches its sends and receives (sendmmsg/recvmmsg) and so spends a fraction of the
// CPU perfdhcp does per exchange. It runs in a process of its own in the client namespace, as
// a relay agent (as perfdhcp does), so the servers' CPU times are theirs alone.
//
// Two measurements per server:
//   - closed loop: a fixed number of exchanges in flight (ANVIL_BENCH_WINDOW, default 64) for
//     ANVIL_BENCH_SECONDS (default 5), as many as the server completes: its throughput when
//     nothing else limits it, with its CPU time per exchange;
//   - open loop: clients start at fixed rates (ANVIL_BENCH_RATES, default 250,500,1000,2000,5000,
//     10000,20000 per second, for ANVIL_BENCH_SECONDS) whether or not the server keeps up; a
//     rate passes when every client is bound with at most 1 % retransmitting, and the first
//     failing rate ends the series. A failing rate is run again, up to ANVIL_BENCH_REPEAT
//     (default 3) runs, and the best run kept: on a shared machine other work only adds
//     losses.
//
// The machine's two cores are shared by the generator, the server and the kernel's packet
// path: CPU per exchange is the number that carries over to other machines.
//
//	go test -run '^$' -bench DHCPLoadgen -benchtime 1x ./internal/boot/dhcp/
//
// ANVIL_BENCH_SERVERS (a subset of anvil,dnsmasq,dnsmasq-ro) selects servers.
func BenchmarkDHCPLoadgen(b *testing.B) {
	netns.Require(b)
	if _, err := exec.LookPath("dnsmasq"); err != nil {
		b.Skip("dnsmasq not installed (see hack/install-bench-deps.sh)")
	}
	window := envInts(b, "ANVIL_BENCH_WINDOW", []int{64})[0]
	rates := envInts(b, "ANVIL_BENCH_RATES", []int{250, 500, 1000, 2000, 5000, 10000, 20000})
	secs := envInts(b, "ANVIL_BENCH_SECONDS", []int{5})[0]
	repeat := envInts(b, "ANVIL_BENCH_REPEAT", []int{3})[0]
	servers := []string{"anvil", "dnsmasq", "dnsmasq-ro"}
	if only := os.Getenv("ANVIL_BENCH_SERVERS"); only != "" {
		servers = strings.Split(only, ",")
	}
	type row struct {
		server, mode string
		offered      int
		r            loadgenRun
	}
	var rows []row
	for range b.N {
		for _, srv := range servers {
			// The address pool (198.18.1.0 up, a /15) holds 120,000 hosts; at this machine's
			// rates a closed loop of a few seconds stays below that.
			r := runLoadgen(b, srv, loadgenConfig{Clients: 120000, Window: window, DurationMS: secs * 1000})
			b.Logf("%-10s closed loop, window %d: %s", srv, window, r)
			rows = append(rows, row{srv, fmt.Sprintf("closed, window %d", window), 0, r})
			for _, rate := range rates {
				// Other work on this machine only ever adds losses: a failed step is run again
				// (up to ANVIL_BENCH_REPEAT times) and the best run kept, for every server alike.
				var best loadgenRun
				tries := 0
				for tries < max(repeat, 1) {
					tries++
					r := runLoadgen(b, srv, loadgenConfig{Clients: min(rate*secs, 120000), Rate: rate})
					b.Logf("%-10s open loop, %d/s, run %d: %s", srv, rate, tries, r)
					if tries == 1 || r.retries() < best.retries() {
						best = r
					}
					if r.pass() {
						break
					}
				}
				rows = append(rows, row{srv, fmt.Sprintf("open (%d run%s)", tries, map[bool]string{true: "s"}[tries > 1]), rate, best})
				if !best.pass() {
					break // higher rates only fail harder, and slowly (retransmissions)
				}
			}
		}
	}
	var sb strings.Builder
	load, _ := os.ReadFile("/proc/loadavg")
	fmt.Fprintf(&sb, "\nDHCP full exchanges under package loadgen (relay mode), load average at the end: %s", load)
	fmt.Fprintf(&sb, "%-10s %-16s %8s %9s %9s %9s %7s %8s %9s %9s %10s %10s %10s\n", "server", "mode", "offered", "exch/s", "started", "bound",
		"failed", "retries", "p50", "p99", "srv CPU/ex", "gen CPU/ex", "max/s/core")
	best := map[string]float64{}
	for _, r := range rows {
		offered := "-"
		if r.offered > 0 {
			offered = strconv.Itoa(r.offered)
		}
		d := r.r.DHCP
		fmt.Fprintf(&sb, "%-10s %-16s %8s %9.0f %9d %9d %7d %8d %9v %9v %10v %10v %10.0f\n", r.server, r.mode, offered, d.ExchangesPerSecond(),
			d.Started, d.Bound, d.Failed+d.Unfinished, d.Retransmits+d.Restarts, d.P50.Round(10*time.Microsecond), d.P99.Round(10*time.Microsecond),
			r.r.serverCPUPerExchange().Round(100*time.Nanosecond), r.r.genCPUPerExchange().Round(100*time.Nanosecond), r.r.perCore())
		if r.r.pass() && d.ExchangesPerSecond() > best[r.server] {
			best[r.server] = d.ExchangesPerSecond()
		}
	}
	sb.WriteString("retries: retransmissions after a timeout plus exchanges restarted after a NAK. srv CPU/ex: the server's CPU\n" +
		"time per exchange (user+system, including the kernel's packet work done in its context); max/s/core: 1 s divided\n" +
		"by it. A row passes with every client bound and retries for <=1% of them.\n")
	for _, srv := range servers {
		fmt.Fprintf(&sb, "%-10s best passing: %6.0f exchanges/s\n", srv, best[srv])
		b.ReportMetric(best[srv], srv+"-exchanges/s")
	}
	fmt.Print(sb.String())
	b.Log(sb.String())
}

// loadgenProcessEnv carries the generator process's configuration.
const loadgenProcessEnv = "ANVIL_DHCP_LOADGEN"

type loadgenConfig struct {
	Interface      string
	Relay, Server  string
	Clients        int
	Rate, Window   int
	DurationMS     int
	FirstTimeoutMS int
	// VendorClass and UserClass override the generator's (iPXE's) options 60 and 77.
	VendorClass, UserClass string
}

type loadgenRun struct {
	DHCP      loadgen.DHCPResult
	GenCPU    time.Duration
	ServerCPU time.Duration
}

func (r loadgenRun) String() string {
	return fmt.Sprintf("%s; server CPU %v/exchange, generator %v/exchange", r.DHCP, r.serverCPUPerExchange().Round(100*time.Nanosecond),
		r.genCPUPerExchange().Round(100*time.Nanosecond))
}

// pass: every client bound, with retries (retransmissions and restarts after a NAK) for at
// most 1 % of them.
func (r loadgenRun) pass() bool {
	d := r.DHCP
	return d.Started > 0 && d.Failed == 0 && d.Unfinished == 0 && d.Bound == d.Started &&
		float64(d.Retransmits+d.Restarts) <= 0.01*float64(d.Started)
}

func (r loadgenRun) retries() int {
	return r.DHCP.Retransmits + r.DHCP.Restarts + r.DHCP.Failed + r.DHCP.Unfinished
}

func (r loadgenRun) serverCPUPerExchange() time.Duration {
	if r.DHCP.Bound == 0 {
		return 0
	}
	return r.ServerCPU / time.Duration(r.DHCP.Bound)
}

func (r loadgenRun) genCPUPerExchange() time.Duration {
	if r.DHCP.Bound == 0 {
		return 0
	}
	return r.GenCPU / time.Duration(r.DHCP.Bound)
}

func (r loadgenRun) perCore() float64 {
	if d := r.serverCPUPerExchange(); d > 0 {
		return float64(time.Second) / float64(d)
	}
	return 0
}

// runLoadgen runs one measurement against a fresh server in a fresh pair of namespaces.
func runLoadgen(b *testing.B, server string, cfg loadgenConfig) loadgenRun {
	srvHost, cliHost := netns.NewPair(b,
		netns.HostConfig{Addr: netip.MustParsePrefix("198.18.0.1/15")},
		netns.HostConfig{Addr: netip.MustParsePrefix("198.18.0.2/15")})
	hosts := max(cfg.Clients, 1)
	var stop func()
	var usage func() procUsage
	switch server {
	case "anvil":
		stop, usage = benchAnvil(b, srvHost, hosts)
	case "dnsmasq":
		stop, usage = benchDnsmasq(b, srvHost, hosts, false)
	case "dnsmasq-ro":
		stop, usage = benchDnsmasq(b, srvHost, hosts, true)
	default:
		b.Fatalf("unknown server %q (want anvil, dnsmasq or dnsmasq-ro)", server)
	}
	defer stop()
	cfg.Interface, cfg.Relay, cfg.Server = cliHost.Link, "198.18.0.2", "198.18.0.1"
	cfg.VendorClass, cfg.UserClass = os.Getenv("ANVIL_BENCH_VENDOR_CLASS"), os.Getenv("ANVIL_BENCH_USER_CLASS")
	raw, err := json.Marshal(cfg)
	must(b, err)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	u0 := usage()
	cmd := cliHost.Command(ctx, os.Args[0], "-test.run=^TestDHCPLoadgenProcess$", "-test.v")
	cmd.Env = append(os.Environ(), loadgenProcessEnv+"="+string(raw))
	out, err := cmd.CombinedOutput()
	u1 := usage()
	if err != nil {
		b.Fatalf("load generator: %v\n%s", err, out)
	}
	var run loadgenRun
	found := false
	sc := bufio.NewScanner(strings.NewReader(string(out)))
	for sc.Scan() {
		if rest, ok := strings.CutPrefix(sc.Text(), "LOADGEN-RESULT "); ok {
			must(b, json.Unmarshal([]byte(rest), &run))
			found = true
		}
	}
	if !found {
		b.Fatalf("load generator printed no result:\n%s", out)
	}
	run.ServerCPU = u1.cpu - u0.cpu
	return run
}

// TestDHCPLoadgenProcess is BenchmarkDHCPLoadgen's generator process. Without its
// configuration it does nothing.
func TestDHCPLoadgenProcess(t *testing.T) {
	raw := os.Getenv(loadgenProcessEnv)
	if raw == "" {
		t.Skip("the DHCP benchmark's load generator process; run BenchmarkDHCPLoadgen")
	}
	var cfg loadgenConfig
	must(t, json.Unmarshal([]byte(raw), &cfg))
	ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
	defer cancel()
	res, err := loadgen.RunDHCP(ctx, loadgen.DHCPOptions{Interface: cfg.Interface,
		Relay: netip.MustParseAddr(cfg.Relay), Server: netip.MustParseAddr(cfg.Server),
		BaseMAC: net.HardwareAddr{0x02, 0, 0, 0, 0, 0}, Clients: cfg.Clients, Rate: cfg.Rate, Window: cfg.Window,
		Duration:    time.Duration(cfg.DurationMS) * time.Millisecond,
		VendorClass: cfg.VendorClass, UserClass: cfg.UserClass,
		FirstTimeout: time.Duration(cfg.FirstTimeoutMS) * time.Millisecond})
	if err != nil && ctx.Err() == nil {
		t.Fatal(err)
	}
	var ru syscall.Rusage
	_ = syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
	b, err := json.Marshal(loadgenRun{DHCP: res, GenCPU: time.Duration(ru.Utime.Nano() + ru.Stime.Nano())})
	must(t, err)
	fmt.Printf("LOADGEN-RESULT %s\n", b)
}
