package controllers

import (
	"bytes"
	"context"
	"fmt"
	"maps"
	"sync"

	corev1 "k8s.io/api/core/v1"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/event"
	"sigs.k8s.io/controller-runtime/pkg/predicate"

	infrav1 "github.com/anvil-metal/cluster-api-provider-anvil/api/v1alpha1"
)

// clusterctl's labels and annotations for `clusterctl move`
// (sigs.k8s.io/cluster-api/cmd/clusterctl/api/v1alpha3, not imported for three strings).
const (
	// ClusterctlMoveLabel on an object makes clusterctl move it with the namespace's
	// clusters even though no cluster owns it.
	ClusterctlMoveLabel = "clusterctl.cluster.x-k8s.io/move"
	// DeleteForMoveAnnotation marks an object that clusterctl deletes from the source
	// management cluster because it now lives in the target.
	DeleteForMoveAnnotation = "clusterctl.cluster.x-k8s.io/delete-for-move"
)

// movableSecrets labels the Secrets that hosts use (BMC credentials, CA bundles) so that
// clusterctl move takes them along with the hosts: a moved host without its credentials
// could not reach its BMC. One small patch per Secret, once: it remembers the Secrets it
// labelled, so hosts sharing a Secret whose label the cache does not show yet don't patch
// it again.
type movableSecrets struct {
	labelled sync.Map // Secret UID → struct{}: labelled or being labelled
}

func (m *movableSecrets) ensure(ctx context.Context, c client.Client, s *corev1.Secret) error {
	if _, ok := s.Labels[ClusterctlMoveLabel]; ok {
		return nil
	}
	if _, taken := m.labelled.LoadOrStore(s.UID, struct{}{}); taken {
		return nil // labelled, or being labelled by another reconcile
	}
	before := s.DeepCopy()
	if s.Labels == nil {
		s.Labels = map[string]string{}
	}
	s.Labels[ClusterctlMoveLabel] = ""
	if err := c.Patch(ctx, s, client.MergeFrom(before)); err != nil {
		m.labelled.Delete(s.UID)
		return fmt.Errorf("labelling Secret %q for clusterctl move: %w", s.Name, client.IgnoreNotFound(err))
	}
	return nil
}

// deletedForMove reports whether clusterctl move is deleting o because it now lives in
// another management cluster: nothing about the real world behind it changes.
func deletedForMove(o client.Object) bool {
	_, ok := o.GetAnnotations()[DeleteForMoveAnnotation]
	return ok
}

// annotationsChangedByOthers passes host updates whose annotations changed other than in the
// ones the host controller keeps itself (the install record and clusterctl's block-move):
// its own write must not wake it again, least of all before its cache holds the status
// written right after.
func annotationsChangedByOthers() predicate.Funcs {
	own := func(a map[string]string) map[string]string {
		out := maps.Clone(a)
		delete(out, infrav1.ProvisionedForAnnotation)
		delete(out, infrav1.BlockMoveAnnotation)
		return out
	}
	return predicate.Funcs{
		UpdateFunc: func(e event.UpdateEvent) bool {
			if e.ObjectOld == nil || e.ObjectNew == nil {
				return false
			}
			return !maps.Equal(own(e.ObjectOld.GetAnnotations()), own(e.ObjectNew.GetAnnotations()))
		},
	}
}

// secretDataChanged passes Secret events that can matter to a host: a Secret created or
// deleted, or its data changed (rotated credentials, a new CA). Labels, such as the move
// label the host controller adds itself, wake nobody.
func secretDataChanged() predicate.Funcs {
	return predicate.Funcs{
		UpdateFunc: func(e event.UpdateEvent) bool {
			o, okOld := e.ObjectOld.(*corev1.Secret)
			n, okNew := e.ObjectNew.(*corev1.Secret)
			if !okOld || !okNew {
				return true
			}
			return o.Type != n.Type || !maps.EqualFunc(o.Data, n.Data, bytes.Equal) || !maps.Equal(o.StringData, n.StringData)
		},
	}
}
