package redfish

import (
	"crypto/sha1" //nolint:gosec // for version 5 UUIDs, see nameUUID
	"fmt"
	"net"
	"net/http"
	"sync"
	"sync/atomic"
	"time"

	"github.com/anvil-metal/cluster-api-provider-anvil/internal/vbmc/machine"
)

// BMCOptions configures one emulated BMC. The zero value is a usable BMC:
// the local-storage mockup on 127.0.0.1 and a free port, user admin with
// password "password", a server that is powered off.
type BMCOptions struct {
	// Address is the listen address; default "127.0.0.1:0" (a free port).
	Address string
	// Mockup is the resource tree served; default MockupLocalStorage.
	Mockup Mockup
	// MockupIDs keeps DMTF's ids (Systems/437XR1138R2, Chassis/1U, Managers/BMC)
	// instead of the Systems/1, Chassis/1, Managers/1 of most vendors, which
	// bmclib's inventory needs. Useful to check a client hardcodes no ids.
	MockupIDs bool
	// Username and Password are the one account; defaults "admin" and "password".
	Username, Password string
	// Machine is the server this BMC controls. Nil makes a new one, powered off.
	// Pass one to share it with another emulator or to watch its events.
	Machine *machine.Machine
	// Identity makes this server distinguishable from the others; empty fields
	// keep the mockup's values.
	Identity Identity
	// Hardware resizes the inventory; zero fields keep the mockup's.
	Hardware Hardware
	// SessionTimeout is how long a session lives without being used; default 30 minutes.
	SessionTimeout time.Duration
	// MaxSessions caps open sessions as real BMCs do (often at 8 to 16), which
	// exposes clients that leak sessions. Zero means no cap.
	MaxSessions int
}

// Identity is what tells one emulated server from another.
type Identity struct {
	SerialNumber string
	// UUID is the system UUID (the SMBIOS one firmware reports).
	UUID     string
	HostName string
	// MACs are given, in order, to the host's network ports: the system's
	// physical EthernetInterfaces, or the SmartNIC mockup's network device
	// functions. VLAN interfaces follow their port. Extra MACs are ignored.
	MACs []net.HardwareAddr
}

// NewIdentity returns a distinct, deterministic identity for the index-th
// emulated server, so that a lab can compute a server's MACs and UUID from its
// number. MACs are locally administered (02:a7:...) with four ports per server.
func NewIdentity(index int) Identity {
	id := Identity{
		SerialNumber: fmt.Sprintf("ANV%07d", index),
		UUID:         nameUUID(fmt.Sprintf("anvil-vbmc/system/%d", index)),
		HostName:     fmt.Sprintf("node-%04d", index),
	}
	for port := range 4 {
		// The format always parses: six two-digit hex bytes.
		mac, _ := net.ParseMAC(fmt.Sprintf("02:a7:%02x:%02x:%02x:%02x", index>>16&0xff, index>>8&0xff, index&0xff, port))
		id.MACs = append(id.MACs, mac)
	}
	return id
}

// Hardware resizes the emulated server's inventory.
type Hardware struct {
	// Processors is the number of CPU sockets, each a copy of the mockup's first CPU.
	Processors int
	// MemoryGiB is the installed memory, spread evenly over the mockup's populated DIMM slots.
	MemoryGiB int
}

// Faults are failures a BMC injects into its responses, to test clients against
// slow and sick BMCs. They apply to every request, login included, in this
// order: Hang, Latency, Unavailable, ErrorRate.
type Faults struct {
	// Latency delays every response.
	Latency time.Duration
	// ErrorRate is the fraction (0 to 1) of requests answered 500 InternalError.
	ErrorRate float64
	// Hang holds requests without an answer until Hang is cleared (then they
	// proceed) or the client gives up.
	Hang bool
	// Unavailable answers every request 503 ServiceTemporarilyUnavailable, as a
	// BMC that is busy or rebooting does.
	Unavailable bool
	// RetryAfter, when Unavailable, is sent as a Retry-After header (whole seconds, rounded up).
	RetryAfter time.Duration
}

// RequestCounts counts the requests a BMC received, by method, whatever their outcome.
type RequestCounts struct {
	Get, Post, Patch, Delete, Other uint64
}

// Total is the number of requests of any method.
func (c RequestCounts) Total() uint64 { return c.Get + c.Post + c.Patch + c.Delete + c.Other }

// BMC is one emulated BMC. Its methods are safe for concurrent use.
type BMC struct {
	server  *Server
	tree    *tree
	machine *machine.Machine

	username, password string
	sessionTimeout     time.Duration
	maxSessions        int

	// overlays are this BMC's changes to the shared tree, by path: properties
	// replaced at the top level of a resource, resources added (a fifth CPU),
	// or hidden (overlay.base nil). Built once; read-only afterwards.
	overlays map[string]overlay

	listener net.Listener
	url      string

	requests [5]atomic.Uint64 // indexed by methodIndex

	// patchMu makes a PATCH's If-Match check and its change one step.
	patchMu sync.Mutex

	mu       sync.Mutex
	sessions map[string]*session // by token
	faults   Faults
	unhang   chan struct{} // closed, and replaced, when Hang is cleared
	conns    map[net.Conn]struct{}
	closed   bool
}

type session struct {
	id, token, user string
	created         time.Time
	lastUsed        time.Time
}

func newBMC(s *Server, t *tree, opts BMCOptions) (*BMC, error) {
	b := &BMC{
		server:         s,
		tree:           t,
		machine:        opts.Machine,
		username:       opts.Username,
		password:       opts.Password,
		sessionTimeout: opts.SessionTimeout,
		maxSessions:    opts.MaxSessions,
		sessions:       make(map[string]*session),
		unhang:         make(chan struct{}),
		conns:          make(map[net.Conn]struct{}),
	}
	if b.machine == nil {
		b.machine = machine.New(machine.Config{})
	}
	if b.username == "" {
		b.username, b.password = "admin", "password"
	}
	if b.sessionTimeout <= 0 {
		b.sessionTimeout = 30 * time.Minute
	}
	ov, err := t.overlaysFor(opts.Identity, opts.Hardware, b.sessionTimeout)
	if err != nil {
		return nil, err
	}
	b.overlays = ov
	return b, nil
}

// URL is the BMC's base URL, e.g. "https://127.0.0.1:40123"; Redfish is under /redfish/v1.
func (b *BMC) URL() string { return b.url }

// Addr is the BMC's host:port.
func (b *BMC) Addr() string { return b.listener.Addr().String() }

// Machine returns the server this BMC controls.
func (b *BMC) Machine() *machine.Machine { return b.machine }

// SetFaults replaces the BMC's faults. Clearing Hang releases held requests.
func (b *BMC) SetFaults(f Faults) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.faults.Hang && !f.Hang {
		close(b.unhang)
		b.unhang = make(chan struct{})
	}
	b.faults = f
}

// Faults returns the BMC's current faults.
func (b *BMC) Faults() Faults {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.faults
}

// DropSessions invalidates every session, as a BMC reboot does; clients get 401
// until they log in again. It returns how many sessions were dropped.
func (b *BMC) DropSessions() int {
	b.mu.Lock()
	defer b.mu.Unlock()
	n := len(b.sessions)
	clear(b.sessions)
	return n
}

// Sessions returns the number of open, unexpired sessions: tests use it to catch
// clients that never log out.
func (b *BMC) Sessions() int {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.expireSessionsLocked(time.Now())
	return len(b.sessions)
}

// Requests returns the requests received so far.
func (b *BMC) Requests() RequestCounts {
	return RequestCounts{
		Get:    b.requests[0].Load(),
		Post:   b.requests[1].Load(),
		Patch:  b.requests[2].Load(),
		Delete: b.requests[3].Load(),
		Other:  b.requests[4].Load(),
	}
}

func methodIndex(method string) int {
	switch method {
	case http.MethodGet, http.MethodHead:
		return 0
	case http.MethodPost:
		return 1
	case http.MethodPatch:
		return 2
	case http.MethodDelete:
		return 3
	}
	return 4
}

// Close stops the BMC: its port refuses connections and open connections,
// hanging requests included, are cut. The Machine is left as it is.
func (b *BMC) Close() error {
	b.mu.Lock()
	if b.closed {
		b.mu.Unlock()
		return nil
	}
	b.closed = true
	conns := make([]net.Conn, 0, len(b.conns))
	for c := range b.conns {
		conns = append(conns, c)
	}
	b.mu.Unlock()
	err := b.listener.Close()
	for _, c := range conns {
		_ = c.Close() // cutting it off is the point; an error means it is gone already
	}
	b.server.forget(b)
	return err
}

func (b *BMC) trackConn(c net.Conn, state http.ConnState) {
	b.mu.Lock()
	defer b.mu.Unlock()
	switch state {
	case http.StateNew:
		if b.closed {
			_ = c.Close()
			return
		}
		b.conns[c] = struct{}{}
	case http.StateClosed, http.StateHijacked:
		delete(b.conns, c)
	}
}

func (b *BMC) expireSessionsLocked(now time.Time) {
	for tok, s := range b.sessions {
		if now.Sub(s.lastUsed) > b.sessionTimeout {
			delete(b.sessions, tok)
		}
	}
}

// nameUUID derives a version-5-style UUID from a name, so derived identities are stable.
func nameUUID(name string) string {
	h := sha1.Sum([]byte(name)) //nolint:gosec // RFC 9562 defines version 5 UUIDs on SHA-1; nothing secret here
	h[6] = h[6]&0x0f | 0x50
	h[8] = h[8]&0x3f | 0x80
	return fmt.Sprintf("%x-%x-%x-%x-%x", h[0:4], h[4:6], h[6:8], h[8:10], h[10:16])
}
