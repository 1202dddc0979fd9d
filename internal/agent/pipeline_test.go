package agent

import (
	"bytes"
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"runtime"
	"runtime/pprof"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	infrav1 "github.com/anvil-metal/cluster-api-provider-anvil/api/v1alpha1"
	"github.com/anvil-metal/cluster-api-provider-anvil/internal/disk"
)

// jitterReader returns its data in pieces of random size, then err.
type jitterReader struct {
	data []byte
	r    *rand.Rand
	err  error
}

func (j *jitterReader) Read(p []byte) (int, error) {
	if len(j.data) == 0 {
		return 0, j.err
	}
	n := min(len(p), len(j.data), 1+j.r.IntN(100<<10))
	copy(p, j.data[:n])
	j.data = j.data[n:]
	return n, nil
}

func TestReadAhead(t *testing.T) {
	data := make([]byte, 3<<20+12345)
	r := rand.New(rand.NewPCG(3, 4))
	for i := range data {
		data[i] = byte(r.Uint32())
	}
	for _, final := range []error{io.EOF, &DownloadError{errors.New("connection reset")}} {
		ctx, cancel := context.WithCancel(context.Background())
		ra := startReadAhead(ctx, cancel, &jitterReader{data: data, r: rand.New(rand.NewPCG(5, 6)), err: final})
		var got bytes.Buffer
		buf := make([]byte, 70<<10)
		var err error
		for err == nil {
			var n int
			n, err = ra.Read(buf[:1+r.IntN(len(buf))])
			got.Write(buf[:n])
		}
		if !bytes.Equal(got.Bytes(), data) || !errors.Is(err, final) {
			t.Fatalf("read %d of %d bytes, error %v (want %v)", got.Len(), len(data), err, final)
		}
		if _, err2 := ra.Read(buf); !errors.Is(err2, final) {
			t.Fatalf("read after the end: %v", err2)
		}
		ra.close()
	}

	// What arrived is handed over while the download waits for more.
	ctx, cancel := context.WithCancel(context.Background())
	sent := false
	ra := startReadAhead(ctx, cancel, readerFunc(func(p []byte) (int, error) {
		if !sent {
			sent = true
			return copy(p, "first bytes"), nil
		}
		<-ctx.Done() // a stalled network
		return 0, &DownloadError{ctx.Err()}
	}))
	got := make([]byte, 100)
	n, err := ra.Read(got)
	if err != nil || string(got[:n]) != "first bytes" {
		t.Fatalf("read during a stall: %q, %v", got[:n], err)
	}
	ra.close()

	// close ends a download blocked on the network and a consumer waiting for it.
	ctx, cancel = context.WithCancel(context.Background())
	ra = startReadAhead(ctx, cancel, readerFunc(func([]byte) (int, error) {
		<-ctx.Done() // as an HTTP body read does when its request's context ends
		return 0, &DownloadError{ctx.Err()}
	}))
	errc := make(chan error, 1)
	go func() {
		_, err := ra.Read(make([]byte, 10))
		errc <- err
	}()
	time.Sleep(10 * time.Millisecond)
	ra.close()
	if err := <-errc; !errors.As(err, new(*DownloadError)) {
		t.Fatalf("read after close: %v", err)
	}
}

type readerFunc func([]byte) (int, error)

func (f readerFunc) Read(p []byte) (int, error) { return f(p) }

// A failed write ends the copy early with the write's error; the data is not read to its
// end.
func TestCopyImageWriteError(t *testing.T) {
	path := filepath.Join(t.TempDir(), "ro.img")
	if err := os.WriteFile(path, make([]byte, 4096), 0o600); err != nil {
		t.Fatal(err)
	}
	f, err := os.Open(path) // read-only: every write fails
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = f.Close() }()
	var read int64
	src := readerFunc(func(p []byte) (int, error) {
		read += int64(len(p))
		return len(p), nil // endless
	})
	_, err = copyImage(context.Background(), src, &writeTarget{f: f, limit: 1 << 40}, sha256.New(), 1<<20, nil)
	if err == nil || !strings.HasPrefix(err.Error(), "writing: ") {
		t.Fatalf("copy: %v", err)
	}
	if read > 16<<20 {
		t.Fatalf("%d bytes read after the first write failed", read)
	}
}

// goroutinesSettle waits for the goroutine count to fall back to at most base and fails the
// test, with the goroutines' stacks, if it does not: an install must leave nothing running.
func goroutinesSettle(t *testing.T, base int) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for runtime.NumGoroutine() > base {
		if time.Now().After(deadline) {
			var b strings.Builder
			_ = pprof.Lookup("goroutine").WriteTo(&b, 1)
			t.Fatalf("%d goroutines left running, %d before:\n%s", runtime.NumGoroutine(), base, b.String())
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// Cancelling an install while its download is stalled mid-stream ends it promptly with the
// context's error, leaves the active slot, DATA, CONFIG and the boot environment as they
// were, and leaves no goroutine behind; with O_DIRECT and with buffered writes.
func TestInstallCancelledMidStream(t *testing.T) {
	h := newFakeHost(t, fakeDisk{name: "sda", size: 2 * disk.GiB})
	target := h.path("sda")
	images := newImageServer(t)
	installAGood(t, images, target)

	raw := rootFS(t, 16*disk.MiB, "cancel")
	zst := compress(t, infrav1.ImageFormatZstd, raw)
	// Serves the first half of the image, then stalls until the client goes away.
	stall := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Length", strconv.Itoa(len(zst)))
		_, _ = w.Write(zst[:len(zst)/2])
		w.(http.Flusher).Flush()
		<-r.Context().Done()
	}))
	defer stall.Close()

	for _, buffered := range []bool{false, true} {
		t.Run(fmt.Sprintf("BufferedWrites=%v", buffered), func(t *testing.T) {
			base := runtime.NumGoroutine()
			before := takeSnapshot(t, target)
			ctx, cancel := context.WithCancel(context.Background())
			defer cancel()
			opts := testOpts()
			opts.BufferedWrites = buffered
			var once sync.Once
			opts.Progress = func(p Progress) {
				// Something was written: the install is in the middle of the stream, its
				// download about to stall.
				once.Do(func() { time.AfterFunc(50*time.Millisecond, cancel) })
			}
			start := time.Now()
			_, err := Install(ctx, ImageSource{URL: stall.URL + "/img.zst", Checksum: sha256Of(raw), Format: infrav1.ImageFormatZstd}, target, opts)
			if !errors.Is(err, context.Canceled) {
				t.Fatalf("cancelled install: %v", err)
			}
			if d := time.Since(start); d > 10*time.Second {
				t.Fatalf("cancelled install took %s", d)
			}
			after := takeSnapshot(t, target)
			if after.slotA != before.slotA || after.data != before.data || after.config != before.config || after.esp != before.esp || after.env != before.env {
				t.Fatalf("a cancelled install changed the active slot, DATA, CONFIG or the boot environment (%q -> %q)", before.env, after.env)
			}
			goroutinesSettle(t, base)
		})
	}
}

// Progress reports never overlap, never repeat a count, end with every byte, and a slow
// report does not hold up the copy.
func TestCopyImageProgress(t *testing.T) {
	path := filepath.Join(t.TempDir(), "t.img")
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = f.Close() }()
	data := bytes.Repeat([]byte("0123456789abcdef"), (32<<20+100)/16)
	var (
		calls   atomic.Int32
		running atomic.Bool
		last    int64
		slow    = make(chan struct{})
		started = make(chan struct{}) // the first report is under way
		unstick sync.Once
	)
	progress := func(n int64) {
		if running.Swap(true) {
			t.Error("progress called concurrently")
		}
		defer running.Store(false)
		if n <= last {
			t.Errorf("progress went from %d to %d", last, n)
		}
		last = n
		if calls.Add(1) == 1 {
			close(started)
			<-slow // the first report hangs until the copy is nearly over
		}
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		var read int
		src := readerFunc(func(p []byte) (int, error) {
			if read >= len(data) {
				return 0, io.EOF
			}
			if read >= 4<<20 {
				// Hold the data back until the first report started, so that it is an early
				// one however the goroutines are scheduled (on a loaded machine the copy
				// could otherwise finish before any report).
				select {
				case <-started:
				case <-time.After(20 * time.Second):
				}
			}
			n := copy(p, data[read:])
			read += n
			if read > len(data)-(1<<20) {
				unstick.Do(func() { close(slow) }) // the copy got here although the first report is still stuck
			}
			return n, nil
		})
		res, err := copyImage(context.Background(), src, &writeTarget{f: f, limit: 1 << 30}, sha256.New(), 1<<20, progress)
		if err != nil || res.Written != int64(len(data)) {
			t.Errorf("copy: %d bytes, %v", res.Written, err)
		}
	}()
	select {
	case <-done:
	case <-time.After(20 * time.Second):
		t.Fatal("a stuck progress report held up the copy")
	}
	if last != int64(len(data)) {
		t.Fatalf("last progress %d, want %d", last, len(data))
	}
	if n := calls.Load(); n < 2 {
		t.Fatalf("%d progress calls", n)
	}
}

func TestEnsureProcs(t *testing.T) {
	if os.Getenv("GOMAXPROCS") != "" {
		t.Skip("GOMAXPROCS is set in the environment: EnsureProcs leaves it alone")
	}
	defer runtime.GOMAXPROCS(runtime.GOMAXPROCS(1)) // start from one P, restore afterwards
	if n := EnsureProcs(); n != installStages || runtime.GOMAXPROCS(0) != installStages {
		t.Fatalf("EnsureProcs from 1 P: %d (GOMAXPROCS %d), want %d", n, runtime.GOMAXPROCS(0), installStages)
	}
	runtime.GOMAXPROCS(installStages + 3)
	if n := EnsureProcs(); n != installStages+3 {
		t.Fatalf("EnsureProcs lowered GOMAXPROCS to %d", n)
	}
}
