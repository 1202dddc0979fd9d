package dhcp

import (
	"context"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/go-logr/logr"

	"github.com/anvil-metal/cluster-api-provider-anvil/internal/netns"
)

// BenchmarkDHCPvsDnsmasq measures full DHCP exchanges (DISCOVER, OFFER, REQUEST, ACK) per
// second, Anvil in reservation mode against dnsmasq, under the same load generator (perfdhcp
// from Debian's kea-admin) across a veth pair between two network namespaces. Client and
// server share this machine's cores, as they would share a small provisioning host.
//
// It reports every step and then searches for the highest rate each server sustains with at
// most 1 % of exchanges lost. Run it alone:
//
//	go test -run '^$' -bench DHCPvsDnsmasq -benchtime 1x ./internal/boot/dhcp/
//
// ANVIL_BENCH_RATES (comma-separated, default 1000,2000,5000,10000,15000,20000),
// ANVIL_BENCH_SECONDS (per step, default 5), ANVIL_BENCH_CLIENTS (default 50000),
// ANVIL_BENCH_REPEAT (runs per step, best kept; default 1),
// ANVIL_BENCH_SERVERS (a subset of anvil,dnsmasq,dnsmasq-ro), ANVIL_BENCH_WORKERS (Anvil's
// Config.Workers) and ANVIL_BENCH_PERFDHCP_ARGS (more perfdhcp flags) tune it.
func BenchmarkDHCPvsDnsmasq(b *testing.B) {
	netns.Require(b)
	for _, tool := range []string{"perfdhcp", "dnsmasq"} {
		if _, err := exec.LookPath(tool); err != nil {
			b.Skipf("%s not installed (see hack/install-test-deps.sh)", tool)
		}
	}
	rates := envInts(b, "ANVIL_BENCH_RATES", []int{1000, 2000, 5000, 10000, 15000, 20000})
	secs := envInts(b, "ANVIL_BENCH_SECONDS", []int{5})[0]
	clients := envInts(b, "ANVIL_BENCH_CLIENTS", []int{50000})[0]
	repeat := envInts(b, "ANVIL_BENCH_REPEAT", []int{1})[0]

	servers := []struct {
		name  string
		start func(b *testing.B, h *netns.Host) (stop func(), usage func() procUsage)
	}{
		{"anvil", func(b *testing.B, h *netns.Host) (func(), func() procUsage) { return benchAnvil(b, h, clients) }},
		{"dnsmasq", func(b *testing.B, h *netns.Host) (func(), func() procUsage) {
			return benchDnsmasq(b, h, clients, false)
		}},
		{"dnsmasq-ro", func(b *testing.B, h *netns.Host) (func(), func() procUsage) {
			return benchDnsmasq(b, h, clients, true)
		}},
	}
	type row struct {
		server string
		r      perfResult
	}
	if only := os.Getenv("ANVIL_BENCH_SERVERS"); only != "" {
		keep := servers[:0]
		for _, srv := range servers {
			if strings.Contains(","+only+",", ","+srv.name+",") {
				keep = append(keep, srv)
			}
		}
		servers = keep
	}
	var rows []row
	best := map[string]perfResult{}
	for range b.N {
		for _, srv := range servers {
			// Other work on the machine only ever adds losses, so of repeated runs the best
			// one is the closest to what the server can do.
			run := func(rate int) perfResult {
				var pick perfResult
				for i := range max(repeat, 1) {
					r := runOnce(b, srv.start, rate, secs, clients)
					b.Logf("%-10s %s", srv.name, r)
					if i == 0 || r.lostPct() < pick.lostPct() {
						pick = r
					}
				}
				rows = append(rows, row{srv.name, pick})
				return pick
			}
			var lo, hi int // highest passing, lowest failing rate seen
			for _, rate := range rates {
				if hi > 0 && rate > hi && hi <= lo*2 {
					continue // already failed lower; the search below narrows it
				}
				r := run(rate)
				if r.ok() {
					lo = max(lo, rate)
					if r.exchanges > best[srv.name].exchanges {
						best[srv.name] = r
					}
				} else if hi == 0 || rate < hi {
					hi = rate
				}
			}
			// Narrow the gap between the last passing and first failing rate.
			for i := 0; i < 3 && hi > 0 && hi-lo > max(lo/10, 100); i++ {
				mid := (lo + hi) / 2
				if r := run(mid); r.ok() {
					lo = mid
					if r.exchanges > best[srv.name].exchanges {
						best[srv.name] = r
					}
				} else {
					hi = mid
				}
			}
		}
	}
	var sb strings.Builder
	load, _ := os.ReadFile("/proc/loadavg")
	fmt.Fprintf(&sb, "\nload average at the end: %s", load)
	fmt.Fprintf(&sb, "%-10s %7s %8s %9s %7s %9s %9s %8s %9s %9s %9s %9s %12s %9s\n", "server", "rate", "exch/s", "completed", "lost%",
		"avg delay", "srv in", "srv out", "srv drop", "cli drop", "CPU/exch", "csw/exch", "perfdhcp CPU", "/exch")
	for _, r := range rows {
		fmt.Fprintf(&sb, "%-10s %7d %8.0f %9d %6.2f%% %7.2fms %9d %8d %9d %9d %9s %9s %12s %9s\n", r.server, r.r.rate, r.r.exchanges, r.r.acks,
			r.r.lostPct(), r.r.avgDelayMS, r.r.serverIn, r.r.serverOut, r.r.serverDrops, r.r.clientDrops,
			r.r.cpuPerExchange(), r.r.switchesPerExchange(), r.r.clientCPU.Round(10*time.Millisecond), r.r.clientCPUPerExchange())
	}
	sb.WriteString("srv in/out: UDP datagrams the server's namespace received/sent; srv/cli drop: datagrams its kernel\n" +
		"dropped because the server's / perfdhcp's socket queue was full (RcvbufErrors).\n")
	for _, srv := range servers {
		r := best[srv.name]
		var peak float64
		for _, row := range rows {
			if row.server == srv.name {
				peak = max(peak, row.r.exchanges)
			}
		}
		fmt.Fprintf(&sb, "%-10s max with <=1%% lost: %6.0f exchanges/s (offered %d/s); peak completed: %6.0f/s\n",
			srv.name, r.exchanges, r.rate, peak)
		b.ReportMetric(r.exchanges, srv.name+"-exchanges/s")
	}
	b.Log(sb.String())
	fmt.Print(sb.String())
}

// runOnce measures one step: a fresh pair of namespaces and a fresh server, since dnsmasq keeps
// leases in memory and neither side should start with the last step's backlog.
func runOnce(b *testing.B, start func(*testing.B, *netns.Host) (func(), func() procUsage), rate, secs, clients int) perfResult {
	server, client := netns.NewPair(b,
		netns.HostConfig{Addr: netip.MustParsePrefix("198.18.0.1/15")},
		netns.HostConfig{Addr: netip.MustParsePrefix("198.18.0.2/15")})
	stop, usage := start(b, server)
	defer stop()
	u0, s0, c0 := usage(), udpStats(b, server), udpStats(b, client)
	r := perfdhcp(b, client, rate, secs, clients)
	u1, s1, c1 := usage(), udpStats(b, server), udpStats(b, client)
	r.serverCPU, r.serverSwitches = u1.cpu-u0.cpu, u1.switches-u0.switches
	r.serverIn, r.serverOut = s1.in-s0.in, s1.out-s0.out
	r.serverDrops, r.clientDrops = s1.rcvbufErrors-s0.rcvbufErrors, c1.rcvbufErrors-c0.rcvbufErrors
	return r
}

func envInts(b *testing.B, name string, def []int) []int {
	v := os.Getenv(name)
	if v == "" {
		return def
	}
	var out []int
	for _, f := range strings.Split(v, ",") {
		n, err := strconv.Atoi(strings.TrimSpace(f))
		if err != nil || n < 0 {
			b.Fatalf("%s: %q is not a positive integer", name, f)
		}
		out = append(out, n)
	}
	return out
}

// benchAnvil serves perfdhcp's simulated clients: they count up from perfdhcp's base MAC, so a
// LabHosts block reserves an address for each.
func benchAnvil(b *testing.B, h *netns.Host, clients int) (func(), func() procUsage) {
	hosts, err := NewLabHosts(net.HardwareAddr{0x02, 0, 0, 0, 0, 0}, clients, netip.MustParseAddr("198.18.1.0"), 15,
		Host{Gateway: netip.MustParseAddr("198.18.0.1"), DNS: []netip.Addr{netip.MustParseAddr("198.18.0.1")}})
	must(b, err)
	workers := envInts(b, "ANVIL_BENCH_WORKERS", []int{0})[0]
	s, err := New(Config{Mode: ModeReservation, Interface: h.Link, Hosts: hosts, Log: logr.Discard(), Workers: workers})
	must(b, err)
	must(b, h.Do(s.Listen))
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- s.Start(ctx) }()
	stop := func() {
		cancel()
		must(b, <-done)
		b.Logf("anvil stats: %+v", s.Stats())
	}
	// The server is the only busy part of this process while perfdhcp runs.
	usage := func() procUsage {
		var ru syscall.Rusage
		_ = syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
		return procUsage{cpu: time.Duration(ru.Utime.Nano() + ru.Stime.Nano()), switches: ru.Nvcsw + ru.Nivcsw}
	}
	return stop, usage
}

// benchDnsmasq runs dnsmasq at its best for a load test: no ping before offering, a lease limit
// above the client count, no per-packet logging, --bind-dynamic (with --bind-interfaces it
// logs a warning per packet), and its lease file on tmpfs, since it rewrites the whole file on
// every lease change. readOnly drops the lease file altogether (--leasefile-ro): nothing
// persists, as with Anvil's reservations, which need no lease state.
func benchDnsmasq(b *testing.B, h *netns.Host, clients int, readOnly bool) (func(), func() procUsage) {
	dir := b.TempDir()
	if st, err := os.Stat("/dev/shm"); err == nil && st.IsDir() {
		d, err := os.MkdirTemp("/dev/shm", "anvil-bench-")
		must(b, err)
		b.Cleanup(func() { os.RemoveAll(d) })
		dir = d
	}
	args := []string{"--no-daemon", "--conf-file=/dev/null", "--interface=" + h.Link,
		"--bind-dynamic", "--port=0", "--user=root", "--group=root",
		"--dhcp-leasefile=" + filepath.Join(dir, "leases"), "--pid-file=" + filepath.Join(dir, "pid"),
		"--dhcp-range=198.18.1.0,198.19.255.250,255.254.0.0,1h", "--no-ping", "--quiet-dhcp",
		"--dhcp-lease-max=" + strconv.Itoa(2*clients), "--log-facility=" + filepath.Join(dir, "log")}
	if readOnly {
		args = append(args, "--leasefile-ro")
	}
	ctx, cancel := context.WithCancel(context.Background())
	cmd := h.Command(ctx, "dnsmasq", args...)
	must(b, cmd.Start())
	// dnsmasq is ready once its DHCP socket is bound.
	deadline := time.Now().Add(10 * time.Second)
	for {
		out, _ := h.Run(context.Background(), "ss", "-Hlun", "sport = :67")
		if strings.Contains(string(out), ":67") {
			break
		}
		if time.Now().After(deadline) {
			b.Fatal("dnsmasq did not bind port 67")
		}
		time.Sleep(50 * time.Millisecond)
	}
	stop := func() {
		cancel()
		_ = cmd.Wait()
	}
	// `ip netns exec` execs dnsmasq in place, so the pid is dnsmasq's.
	usage := func() procUsage { return readProcUsage(cmd.Process.Pid) }
	return stop, usage
}

// procUsage is a server's CPU time and context switches so far. Context switches per exchange
// say how often the server sleeps and wakes, which the machine's load doesn't change much;
// CPU time grows with the load of everything else on the machine.
type procUsage struct {
	cpu      time.Duration
	switches int64
}

// readProcUsage reads a process's user+system time (clock ticks of 10ms) and context
// switches from /proc.
func readProcUsage(pid int) procUsage {
	var u procUsage
	if b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat"); err == nil {
		i := strings.LastIndexByte(string(b), ')')
		if f := strings.Fields(string(b[i+1:])); len(f) >= 13 {
			ut, _ := strconv.Atoi(f[11])
			st, _ := strconv.Atoi(f[12])
			u.cpu = time.Duration(ut+st) * 10 * time.Millisecond
		}
	}
	if b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/status"); err == nil {
		for _, l := range strings.Split(string(b), "\n") {
			if k, v, ok := strings.Cut(l, ":"); ok && strings.HasSuffix(k, "ctxt_switches") {
				n, _ := strconv.ParseInt(strings.TrimSpace(v), 10, 64)
				u.switches += n
			}
		}
	}
	return u
}

type perfResult struct {
	rate, seconds         int
	discovers, offers     int
	requests, acks        int
	exchanges, avgDelayMS float64
	perfdhcpReportedRate  float64
	serverCPU             time.Duration
	clientCPU             time.Duration
	serverSwitches        int64
	serverIn, serverOut   int64
	serverDrops           int64
	clientDrops           int64
}

type udpCounters struct{ in, out, rcvbufErrors int64 }

// udpStats reads a namespace's UDP counters (/proc/net/snmp is per network namespace): they
// tell whether a lost exchange died in the server's socket queue or in perfdhcp's.
func udpStats(b *testing.B, h *netns.Host) udpCounters {
	out, err := h.Run(context.Background(), "cat", "/proc/net/snmp")
	if err != nil {
		b.Fatal(err)
	}
	var names, values []string
	for _, l := range strings.Split(string(out), "\n") {
		if rest, ok := strings.CutPrefix(l, "Udp: "); ok {
			if names == nil {
				names = strings.Fields(rest)
			} else {
				values = strings.Fields(rest)
			}
		}
	}
	var c udpCounters
	for i, n := range names {
		if i >= len(values) {
			break
		}
		v, _ := strconv.ParseInt(values[i], 10, 64)
		switch n {
		case "InDatagrams":
			c.in = v
		case "OutDatagrams":
			c.out = v
		case "RcvbufErrors":
			c.rcvbufErrors = v
		}
	}
	return c
}

func (r perfResult) switchesPerExchange() string {
	if r.acks == 0 {
		return "-"
	}
	return strconv.FormatFloat(float64(r.serverSwitches)/float64(r.acks), 'f', 2, 64)
}

func (r perfResult) cpuPerExchange() string {
	if r.acks == 0 {
		return "-"
	}
	return (r.serverCPU / time.Duration(r.acks)).Round(100 * time.Nanosecond).String()
}

// clientCPUPerExchange is perfdhcp's CPU time per completed exchange: it busy-polls, so it
// spends about a core whatever the rate, and that is what it takes from a server sharing the
// machine.
func (r perfResult) clientCPUPerExchange() string {
	if r.acks == 0 {
		return "-"
	}
	return (r.clientCPU / time.Duration(r.acks)).Round(100 * time.Nanosecond).String()
}

// ok: at most 1 % of the exchanges started were not completed.
func (r perfResult) ok() bool { return r.discovers > 0 && r.lostPct() <= 1 }

func (r perfResult) lostPct() float64 {
	if r.discovers == 0 {
		return 100
	}
	return 100 * float64(r.discovers-r.acks) / float64(r.discovers)
}

func (r perfResult) String() string {
	return fmt.Sprintf("rate %6d/s: %6d DISCOVER, %6d OFFER, %6d REQUEST, %6d ACK; %7.0f exchanges/s, %5.2f%% lost, avg delay %.2fms",
		r.rate, r.discovers, r.offers, r.requests, r.acks, r.exchanges, r.lostPct(), r.avgDelayMS)
}

var (
	// Patterns for perfdhcp's report; read-only.
	perfSection = regexp.MustCompile(`\*\*\*Statistics for: (DISCOVER-OFFER|REQUEST-ACK)\*\*\*`)
	perfSent    = regexp.MustCompile(`sent packets: (\d+)`)
	perfRecv    = regexp.MustCompile(`received packets: (\d+)`)
	perfDelay   = regexp.MustCompile(`avg delay: ([\d.]+) ms`)
	perfRate    = regexp.MustCompile(`Rate: ([\d.]+) 4-way`)
)

// perfdhcp runs perfdhcp in the client's namespace for secs seconds at rate exchanges/s over
// clients simulated clients (MACs counting up from 02:00:00:00:00:00).
func perfdhcp(b *testing.B, client *netns.Host, rate, secs, clients int) perfResult {
	ctx, cancel := context.WithTimeout(context.Background(), time.Duration(secs+30)*time.Second)
	defer cancel()
	args := []string{"-4", "-l", client.Link, "-r", strconv.Itoa(rate),
		"-p", strconv.Itoa(secs), "-R", strconv.Itoa(clients), "-b", "mac=02:00:00:00:00:00"}
	args = append(args, strings.Fields(os.Getenv("ANVIL_BENCH_PERFDHCP_ARGS"))...)
	cmd := client.Command(ctx, "perfdhcp", args...)
	out, _ := cmd.CombinedOutput()
	r := perfResult{rate: rate, seconds: secs}
	if ps := cmd.ProcessState; ps != nil {
		// `ip netns exec` execs perfdhcp in place: this is perfdhcp's own CPU time.
		r.clientCPU = ps.UserTime() + ps.SystemTime()
	}
	text := string(out)
	if m := perfRate.FindStringSubmatch(text); m != nil {
		r.perfdhcpReportedRate, _ = strconv.ParseFloat(m[1], 64)
	}
	locs := perfSection.FindAllStringSubmatchIndex(text, -1)
	for i, loc := range locs {
		end := len(text)
		if i+1 < len(locs) {
			end = locs[i+1][0]
		}
		sec := text[loc[0]:end]
		name := text[loc[2]:loc[3]]
		sent, recv := atoiMatch(perfSent, sec), atoiMatch(perfRecv, sec)
		if name == "DISCOVER-OFFER" {
			r.discovers, r.offers = sent, recv
		} else {
			r.requests, r.acks = sent, recv
			if m := perfDelay.FindStringSubmatch(sec); m != nil {
				r.avgDelayMS, _ = strconv.ParseFloat(m[1], 64)
			}
		}
	}
	if r.discovers == 0 {
		b.Logf("perfdhcp output:\n%s", text)
	}
	r.exchanges = float64(r.acks) / float64(secs)
	return r
}

func atoiMatch(re *regexp.Regexp, s string) int {
	m := re.FindStringSubmatch(s)
	if m == nil {
		return 0
	}
	n, _ := strconv.Atoi(m[1])
	return n
}
