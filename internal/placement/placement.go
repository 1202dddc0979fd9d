// Package placement chooses a host for a machine: hard filters (state, labels, hardware,
// failure domain), then the best fit (the smallest host that satisfies the request, so big
// hosts stay free for big requests), then the name, so the choice is deterministic. Every
// rejection is counted so a waiting machine can say exactly why nothing matched.
package placement

import (
	"fmt"
	"sort"
	"strings"

	"k8s.io/apimachinery/pkg/labels"

	infrav1 "github.com/anvil-metal/cluster-api-provider-anvil/api/v1alpha1"
	"github.com/anvil-metal/cluster-api-provider-anvil/internal/hoststate"
)

// Request is what a machine asks for.
type Request struct {
	// Selector filters by label; nil or empty matches every host.
	Selector labels.Selector
	// Hardware minimums; nil means none.
	Hardware *infrav1.HardwareRequirements
	// FailureDomain, when set, is a hard constraint: only hosts whose FailureDomainLabel has
	// this value qualify.
	FailureDomain      string
	FailureDomainLabel string
	// SpreadCluster, when FailureDomain is empty, spreads the cluster's machines: among the
	// hosts that fit, those in the failure domain holding the fewest hosts claimed for this
	// cluster come first (a MachineDeployment without failure domains then still survives
	// the loss of one zone). It is a preference, never a reason to refuse a host.
	SpreadCluster string
	// ClusterLoad, when set, is how many hosts per failure domain SpreadCluster holds, counted
	// by the caller (which then need pass only the hosts it may choose from); otherwise the
	// claims among hosts are counted.
	ClusterLoad map[string]int
	// Claimed, when set, reports hosts that are taken though their objects do not show it
	// yet (the caller is claiming them, or its cache lags behind its own claim).
	Claimed func(*infrav1.AnvilHost) bool
}

// Rejection reasons, worded to complete "N hosts …".
const (
	reasonNotAvailable  = "are not Available"
	reasonClaimed       = "are claimed by other machines"
	reasonMaintenance   = "are in maintenance"
	reasonRetired       = "are retired or retiring"
	reasonDeleting      = "are being deleted"
	reasonSelector      = "do not match the host selector"
	reasonFailureDomain = "are in other failure domains"
	reasonArch          = "have another architecture"
	reasonGPUs          = "have too few matching GPUs"
)

// Result is the chosen host (nil when none fits) and why the others were passed over.
type Result struct {
	Host     *infrav1.AnvilHost
	Total    int
	Rejected map[string]int
}

// Explain renders e.g. "0 of 12 hosts match: 7 are in other failure domains, 5 have fewer
// than 64 cores".
func (r Result) Explain() string {
	if r.Host != nil {
		return fmt.Sprintf("chose host %s (%d candidates)", r.Host.Name, r.Total)
	}
	if r.Total == 0 {
		return "0 hosts in this namespace: create AnvilHosts for the machines"
	}
	reasons := make([]string, 0, len(r.Rejected))
	for reason := range r.Rejected {
		reasons = append(reasons, reason)
	}
	// Largest group first; ties by text, so the message is stable and status isn't rewritten.
	sort.Slice(reasons, func(i, j int) bool {
		if r.Rejected[reasons[i]] != r.Rejected[reasons[j]] {
			return r.Rejected[reasons[i]] > r.Rejected[reasons[j]]
		}
		return reasons[i] < reasons[j]
	})
	parts := make([]string, 0, len(reasons))
	for _, reason := range reasons {
		parts = append(parts, fmt.Sprintf("%d %s", r.Rejected[reason], reason))
	}
	return fmt.Sprintf("0 of %d hosts match: %s", r.Total, strings.Join(parts, ", "))
}

// Choose picks the best host for req among hosts (which it does not modify): one pass, so
// that a claim costs time linear in the fleet.
func Choose(hosts []infrav1.AnvilHost, req Request) Result {
	res := Result{Total: len(hosts), Rejected: map[string]int{}}
	load := clusterLoad(hosts, req)
	var best *infrav1.AnvilHost
	var bestKey [3]int64
	bestLoad := 0
	for i := range hosts {
		h := &hosts[i]
		if reason := reject(h, req); reason != "" {
			res.Rejected[reason]++
			continue
		}
		key, l := sizeKey(h), load[h.Labels[failureDomainLabel(req)]]
		if best == nil || l < bestLoad || l == bestLoad && lessKey(key, h.Name, bestKey, best.Name) {
			best, bestKey, bestLoad = h, key, l
		}
	}
	res.Host = best
	return res
}

// Claimable reports whether h could be claimed by any machine that asks for nothing in
// particular: Available, unclaimed, not in maintenance, retired or being deleted.
func Claimable(h *infrav1.AnvilHost) bool { return reject(h, Request{}) == "" }

// clusterLoad counts, per failure domain, the hosts claimed for req.SpreadCluster (nil when
// not spreading); see ClusterLoad.
func clusterLoad(hosts []infrav1.AnvilHost, req Request) map[string]int {
	if req.SpreadCluster == "" || req.FailureDomain != "" {
		return nil
	}
	if req.ClusterLoad != nil {
		return req.ClusterLoad
	}
	load := map[string]int{}
	for i := range hosts {
		if c := hosts[i].Spec.Claim; c != nil && !c.Released && c.ClusterName == req.SpreadCluster {
			load[hosts[i].Labels[failureDomainLabel(req)]]++
		}
	}
	return load
}

// Eligible reports whether h could be claimed for req, and if not why.
func Eligible(h *infrav1.AnvilHost, req Request) (bool, string) {
	reason := reject(h, req)
	return reason == "", reason
}

func reject(h *infrav1.AnvilHost, req Request) string {
	switch {
	case !h.DeletionTimestamp.IsZero():
		return reasonDeleting
	case h.Spec.Retire || h.Status.State == infrav1.HostStateRetired || h.Status.State == infrav1.HostStateRetiring:
		return reasonRetired
	case h.Spec.Maintenance != nil:
		return reasonMaintenance
	case h.Spec.Claim != nil, req.Claimed != nil && req.Claimed(h):
		return reasonClaimed
	case h.Status.State != infrav1.HostStateAvailable:
		return reasonNotAvailable
	case req.Selector != nil && !req.Selector.Matches(labels.Set(h.Labels)):
		return reasonSelector
	case req.FailureDomain != "" && h.Labels[failureDomainLabel(req)] != req.FailureDomain:
		return reasonFailureDomain
	}
	return rejectHardware(h.Status.Hardware, req.Hardware)
}

func rejectHardware(inv *infrav1.HardwareInventory, want *infrav1.HardwareRequirements) string {
	if want == nil {
		return ""
	}
	if inv == nil {
		inv = &infrav1.HardwareInventory{}
	}
	switch {
	case want.Architecture != "" && inv.CPU.Arch != want.Architecture:
		return reasonArch
	case want.MinCPUCores > 0 && inv.CPU.Cores < want.MinCPUCores:
		return fmt.Sprintf("have fewer than %d cores", want.MinCPUCores)
	case want.MinMemoryGiB > 0 && hoststate.MemoryGiB(inv.Memory) < int64(want.MinMemoryGiB):
		return fmt.Sprintf("have less than %d GiB of memory", want.MinMemoryGiB)
	case want.MinGPUs > 0 && gpuCount(inv, want.GPUModel) < int(want.MinGPUs):
		return reasonGPUs
	}
	return ""
}

func gpuCount(inv *infrav1.HardwareInventory, model string) int {
	n := 0
	for _, a := range inv.Accelerators {
		if a.Class == "GPU" && (model == "" || strings.Contains(strings.ToLower(a.Model), strings.ToLower(model))) {
			n++
		}
	}
	return n
}

// lessKey orders hosts smallest first (cores, then memory, then GPUs), then by name.
func lessKey(ka [3]int64, a string, kb [3]int64, b string) bool {
	for i := range ka {
		if ka[i] != kb[i] {
			return ka[i] < kb[i]
		}
	}
	return a < b
}

func sizeKey(h *infrav1.AnvilHost) [3]int64 {
	inv := h.Status.Hardware
	if inv == nil {
		return [3]int64{}
	}
	return [3]int64{int64(inv.CPU.Cores), hoststate.MemoryGiB(inv.Memory), int64(gpuCount(inv, ""))}
}

func failureDomainLabel(req Request) string {
	if req.FailureDomainLabel != "" {
		return req.FailureDomainLabel
	}
	return infrav1.DefaultFailureDomainLabel
}

// ClusterLoad counts, per value of label, the hosts whose live claim is cluster's: what
// Request.ClusterLoad wants, from the hosts a cluster holds.
func ClusterLoad(hosts []infrav1.AnvilHost, label, cluster string) map[string]int {
	load := map[string]int{}
	for i := range hosts {
		if c := hosts[i].Spec.Claim; c != nil && !c.Released && c.ClusterName == cluster {
			load[hosts[i].Labels[label]]++
		}
	}
	return load
}
