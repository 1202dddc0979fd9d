package placement

import (
	"fmt"
	"math/rand/v2"
	"testing"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/types"

	infrav1 "github.com/anvil-metal/cluster-api-provider-anvil/api/v1alpha1"
)

// randomHost is a host in one of three zones and two racks, of one of four sizes, in any
// state a fleet holds: mostly Available, some claimed, in maintenance, retired or deleting.
func randomHost(rng *rand.Rand, namespace string, i int) *infrav1.AnvilHost {
	sizes := []struct {
		cores int32
		mem   int64
		gpus  int
	}{{16, 64, 0}, {32, 128, 0}, {64, 256, 0}, {64, 512, 2}}
	s := sizes[rng.IntN(len(sizes))]
	h := host(fmt.Sprintf("h-%02d", i), fmt.Sprintf("zone-%c", 'a'+rng.IntN(3)), s.cores, s.mem, s.gpus)
	h.Namespace = namespace
	h.ResourceVersion = fmt.Sprint(rng.IntN(1000))
	h.Labels["rack"] = fmt.Sprintf("r%d", rng.IntN(2))
	switch rng.IntN(10) {
	case 0:
		h.Spec.Claim = &infrav1.HostClaim{ClusterName: "c"}
	case 1:
		h.Spec.Maintenance = &infrav1.Maintenance{}
	case 2:
		h.Status.State = infrav1.HostStateProvisioning
	case 3:
		h.DeletionTimestamp = &metav1.Time{}
	}
	return &h
}

// TestPoolChoosesWhatChooseChooses: whatever the fleet and the request, the pool's walk picks
// the host Choose picks among the claimable hosts, as hosts come, change and go.
func TestPoolChoosesWhatChooseChooses(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	var pool Pool
	current := map[types.NamespacedName]*infrav1.AnvilHost{}
	rackB := labels.SelectorFromSet(labels.Set{"rack": "r1"})
	requests := []Request{
		{},
		{FailureDomain: "zone-b"},
		{Selector: rackB},
		{Hardware: &infrav1.HardwareRequirements{MinCPUCores: 40}},
		{Hardware: &infrav1.HardwareRequirements{MinGPUs: 1}, FailureDomain: "zone-c"},
		{SpreadCluster: "c", ClusterLoad: map[string]int{"zone-a": 2, "zone-b": 1}},
		{SpreadCluster: "c", ClusterLoad: map[string]int{"zone-a": 2, "zone-b": 1, "zone-c": 3}},
		{SpreadCluster: "c", ClusterLoad: map[string]int{"zone-a": 1, "zone-b": 1, "zone-c": 1}, Selector: rackB},
		{Claimed: func(h *infrav1.AnvilHost) bool { return h.Name[len(h.Name)-1]%2 == 0 }},
	}
	for round := range 400 {
		// A host arrives, changes (a new object, as the informer hands out) or goes.
		i := rng.IntN(60)
		h := randomHost(rng, []string{"ns1", "ns2"}[i%2], i)
		key := types.NamespacedName{Namespace: h.Namespace, Name: h.Name}
		if _, ok := current[key]; ok && rng.IntN(4) == 0 {
			pool.Delete(key)
			delete(current, key)
		} else {
			pool.Set(h)
			current[key] = h
		}
		for _, ns := range []string{"ns1", "ns2"} {
			var claimable []infrav1.AnvilHost
			for k, h := range current {
				if k.Namespace == ns && Claimable(h) {
					claimable = append(claimable, *h)
				}
				if rv, got := pool.Version(k); got != Claimable(h) || got && rv != h.ResourceVersion {
					t.Fatalf("round %d: pool has %s = %v (version %q), want %v (version %q)", round, k, got, rv, Claimable(h), h.ResourceVersion)
				}
			}
			for ri, req := range requests {
				want, got := Choose(claimable, req), pool.Choose(ns, req)
				if name(want.Host) != name(got.Host) {
					t.Fatalf("round %d, request %d, %s: pool chose %q, Choose %q among %d claimable", round, ri, ns, name(got.Host), name(want.Host), len(claimable))
				}
			}
		}
	}
}

// TestPoolFollowsHostChanges: a host that is claimed, or whose hardware changes, moves out
// of the pool or to its new place at once.
func TestPoolFollowsHostChanges(t *testing.T) {
	var pool Pool
	small, big := host("small", "z", 16, 64, 0), host("big", "z", 64, 256, 0)
	pool.Set(&small)
	pool.Set(&big)
	if got := name(pool.Choose("", Request{}).Host); got != "small" {
		t.Fatalf("chose %q, want small", got)
	}
	claimed := small
	claimed.Spec.Claim = &infrav1.HostClaim{ClusterName: "c"}
	pool.Set(&claimed)
	if got := name(pool.Choose("", Request{}).Host); got != "big" {
		t.Fatalf("chose %q after small was claimed, want big", got)
	}
	// Re-inspected with more cores than big: still claimable, now ordered after it.
	grown := host("small", "z", 128, 64, 0)
	pool.Set(&grown)
	if got := name(pool.Choose("", Request{}).Host); got != "big" {
		t.Fatalf("chose %q, want big (smaller than the re-inspected host)", got)
	}
	pool.Delete(types.NamespacedName{Name: "big"})
	if got := name(pool.Choose("", Request{}).Host); got != "small" {
		t.Fatalf("chose %q once big was deleted, want small", got)
	}
	if _, ok := pool.Version(types.NamespacedName{Name: "big"}); ok || pool.Choose("other", Request{}).Host != nil {
		t.Fatal("a deleted host, or another namespace, still offers a host")
	}
}

func name(h *infrav1.AnvilHost) string {
	if h == nil {
		return ""
	}
	return h.Name
}

// BenchmarkPoolChoose5000 is one claim's choice from a pool of 5,000 claimable hosts in
// three zones, against Choose over the same hosts (the listing the pool replaced).
func BenchmarkPoolChoose5000(b *testing.B) {
	var pool Pool
	hosts := make([]infrav1.AnvilHost, 5000)
	for i := range hosts {
		hosts[i] = host(fmt.Sprintf("h-%05d", i), fmt.Sprintf("zone-%c", 'a'+i%3), 32, 128, 0)
		pool.Set(&hosts[i])
	}
	req := Request{FailureDomain: "zone-c"}
	b.Run("pool", func(b *testing.B) {
		for b.Loop() {
			if pool.Choose("", req).Host == nil {
				b.Fatal("no host")
			}
		}
	})
	b.Run("choose", func(b *testing.B) {
		for b.Loop() {
			if Choose(hosts, req).Host == nil {
				b.Fatal("no host")
			}
		}
	})
}
