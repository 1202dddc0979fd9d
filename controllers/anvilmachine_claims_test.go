package controllers

import (
	"maps"
	"testing"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"

	infrav1 "github.com/anvil-metal/cluster-api-provider-anvil/api/v1alpha1"
)

func TestClaimLedger(t *testing.T) {
	var l claimLedger
	h1 := types.NamespacedName{Namespace: "ns", Name: "h1"}
	if !l.reserve(h1, "m1") {
		t.Fatal("first reservation refused")
	}
	if l.reserve(h1, "m2") {
		t.Error("a host being claimed by m1 was reserved for m2 too")
	}
	if !l.reserve(h1, "m1") {
		t.Error("the same machine retrying its claim was refused")
	}
	if _, ok := l.snapshot()[h1]; !ok {
		t.Error("the snapshot misses a host being claimed")
	}

	// A failed claim frees the host at once.
	l.release(h1)
	if !l.reserve(h1, "m2") {
		t.Error("a released host could not be reserved")
	}

	// While the cache still shows the host claimable, the ledger holds it; once the cache
	// shows the claim, it lets go (the host is claimed in its object).
	l.settled(l.snapshot(), func(types.NamespacedName) bool { return true })
	if _, ok := l.snapshot()[h1]; !ok {
		t.Error("the ledger let go of a claim the cache does not show yet")
	}
	l.settled(l.snapshot(), func(types.NamespacedName) bool { return false })
	if len(l.snapshot()) != 0 {
		t.Errorf("ledger still holds %v after the cache showed the claim", l.snapshot())
	}

	// Entries expire: a claim the cache never shows (the write was lost) blocks nobody forever.
	l.reserve(h1, "m3")
	l.mu.Lock()
	e := l.hosts[h1]
	e.at = time.Now().Add(-claimTTL)
	l.hosts[h1] = e
	l.mu.Unlock()
	if _, ok := l.snapshot()[h1]; ok || !l.reserve(h1, "m4") {
		t.Error("an expired reservation still holds the host")
	}
}

// TestConflictMarksTheCachedVersionStale: after a claim of a host is refused as a
// conflict, that cached version is passed over, a newer one is not, and the mark expires.
func TestConflictMarksTheCachedVersionStale(t *testing.T) {
	var l claimLedger
	h := types.NamespacedName{Namespace: "ns", Name: "h"}
	l.markStale(h, "41")
	cached := &infrav1.AnvilHost{ObjectMeta: metav1.ObjectMeta{Namespace: "ns", Name: "h", ResourceVersion: "41"}}
	if !l.view().passOver(cached) {
		t.Error("the version a claim was refused for is chosen again")
	}
	cached.ResourceVersion = "42"
	if l.view().passOver(cached) {
		t.Error("a newer cached version is passed over")
	}
	cached.ResourceVersion = "41"
	l.mu.Lock()
	e := l.stale[h]
	e.at = time.Now().Add(-claimTTL)
	l.stale[h] = e
	l.mu.Unlock()
	if l.view().passOver(cached) {
		t.Error("an expired stale mark still holds the host")
	}
}

func TestMachineWritesWaitForTheCache(t *testing.T) {
	var w machineWrites
	k := types.NamespacedName{Namespace: "ns", Name: "m"}
	if w.cacheBehind(k, "5") {
		t.Error("no write remembered, yet held back")
	}
	w.remember(k, "10")
	if !w.cacheBehind(k, "9") {
		t.Error("a cache older than the last write was not held back")
	}
	if w.cacheBehind(k, "10") || w.cacheBehind(k, "9") {
		t.Error("once the cache caught up, the entry should be gone")
	}
	w.remember(k, "not-a-number")
	if w.cacheBehind(k, "3") {
		t.Error("versions that do not compare must never hold a reconcile back")
	}
}

// TestMachinesOfAClusterSpreadOverZones: machines without a failure domain go to the zone
// holding the fewest of their cluster's hosts, though a claim looks only at claimable hosts
// (the cluster's own are counted through their index).
func TestMachinesOfAClusterSpreadOverZones(t *testing.T) {
	f := newCAPIFixture(t, "zone-a", "zone-a", "zone-b")
	first := f.waitMachine(f.machine("w-0", "").Name, "was provisioned", provisioned)
	second := f.waitMachine(f.machine("w-1", "").Name, "was provisioned", provisioned)
	if first.Status.FailureDomain == second.Status.FailureDomain {
		t.Fatalf("both machines in %s (hosts %s and %s): the second should have gone to the other zone",
			first.Status.FailureDomain, first.Status.HostRef.Name, second.Status.HostRef.Name)
	}
}

func TestHostLabelsFor(t *testing.T) {
	host := map[string]string{
		"topology.kubernetes.io/zone":      "zone-a",
		"anvil.cluster.x-k8s.io/cpu-cores": "32",
		"anvil.cluster.x-k8s.io/arch":      "amd64",
		"anvil.cluster.x-k8s.io-other/x":   "no", // shares the prefix's text, not its domain
		"rack":                             "r7",
	}
	got := hostLabelsFor(host, []string{"topology.kubernetes.io/zone", "anvil.cluster.x-k8s.io/", "missing"})
	want := map[string]string{"topology.kubernetes.io/zone": "zone-a", "anvil.cluster.x-k8s.io/cpu-cores": "32", "anvil.cluster.x-k8s.io/arch": "amd64"}
	if !maps.Equal(got, want) {
		t.Errorf("hostLabelsFor = %v, want %v", got, want)
	}
}
