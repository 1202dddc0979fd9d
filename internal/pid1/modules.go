package pid1

import (
	"errors"
	"fmt"
	"maps"
	"os"
	"path"
	"path/filepath"
	"strings"

	"golang.org/x/sys/unix"

	"github.com/anvil-metal/cluster-api-provider-anvil/internal/initramfs"
)

// ModuleLoadReport says what LoadModules did.
type ModuleLoadReport struct {
	Loaded int
	// Failed maps a module path to its last error.
	Failed map[string]error
}

// ReadLoadOrder reads an initramfs's module list (initramfs.LoadOrderFile).
func ReadLoadOrder(path string) ([]initramfs.ModuleEntry, error) {
	raw, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	return initramfs.ParseLoadOrder(raw)
}

// Paths returns the entries' module paths, in order.
func Paths(entries []initramfs.ModuleEntry) []string {
	out := make([]string, 0, len(entries))
	for _, e := range entries {
		out = append(out, e.Path)
	}
	return out
}

// DeviceModaliases lists the modaliases of the devices the kernel knows now (what udev
// matches drivers against).
func DeviceModaliases() []string {
	files, _ := filepath.Glob("/sys/bus/*/devices/*/modalias")
	var out []string
	for _, f := range files {
		if b, err := os.ReadFile(f); err == nil {
			if a := strings.TrimSpace(string(b)); a != "" {
				out = append(out, a)
			}
		}
	}
	return out
}

// LoadForDevices loads the modules whose aliases match a device's modalias, with their
// dependencies, in the list's order, and repeats while that brings new devices (loading
// virtio_pci makes the virtio devices that virtio_blk and virtio_net drive appear). Drivers
// for hardware the machine does not have are not loaded: under emulation loading every NIC
// driver of a server initramfs takes longer than the rest of the boot.
func LoadForDevices(entries []initramfs.ModuleEntry, modaliases func() []string, load func(path string) error) ModuleLoadReport {
	rep := ModuleLoadReport{Failed: map[string]error{}}
	byName := map[string]initramfs.ModuleEntry{}
	for _, e := range entries {
		byName[e.Name] = e
	}
	tried := map[string]bool{}
	for {
		devices := modaliases()
		want := map[string]bool{}
		var add func(name string)
		add = func(name string) {
			if want[name] {
				return
			}
			want[name] = true
			for _, d := range byName[name].Depends {
				add(d)
			}
		}
		for _, e := range entries {
			if !tried[e.Name] && matchesAny(e.Aliases, devices) {
				add(e.Name)
			}
		}
		var paths []string
		for _, e := range entries {
			if want[e.Name] && !tried[e.Name] {
				tried[e.Name] = true
				paths = append(paths, e.Path)
			}
		}
		if len(paths) == 0 {
			return rep
		}
		r := LoadModules(paths, load)
		rep.Loaded += r.Loaded
		maps.Copy(rep.Failed, r.Failed)
	}
}

// matchesAny reports whether one of the module's alias patterns (shell globs, as
// modprobe matches them) matches one of the devices' modaliases.
func matchesAny(patterns, modaliases []string) bool {
	for _, p := range patterns {
		for _, a := range modaliases {
			if ok, _ := path.Match(p, a); ok {
				return true
			}
		}
	}
	return false
}

// LoadModules loads modules in the given order with load, which reports an already loaded
// module as success. A module that fails is tried again after a pass in which another one
// loaded (its dependency may have been late), until a pass makes no progress. Failures are
// reported, not fatal: a driver for hardware the server lacks may refuse to load, and the
// agent can work without it.
func LoadModules(paths []string, load func(path string) error) ModuleLoadReport {
	rep := ModuleLoadReport{Failed: map[string]error{}}
	pending := paths
	for len(pending) > 0 {
		var again []string
		for _, p := range pending {
			if err := load(p); err != nil {
				rep.Failed[p] = err
				again = append(again, p)
				continue
			}
			delete(rep.Failed, p)
			rep.Loaded++
		}
		if len(again) == len(pending) {
			break
		}
		pending = again
	}
	return rep
}

// FinitModule loads a kernel module file with finit_module(2). A module that is already
// loaded counts as loaded.
func FinitModule(path string) error {
	f, err := os.Open(path)
	if err != nil {
		return err
	}
	defer func() { _ = f.Close() }()
	err = unix.FinitModule(int(f.Fd()), "", 0)
	if err != nil && !errors.Is(err, unix.EEXIST) {
		return fmt.Errorf("finit_module %s: %w", path, err)
	}
	return nil
}
