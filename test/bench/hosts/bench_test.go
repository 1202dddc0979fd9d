package main

import (
	"bytes"
	"context"
	"os"
	"strings"
	"testing"
	"time"

	"go.uber.org/zap/zapcore"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/log/zap"
)

func TestMain(m *testing.M) {
	// The benchmark re-executes its own binary for the BMC and manager processes: under
	// `go test` that binary is this test binary.
	if childMain() {
		return
	}
	ctrl.SetLogger(zap.New(zap.WriteTo(os.Stderr), zap.Level(zapcore.ErrorLevel)))
	os.Exit(m.Run())
}

// TestBenchmarkSmall runs the whole benchmark with 20 hosts and a short, strongly scaled
// steady window, and checks that it measures: every count it reports comes from somewhere.
func TestBenchmarkSmall(t *testing.T) {
	if testing.Short() {
		t.Skip("starts kube-apiserver, etcd, 20 emulated BMCs and the manager")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	cfg := DefaultConfig()
	cfg.Hosts = 20
	cfg.Steady = 6 * time.Second
	cfg.TimeScale = 40 // power sync every 3 s, so the window sees each host polled
	cfg.Timeout = time.Minute
	var progress bytes.Buffer
	cfg.Progress = &progress
	res, err := Run(ctx, cfg)
	if err != nil {
		t.Fatalf("%v\n%s", err, progress.String())
	}
	s := res.Summarize()
	if !s.AllAvailable || len(res.Latency) != cfg.Hosts || s.ToAvailable <= 0 {
		t.Fatalf("%d/%d Available, %d latencies, %s", res.Available, cfg.Hosts, len(res.Latency), s.ToAvailable)
	}

	// Onboarding writes each host's metadata (finalizer, labels), its status and an Event: the
	// counter must have seen all three kinds.
	for _, want := range []string{"PATCH anvilhosts", "PATCH anvilhosts/status", "CREATE events"} {
		found := false
		for _, row := range res.Onboard.API.writeRows(onboardingWrite) {
			found = found || (row.Name == want && row.Count >= int64(cfg.Hosts))
		}
		if !found {
			t.Errorf("onboarding writes %v: want at least one %q per host", res.Onboard.API.writeRows(onboardingWrite), want)
		}
	}
	if s.WritesToAvailable < 3 {
		t.Errorf("%.2f writes per host to Available, want at least 3", s.WritesToAvailable)
	}
	if res.Onboard.BMCRequests < uint64(cfg.Hosts)*10 || res.Onboard.BMCMinPerHost == 0 {
		t.Errorf("onboarding BMC requests %d (fewest on one BMC %d): every host is inspected", res.Onboard.BMCRequests, res.Onboard.BMCMinPerHost)
	}
	if res.Onboard.BMCOps["inventory"] < float64(cfg.Hosts) {
		t.Errorf("BMC operations %v: want an inventory per host", res.Onboard.BMCOps)
	}

	// Steady state: power is polled, so the BMCs are asked; leader election renews.
	if res.Steady.BMCRequests == 0 || s.SteadyBMCRequestsPerHostHour <= 0 {
		t.Errorf("no BMC requests in the steady window (%s)", res.Steady.Duration)
	}
	if res.Steady.API.writes(isLeaderElection) == 0 {
		t.Error("leader election wrote nothing in the steady window: the counter misses it")
	}
	if s.PeakRSSMiB <= 0 || res.Steady.Manager.HeapInuse == 0 {
		t.Errorf("no memory figures: %+v", res.Steady.Manager)
	}

	var out bytes.Buffer
	res.Print(&out)
	for _, want := range []string{"API writes per host to Available", "controller peak RSS", "BMC requests per host per hour",
		"issue #3 targets (at 20 hosts; the targets are set for 1000): "} {
		if !strings.Contains(out.String(), want) {
			t.Errorf("report lacks %q:\n%s", want, out.String())
		}
	}
	t.Logf("\n%s", out.String())
}

func TestResourceOf(t *testing.T) {
	c := newAPICounter(leaderElectionID)
	for path, want := range map[string]string{
		"/apis/infrastructure.cluster.x-k8s.io/v1alpha1/namespaces/ns/anvilhosts/h1":        "anvilhosts",
		"/apis/infrastructure.cluster.x-k8s.io/v1alpha1/namespaces/ns/anvilhosts/h1/status": "anvilhosts/status",
		"/apis/infrastructure.cluster.x-k8s.io/v1alpha1/anvilhosts":                         "anvilhosts",
		"/apis/coordination.k8s.io/v1/namespaces/ns/leases/h1":                              "leases",
		"/apis/coordination.k8s.io/v1/namespaces/default/leases/" + leaderElectionID:        "leases(leader-election)",
		"/apis/events.k8s.io/v1/namespaces/ns/events":                                       "events",
		"/api/v1/namespaces/ns/secrets":                                                     "secrets",
		"/api/v1/namespaces/ns":                                                             "namespaces",
		"/api":                                                                              "other",
	} {
		if got := c.resourceOf(path); got != want {
			t.Errorf("resourceOf(%s) = %q, want %q", path, got, want)
		}
	}
}
