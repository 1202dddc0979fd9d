package controllers

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"strings"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/utils/ptr"
	clusterv1 "sigs.k8s.io/cluster-api/api/core/v1beta2"
	"sigs.k8s.io/cluster-api/controllers/clustercache"
	"sigs.k8s.io/cluster-api/util/conditions"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/client"

	infrav1 "github.com/anvil-metal/cluster-api-provider-anvil/api/v1alpha1"
)

// nodeRequeue is how often a provisioned machine looks again for a Node that has not joined,
// or has joined without its providerID (Cluster API links a Node by providerID only; the
// Machine's own change wakes the machine once it is linked).
const nodeRequeue = 20 * time.Second

// ConditionNodeIdentity reports a Node whose name is the host's but whose providerID is
// another machine's: Anvil leaves such a Node alone.
const ConditionNodeIdentity = "NodeIdentity"

// reconcileNode does, in the workload cluster, what the kubelet should have done and what the
// machine asks for: a Node that joined without a providerID (the config drive carries it,
// but a kubelet may not pass it on) gets the machine's, so that Cluster API can link it; and
// the host labels listed in spec.hostLabelsToNode are copied to the Node. The Node is found
// by the host's name, which is the hostname the config drive gives it. Without a
// ClusterCache (or before the control plane answers) there is nothing to do.
func (r *AnvilMachineReconciler) reconcileNode(ctx context.Context, cluster *clusterv1.Cluster, machine *clusterv1.Machine,
	am *infrav1.AnvilMachine, host *infrav1.AnvilHost) (ctrl.Result, error) {
	linked := machine.Status.NodeRef.IsDefined()
	if r.ClusterCache == nil || (linked && len(am.Spec.HostLabelsToNode) == 0) {
		return ctrl.Result{}, nil
	}
	if !controlPlaneInitialized(cluster) {
		// No Node can join yet; the Cluster's change wakes the machine (SetupWithManager).
		return ctrl.Result{}, nil
	}
	c, err := r.ClusterCache.GetClient(ctx, client.ObjectKeyFromObject(cluster))
	if err != nil {
		if errors.Is(err, clustercache.ErrClusterNotConnected) {
			return ctrl.Result{RequeueAfter: nodeRequeue}, nil
		}
		return ctrl.Result{}, err
	}
	name := host.Name
	if linked {
		name = machine.Status.NodeRef.Name
	}
	node := &corev1.Node{}
	if err := c.Get(ctx, client.ObjectKey{Name: name}, node); err != nil {
		if apierrors.IsNotFound(err) {
			return ctrl.Result{RequeueAfter: nodeRequeue}, nil
		}
		return ctrl.Result{}, fmt.Errorf("reading Node %s of cluster %s: %w", name, cluster.Name, err)
	}

	want := providerIDFor(host)
	before := node.DeepCopy()
	switch node.Spec.ProviderID {
	case want:
	case "":
		node.Spec.ProviderID = want
	default:
		setCondition(am, ConditionNodeIdentity, false, "NodeNameTaken",
			fmt.Sprintf("Node %s has providerID %s, not %s: it is not this machine's and is left alone", name, node.Spec.ProviderID, want))
		return ctrl.Result{RequeueAfter: nodeRequeue}, nil // until that Node goes
	}
	for k, v := range hostLabelsFor(host.Labels, am.Spec.HostLabelsToNode) {
		if node.Labels == nil {
			node.Labels = map[string]string{}
		}
		node.Labels[k] = v
	}
	if node.Spec.ProviderID != before.Spec.ProviderID || !maps.Equal(node.Labels, before.Labels) {
		if err := c.Patch(ctx, node, client.MergeFrom(before)); err != nil {
			return ctrl.Result{}, fmt.Errorf("updating Node %s of cluster %s: %w", name, cluster.Name, err)
		}
		if before.Spec.ProviderID == "" {
			ctrl.LoggerFrom(ctx).Info("set the providerID of a Node that joined without one", "node", name, "providerID", want)
		}
	}
	if conditions.Has(am, ConditionNodeIdentity) {
		setCondition(am, ConditionNodeIdentity, true, "Matches", "")
	}
	if !linked {
		return ctrl.Result{RequeueAfter: nodeRequeue}, nil
	}
	return ctrl.Result{}, nil
}

// controlPlaneInitialized tells whether the workload cluster's API server can have Nodes:
// Cluster API sets the field and the condition together.
func controlPlaneInitialized(c *clusterv1.Cluster) bool {
	return ptr.Deref(c.Status.Initialization.ControlPlaneInitialized, false) ||
		conditions.IsTrue(c, clusterv1.ClusterControlPlaneInitializedCondition)
}

// hostLabelsFor picks the labels that keys select: exact keys, or prefixes ending in "/".
// Labels that may not go to a Node (infrav1.NodeLabelRestriction: the kubelet's, Cluster
// API's, Anvil's claim bookkeeping) are left out even when a prefix covers them or the
// webhook did not run.
func hostLabelsFor(labels map[string]string, keys []string) map[string]string {
	out := map[string]string{}
	for _, key := range keys {
		if prefix, ok := strings.CutSuffix(key, "/"); ok {
			for k, v := range labels {
				if strings.HasPrefix(k, prefix+"/") {
					out[k] = v
				}
			}
			continue
		}
		if v, ok := labels[key]; ok {
			out[key] = v
		}
	}
	maps.DeleteFunc(out, func(k, _ string) bool { return infrav1.NodeLabelRestriction(k) != "" })
	return out
}
