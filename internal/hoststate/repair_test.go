package hoststate

import (
	"context"
	"errors"
	"strings"
	"testing"
	"time"

	"sigs.k8s.io/cluster-api/util/conditions"

	infrav1 "github.com/anvil-metal/cluster-api-provider-anvil/api/v1alpha1"
	"github.com/anvil-metal/cluster-api-provider-anvil/internal/bmc"
)

// wipingProvisioner wipes like the agent-driven backend does: the first call network-boots
// the host (through the BMC) and later calls report progress until the wipe has taken
// `steps` calls in all. Like the real backend it keeps its attempt in memory, so a new one
// (a restarted controller) starts the wipe over.
type wipingProvisioner struct {
	steps int   // calls one wipe takes (at least 1)
	fail  error // when set, every wipe fails with it

	calls    int
	inFlight int
	// wipes records each finished wipe's policy.
	wipes []infrav1.WipePolicy
	// boots counts network boots: each starts a wipe.
	boots int
}

func (p *wipingProvisioner) Provision(ctx context.Context, h *infrav1.AnvilHost, run BMCRunner) (Outcome, error) {
	return Simulated{}.Provision(ctx, h, run)
}

func (p *wipingProvisioner) Inspect(ctx context.Context, h *infrav1.AnvilHost, run BMCRunner) (Outcome, error) {
	return Simulated{}.Inspect(ctx, h, run)
}

func (p *wipingProvisioner) Deprovision(_ context.Context, _ *infrav1.AnvilHost, policy infrav1.WipePolicy, run BMCRunner) (Outcome, error) {
	p.calls++
	if p.fail != nil {
		return Outcome{}, p.fail
	}
	if p.inFlight == 0 {
		if err := run("network-boot", func(ctx context.Context, c bmc.Client) error {
			return c.SetBootDevice(ctx, bmc.BootPXE, bmc.BootOptions{UEFI: true})
		}); err != nil {
			return Outcome{}, err
		}
		p.boots++
	}
	p.inFlight++
	if p.inFlight < max(p.steps, 1) {
		return Outcome{RequeueAfter: time.Second, Message: "wiping"}, nil
	}
	p.inFlight = 0
	p.wipes = append(p.wipes, policy)
	return Outcome{Done: true}, nil
}

// inMaintenance brings an unclaimed host to state Maintenance.
func inMaintenance(t *testing.T, fh *FakeHost, m *Machine) {
	t.Helper()
	fh.step(m)
	fh.Host.Spec.Maintenance = &infrav1.Maintenance{Reason: "needs repair: disk 2"}
	fh.step(m)
	if fh.Host.Status.State != infrav1.HostStateMaintenance {
		t.Fatalf("state %s, want Maintenance", fh.Host.Status.State)
	}
}

// Clearing maintenance wipes the host with a metadata wipe and re-inspects it; only then is
// it Available.
func TestLeavingMaintenanceWipesThenReinspects(t *testing.T) {
	fh, m := fixture()
	prov := &wipingProvisioner{steps: 1}
	m.Provisioner = prov
	inMaintenance(t, fh, m)
	h := fh.Host
	if len(prov.wipes) != 0 {
		t.Fatalf("wiped while entering maintenance: %v", prov.wipes)
	}
	h.Spec.Maintenance = nil
	fh.BMC.Hardware.CPU.Cores = 48 // the CPUs were swapped
	r := fh.step(m)
	if h.Status.State != infrav1.HostStateAvailable || h.Labels[LabelCPUCores] != "48" {
		t.Fatalf("after maintenance: state %s, cores label %s; want wiped, re-inspected and Available", h.Status.State, h.Labels[LabelCPUCores])
	}
	if len(prov.wipes) != 1 || prov.wipes[0] != infrav1.WipePolicyMetadata {
		t.Fatalf("wipes %v, want one metadata wipe", prov.wipes)
	}
	var path []infrav1.HostState
	for _, e := range r.Events {
		if e.To != "" {
			path = append(path, e.To)
		}
	}
	want := []infrav1.HostState{infrav1.HostStateDeprovisioning, infrav1.HostStateInspecting, infrav1.HostStateAvailable}
	if len(path) != len(want) || path[0] != want[0] || path[1] != want[1] || path[2] != want[2] {
		t.Errorf("path %v, want %v", path, want)
	}
	if !hasEvent(r, "MaintenanceCleared") {
		t.Error("no MaintenanceCleared event saying what happens")
	}
}

// A wipe that takes several reconciles keeps the host in Deprovisioning, in status; a
// controller that restarts then (a new state machine and provisioner, the host as stored)
// wipes it from the start, and the host is Available only after a wipe finished.
func TestRepairWipeSurvivesARestart(t *testing.T) {
	fh, m := fixture()
	prov := &wipingProvisioner{steps: 3}
	m.Provisioner = prov
	inMaintenance(t, fh, m)
	h := fh.Host
	h.Spec.Maintenance = nil
	fh.step(m)
	if h.Status.State != infrav1.HostStateDeprovisioning || prov.boots != 1 {
		t.Fatalf("state %s, %d network boots: want Deprovisioning with the wipe started", h.Status.State, prov.boots)
	}
	if _, ok := h.Annotations[infrav1.BlockMoveAnnotation]; !ok {
		t.Error("an unclaimed host owing a wipe does not block clusterctl move (which drops status)")
	}

	// The restart: what is stored is the host; everything in memory is new.
	stored := h.DeepCopy()
	_, m2 := fixture()
	m2.BMC = m.BMC
	prov2 := &wipingProvisioner{steps: 3}
	m2.Provisioner = prov2
	fh.Host = stored
	fh.lastSync = time.Time{}
	for i := 0; i < 2; i++ {
		fh.step(m2)
		if stored.Status.State == infrav1.HostStateAvailable {
			t.Fatalf("Available after %d reconciles of the restarted controller, before any wipe finished", i+1)
		}
	}
	fh.step(m2)
	if stored.Status.State != infrav1.HostStateAvailable || len(prov2.wipes) != 1 || prov2.boots != 1 {
		t.Fatalf("state %s, wipes %v, boots %d: want Available after the restarted controller's wipe", stored.Status.State, prov2.wipes, prov2.boots)
	}
	if _, ok := stored.Annotations[infrav1.BlockMoveAnnotation]; ok {
		t.Error("still blocks clusterctl move once wiped")
	}
}

// A wipe that fails keeps the host out of the pool with the reason; maintenance set again
// mid-wipe stops it, and clearing it once more still owes the wipe.
func TestRepairWipeFailureAndMaintenanceAgain(t *testing.T) {
	fh, m := fixture()
	prov := &wipingProvisioner{steps: 2, fail: errors.New("agent: /dev/sda: I/O error")}
	m.Provisioner = prov
	inMaintenance(t, fh, m)
	h := fh.Host
	h.Spec.Maintenance = nil
	for range 3 {
		fh.step(m)
	}
	if h.Status.State != infrav1.HostStateDeprovisioning || h.Status.LastError == nil || h.Status.LastError.Reason != "DeprovisioningFailed" {
		t.Fatalf("state %s, lastError %+v: want Deprovisioning with DeprovisioningFailed", h.Status.State, h.Status.LastError)
	}
	if conditions.IsTrue(h, ConditionReady) {
		t.Error("Ready while the wipe fails")
	}

	prov.fail = nil
	fh.step(m) // the wipe starts again
	h.Spec.Maintenance = &infrav1.Maintenance{Reason: "disk 2 again"}
	fh.step(m)
	if h.Status.State != infrav1.HostStateMaintenance {
		t.Fatalf("state %s, want Maintenance", h.Status.State)
	}
	prov.inFlight = 0 // the agent of the interrupted attempt is gone
	h.Spec.Maintenance = nil
	fh.step(m)
	if h.Status.State == infrav1.HostStateAvailable {
		t.Fatal("Available without a finished wipe")
	}
	fh.step(m)
	if h.Status.State != infrav1.HostStateAvailable || len(prov.wipes) != 1 {
		t.Fatalf("state %s, wipes %v", h.Status.State, prov.wipes)
	}
}

// Maintenance on a provisioned host pauses it; clearing it resumes the node as it was (no
// wipe), while a claim released during maintenance is wiped with its own policy and dropped.
func TestMaintenanceOfAClaimedHost(t *testing.T) {
	fh, m := fixture()
	prov := &wipingProvisioner{steps: 1}
	m.Provisioner = prov
	fh.step(m)
	h := fh.Host
	h.Spec.Claim = &infrav1.HostClaim{MachineRef: infrav1.MachineReference{Name: "m", UID: "u"},
		Image: &infrav1.Image{URL: "https://img/os.img", Checksum: "sha256:00"}, WipePolicy: infrav1.WipePolicyFull}
	fh.step(m)
	if h.Status.State != infrav1.HostStateProvisioned {
		t.Fatalf("state %s", h.Status.State)
	}
	h.Spec.Maintenance = &infrav1.Maintenance{Reason: "firmware update"}
	fh.step(m)
	h.Spec.Maintenance = nil
	fh.step(m)
	if h.Status.State != infrav1.HostStateProvisioned || len(prov.wipes) != 0 || h.Spec.Claim == nil {
		t.Fatalf("state %s, wipes %v, claim %+v: a running node must come back untouched", h.Status.State, prov.wipes, h.Spec.Claim)
	}

	h.Spec.Maintenance = &infrav1.Maintenance{Reason: "needs repair"}
	fh.step(m)
	h.Spec.Claim.Released = true // the machine was replaced meanwhile
	fh.step(m)
	if h.Status.State != infrav1.HostStateProvisioned || len(prov.wipes) != 0 {
		t.Fatalf("state %s, wipes %v: nothing happens in maintenance", h.Status.State, prov.wipes)
	}
	h.Spec.Maintenance = nil
	r := fh.step(m)
	if h.Status.State != infrav1.HostStateAvailable || !r.ReleaseClaim || len(prov.wipes) != 1 || prov.wipes[0] != infrav1.WipePolicyFull {
		t.Fatalf("state %s, released %v, wipes %v: want the claim's full wipe, then Available", h.Status.State, r.ReleaseClaim, prov.wipes)
	}
}

// An IPMI BMC reports only its FRU: re-inspection (after a wipe, or a repair) keeps the
// in-band inventory the agent reported, and with it the hardware labels; a BMC that reports
// CPU and memory replaces it.
func TestReinspectionKeepsInBandInventoryOverAnFRUOnlyOne(t *testing.T) {
	fh, m := fixture()
	m.Provisioner = &wipingProvisioner{steps: 1}
	fru := &infrav1.HardwareInventory{Source: "OutOfBand", System: infrav1.SystemInfo{Manufacturer: "Supermicro", SerialNumber: "SM-1"}}
	fh.BMC.Hardware = fru
	fh.step(m)
	h := fh.Host
	if h.Labels[LabelCPUCores] != "" {
		t.Fatalf("cores label %q from an FRU-only inventory", h.Labels[LabelCPUCores])
	}
	// The agent's registration during a wipe reported the hardware in band.
	inBand, _ := fixture()
	h.Status.Hardware = inBand.BMC.Hardware.DeepCopy()
	h.Status.Hardware.Source = "InBand"
	ApplyHardwareLabels(h)

	h.Spec.Maintenance = &infrav1.Maintenance{Reason: "fan"}
	fh.step(m)
	h.Spec.Maintenance = nil
	fh.step(m)
	if h.Status.State != infrav1.HostStateAvailable || h.Labels[LabelCPUCores] != "32" || h.Status.Hardware.Source != "InBand" {
		t.Fatalf("after re-inspection: state %s, cores label %q, source %s; want the in-band inventory kept", h.Status.State, h.Labels[LabelCPUCores], h.Status.Hardware.Source)
	}
	if c := conditions.Get(h, ConditionInspected); c == nil || !strings.Contains(c.Message, "in-band") {
		t.Errorf("Inspected condition %+v should say the inventory is in-band", c)
	}

	fh.BMC.Hardware = inBand.BMC.Hardware.DeepCopy() // a BMC that reports compute
	fh.BMC.Hardware.CPU.Cores, fh.BMC.Hardware.Source = 48, "OutOfBand"
	h.Spec.Maintenance = &infrav1.Maintenance{Reason: "BMC firmware"}
	fh.step(m)
	h.Spec.Maintenance = nil
	fh.step(m)
	if h.Labels[LabelCPUCores] != "48" || h.Status.Hardware.Source != "OutOfBand" {
		t.Errorf("cores label %q, source %s: a full out-of-band inventory replaces the in-band one", h.Labels[LabelCPUCores], h.Status.Hardware.Source)
	}
}
