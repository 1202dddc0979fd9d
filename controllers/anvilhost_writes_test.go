package controllers

import (
	"context"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	eventsv1 "k8s.io/api/events/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/apimachinery/pkg/watch"
	"k8s.io/client-go/tools/events"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/client/interceptor"
	"sigs.k8s.io/controller-runtime/pkg/event"

	infrav1 "github.com/anvil-metal/cluster-api-provider-anvil/api/v1alpha1"
	"github.com/anvil-metal/cluster-api-provider-anvil/internal/bmc"
	"github.com/anvil-metal/cluster-api-provider-anvil/internal/hoststate"
	"github.com/anvil-metal/cluster-api-provider-anvil/internal/vbmc/redfish"
)

// hostEventNotes waits until the Events about a host satisfy enough (they are sent
// asynchronously) and returns their notes.
func hostEventNotes(t *testing.T, ns, name string, enough func([]string) bool) []string {
	t.Helper()
	var notes []string
	deadline := time.Now().Add(10 * time.Second)
	for {
		evs := &eventsv1.EventList{}
		if err := env.Client.List(context.Background(), evs, client.InNamespace(ns)); err != nil {
			t.Fatal(err)
		}
		notes = notes[:0]
		for _, e := range evs.Items {
			if e.Regarding.Name == name {
				notes = append(notes, e.Reason+": "+e.Note)
			}
		}
		if enough(notes) || time.Now().After(deadline) {
			return notes
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// The write budget, on a real API server: a healthy host reaches Available with at
// most a metadata patch, a status patch and one Event, and then, with nothing changing, the
// power polls write nothing at all.
func TestHostOnboardingWritesAndSteadyState(t *testing.T) {
	f := newHostFixture(t)
	b, host := f.emulatedBMC("writes-node", "pw", redfish.MockupRackmount, 5)
	f.create(f.secret(host.Name, "pw"))
	ctx := context.Background()
	w, err := directClient(t).Watch(ctx, &infrav1.AnvilHostList{}, client.InNamespace(f.ns))
	if err != nil {
		t.Fatal(err)
	}
	defer w.Stop()
	f.create(host)

	// Every write to the host is one MODIFIED event on the watch.
	hostWrites, available := 0, false
	steadyUntil := time.Time{}
	timeout := time.After(waitTimeout)
	for steadyUntil.IsZero() || time.Now().Before(steadyUntil) {
		select {
		case ev := <-w.ResultChan():
			h, ok := ev.Object.(*infrav1.AnvilHost)
			if !ok || h.Name != host.Name {
				continue
			}
			if ev.Type == watch.Modified {
				hostWrites++
				if available {
					t.Errorf("steady state wrote the host: %+v", h.Status)
				}
			}
			if h.Status.State == infrav1.HostStateAvailable && !available {
				available = true
				// More than two power-sync intervals (2 s in this suite).
				steadyUntil = time.Now().Add(5 * time.Second)
			}
		case <-time.After(100 * time.Millisecond):
		case <-timeout:
			t.Fatalf("host not Available after %s (%d writes)", waitTimeout, hostWrites)
		}
	}
	notes := hostEventNotes(t, f.ns, host.Name, func(n []string) bool { return len(n) > 0 })
	if hostWrites > 2 || len(notes) != 1 || hostWrites+len(notes) > 3 {
		t.Errorf("to Available: %d writes to the host and %d Events %q; want at most 2 and exactly 1", hostWrites, len(notes), notes)
	}
	if len(notes) == 1 && !strings.Contains(notes[0], "Registering → Inspecting → Available") {
		t.Errorf("the onboarding Event should name every state change: %q", notes[0])
	}
	if b.Requests().Total() == 0 {
		t.Error("no BMC traffic")
	}
}

// patchHost locks spec and finalizer changes to the version read, so a spec change decided
// on a stale read (this controller changes spec only to drop a claim it has wiped for) is
// refused rather than applied over the machine controller's newer claim; label and status
// changes name only their own fields and need no lock. Each kind of change costs one request.
func TestHostPatchLocksSpecButNotLabelsOrStatus(t *testing.T) {
	f := newHostFixture(t)
	ctx := context.Background()
	// No credentials Secret: the manager's controller keeps the host in Registering.
	_, host := f.emulatedBMC("claim-node", "pw", redfish.MockupRackmount, 6)
	f.create(host)
	stale := f.waitFor(host.Name, "got the finalizer", controllerHasFinalizer)

	f.update(host.Name, func(h *infrav1.AnvilHost) { // the machine controller claims it
		h.Spec.Claim = &infrav1.HostClaim{MachineRef: infrav1.MachineReference{Name: "m1", UID: "uid-m1"}}
	})

	var patches, statusPatches int
	c := interceptor.NewClient(directClient(t), interceptor.Funcs{
		Patch: func(ctx context.Context, c client.WithWatch, obj client.Object, p client.Patch, opts ...client.PatchOption) error {
			patches++
			return c.Patch(ctx, obj, p, opts...)
		},
		SubResourcePatch: func(ctx context.Context, c client.Client, sub string, obj client.Object, p client.Patch, opts ...client.SubResourcePatchOption) error {
			statusPatches++
			return c.SubResource(sub).Patch(ctx, obj, p, opts...)
		},
	})
	live := func() *infrav1.AnvilHost {
		h := &infrav1.AnvilHost{}
		if err := env.Client.Get(ctx, client.ObjectKeyFromObject(host), h); err != nil {
			t.Fatal(err)
		}
		return h
	}

	// A spec change decided on the stale copy: refused, the claim stays.
	mine := stale.DeepCopy()
	mine.Spec.Maintenance = &infrav1.Maintenance{Reason: "stale view"}
	if _, err := patchHost(ctx, c, stale, mine); !apierrors.IsConflict(err) {
		t.Fatalf("spec patch from a stale read: %v, want a conflict", err)
	}
	if h := live(); h.Spec.Claim == nil || h.Spec.Maintenance != nil {
		t.Fatalf("claim %+v, maintenance %+v after a refused patch", h.Spec.Claim, h.Spec.Maintenance)
	}

	// Labels and status from the same stale copy: two requests, the claim untouched.
	patches, statusPatches = 0, 0
	mine = stale.DeepCopy()
	mine.Labels = map[string]string{hoststate.LabelCPUCores: "8"}
	mine.Status.Power = infrav1.PowerOn
	if wrote, err := patchHost(ctx, c, stale, mine); err != nil || !wrote {
		t.Fatalf("labels and status: wrote %v, %v", wrote, err)
	}
	h := live()
	if h.Spec.Claim == nil || h.Labels[hoststate.LabelCPUCores] != "8" || h.Status.Power != infrav1.PowerOn {
		t.Errorf("after the patch: claim %+v, labels %v, power %s", h.Spec.Claim, h.Labels, h.Status.Power)
	}
	if patches != 1 || statusPatches != 1 {
		t.Errorf("%d patches and %d status patches, want 1 and 1", patches, statusPatches)
	}

	// Nothing changed, nothing sent.
	patches, statusPatches = 0, 0
	if wrote, err := patchHost(ctx, c, h, h.DeepCopy()); err != nil || wrote || patches+statusPatches != 0 {
		t.Errorf("no change: wrote %v, %v, %d requests", wrote, err, patches+statusPatches)
	}
}

// A reconcile that reads a host older than the controller's own last write to it waits for
// the cache instead of acting on the past (re-registering or re-inspecting the host).
func TestReconcileWaitsForTheCacheToSeeItsOwnWrite(t *testing.T) {
	f := newHostFixture(t)
	_, host := f.emulatedBMC("cache-node", "pw", redfish.MockupRackmount, 7)
	f.create(host)
	f.waitFor(host.Name, "got the finalizer", controllerHasFinalizer)

	fake := &bmc.FakeBMC{Password: "pw"}
	pool := bmc.NewPool(bmc.PoolOptions{Dial: fake.Dial})
	writes, secretReads := 0, 0
	c := interceptor.NewClient(directClient(t), interceptor.Funcs{
		Get: func(ctx context.Context, c client.WithWatch, key client.ObjectKey, obj client.Object, opts ...client.GetOption) error {
			if _, ok := obj.(*corev1.Secret); ok {
				secretReads++
			}
			return c.Get(ctx, key, obj, opts...)
		},
		Patch: func(ctx context.Context, c client.WithWatch, obj client.Object, p client.Patch, opts ...client.PatchOption) error {
			writes++
			return c.Patch(ctx, obj, p, opts...)
		},
		SubResourcePatch: func(ctx context.Context, c client.Client, sub string, obj client.Object, p client.Patch, opts ...client.SubResourcePatchOption) error {
			writes++
			return c.SubResource(sub).Patch(ctx, obj, p, opts...)
		},
	})
	r := &AnvilHostReconciler{Client: c, Recorder: events.NewFakeRecorder(10), Pool: pool,
		StateMachine: &hoststate.Machine{BMC: pool, Provisioner: hoststate.Simulated{}}}
	key := types.NamespacedName{Namespace: f.ns, Name: host.Name}
	r.written.remember(key, "999999999") // a write the cache has not delivered yet

	res, err := r.Reconcile(context.Background(), ctrl.Request{NamespacedName: key})
	if err != nil || res.RequeueAfter != staleCacheRequeue || writes != 0 || secretReads != 0 {
		t.Fatalf("on a stale read: %+v, %v, %d writes, %d Secret reads; want a short requeue and nothing done", res, err, writes, secretReads)
	}

	r.written.remember(key, "1") // the cache is past it now
	if _, err := r.Reconcile(context.Background(), ctrl.Request{NamespacedName: key}); err != nil {
		t.Fatal(err)
	}
	if secretReads == 0 {
		t.Error("once the cache has the write, the reconcile must go ahead")
	}
}

func TestWrittenVersions(t *testing.T) {
	var w writtenVersions
	k := types.NamespacedName{Namespace: "ns", Name: "h"}
	if w.cacheBehind(k, "5") {
		t.Fatal("nothing written yet")
	}
	w.remember(k, "10")
	for range 2 { // asking does not forget a write the cache has not reached
		if !w.cacheBehind(k, "9") {
			t.Fatal("9 is older than the write at 10")
		}
	}
	if w.cacheBehind(k, "10") || w.cacheBehind(k, "9") {
		t.Fatal("once the cache reached 10 the write is forgotten")
	}
	w.remember(k, "12")
	if w.cacheBehind(k, "not-a-version") {
		t.Error("incomparable versions must not hold a host back")
	}
	w.remember(k, "12")
	w.forget(k)
	if w.cacheBehind(k, "3") {
		t.Error("a forgotten host is not held back")
	}
}

func TestHostPredicateIgnoresItsOwnWrites(t *testing.T) {
	old := &infrav1.AnvilHost{ObjectMeta: metav1.ObjectMeta{Name: "h", Generation: 1, Labels: map[string]string{"team": "a"}}}
	p := hostChangedByOthers()
	for name, tc := range map[string]struct {
		change func(*infrav1.AnvilHost)
		want   bool
	}{
		"status":         {func(h *infrav1.AnvilHost) { h.Status.State = infrav1.HostStateAvailable }, false},
		"finalizer":      {func(h *infrav1.AnvilHost) { h.Finalizers = []string{infrav1.HostFinalizer} }, false},
		"hardware label": {func(h *infrav1.AnvilHost) { h.Labels[hoststate.LabelCPUCores] = "64" }, false},
		"claim label":    {func(h *infrav1.AnvilHost) { h.Labels[ClaimedByLabel] = "uid" }, true},
		"user label":     {func(h *infrav1.AnvilHost) { h.Labels["team"] = "b" }, true},
		"annotation":     {func(h *infrav1.AnvilHost) { h.Annotations = map[string]string{infrav1.SyncPowerAnnotation: ""} }, true},
		"spec":           {func(h *infrav1.AnvilHost) { h.Generation = 2 }, true},
	} {
		h := old.DeepCopy()
		tc.change(h)
		if got := p.Update(updateEvent(old, h)); got != tc.want {
			t.Errorf("%s: reconcile %v, want %v", name, got, tc.want)
		}
	}
}

func TestFoldEventsOnePerReconcile(t *testing.T) {
	if _, ok := foldEvents(nil); ok {
		t.Fatal("no events, no Event")
	}
	onboard := []hoststate.Event{
		{Reason: "Inspecting", Message: "Registering → Inspecting", From: infrav1.HostStateRegistering, To: infrav1.HostStateInspecting},
		{Reason: "Available", Message: "Inspecting → Available", From: infrav1.HostStateInspecting, To: infrav1.HostStateAvailable},
		{Reason: "PowerChanged", Message: "powered on to match the spec"},
	}
	e, _ := foldEvents(onboard)
	if e.Warning || e.Reason != "Available" || e.Message != "Registering → Inspecting → Available; powered on to match the spec" {
		t.Errorf("onboarding: %+v", e)
	}
	failed := []hoststate.Event{onboard[0], {Warning: true, Reason: "BMCUnreachable", Message: "BMC unreachable: timeout"}}
	if e, _ := foldEvents(failed); !e.Warning || e.Reason != "BMCUnreachable" || e.Message != "Registering → Inspecting; BMC unreachable: timeout" {
		t.Errorf("a failure after a state change: %+v", e)
	}
	long := []hoststate.Event{{Warning: true, Reason: "BMCError", Message: strings.Repeat("é", 1000)}}
	if e, _ := foldEvents(long); len(e.Message) > maxEventNote || !strings.HasSuffix(e.Message, "…") {
		t.Errorf("a %d-byte note", len(e.Message))
	}
}

func TestCAPoolsParsedOncePerVersion(t *testing.T) {
	srv, err := redfish.NewServer(redfish.ServerOptions{TLS: true})
	if err != nil {
		t.Fatal(err)
	}
	defer srv.Close()
	var pools caPools
	s := &corev1.Secret{ObjectMeta: metav1.ObjectMeta{Namespace: "ns", Name: "ca", ResourceVersion: "1"},
		Data: map[string][]byte{"ca.crt": srv.CACertPEM()}}
	p1, d1, err := pools.pool(s)
	if err != nil {
		t.Fatal(err)
	}
	if p2, d2, _ := pools.pool(s.DeepCopy()); p2 != p1 || d2 != d1 {
		t.Error("the same Secret version was parsed again")
	}
	s.ResourceVersion = "2"
	if p3, d3, _ := pools.pool(s); p3 == p1 || d3 != d1 {
		t.Error("a changed Secret must be parsed again, and the same PEM digests the same")
	}
	rotated, err := redfish.NewServer(redfish.ServerOptions{TLS: true}) // a CA of its own
	if err != nil {
		t.Fatal(err)
	}
	defer rotated.Close()
	s.ResourceVersion, s.Data["ca.crt"] = "3", rotated.CACertPEM()
	if _, d4, _ := pools.pool(s); d4 == d1 {
		t.Error("another bundle has the same digest: a rotated CA would resume sessions verified with the old one")
	}
	s.ResourceVersion, s.Data["ca.crt"] = "4", []byte("not PEM")
	if _, _, err := pools.pool(s); err == nil || !strings.Contains(err.Error(), "ca.crt") {
		t.Errorf("bad bundle: %v", err)
	}
}

// directClient talks to the API server with no cache in between.
func directClient(t *testing.T) client.WithWatch {
	t.Helper()
	c, err := client.NewWithWatch(env.Config, client.Options{Scheme: env.Scheme})
	if err != nil {
		t.Fatal(err)
	}
	return c
}

func updateEvent(old, updated client.Object) event.UpdateEvent {
	return event.UpdateEvent{ObjectOld: old, ObjectNew: updated}
}
