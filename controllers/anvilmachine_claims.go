package controllers

import (
	"context"
	"fmt"
	"sync"
	"time"

	"k8s.io/apimachinery/pkg/api/equality"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/apimachinery/pkg/util/resourceversion"
	"sigs.k8s.io/controller-runtime/pkg/client"

	infrav1 "github.com/anvil-metal/cluster-api-provider-anvil/api/v1alpha1"
)

// claimBackstop bounds how long the ledger keeps an entry whose host the cache still shows
// at the version the entry names. Entries normally go as soon as the cache has moved on
// (usually well under a second, tens of seconds when the API server is saturated); this only
// keeps a bug from holding a host out of every choice forever. The optimistic lock, not the
// ledger, is what stops a second claim.
const claimBackstop = 10 * time.Minute

// claimLedger is what the AnvilMachine controller knows of its own claims before its cache
// does. Without it every reconcile running in parallel picks the same best host from the
// same cache, one wins and the rest retry on a conflict, and a large fleet is claimed at a
// trickle. Safety does not rest on it: the claim is still an update carrying the host's
// resourceVersion.
//
// Each entry names the host's cached resourceVersion it is about, and holds while the cache
// still shows that version: a cache lagging behind the API server, however far, never makes
// a reconcile choose a host this process has just claimed, nor a copy already refused.
type claimLedger struct {
	mu sync.Mutex
	// claiming: hosts being claimed, or claimed by this process, by the version the claim
	// was made against.
	claiming map[types.NamespacedName]claimEntry
	// stale: the version a claim was refused for (a conflict: the cache is behind the
	// server, and choosing that copy again would only conflict again).
	stale map[types.NamespacedName]claimEntry
}

type claimEntry struct {
	machine         types.UID // claiming only: the machine claiming the host
	resourceVersion string
	at              time.Time
}

// reserve marks host, cached at resourceVersion, as being claimed by machine; false if
// another machine is claiming that same version.
func (l *claimLedger) reserve(host types.NamespacedName, machine types.UID, resourceVersion string) bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.claiming == nil {
		l.claiming = map[types.NamespacedName]claimEntry{}
	}
	if e, ok := l.claiming[host]; ok && e.machine != machine && e.resourceVersion == resourceVersion && time.Since(e.at) < claimBackstop {
		return false
	}
	l.claiming[host] = claimEntry{machine: machine, resourceVersion: resourceVersion, at: time.Now()}
	return true
}

// release forgets machine's claim of host, which did not happen; another machine's
// reservation of a newer version stays.
func (l *claimLedger) release(host types.NamespacedName, machine types.UID) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.releaseLocked(host, machine)
}

func (l *claimLedger) releaseLocked(host types.NamespacedName, machine types.UID) {
	if e, ok := l.claiming[host]; ok && e.machine == machine {
		delete(l.claiming, host)
	}
}

// refused records that machine's claim of host at resourceVersion was refused as a conflict:
// the claim goes and that version is passed over, in one step, so no reconcile chooses it in
// between.
func (l *claimLedger) refused(host types.NamespacedName, machine types.UID, resourceVersion string) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.releaseLocked(host, machine)
	if l.stale == nil {
		l.stale = map[types.NamespacedName]claimEntry{}
	}
	l.stale[host] = claimEntry{resourceVersion: resourceVersion, at: time.Now()}
}

// claimView is what the ledger held when a claim began, by host: the cached version it
// passes over.
type claimView struct {
	claiming, stale map[types.NamespacedName]string
}

func (l *claimLedger) view() claimView {
	l.mu.Lock()
	defer l.mu.Unlock()
	return claimView{claiming: versions(l.claiming), stale: versions(l.stale)}
}

// versions copies entries' versions, dropping the entries past the backstop.
func versions(entries map[types.NamespacedName]claimEntry) map[types.NamespacedName]string {
	out := make(map[types.NamespacedName]string, len(entries))
	for k, e := range entries {
		if time.Since(e.at) >= claimBackstop {
			delete(entries, k)
			continue
		}
		out[k] = e.resourceVersion
	}
	return out
}

// passOver reports whether a claim should skip h as it is cached: a claim made against this
// very version is in flight or done (the cache does not show it yet), or this version was
// refused. A newer cached version shows the truth, whatever the ledger says.
func (v claimView) passOver(h *infrav1.AnvilHost) bool {
	key := client.ObjectKeyFromObject(h)
	if rv, ok := v.claiming[key]; ok && rv == h.ResourceVersion {
		return true
	}
	rv, ok := v.stale[key]
	return ok && rv == h.ResourceVersion
}

// settled forgets the entries the cache has caught up with: the host's cached version,
// claimable or not, is no longer the one the entry names (cachedVersion reports the version
// of a claimable host, ok false for any other).
func (l *claimLedger) settled(v claimView, cachedVersion func(types.NamespacedName) (string, bool)) {
	if len(v.claiming) == 0 && len(v.stale) == 0 {
		return
	}
	moved := func(seen map[types.NamespacedName]string) []types.NamespacedName {
		var out []types.NamespacedName
		for k, rv := range seen {
			if now, ok := cachedVersion(k); !ok || now != rv {
				out = append(out, k)
			}
		}
		return out
	}
	movedClaims, movedStale := moved(v.claiming), moved(v.stale)
	l.mu.Lock()
	defer l.mu.Unlock()
	for _, k := range movedClaims {
		if e, ok := l.claiming[k]; ok && e.resourceVersion == v.claiming[k] {
			delete(l.claiming, k)
		}
	}
	for _, k := range movedStale {
		if e, ok := l.stale[k]; ok && e.resourceVersion == v.stale[k] {
			delete(l.stale, k)
		}
	}
}

// machineWrites remembers, per machine, the resourceVersion of this controller's last write
// until the informer cache has caught up with it. A reconcile that read an older machine
// (woken by its host, say, a moment after the last write) would write the same status
// again; it waits for the cache instead.
type machineWrites struct {
	mu       sync.Mutex
	versions map[types.NamespacedName]string
}

func (w *machineWrites) remember(key types.NamespacedName, rv string) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.versions == nil {
		w.versions = map[types.NamespacedName]string{}
	}
	w.versions[key] = rv
}

// cacheBehind reports whether cachedRV is older than the last write to key; once the cache
// has caught up the entry goes. Versions that do not compare never hold a reconcile back.
func (w *machineWrites) cacheBehind(key types.NamespacedName, cachedRV string) bool {
	w.mu.Lock()
	defer w.mu.Unlock()
	written, ok := w.versions[key]
	if !ok {
		return false
	}
	if cmp, err := resourceversion.CompareResourceVersion(cachedRV, written); err == nil && cmp < 0 {
		return true
	}
	delete(w.versions, key)
	return false
}

func (w *machineWrites) forget(key types.NamespacedName) {
	w.mu.Lock()
	defer w.mu.Unlock()
	delete(w.versions, key)
}

// patchMachine writes what a reconcile changed: metadata and spec in one merge patch
// (optimistically locked when the finalizers change, so a concurrent writer's finalizer is
// never dropped), status with its conditions in another. The AnvilMachine controller is the
// only writer of the machine's status and conditions, so, unlike Cluster API's patch helper,
// conditions need no patch of their own: a claim costs one status write, not two.
func patchMachine(ctx context.Context, c client.Client, before, am *infrav1.AnvilMachine) (wrote bool, err error) {
	wrote, err = patchMachineSpec(ctx, c, before, am)
	if err != nil {
		if len(am.Finalizers) == 0 && !am.DeletionTimestamp.IsZero() {
			return false, client.IgnoreNotFound(err) // the last finalizer went: the object is gone
		}
		return false, fmt.Errorf("patching AnvilMachine %s: %w", am.Name, err)
	}
	if !am.DeletionTimestamp.IsZero() && len(am.Finalizers) == 0 {
		return wrote, nil // nothing left to write status to
	}
	if !equality.Semantic.DeepEqual(before.Status, am.Status) {
		base := am.DeepCopy()
		base.Status = before.Status
		if err := c.Status().Patch(ctx, am, client.MergeFrom(base)); err != nil {
			return wrote, fmt.Errorf("patching AnvilMachine %s status: %w", am.Name, err)
		}
		wrote = true
	}
	return wrote, nil
}

// patchMachineSpec writes a machine's metadata and spec if they changed, in one merge patch
// (optimistically locked when the finalizers change, so a concurrent writer's finalizer is
// never dropped), and reports whether it wrote. am keeps the status it had: status is a
// subresource, written next.
func patchMachineSpec(ctx context.Context, c client.Client, before, am *infrav1.AnvilMachine) (bool, error) {
	if equality.Semantic.DeepEqual(before.ObjectMeta, am.ObjectMeta) && equality.Semantic.DeepEqual(before.Spec, am.Spec) {
		return false, nil
	}
	var opts []client.MergeFromOption
	if !equality.Semantic.DeepEqual(before.Finalizers, am.Finalizers) {
		opts = append(opts, client.MergeFromWithOptimisticLock{})
	}
	status := am.Status.DeepCopy()
	am.Status = *before.Status.DeepCopy()
	err := c.Patch(ctx, am, client.MergeFromWithOptions(before, opts...))
	am.Status = *status // the response carries the stored status; ours is still to be written
	if err != nil {
		return false, err
	}
	// A spec change (the providerID) bumped the generation: the status being written
	// describes the new one, so its conditions say so rather than waiting for a rewrite.
	for i := range am.Status.Conditions {
		if am.Status.Conditions[i].ObservedGeneration == before.Generation {
			am.Status.Conditions[i].ObservedGeneration = am.Generation
		}
	}
	return true, nil
}
