// Package agent is what runs on a server booted into Anvil's agent: it inventories the
// hardware, wipes disks, and installs operating-system images (streamed over HTTP,
// decompressed and verified on the fly) into the A/B layout of internal/disk or as whole
// disk images.
package agent

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"runtime"
	"sync/atomic"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	infrav1 "github.com/anvil-metal/cluster-api-provider-anvil/api/v1alpha1"
	"github.com/anvil-metal/cluster-api-provider-anvil/internal/disk"
	"github.com/anvil-metal/cluster-api-provider-anvil/internal/disk/fat"
)

// ImageSource is an image to install.
type ImageSource struct {
	// URL is http:// or https://.
	URL string
	// Checksum of the DECOMPRESSED image (what ends up on the disk), sha256:<hex> or
	// sha512:<hex>. Verified inline while writing; nothing counts as installed unless it
	// matches.
	Checksum string
	// Format is the transfer encoding: raw, gzip, zstd or xz.
	Format infrav1.ImageFormat
	// Layout says whether this is an A/B root filesystem or a whole-disk image.
	Layout infrav1.ImageLayout
	// Size is the decompressed size when known (0 = unknown); an image known to be too
	// large is refused before anything is written.
	Size int64
	// Header is added to every request (e.g. the agent's bearer token).
	Header http.Header
	// Client defaults to a client with no overall timeout (images take minutes) but with
	// connection and header timeouts.
	Client *http.Client
}

// SourceFromImage converts the API's Image.
func SourceFromImage(img infrav1.Image) ImageSource {
	return ImageSource{URL: img.URL, Checksum: img.Checksum, Format: img.Format, Layout: img.Layout}
}

// InstallOptions tune an install.
type InstallOptions struct {
	// Hints choose the disk when Install is given no target path.
	Hints *infrav1.RootDeviceHints
	// Roots locate sysfs and /dev for disk selection.
	Roots Roots
	// Layout sizes the A/B layout when it has to be created.
	Layout disk.LayoutOptions
	// ConfigDrive, when set, is written after the image verified (A/B: the CONFIG
	// partition; whole-disk: a CONFIG partition added at the end of the disk).
	ConfigDrive *disk.ConfigDrive
	// Tries is how many boots the new slot gets before GRUB falls back (default 3).
	Tries int
	// MaxRetries bounds consecutive failed reconnects without progress (default 5), with
	// exponential back-off from RetryBackoff (default 1 s).
	MaxRetries   int
	RetryBackoff time.Duration
	// ChunkSize of each write (default 4 MiB).
	ChunkSize int
	// BufferedWrites writes the image through the page cache, starting each chunk's
	// writeback right away rather than leaving it to the final fsync. By default full,
	// aligned chunks are written with O_DIRECT instead, several at a time, where the target
	// (block device or image file) accepts it; the rest (the image's last, partial chunk,
	// and everything once the target refused an O_DIRECT write) goes through the page
	// cache. O_DIRECT saves the kernel's copy of every byte into the page cache and the
	// writeback's work (2.9 against 4.4 s of CPU per GiB installed, 4 GiB image, make
	// bench) and keeps the page cache out of the agent's RAM; the writes in flight keep the
	// device busy while each of them waits for it.
	BufferedWrites bool
	// Progress is called as chunks are written, never concurrently, from a goroutine that
	// does not hold up the writes (reports that pile up while it runs are merged into one);
	// the last report, with every byte written, comes before Install returns.
	Progress func(Progress)
	// Decompressor picks the decoder implementation (default: built in, but the xz command
	// for xz images when it is on PATH; see DecompressorAuto).
	Decompressor Decompressor
}

// Progress of an install.
type Progress struct {
	// Downloaded bytes (compressed) of DownloadTotal (-1 when the server did not say).
	Downloaded, DownloadTotal int64
	// Written decompressed bytes.
	Written int64
	// Resumes is how many times the download reconnected.
	Resumes int
}

// Result describes a finished install.
type Result struct {
	Disk     string
	Layout   infrav1.ImageLayout
	Slot     infrav1.Slot // A/B only
	Written  int64
	Checksum string
	Resumes  int
	Duration time.Duration
	// LayoutCreated is true when the A/B layout was created by this install.
	LayoutCreated bool
	Repaired      []string
	// BootSlots is the A/B state after the install (the other slot's content is unknown to
	// the agent and left nil).
	BootSlots *infrav1.BootSlots
}

// Install writes an image to target (a disk device or image file path; empty selects a disk
// by opts.Hints).
//
// A/B root images go into the inactive slot of the A/B layout (created on first use); the
// slot is armed in GRUB's environment (next=<slot>, tries=N) only after the checksum
// matched. Any failure (bad checksum, truncated or oversized image, unsupported format,
// download errors) leaves the active slot, DATA, CONFIG and the boot configuration as they
// were; only the inactive slot may hold partial data, and it is never armed.
//
// The data path is a pipeline: the download runs on a goroutine of its own, the decoder on
// another, and each decompressed chunk is hashed and written at the same time by two more,
// through a fixed pool of ChunkSize buffers, so memory does not grow with the image.
// Writes bypass the page cache where the target allows (see InstallOptions.BufferedWrites).
//
// Whole-disk images replace the disk's content. The first MiB of the image (its partition
// table) is kept in memory and written last, after the checksum matched, and the disk's old
// partition tables are cleared first: a failed install leaves a disk without a partition
// table rather than a corrupt bootable one.
func Install(ctx context.Context, src ImageSource, target string, opts InstallOptions) (*Result, error) {
	start := time.Now()
	if opts.Tries == 0 {
		opts.Tries = 3
	}
	if opts.MaxRetries == 0 {
		opts.MaxRetries = 5
	}
	if opts.RetryBackoff == 0 {
		opts.RetryBackoff = time.Second
	}
	if opts.ChunkSize <= 0 {
		opts.ChunkSize = DefaultChunkSize
	}
	if opts.ChunkSize%4096 != 0 {
		return nil, fmt.Errorf("chunk size %d is not a multiple of 4096", opts.ChunkSize)
	}
	// Everything that can be checked without the disk or the network comes first.
	sum, err := ParseChecksum(src.Checksum)
	if err != nil {
		return nil, err
	}
	if src.Format == "" {
		src.Format = infrav1.ImageFormatRaw
	}
	if err := checkFormat(src.Format, nil); err != nil {
		return nil, err
	}
	if src.Layout == "" {
		src.Layout = infrav1.ImageLayoutABRoot
	}
	if src.Layout != infrav1.ImageLayoutABRoot && src.Layout != infrav1.ImageLayoutWholeDisk {
		return nil, fmt.Errorf("unknown image layout %q", src.Layout)
	}
	if u, err := url.Parse(src.URL); err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
		return nil, fmt.Errorf("image URL %q: only http:// and https:// URLs are accepted", redactURL(src.URL))
	}
	if target == "" {
		disks, err := ListDisks(opts.Roots)
		if err != nil {
			return nil, fmt.Errorf("listing disks: %w", err)
		}
		sel, err := SelectDisk(disks, opts.Hints, src.Size, opts.Roots.withDefaults().Dev)
		if err != nil {
			return nil, err
		}
		target = sel.Path
	}
	d, err := disk.Open(target)
	if err != nil {
		return nil, err
	}
	defer func() { _ = d.Close() }()

	// Open the stream and look at its first bytes before touching the disk.
	client := src.Client
	if client == nil {
		client = ImageClient(nil)
		// Its kept-alive connection (and the goroutines serving it) would outlive the
		// install otherwise.
		defer client.CloseIdleConnections()
	}
	// The download runs under its own context, so that it can be stopped, wherever it
	// is blocked, once the install is over.
	dctx, stopDownload := context.WithCancel(ctx)
	body := newResumableBody(dctx, client, src.URL, src.Header, opts.MaxRetries, opts.RetryBackoff)
	var downloaded atomic.Int64
	var in io.Reader = &countingReader{r: body, n: &downloaded}
	var ra *readAhead
	bufSize := 1 << 20
	if src.Format != infrav1.ImageFormatRaw {
		// Compressed images are downloaded on a goroutine of their own, ahead of the
		// decoder. Raw images need no such stage: the copy reads the socket straight into
		// its buffers, on a goroutine that has nothing else to do.
		ra = startReadAhead(dctx, stopDownload, in)
		in, bufSize = ra, 64<<10
	}
	var closeDec func()
	defer func() {
		// In this order: the download stops first, so that nothing (an external
		// decompressor's input, say) still waits on it while the decoder is closed.
		if ra != nil {
			ra.close()
		}
		stopDownload()
		if closeDec != nil {
			closeDec()
		}
		_ = body.Close()
	}()
	br := bufio.NewReaderSize(in, bufSize)
	head, err := br.Peek(64)
	if len(head) == 0 {
		if err == nil || errors.Is(err, io.EOF) {
			err = errors.New("the image is empty")
		}
		return nil, fmt.Errorf("reading the image: %w", err)
	}
	if err := checkFormat(src.Format, head); err != nil {
		return nil, err
	}
	// The total is known once the first bytes arrived (and does not change afterwards).
	total := body.total
	known := src.Size
	switch src.Format {
	case infrav1.ImageFormatRaw:
		known = max(known, total)
	case infrav1.ImageFormatZstd:
		known = max(known, zstdContentSize(head))
	}
	var dec io.Reader
	if useExternal(src.Format, opts.Decompressor) {
		dec, closeDec, err = externalDecoder(ctx, src.Format, br)
	} else {
		dec, closeDec, err = decoder(src.Format, br)
	}
	if err != nil {
		return nil, fmt.Errorf("%w: %w", ErrUnsupportedFormat, err)
	}
	if src.Layout == infrav1.ImageLayoutABRoot {
		// A root slot takes a filesystem; a partitioned disk image there would never boot.
		dbr := bufio.NewReaderSize(dec, 64<<10)
		if h, _ := dbr.Peek(1024); looksPartitioned(h) {
			return nil, fmt.Errorf("%w: the image has a partition table: it is a whole-disk image, not a root filesystem (set layout WholeDisk)",
				ErrUnsupportedFormat)
		}
		dec = dbr
	}

	progress := func(written int64) {
		if opts.Progress != nil {
			opts.Progress(Progress{Downloaded: downloaded.Load(), DownloadTotal: total, Written: written, Resumes: body.Resumes()})
		}
	}
	res := &Result{Disk: target, Layout: src.Layout, Checksum: sum.String()}
	run := installAB
	if src.Layout == infrav1.ImageLayoutWholeDisk {
		run = installWholeDisk
	}
	if err := run(ctx, d, dec, sum, known, src, opts, progress, res); err != nil {
		return nil, err
	}
	res.Resumes = body.Resumes()
	res.Duration = time.Since(start)
	return res, nil
}

type progressFunc func(written int64)

func installAB(ctx context.Context, d *disk.Disk, dec io.Reader, sum Checksum, known int64, src ImageSource,
	opts InstallOptions, progress progressFunc, res *Result) error {
	// Refuse an image known to be too big before creating a layout for it.
	if known > 0 {
		if _, err := disk.OpenAB(d); err != nil {
			plan, perr := disk.PlanLayout(d.Size, d.SectorSize, opts.Layout)
			if perr != nil {
				return perr
			}
			if p, _ := plan.ByName(disk.NameRootA); known > int64(p.Sectors())*int64(d.SectorSize) { //nolint:gosec // sizes of a real disk
				return fmt.Errorf("%w: %d bytes, the slot would hold %d", ErrImageTooLarge, known, int64(p.Sectors())*int64(d.SectorSize)) //nolint:gosec // as above
			}
		}
	}
	ab, err := disk.EnsureABLayout(d, opts.Layout)
	if err != nil {
		return err
	}
	res.LayoutCreated, res.Repaired = ab.Created, ab.Repaired
	st, err := ab.BootState()
	if err != nil {
		return err
	}
	slot := st.InstallTarget()
	part, err := ab.Slot(slot)
	if err != nil {
		return err
	}
	off, size := ab.Range(part)
	if known > size {
		return fmt.Errorf("%w: %d bytes, slot %s holds %d", ErrImageTooLarge, known, slot, size)
	}
	// A pending try of this slot must not boot a half-written filesystem.
	if st.Next == slot {
		if err := ab.Disarm(slot); err != nil {
			return err
		}
	}
	w := &writeTarget{f: d.File(), base: off, limit: size}
	if !opts.BufferedWrites {
		if w.direct = openDirect(d.Path); w.direct != nil {
			defer func() { _ = w.direct.Close() }()
		}
	}
	cr, err := copyImage(ctx, dec, w, sum.newHash(), opts.ChunkSize, progress)
	if err == nil && !bytes.Equal(cr.Sum, sum.Digest) {
		err = fmt.Errorf("%w: got %s:%x, want %s", ErrChecksumMismatch, sum.Algorithm, cr.Sum, sum)
	}
	if err != nil {
		// Leave no half-written filesystem that anything might mount by mistake.
		_ = d.ZeroRange(off, min(size, disk.MiB))
		_ = d.Sync()
		return fmt.Errorf("installing into slot %s: %w", slot, err)
	}
	if err := d.Sync(); err != nil {
		return err
	}
	if opts.ConfigDrive != nil {
		if err := ab.WriteConfigDrive(opts.ConfigDrive); err != nil {
			return err
		}
	}
	if err := ab.Arm(slot, opts.Tries); err != nil {
		return err
	}
	res.Slot, res.Written = slot, cr.Written
	now := metav1.Now()
	content := &infrav1.SlotContent{ImageURL: redactURL(src.URL), Checksum: sum.String(), InstalledAt: &now}
	bs := &infrav1.BootSlots{Active: st.Active, Pending: slot, TriesLeft: int32(opts.Tries)} //nolint:gosec // 1-9
	if st.Failed != slot {
		bs.LastFailed = st.Failed
	}
	if slot == infrav1.SlotA {
		bs.A = content
	} else {
		bs.B = content
	}
	res.BootSlots = bs
	return nil
}

func installWholeDisk(ctx context.Context, d *disk.Disk, dec io.Reader, sum Checksum, known int64, _ ImageSource,
	opts InstallOptions, progress progressFunc, res *Result) error {
	if known > d.Size {
		return fmt.Errorf("%w: %d bytes, the disk holds %d", ErrImageTooLarge, known, d.Size)
	}
	headLen := min(disk.MiB, d.Size)
	// Old tables at both ends go first: from here on the disk boots nothing until the new
	// image has verified and its head is written.
	if err := d.ZeroRange(0, headLen); err != nil {
		return err
	}
	if err := d.ZeroRange(d.Size-headLen, headLen); err != nil {
		return err
	}
	if err := d.Sync(); err != nil {
		return err
	}
	w := &writeTarget{f: d.File(), base: 0, limit: d.Size, skip: headLen, head: make([]byte, headLen)}
	if !opts.BufferedWrites {
		if w.direct = openDirect(d.Path); w.direct != nil {
			defer func() { _ = w.direct.Close() }()
		}
	}
	cr, err := copyImage(ctx, dec, w, sum.newHash(), opts.ChunkSize, progress)
	if err == nil && !bytes.Equal(cr.Sum, sum.Digest) {
		err = fmt.Errorf("%w: got %s:%x, want %s", ErrChecksumMismatch, sum.Algorithm, cr.Sum, sum)
	}
	if err != nil {
		return fmt.Errorf("installing whole-disk image: %w", err)
	}
	if err := d.Sync(); err != nil {
		return err
	}
	if _, err := d.WriteAt(w.head[:min(headLen, cr.Written)], 0); err != nil {
		return err
	}
	if err := d.Sync(); err != nil {
		return err
	}
	res.Written = cr.Written
	if fixed, err := relocateBackupGPT(d); err != nil {
		return err
	} else if fixed {
		res.Repaired = append(res.Repaired, "backup GPT moved to the end of the disk")
	}
	if opts.ConfigDrive != nil {
		if err := addConfigPartition(d, opts.ConfigDrive); err != nil {
			return fmt.Errorf("config drive: %w", err)
		}
	}
	return nil
}

// relocateBackupGPT moves a whole-disk image's backup GPT from the image's end to the
// disk's end (what sgdisk -e does), so firmware and tools see a consistent table. Images
// without a GPT (MBR, or none) are left alone.
func relocateBackupGPT(d *disk.Disk) (bool, error) {
	if !disk.HasProtectiveMBR(d) {
		return false, nil
	}
	t, info, err := disk.ReadGPT(d, d.Size, d.SectorSize)
	if err != nil || !info.PrimaryOK || info.BackupAtEnd {
		return false, nil //nolint:nilerr // no usable GPT: nothing to move
	}
	lastLBA := uint64(d.Size/int64(d.SectorSize)) - 1         //nolint:gosec // positive
	es := uint64((128*128 + d.SectorSize - 1) / d.SectorSize) //nolint:gosec // small
	t.LastLBA = lastLBA
	t.LastUsable = lastLBA - 1 - es
	mbr := make([]byte, 440)
	if _, err := d.ReadAt(mbr, 0); err != nil {
		return false, err
	}
	if err := t.Write(d, mbr); err != nil {
		return false, err
	}
	return true, d.Sync()
}

// addConfigPartition puts a cidata partition in the last 64 MiB of a whole-disk image's
// GPT disk (as Ironic does for whole-disk images). The health gate is A/B only and is left
// out.
func addConfigPartition(d *disk.Disk, cd *disk.ConfigDrive) error {
	t, _, err := disk.ReadGPT(d, d.Size, d.SectorSize)
	if err != nil {
		return fmt.Errorf("the image has no GPT to add a config drive partition to: %w", err)
	}
	ss := uint64(d.SectorSize) //nolint:gosec // positive
	size := uint64(disk.DefaultConfigSize) / ss
	mib := uint64(disk.MiB) / ss
	first := (t.LastUsable + 1 - size) / mib * mib
	used := map[int]bool{}
	for _, p := range t.Partitions {
		used[p.Index] = true
		if p.LastLBA >= first {
			return fmt.Errorf("no free %d MiB at the end of the disk (partition %d ends at sector %d)", disk.DefaultConfigSize>>20, p.Index, p.LastLBA)
		}
	}
	idx := 1
	for used[idx] {
		idx++
	}
	p := disk.Partition{Index: idx, Type: disk.MustParseGUID(disk.TypeLinuxData), ID: disk.NewGUID(),
		FirstLBA: first, LastLBA: t.LastUsable, Name: disk.NameConfig}
	t.Partitions = append(t.Partitions, p)
	c := *cd
	c.HealthGate = nil
	files, err := c.Render(disk.GUID{}, p.ID)
	if err != nil {
		return err
	}
	off := int64(first) * int64(d.SectorSize)                                                             //nolint:gosec // within the disk
	if err := buildFAT16(d, off, int64(p.Sectors())*int64(d.SectorSize), files, p.FirstLBA); err != nil { //nolint:gosec // within the disk
		return err
	}
	mbr := make([]byte, 440)
	if _, err := d.ReadAt(mbr, 0); err != nil {
		return err
	}
	if err := t.Write(d, mbr); err != nil {
		return err
	}
	return d.Sync()
}

type countingReader struct {
	r io.Reader
	n *atomic.Int64
}

func (c *countingReader) Read(p []byte) (int, error) {
	n, err := c.r.Read(p)
	c.n.Add(int64(n))
	return n, err
}

// ImageClient is the client images are downloaded with unless ImageSource names one: no
// overall timeout (an image download takes minutes) but bounded connection set-up and wait
// for response headers, so a dead server fails fast and the resume logic takes over. dial
// opens its connections (nil: the default dialer; the lab dials from a server's namespace).
func ImageClient(dial func(ctx context.Context, network, addr string) (net.Conn, error)) *http.Client {
	tr := http.DefaultTransport.(*http.Transport).Clone()
	if dial != nil {
		tr.DialContext = dial
	}
	tr.ResponseHeaderTimeout = 30 * time.Second
	tr.DisableCompression = true
	return &http.Client{Transport: tr}
}

// InspectBootSlots reads the A/B state of an installed disk.
func InspectBootSlots(path string) (*infrav1.BootSlots, error) {
	d, err := disk.OpenReadOnly(path)
	if err != nil {
		return nil, err
	}
	defer func() { _ = d.Close() }()
	ab, err := disk.OpenAB(d)
	if err != nil {
		return nil, err
	}
	st, err := ab.BootState()
	if err != nil {
		return nil, err
	}
	return &infrav1.BootSlots{Active: st.Active, Pending: st.Next, TriesLeft: int32(st.Tries), LastFailed: st.Failed}, nil //nolint:gosec // small
}

func buildFAT16(d *disk.Disk, off, size int64, files []fat.File, firstLBA uint64) error {
	return fat.Build(d, off, size, fat.Options{
		Type: fat.FAT16, Label: disk.ConfigDriveLabel, VolumeID: uint32(time.Now().UnixNano()), //nolint:gosec // any 32 bits do
		HiddenSectors: uint32(min(firstLBA, 0xFFFFFFFF)),
	}, files)
}

// installStages is how many stages of an install's pipeline keep a CPU busy at once:
// download, decode, hash and write.
const installStages = 4

// EnsureProcs lets each stage of the install pipeline run on a thread of its own: it raises
// GOMAXPROCS to installStages on machines with fewer CPUs (unless GOMAXPROCS is set in the
// environment) and returns the value in force. With fewer Ps than busy stages, the stages
// take turns on the Ps even while the OS has time for them; and when something else also
// wants the CPUs, the kernel shares them out by thread, so a 2-P agent gets two threads'
// worth against, say, the three of curl | zstd -d | dd. Measured on 2 shared CPUs
// (bench_test.go child, 1 GiB): 4.75 s with 2 Ps, 4.02 s with 4 and the same CPU time,
// against 3.96 s for the pipeline. The agent calls it at start-up; a library must not.
func EnsureProcs() int {
	if os.Getenv("GOMAXPROCS") == "" && runtime.GOMAXPROCS(0) < installStages {
		runtime.GOMAXPROCS(installStages)
	}
	return runtime.GOMAXPROCS(0)
}
