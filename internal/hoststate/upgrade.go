package hoststate

import (
	"fmt"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"sigs.k8s.io/cluster-api/util/conditions"

	infrav1 "github.com/anvil-metal/cluster-api-provider-anvil/api/v1alpha1"
)

// In-place A/B upgrades. A Provisioned host whose claim names an image other than the one in
// its active slot goes to Upgrading: the provisioner installs the new image into the inactive
// slot (the active slot, CONFIG's identity and DATA stay as they are) and reboots with a boot
// counter on the new slot. Back in Provisioned the host waits for the installed OS to report
// its boot (BootReportSource): a report that the new slot is marked good commits the upgrade;
// a report from the old slot naming the new one as failed means GRUB rolled back. A rolled-back
// image is not installed again: only a different image starts a new upgrade.

// Condition type for the state of the host's image.
const ConditionImageUpToDate = "ImageUpToDate"

// BootReport is what the installed OS said after a boot.
type BootReport struct {
	Slot   infrav1.Slot
	Good   bool
	Failed infrav1.Slot
	At     time.Time
}

// BootReportSource returns the latest boot report of a host, if any.
type BootReportSource interface {
	LastBootReport(h *infrav1.AnvilHost) (BootReport, bool)
}

// upgradeWanted reports whether the claim's image differs from the active slot's, and has not
// already failed its health gate.
func upgradeWanted(h *infrav1.AnvilHost) bool {
	c, slots := h.Spec.Claim, h.Status.BootSlots
	if c == nil || c.Released || c.Image == nil || c.Image.Layout == infrav1.ImageLayoutWholeDisk || slots == nil || slots.Pending != "" {
		return false
	}
	active := slotContent(slots, slots.Active)
	if active == nil || active.Checksum == c.Image.Checksum {
		return false
	}
	failed := slotContent(slots, slots.LastFailed)
	return failed == nil || failed.Checksum != c.Image.Checksum
}

func slotContent(slots *infrav1.BootSlots, slot infrav1.Slot) *infrav1.SlotContent {
	switch slot {
	case infrav1.SlotA:
		return slots.A
	case infrav1.SlotB:
		return slots.B
	}
	return nil
}

// applyBootReport folds the latest boot report into status.bootSlots: a good report from the
// slot on trial commits it; a report naming the slot on trial as failed rolls it back. Only
// reports newer than the pending slot's install count.
func (s *step) applyBootReport() {
	h := s.in.Host
	slots := h.Status.BootSlots
	if s.m.BootReports == nil || slots == nil || slots.Pending == "" {
		return
	}
	r, ok := s.m.BootReports.LastBootReport(h)
	pending := slotContent(slots, slots.Pending)
	if !ok || pending == nil || pending.InstalledAt == nil || r.At.Before(pending.InstalledAt.Time) {
		return
	}
	switch {
	case r.Good && r.Slot == slots.Pending:
		previous := slots.Active
		slots.Active, slots.Pending, slots.TriesLeft = r.Slot, "", 0
		if previous != r.Slot {
			s.res.Events = append(s.res.Events, Event{Reason: "UpgradeCommitted",
				Message: fmt.Sprintf("slot %s (%s) passed its health gate and is now active", r.Slot, pending.ImageURL)})
		}
	case r.Failed == slots.Pending && r.Slot != slots.Pending:
		slots.LastFailed, slots.Pending, slots.TriesLeft = r.Failed, "", 0
		s.res.Events = append(s.res.Events, Event{Warning: true, Reason: "UpgradeRolledBack",
			Message: fmt.Sprintf("slot %s (%s) failed its health gate on every try; running slot %s again", r.Failed, pending.ImageURL, r.Slot)})
	}
}

// setImageCondition says whether the host runs the claim's image, and if not why.
func (s *step) setImageCondition() {
	h := s.in.Host
	c, slots := h.Spec.Claim, h.Status.BootSlots
	if c == nil || c.Image == nil || slots == nil {
		conditions.Delete(h, ConditionImageUpToDate)
		return
	}
	cond := metav1.Condition{Type: ConditionImageUpToDate, Status: metav1.ConditionFalse}
	active, pending, failed := slotContent(slots, slots.Active), slotContent(slots, slots.Pending), slotContent(slots, slots.LastFailed)
	switch {
	case h.Status.State == infrav1.HostStateUpgrading:
		cond.Reason, cond.Message = "Upgrading", "installing "+c.Image.URL+" into the inactive slot"
	case pending != nil && pending.Checksum == c.Image.Checksum && slots.Pending != slots.Active:
		cond.Reason, cond.Message = "WaitingForHealthGate", fmt.Sprintf("slot %s runs %s on trial until its health gate passes", slots.Pending, c.Image.URL)
	case active != nil && active.Checksum == c.Image.Checksum:
		cond.Status, cond.Reason, cond.Message = metav1.ConditionTrue, "UpToDate", fmt.Sprintf("slot %s runs %s", slots.Active, c.Image.URL)
	case failed != nil && failed.Checksum == c.Image.Checksum:
		cond.Reason = "RolledBack"
		cond.Message = fmt.Sprintf("%s failed its health gate in slot %s and was rolled back to slot %s; it is not tried again: set another image", c.Image.URL, slots.LastFailed, slots.Active)
	default:
		cond.Reason, cond.Message = "UpgradePending", "the claim's image differs from the active slot's"
	}
	conditions.Set(h, cond)
}

// upgrading installs the claim's image into the inactive slot and reboots into it.
func (s *step) upgrading() stepResult {
	h := s.in.Host
	if c := h.Spec.Claim; c == nil || c.Released {
		return stepResult{next: infrav1.HostStateDeprovisioning, cont: true}
	}
	out, err := s.m.Provisioner.Provision(s.ctx, h, s.runBMC)
	if err != nil {
		// The agent never arms a slot it did not verify: the host still boots its active slot.
		s.recordError("UpgradeFailed", err)
		return s.failed()
	}
	s.clearError()
	if !out.Done {
		return stepResult{requeueAfter: max(out.RequeueAfter, time.Second)}
	}
	h.Status.Power = infrav1.PowerOn
	return stepResult{next: infrav1.HostStateProvisioned, requeueAfter: s.powerSyncInterval()}
}
