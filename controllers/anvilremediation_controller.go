package controllers

import (
	"context"
	"fmt"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	kerrors "k8s.io/apimachinery/pkg/util/errors"
	clusterv1 "sigs.k8s.io/cluster-api/api/core/v1beta2"
	"sigs.k8s.io/cluster-api/controllers/clustercache"
	"sigs.k8s.io/cluster-api/util"
	"sigs.k8s.io/cluster-api/util/conditions"
	"sigs.k8s.io/cluster-api/util/patch"
	"sigs.k8s.io/cluster-api/util/paused"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/controller"
	"sigs.k8s.io/controller-runtime/pkg/controller/controllerutil"

	infrav1 "github.com/anvil-metal/cluster-api-provider-anvil/api/v1alpha1"
)

// AnvilRemediationReconciler implements Cluster API's external remediation: power-cycle the
// unhealthy machine's host up to retryLimit times; if the MachineHealthCheck has not deleted
// the remediation (it does once the node is healthy) by then, hand the machine back to its
// owner for replacement and send the host to repair.
type AnvilRemediationReconciler struct {
	Client client.Client
	// ClusterCache reaches the workload clusters to taint the Node out of service while
	// its server is power-cycled; nil skips the taint.
	ClusterCache clustercache.ClusterCache
}

// SetupWithManager registers the controller.
func (r *AnvilRemediationReconciler) SetupWithManager(mgr ctrl.Manager, options controller.Options) error {
	return ctrl.NewControllerManagedBy(mgr).For(&infrav1.AnvilRemediation{}).WithOptions(options).Complete(r)
}

// Reconcile follows CAPD's order.
func (r *AnvilRemediationReconciler) Reconcile(ctx context.Context, req ctrl.Request) (_ ctrl.Result, reterr error) {
	rem := &infrav1.AnvilRemediation{}
	if err := r.Client.Get(ctx, req.NamespacedName, rem); err != nil {
		return ctrl.Result{}, client.IgnoreNotFound(err)
	}
	machine, err := util.GetOwnerMachine(ctx, r.Client, rem.ObjectMeta)
	if err != nil {
		return ctrl.Result{}, err
	}
	if machine == nil {
		if !rem.DeletionTimestamp.IsZero() && controllerutil.ContainsFinalizer(rem, infrav1.RemediationFinalizer) {
			// The machine (and its Node) went first: there is no taint left to remove.
			patch := client.MergeFrom(rem.DeepCopy())
			controllerutil.RemoveFinalizer(rem, infrav1.RemediationFinalizer)
			return ctrl.Result{}, r.Client.Patch(ctx, rem, patch)
		}
		return ctrl.Result{}, nil
	}
	cluster, err := util.GetClusterFromMetadata(ctx, r.Client, machine.ObjectMeta)
	if err != nil {
		return ctrl.Result{}, nil // no cluster yet: nothing to remediate against
	}
	if isPaused, requeue, err := paused.EnsurePausedCondition(ctx, r.Client, cluster, rem); err != nil || isPaused || requeue {
		return ctrl.Result{}, err
	}
	helper, err := patch.NewHelper(rem, r.Client)
	if err != nil {
		return ctrl.Result{}, err
	}
	defer func() {
		if err := helper.Patch(ctx, rem); err != nil {
			reterr = kerrors.NewAggregate([]error{reterr, err})
		}
	}()
	if !rem.DeletionTimestamp.IsZero() {
		return r.reconcileDelete(ctx, cluster, machine, rem)
	}
	if r.ClusterCache != nil && controllerutil.AddFinalizer(rem, infrav1.RemediationFinalizer) {
		return ctrl.Result{RequeueAfter: time.Millisecond}, nil // the finalizer is written before any taint
	}
	return r.reconcileNormal(ctx, cluster, machine, rem)
}

// reconcileDelete runs when the MachineHealthCheck saw the node recover (it deletes the
// remediation) or the machine goes: the node is back in service.
func (r *AnvilRemediationReconciler) reconcileDelete(ctx context.Context, cluster *clusterv1.Cluster, machine *clusterv1.Machine, rem *infrav1.AnvilRemediation) (ctrl.Result, error) {
	if err := r.setOutOfService(ctx, cluster, machine, false); err != nil {
		setCondition(rem, "OutOfService", true, "UntaintFailed", err.Error())
		return ctrl.Result{RequeueAfter: 5 * time.Second}, nil
	}
	controllerutil.RemoveFinalizer(rem, infrav1.RemediationFinalizer)
	return ctrl.Result{}, nil
}

func (r *AnvilRemediationReconciler) reconcileNormal(ctx context.Context, cluster *clusterv1.Cluster, machine *clusterv1.Machine, rem *infrav1.AnvilRemediation) (ctrl.Result, error) {
	if rem.Status.Phase == infrav1.RemediationFailed {
		return ctrl.Result{}, nil
	}
	host, err := r.hostOf(ctx, machine)
	if err != nil || host == nil {
		setCondition(rem, "HostFound", false, "NoHost", "the machine holds no host")
		return ctrl.Result{RequeueAfter: 10 * time.Second}, err
	}
	if _, pending := host.Annotations[infrav1.RebootAnnotation]; pending {
		return ctrl.Result{RequeueAfter: 2 * time.Second}, nil // the host controller hasn't cycled it yet
	}
	timeout := 10 * time.Minute
	if rem.Spec.Timeout != nil {
		timeout = rem.Spec.Timeout.Duration
	}
	if last := rem.Status.LastRemediated; last != nil {
		if wait := time.Until(last.Add(timeout)); wait > 0 {
			return ctrl.Result{RequeueAfter: wait}, nil
		}
	}
	if rem.Status.RetryCount < rem.Spec.RetryLimit {
		// Out of service before the power goes: its pods and volumes move now, not after
		// the usual five minutes of an unreachable node.
		if err := r.setOutOfService(ctx, cluster, machine, true); err != nil {
			setCondition(rem, "OutOfService", false, "TaintFailed", err.Error())
			return ctrl.Result{RequeueAfter: 5 * time.Second}, nil
		}
		if r.ClusterCache != nil && machine.Status.NodeRef.IsDefined() {
			setCondition(rem, "OutOfService", true, "Tainted", "node "+machine.Status.NodeRef.Name+" has the out-of-service taint until it recovers")
		}
		rem.Status.RetryCount++
		if host.Annotations == nil {
			host.Annotations = map[string]string{}
		}
		host.Annotations[infrav1.RebootAnnotation] = fmt.Sprintf("%s/%s#%d", rem.Namespace, rem.Name, rem.Status.RetryCount)
		if err := r.Client.Update(ctx, host); err != nil {
			return ctrl.Result{}, err
		}
		now := metav1.Now()
		rem.Status.LastRemediated = &now
		rem.Status.Phase = infrav1.RemediationWaiting
		setCondition(rem, "PowerCycled", true, "PowerCycled", fmt.Sprintf("power cycle %d of %d requested for host %s", rem.Status.RetryCount, rem.Spec.RetryLimit, host.Name))
		return ctrl.Result{RequeueAfter: timeout}, nil
	}

	// Still unhealthy after every power cycle: a permanent fault.
	reason := fmt.Sprintf("needs repair: machine %s stayed unhealthy after %d power cycle(s)", machine.Name, rem.Status.RetryCount)
	if host.Spec.Maintenance == nil {
		host.Spec.Maintenance = &infrav1.Maintenance{Reason: reason}
		if err := r.Client.Update(ctx, host); err != nil {
			return ctrl.Result{}, err
		}
	}
	machineHelper, err := patch.NewHelper(machine, r.Client)
	if err != nil {
		return ctrl.Result{}, err
	}
	conditions.Set(machine, metav1.Condition{Type: clusterv1.MachineOwnerRemediatedCondition, Status: metav1.ConditionFalse,
		Reason: clusterv1.MachineOwnerRemediatedWaitingForRemediationReason, Message: "power cycles did not help; replace the machine"})
	if err := machineHelper.Patch(ctx, machine, patch.WithOwnedConditions{Conditions: []string{clusterv1.MachineOwnerRemediatedCondition}}); err != nil {
		return ctrl.Result{}, err
	}
	rem.Status.Phase = infrav1.RemediationFailed
	setCondition(rem, "PowerCycled", false, "RetriesExhausted", reason)
	return ctrl.Result{}, nil
}

// hostOf finds the host behind a Machine through its AnvilMachine.
func (r *AnvilRemediationReconciler) hostOf(ctx context.Context, machine *clusterv1.Machine) (*infrav1.AnvilHost, error) {
	am := &infrav1.AnvilMachine{}
	if err := r.Client.Get(ctx, client.ObjectKey{Namespace: machine.Namespace, Name: machine.Spec.InfrastructureRef.Name}, am); err != nil {
		return nil, client.IgnoreNotFound(err)
	}
	if am.Status.HostRef == nil {
		return nil, nil
	}
	host := &infrav1.AnvilHost{}
	if err := r.Client.Get(ctx, client.ObjectKey{Namespace: machine.Namespace, Name: am.Status.HostRef.Name}, host); err != nil {
		return nil, client.IgnoreNotFound(err)
	}
	return host, nil
}
