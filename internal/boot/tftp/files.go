package tftp

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"sort"
	"strings"
)

// DebianIPXEDir is where Debian's ipxe package installs its binaries.
const DebianIPXEDir = "/usr/lib/ipxe"

// IPXENames are the binaries Anvil hands out: undionly.kpxe for BIOS, ipxe.efi and
// snponly.efi for x86-64 UEFI.
func IPXENames() []string {
	return []string{"undionly.kpxe", "ipxe.efi", "snponly.efi"}
}

// DirFS serves the regular files directly inside dir. It is backed by os.Root, so a symlink
// that points out of dir is refused when it is opened, not just a name with "..".
func DirFS(dir string) (fs.FS, error) {
	r, err := os.OpenRoot(dir)
	if err != nil {
		return nil, err
	}
	return r.FS(), nil
}

// IPXEFiles is the outcome of FindIPXE: where each binary was found and which are missing.
type IPXEFiles struct {
	// Paths maps a binary's name to the file it resolves to, symlinks followed (Debian's
	// ipxe.efi is a link to /boot/ipxe.efi).
	Paths map[string]string
	// Missing lists the names not found or not regular files.
	Missing []string
}

// FindIPXE looks for names (default IPXENames) in dir (default DebianIPXEDir), following
// symlinks, and reports what is missing.
func FindIPXE(dir string, names ...string) IPXEFiles {
	if dir == "" {
		dir = DebianIPXEDir
	}
	if len(names) == 0 {
		names = IPXENames()
	}
	out := IPXEFiles{Paths: map[string]string{}}
	for _, n := range names {
		p, err := filepath.EvalSymlinks(filepath.Join(dir, n))
		if err != nil {
			out.Missing = append(out.Missing, n)
			continue
		}
		if st, err := os.Stat(p); err != nil || !st.Mode().IsRegular() {
			out.Missing = append(out.Missing, n)
			continue
		}
		out.Paths[n] = p
	}
	return out
}

// Err describes what is missing, or returns nil.
func (f IPXEFiles) Err() error {
	if len(f.Missing) == 0 {
		return nil
	}
	return fmt.Errorf("iPXE binaries missing: %s (Debian: apt-get install ipxe)", strings.Join(f.Missing, ", "))
}

// FS serves exactly the binaries found, by their plain names. The paths were resolved when
// they were found, from a fixed list of names, so following their links is intended.
func (f IPXEFiles) FS() fs.FS {
	m := make(fileMap, len(f.Paths))
	for k, v := range f.Paths {
		m[k] = v
	}
	return m
}

// fileMap is an fs.FS of named files anywhere on disk.
type fileMap map[string]string

func (m fileMap) Open(name string) (fs.File, error) {
	p, ok := m[name]
	if !ok {
		return nil, &fs.PathError{Op: "open", Path: name, Err: fs.ErrNotExist}
	}
	return os.Open(p)
}

// ReadDir lists the names, so the files can be inspected with fs.WalkDir or fs.Glob.
func (m fileMap) ReadDir(name string) ([]fs.DirEntry, error) {
	if name != "." {
		return nil, &fs.PathError{Op: "readdir", Path: name, Err: errors.ErrUnsupported}
	}
	var out []fs.DirEntry
	for n, p := range m {
		st, err := os.Stat(p)
		if err != nil {
			continue
		}
		out = append(out, fs.FileInfoToDirEntry(renamed{st, n}))
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Name() < out[j].Name() })
	return out, nil
}

type renamed struct {
	fs.FileInfo
	name string
}

func (r renamed) Name() string { return r.name }
