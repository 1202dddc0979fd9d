package agent

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"math/rand/v2"
	"sort"
	"sync"
	"time"

	"golang.org/x/sys/unix"

	infrav1 "github.com/anvil-metal/cluster-api-provider-anvil/api/v1alpha1"
	"github.com/anvil-metal/cluster-api-provider-anvil/internal/disk"
)

// WipeScope says which disks a wipe covers.
type WipeScope string

const (
	// WipeAllDisks wipes every writable, non-removable disk.
	WipeAllDisks WipeScope = "AllDisks"
	// WipeInstallDisk wipes only the disk the OS is (or would be) installed on.
	WipeInstallDisk WipeScope = "InstallDisk"
)

// WipeOptions tune a wipe.
type WipeOptions struct {
	Policy infrav1.WipePolicy
	// Progress is called as each disk advances.
	Progress func(WipeProgress)
	// Samples is how many random 64 KiB blocks verify a full or secure wipe (default 256),
	// besides the first and last MiB.
	Samples int
	// ChunkSize of zero writes (default 4 MiB).
	ChunkSize int
	// Secure is the drive-level erase; nil uses the built-in NVMe Format (ATA secure erase
	// is not implemented and falls back to a full wipe).
	Secure SecureEraser
}

// WipeProgress reports one disk's progress.
type WipeProgress struct {
	Disk        string
	Phase       string // discard, zero, erase, verify
	Done, Total int64
}

// WipeResult is what happened to one disk.
type WipeResult struct {
	Disk     string
	Policy   infrav1.WipePolicy
	Method   string // e.g. "metadata+discard", "zero", "blkzeroout", "nvme-format-crypto"
	Verified bool
	Note     string
	Duration time.Duration
}

// SecureEraser runs a drive's own erase command.
type SecureEraser interface {
	// Erase erases the whole device behind f and returns a short method name. It returns
	// ErrSecureEraseUnsupported (wrapped, with the reason) when the drive cannot.
	Erase(ctx context.Context, d *disk.Disk) (string, error)
}

// ErrSecureEraseUnsupported makes a secure wipe fall back to overwriting.
var ErrSecureEraseUnsupported = errors.New("secure erase not supported")

// ErrWipeVerify means a wipe did not read back as erased.
var ErrWipeVerify = errors.New("wipe verification failed")

// WipeTargets lists the disks a wipe covers: all writable, non-removable disks, or only the
// install disk chosen by the hints.
func WipeTargets(roots Roots, scope WipeScope, hints *infrav1.RootDeviceHints) ([]string, error) {
	disks, err := ListDisks(roots)
	if err != nil {
		return nil, err
	}
	switch scope {
	case WipeInstallDisk:
		d, err := SelectDisk(disks, hints, 0, roots.withDefaults().Dev)
		if err != nil {
			return nil, err
		}
		return []string{d.Path}, nil
	case WipeAllDisks, "":
		var out []string
		for _, d := range disks {
			if !d.ReadOnly && !d.Removable {
				out = append(out, d.Path)
			}
		}
		return out, nil
	}
	return nil, fmt.Errorf("unknown wipe scope %q", scope)
}

// Wipe wipes the disks in parallel (each disk is its own I/O path) and returns one result
// per disk, in the order given. The error joins every disk's failure. Progress calls are
// serialised, so the callback needs no locking of its own.
func Wipe(ctx context.Context, paths []string, opts WipeOptions) ([]WipeResult, error) {
	if p := opts.Progress; p != nil {
		var mu sync.Mutex
		opts.Progress = func(wp WipeProgress) {
			mu.Lock()
			defer mu.Unlock()
			p(wp)
		}
	}
	results := make([]WipeResult, len(paths))
	errs := make([]error, len(paths))
	var wg sync.WaitGroup
	for i, p := range paths {
		wg.Add(1)
		go func() {
			defer wg.Done()
			results[i], errs[i] = WipeDisk(ctx, p, opts)
		}()
	}
	wg.Wait()
	return results, errors.Join(errs...)
}

// WipeDisk wipes one disk according to opts.Policy.
func WipeDisk(ctx context.Context, path string, opts WipeOptions) (WipeResult, error) {
	start := time.Now()
	res := WipeResult{Disk: path, Policy: opts.Policy}
	if opts.Policy == infrav1.WipePolicyDisabled {
		res.Method = "none"
		return res, nil
	}
	if opts.Samples <= 0 {
		opts.Samples = 256
	}
	if opts.ChunkSize <= 0 {
		opts.ChunkSize = DefaultChunkSize
	}
	d, err := disk.Open(path)
	if err != nil {
		return res, err
	}
	defer func() { _ = d.Close() }()
	report := func(phase string, done, total int64) {
		if opts.Progress != nil {
			opts.Progress(WipeProgress{Disk: path, Phase: phase, Done: done, Total: total})
		}
	}
	switch opts.Policy {
	case infrav1.WipePolicyMetadata:
		err = wipeMetadata(ctx, d, &res, report)
	case infrav1.WipePolicyFull:
		err = wipeFull(ctx, d, &res, opts, report)
	case infrav1.WipePolicySecure:
		err = wipeSecure(ctx, d, &res, opts, report)
	default:
		err = fmt.Errorf("unknown wipe policy %q", opts.Policy)
	}
	res.Duration = time.Since(start)
	if err != nil {
		return res, fmt.Errorf("wiping %s: %w", path, err)
	}
	return res, nil
}

type region struct{ off, n int64 }

// metadataRegions are where partition tables and filesystem, RAID and volume-manager
// signatures live: the first and last MiB of the disk and of every partition (GPT and its
// backup, MBR, LVM, md 0.90/1.x, ZFS labels, ext*, XFS, btrfs's primary superblock) and
// btrfs's superblock mirrors at 64 MiB and 256 GiB.
func metadataRegions(d *disk.Disk) []region {
	var regs []region
	span := func(off, n int64) {
		e := min(disk.MiB, n)
		regs = append(regs, region{off, e}, region{off + n - e, e})
		for _, m := range []int64{64 * disk.MiB, 256 * disk.GiB} {
			if m+4096 <= n {
				regs = append(regs, region{off + m, 4096})
			}
		}
	}
	span(0, d.Size)
	ss := int64(d.SectorSize)
	if t, _, err := disk.ReadGPT(d, d.Size, d.SectorSize); err == nil {
		for _, p := range t.Partitions {
			off, n := int64(p.FirstLBA)*ss, int64(p.Sectors())*ss //nolint:gosec // within the disk
			if off+n <= d.Size {
				span(off, n)
			}
		}
	}
	mbr := make([]byte, 512)
	if _, err := d.ReadAt(mbr, 0); err == nil && mbr[510] == 0x55 && mbr[511] == 0xAA {
		for i := 0; i < 4; i++ {
			e := mbr[446+16*i : 446+16*(i+1)]
			typ := e[4]
			start := int64(binary.LittleEndian.Uint32(e[8:])) * 512
			n := int64(binary.LittleEndian.Uint32(e[12:])) * 512
			if typ != 0 && typ != 0xEE && n > 0 && start+n <= d.Size {
				span(start, n)
			}
		}
	}
	sort.Slice(regs, func(i, j int) bool { return regs[i].off < regs[j].off })
	return regs
}

func wipeMetadata(ctx context.Context, d *disk.Disk, res *WipeResult, report func(string, int64, int64)) error {
	regs := metadataRegions(d)
	res.Method = "metadata"
	if d.Block {
		report("discard", 0, d.Size)
		if err := blkIoctlRange(d, unix.BLKDISCARD, 0, d.Size); err == nil {
			res.Method = "metadata+discard"
		} else {
			res.Note = fmt.Sprintf("discard not supported: %v", err)
		}
	}
	var total int64
	for _, r := range regs {
		total += r.n
	}
	var done int64
	for _, r := range regs {
		if err := ctx.Err(); err != nil {
			return err
		}
		if err := d.ZeroRange(r.off, r.n); err != nil {
			return err
		}
		done += r.n
		report("zero", done, total)
	}
	if err := d.Sync(); err != nil {
		return err
	}
	dropCache(d)
	report("verify", 0, total)
	for _, r := range regs {
		ok, err := d.IsZero(r.off, r.n)
		if err != nil {
			return err
		}
		if !ok {
			return fmt.Errorf("%w: %d bytes at %d are not zero", ErrWipeVerify, r.n, r.off)
		}
	}
	if _, _, err := disk.ReadGPT(d, d.Size, d.SectorSize); err == nil {
		return fmt.Errorf("%w: a partition table is still readable", ErrWipeVerify)
	}
	res.Verified = true
	if d.Block {
		_ = unix.IoctlSetInt(int(d.File().Fd()), unix.BLKRRPART, 0)
	}
	return nil
}

func wipeFull(ctx context.Context, d *disk.Disk, res *WipeResult, opts WipeOptions, report func(string, int64, int64)) error {
	res.Method = "zero"
	zeroed := false
	if d.Block {
		// BLKZEROOUT lets the drive zero without the data crossing the bus (WRITE ZEROES)
		// where it can; the kernel writes zero pages itself otherwise. 1 GiB per call keeps
		// progress reports flowing.
		const step = disk.GiB
		var err error
		for off := int64(0); off < d.Size && err == nil; off += step {
			if cerr := ctx.Err(); cerr != nil {
				return cerr
			}
			err = blkIoctlRange(d, unix.BLKZEROOUT, off, min(step, d.Size-off))
			report("zero", min(off+step, d.Size), d.Size)
		}
		if err == nil {
			res.Method, zeroed = "blkzeroout", true
		} else {
			res.Note = fmt.Sprintf("BLKZEROOUT failed (%v); writing zeros", err)
		}
	}
	if !zeroed {
		buf := alignedBuffer(opts.ChunkSize)
		for off := int64(0); off < d.Size; {
			if err := ctx.Err(); err != nil {
				return err
			}
			n := min(int64(len(buf)), d.Size-off)
			if _, err := d.WriteAt(buf[:n], off); err != nil {
				return err
			}
			off += n
			report("zero", off, d.Size)
		}
	}
	if err := d.Sync(); err != nil {
		return err
	}
	dropCache(d)
	if err := verifySamples(d, opts.Samples, report, func(b []byte, _ int) bool { return allZero(b) }); err != nil {
		return err
	}
	res.Verified = true
	return nil
}

func wipeSecure(ctx context.Context, d *disk.Disk, res *WipeResult, opts WipeOptions, report func(string, int64, int64)) error {
	eraser := opts.Secure
	if eraser == nil {
		eraser = nvmeEraser{}
	}
	// Fingerprint the sample blocks first: a drive-level erase may leave zeros, ones or
	// (crypto erase) random data, so "verified" means every sample changed or reads zero.
	offs := sampleOffsets(d.Size, opts.Samples)
	before := make([][32]byte, len(offs))
	buf := make([]byte, sampleSize)
	for i, off := range offs {
		n := min(int64(sampleSize), d.Size-off)
		if _, err := d.ReadAt(buf[:n], off); err != nil {
			return err
		}
		before[i] = sha256.Sum256(buf[:n])
	}
	report("erase", 0, d.Size)
	method, err := eraser.Erase(ctx, d)
	if errors.Is(err, ErrSecureEraseUnsupported) {
		ferr := wipeFull(ctx, d, res, opts, report)
		res.Note = fmt.Sprintf("%v; fell back to overwriting%s", err, prefixed("; ", res.Note))
		return ferr
	}
	if err != nil {
		return err
	}
	res.Method = method
	dropCache(d)
	if err := verifySamples(d, opts.Samples, report, func(b []byte, i int) bool {
		return allZero(b) || sha256.Sum256(b) != before[i]
	}); err != nil {
		return err
	}
	res.Verified = true
	return nil
}

func prefixed(p, s string) string {
	if s == "" {
		return ""
	}
	return p + s
}

const sampleSize = 64 << 10

// sampleOffsets are the first and last 64 KiB blocks plus n pseudo-random ones (from a fixed
// seed per size, so the same disk is sampled the same way before and after an erase).
func sampleOffsets(size int64, n int) []int64 {
	offs := []int64{0, max(0, size-sampleSize)}
	blocks := size / sampleSize
	if blocks <= 2 {
		return offs
	}
	r := rand.New(rand.NewPCG(uint64(size), 0x616e76696c)) //nolint:gosec // sampling, not secrecy
	for i := 0; i < n; i++ {
		offs = append(offs, r.Int64N(blocks)*sampleSize)
	}
	return offs
}

func verifySamples(d *disk.Disk, n int, report func(string, int64, int64), ok func([]byte, int) bool) error {
	offs := sampleOffsets(d.Size, n)
	buf := make([]byte, sampleSize)
	for i, off := range offs {
		m := min(int64(sampleSize), d.Size-off)
		if _, err := d.ReadAt(buf[:m], off); err != nil {
			return err
		}
		if !ok(buf[:m], i) {
			return fmt.Errorf("%w: block at %d still holds old data", ErrWipeVerify, off)
		}
		report("verify", int64(i+1), int64(len(offs)))
	}
	return nil
}

func allZero(b []byte) bool {
	return len(bytes.TrimLeft(b, "\x00")) == 0
}

// blkIoctlRange issues BLKDISCARD or BLKZEROOUT on [off, off+n).
func blkIoctlRange(d *disk.Disk, req uint, off, n int64) error {
	r := [2]uint64{uint64(off), uint64(n)} //nolint:gosec // non-negative
	return ioctlPtr(d.File(), req, &r)
}

// dropCache asks the kernel to forget cached pages so verification reads the medium.
func dropCache(d *disk.Disk) {
	_ = unix.Fadvise(int(d.File().Fd()), 0, 0, unix.FADV_DONTNEED)
}
