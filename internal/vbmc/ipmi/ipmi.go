// Package ipmi runs emulated IPMI BMCs for tests, benchmarks and the demo lab.
//
// The IPMI side is OpenIPMI's real simulator, ipmi_sim (Debian package
// openipmi), so clients talk RMCP+ (ipmitool -I lanplus, bmclib's ipmitool
// provider) to a genuine IPMI stack rather than to a protocol imitation of
// ours. What ipmi_sim cannot know — the server's power and boot override —
// lives in a machine.Machine in this process: ipmi_sim's chassis_control hook
// is a generated bash script that forwards each request over loopback TCP to a
// small endpoint served here (see control.go for why TCP and not a unix socket).
//
// One BMC is one ipmi_sim process (3.6 MB RSS, 2 MB of it private) that
// starts in about 10 ms, so labs and benchmarks can run a hundred. Clients
// must name cipher suite 3 (ipmitool -C 3, bmclib WithIpmitoolCipherSuite):
// ipmitool otherwise spends 10 s discovering suites, and ipmi_sim has no 17.
package ipmi

import (
	"bufio"
	"context"
	"crypto/rand"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/anvil-metal/cluster-api-provider-anvil/internal/vbmc/machine"
)

// ErrNotInstalled is returned by Start when ipmi_sim or bash is missing.
// Tests skip on it; hack/install-test-deps.sh installs the packages.
var ErrNotInstalled = errors.New("ipmi: ipmi_sim (Debian package openipmi) or bash is not installed")

// Config configures one emulated BMC. The zero value is usable: 127.0.0.1, a
// free UDP port, user admin with password "password", a new powered-off machine.
type Config struct {
	// Machine is the server this BMC controls. Nil makes a new one, powered off.
	// Pass one to share it with another emulator or to watch its events.
	Machine *machine.Machine
	// Addr is the IPv4 address the BMC listens on; default 127.0.0.1.
	Addr string
	// Port is the UDP port; 0 picks a free one.
	Port int
	// Username and Password are the one (admin) account; defaults "admin" and
	// "password". IPMI limits them to 16 and 20 bytes.
	Username, Password string
	// StateDir is where ipmi_sim persists users, SEL and SDRs. Empty means a
	// temporary directory removed by Stop. Give each BMC its own. When it is
	// reused, users changed over IPMI earlier win over Username and Password,
	// as on a real BMC that keeps its configuration.
	StateDir string
	// FRU is the inventory that `ipmitool fru print` shows; empty fields get
	// defaults (see FRU).
	FRU FRU
}

// BMC is one running ipmi_sim and the endpoint that connects it to a Machine.
// Its methods are safe for concurrent use.
type BMC struct {
	machine *machine.Machine
	addr    string
	port    int

	cmd     *exec.Cmd
	stdin   *os.File      // write end of ipmi_sim's stdin; closing it makes ipmi_sim exit
	exited  chan struct{} // closed when ipmi_sim has exited and been reaped
	waitErr error         // ipmi_sim's exit status, valid after exited is closed
	out     *simOutput
	ctl     *control
	tmpDir  string // removed by Stop

	stopOnce sync.Once
	stopErr  error
	stopped  chan struct{} // closed by Stop
}

// Port returns the UDP port the BMC listens on.
func (b *BMC) Port() int { return b.port }

// Host returns the address the BMC listens on, without the port.
func (b *BMC) Host() string { return b.addr }

// Address returns the BMC's address as Anvil's BMC references spell it:
// ipmi://HOST:PORT.
func (b *BMC) Address() string {
	return "ipmi://" + net.JoinHostPort(b.addr, strconv.Itoa(b.port))
}

// Machine returns the server this BMC controls.
func (b *BMC) Machine() *machine.Machine { return b.machine }

// pid is for tests that check no process outlives its BMC.
func (b *BMC) pid() int { return b.cmd.Process.Pid }

// startTimeout bounds how long ipmi_sim may take to answer its first ping;
// it usually takes about 10 ms.
const startTimeout = 10 * time.Second

// Start runs an emulated BMC until Stop is called or ctx is done. It returns
// once the BMC answers on the network.
func Start(ctx context.Context, cfg Config) (*BMC, error) {
	if err := ctx.Err(); err != nil {
		return nil, fmt.Errorf("ipmi: %w", err)
	}
	sim, err := exec.LookPath("ipmi_sim")
	if err != nil {
		return nil, fmt.Errorf("%w: %w", ErrNotInstalled, err)
	}
	bash, err := exec.LookPath("bash")
	if err != nil {
		return nil, fmt.Errorf("%w: %w", ErrNotInstalled, err)
	}
	if cfg.Machine == nil {
		cfg.Machine = machine.New(machine.Config{})
	}
	if cfg.Addr == "" {
		cfg.Addr = "127.0.0.1"
	}
	if ip := net.ParseIP(cfg.Addr); ip == nil || ip.To4() == nil {
		return nil, fmt.Errorf("ipmi: address %q is not an IPv4 address", cfg.Addr)
	}
	if cfg.Port < 0 || cfg.Port > 65535 {
		return nil, fmt.Errorf("ipmi: port %d out of range", cfg.Port)
	}
	if cfg.Username == "" {
		cfg.Username = "admin"
	}
	if cfg.Password == "" {
		cfg.Password = "password"
	}
	if err := checkCredentials(cfg.Username, cfg.Password); err != nil {
		return nil, err
	}

	tmp, err := os.MkdirTemp("", "anvil-ipmi-")
	if err != nil {
		return nil, fmt.Errorf("ipmi: %w", err)
	}
	// Paths go into ipmi_sim's config files, inside double quotes.
	if strings.ContainsAny(tmp, "\" \t\n\\") {
		_ = os.RemoveAll(tmp)
		return nil, fmt.Errorf("ipmi: temporary directory %q has characters ipmi_sim's config cannot quote", tmp)
	}
	stateDir := cfg.StateDir
	if stateDir == "" {
		stateDir = filepath.Join(tmp, "state")
	}
	if err := os.MkdirAll(stateDir, 0o700); err != nil {
		_ = os.RemoveAll(tmp)
		return nil, fmt.Errorf("ipmi: state dir: %w", err)
	}

	ctl, err := newControl(cfg.Machine)
	if err != nil {
		_ = os.RemoveAll(tmp)
		return nil, err
	}
	files, err := writeConfigFiles(tmp, bash, ctl, cfg)
	if err != nil {
		ctl.close()
		_ = os.RemoveAll(tmp)
		return nil, err
	}

	// With Port 0 the port is picked by binding and releasing it, so another
	// process may take it before ipmi_sim binds: retry with a new one then.
	var b *BMC
	for attempt := 0; ; attempt++ {
		port := cfg.Port
		if port == 0 {
			if port, err = freeUDPPort(cfg.Addr); err != nil {
				break
			}
		}
		if err = writeLANConf(files, cfg, port); err != nil {
			break
		}
		b, err = launch(ctx, sim, files, stateDir, cfg, port, ctl)
		if err == nil || cfg.Port != 0 || attempt == 4 || !errors.Is(err, errPortInUse) {
			break
		}
	}
	if err != nil {
		ctl.close()
		_ = os.RemoveAll(tmp)
		return nil, err
	}
	b.tmpDir = tmp
	// Stop on ctx's end, so a test's context or a lab's signal handling
	// cleans up even when the caller forgets Stop.
	go func() {
		select {
		case <-ctx.Done():
			_ = b.Stop()
		case <-b.stopped:
		}
	}()
	return b, nil
}

// errPortInUse marks a start that failed because the UDP port was taken.
var errPortInUse = errors.New("UDP port in use")

// launch starts ipmi_sim and waits until it answers an RMCP ping.
func launch(ctx context.Context, sim string, files configFiles, stateDir string, cfg Config, port int, ctl *control) (*BMC, error) {
	// ipmi_sim runs with its console on (no -n): that is the only way to get
	// its decoded message trace (the emu file's "debug msg"), which carries
	// the boot flags and chassis control codes the hook is not given.
	// The console reads stdin, and ipmi_sim exits when stdin reaches EOF. The
	// write end stays in this process only, so if this process dies — even by
	// SIGKILL, when no cleanup runs — ipmi_sim exits too: no leaked simulators.
	stdinR, stdinW, err := os.Pipe()
	if err != nil {
		return nil, fmt.Errorf("ipmi: %w", err)
	}
	// stdout and stderr share one pipe so that the hook's sync marker (written
	// to the stderr it inherits from ipmi_sim) lands in order with the trace.
	outR, outW, err := os.Pipe()
	if err != nil {
		_ = stdinR.Close()
		_ = stdinW.Close()
		return nil, fmt.Errorf("ipmi: %w", err)
	}
	cmd := exec.Command(sim, "-c", files.lanConf, "-f", files.emu, "-s", stateDir) //nolint:gosec // ipmi_sim from PATH with our own files
	cmd.Stdin, cmd.Stdout, cmd.Stderr = stdinR, outW, outW
	cmd.Dir = files.dir
	// Its own process group, so Stop also kills a hook caught mid-call.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := cmd.Start(); err != nil {
		_ = stdinR.Close()
		_ = stdinW.Close()
		_ = outR.Close()
		_ = outW.Close()
		return nil, fmt.Errorf("ipmi: start ipmi_sim: %w", err)
	}
	// The child has its copies; ours would keep the pipes open forever.
	_ = stdinR.Close()
	_ = outW.Close()

	b := &BMC{
		machine: cfg.Machine, addr: cfg.Addr, port: port,
		cmd: cmd, stdin: stdinW, exited: make(chan struct{}), stopped: make(chan struct{}),
		out: newSimOutput(outR, ctl.trace), ctl: ctl,
	}
	go func() {
		b.waitErr = cmd.Wait()
		close(b.exited)
	}()

	startCtx, cancel := context.WithTimeout(ctx, startTimeout)
	defer cancel()
	err = waitReady(startCtx, cfg.Addr, port, cmd.Process.Pid, b.exited)
	if err == nil {
		return b, nil
	}
	b.kill()
	<-b.out.done // all output read: the tail below is complete
	tail := b.out.tail()
	if strings.Contains(tail, "Unable to bind") && !errors.Is(err, errPortInUse) {
		err = fmt.Errorf("%w: %w", errPortInUse, err)
	}
	return nil, fmt.Errorf("ipmi: ipmi_sim on %s:%d did not come up: %w\n%s", cfg.Addr, port, err, tail)
}

// Stop ends ipmi_sim and the control endpoint and removes the temporary
// files. It returns an error if ipmi_sim had died before Stop was called.
// Calling it again returns the same result.
func (b *BMC) Stop() error {
	b.stopOnce.Do(func() {
		defer close(b.stopped)
		select {
		case <-b.exited:
			why := b.waitErr
			if why == nil {
				why = errors.New("exit status 0")
			}
			b.stopErr = fmt.Errorf("ipmi: ipmi_sim had exited: %w\n%s", why, b.out.tail())
		default:
		}
		b.kill()
		<-b.out.done
		b.ctl.close()
		if err := os.RemoveAll(b.tmpDir); err != nil && b.stopErr == nil {
			b.stopErr = fmt.Errorf("ipmi: %w", err)
		}
	})
	return b.stopErr
}

// kill ends ipmi_sim and any hook it is running, and waits until it is reaped.
func (b *BMC) kill() {
	// EOF on stdin makes ipmi_sim exit at once and cleanly; SIGKILL to the
	// group is the backstop, and also takes hooks that ipmi_sim left behind.
	_ = b.stdin.Close()
	select {
	case <-b.exited:
	case <-time.After(time.Second):
	}
	_ = syscall.Kill(-b.cmd.Process.Pid, syscall.SIGKILL)
	<-b.exited
}

// waitReady waits until ipmi_sim (process pid) has bound the port and
// answers a ping, or it exits, or ctx ends.
func waitReady(ctx context.Context, addr string, port, pid int, exited <-chan struct{}) error {
	conn, err := net.Dial("udp", net.JoinHostPort(addr, strconv.Itoa(port)))
	if err != nil {
		return err
	}
	defer conn.Close()
	for {
		// ipmi_sim sets SO_REUSEADDR, so a second ipmi_sim on a port binds
		// it too and silently takes some of the first one's traffic; and a
		// ping may be answered by the other one. So check the sockets.
		mine, others, err := udpSockets(addr, port, pid)
		switch {
		case err != nil:
			mine = true // No /proc: trust the ping.
		case mine && others > 0:
			return fmt.Errorf("%w: another socket is bound to %s:%d too", errPortInUse, addr, port)
		}
		if mine && rmcpPing(conn, 50*time.Millisecond) {
			return nil
		}
		select {
		case <-exited:
			return errors.New("ipmi_sim exited")
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(10 * time.Millisecond):
		}
	}
}

// rmcpPing sends an ASF presence ping (the RMCP-level "are you there" that
// every IPMI-over-LAN BMC answers, without a session) and waits for the pong.
func rmcpPing(conn net.Conn, timeout time.Duration) bool {
	const tag = 0x42
	ping := []byte{
		0x06, 0x00, 0xff, 0x06, // RMCP v1.0, no ack, class ASF
		0x00, 0x00, 0x11, 0xbe, // ASF IANA enterprise number 4542
		0x80, tag, 0x00, 0x00, // presence ping, tag, reserved, no data
	}
	if _, err := conn.Write(ping); err != nil {
		return false
	}
	_ = conn.SetReadDeadline(time.Now().Add(timeout))
	buf := make([]byte, 64)
	n, err := conn.Read(buf)
	// A refused port shows up here as an error until ipmi_sim binds it.
	return err == nil && n >= 10 && buf[3] == 0x06 && buf[8] == 0x40 && buf[9] == tag
}

// freeUDPPort returns a UDP port that was free a moment ago.
func freeUDPPort(addr string) (int, error) {
	c, err := net.ListenPacket("udp4", net.JoinHostPort(addr, "0"))
	if err != nil {
		return 0, fmt.Errorf("ipmi: pick a port: %w", err)
	}
	defer c.Close()
	return c.LocalAddr().(*net.UDPAddr).Port, nil
}

// udpSockets reports whether process pid has a UDP socket bound to port on
// addr (or on the wildcard address), and how many other sockets are, from
// /proc/net/udp and /proc/PID/fd.
func udpSockets(addr string, port, pid int) (mine bool, others int, err error) {
	data, err := os.ReadFile("/proc/net/udp")
	if err != nil {
		return false, 0, err
	}
	fds, err := os.ReadDir(fmt.Sprintf("/proc/%d/fd", pid))
	if err != nil {
		return false, 0, err
	}
	owned := make(map[string]bool)
	for _, fd := range fds {
		if l, err := os.Readlink(fmt.Sprintf("/proc/%d/fd/%s", pid, fd.Name())); err == nil {
			owned[l] = true
		}
	}
	want := net.ParseIP(addr).To4()
	for _, line := range strings.Split(string(data), "\n")[1:] {
		// "  12: 0100007F:3F46 00000000:0000 07 ... 0 0 163522 2 ..."; the
		// address is the in-memory (network order) word printed as a
		// host-order number; field 9 is the socket's inode.
		fields := strings.Fields(line)
		if len(fields) < 10 {
			continue
		}
		a, p, ok := strings.Cut(fields[1], ":")
		if !ok || len(a) != 8 {
			continue
		}
		ip, err1 := strconv.ParseUint(a, 16, 32)
		pt, err2 := strconv.ParseUint(p, 16, 16)
		if err1 != nil || err2 != nil || int(pt) != port {
			continue
		}
		b := net.IP(binary.NativeEndian.AppendUint32(nil, uint32(ip)))
		if !b.Equal(want) && !b.Equal(net.IPv4zero) {
			continue
		}
		if owned["socket:["+fields[9]+"]"] {
			mine = true
		} else {
			others++
		}
	}
	return mine, others, nil
}

func checkCredentials(user, pass string) error {
	// IPMI 2.0 limits: 16-byte user names, 20-byte passwords. Quotes,
	// backslashes and control characters cannot be written into lan.conf.
	if len(user) > 16 {
		return fmt.Errorf("ipmi: user name %q is longer than IPMI's 16 bytes", user)
	}
	if len(pass) > 20 {
		return errors.New("ipmi: password is longer than IPMI's 20 bytes")
	}
	for _, s := range []string{user, pass} {
		for _, r := range s {
			if r < 0x20 || r > 0x7e || r == '"' || r == '\\' {
				return errors.New("ipmi: user name and password must be printable ASCII without quotes or backslashes")
			}
		}
	}
	return nil
}

// randomHex returns n random bytes, hex-encoded.
func randomHex(n int) string {
	b := make([]byte, n)
	_, _ = rand.Read(b) // never fails (crypto/rand documents it)
	return hex.EncodeToString(b)
}

// simOutput drains ipmi_sim's console (it would block once the pipe is
// full), feeds the trace parser, and keeps the last lines for error messages.
type simOutput struct {
	done chan struct{} // closed at EOF: ipmi_sim and its hooks are gone

	mu    sync.Mutex
	lines []string
}

const outputTailLines = 30

func newSimOutput(r *os.File, tr *trace) *simOutput {
	o := &simOutput{done: make(chan struct{})}
	go func() {
		defer close(o.done)
		defer r.Close()
		sc := bufio.NewScanner(r)
		sc.Buffer(make([]byte, 64*1024), 1024*1024)
		for sc.Scan() {
			line := sc.Text()
			tr.line(line)
			o.mu.Lock()
			if len(o.lines) == outputTailLines {
				o.lines = append(o.lines[:0:0], o.lines[1:]...)
			}
			o.lines = append(o.lines, line)
			o.mu.Unlock()
		}
		// A line longer than the buffer ends the scan: keep draining so
		// that ipmi_sim never blocks on a full pipe.
		_, _ = io.Copy(io.Discard, r)
	}()
	return o
}

func (o *simOutput) tail() string {
	o.mu.Lock()
	defer o.mu.Unlock()
	return "ipmi_sim output (last lines):\n" + strings.Join(o.lines, "\n")
}
