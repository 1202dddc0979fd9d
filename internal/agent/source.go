package agent

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strconv"
	"strings"
	"sync/atomic"
	"time"
)

// ErrImageChanged means the server started serving different bytes while a download was
// being resumed (its ETag or Last-Modified changed).
var ErrImageChanged = errors.New("image changed on the server during the download")

// resumableBody reads an HTTP resource from start to end and, when the connection drops,
// continues where it stopped with a Range request (guarded by If-Range, so a changed
// resource is never spliced onto the old one). Retries are bounded: MaxRetries consecutive
// failures without a single new byte end the download.
type resumableBody struct {
	ctx        context.Context
	client     *http.Client
	url        string
	header     http.Header
	maxRetries int
	backoff    time.Duration
	onRetry    func(offset int64, err error)

	body      io.ReadCloser
	off       int64 // bytes delivered so far
	total     int64 // full length, -1 when unknown
	validator string
	failures  int
	// resumes counts successful reconnects (read by progress reports on other goroutines).
	resumes atomic.Int32
}

// Resumes is how many times the download reconnected.
func (r *resumableBody) Resumes() int { return int(r.resumes.Load()) }

func newResumableBody(ctx context.Context, client *http.Client, url string, header http.Header, maxRetries int, backoff time.Duration) *resumableBody {
	return &resumableBody{ctx: ctx, client: client, url: url, header: header, maxRetries: maxRetries, backoff: backoff, total: -1}
}

// DownloadError is a failure to fetch the image (as opposed to decoding or writing it).
type DownloadError struct{ Err error }

func (e *DownloadError) Error() string { return e.Err.Error() }
func (e *DownloadError) Unwrap() error { return e.Err }

// permanentError is an HTTP failure that retrying cannot fix.
type permanentError struct{ error }

func (e permanentError) Unwrap() error { return e.error }

// open issues the request for the bytes from r.off on.
func (r *resumableBody) open() error {
	req, err := http.NewRequestWithContext(r.ctx, http.MethodGet, r.url, nil)
	if err != nil {
		return permanentError{err}
	}
	for k, v := range r.header {
		req.Header[k] = v
	}
	// Compressed transfer encodings would make offsets meaningless.
	req.Header.Set("Accept-Encoding", "identity")
	if r.off > 0 {
		req.Header.Set("Range", fmt.Sprintf("bytes=%d-", r.off))
		if r.validator != "" {
			req.Header.Set("If-Range", r.validator)
		}
	}
	resp, err := r.client.Do(req)
	if err != nil {
		return err
	}
	fail := func(err error) error {
		_ = resp.Body.Close()
		return err
	}
	switch {
	case r.off == 0 && resp.StatusCode == http.StatusOK:
		r.total = resp.ContentLength
		if et := resp.Header.Get("ETag"); et != "" && !strings.HasPrefix(et, "W/") {
			r.validator = et // If-Range needs a strong validator
		} else if lm := resp.Header.Get("Last-Modified"); lm != "" {
			r.validator = lm
		}
	case r.off > 0 && resp.StatusCode == http.StatusPartialContent:
		start, total, err := parseContentRange(resp.Header.Get("Content-Range"))
		if err != nil || start != r.off || (r.total >= 0 && total >= 0 && total != r.total) {
			return fail(permanentError{fmt.Errorf("resuming at %d: unexpected Content-Range %q", r.off, resp.Header.Get("Content-Range"))})
		}
	case r.off > 0 && resp.StatusCode == http.StatusOK:
		if r.validator != "" {
			// If-Range did not match: the resource changed.
			return fail(permanentError{ErrImageChanged})
		}
		// The server ignores Range: skip what we already have.
		if _, err := io.CopyN(io.Discard, resp.Body, r.off); err != nil {
			return fail(err)
		}
	default:
		err := fmt.Errorf("GET %s: %s", redactURL(r.url), resp.Status)
		if resp.StatusCode >= 500 || resp.StatusCode == http.StatusRequestTimeout || resp.StatusCode == http.StatusTooManyRequests {
			return fail(err)
		}
		return fail(permanentError{err})
	}
	r.body = resp.Body
	return nil
}

func parseContentRange(s string) (start, total int64, err error) {
	// bytes START-END/TOTAL (TOTAL may be *)
	rest, ok := strings.CutPrefix(s, "bytes ")
	if !ok {
		return 0, 0, fmt.Errorf("bad Content-Range %q", s)
	}
	rng, tot, ok := strings.Cut(rest, "/")
	if !ok {
		return 0, 0, fmt.Errorf("bad Content-Range %q", s)
	}
	a, _, ok := strings.Cut(rng, "-")
	if !ok {
		return 0, 0, fmt.Errorf("bad Content-Range %q", s)
	}
	if start, err = strconv.ParseInt(a, 10, 64); err != nil {
		return 0, 0, err
	}
	total = -1
	if tot != "*" {
		if total, err = strconv.ParseInt(tot, 10, 64); err != nil {
			return 0, 0, err
		}
	}
	return start, total, nil
}

// Read implements io.Reader.
func (r *resumableBody) Read(p []byte) (int, error) {
	for {
		if err := r.ctx.Err(); err != nil {
			return 0, &DownloadError{err}
		}
		if r.body == nil {
			if err := r.open(); err != nil {
				if errors.As(err, new(permanentError)) || r.ctx.Err() != nil {
					return 0, &DownloadError{err}
				}
				if werr := r.retry(err); werr != nil {
					return 0, werr
				}
				continue
			}
			if r.off > 0 {
				r.resumes.Add(1)
			}
		}
		n, err := r.body.Read(p)
		r.off += int64(n)
		if n > 0 {
			r.failures = 0
		}
		switch {
		case err == nil:
			return n, nil
		case errors.Is(err, io.EOF) && (r.total < 0 || r.off >= r.total):
			return n, io.EOF
		case errors.Is(err, io.EOF):
			err = fmt.Errorf("connection closed after %d of %d bytes: %w", r.off, r.total, io.ErrUnexpectedEOF)
		}
		_ = r.body.Close()
		r.body = nil
		if r.ctx.Err() != nil {
			return n, &DownloadError{r.ctx.Err()}
		}
		if n > 0 {
			return n, nil // deliver what arrived; the next Read reconnects
		}
		if werr := r.retry(err); werr != nil {
			return 0, werr
		}
	}
}

func (r *resumableBody) retry(err error) error {
	r.failures++
	if r.failures > r.maxRetries {
		return &DownloadError{fmt.Errorf("download of %s failed at byte %d after %d attempts: %w", redactURL(r.url), r.off, r.failures, err)}
	}
	if r.onRetry != nil {
		r.onRetry(r.off, err)
	}
	d := r.backoff << min(r.failures-1, 6)
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-r.ctx.Done():
		return &DownloadError{r.ctx.Err()}
	case <-t.C:
		return nil
	}
}

// Close releases the connection.
func (r *resumableBody) Close() error {
	if r.body != nil {
		err := r.body.Close()
		r.body = nil
		return err
	}
	return nil
}

// redactURL drops credentials and query strings (which may carry tokens) from messages.
func redactURL(u string) string {
	if i := strings.IndexAny(u, "?#"); i >= 0 {
		u = u[:i]
	}
	if s, rest, ok := strings.Cut(u, "://"); ok {
		if at := strings.IndexByte(rest, '@'); at >= 0 && at < strings.IndexByte(rest+"/", '/') {
			rest = rest[at+1:]
		}
		return s + "://" + rest
	}
	return u
}

// readAhead is the download stage of an install: a goroutine reads the image from src into
// a few buffers, so socket reads and reconnects overlap with decompression instead of
// taking turns with it on the decoder's goroutine. Read returns the data in order, then
// src's final error. close stops the goroutine (it cancels the download's context, which
// also ends a read blocked on the network) and waits for it.
type readAhead struct {
	ctx    context.Context
	cancel context.CancelFunc
	filled chan readAheadBuf
	free   chan []byte
	done   chan struct{}

	cur  readAheadBuf // the buffer being consumed
	rest []byte       // its unread part
	err  error        // src's final error, once reached
}

type readAheadBuf struct {
	b   []byte
	err error
}

// Sizes of the download stage: what arrived ahead of the decoder, at most
// readAheadBuffers reads of up to readAheadSize bytes, on top of the kernel's socket buffer.
const (
	readAheadBuffers = 4
	readAheadSize    = 256 << 10
)

// startReadAhead starts reading src. cancel must cancel the context src's reads run under.
func startReadAhead(ctx context.Context, cancel context.CancelFunc, src io.Reader) *readAhead {
	ra := &readAhead{ctx: ctx, cancel: cancel, filled: make(chan readAheadBuf, readAheadBuffers),
		free: make(chan []byte, readAheadBuffers), done: make(chan struct{})}
	for range readAheadBuffers {
		ra.free <- make([]byte, readAheadSize)
	}
	go ra.run(src)
	return ra
}

func (ra *readAhead) run(src io.Reader) {
	defer close(ra.done)
	for {
		var b []byte
		select {
		case b = <-ra.free:
		case <-ra.ctx.Done():
			return
		}
		// Hand over what each read returned, with src's error as it is. Waiting to fill
		// the buffer would hold back data that has arrived while the network stalls; when
		// the data flows faster than the decoder takes it, the socket has plenty queued
		// and each read returns a large piece anyway.
		n, err := src.Read(b)
		if n == 0 && err == nil {
			ra.free <- b // never blocks: this buffer came from free
			continue
		}
		select {
		case ra.filled <- readAheadBuf{b: b[:n], err: err}:
		case <-ra.ctx.Done():
			return
		}
		if err != nil {
			return
		}
	}
}

// Read implements io.Reader.
func (ra *readAhead) Read(p []byte) (int, error) {
	for len(ra.rest) == 0 {
		if ra.err != nil {
			return 0, ra.err
		}
		if ra.cur.b != nil {
			ra.free <- ra.cur.b[:cap(ra.cur.b)] // never blocks: free has room for every buffer there is
			ra.cur = readAheadBuf{}
		}
		select {
		case ra.cur = <-ra.filled:
		case <-ra.ctx.Done():
			// Cancelled, or stopped by close (the install is over).
			return 0, &DownloadError{ra.ctx.Err()}
		}
		ra.rest, ra.err = ra.cur.b, ra.cur.err
	}
	n := copy(p, ra.rest)
	ra.rest = ra.rest[n:]
	return n, nil
}

func (ra *readAhead) close() {
	ra.cancel()
	<-ra.done
}
