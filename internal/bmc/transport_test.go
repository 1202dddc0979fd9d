package bmc

import (
	"crypto/tls"
	"crypto/x509"
	"net/http"
	"net/http/httptest"
	"sync/atomic"
	"testing"
)

// TestBMCConnectionsResumeTLSSessions: after the idle connection goes, the next call to the
// same BMC resumes its TLS session instead of a full handshake, and the certificate is still
// checked against the host's CA bundle on the first.
func TestBMCConnectionsResumeTLSSessions(t *testing.T) {
	var handshakes, resumed atomic.Int32
	srv := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
		_, _ = w.Write([]byte("{}"))
	}))
	srv.TLS = &tls.Config{MinVersion: tls.VersionTLS12, VerifyConnection: func(cs tls.ConnectionState) error {
		handshakes.Add(1)
		if cs.DidResume {
			resumed.Add(1)
		}
		return nil
	}}
	srv.StartTLS()
	defer srv.Close()
	get := func(transport *http.Transport) error {
		resp, err := (&http.Client{Transport: transport}).Get(srv.URL)
		if err == nil {
			_ = resp.Body.Close()
		}
		return err
	}

	// Another CA: the first handshake fails verification, and nothing is cached to resume.
	if err := get(newHTTPTransport(Target{CAPool: x509.NewCertPool()})); err == nil {
		t.Fatal("a BMC certificate from an unknown CA was accepted")
	}

	pool := x509.NewCertPool()
	pool.AddCert(srv.Certificate())
	transport := newHTTPTransport(Target{CAPool: pool})
	for range 3 {
		if err := get(transport); err != nil {
			t.Fatal(err)
		}
		transport.CloseIdleConnections() // what the idle timeout does between polls
	}
	if got := resumed.Load(); got != 2 {
		t.Fatalf("%d of %d handshakes resumed, want the 2 after the first verified one", got, handshakes.Load())
	}
}

// TestRotatedCABundleOpensANewSession: the session (and its TLS session cache) belongs to the
// CA bundle it was verified with; a different bundle gives a different fingerprint.
func TestRotatedCABundleOpensANewSession(t *testing.T) {
	before := Target{Username: "u", Password: "p", CADigest: "old"}
	after := before
	after.CADigest = "new"
	if before.fingerprint() == after.fingerprint() {
		t.Fatal("a rotated CA bundle keeps the session opened with the old one")
	}
}
