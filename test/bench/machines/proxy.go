package main

import (
	"context"
	"net"
	"net/http"
	"net/http/httputil"
	"net/url"
	"sort"
	"sync"
	"time"

	"k8s.io/client-go/rest"

	"github.com/anvil-metal/cluster-api-provider-anvil/test/bench/apimeter"
)

// countingProxy stands between the manager and the API server and counts every request the
// manager makes by verb, resource and status. The manager is the real cmd/manager binary,
// unchanged: it simply has this proxy as its API server (plain HTTP on loopback), and the
// proxy forwards each request with the API server's credentials. Watches stream through.
type countingProxy struct {
	URL string
	srv *http.Server

	mu     sync.Mutex
	counts map[apiKey]int64
	// writeTime is the time write requests took, by "VERB resource" (the API server's
	// latency as the manager sees it, plus the proxy's small share).
	writeTime map[string]time.Duration
}

func startProxy(cfg *rest.Config) (*countingProxy, error) {
	target, err := url.Parse(cfg.Host)
	if err != nil {
		return nil, err
	}
	transport, err := rest.TransportFor(cfg)
	if err != nil {
		return nil, err
	}
	rp := httputil.NewSingleHostReverseProxy(target)
	rp.Transport = transport
	rp.FlushInterval = -1 // watch events go through at once
	p := &countingProxy{counts: map[apiKey]int64{}, writeTime: map[string]time.Duration{}}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	p.URL = "http://" + ln.Addr().String()
	p.srv = &http.Server{ReadHeaderTimeout: 10 * time.Second, Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		sw := &statusWriter{ResponseWriter: w, code: http.StatusOK}
		start := time.Now()
		rp.ServeHTTP(sw, r)
		resource, _ := apimeter.Resource(r.URL.Path)
		k := apiKey{Verb: apimeter.Verb(r), Resource: resource, Code: sw.code}
		p.mu.Lock()
		p.counts[k]++
		if k.isWrite() {
			p.writeTime[k.Verb+" "+k.Resource] += time.Since(start)
		}
		p.mu.Unlock()
	})}
	go func() { _ = p.srv.Serve(ln) }()
	return p, nil
}

func (p *countingProxy) stop() {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	_ = p.srv.Shutdown(ctx)
	_ = p.srv.Close()
}

// snapshot returns the counts so far.
func (p *countingProxy) snapshot() apiCounts {
	p.mu.Lock()
	defer p.mu.Unlock()
	out := make(apiCounts, len(p.counts))
	for k, v := range p.counts {
		out[k] = v
	}
	return out
}

// writeLatencies returns the mean duration of each kind of write so far.
func (p *countingProxy) writeLatencies() map[string]time.Duration {
	p.mu.Lock()
	defer p.mu.Unlock()
	n := map[string]int64{}
	for k, v := range p.counts {
		if k.isWrite() {
			n[k.Verb+" "+k.Resource] += v
		}
	}
	out := map[string]time.Duration{}
	for k, d := range p.writeTime {
		if n[k] > 0 {
			out[k] = d / time.Duration(n[k])
		}
	}
	return out
}

// statusWriter records the response status; Unwrap lets the reverse proxy flush watches.
type statusWriter struct {
	http.ResponseWriter
	code int
}

func (w *statusWriter) WriteHeader(code int) {
	w.code = code
	w.ResponseWriter.WriteHeader(code)
}

func (w *statusWriter) Unwrap() http.ResponseWriter { return w.ResponseWriter }

// apiKey is one kind of request, e.g. PATCH anvilhosts/status 200.
type apiKey struct {
	Verb, Resource string
	Code           int
}

func (k apiKey) isWrite() bool {
	switch k.Verb {
	case "CREATE", "UPDATE", "PATCH", "DELETE":
		return true
	}
	return false
}

// apiCounts are request counts by kind.
type apiCounts map[apiKey]int64

// minus is what happened between an earlier snapshot and this one.
func (c apiCounts) minus(before apiCounts) apiCounts {
	out := apiCounts{}
	for k, v := range c {
		if n := v - before[k]; n != 0 {
			out[k] = n
		}
	}
	return out
}

// writes is the number of write requests (any outcome).
func (c apiCounts) writes() int64 {
	var n int64
	for k, v := range c {
		if k.isWrite() {
			n += v
		}
	}
	return n
}

// failedWrites counts the writes the API server refused (conflicts, mostly).
func (c apiCounts) failedWrites() int64 {
	var n int64
	for k, v := range c {
		if k.isWrite() && k.Code >= 400 {
			n += v
		}
	}
	return n
}

// reads counts GET/LIST requests.
func (c apiCounts) reads() int64 {
	var n int64
	for k, v := range c {
		if k.Verb == "GET/LIST" {
			n += v
		}
	}
	return n
}

// writeRow is one line of the write breakdown.
type writeRow struct {
	Name          string
	Count, Failed int64
}

// writeRows groups writes by "VERB resource", most first.
func (c apiCounts) writeRows() []writeRow {
	by := map[string]*writeRow{}
	for k, v := range c {
		if !k.isWrite() {
			continue
		}
		name := k.Verb + " " + k.Resource
		r := by[name]
		if r == nil {
			r = &writeRow{Name: name}
			by[name] = r
		}
		r.Count += v
		if k.Code >= 400 {
			r.Failed += v
		}
	}
	rows := make([]writeRow, 0, len(by))
	for _, r := range by {
		rows = append(rows, *r)
	}
	sort.Slice(rows, func(i, j int) bool {
		if rows[i].Count != rows[j].Count {
			return rows[i].Count > rows[j].Count
		}
		return rows[i].Name < rows[j].Name
	})
	return rows
}
