package imagecache

import (
	"bytes"
	"context"
	"crypto/sha256"
	"crypto/sha512"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/http"
	"net/http/httptest"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/klauspost/compress/gzip"
	"github.com/klauspost/compress/zstd"
	"github.com/ulikunitz/xz"

	infrav1 "github.com/anvil-metal/cluster-api-provider-anvil/api/v1alpha1"
)

// upstream is a test image server counting requests, optionally holding responses.
type upstream struct {
	srv   *httptest.Server
	files map[string][]byte
	hits  atomic.Int32
	gate  chan struct{} // when non-nil, each response waits for it to be closed
	// started is signalled when a request arrives (buffered).
	started chan struct{}
}

func newUpstream(t *testing.T) *upstream {
	t.Helper()
	u := &upstream{files: map[string][]byte{}, started: make(chan struct{}, 100)}
	u.srv = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		u.hits.Add(1)
		u.started <- struct{}{}
		if u.gate != nil {
			select {
			case <-u.gate:
			case <-r.Context().Done():
				return
			}
		}
		b, ok := u.files[r.URL.Path]
		if !ok {
			http.NotFound(w, r)
			return
		}
		w.Header().Set("Content-Length", fmt.Sprint(len(b)))
		_, _ = w.Write(b)
	}))
	t.Cleanup(u.srv.Close)
	return u
}

func randomBytes(n int) []byte {
	b := make([]byte, n)
	r := rand.New(rand.NewPCG(uint64(n), 42))
	for i := range b {
		b[i] = byte(r.Uint32())
	}
	return b
}

func sha256sum(b []byte) string {
	s := sha256.Sum256(b)
	return "sha256:" + hex.EncodeToString(s[:])
}

func (u *upstream) add(name string, b []byte) Source {
	u.files["/"+name] = b
	return Source{URL: u.srv.URL + "/" + name, Checksum: sha256sum(b)}
}

func newCache(t *testing.T, o Options) *Cache {
	t.Helper()
	if o.Dir == "" {
		o.Dir = t.TempDir()
	}
	if o.MaxBytes == 0 {
		o.MaxBytes = 64 << 20
	}
	c, err := New(o)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = c.Close() })
	return c
}

// answer is a response whose body has been read and closed.
type answer struct {
	StatusCode int
	Header     http.Header
}

func get(t *testing.T, srv *httptest.Server, p string, hdr map[string]string) (answer, []byte) {
	t.Helper()
	req, _ := http.NewRequest(http.MethodGet, srv.URL+p, nil)
	for k, v := range hdr {
		req.Header.Set(k, v)
	}
	resp, err := srv.Client().Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = resp.Body.Close() }()
	b, _ := io.ReadAll(resp.Body)
	return answer{StatusCode: resp.StatusCode, Header: resp.Header}, b
}

func TestServeAndRange(t *testing.T) {
	up := newUpstream(t)
	img := randomBytes(1 << 20)
	src := up.add("disk.raw", img)
	c := newCache(t, Options{AllowLocal: true})
	p, err := c.Register(src)
	if err != nil {
		t.Fatal(err)
	}
	if !strings.HasPrefix(p, "/images/") || !strings.HasSuffix(p, "/disk.raw") {
		t.Fatalf("path %q", p)
	}
	srv := httptest.NewServer(c)
	defer srv.Close()

	resp, body := get(t, srv, p, nil)
	if resp.StatusCode != http.StatusOK || !bytes.Equal(body, img) {
		t.Fatalf("full GET: %d, %d bytes", resp.StatusCode, len(body))
	}
	if resp.Header.Get("ETag") != `"`+src.Checksum+`"` || resp.Header.Get("Accept-Ranges") != "bytes" {
		t.Fatalf("headers %v", resp.Header)
	}
	resp, body = get(t, srv, p, map[string]string{"Range": "bytes=1000-1999"})
	if resp.StatusCode != http.StatusPartialContent || !bytes.Equal(body, img[1000:2000]) ||
		resp.Header.Get("Content-Range") != fmt.Sprintf("bytes 1000-1999/%d", len(img)) {
		t.Fatalf("range: %d %q", resp.StatusCode, resp.Header.Get("Content-Range"))
	}
	resp, body = get(t, srv, p, map[string]string{"Range": "bytes=-10"})
	if resp.StatusCode != http.StatusPartialContent || !bytes.Equal(body, img[len(img)-10:]) {
		t.Fatalf("suffix range: %d", resp.StatusCode)
	}
	// Resume with If-Range: matching ETag → partial; stale ETag → whole file.
	resp, _ = get(t, srv, p, map[string]string{"Range": "bytes=10-", "If-Range": `"` + src.Checksum + `"`})
	if resp.StatusCode != http.StatusPartialContent {
		t.Fatalf("If-Range match: %d", resp.StatusCode)
	}
	resp, _ = get(t, srv, p, map[string]string{"Range": "bytes=10-", "If-Range": `"sha256:other"`})
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("If-Range mismatch: %d", resp.StatusCode)
	}
	resp, _ = get(t, srv, p, map[string]string{"Range": "bytes=0-1,5-9"})
	if resp.StatusCode != http.StatusPartialContent || !strings.HasPrefix(resp.Header.Get("Content-Type"), "multipart/byteranges") {
		t.Fatalf("multi-range: %d %s", resp.StatusCode, resp.Header.Get("Content-Type"))
	}
	req, _ := http.NewRequest(http.MethodHead, srv.URL+p, nil)
	hr, err := srv.Client().Do(req)
	if err != nil || hr.StatusCode != http.StatusOK || hr.ContentLength != int64(len(img)) {
		t.Fatalf("HEAD: %v %v", hr, err)
	}
	_ = hr.Body.Close()

	if up.hits.Load() != 1 {
		t.Fatalf("upstream fetched %d times", up.hits.Load())
	}
	st := c.Stats()
	if st.Misses != 1 || st.Downloads != 1 || st.Hits < 6 || st.BytesFetched != uint64(len(img)) || st.BytesServed < uint64(len(img)) || st.ActiveReaders != 0 {
		t.Fatalf("stats %+v", st)
	}
	// Unknown keys and methods.
	if resp, _ := get(t, srv, "/images/"+strings.Repeat("a", 64), nil); resp.StatusCode != http.StatusNotFound {
		t.Fatalf("unknown key: %d", resp.StatusCode)
	}
	if resp, _ := get(t, srv, "/images/../../etc/passwd", nil); resp.StatusCode != http.StatusNotFound {
		t.Fatalf("traversal: %d", resp.StatusCode)
	}
	preq, _ := http.NewRequest(http.MethodPut, srv.URL+p, nil)
	if pr, err := srv.Client().Do(preq); err != nil || pr.StatusCode != http.StatusMethodNotAllowed {
		t.Fatalf("PUT: %v %v", pr, err)
	} else {
		_ = pr.Body.Close()
	}
}

func TestSHA512(t *testing.T) {
	up := newUpstream(t)
	img := randomBytes(4096)
	up.files["/x"] = img
	s := sha512.Sum512(img)
	c := newCache(t, Options{AllowLocal: true})
	b, err := c.Open(context.Background(), Source{URL: up.srv.URL + "/x", Checksum: "sha512:" + strings.ToUpper(hex.EncodeToString(s[:]))})
	if err != nil {
		t.Fatal(err)
	}
	got, _ := io.ReadAll(b)
	_ = b.Close()
	if !bytes.Equal(got, img) {
		t.Fatal("content differs")
	}
}

// TestConcurrentReadersShareOneDownload: many requests arrive while the download runs; one
// upstream request, every reader gets verified bytes, and a waiter that gives up does not
// disturb the others.
func TestConcurrentReadersShareOneDownload(t *testing.T) {
	up := newUpstream(t)
	up.gate = make(chan struct{})
	img := randomBytes(2 << 20)
	src := up.add("img", img)
	c := newCache(t, Options{AllowLocal: true})
	p, _ := c.Register(src)
	srv := httptest.NewServer(c)
	defer srv.Close()

	const n = 20
	var wg sync.WaitGroup
	errs := make(chan error, n)
	for i := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			req, _ := http.NewRequest(http.MethodGet, srv.URL+p, nil)
			if i%2 == 1 {
				req.Header.Set("Range", "bytes=100-")
			}
			resp, err := srv.Client().Do(req)
			if err != nil {
				errs <- err
				return
			}
			defer func() { _ = resp.Body.Close() }()
			b, _ := io.ReadAll(resp.Body)
			want := img
			if i%2 == 1 {
				want = img[100:]
			}
			if !bytes.Equal(b, want) {
				errs <- fmt.Errorf("reader %d: %d bytes, status %d", i, len(b), resp.StatusCode)
			}
		}()
	}
	<-up.started // the download is running
	// A waiter that gives up.
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	if _, err := c.Open(ctx, src); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("cancelled waiter: %v", err)
	}
	// Give the readers time to queue up behind the download, then let it finish.
	deadline := time.Now().Add(5 * time.Second)
	for c.Stats().Coalesced < n && time.Now().Before(deadline) {
		time.Sleep(5 * time.Millisecond)
	}
	close(up.gate)
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	if up.hits.Load() != 1 {
		t.Fatalf("upstream hit %d times", up.hits.Load())
	}
	if st := c.Stats(); st.Misses != 1 || st.Coalesced < n {
		t.Fatalf("stats %+v", st)
	}
}

func TestChecksumMismatch(t *testing.T) {
	up := newUpstream(t)
	img := randomBytes(100000)
	up.files["/bad"] = img
	wrong := sha256sum([]byte("something else"))
	src := Source{URL: up.srv.URL + "/bad?X-Amz-Signature=supersecret", Checksum: wrong}
	dir := t.TempDir()
	c := newCache(t, Options{Dir: dir, AllowLocal: true, FailureBackoff: time.Hour})
	_, err := c.Open(context.Background(), src)
	var mm *ChecksumMismatchError
	if !errors.As(err, &mm) {
		t.Fatalf("err = %v", err)
	}
	msg := err.Error()
	if !strings.Contains(msg, wrong[:23]) || !strings.Contains(msg, sha256sum(img)[:23]) {
		t.Fatalf("message should name expected and actual digest prefixes: %s", msg)
	}
	if strings.Contains(msg, "supersecret") {
		t.Fatalf("message leaks the URL's query: %s", msg)
	}
	for _, d := range []string{"blobs", "tmp"} {
		if des, _ := os.ReadDir(filepath.Join(dir, d)); len(des) != 0 {
			t.Fatalf("%s/ not empty after a mismatch: %v", d, des)
		}
	}
	// Served as 502 without another upstream download (failure is remembered).
	p, _ := c.Register(src)
	srv := httptest.NewServer(c)
	defer srv.Close()
	resp, body := get(t, srv, p, nil)
	if resp.StatusCode != http.StatusBadGateway || bytes.Contains(body, img[:16]) {
		t.Fatalf("GET after mismatch: %d", resp.StatusCode)
	}
	if up.hits.Load() != 1 {
		t.Fatalf("upstream hit %d times", up.hits.Load())
	}
	if st := c.Stats(); st.ChecksumMismatches != 1 || st.Entries != 0 {
		t.Fatalf("stats %+v", st)
	}
}

func TestUpstreamErrors(t *testing.T) {
	up := newUpstream(t)
	c := newCache(t, Options{AllowLocal: true, MaxBytes: 1000, FailureBackoff: time.Millisecond})
	if _, err := c.Open(context.Background(), Source{URL: up.srv.URL + "/missing", Checksum: sha256sum(nil)}); err == nil || !strings.Contains(err.Error(), "404") {
		t.Fatalf("404: %v", err)
	}
	big := up.add("big", randomBytes(2000))
	if _, err := c.Open(context.Background(), big); err == nil || !strings.Contains(err.Error(), "exceed") {
		t.Fatalf("too big: %v", err)
	}
	// A server that lies about (omits) the length is cut off at MaxBytes too.
	chunked := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
		for range 10 {
			_, _ = w.Write(make([]byte, 500))
			w.(http.Flusher).Flush()
		}
	}))
	defer chunked.Close()
	if _, err := c.Open(context.Background(), Source{URL: chunked.URL, Checksum: sha256sum(nil)}); err == nil || !strings.Contains(err.Error(), "more than") {
		t.Fatalf("unbounded body: %v", err)
	}
}

func TestRefusedSources(t *testing.T) {
	up := newUpstream(t)
	up.add("img", []byte("hello"))
	_, port, _ := net.SplitHostPort(strings.TrimPrefix(up.srv.URL, "http://"))
	c := newCache(t, Options{}) // AllowLocal false
	sum := sha256sum([]byte("hello"))
	for _, raw := range []string{
		"file:///etc/passwd",
		"ftp://mirror.example/img",
		"gopher://x/",
		"/relative/path",
		"http://user:pw@mirror.example/img",
		"http://127.0.0.1:" + port + "/img",
		"http://[::1]:" + port + "/img",
		"http://169.254.169.254/latest/meta-data/",
		"http://[fe80::1%25eth0]/img",
		"http://0.0.0.0:" + port + "/img",
		"http://[::ffff:127.0.0.1]:" + port + "/img",
		"http://224.0.0.1/img",
	} {
		_, err := c.Register(Source{URL: raw, Checksum: sum})
		if !errors.Is(err, ErrRefused) {
			t.Errorf("%s: err = %v, want ErrRefused", raw, err)
		}
		if err != nil && strings.Contains(err.Error(), "pw") {
			t.Errorf("%s: error echoes credentials", raw)
		}
	}
	// A host name that resolves to loopback passes the URL check and is refused at dial time
	// (the same path a DNS-rebinding answer takes). Nothing reaches the server.
	_, err := c.Open(context.Background(), Source{URL: "http://localhost:" + port + "/img", Checksum: sum})
	if !errors.Is(err, ErrRefused) {
		t.Fatalf("localhost: err = %v", err)
	}
	if up.hits.Load() != 0 {
		t.Fatal("a refused address was contacted")
	}
	// Bad checksums.
	for _, cs := range []string{"", "md5:d41d8cd98f00b204e9800998ecf8427e", "sha256:abc", "sha256:" + strings.Repeat("g", 64)} {
		if _, err := c.Register(Source{URL: "http://mirror.example/img", Checksum: cs}); err == nil {
			t.Errorf("checksum %q accepted", cs)
		}
	}
}

func TestRedirectToForbiddenScheme(t *testing.T) {
	redir := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		http.Redirect(w, r, "file:///etc/shadow", http.StatusFound)
	}))
	defer redir.Close()
	c := newCache(t, Options{AllowLocal: true})
	_, err := c.Open(context.Background(), Source{URL: redir.URL, Checksum: sha256sum(nil)})
	if !errors.Is(err, ErrRefused) {
		t.Fatalf("redirect to file://: %v", err)
	}
}

func TestEviction(t *testing.T) {
	up := newUpstream(t)
	const sz = 1000
	a, b, cc, d := up.add("a", randomBytes(sz)), up.add("b", randomBytes(sz+1)), up.add("c", randomBytes(sz+2)), up.add("d", randomBytes(sz+3))
	c := newCache(t, Options{AllowLocal: true, MaxBytes: 2*sz + 500})
	ctx := context.Background()
	open := func(s Source) *Blob {
		t.Helper()
		bl, err := c.Open(ctx, s)
		if err != nil {
			t.Fatal(err)
		}
		return bl
	}
	_ = open(a).Close()
	_ = open(b).Close()
	_ = open(a).Close() // a is now more recent than b
	_ = open(cc).Close()
	st := c.Stats()
	if st.Entries != 2 || st.Evictions != 1 || st.SizeBytes > 2*sz+500 {
		t.Fatalf("after c: %+v", st)
	}
	hitsBefore := up.hits.Load()
	_ = open(a).Close()
	if up.hits.Load() != hitsBefore {
		t.Fatal("a (recently used) was evicted instead of b")
	}
	// An active reader pins its file: hold c open, add d; a goes, c stays.
	holdC := open(cc)
	_ = open(a).Close() // a most recent, c least recent but open
	_ = open(d).Close()
	hitsBefore = up.hits.Load()
	_ = open(cc).Close()
	if up.hits.Load() != hitsBefore {
		t.Fatal("a file with an active reader was evicted")
	}
	// The held file is still fully readable.
	got, err := io.ReadAll(holdC)
	if err != nil || len(got) != sz+2 {
		t.Fatalf("held reader: %d bytes, %v", len(got), err)
	}
	_ = holdC.Close()
	if st := c.Stats(); st.SizeBytes > 2*sz+500 || st.ActiveReaders != 0 {
		t.Fatalf("after release: %+v", st)
	}
}

func TestSurvivesRestart(t *testing.T) {
	up := newUpstream(t)
	img := randomBytes(5000)
	src := up.add("img", img)
	dir := t.TempDir()
	c1, err := New(Options{Dir: dir, MaxBytes: 1 << 20, AllowLocal: true})
	if err != nil {
		t.Fatal(err)
	}
	bl, err := c1.Open(context.Background(), src)
	if err != nil {
		t.Fatal(err)
	}
	_ = bl.Close()
	_ = c1.Close()
	// Leftovers of a crashed download and a torn entry are cleaned up.
	_ = os.WriteFile(filepath.Join(dir, "tmp", "junk"), []byte("x"), 0o600)
	_ = os.WriteFile(filepath.Join(dir, "blobs", strings.Repeat("b", 64)), []byte("no meta"), 0o600)

	c2 := newCache(t, Options{Dir: dir, MaxBytes: 1 << 20, AllowLocal: true})
	p, _ := c2.Register(src)
	srv := httptest.NewServer(c2)
	defer srv.Close()
	resp, body := get(t, srv, p, nil)
	if resp.StatusCode != http.StatusOK || !bytes.Equal(body, img) || up.hits.Load() != 1 {
		t.Fatalf("after restart: %d, upstream hits %d", resp.StatusCode, up.hits.Load())
	}
	if _, err := os.Stat(filepath.Join(dir, "blobs", strings.Repeat("b", 64))); !os.IsNotExist(err) {
		t.Fatal("torn entry kept")
	}
	if des, _ := os.ReadDir(filepath.Join(dir, "tmp")); len(des) != 0 {
		t.Fatal("tmp not cleaned")
	}
}

func TestCloseStopsDownloads(t *testing.T) {
	up := newUpstream(t)
	up.gate = make(chan struct{})
	defer close(up.gate)
	src := up.add("img", []byte("x"))
	c, err := New(Options{Dir: t.TempDir(), MaxBytes: 1 << 20, AllowLocal: true})
	if err != nil {
		t.Fatal(err)
	}
	if err := c.Prefetch(src); err != nil {
		t.Fatal(err)
	}
	<-up.started
	done := make(chan error, 1)
	go func() { _, err := c.Open(context.Background(), src); done <- err }()
	time.Sleep(20 * time.Millisecond)
	_ = c.Close()
	select {
	case err := <-done:
		if err == nil {
			t.Fatal("Open succeeded after Close")
		}
	case <-time.After(5 * time.Second):
		t.Fatal("waiter not released by Close")
	}
}

func TestURLHelper(t *testing.T) {
	c := newCache(t, Options{})
	u, err := c.URL("http://10.0.0.1:8080/", Source{URL: "https://mirror.example/os/ubuntu-24.04.raw.zst?sig=abc", Checksum: sha256sum(nil)})
	if err != nil {
		t.Fatal(err)
	}
	pu, _ := url.Parse(u)
	if pu.Host != "10.0.0.1:8080" || !strings.HasSuffix(pu.Path, "/ubuntu-24.04.raw.zst") || strings.Contains(u, "sig") {
		t.Fatalf("URL %q", u)
	}
}

func TestCompressedImagesVerifiedDecompressed(t *testing.T) {
	raw := randomBytes(300000)
	raw = append(raw, bytes.Repeat([]byte("compressible "), 20000)...)
	var gz, zs, xzb bytes.Buffer
	gw := gzip.NewWriter(&gz)
	_, _ = gw.Write(raw)
	_ = gw.Close()
	zw, _ := zstd.NewWriter(&zs)
	_, _ = zw.Write(raw)
	_ = zw.Close()
	xw, _ := xz.NewWriter(&xzb)
	_, _ = xw.Write(raw)
	_ = xw.Close()

	up := newUpstream(t)
	c := newCache(t, Options{AllowLocal: true, FailureBackoff: time.Millisecond})
	ctx := context.Background()
	for name, tc := range map[string]struct {
		body   []byte
		format infrav1.ImageFormat
		sum    string
		want   string // "" = success, else substring of the error
	}{
		"gzip":                  {gz.Bytes(), infrav1.ImageFormatGzip, sha256sum(raw), ""},
		"zstd":                  {zs.Bytes(), infrav1.ImageFormatZstd, sha256sum(raw), ""},
		"xz":                    {xzb.Bytes(), infrav1.ImageFormatXz, sha256sum(raw), ""},
		"checksum of the .gz":   {gz.Bytes(), infrav1.ImageFormatGzip, sha256sum(gz.Bytes()), "checksum mismatch"},
		"raw declared gzip":     {raw, infrav1.ImageFormatGzip, sha256sum(raw), "not valid gzip"},
		"truncated zstd":        {zs.Bytes()[:zs.Len()/2], infrav1.ImageFormatZstd, sha256sum(raw), "zstd"},
		"trailing data on gzip": {append(append([]byte(nil), gz.Bytes()...), "#!/bin/sh\nrm -rf /\n"...), infrav1.ImageFormatGzip, sha256sum(raw), "gzip"},
		"corrupt xz":            {append([]byte(nil), xzb.Bytes()[:100]...), infrav1.ImageFormatXz, sha256sum(raw), "xz"},
	} {
		t.Run(name, func(t *testing.T) {
			src := up.add(strings.ReplaceAll(name, " ", "-"), tc.body)
			src.Checksum, src.Format = tc.sum, tc.format
			b, err := c.Open(ctx, src)
			if tc.want == "" {
				if err != nil {
					t.Fatal(err)
				}
				got, _ := io.ReadAll(b)
				_ = b.Close()
				if !bytes.Equal(got, tc.body) {
					t.Fatal("the cache must serve the compressed bytes as fetched")
				}
				return
			}
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("err = %v, want %q", err, tc.want)
			}
		})
	}
	if st := c.Stats(); st.Entries != 3 || st.ActiveReaders != 0 {
		t.Fatalf("stats %+v", st)
	}
	// Format is part of the key: the same URL and checksum as raw is another entry.
	if _, err := c.Register(Source{URL: up.srv.URL + "/gzip", Checksum: sha256sum(raw), Format: "bzip2"}); err == nil {
		t.Fatal("unknown format accepted")
	}
}
