package main

import (
	"bufio"
	"context"
	"fmt"
	"maps"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"time"

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
	requests map[string]int64
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
	m := &apiServerMetrics{counts: apiCounts{}, seconds: map[string]float64{}, requests: map[string]int64{}}
	sc := bufio.NewScanner(strings.NewReader(string(raw)))
	sc.Buffer(make([]byte, 0, 64<<10), 1<<20)
	for sc.Scan() {
		name, labels, value, ok := parseSample(sc.Text())
		if !ok {
			continue
		}
		key, counted := requestKey(labels)
		if !counted {
			continue
		}
		switch name {
		case "apiserver_request_total":
			code, _ := strconv.Atoi(labels["code"])
			key.Code = code
			m.counts[key] += int64(value)
		case "apiserver_request_duration_seconds_sum":
			m.seconds[key.Verb+" "+key.Resource] += value
		case "apiserver_request_duration_seconds_count":
			m.requests[key.Verb+" "+key.Resource] += int64(value)
		}
	}
	return m, sc.Err()
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

// parseSample parses one line of Prometheus' text format: name{k="v",...} value.
func parseSample(line string) (name string, labels map[string]string, value float64, ok bool) {
	if line == "" || line[0] == '#' {
		return "", nil, 0, false
	}
	open := strings.IndexByte(line, '{')
	if open < 0 {
		return "", nil, 0, false
	}
	name = line[:open]
	labels = map[string]string{}
	i := open + 1
	for i < len(line) && line[i] != '}' {
		eq := strings.IndexByte(line[i:], '=')
		if eq < 0 || i+eq+1 >= len(line) || line[i+eq+1] != '"' {
			return "", nil, 0, false
		}
		key := line[i : i+eq]
		i += eq + 2
		var v strings.Builder
		for i < len(line) && line[i] != '"' {
			if line[i] == '\\' && i+1 < len(line) {
				i++
			}
			v.WriteByte(line[i])
			i++
		}
		labels[key] = v.String()
		i++ // closing quote
		if i < len(line) && line[i] == ',' {
			i++
		}
	}
	if i >= len(line) {
		return "", nil, 0, false
	}
	value, err := strconv.ParseFloat(strings.TrimSpace(line[i+1:]), 64)
	return name, labels, value, err == nil
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
	out := apiCounts{}
	for k, v := range s.counts {
		out[k] = v
	}
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
