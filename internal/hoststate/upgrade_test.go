package hoststate

import (
	"context"
	"testing"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"sigs.k8s.io/cluster-api/util/conditions"

	infrav1 "github.com/anvil-metal/cluster-api-provider-anvil/api/v1alpha1"
)

// abProvisioner installs like the agent does: into the slot that is not active, leaving it
// pending with three tries.
type abProvisioner struct {
	installs int
	now      func() time.Time
}

func (p *abProvisioner) Provision(_ context.Context, h *infrav1.AnvilHost, _ BMCRunner) (Outcome, error) {
	p.installs++
	slots := h.Status.BootSlots
	if slots == nil {
		slots = &infrav1.BootSlots{}
		h.Status.BootSlots = slots
	}
	target := infrav1.SlotA
	if slots.Active == infrav1.SlotA {
		target = infrav1.SlotB
	}
	at := metav1.NewTime(p.now())
	content := &infrav1.SlotContent{ImageURL: h.Spec.Claim.Image.URL, Checksum: h.Spec.Claim.Image.Checksum, InstalledAt: &at}
	if target == infrav1.SlotA {
		slots.A = content
	} else {
		slots.B = content
	}
	slots.Pending, slots.TriesLeft = target, 3
	if slots.Active == "" {
		slots.Active = target
	}
	return Outcome{Done: true}, nil
}

func (p *abProvisioner) Inspect(ctx context.Context, h *infrav1.AnvilHost, run BMCRunner) (Outcome, error) {
	return Simulated{}.Inspect(ctx, h, run)
}

func (p *abProvisioner) Deprovision(context.Context, *infrav1.AnvilHost, infrav1.WipePolicy, BMCRunner) (Outcome, error) {
	return Outcome{Done: true}, nil
}

type reportBox struct {
	r  BootReport
	ok bool
}

func (b *reportBox) LastBootReport(*infrav1.AnvilHost) (BootReport, bool) { return b.r, b.ok }

func image(name string) *infrav1.Image {
	return &infrav1.Image{URL: "https://images.example.com/" + name, Checksum: "sha256:" + name, Layout: infrav1.ImageLayoutABRoot}
}

func hasEvent(r Result, reason string) bool {
	for _, e := range r.Events {
		if e.Reason == reason {
			return true
		}
	}
	return false
}

func TestInPlaceUpgradeCommitsRollsBackAndIsNotRetried(t *testing.T) {
	fh, m := fixture()
	clock := time.Date(2026, 11, 27, 12, 0, 0, 0, time.UTC)
	now := func() time.Time { return clock }
	prov := &abProvisioner{now: now}
	reports := &reportBox{}
	m.Provisioner, m.BootReports = prov, reports
	h := fh.Host
	fh.step(m) // Available
	h.Spec.Claim = &infrav1.HostClaim{MachineRef: infrav1.MachineReference{Name: "m", UID: "u"}, ClusterName: "c",
		Image: image("v1"), BootstrapDataSecretRef: &infrav1.LocalSecretReference{Name: "b"}}
	fh.step(m)
	if h.Status.State != infrav1.HostStateProvisioned || h.Status.BootSlots.Active != infrav1.SlotA {
		t.Fatalf("first install: state %s, slots %+v", h.Status.State, h.Status.BootSlots)
	}
	// The first boot's report marks A good.
	clock = clock.Add(time.Minute)
	reports.r, reports.ok = BootReport{Slot: infrav1.SlotA, Good: true, At: clock}, true
	fh.step(m)
	if h.Status.BootSlots.Pending != "" || !conditions.IsTrue(h, ConditionImageUpToDate) {
		t.Fatalf("after the first boot: slots %+v, conditions %+v", h.Status.BootSlots, h.Status.Conditions)
	}

	// A new image goes into B; A stays active until B's gate passes.
	h.Spec.Claim.Image = image("v2")
	clock = clock.Add(time.Minute)
	fh.step(m)
	if prov.installs != 2 || h.Status.State != infrav1.HostStateProvisioned || h.Status.BootSlots.Pending != infrav1.SlotB ||
		h.Status.BootSlots.Active != infrav1.SlotA {
		t.Fatalf("upgrade: installs %d, state %s, slots %+v", prov.installs, h.Status.State, h.Status.BootSlots)
	}
	if c := conditions.Get(h, ConditionImageUpToDate); c == nil || c.Reason != "WaitingForHealthGate" {
		t.Fatalf("while B is on trial: %+v", c)
	}
	// The old report (from before the install) says nothing about B.
	fh.step(m)
	if h.Status.BootSlots.Pending != infrav1.SlotB {
		t.Fatal("a report older than the install was applied")
	}
	clock = clock.Add(time.Minute)
	reports.r = BootReport{Slot: infrav1.SlotB, Good: true, At: clock}
	r := fh.step(m)
	if h.Status.BootSlots.Active != infrav1.SlotB || h.Status.BootSlots.Pending != "" || !hasEvent(r, "UpgradeCommitted") ||
		!conditions.IsTrue(h, ConditionImageUpToDate) {
		t.Fatalf("commit: slots %+v, events %+v", h.Status.BootSlots, r.Events)
	}

	// A broken image goes into A, fails its gate on every try, and GRUB is back on B.
	h.Spec.Claim.Image = image("v3-broken")
	clock = clock.Add(time.Minute)
	fh.step(m)
	if prov.installs != 3 || h.Status.BootSlots.Pending != infrav1.SlotA {
		t.Fatalf("second upgrade: installs %d, slots %+v", prov.installs, h.Status.BootSlots)
	}
	clock = clock.Add(time.Minute)
	reports.r = BootReport{Slot: infrav1.SlotB, Good: true, Failed: infrav1.SlotA, At: clock}
	r = fh.step(m)
	slots := h.Status.BootSlots
	if slots.Active != infrav1.SlotB || slots.Pending != "" || slots.LastFailed != infrav1.SlotA || !hasEvent(r, "UpgradeRolledBack") {
		t.Fatalf("rollback: slots %+v, events %+v", slots, r.Events)
	}
	if c := conditions.Get(h, ConditionImageUpToDate); c == nil || c.Status != metav1.ConditionFalse || c.Reason != "RolledBack" {
		t.Fatalf("after the rollback: %+v", c)
	}
	// Not retried in a loop.
	for range 3 {
		clock = clock.Add(time.Hour)
		fh.step(m)
	}
	if prov.installs != 3 || h.Status.State != infrav1.HostStateProvisioned {
		t.Fatalf("the rolled-back image was installed again: installs %d, state %s", prov.installs, h.Status.State)
	}
	// A different image is tried.
	h.Spec.Claim.Image = image("v4")
	fh.step(m)
	if prov.installs != 4 || h.Status.BootSlots.Pending != infrav1.SlotA {
		t.Fatalf("a new image after a rollback: installs %d, slots %+v", prov.installs, h.Status.BootSlots)
	}
}

func TestWholeDiskImagesAreNotUpgradedInPlace(t *testing.T) {
	fh, m := fixture()
	prov := &abProvisioner{now: time.Now}
	m.Provisioner = prov
	h := fh.Host
	fh.step(m)
	img := image("disk-v1")
	img.Layout = infrav1.ImageLayoutWholeDisk
	h.Spec.Claim = &infrav1.HostClaim{MachineRef: infrav1.MachineReference{Name: "m", UID: "u"}, Image: img,
		BootstrapDataSecretRef: &infrav1.LocalSecretReference{Name: "b"}}
	fh.step(m)
	next := image("disk-v2")
	next.Layout = infrav1.ImageLayoutWholeDisk
	h.Spec.Claim.Image = next
	fh.step(m)
	if prov.installs != 1 || h.Status.State != infrav1.HostStateProvisioned {
		t.Fatalf("whole-disk image changed in place: installs %d, state %s", prov.installs, h.Status.State)
	}
}
