package hoststate

import (
	"context"
	"errors"
	"strings"
	"testing"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"sigs.k8s.io/cluster-api/util/conditions"

	infrav1 "github.com/anvil-metal/cluster-api-provider-anvil/api/v1alpha1"
	"github.com/anvil-metal/cluster-api-provider-anvil/internal/bmc"
)

// inspectingProvisioner plays the agent-driven backend's in-band inspection: the first call
// network-boots the host, the steps-th finishes, writing inventory (if any) into status as the
// real backend does with the agent's registration. Attempts live in the instance, so a new
// instance (a restarted controller) starts over.
type inspectingProvisioner struct {
	Simulated
	steps     int
	inventory *infrav1.HardwareInventory
	fail      error

	inFlight int
	boots    int
	done     int
}

func (p *inspectingProvisioner) Inspect(_ context.Context, h *infrav1.AnvilHost, run BMCRunner) (Outcome, error) {
	if p.fail != nil {
		p.inFlight = 0
		return Outcome{}, p.fail
	}
	if p.inFlight == 0 {
		if err := run("network-boot", func(ctx context.Context, c bmc.Client) error {
			if err := c.SetBootDevice(ctx, bmc.BootPXE, bmc.BootOptions{UEFI: true}); err != nil {
				return err
			}
			return PowerCycleOrOn(ctx, c)
		}); err != nil {
			return Outcome{}, err
		}
		p.boots++
	}
	p.inFlight++
	if p.inFlight < max(p.steps, 1) {
		return Outcome{RequeueAfter: 5 * time.Second, Message: "waiting for the agent to register"}, nil
	}
	p.inFlight = 0
	p.done++
	if err := run("power-off", func(ctx context.Context, c bmc.Client) error { return c.SetPower(ctx, bmc.PowerActionOff) }); err != nil {
		return Outcome{}, err
	}
	if p.inventory != nil {
		inv := p.inventory.DeepCopy()
		inv.Source = inventoryInBand
		h.Status.Hardware = inv
	}
	return Outcome{Done: true}, nil
}

// ipmiFixture is a host whose BMC reports only its FRU, and the agent's in-band inventory
// (32 cores, 256 GiB, a GPU).
func ipmiFixture() (*FakeHost, *Machine, *infrav1.HardwareInventory) {
	fh, m := fixture()
	agentInv := fh.BMC.Hardware.DeepCopy()
	fh.BMC.Hardware = &infrav1.HardwareInventory{Source: "OutOfBand", System: infrav1.SystemInfo{Manufacturer: "Supermicro", SerialNumber: "SM-1"}}
	addr, _ := bmc.ParseAddress("ipmi://10.0.0.5")
	fh.Target.Address = addr
	return fh, m, agentInv
}

func inspectedCondition(h *infrav1.AnvilHost) metav1.Condition {
	if c := conditions.Get(h, ConditionInspected); c != nil {
		return *c
	}
	return metav1.Condition{}
}

// An IPMI host (no CPU or memory from its BMC) stays Inspecting while the agent boots and
// reports in band; the BMC is not read again while it waits; the agent's inventory labels the
// host, which is then Available and powered as spec.online says. A later re-inspection keeps
// that inventory and boots nothing.
func TestIPMIHostIsInspectedInBandOnce(t *testing.T) {
	fh, m, agentInv := ipmiFixture()
	prov := &inspectingProvisioner{steps: 3, inventory: agentInv}
	m.Provisioner = prov
	h := fh.Host

	r := fh.step(m)
	c := inspectedCondition(h)
	if h.Status.State != infrav1.HostStateInspecting || prov.boots != 1 || c.Status != metav1.ConditionFalse || c.Reason != reasonInspectingInBand {
		t.Fatalf("first step: state %s, boots %d, Inspected %+v; want Inspecting with the agent booted", h.Status.State, prov.boots, c)
	}
	if !strings.Contains(c.Message, "waiting for the agent") || r.RequeueAfter != 5*time.Second {
		t.Errorf("Inspected message %q, requeue %s; want the backend's progress and its requeue", c.Message, r.RequeueAfter)
	}
	if h.Labels[LabelCPUCores] != "" || h.Status.Hardware != nil {
		t.Errorf("labels %v, hardware %+v before the agent reported", h.Labels, h.Status.Hardware)
	}
	_, _, _, callsBefore := fh.BMC.Counts()
	fh.step(m)
	if _, _, _, calls := fh.BMC.Counts(); calls != callsBefore || h.Status.State != infrav1.HostStateInspecting {
		t.Errorf("while the agent inspects: %d BMC calls, state %s; want none and Inspecting", calls-callsBefore, h.Status.State)
	}

	fh.step(m)
	if h.Status.State != infrav1.HostStateAvailable || h.Status.LastError != nil {
		t.Fatalf("after the agent reported: state %s, lastError %+v; want Available", h.Status.State, h.Status.LastError)
	}
	if h.Status.Hardware.Source != inventoryInBand || h.Labels[LabelCPUCores] != "32" || h.Labels[LabelGPUCount] != "1" {
		t.Errorf("source %s, labels %v; want the in-band inventory's labels", h.Status.Hardware.Source, h.Labels)
	}
	if c := inspectedCondition(h); c.Status != metav1.ConditionTrue || !strings.Contains(c.Message, "in-band") || !strings.Contains(c.Message, "32 cores") {
		t.Errorf("Inspected %+v; want True, saying the inventory is in-band", c)
	}
	if fh.BMC.Power != infrav1.PowerOn || h.Status.Power != infrav1.PowerOn {
		t.Errorf("the agent powered the server off; spec.online wants it on: BMC %s, status %s", fh.BMC.Power, h.Status.Power)
	}

	// Re-inspection (e.g. after a repair's wipe) keeps the in-band inventory; no new boot.
	h.Status.State = infrav1.HostStateInspecting
	fh.step(m)
	if h.Status.State != infrav1.HostStateAvailable || prov.boots != 1 || h.Labels[LabelCPUCores] != "32" {
		t.Errorf("re-inspection: state %s, boots %d, cores label %q; want Available, no new boot, labels kept", h.Status.State, prov.boots, h.Labels[LabelCPUCores])
	}
}

// A controller restarted while the agent inspects (new state machine, attempts lost, host as
// stored) goes on with the in-band inspection: a new boot, not the FRU-only inventory.
func TestInBandInspectionSurvivesARestart(t *testing.T) {
	fh, m, agentInv := ipmiFixture()
	m.Provisioner = &inspectingProvisioner{steps: 5, inventory: agentInv}
	h := fh.Host
	fh.step(m)
	fh.step(m)
	if h.Status.State != infrav1.HostStateInspecting {
		t.Fatalf("state %s, want Inspecting", h.Status.State)
	}

	stored := h.DeepCopy()
	restarted := &inspectingProvisioner{steps: 2, inventory: agentInv}
	m2 := &Machine{BMC: m.BMC, Provisioner: restarted, PowerSyncInterval: time.Hour}
	fh.Host = stored
	fh.step(m2)
	if stored.Status.State != infrav1.HostStateInspecting || restarted.boots != 1 {
		t.Fatalf("after the restart: state %s, boots %d; want a new attempt while still Inspecting", stored.Status.State, restarted.boots)
	}
	fh.step(m2)
	if stored.Status.State != infrav1.HostStateAvailable || stored.Labels[LabelCPUCores] != "32" {
		t.Errorf("state %s, cores label %q; want Available with the in-band inventory", stored.Status.State, stored.Labels[LabelCPUCores])
	}
}

// An in-band inspection that fails (the agent never registered) is the host's InspectionFailed
// error; repeated failures back off; the next success clears it.
func TestFailedInBandInspectionBacksOffAndRecovers(t *testing.T) {
	fh, m, agentInv := ipmiFixture()
	m.RetryInterval = time.Second
	timeout := errors.New("the agent did not register within 15m0s of the network boot: check that the host PXE-boots")
	prov := &inspectingProvisioner{steps: 1, inventory: agentInv, fail: timeout}
	m.Provisioner = prov
	h := fh.Host

	var requeues []time.Duration
	for range 3 {
		r := fh.step(m)
		requeues = append(requeues, r.RequeueAfter)
	}
	e := h.Status.LastError
	if h.Status.State != infrav1.HostStateInspecting || e == nil || e.Reason != reasonInspectionFailed || e.Count != 3 {
		t.Fatalf("state %s, lastError %+v; want Inspecting with InspectionFailed counted 3 times", h.Status.State, e)
	}
	if !strings.Contains(e.Message, "in-band inspection") || !strings.Contains(e.Message, "PXE") {
		t.Errorf("error %q should say what failed and what to check", e.Message)
	}
	if requeues[0] >= requeues[1] || requeues[1] >= requeues[2] {
		t.Errorf("requeues %v; want a growing back-off", requeues)
	}
	if c := inspectedCondition(h); c.Reason != reasonInspectionFailed || c.Status != metav1.ConditionFalse {
		t.Errorf("Inspected %+v; want False, InspectionFailed", c)
	}
	if c := conditions.Get(h, ConditionReady); c == nil || c.Reason != reasonInspectionFailed {
		t.Errorf("Ready %+v; want the InspectionFailed reason", c)
	}

	prov.fail, prov.steps = nil, 2
	fh.step(m)
	if e := h.Status.LastError; e == nil || e.Count != 3 || !strings.Contains(inspectedCondition(h).Message, "retry 3") {
		t.Errorf("while retrying: lastError %+v, Inspected %q; want the failure kept (back-off) and named", e, inspectedCondition(h).Message)
	}
	fh.step(m)
	if h.Status.State != infrav1.HostStateAvailable || h.Status.LastError != nil || h.Labels[LabelCPUCores] != "32" {
		t.Errorf("after a successful retry: state %s, lastError %+v, cores %q", h.Status.State, h.Status.LastError, h.Labels[LabelCPUCores])
	}
}

// spec.inspection: OutOfBand never boots the agent to inspect; InBand boots it even when the
// BMC reports compute, and keeps its inventory over the BMC's; Auto boots it only for a BMC
// that reports no CPU or memory.
func TestInspectionModes(t *testing.T) {
	t.Run("OutOfBand", func(t *testing.T) {
		fh, m, agentInv := ipmiFixture()
		prov := &inspectingProvisioner{inventory: agentInv}
		m.Provisioner = prov
		fh.Host.Spec.Inspection = infrav1.InspectionOutOfBand
		fh.step(m)
		if fh.Host.Status.State != infrav1.HostStateAvailable || prov.boots != 0 || fh.Host.Labels[LabelCPUCores] != "" {
			t.Errorf("state %s, boots %d, cores %q; want Available from the FRU alone", fh.Host.Status.State, prov.boots, fh.Host.Labels[LabelCPUCores])
		}
	})
	t.Run("InBand", func(t *testing.T) {
		fh, m := fixture() // a BMC that reports 32 cores
		agentInv := fh.BMC.Hardware.DeepCopy()
		agentInv.CPU.Cores = 48 // the BMC is wrong
		prov := &inspectingProvisioner{inventory: agentInv}
		m.Provisioner = prov
		fh.Host.Spec.Inspection = infrav1.InspectionInBand
		fh.step(m)
		if fh.Host.Status.State != infrav1.HostStateAvailable || prov.boots != 1 || fh.Host.Labels[LabelCPUCores] != "48" {
			t.Fatalf("state %s, boots %d, cores %q; want the agent's 48 cores", fh.Host.Status.State, prov.boots, fh.Host.Labels[LabelCPUCores])
		}
		if c := inspectedCondition(fh.Host); !strings.Contains(c.Message, "InBand") {
			t.Errorf("Inspected %q should say spec.inspection asked for in-band", c.Message)
		}
		fh.Host.Status.State = infrav1.HostStateInspecting
		fh.step(m)
		if prov.boots != 1 || fh.Host.Labels[LabelCPUCores] != "48" {
			t.Errorf("re-inspection: boots %d, cores %q; want the in-band inventory kept over the BMC's", prov.boots, fh.Host.Labels[LabelCPUCores])
		}
	})
	t.Run("Auto with a full BMC inventory", func(t *testing.T) {
		fh, m := fixture()
		prov := &inspectingProvisioner{}
		m.Provisioner = prov
		fh.step(m)
		if fh.Host.Status.State != infrav1.HostStateAvailable || prov.boots != 0 {
			t.Errorf("state %s, boots %d; want Available without booting the agent", fh.Host.Status.State, prov.boots)
		}
	})
}

// Simulated has no agent: its inspection is done at once and reports nothing, so an IPMI host
// becomes Available with its FRU inventory rather than wait for ever.
func TestSimulatedInspectionKeepsTheBMCInventory(t *testing.T) {
	fh, m, _ := ipmiFixture()
	fh.step(m)
	h := fh.Host
	if h.Status.State != infrav1.HostStateAvailable || h.Status.Hardware == nil || h.Status.Hardware.System.SerialNumber != "SM-1" || h.Labels[LabelCPUCores] != "" {
		t.Errorf("state %s, hardware %+v, labels %v; want Available with the FRU inventory", h.Status.State, h.Status.Hardware, h.Labels)
	}
}
