package loadgen

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

// BootOptions configure what a simulated machine does once it has its lease.
type BootOptions struct {
	// Timeout is how long a request may make no progress (connecting, waiting for the
	// headers, or between body reads) before it fails; default 2 minutes. As with boot
	// firmware, a download that keeps moving, however slowly, has no time limit.
	Timeout time.Duration
	// Attempts per file before the machine gives up (default 5); RetryDelay between them
	// (default 1 s).
	Attempts   int
	RetryDelay time.Duration
	// Initrd also fetches the initramfs the script names.
	Initrd bool
}

// Booter fetches iPXE scripts and the files they name, as iPXE would, counting retries. It
// is safe for concurrent use: each Boot call is one machine with its own connection.
type Booter struct {
	o BootOptions

	boots, failed, retries atomic.Int64
	files, bytes           atomic.Int64
	bufs                   sync.Pool

	mu       sync.Mutex
	times    []time.Duration
	errs     []string
	retryWhy []string
}

// NewBooter returns a Booter.
func NewBooter(o BootOptions) *Booter {
	if o.Timeout <= 0 {
		o.Timeout = 2 * time.Minute
	}
	if o.Attempts <= 0 {
		o.Attempts = 5
	}
	if o.RetryDelay <= 0 {
		o.RetryDelay = time.Second
	}
	b := &Booter{o: o}
	b.bufs.New = func() any { buf := make([]byte, 64<<10); return &buf }
	return b
}

// BootResult sums up the boots so far.
type BootResult struct {
	// Boots finished (script and kernel, and initrd if asked, all complete); Failed ones
	// gave up; Retries counts HTTP requests made again after a failure.
	Boots, Failed, Retries int
	// Files and Bytes downloaded in full.
	Files int
	Bytes int64
	// Times of the finished boots, from the lease to the last byte.
	P50, P99, Max time.Duration
	// Errors holds the first few failures' messages, RetryReasons the first few errors
	// that caused a retry.
	Errors, RetryReasons []string
}

// Result returns the totals.
func (b *Booter) Result() BootResult {
	b.mu.Lock()
	defer b.mu.Unlock()
	r := BootResult{Boots: int(b.boots.Load()), Failed: int(b.failed.Load()), Retries: int(b.retries.Load()),
		Files: int(b.files.Load()), Bytes: b.bytes.Load(), Errors: slices.Clone(b.errs), RetryReasons: slices.Clone(b.retryWhy)}
	if len(b.times) > 0 {
		t := slices.Clone(b.times)
		slices.Sort(t)
		r.P50, r.P99, r.Max = t[len(t)/2], t[len(t)*99/100], t[len(t)-1]
	}
	return r
}

// Boot is one machine: GET the script at scriptURL, then the kernel (and initrd) it names.
func (b *Booter) Boot(ctx context.Context, scriptURL string) error {
	start := time.Now()
	// One connection per machine, kept for its requests, as iPXE keeps one to a server.
	tr := &http.Transport{DisableCompression: true, MaxIdleConnsPerHost: 1, ResponseHeaderTimeout: b.o.Timeout,
		DialContext: (&net.Dialer{Timeout: b.o.Timeout}).DialContext}
	defer tr.CloseIdleConnections()
	hc := &http.Client{Transport: tr}
	err := b.boot(ctx, hc, scriptURL)
	if err != nil {
		b.failed.Add(1)
		b.mu.Lock()
		if len(b.errs) < 5 {
			b.errs = append(b.errs, err.Error())
		}
		b.mu.Unlock()
		return err
	}
	b.boots.Add(1)
	d := time.Since(start)
	b.mu.Lock()
	b.times = append(b.times, d)
	b.mu.Unlock()
	return nil
}

func (b *Booter) boot(ctx context.Context, hc *http.Client, scriptURL string) error {
	var script strings.Builder
	if err := b.fetch(ctx, hc, scriptURL, &script); err != nil {
		return err
	}
	kernel, initrd := scriptFiles(script.String())
	if kernel == "" {
		return fmt.Errorf("script from %s names no kernel: %q", scriptURL, script.String())
	}
	if err := b.fetch(ctx, hc, kernel, nil); err != nil {
		return err
	}
	if b.o.Initrd {
		if initrd == "" {
			return fmt.Errorf("script from %s names no initrd", scriptURL)
		}
		return b.fetch(ctx, hc, initrd, nil)
	}
	return nil
}

// scriptFiles finds the URLs of the kernel and initrd commands of an iPXE script.
func scriptFiles(s string) (kernel, initrd string) {
	for _, l := range strings.Split(s, "\n") {
		f := strings.Fields(l)
		if len(f) == 0 || (f[0] != "kernel" && f[0] != "initrd") {
			continue
		}
		for _, a := range f[1:] {
			if strings.HasPrefix(a, "http://") || strings.HasPrefix(a, "https://") {
				if f[0] == "kernel" {
					kernel = a
				} else {
					initrd = a
				}
				break
			}
		}
	}
	return kernel, initrd
}

// fetch GETs url in full (into w, or counted and dropped), retrying as firmware would.
func (b *Booter) fetch(ctx context.Context, hc *http.Client, url string, w io.Writer) error {
	var last error
	for attempt := range b.o.Attempts {
		if attempt > 0 {
			b.retries.Add(1)
			b.mu.Lock()
			if len(b.retryWhy) < 5 {
				b.retryWhy = append(b.retryWhy, fmt.Sprintf("GET %s: %v", url, last))
			}
			b.mu.Unlock()
			select {
			case <-ctx.Done():
				return ctx.Err()
			case <-time.After(b.o.RetryDelay):
			}
		}
		n, err := b.get(ctx, hc, url, w)
		if err == nil {
			b.files.Add(1)
			b.bytes.Add(n)
			return nil
		}
		last = err
		if ctx.Err() != nil {
			return ctx.Err()
		}
	}
	return fmt.Errorf("GET %s: %w (after %d attempts)", url, last, b.o.Attempts)
}

func (b *Booter) get(ctx context.Context, hc *http.Client, url string, w io.Writer) (int64, error) {
	ctx, cancel := context.WithCancelCause(ctx)
	defer cancel(nil)
	stalled := fmt.Errorf("no progress for %v", b.o.Timeout)
	idle := time.AfterFunc(b.o.Timeout, func() { cancel(stalled) })
	defer idle.Stop()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return 0, err
	}
	resp, err := hc.Do(req)
	if err != nil {
		if c := context.Cause(ctx); c != nil {
			return 0, c
		}
		return 0, err
	}
	defer func() { _ = resp.Body.Close() }()
	if resp.StatusCode != http.StatusOK {
		return 0, fmt.Errorf("status %s", resp.Status)
	}
	if w == nil {
		w = io.Discard
	}
	buf := b.bufs.Get().(*[]byte)
	defer b.bufs.Put(buf)
	n, err := io.CopyBuffer(w, progressReader{resp.Body, func() { idle.Reset(b.o.Timeout) }}, *buf)
	if err != nil {
		if c := context.Cause(ctx); c != nil {
			return n, c
		}
		return n, err
	}
	if resp.ContentLength >= 0 && n != resp.ContentLength {
		return n, errors.New("short body")
	}
	return n, nil
}

// progressReader calls progress after every read that returned data.
type progressReader struct {
	r        io.Reader
	progress func()
}

func (p progressReader) Read(b []byte) (int, error) {
	n, err := p.r.Read(b)
	if n > 0 {
		p.progress()
	}
	return n, err
}
