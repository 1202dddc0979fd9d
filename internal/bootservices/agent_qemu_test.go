package bootservices

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	clientgoscheme "k8s.io/client-go/kubernetes/scheme"
	"sigs.k8s.io/controller-runtime/pkg/client/fake"

	infrav1 "github.com/anvil-metal/cluster-api-provider-anvil/api/v1alpha1"
	"github.com/anvil-metal/cluster-api-provider-anvil/internal/bmc"
	"github.com/anvil-metal/cluster-api-provider-anvil/internal/boot/dhcp"
	"github.com/anvil-metal/cluster-api-provider-anvil/internal/boot/httpboot"
	"github.com/anvil-metal/cluster-api-provider-anvil/internal/disk"
	"github.com/anvil-metal/cluster-api-provider-anvil/internal/initramfs"
	"github.com/anvil-metal/cluster-api-provider-anvil/internal/provision"
)

// decoyMAC is the agent VM's NIC that is not on the provisioning network.
const decoyMAC = "52:54:00:c0:00:99"

// qemuOSMarker starts the lines test/qemuos prints.
const qemuOSMarker = "ANVIL-QEMUOS"

// TestAgentInQEMU boots the real agent — Debian's kernel and the initramfs of make
// agent-image, with cmd/agent as PID 1 — on a SeaBIOS virtual machine through the boot
// services (DHCP reservation, iPXE, kernel and initramfs over HTTP, the agent API, the image
// cache), driven by the provisioning backend the way the host controller drives it, and
// follows what the agent installed onto the VM's virtio disk (an image file):
//
//  1. Provision: the agent loads its drivers, takes a DHCP lease, registers with its
//     inventory, installs the v1 image into slot A of a new A/B layout (GRUB images from the
//     initramfs), reports, and reboots. The firmware's one-time network boot is over, so
//     the VM boots its disk: GRUB, slot A, the v1 OS (test/qemuos), which writes a marker to
//     DATA, marks slot A good and powers off.
//  2. Upgrade to a broken v2: the agent, network-booted again, installs v2 into slot B and
//     arms it with three tries. v2 reboots at once every time; after the third try GRUB
//     records failed=B and boots slot A, whose v1 OS finds its DATA marker.
//
// The controller's side is checked too (the host's BootSlots and inventory after each
// attempt), and the disk's GRUB environment is read back with internal/disk.
//
// About 4 minutes on a 2-core machine at a load average of 5 (building the images 10-35 s,
// install 64-82 s, rollback 115 s: six boots under TCG, two of them network boots of the
// agent); TCG slows down with the machine's load.
func TestAgentInQEMU(t *testing.T) {
	qemu, _ := needQEMU(t)
	for _, tool := range []string{"mkfs.ext4", "grub-mkimage", "apt-get", "dpkg-deb"} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Fatalf("%s not found: make test-deps installs it", tool)
		}
	}
	start := time.Now()
	artifacts, kernelVersion, kernelRoot := buildAgentImage(t)
	images := t.TempDir()
	v1 := buildQEMUOSImage(t, images, kernelRoot, kernelVersion, "v1", "good")
	v2 := buildQEMUOSImage(t, images, kernelRoot, kernelVersion, "v2", "broken")
	upstream := httptest.NewServer(http.FileServer(http.Dir(images)))
	t.Cleanup(upstream.Close)
	t.Logf("agent image and OS images built in %.1fs", time.Since(start).Seconds())

	secrets := fake.NewClientBuilder().WithScheme(clientgoscheme.Scheme).WithObjects(&corev1.Secret{
		ObjectMeta: metav1.ObjectMeta{Namespace: "lab", Name: "vm-bootstrap"},
		Data:       map[string][]byte{"value": []byte("#cloud-config\nhostname: vm\n")}}).Build()
	// quiet: the agent and (through the agent) the installed OS print only their own lines
	// on the serial console, which costs less under TCG.
	lab := newQEMULabWith(t, dhcp.ModeReservation, labConfig{artifactsDir: artifacts, allowLocalImages: true,
		backend: provision.Options{Secrets: secrets}, agentKernelArgs: []string{"quiet"}})
	vm := &qemuMachine{name: "vm", mac: "52:54:00:c0:00:01", ip: "192.0.2.61"}
	diskPath := filepath.Join(t.TempDir(), "disk.img")
	// Sparse: two 8 GiB slots (the default), the ESP, CONFIG and DATA.
	must(t, os.WriteFile(diskPath, nil, 0o644))
	must(t, os.Truncate(diskPath, 17<<30))

	host := provisioningHost(vm.name, vm.mac, vm.ip+"/24", labServerIP.String())
	host.Spec.Claim.Image = &infrav1.Image{URL: upstream.URL + "/" + v1.name, Checksum: v1.checksum,
		Format: infrav1.ImageFormatRaw, Layout: infrav1.ImageLayoutABRoot}

	// 1. Provision v1.
	phase := time.Now()
	console := lab.provisionAndRun(vm, host, qemu, diskPath, "install")
	installTook := time.Since(phase)
	out, err := lab.svc.Backend.Provision(context.Background(), host, noBMC)
	if err != nil || !out.Done {
		t.Fatalf("after the agent's reboot the backend says %+v, %v; want done", out, err)
	}
	slots := host.Status.BootSlots
	if slots == nil || slots.Pending != infrav1.SlotA || slots.A == nil || slots.A.Checksum != v1.checksum {
		t.Errorf("host BootSlots after the install: %+v, want v1 pending in slot A", slots)
	}
	if hw := host.Status.Hardware; hw == nil || len(hw.Disks) != 1 || hw.Disks[0].SizeBytes != 17<<30 || !hasNIC(hw, vm.mac) {
		t.Errorf("host inventory %+v: want the VM's 17 GiB disk and its NIC %s", hw, vm.mac)
	}
	lab.checkAgentServed(vm, artifacts)
	if !regexp.MustCompile(`"msg":"network configured","interface":"eth\d","mac":"` + vm.mac + `","address":"` + vm.ip + `/24"`).MatchString(console) {
		t.Errorf("the agent did not configure its boot NIC %s with %s; console:\n%s", vm.mac, vm.ip, console)
	}
	boots := qemuOSLines(console)
	want := []string{"boot version=v1 slot=A", "data=", "marked-good slot=A env=active:A,next:,tries:0,failed:", "done"}
	if !equalLines(boots, want) {
		t.Errorf("the installed OS printed %q, want %q; console:\n%s", boots, want, console)
	}
	checkBootState(t, diskPath, disk.BootState{Active: infrav1.SlotA})
	t.Logf("install: network boot, v1 into slot A, reboot into slot A in %.1fs", installTook.Seconds())

	// 2. Upgrade to the broken v2: tried three times in slot B, then back on slot A.
	phase = time.Now()
	host.Status.State = infrav1.HostStateUpgrading
	host.Spec.Claim.Image = &infrav1.Image{URL: upstream.URL + "/" + v2.name, Checksum: v2.checksum,
		Format: infrav1.ImageFormatRaw, Layout: infrav1.ImageLayoutABRoot}
	console = lab.provisionAndRun(vm, host, qemu, diskPath, "upgrade")
	upgradeTook := time.Since(phase)
	if out, err := lab.svc.Backend.Provision(context.Background(), host, noBMC); err != nil || !out.Done {
		t.Fatalf("after the upgrade's reboot the backend says %+v, %v; want done", out, err)
	}
	slots = host.Status.BootSlots
	if slots.Active != infrav1.SlotA || slots.Pending != infrav1.SlotB || slots.B == nil || slots.B.Checksum != v2.checksum ||
		slots.A == nil || slots.A.Checksum != v1.checksum {
		t.Errorf("host BootSlots after the upgrade: %+v, want v1 active in A and v2 pending in B", slots)
	}
	boots = qemuOSLines(console)
	want = []string{"boot version=v2 slot=B", "boot version=v2 slot=B", "boot version=v2 slot=B",
		"boot version=v1 slot=A", "data=written-by=v1 slot=A", "marked-good slot=A env=active:A,next:,tries:0,failed:B", "done"}
	if !equalLines(boots, want) {
		t.Errorf("after the upgrade the disk booted %q, want %q; console:\n%s", boots, want, console)
	}
	checkBootState(t, diskPath, disk.BootState{Active: infrav1.SlotA, Failed: infrav1.SlotB})
	t.Logf("rollback: network boot, v2 into slot B, 3 failed tries, back on slot A in %.1fs; whole test %.1fs",
		upgradeTook.Seconds(), time.Since(start).Seconds())
}

// noBMC is the BMC runner of calls that must not need the BMC (an attempt that is done).
func noBMC(op string, _ func(context.Context, bmc.Client) error) error {
	panic("unexpected BMC operation " + op)
}

// provisionAndRun starts an attempt for host, as the host controller does, and plays the
// BMC's part of it: a one-time network boot of the VM (SeaBIOS, the e1000's iPXE ROM, disk
// afterwards). It waits for the VM to power itself off (the installed OS does) and returns
// the serial console.
func (l *qemuLab) provisionAndRun(m *qemuMachine, host *infrav1.AnvilHost, qemu, diskPath, step string) string {
	t := l.t
	var ops []string
	out, err := l.svc.Backend.Provision(context.Background(), host, func(op string, _ func(context.Context, bmc.Client) error) error {
		ops = append(ops, op)
		return nil
	})
	if err != nil || len(ops) != 1 || ops[0] != "network-boot" {
		t.Fatalf("%s: Provision: %+v %v (BMC operations %v)", step, out, err, ops)
	}
	m.host = host
	tap := l.plug("")
	m.console = filepath.Join(t.TempDir(), m.name+"-"+step+".log")
	// A guard only: a phase takes 1-2 minutes, but TCG slows down with the machine's load
	// (a boot from disk took 22 s at a load average of 5 and 75 s at 14).
	ctx, cancel := context.WithTimeout(context.Background(), 9*time.Minute)
	defer cancel()
	cmd := l.ns.Command(ctx, qemu, "-accel", "tcg", "-cpu", "max", "-m", "1024", "-boot", "order=c,once=n",
		"-nographic", "-vga", "none", "-monitor", "none", "-serial", "file:"+m.console,
		// A second NIC of the same model, first on the PCI bus (so eth0) and with link, on a
		// network of its own (qemu's user networking, which answers DHCP too) and without a
		// boot ROM: the agent must take its lease on the NIC the server booted from (BOOTIF),
		// not on the first one with link.
		"-netdev", "user,id=decoy,restrict=on", "-device", "e1000,netdev=decoy,romfile=,mac="+decoyMAC,
		"-netdev", "tap,id=n0,ifname="+tap+",script=no,downscript=no", "-device", "e1000,netdev=n0,mac="+m.mac,
		"-drive", "file="+diskPath+",if=virtio,format=raw,cache=unsafe")
	var qemuOut bytes.Buffer
	cmd.Stdout, cmd.Stderr = &qemuOut, &qemuOut
	start := time.Now()
	must(t, cmd.Start())
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	// The timeline: when the agent registered and finished, and when each OS line appeared.
	var timeline []string
	seen := map[string]int{}
	note := func() {
		c := readConsole(m.console)
		for _, ev := range []struct{ name, re string }{
			{"agent registered", `"msg":"registered"`}, {"agent rebooting", `"msg":"finished","task":"reboot"`},
			{"firmware done", `Booting from Hard Disk`},
			{"OS boot", qemuOSMarker + ` boot version=\S+ slot=\S+`},
		} {
			all := regexp.MustCompile(ev.re).FindAllString(c, -1)
			for i := seen[ev.name]; i < len(all); i++ {
				timeline = append(timeline, fmt.Sprintf("%.1fs %s", time.Since(start).Seconds(), strings.TrimPrefix(all[i], qemuOSMarker+" ")))
			}
			seen[ev.name] = len(all)
		}
	}
	tick := time.NewTicker(250 * time.Millisecond)
	defer tick.Stop()
	for waiting := true; waiting; {
		select {
		case err = <-done:
			waiting = false
		case <-tick.C:
			note()
		}
	}
	note()
	t.Logf("%s timeline: %s", step, strings.Join(timeline, "; "))
	console := readConsole(m.console)
	if ctx.Err() != nil {
		t.Fatalf("%s: the VM did not power off within 9 minutes; console:\n%s", step, console)
	}
	if err != nil {
		t.Fatalf("%s: qemu: %v\n%s\nconsole:\n%s", step, err, qemuOut.String(), console)
	}
	return console
}

// checkAgentServed checks that the VM fetched the agent's kernel and initramfs in full.
func (l *qemuLab) checkAgentServed(m *qemuMachine, artifacts string) {
	for _, name := range []string{"vmlinuz", "initramfs"} {
		fi, err := os.Stat(filepath.Join(artifacts, name))
		must(l.t, err)
		n := 0
		for _, r := range l.records() {
			if r.Kind == httpboot.ServedArtifact && r.Path == "/artifacts/"+name && strings.HasPrefix(r.Remote, m.ip+":") {
				n++
				if r.Status != 200 || r.Bytes != fi.Size() {
					l.t.Errorf("%s: %s served %d of %d bytes (status %d)", m.name, name, r.Bytes, fi.Size(), r.Status)
				}
			}
		}
		if n != 1 {
			l.t.Errorf("%s: %s served %d times, want once", m.name, name, n)
		}
	}
}

func hasNIC(hw *infrav1.HardwareInventory, mac string) bool {
	for _, n := range hw.NICs {
		if strings.EqualFold(n.MACAddress, mac) {
			return true
		}
	}
	return false
}

func checkBootState(t *testing.T, diskPath string, want disk.BootState) {
	t.Helper()
	d, err := disk.OpenReadOnly(diskPath)
	must(t, err)
	defer func() { _ = d.Close() }()
	ab, err := disk.OpenAB(d)
	must(t, err)
	st, err := ab.BootState()
	must(t, err)
	if st != want {
		t.Errorf("GRUB environment on the disk: %+v, want %+v", st, want)
	}
}

var qemuOSLineRE = regexp.MustCompile(qemuOSMarker + ` ([^\r\n]*)`)

// qemuOSLines returns what test/qemuos printed, in order.
func qemuOSLines(console string) []string {
	var out []string
	for _, m := range qemuOSLineRE.FindAllStringSubmatch(console, -1) {
		out = append(out, strings.TrimSpace(m[1]))
	}
	return out
}

func equalLines(a, b []string) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i] != b[i] {
			return false
		}
	}
	return true
}

// repoRoot is the module's root directory (the tests run in the package's directory).
func repoRoot(t *testing.T) string {
	t.Helper()
	root, err := filepath.Abs("../..")
	must(t, err)
	return root
}

// buildAgentImage runs make agent-image's script into a temporary directory, so the agent
// under test is the current code (the kernel package is cached; a warm build takes about
// 10 s). It returns the artifacts directory and the kernel's version and extracted tree.
func buildAgentImage(t *testing.T) (dir, version, tree string) {
	t.Helper()
	script := filepath.Join(repoRoot(t), "hack", "agent-image.sh")
	dir = t.TempDir()
	if out, err := exec.Command(script, dir).CombinedOutput(); err != nil {
		t.Fatalf("%s: %v\n%s", script, err, out)
	}
	out, err := exec.Command(script, "--kernel").Output()
	must(t, err)
	version, tree, ok := strings.Cut(strings.TrimSpace(string(out)), " ")
	if !ok {
		t.Fatalf("%s --kernel printed %q", script, out)
	}
	return dir, version, tree
}

type osImage struct{ name, checksum string }

// buildQEMUOSImage makes an A/B root image: an ext4 filesystem with /boot/vmlinuz (the agent's
// Debian kernel) and /boot/initrd.img (test/qemuos as /init, the virtio disk drivers, and
// /etc/qemuos saying its version and behaviour).
func buildQEMUOSImage(t *testing.T, dir, kernelTree, version, name, behaviour string) osImage {
	t.Helper()
	work := t.TempDir()
	bin := filepath.Join(work, "init")
	build := exec.Command("go", "build", "-trimpath", "-ldflags=-s -w", "-o", bin, "./test/qemuos")
	build.Dir = repoRoot(t)
	build.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("building test/qemuos: %v\n%s", err, out)
	}
	initBin, err := os.ReadFile(bin)
	must(t, err)
	a := initramfs.New()
	must(t, a.AddFile("init", initBin, 0o755))
	must(t, a.AddFile("etc/qemuos", []byte("version="+name+" behaviour="+behaviour+"\n"), 0o644))
	_, err = a.AddKernelModules(filepath.Join(kernelTree, "lib", "modules", version), version, []string{"virtio_pci", "virtio_blk"})
	must(t, err)
	initrd, err := a.Gzip()
	must(t, err)
	kernel, err := os.ReadFile(filepath.Join(kernelTree, "boot", "vmlinuz-"+version))
	must(t, err)
	root := filepath.Join(work, "root")
	must(t, os.MkdirAll(filepath.Join(root, "boot"), 0o755))
	must(t, os.WriteFile(filepath.Join(root, "boot", "vmlinuz"), kernel, 0o644))
	must(t, os.WriteFile(filepath.Join(root, "boot", "initrd.img"), initrd, 0o644))
	img := filepath.Join(dir, name+".ext4")
	if out, err := exec.Command("mkfs.ext4", "-q", "-F", "-L", "qemuos-"+name, "-d", root, img, "48M").CombinedOutput(); err != nil {
		t.Fatalf("mkfs.ext4: %v\n%s", err, out)
	}
	raw, err := os.ReadFile(img)
	must(t, err)
	sum := sha256.Sum256(raw)
	return osImage{name: name + ".ext4", checksum: "sha256:" + hex.EncodeToString(sum[:])}
}
