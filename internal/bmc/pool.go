package bmc

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// PoolOptions tune BMC etiquette. Zero values take the defaults noted.
type PoolOptions struct {
	// Dial opens sessions; default Dial.
	Dial Dialer
	// MaxConcurrent caps BMC operations in flight across all BMCs (default 20).
	MaxConcurrent int
	// CallTimeout bounds each BMC call, login included (default 30s).
	CallTimeout time.Duration
	// IdleTimeout closes a session unused this long (default 5m).
	IdleTimeout time.Duration
	// ConnIdleTimeout closes a session's kept-alive connection unused this long (default
	// DefaultConnIdleTimeout); the session itself stays open.
	ConnIdleTimeout time.Duration
	// BackoffBase and BackoffMax bound the jittered exponential back-off after failures
	// (default 5s and 10m).
	BackoffBase, BackoffMax time.Duration
	// AuthHoldOff is how long a rejected login is not retried with the same credentials
	// (default 15m). Real BMCs lock an account after a few failures in a window; one try per
	// hold-off never gets there. Changed credentials are tried at once.
	AuthHoldOff time.Duration
	// Metrics, if set, records operation latency and errors.
	Metrics *Metrics
	// Now is the clock (tests replace it).
	Now func() time.Time
}

func (o *PoolOptions) defaults() {
	if o.Dial == nil {
		o.Dial = Dial
	}
	if o.MaxConcurrent <= 0 {
		o.MaxConcurrent = 20
	}
	if o.CallTimeout <= 0 {
		o.CallTimeout = 30 * time.Second
	}
	if o.IdleTimeout <= 0 {
		o.IdleTimeout = 5 * time.Minute
	}
	if o.ConnIdleTimeout <= 0 {
		o.ConnIdleTimeout = DefaultConnIdleTimeout
	}
	if o.BackoffBase <= 0 {
		o.BackoffBase = 5 * time.Second
	}
	if o.BackoffMax <= 0 {
		o.BackoffMax = 10 * time.Minute
	}
	if o.AuthHoldOff <= 0 {
		o.AuthHoldOff = 15 * time.Minute
	}
	if o.Now == nil {
		o.Now = time.Now
	}
}

// Pool keeps one session per BMC, reused across reconciles, with at most one operation in
// flight per BMC and a global cap across all of them. Its lock guards only the map of
// sessions; BMC calls run outside it.
type Pool struct {
	opts   PoolOptions
	global chan struct{}

	mu       sync.Mutex
	sessions map[string]*session
}

// session is the state kept for one BMC.
type session struct {
	// inFlight has room for one token: holding it is holding the BMC.
	inFlight chan struct{}

	// Guarded by inFlight.
	client      Client
	fingerprint string
	lastUsed    time.Time
	failures    int
	retryAt     time.Time
	lastErr     error
	// authFailedFor is the fingerprint whose login was rejected; only it is held off.
	authFailedFor string
}

// NewPool returns a pool; run Start (it is a controller-runtime Runnable) to close idle
// sessions.
func NewPool(opts PoolOptions) *Pool {
	opts.defaults()
	return &Pool{opts: opts, global: make(chan struct{}, opts.MaxConcurrent), sessions: map[string]*session{}}
}

// BackoffError says the pool refused to call a BMC because of earlier failures.
type BackoffError struct {
	RetryAfter time.Duration
	Last       error
}

func (e *BackoffError) Error() string {
	return fmt.Sprintf("%s for %s; last error: %v", ErrBackoff, e.RetryAfter.Round(time.Second), e.Last)
}

// Unwrap lets errors.Is see both ErrBackoff and the kind of the last failure.
func (e *BackoffError) Unwrap() []error { return []error{ErrBackoff, e.Last} }

// Do runs op with an open session to the BMC identified by key (the host's namespace/name).
// It opens or reopens the session as needed (a changed address or Secret opens a new one),
// logs out after any error, and backs off after failures.
func (p *Pool) Do(ctx context.Context, key string, t Target, opName string, op func(context.Context, Client) error) error {
	if t.Timeout <= 0 {
		t.Timeout = p.opts.CallTimeout
	}
	if t.ConnIdleTimeout <= 0 {
		t.ConnIdleTimeout = p.opts.ConnIdleTimeout
	}
	s := p.session(key)
	select {
	case s.inFlight <- struct{}{}:
	case <-ctx.Done():
		return ctx.Err()
	}
	defer func() { <-s.inFlight }()

	fp := t.fingerprint()
	now := p.opts.Now()
	if now.Before(s.retryAt) {
		credentialsChanged := s.authFailedFor != "" && s.authFailedFor != fp
		if !credentialsChanged {
			return &BackoffError{RetryAfter: s.retryAt.Sub(now), Last: s.lastErr}
		}
	}

	select {
	case p.global <- struct{}{}:
	case <-ctx.Done():
		return ctx.Err()
	}
	defer func() { <-p.global }()

	if s.client != nil && s.fingerprint != fp {
		_ = s.client.Close(ctx)
		s.client = nil
	}
	if s.client == nil {
		start := p.opts.Now()
		c, err := p.opts.Dial(ctx, t)
		p.observe(t, "login", start, err)
		if err != nil {
			p.recordFailure(s, err, fp)
			return err
		}
		s.client, s.fingerprint = c, fp
	}

	start := p.opts.Now()
	err := op(ctx, s.client)
	p.observe(t, opName, start, err)
	if err != nil {
		_ = s.client.Close(ctx) // log out on every error path: a wedged session must not linger
		s.client = nil
		p.recordFailure(s, err, fp)
		return err
	}
	s.failures, s.retryAt, s.lastErr, s.authFailedFor = 0, time.Time{}, nil, ""
	s.lastUsed = p.opts.Now()
	return nil
}

func (p *Pool) session(key string) *session {
	p.mu.Lock()
	defer p.mu.Unlock()
	s, ok := p.sessions[key]
	if !ok {
		s = &session{inFlight: make(chan struct{}, 1)}
		p.sessions[key] = s
	}
	return s
}

func (p *Pool) recordFailure(s *session, err error, fp string) {
	s.failures++
	s.lastErr = err
	delay := p.backoff(s.failures)
	if errors.Is(err, ErrAuth) {
		s.authFailedFor = fp
		delay = max(delay, p.opts.AuthHoldOff)
	}
	s.retryAt = p.opts.Now().Add(delay)
}

// backoff is base·2^(n-1), capped, with ±25 % jitter so hosts that failed together do not
// retry together.
func (p *Pool) backoff(failures int) time.Duration {
	d := p.opts.BackoffBase
	for i := 1; i < failures && d < p.opts.BackoffMax; i++ {
		d *= 2
	}
	d = min(d, p.opts.BackoffMax)
	jitter := 0.75 + rand.Float64()/2 //nolint:gosec // jitter needs no cryptographic randomness
	return time.Duration(float64(d) * jitter)
}

// RetryAfter says how long the pool will hold off the BMC at key (zero when it won't).
func (p *Pool) RetryAfter(key string) time.Duration {
	s := p.session(key)
	select {
	case s.inFlight <- struct{}{}:
		defer func() { <-s.inFlight }()
		return max(0, s.retryAt.Sub(p.opts.Now()))
	default:
		return 0
	}
}

// Forget logs out of and drops the session for key (host deleted).
func (p *Pool) Forget(ctx context.Context, key string) {
	p.mu.Lock()
	s, ok := p.sessions[key]
	delete(p.sessions, key)
	p.mu.Unlock()
	if !ok {
		return
	}
	s.inFlight <- struct{}{}
	defer func() { <-s.inFlight }()
	if s.client != nil {
		_ = s.client.Close(ctx)
		s.client = nil
	}
}

// Start closes idle sessions until ctx ends, then closes them all.
func (p *Pool) Start(ctx context.Context) error {
	ticker := time.NewTicker(max(p.opts.IdleTimeout/2, time.Second))
	defer ticker.Stop()
	for {
		select {
		case <-ctx.Done():
			p.closeIdle(context.Background(), 0)
			return nil
		case <-ticker.C:
			p.closeIdle(ctx, p.opts.IdleTimeout)
		}
	}
}

// closeIdle logs out of sessions unused for longer than idle; busy sessions are skipped.
func (p *Pool) closeIdle(ctx context.Context, idle time.Duration) int {
	p.mu.Lock()
	all := make([]*session, 0, len(p.sessions))
	for _, s := range p.sessions {
		all = append(all, s)
	}
	p.mu.Unlock()
	closed := 0
	now := p.opts.Now()
	for _, s := range all {
		select {
		case s.inFlight <- struct{}{}:
		default:
			continue
		}
		if s.client != nil && now.Sub(s.lastUsed) >= idle {
			_ = s.client.Close(ctx)
			s.client = nil
			closed++
		}
		<-s.inFlight
	}
	return closed
}

// OpenSessions counts sessions currently logged in.
func (p *Pool) OpenSessions() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	n := 0
	for _, s := range p.sessions {
		select {
		case s.inFlight <- struct{}{}:
			if s.client != nil {
				n++
			}
			<-s.inFlight
		default:
			n++ // busy means open
		}
	}
	return n
}

func (p *Pool) observe(t Target, op string, start time.Time, err error) {
	if p.opts.Metrics == nil {
		return
	}
	proto := string(t.Address.Protocol)
	p.opts.Metrics.latency.WithLabelValues(op, proto).Observe(p.opts.Now().Sub(start).Seconds())
	if err != nil {
		p.opts.Metrics.errors.WithLabelValues(op, proto, Reason(err)).Inc()
	}
}

// Metrics are the pool's Prometheus collectors.
type Metrics struct {
	latency *prometheus.HistogramVec
	errors  *prometheus.CounterVec
}

// NewMetrics creates and registers the BMC metrics.
func NewMetrics(reg prometheus.Registerer) *Metrics {
	m := &Metrics{
		latency: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name:    "anvil_bmc_operation_duration_seconds",
			Help:    "Latency of BMC operations by operation and protocol.",
			Buckets: []float64{0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30},
		}, []string{"operation", "protocol"}),
		errors: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "anvil_bmc_operation_errors_total",
			Help: "Failed BMC operations by operation, protocol and reason.",
		}, []string{"operation", "protocol", "reason"}),
	}
	reg.MustRegister(m.latency, m.errors)
	return m
}
