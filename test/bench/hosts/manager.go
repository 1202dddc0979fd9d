package main

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"net/http/pprof"
	"os"
	"path/filepath"
	"runtime"
	rpprof "runtime/pprof"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	dto "github.com/prometheus/client_model/go"
	corev1 "k8s.io/api/core/v1"
	clientgoscheme "k8s.io/client-go/kubernetes/scheme"
	clusterv1 "sigs.k8s.io/cluster-api/api/core/v1beta2"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/controller"
	"sigs.k8s.io/controller-runtime/pkg/log/zap"
	ctrlmetrics "sigs.k8s.io/controller-runtime/pkg/metrics"
	metricsserver "sigs.k8s.io/controller-runtime/pkg/metrics/server"

	k8sruntime "k8s.io/apimachinery/pkg/runtime"

	infrav1 "github.com/anvil-metal/cluster-api-provider-anvil/api/v1alpha1"
	"github.com/anvil-metal/cluster-api-provider-anvil/controllers"
	"github.com/anvil-metal/cluster-api-provider-anvil/internal/bmc"
	"github.com/anvil-metal/cluster-api-provider-anvil/internal/hoststate"
	"github.com/anvil-metal/cluster-api-provider-anvil/test/bench/apimeter"
)

// leaderElectionID is cmd/manager's.
const leaderElectionID = "controller-leader-election-capanvil"

// managerReady is what the manager child reports once it leads and its caches are synced.
type managerReady struct {
	Stats string
}

// managerStats is the manager child's answer to GET /stats.
type managerStats struct {
	// API counts requests to the API server: "VERB resource code" → n.
	API map[string]int64
	// RSSKiB is the resident set now; HWMKiB the kernel's peak (VmHWM) over the process's
	// life; SampledPeakKiB the highest RSS seen by a 100 ms sampler since the last reset.
	RSSKiB, HWMKiB, SampledPeakKiB                     int64
	HeapInuse, HeapSys, StackInuse, GoSys, HeapObjects uint64
	NumGC                                              uint32
	Goroutines                                         int
	CPUSeconds                                         float64
	// Reconciles by result; BMCOps and BMCErrors by operation (from the manager's metrics).
	Reconciles, BMCOps, BMCErrors map[string]float64
	// BMCOpSeconds is the time spent in each BMC operation (for average latencies).
	BMCOpSeconds map[string]float64
	OpenSessions int
}

// runManager runs the Anvil manager as cmd/manager wires it (AnvilHost controller, BMC pool,
// Simulated provisioner, leader election), with its API traffic counted, until ctx ends.
func runManager(ctx context.Context, spec childSpec) error {
	logFile, err := os.Create(spec.LogFile)
	if err != nil {
		return err
	}
	defer logFile.Close()
	// cmd/manager's default logger: JSON at info level.
	ctrl.SetLogger(zap.New(zap.WriteTo(logFile)))

	// ctrl.GetConfig is what ctrl.GetConfigOrDie in cmd/manager calls: with nothing in the
	// kubeconfig it disables client-side rate limiting (QPS -1).
	if err := os.Setenv("KUBECONFIG", spec.Kubeconfig); err != nil {
		return err
	}
	cfg, err := ctrl.GetConfig()
	if err != nil {
		return err
	}
	if spec.QPS != 0 {
		cfg.QPS, cfg.Burst = spec.QPS, spec.Burst
	}
	counter := newAPICounter(leaderElectionID)
	cfg.Wrap(counter.wrap)

	scheme := k8sruntime.NewScheme()
	for _, add := range []func(*k8sruntime.Scheme) error{clientgoscheme.AddToScheme, clusterv1.AddToScheme, infrav1.AddToScheme} {
		if err := add(scheme); err != nil {
			return err
		}
	}
	mgr, err := ctrl.NewManager(cfg, ctrl.Options{
		Scheme:                  scheme,
		Metrics:                 metricsserver.Options{BindAddress: "0"}, // scraping is not measured
		HealthProbeBindAddress:  "0",
		LeaderElection:          spec.LeaderElect,
		LeaderElectionID:        leaderElectionID,
		LeaderElectionNamespace: spec.LeaderElectionNS,
	})
	if err != nil {
		return fmt.Errorf("creating manager: %w", err)
	}
	pool := bmc.NewPool(bmc.PoolOptions{MaxConcurrent: spec.BMCConcurrency, CallTimeout: spec.BMCTimeout,
		IdleTimeout: spec.BMCIdleTimeout, ConnIdleTimeout: spec.BMCConnIdleTimeout, Metrics: bmc.NewMetrics(ctrlmetrics.Registry)})
	if err := mgr.Add(pool); err != nil {
		return err
	}
	ctrlmetrics.Registry.MustRegister(controllers.NewHostStateCollector(mgr.GetClient()))
	hosts := &controllers.AnvilHostReconciler{
		Client:   mgr.GetClient(),
		Recorder: mgr.GetEventRecorder("anvilhost-controller"),
		Pool:     pool,
		StateMachine: &hoststate.Machine{BMC: pool, Provisioner: hoststate.Simulated{},
			PowerSyncInterval: spec.PowerSync},
		BMCTimeout: spec.BMCTimeout,
	}
	if err := hosts.SetupWithManager(ctx, mgr, controller.Options{MaxConcurrentReconciles: spec.HostConcurrency}); err != nil {
		return fmt.Errorf("setting up the AnvilHost controller: %w", err)
	}

	sampler := startRSSSampler(ctx)
	mgrErr := make(chan error, 1)
	go func() { mgrErr <- mgr.Start(ctx) }()

	// Ready once elected and the controller's informers have synced.
	select {
	case <-mgr.Elected():
	case err := <-mgrErr:
		return fmt.Errorf("manager stopped before it was elected: %w", err)
	case <-time.After(2 * time.Minute):
		return fmt.Errorf("not elected leader within 2 minutes")
	}
	hostInformer, err := mgr.GetCache().GetInformer(ctx, &infrav1.AnvilHost{})
	if err != nil {
		return err
	}
	// When each host version reaches the manager's cache, to compare with the benchmark's
	// own watch: a lagging cache makes the controller act on stale hosts.
	arrivals := newArrivalLog()
	if _, err := hostInformer.AddEventHandler(arrivals.handler()); err != nil {
		return err
	}
	if _, err := mgr.GetCache().GetInformer(ctx, &corev1.Secret{}); err != nil {
		return err
	}

	mux := http.NewServeMux()
	mux.HandleFunc("/stats", func(w http.ResponseWriter, r *http.Request) {
		st := managerStats{API: counter.snapshot(), RSSKiB: residentKiB(), HWMKiB: apimeter.StatusKiB("self", "VmHWM"),
			SampledPeakKiB: sampler.peak(r.URL.Query().Get("reset") == "1"), Goroutines: runtime.NumGoroutine(),
			CPUSeconds: selfCPUSeconds(), OpenSessions: pool.OpenSessions()}
		var ms runtime.MemStats
		runtime.ReadMemStats(&ms)
		st.HeapInuse, st.HeapSys, st.StackInuse, st.GoSys, st.HeapObjects, st.NumGC = ms.HeapInuse, ms.HeapSys, ms.StackInuse, ms.Sys, ms.HeapObjects, ms.NumGC
		st.Reconciles, st.BMCOps, st.BMCOpSeconds, st.BMCErrors = gatherMetrics()
		_ = json.NewEncoder(w).Encode(st)
	})
	mux.HandleFunc("/arrivals", func(w http.ResponseWriter, _ *http.Request) {
		_ = json.NewEncoder(w).Encode(arrivals.snapshot())
	})
	var profMu sync.Mutex
	var profFile *os.File
	mux.HandleFunc("/cpuprofile/start", func(w http.ResponseWriter, r *http.Request) {
		profMu.Lock()
		defer profMu.Unlock()
		file, ok := profileFiles[r.URL.Query().Get("name")]
		if !ok || spec.ProfileDir == "" {
			http.Error(w, "want ?name=onboard or steady, and a profile directory", http.StatusBadRequest)
			return
		}
		f, err := os.Create(filepath.Join(spec.ProfileDir, file))
		if err == nil {
			if err = rpprof.StartCPUProfile(f); err != nil {
				_ = f.Close()
			}
		}
		if err != nil {
			http.Error(w, err.Error(), http.StatusInternalServerError)
			return
		}
		profFile = f
	})
	mux.HandleFunc("/cpuprofile/stop", func(w http.ResponseWriter, _ *http.Request) {
		profMu.Lock()
		defer profMu.Unlock()
		if profFile == nil {
			http.Error(w, "no profile running", http.StatusConflict)
			return
		}
		rpprof.StopCPUProfile()
		_ = profFile.Close()
		profFile = nil
	})
	mux.HandleFunc("/debug/pprof/", pprof.Index)
	mux.HandleFunc("/debug/pprof/profile", pprof.Profile)
	addr, err := serveStats(ctx, mux)
	if err != nil {
		return err
	}
	if err := writeReady(spec.ReadyFile, managerReady{Stats: addr}); err != nil {
		return err
	}
	return <-mgrErr
}

// profileFiles are the CPU profiles the benchmark asks for, by phase.
var profileFiles = map[string]string{"onboard": "onboard.cpu.pprof", "steady": "steady.cpu.pprof"}

// rssSampler records the highest RSS it sees, every 100 ms.
type rssSampler struct{ max atomic.Int64 }

func startRSSSampler(ctx context.Context) *rssSampler {
	s := &rssSampler{}
	go func() {
		t := time.NewTicker(100 * time.Millisecond)
		defer t.Stop()
		for {
			select {
			case <-ctx.Done():
				return
			case <-t.C:
				rss := residentKiB()
				for {
					cur := s.max.Load()
					if rss <= cur || s.max.CompareAndSwap(cur, rss) {
						break
					}
				}
			}
		}
	}()
	return s
}

func (s *rssSampler) peak(reset bool) int64 {
	if reset {
		return s.max.Swap(residentKiB())
	}
	return max(s.max.Load(), residentKiB())
}

func selfCPUSeconds() float64 {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		return 0
	}
	tv := func(t syscall.Timeval) float64 { return float64(t.Sec) + float64(t.Usec)/1e6 }
	return tv(ru.Utime) + tv(ru.Stime)
}

// gatherMetrics reads reconcile results and BMC operations from the manager's registry.
func gatherMetrics() (reconciles, ops, opSeconds, errs map[string]float64) {
	reconciles, ops, opSeconds, errs = map[string]float64{}, map[string]float64{}, map[string]float64{}, map[string]float64{}
	families, err := ctrlmetrics.Registry.Gather()
	if err != nil {
		return
	}
	label := func(labels []*dto.LabelPair, name string) string {
		for _, l := range labels {
			if l.GetName() == name {
				return l.GetValue()
			}
		}
		return ""
	}
	for _, f := range families {
		for _, m := range f.GetMetric() {
			switch f.GetName() {
			case "controller_runtime_reconcile_total":
				if label(m.GetLabel(), "controller") == "anvilhost" {
					reconciles[label(m.GetLabel(), "result")] += m.GetCounter().GetValue()
				}
			case "anvil_bmc_operation_duration_seconds":
				ops[label(m.GetLabel(), "operation")] += float64(m.GetHistogram().GetSampleCount())
				opSeconds[label(m.GetLabel(), "operation")] += m.GetHistogram().GetSampleSum()
			case "anvil_bmc_operation_errors_total":
				errs[label(m.GetLabel(), "operation")+"/"+label(m.GetLabel(), "reason")] += m.GetCounter().GetValue()
			}
		}
	}
	return
}
