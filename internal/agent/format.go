package agent

import (
	"bufio"
	"bytes"
	"crypto/sha256"
	"crypto/sha512"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"hash"
	"io"
	"strings"

	"github.com/klauspost/compress/gzip"
	"github.com/klauspost/compress/zstd"
	"github.com/ulikunitz/xz"

	infrav1 "github.com/anvil-metal/cluster-api-provider-anvil/api/v1alpha1"
)

// ErrUnsupportedFormat is returned for image encodings the agent does not write.
var ErrUnsupportedFormat = errors.New("unsupported image format")

// ErrChecksumMismatch means the decompressed image did not match its checksum.
var ErrChecksumMismatch = errors.New("image checksum mismatch")

// Checksum is an expected digest of the decompressed image.
type Checksum struct {
	Algorithm string // sha256 or sha512
	Digest    []byte
}

// ParseChecksum parses "sha256:<hex>" or "sha512:<hex>".
func ParseChecksum(s string) (Checksum, error) {
	alg, hx, ok := strings.Cut(s, ":")
	if !ok {
		return Checksum{}, fmt.Errorf("checksum %q: want <algorithm>:<hex digest>", s)
	}
	var size int
	switch alg {
	case "sha256":
		size = sha256.Size
	case "sha512":
		size = sha512.Size
	default:
		return Checksum{}, fmt.Errorf("checksum algorithm %q not supported (sha256, sha512)", alg)
	}
	d, err := hex.DecodeString(hx)
	if err != nil || len(d) != size {
		return Checksum{}, fmt.Errorf("checksum %q: want %d hex digits", s, 2*size)
	}
	return Checksum{Algorithm: alg, Digest: d}, nil
}

func (c Checksum) newHash() hash.Hash {
	if c.Algorithm == "sha512" {
		return sha512.New()
	}
	return sha256.New()
}

func (c Checksum) String() string { return c.Algorithm + ":" + hex.EncodeToString(c.Digest) }

// magic numbers of encodings an image might arrive in.
func sniff(b []byte) string {
	switch {
	case bytes.HasPrefix(b, []byte{0x1f, 0x8b}):
		return "gzip"
	case bytes.HasPrefix(b, []byte{0x28, 0xb5, 0x2f, 0xfd}):
		return "zstd"
	case bytes.HasPrefix(b, []byte{0xfd, '7', 'z', 'X', 'Z', 0x00}):
		return "xz"
	case bytes.HasPrefix(b, []byte("BZh")) && len(b) > 3 && b[3] >= '1' && b[3] <= '9':
		return "bzip2"
	case bytes.HasPrefix(b, []byte{0x04, 0x22, 0x4d, 0x18}):
		return "lz4"
	case bytes.HasPrefix(b, []byte{'Q', 'F', 'I', 0xfb}):
		return "qcow2"
	case bytes.HasPrefix(b, []byte("KDMV")):
		return "vmdk"
	case bytes.HasPrefix(b, []byte("vhdxfile")):
		return "vhdx"
	case bytes.HasPrefix(b, []byte("conectix")):
		return "vhd"
	}
	return ""
}

// checkFormat refuses unknown encodings and images whose first bytes contradict the
// declared format (a qcow2 file declared raw would otherwise be written as garbage).
func checkFormat(declared infrav1.ImageFormat, head []byte) error {
	switch declared {
	case infrav1.ImageFormatRaw, infrav1.ImageFormatGzip, infrav1.ImageFormatZstd, infrav1.ImageFormatXz:
	default:
		return fmt.Errorf("%w %q (raw, gzip, zstd, xz)", ErrUnsupportedFormat, declared)
	}
	if head == nil {
		return nil
	}
	seen := sniff(head)
	switch {
	case declared == infrav1.ImageFormatRaw && seen != "":
		return fmt.Errorf("%w: the image is declared raw but starts like %s", ErrUnsupportedFormat, seen)
	case declared != infrav1.ImageFormatRaw && seen != string(declared):
		what := seen
		if what == "" {
			what = "an unknown encoding"
		}
		return fmt.Errorf("%w: the image is declared %s but starts like %s", ErrUnsupportedFormat, declared, what)
	}
	return nil
}

// ErrCorruptImage means the compressed stream could not be decoded (truncated or damaged).
var ErrCorruptImage = errors.New("image truncated or corrupt")

// decodeErrors names the format in decoder errors and marks truncation and corruption.
type decodeErrors struct {
	r      io.Reader
	format infrav1.ImageFormat
}

func (d decodeErrors) Read(p []byte) (int, error) {
	n, err := d.r.Read(p)
	if err != nil && err != io.EOF {
		if errors.As(err, new(*DownloadError)) {
			return n, err // a transport error, already descriptive
		}
		return n, fmt.Errorf("decoding %s: %w (%w)", d.format, err, ErrCorruptImage)
	}
	return n, err
}

// decoder wraps the compressed stream.
func decoder(format infrav1.ImageFormat, r *bufio.Reader) (io.Reader, func(), error) {
	dec, closeFn, err := rawDecoder(format, r)
	if err != nil || format == infrav1.ImageFormatRaw {
		return dec, closeFn, err
	}
	return decodeErrors{r: dec, format: format}, closeFn, nil
}

func rawDecoder(format infrav1.ImageFormat, r *bufio.Reader) (io.Reader, func(), error) {
	switch format {
	case infrav1.ImageFormatRaw:
		return r, func() {}, nil
	case infrav1.ImageFormatGzip:
		zr, err := gzip.NewReader(r)
		if err != nil {
			return nil, nil, err
		}
		return zr, func() { _ = zr.Close() }, nil
	case infrav1.ImageFormatZstd:
		// One goroutine: the synchronous decoder writes straight into its history buffer,
		// where the concurrent one decodes each block into a buffer of its own and copies
		// it into the history afterwards. Measured in the install (bench_test.go, 2 cores),
		// two goroutines gave the same throughput for about 10% more CPU: the install's
		// pipeline already hashes and writes on goroutines of their own.
		// The memory cap keeps a hostile window size from exhausting the agent's RAM.
		// The frames' own content checksums (xxhash64) are not checked: the image's sha256
		// or sha512 covers every decompressed byte already, and skipping them takes about
		// 8% off the decoder's goroutine, the slowest stage of the pipeline (0.13 of
		// 1.6 s per GiB here). A damaged stream still fails, as a checksum mismatch.
		zr, err := zstd.NewReader(r, zstd.WithDecoderConcurrency(1), zstd.WithDecoderMaxMemory(1<<30),
			zstd.WithDecoderMaxWindow(128<<20), zstd.WithDecoderLowmem(zstdLowMem(r)), zstd.IgnoreChecksum(true))
		if err != nil {
			return nil, nil, err
		}
		return zr, zr.Close, nil
	case infrav1.ImageFormatXz:
		// Single-threaded and slow (tens of MB/s); accepted because images often ship as xz.
		xr, err := xz.NewReader(r)
		if err != nil {
			return nil, nil, err
		}
		return xr, func() {}, nil
	}
	return nil, nil, fmt.Errorf("%w %q", ErrUnsupportedFormat, format)
}

// zstdLowMem tells whether the decoder should keep its history buffer small. The decoder
// keeps the last window of output and, when its buffer is full, moves that window to the
// buffer's start: with the low-memory buffer (window + 1 MiB) it moves the whole window
// after every MiB of output, which nearly doubles the decoder's CPU (2.8 against 1.5 s per
// GiB with 8 MiB windows here); with a buffer of twice the window it moves it once per
// window. Twice the window is affordable up to 8 MiB
// windows (zstd levels up to 19 without --long); beyond, memory wins.
func zstdLowMem(r *bufio.Reader) bool {
	head, _ := r.Peek(zstd.HeaderMaxSize)
	var h zstd.Header
	if err := h.Decode(head); err != nil || h.Skippable {
		return true
	}
	window := h.WindowSize
	if h.SingleSegment {
		window = h.FrameContentSize // the whole frame is the window
	}
	return window > 8<<20
}

// looksPartitioned reports a disk image (GPT, or an MBR with a partition entry) rather than
// a filesystem. ext4, XFS and btrfs leave the MBR area empty.
func looksPartitioned(b []byte) bool {
	if len(b) < 520 || b[510] != 0x55 || b[511] != 0xAA {
		return false
	}
	if string(b[512:520]) == "EFI PART" {
		return true
	}
	for i := 0; i < 4; i++ {
		e := b[446+16*i : 446+16*(i+1)]
		if (e[0] == 0 || e[0] == 0x80) && e[4] != 0 && binary.LittleEndian.Uint32(e[8:]) != 0 && binary.LittleEndian.Uint32(e[12:]) != 0 {
			return true
		}
	}
	return false
}

// zstdContentSize returns the decompressed size recorded in the first zstd frame header,
// or -1. (It is a lower bound for multi-frame files, which is all a size check needs.)
func zstdContentSize(head []byte) int64 {
	var h zstd.Header
	if err := h.Decode(head); err != nil || !h.HasFCS {
		return -1
	}
	if h.FrameContentSize > 1<<62 {
		return -1
	}
	return int64(h.FrameContentSize)
}
