package agentapi

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	mrand "math/rand/v2"
	"net"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"time"

	"github.com/go-logr/logr"

	infrav1 "github.com/anvil-metal/cluster-api-provider-anvil/api/v1alpha1"
)

// ClientOptions configure a Client.
type ClientOptions struct {
	// HTTPClient to use; nil means one with sensible timeouts (and, with CAFingerprint, a
	// pinned TLS configuration).
	HTTPClient *http.Client
	// CAFingerprint, when set (sha256:<hex>, the anvil.ca kernel parameter), pins the server's
	// certificate or CA. Ignored when HTTPClient is given.
	CAFingerprint string
	// DialContext opens the connections (ignored when HTTPClient is given); nil means a
	// net.Dialer. The lab dials from an emulated server's own network namespace with it.
	DialContext func(ctx context.Context, network, addr string) (net.Conn, error)
	// MaxAttempts per call, counting the first; default 10. Calls also stop when ctx ends.
	MaxAttempts int
	// InitialBackoff and MaxBackoff bound the exponential back-off between attempts
	// (defaults 500ms and 30s); each wait is jittered.
	InitialBackoff, MaxBackoff time.Duration
	Log                        logr.Logger
}

// Client is the agent's side of the protocol. It retries connection errors, 429 and 5xx with
// back-off; other errors are returned as *APIError. Neither its errors nor its logs contain the
// token, the session key or bootstrap data. Safe for concurrent use.
type Client struct {
	base    *url.URL
	token   string
	session string
	http    *http.Client
	opts    ClientOptions
}

// APIError is a non-retryable answer from the server.
type APIError struct {
	Status int
	Code   string
	// Message is the server's message (the server never puts secrets in it).
	Message string
}

func (e *APIError) Error() string {
	return fmt.Sprintf("agent API: %d %s: %s", e.Status, e.Code, e.Message)
}

// NewClient returns a client for the API at baseURL (the anvil.api kernel parameter) that
// authenticates with tok (anvil.token). It draws the session key that binds this agent to its
// registration.
func NewClient(baseURL, tok string, o ClientOptions) (*Client, error) {
	u, err := url.Parse(baseURL)
	if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
		return nil, errors.New("agent API: base URL must be an http:// or https:// URL with a host")
	}
	if u.User != nil || u.RawQuery != "" || u.Fragment != "" {
		return nil, errors.New("agent API: base URL must not carry credentials, a query or a fragment")
	}
	if tok == "" {
		return nil, errors.New("agent API: a boot token is required")
	}
	var key [32]byte
	if _, err := rand.Read(key[:]); err != nil {
		return nil, fmt.Errorf("agent API: session key: %w", err)
	}
	if o.MaxAttempts <= 0 {
		o.MaxAttempts = 10
	}
	if o.InitialBackoff <= 0 {
		o.InitialBackoff = 500 * time.Millisecond
	}
	if o.MaxBackoff <= 0 {
		o.MaxBackoff = 30 * time.Second
	}
	if o.Log.GetSink() == nil {
		o.Log = logr.Discard()
	}
	hc := o.HTTPClient
	if hc == nil {
		dial := o.DialContext
		if dial == nil {
			dial = (&net.Dialer{Timeout: 10 * time.Second, KeepAlive: 30 * time.Second}).DialContext
		}
		tr := &http.Transport{
			Proxy:                 nil, // the agent talks to the boot services directly
			DialContext:           dial,
			TLSHandshakeTimeout:   10 * time.Second,
			ResponseHeaderTimeout: 60 * time.Second,
			IdleConnTimeout:       90 * time.Second,
		}
		if o.CAFingerprint != "" {
			cfg, err := PinnedTLSConfig(o.CAFingerprint, u.Hostname())
			if err != nil {
				return nil, err
			}
			tr.TLSClientConfig = cfg
		}
		hc = &http.Client{Transport: tr, Timeout: 2 * time.Minute}
	}
	u.Path = strings.TrimSuffix(u.Path, "/")
	return &Client{base: u, token: tok, session: hex.EncodeToString(key[:]), http: hc, opts: o}, nil
}

// String describes the client without its secrets (so %v of a Client is safe to log).
func (c *Client) String() string { return "agentapi.Client(" + c.base.String() + ")" }

// GoString is String, so %#v does not dump the token either.
func (c *Client) GoString() string { return c.String() }

// Register registers the agent with its hardware inventory.
func (c *Client) Register(ctx context.Context, agentVersion string, inv infrav1.HardwareInventory) (RegisterResponse, error) {
	var out RegisterResponse
	err := c.call(ctx, http.MethodPost, PathRegister, RegisterRequest{AgentVersion: agentVersion, Inventory: inv}, &out)
	return out, err
}

// NextTask asks for the next task.
func (c *Client) NextTask(ctx context.Context) (Task, error) {
	var out Task
	err := c.call(ctx, http.MethodGet, PathTask, nil, &out)
	return out, err
}

// Progress reports progress on a task.
func (c *Client) Progress(ctx context.Context, p Progress) error {
	return c.call(ctx, http.MethodPost, PathProgress, p, nil)
}

// Result reports a task's outcome.
func (c *Client) Result(ctx context.Context, r Result) error {
	return c.call(ctx, http.MethodPost, PathResult, r, nil)
}

// BootstrapData fetches the user-data. It is a secret: write it where it belongs, log nothing.
func (c *Client) BootstrapData(ctx context.Context) ([]byte, error) {
	var out []byte
	err := c.call(ctx, http.MethodGet, PathBootstrap, nil, &out)
	return out, err
}

// call does one API call with retries. out is *[]byte for raw bodies, else JSON-decoded.
func (c *Client) call(ctx context.Context, method, path string, in, out any) error {
	var body []byte
	if in != nil {
		var err error
		if body, err = json.Marshal(in); err != nil {
			return fmt.Errorf("agent API %s: encoding request: %w", path, err)
		}
	}
	u := *c.base
	u.Path += path
	target := u.String()

	backoff := c.opts.InitialBackoff
	var lastErr error
	for attempt := 1; ; attempt++ {
		retryAfter, err := c.once(ctx, method, target, body, out)
		if err == nil {
			return nil
		}
		var apiErr *APIError
		if errors.As(err, &apiErr) {
			return err
		}
		lastErr = err
		if attempt >= c.opts.MaxAttempts || ctx.Err() != nil {
			break
		}
		wait := backoff/2 + mrand.N(backoff/2+1) //nolint:gosec // jitter, not a secret
		if retryAfter > wait {
			wait = min(retryAfter, c.opts.MaxBackoff)
		}
		c.opts.Log.V(1).Info("agent API call failed, retrying", "path", path, "attempt", attempt, "wait", wait, "error", err.Error())
		t := time.NewTimer(wait)
		select {
		case <-ctx.Done():
			t.Stop()
			return fmt.Errorf("agent API %s %s: %w (last error: %w)", method, path, ctx.Err(), lastErr)
		case <-t.C:
		}
		backoff = min(backoff*2, c.opts.MaxBackoff)
	}
	return fmt.Errorf("agent API %s %s: giving up: %w", method, path, lastErr)
}

// retryableError is a failure worth another attempt.
type retryableError struct{ msg string }

func (e *retryableError) Error() string { return e.msg }

func (c *Client) once(ctx context.Context, method, target string, body []byte, out any) (time.Duration, error) {
	var rd io.Reader
	if body != nil {
		rd = bytes.NewReader(body)
	}
	req, err := http.NewRequestWithContext(ctx, method, target, rd)
	if err != nil {
		return 0, &APIError{Code: "client", Message: "building request failed"}
	}
	req.Header.Set("Authorization", "Bearer "+c.token)
	req.Header.Set(SessionHeader, c.session)
	req.Header.Set("Accept", "application/json")
	if body != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	resp, err := c.http.Do(req)
	if err != nil {
		// *url.Error names the URL, which holds no secret (the token travels in a header).
		return 0, &retryableError{msg: err.Error()}
	}
	defer func() { _ = resp.Body.Close() }()

	switch {
	case resp.StatusCode >= 200 && resp.StatusCode < 300:
		return 0, decodeBody(resp, out)
	case resp.StatusCode == http.StatusTooManyRequests || resp.StatusCode >= 500:
		_, _ = io.Copy(io.Discard, io.LimitReader(resp.Body, 64<<10))
		var ra time.Duration
		if s, err := strconv.Atoi(resp.Header.Get("Retry-After")); err == nil && s > 0 {
			ra = time.Duration(s) * time.Second
		}
		return ra, &retryableError{msg: fmt.Sprintf("server answered %d", resp.StatusCode)}
	default:
		var eb errorBody
		_ = json.NewDecoder(io.LimitReader(resp.Body, 4<<10)).Decode(&eb)
		return 0, &APIError{Status: resp.StatusCode, Code: eb.Code, Message: eb.Error}
	}
}

func decodeBody(resp *http.Response, out any) error {
	if out == nil {
		_, _ = io.Copy(io.Discard, io.LimitReader(resp.Body, 64<<10))
		return nil
	}
	if raw, ok := out.(*[]byte); ok {
		b, err := io.ReadAll(io.LimitReader(resp.Body, maxBootstrap+1))
		if err != nil {
			return &retryableError{msg: "reading response: " + err.Error()}
		}
		if len(b) > maxBootstrap {
			return &APIError{Status: resp.StatusCode, Code: "client", Message: "response too large"}
		}
		*raw = b
		return nil
	}
	if err := json.NewDecoder(io.LimitReader(resp.Body, maxRegisterBody)).Decode(out); err != nil {
		return &retryableError{msg: "decoding response: " + err.Error()}
	}
	return nil
}

// PinnedTLSConfig returns a TLS configuration that trusts exactly the certificate whose DER
// has the given SHA-256 fingerprint ("sha256:<64 hex>"): either the server's own (self-signed)
// certificate or the CA that signed it. The system roots play no part: the agent knows the
// boot services only through its kernel command line. host (an IP address or DNS name) must be
// named by the server's certificate; Go sends no SNI for IP addresses, so it is passed here
// rather than taken from the handshake.
func PinnedTLSConfig(fingerprint, host string) (*tls.Config, error) {
	hexfp, ok := strings.CutPrefix(strings.ToLower(fingerprint), "sha256:")
	want, err := hex.DecodeString(hexfp)
	if !ok || err != nil || len(want) != sha256.Size {
		return nil, errors.New("agent API: CA fingerprint must be sha256:<64 hex digits>")
	}
	if host == "" {
		return nil, errors.New("agent API: pinned TLS needs the server's host name or address")
	}
	cfg := &tls.Config{
		MinVersion: tls.VersionTLS12,
		// Go's own verification is replaced by VerifyConnection below, which checks the chain
		// against the pinned certificate (including the host name); nothing is skipped.
		InsecureSkipVerify: true, //nolint:gosec // verification is done in VerifyConnection
		VerifyConnection: func(cs tls.ConnectionState) error {
			if len(cs.PeerCertificates) == 0 {
				return errors.New("server presented no certificate")
			}
			roots := x509.NewCertPool()
			inter := x509.NewCertPool()
			found := false
			for _, cert := range cs.PeerCertificates {
				sum := sha256.Sum256(cert.Raw)
				if bytes.Equal(sum[:], want) {
					roots.AddCert(cert)
					found = true
				} else {
					inter.AddCert(cert)
				}
			}
			if !found {
				return errors.New("server certificate does not match the pinned fingerprint")
			}
			_, err := cs.PeerCertificates[0].Verify(x509.VerifyOptions{
				Roots: roots, Intermediates: inter, DNSName: host,
				KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
			})
			return err
		},
	}
	return cfg, nil
}

// BootParams are the agent's settings from the kernel command line.
type BootParams struct {
	APIURL        string
	Token         string
	CAFingerprint string
}

// String leaves the token out.
func (p BootParams) String() string {
	return fmt.Sprintf("BootParams{APIURL: %s, Token: [redacted], CAFingerprint: %s}", p.APIURL, p.CAFingerprint)
}

// GoString is String.
func (p BootParams) GoString() string { return p.String() }

// ParseKernelCmdline reads the anvil.* parameters from a kernel command line
// (/proc/cmdline). Double quotes are handled the way the kernel does.
func ParseKernelCmdline(cmdline string) (BootParams, error) {
	var p BootParams
	for _, arg := range splitCmdline(cmdline) {
		k, v, _ := strings.Cut(arg, "=")
		switch k {
		case KernelParamAPI:
			p.APIURL = v
		case KernelParamToken:
			p.Token = v
		case KernelParamCA:
			p.CAFingerprint = v
		}
	}
	var missing []string
	if p.APIURL == "" {
		missing = append(missing, KernelParamAPI)
	}
	if p.Token == "" {
		missing = append(missing, KernelParamToken)
	}
	if len(missing) > 0 {
		return BootParams{}, fmt.Errorf("kernel command line lacks %s", strings.Join(missing, " and "))
	}
	return p, nil
}

// SplitKernelCmdline splits a kernel command line into its arguments the way the kernel
// does (see splitCmdline).
func SplitKernelCmdline(cmdline string) []string { return splitCmdline(cmdline) }

// splitCmdline splits on whitespace outside double quotes and drops the quotes, as the
// kernel's next_arg does. Arguments after a bare "--" belong to init and are ignored.
func splitCmdline(s string) []string {
	var out []string
	var cur strings.Builder
	inQuote, have := false, false
	flush := func() {
		if have {
			out = append(out, cur.String())
		}
		cur.Reset()
		have = false
	}
	for _, r := range s {
		switch {
		case r == '"':
			inQuote = !inQuote
			have = true
		case !inQuote && (r == ' ' || r == '\t' || r == '\n' || r == '\r' || r == '\v' || r == '\f'):
			if have && cur.String() == "--" {
				return out
			}
			flush()
		default:
			cur.WriteRune(r)
			have = true
		}
	}
	if cur.String() != "--" {
		flush()
	}
	return out
}
