package main

import (
	"maps"
	"net/http"
	"sort"
	"strconv"
	"strings"
	"sync"

	"github.com/anvil-metal/cluster-api-provider-anvil/test/bench/apimeter"
)

// apiCounter counts the manager's requests to the API server by verb, resource and status
// code. It wraps the manager's rest.Config transport, so it sees everything the manager
// sends: the controller's client, the informers, the event broadcaster and leader election.
type apiCounter struct {
	// leaderLease is the leader-election Lease's name, counted apart from any other Lease.
	leaderLease string

	mu     sync.Mutex
	counts map[string]int64
}

func newAPICounter(leaderLease string) *apiCounter {
	return &apiCounter{leaderLease: leaderLease, counts: map[string]int64{}}
}

// wrap is a transport.WrapperFunc for rest.Config.Wrap.
func (c *apiCounter) wrap(rt http.RoundTripper) http.RoundTripper {
	return apimeter.Observe(func(req *http.Request, resp *http.Response) {
		code := "err"
		if resp != nil {
			code = strconv.Itoa(resp.StatusCode)
		}
		key := apiKey{Verb: apimeter.Verb(req), Resource: c.resourceOf(req.URL.Path), Code: code}.String()
		c.mu.Lock()
		c.counts[key]++
		c.mu.Unlock()
	})(rt)
}

func (c *apiCounter) snapshot() map[string]int64 {
	c.mu.Lock()
	defer c.mu.Unlock()
	return maps.Clone(c.counts)
}

// apiKey is one counted kind of request, e.g. PATCH anvilhosts/status 200.
type apiKey struct {
	Verb, Resource, Code string
}

func (k apiKey) String() string { return k.Verb + " " + k.Resource + " " + k.Code }

// MarshalText lets apiDelta be written as JSON.
func (k apiKey) MarshalText() ([]byte, error) { //nolint:unparam // encoding.TextMarshaler's signature
	return []byte(k.String()), nil
}

func parseAPIKey(s string) apiKey {
	f := strings.Fields(s)
	if len(f) != 3 {
		return apiKey{Verb: s}
	}
	return apiKey{Verb: f[0], Resource: f[1], Code: f[2]}
}

// isWrite is true for every verb that changes something in etcd.
func (k apiKey) isWrite() bool {
	switch k.Verb {
	case "CREATE", "UPDATE", "PATCH", "DELETE":
		return true
	}
	return false
}

func (k apiKey) failed() bool { return k.Code == "err" || (len(k.Code) == 3 && k.Code[0] >= '4') }

// resourceOf names the resource of an API path (apimeter.Resource), naming the
// leader-election Lease apart from any other Lease.
func (c *apiCounter) resourceOf(path string) string {
	resource, name := apimeter.Resource(path)
	if resource == "leases" && name == c.leaderLease {
		return "leases(leader-election)"
	}
	return resource
}

// apiDelta is the requests made between two snapshots.
type apiDelta map[apiKey]int64

func diffAPI(before, after map[string]int64) apiDelta {
	d := apiDelta{}
	for k, v := range after {
		if n := v - before[k]; n != 0 {
			d[parseAPIKey(k)] = n
		}
	}
	return d
}

// writes sums the write requests for which keep returns true.
func (d apiDelta) writes(keep func(apiKey) bool) int64 {
	var n int64
	for k, v := range d {
		if k.isWrite() && keep(k) {
			n += v
		}
	}
	return n
}

// writeRows groups writes by "VERB resource" (failures noted) in a stable order.
func (d apiDelta) writeRows(keep func(apiKey) bool) []writeRow {
	byKey := map[string]*writeRow{}
	for k, v := range d {
		if !k.isWrite() || !keep(k) {
			continue
		}
		name := k.Verb + " " + k.Resource
		r := byKey[name]
		if r == nil {
			r = &writeRow{Name: name, Resource: k.Resource}
			byKey[name] = r
		}
		r.Count += v
		if k.failed() {
			r.Failed += v
			r.FailedCodes = appendUnique(r.FailedCodes, k.Code)
		}
	}
	rows := make([]writeRow, 0, len(byKey))
	for _, r := range byKey {
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

// reads sums the non-write requests by verb.
func (d apiDelta) reads() map[string]int64 {
	out := map[string]int64{}
	for k, v := range d {
		if !k.isWrite() {
			out[k.Verb] += v
		}
	}
	return out
}

type writeRow struct {
	Name, Resource string
	Count, Failed  int64
	FailedCodes    []string
}

func appendUnique(s []string, v string) []string {
	for _, x := range s {
		if x == v {
			return s
		}
	}
	return append(s, v)
}

func isLeaderElection(k apiKey) bool { return k.Resource == "leases(leader-election)" }
