package agent

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"math/rand/v2"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/klauspost/compress/gzip"
	"github.com/klauspost/compress/zstd"
	"github.com/ulikunitz/xz"
	"golang.org/x/sys/unix"

	infrav1 "github.com/anvil-metal/cluster-api-provider-anvil/api/v1alpha1"
	"github.com/anvil-metal/cluster-api-provider-anvil/internal/disk"
)

func sha256Of(b []byte) string {
	s := sha256.Sum256(b)
	return "sha256:" + hex.EncodeToString(s[:])
}

// rootFS returns a root filesystem image: ext4 built with mkfs.ext4 -d when available (so
// GRUB can read it), otherwise pseudo-random bytes of the same size.
func rootFS(t *testing.T, size int64, marker string) []byte {
	t.Helper()
	dir := t.TempDir()
	if mkfs, err := exec.LookPath("mkfs.ext4"); err == nil {
		tree := filepath.Join(dir, "tree")
		for _, f := range []struct{ path, data string }{
			{"boot/vmlinuz", "kernel " + marker}, {"boot/initrd.img", "initrd " + marker},
			{"etc/anvil-marker", marker}, {"etc/fstab", "PARTLABEL=DATA /var/lib/data ext4 defaults,nofail,x-systemd.makefs 0 2\n"},
		} {
			p := filepath.Join(tree, f.path)
			if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
				t.Fatal(err)
			}
			if err := os.WriteFile(p, []byte(f.data), 0o644); err != nil {
				t.Fatal(err)
			}
		}
		img := filepath.Join(dir, "root.img")
		cmd := exec.Command(mkfs, "-q", "-F", "-L", "root", "-d", tree, img, fmt.Sprintf("%dk", size>>10))
		if out, err := cmd.CombinedOutput(); err != nil {
			t.Fatalf("mkfs.ext4: %v\n%s", err, out)
		}
		b, err := os.ReadFile(img)
		if err != nil {
			t.Fatal(err)
		}
		return b
	}
	b := make([]byte, size)
	r := rand.New(rand.NewPCG(uint64(len(marker)), 7))
	for i := range b {
		b[i] = byte(r.Uint32())
	}
	copy(b, marker)
	return b
}

func compress(t *testing.T, format infrav1.ImageFormat, raw []byte) []byte {
	t.Helper()
	var b bytes.Buffer
	var w io.WriteCloser
	var err error
	switch format {
	case infrav1.ImageFormatRaw:
		return raw
	case infrav1.ImageFormatGzip:
		w = gzip.NewWriter(&b)
	case infrav1.ImageFormatZstd:
		// A streaming encoder: no content size in the frame header, like `zstd -` from a pipe.
		w, err = zstd.NewWriter(&b)
	case infrav1.ImageFormatXz:
		w, err = xz.NewWriter(&b)
	default:
		t.Fatalf("format %s", format)
	}
	if err != nil {
		t.Fatal(err)
	}
	if _, err := w.Write(raw); err != nil {
		t.Fatal(err)
	}
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	return b.Bytes()
}

// imageServer serves named blobs with Range support (http.ServeContent). dropAfter makes
// the next requests of a path die after that many bytes, simulating a dropped connection.
type imageServer struct {
	*httptest.Server
	mu       sync.Mutex
	blobs    map[string][]byte
	etags    map[string]string
	drops    map[string][]int64 // per path: byte counts at which successive responses die
	swaps    map[string][]byte  // per path: new content put in place when a response dies
	requests atomic.Int64
	ranges   []string
}

func newImageServer(t *testing.T) *imageServer {
	t.Helper()
	s := &imageServer{blobs: map[string][]byte{}, etags: map[string]string{}, drops: map[string][]int64{}, swaps: map[string][]byte{}}
	s.Server = httptest.NewServer(http.HandlerFunc(s.serve))
	t.Cleanup(s.Close)
	return s
}

func (s *imageServer) put(name string, b []byte) string {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.blobs[name] = b
	sum := sha256.Sum256(b)
	s.etags[name] = `"` + hex.EncodeToString(sum[:8]) + `"`
	return s.URL + "/" + name
}

func (s *imageServer) dropAt(name string, at ...int64) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.drops[name] = append(s.drops[name], at...)
}

// swapOnDrop replaces the blob with b when its next response dies (dropAt), before the
// client can reconnect: the image changes between two attempts of a download.
func (s *imageServer) swapOnDrop(name string, b []byte) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.swaps[name] = b
}

type abortWriter struct {
	http.ResponseWriter
	left    int64
	onAbort func()
}

func (a *abortWriter) Write(p []byte) (int, error) {
	if int64(len(p)) > a.left {
		n, _ := a.ResponseWriter.Write(p[:a.left])
		a.left = 0
		if f, ok := a.ResponseWriter.(http.Flusher); ok {
			f.Flush()
		}
		_ = n
		if a.onAbort != nil {
			a.onAbort()
		}
		panic(http.ErrAbortHandler) // net/http closes the connection mid-body
	}
	a.left -= int64(len(p))
	return a.ResponseWriter.Write(p)
}

func (s *imageServer) serve(w http.ResponseWriter, r *http.Request) {
	s.requests.Add(1)
	name := strings.TrimPrefix(r.URL.Path, "/")
	s.mu.Lock()
	b, ok := s.blobs[name]
	etag := s.etags[name]
	var drop int64 = -1
	if d := s.drops[name]; len(d) > 0 {
		drop, s.drops[name] = d[0], d[1:]
	}
	s.ranges = append(s.ranges, r.Header.Get("Range"))
	s.mu.Unlock()
	if !ok {
		http.NotFound(w, r)
		return
	}
	w.Header().Set("ETag", etag)
	if drop >= 0 {
		aw := &abortWriter{ResponseWriter: w, left: drop}
		aw.onAbort = func() {
			s.mu.Lock()
			swap, ok := s.swaps[name]
			delete(s.swaps, name)
			s.mu.Unlock()
			if ok {
				s.put(name, swap)
			}
		}
		w = aw
	}
	http.ServeContent(w, r, name, time.Unix(1700000000, 0), bytes.NewReader(b))
}

// fakeHost is a sysfs/dev tree with image files as disks.
type fakeHost struct {
	roots Roots
}

type fakeDisk struct {
	name, model, serial, wwid string
	size                      int64
	rotational, removable     bool
}

func newFakeHost(t *testing.T, disks ...fakeDisk) *fakeHost {
	t.Helper()
	root := t.TempDir()
	h := &fakeHost{roots: Roots{Sys: filepath.Join(root, "sys"), Proc: filepath.Join(root, "proc"), Dev: filepath.Join(root, "dev")}}
	write := func(p, s string) {
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(p, []byte(s), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	for _, d := range disks {
		b := filepath.Join(h.roots.Sys, "block", d.name)
		write(filepath.Join(b, "size"), fmt.Sprintf("%d\n", d.size/512))
		write(filepath.Join(b, "queue", "rotational"), map[bool]string{true: "1\n", false: "0\n"}[d.rotational])
		write(filepath.Join(b, "removable"), map[bool]string{true: "1\n", false: "0\n"}[d.removable])
		write(filepath.Join(b, "ro"), "0\n")
		write(filepath.Join(b, "device", "model"), d.model+"  \n")
		if strings.HasPrefix(d.name, "nvme") {
			write(filepath.Join(b, "device", "serial"), d.serial+"\n")
			write(filepath.Join(b, "wwid"), d.wwid+"\n")
		} else {
			// SATA/SAS: the serial only in VPD page 0x80.
			vpd := append([]byte{0, 0x80, 0, byte(len(d.serial))}, d.serial...)
			write(filepath.Join(b, "device", "vpd_pg80"), string(vpd))
			write(filepath.Join(b, "device", "wwid"), d.wwid+"\n")
			write(filepath.Join(b, "device", "vendor"), "ATA     \n")
		}
		p := filepath.Join(h.roots.Dev, d.name)
		write(p, "")
		if err := os.Truncate(p, d.size); err != nil {
			t.Fatal(err)
		}
	}
	// A loop device has no "device": never a candidate.
	write(filepath.Join(h.roots.Sys, "block", "loop0", "size"), "2048\n")
	return h
}

func (h *fakeHost) path(name string) string { return filepath.Join(h.roots.Dev, name) }

// snapshot hashes the parts of an A/B disk an install must not touch (and B for checks).
type snapshot struct {
	slotA, slotB, data, esp, config [32]byte
	env                             string
}

func takeSnapshot(t *testing.T, path string) snapshot {
	t.Helper()
	d, err := disk.OpenReadOnly(path)
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = d.Close() }()
	ab, err := disk.OpenAB(d)
	if err != nil {
		t.Fatal(err)
	}
	h := func(p disk.Partition) [32]byte {
		off, n := ab.Range(p)
		return sparseHash(t, d, off, n)
	}
	env, err := ab.ReadEnv()
	if err != nil {
		t.Fatal(err)
	}
	var envs []string
	keys := env.Keys()
	sort.Strings(keys)
	for _, k := range keys {
		envs = append(envs, k+"="+env.Get(k))
	}
	return snapshot{slotA: h(ab.RootA), slotB: h(ab.RootB), data: h(ab.Data), esp: h(ab.ESP),
		config: h(ab.Config), env: strings.Join(envs, " ")}
}

// sparseHash hashes [off, off+n) of a sparse image by its data segments and their offsets:
// holes read as zeros, so any change of content changes the hash, and gigabytes of holes
// cost nothing.
func sparseHash(t *testing.T, d *disk.Disk, off, n int64) [32]byte {
	t.Helper()
	hs := sha256.New()
	fd := int(d.File().Fd())
	end := off + n
	for pos := off; pos < end; {
		data, err := unix.Seek(fd, pos, unix.SEEK_DATA)
		if err != nil || data >= end {
			break
		}
		hole, err := unix.Seek(fd, data, unix.SEEK_HOLE)
		if err != nil {
			t.Fatal(err)
		}
		hole = min(hole, end)
		fmt.Fprintf(hs, "%d:", data-off)
		if _, err := io.Copy(hs, io.NewSectionReader(d, data, hole-data)); err != nil {
			t.Fatal(err)
		}
		pos = hole
	}
	var s [32]byte
	copy(s[:], hs.Sum(nil))
	return s
}
