// Package apimeter holds what the benchmarks share to account for their runs: how an API
// request is named (verb and resource), how much CPU the whole machine and each of the
// benchmark's processes spent, and their memory.
package apimeter

import (
	"net/http"
	"os"
	"strconv"
	"strings"
)

// clockTicks is USER_HZ, 100 on every Linux architecture Go supports.
const clockTicks = 100

// Verb names an API request as Kubernetes does: CREATE, UPDATE, PATCH, DELETE, WATCH or
// GET/LIST (another method is named as it is).
func Verb(r *http.Request) string {
	switch r.Method {
	case http.MethodPost:
		return "CREATE"
	case http.MethodPut:
		return "UPDATE"
	case http.MethodPatch:
		return "PATCH"
	case http.MethodDelete:
		return "DELETE"
	case http.MethodGet, http.MethodHead:
		if w := r.URL.Query().Get("watch"); w == "true" || w == "1" {
			return "WATCH"
		}
		return "GET/LIST"
	}
	return r.Method
}

// Resource names the resource of an API path and the object it names, if any:
// /api/v1/namespaces/ns/secrets/x → (secrets, x),
// /apis/g/v/namespaces/ns/anvilhosts/x/status → (anvilhosts/status, x),
// /apis/g/v → (discovery, ""); a path outside /api and /apis is "other".
func Resource(path string) (resource, name string) {
	parts := strings.Split(strings.Trim(path, "/"), "/")
	var rest []string
	switch {
	case len(parts) >= 2 && parts[0] == "api":
		rest = parts[2:]
	case len(parts) >= 3 && parts[0] == "apis":
		rest = parts[3:]
	default:
		return "other", ""
	}
	if len(rest) >= 3 && rest[0] == "namespaces" {
		rest = rest[2:]
	}
	if len(rest) == 0 {
		return "discovery", ""
	}
	resource = rest[0]
	if len(rest) >= 2 {
		name = rest[1]
	}
	if len(rest) >= 3 {
		resource += "/" + rest[2]
	}
	return resource, name
}

// Observe is a transport wrapper (for rest.Config.Wrap) that calls seen with every request
// and its response (nil when the transport failed) as the response arrives: how the benchmarks
// count the requests of a client they hold the configuration of.
func Observe(seen func(*http.Request, *http.Response)) func(http.RoundTripper) http.RoundTripper {
	return func(rt http.RoundTripper) http.RoundTripper {
		return roundTripperFunc(func(r *http.Request) (*http.Response, error) {
			resp, err := rt.RoundTrip(r)
			if err != nil {
				seen(r, nil)
			} else {
				seen(r, resp)
			}
			return resp, err
		})
	}
}

type roundTripperFunc func(*http.Request) (*http.Response, error)

func (f roundTripperFunc) RoundTrip(r *http.Request) (*http.Response, error) { return f(r) }

// MachineBusySeconds is the CPU time every process on the machine has used since boot (all
// but idle and iowait), from /proc/stat: compared with a benchmark's own processes it shows
// how much of the machine other work took during the run. 0 when /proc/stat is unreadable.
func MachineBusySeconds() float64 {
	raw, err := os.ReadFile("/proc/stat")
	if err != nil {
		return 0
	}
	line, _, _ := strings.Cut(string(raw), "\n")
	f := strings.Fields(line)
	if len(f) < 8 || f[0] != "cpu" {
		return 0
	}
	var busy float64
	for i, v := range f[1:] {
		if i == 3 || i == 4 { // idle, iowait
			continue
		}
		if i >= 8 { // guest time is already in user
			break
		}
		n, _ := strconv.ParseFloat(v, 64)
		busy += n
	}
	return busy / clockTicks
}
