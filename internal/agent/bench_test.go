package agent

import (
	"bufio"
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"math/rand/v2"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"runtime/pprof"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/klauspost/compress/zstd"
	"golang.org/x/sys/unix"

	infrav1 "github.com/anvil-metal/cluster-api-provider-anvil/api/v1alpha1"
	"github.com/anvil-metal/cluster-api-provider-anvil/internal/disk"
)

// The install benchmark: Install (HTTP stream + zstd + sha256 + 4 MiB writes + fsync, in a
// child process so its peak RSS can be measured) against `curl | zstd -d | dd` writing the
// same image to the same place of the same target file, from the same HTTP server, in the
// same run. Opt-in, because it writes gigabytes:
//
//	ANVIL_BENCH=1 [ANVIL_BENCH_SIZE=4GiB] [ANVIL_BENCH_ROUNDS=2] go test -run TestInstallBenchmark -v ./internal/agent/
func TestInstallBenchmark(t *testing.T) {
	if os.Getenv("ANVIL_BENCH") == "" {
		t.Skip("set ANVIL_BENCH=1 to run the install benchmark (writes several GiB)")
	}
	for _, tool := range []string{"curl", "zstd", "dd"} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Skipf("%s not installed (apt-get install curl zstd)", tool)
		}
	}
	size := int64(4 << 30)
	if s := os.Getenv("ANVIL_BENCH_SIZE"); s != "" {
		v, err := parseSize(s)
		if err != nil {
			t.Fatal(err)
		}
		size = v
	}
	rounds := 2
	if s := os.Getenv("ANVIL_BENCH_ROUNDS"); s != "" {
		rounds, _ = strconv.Atoi(s)
	}
	dir := t.TempDir()
	if d := os.Getenv("ANVIL_BENCH_DIR"); d != "" { // e.g. /dev/shm to take the disk out of the comparison
		var err error
		if dir, err = os.MkdirTemp(d, "anvil-bench-"); err != nil {
			t.Fatal(err)
		}
		defer func() { _ = os.RemoveAll(dir) }()
	}

	// 1. A compressible image, generated and compressed on the fly (the raw image never
	// touches the disk).
	zpath := filepath.Join(dir, "image.zst")
	start := time.Now()
	sum := writeBenchImage(t, zpath, size)
	zst, _ := os.Stat(zpath)
	t.Logf("image: %s raw, %s zstd (ratio %.1f), generated in %s", human(size), human(zst.Size()),
		float64(size)/float64(zst.Size()), time.Since(start).Round(time.Millisecond))

	// 2. The target: a sparse disk image with the A/B layout, slot A large enough.
	target := filepath.Join(dir, "disk.img")
	if err := os.WriteFile(target, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(target, 2*size+2*disk.GiB); err != nil {
		t.Fatal(err)
	}
	d, err := disk.Open(target)
	if err != nil {
		t.Fatal(err)
	}
	ab, err := disk.EnsureABLayout(d, disk.LayoutOptions{RootSize: size + 64*disk.MiB})
	if err != nil {
		t.Fatal(err)
	}
	slotOff, _ := ab.Range(ab.RootA)

	// 3. One HTTP server for both.
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		http.ServeFile(w, r, zpath)
	}))
	defer srv.Close()
	url := srv.URL + "/image.zst"
	// Warm the page cache with the compressed file so neither side pays for reading it.
	if f, err := os.Open(zpath); err == nil {
		_, _ = io.Copy(io.Discard, f)
		_ = f.Close()
	}
	reset := func() {
		// Both start from the same state: slot A inactive, target pages not cached.
		if err := ab.WriteEnv(disk.NewEnv()); err != nil {
			t.Fatal(err)
		}
		_ = unix.Fadvise(int(d.File().Fd()), 0, 0, unix.FADV_DONTNEED)
	}

	type variant struct {
		name string
		run  func() (*os.ProcessState, error)
		best time.Duration
		cpu  time.Duration // user+sys of the best run, children included
		rss  int64
	}
	shell := func(script string) func() (*os.ProcessState, error) {
		return func() (*os.ProcessState, error) {
			cmd := exec.Command("bash", "-c", "set -o pipefail; "+script)
			out, err := cmd.CombinedOutput()
			if err != nil {
				return nil, fmt.Errorf("%w: %s", err, out)
			}
			return cmd.ProcessState, nil
		}
	}
	dd := fmt.Sprintf("dd of=%q bs=4M iflag=fullblock oflag=seek_bytes seek=%d conv=notrunc,fsync status=none", target, slotOff)
	var child benchChildResult
	install := func(dec Decompressor) func() (*os.ProcessState, error) {
		return func() (*os.ProcessState, error) {
			cmd := exec.Command(os.Args[0], "-test.run=^TestInstallBenchChild$", "-test.v")
			cmd.Env = append(os.Environ(), "ANVIL_BENCH_CHILD="+strings.Join([]string{url, target, sum}, ","),
				"ANVIL_BENCH_DECOMPRESSOR="+string(dec))
			var out bytes.Buffer
			cmd.Stdout, cmd.Stderr = &out, &out
			if err := cmd.Run(); err != nil {
				return nil, fmt.Errorf("install child: %w\n%s", err, out.String())
			}
			child = benchChildResult{}
			for _, line := range strings.Split(out.String(), "\n") {
				if j, ok := strings.CutPrefix(line, "BENCH-RESULT "); ok {
					if err := json.Unmarshal([]byte(j), &child); err != nil {
						return nil, err
					}
				}
			}
			if child.Written != size {
				return nil, fmt.Errorf("child wrote %d of %d bytes:\n%s", child.Written, size, out.String())
			}
			return cmd.ProcessState, nil
		}
	}
	variants := []*variant{
		{name: "curl | zstd -d | dd", run: shell(fmt.Sprintf("curl -sS --fail %q | zstd -d -q | %s", url, dd))},
	}
	if _, err := exec.LookPath("openssl"); err == nil {
		fifo := filepath.Join(dir, "sha.fifo")
		variants = append(variants, &variant{name: "same + sha256 (openssl)", run: shell(fmt.Sprintf(
			"rm -f %[1]q; mkfifo %[1]q; openssl dgst -sha256 <%[1]q >/dev/null & curl -sS --fail %[2]q | zstd -d -q | tee %[1]q | %[3]s; wait",
			fifo, url, dd))})
	}
	variants = append(variants, &variant{name: "Install, C zstd", run: install(DecompressorExternal)},
		&variant{name: "Install, Go zstd", run: install(DecompressorGo)})
	var heapGo benchChildResult
	for round := 0; round < rounds; round++ {
		var line []string
		for _, v := range variants {
			reset()
			t0 := time.Now()
			ps, err := v.run()
			if err != nil {
				t.Fatalf("%s: %v", v.name, err)
			}
			el := time.Since(t0)
			if v.best == 0 || el < v.best {
				v.best, v.cpu = el, ps.UserTime()+ps.SystemTime()
			}
			if ru, ok := ps.SysUsage().(*syscall.Rusage); ok {
				v.rss = max(v.rss, ru.Maxrss*1024)
			}
			if v.name == "Install, Go zstd" {
				heapGo = child
			}
			line = append(line, fmt.Sprintf("%s %.0f MB/s", v.name, mbps(size, el)))
		}
		t.Logf("round %d: %s", round+1, strings.Join(line, "; "))
	}
	base := variants[0]
	var b strings.Builder
	fmt.Fprintf(&b, "install benchmark: %s image, zstd %.1f:1, same HTTP server and target file, best of %d rounds, GOMAXPROCS %d, load %s\n",
		human(size), float64(size)/float64(zst.Size()), rounds, runtime.GOMAXPROCS(0), loadAvg())
	for _, v := range variants {
		fmt.Fprintf(&b, "  %-26s %8s %6.0f MB/s  %.2fx  CPU %5.1f s/GiB", v.name, v.best.Round(time.Millisecond), mbps(size, v.best),
			mbps(size, v.best)/mbps(size, base.best), v.cpu.Seconds()/(float64(size)/(1<<30)))
		if strings.HasPrefix(v.name, "Install") {
			fmt.Fprintf(&b, "  peak RSS %s", human(v.rss))
		}
		b.WriteString("\n")
	}
	fmt.Fprintf(&b, "  Go-decoder install: Go heap %s in use at the end, %s obtained from the OS (targets: >= 0.95x, RSS <= 64 MiB)",
		human(int64(heapGo.HeapInuse)), human(int64(heapGo.Sys)))
	t.Log(b.String())
	fmt.Println(b.String())
	for _, v := range variants[len(variants)-2:] {
		if v.rss > 64<<20 {
			t.Errorf("%s: peak RSS %s above 64 MiB", v.name, human(v.rss))
		}
	}
}

func loadAvg() string {
	b, _ := os.ReadFile("/proc/loadavg")
	f := strings.Fields(string(b))
	if len(f) < 3 {
		return "?"
	}
	return strings.Join(f[:3], " ")
}

type benchChildResult struct {
	Written   int64
	Seconds   float64
	HeapInuse uint64
	Sys       uint64
}

// TestInstallBenchChild is the benchmark's child process.
func TestInstallBenchChild(t *testing.T) {
	args := os.Getenv("ANVIL_BENCH_CHILD")
	if args == "" {
		t.Skip("only run by TestInstallBenchmark")
	}
	p := strings.Split(args, ",")
	if prof := os.Getenv("ANVIL_BENCH_CPUPROFILE"); prof != "" {
		f, err := os.Create(prof)
		if err != nil {
			t.Fatal(err)
		}
		if err := pprof.StartCPUProfile(f); err != nil {
			t.Fatal(err)
		}
		defer pprof.StopCPUProfile()
	}
	res, err := Install(context.Background(), ImageSource{URL: p[0], Checksum: p[2], Format: infrav1.ImageFormatZstd}, p[1],
		InstallOptions{Decompressor: Decompressor(os.Getenv("ANVIL_BENCH_DECOMPRESSOR"))})
	if err != nil {
		t.Fatal(err)
	}
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	b, _ := json.Marshal(benchChildResult{Written: res.Written, Seconds: res.Duration.Seconds(), HeapInuse: ms.HeapInuse, Sys: ms.Sys})
	fmt.Println("BENCH-RESULT " + string(b))
}

// writeBenchImage writes a zstd-compressed image of size bytes that compresses about like an
// OS image (a mix of zero runs, repetitive text and incompressible data) and returns the
// sha256 checksum of the raw bytes.
func writeBenchImage(t *testing.T, path string, size int64) string {
	t.Helper()
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = f.Close() }()
	bw := bufio.NewWriterSize(f, 1<<20)
	enc, err := zstd.NewWriter(bw, zstd.WithEncoderLevel(zstd.SpeedDefault), zstd.WithEncoderConcurrency(runtime.GOMAXPROCS(0)))
	if err != nil {
		t.Fatal(err)
	}
	h := sha256.New()
	w := io.MultiWriter(enc, h)
	r := rand.New(rand.NewPCG(1, 2))
	block := make([]byte, 64<<10)
	text := []byte("usr/lib/x86_64-linux-gnu/libsystemd.so.0 kubelet kubeadm containerd runc /etc/kubernetes/pki ")
	for written := int64(0); written < size; {
		n := min(int64(len(block)), size-written)
		b := block[:n]
		switch k := r.IntN(8); {
		case k < 4: // zeros (sparse file system areas)
			clear(b)
		case k < 6: // text-like, compressible
			for i := range b {
				b[i] = text[(i+int(written>>16))%len(text)] ^ byte(r.IntN(2)*(i&1))
			}
		default: // already-compressed data (packages, binaries' compressed sections)
			for i := 0; i+8 <= len(b); i += 8 {
				v := r.Uint64()
				for j := 0; j < 8; j++ {
					b[i+j] = byte(v >> (8 * j))
				}
			}
		}
		if _, err := w.Write(b); err != nil {
			t.Fatal(err)
		}
		written += n
	}
	if err := enc.Close(); err != nil {
		t.Fatal(err)
	}
	if err := bw.Flush(); err != nil {
		t.Fatal(err)
	}
	return "sha256:" + hex.EncodeToString(h.Sum(nil))
}

func mbps(n int64, d time.Duration) float64 { return float64(n) / 1e6 / d.Seconds() }

func human(n int64) string {
	switch {
	case n >= 1<<30:
		return fmt.Sprintf("%.2f GiB", float64(n)/(1<<30))
	case n >= 1<<20:
		return fmt.Sprintf("%.1f MiB", float64(n)/(1<<20))
	}
	return fmt.Sprintf("%d B", n)
}

func parseSize(s string) (int64, error) {
	mult := int64(1)
	for _, u := range []struct {
		suffix string
		m      int64
	}{{"GiB", 1 << 30}, {"MiB", 1 << 20}, {"G", 1 << 30}, {"M", 1 << 20}} {
		if v, ok := strings.CutSuffix(s, u.suffix); ok {
			s, mult = v, u.m
			break
		}
	}
	v, err := strconv.ParseInt(s, 10, 64)
	return v * mult, err
}
