package controllers

import (
	"context"
	"fmt"
	"sync"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	kerrors "k8s.io/apimachinery/pkg/util/errors"
	"k8s.io/client-go/tools/events"
	"sigs.k8s.io/cluster-api/util/conditions"
	"sigs.k8s.io/cluster-api/util/predicates"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/builder"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/controller"
	"sigs.k8s.io/controller-runtime/pkg/controller/controllerutil"
	"sigs.k8s.io/controller-runtime/pkg/event"
	"sigs.k8s.io/controller-runtime/pkg/handler"
	"sigs.k8s.io/controller-runtime/pkg/reconcile"
	"sigs.k8s.io/controller-runtime/pkg/source"

	infrav1 "github.com/anvil-metal/cluster-api-provider-anvil/api/v1alpha1"
	"github.com/anvil-metal/cluster-api-provider-anvil/internal/bmc"
	"github.com/anvil-metal/cluster-api-provider-anvil/internal/hoststate"
)

// secretNameIndex indexes hosts by every Secret they reference, so a created or rotated
// Secret wakes exactly the hosts that use it.
const secretNameIndex = "spec.bmc.secretNames" //nolint:gosec // an index name, not a credential

// staleCacheRequeue is how soon a host is looked at again when the cache has not yet seen
// this controller's last write to it (usually well under a second).
const staleCacheRequeue = 500 * time.Millisecond

// AnvilHostReconciler runs the host state machine. It is the only writer of host status and
// the only component that talks to BMCs.
//
// In steady state it writes nothing: power is polled and compared in memory, and BMC
// liveness shows in the BMCReachable condition, which changes only when reachability does.
// Each reconcile writes at most a metadata/spec patch, a status patch and one Event.
type AnvilHostReconciler struct {
	Client       client.Client
	Recorder     events.EventRecorder
	StateMachine *hoststate.Machine
	Pool         *bmc.Pool
	// BMCTimeout bounds each BMC call.
	BMCTimeout       time.Duration
	WatchFilterValue string
	// Wake, when set, delivers hosts to reconcile at once (the agent reported progress).
	Wake <-chan event.TypedGenericEvent[*infrav1.AnvilHost]

	// powerSyncedAt is when each host's power was last read (by UID): kept in memory so that
	// polling writes nothing; lost on restart, which only causes one early poll.
	powerSyncedAt sync.Map
	// written is the resourceVersion of each host's last write until the cache has it.
	written writtenVersions
	// caPools holds parsed CA bundles by Secret version.
	caPools caPools
	// movable labels the hosts' Secrets for clusterctl move.
	movable movableSecrets
}

// SetupWithManager registers the controller.
func (r *AnvilHostReconciler) SetupWithManager(ctx context.Context, mgr ctrl.Manager, options controller.Options) error {
	if err := mgr.GetFieldIndexer().IndexField(ctx, &infrav1.AnvilHost{}, secretNameIndex, func(o client.Object) []string {
		h := o.(*infrav1.AnvilHost)
		names := []string{h.Spec.BMC.CredentialsRef.Name}
		if h.Spec.BMC.CABundleRef != nil {
			names = append(names, h.Spec.BMC.CABundleRef.Name)
		}
		return names
	}); err != nil {
		return err
	}
	log := ctrl.LoggerFrom(ctx)
	b := ctrl.NewControllerManagedBy(mgr)
	if r.Wake != nil {
		b = b.WatchesRawSource(source.Channel(r.Wake, &handler.TypedEnqueueRequestForObject[*infrav1.AnvilHost]{}))
	}
	return b.
		For(&infrav1.AnvilHost{}, builder.WithPredicates(hostChangedByOthers())).
		Watches(&corev1.Secret{}, handler.EnqueueRequestsFromMapFunc(r.secretToHosts), builder.WithPredicates(secretDataChanged())).
		WithOptions(options).
		WithEventFilter(predicates.ResourceHasFilterLabel(mgr.GetScheme(), log, r.WatchFilterValue)).
		Complete(r)
}

func (r *AnvilHostReconciler) secretToHosts(ctx context.Context, o client.Object) []reconcile.Request {
	hosts := &infrav1.AnvilHostList{}
	if err := r.Client.List(ctx, hosts, client.InNamespace(o.GetNamespace()), client.MatchingFields{secretNameIndex: o.GetName()}); err != nil {
		return nil
	}
	reqs := make([]reconcile.Request, 0, len(hosts.Items))
	for _, h := range hosts.Items {
		reqs = append(reqs, reconcile.Request{NamespacedName: client.ObjectKeyFromObject(&h)})
	}
	return reqs
}

// Reconcile follows CAPI's order: get, patch on return, delete or finalizer and normal.
func (r *AnvilHostReconciler) Reconcile(ctx context.Context, req ctrl.Request) (_ ctrl.Result, reterr error) {
	log := ctrl.LoggerFrom(ctx)
	host := &infrav1.AnvilHost{}
	if err := r.Client.Get(ctx, req.NamespacedName, host); err != nil {
		if apierrors.IsNotFound(err) {
			r.Pool.Forget(ctx, req.String())
			r.written.forget(req.NamespacedName)
			return ctrl.Result{}, nil
		}
		return ctrl.Result{}, err
	}
	if r.written.cacheBehind(req.NamespacedName, host.ResourceVersion) {
		log.V(4).Info("the cache has not seen this controller's last write yet", "resourceVersion", host.ResourceVersion)
		return ctrl.Result{RequeueAfter: staleCacheRequeue}, nil
	}

	// Everything the reconcile changes is written when it returns, then its Event is sent:
	// a state change whose write failed is done again, and reported, by the next reconcile.
	before := host.DeepCopy()
	var events []hoststate.Event
	defer func() {
		wrote, err := patchHost(ctx, r.Client, before, host)
		if err != nil {
			reterr = kerrors.NewAggregate([]error{reterr, fmt.Errorf("patching host: %w", err)})
			return
		}
		if wrote {
			r.written.remember(req.NamespacedName, host.ResourceVersion)
		}
		r.record(host, events)
	}()

	if !host.DeletionTimestamp.IsZero() {
		return r.reconcileDelete(ctx, host)
	}
	if controllerutil.AddFinalizer(host, infrav1.HostFinalizer) {
		log.V(4).Info("added finalizer")
	}
	var result ctrl.Result
	result, events = r.reconcileNormal(ctx, host)
	return result, nil
}

// record sends one Event for what a reconcile did (see foldEvents).
func (r *AnvilHostReconciler) record(host *infrav1.AnvilHost, events []hoststate.Event) {
	e, ok := foldEvents(events)
	if !ok {
		return
	}
	kind := corev1.EventTypeNormal
	if e.Warning {
		kind = corev1.EventTypeWarning
	}
	r.Recorder.Eventf(host, nil, kind, e.Reason, "Reconcile", "%s", e.Message)
}

func (r *AnvilHostReconciler) reconcileNormal(ctx context.Context, host *infrav1.AnvilHost) (ctrl.Result, []hoststate.Event) {
	target, targetErr := r.resolveTarget(ctx, host)
	var lastSync time.Time
	if v, ok := r.powerSyncedAt.Load(host.UID); ok {
		lastSync = v.(time.Time)
	}
	if _, ok := host.Annotations[infrav1.SyncPowerAnnotation]; ok {
		lastSync = time.Time{} // on demand: read power now
		delete(host.Annotations, infrav1.SyncPowerAnnotation)
	}
	before := host.Status.State
	res := r.StateMachine.Step(ctx, hoststate.Input{Host: host, Target: target, TargetErr: targetErr, LastPowerSync: lastSync})

	if res.PowerSynced {
		r.powerSyncedAt.Store(host.UID, time.Now())
	}
	if res.ReleaseClaim {
		host.Spec.Claim = nil
		delete(host.Labels, ClaimedByLabel)
	}
	if before != host.Status.State {
		ctrl.LoggerFrom(ctx).Info("host state changed", "from", before, "to", host.Status.State)
	}
	return ctrl.Result{RequeueAfter: res.RequeueAfter}, res.Events
}

// reconcileDelete refuses to let a claimed host vanish under its machine: the machine must
// release it (and so have it wiped) first.
func (r *AnvilHostReconciler) reconcileDelete(ctx context.Context, host *infrav1.AnvilHost) (ctrl.Result, error) {
	// A host deleted by clusterctl move lives on in the target management cluster.
	if c := host.Spec.Claim; c != nil && !c.Released && host.Status.State != infrav1.HostStateRetired && !deletedForMove(host) {
		conditions.Set(host, metav1.Condition{Type: hoststate.ConditionReady, Status: metav1.ConditionFalse, Reason: "DeletionBlocked",
			Message: fmt.Sprintf("host is claimed by AnvilMachine %s; delete or scale down that machine first", c.MachineRef.Name)})
		return ctrl.Result{RequeueAfter: 30 * time.Second}, nil
	}
	r.Pool.Forget(ctx, host.Namespace+"/"+host.Name)
	r.powerSyncedAt.Delete(host.UID)
	controllerutil.RemoveFinalizer(host, infrav1.HostFinalizer)
	return ctrl.Result{}, nil
}

// resolveTarget reads the BMC address and Secrets. Its errors name the Secret and the fix,
// never a value from it.
func (r *AnvilHostReconciler) resolveTarget(ctx context.Context, host *infrav1.AnvilHost) (*bmc.Target, error) {
	addr, err := bmc.ParseAddress(host.Spec.BMC.Address)
	if err != nil {
		return nil, fmt.Errorf("spec.bmc.address: %w", err)
	}
	creds := &corev1.Secret{}
	name := host.Spec.BMC.CredentialsRef.Name
	if err := r.Client.Get(ctx, types.NamespacedName{Namespace: host.Namespace, Name: name}, creds); err != nil {
		if apierrors.IsNotFound(err) {
			return nil, fmt.Errorf("credentials Secret %q not found in namespace %q: create it with keys username and password", name, host.Namespace)
		}
		return nil, fmt.Errorf("reading credentials Secret %q: %w", name, err)
	}
	user, pass := string(creds.Data["username"]), string(creds.Data["password"])
	if user == "" || pass == "" {
		return nil, fmt.Errorf("credentials Secret %q must have non-empty keys username and password", name)
	}
	if err := r.movable.ensure(ctx, r.Client, creds); err != nil {
		return nil, err
	}
	t := &bmc.Target{Address: addr, Username: user, Password: pass, InsecureSkipVerify: host.Spec.BMC.InsecureSkipVerify, Timeout: r.BMCTimeout}
	if ref := host.Spec.BMC.CABundleRef; ref != nil {
		ca := &corev1.Secret{}
		if err := r.Client.Get(ctx, types.NamespacedName{Namespace: host.Namespace, Name: ref.Name}, ca); err != nil {
			return nil, fmt.Errorf("CA bundle Secret %q: %w", ref.Name, client.IgnoreNotFound(err))
		}
		pool, digest, err := r.caPools.pool(ca)
		if err != nil {
			return nil, err
		}
		if err := r.movable.ensure(ctx, r.Client, ca); err != nil {
			return nil, err
		}
		t.CAPool, t.CADigest = pool, digest
	}
	return t, nil
}

// WakeFunc turns host keys into events for AnvilHostReconciler.Wake without ever blocking the
// caller (the agent API): when the channel is full a reconcile is already pending.
func WakeFunc(ch chan<- event.TypedGenericEvent[*infrav1.AnvilHost]) func(types.NamespacedName) {
	return func(k types.NamespacedName) {
		select {
		case ch <- event.TypedGenericEvent[*infrav1.AnvilHost]{Object: &infrav1.AnvilHost{ObjectMeta: metav1.ObjectMeta{Namespace: k.Namespace, Name: k.Name}}}:
		default:
		}
	}
}
