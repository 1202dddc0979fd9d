package bmc

import (
	"context"
	"crypto/tls"
	"io"
	"net/http"
	"sync"
	"time"
)

// DefaultConnIdleTimeout closes a kept-alive BMC connection unused this long. A connection
// serves a burst of calls (login, inspection and power-on when onboarding; a provisioning
// step) and then goes: held between power polls (every 2 minutes) it would take one of the
// BMC's few HTTP slots and memory here for 1,000 BMCs, to save one TLS handshake per poll,
// and BMC web servers drop idle connections after a few seconds anyway.
const DefaultConnIdleTimeout = 10 * time.Second

// newHTTPTransport verifies TLS against the host's CA bundle (or the system store) unless the
// host explicitly opted out.
func newHTTPTransport(t Target) *http.Transport {
	transport := http.DefaultTransport.(*http.Transport).Clone()
	transport.TLSClientConfig = &tls.Config{
		MinVersion:         tls.VersionTLS12,
		RootCAs:            t.CAPool,
		InsecureSkipVerify: t.InsecureSkipVerify, //nolint:gosec // only from the host's explicit, surfaced opt-out
		// The connection goes between power polls (see DefaultConnIdleTimeout); the next one
		// resumes the TLS session instead of a full handshake, which spares the BMC's slow CPU
		// a signature and us a certificate-chain verification every poll. A resumed session
		// is bound to the certificate verified when it began, and a new CA bundle means a new
		// session (Target.CADigest is in its fingerprint), so a new transport and cache.
		ClientSessionCache: tls.NewLRUClientSessionCache(1),
	}
	// One connection per BMC: the pool runs one operation at a time per BMC, and gofish, which
	// fetches collection members from several goroutines, would otherwise open a second
	// connection while a response body is still being read. BMCs have few connection slots.
	transport.MaxConnsPerHost = 1
	transport.MaxIdleConnsPerHost = 1
	transport.IdleConnTimeout = t.ConnIdleTimeout
	if t.ConnIdleTimeout <= 0 {
		transport.IdleConnTimeout = DefaultConnIdleTimeout
	}
	return transport
}

// sessionTransport carries one Redfish session's requests. gofish marks every request
// "Connection: close" unless it built the HTTP client itself, which it cannot do with a CA
// pool of ours, so without this each request would pay a TCP connect and a TLS handshake.
// It also bounds each request by the context of the operation in progress: gofish sends
// every request with the context the session was opened with.
type sessionTransport struct {
	base *http.Transport

	mu  sync.Mutex
	ctx context.Context // the operation in progress; nil between operations
}

// begin makes ctx the context of the requests that follow, until the returned func is called.
func (s *sessionTransport) begin(ctx context.Context) (end func()) {
	s.mu.Lock()
	s.ctx = ctx
	s.mu.Unlock()
	return func() {
		s.mu.Lock()
		s.ctx = nil
		s.mu.Unlock()
	}
}

// RoundTrip sends req on a kept-alive connection, under the current operation's context.
func (s *sessionTransport) RoundTrip(req *http.Request) (*http.Response, error) {
	s.mu.Lock()
	ctx := s.ctx
	s.mu.Unlock()
	if ctx == nil {
		ctx = req.Context()
	}
	out := req.Clone(ctx) // a RoundTripper must not change the caller's request
	out.Close = false
	resp, err := s.base.RoundTrip(out)
	if err != nil {
		return nil, err
	}
	resp.Body = drainOnClose{resp.Body}
	return resp, nil
}

// maxDrain is how much of an unread response body is read on Close to keep its connection.
const maxDrain = 64 << 10

// drainOnClose reads what is left of a body before closing it: Go reuses a connection only
// after its response was read to the end, and gofish closes bodies unread (actions, PATCH)
// or half-read (a JSON decoder stops before the trailing newline).
type drainOnClose struct{ io.ReadCloser }

func (b drainOnClose) Close() error {
	_, _ = io.CopyN(io.Discard, b.ReadCloser, maxDrain)
	return b.ReadCloser.Close()
}

// close drops the session's idle connections.
func (s *sessionTransport) close() { s.base.CloseIdleConnections() }
