// Package netns builds throwaway network namespaces for tests: hosts joined by a veth pair or
// by a bridge, each with its own interface, addresses and routing table.
//
// Tests that speak real protocols to real peers (DHCP broadcasts, TFTP, load generators) need
// links that reach nothing but each other. A namespace gives exactly that: whatever a test
// sends stays inside namespaces it made, and they are deleted when the test ends.
//
// Everything here shells out to iproute2 (`ip`), which is what a person would type and what
// every Debian machine has. Tests are skipped, not failed, where namespaces can't be made
// (not root, no `ip`).
package netns

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// Prefix starts the name of every namespace this package makes. The rest of the name is the
// owning process's pid and start time (so a later run can tell that the owner is gone and the
// namespace leaked) and a random part (so parallel tests in one process never collide).
const Prefix = "anvt-"

// runDir is where iproute2 keeps named namespaces.
const runDir = "/run/netns"

// Check reports why namespaces can't be made here, or nil if they can.
func Check() error {
	if os.Geteuid() != 0 {
		return errors.New("network namespaces need root")
	}
	if _, err := exec.LookPath("ip"); err != nil {
		return errors.New("iproute2 (`ip`) is not installed")
	}
	return nil
}

// Require skips the test unless namespaces can be made here.
func Require(t testing.TB) {
	t.Helper()
	if err := Check(); err != nil {
		t.Skip(err)
	}
}

// Namespace is one named network namespace with its loopback up.
type Namespace struct {
	Name string
}

// New makes a namespace that is deleted when the test ends. It skips the test where
// namespaces can't be made.
func New(t testing.TB) *Namespace {
	t.Helper()
	Require(t)
	sweep()
	name, err := newName()
	if err != nil {
		t.Fatal(err)
	}
	if out, err := ipCmd("netns", "add", name); err != nil {
		t.Fatalf("ip netns add %s: %v: %s", name, err, out)
	}
	ns := &Namespace{Name: name}
	t.Cleanup(func() { ns.delete(t) })
	if err := ns.IP("link", "set", "lo", "up"); err != nil {
		t.Fatal(err)
	}
	return ns
}

func (n *Namespace) delete(t testing.TB) {
	// Deleting the name drops the namespace once nothing runs inside it; its links go with it.
	if out, err := ipCmd("netns", "del", n.Name); err != nil {
		t.Errorf("ip netns del %s: %v: %s", n.Name, err, out)
	}
}

// IP runs `ip -n NAME args...` and returns its error with its output.
func (n *Namespace) IP(args ...string) error {
	out, err := ipCmd(append([]string{"-n", n.Name}, args...)...)
	if err != nil {
		return fmt.Errorf("ip -n %s %s: %w: %s", n.Name, strings.Join(args, " "), err, bytes.TrimSpace(out))
	}
	return nil
}

// Command returns a command that runs inside the namespace (`ip netns exec NAME ...`). It is
// killed when ctx ends, and also if the test process dies first, so no peer outlives a test.
func (n *Namespace) Command(ctx context.Context, name string, args ...string) *exec.Cmd {
	//nolint:gosec // a test helper: it runs what its caller names, inside the namespace
	cmd := exec.CommandContext(ctx, "ip", append([]string{"netns", "exec", n.Name, name}, args...)...)
	// `ip netns exec` execs the command in place, so the death signal reaches the peer itself.
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	cmd.WaitDelay = 5 * time.Second
	return cmd
}

// Run runs a command inside the namespace and returns its combined output.
func (n *Namespace) Run(ctx context.Context, name string, args ...string) ([]byte, error) {
	out, err := n.Command(ctx, name, args...).CombinedOutput()
	if err != nil {
		return out, fmt.Errorf("%s %s in %s: %w: %s", name, strings.Join(args, " "), n.Name, err, bytes.TrimSpace(out))
	}
	return out, nil
}

// Do runs fn on an OS thread that has entered the namespace. Sockets that fn opens belong to
// the namespace for their whole life, whichever thread uses them later; that is how a test
// runs an in-process server on a namespace's interface.
//
// Only fn's own thread is inside: goroutines that fn starts are not. Afterwards the thread
// goes back to its own namespace; if that fails it is thrown away (its goroutine ends locked),
// so no other goroutine can ever run in the wrong namespace. Threads are kept when possible
// because a thread's exit would also kill the children it started (Command's death signal).
func (n *Namespace) Do(fn func() error) error {
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		home, err := os.Open("/proc/thread-self/ns/net")
		if err != nil {
			errc <- err
			runtime.UnlockOSThread()
			return
		}
		defer home.Close()
		target, err := os.Open(filepath.Join(runDir, n.Name))
		if err != nil {
			errc <- err
			runtime.UnlockOSThread()
			return
		}
		defer target.Close()
		if err := unix.Setns(int(target.Fd()), unix.CLONE_NEWNET); err != nil {
			errc <- fmt.Errorf("setns %s: %w", n.Name, err)
			runtime.UnlockOSThread()
			return
		}
		err = fn()
		if rerr := unix.Setns(int(home.Fd()), unix.CLONE_NEWNET); rerr == nil {
			runtime.UnlockOSThread()
		}
		errc <- err
	}()
	return <-errc
}

// Host is a namespace with one Ethernet interface on a test network.
type Host struct {
	*Namespace
	// Link is the interface's name inside the namespace.
	Link string
	// Addr is the interface's address; the zero Prefix means the interface has none (a DHCP
	// client's starting point).
	Addr netip.Prefix
	// MAC is the interface's hardware address.
	MAC net.HardwareAddr
}

// HostConfig describes one host of a test network.
type HostConfig struct {
	// Addr to put on the interface; the zero Prefix leaves it unconfigured.
	Addr netip.Prefix
	// MAC to give the interface; nil lets the kernel pick a random one.
	MAC net.HardwareAddr
}

// NewPair makes two hosts joined by a veth pair, both links up: the simplest network, with
// nothing else on the wire.
func NewPair(t testing.TB, a, b HostConfig) (*Host, *Host) {
	t.Helper()
	nsA, nsB := New(t), New(t)
	const link = "eth0"
	if err := nsA.IP("link", "add", link, "type", "veth", "peer", "name", link, "netns", nsB.Name); err != nil {
		t.Fatal(err)
	}
	ha, err := setUp(nsA, link, a)
	if err != nil {
		t.Fatal(err)
	}
	hb, err := setUp(nsB, link, b)
	if err != nil {
		t.Fatal(err)
	}
	for _, h := range []*Host{ha, hb} {
		if err := h.WaitUp(); err != nil {
			t.Fatal(err)
		}
	}
	return ha, hb
}

// NewLAN makes one host per config, all plugged into a bridge that lives in a namespace of its
// own: a switched segment where every host sees every broadcast, as on a real provisioning
// network with several DHCP servers and clients.
func NewLAN(t testing.TB, hosts ...HostConfig) []*Host {
	t.Helper()
	sw := New(t)
	if err := sw.IP("link", "add", "br0", "type", "bridge"); err != nil {
		t.Fatal(err)
	}
	// No STP and no forwarding delay: ports forward at once, as an edge switch port would
	// (PortFast); otherwise the first seconds of DHCP traffic are lost.
	if err := sw.IP("link", "set", "br0", "type", "bridge", "stp_state", "0", "forward_delay", "0"); err != nil {
		t.Fatal(err)
	}
	if err := sw.IP("link", "set", "br0", "up"); err != nil {
		t.Fatal(err)
	}
	out := make([]*Host, 0, len(hosts))
	for i, hc := range hosts {
		ns := New(t)
		port := "p" + strconv.Itoa(i)
		const link = "eth0"
		if err := sw.IP("link", "add", port, "type", "veth", "peer", "name", link, "netns", ns.Name); err != nil {
			t.Fatal(err)
		}
		if err := sw.IP("link", "set", port, "master", "br0", "up"); err != nil {
			t.Fatal(err)
		}
		h, err := setUp(ns, link, hc)
		if err != nil {
			t.Fatal(err)
		}
		if err := h.WaitUp(); err != nil {
			t.Fatal(err)
		}
		out = append(out, h)
	}
	return out
}

func setUp(ns *Namespace, link string, hc HostConfig) (*Host, error) {
	if hc.MAC != nil {
		if err := ns.IP("link", "set", link, "address", hc.MAC.String()); err != nil {
			return nil, err
		}
	}
	if hc.Addr.IsValid() {
		if err := ns.IP("addr", "add", hc.Addr.String(), "dev", link); err != nil {
			return nil, err
		}
	}
	if err := ns.IP("link", "set", link, "up"); err != nil {
		return nil, err
	}
	mac, err := linkMAC(ns, link)
	if err != nil {
		return nil, err
	}
	return &Host{Namespace: ns, Link: link, Addr: hc.Addr, MAC: mac}, nil
}

func linkMAC(ns *Namespace, link string) (net.HardwareAddr, error) {
	out, err := ipCmd("-n", ns.Name, "-j", "link", "show", "dev", link)
	if err != nil {
		return nil, fmt.Errorf("ip link show %s in %s: %w: %s", link, ns.Name, err, out)
	}
	var links []struct {
		Address string `json:"address"`
	}
	if err := json.Unmarshal(out, &links); err != nil || len(links) != 1 {
		return nil, fmt.Errorf("ip link show %s in %s: unexpected output %q", link, ns.Name, out)
	}
	return net.ParseMAC(links[0].Address)
}

// WaitUp waits until the kernel passes traffic on the host's link. A link whose carrier has
// just come on transmits through the "noop" queueing discipline, which drops every packet,
// until the kernel's link watcher activates it — up to a second later under load — and the
// watcher sets the operational state to UP in the same step. Tests that send a burst at
// once (a load generator) would otherwise lose its start.
func (h *Host) WaitUp() error {
	deadline := time.Now().Add(5 * time.Second)
	for {
		out, err := ipCmd("-n", h.Name, "-j", "link", "show", "dev", h.Link)
		if err != nil {
			return fmt.Errorf("ip link show %s in %s: %w: %s", h.Link, h.Name, err, out)
		}
		var links []struct {
			Operstate string `json:"operstate"`
		}
		if err := json.Unmarshal(out, &links); err == nil && len(links) == 1 && links[0].Operstate == "UP" {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("link %s in %s did not come up: %s", h.Link, h.Name, out)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// AddAddr puts another address on the host's interface (a DHCP client test does that itself
// once it holds a lease, because nclient4 leaves the interface alone).
func (h *Host) AddAddr(p netip.Prefix) error {
	return h.IP("addr", "add", p.String(), "dev", h.Link)
}

func ipCmd(args ...string) ([]byte, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	return exec.CommandContext(ctx, "ip", args...).CombinedOutput() //nolint:gosec // iproute2 with arguments built here
}

// newName returns Prefix + pid + "-" + process start time + "-" + random hex.
func newName() (string, error) {
	pid := os.Getpid()
	st, err := startTime(pid)
	if err != nil {
		return "", err
	}
	var r [4]byte
	if _, err := rand.Read(r[:]); err != nil {
		return "", err
	}
	return fmt.Sprintf("%s%d-%s-%s", Prefix, pid, st, hex.EncodeToString(r[:])), nil
}

// startTime reads a process's start time (in clock ticks since boot) from /proc: with the pid
// it names a process uniquely, even after the pid is reused.
func startTime(pid int) (string, error) {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return "", err
	}
	// The command name (field 2) may hold spaces and parentheses: count fields after the
	// last ')'. Start time is field 22, so the 20th after it.
	i := bytes.LastIndexByte(b, ')')
	if i < 0 {
		return "", fmt.Errorf("unexpected /proc/%d/stat", pid)
	}
	f := strings.Fields(string(b[i+1:]))
	if len(f) < 20 {
		return "", fmt.Errorf("unexpected /proc/%d/stat", pid)
	}
	return f[19], nil
}

// sweep deletes namespaces that earlier test processes made and could not delete (killed by a
// timeout, say). A namespace is only touched when the process that made it is gone, so tests
// running in parallel, in this process or others, keep theirs.
func sweep() {
	entries, err := os.ReadDir(runDir)
	if err != nil {
		return
	}
	for _, e := range entries {
		rest, ok := strings.CutPrefix(e.Name(), Prefix)
		if !ok {
			continue
		}
		parts := strings.Split(rest, "-")
		if len(parts) != 3 {
			continue
		}
		pid, err := strconv.Atoi(parts[0])
		if err != nil {
			continue
		}
		if st, err := startTime(pid); err == nil && st == parts[1] {
			continue // owner alive
		}
		// Peers a killed test left running would keep the namespace alive: end them first.
		if out, err := ipCmd("netns", "pids", e.Name()); err == nil {
			for _, f := range strings.Fields(string(out)) {
				if pid, err := strconv.Atoi(f); err == nil {
					_ = syscall.Kill(pid, syscall.SIGKILL)
				}
			}
		}
		_, _ = ipCmd("netns", "del", e.Name()) // another sweeper may have won; fine
	}
}
