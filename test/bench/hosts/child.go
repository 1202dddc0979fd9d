package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"time"
)

// childEnv carries a childSpec (JSON) to a re-executed copy of this binary: set, the binary
// plays that role instead of running the benchmark. An environment variable rather than a
// flag, so that the test binary can play the roles too.
const childEnv = "ANVIL_BENCH_CHILD"

// childSpec tells a child process what to run.
type childSpec struct {
	Role      string // roleBMCs or roleManager
	ReadyFile string // written (atomically) once the child serves

	// BMCs.
	BMCs        int
	TLS         bool
	MaxSessions int

	// Manager.
	Kubeconfig      string
	LogFile         string
	ProfileDir      string // where /cpuprofile/start?name=onboard|steady writes its profile
	HostConcurrency int
	BMCConcurrency  int
	QPS             float32 // 0 keeps ctrl.GetConfig's (client-side limiter off), as cmd/manager does
	Burst           int
	LeaderElect     bool
	PowerSync       time.Duration
	BMCIdleTimeout  time.Duration
	// BMCConnIdleTimeout is the pool's ConnIdleTimeout, scaled like the intervals it is
	// measured against (kept-alive connections close between power polls in production).
	BMCConnIdleTimeout time.Duration
	BMCTimeout         time.Duration
	LeaderElectionNS   string
}

const (
	roleBMCs    = "bmcs"
	roleManager = "manager"
)

// childMain runs the role named in the environment, if any. It returns false when this
// process is not a child.
func childMain() bool {
	raw := os.Getenv(childEnv)
	if raw == "" {
		return false
	}
	var spec childSpec
	if err := json.Unmarshal([]byte(raw), &spec); err != nil {
		fmt.Fprintln(os.Stderr, "bad", childEnv, err)
		os.Exit(2)
	}
	ctx, cancel := context.WithCancel(context.Background())
	// The parent holds our stdin open for as long as it wants us: EOF (it closed the pipe or
	// died) ends the child, so no emulator or manager outlives a crashed benchmark.
	go func() {
		_, _ = io.Copy(io.Discard, os.Stdin)
		cancel()
	}()
	var err error
	switch spec.Role {
	case roleBMCs:
		err = runBMCs(ctx, spec)
	case roleManager:
		err = runManager(ctx, spec)
	default:
		err = fmt.Errorf("unknown role %q", spec.Role)
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, spec.Role+":", err)
		os.Exit(1)
	}
	os.Exit(0)
	return true
}

// child is a running child process.
type child struct {
	name  string
	cmd   *exec.Cmd
	stdin io.WriteCloser
	done  chan struct{}
	err   error
	// stderr keeps the child's error output for the report when it fails.
	stderr *bytes.Buffer
}

// startChild re-executes this binary in a role and waits until it has written its ready
// file, which it decodes into ready.
func startChild(ctx context.Context, name string, spec childSpec, dir string, ready any, timeout time.Duration) (*child, error) {
	exe, err := os.Executable()
	if err != nil {
		return nil, err
	}
	spec.ReadyFile = filepath.Join(dir, name+".ready.json")
	raw, err := json.Marshal(spec)
	if err != nil {
		return nil, err
	}
	cmd := exec.Command(exe) //nolint:gosec // re-executes this very binary
	cmd.Env = append(os.Environ(), childEnv+"="+string(raw))
	stdin, err := cmd.StdinPipe()
	if err != nil {
		return nil, err
	}
	c := &child{name: name, cmd: cmd, stdin: stdin, done: make(chan struct{}), stderr: &bytes.Buffer{}}
	cmd.Stderr = &limitedWriter{w: c.stderr, n: 64 << 10}
	// klog (client-go's reflectors, leader election) writes to stderr, not to the manager's log.
	stderrFile, err := os.Create(filepath.Join(dir, name+".stderr"))
	if err != nil {
		return nil, err
	}
	cmd.Stderr = io.MultiWriter(cmd.Stderr, stderrFile)
	if err := cmd.Start(); err != nil {
		_ = stderrFile.Close()
		return nil, err
	}
	go func() { c.err = cmd.Wait(); _ = stderrFile.Close(); close(c.done) }()

	deadline := time.Now().Add(timeout)
	for {
		if b, err := os.ReadFile(spec.ReadyFile); err == nil {
			if err := json.Unmarshal(b, ready); err != nil {
				c.stop()
				return nil, fmt.Errorf("%s: ready file: %w", name, err)
			}
			return c, nil
		}
		select {
		case <-c.done:
			return nil, fmt.Errorf("%s exited before it was ready: %w\n%s", name, c.err, c.stderr.String())
		case <-ctx.Done():
			c.stop()
			return nil, ctx.Err()
		case <-time.After(50 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			c.stop()
			return nil, fmt.Errorf("%s not ready after %s\n%s", name, timeout, c.stderr.String())
		}
	}
}

func (c *child) pid() int { return c.cmd.Process.Pid }

// exited reports whether the child has died, and why.
func (c *child) exited() error {
	select {
	case <-c.done:
		return fmt.Errorf("%s exited: %w\n%s", c.name, c.err, c.stderr.String())
	default:
		return nil
	}
}

// stop closes the child's stdin (it exits on EOF) and kills it if it has not gone in 5 s.
func (c *child) stop() {
	_ = c.stdin.Close()
	select {
	case <-c.done:
	case <-time.After(5 * time.Second):
		_ = c.cmd.Process.Kill()
		<-c.done
	}
}

type limitedWriter struct {
	w io.Writer
	n int
}

func (l *limitedWriter) Write(p []byte) (int, error) {
	if l.n > 0 {
		q := p
		if len(q) > l.n {
			q = q[:l.n]
		}
		n, _ := l.w.Write(q)
		l.n -= n
	}
	return len(p), nil
}

// writeReady writes v as JSON to path atomically, so the parent never reads half of it.
func writeReady(path string, v any) error {
	raw, err := json.Marshal(v)
	if err != nil {
		return err
	}
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, raw, 0o600); err != nil {
		return err
	}
	return os.Rename(tmp, path)
}

// serveStats serves mux on a loopback port until ctx ends and returns its address.
func serveStats(ctx context.Context, mux *http.ServeMux) (string, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return "", err
	}
	srv := &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second}
	go func() { _ = srv.Serve(ln) }()
	go func() { <-ctx.Done(); _ = srv.Close() }()
	return ln.Addr().String(), nil
}

var statsClient = &http.Client{Timeout: 2 * time.Minute}

// getJSON fetches http://addr/path into v.
func getJSON(ctx context.Context, addr, path string, v any) error {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+addr+path, nil)
	if err != nil {
		return err
	}
	resp, err := statsClient.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		b, _ := io.ReadAll(resp.Body)
		return fmt.Errorf("GET %s: %s: %s", path, resp.Status, bytes.TrimSpace(b))
	}
	if v == nil {
		return nil
	}
	return json.NewDecoder(resp.Body).Decode(v)
}

// fetchToFile saves http://addr/path to file.
func fetchToFile(ctx context.Context, addr, path, file string) error {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+addr+path, nil)
	if err != nil {
		return err
	}
	resp, err := statsClient.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return errors.New("GET " + path + ": " + resp.Status)
	}
	f, err := os.Create(file)
	if err != nil {
		return err
	}
	if _, err := io.Copy(f, resp.Body); err != nil {
		_ = f.Close()
		return err
	}
	return f.Close()
}
