package controllers

import (
	"context"
	"fmt"

	corev1 "k8s.io/api/core/v1"
	clusterv1 "sigs.k8s.io/cluster-api/api/core/v1beta2"
	"sigs.k8s.io/controller-runtime/pkg/client"
)

// OutOfServiceTaint is what Kubernetes' non-graceful node shutdown handling acts on: pods on
// the node are deleted at once and their volumes detached, so a StatefulSet's pod starts
// elsewhere instead of waiting for a server that is being power-cycled.
var OutOfServiceTaint = corev1.Taint{Key: corev1.TaintNodeOutOfService, Value: "nodeshutdown", Effect: corev1.TaintEffectNoExecute}

// setOutOfService adds (on) or removes (off) the out-of-service taint on the machine's Node in
// its workload cluster. Without a ClusterCache, or before the machine has a Node, there is
// nothing to taint.
func (r *AnvilRemediationReconciler) setOutOfService(ctx context.Context, cluster *clusterv1.Cluster, machine *clusterv1.Machine, on bool) error {
	if r.ClusterCache == nil || !machine.Status.NodeRef.IsDefined() {
		return nil
	}
	c, err := r.ClusterCache.GetClient(ctx, client.ObjectKeyFromObject(cluster))
	if err != nil {
		return fmt.Errorf("reaching workload cluster %s: %w", cluster.Name, err)
	}
	node := &corev1.Node{}
	if err := c.Get(ctx, client.ObjectKey{Name: machine.Status.NodeRef.Name}, node); err != nil {
		return client.IgnoreNotFound(err) // a Node that is gone needs no taint
	}
	has := false
	kept := make([]corev1.Taint, 0, len(node.Spec.Taints))
	for _, t := range node.Spec.Taints {
		if t.Key == OutOfServiceTaint.Key {
			has = true
			continue
		}
		kept = append(kept, t)
	}
	if has == on {
		return nil
	}
	patch := client.MergeFrom(node.DeepCopy())
	if on {
		kept = append(kept, OutOfServiceTaint)
	}
	node.Spec.Taints = kept
	return c.Patch(ctx, node, patch)
}
