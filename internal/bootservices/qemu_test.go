package bootservices

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
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
)

// TestIPXEInQEMU boots real iPXE firmware — the NIC option ROM of Debian's ipxe-qemu, under
// qemu with TCG — against the boot services as the manager assembles them (reservation DHCP,
// TFTP, HTTP, the provisioning backend and its tokens), on a bridge inside a network
// namespace that the test makes and deletes.
//
// Four machines share the bridge:
//   - "direct" (SeaBIOS, iPXE in the NIC's ROM) gets its lease and the per-host script URL
//     from DHCP (the {mac} template, expanded by the DHCP server), fetches the script, the
//     kernel and the initramfs;
//   - "entry" (the same) is told the entry script (/ipxe/boot.ipxe), which makes iPXE expand
//     ${mac:hexhyp} itself and chain to its per-host script: the URL form for sites whose
//     own DHCP server points machines at Anvil;
//   - "uefi" (OVMF, a NIC without option ROM) is a UEFI PXE client (architecture 7): it must
//     be given ipxe.efi, fetch it over TFTP, and the iPXE it starts must then go on as above;
//   - "stranger" is a MAC Anvil is not booting: it must get no DHCP answer at all.
//
// The agent kernel is a stand-in (testdata/standin-kernel.S): a Multiboot kernel, padded to
// 1 MiB, that prints on the serial console the size and byte sum of itself and of the
// initramfs iPXE loaded, and the command line iPXE gave it. The test checks the boot
// services' own records (the DHCP answers seen on the wire, the scripts and the artifact
// bytes served), the booted kernel's view of the same bytes, and that the token on its
// command line is valid for the host and the boot attempt.
//
// The UEFI machine sets the pace: about 30 s on a busy 2-core machine (12 s for OVMF to
// start under TCG, 4 s of EDK2 collecting DHCP offers, 1 s of TFTP, 8 s for iPXE to start,
// 4 s of its DHCP); the BIOS machines are done after about 9 s. Every machine's segment
// also carries router advertisements (see startDHCPCapture), without which iPXE waits
// about 20 s for IPv6 before using its DHCPv4 lease.
func TestIPXEInQEMU(t *testing.T) {
	qemu, ovmf := needQEMU(t)
	start := time.Now()

	ns := netns.New(t)
	const bridge = "br0"
	serverIP := netip.MustParseAddr("192.0.2.1")
	for _, args := range [][]string{
		{"link", "add", bridge, "type", "bridge"},
		{"link", "set", bridge, "type", "bridge", "stp_state", "0", "forward_delay", "0"},
		{"addr", "add", serverIP.String() + "/24", "dev", bridge},
		{"link", "set", bridge, "up"},
	} {
		if err := ns.IP(args...); err != nil {
			t.Fatal(err)
		}
	}
	// The server side needs no IPv6 (the capture below answers iPXE's router solicitations).
	_, _ = ns.Run(context.Background(), "sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1")

	capture := startDHCPCapture(t, ns, bridge)

	// Artifacts: the kernel stand-in and an initramfs of arbitrary bytes.
	artifacts := t.TempDir()
	kernel := standInKernel(t, 1<<20)
	initramfs := make([]byte, 3<<20)
	for i := range initramfs {
		initramfs[i] = byte(i*7 + i>>11)
	}
	must(t, os.WriteFile(filepath.Join(artifacts, "vmlinuz"), kernel, 0o644))
	must(t, os.WriteFile(filepath.Join(artifacts, "initramfs"), initramfs, 0o644))

	var mu sync.Mutex
	var served []httpboot.Served
	var svc *Services
	must(t, ns.Do(func() error {
		var err error
		svc, err = New(Config{
			HTTPAddress: serverIP.String() + ":0", ArtifactsDir: artifacts,
			ImageCacheDir: t.TempDir(), ImageCacheBytes: 1 << 30,
			DHCPMode: dhcp.ModeReservation, DHCPInterface: bridge, ServerIP: serverIP, TFTPDir: "/usr/lib/ipxe",
			TFTPSinglePort: true, // transfers must stay in this namespace
			OnServed:       func(s httpboot.Served) { mu.Lock(); defer mu.Unlock(); served = append(served, s) },
			Log:            funcr.New(func(p, a string) { t.Log(time.Since(start).Round(100*time.Millisecond), p, a) }, funcr.Options{Verbosity: 1}),
		})
		if err != nil {
			return err
		}
		return svc.Listen()
	}))
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- svc.Start(ctx) }()
	t.Cleanup(func() {
		cancel()
		must(t, <-done)
	})

	type machine struct {
		name string
		mac  string
		ip   string
		uefi bool
		// scriptPath is the per-host script URL path the machine should end up at.
		scriptPath string
		host       *infrav1.AnvilHost
		attempt    string
		console    string
		stop       context.CancelFunc
	}
	machines := []*machine{
		{name: "direct", mac: "52:54:00:a0:00:01", ip: "192.0.2.51", scriptPath: "/ipxe/mac/52:54:00:a0:00:01"},
		{name: "entry", mac: "52:54:00:a0:00:02", ip: "192.0.2.52", scriptPath: "/ipxe/mac/52-54-00-a0-00-02"},
		{name: "uefi", mac: "52:54:00:a0:00:03", ip: "192.0.2.53", scriptPath: "/ipxe/mac/52:54:00:a0:00:03", uefi: true},
		{name: "stranger", mac: "52:54:00:a0:00:99"},
	}
	known, entry, uefi, stranger := machines[:3], machines[1], machines[2], machines[3]
	for _, m := range known {
		m.host = provisioningHost(m.name, m.mac, m.ip+"/24", serverIP.String())
		if m.uefi {
			m.host.Spec.BootMode = infrav1.BootModeUEFI
		}
		var ops []string
		out, err := svc.Backend.Provision(ctx, m.host, func(op string, _ func(context.Context, bmc.Client) error) error {
			// The BMC's part (one-time PXE boot, power cycle) is qemu's start below.
			ops = append(ops, op)
			return nil
		})
		if err != nil || len(ops) != 1 || ops[0] != "network-boot" {
			t.Fatalf("%s: Provision: %+v %v (BMC operations %v)", m.name, out, err, ops)
		}
		view, err := svc.Backend.Expected(ctx, types.NamespacedName{Namespace: m.host.Namespace, Name: m.host.Name})
		must(t, err)
		m.attempt = view.Attempt
	}
	// The entry machine's DHCP answer names the static entry script instead of its own.
	h, ok := svc.Booting.Lookup(mustMAC(t, entry.mac))
	if !ok {
		t.Fatal("the DHCP server was not told about the entry machine")
	}
	h.ScriptURL = svc.PublicURL() + "/ipxe/boot.ipxe"
	must(t, svc.Booting.Set(mustMAC(t, entry.mac), h))

	var vms sync.WaitGroup
	for i, m := range machines {
		tap := "tap" + strconv.Itoa(i)
		for _, args := range [][]string{{"tuntap", "add", "dev", tap, "mode", "tap"}, {"link", "set", tap, "master", bridge, "up"}} {
			if err := ns.IP(args...); err != nil {
				t.Fatal(err)
			}
		}
		m.console = filepath.Join(t.TempDir(), m.name+".log")
		args := []string{"-accel", "tcg", "-m", "256", "-boot", "n", "-no-reboot",
			"-nographic", "-vga", "none", "-monitor", "none", "-serial", "file:" + m.console,
			"-netdev", "tap,id=n0,ifname=" + tap + ",script=no,downscript=no"}
		if m.uefi {
			// A virtio NIC without option ROM: OVMF drives it itself, and its own PXE client
			// (architecture 7, no iPXE) must fetch ipxe.efi over TFTP and chain to it. With
			// iPXE's ROM on the NIC, OVMF would boot that iPXE straight away.
			args = append(args, "-bios", ovmf, "-device", "virtio-net-pci,romfile=,netdev=n0,mac="+m.mac)
		} else {
			args = append(args, "-device", "e1000,netdev=n0,mac="+m.mac)
		}
		var vmCtx context.Context
		vmCtx, m.stop = context.WithCancel(context.Background())
		cmd := ns.Command(vmCtx, qemu, args...)
		var out bytes.Buffer
		cmd.Stdout, cmd.Stderr = &out, &out
		must(t, cmd.Start())
		vms.Go(func() {
			err := cmd.Wait()
			if vmCtx.Err() == nil {
				t.Errorf("%s: qemu exited early: %v\n%s", m.name, err, out.String())
			}
		})
	}
	stopVMs := func() {
		for _, m := range machines {
			m.stop()
		}
		vms.Wait()
	}
	t.Cleanup(stopVMs)

	// The stranger is heard twice (iPXE retransmits), then stopped: it has had all the time
	// an answer takes, and its CPU is better spent on the others.
	// A guard only: the whole test takes about 30 s (see above).
	deadline := time.Now().Add(2 * time.Minute)
	for capture.requests(stranger.mac) < 2 {
		if time.Now().After(deadline) {
			t.Fatalf("the unknown machine sent %d DHCP requests", capture.requests(stranger.mac))
		}
		time.Sleep(200 * time.Millisecond)
	}
	time.Sleep(time.Second)
	stranger.stop()
	// The known machines end in the stand-in kernel, which prints a marker once iPXE has
	// loaded the kernel and the initramfs and booted.
	for _, m := range known {
		for !parseStandIn(readConsole(m.console)).ended {
			if time.Now().After(deadline) {
				t.Fatalf("%s: iPXE did not boot the agent within the deadline; console:\n%s", m.name, readConsole(m.console))
			}
			time.Sleep(200 * time.Millisecond)
		}
		t.Logf("%s: booted the stand-in kernel after %.1fs", m.name, time.Since(start).Seconds())
		m.stop()
	}
	stopVMs()
	elapsed := time.Since(start)

	mu.Lock()
	records := append([]httpboot.Served(nil), served...)
	mu.Unlock()
	for _, m := range known {
		key := types.NamespacedName{Namespace: m.host.Namespace, Name: m.host.Name}
		// DHCP: an offer and an ack with the reserved address; iPXE is given its script URL
		// (and UEFI firmware, before it, ipxe.efi).
		wantFile := svc.PublicURL() + m.scriptPath
		if m == entry {
			wantFile = svc.PublicURL() + "/ipxe/boot.ipxe"
		}
		wantFiles := []string{"ACK " + m.ip + " " + wantFile}
		if m.uefi {
			wantFiles = append([]string{"ACK " + m.ip + " ipxe.efi"}, wantFiles...)
		}
		if got := capture.replies(m.mac); !containsAll(got, append(wantFiles, "OFFER "+m.ip+" "+strings.TrimPrefix(wantFiles[0], "ACK "+m.ip+" "))...) {
			t.Errorf("%s: DHCP replies %v, want an OFFER and an ACK of %s with %v", m.name, got, m.ip, wantFiles)
		}
		// HTTP: one agent script for this MAC, bound to this host, at the URL the machine was
		// meant to reach (iPXE percent-encodes the colons of the DHCP-given URL; the route
		// decodes them).
		var scripts []httpboot.Served
		for _, r := range records {
			if r.Kind == httpboot.ServedScript && r.MAC.String() == m.mac {
				scripts = append(scripts, r)
			}
		}
		if len(scripts) != 1 || scripts[0].Path != m.scriptPath || scripts[0].Action != httpboot.ActionAgent ||
			scripts[0].Host != key || scripts[0].Status != 200 || !strings.HasPrefix(scripts[0].Remote, m.ip+":") {
			t.Errorf("%s: scripts served %+v, want one agent script for %s at %s", m.name, scripts, key, m.scriptPath)
		}
		// Both artifacts in full, to this machine's address.
		for _, a := range []struct {
			path string
			size int
		}{{"/artifacts/vmlinuz", len(kernel)}, {"/artifacts/initramfs", len(initramfs)}} {
			n := 0
			for _, r := range records {
				if r.Kind == httpboot.ServedArtifact && r.Path == a.path && strings.HasPrefix(r.Remote, m.ip+":") {
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
		// The booted kernel's side: every byte of both files, and the command line.
		console := readConsole(m.console)
		rep := parseStandIn(console)
		if m.uefi {
			// iPXE for UEFI ran the stand-in's script part: it can say what iPXE holds.
			if !rep.script || rep.images["initramfs"] != len(initramfs) {
				t.Errorf("%s: the stand-in script ran: %v; iPXE holds %v, want initramfs of %d bytes", m.name, rep.script, rep.images, len(initramfs))
			}
			continue
		}
		if want := (sizeSum{uint32(len(kernel)), byteSum(kernel)}); rep.kernel != want {
			t.Errorf("%s: the kernel booted with %+v, want %+v", m.name, rep.kernel, want)
		}
		// iPXE names a Multiboot module by its URI.
		if want := (sizeSum{uint32(len(initramfs)), byteSum(initramfs)}); len(rep.modules) != 1 ||
			rep.modules[svc.PublicURL()+"/artifacts/initramfs"] != want {
			t.Errorf("%s: the kernel got modules %+v, want initramfs %+v", m.name, rep.modules, want)
		}
		tok := regexp.MustCompile(`(?:^| )anvil\.token=([A-Za-z0-9._-]+)(?: |$)`).FindStringSubmatch(rep.cmdline)
		api := regexp.MustCompile(`(?:^| )anvil\.api=(\S+)`).FindStringSubmatch(rep.cmdline)
		if tok == nil || api == nil || api[1] != svc.PublicURL() || !strings.Contains(rep.cmdline, " initrd=initramfs ") {
			t.Errorf("%s: kernel command line %q lacks initrd=initramfs, the token or the API URL %s", m.name, rep.cmdline, svc.PublicURL())
		} else if cl, err := svc.Tokens.Verify(tok[1]); err != nil || cl.Host != key || cl.Attempt != m.attempt {
			t.Errorf("%s: token on the kernel command line: claims %+v, %v; want host %s attempt %s", m.name, cl, err, key, m.attempt)
		}
	}
	// The entry machine's first request was the entry script itself.
	for _, r := range records {
		if strings.HasPrefix(r.Remote, entry.ip+":") {
			if r.Path != "/ipxe/boot.ipxe" {
				t.Errorf("entry machine's first request was %s, want /ipxe/boot.ipxe", r.Path)
			}
			break
		}
	}
	// The stranger: heard, never answered, never served.
	if got := capture.replies(stranger.mac); len(got) > 0 {
		t.Errorf("unknown MAC got DHCP replies %v", got)
	}
	for _, r := range records {
		if r.Kind == httpboot.ServedScript && r.MAC.String() == stranger.mac {
			t.Errorf("unknown MAC was served a script: %+v", r)
		}
	}
	if st := svc.DHCPStats(); st.Unknown < 2 {
		t.Errorf("DHCP stats %+v: the unknown machine's requests were not counted", st)
	}
	// One TFTP transfer: ipxe.efi to the UEFI firmware (which may ask for its size first).
	// iPXE ROMs go straight to HTTP.
	if st := svc.TFTPStats(); st.Served != 1 || st.Refused != 0 || st.Failed != 0 || st.SizeQueries > 1 {
		t.Errorf("TFTP %+v, want exactly one file served (ipxe.efi for %s)", st, uefi.name)
	}
	if t.Failed() {
		for _, m := range machines {
			t.Logf("%s console:\n%s", m.name, readConsole(m.console))
		}
	}
	t.Logf("%d VMs, %d booted through iPXE in %.1fs; DHCP %+v; TFTP %+v; %d HTTP records", len(machines), len(known), elapsed.Seconds(),
		svc.DHCPStats(), svc.TFTPStats(), len(records))
}

// standInMarker starts every line the stand-in kernel prints.
const standInMarker = "ANVIL-STAND-IN"

// standInScript is the stand-in kernel's first 512 bytes: what iPXE for UEFI runs. It lists
// the images iPXE holds (the executing one excepted) and waits.
const standInScript = "#!ipxe\necho " + standInMarker + " script\nimgstat\necho " + standInMarker + " end\n:hold\nsleep 60\ngoto hold\n"

// standInKernel assembles testdata/standin-kernel.S, writes standInScript into its first
// 512 bytes and pads it to size bytes, with load_end_addr covering all of them so that the
// kernel's sum of itself covers the padding.
func standInKernel(t *testing.T, size int) []byte {
	t.Helper()
	dir := t.TempDir()
	obj, bin := filepath.Join(dir, "k.o"), filepath.Join(dir, "k.bin")
	for _, c := range [][]string{
		{"as", "--32", "-o", obj, "testdata/standin-kernel.S"},
		{"ld", "-m", "elf_i386", "-Ttext=0x100000", "--oformat", "binary", "-o", bin, obj},
	} {
		if out, err := exec.Command(c[0], c[1:]...).CombinedOutput(); err != nil {
			t.Fatalf("%v: %v\n%s", c, err, out)
		}
	}
	code, err := os.ReadFile(bin)
	must(t, err)
	const header = 512
	if len(code) > size || len(code) < header+32 || binary.LittleEndian.Uint32(code[header:]) != 0x1BADB002 {
		t.Fatalf("stand-in kernel: %d bytes, no Multiboot header at %d", len(code), header)
	}
	k := make([]byte, size)
	copy(k, code)
	script := standInScript + strings.Repeat("#", header-1-len(standInScript)) + "\n"
	copy(k, script)
	for i := len(code); i < size; i++ {
		k[i] = byte(i ^ i>>9)
	}
	binary.LittleEndian.PutUint32(k[header+20:], uint32(0x100000+size))
	return k
}

// byteSum is the stand-in kernel's checksum: the 32-bit sum of the bytes.
func byteSum(b []byte) uint32 {
	var s uint32
	for _, c := range b {
		s += uint32(c)
	}
	return s
}

// standInReport is what the stand-in kernel printed: its own size and sum, its command line,
// and each module's by name.
type standInReport struct {
	kernel  sizeSum
	cmdline string
	modules map[string]sizeSum
	ended   bool
	// script: the script part ran (iPXE for UEFI), and images is what its imgstat listed.
	script bool
	images map[string]int
}

type sizeSum struct{ size, sum uint32 }

var standInRE = regexp.MustCompile(`^` + standInMarker + ` (kernel|module (\S+)) size=([0-9a-f]{8}) sum=([0-9a-f]{8})$`)

// imgstatRE matches an imgstat line: "NAME : SIZE bytes [TYPE] CMDLINE".
var imgstatRE = regexp.MustCompile(`^(\S+) : (\d+) bytes`)

func parseStandIn(console string) standInReport {
	r := standInReport{modules: map[string]sizeSum{}, images: map[string]int{}}
	for _, l := range strings.Split(console, "\n") {
		l = strings.TrimSpace(l)
		if l == standInMarker+" script" {
			r.script = true
			continue
		}
		if m := imgstatRE.FindStringSubmatch(l); m != nil && r.script && !r.ended {
			n, _ := strconv.Atoi(m[2])
			r.images[m[1]] = n
			continue
		}
		if rest, ok := strings.CutPrefix(l, standInMarker+" cmdline "); ok {
			r.cmdline = rest
			continue
		}
		if l == standInMarker+" end" {
			r.ended = true
			continue
		}
		m := standInRE.FindStringSubmatch(l)
		if m == nil {
			continue
		}
		size, _ := strconv.ParseUint(m[3], 16, 32)
		sum, _ := strconv.ParseUint(m[4], 16, 32)
		v := sizeSum{uint32(size), uint32(sum)}
		if m[1] == "kernel" {
			r.kernel = v
		} else {
			r.modules[m[2]] = v
		}
	}
	return r
}

var ansiRE = regexp.MustCompile(`\x1b(\[[0-9;?]*[A-Za-z]|[A-Za-z])`)

// readConsole returns the serial console so far, without terminal control sequences.
func readConsole(path string) string {
	b, _ := os.ReadFile(path)
	s := ansiRE.ReplaceAllString(string(b), "")
	s = strings.ReplaceAll(s, "\r", "")
	return strings.ReplaceAll(s, "\b \b", "")
}

func needQEMU(t *testing.T) (qemu, ovmf string) {
	t.Helper()
	netns.Require(t)
	qemu, err := exec.LookPath("qemu-system-x86_64")
	if err != nil {
		t.Skip("qemu-system-x86_64 not installed (hack/install-test-deps.sh installs qemu-system-x86)")
	}
	for _, tool := range []string{"as", "ld"} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Skipf("%s not installed (hack/install-test-deps.sh installs binutils, which builds the stand-in kernel)", tool)
		}
	}
	ovmf = "/usr/share/ovmf/OVMF.fd"
	for _, f := range []string{"/usr/lib/ipxe/qemu/efi-e1000.rom", "/usr/lib/ipxe/undionly.kpxe", "/usr/lib/ipxe/ipxe.efi", ovmf} {
		if _, err := os.Stat(f); err != nil {
			t.Skipf("%s missing (hack/install-test-deps.sh installs ipxe, ipxe-qemu and ovmf)", f)
		}
	}
	if _, err := os.Stat("/dev/net/tun"); err != nil {
		t.Skip("/dev/net/tun missing: qemu needs a tap device")
	}
	return qemu, ovmf
}

func provisioningHost(name, mac, addr, gateway string) *infrav1.AnvilHost {
	sum := sha256.Sum256([]byte(name))
	return &infrav1.AnvilHost{
		ObjectMeta: metav1.ObjectMeta{Namespace: "lab", Name: name},
		Spec: infrav1.AnvilHostSpec{
			BootMACAddress: mac,
			BootMode:       infrav1.BootModeLegacy,
			BootNetwork:    &infrav1.BootNetwork{Address: addr, Gateway: gateway},
			Claim: &infrav1.HostClaim{
				MachineRef: infrav1.MachineReference{Name: name + "-machine"},
				Image: &infrav1.Image{URL: "http://images.example/os.raw", Checksum: "sha256:" + hex.EncodeToString(sum[:]),
					Format: infrav1.ImageFormatRaw, Layout: infrav1.ImageLayoutABRoot},
				BootstrapDataSecretRef: &infrav1.LocalSecretReference{Name: name + "-bootstrap"},
			},
		},
		Status: infrav1.AnvilHostStatus{State: infrav1.HostStateProvisioning},
	}
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

func containsAll(have []string, want ...string) bool {
	for _, w := range want {
		found := false
		for _, h := range have {
			found = found || h == w
		}
		if !found {
			return false
		}
	}
	return true
}

// dhcpCapture watches the DHCP traffic on a link from a packet socket: every request by
// client MAC, and every reply by the client MAC it is addressed to (chaddr). Replies go out
// as broadcasts, so only chaddr says whom the server answered.
type dhcpCapture struct {
	mu       sync.Mutex
	reqs     map[string]int
	answered map[string][]string
}

func (c *dhcpCapture) requests(mac string) int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.reqs[mac]
}

// replies returns "TYPE yiaddr bootfile" for each reply to mac.
func (c *dhcpCapture) replies(mac string) []string {
	c.mu.Lock()
	defer c.mu.Unlock()
	return append([]string(nil), c.answered[mac]...)
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
		opts = opts[2+n:]
	}
	names := map[byte]string{2: "OFFER", 5: "ACK", 6: "NAK"}
	c.mu.Lock()
	defer c.mu.Unlock()
	if bootp[0] == 1 {
		c.reqs[mac]++
		return
	}
	c.answered[mac] = append(c.answered[mac], fmt.Sprintf("%s %s %s", names[msgType], net.IP(bootp[16:20]), file))
}

// startDHCPCapture reads every frame on link (in ns) until the test ends. It also plays the
// segment's IPv6 router: iPXE configures IPv4 and IPv6 together and, on a link where no
// router ever answers its router solicitations, waits about 20 seconds for one before it
// goes on with the DHCPv4 lease it already holds. Data centre networks have routers (or
// the wait); this test has neither, so it announces "no default router, no prefixes, no
// DHCPv6" a few times a second.
func startDHCPCapture(t *testing.T, ns *netns.Namespace, link string) *dhcpCapture {
	t.Helper()
	c := &dhcpCapture{reqs: map[string]int{}, answered: map[string][]string{}}
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
