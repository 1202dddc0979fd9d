package lab

import (
	"bytes"
	"context"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/go-logr/logr"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"

	infrav1 "github.com/anvil-metal/cluster-api-provider-anvil/api/v1alpha1"
	"github.com/anvil-metal/cluster-api-provider-anvil/internal/bmc"
	"github.com/anvil-metal/cluster-api-provider-anvil/internal/boot/httpboot"
	"github.com/anvil-metal/cluster-api-provider-anvil/internal/bootservices"
	"github.com/anvil-metal/cluster-api-provider-anvil/internal/netns"
	"github.com/anvil-metal/cluster-api-provider-anvil/internal/vbmc/machine"
)

func must(t testing.TB, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}

// netbootLab is a provisioning network with Anvil's boot services on it, as the lab runs them.
type netbootLab struct {
	net                        *Network
	svc                        *bootservices.Services
	kernel, initramfs, ipxeEFI []byte
}

func newNetbootLab(t *testing.T) *netbootLab {
	if err := netns.Check(); err != nil {
		t.Skip(err)
	}
	n, err := NewNetwork()
	must(t, err)
	t.Cleanup(func() { must(t, n.Close()) })
	l := &netbootLab{net: n, kernel: make([]byte, 300<<10), initramfs: append([]byte{0x1f, 0x8b}, bytes.Repeat([]byte("initramfs"), 20000)...)}
	l.kernel[0x1FE], l.kernel[0x1FF] = 0x55, 0xAA
	copy(l.kernel[0x202:], "HdrS")
	artifacts, tftpDir := t.TempDir(), t.TempDir()
	must(t, os.WriteFile(filepath.Join(artifacts, "vmlinuz"), l.kernel, 0o600))
	must(t, os.WriteFile(filepath.Join(artifacts, "initramfs"), l.initramfs, 0o600))
	for i, name := range []string{"undionly.kpxe", "ipxe.efi", "snponly.efi"} {
		content := bytes.Repeat([]byte(name), 3000+i*1000) // several TFTP blocks, different sizes
		if name == "ipxe.efi" {
			l.ipxeEFI = content
		}
		must(t, os.WriteFile(filepath.Join(tftpDir, name), content, 0o600))
	}
	// HTTP, DHCP and TFTP all in the network's namespace, on the bridge.
	l.svc, err = n.BootServices(bootservices.Config{ArtifactsDir: artifacts,
		ImageCacheDir: t.TempDir(), ImageCacheBytes: 1 << 30, Log: logr.Discard()}, tftpDir)
	must(t, err)
	if want := "http://" + n.ServerIP.String() + ":"; !strings.HasPrefix(l.svc.PublicURL(), want) {
		t.Fatalf("PublicURL %s, want it on the bridge (%s...)", l.svc.PublicURL(), want)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- l.svc.Start(ctx) }()
	t.Cleanup(func() {
		cancel()
		must(t, <-done)
	})
	return l
}

// provision has the backend network-boot a host, as the host controller does; the BMC's
// part is the test's call of netboot.
func (l *netbootLab) provision(t *testing.T, name, mac string, addr netip.Prefix, mode infrav1.BootMode) {
	h := &infrav1.AnvilHost{
		ObjectMeta: metav1.ObjectMeta{Namespace: "lab", Name: name},
		Spec: infrav1.AnvilHostSpec{BootMACAddress: mac, BootMode: mode, BootNetwork: &infrav1.BootNetwork{Address: addr.String()},
			Claim: &infrav1.HostClaim{MachineRef: infrav1.MachineReference{Name: name + "-machine"},
				Image: &infrav1.Image{URL: "http://images.example/os.raw", Checksum: "sha256:" + strings.Repeat("ab", 32),
					Format: infrav1.ImageFormatRaw, Layout: infrav1.ImageLayoutABRoot},
				BootstrapDataSecretRef: &infrav1.LocalSecretReference{Name: name + "-bootstrap"}}},
		Status: infrav1.AnvilHostStatus{State: infrav1.HostStateProvisioning},
	}
	_, err := l.svc.Backend.Provision(context.Background(), h, func(string, func(context.Context, bmc.Client) error) error { return nil })
	must(t, err)
	if _, err := l.svc.Backend.Expected(context.Background(), types.NamespacedName{Namespace: "lab", Name: name}); err != nil {
		t.Fatal(err)
	}
}

func TestNetbootTakesALeaseAndLoadsIPXEScriptAndAgent(t *testing.T) {
	l := newNetbootLab(t)
	for i, tc := range []struct {
		mode     infrav1.BootMode
		fw       machine.BootMode
		bootFile string
	}{
		{infrav1.BootModeUEFI, machine.BootModeUEFI, "ipxe.efi"},
		{infrav1.BootModeLegacy, machine.BootModeLegacy, "undionly.kpxe"},
	} {
		name, mac := "server-"+string(rune('a'+i)), "52:54:00:aa:00:0"+string(rune('1'+i))
		addr, err := l.net.HostAddr(i)
		must(t, err)
		port, err := l.net.Plug(mac)
		must(t, err)
		l.provision(t, name, mac, addr, tc.mode)
		var got []NetworkBoot
		s := &Server{Name: name, MAC: mac, Net: port, BootURL: l.svc.PublicURL(), Log: logr.Discard(),
			OnNetworkBoot: func(nb NetworkBoot) { got = append(got, nb) }}
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		params, ok := s.netboot(ctx, tc.fw)
		cancel()
		if len(got) != 1 {
			t.Fatalf("%s: %d network boots reported, want 1", name, len(got))
		}
		nb := got[0]
		if !ok || nb.Err != nil || !nb.Agent {
			t.Fatalf("%s: netboot = %v, %+v", name, ok, nb)
		}
		if nb.Lease != addr || nb.DHCPServer != l.net.ServerIP || nb.TFTPServer != l.net.ServerIP {
			t.Errorf("%s: lease %s from %s (TFTP %s), want %s from %s", name, nb.Lease, nb.DHCPServer, nb.TFTPServer, addr, l.net.ServerIP)
		}
		if nb.BootFile != tc.bootFile {
			t.Errorf("%s (%s): boot file %q, want %q", name, tc.fw, nb.BootFile, tc.bootFile)
		}
		if tc.bootFile == "ipxe.efi" && nb.BootFileBytes != len(l.ipxeEFI) {
			t.Errorf("%s: TFTP gave %d bytes of ipxe.efi, want %d", name, nb.BootFileBytes, len(l.ipxeEFI))
		}
		if want := l.svc.PublicURL() + "/ipxe/mac/"; !strings.HasPrefix(nb.ScriptURL, want) {
			t.Errorf("%s: script URL %q, want under %s", name, nb.ScriptURL, want)
		}
		if nb.Kernel.Bytes != int64(len(l.kernel)) || nb.Initrd.Bytes != int64(len(l.initramfs)) {
			t.Errorf("%s: kernel %d, initramfs %d bytes; served %d and %d", name, nb.Kernel.Bytes, nb.Initrd.Bytes, len(l.kernel), len(l.initramfs))
		}
		if params.Token == "" || !strings.HasPrefix(params.APIURL, l.svc.PublicURL()) {
			t.Errorf("%s: boot parameters %+v", name, params)
		}
		// The address is really on the server's interface, in its namespace only.
		out, err := port.Run(context.Background(), "ip", "-4", "-o", "addr", "show", "dev", port.Link)
		if err != nil || !strings.Contains(string(out), addr.String()) {
			t.Errorf("%s: interface: %v %s", name, err, out)
		}
		if !strings.Contains(nb.String(), "DHCP lease "+addr.String()) {
			t.Errorf("%s: account %q", name, nb.String())
		}
	}
	if st := l.svc.DHCPStats(); st.Acks != 4 || st.Offers != 4 {
		t.Errorf("Anvil's DHCP server: %+v, want 4 offers and 4 ACKs (two rounds per boot)", st)
	}
	if st := l.svc.TFTPStats(); st.Served != 2 {
		t.Errorf("Anvil's TFTP server: %+v, want 2 files served", st)
	}
}

func TestNetbootWithoutAnAnswerMovesOnToTheDisk(t *testing.T) {
	l := newNetbootLab(t)
	port, err := l.net.Plug("52:54:00:aa:00:09") // Anvil is not booting it: its DHCP stays silent
	must(t, err)
	var got []NetworkBoot
	s := &Server{Name: "idle", MAC: "52:54:00:aa:00:09", Net: port, Log: logr.Discard(), OnNetworkBoot: func(nb NetworkBoot) { got = append(got, nb) }}
	if _, ok := s.netboot(context.Background(), machine.BootModeUEFI); ok {
		t.Fatal("netboot succeeded without a DHCP answer")
	}
	if len(got) != 1 || got[0].Err == nil || !strings.Contains(got[0].String(), "PXE DHCP") {
		t.Fatalf("reported %+v", got)
	}
}

func TestNetworkSweepsWhatAKilledLabLeft(t *testing.T) {
	if err := netns.Check(); err != nil {
		t.Skip(err)
	}
	// A namespace named as a lab names them, by a process that no longer exists.
	leftover := NamespacePrefix + "999999999-1-deadbeef"
	if out, err := exec.Command("ip", "netns", "add", leftover).CombinedOutput(); err != nil {
		t.Fatalf("%v: %s", err, out)
	}
	n, err := NewNetwork()
	must(t, err)
	port, err := n.Plug("52:54:00:aa:00:10")
	must(t, err)
	if _, err := os.Stat(filepath.Join("/run/netns", leftover)); !os.IsNotExist(err) {
		_, _ = exec.Command("ip", "netns", "del", leftover).CombinedOutput()
		t.Errorf("the leftover namespace is still there: %v", err)
	}
	mine := []string{n.Switch.Name, port.Name}
	for _, name := range mine {
		if _, err := os.Stat(filepath.Join("/run/netns", name)); err != nil {
			t.Errorf("namespace %s: %v", name, err)
		}
	}
	must(t, n.Close())
	for _, name := range mine {
		if _, err := os.Stat(filepath.Join("/run/netns", name)); !os.IsNotExist(err) {
			t.Errorf("namespace %s survived Close: %v", name, err)
		}
	}
}

func TestParseScriptReadsWhatBootServicesRender(t *testing.T) {
	script, err := httpboot.RenderScript(httpboot.Script{Action: httpboot.ActionAgent, Agent: &httpboot.AgentBoot{
		Host: types.NamespacedName{Namespace: "lab", Name: "s1"}, KernelURL: "http://10.77.0.1:8080/artifacts/vmlinuz",
		InitrdURL: "http://10.77.0.1:8080/artifacts/initramfs", APIURL: "http://10.77.0.1:8080/agent", Token: "tok.en",
		Console: []string{"ttyS0,115200n8"}, RetryURL: "http://10.77.0.1:8080/ipxe/mac/52-54-00-00-00-01"}})
	must(t, err)
	kernel, cmdline, initrd, ok := parseScript(string(script))
	if !ok || kernel != "http://10.77.0.1:8080/artifacts/vmlinuz" || initrd != "http://10.77.0.1:8080/artifacts/initramfs" ||
		!strings.Contains(cmdline, "anvil.token=tok.en") || strings.Contains(cmdline, "||") || strings.Contains(cmdline, "--name") {
		t.Fatalf("parseScript = %q %q %q %v\n%s", kernel, cmdline, initrd, ok, script)
	}
	exit, err := httpboot.RenderScript(httpboot.Script{Action: httpboot.ActionExit})
	must(t, err)
	if _, _, _, ok := parseScript(string(exit)); ok {
		t.Fatalf("an exit script boots a kernel:\n%s", exit)
	}
}

func TestSweepWorkDirsRemovesOnlyKilledLabs(t *testing.T) {
	tag, err := netns.OwnerTag()
	if err != nil {
		t.Skip(err)
	}
	dir := t.TempDir()
	dead, alive, other := NamespacePrefix+"999999999-1-42", NamespacePrefix+tag+"-43", NamespacePrefix+"1391859793"
	for _, d := range []string{dead, alive, other} {
		must(t, os.MkdirAll(filepath.Join(dir, d, "image-cache"), 0o700))
	}
	SweepWorkDirs(dir)
	for d, want := range map[string]bool{dead: false, alive: true, other: true} {
		if _, err := os.Stat(filepath.Join(dir, d)); (err == nil) != want {
			t.Errorf("%s: exists=%v, want %v", d, err == nil, want)
		}
	}
}
