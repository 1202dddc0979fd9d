package tftp

import (
	"bytes"
	"context"
	"crypto/rand"
	"io"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/go-logr/logr"
	"github.com/go-logr/logr/funcr"
	"github.com/pin/tftp/v3"
)

// logLines collects a server's log lines for assertions.
type logLines struct {
	mu    sync.Mutex
	lines []string
}

func (l *logLines) logger() logr.Logger {
	return funcr.New(func(prefix, args string) {
		l.mu.Lock()
		l.lines = append(l.lines, args)
		l.mu.Unlock()
	}, funcr.Options{Verbosity: 1})
}

func (l *logLines) find(sub string) []string {
	l.mu.Lock()
	defer l.mu.Unlock()
	var out []string
	for _, s := range l.lines {
		if strings.Contains(s, sub) {
			out = append(out, s)
		}
	}
	return out
}

// startServer runs a server on a random loopback port until the test ends.
func startServer(t *testing.T, cfg Config) (*Server, string) {
	t.Helper()
	if cfg.Addr == "" {
		cfg.Addr = "127.0.0.1:0"
	}
	s, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Listen(); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- s.Start(ctx) }()
	t.Cleanup(func() {
		cancel()
		select {
		case err := <-done:
			if err != nil {
				t.Errorf("Start: %v", err)
			}
		case <-time.After(20 * time.Second):
			t.Error("server did not stop")
		}
	})
	return s, s.Addr().String()
}

// testDir holds a random 100 kB file, a directory, a symlink inside and one leading out.
func testDir(t *testing.T) (dir string, content []byte) {
	t.Helper()
	dir = t.TempDir()
	content = make([]byte, 100_000)
	_, _ = rand.Read(content)
	must(t, os.WriteFile(filepath.Join(dir, "boot.bin"), content, 0o644))
	must(t, os.WriteFile(filepath.Join(dir, "empty.bin"), nil, 0o644))
	must(t, os.Mkdir(filepath.Join(dir, "sub"), 0o755))
	must(t, os.WriteFile(filepath.Join(dir, "sub", "inner.bin"), []byte("inner"), 0o644))
	must(t, os.WriteFile(filepath.Join(dir, ".hidden"), []byte("secret"), 0o644))
	must(t, os.Symlink("boot.bin", filepath.Join(dir, "alias.bin")))
	outside := filepath.Join(t.TempDir(), "secret")
	must(t, os.WriteFile(outside, []byte("outside"), 0o644))
	must(t, os.Symlink(outside, filepath.Join(dir, "escape.bin")))
	return dir, content
}

func must(t testing.TB, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}

func get(addr, name string, blksize int, tsize bool) ([]byte, int64, error) {
	c, err := tftp.NewClient(addr)
	if err != nil {
		return nil, 0, err
	}
	c.SetTimeout(2 * time.Second)
	c.SetRetries(2)
	if blksize > 0 {
		c.SetBlockSize(blksize)
	}
	c.RequestTSize(tsize)
	wt, err := c.Receive(name, "octet")
	if err != nil {
		return nil, 0, err
	}
	size, _ := wt.(tftp.IncomingTransfer).Size()
	var buf bytes.Buffer
	_, err = wt.WriteTo(&buf)
	return buf.Bytes(), size, err
}

func TestServesFilesWithOptions(t *testing.T) {
	dir, content := testDir(t)
	files, err := DirFS(dir)
	must(t, err)
	// Single-port mode is exercised with Debian's clients in peers_test.go: this library's own
	// client leaves a single-port sender waiting for a last ACK, which only slows shutdown.
	for _, single := range []bool{false} {
		t.Run(map[bool]string{false: "per-transfer port", true: "single port"}[single], func(t *testing.T) {
			var logs logLines
			s, addr := startServer(t, Config{Files: files, SinglePort: single, Log: logs.logger()})
			for _, c := range []struct {
				name    string
				blksize int
				tsize   bool
			}{{"boot.bin", 0, false}, {"boot.bin", 1428, true}, {"alias.bin", 8192, true}, {"empty.bin", 0, true}} {
				got, size, err := get(addr, c.name, c.blksize, c.tsize)
				if err != nil {
					t.Fatalf("%s: %v", c.name, err)
				}
				want := content
				if c.name == "empty.bin" {
					want = nil
				}
				if !bytes.Equal(got, want) {
					t.Fatalf("%s: got %d bytes, want %d", c.name, len(got), len(want))
				}
				if c.tsize && size != int64(len(want)) {
					t.Fatalf("%s: tsize %d, want %d", c.name, size, len(want))
				}
			}
			// blksize 8192 is capped at the default maximum of 1468.
			deadline := time.Now().Add(5 * time.Second)
			for len(logs.find(`"blksize"="1468"`)) < 1 || len(logs.find(`"blksize"="1428"`)) < 1 {
				if time.Now().After(deadline) {
					t.Fatalf("negotiated block sizes not seen in logs: %q", logs.find("TFTP sent"))
				}
				time.Sleep(20 * time.Millisecond)
			}
			if st := s.Stats(); st.Served < 3 {
				t.Fatalf("stats %+v", st)
			}
		})
	}
}

func TestRefusesEverythingButPlainNames(t *testing.T) {
	dir, _ := testDir(t)
	files, err := DirFS(dir)
	must(t, err)
	var logs logLines
	s, addr := startServer(t, Config{Files: files, Log: logs.logger()})
	abs, _ := filepath.Abs(filepath.Join(dir, "boot.bin"))
	for _, name := range []string{
		"../boot.bin", "../../../../etc/passwd", "/etc/passwd", abs, "sub/inner.bin", "sub", ".hidden",
		"escape.bin", `..\boot.bin`, "boot.bin/", "./boot.bin", "missing.bin", ".", "..",
	} {
		data, _, err := get(addr, name, 0, false)
		if err == nil {
			t.Errorf("%q: served %d bytes", name, len(data))
			continue
		}
		if !strings.Contains(err.Error(), "file not found") {
			t.Errorf("%q: unexpected error %v", name, err)
		}
	}
	if st := s.Stats(); st.Refused < 13 || st.Served != 0 {
		t.Fatalf("stats %+v", st)
	}

	// Uploads are refused outright.
	c, err := tftp.NewClient(addr)
	must(t, err)
	c.SetTimeout(time.Second)
	c.SetRetries(1)
	rf, err := c.Send("upload.bin", "octet")
	if err == nil {
		_, err = rf.ReadFrom(strings.NewReader("x"))
	}
	if err == nil {
		t.Fatal("write accepted")
	}
	if _, err := os.Stat(filepath.Join(dir, "upload.bin")); !os.IsNotExist(err) {
		t.Fatal("upload created a file")
	}
}

func TestCheckName(t *testing.T) {
	for _, ok := range []string{"undionly.kpxe", "ipxe.efi", "snponly.efi", "a-b_c.1"} {
		if err := CheckName(ok); err != nil {
			t.Errorf("%q refused: %v", ok, err)
		}
	}
	for _, bad := range []string{"", ".", "..", "../x", "/x", "x/y", `x\y`, ".x", "a b", "a\tb", "é", strings.Repeat("a", 256)} {
		if CheckName(bad) == nil {
			t.Errorf("%q accepted", bad)
		}
	}
}

func TestFindIPXE(t *testing.T) {
	dir := t.TempDir()
	target := filepath.Join(t.TempDir(), "real-ipxe.efi")
	must(t, os.WriteFile(target, []byte("efi"), 0o644))
	must(t, os.Symlink(target, filepath.Join(dir, "ipxe.efi")))                        // as Debian does
	must(t, os.Symlink(filepath.Join(dir, "gone"), filepath.Join(dir, "snponly.efi"))) // dangling
	must(t, os.WriteFile(filepath.Join(dir, "undionly.kpxe"), []byte("bios"), 0o644))
	f := FindIPXE(dir)
	if f.Paths["ipxe.efi"] != target || f.Paths["undionly.kpxe"] == "" {
		t.Fatalf("paths %v", f.Paths)
	}
	if len(f.Missing) != 1 || f.Missing[0] != "snponly.efi" || f.Err() == nil || !strings.Contains(f.Err().Error(), "snponly.efi") {
		t.Fatalf("missing %v err %v", f.Missing, f.Err())
	}
	fsys := f.FS()
	b, err := io.ReadAll(must2(fsys.Open("ipxe.efi")))
	if err != nil || string(b) != "efi" {
		t.Fatalf("read through link: %q %v", b, err)
	}
	if _, err := fsys.Open("snponly.efi"); err == nil {
		t.Fatal("missing file opened")
	}
	if FindIPXE(dir, "undionly.kpxe").Err() != nil {
		t.Fatal("explicit names not honoured")
	}
}

func must2[T any](v T, err error) T {
	if err != nil {
		panic(err)
	}
	return v
}

func TestNewValidates(t *testing.T) {
	if _, err := New(Config{}); err == nil {
		t.Fatal("no files accepted")
	}
	if _, err := New(Config{Files: os.DirFS("."), MaxBlockSize: 100}); err == nil {
		t.Fatal("tiny block size accepted")
	}
	// Listening on a port in use fails from Listen, not later.
	l, err := net.ListenPacket("udp", "127.0.0.1:0")
	must(t, err)
	defer l.Close()
	s, err := New(Config{Files: os.DirFS("."), Addr: l.LocalAddr().String()})
	must(t, err)
	if err := s.Listen(); err == nil {
		t.Fatal("listen on a busy port succeeded")
	}
}

// TestSizeQueryIsNotAFailure plays UEFI firmware's first request: ask for the size (tsize)
// with a read request, take the option acknowledgement, and end the transfer with error 8
// (RFC 2347). That is a normal exchange, not a failed transfer.
func TestSizeQueryIsNotAFailure(t *testing.T) {
	dir := t.TempDir()
	if err := os.WriteFile(filepath.Join(dir, "ipxe.efi"), bytes.Repeat([]byte("e"), 5000), 0o600); err != nil {
		t.Fatal(err)
	}
	files, err := DirFS(dir)
	if err != nil {
		t.Fatal(err)
	}
	var logs logLines
	s, addr := startServer(t, Config{Files: files, SinglePort: true, Log: logs.logger()})
	c, err := net.Dial("udp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	rrq := append([]byte{0, 1}, "ipxe.efi\x00octet\x00tsize\x000\x00blksize\x001468\x00"...)
	if _, err := c.Write(rrq); err != nil {
		t.Fatal(err)
	}
	_ = c.SetReadDeadline(time.Now().Add(5 * time.Second))
	buf := make([]byte, 1500)
	n, err := c.Read(buf)
	if err != nil || n < 2 || buf[1] != 6 || !bytes.Contains(buf[:n], []byte("tsize\x005000\x00")) {
		t.Fatalf("want an OACK with tsize 5000, got %q %v", buf[:n], err)
	}
	if _, err := c.Write(append([]byte{0, 5, 0, 8}, "User aborted the transfer\x00"...)); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(5 * time.Second)
	for s.Stats().SizeQueries == 0 && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	if st := s.Stats(); st.SizeQueries != 1 || st.Failed != 0 || st.Served != 0 {
		t.Fatalf("stats %+v, want one size query and no failure", st)
	}
	if len(logs.find("TFTP transfer failed")) != 0 || len(logs.find("TFTP size query")) != 1 {
		t.Fatalf("logs %v", logs.lines)
	}
}
