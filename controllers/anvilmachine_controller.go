package controllers

import (
	"context"
	"fmt"
	"math/rand/v2"
	"net"
	"strings"
	"time"

	"k8s.io/apimachinery/pkg/api/equality"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	kerrors "k8s.io/apimachinery/pkg/util/errors"
	toolscache "k8s.io/client-go/tools/cache"
	"k8s.io/client-go/util/workqueue"
	"k8s.io/utils/ptr"
	clusterv1 "sigs.k8s.io/cluster-api/api/core/v1beta2"
	"sigs.k8s.io/cluster-api/controllers/clustercache"
	"sigs.k8s.io/cluster-api/util"
	"sigs.k8s.io/cluster-api/util/annotations"
	"sigs.k8s.io/cluster-api/util/conditions"
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
	"github.com/anvil-metal/cluster-api-provider-anvil/internal/hoststate"
	"github.com/anvil-metal/cluster-api-provider-anvil/internal/placement"
)

// Machine condition types.
const (
	ConditionHostClaimed     = "HostClaimed"
	ConditionHostProvisioned = "HostProvisioned"
	// ConditionImageUpToDate mirrors the host's: whether it runs spec.image (in-place upgrades).
	ConditionImageUpToDate = "ImageUpToDate"
)

// reasonNoMatchingHost says a machine waits because no host fits (the message says why).
const reasonNoMatchingHost = "NoMatchingHost"

// ClaimedByLabel on a host carries the UID of the AnvilMachine that claims it, so "which host
// do I hold?" is one label-selected live read, never answered from a possibly stale cache.
const ClaimedByLabel = infrav1.ClaimedByLabel

// BlockMoveAnnotation is clusterctl's block-move annotation. The machine controller puts it
// on a host together with the claim; the host controller removes it once the host is
// Provisioned (or wiped after a release).
const BlockMoveAnnotation = infrav1.BlockMoveAnnotation

// machineCacheLagRequeue is how soon a machine is looked at again when the cache has not yet
// seen this controller's last write to it (usually well under a second).
const machineCacheLagRequeue = 200 * time.Millisecond

// DefaultReleaseTimeout is how long a deleted machine waits for its host to be wiped before it
// goes anyway, leaving the host in maintenance (never Available unwiped).
const DefaultReleaseTimeout = 20 * time.Minute

// AnvilMachineReconciler claims hosts for machines and reports them to Cluster API.
type AnvilMachineReconciler struct {
	Client client.Client
	// APIReader reads around the cache where a stale read could claim a second host.
	APIReader        client.Reader
	ReleaseTimeout   time.Duration
	WatchFilterValue string
	// ClusterCache reaches the workload clusters (to give a Node that joined without a
	// providerID its own, and copy host labels); nil leaves Nodes alone.
	ClusterCache clustercache.ClusterCache

	// claimable mirrors the cache's claimable hosts in the order a claim prefers them, so a
	// claim looks at a few hosts, not the fleet; claimableSynced reports whether it has been
	// fed the cache's contents yet.
	claimable       placement.Pool
	claimableSynced func() bool
	// claims are the hosts this process is claiming or has just claimed, until the cache
	// shows it: parallel reconciles then choose different hosts instead of racing for the
	// same best one and retrying on conflicts.
	claims claimLedger
	// writes holds each machine back until the cache has this controller's last write to it.
	writes machineWrites
}

// Cache indexes of the machine controller: hosts by the cluster holding them (spreading
// counts those) and machines waiting for a host (a host becoming claimable wakes those only).
const (
	clusterHostIndex    = "anvil.claimCluster"
	waitingMachineIndex = "anvil.waitingForHost"
)

// SetupWithManager registers the controller.
func (r *AnvilMachineReconciler) SetupWithManager(ctx context.Context, mgr ctrl.Manager, options controller.Options) error {
	log := ctrl.LoggerFrom(ctx)
	if err := r.feedClaimablePool(ctx, mgr); err != nil {
		return err
	}
	if err := mgr.GetFieldIndexer().IndexField(ctx, &infrav1.AnvilHost{}, clusterHostIndex, func(o client.Object) []string {
		if c := o.(*infrav1.AnvilHost).Spec.Claim; c != nil && !c.Released && c.ClusterName != "" {
			return []string{c.ClusterName}
		}
		return nil
	}); err != nil {
		return err
	}
	if err := mgr.GetFieldIndexer().IndexField(ctx, &infrav1.AnvilMachine{}, waitingMachineIndex, func(o client.Object) []string {
		if waitingForHost(o.(*infrav1.AnvilMachine)) {
			return []string{"true"}
		}
		return nil
	}); err != nil {
		return err
	}
	clusterToMachines, err := util.ClusterToTypedObjectsMapper(mgr.GetClient(), &infrav1.AnvilMachineList{}, mgr.GetScheme())
	if err != nil {
		return err
	}
	return ctrl.NewControllerManagedBy(mgr).
		// Only this controller writes a machine's status: its own status writes need not wake
		// it (and would find the cache behind them). Spec, labels, annotations (pause) and
		// deletion (which bumps the generation) do.
		For(&infrav1.AnvilMachine{}, builder.WithPredicates(predicate.Or(predicate.GenerationChangedPredicate{},
			predicate.LabelChangedPredicate{}, predicate.AnnotationChangedPredicate{}))).
		Watches(&clusterv1.Machine{}, handler.EnqueueRequestsFromMapFunc(util.MachineToInfrastructureMapFunc(infrav1.GroupVersion.WithKind("AnvilMachine")))).
		Watches(&infrav1.AnvilHost{}, r.hostEvents()).
		// Pausing or unpausing the cluster must reach its machines (clusterctl move), and so
		// must its control plane's start: their Nodes can join from then on.
		Watches(&clusterv1.Cluster{}, handler.EnqueueRequestsFromMapFunc(clusterToMachines),
			builder.WithPredicates(predicates.Any(mgr.GetScheme(), log, predicates.ClusterPausedTransitions(mgr.GetScheme(), log),
				predicates.ClusterControlPlaneInitialized(mgr.GetScheme(), log)))).
		WithOptions(options).
		WithEventFilter(predicates.ResourceHasFilterLabel(mgr.GetScheme(), log, r.WatchFilterValue)).
		Complete(r)
}

// feedClaimablePool keeps r.claimable in step with the host informer.
func (r *AnvilMachineReconciler) feedClaimablePool(ctx context.Context, mgr ctrl.Manager) error {
	informer, err := mgr.GetCache().GetInformer(ctx, &infrav1.AnvilHost{})
	if err != nil {
		return err
	}
	registration, err := informer.AddEventHandler(toolscache.ResourceEventHandlerFuncs{
		AddFunc:    func(obj any) { r.setClaimable(obj) },
		UpdateFunc: func(_, obj any) { r.setClaimable(obj) },
		DeleteFunc: func(obj any) {
			if tombstone, ok := obj.(toolscache.DeletedFinalStateUnknown); ok {
				obj = tombstone.Obj
			}
			if h, ok := obj.(*infrav1.AnvilHost); ok {
				r.claimable.Delete(client.ObjectKeyFromObject(h))
			}
		},
	})
	if err != nil {
		return err
	}
	r.claimableSynced = registration.HasSynced
	return nil
}

func (r *AnvilMachineReconciler) setClaimable(obj any) {
	if h, ok := obj.(*infrav1.AnvilHost); ok {
		r.claimable.Set(h)
	}
}

// hostEvents wakes the machine holding a host whenever the host changes; and when a host
// becomes claimable (created Available, wiped, out of maintenance), the machines waiting for
// one. A host that was claimable already wakes nobody new: the waiting machines have seen it.
func (r *AnvilMachineReconciler) hostEvents() handler.Funcs {
	holder := func(h *infrav1.AnvilHost, q workqueue.TypedRateLimitingInterface[reconcile.Request]) {
		if c := h.Spec.Claim; c != nil {
			q.Add(reconcile.Request{NamespacedName: client.ObjectKey{Namespace: h.Namespace, Name: c.MachineRef.Name}})
		}
	}
	return handler.Funcs{
		CreateFunc: func(ctx context.Context, e event.CreateEvent, q workqueue.TypedRateLimitingInterface[reconcile.Request]) {
			if h, ok := e.Object.(*infrav1.AnvilHost); ok {
				holder(h, q)
				if placement.Claimable(h) {
					r.wakeWaiting(ctx, h.Namespace, q)
				}
			}
		},
		UpdateFunc: func(ctx context.Context, e event.UpdateEvent, q workqueue.TypedRateLimitingInterface[reconcile.Request]) {
			o, okOld := e.ObjectOld.(*infrav1.AnvilHost)
			n, okNew := e.ObjectNew.(*infrav1.AnvilHost)
			if !okOld || !okNew {
				return
			}
			holder(o, q) // a claim that went (released and wiped) concerns its machine too
			holder(n, q)
			if placement.Claimable(n) && !placement.Claimable(o) {
				r.wakeWaiting(ctx, n.Namespace, q)
			}
		},
		DeleteFunc: func(_ context.Context, e event.DeleteEvent, q workqueue.TypedRateLimitingInterface[reconcile.Request]) {
			if h, ok := e.Object.(*infrav1.AnvilHost); ok {
				holder(h, q)
			}
		},
	}
}

// wakeWaiting enqueues the machines of namespace that wait for a host.
func (r *AnvilMachineReconciler) wakeWaiting(ctx context.Context, namespace string, q workqueue.TypedRateLimitingInterface[reconcile.Request]) {
	machines := &infrav1.AnvilMachineList{}
	if err := r.Client.List(ctx, machines, client.InNamespace(namespace), client.MatchingFields{waitingMachineIndex: "true"},
		client.UnsafeDisableDeepCopy); err != nil {
		return
	}
	for i := range machines.Items {
		q.Add(reconcile.Request{NamespacedName: client.ObjectKeyFromObject(&machines.Items[i])})
	}
}

// waitingForHost reports whether a machine found no host the last time it looked.
func waitingForHost(am *infrav1.AnvilMachine) bool {
	return am.Status.HostRef == nil && am.DeletionTimestamp.IsZero() &&
		conditions.GetReason(am, ConditionHostClaimed) == reasonNoMatchingHost
}

// Reconcile follows CAPD's order: object, owner Machine, Cluster, pause, patch on return,
// delete, or finalizer and normal.
func (r *AnvilMachineReconciler) Reconcile(ctx context.Context, req ctrl.Request) (_ ctrl.Result, reterr error) {
	log := ctrl.LoggerFrom(ctx)
	am := &infrav1.AnvilMachine{}
	if err := r.Client.Get(ctx, req.NamespacedName, am); err != nil {
		if apierrors.IsNotFound(err) {
			r.writes.forget(req.NamespacedName)
		}
		return ctrl.Result{}, client.IgnoreNotFound(err)
	}
	if r.writes.cacheBehind(req.NamespacedName, am.ResourceVersion) {
		log.V(4).Info("the cache has not seen this controller's last write yet", "resourceVersion", am.ResourceVersion)
		return ctrl.Result{RequeueAfter: machineCacheLagRequeue}, nil
	}
	machine, err := util.GetOwnerMachine(ctx, r.Client, am.ObjectMeta)
	if err != nil {
		return ctrl.Result{}, err
	}
	if machine == nil {
		log.V(4).Info("waiting for the Machine controller to set the owner reference")
		return ctrl.Result{}, nil
	}
	log = log.WithValues("Machine", klogRef(machine))
	ctx = ctrl.LoggerInto(ctx, log)
	cluster, err := util.GetClusterFromMetadata(ctx, r.Client, machine.ObjectMeta)
	if err != nil {
		log.V(4).Info("machine has no cluster yet")
		return ctrl.Result{}, nil
	}

	// Pause comes before deletion: clusterctl move pauses, then deletes the source objects,
	// and that deletion must not release (and wipe) the hosts.
	if annotations.IsPaused(cluster, am) {
		_, _, err := paused.EnsurePausedCondition(ctx, r.Client, cluster, am)
		return ctrl.Result{}, err
	}

	before := am.DeepCopy()
	defer func() {
		// Paused=False goes out with the first status write there is anyway (or at once when
		// the machine was paused): never a write of its own.
		if !equality.Semantic.DeepEqual(before.Status, am.Status) || conditions.IsTrue(before, clusterv1.PausedCondition) {
			setNotPaused(am)
		}
		wrote, err := patchMachine(ctx, r.Client, before, am)
		if err != nil {
			reterr = kerrors.NewAggregate([]error{reterr, err})
		}
		if wrote {
			r.writes.remember(req.NamespacedName, am.ResourceVersion)
		}
	}()

	if !am.DeletionTimestamp.IsZero() {
		return r.reconcileDelete(ctx, cluster.Name, am)
	}
	// The finalizer is persisted before any claim, with the providerID of the host about to
	// be claimed in the same write (rather than in one of its own once the host is
	// provisioned), so no machine can vanish without releasing its host. A machine that had
	// no finalizer (nor a providerID, as a machine restored without its finalizers would
	// have) has therefore never claimed a host. Status waits for the patch on return.
	neverClaimed := controllerutil.AddFinalizer(am, infrav1.MachineFinalizer) && am.Spec.ProviderID == nil
	intent := func(providerID string) error {
		am.Spec.ProviderID = &providerID
		stored := before.Status
		wrote, err := patchMachineSpec(ctx, r.Client, before, am)
		if err != nil {
			return fmt.Errorf("patching AnvilMachine %s before claiming a host: %w", am.Name, err)
		}
		if wrote {
			r.writes.remember(req.NamespacedName, am.ResourceVersion)
			before = am.DeepCopy()
			before.Status = stored
		}
		return nil
	}
	return r.reconcileNormal(ctx, cluster, machine, am, neverClaimed, intent)
}

// setNotPaused records that the machine is reconciled (the pause path writes Paused=True).
// The condition's transition time is kept while it stays False.
func setNotPaused(am *infrav1.AnvilMachine) {
	conditions.Set(am, metav1.Condition{Type: clusterv1.PausedCondition, Status: metav1.ConditionFalse,
		Reason: clusterv1.NotPausedReason, ObservedGeneration: am.Generation})
}

// claimIntent persists the machine's finalizer and the providerID of the host it is about to
// claim (one write, none when both are stored already).
type claimIntent func(providerID string) error

func (r *AnvilMachineReconciler) reconcileNormal(ctx context.Context, cluster *clusterv1.Cluster, machine *clusterv1.Machine, am *infrav1.AnvilMachine, neverClaimed bool, intent claimIntent) (ctrl.Result, error) {
	if machine.Spec.Bootstrap.DataSecretName == nil {
		setCondition(am, ConditionHostClaimed, false, "WaitingForBootstrapData", "waiting for the Machine's bootstrap data Secret")
		setCondition(am, clusterv1.ReadyCondition, false, "WaitingForBootstrapData", "waiting for the Machine's bootstrap data Secret")
		return ctrl.Result{}, nil
	}

	var host *infrav1.AnvilHost
	var err error
	if !neverClaimed {
		if host, err = r.claimedHost(ctx, cluster.Name, am); err != nil {
			return ctrl.Result{}, err
		}
	}
	if host == nil {
		var result ctrl.Result
		host, result, err = r.claimHost(ctx, cluster, machine, am, intent)
		if err != nil || host == nil {
			return result, err
		}
	}
	am.Status.HostRef = &infrav1.MachineHostReference{Name: host.Name}
	am.Status.FailureDomain = host.Labels[r.failureDomainLabel(ctx, cluster)]
	setCondition(am, ConditionHostClaimed, true, "Claimed", "holding host "+host.Name)

	if err := r.syncImage(ctx, host, am); err != nil {
		return ctrl.Result{}, err
	}
	switch host.Status.State {
	case infrav1.HostStateProvisioned:
		providerID := providerIDFor(host)
		am.Spec.ProviderID = &providerID
		am.Status.Addresses = machineAddresses(host)
		am.Status.Initialization.Provisioned = ptr.To(true)
		setCondition(am, ConditionHostProvisioned, true, "Provisioned", "host "+host.Name+" runs the image")
		setCondition(am, clusterv1.ReadyCondition, true, "Ready", "")
		return r.reconcileNode(ctx, cluster, machine, am, host)
	case infrav1.HostStateUpgrading:
		// The machine keeps its node through the upgrade: the active slot stays bootable (the
		// host blocks clusterctl move meanwhile).
		setCondition(am, ConditionHostProvisioned, true, "Upgrading", "host "+host.Name+" is writing a new image into its inactive slot")
		return ctrl.Result{}, nil
	}
	msg := fmt.Sprintf("host %s is %s", host.Name, host.Status.State)
	if host.Status.LastError != nil {
		msg += ": " + host.Status.LastError.Reason + ": " + host.Status.LastError.Message
	}
	setCondition(am, ConditionHostProvisioned, false, "WaitingForHost", msg)
	setCondition(am, clusterv1.ReadyCondition, false, "WaitingForHost", msg)
	return ctrl.Result{}, nil // the host watch wakes us
}

// syncImage hands a changed spec.image to the provisioned host (an in-place A/B upgrade, see
// internal/hoststate/upgrade.go) and mirrors the host's ImageUpToDate condition.
func (r *AnvilMachineReconciler) syncImage(ctx context.Context, host *infrav1.AnvilHost, am *infrav1.AnvilMachine) error {
	claim := host.Spec.Claim
	if claim == nil || claim.Image == nil || (host.Status.State != infrav1.HostStateProvisioned && host.Status.State != infrav1.HostStateUpgrading) {
		return nil
	}
	if cond := conditions.Get(host, hoststate.ConditionImageUpToDate); cond != nil {
		conditions.Set(am, metav1.Condition{Type: ConditionImageUpToDate, Status: cond.Status, Reason: cond.Reason, Message: cond.Message})
	}
	if equality.Semantic.DeepEqual(*claim.Image, am.Spec.Image) {
		return nil
	}
	if am.Spec.Image.Layout != infrav1.ImageLayoutABRoot || claim.Image.Layout != infrav1.ImageLayoutABRoot {
		setCondition(am, ConditionImageUpToDate, false, "InPlaceUpgradeUnsupported",
			"only ABRoot images are upgraded in place; a whole-disk image changes by replacing the machine")
		return nil
	}
	ctrl.LoggerFrom(ctx).Info("in-place upgrade requested", "host", host.Name, "from", claim.Image.URL, "to", am.Spec.Image.URL)
	claim.Image = am.Spec.Image.DeepCopy()
	// The update carries the host's resourceVersion: a conflict re-reads and retries.
	if err := r.Client.Update(ctx, host); err != nil {
		return err
	}
	return nil
}

// claimHost chooses and claims a host with an update that carries the host's
// resourceVersion: if anyone changed the host since we read it, the update fails and we
// choose again. No lock is held; two machines can never both win one host.
func (r *AnvilMachineReconciler) claimHost(ctx context.Context, cluster *clusterv1.Cluster, machine *clusterv1.Machine, am *infrav1.AnvilMachine, intent claimIntent) (*infrav1.AnvilHost, ctrl.Result, error) {
	if !r.claimableSynced() {
		return nil, ctrl.Result{RequeueAfter: time.Second}, nil
	}
	req := placement.Request{Hardware: am.Spec.Hardware, FailureDomainLabel: r.failureDomainLabel(ctx, cluster)}
	if machine.Spec.FailureDomain != "" {
		req.FailureDomain = machine.Spec.FailureDomain
	} else {
		// Spreading counts the hosts the cluster holds (not among the claimable ones).
		held := &infrav1.AnvilHostList{}
		if err := r.Client.List(ctx, held, client.InNamespace(am.Namespace), client.MatchingFields{clusterHostIndex: machine.Spec.ClusterName},
			client.UnsafeDisableDeepCopy); err != nil {
			return nil, ctrl.Result{}, err
		}
		req.SpreadCluster = machine.Spec.ClusterName
		req.ClusterLoad = placement.ClusterLoad(held.Items, req.FailureDomainLabel, machine.Spec.ClusterName)
	}
	if am.Spec.HostSelector != nil {
		sel, err := metav1.LabelSelectorAsSelector(am.Spec.HostSelector)
		if err != nil {
			// A user error, not a transient one: say so and wait for the spec to change.
			setCondition(am, ConditionHostClaimed, false, "InvalidHostSelector", "spec.hostSelector: "+err.Error())
			return nil, ctrl.Result{}, nil //nolint:nilerr // retrying cannot fix the spec; the condition reports it
		}
		req.Selector = sel
	}
	// Hosts that this process is claiming right now, or claimed so recently that the cache
	// does not show it yet, count as claimed: each racing reconcile takes the best host left.
	// So do hosts whose cached copy a claim was just refused for.
	ledger := r.claims.view()
	req.Claimed = ledger.passOver
	choice := r.claimable.Choose(am.Namespace, req)
	r.claims.settled(ledger, r.claimable.Version)
	if choice.Host == nil {
		// Explaining the wait takes every host into account, not only the claimable ones.
		hosts := &infrav1.AnvilHostList{}
		if err := r.Client.List(ctx, hosts, client.InNamespace(am.Namespace), client.UnsafeDisableDeepCopy); err != nil {
			return nil, ctrl.Result{}, err
		}
		choice = placement.Choose(hosts.Items, req)
	}
	if choice.Host == nil {
		msg := choice.Explain()
		if req.FailureDomain != "" {
			msg += " (failure domain " + req.FailureDomain + ")"
		}
		setCondition(am, ConditionHostClaimed, false, reasonNoMatchingHost, msg)
		setCondition(am, clusterv1.ReadyCondition, false, reasonNoMatchingHost, msg)
		unreserved := req
		unreserved.Claimed = nil
		if r.claimable.Choose(am.Namespace, unreserved).Host != nil {
			// A host that fits was passed over only while a claim of it is in flight, or
			// until the cache has its latest version: it may be free in a moment, and no
			// event says so.
			return nil, ctrl.Result{RequeueAfter: time.Second}, nil
		}
		return nil, ctrl.Result{RequeueAfter: time.Minute}, nil
	}

	host := choice.Host.DeepCopy()
	key := client.ObjectKeyFromObject(host)
	if !r.claims.reserve(key, am.UID, host.ResourceVersion) {
		// Another reconcile took it between the snapshot and now: choose again at once.
		return nil, ctrl.Result{RequeueAfter: time.Millisecond}, nil
	}
	if err := intent(providerIDFor(host)); err != nil {
		r.claims.release(key, am.UID)
		return nil, ctrl.Result{}, err
	}
	host.Spec.Claim = &infrav1.HostClaim{
		MachineRef:             infrav1.MachineReference{Name: am.Name, UID: am.UID},
		ClusterName:            cluster.Name,
		Image:                  am.Spec.Image.DeepCopy(),
		BootstrapDataSecretRef: &infrav1.LocalSecretReference{Name: *machine.Spec.Bootstrap.DataSecretName},
		ProviderID:             providerIDFor(host),
		WipePolicy:             am.Spec.WipePolicy,
	}
	if host.Labels == nil {
		host.Labels = map[string]string{}
	}
	host.Labels[ClaimedByLabel] = string(am.UID)
	if host.Annotations == nil {
		host.Annotations = map[string]string{}
	}
	// From the claim until the host is Provisioned, clusterctl move waits (the host
	// controller removes this).
	host.Annotations[BlockMoveAnnotation] = "true"
	chosenVersion := host.ResourceVersion
	if err := r.Client.Update(ctx, host); err != nil {
		if apierrors.IsConflict(err) {
			r.claims.refused(key, am.UID, chosenVersion)
			// The providerID went out naming this host: it must not stay on a machine that
			// waits (the patch at the end of the reconcile takes it back; the next claim may
			// set another).
			am.Spec.ProviderID = nil
			// Someone else changed the host first: choose again soon, with jitter so racing
			// machines spread out.
			return nil, ctrl.Result{RequeueAfter: time.Duration(50+rand.IntN(200)) * time.Millisecond}, nil //nolint:gosec // jitter
		}
		r.claims.release(key, am.UID)
		return nil, ctrl.Result{}, err
	}
	ctrl.LoggerFrom(ctx).Info("claimed host", "host", host.Name, "reason", choice.Explain())
	return host, ctrl.Result{}, nil
}

// claimedHost returns the host this machine holds, read live from the API server. A
// machine that `clusterctl move` recreated (new UID) finds its host through its providerID
// and adopts it.
func (r *AnvilMachineReconciler) claimedHost(ctx context.Context, clusterName string, am *infrav1.AnvilMachine) (*infrav1.AnvilHost, error) {
	host, err := r.heldHost(ctx, am)
	if host != nil || err != nil {
		return host, err
	}
	return r.adoptMovedHost(ctx, clusterName, am)
}

// heldHost returns the host whose claim carries this machine's UID, or nil. The host named
// in status is read from the cache, which cannot show a claim that was never made; whenever
// that does not confirm the claim (no host recorded yet, or a cache behind the claim), the
// answer comes from the API server itself, by the claimed-by label, so that a lagging cache
// never leads to a second claim.
func (r *AnvilMachineReconciler) heldHost(ctx context.Context, am *infrav1.AnvilMachine) (*infrav1.AnvilHost, error) {
	if ref := am.Status.HostRef; ref != nil {
		host := &infrav1.AnvilHost{}
		err := r.Client.Get(ctx, client.ObjectKey{Namespace: am.Namespace, Name: ref.Name}, host)
		if client.IgnoreNotFound(err) != nil {
			return nil, err
		}
		if err == nil && host.Spec.Claim != nil && host.Spec.Claim.MachineRef.UID == am.UID {
			return host, nil
		}
	}
	hosts := &infrav1.AnvilHostList{}
	if err := r.APIReader.List(ctx, hosts, client.InNamespace(am.Namespace), client.MatchingLabels{ClaimedByLabel: string(am.UID)}); err != nil {
		return nil, err
	}
	for i := range hosts.Items {
		if c := hosts.Items[i].Spec.Claim; c != nil && c.MachineRef.UID == am.UID {
			return &hosts.Items[i], nil
		}
	}
	return nil, nil
}

// adoptMovedHost takes back the host of a machine that clusterctl move recreated: the host
// its providerID names, if that host's claim is for a machine of this name in this cluster
// with this providerID, under another UID. (Only provisioned machines are moved with hosts:
// a claimed host blocks the move until it is Provisioned, and the machine's providerID is set
// from then on.) The claim's UID and the claimed-by label are updated with the
// resourceVersion just read, so a racing writer makes the adoption fail and retry. A new
// machine has no providerID, so it never adopts anything.
func (r *AnvilMachineReconciler) adoptMovedHost(ctx context.Context, clusterName string, am *infrav1.AnvilMachine) (*infrav1.AnvilHost, error) {
	if am.Spec.ProviderID == nil {
		return nil, nil
	}
	name := hostFromProviderID(am.Namespace, *am.Spec.ProviderID)
	if name == "" {
		return nil, nil
	}
	host := &infrav1.AnvilHost{}
	if err := r.APIReader.Get(ctx, client.ObjectKey{Namespace: am.Namespace, Name: name}, host); err != nil {
		return nil, client.IgnoreNotFound(err)
	}
	c := host.Spec.Claim
	switch {
	case c == nil, c.Released, c.MachineRef.UID == am.UID, c.MachineRef.Name != am.Name, c.ClusterName != clusterName,
		c.ProviderID != *am.Spec.ProviderID:
		return nil, nil
	}
	oldUID := c.MachineRef.UID
	c.MachineRef.UID = am.UID
	if host.Labels == nil {
		host.Labels = map[string]string{}
	}
	host.Labels[ClaimedByLabel] = string(am.UID)
	if err := r.Client.Update(ctx, host); err != nil {
		return nil, fmt.Errorf("adopting host %s (claimed by this machine's previous UID %s): %w", host.Name, oldUID, err)
	}
	ctrl.LoggerFrom(ctx).Info("adopted the host this machine held before it was recreated (clusterctl move)", "host", host.Name, "previousUID", oldUID)
	return host, nil
}

// providerIDFor is the providerID of the node a host runs: anvil://<namespace>/<host>.
func providerIDFor(h *infrav1.AnvilHost) string {
	return fmt.Sprintf("anvil://%s/%s", h.Namespace, h.Name)
}

// hostFromProviderID returns the host name in an anvil:// providerID of this namespace.
func hostFromProviderID(namespace, providerID string) string {
	rest, ok := strings.CutPrefix(providerID, "anvil://"+namespace+"/")
	if !ok || rest == "" || strings.Contains(rest, "/") {
		return ""
	}
	return rest
}

// reconcileDelete releases the host and waits until it has been wiped; after ReleaseTimeout
// it gives up waiting, leaving the host in maintenance with the released claim, so that it is
// wiped before it is ever handed out again.
func (r *AnvilMachineReconciler) reconcileDelete(ctx context.Context, clusterName string, am *infrav1.AnvilMachine) (ctrl.Result, error) {
	host, err := r.claimedHost(ctx, clusterName, am)
	if err != nil {
		return ctrl.Result{}, err
	}
	if host == nil {
		controllerutil.RemoveFinalizer(am, infrav1.MachineFinalizer)
		return ctrl.Result{}, nil
	}
	if !host.Spec.Claim.Released {
		host.Spec.Claim.Released = true
		host.Spec.Claim.WipePolicy = am.Spec.WipePolicy
		if err := r.Client.Update(ctx, host); err != nil {
			return ctrl.Result{RequeueAfter: time.Second}, client.IgnoreNotFound(err)
		}
		setCondition(am, ConditionHostClaimed, false, "Releasing", "host "+host.Name+" is being wiped ("+string(am.Spec.WipePolicy)+")")
		return ctrl.Result{RequeueAfter: 2 * time.Second}, nil
	}
	if host.Spec.Maintenance != nil {
		// The host is out for repair (e.g. after a failed remediation): its released claim
		// makes it wipe when the operator clears maintenance, so the machine need not wait.
		controllerutil.RemoveFinalizer(am, infrav1.MachineFinalizer)
		return ctrl.Result{}, nil
	}
	timeout := r.ReleaseTimeout
	if timeout <= 0 {
		timeout = DefaultReleaseTimeout
	}
	if time.Since(am.DeletionTimestamp.Time) > timeout && host.Spec.Maintenance == nil {
		reason := "release of machine " + am.Name + " timed out; the host was not wiped and will be when maintenance is cleared"
		if host.Status.LastError != nil {
			reason += " (last error: " + host.Status.LastError.Reason + ")"
		}
		host.Spec.Maintenance = &infrav1.Maintenance{Reason: reason}
		if err := r.Client.Update(ctx, host); err != nil {
			return ctrl.Result{RequeueAfter: time.Second}, client.IgnoreNotFound(err)
		}
		controllerutil.RemoveFinalizer(am, infrav1.MachineFinalizer)
		return ctrl.Result{}, nil
	}
	setCondition(am, ConditionHostClaimed, false, "Releasing", fmt.Sprintf("host %s is %s", host.Name, host.Status.State))
	return ctrl.Result{RequeueAfter: 2 * time.Second}, nil
}

// failureDomainLabel is the AnvilCluster's label for failure domains (or the default).
func (r *AnvilMachineReconciler) failureDomainLabel(ctx context.Context, cluster *clusterv1.Cluster) string {
	ref := cluster.Spec.InfrastructureRef
	if ref.Name == "" {
		return infrav1.DefaultFailureDomainLabel
	}
	ac := &infrav1.AnvilCluster{}
	if err := r.Client.Get(ctx, client.ObjectKey{Namespace: cluster.Namespace, Name: ref.Name}, ac); err != nil || ac.Spec.FailureDomainLabel == "" {
		return infrav1.DefaultFailureDomainLabel
	}
	return ac.Spec.FailureDomainLabel
}

// machineAddresses reports the host's name and the addresses it is known by.
func machineAddresses(h *infrav1.AnvilHost) clusterv1.MachineAddresses {
	addrs := clusterv1.MachineAddresses{{Type: clusterv1.MachineHostName, Address: h.Name}}
	seen := map[string]bool{}
	add := func(ip string) {
		if ip == "" || seen[ip] {
			return
		}
		seen[ip] = true
		addrs = append(addrs, clusterv1.MachineAddress{Type: clusterv1.MachineInternalIP, Address: ip})
	}
	if bn := h.Spec.BootNetwork; bn != nil {
		if ip, _, err := net.ParseCIDR(bn.Address); err == nil {
			add(ip.String())
		}
	}
	if hw := h.Status.Hardware; hw != nil {
		for _, nic := range hw.NICs {
			for _, ip := range nic.IPs {
				add(strings.SplitN(ip, "/", 2)[0])
			}
		}
	}
	return addrs
}

func setCondition(obj conditions.Setter, condType string, ok bool, reason, message string) {
	status := metav1.ConditionFalse
	if ok {
		status = metav1.ConditionTrue
	}
	conditions.Set(obj, metav1.Condition{Type: condType, Status: status, Reason: reason, Message: message})
}

func klogRef(o client.Object) string { return o.GetNamespace() + "/" + o.GetName() }
