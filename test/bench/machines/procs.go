package main

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/anvil-metal/cluster-api-provider-anvil/internal/vbmc/redfish"
	"github.com/anvil-metal/cluster-api-provider-anvil/test/bench/apimeter"
)

// bmcChildEnv, when set, makes this binary serve emulated BMCs instead of running the
// benchmark (the benchmark re-executes itself, so the BMCs' CPU is not the manager's or the
// benchmark's). Its value is the number of BMCs, a comma and "tls" or "http".
const bmcChildEnv = "ANVIL_BENCH_MACHINES_BMCS"

// bmcsReady is what the BMC child prints on its first stdout line once every BMC listens.
type bmcsReady struct {
	Addrs []string // host:port of BMC i
	CAPEM []byte   // CA of the BMCs' certificate (TLS only)
}

// bmcPassword is BMC i's password.
func bmcPassword(i int) string { return fmt.Sprintf("bench-pw-%d", i) }

// bmcChildMain serves the BMCs when this process is the BMC child; it returns false
// otherwise. The child exits when its stdin closes (the benchmark ended or died).
func bmcChildMain() bool {
	spec := os.Getenv(bmcChildEnv)
	if spec == "" {
		return false
	}
	n, mode, _ := strings.Cut(spec, ",")
	count, err := strconv.Atoi(n)
	if err == nil {
		err = serveBMCs(count, mode == "tls")
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "bmcs:", err)
		os.Exit(1)
	}
	os.Exit(0)
	return true
}

func serveBMCs(n int, tls bool) error {
	srv, err := redfish.NewServer(redfish.ServerOptions{TLS: tls})
	if err != nil {
		return err
	}
	defer srv.Close()
	ready := bmcsReady{CAPEM: srv.CACertPEM()}
	mockups := redfish.Mockups()
	for i := range n {
		b, err := srv.AddBMC(redfish.BMCOptions{Mockup: mockups[i%len(mockups)], Identity: redfish.NewIdentity(i),
			Hardware: redfish.Hardware{Processors: 1 + i%4, MemoryGiB: 64 << (i % 3)}, Username: "admin", Password: bmcPassword(i)})
		if err != nil {
			return fmt.Errorf("BMC %d: %w", i, err)
		}
		ready.Addrs = append(ready.Addrs, b.Addr())
	}
	if err := json.NewEncoder(os.Stdout).Encode(ready); err != nil {
		return err
	}
	_, _ = io.Copy(io.Discard, os.Stdin)
	return nil
}

// process is a child process the benchmark started.
type process struct {
	name  string
	cmd   *exec.Cmd
	stdin io.WriteCloser
	done  chan struct{}
	err   error
}

// startBMCs re-executes this binary as the BMC child and waits until its BMCs listen.
func startBMCs(ctx context.Context, n int, tls bool, dir string) (*process, bmcsReady, error) {
	exe, err := os.Executable()
	if err != nil {
		return nil, bmcsReady{}, err
	}
	mode := "http"
	if tls {
		mode = "tls"
	}
	cmd := exec.Command(exe) //nolint:gosec // this very binary
	cmd.Env = append(os.Environ(), fmt.Sprintf("%s=%d,%s", bmcChildEnv, n, mode))
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		return nil, bmcsReady{}, err
	}
	p, err := start("bmcs", cmd, dir)
	if err != nil {
		return nil, bmcsReady{}, err
	}
	readyCh := make(chan error, 1)
	var ready bmcsReady
	go func() {
		line, err := bufio.NewReaderSize(stdout, 1<<20).ReadBytes('\n')
		if err == nil {
			err = json.Unmarshal(line, &ready)
		}
		readyCh <- err
		_, _ = io.Copy(io.Discard, stdout)
	}()
	select {
	case err = <-readyCh:
	case <-p.done:
		err = fmt.Errorf("the BMC process exited: %w (see %s)", p.err, filepath.Join(dir, "bmcs.log"))
	case <-ctx.Done():
		err = ctx.Err()
	}
	if err != nil {
		p.stop()
		return nil, bmcsReady{}, err
	}
	return p, ready, nil
}

// start runs cmd with its stderr (and stdout, unless taken) in dir/<name>.log and stdin held
// open: children exit when it closes.
func start(name string, cmd *exec.Cmd, dir string) (*process, error) {
	logFile, err := os.Create(filepath.Join(dir, name+".log"))
	if err != nil {
		return nil, err
	}
	cmd.Stderr = logFile
	if cmd.Stdout == nil {
		cmd.Stdout = logFile
	}
	stdin, err := cmd.StdinPipe()
	if err != nil {
		_ = logFile.Close()
		return nil, err
	}
	if err := cmd.Start(); err != nil {
		_ = logFile.Close()
		return nil, err
	}
	p := &process{name: name, cmd: cmd, stdin: stdin, done: make(chan struct{})}
	go func() { p.err = cmd.Wait(); _ = logFile.Close(); close(p.done) }()
	return p, nil
}

func (p *process) pid() int { return p.cmd.Process.Pid }

// exited reports whether the process died early.
func (p *process) exited() error {
	select {
	case <-p.done:
		return fmt.Errorf("%s exited: %w", p.name, p.err)
	default:
		return nil
	}
}

// stop closes stdin, then interrupts, then kills, waiting a few seconds between.
func (p *process) stop() {
	_ = p.stdin.Close()
	_ = p.cmd.Process.Signal(os.Interrupt)
	select {
	case <-p.done:
	case <-time.After(10 * time.Second):
		_ = p.cmd.Process.Kill()
		<-p.done
	}
}

// buildManager builds cmd/manager (what is deployed) into dir.
func buildManager(ctx context.Context, dir string) (string, error) {
	root, err := repoRoot()
	if err != nil {
		return "", err
	}
	out := filepath.Join(dir, "manager")
	cmd := exec.CommandContext(ctx, "go", "build", "-trimpath", "-o", out, "./cmd/manager") //nolint:gosec // the go tool, building this repository
	cmd.Dir = root
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if b, err := cmd.CombinedOutput(); err != nil {
		return "", fmt.Errorf("building cmd/manager: %w\n%s", err, b)
	}
	return out, nil
}

func repoRoot() (string, error) {
	out, err := exec.Command("go", "env", "GOMOD").Output()
	if err != nil {
		return "", err
	}
	mod := strings.TrimSpace(string(out))
	if mod == "" || mod == os.DevNull {
		return "", errors.New("run the benchmark from the repository (go env GOMOD is empty)")
	}
	return filepath.Dir(mod), nil
}

// cpuByProcess is CPU seconds by process: this one (which also creates the objects and
// watches them) and its children.
func cpuByProcess(labels map[int]string) map[string]float64 {
	return apimeter.CPUByProcess("bench (creates, watches)", labels)
}

// loadAverage is the 1, 5 and 15 minute load averages of /proc/loadavg.
func loadAverage() string {
	raw, err := os.ReadFile("/proc/loadavg")
	if err != nil {
		return "unknown"
	}
	f := strings.Fields(string(raw))
	if len(f) < 3 {
		return "unknown"
	}
	return strings.Join(f[:3], " ")
}
