// Package disk is the on-disk side of Anvil's installs, in pure Go so the agent needs no
// external tools at run time: a GUID partition table reader/writer, the A/B layout (BIOS
// boot, ESP, ROOT-A, ROOT-B, CONFIG, DATA), the GRUB configuration that counts boot attempts
// and falls back, in-place updates of GRUB's environment block on the ESP, the cloud-init
// config drive, and the OS-side health gate that marks a slot good.
package disk

import (
	"errors"
	"fmt"
	"io"
	"os"

	"golang.org/x/sys/unix"
)

// Disk is a block device or a disk image file opened for reading and writing.
type Disk struct {
	f          *os.File
	Path       string
	Size       int64
	SectorSize int
	// Block is true for a block device (false for an image file).
	Block bool
}

// Open opens path read-write and finds its size and logical sector size (512 for image
// files). Block devices are opened exclusively (O_EXCL): the kernel then refuses with EBUSY
// a disk that is mounted or otherwise in use, so the agent never writes under a live
// filesystem (its own boot medium, say).
func Open(path string) (*Disk, error) {
	flags := os.O_RDWR
	if st, err := os.Stat(path); err == nil && st.Mode()&os.ModeDevice != 0 {
		flags |= os.O_EXCL
	}
	f, err := os.OpenFile(path, flags, 0)
	if err != nil {
		return nil, err
	}
	d, err := fromFile(f, path)
	if err != nil {
		_ = f.Close()
		return nil, err
	}
	return d, nil
}

// OpenReadOnly opens path for reading only (inventory, verification).
func OpenReadOnly(path string) (*Disk, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	d, err := fromFile(f, path)
	if err != nil {
		_ = f.Close()
		return nil, err
	}
	return d, nil
}

func fromFile(f *os.File, path string) (*Disk, error) {
	st, err := f.Stat()
	if err != nil {
		return nil, err
	}
	d := &Disk{f: f, Path: path, SectorSize: 512}
	switch {
	case st.Mode().IsRegular():
		d.Size = st.Size()
	case st.Mode()&os.ModeDevice != 0:
		d.Block = true
		var size uint64
		if err := ioctlPtr(f, unix.BLKGETSIZE64, &size); err != nil {
			return nil, fmt.Errorf("%s: size: %w", path, err)
		}
		d.Size = int64(size)
		if ss, err := unix.IoctlGetInt(int(f.Fd()), unix.BLKSSZGET); err == nil && ss >= 512 {
			d.SectorSize = ss
		}
	default:
		return nil, fmt.Errorf("%s: not a block device or regular file", path)
	}
	if d.Size <= 0 {
		return nil, fmt.Errorf("%s: empty device", path)
	}
	return d, nil
}

// File returns the open file (for the installer's streaming writes).
func (d *Disk) File() *os.File { return d.f }

// ReadAt implements io.ReaderAt.
func (d *Disk) ReadAt(b []byte, off int64) (int, error) { return d.f.ReadAt(b, off) }

// WriteAt implements io.WriterAt; writes past the end of the disk are refused rather than
// growing an image file.
func (d *Disk) WriteAt(b []byte, off int64) (int, error) {
	if off < 0 || off+int64(len(b)) > d.Size {
		return 0, fmt.Errorf("%s: write of %d bytes at %d is outside the disk (%d bytes)", d.Path, len(b), off, d.Size)
	}
	return d.f.WriteAt(b, off)
}

// Sync flushes writes to stable storage.
func (d *Disk) Sync() error { return d.f.Sync() }

// Close closes the disk.
func (d *Disk) Close() error { return d.f.Close() }

// ZeroRange writes zeros over [off, off+n), in chunks.
func (d *Disk) ZeroRange(off, n int64) error {
	if n <= 0 {
		return nil
	}
	buf := make([]byte, min(n, 1<<20))
	for n > 0 {
		c := min(n, int64(len(buf)))
		if _, err := d.WriteAt(buf[:c], off); err != nil {
			return err
		}
		off += c
		n -= c
	}
	return nil
}

// IsZero reports whether [off, off+n) reads back as zeros.
func (d *Disk) IsZero(off, n int64) (bool, error) {
	buf := make([]byte, min(n, 1<<20))
	for n > 0 {
		c := min(n, int64(len(buf)))
		if _, err := d.ReadAt(buf[:c], off); err != nil && !errors.Is(err, io.EOF) {
			return false, err
		}
		for _, b := range buf[:c] {
			if b != 0 {
				return false, nil
			}
		}
		off += c
		n -= c
	}
	return true, nil
}
