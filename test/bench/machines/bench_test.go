package main

import (
	"bytes"
	"context"
	"net/http"
	"os"
	"strings"
	"testing"
	"time"

	"go.uber.org/zap/zapcore"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/log/zap"
)

func TestMain(m *testing.M) {
	// The benchmark re-executes its own binary for the BMCs: under `go test` that is this
	// test binary.
	if bmcChildMain() {
		return
	}
	ctrl.SetLogger(zap.New(zap.WriteTo(os.Stderr), zap.Level(zapcore.ErrorLevel)))
	os.Exit(m.Run())
}

// TestBenchmarkSmall runs the whole benchmark with 20 hosts and machines and checks that it
// measures: every figure it reports comes from somewhere, and the claims it checks hold.
func TestBenchmarkSmall(t *testing.T) {
	if testing.Short() {
		t.Skip("builds cmd/manager, starts kube-apiserver, etcd and 20 emulated BMCs")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
	defer cancel()
	cfg := DefaultConfig()
	cfg.Hosts, cfg.Machines, cfg.Clusters = 20, 20, 2
	cfg.Timeout = 3 * time.Minute
	var progress bytes.Buffer
	cfg.Progress = &progress
	res, err := Run(ctx, cfg)
	if err != nil {
		t.Fatalf("%v\n%s", err, progress.String())
	}
	if res.ProvisionedCount != cfg.Machines || len(res.Latencies) != cfg.Machines || res.Provisioned <= 0 || res.HostsAvailable <= 0 {
		t.Fatalf("%d/%d provisioned, %d latencies, times %s / %s", res.ProvisionedCount, cfg.Machines, len(res.Latencies), res.HostsAvailable, res.Provisioned)
	}
	if len(res.Problems) > 0 {
		t.Fatalf("claims: %v", res.Problems)
	}
	if res.PeakRSSKiB <= 0 {
		t.Error("no peak RSS")
	}
	// Every machine's claim is an update of its host and at least one status write of its
	// own; the counter must have seen them.
	per := map[string]int64{}
	for _, row := range res.Provision.writeRows() {
		per[row.Name] = row.Count
	}
	for _, want := range []string{"UPDATE anvilhosts", "PATCH anvilmachines/status", "PATCH anvilmachines"} {
		if per[want] < int64(cfg.Machines) {
			t.Errorf("provisioning writes %v: want at least one %q per machine", per, want)
		}
	}
	// The benchmark's own creates are taken off the API server's counts: none is the manager's.
	for _, c := range []apiCounts{res.Onboard, res.Provision} {
		for _, row := range c.writeRows() {
			switch row.Name {
			case "CREATE anvilhosts", "CREATE anvilmachines", "CREATE machines", "CREATE clusters", "CREATE anvilclusters":
				t.Errorf("%d %s counted as the manager's", row.Count, row.Name)
			}
		}
	}
	// The manager runs with config/rbac's role: nothing it does may be forbidden (its Events
	// were, when the role granted only core Events).
	for _, c := range []apiCounts{res.Onboard, res.Provision} {
		for k, n := range c {
			if k.Code == http.StatusForbidden {
				t.Errorf("%d requests %s %s forbidden by config/rbac", n, k.Verb, k.Resource)
			}
		}
	}
	if res.Onboard.writes() < int64(cfg.Hosts) {
		t.Errorf("onboarding writes %d for %d hosts", res.Onboard.writes(), cfg.Hosts)
	}
	var out bytes.Buffer
	res.Print(&out)
	for _, want := range []string{"time until all machines are provisioned", "controller peak RSS", "API writes per host, end to end", "target ≤ 15"} {
		if !strings.Contains(out.String(), want) {
			t.Errorf("report lacks %q:\n%s", want, out.String())
		}
	}
	t.Log(out.String())
}

func TestParseRequestMetrics(t *testing.T) {
	m, err := parseRequestMetrics([]byte(`# TYPE apiserver_request_total counter
apiserver_request_total{code="201",component="apiserver",group="",resource="events",subresource="",verb="POST",version="v1"} 42
apiserver_request_total{code="200",group="coordination.k8s.io",resource="leases",verb="PUT"} 3
# TYPE apiserver_request_duration_seconds histogram
apiserver_request_duration_seconds_bucket{group="infrastructure.cluster.x-k8s.io",resource="anvilhosts",subresource="status",verb="PATCH",msg="a \"quoted\" value",le="+Inf"} 3
apiserver_request_duration_seconds_sum{group="infrastructure.cluster.x-k8s.io",resource="anvilhosts",subresource="status",verb="PATCH",msg="a \"quoted\" value"} 1.5e+01
apiserver_request_duration_seconds_count{group="infrastructure.cluster.x-k8s.io",resource="anvilhosts",subresource="status",verb="PATCH",msg="a \"quoted\" value"} 3
`))
	if err != nil {
		t.Fatal(err)
	}
	if n := m.counts[apiKey{Verb: "CREATE", Resource: "events", Code: 201}]; n != 42 || len(m.counts) != 1 {
		t.Fatalf("counts %v: want 42 CREATE events 201 and the API server's own leases not counted", m.counts)
	}
	if s, n := m.seconds["PATCH anvilhosts/status"], m.requests["PATCH anvilhosts/status"]; s != 15 || n != 3 {
		t.Fatalf("PATCH anvilhosts/status: %v s over %d requests, want 15 s over 3", s, n)
	}
	if _, err := parseRequestMetrics([]byte(`broken{a="b" 1`)); err == nil {
		t.Error("a malformed line parsed")
	}
}
