// Command qemuos is the /init of the tiny "operating systems" the qemu tests install with
// the real agent: Debian's kernel boots it from the initrd.img of an A/B slot. It reports on
// the serial console, one line each, prefixed with Marker:
//
//	boot version=V slot=S                 at once (S from anvil.slot=, set by grub.cfg)
//	data=...                              what the first 512 bytes of DATA hold ("" when blank)
//	marked-good slot=S env=...            after marking its slot good in GRUB's environment
//	done                                  then it powers the machine off
//
// A "stay" image (the lab's VM image) behaves as a good one but keeps running after "done",
// printing "running", until the machine is powered off.
//
// A "broken" image (/etc/qemuos says behaviour=broken) reboots right after the boot line,
// the way a slot whose OS never becomes healthy does, so GRUB spends its tries.
//
// A good image writes "written-by=V slot=S" to DATA when DATA is blank, so a later boot
// can show that DATA survived an upgrade. DATA is written raw: the test needs no filesystem.
package main

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	infrav1 "github.com/anvil-metal/cluster-api-provider-anvil/api/v1alpha1"
	"github.com/anvil-metal/cluster-api-provider-anvil/internal/disk"
	"github.com/anvil-metal/cluster-api-provider-anvil/internal/initramfs"
	"github.com/anvil-metal/cluster-api-provider-anvil/internal/pid1"
)

// Marker starts every line this init prints.
const Marker = "ANVIL-QEMUOS"

// ConfigFile holds "version=V behaviour=good|broken|stay".
const ConfigFile = "/etc/qemuos"

func main() {
	if err := run(); err != nil {
		say("error %v", err)
	}
	say("done")
	unix.Sync()
	if raw, err := os.ReadFile(ConfigFile); err == nil && strings.Contains(string(raw), "behaviour=stay") {
		// The lab's VM image: the machine keeps running, as a server's OS does, until its
		// BMC powers it off.
		say("running")
		for {
			time.Sleep(time.Hour)
		}
	}
	_ = unix.Reboot(unix.LINUX_REBOOT_CMD_POWER_OFF)
	for {
		time.Sleep(time.Hour)
	}
}

func say(format string, args ...any) {
	// The console is the kernel's: write whole lines.
	fmt.Fprintf(os.Stdout, Marker+" "+format+"\n", args...)
}

func run() error {
	if err := pid1.MountKernelFilesystems(); err != nil {
		return err
	}
	cfg := map[string]string{}
	raw, err := os.ReadFile(ConfigFile)
	if err != nil {
		return err
	}
	for _, f := range strings.Fields(string(raw)) {
		k, v, _ := strings.Cut(f, "=")
		cfg[k] = v
	}
	cmdline, err := os.ReadFile("/proc/cmdline")
	if err != nil {
		return err
	}
	slot := ""
	for _, arg := range strings.Fields(string(cmdline)) {
		if v, ok := strings.CutPrefix(arg, "anvil.slot="); ok {
			slot = v
		}
	}
	say("boot version=%s slot=%s", cfg["version"], slot)
	if cfg["behaviour"] == "broken" {
		unix.Sync()
		_ = unix.Reboot(unix.LINUX_REBOOT_CMD_RESTART)
		for {
			time.Sleep(time.Hour)
		}
	}

	order, err := pid1.ReadLoadOrder(initramfs.LoadOrderFile)
	if err != nil {
		return err
	}
	if rep := pid1.LoadModules(pid1.Paths(order), pid1.FinitModule); len(rep.Failed) > 0 {
		return fmt.Errorf("kernel modules: %v", rep.Failed)
	}
	d, err := openDisk("/dev/vda", 30*time.Second)
	if err != nil {
		return err
	}
	defer func() { _ = d.Close() }()
	ab, err := disk.OpenAB(d)
	if err != nil {
		return err
	}
	off, _ := ab.Range(ab.Data)
	block := make([]byte, 512)
	if _, err := d.ReadAt(block, off); err != nil {
		return err
	}
	data := string(bytes.TrimRight(block, "\x00"))
	say("data=%s", data)
	if data == "" {
		mark := make([]byte, 512)
		copy(mark, fmt.Sprintf("written-by=%s slot=%s", cfg["version"], slot))
		if _, err := d.WriteAt(mark, off); err != nil {
			return err
		}
		if err := d.Sync(); err != nil {
			return err
		}
	}
	if err := ab.MarkGood(infrav1.Slot(slot)); err != nil {
		return err
	}
	st, err := ab.BootState()
	if err != nil {
		return err
	}
	say("marked-good slot=%s env=active:%s,next:%s,tries:%d,failed:%s", slot, st.Active, st.Next, st.Tries, st.Failed)
	return nil
}

// openDisk waits for the disk's device node (the driver probes it after loading).
func openDisk(path string, wait time.Duration) (*disk.Disk, error) {
	deadline := time.Now().Add(wait)
	for {
		d, err := disk.Open(path)
		if err == nil {
			return d, nil
		}
		if !errors.Is(err, os.ErrNotExist) || time.Now().After(deadline) {
			return nil, err
		}
		time.Sleep(100 * time.Millisecond)
	}
}
