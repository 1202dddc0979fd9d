// Package loadgen simulates many network-booting machines, for benchmarks of the boot
// services and of the DHCP servers they are compared with.
//
// DHCP clients are simulated the way perfdhcp does it: every client has its own MAC and
// transaction id, and all of them share one UDP socket, either as clients on the link
// (broadcasting from port 68, asking for broadcast answers) or behind a relay agent (the
// generator is the relay: giaddr is its address and answers come back to it on port 67).
// Unlike perfdhcp, each client behaves like boot firmware: it retransmits on a timer
// (iPXE's: 1 s, doubling) and the generator counts every retransmission, so "zero retries"
// can be checked rather than inferred from drop counters. Packets go out and come in with
// sendmmsg/recvmmsg batches, so one core drives tens of thousands of exchanges per second
// and the generator is not what limits a measurement.
package loadgen

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"net/netip"
	"os"
	"runtime"
	"slices"
	"strings"
	"syscall"
	"time"

	"golang.org/x/net/ipv4"
	"golang.org/x/sys/unix"
)

// DHCPOptions configure a run of simulated DHCP clients.
type DHCPOptions struct {
	// Interface the socket is bound to (required).
	Interface string
	// Relay, when valid, makes the generator a relay agent with this address on Interface:
	// requests are sent to Server port 67 with giaddr = Relay, and answers come back to
	// Relay port 67. Otherwise clients broadcast from port 68 with the broadcast flag set.
	Relay, Server netip.Addr
	// BaseMAC is the first client's MAC; client i has BaseMAC + i.
	BaseMAC net.HardwareAddr
	// Clients to run (required).
	Clients int
	// Rate starts this many clients per second; 0 starts them all at once.
	Rate int
	// Window bounds the exchanges in flight; 0 means no bound.
	Window int
	// Duration, when set, stops starting clients after this long; the run ends when the
	// started ones are done.
	Duration time.Duration
	// FirstTimeout before the first retransmission (default 1 s, as iPXE); it doubles up to
	// MaxTimeout (default 8 s). A client gives up after Attempts sends of one message
	// (default 5).
	FirstTimeout, MaxTimeout time.Duration
	Attempts                 int
	// VendorClass (option 60, default iPXE's "PXEClient:Arch:00000:UNDI:002001") and
	// UserClass (option 77, default "iPXE"); "-" sends none.
	VendorClass, UserClass string
	// OnBound is called (on the generator's goroutine: don't block) when client i has its
	// ACK, with the address and the boot file name it was given.
	OnBound func(i int, mac net.HardwareAddr, ip netip.Addr, bootfile string)
}

// DHCPResult is what a run did.
type DHCPResult struct {
	// Started clients, Bound ones (got an ACK), Failed ones (gave up or got a NAK).
	Started, Bound, Failed int
	// Unfinished clients when the run was cut short (its context ended).
	Unfinished int
	// Retransmits counts DISCOVERs and REQUESTs sent again after a timeout; Restarts the
	// exchanges begun again after a NAK. Both are client retries.
	Retransmits, Restarts int
	// Naks received; Strays are answers for no waiting client (duplicates, late answers to
	// a retransmitted message).
	Naks, Strays int
	// Sent and Received datagrams.
	Sent, Received int
	// Elapsed from the first DISCOVER to the last client's end.
	Elapsed time.Duration
	// Exchange times (first DISCOVER to ACK) of the bound clients.
	P50, P99, Max time.Duration
}

// ExchangesPerSecond is Bound / Elapsed.
func (r DHCPResult) ExchangesPerSecond() float64 {
	if r.Elapsed <= 0 {
		return 0
	}
	return float64(r.Bound) / r.Elapsed.Seconds()
}

func (r DHCPResult) String() string {
	return fmt.Sprintf("%d started, %d bound, %d failed, %d retransmits, %d NAKs (%d restarts), %d strays in %v (%.0f exchanges/s); exchange p50 %v p99 %v max %v",
		r.Started, r.Bound, r.Failed, r.Retransmits, r.Naks, r.Restarts, r.Strays, r.Elapsed.Round(time.Millisecond), r.ExchangesPerSecond(),
		r.P50.Round(10*time.Microsecond), r.P99.Round(10*time.Microsecond), r.Max.Round(10*time.Microsecond))
}

const (
	stageIdle = iota
	stageDiscover
	stageRequest
	stageBound
	stageFailed
)

type client struct {
	stage    uint8
	sends    uint8 // sends of the current message
	restarts uint8 // NAKs that sent it back to DISCOVER
	gen      uint32
	started  time.Time
	timeout  time.Duration
	offered  [4]byte
	serverID [4]byte
}

// timer is a retransmission deadline; stale when the client's gen has moved on.
type timer struct {
	at     time.Time
	client int
	gen    uint32
}

// RunDHCP runs the clients until each is bound or has failed, or ctx ends.
func RunDHCP(ctx context.Context, o DHCPOptions) (DHCPResult, error) {
	if o.Interface == "" || o.Clients <= 0 || len(o.BaseMAC) != 6 {
		return DHCPResult{}, errors.New("loadgen: Interface, Clients and a 6-byte BaseMAC are required")
	}
	if o.Relay.IsValid() && !o.Server.IsValid() {
		return DHCPResult{}, errors.New("loadgen: relay mode needs the server's address")
	}
	o = o.withDefaults()
	g, err := newGenerator(o)
	if err != nil {
		return DHCPResult{}, err
	}
	defer g.conn.Close()
	return g.run(ctx)
}

// resolveServer makes sure the kernel knows the server's MAC before a burst of unicasts:
// while a neighbour is unresolved the kernel queues only a few packets for it (about 100) and
// drops the rest, which would show as retransmissions that no server caused. One datagram to
// the discard port starts resolution; the server's side learns ours from the ARP request.
func (g *generator) resolveServer() error {
	runtime.LockOSThread() // the socket and the ARP table must be read in one namespace
	defer runtime.UnlockOSThread()
	c, err := net.DialUDP("udp4", nil, net.UDPAddrFromAddrPort(netip.AddrPortFrom(g.o.Server, 9)))
	if err != nil {
		return fmt.Errorf("loadgen: reaching %v: %w", g.o.Server, err)
	}
	defer c.Close()
	deadline := time.Now().Add(3 * time.Second)
	for time.Now().Before(deadline) {
		_, _ = c.Write([]byte{0})
		if neighbourKnown(g.o.Server) {
			return nil
		}
		time.Sleep(20 * time.Millisecond)
	}
	return fmt.Errorf("loadgen: no ARP answer from %v", g.o.Server)
}

// neighbourKnown reads the ARP table of the calling thread's network namespace (/proc/net
// would show the main thread's).
func neighbourKnown(ip netip.Addr) bool {
	raw, err := os.ReadFile("/proc/thread-self/net/arp")
	if err != nil {
		return false
	}
	for _, l := range strings.Split(string(raw), "\n") {
		f := strings.Fields(l)
		// IP address, HW type, Flags (0x2: complete), HW address, ...
		if len(f) >= 4 && f[0] == ip.String() && f[2] != "0x0" {
			return true
		}
	}
	return false
}

func (o DHCPOptions) withDefaults() DHCPOptions {
	if o.FirstTimeout <= 0 {
		o.FirstTimeout = time.Second
	}
	if o.MaxTimeout <= 0 {
		o.MaxTimeout = 8 * time.Second
	}
	if o.Attempts <= 0 {
		o.Attempts = 5
	}
	if o.VendorClass == "" {
		o.VendorClass = "PXEClient:Arch:00000:UNDI:002001"
	}
	if o.UserClass == "" {
		o.UserClass = "iPXE"
	}
	return o
}

type generator struct {
	o       DHCPOptions
	conn    *net.UDPConn
	pc      *ipv4.PacketConn
	dst     *net.UDPAddr
	xidBase uint32
	base    uint64
	clients []client
	timers  []timer // a FIFO per timeout length would do; a heap keeps it general
	res     DHCPResult
	times   []time.Duration
	pending int // clients started and not yet bound or failed
	next    int // next client to start
	out     []ipv4.Message
	outBufs [][]byte
	nOut    int
}

const batch = 64

func newGenerator(o DHCPOptions) (*generator, error) {
	if len(o.VendorClass) > 255 || len(o.UserClass) > 255 {
		return nil, errors.New("loadgen: vendor and user class must fit a DHCP option (255 bytes)")
	}
	g := &generator{o: o, clients: make([]client, o.Clients), xidBase: rand.Uint32()} //nolint:gosec // transaction ids, not secrets
	for _, b := range o.BaseMAC {
		g.base = g.base<<8 | uint64(b)
	}
	laddr := "0.0.0.0:68"
	g.dst = &net.UDPAddr{IP: net.IPv4bcast, Port: 67}
	if o.Relay.IsValid() {
		laddr = netip.AddrPortFrom(o.Relay, 67).String()
		g.dst = net.UDPAddrFromAddrPort(netip.AddrPortFrom(o.Server, 67))
	}
	lc := net.ListenConfig{Control: func(_, _ string, rc syscall.RawConn) error {
		var serr error
		err := rc.Control(func(fd uintptr) {
			for _, opt := range []int{unix.SO_REUSEADDR, unix.SO_BROADCAST} {
				if serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, opt, 1); serr != nil {
					return
				}
			}
			if serr = unix.BindToDevice(int(fd), o.Interface); serr != nil {
				return
			}
			// Answers to a whole burst must fit while the generator is busy sending.
			if serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_RCVBUFFORCE, 16<<20); serr != nil {
				serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_RCVBUF, 16<<20)
			}
			if serr == nil {
				_ = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_SNDBUFFORCE, 16<<20)
			}
		})
		if err != nil {
			return err
		}
		return serr
	}}
	pc, err := lc.ListenPacket(context.Background(), "udp4", laddr)
	if err != nil {
		return nil, fmt.Errorf("loadgen: listen %s on %s: %w", laddr, o.Interface, err)
	}
	g.conn = pc.(*net.UDPConn)
	if o.Relay.IsValid() {
		if err := g.resolveServer(); err != nil {
			_ = g.conn.Close()
			return nil, err
		}
	}
	g.pc = ipv4.NewPacketConn(g.conn)
	g.out = make([]ipv4.Message, batch)
	g.outBufs = make([][]byte, batch)
	for i := range g.out {
		g.outBufs[i] = make([]byte, 0, 512)
	}
	return g, nil
}

type reply struct {
	client  int
	msgType byte
	yiaddr  [4]byte
	server  [4]byte
	file    string
	at      time.Time
}

// run is one goroutine: start the clients that are due, read what answers have arrived, and
// retransmit for the clients whose timers ran out — only once the socket has been drained, so
// an answer that has arrived is never counted as lost because the generator was slow to
// read it (a real machine has its own CPU for that).
func (g *generator) run(ctx context.Context) (DHCPResult, error) {
	ms := make([]ipv4.Message, batch)
	for i := range ms {
		ms[i].Buffers = [][]byte{make([]byte, 1500)}
	}
	start := time.Now()
	var last time.Time
	for g.res.Bound+g.res.Failed < g.o.Clients {
		if ctx.Err() != nil {
			r := g.finish(start, time.Now())
			r.Unfinished = r.Started - r.Bound - r.Failed
			return r, ctx.Err()
		}
		if g.o.Duration > 0 && time.Since(start) >= g.o.Duration {
			g.o.Clients = g.res.Started // start no more; finish those in flight
			if g.res.Bound+g.res.Failed >= g.o.Clients {
				break
			}
		}
		g.startClients(start)
		if err := g.flush(); err != nil {
			return g.finish(start, time.Now()), err
		}
		// Wait at most a millisecond: the pace of starts and the timers' resolution.
		_ = g.conn.SetReadDeadline(time.Now().Add(time.Millisecond))
		n, err := g.pc.ReadBatch(ms, 0)
		if err != nil {
			if ne, ok := err.(net.Error); !ok || !ne.Timeout() { //nolint:errorlint // net.Error is an interface to test for
				return g.finish(start, time.Now()), fmt.Errorf("loadgen: receive: %w", err)
			}
			n = 0
		}
		now := time.Now()
		g.res.Received += n
		for _, m := range ms[:n] {
			if r, ok := g.parse(m.Buffers[0][:m.N]); ok {
				r.at = now
				g.handle(r)
				last = now
			}
		}
		if err := g.flush(); err != nil {
			return g.finish(start, time.Now()), err
		}
		if n < len(ms) {
			g.expire(now) // the socket is drained: whoever is still waiting has no answer
		}
	}
	if last.IsZero() {
		last = time.Now()
	}
	return g.finish(start, last), nil
}

func (g *generator) finish(start, end time.Time) DHCPResult {
	r := g.res
	r.Elapsed = end.Sub(start)
	if len(g.times) > 0 {
		slices.Sort(g.times)
		r.P50 = g.times[len(g.times)/2]
		r.P99 = g.times[len(g.times)*99/100]
		r.Max = g.times[len(g.times)-1]
	}
	return r
}

// startClients starts the clients that are due by the rate and fit in the window.
func (g *generator) startClients(start time.Time) {
	due := g.o.Clients
	if g.o.Rate > 0 {
		due = min(g.o.Clients, int(time.Since(start).Seconds()*float64(g.o.Rate))+1)
	}
	for g.next < due && (g.o.Window <= 0 || g.pending < g.o.Window) {
		i := g.next
		g.next++
		c := &g.clients[i]
		c.stage, c.started, c.timeout, c.sends = stageDiscover, time.Now(), g.o.FirstTimeout, 0
		g.pending++
		g.res.Started++
		g.send(i)
	}
}

// send queues client i's current message and arms its timer.
func (g *generator) send(i int) {
	c := &g.clients[i]
	c.sends++
	c.gen++
	g.push(timer{at: time.Now().Add(c.timeout), client: i, gen: c.gen})
	b := g.outBufs[g.nOut][:0]
	b = g.build(b, i, c)
	g.outBufs[g.nOut] = b
	g.out[g.nOut] = ipv4.Message{Buffers: [][]byte{b}, Addr: g.dst}
	g.nOut++
	if g.nOut == batch {
		_ = g.flush() // an error comes back on the next flush
	}
}

func (g *generator) flush() error {
	for sent := 0; sent < g.nOut; {
		n, err := g.pc.WriteBatch(g.out[sent:g.nOut], 0)
		if err != nil {
			if errors.Is(err, unix.ENOBUFS) || errors.Is(err, unix.EAGAIN) {
				time.Sleep(100 * time.Microsecond)
				continue
			}
			g.nOut = 0
			return fmt.Errorf("loadgen: send: %w", err)
		}
		sent += n
		g.res.Sent += n
	}
	g.nOut = 0
	return nil
}

func (g *generator) mac(i int) [6]byte {
	var m [8]byte
	binary.BigEndian.PutUint64(m[:], g.base+uint64(i)) //nolint:gosec // i < Clients
	return [6]byte(m[2:])
}

// build writes client i's DISCOVER or REQUEST.
func (g *generator) build(b []byte, i int, c *client) []byte {
	var h [240]byte
	h[0], h[1], h[2] = 1, 1, 6
	binary.BigEndian.PutUint32(h[4:], g.xidBase+uint32(i)) //nolint:gosec // wraps on purpose
	secs := time.Since(c.started) / time.Second
	binary.BigEndian.PutUint16(h[8:], uint16(min(secs, 0xffff))) //nolint:gosec // clamped
	if g.o.Relay.IsValid() {
		h[3] = 1 // hops
		a := g.o.Relay.As4()
		copy(h[24:28], a[:])
	} else {
		binary.BigEndian.PutUint16(h[10:], 0x8000) // broadcast answers: we have no address yet
	}
	m := g.mac(i)
	copy(h[28:34], m[:])
	binary.BigEndian.PutUint32(h[236:], 0x63825363)
	b = append(b, h[:]...)
	msg := byte(1)
	if c.stage == stageRequest {
		msg = 3
	}
	b = append(b, 53, 1, msg)
	if msg == 3 {
		b = append(b, 50, 4)
		b = append(b, c.offered[:]...)
		b = append(b, 54, 4)
		b = append(b, c.serverID[:]...)
	}
	b = append(b, 57, 2, 0x05, 0xc0) // max message size 1472
	b = append(b, 93, 2, 0, 0)       // x86 BIOS
	b = append(b, 55, 6, 1, 3, 6, 51, 54, 67)
	if g.o.VendorClass != "-" {
		b = append(b, 60, byte(len(g.o.VendorClass))) //nolint:gosec // checked in newGenerator
		b = append(b, g.o.VendorClass...)
	}
	if g.o.UserClass != "-" {
		b = append(b, 77, byte(len(g.o.UserClass))) //nolint:gosec // checked in newGenerator
		b = append(b, g.o.UserClass...)
	}
	b = append(b, 255)
	for len(b) < 300 {
		b = append(b, 0)
	}
	return b
}

// handle moves a client on with an answer.
func (g *generator) handle(r reply) {
	if r.client < 0 || r.client >= len(g.clients) {
		g.res.Strays++
		return
	}
	c := &g.clients[r.client]
	switch {
	case r.msgType == 2 && c.stage == stageDiscover:
		c.stage, c.offered, c.serverID, c.sends, c.timeout = stageRequest, r.yiaddr, r.server, 0, g.o.FirstTimeout
		g.send(r.client)
	case r.msgType == 5 && c.stage == stageRequest:
		c.stage = stageBound
		c.gen++
		g.pending--
		g.res.Bound++
		g.times = append(g.times, r.at.Sub(c.started))
		if g.o.OnBound != nil {
			m := g.mac(r.client)
			g.o.OnBound(r.client, net.HardwareAddr(m[:]), netip.AddrFrom4(r.yiaddr), r.file)
		}
	case r.msgType == 6 && c.stage == stageRequest:
		// RFC 2131 §3.1: a NAK sends the client back to DISCOVER (a server that offered one
		// address to two clients NAKs the second). That is a retry, counted as a restart.
		g.res.Naks++
		c.restarts++
		if int(c.restarts) >= g.o.Attempts {
			c.stage = stageFailed
			c.gen++
			g.pending--
			g.res.Failed++
			return
		}
		g.res.Restarts++
		c.stage, c.sends, c.timeout = stageDiscover, 0, g.o.FirstTimeout
		g.send(r.client)
	default:
		g.res.Strays++
	}
}

// expire retransmits (or gives up on) clients whose timers are due.
func (g *generator) expire(now time.Time) {
	for len(g.timers) > 0 && !g.timers[0].at.After(now) {
		t := g.pop()
		c := &g.clients[t.client]
		if t.gen != c.gen || (c.stage != stageDiscover && c.stage != stageRequest) {
			continue
		}
		if int(c.sends) >= g.o.Attempts {
			c.stage = stageFailed
			c.gen++
			g.pending--
			g.res.Failed++
			continue
		}
		c.timeout = min(2*c.timeout, g.o.MaxTimeout)
		g.res.Retransmits++
		g.send(t.client)
	}
}

// parse reads an answer: its client (by xid and chaddr), type, yiaddr, server id and file.
func (g *generator) parse(b []byte) (reply, bool) {
	if len(b) < 240 || b[0] != 2 || binary.BigEndian.Uint32(b[236:]) != 0x63825363 {
		return reply{}, false
	}
	i := int(binary.BigEndian.Uint32(b[4:]) - g.xidBase)
	r := reply{client: -1}
	if i >= 0 && i < len(g.clients) {
		if m := g.mac(i); [6]byte(b[28:34]) == m {
			r.client = i
		}
	}
	copy(r.yiaddr[:], b[16:20])
	for o := b[240:]; len(o) >= 2 && o[0] != 255; {
		if o[0] == 0 {
			o = o[1:]
			continue
		}
		n := int(o[1])
		if len(o) < 2+n {
			break
		}
		v := o[2 : 2+n]
		switch o[0] {
		case 53:
			if n == 1 {
				r.msgType = v[0]
			}
		case 54:
			if n == 4 {
				copy(r.server[:], v)
			}
		case 67:
			r.file = string(v)
		}
		o = o[2+n:]
	}
	return r, r.msgType != 0
}

func (g *generator) push(t timer) {
	g.timers = append(g.timers, t)
	for i := len(g.timers) - 1; i > 0; {
		p := (i - 1) / 2
		if !g.timers[i].at.Before(g.timers[p].at) {
			break
		}
		g.timers[i], g.timers[p] = g.timers[p], g.timers[i]
		i = p
	}
}

func (g *generator) pop() timer {
	t := g.timers[0]
	last := len(g.timers) - 1
	g.timers[0] = g.timers[last]
	g.timers = g.timers[:last]
	for i := 0; ; {
		l, r, s := 2*i+1, 2*i+2, i
		if l < len(g.timers) && g.timers[l].at.Before(g.timers[s].at) {
			s = l
		}
		if r < len(g.timers) && g.timers[r].at.Before(g.timers[s].at) {
			s = r
		}
		if s == i {
			break
		}
		g.timers[i], g.timers[s] = g.timers[s], g.timers[i]
		i = s
	}
	return t
}
