// Package dhcp is Anvil's DHCP boot server: it tells the machines Anvil is booting where to
// find iPXE and their iPXE script, and in reservation mode also hands out their addresses.
//
// Modes:
//   - proxy: a ProxyDHCP server beside the site's own DHCP server (PXE spec §2.2). The site
//     server gives the address; Anvil answers PXE clients only, with boot information and no
//     address, on port 67 (DISCOVER → OFFER) and on port 4011 (REQUEST/INFORM → ACK).
//   - reservation: a full DHCP server that answers only MACs of known hosts, with the address
//     from the host's spec, and NAKs a REQUEST for any other address.
//   - off: Start just waits for its context.
//
// Unknown MACs are never answered, in any mode: on a shared network Anvil must not fight the
// site's DHCP server over machines it doesn't own. They are logged once per MAC (lossily)
// and at a bounded rate.
//
// The hot path (parse, host lookup, reply) allocates nothing and takes no lock: each worker
// goroutine owns its buffers, counters are atomics, and hosts are found through Hosts, whose
// in-memory implementations are lock-free for readers. Reservations are static, so there is
// no lease table and no cap on the number of hosts.
package dhcp

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/go-logr/logr"
	"golang.org/x/sys/unix"
)

// Mode selects how the server answers.
type Mode string

// Modes.
const (
	ModeOff         Mode = "off"
	ModeProxy       Mode = "proxy"
	ModeReservation Mode = "reservation"
)

// Bootfiles names what each kind of client is told to load.
type Bootfiles struct {
	// BIOS is the TFTP file for legacy PXE (client architecture 0). Default "undionly.kpxe".
	BIOS string
	// UEFIx64 is the TFTP file for x86-64 UEFI PXE (architectures 7 and 9). Default
	// "ipxe.efi"; "snponly.efi" uses the firmware's network driver instead of iPXE's own.
	UEFIx64 string
	// UEFIARM64 is the TFTP file for arm64 UEFI PXE (architecture 11). Empty (the default)
	// leaves those clients unanswered: Debian's ipxe package has no arm64 build.
	UEFIARM64 string
	// HTTPx64 and HTTPARM64 are the full URLs given to UEFI HTTP boot clients (architectures
	// 16 and 19). They default to HTTPBaseURL + "/" + the UEFI file name when HTTPBaseURL is
	// set; empty leaves those clients unanswered.
	HTTPx64, HTTPARM64 string
}

// Config configures a Server.
type Config struct {
	Mode Mode
	// Interface is the provisioning network interface. Required: a DHCP server that answered
	// on every interface could answer on a network it was never meant for.
	Interface string
	// ServerIP is this server's address on Interface (option 54). Default: the interface's
	// first IPv4 address.
	ServerIP netip.Addr
	// TFTPServer serves the iPXE binaries (siaddr, option 66). Default ServerIP.
	TFTPServer netip.Addr
	// ScriptURL is the iPXE script URL template for hosts without Host.ScriptURL, e.g.
	// "http://192.0.2.1:8080/ipxe/{mac}". Placeholders: {mac} (lower-case, colon-separated,
	// as iPXE's own ${mac} prints it), {name} and {namespace} (the AnvilHost's).
	ScriptURL string
	// HTTPBaseURL is where the iPXE binaries are served over HTTP, for UEFI HTTP boot.
	HTTPBaseURL string
	Bootfiles   Bootfiles
	// LeaseTime of reserved addresses (reservation mode). Default 1h.
	LeaseTime time.Duration
	// Hosts finds known hosts. Required unless Mode is off.
	Hosts Hosts
	// Log receives the server's logs; V(1) logs each answer.
	Log logr.Logger
	// Workers is the number of goroutines reading each socket. Default 2: reads from one
	// socket take turns anyway, so more readers add wake-ups, not throughput; two let one
	// answer while the other reads, and keep serving if one is slow.
	Workers int
	// UnknownLogRate caps log lines about unknown MACs and bad packets per second.
	// Default 10.
	UnknownLogRate int
	// Port, ProxyPort and ClientPort default to 67, 4011 and 68.
	Port, ProxyPort, ClientPort int
}

// Stats counts what the server has seen and done since it was made.
type Stats struct {
	// Received counts packets; Malformed those that weren't DHCP requests from Ethernet
	// clients; Unknown those from MACs that aren't known hosts; Ignored known hosts' packets
	// that needed no answer (a proxy's REQUEST on 67, a non-PXE client in proxy mode).
	Received, Malformed, Unknown, Ignored uint64
	// Answers sent, and RELEASE/DECLINE messages received.
	Offers, Acks, Naks, Releases, Declines uint64
	// SendErrors are failed sends; Misconfigured answers not given because a host's data or
	// the configuration couldn't make one (no reservation, bad script URL, reply too big);
	// OtherServers REQUESTs for another server's offer.
	SendErrors, Misconfigured, OtherServers uint64
}

type counters struct {
	received, malformed, unknown, ignored   atomic.Uint64
	offers, acks, naks, releases, declines  atomic.Uint64
	sendErrors, misconfigured, otherServers atomic.Uint64
}

// Server is a DHCP boot server. It is a controller-runtime Runnable (Start blocks until its
// context ends) and also runs standalone.
type Server struct {
	cfg   Config
	log   logr.Logger
	hosts Hosts

	serverID, tftp netip.Addr
	tftpName       string
	lease, t1, t2  uint32
	port           uint16 // Config.Port, for replies to relays
	clientPort     uint16
	script         []tmplPart
	bios, efi64    []byte
	efiARM, http64 []byte
	httpARM        []byte

	limiter *logLimiter
	stats   counters

	listenOnce sync.Once
	listenErr  error
	conns      []*net.UDPConn
	proxyConn  *net.UDPConn
	started    atomic.Bool
}

// New checks cfg and returns a server. It opens no sockets: Start (or Listen) does.
func New(cfg Config) (*Server, error) {
	switch cfg.Mode {
	case ModeOff:
		return &Server{cfg: cfg, log: cfg.Log}, nil
	case ModeProxy, ModeReservation:
	default:
		return nil, fmt.Errorf("unknown DHCP mode %q (want proxy, reservation or off)", cfg.Mode)
	}
	if cfg.Interface == "" {
		return nil, errors.New("DHCP needs an interface")
	}
	if cfg.Hosts == nil {
		return nil, errors.New("DHCP needs a Hosts lookup")
	}
	if cfg.LeaseTime <= 0 {
		cfg.LeaseTime = time.Hour
	}
	if cfg.LeaseTime < 10*time.Second || cfg.LeaseTime > 365*24*time.Hour {
		return nil, fmt.Errorf("lease time %v out of range", cfg.LeaseTime)
	}
	if cfg.Workers <= 0 {
		cfg.Workers = 2
	}
	if cfg.UnknownLogRate <= 0 {
		cfg.UnknownLogRate = 10
	}
	if cfg.Port == 0 {
		cfg.Port = 67
	}
	if cfg.ProxyPort == 0 {
		cfg.ProxyPort = 4011
	}
	if cfg.ClientPort == 0 {
		cfg.ClientPort = 68
	}
	for _, p := range []int{cfg.Port, cfg.ProxyPort, cfg.ClientPort} {
		if p < 1 || p > 65535 {
			return nil, fmt.Errorf("port %d out of range", p)
		}
	}
	b := &cfg.Bootfiles
	if b.BIOS == "" {
		b.BIOS = "undionly.kpxe"
	}
	if b.UEFIx64 == "" {
		b.UEFIx64 = "ipxe.efi"
	}
	if base := strings.TrimSuffix(cfg.HTTPBaseURL, "/"); base != "" {
		if b.HTTPx64 == "" {
			b.HTTPx64 = base + "/" + b.UEFIx64
		}
		if b.HTTPARM64 == "" && b.UEFIARM64 != "" {
			b.HTTPARM64 = base + "/" + b.UEFIARM64
		}
	}
	for _, f := range []string{b.BIOS, b.UEFIx64, b.UEFIARM64, b.HTTPx64, b.HTTPARM64} {
		if err := checkBootfile(f); err != nil {
			return nil, err
		}
	}
	for _, u := range []string{b.HTTPx64, b.HTTPARM64} {
		if u != "" && !strings.HasPrefix(u, "http://") && !strings.HasPrefix(u, "https://") {
			return nil, fmt.Errorf("HTTP boot URL %q: want an http(s) URL", u)
		}
	}
	script, err := parseTemplate(cfg.ScriptURL)
	if err != nil {
		return nil, err
	}
	lease := uint32(cfg.LeaseTime / time.Second)
	s := &Server{
		cfg:        cfg,
		log:        cfg.Log.WithValues("dhcpMode", string(cfg.Mode), "interface", cfg.Interface),
		hosts:      cfg.Hosts,
		lease:      lease,
		port:       uint16(cfg.Port),       //nolint:gosec // range checked above
		clientPort: uint16(cfg.ClientPort), //nolint:gosec // range checked above
		t1:         lease / 2,
		t2:         lease / 8 * 7,
		script:     script,
		bios:       []byte(b.BIOS),
		efi64:      []byte(b.UEFIx64),
		efiARM:     []byte(b.UEFIARM64),
		http64:     []byte(b.HTTPx64),
		httpARM:    []byte(b.HTTPARM64),
		limiter:    newLogLimiter(cfg.UnknownLogRate),
	}
	if cfg.ServerIP.IsValid() {
		if err := s.setServerIP(cfg.ServerIP); err != nil {
			return nil, err
		}
	}
	return s, nil
}

func (s *Server) setServerIP(ip netip.Addr) error {
	if !ip.Is4() {
		return fmt.Errorf("server IP %v is not IPv4", ip)
	}
	s.serverID = ip
	s.tftp = ip
	if s.cfg.TFTPServer.IsValid() {
		if !s.cfg.TFTPServer.Is4() {
			return fmt.Errorf("TFTP server %v is not IPv4", s.cfg.TFTPServer)
		}
		s.tftp = s.cfg.TFTPServer
	}
	s.tftpName = s.tftp.String()
	return nil
}

// checkBootfile refuses names that can't go into option 67 or that a client would misread.
func checkBootfile(f string) error {
	if len(f) > 255 {
		return fmt.Errorf("boot file %q longer than 255 bytes", f)
	}
	if !printable(f) {
		return fmt.Errorf("boot file %q has spaces or control characters", f)
	}
	return nil
}

func printable[T string | []byte](s T) bool {
	for i := 0; i < len(s); i++ {
		if s[i] <= ' ' || s[i] >= 0x7f {
			return false
		}
	}
	return true
}

// NeedLeaderElection implements controller-runtime's LeaderElectionRunnable. Answers depend only
// on host specs, so replicas on the same network give identical answers; running on every
// replica keeps boot service up through leader changes.
func (s *Server) NeedLeaderElection() bool { return false }

// Stats returns the counters.
func (s *Server) Stats() Stats {
	c := &s.stats
	return Stats{
		Received: c.received.Load(), Malformed: c.malformed.Load(), Unknown: c.unknown.Load(),
		Ignored: c.ignored.Load(), Offers: c.offers.Load(), Acks: c.acks.Load(), Naks: c.naks.Load(),
		Releases: c.releases.Load(), Declines: c.declines.Load(), SendErrors: c.sendErrors.Load(),
		Misconfigured: c.misconfigured.Load(), OtherServers: c.otherServers.Load(),
	}
}

// Listen opens the server's sockets (port 67, and 4011 in proxy mode) on Config.Interface and
// finds the server address if none was given. Start calls it; calling it first lets a caller
// open the sockets in a particular network namespace, or fail early.
func (s *Server) Listen() error {
	if s.cfg.Mode == ModeOff {
		return nil
	}
	s.listenOnce.Do(func() { s.listenErr = s.listen() })
	return s.listenErr
}

func (s *Server) listen() error {
	if !s.serverID.IsValid() {
		ip, err := interfaceIPv4(s.cfg.Interface)
		if err != nil {
			return err
		}
		if err := s.setServerIP(ip); err != nil {
			return err
		}
	}
	c, err := listenUDP(s.cfg.Interface, s.cfg.Port)
	if err != nil {
		return err
	}
	s.conns = []*net.UDPConn{c}
	if s.cfg.Mode == ModeProxy {
		p, err := listenUDP(s.cfg.Interface, s.cfg.ProxyPort)
		if err != nil {
			_ = c.Close()
			return err
		}
		s.proxyConn = p
		s.conns = append(s.conns, p)
	}
	s.log.Info("DHCP listening", "serverIP", s.serverID.String(), "tftp", s.tftpName)
	return nil
}

func interfaceIPv4(name string) (netip.Addr, error) {
	ifc, err := net.InterfaceByName(name)
	if err != nil {
		return netip.Addr{}, err
	}
	addrs, err := ifc.Addrs()
	if err != nil {
		return netip.Addr{}, err
	}
	for _, a := range addrs {
		if n, ok := a.(*net.IPNet); ok {
			if ip, ok := netip.AddrFromSlice(n.IP.To4()); ok && n.IP.To4() != nil {
				return ip, nil
			}
		}
	}
	return netip.Addr{}, fmt.Errorf("interface %s has no IPv4 address; set the server IP", name)
}

// listenUDP binds 0.0.0.0:port on one interface. DHCP requests arrive broadcast, so binding
// an address would miss them; binding the device keeps us off every other network, and
// SO_REUSEADDR lets a site DHCP server on the same machine share port 67 with our proxy.
func listenUDP(iface string, port int) (*net.UDPConn, error) {
	lc := net.ListenConfig{Control: func(_, _ string, rc syscall.RawConn) error {
		var serr error
		err := rc.Control(func(fd uintptr) {
			if serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_REUSEADDR, 1); serr != nil {
				return
			}
			if serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_BROADCAST, 1); serr != nil {
				return
			}
			serr = unix.BindToDevice(int(fd), iface)
		})
		if err != nil {
			return err
		}
		return serr
	}}
	pc, err := lc.ListenPacket(context.Background(), "udp4", fmt.Sprintf("0.0.0.0:%d", port))
	if err != nil {
		return nil, fmt.Errorf("listen on %s port %d: %w", iface, port, err)
	}
	c := pc.(*net.UDPConn)
	// Bursts (a rack powering on) arrive faster than a moment's scheduling delay; a larger
	// queue absorbs them. The default (net.core.rmem_max, about 200 kB) holds only a few
	// hundred requests. SO_RCVBUFFORCE exceeds it where we have CAP_NET_ADMIN; elsewhere we
	// get what the limit allows.
	if rc, err := c.SyscallConn(); err == nil {
		var serr error
		_ = rc.Control(func(fd uintptr) {
			serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_RCVBUFFORCE, 4<<20)
		})
		if serr != nil {
			_ = c.SetReadBuffer(4 << 20)
		}
	}
	return c, nil
}

// Start serves until ctx ends, then closes its sockets and returns nil. It returns an error
// only if the sockets can't be opened.
func (s *Server) Start(ctx context.Context) error {
	if s.cfg.Mode == ModeOff {
		<-ctx.Done()
		return nil
	}
	if !s.started.CompareAndSwap(false, true) {
		return errors.New("DHCP server already started")
	}
	if err := s.Listen(); err != nil {
		return err
	}
	var wg sync.WaitGroup
	for _, c := range s.conns {
		pxe := c == s.proxyConn
		for range s.cfg.Workers {
			wg.Go(func() { s.serve(c, pxe) })
		}
	}
	<-ctx.Done()
	for _, c := range s.conns {
		_ = c.Close()
	}
	wg.Wait()
	return nil
}

// worker holds one goroutine's buffers, so requests in flight share nothing.
type worker struct {
	in   [4096]byte
	out  [maxReply]byte
	file [256]byte
	req  request
}

func (s *Server) serve(c *net.UDPConn, pxePort bool) {
	w := new(worker)
	for {
		n, _, _, src, err := c.ReadMsgUDPAddrPort(w.in[:], nil)
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return
			}
			if s.limiter.allow() {
				s.log.Error(err, "DHCP read")
			}
			continue
		}
		out, dst := s.handle(w, w.in[:n], src, pxePort)
		if out == nil {
			continue
		}
		if _, err := c.WriteToUDPAddrPort(out, dst); err != nil {
			s.stats.sendErrors.Add(1)
			if s.limiter.allow() {
				s.log.Error(err, "DHCP send", "to", dst.String())
			}
		}
	}
}
