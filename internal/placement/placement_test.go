package placement

import (
	"strings"
	"testing"

	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"

	infrav1 "github.com/anvil-metal/cluster-api-provider-anvil/api/v1alpha1"
)

func host(name, zone string, cores int32, memGiB int64, gpus int) infrav1.AnvilHost {
	h := infrav1.AnvilHost{
		ObjectMeta: metav1.ObjectMeta{Name: name, Labels: map[string]string{infrav1.DefaultFailureDomainLabel: zone, "rack": "r1"}},
		Status: infrav1.AnvilHostStatus{State: infrav1.HostStateAvailable, Hardware: &infrav1.HardwareInventory{
			CPU: infrav1.CPUInfo{Arch: "amd64", Cores: cores}, Memory: resource.NewQuantity(memGiB<<30, resource.BinarySI)}},
	}
	for range gpus {
		h.Status.Hardware.Accelerators = append(h.Status.Hardware.Accelerators, infrav1.Accelerator{Class: "GPU", Model: "NVIDIA H100"})
	}
	return h
}

func TestChooseBestFitThenName(t *testing.T) {
	hosts := []infrav1.AnvilHost{host("c-big", "a", 128, 1024, 0), host("b-small", "a", 32, 128, 0), host("a-small", "a", 32, 128, 0), host("mid", "a", 64, 256, 0)}
	r := Choose(hosts, Request{Hardware: &infrav1.HardwareRequirements{MinCPUCores: 16}})
	if r.Host == nil || r.Host.Name != "a-small" {
		t.Fatalf("chose %v, want the smallest fitting host, ties broken by name (a-small)", r.Host)
	}
	r = Choose(hosts, Request{Hardware: &infrav1.HardwareRequirements{MinCPUCores: 48}})
	if r.Host == nil || r.Host.Name != "mid" {
		t.Fatalf("chose %v, want mid", r.Host)
	}
}

func TestFailureDomainIsHard(t *testing.T) {
	hosts := []infrav1.AnvilHost{host("a1", "zone-a", 32, 128, 0), host("b1", "zone-b", 32, 128, 0)}
	r := Choose(hosts, Request{FailureDomain: "zone-b"})
	if r.Host == nil || r.Host.Name != "b1" {
		t.Fatalf("chose %v, want b1", r.Host)
	}
	r = Choose(hosts, Request{FailureDomain: "zone-c"})
	if r.Host != nil {
		t.Fatalf("chose %s outside the requested failure domain", r.Host.Name)
	}
	if got := r.Explain(); got != "0 of 2 hosts match: 2 are in other failure domains" {
		t.Errorf("explanation %q", got)
	}
}

func TestExplainCountsEveryReason(t *testing.T) {
	var hosts []infrav1.AnvilHost
	for i := range 7 {
		hosts = append(hosts, host("other-zone-"+string(rune('a'+i)), "zone-b", 128, 512, 0))
	}
	for i := range 5 {
		hosts = append(hosts, host("small-"+string(rune('a'+i)), "zone-a", 32, 512, 0))
	}
	claimed := host("claimed", "zone-a", 128, 512, 0)
	claimed.Spec.Claim = &infrav1.HostClaim{}
	maint := host("maint", "zone-a", 128, 512, 0)
	maint.Spec.Maintenance = &infrav1.Maintenance{Reason: "x"}
	retired := host("retired", "zone-a", 128, 512, 0)
	retired.Status.State = infrav1.HostStateRetired
	inspecting := host("inspecting", "zone-a", 128, 512, 0)
	inspecting.Status.State = infrav1.HostStateInspecting
	hosts = append(hosts, claimed, maint, retired, inspecting)

	r := Choose(hosts, Request{FailureDomain: "zone-a", Hardware: &infrav1.HardwareRequirements{MinCPUCores: 64}})
	if r.Host != nil {
		t.Fatalf("chose %s", r.Host.Name)
	}
	want := "0 of 16 hosts match: 7 are in other failure domains, 5 have fewer than 64 cores, 1 are claimed by other machines, 1 are in maintenance, 1 are not Available, 1 are retired or retiring"
	if got := r.Explain(); got != want {
		t.Errorf("explanation\n got %q\nwant %q", got, want)
	}
}

func TestSelectorAndHardware(t *testing.T) {
	gpu := host("gpu", "a", 64, 512, 2)
	arm := host("arm", "a", 64, 512, 0)
	arm.Status.Hardware.CPU.Arch = "arm64"
	plain := host("plain", "a", 64, 512, 0)
	plain.Labels["rack"] = "r2"
	hosts := []infrav1.AnvilHost{gpu, arm, plain}

	sel, _ := labels.Parse("rack=r2")
	if r := Choose(hosts, Request{Selector: sel}); r.Host == nil || r.Host.Name != "plain" {
		t.Errorf("selector: chose %v", r.Host)
	}
	if r := Choose(hosts, Request{Hardware: &infrav1.HardwareRequirements{MinGPUs: 2, GPUModel: "h100"}}); r.Host == nil || r.Host.Name != "gpu" {
		t.Errorf("GPUs: chose %v", r.Host)
	}
	if r := Choose(hosts, Request{Hardware: &infrav1.HardwareRequirements{MinGPUs: 1, GPUModel: "A100"}}); r.Host != nil {
		t.Errorf("GPU model mismatch still chose %s", r.Host.Name)
	}
	if r := Choose(hosts, Request{Hardware: &infrav1.HardwareRequirements{Architecture: "arm64"}}); r.Host == nil || r.Host.Name != "arm" {
		t.Errorf("arch: chose %v", r.Host)
	}
	if r := Choose(hosts, Request{Hardware: &infrav1.HardwareRequirements{MinMemoryGiB: 1024}}); r.Host != nil || !strings.Contains(r.Explain(), "less than 1024 GiB") {
		t.Errorf("memory: %v %s", r.Host, r.Explain())
	}
}

func TestSpreadClusterOverFailureDomains(t *testing.T) {
	claimed := func(h infrav1.AnvilHost, cluster string) infrav1.AnvilHost {
		h.Spec.Claim = &infrav1.HostClaim{MachineRef: infrav1.MachineReference{Name: "m-" + h.Name}, ClusterName: cluster}
		return h
	}
	hosts := []infrav1.AnvilHost{
		claimed(host("a1", "zone-a", 32, 128, 0), "prod"), claimed(host("b1", "zone-b", 32, 128, 0), "prod"),
		claimed(host("c1", "zone-c", 32, 128, 0), "other"),
		host("a2", "zone-a", 16, 64, 0), host("b2", "zone-b", 16, 64, 0), host("c2", "zone-c", 64, 256, 0),
	}
	// zone-c holds none of prod's hosts: its (bigger) host wins over the best fits elsewhere.
	if r := Choose(hosts, Request{SpreadCluster: "prod"}); r.Host == nil || r.Host.Name != "c2" {
		t.Fatalf("spreading prod chose %v, want c2 (the only zone without a prod host)", r.Host)
	}
	// Without spreading, best fit then name.
	if r := Choose(hosts, Request{}); r.Host == nil || r.Host.Name != "a2" {
		t.Fatalf("chose %v, want a2", r.Host)
	}
	// A released claim no longer counts, and a failure domain turns spreading off.
	hosts[0].Spec.Claim.Released, hosts[1].Spec.Claim.Released = true, true
	if r := Choose(hosts, Request{SpreadCluster: "prod"}); r.Host == nil || r.Host.Name != "a2" {
		t.Fatalf("chose %v, want a2 once prod holds nothing", r.Host)
	}
	if r := Choose(hosts, Request{SpreadCluster: "other", FailureDomain: "zone-c"}); r.Host == nil || r.Host.Name != "c2" {
		t.Fatalf("chose %v, want c2", r.Host)
	}

	// A caller that passes only the hosts it may claim counts the cluster's hosts itself.
	hosts[0].Spec.Claim.Released, hosts[1].Spec.Claim.Released = false, false
	load := ClusterLoad(hosts, infrav1.DefaultFailureDomainLabel, "prod")
	if load["zone-a"] != 1 || load["zone-b"] != 1 || load["zone-c"] != 0 {
		t.Fatalf("ClusterLoad %v", load)
	}
	if r := Choose(hosts[3:], Request{SpreadCluster: "prod", ClusterLoad: load}); r.Host == nil || r.Host.Name != "c2" {
		t.Fatalf("spreading over claimable hosts only chose %v, want c2", r.Host)
	}
}

// TestHostsBeingClaimedCountAsClaimed: a host the caller is claiming right now (its object
// does not show it yet) is passed over as claimed, and the next best is chosen.
func TestHostsBeingClaimedCountAsClaimed(t *testing.T) {
	hosts := []infrav1.AnvilHost{host("a", "z", 32, 128, 0), host("b", "z", 32, 128, 0)}
	r := Choose(hosts, Request{Claimed: func(h *infrav1.AnvilHost) bool { return h.Name == "a" }})
	if r.Host == nil || r.Host.Name != "b" {
		t.Fatalf("chose %v, want b (a is being claimed)", r.Host)
	}
	r = Choose(hosts, Request{Claimed: func(*infrav1.AnvilHost) bool { return true }})
	if r.Host != nil || r.Explain() != "0 of 2 hosts match: 2 are claimed by other machines" {
		t.Fatalf("chose %v: %s", r.Host, r.Explain())
	}
}

// BenchmarkChoose5000 is one claim's choice in a fleet of 5,000 hosts.
func BenchmarkChoose5000(b *testing.B) {
	hosts := make([]infrav1.AnvilHost, 5000)
	for i := range hosts {
		hosts[i] = host("h-"+strings.Repeat("x", i%7)+string(rune('a'+i%26)), []string{"a", "b", "c"}[i%3], int32(32+i%4*16), int64(128<<(i%3)), 0)
	}
	req := Request{FailureDomain: "b", Hardware: &infrav1.HardwareRequirements{MinCPUCores: 48}}
	for b.Loop() {
		if Choose(hosts, req).Host == nil {
			b.Fatal("nothing chosen")
		}
	}
}
