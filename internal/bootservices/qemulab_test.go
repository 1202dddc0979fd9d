package bootservices

import (
	"bufio"
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"fmt"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/go-logr/logr/funcr"
	"golang.org/x/sys/unix"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"

	infrav1 "github.com/anvil-metal/cluster-api-provider-anvil/api/v1alpha1"
	"github.com/anvil-metal/cluster-api-provider-anvil/internal/bmc"
	"github.com/anvil-metal/cluster-api-provider-anvil/internal/boot/dhcp"
	"github.com/anvil-metal/cluster-api-provider-anvil/internal/boot/httpboot"
	"github.com/anvil-metal/cluster-api-provider-anvil/internal/netns"
	"github.com/anvil-metal/cluster-api-provider-anvil/internal/provision"
)

// qemuLab is a provisioning network for the qemu tests: a bridge in a network namespace,
// the boot services on it (as the manager assembles them), a packet capture of its DHCP
// traffic, and virtual machines plugged in through tap devices. Everything goes when the
// test ends.
type qemuLab struct {
	t          *testing.T
	start      time.Time
	qemu, ovmf string
	ns         *netns.Namespace
	svc        *Services
	capture    *dhcpCapture
	// kernel and initramfs are the agent artifacts served.
	kernel, initramfs []byte
	ports             int

	mu     sync.Mutex
	served []httpboot.Served
	vms    sync.WaitGroup
}

const labBridge = "br0"

// labServerIP is the boot services' address on the lab network (TEST-NET-1).
var labServerIP = netip.MustParseAddr("192.0.2.1")

// labConfig changes what a lab's boot services serve.
type labConfig struct {
	// artifactsDir holds the agent's vmlinuz and initramfs; empty serves the stand-in kernel
	// and an initramfs of arbitrary bytes.
	artifactsDir string
	// backend options (bootstrap data Secrets, Notify) for the provisioning backend.
	backend provision.Options
	// allowLocalImages lets the image cache fetch from loopback.
	allowLocalImages bool
	// agentKernelArgs are added to the agent's kernel command line.
	agentKernelArgs []string
}

func newQEMULab(t *testing.T, mode dhcp.Mode) *qemuLab {
	return newQEMULabWith(t, mode, labConfig{})
}

func newQEMULabWith(t *testing.T, mode dhcp.Mode, cfg labConfig) *qemuLab {
	l := &qemuLab{t: t, start: time.Now()}
	l.qemu, l.ovmf = needQEMU(t)
	l.ns = netns.New(t)
	for _, args := range [][]string{
		{"link", "add", labBridge, "type", "bridge"},
		{"link", "set", labBridge, "type", "bridge", "stp_state", "0", "forward_delay", "0"},
		{"addr", "add", labServerIP.String() + "/24", "dev", labBridge},
		{"link", "set", labBridge, "up"},
	} {
		must(t, l.ns.IP(args...))
	}
	// The server side needs no IPv6 (the capture answers iPXE's router solicitations).
	_, _ = l.ns.Run(context.Background(), "sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1")
	l.capture = startDHCPCapture(t, l.ns, labBridge)

	artifacts := cfg.artifactsDir
	if artifacts == "" {
		// Artifacts: the kernel stand-in and an initramfs of arbitrary bytes.
		artifacts = t.TempDir()
		l.kernel = standInKernel(t, 1<<20)
		l.initramfs = make([]byte, 3<<20)
		for i := range l.initramfs {
			l.initramfs[i] = byte(i*7 + i>>11)
		}
		must(t, os.WriteFile(filepath.Join(artifacts, "vmlinuz"), l.kernel, 0o644))
		must(t, os.WriteFile(filepath.Join(artifacts, "initramfs"), l.initramfs, 0o644))
	}

	must(t, l.ns.Do(func() error {
		var err error
		l.svc, err = New(Config{
			HTTPAddress: labServerIP.String() + ":0", ArtifactsDir: artifacts,
			ImageCacheDir: t.TempDir(), ImageCacheBytes: 1 << 30, AllowLocalImages: cfg.allowLocalImages, Backend: cfg.backend,
			AgentKernelArgs: cfg.agentKernelArgs,
			DHCPMode:        mode, DHCPInterface: labBridge, ServerIP: labServerIP, TFTPDir: "/usr/lib/ipxe",
			TFTPSinglePort: true, // transfers must stay in this namespace
			OnServed:       func(s httpboot.Served) { l.mu.Lock(); defer l.mu.Unlock(); l.served = append(l.served, s) },
			Log: funcr.New(func(p, a string) { t.Log(time.Since(l.start).Round(100*time.Millisecond), p, a) },
				funcr.Options{Verbosity: 1}),
		})
		if err != nil {
			return err
		}
		return l.svc.Listen()
	}))
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- l.svc.Start(ctx) }()
	t.Cleanup(func() {
		cancel()
		must(t, <-done)
	})
	return l
}

// qemuMachine is one virtual machine of a lab.
type qemuMachine struct {
	name, mac string
	// uefi boots OVMF with a virtio NIC without option ROM: OVMF's own PXE client
	// (architecture 7) must fetch ipxe.efi over TFTP and chain to it. Otherwise SeaBIOS
	// boots the iPXE in the e1000 NIC's option ROM (Debian's ipxe-qemu).
	uefi bool
	// ip is the reserved address (reservation mode); empty where the site's DHCP server
	// gives one.
	ip string
	// scriptPath is the per-host script URL path the machine should end up at.
	scriptPath string

	host    *infrav1.AnvilHost
	attempt string
	console string
	stop    context.CancelFunc
}

func (m *qemuMachine) key() types.NamespacedName {
	return types.NamespacedName{Namespace: m.host.Namespace, Name: m.host.Name}
}

// provision makes m a host Anvil is network-booting into the agent, as the host controller
// does; the BMC's part (one-time PXE boot, power cycle) is boot's start of the VM.
func (l *qemuLab) provision(m *qemuMachine) {
	t := l.t
	addr := ""
	if m.ip != "" {
		addr = m.ip + "/24"
	}
	m.host = provisioningHost(m.name, m.mac, addr, labServerIP.String())
	if m.uefi {
		m.host.Spec.BootMode = infrav1.BootModeUEFI
	}
	var ops []string
	out, err := l.svc.Backend.Provision(context.Background(), m.host, func(op string, _ func(context.Context, bmc.Client) error) error {
		ops = append(ops, op)
		return nil
	})
	if err != nil || len(ops) != 1 || ops[0] != "network-boot" {
		t.Fatalf("%s: Provision: %+v %v (BMC operations %v)", m.name, out, err, ops)
	}
	view, err := l.svc.Backend.Expected(context.Background(), m.key())
	must(t, err)
	m.attempt = view.Attempt
	if m.scriptPath == "" {
		m.scriptPath = "/ipxe/mac/" + m.mac
	}
}

// plug adds a bridge port to the lab: a tap for a VM (peerNS empty), or a veth whose other
// end, eth0, goes to peerNS.
func (l *qemuLab) plug(peerNS string) string {
	port := "port" + strconv.Itoa(l.ports)
	l.ports++
	if peerNS == "" {
		must(l.t, l.ns.IP("tuntap", "add", "dev", port, "mode", "tap"))
	} else {
		must(l.t, l.ns.IP("link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", peerNS))
	}
	must(l.t, l.ns.IP("link", "set", port, "master", labBridge, "up"))
	return port
}

// boot starts m's VM, which network-boots at once.
func (l *qemuLab) boot(m *qemuMachine) {
	t := l.t
	tap := l.plug("")
	m.console = filepath.Join(t.TempDir(), m.name+".log")
	args := []string{"-accel", "tcg", "-m", "256", "-boot", "n", "-no-reboot",
		"-nographic", "-vga", "none", "-monitor", "none", "-serial", "file:" + m.console,
		"-netdev", "tap,id=n0,ifname=" + tap + ",script=no,downscript=no"}
	if m.uefi {
		args = append(args, "-bios", l.ovmf, "-device", "virtio-net-pci,romfile=,netdev=n0,mac="+m.mac)
	} else {
		args = append(args, "-device", "e1000,netdev=n0,mac="+m.mac)
	}
	ctx, cancel := context.WithCancel(context.Background())
	m.stop = cancel
	cmd := l.ns.Command(ctx, l.qemu, args...)
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	must(t, cmd.Start())
	l.vms.Go(func() {
		err := cmd.Wait()
		if ctx.Err() == nil {
			t.Errorf("%s: qemu exited early: %v\n%s", m.name, err, out.String())
		}
	})
	t.Cleanup(func() { cancel(); l.vms.Wait() })
}

// waitBooted waits for each machine's stand-in kernel to report, then stops the machine.
func (l *qemuLab) waitBooted(deadline time.Time, ms ...*qemuMachine) {
	for _, m := range ms {
		for !parseStandIn(readConsole(m.console)).ended {
			if time.Now().After(deadline) {
				l.t.Fatalf("%s: iPXE did not boot the agent within the deadline; console:\n%s", m.name, readConsole(m.console))
			}
			time.Sleep(200 * time.Millisecond)
		}
		l.t.Logf("%s: booted the stand-in kernel after %.1fs", m.name, time.Since(l.start).Seconds())
		m.stop()
	}
}

// waitHeard waits until m has sent n DHCP requests, gives the servers a second more to
// answer, and stops it.
func (l *qemuLab) waitHeard(deadline time.Time, m *qemuMachine, n int) {
	for l.capture.requests(m.mac) < n {
		if time.Now().After(deadline) {
			l.t.Fatalf("%s sent %d DHCP requests, want %d", m.name, l.capture.requests(m.mac), n)
		}
		time.Sleep(200 * time.Millisecond)
	}
	time.Sleep(time.Second)
	m.stop()
}

func (l *qemuLab) records() []httpboot.Served {
	l.mu.Lock()
	defer l.mu.Unlock()
	return append([]httpboot.Served(nil), l.served...)
}

// checkBoot checks, from the boot services' records and from what the stand-in kernel
// printed, that m fetched its own agent script once and both artifacts in full, and (BIOS)
// that the kernel command line carries a token for m's host and boot attempt. It returns
// the address m fetched from.
func (l *qemuLab) checkBoot(m *qemuMachine) string {
	t := l.t
	records := l.records()
	// One agent script for this MAC, bound to this host, at the URL the machine was meant to
	// reach (iPXE percent-encodes the colons of a DHCP-given URL; the route decodes them).
	var scripts []httpboot.Served
	for _, r := range records {
		if r.Kind == httpboot.ServedScript && r.MAC.String() == m.mac {
			scripts = append(scripts, r)
		}
	}
	if len(scripts) != 1 || scripts[0].Path != m.scriptPath || scripts[0].Action != httpboot.ActionAgent ||
		scripts[0].Host != m.key() || scripts[0].Status != 200 {
		t.Errorf("%s: scripts served %+v, want one agent script for %s at %s", m.name, scripts, m.key(), m.scriptPath)
		return ""
	}
	ip, _, _ := net.SplitHostPort(scripts[0].Remote)
	if m.ip != "" && ip != m.ip {
		t.Errorf("%s fetched its script from %s, want its reserved %s", m.name, ip, m.ip)
	}
	// Both artifacts in full, to this machine's address.
	for _, a := range []struct {
		path string
		size int
	}{{"/artifacts/vmlinuz", len(l.kernel)}, {"/artifacts/initramfs", len(l.initramfs)}} {
		n := 0
		for _, r := range records {
			if r.Kind == httpboot.ServedArtifact && r.Path == a.path && strings.HasPrefix(r.Remote, ip+":") {
				n++
				if r.Status != 200 || r.Bytes != int64(a.size) || r.Size != int64(a.size) {
					t.Errorf("%s: %s served %d of %d bytes (status %d), want all %d", m.name, a.path, r.Bytes, r.Size, r.Status, a.size)
				}
			}
		}
		if n != 1 {
			t.Errorf("%s: %s served %d times, want once", m.name, a.path, n)
		}
	}
	// The booted kernel's side.
	rep := parseStandIn(readConsole(m.console))
	if m.uefi {
		// iPXE for UEFI ran the stand-in's script part: it can say what iPXE holds.
		if !rep.script || rep.images["initramfs"] != len(l.initramfs) {
			t.Errorf("%s: the stand-in script ran: %v; iPXE holds %v, want initramfs of %d bytes", m.name, rep.script, rep.images, len(l.initramfs))
		}
		return ip
	}
	if want := (sizeSum{uint32(len(l.kernel)), byteSum(l.kernel)}); rep.kernel != want {
		t.Errorf("%s: the kernel booted with %+v, want %+v", m.name, rep.kernel, want)
	}
	// iPXE names a Multiboot module by its URI.
	if want := (sizeSum{uint32(len(l.initramfs)), byteSum(l.initramfs)}); len(rep.modules) != 1 ||
		rep.modules[l.svc.PublicURL()+"/artifacts/initramfs"] != want {
		t.Errorf("%s: the kernel got modules %+v, want initramfs %+v", m.name, rep.modules, want)
	}
	tok := regexp.MustCompile(`(?:^| )anvil\.token=([A-Za-z0-9._-]+)(?: |$)`).FindStringSubmatch(rep.cmdline)
	api := regexp.MustCompile(`(?:^| )anvil\.api=(\S+)`).FindStringSubmatch(rep.cmdline)
	if tok == nil || api == nil || api[1] != l.svc.PublicURL() || !strings.Contains(rep.cmdline, " initrd=initramfs ") {
		t.Errorf("%s: kernel command line %q lacks initrd=initramfs, the token or the API URL %s", m.name, rep.cmdline, l.svc.PublicURL())
	} else if cl, err := l.svc.Tokens.Verify(tok[1]); err != nil || cl.Host != m.key() || cl.Attempt != m.attempt {
		t.Errorf("%s: token on the kernel command line: claims %+v, %v; want host %s attempt %s", m.name, cl, err, m.key(), m.attempt)
	}
	return ip
}

// dumpOnFailure logs the machines' consoles if the test failed.
func (l *qemuLab) dumpOnFailure(ms ...*qemuMachine) {
	if !l.t.Failed() {
		return
	}
	for _, m := range ms {
		l.t.Logf("%s console:\n%s", m.name, readConsole(m.console))
	}
}

// siteDHCP plugs a namespace into the lab with a site DHCP server, dnsmasq, that hands out
// addresses only (192.0.2.100–150) and knows nothing about network boot. It returns
// dnsmasq's lease file. (Its answers are unicast to the client's MAC, which the lab's
// capture on the bridge device does not see.)
func (l *qemuLab) siteDHCP() (leases string) {
	t := l.t
	site := netns.New(t)
	l.plug(site.Name)
	must(t, site.IP("addr", "add", "192.0.2.2/24", "dev", "eth0"))
	must(t, site.IP("link", "set", "eth0", "up"))
	must(t, (&netns.Host{Namespace: site, Link: "eth0"}).WaitUp())
	dir := t.TempDir()
	leases = filepath.Join(dir, "leases")
	ctx, cancel := context.WithCancel(context.Background())
	cmd := site.Command(ctx, "dnsmasq", "--no-daemon", "--conf-file=/dev/null", "--interface=eth0", "--bind-interfaces",
		"--port=0", "--dhcp-leasefile="+leases, "--pid-file="+filepath.Join(dir, "pid"),
		"--user=root", "--group=root", "--log-facility=-", "--no-ping",
		"--dhcp-range=192.0.2.100,192.0.2.150,255.255.255.0,1h")
	stderr, err := cmd.StderrPipe()
	must(t, err)
	must(t, cmd.Start())
	ready := make(chan struct{})
	go func() {
		sc := bufio.NewScanner(stderr)
		once := sync.Once{}
		for sc.Scan() {
			if strings.Contains(sc.Text(), "DHCP, IP range") {
				once.Do(func() { close(ready) })
			}
		}
	}()
	t.Cleanup(func() { cancel(); _ = cmd.Wait() })
	select {
	case <-ready:
	case <-time.After(10 * time.Second):
		t.Fatal("dnsmasq did not start")
	}
	return leases
}

func provisioningHost(name, mac, addr, gateway string) *infrav1.AnvilHost {
	sum := sha256.Sum256([]byte(name))
	h := &infrav1.AnvilHost{
		ObjectMeta: metav1.ObjectMeta{Namespace: "lab", Name: name},
		Spec: infrav1.AnvilHostSpec{
			BootMACAddress: mac,
			BootMode:       infrav1.BootModeLegacy,
			Claim: &infrav1.HostClaim{
				MachineRef: infrav1.MachineReference{Name: name + "-machine"},
				Image: &infrav1.Image{URL: "http://images.example/os.raw", Checksum: "sha256:" + hex.EncodeToString(sum[:]),
					Format: infrav1.ImageFormatRaw, Layout: infrav1.ImageLayoutABRoot},
				BootstrapDataSecretRef: &infrav1.LocalSecretReference{Name: name + "-bootstrap"},
			},
		},
		Status: infrav1.AnvilHostStatus{State: infrav1.HostStateProvisioning},
	}
	if addr != "" {
		h.Spec.BootNetwork = &infrav1.BootNetwork{Address: addr, Gateway: gateway}
	}
	return h
}

func mustMAC(t *testing.T, s string) net.HardwareAddr {
	t.Helper()
	mac, err := net.ParseMAC(s)
	must(t, err)
	return mac
}

func must(t testing.TB, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}

// dhcpCapture watches the DHCP traffic on a link from a packet socket: every request by
// client MAC, and every reply by the client MAC it is addressed to (chaddr). Replies go out
// as broadcasts, so only chaddr says whom the server answered.
type dhcpCapture struct {
	mu       sync.Mutex
	reqs     map[string]int
	answered map[string][]dhcpReply
}

// dhcpReply is one answer seen on the wire.
type dhcpReply struct {
	Type   string // OFFER, ACK, NAK
	YourIP string // yiaddr; 0.0.0.0 in a ProxyDHCP answer
	File   string // option 67, else the file field
	Server string // option 54
}

func (c *dhcpCapture) requests(mac string) int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.reqs[mac]
}

// replies returns the answers to mac, from server (a server id) or, with "", from anyone.
func (c *dhcpCapture) replies(mac, server string) []dhcpReply {
	c.mu.Lock()
	defer c.mu.Unlock()
	var out []dhcpReply
	for _, r := range c.answered[mac] {
		if server == "" || r.Server == server {
			out = append(out, r)
		}
	}
	return out
}

func (c *dhcpCapture) observe(frame []byte) {
	// Ethernet, IPv4 without options or with, UDP 67/68.
	if len(frame) < 14+20+8+240 || frame[12] != 0x08 || frame[13] != 0x00 {
		return
	}
	ip := frame[14:]
	ihl := int(ip[0]&0x0f) * 4
	if ip[9] != 17 || len(ip) < ihl+8+240 {
		return
	}
	udp := ip[ihl:]
	sport, dport := int(udp[0])<<8|int(udp[1]), int(udp[2])<<8|int(udp[3])
	if (sport != 67 || dport != 68) && (sport != 68 || dport != 67) {
		return
	}
	bootp := udp[8:]
	mac := net.HardwareAddr(bootp[28:34]).String()
	msgType := byte(0)
	var server string
	file := strings.TrimRight(string(bootp[108:236]), "\x00")
	for opts := bootp[240:]; len(opts) >= 2 && opts[0] != 255; {
		if opts[0] == 0 {
			opts = opts[1:]
			continue
		}
		n := int(opts[1])
		if len(opts) < 2+n {
			break
		}
		if opts[0] == 53 && n == 1 {
			msgType = opts[2]
		}
		if opts[0] == 67 {
			file = string(opts[2 : 2+n])
		}
		if opts[0] == 54 && n == 4 {
			server = net.IP(opts[2:6]).String()
		}
		opts = opts[2+n:]
	}
	names := map[byte]string{2: "OFFER", 5: "ACK", 6: "NAK"}
	c.mu.Lock()
	defer c.mu.Unlock()
	if bootp[0] == 1 {
		c.reqs[mac]++
		return
	}
	c.answered[mac] = append(c.answered[mac], dhcpReply{Type: names[msgType], YourIP: net.IP(bootp[16:20]).String(), File: file, Server: server})
}

// startDHCPCapture reads every frame on link (in ns) until the test ends. It also plays the
// segment's IPv6 router: iPXE configures IPv4 and IPv6 together and, on a link where no
// router ever answers its router solicitations, waits about 20 seconds for one before it
// goes on with the DHCPv4 lease it already holds. Data centre networks have routers (or
// the wait); this test has neither, so it announces "no default router, no prefixes, no
// DHCPv6" a few times a second.
func startDHCPCapture(t *testing.T, ns *netns.Namespace, link string) *dhcpCapture {
	t.Helper()
	c := &dhcpCapture{reqs: map[string]int{}, answered: map[string][]dhcpReply{}}
	var fd int
	must(t, ns.Do(func() error {
		ifc, err := net.InterfaceByName(link)
		if err != nil {
			return err
		}
		proto := int(htons(unix.ETH_P_ALL))
		if fd, err = unix.Socket(unix.AF_PACKET, unix.SOCK_RAW|unix.SOCK_CLOEXEC, proto); err != nil {
			return fmt.Errorf("packet socket: %w", err)
		}
		if err := unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &unix.Timeval{Usec: 200000}); err != nil {
			return err
		}
		return unix.Bind(fd, &unix.SockaddrLinklayer{Protocol: htons(unix.ETH_P_ALL), Ifindex: ifc.Index})
	}))
	stop := make(chan struct{})
	done := make(chan struct{})
	var ifindex int
	must(t, ns.Do(func() error {
		ifc, err := net.InterfaceByName(link)
		if err == nil {
			ifindex = ifc.Index
		}
		return err
	}))
	go func() {
		ra := routerAdvertisement()
		to := &unix.SockaddrLinklayer{Protocol: htons(unix.ETH_P_IPV6), Ifindex: ifindex, Halen: 6}
		copy(to.Addr[:], ra[:6])
		tick := time.NewTicker(250 * time.Millisecond)
		defer tick.Stop()
		for {
			select {
			case <-stop:
				return
			case <-tick.C:
				_ = unix.Sendto(fd, ra, 0, to)
			}
		}
	}()
	go func() {
		defer close(done)
		buf := make([]byte, 65536)
		for {
			select {
			case <-stop:
				return
			default:
			}
			n, _, err := unix.Recvfrom(fd, buf, 0)
			if err != nil {
				continue // timeout: look at stop again
			}
			c.observe(buf[:n])
		}
	}()
	t.Cleanup(func() {
		close(stop)
		<-done
		_ = unix.Close(fd)
	})
	return c
}

func htons(v uint16) uint16 { return v<<8 | v>>8 }

// routerAdvertisement is an Ethernet frame with an ICMPv6 router advertisement to all nodes:
// router lifetime 0 (not a default router), no prefixes, M and O clear (no DHCPv6).
func routerAdvertisement() []byte {
	mac := []byte{0x02, 0, 0, 0, 0, 0xfe}
	src := net.ParseIP("fe80::ff:fe00:fe").To16()
	dst := net.ParseIP("ff02::1").To16()
	// type, code, checksum, hop limit, flags, lifetime, reachable, retrans; source link-layer
	// address option.
	icmp := []byte{134, 0, 0, 0, 64, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1}
	icmp = append(icmp, mac...)
	var sum uint32
	add := func(b []byte) {
		for i := 0; i+1 < len(b); i += 2 {
			sum += uint32(b[i])<<8 | uint32(b[i+1])
		}
	}
	add(src)
	add(dst)
	add([]byte{0, 0, 0, byte(len(icmp)), 0, 0, 0, 58})
	add(icmp)
	for sum > 0xffff {
		sum = sum&0xffff + sum>>16
	}
	binary.BigEndian.PutUint16(icmp[2:], ^uint16(sum))
	frame := []byte{0x33, 0x33, 0, 0, 0, 1}
	frame = append(frame, mac...)
	frame = append(frame, 0x86, 0xdd, 0x60, 0, 0, 0, 0, byte(len(icmp)), 58, 255)
	frame = append(frame, src...)
	frame = append(frame, dst...)
	return append(frame, icmp...)
}
