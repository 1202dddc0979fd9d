// Package netns builds throwaway network namespaces for tests and for the lab: hosts joined by
// a veth pair or by a bridge, each with its own interface, addresses and routing table.
// New, NewPair and NewLAN are the test helpers (deleted when the test ends); Create, AddBridge
// and Plug are the same parts for programs, which delete what they made themselves.
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
	ns, err := Create(Prefix)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := ns.Delete(); err != nil {
			t.Error(err)
		}
	})
	return ns
}

// Create makes a namespace named prefix + the owning process's pid and start time + a random
// part, with its loopback up; the caller deletes it. It first sweeps the namespaces with the
// same prefix whose owner is gone (a run that was killed), so programs that are not tests
// (the lab) clean up after their own killed runs too. prefix must not contain digits after
// its last '-' (it ends with '-').
func Create(prefix string) (*Namespace, error) {
	if err := Check(); err != nil {
		return nil, err
	}
	if !strings.HasSuffix(prefix, "-") {
		return nil, fmt.Errorf("namespace prefix %q must end with '-'", prefix)
	}
	Sweep(prefix)
	name, err := newName(prefix)
	if err != nil {
		return nil, err
	}
	if out, err := ipCmd("netns", "add", name); err != nil {
		return nil, fmt.Errorf("ip netns add %s: %w: %s", name, err, bytes.TrimSpace(out))
	}
	ns := &Namespace{Name: name}
	if err := ns.IP("link", "set", "lo", "up"); err != nil {
		_ = ns.Delete()
		return nil, err
	}
	return ns, nil
}

// Delete removes the namespace. Deleting the name drops the namespace once nothing runs inside
// it; its links (and their veth peers elsewhere) go with it.
func (n *Namespace) Delete() error {
	if out, err := ipCmd("netns", "del", n.Name); err != nil {
		return fmt.Errorf("ip netns del %s: %w: %s", n.Name, err, bytes.TrimSpace(out))
	}
	return nil
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

// DialContext opens a connection from inside the namespace (as net.Dialer.DialContext does):
// the socket is made on a thread that has entered it, so it keeps the namespace's addresses
// and routes for its whole life. It lets an in-process client (the lab's emulated firmware and
// agent) speak from a server's own network.
func (n *Namespace) DialContext(ctx context.Context, network, addr string) (net.Conn, error) {
	var conn net.Conn
	err := n.Do(func() (err error) {
		var d net.Dialer
		conn, err = d.DialContext(ctx, network, addr)
		return err
	})
	return conn, err
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
	if err := sw.AddBridge("br0", netip.Prefix{}); err != nil {
		t.Fatal(err)
	}
	out := make([]*Host, 0, len(hosts))
	for i, hc := range hosts {
		h, err := sw.Plug("br0", "p"+strconv.Itoa(i), New(t), hc)
		if err != nil {
			t.Fatal(err)
		}
		out = append(out, h)
	}
	return out
}

// AddBridge makes a bridge in n, up, with addr on it when addr is valid.
func (n *Namespace) AddBridge(name string, addr netip.Prefix) error {
	if err := n.IP("link", "add", name, "type", "bridge"); err != nil {
		return err
	}
	// No STP and no forwarding delay: ports forward at once, as an edge switch port would
	// (PortFast); otherwise the first seconds of DHCP traffic are lost.
	if err := n.IP("link", "set", name, "type", "bridge", "stp_state", "0", "forward_delay", "0"); err != nil {
		return err
	}
	if addr.IsValid() {
		if err := n.IP("addr", "add", addr.String(), "dev", name); err != nil {
			return err
		}
	}
	return n.IP("link", "set", name, "up")
}

// Plug joins host to the bridge in n with a veth pair: port on the bridge, eth0 in host,
// configured as hc says. It returns once the link passes traffic.
func (n *Namespace) Plug(bridge, port string, host *Namespace, hc HostConfig) (*Host, error) {
	const link = "eth0"
	if err := n.IP("link", "add", port, "type", "veth", "peer", "name", link, "netns", host.Name); err != nil {
		return nil, err
	}
	if err := n.IP("link", "set", port, "master", bridge, "up"); err != nil {
		return nil, err
	}
	h, err := setUp(host, link, hc)
	if err != nil {
		return nil, err
	}
	return h, h.WaitUp()
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

// newName returns prefix + OwnerTag + "-" + random hex.
func newName(prefix string) (string, error) {
	tag, err := OwnerTag()
	if err != nil {
		return "", err
	}
	var r [4]byte
	if _, err := rand.Read(r[:]); err != nil {
		return "", err
	}
	return fmt.Sprintf("%s%s-%s", prefix, tag, hex.EncodeToString(r[:])), nil
}

// OwnerTag is "<pid>-<start time>" of this process. Put into a name (of a namespace, of a
// directory), it lets a later process tell with OwnerGone that the one that made it is gone
// and that what it made is a leftover.
func OwnerTag() (string, error) {
	pid := os.Getpid()
	st, err := startTime(pid)
	if err != nil {
		return "", err
	}
	return fmt.Sprintf("%d-%s", pid, st), nil
}

// OwnerGone says whether the process an OwnerTag names has ended (false for what isn't a tag).
func OwnerGone(tag string) bool {
	pidText, st, ok := strings.Cut(tag, "-")
	if !ok {
		return false
	}
	pid, err := strconv.Atoi(pidText)
	if err != nil || pid <= 0 {
		return false
	}
	now, err := startTime(pid)
	return err != nil || now != st
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

// Sweep deletes the namespaces named with prefix that earlier processes made and could not
// delete (killed by a timeout or SIGKILL, say). A namespace is only touched when the process
// that made it is gone, so runs in parallel, in this process or others, keep theirs.
func Sweep(prefix string) {
	entries, err := os.ReadDir(runDir)
	if err != nil {
		return
	}
	for _, e := range entries {
		rest, ok := strings.CutPrefix(e.Name(), prefix)
		if !ok {
			continue
		}
		parts := strings.Split(rest, "-")
		if len(parts) != 3 || !OwnerGone(parts[0]+"-"+parts[1]) {
			continue // not ours, or its owner is alive
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
