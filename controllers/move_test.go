package controllers

import (
	"context"
	"sync"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/utils/ptr"
	clusterv1 "sigs.k8s.io/cluster-api/api/core/v1beta2"
	"sigs.k8s.io/cluster-api/util/conditions"
	"sigs.k8s.io/controller-runtime/pkg/client"

	infrav1 "github.com/anvil-metal/cluster-api-provider-anvil/api/v1alpha1"
	"github.com/anvil-metal/cluster-api-provider-anvil/internal/vbmc/machine"
	"github.com/anvil-metal/cluster-api-provider-anvil/internal/vbmc/redfish"
)

// TestMovedMachineAdoptsItsHost does in one namespace what clusterctl move does across
// management clusters: pause, delete (marked delete-for-move) and create again with new UIDs
// and no status; then unpause. The machine must take back its own host without installing
// it again, and leave the spare host alone.
func TestMovedMachineAdoptsItsHost(t *testing.T) {
	ctx := context.Background()
	f := newCAPIFixture(t, "zone-a", "zone-a")
	am := f.waitMachine(f.machine("cp-0", "zone-a").Name, "was provisioned", provisioned)
	host := f.waitFor("host-0", "was provisioned", func(h *infrav1.AnvilHost) bool { return h.Status.State == infrav1.HostStateProvisioned })
	if _, blocked := host.Annotations[BlockMoveAnnotation]; blocked {
		t.Error("a provisioned host still blocks clusterctl move")
	}
	if want := f.cluster.Name + "/cp-0@anvil://" + f.ns + "/host-0@" + am.Spec.Image.Checksum; host.Annotations[infrav1.ProvisionedForAnnotation] != want {
		t.Errorf("host annotation %s=%q, want %q", infrav1.ProvisionedForAnnotation, host.Annotations[infrav1.ProvisionedForAnnotation], want)
	}
	// The BMC Secrets the hosts use go with them.
	for _, name := range []string{"host-0-bmc", "host-1-bmc", "bmc-ca"} {
		s := &corev1.Secret{}
		if err := env.Client.Get(ctx, client.ObjectKey{Namespace: f.ns, Name: name}, s); err != nil {
			t.Fatal(err)
		}
		if _, ok := s.Labels[ClusterctlMoveLabel]; !ok {
			t.Errorf("Secret %s lacks %s: clusterctl move would leave it behind", name, ClusterctlMoveLabel)
		}
	}
	boots := f.countNetworkBoots("host-0")

	f.setPaused(true)
	f.waitMachine("cp-0", "saw the pause", func(m *infrav1.AnvilMachine) bool { return m != nil && conditions.IsTrue(m, clusterv1.PausedCondition) })
	machine := &clusterv1.Machine{}
	if err := env.Client.Get(ctx, client.ObjectKey{Namespace: f.ns, Name: "cp-0"}, machine); err != nil {
		t.Fatal(err)
	}
	am = f.waitMachine("cp-0", "was read", func(*infrav1.AnvilMachine) bool { return true })
	host = f.waitFor("host-0", "was read", func(*infrav1.AnvilHost) bool { return true })
	f.deleteForMove(am)
	f.deleteForMove(machine)
	// The host controller itself lets go of a host deleted for the move.
	f.deleteForMove(host)
	f.waitGone(&infrav1.AnvilHost{ObjectMeta: metav1.ObjectMeta{Namespace: f.ns, Name: "host-0"}})

	// The target: the host first, then the Machine and AnvilMachine with new UIDs.
	f.recreate(host)
	f.recreate(machine)
	am.OwnerReferences = []metav1.OwnerReference{ownerRef(machine, "Machine")}
	// clusterctl keeps finalizers (the e2e suite runs its real move); a restore from a backup
	// may not: the providerID alone must lead the machine back to its host.
	am.Finalizers = nil
	f.recreate(am)
	f.waitFor("host-0", "was Provisioned again", func(h *infrav1.AnvilHost) bool { return h.Status.State == infrav1.HostStateProvisioned })
	f.setPaused(false)

	adopted := f.waitMachine("cp-0", "was provisioned again", func(m *infrav1.AnvilMachine) bool { return provisioned(m) && m.UID == am.UID })
	h := f.waitFor("host-0", "was adopted", func(h *infrav1.AnvilHost) bool {
		return h.Spec.Claim != nil && h.Spec.Claim.MachineRef.UID == adopted.UID
	})
	if h.Labels[ClaimedByLabel] != string(adopted.UID) || h.Spec.Claim.MachineRef.Name != "cp-0" || h.Status.State != infrav1.HostStateProvisioned {
		t.Errorf("host-0 after the move: claim %+v, claimed-by %q, state %s", h.Spec.Claim, h.Labels[ClaimedByLabel], h.Status.State)
	}
	if adopted.Status.HostRef == nil || adopted.Status.HostRef.Name != "host-0" || ptr.Deref(adopted.Spec.ProviderID, "") != "anvil://"+f.ns+"/host-0" {
		t.Errorf("machine after the move: hostRef %+v, providerID %v", adopted.Status.HostRef, adopted.Spec.ProviderID)
	}
	time.Sleep(time.Second) // a wrong claim or install would show by now
	if spare := f.waitFor("host-1", "was read", func(*infrav1.AnvilHost) bool { return true }); spare.Spec.Claim != nil {
		t.Errorf("the moved machine also claimed the spare host: %+v", spare.Spec.Claim)
	}
	if n := boots(); n != 0 {
		t.Errorf("host-0 booted from the network %d times after the move began: it was installed again", n)
	}
}

// TestFreshMachineDoesNotAdoptAStaleClaim: a machine that merely has the name of a machine
// whose claim was never released (its finalizer was removed by hand) must not take that
// host: it has no providerID saying it ran there.
func TestFreshMachineDoesNotAdoptAStaleClaim(t *testing.T) {
	ctx := context.Background()
	f := newCAPIFixture(t, "zone-a", "zone-a")
	f.waitMachine(f.machine("w-0", "").Name, "was provisioned", provisioned)
	am := f.waitMachine("w-0", "was read", func(*infrav1.AnvilMachine) bool { return true })
	machine := &clusterv1.Machine{}
	if err := env.Client.Get(ctx, client.ObjectKey{Namespace: f.ns, Name: "w-0"}, machine); err != nil {
		t.Fatal(err)
	}
	f.setPaused(true)
	f.waitMachine("w-0", "saw the pause", func(m *infrav1.AnvilMachine) bool { return m != nil && conditions.IsTrue(m, clusterv1.PausedCondition) })
	f.deleteForMove(am)
	f.deleteForMove(machine)
	f.setPaused(false)
	f.waitMachine("w-0", "was deleted", func(m *infrav1.AnvilMachine) bool { return m == nil })

	if err := env.Client.Delete(ctx, &corev1.Secret{ObjectMeta: metav1.ObjectMeta{Namespace: f.ns, Name: "w-0-bootstrap"}}); err != nil {
		t.Fatal(err)
	}
	f.machine("w-0", "")
	fresh := f.waitMachine("w-0", "was provisioned", provisioned)
	if fresh.Status.HostRef == nil || fresh.Status.HostRef.Name != "host-1" {
		t.Fatalf("fresh machine holds %+v, want the spare host-1 (host-0's claim belongs to the old machine)", fresh.Status.HostRef)
	}
	if h := f.waitFor("host-0", "was read", func(*infrav1.AnvilHost) bool { return true }); h.Spec.Claim == nil || h.Spec.Claim.MachineRef.UID != am.UID {
		t.Errorf("host-0's stale claim changed: %+v", h.Spec.Claim)
	}
}

// TestInstallBlocksMoveUntilProvisioned: from the claim until the host is Provisioned the host
// carries clusterctl's block-move annotation (set with the claim, in the same write), and a
// pause does not strand it there: the host controller does not pause, the install goes on,
// and the annotation comes off when it is done. A released host blocks the move until it
// is wiped.
func TestInstallBlocksMoveUntilProvisioned(t *testing.T) {
	f := newCAPIFixture(t, "zone-a")
	f.bmcs["host-0"].SetFaults(redfish.Faults{Unavailable: true})
	blocked := func(h *infrav1.AnvilHost) bool { return h.Annotations[BlockMoveAnnotation] != "" }
	f.machine("w-0", "")
	f.waitFor("host-0", "blocked the move while it cannot install", func(h *infrav1.AnvilHost) bool {
		return h.Spec.Claim != nil && blocked(h)
	})
	f.setPaused(true)
	f.waitMachine("w-0", "saw the pause", func(m *infrav1.AnvilMachine) bool { return m != nil && conditions.IsTrue(m, clusterv1.PausedCondition) })
	time.Sleep(time.Second)
	if h := f.waitFor("host-0", "was read", func(*infrav1.AnvilHost) bool { return true }); !blocked(h) {
		t.Fatal("the block was lifted while the install had not finished")
	}
	f.bmcs["host-0"].SetFaults(redfish.Faults{})
	f.waitFor("host-0", "was provisioned and let clusterctl move go ahead", func(h *infrav1.AnvilHost) bool {
		return h.Status.State == infrav1.HostStateProvisioned && !blocked(h)
	})
	if m := f.waitMachine("w-0", "was read", func(*infrav1.AnvilMachine) bool { return true }); provisioned(m) {
		t.Error("a paused machine reported its host provisioned")
	}

	// Unpaused and deleted: the released host blocks the move until it is wiped.
	f.setPaused(false)
	f.waitMachine("w-0", "was provisioned", provisioned)
	f.bmcs["host-0"].SetFaults(redfish.Faults{Unavailable: true})
	am := f.waitMachine("w-0", "was read", func(*infrav1.AnvilMachine) bool { return true })
	if err := env.Client.Delete(context.Background(), am); err != nil {
		t.Fatal(err)
	}
	f.waitFor("host-0", "blocked the move while it cannot be wiped", func(h *infrav1.AnvilHost) bool {
		return h.Spec.Claim != nil && h.Spec.Claim.Released && blocked(h)
	})
	f.bmcs["host-0"].SetFaults(redfish.Faults{})
	f.waitFor("host-0", "was wiped and let clusterctl move go ahead", func(h *infrav1.AnvilHost) bool {
		return h.Spec.Claim == nil && h.Status.State == infrav1.HostStateAvailable && !blocked(h)
	})
}

// waitGone waits until o no longer exists.
func (f *capiFixture) waitGone(o client.Object) {
	f.t.Helper()
	deadline := time.Now().Add(waitTimeout)
	for time.Now().Before(deadline) {
		if err := env.Client.Get(context.Background(), client.ObjectKeyFromObject(o), o); apierrors.IsNotFound(err) {
			return
		}
		time.Sleep(100 * time.Millisecond)
	}
	f.t.Fatalf("%T %s still exists (finalizers %v)", o, o.GetName(), o.GetFinalizers())
}

func (f *capiFixture) setPaused(p bool) {
	f.t.Helper()
	for range 10 {
		c := &clusterv1.Cluster{}
		if err := env.Client.Get(context.Background(), client.ObjectKeyFromObject(f.cluster), c); err != nil {
			f.t.Fatal(err)
		}
		c.Spec.Paused = ptr.To(p)
		if err := env.Client.Update(context.Background(), c); err == nil {
			return
		}
	}
	f.t.Fatal("could not set the cluster's pause")
}

// deleteForMove deletes o as clusterctl move does once o exists in the target: marked
// delete-for-move, deleted, finalizers of everything but hosts removed (the host controller
// must let go of a host by itself).
func (f *capiFixture) deleteForMove(o client.Object) {
	f.t.Helper()
	ctx := context.Background()
	o = o.DeepCopyObject().(client.Object)
	before := o.DeepCopyObject().(client.Object)
	a := o.GetAnnotations()
	if a == nil {
		a = map[string]string{}
	}
	a[DeleteForMoveAnnotation] = ""
	o.SetAnnotations(a)
	if err := env.Client.Patch(ctx, o, client.MergeFrom(before)); err != nil {
		f.t.Fatal(err)
	}
	if err := env.Client.Delete(ctx, o); err != nil {
		f.t.Fatal(err)
	}
	if _, isHost := o.(*infrav1.AnvilHost); isHost || len(o.GetFinalizers()) == 0 {
		return
	}
	before = o.DeepCopyObject().(client.Object)
	o.SetFinalizers(nil)
	if err := env.Client.Patch(ctx, o, client.MergeFrom(before)); client.IgnoreNotFound(err) != nil {
		f.t.Fatal(err)
	}
}

// recreate creates o again as clusterctl move creates it in the target: same metadata
// (finalizers included) and spec, no UID, resourceVersion or status. o is updated with what
// the API server returned.
func (f *capiFixture) recreate(o client.Object) {
	f.t.Helper()
	o.SetUID("")
	o.SetResourceVersion("")
	o.SetCreationTimestamp(metav1.Time{})
	o.SetDeletionTimestamp(nil)
	o.SetManagedFields(nil)
	o.SetGeneration(0)
	a := o.GetAnnotations()
	delete(a, DeleteForMoveAnnotation)
	o.SetAnnotations(a)
	f.create(o)
}

// countNetworkBoots starts counting the host's network boots and returns the count so far.
func (f *capiFixture) countNetworkBoots(host string) func() int {
	var mu sync.Mutex
	n := 0
	f.t.Cleanup(f.bmcs[host].Machine().Subscribe(func(e machine.Event) {
		if e.Kind == machine.EventBoot && e.Boot.Target == machine.BootPxe {
			mu.Lock()
			n++
			mu.Unlock()
		}
	}))
	return func() int {
		mu.Lock()
		defer mu.Unlock()
		return n
	}
}
