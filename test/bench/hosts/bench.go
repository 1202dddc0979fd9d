package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sort"
	"sync"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/rest"
	toolscache "k8s.io/client-go/tools/cache"
	"k8s.io/client-go/tools/clientcmd"
	clientcmdapi "k8s.io/client-go/tools/clientcmd/api"
	"sigs.k8s.io/controller-runtime/pkg/cache"

	infrav1 "github.com/anvil-metal/cluster-api-provider-anvil/api/v1alpha1"
	"github.com/anvil-metal/cluster-api-provider-anvil/internal/bmc"
	"github.com/anvil-metal/cluster-api-provider-anvil/internal/mgmtplane"
	"github.com/anvil-metal/cluster-api-provider-anvil/internal/vbmc/redfish"
	"github.com/anvil-metal/cluster-api-provider-anvil/test/bench/apimeter"
)

// Production defaults the time scale divides (cmd/manager, controllers, internal/bmc).
const (
	defaultPowerSync   = 120 * time.Second
	defaultBMCIdle     = 5 * time.Minute
	defaultBMCConnIdle = bmc.DefaultConnIdleTimeout
	defaultBMCTimeout  = 30 * time.Second
	benchNamespace     = "anvil-bench"
)

// Config is one benchmark run.
type Config struct {
	Hosts int
	// Steady is the steady-state window, in wall-clock time.
	Steady time.Duration
	// TimeScale divides the manager's periodic intervals (power sync, BMC session and
	// connection idle timeouts), so a steady window of Steady covers Steady×TimeScale of
	// production time; per-hour figures are scaled back. 1 runs the real defaults.
	TimeScale float64
	// TLS serves the emulated BMCs over HTTPS (redfish+https:// with a CA bundle Secret);
	// false uses redfish+http://.
	TLS bool
	// HostConcurrency and BMCConcurrency are cmd/manager's --anvilhost-concurrency and
	// --bmc-max-concurrency.
	HostConcurrency, BMCConcurrency int
	// QPS and Burst set the manager's client-side rate limiter; QPS 0 keeps what
	// ctrl.GetConfigOrDie gives cmd/manager (no client-side limit).
	QPS   float32
	Burst int
	// LeaderElect runs leader election, as cmd/manager does by default.
	LeaderElect bool
	// MaxSessions caps each emulated BMC's Redfish sessions, as real BMCs do (0: no cap).
	MaxSessions int
	// Timeout bounds the wait for every host to be Available.
	Timeout time.Duration
	// CreateWorkers create hosts in parallel.
	CreateWorkers int
	// ProfileDir, if set, receives the manager's CPU and heap profiles and its log.
	ProfileDir string
	// Progress receives progress lines (nil: none).
	Progress io.Writer
}

// DefaultConfig is `make bench`: a 2-minute steady window at ×5 covers 10 minutes of
// production time (five power polls per host), and
// the whole run stays near 5 minutes on a 2-core machine.
func DefaultConfig() Config {
	return Config{Hosts: 1000, Steady: 120 * time.Second, TimeScale: 5, TLS: true, HostConcurrency: 50,
		BMCConcurrency: 20, LeaderElect: true, MaxSessions: 16, Timeout: 10 * time.Minute, CreateWorkers: 16}
}

// phase is what happened between two snapshots.
type phase struct {
	Duration time.Duration
	API      apiDelta
	// BMC requests summed over all BMCs, by method, and the least and most any BMC received.
	BMCRequests              uint64
	BMCByMethod              map[string]uint64
	BMCMinPerHost, BMCMaxPer uint64
	// CPU seconds by process, and used by the whole machine (other users' work included).
	CPU         map[string]float64
	MachineBusy float64
	// Manager at the end of the phase; its peak RSS sampled during the phase.
	Manager     managerStats
	PeakRSSKiB  int64
	Reconciles  map[string]float64
	BMCOps      map[string]float64
	BMCErrors   map[string]float64
	BMCOpSecs   map[string]float64
	HostUpdates int64 // AnvilHost changes the benchmark's watch saw
}

// Result is a run's measurements.
type Result struct {
	Config    Config
	Available int
	// CreateDuration is how long creating the hosts took; ToAvailable is from the first
	// create until the last host was seen Available.
	CreateDuration, ToAvailable time.Duration
	// Latency is each host's create → Available time, sorted.
	Latency        []time.Duration
	Onboard        phase
	Steady         phase
	BMCSessionsEnd int
	// NotAvailable counts the hosts that never got there by state, with a few of their errors.
	NotAvailable map[string]int
	Errors       []string
	// CacheLag is how much later than the benchmark's watch the manager's cache received each
	// host version, sorted.
	CacheLag []time.Duration
	// WorkDir is where the run kept its files (removed afterwards unless it is ProfileDir).
	WorkDir string
}

// Run runs the benchmark: emulated BMCs in one child process, the manager in another (the
// measured one), kube-apiserver and etcd as envtest runs them, and this process creating
// hosts and watching them.
func Run(ctx context.Context, cfg Config) (*Result, error) {
	if cfg.TimeScale <= 0 {
		cfg.TimeScale = 1
	}
	progress := cfg.Progress
	if progress == nil {
		progress = io.Discard
	}
	step := func(format string, args ...any) { fmt.Fprintf(progress, "==> "+format+"\n", args...) }
	res := &Result{Config: cfg}

	// The work directory holds the kubeconfig, the children's ready files, the manager's log
	// and, with ProfileDir, the profiles; only a ProfileDir outlives the run.
	dir := cfg.ProfileDir
	if dir != "" {
		if err := os.MkdirAll(dir, 0o750); err != nil {
			return nil, err
		}
	} else {
		tmp, err := os.MkdirTemp("", "anvil-bench-hosts-")
		if err != nil {
			return nil, err
		}
		defer os.RemoveAll(tmp)
		dir = tmp
	}
	res.WorkDir = dir

	step("start %d emulated Redfish BMCs (%s) in a child process", cfg.Hosts, map[bool]string{true: "HTTPS", false: "plain HTTP"}[cfg.TLS])
	var bmcsInfo bmcsReady
	bmcs, err := startChild(ctx, "bmcs", childSpec{Role: roleBMCs, BMCs: cfg.Hosts, TLS: cfg.TLS, MaxSessions: cfg.MaxSessions},
		dir, &bmcsInfo, 3*time.Minute)
	if err != nil {
		return nil, err
	}
	defer bmcs.stop()

	step("start the management plane (kube-apiserver + etcd)")
	env, err := mgmtplane.Start()
	if err != nil {
		return nil, err
	}
	defer func() { _ = env.Stop() }()
	kubeconfig := filepath.Join(dir, "kubeconfig")
	if err := writeKubeconfig(env.Config, kubeconfig); err != nil {
		return nil, err
	}
	defer os.Remove(kubeconfig) // admin credentials of a server that is about to stop

	step("create namespace %s and %d credentials Secrets (not measured)", benchNamespace, cfg.Hosts)
	c := env.Client
	if err := c.Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: benchNamespace}}); err != nil {
		return nil, err
	}
	if cfg.TLS {
		if err := c.Create(ctx, &corev1.Secret{ObjectMeta: metav1.ObjectMeta{Name: "bmc-ca", Namespace: benchNamespace},
			Data: map[string][]byte{"ca.crt": bmcsInfo.CAPEM}}); err != nil {
			return nil, err
		}
	}
	if err := parallel(ctx, cfg.Hosts, cfg.CreateWorkers, func(i int) error {
		return c.Create(ctx, &corev1.Secret{ObjectMeta: metav1.ObjectMeta{Name: hostName(i) + "-bmc", Namespace: benchNamespace},
			Data: map[string][]byte{"username": []byte("admin"), "password": []byte(bmcPassword(i))}})
	}); err != nil {
		return nil, err
	}

	scale := func(d time.Duration) time.Duration { return time.Duration(float64(d) / cfg.TimeScale) }
	step("start the Anvil manager in a child process (the measured one) and wait for it to lead")
	mgrSpec := childSpec{Role: roleManager, Kubeconfig: kubeconfig, LogFile: filepath.Join(dir, "manager.log"), ProfileDir: dir,
		HostConcurrency: cfg.HostConcurrency, BMCConcurrency: cfg.BMCConcurrency, QPS: cfg.QPS, Burst: cfg.Burst,
		LeaderElect: cfg.LeaderElect, LeaderElectionNS: "default", PowerSync: scale(defaultPowerSync),
		BMCIdleTimeout: scale(defaultBMCIdle), BMCConnIdleTimeout: scale(defaultBMCConnIdle), BMCTimeout: defaultBMCTimeout}
	var mgrInfo managerReady
	mgr, err := startChild(ctx, "manager", mgrSpec, dir, &mgrInfo, 3*time.Minute)
	if err != nil {
		return nil, err
	}
	defer mgr.stop()
	names := map[int]string{mgr.pid(): "manager (measured)", bmcs.pid(): "emulated BMCs"}

	// Close the watch before the API server stops (deferred calls run last-first): an open
	// watch holds kube-apiserver's graceful shutdown for its full 20 s.
	trackerCtx, stopTracker := context.WithCancel(ctx)
	defer stopTracker()
	tr, err := startTracker(trackerCtx, env)
	if err != nil {
		return nil, err
	}
	snap := func() (snapshot, error) {
		return takeSnapshot(ctx, mgrInfo.Stats, bmcsInfo.Stats, names, tr)
	}
	base, err := snap()
	if err != nil {
		return nil, err
	}
	if cfg.ProfileDir != "" {
		_ = getJSON(ctx, mgrInfo.Stats, "/cpuprofile/start?name=onboard", nil)
	}

	step("create %d AnvilHosts and wait until all are Available", cfg.Hosts)
	scheme := "redfish+http://"
	if cfg.TLS {
		scheme = "redfish+https://"
	}
	t0 := time.Now()
	createdAt := make([]time.Time, cfg.Hosts)
	if err := parallel(ctx, cfg.Hosts, cfg.CreateWorkers, func(i int) error {
		h := &infrav1.AnvilHost{ObjectMeta: metav1.ObjectMeta{Name: hostName(i), Namespace: benchNamespace,
			Labels: map[string]string{infrav1.DefaultFailureDomainLabel: fmt.Sprintf("zone-%c", 'a'+i%3)}},
			Spec: infrav1.AnvilHostSpec{
				BMC: infrav1.BMC{Address: scheme + bmcsInfo.Addrs[i] + "/redfish/v1/Systems/1",
					CredentialsRef: infrav1.LocalSecretReference{Name: hostName(i) + "-bmc"}},
				BootMACAddress: redfish.NewIdentity(i).MACs[0].String(),
				Online:         true,
			}}
		if cfg.TLS {
			h.Spec.BMC.CABundleRef = &infrav1.LocalSecretReference{Name: "bmc-ca"}
		}
		createdAt[i] = time.Now()
		return c.Create(ctx, h)
	}); err != nil {
		return nil, err
	}
	res.CreateDuration = time.Since(t0)

	deadline := t0.Add(cfg.Timeout)
	lastReport := time.Now()
	for {
		n := tr.available()
		res.Available = n
		if n == cfg.Hosts {
			break
		}
		for _, ch := range []*child{bmcs, mgr} {
			if err := ch.exited(); err != nil {
				return res, err
			}
		}
		if time.Now().After(deadline) {
			res.NotAvailable, res.Errors = tr.stuck()
			return res, fmt.Errorf("%d of %d hosts not Available after %s (run with -profile DIR to keep the manager's log)",
				cfg.Hosts-n, cfg.Hosts, cfg.Timeout)
		}
		if time.Since(lastReport) >= 5*time.Second {
			fmt.Fprintf(progress, "    %4d/%d Available after %s\n", n, cfg.Hosts, time.Since(t0).Round(time.Second))
			lastReport = time.Now()
		}
		select {
		case <-ctx.Done():
			return res, ctx.Err()
		case <-time.After(100 * time.Millisecond):
		}
	}
	last := tr.lastAvailable()
	res.ToAvailable = last.Sub(t0)
	res.Latency = tr.latencies(createdAt)
	step("all %d Available in %s; letting the manager's writes settle", cfg.Hosts, res.ToAvailable.Round(10*time.Millisecond))

	// Events are sent asynchronously and a host's last patch may still be in flight: wait until
	// the manager's writes (leader election aside) have stopped for 2 s.
	onboardEnd, err := settle(ctx, snap, base)
	if err != nil {
		return res, err
	}
	res.Onboard = between(base, onboardEnd)
	if cfg.ProfileDir != "" {
		_ = getJSON(ctx, mgrInfo.Stats, "/cpuprofile/stop", nil)
		_ = fetchToFile(ctx, mgrInfo.Stats, "/debug/pprof/heap", filepath.Join(dir, "onboard.heap.pprof"))
		_ = getJSON(ctx, mgrInfo.Stats, "/cpuprofile/start?name=steady", nil)
	}

	step("steady state: %s of wall time (= %s of production time at ×%g), nothing changes",
		cfg.Steady, time.Duration(float64(cfg.Steady)*cfg.TimeScale), cfg.TimeScale)
	steadyStart := onboardEnd
	steadyUntil := time.Now().Add(cfg.Steady)
	for time.Now().Before(steadyUntil) {
		for _, ch := range []*child{bmcs, mgr} {
			if err := ch.exited(); err != nil {
				return res, err
			}
		}
		select {
		case <-ctx.Done():
			return res, ctx.Err()
		case <-time.After(min(time.Until(steadyUntil), time.Second)):
		}
	}
	steadyEnd, err := snap()
	if err != nil {
		return res, err
	}
	res.Steady = between(steadyStart, steadyEnd)
	if cfg.ProfileDir != "" {
		_ = getJSON(ctx, mgrInfo.Stats, "/cpuprofile/stop", nil)
		_ = fetchToFile(ctx, mgrInfo.Stats, "/debug/pprof/heap", filepath.Join(dir, "steady.heap.pprof"))
	}
	res.BMCSessionsEnd = steadyEnd.bmc.Sessions
	var mgrArrivals map[string]time.Time
	if err := getJSON(ctx, mgrInfo.Stats, "/arrivals", &mgrArrivals); err == nil {
		res.CacheLag = cacheLag(tr.arrivals.snapshot(), mgrArrivals)
	}
	if cfg.ProfileDir != "" {
		if raw, err := json.MarshalIndent(res, "", "  "); err == nil {
			_ = os.WriteFile(filepath.Join(dir, "result.json"), raw, 0o600)
		}
		fmt.Fprintf(progress, "    profiles, result.json and manager.log in %s\n", dir)
	}
	res.Available = tr.available()
	if res.Available != cfg.Hosts {
		res.NotAvailable, res.Errors = tr.stuck()
		return res, fmt.Errorf("%d hosts left Available during the steady-state window", cfg.Hosts-res.Available)
	}
	return res, nil
}

func hostName(i int) string { return fmt.Sprintf("host-%04d", i) }

// parallel runs fn(0..n-1) on workers goroutines and returns the first error.
func parallel(ctx context.Context, n, workers int, fn func(int) error) error {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	work := make(chan int)
	var once sync.Once
	var first error
	var wg sync.WaitGroup
	for range max(workers, 1) {
		wg.Go(func() {
			for i := range work {
				if err := fn(i); err != nil {
					once.Do(func() { first = err; cancel() })
				}
			}
		})
	}
feed:
	for i := range n {
		select {
		case work <- i:
		case <-ctx.Done():
			break feed
		}
	}
	close(work)
	wg.Wait()
	if first == nil && ctx.Err() != nil && !errors.Is(ctx.Err(), context.Canceled) {
		return ctx.Err()
	}
	return first
}

// writeKubeconfig saves the envtest admin credentials for the manager child, which loads them
// as cmd/manager does (ctrl.GetConfig). The kubeconfig carries no QPS, exactly like a real one.
func writeKubeconfig(cfg *rest.Config, path string) error {
	kc := clientcmdapi.NewConfig()
	kc.Clusters["bench"] = &clientcmdapi.Cluster{Server: cfg.Host, CertificateAuthorityData: cfg.CAData}
	kc.AuthInfos["bench"] = &clientcmdapi.AuthInfo{ClientCertificateData: cfg.CertData, ClientKeyData: cfg.KeyData, Token: cfg.BearerToken}
	kc.Contexts["bench"] = &clientcmdapi.Context{Cluster: "bench", AuthInfo: "bench"}
	kc.CurrentContext = "bench"
	return clientcmd.WriteToFile(*kc, path)
}

// tracker watches the hosts (one informer, in this process) and records when each became
// Available and how often any host object changed.
type tracker struct {
	mu          sync.Mutex
	state       map[string]infrav1.HostState
	lastErr     map[string]string
	availableAt map[string]time.Time
	updates     int64
	arrivals    *arrivalLog
}

func startTracker(ctx context.Context, env *mgmtplane.Environment) (*tracker, error) {
	c, err := cache.New(env.Config, cache.Options{Scheme: env.Scheme,
		DefaultNamespaces: map[string]cache.Config{benchNamespace: {}}})
	if err != nil {
		return nil, err
	}
	go func() { _ = c.Start(ctx) }()
	inf, err := c.GetInformer(ctx, &infrav1.AnvilHost{})
	if err != nil {
		return nil, err
	}
	t := &tracker{state: map[string]infrav1.HostState{}, lastErr: map[string]string{}, availableAt: map[string]time.Time{}}
	t.arrivals = newArrivalLog()
	if _, err := inf.AddEventHandler(t.arrivals.handler()); err != nil {
		return nil, err
	}
	_, err = inf.AddEventHandler(toolscache.ResourceEventHandlerFuncs{
		AddFunc: func(o any) { t.observe(o, false) },
		UpdateFunc: func(oldObj, newObj any) {
			o, n := oldObj.(*infrav1.AnvilHost), newObj.(*infrav1.AnvilHost)
			t.observe(newObj, o.ResourceVersion != n.ResourceVersion)
		},
	})
	return t, err
}

func (t *tracker) observe(o any, changed bool) {
	h, ok := o.(*infrav1.AnvilHost)
	if !ok {
		return
	}
	now := time.Now()
	t.mu.Lock()
	defer t.mu.Unlock()
	if changed {
		t.updates++
	}
	t.state[h.Name] = h.Status.State
	if h.Status.LastError != nil {
		t.lastErr[h.Name] = h.Status.LastError.Reason + ": " + h.Status.LastError.Message
	} else {
		delete(t.lastErr, h.Name)
	}
	if h.Status.State == infrav1.HostStateAvailable {
		if _, seen := t.availableAt[h.Name]; !seen {
			t.availableAt[h.Name] = now
		}
	}
}

func (t *tracker) available() int {
	t.mu.Lock()
	defer t.mu.Unlock()
	n := 0
	for _, s := range t.state {
		if s == infrav1.HostStateAvailable {
			n++
		}
	}
	return n
}

func (t *tracker) lastAvailable() time.Time {
	t.mu.Lock()
	defer t.mu.Unlock()
	var last time.Time
	for _, at := range t.availableAt {
		if at.After(last) {
			last = at
		}
	}
	return last
}

func (t *tracker) latencies(createdAt []time.Time) []time.Duration {
	t.mu.Lock()
	defer t.mu.Unlock()
	out := make([]time.Duration, 0, len(createdAt))
	for i, c := range createdAt {
		if at, ok := t.availableAt[hostName(i)]; ok {
			out = append(out, at.Sub(c))
		}
	}
	sort.Slice(out, func(i, j int) bool { return out[i] < out[j] })
	return out
}

func (t *tracker) hostUpdates() int64 {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.updates
}

// stuck describes the hosts that are not Available.
func (t *tracker) stuck() (map[string]int, []string) {
	t.mu.Lock()
	defer t.mu.Unlock()
	byState := map[string]int{}
	var errs []string
	for name, s := range t.state {
		if s == infrav1.HostStateAvailable {
			continue
		}
		if s == "" {
			s = "(no status yet)"
		}
		byState[string(s)]++
		if e, ok := t.lastErr[name]; ok && len(errs) < 5 {
			errs = append(errs, name+": "+e)
		}
	}
	return byState, errs
}

// snapshot is every counter at one moment.
type snapshot struct {
	at          time.Time
	mgr         managerStats
	bmc         bmcStats
	cpu         map[string]float64
	machineBusy float64
	hostUpdates int64
}

func takeSnapshot(ctx context.Context, mgrAddr, bmcAddr string, names map[int]string, tr *tracker) (snapshot, error) {
	s := snapshot{at: time.Now(), hostUpdates: tr.hostUpdates()}
	// reset=1: the sampled peak restarts, so each phase reports its own.
	if err := getJSON(ctx, mgrAddr, "/stats?reset=1", &s.mgr); err != nil {
		return s, fmt.Errorf("manager stats: %w", err)
	}
	if err := getJSON(ctx, bmcAddr, "/stats", &s.bmc); err != nil {
		return s, fmt.Errorf("BMC stats: %w", err)
	}
	s.cpu = apimeter.CPUByProcess("bench (host creation, watch)", names)
	s.machineBusy = apimeter.MachineBusySeconds()
	return s, nil
}

// settle waits until the manager's onboarding writes have stopped for 2 s (at most 30 s).
// Every snapshot restarts the manager's sampled RSS peak, so the phase's peak is the highest
// of them.
func settle(ctx context.Context, snap func() (snapshot, error), base snapshot) (snapshot, error) {
	var prev int64 = -1
	var peak int64
	stableSince := time.Now()
	limit := time.Now().Add(30 * time.Second)
	for {
		s, err := snap()
		if err != nil {
			return s, err
		}
		peak = max(peak, s.mgr.SampledPeakKiB)
		n := diffAPI(base.mgr.API, s.mgr.API).writes(onboardingWrite)
		if n != prev {
			prev, stableSince = n, time.Now()
		}
		if time.Since(stableSince) >= 2*time.Second || time.Now().After(limit) {
			s.mgr.SampledPeakKiB = peak
			return s, nil
		}
		select {
		case <-ctx.Done():
			return s, ctx.Err()
		case <-time.After(500 * time.Millisecond):
		}
	}
}

func between(a, b snapshot) phase {
	p := phase{Duration: b.at.Sub(a.at), API: diffAPI(a.mgr.API, b.mgr.API), BMCByMethod: map[string]uint64{},
		CPU: map[string]float64{}, Manager: b.mgr, PeakRSSKiB: b.mgr.SampledPeakKiB,
		Reconciles: diffFloat(a.mgr.Reconciles, b.mgr.Reconciles), BMCOps: diffFloat(a.mgr.BMCOps, b.mgr.BMCOps),
		BMCErrors: diffFloat(a.mgr.BMCErrors, b.mgr.BMCErrors), BMCOpSecs: diffFloat(a.mgr.BMCOpSeconds, b.mgr.BMCOpSeconds),
		HostUpdates: b.hostUpdates - a.hostUpdates}
	for m, v := range b.bmc.ByMethod {
		if d := v - a.bmc.ByMethod[m]; d > 0 {
			p.BMCByMethod[m] = d
			p.BMCRequests += d
		}
	}
	for i, v := range b.bmc.PerBMC {
		var before uint64
		if i < len(a.bmc.PerBMC) {
			before = a.bmc.PerBMC[i]
		}
		d := v - before
		if i == 0 || d < p.BMCMinPerHost {
			p.BMCMinPerHost = d
		}
		p.BMCMaxPer = max(p.BMCMaxPer, d)
	}
	for k, v := range b.cpu {
		p.CPU[k] = v - a.cpu[k]
	}
	p.MachineBusy = b.machineBusy - a.machineBusy
	return p
}

func diffFloat(a, b map[string]float64) map[string]float64 {
	out := map[string]float64{}
	for k, v := range b {
		if d := v - a[k]; d != 0 {
			out[k] = d
		}
	}
	return out
}
