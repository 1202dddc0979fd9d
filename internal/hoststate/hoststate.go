// Package hoststate is the AnvilHost lifecycle as an explicit state machine: one handler per
// state, each returning a typed result that says what happens next. It talks to the BMC
// through a small interface and to provisioning through another, so it runs unchanged against
// real BMCs, emulated ones and fakes.
//
//	Registering → Inspecting → Available ⇄ Provisioning → Provisioned → Deprovisioning → Available
//	Provisioned → Upgrading (new image into the inactive A/B slot) → Provisioned (see upgrade.go)
//	any state + spec.maintenance → actions stop (state Maintenance when unclaimed)
//	Maintenance, cleared → Deprovisioning (metadata wipe) → Inspecting → Available (repair)
//	any state + spec.retire → Retiring (wipe, power off) → Retired (terminal)
package hoststate

import (
	"context"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"math"
	"time"

	"k8s.io/apimachinery/pkg/api/equality"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"sigs.k8s.io/cluster-api/util/conditions"

	infrav1 "github.com/anvil-metal/cluster-api-provider-anvil/api/v1alpha1"
	"github.com/anvil-metal/cluster-api-provider-anvil/internal/bmc"
)

// Condition types on AnvilHost.
const (
	ConditionReady          = "Ready"
	ConditionBMCReachable   = "BMCReachable"
	ConditionBMCTLSVerified = "BMCTLSVerified"
	ConditionInspected      = "Inspected"
	ConditionProvisioned    = "Provisioned"
	ConditionMaintenance    = "Maintenance"
)

// BMCAccess runs an operation against a host's BMC (bmc.Pool implements it).
type BMCAccess interface {
	Do(ctx context.Context, key string, t bmc.Target, opName string, op func(context.Context, bmc.Client) error) error
}

// Provisioner carries out the steps that need more than the BMC: installing an image,
// wiping disks and inspecting in band. The agent and boot-services issues provide the real
// one; Simulated drives only the BMC. Each call advances the work and says whether it is done;
// it is called again on the next reconcile until it is.
type Provisioner interface {
	Provision(ctx context.Context, h *infrav1.AnvilHost, run BMCRunner) (Outcome, error)
	Deprovision(ctx context.Context, h *infrav1.AnvilHost, policy infrav1.WipePolicy, run BMCRunner) (Outcome, error)
	// Inspect has the host report its hardware in band and leaves it powered off. When done,
	// h.Status.Hardware holds the reported inventory (source InBand), if the backend has one.
	Inspect(ctx context.Context, h *infrav1.AnvilHost, run BMCRunner) (Outcome, error)
}

// BMCRunner runs one operation on this host's BMC through the pool.
type BMCRunner func(opName string, op func(context.Context, bmc.Client) error) error

// Outcome is a provisioning step's progress.
type Outcome struct {
	Done         bool
	RequeueAfter time.Duration
	// Message explains the wait, for the Provisioned condition.
	Message string
}

// Event is something worth a Kubernetes Event.
type Event struct {
	Warning bool
	Reason  string
	Message string
	// From and To are set when the event is a change of state.
	From, To infrav1.HostState
}

// Result is what a Step asks of its caller.
type Result struct {
	RequeueAfter time.Duration
	Events       []Event
	// ReleaseClaim says spec.claim was removed (deprovisioning finished): the caller drops
	// what it keeps alongside the claim.
	ReleaseClaim bool
	// PowerSynced is true when power was read: the caller remembers when.
	PowerSynced bool
}

// Input is one host as the controller loaded it. Step mutates Host's status and labels.
type Input struct {
	Host *infrav1.AnvilHost
	// Target is the resolved BMC endpoint and credentials; nil when they could not be
	// resolved, with TargetErr saying why (a message that carries no secret).
	Target    *bmc.Target
	TargetErr error
	// LastPowerSync is when the power state was last read (kept in memory, not in status).
	LastPowerSync time.Time
}

// Machine is the host state machine with its collaborators.
type Machine struct {
	BMC         BMCAccess
	Provisioner Provisioner
	// BootReports, when set, tells in-place upgrades whether the new slot committed or
	// rolled back (see upgrade.go); without it a new slot stays pending.
	BootReports BootReportSource
	// PowerSyncInterval is the steady-state power poll (default 120 s), ±10 % by a jitter
	// fixed per host so that a fleet does not poll in step.
	PowerSyncInterval time.Duration
	// RetryInterval is the requeue for errors the pool does not time (default 30 s).
	RetryInterval time.Duration
	Now           func() time.Time
}

// stepResult is what a state handler decided.
type stepResult struct {
	next         infrav1.HostState // empty: stay
	requeueAfter time.Duration
	// continue runs the next state's handler in the same reconcile, so a healthy host goes
	// from Registering to Available with one status write.
	cont bool
}

type step struct {
	m   *Machine
	ctx context.Context
	in  Input
	res *Result
}

// maxTransitionsPerStep bounds how many states one reconcile walks through.
const maxTransitionsPerStep = 4

// Step advances the host as far as it can now.
func (m *Machine) Step(ctx context.Context, in Input) Result {
	res := &Result{}
	s := &step{m: m, ctx: ctx, in: in, res: res}
	h := in.Host
	if h.Status.State == "" {
		h.Status.State = infrav1.HostStateRegistering
	}
	s.syncMaintenanceCondition()

	for range maxTransitionsPerStep {
		from := h.Status.State
		sr := s.handle(from)
		res.RequeueAfter = sr.requeueAfter
		if sr.next == "" || sr.next == from {
			break
		}
		h.Status.State = sr.next
		res.Events = append(res.Events, Event{Reason: string(sr.next), Message: fmt.Sprintf("%s → %s", from, sr.next), From: from, To: sr.next})
		if !sr.cont {
			if res.RequeueAfter == 0 {
				res.RequeueAfter = time.Millisecond // let the next state run promptly
			}
			break
		}
	}
	s.setImageCondition()
	s.setReady()
	syncBlockMove(h)
	h.Status.ObservedGeneration = h.Generation
	return *res
}

// syncBlockMove keeps clusterctl's block-move annotation on a claimed host until it is
// Provisioned, and on a released one until it is wiped: a move must not copy a host halfway
// through either. A host in maintenance does nothing, so it blocks nothing. The annotation
// changes only with the claim or the state, so it rides on writes that happen anyway.
//
// An unclaimed host being wiped on its way out of maintenance blocks it too: a move drops
// status, and a host that arrives without it registers and inspects as if new, so the
// Deprovisioning state that owes the wipe would be lost.
func syncBlockMove(h *infrav1.AnvilHost) {
	state := h.Status.State
	busy := h.Spec.Maintenance == nil &&
		(h.Spec.Claim != nil && state != infrav1.HostStateProvisioned && state != infrav1.HostStateRetired ||
			state == infrav1.HostStateDeprovisioning)
	if !busy {
		delete(h.Annotations, infrav1.BlockMoveAnnotation)
		return
	}
	if h.Annotations == nil {
		h.Annotations = map[string]string{}
	}
	h.Annotations[infrav1.BlockMoveAnnotation] = "true"
}

func (s *step) handle(state infrav1.HostState) stepResult {
	h := s.in.Host
	// Retirement and maintenance override whatever the host was doing.
	switch {
	case state == infrav1.HostStateRetired:
		return s.retired()
	case h.Spec.Retire && state != infrav1.HostStateRetiring:
		return stepResult{next: infrav1.HostStateRetiring, cont: true}
	case h.Spec.Maintenance != nil:
		return s.maintenance()
	}
	handlers := map[infrav1.HostState]func() stepResult{
		infrav1.HostStateRegistering:    s.registering,
		infrav1.HostStateInspecting:     s.inspecting,
		infrav1.HostStateAvailable:      s.available,
		infrav1.HostStateProvisioning:   s.provisioning,
		infrav1.HostStateProvisioned:    s.provisioned,
		infrav1.HostStateUpgrading:      s.upgrading,
		infrav1.HostStateDeprovisioning: s.deprovisioning,
		infrav1.HostStateMaintenance:    s.leavingMaintenance,
		infrav1.HostStateRetiring:       s.retiring,
	}
	handler, ok := handlers[state]
	if !ok {
		return stepResult{next: infrav1.HostStateRegistering, cont: true}
	}
	return handler()
}

// registering proves the credentials and the BMC's reachability.
func (s *step) registering() stepResult {
	power, ok := s.readPower()
	if !ok {
		return s.failed()
	}
	s.in.Host.Status.Power = power
	return stepResult{next: infrav1.HostStateInspecting, cont: true}
}

// inspecting reads the out-of-band inventory and labels the host from it. When the BMC
// reports no CPU or memory (IPMI gives only its FRU) and the agent has never reported, it has
// the agent network-booted to report in band (see inspectInBand); spec.inspection opts out of
// that or asks for it whatever the BMC reports.
func (s *step) inspecting() stepResult {
	if s.inBandInspectionUnderway() {
		// Decided on an earlier reconcile (before a restart, perhaps): the BMC's inventory is
		// not read again on every poll of the agent.
		return s.inspectInBand(nil)
	}
	inv, ok := s.bmcInventory()
	if !ok {
		return s.failed()
	}
	if s.wantInBandInspection(inv) {
		return s.inspectInBand(inv)
	}
	return s.inspected(inv)
}

// bmcInventory reads the out-of-band inventory.
func (s *step) bmcInventory() (*infrav1.HardwareInventory, bool) {
	var inv *infrav1.HardwareInventory
	err := s.runBMC("inventory", func(ctx context.Context, c bmc.Client) error {
		var err error
		inv, err = c.Inventory(ctx)
		return err
	})
	return inv, err == nil
}

// wantInBandInspection decides, from what the BMC reported, whether the agent must be booted
// to report the hardware. Never when the host already has an in-band inventory: every
// install and wipe refreshes it, so one boot per host is enough.
func (s *step) wantInBandInspection(bmcInv *infrav1.HardwareInventory) bool {
	h := s.in.Host
	if hasInBandInventory(h) {
		return false
	}
	switch h.Spec.Inspection {
	case infrav1.InspectionOutOfBand:
		return false
	case infrav1.InspectionInBand:
		return true
	default:
		return !hasCompute(bmcInv)
	}
}

// inBandInspectionUnderway reports whether an earlier reconcile of this Inspecting pass
// started an in-band inspection that has not finished. The Inspected condition carries the
// decision, so a controller restarted meanwhile goes on with it (a new attempt) instead of
// reading the BMC again.
func (s *step) inBandInspectionUnderway() bool {
	h := s.in.Host
	if h.Spec.Inspection == infrav1.InspectionOutOfBand || hasInBandInventory(h) {
		return false
	}
	c := conditions.Get(h, ConditionInspected)
	return c != nil && c.Status == metav1.ConditionFalse && (c.Reason == reasonInspectingInBand || c.Reason == reasonInspectionFailed)
}

// The Inspected condition's reasons while the agent inspects.
const (
	reasonInspectingInBand = "InspectingInBand"
	reasonInspectionFailed = "InspectionFailed"
)

// inspectInBand has the provisioner boot the agent, which reports the inventory at
// registration and powers the server off. The host stays Inspecting until that is done, like
// a wipe in Deprovisioning: a controller restarted meanwhile starts a new attempt. A failure
// (the agent never registered, or did not finish) is kept as the host's last error until an
// inspection succeeds, so the retries back off. bmcInv is the BMC's inventory when it was
// read in this reconcile.
func (s *step) inspectInBand(bmcInv *infrav1.HardwareInventory) stepResult {
	h := s.in.Host
	out, err := s.m.Provisioner.Inspect(s.ctx, h, s.runBMC)
	if err != nil {
		err = fmt.Errorf("in-band inspection: %w", err)
		s.recordError(reasonInspectionFailed, err)
		conditions.Set(h, metav1.Condition{Type: ConditionInspected, Status: metav1.ConditionFalse, Reason: reasonInspectionFailed, Message: err.Error()})
		return s.failed()
	}
	if !out.Done {
		msg := "the agent reports the hardware in band: " + out.Message
		if e := h.Status.LastError; e != nil && e.Reason == reasonInspectionFailed {
			msg += fmt.Sprintf(" (retry %d after: %s)", e.Count, e.Message)
		}
		conditions.Set(h, metav1.Condition{Type: ConditionInspected, Status: metav1.ConditionFalse, Reason: reasonInspectingInBand, Message: msg})
		return stepResult{requeueAfter: max(out.RequeueAfter, time.Second)}
	}
	s.in.LastPowerSync = time.Time{} // the agent powered the server off: read it again now
	if hasInBandInventory(h) {
		return s.inspected(h.Status.Hardware.DeepCopy())
	}
	// The backend has no in-band inventory to give (Simulated, or an agent that reported
	// none): go on with what the BMC reports rather than boot the agent forever.
	if bmcInv == nil {
		var ok bool
		if bmcInv, ok = s.bmcInventory(); !ok {
			return s.failed()
		}
	}
	return s.inspected(bmcInv)
}

// inspected records an inventory, labels the host from it and makes it Available.
func (s *step) inspected(inv *infrav1.HardwareInventory) stepResult {
	h := s.in.Host
	if old := h.Status.Hardware; old != nil && old.Source == inventoryInBand &&
		(!hasCompute(inv) || h.Spec.Inspection == infrav1.InspectionInBand) {
		// An IPMI BMC reports only its FRU (no CPU, memory or disks): keep what the agent
		// reported in band (on its last network boot, e.g. the wipe before this inspection)
		// rather than lose the hardware labels machines select by. InBand prefers the agent's
		// report whatever the BMC says.
		inv = old.DeepCopy()
	}
	if old := h.Status.Hardware; old != nil && sameHardware(old, inv) {
		inv.InspectedAt = old.InspectedAt // nothing changed: don't rewrite status for a timestamp
	}
	if inv.InspectedAt == nil {
		now := metav1.NewTime(s.m.now().UTC().Truncate(time.Second))
		inv.InspectedAt = &now
	}
	h.Status.Hardware = inv
	ApplyHardwareLabels(h)
	source := "out-of-band"
	switch {
	case inv.Source != inventoryInBand:
	case h.Spec.Inspection == infrav1.InspectionInBand:
		source = "in-band, from the agent, as spec.inspection InBand asks"
	default:
		source = "in-band, from the agent; the BMC reports no CPU or memory"
	}
	conditions.Set(h, metav1.Condition{Type: ConditionInspected, Status: metav1.ConditionTrue, Reason: "Inspected",
		Message: fmt.Sprintf("%d cores, %s memory, %d disks, %d NICs, %d accelerators (%s)",
			inv.CPU.Cores, quantityString(inv.Memory), len(inv.Disks), len(inv.NICs), len(inv.Accelerators), source)})
	s.clearError()
	return stepResult{next: infrav1.HostStateAvailable, cont: true}
}

// available keeps power where the spec wants it and starts provisioning when claimed.
func (s *step) available() stepResult {
	h := s.in.Host
	if c := h.Spec.Claim; c != nil {
		if c.Released {
			// A release that never finished (e.g. the BMC was unreachable and the machine gave
			// up) still owes a wipe: a host never returns to the pool unwiped.
			return stepResult{next: infrav1.HostStateDeprovisioning, cont: true}
		}
		if c.Image != nil {
			if installedFor(h, c) {
				// The host's status was lost (clusterctl move, a restore from backup) but its
				// metadata says it runs exactly this claim's install: it is not installed again.
				conditions.Set(h, metav1.Condition{Type: ConditionProvisioned, Status: metav1.ConditionTrue, Reason: "Provisioned",
					Message: "running " + c.Image.URL + " (installed before the host's status was lost)"})
				return stepResult{next: infrav1.HostStateProvisioned, cont: true}
			}
			return stepResult{next: infrav1.HostStateProvisioning, cont: true}
		}
	}
	return s.keepPower()
}

func (s *step) provisioning() stepResult {
	h := s.in.Host
	if c := h.Spec.Claim; c == nil || c.Released {
		return stepResult{next: infrav1.HostStateDeprovisioning, cont: true}
	}
	out, err := s.m.Provisioner.Provision(s.ctx, h, s.runBMC)
	if err != nil {
		s.recordError("ProvisioningFailed", err)
		conditions.Set(h, metav1.Condition{Type: ConditionProvisioned, Status: metav1.ConditionFalse, Reason: "ProvisioningFailed", Message: err.Error()})
		return s.failed()
	}
	s.clearError()
	if !out.Done {
		conditions.Set(h, metav1.Condition{Type: ConditionProvisioned, Status: metav1.ConditionFalse, Reason: "Provisioning", Message: out.Message})
		return stepResult{requeueAfter: max(out.RequeueAfter, time.Second)}
	}
	conditions.Set(h, metav1.Condition{Type: ConditionProvisioned, Status: metav1.ConditionTrue, Reason: "Provisioned",
		Message: "running " + h.Spec.Claim.Image.URL})
	if h.Annotations == nil {
		h.Annotations = map[string]string{}
	}
	h.Annotations[infrav1.ProvisionedForAnnotation] = h.Spec.Claim.ProvisionedFor()
	// The install ended with the server booted into its OS: its power is known this moment,
	// so the next poll is a full period from now, not from the last poll before the install.
	h.Status.Power = infrav1.PowerOn
	s.res.PowerSynced = true
	return stepResult{next: infrav1.HostStateProvisioned, requeueAfter: s.powerSyncInterval()}
}

func (s *step) provisioned() stepResult {
	h := s.in.Host
	if c := h.Spec.Claim; c == nil || c.Released {
		return stepResult{next: infrav1.HostStateDeprovisioning, cont: true}
	}
	if request, ok := h.Annotations[infrav1.RebootAnnotation]; ok {
		if err := s.runBMC("power-cycle", PowerCycleOrOn); err != nil {
			return s.failed()
		}
		delete(h.Annotations, infrav1.RebootAnnotation)
		h.Status.Power = infrav1.PowerOn
		s.res.Events = append(s.res.Events, Event{Reason: "Rebooted", Message: "power-cycled on request " + request})
		s.res.PowerSynced = true
		return stepResult{requeueAfter: s.powerSyncInterval()}
	}
	s.applyBootReport()
	if upgradeWanted(h) {
		return stepResult{next: infrav1.HostStateUpgrading, cont: true}
	}
	return s.keepPower()
}

// deprovisioning wipes the host: after a release with the claim's wipe policy, on the way out
// of maintenance (repair) with a metadata wipe. Only Inspecting follows it, so the state
// itself, kept in status, is what owes the wipe: a controller restarted mid-wipe finds the
// host still Deprovisioning and wipes it again from the start.
func (s *step) deprovisioning() stepResult {
	h := s.in.Host
	released := h.Spec.Claim != nil && h.Spec.Claim.Released
	policy := infrav1.WipePolicyMetadata
	if released && h.Spec.Claim.WipePolicy != "" {
		policy = h.Spec.Claim.WipePolicy
	}
	out, err := s.m.Provisioner.Deprovision(s.ctx, h, policy, s.runBMC)
	if err != nil {
		s.recordError("DeprovisioningFailed", err)
		return s.failed()
	}
	s.clearError()
	if !out.Done {
		return stepResult{requeueAfter: max(out.RequeueAfter, time.Second)}
	}
	conditions.Delete(h, ConditionProvisioned)
	h.Status.BootSlots = nil
	delete(h.Annotations, infrav1.ProvisionedForAnnotation)
	if released {
		h.Spec.Claim = nil
		s.res.ReleaseClaim = true
	}
	s.in.LastPowerSync = time.Time{} // the agent powered the server off: read it again now
	// Re-inspect before handing the host out again: it may have been repaired or changed.
	return stepResult{next: infrav1.HostStateInspecting, cont: true}
}

// maintenance does nothing but read power: an operator is working on the server.
func (s *step) maintenance() stepResult {
	h := s.in.Host
	if h.Spec.Claim == nil && h.Status.State != infrav1.HostStateMaintenance {
		return stepResult{next: infrav1.HostStateMaintenance}
	}
	if wait := s.untilPowerSync(); wait > 0 {
		return stepResult{requeueAfter: wait}
	}
	if power, ok := s.readPower(); ok {
		h.Status.Power = power
	}
	return stepResult{requeueAfter: s.powerSyncInterval()}
}

// leavingMaintenance starts the repair path. While in maintenance anyone may have worked on
// the server (booted a rescue system, swapped disks for used ones), so it is wiped (metadata)
// before it is handed out again, then re-inspected (parts may have been replaced, and the
// wipe's agent may have reported an in-band inventory). Deprovisioning owes the wipe from
// here on: only a finished wipe leaves it.
func (s *step) leavingMaintenance() stepResult {
	s.res.Events = append(s.res.Events, Event{Reason: "MaintenanceCleared",
		Message: "maintenance cleared: the host is wiped (metadata) and re-inspected before it is Available again"})
	return stepResult{next: infrav1.HostStateDeprovisioning, cont: true}
}

// retiring wipes (through the provisioner) and powers off; then the host is scrap.
func (s *step) retiring() stepResult {
	h := s.in.Host
	out, err := s.m.Provisioner.Deprovision(s.ctx, h, infrav1.WipePolicyMetadata, s.runBMC)
	if err != nil {
		s.recordError("RetireWipeFailed", err)
		return s.failed()
	}
	if !out.Done {
		return stepResult{requeueAfter: max(out.RequeueAfter, time.Second)}
	}
	if err := s.runBMC("power-off", func(ctx context.Context, c bmc.Client) error {
		return c.SetPower(ctx, bmc.PowerActionOff)
	}); err != nil {
		return s.failed()
	}
	s.clearError()
	h.Status.Power = infrav1.PowerOff
	delete(h.Annotations, infrav1.ProvisionedForAnnotation)
	s.res.ReleaseClaim = h.Spec.Claim != nil
	return stepResult{next: infrav1.HostStateRetired}
}

// installedFor reports whether the host runs the install claim asks for, as its
// ProvisionedForAnnotation says. Only a host that lost its status meets a claim in Available
// with the annotation set: any other host is Provisioned while its claim lasts, and the
// annotation goes with the claim.
func installedFor(h *infrav1.AnvilHost, c *infrav1.HostClaim) bool {
	v, ok := h.Annotations[infrav1.ProvisionedForAnnotation]
	return ok && v == c.ProvisionedFor()
}

// retired is terminal: the server stays off and is never handed out again.
func (s *step) retired() stepResult { return stepResult{} }

// keepPower polls power every PowerSyncInterval and corrects it toward spec.online (or "on"
// for a provisioned host). Nothing is written unless the state actually changed.
func (s *step) keepPower() stepResult {
	h := s.in.Host
	// Registration read power moments ago in this same step: onboarding reads it once.
	if !s.res.PowerSynced {
		if wait := s.untilPowerSync(); wait > 0 {
			return stepResult{requeueAfter: wait}
		}
		power, ok := s.readPower()
		if !ok {
			return s.failed()
		}
		h.Status.Power = power
	}
	power := h.Status.Power
	want := h.Spec.Online || h.Status.State == infrav1.HostStateProvisioned
	action := bmc.PowerAction("")
	switch {
	case want && power == infrav1.PowerOff:
		action = bmc.PowerActionOn
	case !want && power == infrav1.PowerOn:
		action = bmc.PowerActionOff
	}
	if action != "" {
		if err := s.runBMC("power-"+string(action), func(ctx context.Context, c bmc.Client) error {
			return c.SetPower(ctx, action)
		}); err != nil {
			return s.failed()
		}
		s.res.Events = append(s.res.Events, Event{Reason: "PowerChanged", Message: fmt.Sprintf("powered %s to match the spec", action)})
		h.Status.Power = infrav1.PowerOff
		if action == bmc.PowerActionOn {
			h.Status.Power = infrav1.PowerOn
		}
	}
	return stepResult{requeueAfter: s.powerSyncInterval()}
}

// untilPowerSync is how long until power is due to be read again (zero: now). The last read
// is kept in memory by the controller, so a restart reads power at once.
func (s *step) untilPowerSync() time.Duration {
	if s.in.LastPowerSync.IsZero() {
		return 0
	}
	return max(0, s.in.LastPowerSync.Add(s.powerSyncInterval()).Sub(s.m.now()))
}

func (s *step) readPower() (infrav1.PowerState, bool) {
	var power infrav1.PowerState
	err := s.runBMC("power-status", func(ctx context.Context, c bmc.Client) error {
		var err error
		power, err = c.PowerState(ctx)
		return err
	})
	if err != nil {
		return infrav1.PowerUnknown, false
	}
	s.clearError()
	s.res.PowerSynced = true
	return power, true
}

// runBMC runs op through the pool, keeps the BMC conditions current and records a failure
// as the host's last error.
func (s *step) runBMC(opName string, op func(context.Context, bmc.Client) error) error {
	h := s.in.Host
	if s.in.Target == nil {
		err := s.in.TargetErr
		if err == nil {
			err = fmt.Errorf("BMC credentials not resolved")
		}
		conditions.Set(h, metav1.Condition{Type: ConditionBMCReachable, Status: metav1.ConditionFalse, Reason: "CredentialsUnavailable", Message: err.Error()})
		s.recordError("CredentialsUnavailable", err)
		return err
	}
	err := s.m.BMC.Do(s.ctx, h.Namespace+"/"+h.Name, *s.in.Target, opName, op)
	if err != nil {
		// While the pool holds off, status already describes the failure that caused it;
		// rewriting it with a countdown would cost an API write per reconcile.
		if errors.Is(err, bmc.ErrBackoff) && h.Status.LastError != nil {
			return err
		}
		conditions.Set(h, metav1.Condition{Type: ConditionBMCReachable, Status: metav1.ConditionFalse, Reason: bmc.Reason(err), Message: err.Error()})
		s.recordError(bmc.Reason(err), err)
		return err
	}
	conditions.Set(h, metav1.Condition{Type: ConditionBMCReachable, Status: metav1.ConditionTrue, Reason: "Reachable",
		Message: fmt.Sprintf("%s BMC at %s answers", s.in.Target.Address.Protocol, s.in.Target.Address.HostPort())})
	s.setTLSCondition()
	return nil
}

func (s *step) setTLSCondition() {
	h, t := s.in.Host, s.in.Target
	switch {
	case t.Address.Protocol != bmc.Redfish:
		conditions.Set(h, metav1.Condition{Type: ConditionBMCTLSVerified, Status: metav1.ConditionTrue, Reason: "NotApplicable", Message: "IPMI does not use TLS"})
	case !t.Address.HTTPS:
		conditions.Set(h, metav1.Condition{Type: ConditionBMCTLSVerified, Status: metav1.ConditionFalse, Reason: "PlainHTTP", Message: "redfish+http:// sends credentials unencrypted; use redfish+https:// outside labs"})
	case t.InsecureSkipVerify:
		conditions.Set(h, metav1.Condition{Type: ConditionBMCTLSVerified, Status: metav1.ConditionFalse, Reason: "VerificationDisabled", Message: "spec.bmc.insecureSkipVerify is set: the BMC's identity is not checked"})
	default:
		conditions.Set(h, metav1.Condition{Type: ConditionBMCTLSVerified, Status: metav1.ConditionTrue, Reason: "Verified", Message: "the BMC's certificate verified against the host's CA bundle or the system store"})
	}
}

// failed keeps the state and retries after the pool's back-off (or RetryInterval).
func (s *step) failed() stepResult {
	retry := s.m.retryInterval()
	if e := s.in.Host.Status.LastError; e != nil && e.Count > 1 {
		retry = min(retry*time.Duration(1<<min(e.Count-1, 6)), 10*time.Minute)
	}
	return stepResult{requeueAfter: retry}
}

// recordError keeps the last error; the count (which sets the back-off) grows only while the
// same reason repeats, so the timestamp and count don't churn status on every retry.
func (s *step) recordError(reason string, err error) {
	h := s.in.Host
	msg := err.Error()
	if e := h.Status.LastError; e != nil && e.Reason == reason {
		if e.Message != msg {
			e.Message = msg
		}
		if e.Count < 1000 {
			e.Count++
		}
		return
	}
	h.Status.LastError = &infrav1.HostError{Reason: reason, Message: msg, Count: 1, LastTransitionTime: metav1.NewTime(s.m.now().UTC().Truncate(time.Second))}
	s.res.Events = append(s.res.Events, Event{Warning: true, Reason: reason, Message: msg})
}

func (s *step) clearError() { s.in.Host.Status.LastError = nil }

func (s *step) syncMaintenanceCondition() {
	h := s.in.Host
	if h.Spec.Maintenance != nil {
		conditions.Set(h, metav1.Condition{Type: ConditionMaintenance, Status: metav1.ConditionTrue, Reason: "InMaintenance", Message: h.Spec.Maintenance.Reason})
		return
	}
	conditions.Delete(h, ConditionMaintenance)
}

// setReady summarises the host for `kubectl get` and for the machine controller's messages.
func (s *step) setReady() {
	h := s.in.Host
	c := metav1.Condition{Type: ConditionReady, Status: metav1.ConditionFalse, Reason: string(h.Status.State)}
	switch {
	case h.Status.LastError != nil:
		c.Reason, c.Message = h.Status.LastError.Reason, h.Status.LastError.Message
	case h.Spec.Maintenance != nil:
		c.Reason, c.Message = "InMaintenance", h.Spec.Maintenance.Reason
	case h.Status.State == infrav1.HostStateAvailable || h.Status.State == infrav1.HostStateProvisioned:
		c.Status, c.Message = metav1.ConditionTrue, string(h.Status.State)
	default:
		c.Message = "host is " + string(h.Status.State)
	}
	conditions.Set(h, c)
}

func (m *Machine) now() time.Time {
	if m.Now != nil {
		return m.Now()
	}
	return time.Now()
}

// powerSyncInterval is this host's poll period: PowerSyncInterval ±10 %, the offset fixed by
// a hash of the host's UID. Fixed, so that the requeue and the "is power due?" check agree
// (a random one drawn for each would wake a host early, to find nothing due and requeue);
// per host, so that a fleet created at once still spreads its polls.
func (s *step) powerSyncInterval() time.Duration {
	h := s.in.Host
	d := s.m.PowerSyncInterval
	if d <= 0 {
		d = 120 * time.Second
	}
	id := string(h.UID)
	if id == "" {
		id = h.Namespace + "/" + h.Name
	}
	// SHA-256, not FNV: its top bits differ even for names that differ in one character.
	sum := sha256.Sum256([]byte(id))
	unit := float64(binary.BigEndian.Uint64(sum[:8])) / float64(math.MaxUint64) // in [0, 1]
	return time.Duration(float64(d) * (0.9 + unit/5))
}

func (m *Machine) retryInterval() time.Duration {
	if m.RetryInterval > 0 {
		return m.RetryInterval
	}
	return 30 * time.Second
}

// inventoryInBand is HardwareInventory.Source for what the agent reported.
const inventoryInBand = "InBand"

// hasInBandInventory reports whether the agent has reported this host's hardware.
func hasInBandInventory(h *infrav1.AnvilHost) bool {
	return h.Status.Hardware != nil && h.Status.Hardware.Source == inventoryInBand
}

// hasCompute reports whether an inventory says anything about CPU or memory (an IPMI FRU
// inventory does not).
func hasCompute(inv *infrav1.HardwareInventory) bool {
	return inv.CPU.Cores > 0 || inv.Memory != nil
}

// sameHardware compares inventories ignoring when they were taken.
func sameHardware(a, b *infrav1.HardwareInventory) bool {
	a, b = a.DeepCopy(), b.DeepCopy()
	a.InspectedAt, b.InspectedAt = nil, nil
	return equality.Semantic.DeepEqual(a, b)
}
