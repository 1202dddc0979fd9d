package pid1

import (
	"errors"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"

	"github.com/anvil-metal/cluster-api-provider-anvil/internal/initramfs"
)

func TestParseCmdline(t *testing.T) {
	c, err := ParseCmdline(`initrd=initramfs anvil.api=http://192.0.2.1:8081 anvil.token=abc console=tty0 console=ttyS1,115200n8 BOOTIF=01-52-54-00-C0-00-01 quiet`)
	if err != nil {
		t.Fatal(err)
	}
	if c.BootMAC.String() != "52:54:00:c0:00:01" || !reflect.DeepEqual(c.Consoles, []string{"tty0", "ttyS1,115200n8"}) {
		t.Errorf("got %+v", c)
	}
	if args, serial := c.OSKernelArgs(); args != "console=ttyS1,115200n8 quiet" || !serial {
		t.Errorf("OSKernelArgs() = %q, %v; want the serial console and quiet", args, serial)
	}
	c, err = ParseCmdline("anvil.mac=52:54:00:c0:00:02 console=tty0")
	if err != nil || c.BootMAC.String() != "52:54:00:c0:00:02" {
		t.Errorf("anvil.mac: %+v, %v", c, err)
	}
	if args, serial := c.OSKernelArgs(); args != "" || serial {
		t.Errorf("OSKernelArgs() without a serial console = %q, %v", args, serial)
	}
	if c, err := ParseCmdline("console=ttyS0"); err != nil || c.BootMAC != nil {
		t.Errorf("no boot NIC named: %+v, %v; want nil MAC (first NIC with link)", c, err)
	}
	for _, bad := range []string{"BOOTIF=52-54-00-c0-00-01", "BOOTIF=06-52-54-00-c0-00-01", "BOOTIF=01-52-54-00-c0-00", "anvil.mac=zz:54:00:c0:00:01"} {
		_, err := ParseCmdline(bad)
		key, _, _ := strings.Cut(bad, "=")
		if err == nil || !strings.Contains(err.Error(), key) {
			t.Errorf("%s: error %v, want one naming %s", bad, err, key)
		}
	}
}

// TestLoadModulesRetries: a module whose dependency is listed after it loads on the next
// pass; one that never loads is reported, and the others still load.
func TestLoadModulesRetries(t *testing.T) {
	loaded := map[string]bool{}
	var calls []string
	load := func(p string) error {
		calls = append(calls, p)
		switch {
		case p == "needs-b" && !loaded["b"]:
			return errors.New("unknown symbol")
		case p == "broken":
			return errors.New("no such device")
		}
		loaded[p] = true
		return nil
	}
	rep := LoadModules([]string{"a", "needs-b", "broken", "b"}, load)
	if rep.Loaded != 3 || len(rep.Failed) != 1 || rep.Failed["broken"] == nil || !loaded["needs-b"] {
		t.Errorf("report %+v, loaded %v", rep, loaded)
	}
	// Pass 1: all four; pass 2: needs-b (now loads) and broken; pass 3: broken alone, no
	// progress, stop.
	if want := []string{"a", "needs-b", "broken", "b", "needs-b", "broken", "broken"}; !reflect.DeepEqual(calls, want) {
		t.Errorf("calls %q, want %q", calls, want)
	}
}

// TestLoadForDevices: only the drivers of present devices load, with their dependencies
// first, and devices that appear once a bus driver loaded get theirs in the next round.
func TestLoadForDevices(t *testing.T) {
	entries := []initramfs.ModuleEntry{
		{Path: "virtio_ring", Name: "virtio_ring"},
		{Path: "virtio", Name: "virtio", Depends: []string{"virtio_ring"}},
		{Path: "virtio_pci", Name: "virtio_pci", Depends: []string{"virtio", "virtio_ring"}, Aliases: []string{"pci:v00001AF4d*sv*sd*bc*sc*i*"}},
		{Path: "virtio_blk", Name: "virtio_blk", Depends: []string{"virtio", "virtio_ring"}, Aliases: []string{"virtio:d00000002v*"}},
		{Path: "failover", Name: "failover"},
		{Path: "virtio_net", Name: "virtio_net", Depends: []string{"virtio", "virtio_ring", "failover"}, Aliases: []string{"virtio:d00000001v*"}},
		{Path: "e1000", Name: "e1000", Aliases: []string{"pci:v00008086d0000100Esv*sd*bc*sc*i*"}},
		{Path: "mlx5_core", Name: "mlx5_core", Aliases: []string{"pci:v000015B3d00001017sv*sd*bc*sc*i*"}},
	}
	var loaded []string
	devices := func() []string {
		d := []string{"pci:v00001AF4d00001001sv00001AF4sd00000002bc01sc00i00", "pci:v00008086d0000100Esv00001AF4sd00001100bc02sc00i00"}
		for _, l := range loaded {
			if l == "virtio_pci" { // the virtio block device appears once virtio_pci drives it
				d = append(d, "virtio:d00000002v00001AF4")
			}
		}
		return d
	}
	rep := LoadForDevices(entries, devices, func(p string) error { loaded = append(loaded, p); return nil })
	want := []string{"virtio_ring", "virtio", "virtio_pci", "e1000", "virtio_blk"}
	if !reflect.DeepEqual(loaded, want) || rep.Loaded != len(want) || len(rep.Failed) != 0 {
		t.Errorf("loaded %q (%+v), want %q", loaded, rep, want)
	}
}

func TestReadBootFiles(t *testing.T) {
	dir := t.TempDir()
	for _, n := range []string{BootFileEFI, BootFileBIOSCore} {
		if err := os.WriteFile(filepath.Join(dir, n), []byte(n), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := ReadBootFiles(dir); err == nil || !strings.Contains(err.Error(), BootFileBIOSBoot) {
		t.Errorf("missing boot.img: %v, want an error naming it", err)
	}
	if err := os.WriteFile(filepath.Join(dir, BootFileBIOSBoot), []byte("b"), 0o644); err != nil {
		t.Fatal(err)
	}
	bf, err := ReadBootFiles(dir)
	if err != nil || string(bf.EFI) != BootFileEFI || string(bf.BIOSCore) != BootFileBIOSCore || string(bf.BIOSBoot) != "b" {
		t.Errorf("ReadBootFiles: %+v, %v", bf, err)
	}
}
