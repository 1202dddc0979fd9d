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
	key := types.NamespacedName{Namespace: "ns", Name: "h1"}
	cached := &infrav1.AnvilHost{ObjectMeta: metav1.ObjectMeta{Namespace: "ns", Name: "h1", ResourceVersion: "7"}}
	if !l.reserve(key, "m1", "7") {
		t.Fatal("first reservation refused")
	}
	if l.reserve(key, "m2", "7") {
		t.Error("a host being claimed by m1 was reserved for m2 too")
	}
	if !l.reserve(key, "m1", "7") {
		t.Error("the same machine retrying its claim was refused")
	}
	if !l.view().passOver(cached) {
		t.Error("a host being claimed is offered to other claims")
	}

	// A failed claim frees the host at once, but only the machine's own reservation.
	l.release(key, "m2")
	if l.reserve(key, "m2", "7") {
		t.Error("another machine's failed claim released m1's reservation")
	}
	l.release(key, "m1")
	if !l.reserve(key, "m2", "7") {
		t.Error("a released host could not be reserved")
	}

	// However long the cache shows the version the claim was made against, the host is
	// passed over; once the cache shows a newer version (claimed, or changed), the entry goes.
	stillCached := func(types.NamespacedName) (string, bool) { return "7", true }
	l.mu.Lock()
	e := l.claiming[key]
	e.at = time.Now().Add(-time.Minute) // a cache far behind: longer than any TTL would allow
	l.claiming[key] = e
	l.mu.Unlock()
	l.settled(l.view(), stillCached)
	if !l.view().passOver(cached) {
		t.Error("the ledger let go of a claim the cache does not show yet")
	}
	claimedNow := func(types.NamespacedName) (string, bool) { return "", false } // not claimable any more
	l.settled(l.view(), claimedNow)
	if len(l.view().claiming) != 0 {
		t.Errorf("ledger still holds %v after the cache showed the claim", l.view().claiming)
	}
	// A newer cached version is the truth, whatever the ledger holds.
	l.reserve(key, "m3", "7")
	cached.ResourceVersion = "9"
	if l.view().passOver(cached) {
		t.Error("a newer cached version was passed over")
	}
	if !l.reserve(key, "m4", "9") {
		t.Error("a newer version could not be reserved")
	}

	// The backstop: an entry older than it blocks nobody.
	l.mu.Lock()
	e = l.claiming[key]
	e.at = time.Now().Add(-claimBackstop)
	l.claiming[key] = e
	l.mu.Unlock()
	if l.view().passOver(cached) || !l.reserve(key, "m5", "9") {
		t.Error("an entry past the backstop still holds the host")
	}
}

// TestConflictMarksTheCachedVersionStale: after a claim of a host is refused as a
// conflict, that cached version is passed over, a newer one is not, and the mark goes once
// the cache has moved on.
func TestConflictMarksTheCachedVersionStale(t *testing.T) {
	var l claimLedger
	key := types.NamespacedName{Namespace: "ns", Name: "h"}
	l.reserve(key, "m1", "41")
	l.refused(key, "m1", "41")
	if len(l.view().claiming) != 0 {
		t.Error("a refused claim is still held")
	}
	cached := &infrav1.AnvilHost{ObjectMeta: metav1.ObjectMeta{Namespace: "ns", Name: "h", ResourceVersion: "41"}}
	if !l.view().passOver(cached) {
		t.Error("the version a claim was refused for is chosen again")
	}
	cached.ResourceVersion = "42"
	if l.view().passOver(cached) {
		t.Error("a newer cached version is passed over")
	}
	l.settled(l.view(), func(types.NamespacedName) (string, bool) { return "42", true })
	if len(l.view().stale) != 0 {
		t.Error("the stale mark outlived the cache catching up")
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
