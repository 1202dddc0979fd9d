package controllers

import (
	"context"
	"fmt"

	corev1 "k8s.io/api/core/v1"
	"sigs.k8s.io/controller-runtime/pkg/client"
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

// ensureMovedWithHosts labels a Secret that a host uses (BMC credentials, CA bundle) so that
// clusterctl move takes it along with the hosts: a moved host without its credentials could
// not reach its BMC. One small patch per Secret, once.
func ensureMovedWithHosts(ctx context.Context, c client.Client, s *corev1.Secret) error {
	if _, ok := s.Labels[ClusterctlMoveLabel]; ok {
		return nil
	}
	before := s.DeepCopy()
	if s.Labels == nil {
		s.Labels = map[string]string{}
	}
	s.Labels[ClusterctlMoveLabel] = ""
	if err := c.Patch(ctx, s, client.MergeFrom(before)); err != nil {
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
