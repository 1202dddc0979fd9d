package agentapi

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	infrav1 "github.com/anvil-metal/cluster-api-provider-anvil/api/v1alpha1"
)

func fastClient(t *testing.T, base, tok string) *Client {
	t.Helper()
	c, err := NewClient(base, tok, ClientOptions{InitialBackoff: time.Millisecond, MaxBackoff: 5 * time.Millisecond, MaxAttempts: 5})
	if err != nil {
		t.Fatal(err)
	}
	return c
}

func TestClientFlow(t *testing.T) {
	e := newEnv(t)
	tok := e.token(hostA, "a1")
	c := fastClient(t, e.http.URL, tok)
	ctx := context.Background()

	reg, err := c.Register(ctx, "v0.1.0", infrav1.HardwareInventory{Source: "InBand"})
	if err != nil || reg.Host != "lab/server-a" || reg.Attempt != "a1" || reg.PollIntervalSeconds != 5 {
		t.Fatalf("register: %+v %v", reg, err)
	}
	task, err := c.NextTask(ctx)
	if err != nil || task.ID != "t1" || task.ConfigDrive.MetaData.ProviderID != "anvil://lab/server-a" {
		t.Fatalf("task: %+v %v", task, err)
	}
	if err := c.Progress(ctx, Progress{TaskID: "t1", Step: "download", Percent: 10}); err != nil {
		t.Fatal(err)
	}
	data, err := c.BootstrapData(ctx)
	if err != nil || string(data) != secretA {
		t.Fatalf("bootstrap: %v", err)
	}
	if err := c.Result(ctx, Result{TaskID: "t1", Kind: TaskInstall, OK: true, Slot: infrav1.SlotA}); err != nil {
		t.Fatal(err)
	}
	// A repeated result (response lost) is accepted once more and recorded once.
	if err := c.Result(ctx, Result{TaskID: "t1", Kind: TaskInstall, OK: true, Slot: infrav1.SlotA}); err != nil {
		t.Fatal(err)
	}
	if h, _ := e.backend.Host(hostA); len(h.Results) != 1 {
		t.Fatalf("results recorded: %d", len(h.Results))
	}
	task, err = c.NextTask(ctx)
	if err != nil || task.Kind != TaskNone {
		t.Fatalf("after result: %+v %v", task, err)
	}
	for _, s := range []string{fmt.Sprint(c), fmt.Sprintf("%+v", c), fmt.Sprintf("%#v", c)} {
		if strings.Contains(s, tok) || strings.Contains(s, c.session) {
			t.Fatalf("formatting the client leaks secrets: %s", s)
		}
	}
}

func TestClientRetries5xx(t *testing.T) {
	e := newEnv(t)
	c := fastClient(t, e.http.URL, e.token(hostA, "a1"))
	ctx := context.Background()
	e.backend.FailNext("Registered", errors.New("transient"))
	if _, err := c.Register(ctx, "v", infrav1.HardwareInventory{}); err != nil {
		t.Fatalf("register should have retried past one 503: %v", err)
	}
	e.backend.FailNext("NextTask", errors.New("transient"))
	if _, err := c.NextTask(ctx); err != nil {
		t.Fatalf("task should have retried: %v", err)
	}
}

func TestClientDoesNotRetry4xx(t *testing.T) {
	var calls atomic.Int32
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
		calls.Add(1)
		writeError(w, http.StatusForbidden, "forbidden", "this boot attempt is not expected")
	}))
	defer srv.Close()
	c := fastClient(t, srv.URL, "tok-secret-value")
	_, err := c.NextTask(context.Background())
	var apiErr *APIError
	if !errors.As(err, &apiErr) || apiErr.Status != http.StatusForbidden || calls.Load() != 1 {
		t.Fatalf("err = %v, calls = %d", err, calls.Load())
	}
}

// TestClientRetryAfterLostResponse: the server registered the agent but the response never
// arrived; the retry (same session) succeeds and is not a second registration.
func TestClientRetryAfterLostResponse(t *testing.T) {
	e := newEnv(t)
	var dropped atomic.Bool
	e.http.Config.Handler = http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == PathRegister && !dropped.Swap(true) {
			e.srv.ServeHTTP(httptest.NewRecorder(), r) // processed, answer discarded
			conn, _, err := w.(http.Hijacker).Hijack()
			if err == nil {
				_ = conn.Close()
			}
			return
		}
		e.srv.ServeHTTP(w, r)
	})
	c := fastClient(t, e.http.URL, e.token(hostA, "a1"))
	if _, err := c.Register(context.Background(), "v", infrav1.HardwareInventory{}); err != nil {
		t.Fatalf("register after a lost response: %v", err)
	}
	if h, _ := e.backend.Host(hostA); len(h.Registrations) != 1 || len(e.eventKinds()) != 0 {
		t.Fatalf("registrations %d, events %v", len(h.Registrations), e.eventKinds())
	}
}

func TestClientErrorsDoNotLeakToken(t *testing.T) {
	srv := httptest.NewServer(http.NotFoundHandler())
	base := srv.URL
	srv.Close() // connection refused from now on
	tok := "v1.SECRETPAYLOAD.SECRETMAC"
	c := fastClient(t, base, tok)
	_, err := c.NextTask(context.Background())
	if err == nil || strings.Contains(err.Error(), "SECRET") {
		t.Fatalf("err = %v", err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if _, err := c.BootstrapData(ctx); err == nil || strings.Contains(err.Error(), "SECRET") {
		t.Fatalf("cancelled: err = %v", err)
	}
}

func TestNewClientValidation(t *testing.T) {
	for _, u := range []string{"file:///etc/passwd", "http://user:pw@10.0.0.1", "10.0.0.1:8080", "http://x/?q=1", ""} {
		if _, err := NewClient(u, "t", ClientOptions{}); err == nil {
			t.Errorf("%q accepted", u)
		} else if strings.Contains(err.Error(), "pw") {
			t.Errorf("error echoes credentials: %v", err)
		}
	}
	if _, err := NewClient("http://10.0.0.1", "", ClientOptions{}); err == nil {
		t.Error("empty token accepted")
	}
}

func TestParseKernelCmdline(t *testing.T) {
	p, err := ParseKernelCmdline(`BOOT_IMAGE=vmlinuz initrd=initramfs anvil.api=http://10.0.0.1:8080 anvil.token=v1.abc.def console=ttyS0,115200n8 "anvil.ca=sha256:00" -- anvil.token=init-arg` + "\n")
	if err != nil || p.APIURL != "http://10.0.0.1:8080" || p.Token != "v1.abc.def" || p.CAFingerprint != "sha256:00" {
		t.Fatalf("%+v %v", p, err)
	}
	if s := fmt.Sprintf("%v %+v %#v", p, p, p); strings.Contains(s, "v1.abc.def") {
		t.Fatalf("BootParams formatting leaks the token: %s", s)
	}
	if _, err := ParseKernelCmdline("quiet anvil.token=secret"); err == nil || strings.Contains(err.Error(), "secret") {
		t.Fatalf("missing api: %v", err)
	}
}

func TestPinnedTLS(t *testing.T) {
	e := newEnv(t)
	tlsSrv := httptest.NewTLSServer(e.srv)
	defer tlsSrv.Close()
	sum := sha256.Sum256(tlsSrv.Certificate().Raw)
	pin := "sha256:" + hex.EncodeToString(sum[:])

	c, err := NewClient(tlsSrv.URL, e.token(hostA, "a1"), ClientOptions{CAFingerprint: pin, MaxAttempts: 1})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := c.Register(context.Background(), "v", infrav1.HardwareInventory{}); err != nil {
		t.Fatalf("pinned TLS: %v", err)
	}
	wrong := "sha256:" + strings.Repeat("ab", 32)
	c2, _ := NewClient(tlsSrv.URL, e.token(hostB, "a1"), ClientOptions{CAFingerprint: wrong, MaxAttempts: 1})
	if _, err := c2.Register(context.Background(), "v", infrav1.HardwareInventory{}); err == nil || !strings.Contains(err.Error(), "pinned") {
		t.Fatalf("wrong pin: %v", err)
	}
	if _, err := PinnedTLSConfig("md5:00", "127.0.0.1"); err == nil {
		t.Fatal("bad fingerprint accepted")
	}
	// The right pin for a certificate that does not name the host the agent dialled.
	cfg, _ := PinnedTLSConfig(pin, "10.9.9.9")
	hc := &http.Client{Transport: &http.Transport{TLSClientConfig: cfg}}
	c3, _ := NewClient(tlsSrv.URL, e.token(hostB, "a1"), ClientOptions{HTTPClient: hc, MaxAttempts: 1})
	if _, err := c3.Register(context.Background(), "v", infrav1.HardwareInventory{}); err == nil || !strings.Contains(err.Error(), "10.9.9.9") {
		t.Fatalf("certificate for another host accepted: %v", err)
	}
}
