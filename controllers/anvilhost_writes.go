package controllers

import (
	"context"
	"sync"

	"k8s.io/apimachinery/pkg/api/equality"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/apimachinery/pkg/util/resourceversion"
	"sigs.k8s.io/controller-runtime/pkg/client"

	infrav1 "github.com/anvil-metal/cluster-api-provider-anvil/api/v1alpha1"
)

// patchHost stores what a reconcile changed in at most two requests, each a merge patch of
// only the changed fields: metadata and spec (finalizer, hardware labels, a consumed
// annotation, a released claim), then status. CAPI's patch helper would add a third, for
// conditions, which exists for objects whose conditions several controllers write; this
// controller is the only writer of host status, conditions included.
//
// spec.claim belongs to the AnvilMachine controller: when spec or finalizers change, the patch
// carries the resourceVersion that was read, so it fails with a conflict instead of undoing a
// change made meanwhile. Label and annotation changes alone name only their own keys and need
// no lock. It reports whether it wrote anything; host then holds the stored object.
func patchHost(ctx context.Context, c client.Client, before, host *infrav1.AnvilHost) (bool, error) {
	wrote := false
	status := host.Status.DeepCopy()
	if !equality.Semantic.DeepEqual(before.ObjectMeta, host.ObjectMeta) || !equality.Semantic.DeepEqual(before.Spec, host.Spec) {
		var opts []client.MergeFromOption
		if !equality.Semantic.DeepEqual(before.Spec, host.Spec) || !equality.Semantic.DeepEqual(before.Finalizers, host.Finalizers) {
			opts = append(opts, client.MergeFromWithOptimisticLock{})
		}
		host.Status = *before.Status.DeepCopy() // status is a subresource: it goes next
		err := c.Patch(ctx, host, client.MergeFromWithOptions(before, opts...))
		host.Status = *status // the response carried the stored status; ours is still to be written
		if err != nil {
			return false, err
		}
		wrote = true
	}
	if !equality.Semantic.DeepEqual(before.Status, *status) {
		base := host.DeepCopy()
		base.Status = before.Status
		if err := c.Status().Patch(ctx, host, client.MergeFrom(base)); err != nil {
			return wrote, err
		}
		wrote = true
	}
	return wrote, nil
}

// writtenVersions remembers, per host, the resourceVersion of this controller's last write
// until the informer cache has caught up with it. A reconcile that reads an older host from
// the cache would act on the host as it was before that write (register or inspect it
// again, or fail an optimistically locked patch): it waits for the cache instead.
type writtenVersions struct {
	mu       sync.Mutex
	versions map[types.NamespacedName]string
}

// remember records a write that produced resourceVersion rv.
func (w *writtenVersions) remember(key types.NamespacedName, rv string) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.versions == nil {
		w.versions = map[types.NamespacedName]string{}
	}
	w.versions[key] = rv
}

// cacheBehind reports whether cachedRV is older than the last write to key. Once the cache
// has caught up the entry is dropped, so the map holds only hosts with writes in flight.
// Versions that do not compare (not etcd's integers) never hold a reconcile back.
func (w *writtenVersions) cacheBehind(key types.NamespacedName, cachedRV string) bool {
	w.mu.Lock()
	defer w.mu.Unlock()
	written, ok := w.versions[key]
	if !ok {
		return false
	}
	cmp, err := resourceversion.CompareResourceVersion(cachedRV, written)
	if err == nil && cmp < 0 {
		return true
	}
	delete(w.versions, key)
	return false
}

// forget drops key (the host is gone).
func (w *writtenVersions) forget(key types.NamespacedName) {
	w.mu.Lock()
	defer w.mu.Unlock()
	delete(w.versions, key)
}
