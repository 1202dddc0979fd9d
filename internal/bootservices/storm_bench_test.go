package bootservices

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/go-logr/logr"

	"github.com/anvil-metal/cluster-api-provider-anvil/internal/bmc"
	"github.com/anvil-metal/cluster-api-provider-anvil/internal/boot/dhcp"
	"github.com/anvil-metal/cluster-api-provider-anvil/internal/boot/loadgen"
	"github.com/anvil-metal/cluster-api-provider-anvil/internal/netns"
)

// BenchmarkBootStorm powers on a fleet at once: 5,000 simulated machines, each of which
// gets its lease from Anvil's reservation DHCP, fetches its iPXE script (a fresh boot token
// for its provisioning attempt) and downloads the agent kernel, the way iPXE does it —
// against the boot services as the manager assembles them, with every host a real
// provisioning attempt in the backend. The machines are simulated by package loadgen in a
// separate process in its own network namespace, joined to the server's by a veth pair, so
// the server's peak memory and CPU time are its own (two processes: DHCP clients, and their
// HTTP fetches; see stormRoleEnv).
//
// Target: zero client retries (a DHCP retransmission or an HTTP request made again counts).
// It also reports TCP-level retransmissions and listen-queue overflows, which a client
// would feel as delay without counting them as retries.
//
//	go test -run '^$' -bench BootStorm -benchtime 1x ./internal/bootservices/
//
// ANVIL_STORM_HOSTS (default 5000), ANVIL_STORM_RATE (machines powering on per second;
// default 0: all at once), ANVIL_STORM_KERNEL (kernel bytes, default 8 MiB) and
// ANVIL_STORM_INITRD (initramfs bytes; default 0: not fetched) tune it.
func BenchmarkBootStorm(b *testing.B) {
	netns.Require(b)
	hosts := stormEnv(b, "ANVIL_STORM_HOSTS", 5000)
	rate := stormEnv(b, "ANVIL_STORM_RATE", 0)
	kernelSize := stormEnv(b, "ANVIL_STORM_KERNEL", 8<<20)
	initrdSize := stormEnv(b, "ANVIL_STORM_INITRD", 0)
	for range b.N {
		bootStorm(b, hosts, rate, kernelSize, initrdSize)
	}
}

// stormRoleEnv makes the test binary one of the storm's client processes: "dhcp" (the
// simulated machines' DHCP clients, printing each lease) or "boot" (their HTTP fetches, one
// per lease line read). Two processes, because in one the DHCP clients' timers and sockets
// would wait behind thousands of busy download goroutines, which real machines, each with
// its own CPU, never do.
const (
	stormRoleEnv   = "ANVIL_BOOT_STORM_ROLE"
	stormConfigEnv = "ANVIL_BOOT_STORM_CONFIG"
)

type stormClientConfig struct {
	Interface string
	Hosts     int
	Rate      int
	BaseMAC   string
	Initrd    bool
}

// stormProcessResult is what a client process reports.
type stormProcessResult struct {
	DHCP       loadgen.DHCPResult
	Boot       loadgen.BootResult
	PeakRSSKiB int64
	CPU        time.Duration
}

func bootStorm(b *testing.B, hosts, rate, kernelSize, initrdSize int) {
	server, client := netns.NewPair(b,
		netns.HostConfig{Addr: netip.MustParsePrefix("198.18.0.1/15")},
		netns.HostConfig{Addr: netip.MustParsePrefix("198.18.0.2/15")})
	artifacts := b.TempDir()
	must(b, os.WriteFile(filepath.Join(artifacts, "vmlinuz"), patterned(kernelSize), 0o644))
	must(b, os.WriteFile(filepath.Join(artifacts, "initramfs"), patterned(max(initrdSize, 1)), 0o644))

	var svc *Services
	must(b, server.Do(func() error {
		var err error
		svc, err = New(Config{HTTPAddress: "198.18.0.1:0", ArtifactsDir: artifacts,
			ImageCacheDir: b.TempDir(), ImageCacheBytes: 1 << 30,
			DHCPMode: dhcp.ModeReservation, DHCPInterface: server.Link, ServerIP: netip.MustParseAddr("198.18.0.1"),
			TFTPAddress: "198.18.0.1:0", TFTPSinglePort: true, Log: logr.Discard()})
		if err != nil {
			return err
		}
		return svc.Listen()
	}))
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- svc.Start(ctx) }()
	defer func() {
		cancel()
		must(b, <-done)
	}()

	// Every machine is a host Anvil is provisioning: an attempt with its own boot token.
	base := net.HardwareAddr{0x02, 0xa0, 0, 0, 0, 0}
	first := netip.MustParseAddr("198.18.1.0").As4()
	for i := range hosts {
		mac := make(net.HardwareAddr, 6)
		copy(mac, base)
		mac[3], mac[4], mac[5] = byte(i>>16), byte(i>>8), byte(i)
		ip := netip.AddrFrom4([4]byte{first[0], first[1], first[2] + byte(i>>8), byte(i)})
		h := provisioningHost(fmt.Sprintf("host-%05d", i), mac.String(), ip.String()+"/15", "198.18.0.1")
		if _, err := svc.Backend.Provision(ctx, h, func(string, func(context.Context, bmc.Client) error) error { return nil }); err != nil {
			b.Fatal(err)
		}
	}
	runtimeBefore := rusage()
	rssBefore := procStatusKiB(b, "self", "VmRSS")

	cfg, err := json.Marshal(stormClientConfig{Interface: client.Link, Hosts: hosts, Rate: rate, BaseMAC: base.String(), Initrd: initrdSize > 0})
	must(b, err)
	snmp0s, snmp0c := netSNMP(b, server), netSNMP(b, client)
	cctx, ccancel := context.WithTimeout(context.Background(), 15*time.Minute)
	defer ccancel()
	role := func(name string) *exec.Cmd {
		cmd := client.Command(cctx, os.Args[0], "-test.run=^TestBootStormClientProcess$")
		cmd.Env = append(os.Environ(), stormRoleEnv+"="+name, stormConfigEnv+"="+string(cfg))
		cmd.Stderr = os.Stderr
		return cmd
	}
	dhcpCmd, bootCmd := role("dhcp"), role("boot")
	leases, err := dhcpCmd.StdoutPipe()
	must(b, err)
	bootIn, err := bootCmd.StdinPipe()
	must(b, err)
	var bootOut strings.Builder
	bootCmd.Stdout = &bootOut
	start := time.Now()
	must(b, bootCmd.Start())
	must(b, dhcpCmd.Start())
	// Hand each lease to the boot process as it comes; keep the DHCP process's result.
	var dres stormProcessResult
	sc := bufio.NewScanner(leases)
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		line := sc.Text()
		if rest, ok := strings.CutPrefix(line, "STORM-RESULT "); ok {
			must(b, json.Unmarshal([]byte(rest), &dres))
			continue
		}
		if strings.HasPrefix(line, "LEASE ") {
			_, err := io.WriteString(bootIn, line+"\n")
			must(b, err)
		}
	}
	if err := dhcpCmd.Wait(); err != nil {
		b.Fatalf("DHCP client process: %v", err)
	}
	must(b, bootIn.Close())
	if err := bootCmd.Wait(); err != nil {
		b.Fatalf("boot client process: %v\n%s", err, bootOut.String())
	}
	wall := time.Since(start)
	var bres stormProcessResult
	for _, line := range strings.Split(bootOut.String(), "\n") {
		if rest, ok := strings.CutPrefix(line, "STORM-RESULT "); ok {
			must(b, json.Unmarshal([]byte(rest), &bres))
		}
	}
	res := struct {
		DHCP loadgen.DHCPResult
		Boot loadgen.BootResult
	}{dres.DHCP, bres.Boot}
	serverCPU := rusage() - runtimeBefore
	peak := procStatusKiB(b, "self", "VmHWM")
	snmp1s, snmp1c := netSNMP(b, server), netSNMP(b, client)
	st := svc.DHCPStats()

	retries := res.DHCP.Retransmits + res.DHCP.Restarts + res.Boot.Retries
	var sb strings.Builder
	fmt.Fprintf(&sb, "\nboot storm: %d machines (power-on rate %s), kernel %d bytes%s\n", hosts, rateName(rate), kernelSize,
		map[bool]string{true: fmt.Sprintf(", initramfs %d bytes", initrdSize), false: ""}[initrdSize > 0])
	fmt.Fprintf(&sb, "  wall time          %v (DHCP phase %v)\n", wall.Round(time.Millisecond), res.DHCP.Elapsed.Round(time.Millisecond))
	fmt.Fprintf(&sb, "  client retries     %d  (DHCP retransmits %d, DHCP restarts after a NAK %d, HTTP retries %d)   target 0\n",
		retries, res.DHCP.Retransmits, res.DHCP.Restarts, res.Boot.Retries)
	fmt.Fprintf(&sb, "  completed          %d leases, %d boots (%d files, %.1f GiB); failed: DHCP %d, boot %d\n",
		res.DHCP.Bound, res.Boot.Boots, res.Boot.Files, float64(res.Boot.Bytes)/(1<<30), res.DHCP.Failed, res.Boot.Failed)
	fmt.Fprintf(&sb, "  DHCP exchange      p50 %v  p99 %v  max %v\n", res.DHCP.P50.Round(time.Microsecond), res.DHCP.P99.Round(time.Microsecond), res.DHCP.Max.Round(time.Microsecond))
	fmt.Fprintf(&sb, "  lease to kernel    p50 %v  p99 %v  max %v\n", res.Boot.P50.Round(time.Millisecond), res.Boot.P99.Round(time.Millisecond), res.Boot.Max.Round(time.Millisecond))
	fmt.Fprintf(&sb, "  server             peak RSS %.0f MiB (%.0f MiB before the storm, %d hosts provisioning), CPU %v\n",
		float64(peak)/1024, float64(rssBefore)/1024, hosts, serverCPU.Round(time.Millisecond))
	fmt.Fprintf(&sb, "  clients (loadgen)  DHCP process: peak RSS %.0f MiB, CPU %v; HTTP process: peak RSS %.0f MiB, CPU %v\n",
		float64(dres.PeakRSSKiB)/1024, dres.CPU.Round(time.Millisecond), float64(bres.PeakRSSKiB)/1024, bres.CPU.Round(time.Millisecond))
	delta := func(after, before map[string]int64, k string) int64 { return after[k] - before[k] }
	fmt.Fprintf(&sb, "  TCP (kernel)       server retransmitted %d segments (tail-loss probes %d, fast retransmits %d, timeouts %d); clients %d;\n"+
		"                     listen overflows %d, drops %d; veth drops: server %d, clients %d\n",
		delta(snmp1s, snmp0s, "Tcp.RetransSegs"), delta(snmp1s, snmp0s, "TcpExt.TCPLossProbes"), delta(snmp1s, snmp0s, "TcpExt.TCPFastRetrans"),
		delta(snmp1s, snmp0s, "TcpExt.TCPTimeouts"), delta(snmp1c, snmp0c, "Tcp.RetransSegs"),
		delta(snmp1s, snmp0s, "TcpExt.ListenOverflows"), delta(snmp1s, snmp0s, "TcpExt.ListenDrops"),
		delta(snmp1s, snmp0s, "link.drops"), delta(snmp1c, snmp0c, "link.drops"))
	fmt.Fprintf(&sb, "  DHCP server        %+v\n", st)
	fmt.Fprintf(&sb, "  generator          %d DHCP answers for no waiting client (late or duplicate)\n", res.DHCP.Strays)
	for _, e := range res.Boot.RetryReasons {
		fmt.Fprintf(&sb, "  HTTP retry after: %s\n", e)
	}
	for _, e := range res.Boot.Errors {
		fmt.Fprintf(&sb, "  boot failed: %s\n", e)
	}
	fmt.Print(sb.String())
	b.Log(sb.String())
	b.ReportMetric(float64(retries), "retries")
	b.ReportMetric(wall.Seconds(), "wall-s")
	b.ReportMetric(float64(peak)/1024, "server-peak-RSS-MiB")
	if res.DHCP.Bound != hosts || res.Boot.Boots != hosts {
		b.Errorf("%d of %d machines leased, %d booted", res.DHCP.Bound, hosts, res.Boot.Boots)
	}
}

// TestBootStormClientProcess is one of BenchmarkBootStorm's client processes (see
// stormRoleEnv). Without its configuration it does nothing.
func TestBootStormClientProcess(t *testing.T) {
	role := os.Getenv(stormRoleEnv)
	if role == "" {
		t.Skip("a client process of the boot storm benchmark; run BenchmarkBootStorm")
	}
	var cfg stormClientConfig
	must(t, json.Unmarshal([]byte(os.Getenv(stormConfigEnv)), &cfg))
	ctx, cancel := context.WithTimeout(context.Background(), 14*time.Minute)
	defer cancel()
	var res stormProcessResult
	switch role {
	case "dhcp":
		mac, err := net.ParseMAC(cfg.BaseMAC)
		must(t, err)
		out := bufio.NewWriter(os.Stdout)
		res.DHCP, err = loadgen.RunDHCP(ctx, loadgen.DHCPOptions{Interface: cfg.Interface, BaseMAC: mac, Clients: cfg.Hosts, Rate: cfg.Rate,
			OnBound: func(_ int, _ net.HardwareAddr, _ netip.Addr, bootfile string) {
				fmt.Fprintf(out, "LEASE %s\n", bootfile)
				_ = out.Flush() // the machine starts fetching now, not when a buffer fills
			}})
		must(t, err)
	case "boot":
		booter := loadgen.NewBooter(loadgen.BootOptions{Initrd: cfg.Initrd})
		var boots sync.WaitGroup
		sc := bufio.NewScanner(os.Stdin)
		for sc.Scan() {
			if url, ok := strings.CutPrefix(sc.Text(), "LEASE "); ok {
				boots.Go(func() { _ = booter.Boot(ctx, url) })
			}
		}
		boots.Wait()
		res.Boot = booter.Result()
	default:
		t.Fatalf("unknown role %q", role)
	}
	res.PeakRSSKiB, res.CPU = procStatusKiB(t, "self", "VmHWM"), rusage()
	raw, err := json.Marshal(res)
	must(t, err)
	fmt.Printf("STORM-RESULT %s\n", raw)
}

func rateName(rate int) string {
	if rate <= 0 {
		return "all at once"
	}
	return strconv.Itoa(rate) + "/s"
}

func stormEnv(b *testing.B, name string, def int) int {
	v := os.Getenv(name)
	if v == "" {
		return def
	}
	n, err := strconv.Atoi(v)
	if err != nil || n < 0 {
		b.Fatalf("%s=%q: want a non-negative integer", name, v)
	}
	return n
}

// patterned returns n bytes that don't compress to nothing.
func patterned(n int) []byte {
	p := make([]byte, n)
	for i := range p {
		p[i] = byte(i*131 + i>>13)
	}
	return p
}

// rusage is this process's user+system CPU time so far.
func rusage() time.Duration {
	var ru syscall.Rusage
	_ = syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// procStatusKiB reads a "kB" field (VmRSS, VmHWM) of /proc/<pid>/status.
func procStatusKiB(t testing.TB, pid, field string) int64 {
	t.Helper()
	raw, err := os.ReadFile("/proc/" + pid + "/status")
	must(t, err)
	for _, l := range strings.Split(string(raw), "\n") {
		if rest, ok := strings.CutPrefix(l, field+":"); ok {
			n, err := strconv.ParseInt(strings.TrimSuffix(strings.TrimSpace(rest), " kB"), 10, 64)
			must(t, err)
			return n
		}
	}
	t.Fatalf("no %s in /proc/%s/status", field, pid)
	return 0
}

// netSNMP reads a namespace's TCP counters ("Tcp.RetransSegs", "TcpExt.ListenOverflows", ...)
// from /proc/net/snmp and /proc/net/netstat, which are per network namespace, and its link's
// dropped packets (received and sent) as "link.drops".
func netSNMP(t testing.TB, h *netns.Host) map[string]int64 {
	t.Helper()
	out := map[string]int64{}
	raw, err := h.Run(context.Background(), "ip", "-j", "-s", "link", "show", "dev", h.Link)
	must(t, err)
	var links []struct {
		Stats64 struct {
			RX struct {
				Dropped int64 `json:"dropped"`
			} `json:"rx"`
			TX struct {
				Dropped int64 `json:"dropped"`
			} `json:"tx"`
		} `json:"stats64"`
	}
	must(t, json.Unmarshal(raw, &links))
	if len(links) == 1 {
		out["link.drops"] = links[0].Stats64.RX.Dropped + links[0].Stats64.TX.Dropped
	}
	for _, f := range []string{"/proc/net/snmp", "/proc/net/netstat"} {
		raw, err := h.Run(context.Background(), "cat", f)
		must(t, err)
		var names []string
		for _, l := range strings.Split(string(raw), "\n") {
			prefix, rest, ok := strings.Cut(l, ": ")
			if !ok {
				continue
			}
			fields := strings.Fields(rest)
			if names == nil || len(fields) != len(names) || !isNumber(fields[0]) {
				names = fields
				continue
			}
			for i, v := range fields {
				n, _ := strconv.ParseInt(v, 10, 64)
				out[prefix+"."+names[i]] = n
			}
			names = nil
		}
	}
	return out
}

func isNumber(s string) bool {
	_, err := strconv.ParseInt(s, 10, 64)
	return err == nil
}
