package agentapi

import (
	"context"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strings"
	"sync"
	"time"
	"unicode"
	"unicode/utf8"

	"github.com/go-logr/logr"
	"k8s.io/apimachinery/pkg/types"

	infrav1 "github.com/anvil-metal/cluster-api-provider-anvil/api/v1alpha1"
	"github.com/anvil-metal/cluster-api-provider-anvil/internal/boot/token"
)

// Errors a Backend returns to steer the response.
var (
	// ErrUnknownHost: no such host (403, the same answer as a stale attempt so that callers
	// learn nothing about which hosts exist).
	ErrUnknownHost = errors.New("unknown host")
	// ErrAlreadyRegistered: Registered found the attempt already registered (409, security event).
	ErrAlreadyRegistered = errors.New("boot attempt already registered")
	// ErrConflict: a progress or result report does not fit the current task (409).
	ErrConflict = errors.New("report does not match the current task")
)

// Verifier checks a boot token; *token.Issuer implements it.
type Verifier interface {
	Verify(tok string) (token.Claims, error)
}

// Agent identifies the caller once it has been authenticated.
type Agent struct {
	Host    types.NamespacedName
	Attempt string
	// TokenID names the token in logs and events without revealing it.
	TokenID string
}

// HostView is what the server needs to know about a host to authorize a call.
type HostView struct {
	// State is the host's lifecycle state.
	State infrav1.HostState
	// Attempt is the boot attempt Anvil is expecting an agent for; empty when it expects none.
	// Only tokens of this attempt are accepted.
	Attempt string
	// Registered is true when the backend has durably recorded a registration for Attempt.
	// The server refuses to register such an attempt again even after it restarted and lost
	// its own memory of the registration.
	Registered bool
}

// Registration is what Registered receives.
type Registration struct {
	Agent
	AgentVersion string
	Inventory    infrav1.HardwareInventory
	// RemoteAddr is informational only; it authenticates nothing.
	RemoteAddr string
}

// Backend is the host controller's side of the agent API.
type Backend interface {
	// Expected reports the host's state and expected boot attempt (ErrUnknownHost if none).
	Expected(ctx context.Context, host types.NamespacedName) (HostView, error)
	// Registered records the agent's registration and inventory. It returns
	// ErrAlreadyRegistered if the attempt was registered before.
	Registered(ctx context.Context, r Registration) error
	// NextTask returns the agent's next task (kind none when there is nothing to do yet).
	NextTask(ctx context.Context, a Agent) (Task, error)
	// Progress records a progress report.
	Progress(ctx context.Context, a Agent, p Progress) error
	// Result records a task's outcome. It must accept a repeat of the last result (same
	// TaskID) as success: the agent retries when a response is lost.
	Result(ctx context.Context, a Agent, r Result) error
	// BootstrapData returns the user-data of the host's claim. The server calls it only for
	// the registered agent of the current attempt of a host in state Provisioning.
	BootstrapData(ctx context.Context, host types.NamespacedName) ([]byte, error)
}

// SecurityEventKind classifies a SecurityEvent.
type SecurityEventKind string

// Security event kinds.
const (
	// EventForgedToken: a token with a bad signature or an unknown key was presented.
	EventForgedToken SecurityEventKind = "ForgedToken"
	// EventSecondRegistration: a registration with a token whose attempt was already
	// registered by another session. Someone else holds the token.
	EventSecondRegistration SecurityEventKind = "SecondRegistration"
	// EventSessionMismatch: a valid token came with a session other than the registered one.
	EventSessionMismatch SecurityEventKind = "SessionMismatch"
	// EventBootstrapRefused: bootstrap data was asked for while the host is not provisioning.
	EventBootstrapRefused SecurityEventKind = "BootstrapRefused"
)

// SecurityEvent is something an operator should hear about. It never carries a secret.
type SecurityEvent struct {
	Kind SecurityEventKind
	// Host and Attempt are those of the token, when it was authentic.
	Host    types.NamespacedName
	Attempt string
	TokenID string
	// RemoteAddr of the caller, informational.
	RemoteAddr string
	Message    string
}

// ServerOptions configure a Server.
type ServerOptions struct {
	Tokens  Verifier
	Backend Backend
	Log     logr.Logger
	// OnSecurityEvent, when set, is called (synchronously; keep it quick) for each event.
	OnSecurityEvent func(SecurityEvent)
	// PollInterval is what RegisterResponse advertises; default 5s.
	PollInterval time.Duration
	// ReportTokens and BootReports, when both set, serve boot reports (see bootreport.go).
	ReportTokens ReportTokenIssuer
	BootReports  BootReporter
}

// registration is the server's memory of one host's registered agent.
type registration struct {
	attempt string
	session [sha256.Size]byte
	// pending is true while Backend.Registered runs, so a concurrent duplicate cannot slip in.
	pending bool
	// burned is true when the backend refused the registration as a second one: the attempt
	// is used up and no session is bound to it.
	burned bool
}

// Server is the agent API's http.Handler.
type Server struct {
	opts        ServerOptions
	mux         *http.ServeMux
	pollSeconds int32

	mu   sync.Mutex
	regs map[types.NamespacedName]*registration
}

// NewServer returns a Server; Tokens and Backend are required.
func NewServer(o ServerOptions) (*Server, error) {
	if o.Tokens == nil || o.Backend == nil {
		return nil, errors.New("agentapi: Tokens and Backend are required")
	}
	if o.PollInterval <= 0 {
		o.PollInterval = 5 * time.Second
	}
	if o.Log.GetSink() == nil {
		o.Log = logr.Discard()
	}
	if o.PollInterval > time.Hour {
		o.PollInterval = time.Hour
	}
	s := &Server{opts: o, regs: map[types.NamespacedName]*registration{}, pollSeconds: int32(o.PollInterval.Seconds())}
	mux := http.NewServeMux()
	mux.HandleFunc("POST "+PathRegister, s.register)
	mux.HandleFunc("GET "+PathTask, s.withAgent(s.task))
	mux.HandleFunc("POST "+PathProgress, s.withAgent(s.progress))
	mux.HandleFunc("POST "+PathResult, s.withAgent(s.result))
	mux.HandleFunc("GET "+PathBootstrap, s.withAgent(s.bootstrap))
	if o.ReportTokens != nil && o.BootReports != nil {
		mux.HandleFunc("GET "+PathReportToken, s.withAgent(s.reportToken))
		mux.HandleFunc("POST "+PathBootReport, s.bootReport)
	}
	s.mux = mux
	return s, nil
}

// ServeHTTP implements http.Handler.
func (s *Server) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	// Responses carry task details and bootstrap data: nothing may be cached along the way.
	w.Header().Set("Cache-Control", "no-store")
	s.mux.ServeHTTP(w, r)
}

// Forget drops the server's memory of a host's registration (e.g. when the host is deleted).
func (s *Server) Forget(host types.NamespacedName) {
	s.mu.Lock()
	defer s.mu.Unlock()
	delete(s.regs, host)
}

func (s *Server) event(e SecurityEvent) {
	s.opts.Log.Info("agent API security event", "kind", e.Kind, "host", e.Host.String(), "attempt", e.Attempt,
		"tokenID", e.TokenID, "remote", e.RemoteAddr, "message", e.Message)
	if s.opts.OnSecurityEvent != nil {
		s.opts.OnSecurityEvent(e)
	}
}

// authenticate checks the bearer token and that it belongs to the attempt the host expects.
// On failure it has written the response.
func (s *Server) authenticate(w http.ResponseWriter, r *http.Request) (Agent, HostView, bool) {
	log := s.opts.Log.WithValues("path", r.URL.Path, "remote", r.RemoteAddr)
	tok, ok := bearer(r)
	if !ok {
		w.Header().Set("WWW-Authenticate", `Bearer realm="anvil-agent"`)
		writeError(w, http.StatusUnauthorized, "unauthorized", "a boot token is required")
		return Agent{}, HostView{}, false
	}
	claims, err := s.opts.Tokens.Verify(tok)
	if err != nil {
		// err never contains the token (package token guarantees it).
		log.Info("agent API: token refused", "reason", err.Error())
		if errors.Is(err, token.ErrBadSignature) {
			s.event(SecurityEvent{Kind: EventForgedToken, RemoteAddr: r.RemoteAddr, Message: err.Error()})
		}
		w.Header().Set("WWW-Authenticate", `Bearer realm="anvil-agent", error="invalid_token"`)
		msg := "invalid boot token"
		if errors.Is(err, token.ErrExpired) {
			msg = "boot token expired"
		}
		writeError(w, http.StatusUnauthorized, "unauthorized", msg)
		return Agent{}, HostView{}, false
	}
	a := Agent{Host: claims.Host, Attempt: claims.Attempt, TokenID: claims.ID}
	view, err := s.opts.Backend.Expected(r.Context(), a.Host)
	switch {
	case errors.Is(err, ErrUnknownHost):
		log.Info("agent API: token for an unknown host", "host", a.Host.String(), "tokenID", a.TokenID)
		writeError(w, http.StatusForbidden, "forbidden", "this boot attempt is not expected")
		return Agent{}, HostView{}, false
	case err != nil:
		log.Error(err, "agent API: looking up host", "host", a.Host.String())
		writeError(w, http.StatusServiceUnavailable, "unavailable", "host state unavailable, retry")
		return Agent{}, HostView{}, false
	}
	if view.Attempt == "" || subtle.ConstantTimeCompare([]byte(view.Attempt), []byte(a.Attempt)) != 1 {
		log.Info("agent API: token of a boot attempt that is not current", "host", a.Host.String(),
			"attempt", a.Attempt, "tokenID", a.TokenID)
		writeError(w, http.StatusForbidden, "forbidden", "this boot attempt is not expected")
		return Agent{}, HostView{}, false
	}
	return a, view, true
}

func bearer(r *http.Request) (string, bool) {
	h := r.Header.Get("Authorization")
	scheme, tok, ok := strings.Cut(h, " ")
	if !ok || !strings.EqualFold(scheme, "Bearer") {
		return "", false
	}
	tok = strings.TrimSpace(tok)
	return tok, tok != ""
}

// session parses the session header: hex of 32 bytes. It returns the key's hash, which is all
// the server keeps.
func session(r *http.Request) ([sha256.Size]byte, bool) {
	v := r.Header.Get(SessionHeader)
	if len(v) != 64 {
		return [sha256.Size]byte{}, false
	}
	raw, err := hex.DecodeString(v)
	if err != nil {
		return [sha256.Size]byte{}, false
	}
	return sha256.Sum256(raw), true
}

func (s *Server) register(w http.ResponseWriter, r *http.Request) {
	a, view, ok := s.authenticate(w, r)
	if !ok {
		return
	}
	sess, ok := session(r)
	if !ok {
		writeError(w, http.StatusBadRequest, "bad_request", "missing or malformed "+SessionHeader+" header")
		return
	}
	var req RegisterRequest
	if err := decode(w, r, maxRegisterBody, &req); err != nil {
		writeError(w, http.StatusBadRequest, "bad_request", err.Error())
		return
	}
	if len(req.AgentVersion) > maxStepLen || !printable(req.AgentVersion) {
		writeError(w, http.StatusBadRequest, "bad_request", "agentVersion must be at most 64 printable characters")
		return
	}
	second := func(why string) {
		s.event(SecurityEvent{Kind: EventSecondRegistration, Host: a.Host, Attempt: a.Attempt, TokenID: a.TokenID,
			RemoteAddr: r.RemoteAddr, Message: why})
		writeError(w, http.StatusConflict, "conflict", "this boot attempt is already registered")
	}
	resp := RegisterResponse{Host: a.Host.String(), Attempt: a.Attempt, PollIntervalSeconds: s.pollSeconds}

	s.mu.Lock()
	rec := s.regs[a.Host]
	if rec != nil && rec.attempt == a.Attempt {
		same := subtle.ConstantTimeCompare(rec.session[:], sess[:]) == 1
		pending, burned := rec.pending, rec.burned
		s.mu.Unlock()
		switch {
		case !same || burned:
			second("registration with a token whose attempt another agent session registered")
		case pending:
			writeError(w, http.StatusServiceUnavailable, "unavailable", "registration in progress, retry")
		default:
			// The same agent retrying after a lost response: answer again, register nothing.
			writeJSON(w, http.StatusOK, resp)
		}
		return
	}
	if view.Registered {
		s.mu.Unlock()
		second("registration of an attempt the host controller already recorded as registered")
		return
	}
	mine := &registration{attempt: a.Attempt, session: sess, pending: true}
	s.regs[a.Host] = mine
	s.mu.Unlock()

	err := s.opts.Backend.Registered(r.Context(), Registration{Agent: a, AgentVersion: req.AgentVersion,
		Inventory: req.Inventory, RemoteAddr: r.RemoteAddr})
	s.mu.Lock()
	defer s.mu.Unlock()
	switch {
	case errors.Is(err, ErrAlreadyRegistered):
		// Keep the reservation: the attempt is used up whatever happens next.
		mine.pending, mine.burned = false, true
		second("the host controller refused a second registration of this attempt")
		return
	case err != nil:
		// A transient failure must not burn the attempt: release it so the agent can retry.
		if s.regs[a.Host] == mine {
			delete(s.regs, a.Host)
		}
		s.opts.Log.Error(err, "agent API: recording registration", "host", a.Host.String(), "attempt", a.Attempt)
		writeError(w, http.StatusServiceUnavailable, "unavailable", "could not record the registration, retry")
		return
	}
	mine.pending = false
	s.opts.Log.Info("agent registered", "host", a.Host.String(), "attempt", a.Attempt, "tokenID", a.TokenID,
		"agentVersion", req.AgentVersion, "remote", r.RemoteAddr)
	writeJSON(w, http.StatusOK, resp)
}

// withAgent authenticates the token and the registered session before h runs.
func (s *Server) withAgent(h func(http.ResponseWriter, *http.Request, Agent, HostView)) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		a, view, ok := s.authenticate(w, r)
		if !ok {
			return
		}
		sess, ok := session(r)
		if !ok {
			writeError(w, http.StatusBadRequest, "bad_request", "missing or malformed "+SessionHeader+" header")
			return
		}
		s.mu.Lock()
		rec := s.regs[a.Host]
		registered := rec != nil && rec.attempt == a.Attempt && !rec.pending && !rec.burned
		match := registered && subtle.ConstantTimeCompare(rec.session[:], sess[:]) == 1
		s.mu.Unlock()
		if !registered {
			writeError(w, http.StatusForbidden, "forbidden", "the agent is not registered for this boot attempt")
			return
		}
		if !match {
			s.event(SecurityEvent{Kind: EventSessionMismatch, Host: a.Host, Attempt: a.Attempt, TokenID: a.TokenID,
				RemoteAddr: r.RemoteAddr, Message: "valid token presented with a session other than the registered agent's"})
			writeError(w, http.StatusForbidden, "forbidden", "the agent is not registered for this boot attempt")
			return
		}
		h(w, r, a, view)
	}
}

func (s *Server) task(w http.ResponseWriter, r *http.Request, a Agent, _ HostView) {
	t, err := s.opts.Backend.NextTask(r.Context(), a)
	if err != nil {
		s.backendError(w, err, a, "next task")
		return
	}
	if !t.Kind.Valid() {
		s.opts.Log.Error(nil, "agent API: backend returned an invalid task kind", "host", a.Host.String(), "kind", t.Kind)
		writeError(w, http.StatusServiceUnavailable, "unavailable", "no valid task, retry")
		return
	}
	writeJSON(w, http.StatusOK, t)
}

func (s *Server) progress(w http.ResponseWriter, r *http.Request, a Agent, _ HostView) {
	var p Progress
	if err := decode(w, r, maxSmallBody, &p); err != nil {
		writeError(w, http.StatusBadRequest, "bad_request", err.Error())
		return
	}
	switch {
	case p.TaskID == "" || len(p.TaskID) > maxTaskIDLen || !printable(p.TaskID):
		writeError(w, http.StatusBadRequest, "bad_request", "taskID must be 1 to 128 printable characters")
		return
	case len(p.Step) > maxStepLen || !printable(p.Step):
		writeError(w, http.StatusBadRequest, "bad_request", "step must be at most 64 printable characters")
		return
	case p.Percent < 0 || p.Percent > 100:
		writeError(w, http.StatusBadRequest, "bad_request", "percent must be 0..100")
		return
	case len(p.Message) > maxMessageLen || !utf8.ValidString(p.Message):
		writeError(w, http.StatusBadRequest, "bad_request", "message must be valid UTF-8 of at most 1024 bytes")
		return
	}
	p.Message = sanitize(p.Message)
	if err := s.opts.Backend.Progress(r.Context(), a, p); err != nil {
		s.backendError(w, err, a, "progress")
		return
	}
	w.WriteHeader(http.StatusNoContent)
}

func (s *Server) result(w http.ResponseWriter, r *http.Request, a Agent, _ HostView) {
	var res Result
	if err := decode(w, r, maxSmallBody, &res); err != nil {
		writeError(w, http.StatusBadRequest, "bad_request", err.Error())
		return
	}
	switch {
	case res.TaskID == "" || len(res.TaskID) > maxTaskIDLen || !printable(res.TaskID):
		writeError(w, http.StatusBadRequest, "bad_request", "taskID must be 1 to 128 printable characters")
		return
	case !res.Kind.Valid() || res.Kind == TaskNone:
		writeError(w, http.StatusBadRequest, "bad_request", "kind must be wipe, install, reboot or poweroff")
		return
	case res.Slot != "" && res.Slot != infrav1.SlotA && res.Slot != infrav1.SlotB:
		writeError(w, http.StatusBadRequest, "bad_request", "slot must be A or B")
		return
	case len(res.Error) > maxMessageLen || !utf8.ValidString(res.Error),
		len(res.Disk) > 256 || !printable(res.Disk),
		len(res.ImageChecksum) > 135 || !printable(res.ImageChecksum):
		writeError(w, http.StatusBadRequest, "bad_request", "error, disk or imageChecksum too long or not printable")
		return
	}
	res.Error = sanitize(res.Error)
	if err := s.opts.Backend.Result(r.Context(), a, res); err != nil {
		s.backendError(w, err, a, "result")
		return
	}
	w.WriteHeader(http.StatusNoContent)
}

func (s *Server) bootstrap(w http.ResponseWriter, r *http.Request, a Agent, view HostView) {
	if view.State != infrav1.HostStateProvisioning && view.State != infrav1.HostStateUpgrading {
		s.event(SecurityEvent{Kind: EventBootstrapRefused, Host: a.Host, Attempt: a.Attempt, TokenID: a.TokenID,
			RemoteAddr: r.RemoteAddr, Message: fmt.Sprintf("bootstrap data requested while the host is %s", view.State)})
		writeError(w, http.StatusForbidden, "forbidden", "bootstrap data is available only while the host is provisioning")
		return
	}
	data, err := s.opts.Backend.BootstrapData(r.Context(), a.Host)
	if err != nil {
		s.backendError(w, err, a, "bootstrap data")
		return
	}
	if len(data) > maxBootstrap {
		s.opts.Log.Error(nil, "agent API: bootstrap data too large", "host", a.Host.String(), "bytes", len(data))
		writeError(w, http.StatusServiceUnavailable, "unavailable", "bootstrap data too large")
		return
	}
	s.opts.Log.Info("bootstrap data handed to the agent", "host", a.Host.String(), "attempt", a.Attempt,
		"tokenID", a.TokenID, "bytes", len(data))
	w.Header().Set("Content-Type", "application/octet-stream")
	w.WriteHeader(http.StatusOK)
	_, _ = w.Write(data)
}

func (s *Server) backendError(w http.ResponseWriter, err error, a Agent, what string) {
	switch {
	case errors.Is(err, ErrUnknownHost):
		writeError(w, http.StatusForbidden, "forbidden", "this boot attempt is not expected")
	case errors.Is(err, ErrConflict):
		writeError(w, http.StatusConflict, "conflict", "the report does not match the current task")
	default:
		// The backend's error may name Secrets or API details: log it, answer generically.
		s.opts.Log.Error(err, "agent API: backend failed", "what", what, "host", a.Host.String(), "attempt", a.Attempt)
		writeError(w, http.StatusServiceUnavailable, "unavailable", what+" unavailable, retry")
	}
}

func decode(w http.ResponseWriter, r *http.Request, limit int64, v any) error {
	if ct := r.Header.Get("Content-Type"); ct != "" && !strings.HasPrefix(ct, "application/json") {
		return errors.New("content type must be application/json")
	}
	dec := json.NewDecoder(http.MaxBytesReader(w, r.Body, limit))
	if err := dec.Decode(v); err != nil {
		var mbe *http.MaxBytesError
		if errors.As(err, &mbe) {
			return fmt.Errorf("request body larger than %d bytes", limit)
		}
		return errors.New("request body is not valid JSON for this endpoint")
	}
	if _, err := dec.Token(); !errors.Is(err, io.EOF) {
		return errors.New("request body has data after the JSON value")
	}
	return nil
}

func writeJSON(w http.ResponseWriter, code int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(code)
	_ = json.NewEncoder(w).Encode(v)
}

func writeError(w http.ResponseWriter, code int, short, msg string) {
	writeJSON(w, code, errorBody{Code: short, Error: msg})
}

func printable(s string) bool {
	for _, r := range s {
		if r < 0x20 || r > 0x7e {
			return false
		}
	}
	return true
}

// sanitize replaces control characters (terminal escapes, newlines that would forge log
// lines) in free text the agent sends; the text ends up in events and logs.
func sanitize(s string) string {
	return strings.Map(func(r rune) rune {
		if unicode.IsControl(r) || r == utf8.RuneError {
			return ' '
		}
		return r
	}, s)
}
