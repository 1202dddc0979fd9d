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

// claimTTL bounds how long a claim this process made keeps its host out of other choices
// while the cache does not show it. The cache is normally a fraction of a second behind;
// past the TTL the optimistic lock still stops a second claim, at the price of a conflict.
const claimTTL = 30 * time.Second

// claimLedger is what the AnvilMachine controller knows of its own claims before its cache
// does: the hosts it is claiming or has just claimed. Without it every reconcile running in
// parallel picks the same best host from the same cache, one wins and the rest retry on a
// conflict, and a large fleet is claimed at a trickle. Safety does not rest on it: the claim
// is still an update carrying the host's resourceVersion.
type claimLedger struct {
	mu    sync.Mutex
	hosts map[types.NamespacedName]claimEntry
	// stale holds, per host, the resourceVersion a claim was refused for: the cache's copy is
	// behind the server's, and choosing that copy again would only conflict again (each try an
	// update refused and a read), so no reconcile chooses it until the cache has a newer one.
	stale map[types.NamespacedName]claimEntry
}

type claimEntry struct {
	machine         types.UID // hosts: the machine claiming it
	resourceVersion string    // stale: the version refused
	at              time.Time
}

// reserve marks host as being claimed by machine; false if another machine holds it.
func (l *claimLedger) reserve(host types.NamespacedName, machine types.UID) bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.hosts == nil {
		l.hosts = map[types.NamespacedName]claimEntry{}
	}
	if e, ok := l.hosts[host]; ok && e.machine != machine && time.Since(e.at) < claimTTL {
		return false
	}
	l.hosts[host] = claimEntry{machine: machine, at: time.Now()}
	return true
}

// release forgets a claim that did not happen.
func (l *claimLedger) release(host types.NamespacedName) {
	l.mu.Lock()
	defer l.mu.Unlock()
	delete(l.hosts, host)
}

// markStale records that a claim of host at resourceVersion was refused as a conflict.
func (l *claimLedger) markStale(host types.NamespacedName, resourceVersion string) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.stale == nil {
		l.stale = map[types.NamespacedName]claimEntry{}
	}
	l.stale[host] = claimEntry{resourceVersion: resourceVersion, at: time.Now()}
}

// snapshot returns the hosts claimed recently, dropping the expired ones.
func (l *claimLedger) snapshot() map[types.NamespacedName]struct{} {
	l.mu.Lock()
	defer l.mu.Unlock()
	out := make(map[types.NamespacedName]struct{}, len(l.hosts))
	for k, e := range l.hosts {
		if time.Since(e.at) >= claimTTL {
			delete(l.hosts, k)
			continue
		}
		out[k] = struct{}{}
	}
	return out
}

// claimView is what the ledger held when a claim began: hosts being claimed, and cached
// host versions known to be behind the server.
type claimView struct {
	claiming map[types.NamespacedName]struct{}
	stale    map[types.NamespacedName]string
}

func (l *claimLedger) view() claimView {
	return claimView{claiming: l.snapshot(), stale: l.staleVersions()}
}

// passOver reports whether a claim should skip h as it is cached: another claim of it is in
// flight (or the cache does not show a claim just made), or this version was refused.
func (v claimView) passOver(h *infrav1.AnvilHost) bool {
	key := client.ObjectKeyFromObject(h)
	if _, ok := v.claiming[key]; ok {
		return true
	}
	rv, ok := v.stale[key]
	return ok && rv == h.ResourceVersion
}

// staleVersions returns the host versions known to be behind the server, dropping the
// expired ones (a cache that never catches up blocks nobody forever).
func (l *claimLedger) staleVersions() map[types.NamespacedName]string {
	l.mu.Lock()
	defer l.mu.Unlock()
	out := make(map[types.NamespacedName]string, len(l.stale))
	for k, e := range l.stale {
		if time.Since(e.at) >= claimTTL {
			delete(l.stale, k)
			continue
		}
		out[k] = e.resourceVersion
	}
	return out
}

// settled forgets the claims the cache has caught up with: a host being claimed that is no
// longer claimable there is either claimed in the cache now or out of the choice anyway.
func (l *claimLedger) settled(claiming map[types.NamespacedName]struct{}, claimable func(types.NamespacedName) bool) {
	if len(claiming) == 0 {
		return
	}
	var gone []types.NamespacedName
	for k := range claiming {
		if !claimable(k) {
			gone = append(gone, k)
		}
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	for _, k := range gone {
		delete(l.hosts, k)
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
	status := am.Status.DeepCopy()
	if !equality.Semantic.DeepEqual(before.ObjectMeta, am.ObjectMeta) || !equality.Semantic.DeepEqual(before.Spec, am.Spec) {
		var opts []client.MergeFromOption
		if !equality.Semantic.DeepEqual(before.Finalizers, am.Finalizers) {
			opts = append(opts, client.MergeFromWithOptimisticLock{})
		}
		am.Status = *before.Status.DeepCopy() // status is a subresource: it goes next
		err := c.Patch(ctx, am, client.MergeFromWithOptions(before, opts...))
		am.Status = *status // the response carries the stored status; ours is still to be written
		if err != nil {
			if len(am.Finalizers) == 0 && !am.DeletionTimestamp.IsZero() {
				return false, client.IgnoreNotFound(err) // the last finalizer went: the object is gone
			}
			return false, fmt.Errorf("patching AnvilMachine %s: %w", am.Name, err)
		}
		wrote = true
		// A spec change (the providerID) bumped the generation: the status being written
		// describes the new one, so its conditions say so rather than waiting for a rewrite.
		for i := range status.Conditions {
			if status.Conditions[i].ObservedGeneration == before.Generation {
				status.Conditions[i].ObservedGeneration = am.Generation
			}
		}
		am.Status = *status
	}
	if !am.DeletionTimestamp.IsZero() && len(am.Finalizers) == 0 {
		return wrote, nil // nothing left to write status to
	}
	if !equality.Semantic.DeepEqual(before.Status, *status) {
		base := am.DeepCopy()
		base.Status = before.Status
		if err := c.Status().Patch(ctx, am, client.MergeFrom(base)); err != nil {
			return wrote, fmt.Errorf("patching AnvilMachine %s status: %w", am.Name, err)
		}
		wrote = true
	}
	return wrote, nil
}
