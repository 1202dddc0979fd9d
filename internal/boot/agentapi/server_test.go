package agentapi

import (
	"bytes"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/go-logr/logr/funcr"
	"k8s.io/apimachinery/pkg/types"

	infrav1 "github.com/anvil-metal/cluster-api-provider-anvil/api/v1alpha1"
	"github.com/anvil-metal/cluster-api-provider-anvil/internal/boot/token"
)

var (
	hostA = types.NamespacedName{Namespace: "lab", Name: "server-a"}
	hostB = types.NamespacedName{Namespace: "lab", Name: "server-b"}
)

const (
	secretA = "#cloud-config\nwrite_files: [{path: /etc/kubernetes/pki/ca.key, content: SECRET-CA-KEY-OF-A}]\n"
	secretB = "#cloud-config\n# SECRET-CA-KEY-OF-B\n"
)

type clock struct {
	mu sync.Mutex
	t  time.Time
}

func (c *clock) now() time.Time      { c.mu.Lock(); defer c.mu.Unlock(); return c.t }
func (c *clock) add(d time.Duration) { c.mu.Lock(); defer c.mu.Unlock(); c.t = c.t.Add(d) }

// env is one agent API server with a fake backend, capturing logs and security events.
type env struct {
	t       *testing.T
	issuer  *token.Issuer
	clock   *clock
	backend *FakeBackend
	srv     *Server
	http    *httptest.Server

	mu     sync.Mutex
	logs   bytes.Buffer
	events []SecurityEvent
}

func newEnv(t *testing.T) *env {
	t.Helper()
	e := &env{t: t, clock: &clock{t: time.Now()}, backend: NewFakeBackend()}
	var err error
	e.issuer, err = token.NewIssuer(token.Options{Now: e.clock.now})
	if err != nil {
		t.Fatal(err)
	}
	log := funcr.New(func(prefix, args string) {
		e.mu.Lock()
		defer e.mu.Unlock()
		e.logs.WriteString(prefix + " " + args + "\n")
	}, funcr.Options{Verbosity: 10})
	e.srv, err = NewServer(ServerOptions{Tokens: e.issuer, Backend: e.backend, Log: log,
		OnSecurityEvent: func(ev SecurityEvent) {
			e.mu.Lock()
			defer e.mu.Unlock()
			e.events = append(e.events, ev)
		}})
	if err != nil {
		t.Fatal(err)
	}
	e.http = httptest.NewServer(e.srv)
	t.Cleanup(e.http.Close)

	e.backend.SetHost(hostA, FakeHost{
		View:      HostView{State: infrav1.HostStateProvisioning, Attempt: "a1"},
		Bootstrap: []byte(secretA),
		Tasks: []Task{{ID: "t1", Kind: TaskInstall, Image: &Image{URL: "http://10.0.0.1/images/x", Checksum: "sha256:" + strings.Repeat("0", 64)},
			ConfigDrive: &ConfigDrive{MetaData: MetaData{InstanceID: "i-1", LocalHostname: "server-a", ProviderID: "anvil://lab/server-a"}}}},
	})
	e.backend.SetHost(hostB, FakeHost{
		View:      HostView{State: infrav1.HostStateProvisioning, Attempt: "a1"},
		Bootstrap: []byte(secretB),
	})
	return e
}

func (e *env) token(host types.NamespacedName, attempt string) string {
	e.t.Helper()
	tok, err := e.issuer.Issue(host, attempt, time.Hour)
	if err != nil {
		e.t.Fatal(err)
	}
	return tok
}

func newSession() string {
	var b [32]byte
	_, _ = rand.Read(b[:])
	return hex.EncodeToString(b[:])
}

// do sends a raw request; tok and sess may be empty to leave the header out.
func (e *env) do(method, path, tok, sess string, body any) (int, []byte) {
	e.t.Helper()
	var rd io.Reader
	if body != nil {
		b, _ := json.Marshal(body)
		rd = bytes.NewReader(b)
	}
	req, _ := http.NewRequest(method, e.http.URL+path, rd)
	if tok != "" {
		req.Header.Set("Authorization", "Bearer "+tok)
	}
	if sess != "" {
		req.Header.Set(SessionHeader, sess)
	}
	resp, err := e.http.Client().Do(req)
	if err != nil {
		e.t.Fatal(err)
	}
	defer func() { _ = resp.Body.Close() }()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, b
}

func (e *env) register(tok, sess string) int {
	code, _ := e.do(http.MethodPost, PathRegister, tok, sess, RegisterRequest{AgentVersion: "test",
		Inventory: infrav1.HardwareInventory{Source: "InBand", CPU: infrav1.CPUInfo{Arch: "amd64", Cores: 8}}})
	return code
}

func (e *env) eventKinds() []SecurityEventKind {
	e.mu.Lock()
	defer e.mu.Unlock()
	var k []SecurityEventKind
	for _, ev := range e.events {
		k = append(k, ev.Kind)
	}
	return k
}

// assertNoSecrets checks logs and events for tokens, sessions and bootstrap data.
func (e *env) assertNoSecrets(secrets ...string) {
	e.t.Helper()
	e.mu.Lock()
	defer e.mu.Unlock()
	all := e.logs.String()
	for _, ev := range e.events {
		all += ev.Message + ev.TokenID
	}
	for _, s := range append(secrets, "SECRET-CA-KEY") {
		if s != "" && strings.Contains(all, s) {
			e.t.Fatalf("logs or events contain a secret (%.12s…)", s)
		}
	}
}

func TestHappyPath(t *testing.T) {
	e := newEnv(t)
	tok, sess := e.token(hostA, "a1"), newSession()
	if code := e.register(tok, sess); code != http.StatusOK {
		t.Fatalf("register: %d", code)
	}
	code, body := e.do(http.MethodGet, PathTask, tok, sess, nil)
	var task Task
	if code != http.StatusOK || json.Unmarshal(body, &task) != nil || task.ID != "t1" || task.Kind != TaskInstall {
		t.Fatalf("task: %d %s", code, body)
	}
	if code, body := e.do(http.MethodPost, PathProgress, tok, sess, Progress{TaskID: "t1", Step: "write", Percent: 40, Message: "40%\x1b[31m\nforged log line"}); code != http.StatusNoContent {
		t.Fatalf("progress: %d %s", code, body)
	}
	code, body = e.do(http.MethodGet, PathBootstrap, tok, sess, nil)
	if code != http.StatusOK || string(body) != secretA {
		t.Fatalf("bootstrap: %d", code)
	}
	if code, body := e.do(http.MethodPost, PathResult, tok, sess, Result{TaskID: "t1", Kind: TaskInstall, OK: true, Slot: infrav1.SlotB}); code != http.StatusNoContent {
		t.Fatalf("result: %d %s", code, body)
	}
	h, _ := e.backend.Host(hostA)
	if len(h.Registrations) != 1 || h.Registrations[0].Inventory.CPU.Cores != 8 || len(h.Results) != 1 || h.Results[0].Slot != infrav1.SlotB {
		t.Fatalf("backend saw %+v", h)
	}
	if strings.ContainsAny(h.Progress[0].Message, "\x1b\n") {
		t.Fatalf("control characters reached the backend: %q", h.Progress[0].Message)
	}
	if len(e.eventKinds()) != 0 {
		t.Fatalf("unexpected security events %v", e.eventKinds())
	}
	e.assertNoSecrets(tok, sess)
}

// TestAuthMatrix runs every endpoint against every way of presenting bad credentials.
func TestAuthMatrix(t *testing.T) {
	endpoints := []struct {
		method, path string
		body         any
	}{
		{http.MethodPost, PathRegister, RegisterRequest{}},
		{http.MethodGet, PathTask, nil},
		{http.MethodPost, PathProgress, Progress{TaskID: "t1", Step: "x"}},
		{http.MethodPost, PathResult, Result{TaskID: "t1", Kind: TaskInstall, OK: true}},
		{http.MethodGet, PathBootstrap, nil},
	}
	other, _ := token.NewIssuer(token.Options{})
	foreign, _ := other.Issue(hostA, "a1", time.Hour)

	cases := []struct {
		name  string
		setup func(e *env) (tok, sess string)
		want  int
	}{
		{"no token", func(*env) (string, string) { return "", newSession() }, http.StatusUnauthorized},
		{"garbage token", func(*env) (string, string) { return "garbage", newSession() }, http.StatusUnauthorized},
		{"token of another issuer", func(*env) (string, string) { return foreign, newSession() }, http.StatusUnauthorized},
		{"tampered token", func(e *env) (string, string) {
			tok := e.token(hostA, "a1")
			b := []byte(tok)
			b[len(b)-2] ^= 0x01
			return string(b), newSession()
		}, http.StatusUnauthorized},
		{"expired token", func(e *env) (string, string) {
			tok, _ := e.issuer.Issue(hostA, "a1", time.Minute)
			e.clock.add(2 * time.Minute)
			return tok, newSession()
		}, http.StatusUnauthorized},
		{"stale attempt", func(e *env) (string, string) { return e.token(hostA, "a0"), newSession() }, http.StatusForbidden},
		{"host not expecting a boot", func(e *env) (string, string) {
			e.backend.Update(hostA, func(h *FakeHost) { h.View.Attempt = "" })
			return e.token(hostA, "a1"), newSession()
		}, http.StatusForbidden},
		{"unknown host", func(e *env) (string, string) {
			return e.token(types.NamespacedName{Namespace: "lab", Name: "nope"}, "a1"), newSession()
		}, http.StatusForbidden},
		{"valid token, no session", func(e *env) (string, string) { return e.token(hostA, "a1"), "" }, http.StatusBadRequest},
	}
	for _, c := range cases {
		for _, ep := range endpoints {
			t.Run(c.name+" "+ep.path, func(t *testing.T) {
				e := newEnv(t)
				tok, sess := c.setup(e)
				code, body := e.do(ep.method, ep.path, tok, sess, ep.body)
				if code != c.want {
					t.Fatalf("got %d %s, want %d", code, body, c.want)
				}
				if e.backend.BootstrapCalls() != 0 {
					t.Fatal("a refused request reached the bootstrap data")
				}
				if h, _ := e.backend.Host(hostA); len(h.Registrations) != 0 {
					t.Fatal("a refused request registered")
				}
				e.assertNoSecrets(tok, sess)
			})
		}
	}
}

func TestForgedTokenIsASecurityEvent(t *testing.T) {
	e := newEnv(t)
	other, _ := token.NewIssuer(token.Options{})
	foreign, _ := other.Issue(hostA, "a1", time.Hour)
	e.register(foreign, newSession())
	if k := e.eventKinds(); len(k) != 1 || k[0] != EventForgedToken {
		t.Fatalf("events = %v", k)
	}
}

func TestCallsBeforeRegistrationRefused(t *testing.T) {
	e := newEnv(t)
	tok, sess := e.token(hostA, "a1"), newSession()
	for _, p := range []string{PathTask, PathBootstrap} {
		if code, _ := e.do(http.MethodGet, p, tok, sess, nil); code != http.StatusForbidden {
			t.Fatalf("%s before register: %d", p, code)
		}
	}
}

func TestSecondRegistration(t *testing.T) {
	e := newEnv(t)
	tok, sess := e.token(hostA, "a1"), newSession()
	if code := e.register(tok, sess); code != http.StatusOK {
		t.Fatalf("first: %d", code)
	}
	// The same agent retrying (same session) is answered again without a second registration.
	if code := e.register(tok, sess); code != http.StatusOK {
		t.Fatalf("retry with same session: %d", code)
	}
	if h, _ := e.backend.Host(hostA); len(h.Registrations) != 1 {
		t.Fatalf("retry registered again: %d registrations", len(h.Registrations))
	}
	if len(e.eventKinds()) != 0 {
		t.Fatalf("retry raised %v", e.eventKinds())
	}
	// Someone else with the same token: refused and reported.
	thief := newSession()
	if code := e.register(tok, thief); code != http.StatusConflict {
		t.Fatalf("second registration: %d", code)
	}
	// A fresh token of the same attempt (a second script fetch) is no way around it.
	if code := e.register(e.token(hostA, "a1"), thief); code != http.StatusConflict {
		t.Fatalf("second registration, other token of the same attempt: %d", code)
	}
	if k := e.eventKinds(); len(k) != 2 || k[0] != EventSecondRegistration || k[1] != EventSecondRegistration {
		t.Fatalf("events = %v", k)
	}
	// The thief's session cannot use the token either; the registered agent still can.
	if code, _ := e.do(http.MethodGet, PathBootstrap, tok, thief, nil); code != http.StatusForbidden {
		t.Fatalf("bootstrap with the thief's session: %d", code)
	}
	if k := e.eventKinds(); k[len(k)-1] != EventSessionMismatch {
		t.Fatalf("events = %v", k)
	}
	if code, body := e.do(http.MethodGet, PathBootstrap, tok, sess, nil); code != http.StatusOK || string(body) != secretA {
		t.Fatalf("bootstrap for the registered agent: %d", code)
	}
	e.assertNoSecrets(tok, sess, thief)
}

func TestConcurrentRegistrationsOnlyOneWins(t *testing.T) {
	e := newEnv(t)
	tok := e.token(hostA, "a1")
	const n = 16
	codes := make(chan int, n)
	var wg sync.WaitGroup
	for range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			codes <- e.register(tok, newSession())
		}()
	}
	wg.Wait()
	close(codes)
	ok := 0
	for c := range codes {
		switch c {
		case http.StatusOK:
			ok++
		case http.StatusConflict, http.StatusServiceUnavailable:
		default:
			t.Fatalf("unexpected code %d", c)
		}
	}
	if h, _ := e.backend.Host(hostA); ok != 1 || len(h.Registrations) != 1 {
		t.Fatalf("%d registrations succeeded, backend has %d", ok, len(h.Registrations))
	}
}

// TestRegistrationSurvivesRestart: a new server (lost memory) still refuses an attempt the
// backend recorded as registered.
func TestRegistrationSurvivesRestart(t *testing.T) {
	e := newEnv(t)
	tok := e.token(hostA, "a1")
	if code := e.register(tok, newSession()); code != http.StatusOK {
		t.Fatal(code)
	}
	srv2, _ := NewServer(ServerOptions{Tokens: e.issuer, Backend: e.backend})
	e.http.Config.Handler = srv2
	if code := e.register(tok, newSession()); code != http.StatusConflict {
		t.Fatalf("after restart: %d", code)
	}
}

func TestTransientRegistrationFailureDoesNotBurnTheAttempt(t *testing.T) {
	e := newEnv(t)
	tok, sess := e.token(hostA, "a1"), newSession()
	e.backend.FailNext("Registered", errors.New("apiserver: etcdserver: request timed out"))
	if code := e.register(tok, sess); code != http.StatusServiceUnavailable {
		t.Fatalf("first: %d", code)
	}
	if code := e.register(tok, sess); code != http.StatusOK {
		t.Fatalf("retry: %d", code)
	}
}

func TestNewAttemptInvalidatesOldAgent(t *testing.T) {
	e := newEnv(t)
	tok, sess := e.token(hostA, "a1"), newSession()
	e.register(tok, sess)
	// The host controller power-cycles again: attempt a2.
	e.backend.Update(hostA, func(h *FakeHost) { h.View = HostView{State: infrav1.HostStateProvisioning, Attempt: "a2"} })
	if code, _ := e.do(http.MethodGet, PathTask, tok, sess, nil); code != http.StatusForbidden {
		t.Fatalf("old attempt's agent: %d", code)
	}
	tok2, sess2 := e.token(hostA, "a2"), newSession()
	if code := e.register(tok2, sess2); code != http.StatusOK {
		t.Fatalf("new attempt: %d", code)
	}
	if code, _ := e.do(http.MethodGet, PathTask, tok2, sess2, nil); code != http.StatusOK {
		t.Fatalf("new attempt's task: %d", code)
	}
}

func TestBootstrapOnlyWhileProvisioning(t *testing.T) {
	for _, st := range []infrav1.HostState{infrav1.HostStateDeprovisioning, infrav1.HostStateInspecting,
		infrav1.HostStateProvisioned, infrav1.HostStateRetiring, infrav1.HostStateAvailable} {
		t.Run(string(st), func(t *testing.T) {
			e := newEnv(t)
			e.backend.Update(hostA, func(h *FakeHost) { h.View.State = st })
			tok, sess := e.token(hostA, "a1"), newSession()
			if code := e.register(tok, sess); code != http.StatusOK {
				t.Fatalf("register: %d", code)
			}
			code, body := e.do(http.MethodGet, PathBootstrap, tok, sess, nil)
			if code != http.StatusForbidden || bytes.Contains(body, []byte("SECRET")) {
				t.Fatalf("bootstrap while %s: %d", st, code)
			}
			if e.backend.BootstrapCalls() != 0 {
				t.Fatal("backend was asked for bootstrap data")
			}
			if k := e.eventKinds(); len(k) != 1 || k[0] != EventBootstrapRefused {
				t.Fatalf("events = %v", k)
			}
		})
	}
}

// TestTokenOnlyReachesItsOwnHost: host B's agent holding host A's token is host A to the
// API, and nothing in a request can point it at another host.
func TestTokenOnlyReachesItsOwnHost(t *testing.T) {
	e := newEnv(t)
	tokA, sessA := e.token(hostA, "a1"), newSession()
	tokB, sessB := e.token(hostB, "a1"), newSession()
	e.register(tokA, sessA)
	e.register(tokB, sessB)
	_, bodyA := e.do(http.MethodGet, PathBootstrap+"?host=lab/server-b", tokA, sessA, nil)
	_, bodyB := e.do(http.MethodGet, PathBootstrap, tokB, sessB, nil)
	if string(bodyA) != secretA || string(bodyB) != secretB {
		t.Fatal("bootstrap data crossed hosts")
	}
	// A's token with B's session (both registered) is a mismatch, not B.
	if code, _ := e.do(http.MethodGet, PathBootstrap, tokA, sessB, nil); code != http.StatusForbidden {
		t.Fatalf("A's token with B's session: %d", code)
	}
}

func TestBadRequests(t *testing.T) {
	e := newEnv(t)
	tok, sess := e.token(hostA, "a1"), newSession()
	e.register(tok, sess)
	for name, body := range map[string]any{
		"percent":       Progress{TaskID: "t1", Percent: 101},
		"no task id":    Progress{Step: "x"},
		"long message":  Progress{TaskID: "t1", Message: strings.Repeat("x", 2000)},
		"control step":  Progress{TaskID: "t1", Step: "a\nb"},
		"not an object": "string",
	} {
		if code, _ := e.do(http.MethodPost, PathProgress, tok, sess, body); code != http.StatusBadRequest {
			t.Errorf("%s: %d", name, code)
		}
	}
	if code, _ := e.do(http.MethodPost, PathResult, tok, sess, Result{TaskID: "t1", Kind: "format-c"}); code != http.StatusBadRequest {
		t.Errorf("bad kind: %d", code)
	}
	if code, _ := e.do(http.MethodPost, PathResult, tok, sess, Result{TaskID: "t9", Kind: TaskInstall}); code != http.StatusConflict {
		t.Errorf("result for another task: %d", code)
	}
	big := RegisterRequest{AgentVersion: "x", Inventory: infrav1.HardwareInventory{System: infrav1.SystemInfo{Model: strings.Repeat("x", 2<<20)}}}
	if code, _ := e.do(http.MethodPost, PathRegister, e.token(hostB, "a1"), newSession(), big); code != http.StatusBadRequest {
		t.Errorf("oversized register: %d", code)
	}
	if code, _ := e.do(http.MethodDelete, PathTask, tok, sess, nil); code != http.StatusMethodNotAllowed {
		t.Errorf("DELETE task: %d", code)
	}
}

func TestBackendErrorsAreNotEchoed(t *testing.T) {
	e := newEnv(t)
	tok, sess := e.token(hostA, "a1"), newSession()
	e.register(tok, sess)
	e.backend.FailNext("BootstrapData", errors.New(`secret "lab/bootstrap-xyz" key value: internal detail`))
	code, body := e.do(http.MethodGet, PathBootstrap, tok, sess, nil)
	if code != http.StatusServiceUnavailable || bytes.Contains(body, []byte("bootstrap-xyz")) {
		t.Fatalf("%d %s", code, body)
	}
}

func TestForget(t *testing.T) {
	e := newEnv(t)
	tok, sess := e.token(hostA, "a1"), newSession()
	e.register(tok, sess)
	e.srv.Forget(hostA)
	if code, _ := e.do(http.MethodGet, PathTask, tok, sess, nil); code != http.StatusForbidden {
		t.Fatalf("after Forget: %d", code)
	}
}
