package initramfs

import (
	"bufio"
	"bytes"
	"debug/elf"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
)

// LoadOrderFile is where an initramfs built by this package lists its kernel modules, each
// after the modules it depends on, one a line (see ModuleEntry.String). PID 1 loads the
// ones the machine's devices ask for, or all of them, in that order.
const LoadOrderFile = "/lib/modules/load-order"

// Modules indexes a kernel's module tree (what Debian's linux-image package installs under
// /lib/modules/<version>). Dependencies come from each module's own .modinfo section
// ("depends=" and "softdep=pre:"), so no modules.dep (which depmod writes at package
// installation, not shipped in the package) is needed.
type Modules struct {
	dir string
	// paths maps a module name (with '-' written '_', as the kernel does) to its file,
	// relative to dir.
	paths map[string]string
	// builtin names modules compiled into the kernel.
	builtin map[string]bool
}

// Module is one module to load.
type Module struct {
	Name string
	// Path is relative to the module tree (e.g. kernel/drivers/net/virtio_net.ko).
	Path string
	// Depends are the modules it needs loaded first (not built in).
	Depends []string
	// Aliases are the device patterns it drives (e.g. pci:v00008086d0000100Esv*sd*bc*sc*i*).
	Aliases []string
}

func modName(s string) string { return strings.ReplaceAll(s, "-", "_") }

// OpenModules indexes the module tree dir (e.g. .../lib/modules/6.1.0-56-amd64).
func OpenModules(dir string) (*Modules, error) {
	m := &Modules{dir: dir, paths: map[string]string{}, builtin: map[string]bool{}}
	err := filepath.WalkDir(filepath.Join(dir, "kernel"), func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		name := d.Name()
		switch {
		case d.IsDir():
			return nil
		case strings.HasSuffix(name, ".ko"):
			rel, err := filepath.Rel(dir, p)
			if err != nil {
				return err
			}
			m.paths[modName(strings.TrimSuffix(name, ".ko"))] = rel
		case strings.Contains(name, ".ko."):
			return fmt.Errorf("%s: compressed kernel modules are not supported (finit_module is given the file as it is)", p)
		}
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("indexing kernel modules: %w", err)
	}
	if len(m.paths) == 0 {
		return nil, fmt.Errorf("no kernel modules under %s/kernel", dir)
	}
	if raw, err := os.ReadFile(filepath.Join(dir, "modules.builtin")); err == nil {
		sc := bufio.NewScanner(bytes.NewReader(raw))
		for sc.Scan() {
			base := filepath.Base(strings.TrimSpace(sc.Text()))
			m.builtin[modName(strings.TrimSuffix(base, ".ko"))] = true
		}
	}
	return m, nil
}

// Resolve returns the named modules and everything they depend on, each after its
// dependencies. Modules built into the kernel are left out; a name that is neither a
// module nor built in is an error.
func (m *Modules) Resolve(names []string) ([]Module, error) {
	infos := map[string]ModInfo{}
	order, err := DependencyOrder(names, func(name string) ([]string, bool, error) {
		if m.builtin[name] {
			return nil, false, nil
		}
		rel, ok := m.paths[name]
		if !ok {
			return nil, false, fmt.Errorf("kernel module %q is neither in %s nor built into the kernel", name, m.dir)
		}
		info, err := ReadModInfo(filepath.Join(m.dir, rel))
		if err != nil {
			return nil, false, err
		}
		// Soft dependencies (e.g. crc32c for ext4) are taken when this kernel has them.
		var out []string
		for _, d := range info.Depends {
			if _, ok := m.paths[d]; ok || m.builtin[d] {
				out = append(out, d)
			}
		}
		info.Depends = out
		infos[name] = info
		return out, true, nil
	})
	if err != nil {
		return nil, err
	}
	mods := make([]Module, 0, len(order))
	for _, n := range order {
		var deps []string
		for _, d := range infos[n].Depends {
			if !m.builtin[d] {
				deps = append(deps, d)
			}
		}
		mods = append(mods, Module{Name: n, Path: m.paths[n], Depends: deps, Aliases: infos[n].Aliases})
	}
	return mods, nil
}

// DependencyOrder orders names and their dependencies so that each comes after what it
// depends on. deps returns a name's dependencies and whether the name is to be loaded at all
// (false: built in, skipped with its dependencies). A cycle is an error.
func DependencyOrder(names []string, deps func(name string) (depends []string, load bool, err error)) ([]string, error) {
	const (
		visiting = 1
		done     = 2
	)
	state := map[string]int{}
	var order []string
	var visit func(n string, chain []string) error
	visit = func(n string, chain []string) error {
		n = modName(n)
		switch state[n] {
		case done:
			return nil
		case visiting:
			return fmt.Errorf("kernel module dependency cycle: %s -> %s", strings.Join(chain, " -> "), n)
		}
		state[n] = visiting
		ds, load, err := deps(n)
		if err != nil {
			return err
		}
		for _, d := range ds {
			if err := visit(d, append(chain, n)); err != nil {
				return err
			}
		}
		state[n] = done
		if load {
			order = append(order, n)
		}
		return nil
	}
	for _, n := range names {
		if err := visit(n, nil); err != nil {
			return nil, err
		}
	}
	return order, nil
}

// ModInfo is what a module's .modinfo section says about loading it.
type ModInfo struct {
	// Depends are its hard dependencies ("depends=") and soft pre-dependencies
	// ("softdep=pre: ...").
	Depends []string
	// Aliases are its device patterns ("alias=").
	Aliases []string
}

// ReadModInfo reads a module file's .modinfo section.
func ReadModInfo(path string) (ModInfo, error) {
	f, err := elf.Open(path)
	if err != nil {
		return ModInfo{}, fmt.Errorf("kernel module %s: %w", path, err)
	}
	defer func() { _ = f.Close() }()
	sec := f.Section(".modinfo")
	if sec == nil {
		return ModInfo{}, fmt.Errorf("kernel module %s has no .modinfo section", path)
	}
	info, err := sec.Data()
	if err != nil {
		return ModInfo{}, fmt.Errorf("kernel module %s: %w", path, err)
	}
	return ParseModInfo(info)
}

// ParseModInfo parses a .modinfo section: NUL-separated key=value strings.
func ParseModInfo(info []byte) (ModInfo, error) {
	if len(info) == 0 {
		return ModInfo{}, errors.New("empty .modinfo")
	}
	var mi ModInfo
	for _, kv := range bytes.Split(info, []byte{0}) {
		k, v, ok := strings.Cut(string(kv), "=")
		if !ok {
			continue
		}
		switch k {
		case "depends":
			for _, d := range strings.Split(v, ",") {
				if d = strings.TrimSpace(d); d != "" {
					mi.Depends = append(mi.Depends, modName(d))
				}
			}
		case "softdep":
			// "pre: a b post: c"
			pre := false
			for _, f := range strings.Fields(v) {
				switch f {
				case "pre:":
					pre = true
				case "post:":
					pre = false
				default:
					if pre {
						mi.Depends = append(mi.Depends, modName(f))
					}
				}
			}
		case "alias":
			// Aliases never hold whitespace; one that did could not be written as a field.
			if v != "" && !strings.ContainsAny(v, " \t\n") {
				mi.Aliases = append(mi.Aliases, v)
			}
		}
	}
	return mi, nil
}

// ModuleEntry is one line of LoadOrderFile: "PATH NAME DEPENDS ALIAS...", with DEPENDS the
// comma-separated module names ("-" for none).
type ModuleEntry struct {
	Path, Name string
	Depends    []string
	Aliases    []string
}

// String is the entry's line (without the newline).
func (e ModuleEntry) String() string {
	deps := strings.Join(e.Depends, ",")
	if deps == "" {
		deps = "-"
	}
	return strings.Join(append([]string{e.Path, e.Name, deps}, e.Aliases...), " ")
}

// ParseLoadOrder parses LoadOrderFile's content.
func ParseLoadOrder(raw []byte) ([]ModuleEntry, error) {
	var out []ModuleEntry
	sc := bufio.NewScanner(bytes.NewReader(raw))
	sc.Buffer(nil, 1<<20) // a NIC driver can have hundreds of aliases
	for n := 1; sc.Scan(); n++ {
		f := strings.Fields(sc.Text())
		if len(f) == 0 || strings.HasPrefix(f[0], "#") {
			continue
		}
		if len(f) < 3 {
			return nil, fmt.Errorf("%s line %d: want PATH NAME DEPENDS [ALIAS...]", LoadOrderFile, n)
		}
		e := ModuleEntry{Path: f[0], Name: f[1]}
		if len(f) > 3 {
			e.Aliases = f[3:]
		}
		if f[2] != "-" {
			e.Depends = strings.Split(f[2], ",")
		}
		out = append(out, e)
	}
	return out, sc.Err()
}

// AddKernelModules puts the named modules and their dependencies (from the module tree of
// kernel version) into the archive under /lib/modules/VERSION, and their load order into
// LoadOrderFile.
func (a *Archive) AddKernelModules(tree, version string, names []string) ([]Module, error) {
	idx, err := OpenModules(tree)
	if err != nil {
		return nil, err
	}
	mods, err := idx.Resolve(names)
	if err != nil {
		return nil, err
	}
	var order strings.Builder
	for _, m := range mods {
		data, err := os.ReadFile(filepath.Join(tree, m.Path))
		if err != nil {
			return nil, err
		}
		dst := filepath.Join("/lib/modules", version, m.Path)
		if err := a.AddFile(dst, data, 0o644); err != nil {
			return nil, err
		}
		order.WriteString(ModuleEntry{Path: dst, Name: m.Name, Depends: m.Depends, Aliases: m.Aliases}.String() + "\n")
	}
	return mods, a.AddFile(LoadOrderFile, []byte(order.String()), 0o644)
}
