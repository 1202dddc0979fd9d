// Package pid1 is what the agent does as the init process of its initramfs, before the
// agent loop can run: mount the kernel filesystems, load the kernel modules the initramfs
// carries (disk controllers and NICs: Debian builds them as modules), bring up the NIC the
// server booted from and take a DHCP lease on it. The installed OS images of the qemu tests
// use the same steps.
package pid1

import (
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"

	"golang.org/x/sys/unix"

	"github.com/anvil-metal/cluster-api-provider-anvil/internal/boot/agentapi"
	"github.com/anvil-metal/cluster-api-provider-anvil/internal/disk"
)

// KernelParamMAC names the NIC to configure (aa:bb:cc:dd:ee:ff), when the boot loader does
// not pass BOOTIF.
const KernelParamMAC = "anvil.mac"

// MountKernelFilesystems mounts /proc, /sys and /dev (devtmpfs), which inventory, module
// loading and disk access need.
func MountKernelFilesystems() error {
	for _, m := range []struct{ source, target, fstype string }{
		{"proc", "/proc", "proc"}, {"sysfs", "/sys", "sysfs"}, {"devtmpfs", "/dev", "devtmpfs"},
	} {
		if err := os.MkdirAll(m.target, 0o755); err != nil { //nolint:gosec // /proc, /sys and /dev must be world-readable
			return err
		}
		if err := unix.Mount(m.source, m.target, m.fstype, 0, ""); err != nil && !errors.Is(err, unix.EBUSY) {
			return fmt.Errorf("mount %s: %w", m.target, err)
		}
	}
	return nil
}

// Cmdline is what PID 1 takes from the kernel command line.
type Cmdline struct {
	// BootMAC is the NIC the server network-booted from (BOOTIF=01-aa-bb-…, as PXELINUX and
	// iPXE scripts pass it, or anvil.mac=aa:bb:…); nil means the first NIC with link.
	BootMAC net.HardwareAddr
	// Consoles are the console= arguments, in order.
	Consoles []string
	// Quiet is the kernel's quiet or loglevel= argument, if any.
	Quiet string
}

// ParseCmdline reads the boot NIC and the consoles from a kernel command line. A malformed
// BOOTIF or anvil.mac is an error: configuring some other NIC could reach the wrong network.
func ParseCmdline(cmdline string) (Cmdline, error) {
	var c Cmdline
	for _, arg := range agentapi.SplitKernelCmdline(cmdline) {
		k, v, _ := strings.Cut(arg, "=")
		switch k {
		case "BOOTIF":
			// ARP hardware type 01 (Ethernet), then the MAC with dashes.
			hw, mac, ok := strings.Cut(v, "-")
			parsed, err := net.ParseMAC(strings.ReplaceAll(mac, "-", ":"))
			if !ok || hw != "01" || err != nil || len(parsed) != 6 {
				return Cmdline{}, fmt.Errorf("kernel command line: BOOTIF=%q is not 01-aa-bb-cc-dd-ee-ff (an Ethernet MAC)", v)
			}
			c.BootMAC = parsed
		case KernelParamMAC:
			parsed, err := net.ParseMAC(v)
			if err != nil || len(parsed) != 6 {
				return Cmdline{}, fmt.Errorf("kernel command line: %s=%q is not an Ethernet MAC (aa:bb:cc:dd:ee:ff)", KernelParamMAC, v)
			}
			c.BootMAC = parsed
		case "console":
			if v != "" {
				c.Consoles = append(c.Consoles, v)
			}
		case "quiet", "loglevel":
			c.Quiet = arg
		}
	}
	return c, nil
}

// OSKernelArgs returns the kernel arguments that put an installed OS's console where the
// agent's is (console=… for each serial console the agent has, and its quiet or loglevel=),
// and whether there is a serial console (GRUB then mirrors its own console there).
func (c Cmdline) OSKernelArgs() (args string, serial bool) {
	var out []string
	for _, con := range c.Consoles {
		if strings.HasPrefix(con, "ttyS") {
			out = append(out, "console="+con)
			serial = true
		}
	}
	if c.Quiet != "" {
		out = append(out, c.Quiet)
	}
	return strings.Join(out, " "), serial
}

// BootFilesDir is where the agent initramfs carries the GRUB images it installs with an A/B
// layout (built by grub-mkimage when the image is made; the agent only writes them).
const BootFilesDir = "/usr/share/anvil/grub"

// Names of the GRUB images in BootFilesDir.
const (
	BootFileEFI      = "BOOTX64.EFI"
	BootFileBIOSCore = "core.img"
	BootFileBIOSBoot = "boot.img"
)

// ReadBootFiles reads the GRUB images from dir. All three must be there: a layout without
// them would not boot.
func ReadBootFiles(dir string) (disk.BootFiles, error) {
	var bf disk.BootFiles
	for _, f := range []struct {
		name string
		dst  *[]byte
	}{{BootFileEFI, &bf.EFI}, {BootFileBIOSCore, &bf.BIOSCore}, {BootFileBIOSBoot, &bf.BIOSBoot}} {
		b, err := os.ReadFile(filepath.Join(dir, f.name))
		if err != nil {
			return disk.BootFiles{}, fmt.Errorf("GRUB image: %w", err)
		}
		*f.dst = b
	}
	return bf, nil
}
