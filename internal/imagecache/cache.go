// Package imagecache is the boot services' pull-through cache for OS images and other large
// artifacts. Agents download from it instead of the upstream server, so a rack of hosts
// installing the same image costs one upstream download.
//
// An entry is keyed by (URL, checksum, format). On the first request the cache fetches the URL
// (http/https only; loopback, link-local and other local addresses refused at dial time unless
// AllowLocal), hashes the bytes while writing them to a temporary file, and publishes the file
// (atomic rename) only when the digest matches: nothing unverified is ever served. As in the
// AnvilHost API, the checksum is that of the decompressed image: for gzip, zstd and xz the
// bytes are decompressed on the fly, in the same pass, into the hash (the file keeps the
// compressed bytes the agent will stream). Concurrent
// requests for the same key share one download; each waiter can give up on its own. Files are
// served with http.ServeContent, so Range and conditional requests work and the bytes go out
// with sendfile(2). When the total size exceeds MaxBytes the least recently used files without
// active readers are removed. Entries survive a restart (a small JSON sidecar per file).
package imagecache

import (
	"container/list"
	"context"
	"crypto/sha256"
	"crypto/sha512"
	"crypto/tls"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"hash"
	"io"
	"net"
	"net/http"
	"os"
	"path"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/go-logr/logr"

	infrav1 "github.com/anvil-metal/cluster-api-provider-anvil/api/v1alpha1"
)

// ErrClosed is returned after Close.
var ErrClosed = errors.New("image cache is closed")

// ChecksumMismatchError says the upstream bytes did not match the expected checksum.
type ChecksumMismatchError struct {
	URL      string // redacted
	Expected string
	Got      string
}

func (e *ChecksumMismatchError) Error() string {
	return fmt.Sprintf("image %s: checksum mismatch: expected %s, got %s; nothing was cached",
		e.URL, prefix(e.Expected), prefix(e.Got))
}

func prefix(s string) string {
	if len(s) > 23 {
		return s[:23] + "…"
	}
	return s
}

// Source is an image to cache: where to fetch it and what its bytes must hash to.
type Source struct {
	URL string
	// Checksum is <algorithm>:<hex digest>, sha256 or sha512, of the decompressed image.
	Checksum string
	// Format is how the bytes at URL are encoded: raw (default), gzip, zstd or xz.
	Format infrav1.ImageFormat
}

// Options configure a Cache.
type Options struct {
	// Dir holds the cache (created if missing; subdirectories blobs/ and tmp/).
	Dir string
	// MaxBytes bounds the total size of cached files, and so the largest cacheable file.
	MaxBytes int64
	// AllowLocal allows loopback, link-local and unspecified upstream addresses. For
	// development and tests only.
	AllowLocal bool
	// TLSConfig for upstream https (e.g. a private CA); nil means the system roots.
	TLSConfig *tls.Config
	// FetchTimeout bounds one download; default 2h.
	FetchTimeout time.Duration
	// FailureBackoff is how long a failed download is remembered (and answered from memory)
	// before the next request tries upstream again; default 30s. It keeps fifty agents from
	// each pulling a corrupt multi-gigabyte image.
	FailureBackoff time.Duration
	// PathPrefix is where ServeHTTP is mounted; default "/images/".
	PathPrefix string
	Log        logr.Logger
}

// Stats are counters for metrics.
type Stats struct {
	Hits               uint64 // requests answered from a cached file
	Misses             uint64 // requests that started a download
	Coalesced          uint64 // requests that joined a download already running
	Downloads          uint64 // downloads that completed and were published
	Failures           uint64 // downloads that failed (including checksum mismatches)
	ChecksumMismatches uint64
	Evictions          uint64
	BytesFetched       uint64 // bytes read from upstream
	BytesServed        uint64 // bytes written to clients by ServeHTTP
	Entries            int
	SizeBytes          int64
	ActiveReaders      int
}

type entry struct {
	key     string
	src     Source
	path    string
	size    int64
	modTime time.Time
	readers int
	elem    *list.Element
}

type flight struct {
	done chan struct{}
	err  error
}

type failure struct {
	err   error
	until time.Time
}

// Cache is a pull-through image cache. Safe for concurrent use.
type Cache struct {
	opts   Options
	client *http.Client
	blobs  string
	tmp    string
	ctx    context.Context
	cancel context.CancelFunc
	wg     sync.WaitGroup

	mu       sync.Mutex
	closed   bool
	entries  map[string]*entry
	lru      *list.List // front: most recently used
	size     int64
	flights  map[string]*flight
	sources  map[string]Source
	failures map[string]failure

	hits, misses, coalesced, downloads, failuresN, mismatches, evictions atomic.Uint64
	bytesFetched, bytesServed                                            atomic.Uint64
}

// New opens (or creates) a cache in o.Dir, picking up files a previous process published.
func New(o Options) (*Cache, error) {
	if o.Dir == "" || o.MaxBytes <= 0 {
		return nil, errors.New("imagecache: Dir and MaxBytes are required")
	}
	if o.FetchTimeout <= 0 {
		o.FetchTimeout = 2 * time.Hour
	}
	if o.FailureBackoff <= 0 {
		o.FailureBackoff = 30 * time.Second
	}
	if o.PathPrefix == "" {
		o.PathPrefix = "/images/"
	}
	if !strings.HasSuffix(o.PathPrefix, "/") {
		o.PathPrefix += "/"
	}
	if o.Log.GetSink() == nil {
		o.Log = logr.Discard()
	}
	c := &Cache{
		opts:     o,
		blobs:    filepath.Join(o.Dir, "blobs"),
		tmp:      filepath.Join(o.Dir, "tmp"),
		entries:  map[string]*entry{},
		lru:      list.New(),
		flights:  map[string]*flight{},
		sources:  map[string]Source{},
		failures: map[string]failure{},
	}
	// Half-written downloads of a previous process are garbage.
	if err := os.RemoveAll(c.tmp); err != nil {
		return nil, fmt.Errorf("imagecache: cleaning %s: %w", c.tmp, err)
	}
	for _, d := range []string{c.blobs, c.tmp} {
		if err := os.MkdirAll(d, 0o700); err != nil {
			return nil, fmt.Errorf("imagecache: %w", err)
		}
	}
	if err := c.load(); err != nil {
		return nil, err
	}
	c.ctx, c.cancel = context.WithCancel(context.Background())

	dialer := &net.Dialer{Timeout: 30 * time.Second, KeepAlive: 30 * time.Second, Control: dialControl(o.AllowLocal)}
	c.client = &http.Client{
		Transport: &http.Transport{
			// No proxy: the address policy must apply to the server the bytes come from.
			Proxy:                 nil,
			DialContext:           dialer.DialContext,
			TLSClientConfig:       o.TLSConfig,
			ForceAttemptHTTP2:     true,
			TLSHandshakeTimeout:   30 * time.Second,
			ResponseHeaderTimeout: 2 * time.Minute,
			IdleConnTimeout:       90 * time.Second,
			MaxIdleConnsPerHost:   4,
		},
		CheckRedirect: func(req *http.Request, via []*http.Request) error {
			if len(via) >= 5 {
				return fmt.Errorf("%w: too many redirects", ErrRefused)
			}
			_, err := ValidateURL(req.URL.String(), o.AllowLocal)
			return err
		},
	}
	c.mu.Lock()
	c.evictLocked()
	c.mu.Unlock()
	return c, nil
}

// Close stops running downloads and waits for them. Readers already open keep working.
func (c *Cache) Close() error {
	c.mu.Lock()
	c.closed = true
	c.mu.Unlock()
	c.cancel()
	c.wg.Wait()
	return nil
}

// key derives the cache key: a hash of URL and checksum, so it is fixed-length, safe as a
// file name and URL segment, and cannot be guessed without knowing both.
func key(src Source) string {
	h := sha256.New()
	h.Write([]byte("anvil-imagecache-v1\x00"))
	h.Write([]byte(src.URL))
	h.Write([]byte{0})
	h.Write([]byte(src.Checksum))
	h.Write([]byte{0})
	h.Write([]byte(src.Format))
	return hex.EncodeToString(h.Sum(nil))
}

func validKey(k string) bool {
	return len(k) == 64 && strings.Trim(k, "0123456789abcdef") == ""
}

// Register validates src and makes it servable by ServeHTTP; it returns the path (under
// PathPrefix) to hand to agents. Nothing is fetched yet.
func (c *Cache) Register(src Source) (string, error) {
	u, err := ValidateURL(src.URL, c.opts.AllowLocal)
	if err != nil {
		return "", err
	}
	algo, digest, err := parseChecksum(src.Checksum)
	if err != nil {
		return "", fmt.Errorf("image %s: %w", redact(u), err)
	}
	src.Checksum = algo + ":" + digest
	if src.Format, err = normalFormat(src.Format); err != nil {
		return "", fmt.Errorf("image %s: %w", redact(u), err)
	}
	k := key(src)
	c.mu.Lock()
	c.sources[k] = src
	c.mu.Unlock()
	name := path.Base(u.Path)
	if name == "/" || name == "." || !safeName(name) {
		name = "image"
	}
	return c.opts.PathPrefix + k + "/" + name, nil
}

// URL is Register returning an absolute URL below base (e.g. "http://10.0.0.1:8080").
func (c *Cache) URL(base string, src Source) (string, error) {
	p, err := c.Register(src)
	if err != nil {
		return "", err
	}
	return strings.TrimSuffix(base, "/") + p, nil
}

func safeName(s string) bool {
	if len(s) > 128 {
		return false
	}
	for _, r := range s {
		if !nameChar(r) {
			return false
		}
	}
	return true
}

func nameChar(r rune) bool {
	return r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || r == '.' || r == '-' || r == '_'
}

// Prefetch registers src and starts downloading it in the background if it is not cached,
// e.g. as soon as a host starts provisioning, while its server is still rebooting.
func (c *Cache) Prefetch(src Source) error {
	if _, err := c.Register(src); err != nil {
		return err
	}
	src = c.normal(src)
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closed {
		return ErrClosed
	}
	k := key(src)
	if c.entries[k] != nil || c.flights[k] != nil {
		return nil
	}
	if f, ok := c.failures[k]; ok && time.Now().Before(f.until) {
		return f.err
	}
	c.misses.Add(1)
	c.startLocked(k, src)
	return nil
}

// normal lowercases the checksum's digest and defaults the format the way Register stored them.
func (c *Cache) normal(src Source) Source {
	if algo, digest, err := parseChecksum(src.Checksum); err == nil {
		src.Checksum = algo + ":" + digest
	}
	if f, err := normalFormat(src.Format); err == nil {
		src.Format = f
	}
	return src
}

func normalFormat(f infrav1.ImageFormat) (infrav1.ImageFormat, error) {
	switch f {
	case "", infrav1.ImageFormatRaw:
		return infrav1.ImageFormatRaw, nil
	case infrav1.ImageFormatGzip, infrav1.ImageFormatZstd, infrav1.ImageFormatXz:
		return f, nil
	}
	return "", fmt.Errorf("image format %q is not raw, gzip, zstd or xz", f)
}

// Blob is an open cached file. Close it: an open Blob keeps its file from being evicted.
type Blob struct {
	*os.File
	Size     int64
	ModTime  time.Time
	Checksum string
	release  func()
	once     sync.Once
}

// Close closes the file and releases it for eviction.
func (b *Blob) Close() error {
	err := b.File.Close()
	b.once.Do(b.release)
	return err
}

// Open returns the verified file for src, downloading it first if needed. ctx bounds only
// this caller's wait: the download itself goes on for the other waiters and the cache.
func (c *Cache) Open(ctx context.Context, src Source) (*Blob, error) {
	if _, err := c.Register(src); err != nil {
		return nil, err
	}
	src = c.normal(src)
	return c.open(ctx, key(src), src)
}

func (c *Cache) open(ctx context.Context, k string, src Source) (*Blob, error) {
	e, err := c.acquire(ctx, k, src)
	if err != nil {
		return nil, err
	}
	f, err := os.Open(e.path)
	if err != nil {
		c.release(e)
		return nil, fmt.Errorf("imagecache: opening cached file: %w", err)
	}
	return &Blob{File: f, Size: e.size, ModTime: e.modTime, Checksum: e.src.Checksum, release: func() { c.release(e) }}, nil
}

// acquire returns the entry for k with a reader reference held, waiting for (or starting) its
// download.
func (c *Cache) acquire(ctx context.Context, k string, src Source) (*entry, error) {
	for {
		c.mu.Lock()
		if c.closed {
			c.mu.Unlock()
			return nil, ErrClosed
		}
		if e := c.entries[k]; e != nil {
			e.readers++
			c.lru.MoveToFront(e.elem)
			c.mu.Unlock()
			c.hits.Add(1)
			return e, nil
		}
		if f, ok := c.failures[k]; ok {
			if time.Now().Before(f.until) {
				c.mu.Unlock()
				return nil, f.err
			}
			delete(c.failures, k)
		}
		fl := c.flights[k]
		if fl == nil {
			c.misses.Add(1)
			fl = c.startLocked(k, src)
		} else {
			c.coalesced.Add(1)
		}
		c.mu.Unlock()

		select {
		case <-ctx.Done():
			return nil, ctx.Err()
		case <-fl.done:
		}
		if fl.err != nil {
			return nil, fl.err
		}
		// Published: loop to take a reference (the entry is at the LRU front, which eviction
		// never removes, so this does not spin).
	}
}

func (c *Cache) release(e *entry) {
	c.mu.Lock()
	defer c.mu.Unlock()
	e.readers--
	if e.readers == 0 && c.size > c.opts.MaxBytes {
		c.evictLocked()
	}
}

func (c *Cache) startLocked(k string, src Source) *flight {
	fl := &flight{done: make(chan struct{})}
	c.flights[k] = fl
	c.wg.Add(1)
	go c.download(k, src, fl)
	return fl
}

func (c *Cache) download(k string, src Source, fl *flight) {
	defer c.wg.Done()
	start := time.Now()
	e, err := c.fetch(k, src)

	c.mu.Lock()
	delete(c.flights, k)
	if err != nil {
		c.failuresN.Add(1)
		var mm *ChecksumMismatchError
		if errors.As(err, &mm) {
			c.mismatches.Add(1)
		}
		if !errors.Is(err, context.Canceled) {
			c.failures[k] = failure{err: err, until: time.Now().Add(c.opts.FailureBackoff)}
		}
		fl.err = err
	} else {
		c.addLocked(e)
		c.downloads.Add(1)
		c.evictLocked()
	}
	c.mu.Unlock()
	close(fl.done)

	if err != nil {
		c.opts.Log.Error(err, "image download failed", "key", k)
	} else {
		c.opts.Log.Info("image cached", "key", k, "bytes", e.size, "duration", time.Since(start).Round(time.Millisecond))
	}
}

type meta struct {
	URL       string              `json:"url"`
	Checksum  string              `json:"checksum"`
	Format    infrav1.ImageFormat `json:"format"`
	Size      int64               `json:"size"`
	FetchedAt time.Time           `json:"fetchedAt"`
}

// fetch downloads src into a temporary file, verifies it and publishes it as blobs/<k>.
func (c *Cache) fetch(k string, src Source) (*entry, error) {
	u, err := ValidateURL(src.URL, c.opts.AllowLocal)
	if err != nil {
		return nil, err
	}
	shown := redact(u)
	algo, want, err := parseChecksum(src.Checksum)
	if err != nil {
		return nil, err
	}
	var h hash.Hash
	if algo == algoSHA512 {
		h = sha512.New()
	} else {
		h = sha256.New()
	}

	ctx, cancel := context.WithTimeout(c.ctx, c.opts.FetchTimeout)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, u.String(), nil)
	if err != nil {
		return nil, fmt.Errorf("image %s: %w", shown, err)
	}
	req.Header.Set("User-Agent", "anvil-imagecache/1")
	resp, err := c.client.Do(req)
	if err != nil {
		// *url.Error would repeat the full URL (query included); keep only the cause.
		var ue interface{ Unwrap() error }
		if errors.As(err, &ue) && ue.Unwrap() != nil {
			err = ue.Unwrap()
		}
		return nil, fmt.Errorf("image %s: fetching: %w", shown, err)
	}
	defer func() { _ = resp.Body.Close() }()
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("image %s: upstream answered %s", shown, resp.Status)
	}
	if resp.ContentLength > c.opts.MaxBytes {
		return nil, fmt.Errorf("image %s: %d bytes exceed the cache size of %d bytes", shown, resp.ContentLength, c.opts.MaxBytes)
	}

	tmp, err := os.CreateTemp(c.tmp, k+"-*")
	if err != nil {
		return nil, fmt.Errorf("imagecache: %w", err)
	}
	published := false
	defer func() {
		if !published {
			_ = tmp.Close()
			_ = os.Remove(tmp.Name()) //nolint:gosec // G703: our own temp file in our own directory
		}
	}()
	var sink io.Writer = h
	var verified func() error
	if src.Format != infrav1.ImageFormatRaw {
		pw, wait := decompressInto(ctx, src.Format, h)
		sink, verified = pw, func() error { _ = pw.Close(); return wait() }
		defer func() { _ = pw.CloseWithError(io.ErrClosedPipe); _ = wait() }()
	}
	buf := make([]byte, 1<<20)
	n, err := io.CopyBuffer(io.MultiWriter(tmp, sink), io.LimitReader(resp.Body, c.opts.MaxBytes+1), buf)
	c.bytesFetched.Add(uint64(n)) //nolint:gosec // n >= 0
	if err != nil {
		if verified != nil {
			// A closed pipe means the decoder gave up first: its error is the cause.
			if verr := verified(); verr != nil && (errors.Is(err, verr) || errors.Is(err, io.ErrClosedPipe)) {
				return nil, fmt.Errorf("image %s: not valid %s data: %w", shown, src.Format, verr)
			}
		}
		return nil, fmt.Errorf("image %s: reading after %d bytes: %w", shown, n, err)
	}
	if verified != nil {
		if err := verified(); err != nil {
			return nil, fmt.Errorf("image %s: not valid %s data: %w", shown, src.Format, err)
		}
	}
	if n > c.opts.MaxBytes {
		return nil, fmt.Errorf("image %s: more than the cache size of %d bytes", shown, c.opts.MaxBytes)
	}
	if resp.ContentLength >= 0 && n != resp.ContentLength {
		return nil, fmt.Errorf("image %s: got %d of %d bytes", shown, n, resp.ContentLength)
	}
	got := hex.EncodeToString(h.Sum(nil))
	if got != want {
		return nil, &ChecksumMismatchError{URL: shown, Expected: algo + ":" + want, Got: algo + ":" + got}
	}
	if err := tmp.Sync(); err != nil {
		return nil, fmt.Errorf("imagecache: %w", err)
	}
	if err := tmp.Close(); err != nil {
		return nil, fmt.Errorf("imagecache: %w", err)
	}

	now := time.Now()
	if err := c.writeMeta(k, meta{URL: src.URL, Checksum: src.Checksum, Format: src.Format, Size: n, FetchedAt: now}); err != nil {
		return nil, err
	}
	final := filepath.Join(c.blobs, k)
	// final and the temp file are built from the hex key and our own directories.
	if err := os.Rename(tmp.Name(), final); err != nil { //nolint:gosec // G703: see above
		_ = os.Remove(filepath.Join(c.blobs, k+".json")) //nolint:gosec // G703: see above
		return nil, fmt.Errorf("imagecache: publishing: %w", err)
	}
	published = true
	return &entry{key: k, src: src, path: final, size: n, modTime: now}, nil
}

func (c *Cache) writeMeta(k string, m meta) error {
	b, err := json.Marshal(m)
	if err != nil {
		return fmt.Errorf("imagecache: %w", err)
	}
	// One download per key at a time, so a fixed temporary name cannot collide. k is 64 hex
	// digits (a SHA-256), so these paths stay inside our directories.
	tmp := filepath.Join(c.tmp, k+".json")
	if err := os.WriteFile(tmp, b, 0o600); err != nil { //nolint:gosec // G703: k is hex, see above
		return fmt.Errorf("imagecache: %w", err)
	}
	if err := os.Rename(tmp, filepath.Join(c.blobs, k+".json")); err != nil { //nolint:gosec // G703: k is hex
		_ = os.Remove(tmp) //nolint:gosec // G703: k is hex
		return fmt.Errorf("imagecache: %w", err)
	}
	return nil
}

func (c *Cache) addLocked(e *entry) {
	if old := c.entries[e.key]; old != nil {
		// Cannot happen (one flight per key), but never lose track of a file's size.
		c.removeLocked(old)
	}
	e.elem = c.lru.PushFront(e)
	c.entries[e.key] = e
	c.sources[e.key] = e.src
	c.size += e.size
}

func (c *Cache) removeLocked(e *entry) {
	c.lru.Remove(e.elem)
	delete(c.entries, e.key)
	c.size -= e.size
	_ = os.Remove(e.path)
	_ = os.Remove(e.path + ".json")
}

// evictLocked removes least recently used files without readers until the cache fits. The
// most recently used entry is never removed: it is the one a request is about to read.
func (c *Cache) evictLocked() {
	el := c.lru.Back()
	for c.size > c.opts.MaxBytes && el != nil && el != c.lru.Front() {
		prev := el.Prev()
		if e := el.Value.(*entry); e.readers == 0 {
			c.removeLocked(e)
			c.evictions.Add(1)
			c.opts.Log.V(1).Info("image evicted", "key", e.key, "bytes", e.size)
		}
		el = prev
	}
}

// load indexes the files a previous process published; anything incomplete is removed.
func (c *Cache) load() error {
	des, err := os.ReadDir(c.blobs)
	if err != nil {
		return fmt.Errorf("imagecache: %w", err)
	}
	var found []*entry
	seen := map[string]bool{}
	for _, de := range des {
		name := de.Name()
		k := strings.TrimSuffix(name, ".json")
		if !validKey(k) {
			_ = os.RemoveAll(filepath.Join(c.blobs, name))
			continue
		}
		if seen[k] {
			continue
		}
		seen[k] = true
		e, ok := c.loadOne(k)
		if !ok {
			_ = os.Remove(filepath.Join(c.blobs, k))
			_ = os.Remove(filepath.Join(c.blobs, k+".json"))
			continue
		}
		found = append(found, e)
	}
	sort.Slice(found, func(i, j int) bool { return found[i].modTime.Before(found[j].modTime) })
	for _, e := range found {
		c.addLocked(e)
	}
	return nil
}

func (c *Cache) loadOne(k string) (*entry, bool) {
	b, err := os.ReadFile(filepath.Join(c.blobs, k+".json"))
	if err != nil {
		return nil, false
	}
	var m meta
	if json.Unmarshal(b, &m) != nil || key(Source{URL: m.URL, Checksum: m.Checksum, Format: m.Format}) != k {
		return nil, false
	}
	p := filepath.Join(c.blobs, k)
	fi, err := os.Stat(p)
	if err != nil || !fi.Mode().IsRegular() || fi.Size() != m.Size {
		return nil, false
	}
	return &entry{key: k, src: Source{URL: m.URL, Checksum: m.Checksum, Format: m.Format}, path: p, size: m.Size, modTime: fi.ModTime()}, true
}

// Stats returns a snapshot of the counters.
func (c *Cache) Stats() Stats {
	s := Stats{
		Hits: c.hits.Load(), Misses: c.misses.Load(), Coalesced: c.coalesced.Load(), Downloads: c.downloads.Load(),
		Failures: c.failuresN.Load(), ChecksumMismatches: c.mismatches.Load(), Evictions: c.evictions.Load(),
		BytesFetched: c.bytesFetched.Load(), BytesServed: c.bytesServed.Load(),
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	s.Entries = len(c.entries)
	s.SizeBytes = c.size
	for _, e := range c.entries {
		s.ActiveReaders += e.readers
	}
	return s
}

// ServeHTTP serves GET and HEAD for PathPrefix<key>[/<name>], fetching on a miss.
func (c *Cache) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if r.Method != http.MethodGet && r.Method != http.MethodHead {
		w.Header().Set("Allow", "GET, HEAD")
		http.Error(w, "method not allowed", http.StatusMethodNotAllowed)
		return
	}
	rest, ok := strings.CutPrefix(r.URL.Path, c.opts.PathPrefix)
	k, _, _ := strings.Cut(rest, "/")
	if !ok || !validKey(k) {
		http.NotFound(w, r)
		return
	}
	c.mu.Lock()
	src, known := c.sources[k]
	c.mu.Unlock()
	if !known {
		http.NotFound(w, r)
		return
	}
	b, err := c.open(r.Context(), k, src)
	if err != nil {
		switch {
		case r.Context().Err() != nil:
			// The client went away (or the server is stopping) while waiting; answer anyway
			// so that no one ever reads an empty 200 as an image.
			http.Error(w, "request cancelled", http.StatusServiceUnavailable)
		case errors.Is(err, ErrClosed):
			http.Error(w, "image cache shutting down", http.StatusServiceUnavailable)
		default:
			// The detailed error (with expected and actual digests) is in the cache's log.
			w.Header().Set("Retry-After", "30")
			http.Error(w, "image could not be fetched and verified from upstream", http.StatusBadGateway)
		}
		return
	}
	defer func() { _ = b.Close() }()
	h := w.Header()
	h.Set("Content-Type", "application/octet-stream")
	h.Set("X-Content-Type-Options", "nosniff")
	// Content-addressed: the checksum is a perfect entity tag, and If-Range works with it.
	h.Set("ETag", `"`+b.Checksum+`"`)
	cw := &countingWriter{ResponseWriter: w}
	http.ServeContent(cw, r, "", b.ModTime, b.File)
	c.bytesServed.Add(uint64(cw.n)) //nolint:gosec // n >= 0
}

// countingWriter counts body bytes. It implements io.ReaderFrom by delegating, so that
// net/http still hands *os.File bodies to sendfile(2).
type countingWriter struct {
	http.ResponseWriter
	n int64
}

func (w *countingWriter) Write(p []byte) (int, error) {
	n, err := w.ResponseWriter.Write(p)
	w.n += int64(n)
	return n, err
}

func (w *countingWriter) ReadFrom(r io.Reader) (int64, error) {
	if rf, ok := w.ResponseWriter.(io.ReaderFrom); ok {
		n, err := rf.ReadFrom(r)
		w.n += n
		return n, err
	}
	n, err := io.Copy(struct{ io.Writer }{w.ResponseWriter}, r)
	w.n += n
	return n, err
}
