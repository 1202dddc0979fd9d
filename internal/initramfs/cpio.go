// Package initramfs builds Linux initramfs archives without external tools: a newc ("070701")
// cpio archive, gzip-compressed, holding a static /init, the kernel modules it needs (in
// the order they must be loaded, resolved from the modules' own .modinfo) and any other
// files. The agent image (hack/agentimage) and the qemu tests' tiny OS images use it.
package initramfs

import (
	"bytes"
	"compress/gzip"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"path"
	"sort"
	"strings"
)

// Mode bits of the newc header (S_IFMT values from <sys/stat.h>).
const (
	modeDir     = 0o040000
	modeRegular = 0o100000
	modeSymlink = 0o120000
)

// Archive collects the entries of an initramfs. Parent directories are created as needed;
// entries are written sorted by path, directories before what they hold.
type Archive struct {
	entries map[string]entry
}

type entry struct {
	mode uint32 // S_IFMT | permissions
	data []byte // file content or symlink target
}

// New returns an empty archive.
func New() *Archive { return &Archive{entries: map[string]entry{}} }

// clean turns name into the archive's form: relative, slash-separated, no "." or "..".
func clean(name string) (string, error) {
	p := strings.TrimPrefix(path.Clean("/"+name), "/")
	if p == "" {
		return "", errors.New("initramfs: empty path")
	}
	return p, nil
}

// AddFile adds a regular file with permissions perm (e.g. 0o755 for /init).
func (a *Archive) AddFile(name string, data []byte, perm fs.FileMode) error {
	return a.add(name, entry{mode: modeRegular | uint32(perm.Perm()), data: data})
}

// AddDir adds a directory (parents of files are added by themselves, with 0755).
func (a *Archive) AddDir(name string, perm fs.FileMode) error {
	return a.add(name, entry{mode: modeDir | uint32(perm.Perm())})
}

// AddSymlink adds a symbolic link to target.
func (a *Archive) AddSymlink(name, target string) error {
	return a.add(name, entry{mode: modeSymlink | 0o777, data: []byte(target)})
}

func (a *Archive) add(name string, e entry) error {
	p, err := clean(name)
	if err != nil {
		return err
	}
	if old, ok := a.entries[p]; ok && (old.mode&modeDir == 0 || e.mode&modeDir == 0) {
		return fmt.Errorf("initramfs: %s added twice", p)
	}
	for dir := path.Dir(p); dir != "."; dir = path.Dir(dir) {
		if old, ok := a.entries[dir]; ok {
			if old.mode&0o170000 != modeDir {
				return fmt.Errorf("initramfs: %s is not a directory (needed for %s)", dir, p)
			}
			continue
		}
		a.entries[dir] = entry{mode: modeDir | 0o755}
	}
	a.entries[p] = e
	return nil
}

// Size is the total size of the files' contents (uncompressed).
func (a *Archive) Size() int64 {
	var n int64
	for _, e := range a.entries {
		n += int64(len(e.data))
	}
	return n
}

// WriteCPIO writes the archive as uncompressed newc cpio, ending with the TRAILER!!! entry.
// Every entry has uid/gid 0 and mtime 0, so the same input gives the same bytes.
func (a *Archive) WriteCPIO(w io.Writer) error {
	names := make([]string, 0, len(a.entries))
	for n := range a.entries {
		names = append(names, n)
	}
	// A plain sort puts "a" before "a/b": every directory comes before its content.
	sort.Strings(names)
	cw := &countWriter{w: w}
	for i, n := range names {
		e := a.entries[n]
		nlink := uint32(1)
		if e.mode&0o170000 == modeDir {
			nlink = 2
		}
		if err := writeHeader(cw, uint32(i+1), e.mode, nlink, n, e.data); err != nil {
			return err
		}
	}
	return writeHeader(cw, 0, 0, 1, "TRAILER!!!", nil)
}

// WriteGzip writes the archive as gzip-compressed newc cpio (what the kernel and iPXE take).
// The default level: the best one costs five times the CPU for a few percent.
func (a *Archive) WriteGzip(w io.Writer) error {
	zw, err := gzip.NewWriterLevel(w, gzip.DefaultCompression)
	if err != nil {
		return err
	}
	if err := a.WriteCPIO(zw); err != nil {
		return err
	}
	return zw.Close()
}

// Gzip returns the gzip-compressed archive.
func (a *Archive) Gzip() ([]byte, error) {
	var b bytes.Buffer
	err := a.WriteGzip(&b)
	return b.Bytes(), err
}

type countWriter struct {
	w io.Writer
	n int64
}

func (c *countWriter) Write(p []byte) (int, error) {
	n, err := c.w.Write(p)
	c.n += int64(n)
	return n, err
}

func (c *countWriter) pad() error {
	if r := c.n % 4; r != 0 {
		_, err := c.Write(make([]byte, 4-r))
		return err
	}
	return nil
}

// writeHeader writes one newc entry: the 110-byte ASCII header, the NUL-terminated name and
// the data, each padded to a multiple of 4 bytes.
func writeHeader(w *countWriter, ino, mode, nlink uint32, name string, data []byte) error {
	if len(data) > 0xffffffff {
		return fmt.Errorf("initramfs: %s is larger than 4 GiB", name)
	}
	hdr := fmt.Sprintf("070701%08x%08x%08x%08x%08x%08x%08x%08x%08x%08x%08x%08x%08x",
		ino, mode, 0, 0, nlink, 0, len(data), 0, 0, 0, 0, len(name)+1, 0)
	if _, err := io.WriteString(w, hdr+name+"\x00"); err != nil {
		return err
	}
	if err := w.pad(); err != nil {
		return err
	}
	if _, err := w.Write(data); err != nil {
		return err
	}
	return w.pad()
}
