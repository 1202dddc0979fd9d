// Package redfish emulates Redfish BMCs: many of them, cheaply, in one process.
//
// A Server is one net/http server. Each BMC added to it gets a listener of its
// own (127.0.0.1 and a free port by default), because Redfish clients address a
// BMC by host and port and follow absolute "/redfish/v1/..." links: a path
// prefix per BMC would break them. All BMCs of a mockup share one parsed,
// read-only copy of its resource tree; a BMC keeps only what differs (identity,
// hardware size, sessions, faults) and drives a machine.Machine for power, boot
// override and virtual media, which other emulators (IPMI) and the thing playing
// the server can share.
//
// What a BMC implements: the service root, SessionService (X-Auth-Token
// sessions with an idle timeout) and HTTP Basic auth; GET of every mockup
// resource with an ETag; ComputerSystem.Reset; PATCH of the system's Boot
// override, checked against its allowable values; VirtualMedia.InsertMedia and
// EjectMedia; Manager.Reset (drops all sessions, as a BMC reboot does). Errors
// carry Redfish error bodies from the Base message registry. Faults (latency,
// 500s, 503 with Retry-After, hangs, dropped sessions) can be switched per BMC
// at run time, and every BMC counts its requests.
package redfish

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"log"
	"net"
	"net/http"
	"sync"
	"time"
)

// ServerOptions configures a Server.
type ServerOptions struct {
	// TLS makes every BMC serve HTTPS with a certificate signed by a CA that is
	// generated for this Server; clients verify it with CACertPEM or CertPool.
	TLS bool
	// TLSHosts are extra DNS names or IP addresses the certificate is valid for,
	// besides localhost, 127.0.0.1 and ::1.
	TLSHosts []string
	// ErrorLog receives net/http's connection-level errors. Nil discards them:
	// benchmarks and timing-out clients abort connections all the time.
	ErrorLog *log.Logger
}

// Server serves any number of emulated BMCs from one http.Server.
type Server struct {
	http      *http.Server
	tlsConfig *tls.Config // nil without TLS
	caPEM     []byte
	caPool    *x509.CertPool

	mu     sync.Mutex
	trees  map[treeKey]*tree // parsed on first use, shared by all BMCs
	bmcs   map[*BMC]struct{}
	closed bool
}

type bmcContextKey struct{}

// NewServer returns a Server with no BMCs.
func NewServer(opts ServerOptions) (*Server, error) {
	s := &Server{trees: make(map[treeKey]*tree), bmcs: make(map[*BMC]struct{})}
	if opts.TLS {
		caPEM, cert, err := newCertificates(opts.TLSHosts)
		if err != nil {
			return nil, fmt.Errorf("generating TLS certificates: %w", err)
		}
		s.caPEM = caPEM
		s.caPool = x509.NewCertPool()
		s.caPool.AppendCertsFromPEM(caPEM)
		// The key exchanges BMC firmware negotiates today (OpenSSL builds without ML-KEM): an
		// emulated BMC answers a client's post-quantum hybrid key share with X25519, as a real
		// one does, rather than with Go's default X25519MLKEM768. The emulator stands in for
		// hardware, and its CPU is taken from whatever it is tested with.
		s.tlsConfig = &tls.Config{Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS12,
			CurvePreferences: []tls.CurveID{tls.X25519, tls.CurveP256, tls.CurveP384}}
	}
	errorLog := opts.ErrorLog
	if errorLog == nil {
		errorLog = log.New(io.Discard, "", 0)
	}
	s.http = &http.Server{
		Handler:           http.HandlerFunc(s.serveHTTP),
		ReadHeaderTimeout: 30 * time.Second,
		IdleTimeout:       2 * time.Minute,
		ErrorLog:          errorLog,
		ConnContext: func(ctx context.Context, c net.Conn) context.Context {
			if b := bmcOf(c); b != nil {
				return context.WithValue(ctx, bmcContextKey{}, b)
			}
			return ctx
		},
		ConnState: func(c net.Conn, state http.ConnState) {
			if b := bmcOf(c); b != nil {
				b.trackConn(c, state)
			}
		},
	}
	return s, nil
}

// CACertPEM returns the PEM-encoded CA certificate that signed the BMCs'
// certificate, or nil when the Server does not use TLS.
func (s *Server) CACertPEM() []byte { return s.caPEM }

// CertPool returns a pool holding the CA certificate, for Go clients' tls.Config.RootCAs,
// or nil when the Server does not use TLS.
func (s *Server) CertPool() *x509.CertPool { return s.caPool }

// AddBMC starts serving a new emulated BMC.
func (s *Server) AddBMC(opts BMCOptions) (*BMC, error) {
	if opts.Mockup == "" {
		opts.Mockup = MockupLocalStorage
	}
	t, err := s.tree(treeKey{mockup: opts.Mockup, mockupIDs: opts.MockupIDs})
	if err != nil {
		return nil, err
	}
	b, err := newBMC(s, t, opts)
	if err != nil {
		return nil, err
	}
	addr := opts.Address
	if addr == "" {
		addr = "127.0.0.1:0"
	}
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("BMC listener: %w", err)
	}
	b.listener = ln
	scheme := "http"
	var served net.Listener = bmcListener{Listener: ln, bmc: b}
	if s.tlsConfig != nil {
		scheme = "https"
		served = tls.NewListener(served, s.tlsConfig)
	}
	b.url = scheme + "://" + ln.Addr().String()

	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		_ = ln.Close()
		return nil, errors.New("server is closed")
	}
	s.bmcs[b] = struct{}{}
	s.mu.Unlock()
	go func() { _ = s.http.Serve(served) }()
	return b, nil
}

// tree returns the parsed mockup, parsing it on first use.
func (s *Server) tree(key treeKey) (*tree, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if t := s.trees[key]; t != nil {
		return t, nil
	}
	t, err := loadTree(key.mockup, key.mockupIDs)
	if err != nil {
		return nil, err
	}
	s.trees[key] = t
	return t, nil
}

// Close stops every BMC and closes their connections; requests in flight,
// hanging ones included, are cut off.
func (s *Server) Close() error {
	s.mu.Lock()
	s.closed = true
	bmcs := make([]*BMC, 0, len(s.bmcs))
	for b := range s.bmcs {
		bmcs = append(bmcs, b)
	}
	s.mu.Unlock()
	for _, b := range bmcs {
		_ = b.Close() // a listener that fails to close is closed by http.Server.Close below
	}
	return s.http.Close()
}

func (s *Server) forget(b *BMC) {
	s.mu.Lock()
	delete(s.bmcs, b)
	s.mu.Unlock()
}

func (s *Server) serveHTTP(w http.ResponseWriter, r *http.Request) {
	b, _ := r.Context().Value(bmcContextKey{}).(*BMC)
	if b == nil {
		http.NotFound(w, r)
		return
	}
	b.serveHTTP(w, r)
}

// bmcListener marks each accepted connection with the BMC it belongs to, so
// the one shared http.Server can tell BMCs apart.
type bmcListener struct {
	net.Listener
	bmc *BMC
}

func (l bmcListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err != nil {
		return nil, err
	}
	return &bmcConn{Conn: c, bmc: l.bmc}, nil
}

type bmcConn struct {
	net.Conn
	bmc *BMC
}

// bmcOf returns the BMC a connection was accepted for, looking through TLS.
func bmcOf(c net.Conn) *BMC {
	if tc, ok := c.(*tls.Conn); ok {
		c = tc.NetConn()
	}
	if bc, ok := c.(*bmcConn); ok {
		return bc.bmc
	}
	return nil
}
