package agent

import (
	"context"
	"errors"
	"fmt"
	"hash"
	"io"
	"os"
	"unsafe"

	"golang.org/x/sys/unix"
)

// ErrImageTooLarge means the image does not fit where it was to be written.
var ErrImageTooLarge = errors.New("image larger than its target")

// Defaults for the write path.
const (
	// DefaultChunkSize is the size of each write: large, and a multiple of every sector and
	// erase-block size, so writes stay aligned when the target offset is.
	DefaultChunkSize = 4 << 20
	// pipelineDepth buffers are in flight: one being filled (decompressed), one being
	// hashed and written, one spare so neither side waits on the other's jitter.
	pipelineDepth = 3
	directIOAlign = 4096
)

// chunk is one buffer travelling from the reader to the writer.
type chunk struct {
	buf []byte
	n   int
	off int64
}

// alignedBuffer returns a size-byte slice whose start is aligned for O_DIRECT.
func alignedBuffer(size int) []byte {
	b := make([]byte, size+directIOAlign)
	shift := int(uintptr(unsafe.Pointer(&b[0])) & (directIOAlign - 1)) //nolint:gosec // an address modulo 4096
	if shift != 0 {
		shift = directIOAlign - shift
	}
	return b[shift : shift+size : shift+size]
}

// writeTarget is where the image goes: [base, base+limit) of a file, optionally written with
// O_DIRECT (through a second descriptor) for all full, aligned chunks.
type writeTarget struct {
	f      *os.File
	direct *os.File
	base   int64
	limit  int64
	// skip keeps the first skip bytes of the image out of the target and in head instead
	// (whole-disk installs write the partition table last).
	skip int64
	head []byte
}

func (w *writeTarget) writeChunk(c chunk) error {
	data := c.buf[:c.n]
	off := c.off
	if w.skip > 0 && off < w.skip {
		k := min(int64(len(data)), w.skip-off)
		copy(w.head[off:], data[:k])
		data, off = data[k:], off+k
		if len(data) == 0 {
			return nil
		}
	}
	f := w.f
	if w.direct != nil && len(data)%directIOAlign == 0 && (w.base+off)%directIOAlign == 0 &&
		uintptr(unsafe.Pointer(&data[0]))%directIOAlign == 0 { //nolint:gosec // only the address's alignment is read
		f = w.direct
	}
	_, err := f.WriteAt(data, w.base+off)
	return err
}

// copyResult is what copyImage saw.
type copyResult struct {
	Written int64
	Sum     []byte
}

// copyImage streams src into the target: src is read (decompressed) into large buffers on
// this goroutine while a second goroutine hashes and writes the previous buffer. Nothing
// beyond the target's limit is written: the first byte that would not fit ends the copy
// with ErrImageTooLarge.
func copyImage(ctx context.Context, src io.Reader, w *writeTarget, h hash.Hash, chunkSize int, progress func(written int64)) (copyResult, error) {
	free := make(chan []byte, pipelineDepth)
	for i := 0; i < pipelineDepth; i++ {
		free <- alignedBuffer(chunkSize)
	}
	work := make(chan chunk, pipelineDepth)
	done := make(chan error, 1)
	go func() {
		var err error
		for c := range work {
			if err == nil {
				h.Write(c.buf[:c.n])
				err = w.writeChunk(c)
			}
			free <- c.buf
		}
		done <- err
	}()
	er := &eofReader{r: src}
	src = er
	var off int64
	var readErr error
	for {
		if err := ctx.Err(); err != nil {
			readErr = err
			break
		}
		var buf []byte
		select {
		case buf = <-free:
		case <-ctx.Done():
			readErr = ctx.Err()
		}
		if readErr != nil {
			break
		}
		n, err := io.ReadFull(src, buf)
		if n > 0 {
			if off+int64(n) > w.limit {
				readErr = fmt.Errorf("%w: more than %d bytes", ErrImageTooLarge, w.limit)
				free <- buf
				break
			}
			work <- chunk{buf: buf, n: n, off: off}
			off += int64(n)
			if progress != nil {
				progress(off)
			}
		} else {
			free <- buf
		}
		if err != nil && er.eof {
			break // the stream ended cleanly (io.ReadFull turns a short final read into ErrUnexpectedEOF)
		}
		if err != nil {
			readErr = err
			break
		}
	}
	close(work)
	writeErr := <-done
	if readErr != nil {
		return copyResult{Written: off}, readErr
	}
	if writeErr != nil {
		return copyResult{Written: off}, fmt.Errorf("writing: %w", writeErr)
	}
	return copyResult{Written: off, Sum: h.Sum(nil)}, nil
}

// eofReader records whether its source ended with io.EOF itself, which tells a clean end
// from a decoder's io.ErrUnexpectedEOF (a truncated compressed stream): io.ReadFull reports
// both as ErrUnexpectedEOF.
type eofReader struct {
	r   io.Reader
	eof bool
}

func (e *eofReader) Read(p []byte) (int, error) {
	n, err := e.r.Read(p)
	if err == io.EOF {
		e.eof = true
	}
	return n, err
}

// openDirect opens a second, O_DIRECT descriptor for path, or returns nil where the
// filesystem refuses (tmpfs, some overlay setups): O_DIRECT is an optimisation only.
func openDirect(path string) *os.File {
	fd, err := unix.Open(path, unix.O_WRONLY|unix.O_DIRECT|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil
	}
	return os.NewFile(uintptr(fd), path)
}
