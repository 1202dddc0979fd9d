package main

import (
	"bytes"
	"context"
	"fmt"
	"maps"
	"net/http"
	"strconv"
	"sync"
	"time"

	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"

	"github.com/anvil-metal/cluster-api-provider-anvil/test/bench/apimeter"
)

// The manager's requests are counted by the API server itself (apiserver_request_total and
// apiserver_request_duration_seconds on /metrics) less what this benchmark asked for, which
// benchCounter counts on its own client. The manager talks to the API server directly, as
// deployed: a counting proxy in between cost the shared two cores about as much CPU as a
// tenth of the manager's own.

// apiServerMetrics is one scrape of the API server's request metrics.
type apiServerMetrics struct {
	counts apiCounts
	// seconds and requests are the duration histogram's sum and count by "VERB resource".
	seconds  map[string]float64
	requests map[string]uint64
}

// scrapeAPIServer reads the API server's request metrics with the admin configuration.
func scrapeAPIServer(ctx context.Context, admin *rest.Config) (*apiServerMetrics, error) {
	cs, err := kubernetes.NewForConfig(admin)
	if err != nil {
		return nil, err
	}
	raw, err := cs.Discovery().RESTClient().Get().AbsPath("/metrics").DoRaw(ctx)
	if err != nil {
		return nil, fmt.Errorf("reading the API server's /metrics: %w", err)
	}
	return parseRequestMetrics(raw)
}

// parseRequestMetrics takes the request counter and the request duration histogram out of
// the API server's metrics (Prometheus' text format).
func parseRequestMetrics(raw []byte) (*apiServerMetrics, error) {
	parser := expfmt.NewTextParser(model.UTF8Validation)
	families, err := parser.TextToMetricFamilies(bytes.NewReader(raw))
	if err != nil {
		return nil, fmt.Errorf("parsing the API server's /metrics: %w", err)
	}
	m := &apiServerMetrics{counts: apiCounts{}, seconds: map[string]float64{}, requests: map[string]uint64{}}
	for _, sample := range families["apiserver_request_total"].GetMetric() {
		labels := labelsOf(sample)
		key, counted := requestKey(labels)
		if !counted {
			continue
		}
		key.Code, _ = strconv.Atoi(labels["code"])
		m.counts[key] += int64(sample.GetCounter().GetValue())
	}
	for _, sample := range families["apiserver_request_duration_seconds"].GetMetric() {
		key, counted := requestKey(labelsOf(sample))
		if !counted {
			continue
		}
		h := sample.GetHistogram()
		m.seconds[key.Verb+" "+key.Resource] += h.GetSampleSum()
		m.requests[key.Verb+" "+key.Resource] += h.GetSampleCount()
	}
	return m, nil
}

func labelsOf(sample *dto.Metric) map[string]string {
	labels := make(map[string]string, len(sample.GetLabel()))
	for _, l := range sample.GetLabel() {
		labels[l.GetName()] = l.GetValue()
	}
	return labels
}

// requestKey names a request as apimeter does (verb; resource[/subresource]). Requests for
// what the manager never touches (the API server's own leases and endpoints, discovery,
// non-resource paths) are not counted.
func requestKey(labels map[string]string) (apiKey, bool) {
	resource := labels["resource"]
	switch {
	case resource == "", labels["group"] == "coordination.k8s.io", labels["group"] == "flowcontrol.apiserver.k8s.io",
		labels["group"] == "discovery.k8s.io", resource == "endpoints":
		return apiKey{}, false
	}
	if sub := labels["subresource"]; sub != "" {
		resource += "/" + sub
	}
	// The metrics name requests by HTTP method where apimeter names them as Kubernetes does.
	verb := labels["verb"]
	switch verb {
	case "POST":
		verb = "CREATE"
	case "PUT":
		verb = "UPDATE"
	case "APPLY":
		verb = "PATCH"
	case "GET", "LIST":
		verb = "GET/LIST"
	case "WATCHLIST":
		verb = "WATCH"
	}
	return apiKey{Verb: verb, Resource: resource}, true
}

// benchCounter counts the benchmark's own requests, to be taken off the API server's counts.
type benchCounter struct {
	mu     sync.Mutex
	counts apiCounts
}

// wrap returns cfg with every request counted.
func (b *benchCounter) wrap(cfg *rest.Config) *rest.Config {
	out := rest.CopyConfig(cfg)
	out.Wrap(apimeter.Observe(func(r *http.Request, resp *http.Response) {
		resource, _ := apimeter.Resource(r.URL.Path)
		k := apiKey{Verb: apimeter.Verb(r), Resource: resource}
		if resp != nil {
			k.Code = resp.StatusCode
		}
		b.mu.Lock()
		if b.counts == nil {
			b.counts = apiCounts{}
		}
		b.counts[k]++
		b.mu.Unlock()
	}))
	return out
}

func (b *benchCounter) snapshot() apiCounts {
	b.mu.Lock()
	defer b.mu.Unlock()
	return maps.Clone(b.counts)
}

// managerMeter takes snapshots of the manager's requests: the API server's counts less the
// benchmark's.
type managerMeter struct {
	admin *rest.Config
	bench *benchCounter
	last  *apiServerMetrics
}

// snapshot returns the manager's request counts so far.
func (m *managerMeter) snapshot(ctx context.Context) (apiCounts, error) {
	s, err := scrapeAPIServer(ctx, m.admin)
	if err != nil {
		return nil, err
	}
	m.last = s
	out := maps.Clone(s.counts)
	for k, v := range m.bench.snapshot() {
		if _, counted := out[k]; counted {
			out[k] -= v
		}
	}
	for k, v := range out {
		if v <= 0 {
			delete(out, k)
		}
	}
	return out, nil
}

// writeLatencies is the mean time the API server took for each kind of write, from the
// last snapshot (the benchmark's own creates included).
func (m *managerMeter) writeLatencies() map[string]time.Duration {
	out := map[string]time.Duration{}
	if m.last == nil {
		return out
	}
	for k, s := range m.last.seconds {
		if n := m.last.requests[k]; n > 0 {
			out[k] = time.Duration(s / float64(n) * float64(time.Second))
		}
	}
	return out
}
