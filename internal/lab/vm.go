package lab

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"sync"
	"syscall"
	"time"

	"github.com/go-logr/logr"

	infrav1 "github.com/anvil-metal/cluster-api-provider-anvil/api/v1alpha1"
	"github.com/anvil-metal/cluster-api-provider-anvil/internal/disk"
	"github.com/anvil-metal/cluster-api-provider-anvil/internal/initramfs"
	"github.com/anvil-metal/cluster-api-provider-anvil/internal/vbmc/machine"
)

// VMOSMarker starts the lines the VM image's init (test/qemuos) prints on the serial console.
const VMOSMarker = "ANVIL-QEMUOS"

// vmOSBoot is the installed OS's first line: "ANVIL-QEMUOS boot version=V slot=S".
var vmOSBoot = regexp.MustCompile(VMOSMarker + ` boot version=\S+ slot=([AB])`)

// VM is a lab server that is a qemu virtual machine (TCG, SeaBIOS, an e1000 NIC on a tap in
// the provisioning network's bridge, a virtio disk file): its firmware really PXE-boots the
// agent's kernel and initramfs, the agent really registers, inventories the VM and installs
// the image, and GRUB really boots the installed slot. Power follows the emulated BMC: power
// on starts qemu (network boot once when the BMC's override says PXE, else the disk), power
// off stops it; a qemu that powers itself off (the agent's power-off task) powers the BMC off.
//
// The installed OS (test/qemuos built as VMImage does) cannot run kubeadm: when its
// "boot ... slot=S" line appears on the console, the VM reads the config drive from its disk
// file and calls OSBooted, as the emulated servers' disk boot does, so the lab plays the
// kubelet for it; then it sends the boot report the health gate would.
type VM struct {
	Name, MAC string
	Machine   *machine.Machine
	DiskPath  string
	// Network is the provisioning network; the VM's tap is plugged into its bridge.
	Network *Network
	// QEMU is the qemu-system-x86_64 binary; Console the serial console's log file.
	QEMU, Console string
	// MemoryMiB is the VM's memory (default 1024).
	MemoryMiB int
	// OSBooted is called when the installed OS is up (its answer is ignored: the image marks
	// its slot good itself).
	OSBooted func(context.Context, OSBoot) bool
	// OnPowerOn hears of each power-on: network says it network-boots once (else the disk).
	OnPowerOn func(vm string, network bool)
	Log       logr.Logger

	mu     sync.Mutex
	tap    string
	cancel context.CancelFunc // stops the running qemu
	exited chan struct{}      // closed when the running qemu has exited
	boots  int                // OS boots seen on the console so far
	slot   infrav1.Slot
}

// Start plugs the VM's tap into the bridge and follows the machine's power until ctx ends.
func (v *VM) Start(ctx context.Context) error {
	v.Network.mu.Lock()
	v.tap = "tap" + strconv.Itoa(v.Network.ports)
	v.Network.ports++
	v.Network.mu.Unlock()
	sw := v.Network.Switch
	if err := sw.IP("tuntap", "add", "dev", v.tap, "mode", "tap"); err != nil {
		return err
	}
	if err := sw.IP("link", "set", v.tap, "master", v.Network.Bridge, "up"); err != nil {
		return err
	}
	unsubscribe := v.Machine.Subscribe(func(e machine.Event) {
		switch e.Kind {
		case machine.EventPowerOff:
			v.stop()
		case machine.EventBoot:
			v.stop()
			v.boot(ctx, e.Boot)
		}
	})
	go func() {
		<-ctx.Done()
		unsubscribe()
		v.stop()
	}()
	return nil
}

// RunningSlot is the slot the VM's OS booted from, "" when it runs none.
func (v *VM) RunningSlot() infrav1.Slot {
	v.mu.Lock()
	defer v.mu.Unlock()
	return v.slot
}

func (v *VM) stop() {
	v.mu.Lock()
	cancel, exited := v.cancel, v.exited
	v.cancel, v.exited, v.slot = nil, nil, ""
	v.mu.Unlock()
	if cancel != nil {
		cancel()
		<-exited
	}
}

// boot starts qemu: a one-time network boot for a PXE override, the disk otherwise.
func (v *VM) boot(ctx context.Context, b machine.BootOverride) {
	order := "order=c"
	if b.Target == machine.BootPxe {
		order = "order=c,once=n"
	}
	mem := v.MemoryMiB
	if mem == 0 {
		mem = 1024
	}
	runCtx, cancel := context.WithCancel(ctx)
	cmd := v.Network.Switch.Command(runCtx, v.QEMU, "-accel", "tcg", "-cpu", "max", "-m", strconv.Itoa(mem), "-boot", order,
		"-nographic", "-vga", "none", "-monitor", "none", "-serial", "file:"+v.Console,
		"-netdev", "tap,id=n0,ifname="+v.tap+",script=no,downscript=no", "-device", "e1000,netdev=n0,mac="+v.MAC,
		"-drive", "file="+v.DiskPath+",if=virtio,format=raw,cache=unsafe")
	cmd.Cancel = func() error { return cmd.Process.Signal(syscall.SIGTERM) }
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	// Each power-on starts a fresh console log (qemu truncates it).
	if err := cmd.Start(); err != nil {
		cancel()
		v.Log.Info("qemu did not start", "vm", v.Name, "error", err.Error())
		return
	}
	if v.OnPowerOn != nil {
		v.OnPowerOn(v.Name, b.Target == machine.BootPxe)
	}
	exited := make(chan struct{})
	v.mu.Lock()
	v.cancel, v.exited, v.boots = cancel, exited, 0
	v.mu.Unlock()
	go func() {
		// qemu ends on its own when the guest powers off (the agent's power-off task): the
		// BMC then sees the power off, as with a real server.
		err := cmd.Wait()
		close(exited)
		if runCtx.Err() == nil {
			v.Log.Info("the VM powered itself off", "vm", v.Name, "error", fmt.Sprint(err), "qemu", out.String())
			v.mu.Lock()
			if v.exited == exited {
				v.cancel, v.exited, v.slot = nil, nil, ""
			}
			v.mu.Unlock()
			cancel()
			go func() { _ = v.Machine.Reset(machine.ResetForceOff) }()
		}
	}()
	go v.watchConsole(runCtx, exited)
}

// watchConsole follows the serial console for the installed OS's boot line.
func (v *VM) watchConsole(ctx context.Context, exited <-chan struct{}) {
	tick := time.NewTicker(500 * time.Millisecond)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-exited:
			return
		case <-tick.C:
		}
		log, _ := os.ReadFile(v.Console)
		all := vmOSBoot.FindAllSubmatch(log, -1)
		v.mu.Lock()
		seen := v.boots
		v.boots = len(all)
		v.mu.Unlock()
		for _, m := range all[seen:] {
			v.osUp(ctx, infrav1.Slot(m[1]))
		}
	}
}

// osUp reads what the OS found on its disk (the config drive) and plays its kubelet through
// OSBooted; the image marks the slot good itself, and the lab sends the boot report the
// health gate would, from the bridge's side.
func (v *VM) osUp(ctx context.Context, slot infrav1.Slot) {
	d, err := disk.OpenReadOnly(v.DiskPath)
	if err != nil {
		return
	}
	defer func() { _ = d.Close() }()
	ab, err := disk.OpenAB(d)
	if err != nil {
		return
	}
	meta, _ := ab.ReadConfigDrive("meta-data")
	user, _ := ab.ReadConfigDrive("user-data")
	gateEnv, _ := ab.ReadConfigDrive("anvil/anvil.env")
	v.mu.Lock()
	v.slot = slot
	v.mu.Unlock()
	if v.OSBooted != nil {
		v.OSBooted(ctx, OSBoot{Server: v.Name, Slot: slot, MetaData: meta, UserData: user})
	}
	// The boot report: the gate's URL is on the bridge, so the report leaves from there.
	reporter := &Server{Name: v.Name, Log: v.Log}
	reporter.reportVia(ctx, v.Network.Switch.DialContext, gateEnv, slot, true, "")
}

// VMImage builds the lab's VM OS image into dir and returns its path: an ext4 root
// filesystem for an A/B slot holding /boot/vmlinuz (the agent's Debian kernel, from
// kernelTree) and /boot/initrd.img (test/qemuos, built from repoRoot, as /init with the
// virtio disk drivers; behaviour "stay": it marks its slot good and keeps running).
func VMImage(dir, repoRoot, kernelTree, kernelVersion, version string) (string, error) {
	work, err := os.MkdirTemp(dir, "vm-image-")
	if err != nil {
		return "", err
	}
	defer func() { _ = os.RemoveAll(work) }()
	bin := filepath.Join(work, "init")
	build := exec.Command("go", "build", "-trimpath", "-ldflags=-s -w", "-o", bin, "./test/qemuos") //nolint:gosec // a path in our temporary directory
	build.Dir = repoRoot
	build.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := build.CombinedOutput(); err != nil {
		return "", fmt.Errorf("building test/qemuos: %w: %s", err, out)
	}
	initBin, err := os.ReadFile(bin)
	if err != nil {
		return "", err
	}
	a := initramfs.New()
	if err := a.AddFile("init", initBin, 0o755); err != nil {
		return "", err
	}
	if err := a.AddFile("etc/qemuos", []byte("version="+version+" behaviour=stay\n"), 0o644); err != nil {
		return "", err
	}
	if _, err := a.AddKernelModules(filepath.Join(kernelTree, "lib", "modules", kernelVersion), kernelVersion,
		[]string{"virtio_pci", "virtio_blk"}); err != nil {
		return "", err
	}
	initrd, err := a.Gzip()
	if err != nil {
		return "", err
	}
	kernel, err := os.ReadFile(filepath.Join(kernelTree, "boot", "vmlinuz-"+kernelVersion))
	if err != nil {
		return "", err
	}
	root := filepath.Join(work, "root")
	if err := os.MkdirAll(filepath.Join(root, "boot"), 0o750); err != nil {
		return "", err
	}
	if err := os.WriteFile(filepath.Join(root, "boot", "vmlinuz"), kernel, 0o644); err != nil { //nolint:gosec // an OS image
		return "", err
	}
	if err := os.WriteFile(filepath.Join(root, "boot", "initrd.img"), initrd, 0o644); err != nil { //nolint:gosec // an OS image
		return "", err
	}
	img := filepath.Join(dir, "vm-os-"+version+".ext4")
	//nolint:gosec // fixed tool; the label and paths are the lab's own
	if out, err := exec.Command("mkfs.ext4", "-q", "-F", "-L", "lab-"+version, "-d", root, img, "48M").CombinedOutput(); err != nil {
		return "", fmt.Errorf("mkfs.ext4: %w: %s", err, bytes.TrimSpace(out))
	}
	return img, nil
}

// RootDir is the module's root directory, found from dir upwards (go.mod).
func RootDir(dir string) (string, error) {
	for d := dir; ; d = filepath.Dir(d) {
		if _, err := os.Stat(filepath.Join(d, "go.mod")); err == nil {
			return d, nil
		}
		if filepath.Dir(d) == d {
			return "", fmt.Errorf("no go.mod above %s: run the lab from the repository", dir)
		}
	}
}
