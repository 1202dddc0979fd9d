package agent

import (
	"context"
	"errors"
	"fmt"
	"hash"
	"io"
	"os"
	"sync"
	"sync/atomic"
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
	// pipelineMemory is what the buffers circulating between the copy's stages add up to:
	// pipelineMemory/ChunkSize of them (at least minPipelineDepth), one being filled by the
	// decoder, others being hashed and written, the rest absorbing the stages' jitter.
	// They bound the copy's memory.
	pipelineMemory   = 16 << 20
	minPipelineDepth = 4
	directIOAlign    = 4096
)

// pipelineShape returns how many buffers of chunkSize circulate, and how many writes may be
// in flight at once: with O_DIRECT, a write returns only once the device has the data, and
// one at a time would leave the device idle in between, so half of the buffers may be
// waiting on the device; buffered writes return as soon as the page cache has the data, and
// one writer keeps them in order.
func pipelineShape(chunkSize int, direct bool) (depth, writers int) {
	depth = max(minPipelineDepth, pipelineMemory/chunkSize)
	if !direct {
		return depth, 1
	}
	return depth, depth / 2
}

// chunk is one buffer travelling from the decoder to the hasher and the writer; it goes
// back to the free pool when both are done with it.
type chunk struct {
	buf  []byte
	n    int
	off  int64
	refs atomic.Int32
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
	// directOff is set when the target refused an O_DIRECT write: the rest goes through
	// the page cache.
	directOff atomic.Bool
	base      int64
	limit     int64
	// skip keeps the first skip bytes of the image out of the target and in head instead
	// (whole-disk installs write the partition table last).
	skip int64
	head []byte
}

func (w *writeTarget) writeChunk(c *chunk) error {
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
	if w.direct != nil && !w.directOff.Load() && len(data)%directIOAlign == 0 && (w.base+off)%directIOAlign == 0 &&
		uintptr(unsafe.Pointer(&data[0]))%directIOAlign == 0 { //nolint:gosec // only the address's alignment is read
		_, err := w.direct.WriteAt(data, w.base+off)
		if !errors.Is(err, unix.EINVAL) {
			return err
		}
		// Opened with O_DIRECT but refusing this write (some filesystems, odd logical
		// block sizes): O_DIRECT is an optimisation only.
		w.directOff.Store(true)
	}
	if _, err := w.f.WriteAt(data, w.base+off); err != nil {
		return err
	}
	// Start writing these pages back now rather than at the final fsync: the disk works
	// while the next chunks are downloaded and decompressed, the fsync at the end finds
	// little left to do, and dirty pages do not pile up in the agent's RAM. This only
	// starts the writeback: durability still comes from the fsync, which also reports any
	// write error. Where the call is not supported it does nothing.
	if rc, err := w.f.SyscallConn(); err == nil {
		_ = rc.Control(func(fd uintptr) {
			_ = unix.SyncFileRange(int(fd), w.base+off, int64(len(data)), unix.SYNC_FILE_RANGE_WRITE)
		})
	}
	return nil
}

// copyResult is what copyImage saw.
type copyResult struct {
	Written int64
	Sum     []byte
}

// copyImage streams src into the target as a pipeline joined by a small pool of large
// buffers: this goroutine reads src (the decompressor) into a free buffer and hands it to
// a hasher and a writer, which work on it at the same time, each taking the buffers in
// order; a buffer returns to the pool when both are done with it. Decompression, hashing
// and writing thus overlap, memory stays bounded by the pool (see pipelineShape), and the
// data is not copied beyond the decoder's output. (O_DIRECT writes, which wait for the
// device, run on several goroutines and may complete out of order.)
//
// Nothing beyond the target's limit is written: the first byte that would not fit ends the
// copy with ErrImageTooLarge. A read error wins over a write error; a failed write stops
// the reading early. progress is called with the bytes written so far, never concurrently,
// from a goroutine of its own (see progressReporter); it has had its last call when
// copyImage returns.
func copyImage(ctx context.Context, src io.Reader, w *writeTarget, h hash.Hash, chunkSize int, progress func(written int64)) (copyResult, error) {
	pipelineDepth, writers := pipelineShape(chunkSize, w.direct != nil)
	free := make(chan *chunk, pipelineDepth)
	for range pipelineDepth {
		free <- &chunk{buf: alignedBuffer(chunkSize)}
	}
	release := func(c *chunk) {
		if c.refs.Add(-1) == 0 {
			free <- c // never blocks: free has room for every chunk there is
		}
	}
	// Both queues have room for every chunk there is: handing one over never blocks.
	toHash := make(chan *chunk, pipelineDepth)
	toWrite := make(chan *chunk, pipelineDepth)

	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		for c := range toHash {
			h.Write(c.buf[:c.n])
			release(c)
		}
	}()

	var (
		failOnce    sync.Once
		writeErr    error // set once, before writeFailed closes
		writeFailed = make(chan struct{})
	)
	fail := func(err error) {
		failOnce.Do(func() {
			writeErr = err
			close(writeFailed)
		})
	}
	report := startProgress(progress)
	for range writers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for c := range toWrite {
				select {
				case <-writeFailed: // drain: nothing more is written once a write failed
				default:
					if err := w.writeChunk(c); err != nil {
						fail(err)
					} else {
						report.add(int64(c.n))
					}
				}
				release(c)
			}
		}()
	}

	er := &eofReader{r: src}
	var off int64
	var readErr error
	for readErr == nil {
		var c *chunk
		select {
		case c = <-free:
		case <-ctx.Done():
			readErr = ctx.Err()
			continue
		case <-writeFailed:
			readErr = errWriteFailed
			continue
		}
		if err := ctx.Err(); err != nil {
			free <- c
			readErr = err
			continue
		}
		n, err := io.ReadFull(er, c.buf)
		switch {
		case n == 0:
			free <- c
		case off+int64(n) > w.limit:
			free <- c
			readErr = fmt.Errorf("%w: more than %d bytes", ErrImageTooLarge, w.limit)
			continue
		default:
			c.n, c.off = n, off
			c.refs.Store(2)
			toHash <- c
			toWrite <- c
			off += int64(n)
		}
		switch {
		case err != nil && er.eof:
			// The stream ended cleanly (io.ReadFull turns a short final read into
			// ErrUnexpectedEOF).
			readErr = io.EOF
		case err != nil:
			readErr = err
		}
	}
	close(toHash)
	close(toWrite)
	wg.Wait()
	report.stop()
	switch {
	case readErr != io.EOF && readErr != errWriteFailed: //nolint:errorlint // the loop's own sentinels, never wrapped
		return copyResult{Written: off}, readErr
	case writeErr != nil:
		return copyResult{Written: off}, fmt.Errorf("writing: %w", writeErr)
	}
	return copyResult{Written: off, Sum: h.Sum(nil)}, nil
}

// progressReporter calls a progress function with the bytes written so far, on a goroutine
// of its own: the agent reports progress to its API over the network, and a slow report must
// not hold up the writes. Counts that arrive while the function runs are merged into its
// next call; the last count is always reported, and no count twice.
type progressReporter struct {
	fn      func(written int64)
	written atomic.Int64
	kick    chan struct{}
	done    chan struct{}
}

// startProgress starts the reporter; fn may be nil (nothing is reported).
func startProgress(fn func(written int64)) *progressReporter {
	p := &progressReporter{fn: fn, kick: make(chan struct{}, 1), done: make(chan struct{})}
	go func() {
		defer close(p.done)
		var last int64
		for range p.kick {
			if n := p.written.Load(); n != last && p.fn != nil {
				last = n
				p.fn(n)
			}
		}
	}()
	return p
}

// add counts n more bytes written.
func (p *progressReporter) add(n int64) {
	p.written.Add(n)
	select {
	case p.kick <- struct{}{}:
	default: // a report is pending already; it will see this count
	}
}

// stop waits for the last report; add must not be called afterwards.
func (p *progressReporter) stop() {
	close(p.kick)
	<-p.done
}

// errWriteFailed ends the reading when a write failed; the write's error is what is
// reported.
var errWriteFailed = errors.New("a write failed")

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
