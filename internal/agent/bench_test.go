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
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/klauspost/compress/zstd"
	"golang.org/x/sys/unix"

	infrav1 "github.com/anvil-metal/cluster-api-provider-anvil/api/v1alpha1"
	"github.com/anvil-metal/cluster-api-provider-anvil/internal/disk"
)

// The install benchmark (make bench): Install (HTTP stream + zstd + sha256 + 4 MiB writes +
// fsync, in a child process so that its own peak RSS, VmHWM, can be read) against `curl |
// zstd -d | dd` (conv=fsync: the same durability) writing the same image to the same place
// of the same target file, from the same HTTP server, in the same rounds. Install runs with
// its defaults (built-in zstd decoder, O_DIRECT writes), with buffered writes (written back
// as they go), and with the zstd command as decoder; the pipeline also runs with an sha256 of
// the stream on the side (openssl, through tee), which is the work Install does. Two
// references tell what bounds the pipeline: the target alone (dd from /dev/zero, the same dd)
// and the download and decompression alone (to /dev/null).
//
// The image is generated and compressed on the fly (the raw image never touches the disk):
// its zstd file (about 0.3 of the size) and the target file, of which the image's size gets
// written, are the benchmark's disk use. The target directory defaults to the system's
// temporary directory, on the disk; ANVIL_BENCH_DIR=/dev/shm takes the disk out of the
// comparison (and makes it CPU-bound). Every round runs every variant, and the ratios are
// the medians of the same-round ratios: other load on the machine moves single runs a lot.
// Opt-in, because it writes gigabytes:
//
//	ANVIL_BENCH=1 [ANVIL_BENCH_SIZE=4GiB] [ANVIL_BENCH_ROUNDS=3] [ANVIL_BENCH_DIR=dir] go test -run TestInstallBenchmark -v ./internal/agent/
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
	rounds := 3
	if s := os.Getenv("ANVIL_BENCH_ROUNDS"); s != "" {
		var err error
		if rounds, err = strconv.Atoi(s); err != nil || rounds < 1 {
			t.Fatalf("ANVIL_BENCH_ROUNDS=%q: want a positive number", s)
		}
	}
	dir := t.TempDir()
	if d := os.Getenv("ANVIL_BENCH_DIR"); d != "" {
		var err error
		if dir, err = os.MkdirTemp(d, "anvil-bench-"); err != nil {
			t.Fatal(err)
		}
		defer func() { _ = os.RemoveAll(dir) }()
	}

	// 1. A compressible image, generated and compressed on the fly.
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

	// 3. One HTTP server for all.
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		http.ServeFile(w, r, zpath)
	}))
	defer srv.Close()
	url := srv.URL + "/image.zst"
	// Warm the page cache with the compressed file so no variant pays for reading it.
	if f, err := os.Open(zpath); err == nil {
		_, _ = io.Copy(io.Discard, f)
		_ = f.Close()
	}
	reset := func() {
		// Every variant starts from the same state: slot A inactive, no target page cached
		// (each variant ends with an fsync, so none is dirty).
		if err := ab.WriteEnv(disk.NewEnv()); err != nil {
			t.Fatal(err)
		}
		_ = unix.Fadvise(int(d.File().Fd()), 0, 0, unix.FADV_DONTNEED)
	}

	type variant struct {
		name    string
		run     func() (*os.ProcessState, error)
		ref     bool             // a reference: no ratio, no target
		install bool             // an Install child
		runs    []time.Duration  // per round
		cpus    []time.Duration  // per round: user+sys, children included
		hwm     int64            // the installing process's VmHWM, largest of the rounds
		decRSS  int64            // an external decompressor's peak RSS
		heap    benchChildResult // the last round's
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
	install := func(dec Decompressor, buffered bool) func() (*os.ProcessState, error) {
		return func() (*os.ProcessState, error) {
			cmd := exec.Command(os.Args[0], "-test.run=^TestInstallBenchChild$", "-test.v")
			cmd.Env = append(os.Environ(), "ANVIL_BENCH_CHILD="+strings.Join([]string{url, target, sum}, ","),
				"ANVIL_BENCH_DECOMPRESSOR="+string(dec), "ANVIL_BENCH_BUFFERED="+strconv.FormatBool(buffered))
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
	peer := &variant{name: "curl | zstd -d | dd", run: shell(fmt.Sprintf("curl -sS --fail %q | zstd -d -q | %s", url, dd))}
	defaults := &variant{name: "Install (defaults)", run: install(DecompressorAuto, false), install: true}
	variants := []*variant{peer}
	if _, err := exec.LookPath("openssl"); err == nil {
		fifo := filepath.Join(dir, "sha.fifo")
		variants = append(variants, &variant{name: "same + sha256 (openssl)", run: shell(fmt.Sprintf(
			"rm -f %[1]q; mkfifo %[1]q; openssl dgst -sha256 <%[1]q >/dev/null & curl -sS --fail %[2]q | zstd -d -q | tee %[1]q | %[3]s; wait",
			fifo, url, dd))})
	}
	variants = append(variants, defaults,
		&variant{name: "Install, buffered", run: install(DecompressorAuto, true), install: true},
		&variant{name: "Install, C zstd", run: install(DecompressorExternal, false), install: true},
		&variant{name: "ref: target alone", ref: true, run: shell(fmt.Sprintf("dd if=/dev/zero bs=4M count=%d status=none | %s", size>>22, dd))},
		&variant{name: "ref: curl | zstd -d", ref: true, run: shell(fmt.Sprintf("curl -sS --fail %q | zstd -d -q >/dev/null", url))})
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
			v.runs, v.cpus = append(v.runs, el), append(v.cpus, ps.UserTime()+ps.SystemTime())
			if v.install {
				v.hwm, v.decRSS, v.heap = max(v.hwm, child.VmHWM), max(v.decRSS, child.ChildMaxRSS), child
			}
			line = append(line, fmt.Sprintf("%s %.0f MB/s", v.name, mbps(size, el)))
		}
		t.Logf("round %d: %s", round+1, strings.Join(line, "; "))
	}

	sameRound := func(v *variant) float64 {
		ratios := make([]float64, len(v.runs))
		for i := range v.runs {
			ratios[i] = peer.runs[i].Seconds() / v.runs[i].Seconds()
		}
		return medianFloat(ratios)
	}
	gib := float64(size) / (1 << 30)
	var b strings.Builder
	fmt.Fprintf(&b, "install benchmark: %s image (zstd %.1f:1), one local HTTP server, the same place of the same target file on %s, %d rounds, %d CPUs (agent GOMAXPROCS %d), load %s\n",
		human(size), float64(size)/float64(zst.Size()), fsName(dir), rounds, runtime.NumCPU(), defaults.heap.Procs, loadAvg())
	fmt.Fprintf(&b, "  %-24s %19s %19s %11s %11s  %s\n", "", "best", "median", "ratio (1)", "CPU per GiB", "peak RSS (VmHWM)")
	for _, v := range variants {
		best := slices.Min(v.runs)
		fmt.Fprintf(&b, "  %-24s %9s %4.0f MB/s %9s %4.0f MB/s", v.name, best.Round(time.Millisecond), mbps(size, best),
			median(v.runs).Round(time.Millisecond), mbps(size, median(v.runs)))
		if v.ref {
			fmt.Fprintf(&b, " %11s", "")
		} else {
			fmt.Fprintf(&b, " %10.2fx", sameRound(v))
		}
		fmt.Fprintf(&b, " %5.1f s/GiB", median(v.cpus).Seconds()/gib)
		if v.install {
			fmt.Fprintf(&b, "  %s", human(v.hwm))
			if v.decRSS > 0 {
				fmt.Fprintf(&b, " (+ zstd process %s)", human(v.decRSS))
			}
		}
		b.WriteString("\n")
	}
	b.WriteString("  (1) the median of the rounds' ratios, each against curl | zstd -d | dd in the same round\n")
	verdict := func(ok bool) string {
		if ok {
			return "met"
		}
		return "NOT met"
	}
	ratio := sameRound(defaults)
	fmt.Fprintf(&b, "  target: install throughput >= 0.95x of curl | zstd -d | dd: Install (defaults) %.0f MB/s against %.0f MB/s (medians), ratio %.2fx: %s\n",
		mbps(size, median(defaults.runs)), mbps(size, median(peer.runs)), ratio, verdict(ratio >= 0.95))
	var worst *variant
	for _, v := range variants {
		if v.install && (worst == nil || v.hwm > worst.hwm) {
			worst = v
		}
	}
	fmt.Fprintf(&b, "  target: agent peak RSS <= 64 MiB installing a %s image: %s (%s; VmHWM of the installing process, largest of its rounds; Go heap %s in use at the end, %s obtained from the OS): %s",
		human(size), human(worst.hwm), worst.name, human(int64(worst.heap.HeapInuse)), human(int64(worst.heap.Sys)), verdict(worst.hwm <= 64<<20))
	if size < 4<<30 {
		b.WriteString(" [the target is for a 4 GiB image: run with ANVIL_BENCH_SIZE=4GiB]")
	}
	fmt.Println(b.String()) // printed whether or not -v is given
	for _, v := range variants {
		if v.install && v.hwm > 64<<20 {
			t.Errorf("%s: peak RSS %s above 64 MiB", v.name, human(v.hwm))
		}
	}
}

// fsName names the filesystem that holds dir (the benchmark's target).
func fsName(dir string) string {
	var st unix.Statfs_t
	if err := unix.Statfs(dir, &st); err != nil {
		return dir
	}
	switch st.Type {
	case unix.TMPFS_MAGIC:
		return dir + " (tmpfs: no disk)"
	case unix.EXT4_SUPER_MAGIC:
		return dir + " (ext4)"
	case unix.XFS_SUPER_MAGIC:
		return dir + " (xfs)"
	case unix.BTRFS_SUPER_MAGIC:
		return dir + " (btrfs)"
	}
	return fmt.Sprintf("%s (filesystem 0x%x)", dir, st.Type)
}

func median(d []time.Duration) time.Duration {
	s := slices.Clone(d)
	slices.Sort(s)
	if len(s)%2 == 1 {
		return s[len(s)/2]
	}
	return (s[len(s)/2-1] + s[len(s)/2]) / 2
}

func medianFloat(f []float64) float64 {
	s := slices.Clone(f)
	slices.Sort(s)
	if len(s)%2 == 1 {
		return s[len(s)/2]
	}
	return (s[len(s)/2-1] + s[len(s)/2]) / 2
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
	// VmHWM is the child's own peak RSS; ChildMaxRSS the largest of its children's (an
	// external decompressor).
	VmHWM       int64
	ChildMaxRSS int64
	// Procs is the child's GOMAXPROCS.
	Procs int
}

// TestInstallBenchChild is the benchmark's child process.
func TestInstallBenchChild(t *testing.T) {
	args := os.Getenv("ANVIL_BENCH_CHILD")
	if args == "" {
		t.Skip("only run by TestInstallBenchmark")
	}
	p := strings.Split(args, ",")
	procs := EnsureProcs() // as the agent does
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
		InstallOptions{Decompressor: Decompressor(os.Getenv("ANVIL_BENCH_DECOMPRESSOR")), BufferedWrites: os.Getenv("ANVIL_BENCH_BUFFERED") == "true"})
	if err != nil {
		t.Fatal(err)
	}
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	r := benchChildResult{Written: res.Written, Seconds: res.Duration.Seconds(), HeapInuse: ms.HeapInuse, Sys: ms.Sys, VmHWM: vmHWM(t), Procs: procs}
	var ru unix.Rusage
	if err := unix.Getrusage(unix.RUSAGE_CHILDREN, &ru); err == nil {
		r.ChildMaxRSS = ru.Maxrss * 1024
	}
	b, _ := json.Marshal(r)
	fmt.Println("BENCH-RESULT " + string(b))
}

// vmHWM reads this process's peak resident set size.
func vmHWM(t *testing.T) int64 {
	t.Helper()
	status, err := os.ReadFile("/proc/self/status")
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(string(status), "\n") {
		if v, ok := strings.CutPrefix(line, "VmHWM:"); ok {
			kb, err := strconv.ParseInt(strings.TrimSpace(strings.TrimSuffix(strings.TrimSpace(v), "kB")), 10, 64)
			if err != nil {
				t.Fatal(err)
			}
			return kb << 10
		}
	}
	t.Fatal("no VmHWM in /proc/self/status")
	return 0
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
