package main

import (
	"fmt"
	"io"
	"runtime"
	"sort"
	"strings"
	"time"
)

// Targets from the issue.
const (
	targetProvisioned = 5 * time.Minute
	targetRSSMiB      = 512
	targetWrites      = 15.0
)

// Passed reports whether every target was met. The time target applies to provisioning
// the machines on hosts that are Available; onboarding the hosts is bench-hosts' measure
// and is shown beside it.
func (r *Result) Passed() bool {
	return r.Provisioned <= targetProvisioned && r.PeakRSSKiB>>10 <= targetRSSMiB && r.WritesPerHost() <= targetWrites && len(r.Problems) == 0
}

// Print writes the report.
func (r *Result) Print(w io.Writer) {
	cfg := r.Config
	verdict := func(ok bool) string {
		if ok {
			return "PASS"
		}
		return "FAIL"
	}
	round := func(d time.Duration) time.Duration { return d.Round(100 * time.Millisecond) }
	fmt.Fprintf(w, "\n%d AnvilHosts and %d AnvilMachines (%d clusters, 3 failure domains), emulated Redfish BMCs (%s), cmd/manager --provisioner=simulated\n",
		cfg.Hosts, cfg.Machines, cfg.Clusters, map[bool]string{true: "HTTPS", false: "HTTP"}[cfg.TLS])
	fmt.Fprintf(w, "  %-50s %9s   target ≤ %-7s %s\n", "time until all machines are provisioned", round(r.Provisioned), targetProvisioned, verdict(r.Provisioned <= targetProvisioned))
	fmt.Fprintf(w, "  %-50s %9s\n", "  (from the first AnvilMachine created, including", "")
	fmt.Fprintf(w, "  %-50s %9s\n", "  creating the rest: hosts Available, Machines exist)", "")
	fmt.Fprintf(w, "  %-50s %9s\n", "  benchmark creating the AnvilMachines", round(r.CreateMachines))
	fmt.Fprintf(w, "  %-50s %9s\n", "  before: creating Clusters and Machines", round(r.CreateOwners))
	fmt.Fprintf(w, "  %-50s %9s\n", "  hosts created → every host Available", round(r.HostsAvailable))
	fmt.Fprintf(w, "  %-50s %9s\n", "  end to end (hosts created → all provisioned)", round(r.EndToEnd))
	fmt.Fprintf(w, "  %-50s %6d MiB   target ≤ %d MiB %s\n", "controller peak RSS (VmHWM, whole run)", r.PeakRSSKiB>>10, targetRSSMiB, verdict(r.PeakRSSKiB>>10 <= targetRSSMiB))
	if len(r.ManagerEnv) > 0 {
		fmt.Fprintf(w, "  %-50s %s\n", "  (environment as config/manager deploys it:", strings.Join(r.ManagerEnv, " ")+")")
	}
	fmt.Fprintf(w, "  %-50s %9.1f   target ≤ %.0f      %s\n", "API writes per host, end to end", r.WritesPerHost(), targetWrites, verdict(r.WritesPerHost() <= targetWrites))
	fmt.Fprintf(w, "  %-50s %9.1f\n", "  onboarding (host created → Available)", float64(r.Onboard.writes())/float64(cfg.Hosts))
	fmt.Fprintf(w, "  %-50s %9.1f\n", "  provisioning (machine created → provisioned)", float64(r.Provision.writes())/float64(cfg.Hosts))
	if len(r.Problems) > 0 {
		fmt.Fprintf(w, "  claims checked: FAIL\n    %s\n", strings.Join(r.Problems, "\n    "))
	} else {
		fmt.Fprintf(w, "  claims checked: every machine holds one host in its failure domain, no host held twice\n")
	}
	if n := len(r.Latencies); n > 0 {
		pct := func(p float64) time.Duration {
			return r.Latencies[min(n-1, int(float64(n)*p))].Round(100 * time.Millisecond)
		}
		fmt.Fprintf(w, "  machine created → provisioned: p50 %s, p90 %s, max %s; %.0f machines/min\n", pct(0.5), pct(0.9), r.Latencies[n-1].Round(100*time.Millisecond),
			float64(cfg.Machines)/r.Provisioned.Minutes())
	}
	fmt.Fprintf(w, "  writes by request (per host), onboarding | provisioning (mean time in the API server):\n")
	rows := map[string][2]float64{}
	var names []string
	for i, c := range []apiCounts{r.Onboard, r.Provision} {
		for _, row := range c.writeRows() {
			v, ok := rows[row.Name]
			if !ok {
				names = append(names, row.Name)
			}
			v[i] = float64(row.Count) / float64(cfg.Hosts)
			rows[row.Name] = v
		}
	}
	sort.Slice(names, func(i, j int) bool { return rows[names[i]][0]+rows[names[i]][1] > rows[names[j]][0]+rows[names[j]][1] })
	for _, n := range names {
		fmt.Fprintf(w, "    %-44s %5.2f | %5.2f   (mean %s)\n", n, rows[n][0], rows[n][1], r.WriteLatency[n].Round(100*time.Microsecond))
	}
	fmt.Fprintf(w, "  refused writes (conflicts): %d onboarding, %d provisioning; reads (GET/LIST): %d, %d\n",
		r.Onboard.failedWrites(), r.Provision.failedWrites(), r.Onboard.reads(), r.Provision.reads())
	var procs []string
	for p := range r.CPU {
		procs = append(procs, p)
	}
	sort.Slice(procs, func(i, j int) bool { return r.CPU[procs[i]] > r.CPU[procs[j]] })
	var ours float64
	for _, p := range procs {
		ours += r.CPU[p]
	}
	fmt.Fprintf(w, "  CPU seconds over %s (%d cores = %.0f s):", r.EndToEnd.Round(time.Second), runtime.NumCPU(), float64(runtime.NumCPU())*r.EndToEnd.Seconds())
	for _, p := range procs {
		fmt.Fprintf(w, " %s %.0f;", p, r.CPU[p])
	}
	fmt.Fprintf(w, " other work on the machine %.0f\n", max(0, r.MachineBusy-ours))
	if api, ok := r.WindowCPU["kube-apiserver"]; ok && r.WindowWrites > 0 && r.Provisioned > 0 {
		var win float64
		for _, v := range r.WindowCPU {
			win += v
		}
		fmt.Fprintf(w, "  provisioning window (%s, %.0f CPU s): kube-apiserver %.0f s for %d writes (%.1f ms each, watches and reads included), %.0f writes/s;",
			r.Provisioned.Round(time.Second), float64(runtime.NumCPU())*r.Provisioned.Seconds(), api, r.WindowWrites, 1000*api/float64(r.WindowWrites),
			float64(r.WindowWrites)/r.Provisioned.Seconds())
		for _, p := range procs {
			if p != "kube-apiserver" {
				fmt.Fprintf(w, " %s %.0f s;", p, r.WindowCPU[p])
			}
		}
		fmt.Fprintf(w, " other work on the machine %.0f s\n", max(0, r.WindowMachineBusy-win))
	}
	if r.HostBytes > 0 {
		fmt.Fprintf(w, "  stored objects (JSON, mean): AnvilHost %.1f KiB (managedFields %.1f KiB), AnvilMachine %.1f KiB (managedFields %.1f KiB)\n",
			float64(r.HostBytes)/1024, float64(r.HostManagedFieldsBytes)/1024, float64(r.MachineBytes)/1024, float64(r.MachineManagedFieldsBytes)/1024)
	}
	if r.Load != "" {
		fmt.Fprintf(w, "  load average at the end: %s\n", r.Load)
	}
	if len(procs) > 0 {
		fmt.Fprintf(w, "  largest CPU user: %s (%.0f%% of this run's CPU); writes took %s on average in the API server\n",
			procs[0], 100*r.CPU[procs[0]]/max(ours, 1), r.meanWriteLatency().Round(time.Millisecond))
	}
}

// meanWriteLatency averages the write latencies over all writes.
func (r *Result) meanWriteLatency() time.Duration {
	var total time.Duration
	var n int64
	for _, c := range []apiCounts{r.Onboard, r.Provision} {
		for _, row := range c.writeRows() {
			total += r.WriteLatency[row.Name] * time.Duration(row.Count)
			n += row.Count
		}
	}
	if n == 0 {
		return 0
	}
	return total / time.Duration(n)
}
