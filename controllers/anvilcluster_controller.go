package controllers

import (
	"context"
	"maps"
	"slices"
	"sort"

	kerrors "k8s.io/apimachinery/pkg/util/errors"
	"k8s.io/utils/ptr"
	clusterv1 "sigs.k8s.io/cluster-api/api/core/v1beta2"
	"sigs.k8s.io/cluster-api/util"
	"sigs.k8s.io/cluster-api/util/patch"
	"sigs.k8s.io/cluster-api/util/paused"
	"sigs.k8s.io/cluster-api/util/predicates"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/builder"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/controller"
	"sigs.k8s.io/controller-runtime/pkg/controller/controllerutil"
	"sigs.k8s.io/controller-runtime/pkg/event"
	"sigs.k8s.io/controller-runtime/pkg/handler"
	"sigs.k8s.io/controller-runtime/pkg/predicate"
	"sigs.k8s.io/controller-runtime/pkg/reconcile"

	infrav1 "github.com/anvil-metal/cluster-api-provider-anvil/api/v1alpha1"
)

// AnvilClusterReconciler publishes failure domains and the control-plane endpoint.
type AnvilClusterReconciler struct {
	Client           client.Client
	WatchFilterValue string
}

// SetupWithManager registers the controller.
func (r *AnvilClusterReconciler) SetupWithManager(ctx context.Context, mgr ctrl.Manager, options controller.Options) error {
	log := ctrl.LoggerFrom(ctx)
	return ctrl.NewControllerManagedBy(mgr).
		For(&infrav1.AnvilCluster{}).
		Watches(&clusterv1.Cluster{}, handler.EnqueueRequestsFromMapFunc(util.ClusterToInfrastructureMapFunc(ctx,
			infrav1.GroupVersion.WithKind("AnvilCluster"), mgr.GetClient(), &infrav1.AnvilCluster{}))).
		// A host joining or leaving a zone changes the failure domains; its claims, status
		// and the rest of a host's life do not.
		Watches(&infrav1.AnvilHost{}, handler.EnqueueRequestsFromMapFunc(r.hostToClusters),
			builder.WithPredicates(hostFailureDomainChanged())).
		WithOptions(options).
		WithEventFilter(predicates.ResourceHasFilterLabel(mgr.GetScheme(), log, r.WatchFilterValue)).
		Complete(r)
}

// hostFailureDomainChanged passes the host events that can change a namespace's failure
// domains: a host created or deleted, relabelled (other than by a claim), or retired.
func hostFailureDomainChanged() predicate.Funcs {
	return predicate.Funcs{
		UpdateFunc: func(e event.UpdateEvent) bool {
			o, okOld := e.ObjectOld.(*infrav1.AnvilHost)
			n, okNew := e.ObjectNew.(*infrav1.AnvilHost)
			if !okOld || !okNew {
				return true
			}
			retired := func(h *infrav1.AnvilHost) bool {
				return h.Spec.Retire || h.Status.State == infrav1.HostStateRetired
			}
			withoutClaim := func(l map[string]string) map[string]string {
				out := maps.Clone(l)
				delete(out, ClaimedByLabel)
				return out
			}
			return retired(o) != retired(n) || !maps.Equal(withoutClaim(o.Labels), withoutClaim(n.Labels))
		},
	}
}

func (r *AnvilClusterReconciler) hostToClusters(ctx context.Context, o client.Object) []reconcile.Request {
	clusters := &infrav1.AnvilClusterList{}
	if err := r.Client.List(ctx, clusters, client.InNamespace(o.GetNamespace()), client.UnsafeDisableDeepCopy); err != nil {
		return nil
	}
	reqs := make([]reconcile.Request, 0, len(clusters.Items))
	for _, c := range clusters.Items {
		reqs = append(reqs, reconcile.Request{NamespacedName: client.ObjectKeyFromObject(&c)})
	}
	return reqs
}

// Reconcile follows CAPD's order.
func (r *AnvilClusterReconciler) Reconcile(ctx context.Context, req ctrl.Request) (_ ctrl.Result, reterr error) {
	ac := &infrav1.AnvilCluster{}
	if err := r.Client.Get(ctx, req.NamespacedName, ac); err != nil {
		return ctrl.Result{}, client.IgnoreNotFound(err)
	}
	cluster, err := util.GetOwnerCluster(ctx, r.Client, ac.ObjectMeta)
	if err != nil {
		return ctrl.Result{}, err
	}
	if cluster == nil {
		return ctrl.Result{}, nil // waiting for the Cluster controller's owner reference
	}
	if isPaused, requeue, err := paused.EnsurePausedCondition(ctx, r.Client, cluster, ac); err != nil || isPaused || requeue {
		return ctrl.Result{}, err
	}
	helper, err := patch.NewHelper(ac, r.Client)
	if err != nil {
		return ctrl.Result{}, err
	}
	defer func() {
		if err := helper.Patch(ctx, ac, patch.WithOwnedConditions{Conditions: []string{clusterv1.ReadyCondition, clusterv1.PausedCondition}}); err != nil {
			reterr = kerrors.NewAggregate([]error{reterr, err})
		}
	}()
	if !ac.DeletionTimestamp.IsZero() {
		// Machines release their own hosts; the cluster has nothing physical to undo.
		controllerutil.RemoveFinalizer(ac, infrav1.ClusterFinalizer)
		return ctrl.Result{}, nil
	}
	if controllerutil.AddFinalizer(ac, infrav1.ClusterFinalizer) {
		return ctrl.Result{}, nil
	}

	fds, err := r.failureDomains(ctx, ac)
	if err != nil {
		return ctrl.Result{}, err
	}
	ac.Status.FailureDomains = fds

	if !ac.Spec.ControlPlaneEndpoint.IsValid() && cluster.Spec.ControlPlaneEndpoint.IsValid() {
		ac.Spec.ControlPlaneEndpoint = cluster.Spec.ControlPlaneEndpoint
	}
	if !ac.Spec.ControlPlaneEndpoint.IsValid() {
		setCondition(ac, clusterv1.ReadyCondition, false, "WaitingForControlPlaneEndpoint",
			"set spec.controlPlaneEndpoint (host and port of the control-plane VIP, e.g. the kube-vip address)")
		return ctrl.Result{}, nil
	}
	ac.Status.Initialization.Provisioned = ptr.To(true)
	setCondition(ac, clusterv1.ReadyCondition, true, "Ready", "")
	return ctrl.Result{}, nil
}

// failureDomains lists the distinct values of the failure-domain label over the namespace's
// hosts that can still serve (retired hosts are gone for good).
func (r *AnvilClusterReconciler) failureDomains(ctx context.Context, ac *infrav1.AnvilCluster) ([]clusterv1.FailureDomain, error) {
	hosts := &infrav1.AnvilHostList{}
	// Read-only use of the cache's own objects: no copy of the fleet per reconcile.
	if err := r.Client.List(ctx, hosts, client.InNamespace(ac.Namespace), client.UnsafeDisableDeepCopy); err != nil {
		return nil, err
	}
	label := ac.Spec.FailureDomainLabel
	if label == "" {
		label = infrav1.DefaultFailureDomainLabel
	}
	names := map[string]bool{}
	for _, h := range hosts.Items {
		if zone := h.Labels[label]; zone != "" && !h.Spec.Retire && h.Status.State != infrav1.HostStateRetired {
			names[zone] = true
		}
	}
	sorted := make([]string, 0, len(names))
	for n := range names {
		sorted = append(sorted, n)
	}
	sort.Strings(sorted)
	fds := make([]clusterv1.FailureDomain, 0, len(sorted))
	for _, n := range sorted {
		cp := len(ac.Spec.ControlPlaneFailureDomains) == 0 || slices.Contains(ac.Spec.ControlPlaneFailureDomains, n)
		fds = append(fds, clusterv1.FailureDomain{Name: n, ControlPlane: ptr.To(cp)})
	}
	return fds, nil
}
