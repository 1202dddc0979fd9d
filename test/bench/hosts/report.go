package main

import (
	"fmt"
	"io"
	"runtime"
	"sort"
	"strings"
	"text/tabwriter"
	"time"
)

// Targets from the issue, set for issueHosts hosts on a 2-core machine.
const (
	issueHosts           = 1000
	targetToAvailable    = 2 * time.Minute
	targetRSSMiB         = 256
	targetWritesPerHost  = 5
	targetSteadyWritesPH = 0
)

// Summary is the headline numbers of a run.
type Summary struct {
	AllAvailable bool
	ToAvailable  time.Duration
	PeakRSSMiB   float64
	// WritesToAvailable is API writes per host from creation to Available (leader election
	// excluded: it is per manager and periodic, not onboarding).
	WritesToAvailable float64
	// SteadyWritesPerHostHour counts every write the manager makes in steady state (leader
	// election aside), per host per hour of production time.
	SteadyWritesPerHostHour float64
	// SteadyHostObjectWritesPerHostHour is the AnvilHost (spec/metadata/status) part of it.
	SteadyHostObjectWritesPerHostHour float64
	SteadyBMCRequestsPerHostHour      float64
	// LeaderElectionWritesPerHour is per manager, whatever the number of hosts.
	LeaderElectionWritesPerHour float64
}

func onboardingWrite(k apiKey) bool { return !isLeaderElection(k) }
func hostWrite(k apiKey) bool       { return !isLeaderElection(k) }
func hostObjectWrite(k apiKey) bool { return strings.HasPrefix(k.Resource, "anvilhosts") }

// perHour converts a count over the steady window into a rate per production hour.
func (r *Result) perHour() float64 {
	secs := r.Steady.Duration.Seconds() * r.Config.TimeScale
	if secs <= 0 {
		return 0
	}
	return 3600 / secs
}

// Summarize computes the headline numbers.
func (r *Result) Summarize() Summary {
	n := float64(r.Config.Hosts)
	ph := r.perHour()
	s := Summary{
		AllAvailable:                      r.Available == r.Config.Hosts,
		ToAvailable:                       r.ToAvailable,
		PeakRSSMiB:                        float64(r.Steady.Manager.HWMKiB) / 1024,
		WritesToAvailable:                 float64(r.Onboard.API.writes(onboardingWrite)) / n,
		SteadyWritesPerHostHour:           float64(r.Steady.API.writes(hostWrite)) / n * ph,
		SteadyHostObjectWritesPerHostHour: float64(r.Steady.API.writes(hostObjectWrite)) / n * ph,
		SteadyBMCRequestsPerHostHour:      float64(r.Steady.BMCRequests) / n * ph,
	}
	if r.Steady.Manager.HWMKiB == 0 {
		s.PeakRSSMiB = float64(r.Onboard.Manager.HWMKiB) / 1024
	}
	if d := r.Steady.Duration.Seconds(); d > 0 {
		s.LeaderElectionWritesPerHour = float64(r.Steady.API.writes(isLeaderElection)) * 3600 / d
	}
	return s
}

// targetCheck is one of the issue's targets against what a run measured.
type targetCheck struct {
	Name, Value, Target string
	Met                 bool
}

// targets are issue #3's four targets, in its order.
func (s Summary) targets() []targetCheck {
	return []targetCheck{
		{"wall time, first create → all Available", s.ToAvailable.Round(100 * time.Millisecond).String(),
			"all, ≤ " + targetToAvailable.String(), s.AllAvailable && s.ToAvailable <= targetToAvailable},
		{"controller peak RSS (VmHWM)", fmt.Sprintf("%.0f MiB", s.PeakRSSMiB), fmt.Sprintf("≤ %d MiB", targetRSSMiB), s.PeakRSSMiB <= targetRSSMiB},
		{"API writes per host to Available", fmt.Sprintf("%.2f", s.WritesToAvailable), fmt.Sprintf("≤ %d", targetWritesPerHost),
			s.WritesToAvailable <= targetWritesPerHost},
		{"API writes per host per hour, steady state", fmt.Sprintf("%.2f", s.SteadyWritesPerHostHour), fmt.Sprint(targetSteadyWritesPH),
			s.SteadyWritesPerHostHour <= targetSteadyWritesPH},
	}
}

func passFail(ok bool) string {
	if ok {
		return "PASS"
	}
	return "FAIL"
}

// Print writes the report: the headline table, then the detail behind each number.
func (r *Result) Print(w io.Writer) {
	cfg := r.Config
	s := r.Summarize()
	n := float64(cfg.Hosts)
	ph := r.perHour()
	transport := "plain HTTP (redfish+http://)"
	if cfg.TLS {
		transport = "HTTPS verified against a CA bundle Secret (redfish+https://)"
	}
	qps := "no client-side limit (QPS -1, what ctrl.GetConfigOrDie gives cmd/manager)"
	if cfg.QPS != 0 {
		qps = fmt.Sprintf("client-side QPS %g, burst %d", cfg.QPS, cfg.Burst)
	}
	fmt.Fprintf(w, "\nAnvil host benchmark: %d emulated Redfish BMCs, %s, %d cores\n", cfg.Hosts, transport, runtime.NumCPU())
	fmt.Fprintf(w, "manager: --anvilhost-concurrency %d --bmc-max-concurrency %d, %s, leader election %v\n",
		cfg.HostConcurrency, cfg.BMCConcurrency, qps, map[bool]string{true: "on", false: "off"}[cfg.LeaderElect])
	scale := func(d time.Duration) time.Duration { return time.Duration(float64(d) / cfg.TimeScale) }
	fmt.Fprintf(w, "time scale ×%g: power sync %s (production %s ± 10 %%, fixed per host), BMC session idle %s (production %s), BMC connection idle %s (production %s)\n",
		cfg.TimeScale, scale(defaultPowerSync), defaultPowerSync, scale(defaultBMCIdle), defaultBMCIdle, scale(defaultBMCConnIdle), defaultBMCConnIdle)
	fmt.Fprintf(w, "steady window %s wall = %s production time; per-hour figures = count / hosts × 3600 s / %s\n\n",
		r.Steady.Duration.Round(time.Second), time.Duration(float64(r.Steady.Duration)*cfg.TimeScale).Round(time.Second),
		time.Duration(float64(r.Steady.Duration)*cfg.TimeScale).Round(time.Second))

	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "METRIC\tVALUE\tTARGET (issue #3)\tRESULT")
	fmt.Fprintf(tw, "hosts Available\t%d/%d\tall\t%s\n", r.Available, cfg.Hosts, passFail(s.AllAvailable))
	targets := s.targets()
	for _, t := range targets {
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\n", t.Name, t.Value, t.Target, passFail(t.Met))
		if t.Name == "API writes per host per hour, steady state" {
			fmt.Fprintf(tw, "  of which AnvilHost writes\t%.2f\t%d\t%s\n", s.SteadyHostObjectWritesPerHostHour, targetSteadyWritesPH,
				passFail(s.SteadyHostObjectWritesPerHostHour <= targetSteadyWritesPH))
		}
	}
	fmt.Fprintf(tw, "BMC requests per host per hour, steady state\t%.1f\t—\tinfo\n", s.SteadyBMCRequestsPerHostHour)
	_ = tw.Flush()
	var missed []string
	for _, t := range targets {
		if !t.Met {
			missed = append(missed, t.Name)
		}
	}
	verdict := fmt.Sprintf("all %d met", len(targets))
	if len(missed) > 0 {
		verdict = fmt.Sprintf("%d of %d met; missed: %s", len(targets)-len(missed), len(targets), strings.Join(missed, "; "))
	}
	scope := ""
	if cfg.Hosts != issueHosts {
		scope = fmt.Sprintf(" (at %d hosts; the targets are set for %d)", cfg.Hosts, issueHosts)
	}
	fmt.Fprintf(w, "issue #3 targets%s: %s\n", scope, verdict)

	fmt.Fprintln(w, "\nTo Available (creation until all Available and the manager's writes settled):")
	fmt.Fprintf(w, "  hosts created in %s by %d workers; create → Available per host: p50 %s, p90 %s, p99 %s, max %s; %.1f hosts/s overall\n",
		r.CreateDuration.Round(10*time.Millisecond), cfg.CreateWorkers, pct(r.Latency, 50), pct(r.Latency, 90), pct(r.Latency, 99),
		pct(r.Latency, 100), n/max(r.ToAvailable.Seconds(), 1e-9))
	fmt.Fprintln(w, "  API writes per host, by request:")
	printWrites(w, r.Onboard.API.writeRows(onboardingWrite), n, 1, "")
	if le := r.Onboard.API.writes(isLeaderElection); le > 0 {
		fmt.Fprintf(w, "    (not counted: %d leader-election Lease renewals, per manager)\n", le)
	}
	fmt.Fprintf(w, "  API reads: %s\n", formatCounts(r.Onboard.API.reads(), 1))
	if len(r.CacheLag) > 0 {
		fmt.Fprintf(w, "  manager's cache behind the benchmark's watch, per host version (whole run): p50 %s, p90 %s, p99 %s, max %s\n",
			pct(r.CacheLag, 50), pct(r.CacheLag, 90), pct(r.CacheLag, 99), pct(r.CacheLag, 100))
	}
	fmt.Fprintf(w, "  reconciles per host: %s\n", formatFloats(r.Onboard.Reconciles, n))
	fmt.Fprintf(w, "  BMC operations per host (manager's view): %s\n", formatFloats(r.Onboard.BMCOps, n))
	fmt.Fprintf(w, "  BMC operation mean latency: %s; BMC time per host %.2fs (÷ --bmc-max-concurrency %d = %.1f hosts/s at most)\n",
		meanLatency(r.Onboard), sumFloats(r.Onboard.BMCOpSecs)/n, cfg.BMCConcurrency, float64(cfg.BMCConcurrency)*n/max(sumFloats(r.Onboard.BMCOpSecs), 1e-9))
	if len(r.Onboard.BMCErrors) > 0 {
		fmt.Fprintf(w, "  BMC operation errors (total): %s\n", formatFloats(r.Onboard.BMCErrors, 1))
	}
	fmt.Fprintf(w, "  BMC requests per host (emulator's view): %.1f (%s; fewest %d, most %d)\n",
		float64(r.Onboard.BMCRequests)/n, formatUints(r.Onboard.BMCByMethod, n), r.Onboard.BMCMinPerHost, r.Onboard.BMCMaxPer)
	printCPU(w, r.Onboard)
	fmt.Fprintf(w, "  manager memory: peak RSS during onboarding %.0f MiB (100 ms samples); heap in use %.0f MiB, goroutines %d at the end\n",
		float64(r.Onboard.PeakRSSKiB)/1024, float64(r.Onboard.Manager.HeapInuse)/(1<<20), r.Onboard.Manager.Goroutines)

	fmt.Fprintf(w, "\nSteady state (%s wall, ×%g):\n", r.Steady.Duration.Round(time.Second), cfg.TimeScale)
	fmt.Fprintln(w, "  API writes per host per hour, by request:")
	printWrites(w, r.Steady.API.writeRows(hostWrite), n, ph, "none")
	fmt.Fprintf(w, "  leader election: %.0f Lease writes per hour per manager (%.2f per host per hour at %d hosts; not counted above)\n",
		s.LeaderElectionWritesPerHour, s.LeaderElectionWritesPerHour/n, cfg.Hosts)
	fmt.Fprintf(w, "  AnvilHost changes seen by a watch: %d\n", r.Steady.HostUpdates)
	fmt.Fprintf(w, "  API reads per host per hour: %s\n", formatCounts(r.Steady.API.reads(), n/ph))
	fmt.Fprintf(w, "  reconciles per host per hour: %s\n", formatFloats(r.Steady.Reconciles, n/ph))
	fmt.Fprintf(w, "  BMC operations per host per hour: %s\n", formatFloats(r.Steady.BMCOps, n/ph))
	if len(r.Steady.BMCErrors) > 0 {
		fmt.Fprintf(w, "  BMC operation errors (total): %s\n", formatFloats(r.Steady.BMCErrors, 1))
	}
	fmt.Fprintf(w, "  BMC requests per host per hour: %.1f (%s); Redfish sessions open at the end: %d (%.2f per BMC)\n",
		s.SteadyBMCRequestsPerHostHour, formatUints(r.Steady.BMCByMethod, n/ph), r.BMCSessionsEnd, float64(r.BMCSessionsEnd)/n)
	printCPU(w, r.Steady)
	m := r.Steady.Manager
	fmt.Fprintf(w, "  manager memory: peak RSS in the window %.0f MiB, RSS at the end %.0f MiB, VmHWM %.0f MiB; Go heap in use %.0f MiB (%d objects), stacks %.0f MiB, Go runtime total %.0f MiB; goroutines %d; GCs %d\n",
		float64(r.Steady.PeakRSSKiB)/1024, float64(m.RSSKiB)/1024, float64(m.HWMKiB)/1024, float64(m.HeapInuse)/(1<<20), m.HeapObjects,
		float64(m.StackInuse)/(1<<20), float64(m.GoSys)/(1<<20), m.Goroutines, m.NumGC)
}

func meanLatency(p phase) string {
	keys := make([]string, 0, len(p.BMCOps))
	for k := range p.BMCOps {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	parts := make([]string, 0, len(keys))
	for _, k := range keys {
		if p.BMCOps[k] > 0 {
			parts = append(parts, fmt.Sprintf("%s %s", k, time.Duration(p.BMCOpSecs[k]/p.BMCOps[k]*float64(time.Second)).Round(time.Millisecond)))
		}
	}
	return strings.Join(parts, ", ")
}

func sumFloats(m map[string]float64) float64 {
	var t float64
	for _, v := range m {
		t += v
	}
	return t
}

func printWrites(w io.Writer, rows []writeRow, n, scale float64, none string) {
	if len(rows) == 0 {
		fmt.Fprintf(w, "    %s\n", none)
		return
	}
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', tabwriter.AlignRight)
	var total float64
	for _, r := range rows {
		v := float64(r.Count) / n * scale
		total += v
		note := ""
		if r.Failed > 0 {
			note = fmt.Sprintf("  (%d failed: %s)", r.Failed, strings.Join(r.FailedCodes, ","))
		}
		fmt.Fprintf(tw, "    %.2f\t  %s%s\n", v, r.Name, note)
	}
	fmt.Fprintf(tw, "    %.2f\t  total\n", total)
	_ = tw.Flush()
}

func printCPU(w io.Writer, p phase) {
	keys := make([]string, 0, len(p.CPU))
	var total float64
	for k, v := range p.CPU {
		if v > 0 {
			keys = append(keys, k)
			total += v
		}
	}
	sort.Slice(keys, func(i, j int) bool { return p.CPU[keys[i]] > p.CPU[keys[j]] })
	parts := make([]string, 0, len(keys))
	for _, k := range keys {
		parts = append(parts, fmt.Sprintf("%s %.1f", k, p.CPU[k]))
	}
	secs := p.Duration.Seconds()
	capacity := max(secs*float64(runtime.NumCPU()), 1e-9)
	fmt.Fprintf(w, "  CPU seconds over %s (%.0f available): %s; benchmark total %.1f (%.0f%% of %d cores); whole machine %.0f%% busy (other work: %.1f s)\n",
		p.Duration.Round(100*time.Millisecond), capacity, strings.Join(parts, ", "), total,
		100*total/capacity, runtime.NumCPU(), 100*p.MachineBusy/capacity, max(p.MachineBusy-total, 0))
}

func pct(sorted []time.Duration, p int) time.Duration {
	if len(sorted) == 0 {
		return 0
	}
	i := (len(sorted)*p + 99) / 100
	i = min(max(i-1, 0), len(sorted)-1)
	return sorted[i].Round(10 * time.Millisecond)
}

func formatFloats(m map[string]float64, div float64) string {
	if len(m) == 0 {
		return "none"
	}
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	parts := make([]string, 0, len(keys))
	for _, k := range keys {
		parts = append(parts, fmt.Sprintf("%s %.2f", k, m[k]/div))
	}
	return strings.Join(parts, ", ")
}

func formatCounts(m map[string]int64, div float64) string {
	f := map[string]float64{}
	for k, v := range m {
		f[k] = float64(v)
	}
	return formatFloats(f, div)
}

func formatUints(m map[string]uint64, div float64) string {
	f := map[string]float64{}
	for k, v := range m {
		if v > 0 {
			f[k] = float64(v)
		}
	}
	return formatFloats(f, div)
}
