package hoststate

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"testing"
	"time"

	"k8s.io/apimachinery/pkg/api/equality"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"sigs.k8s.io/cluster-api/util/conditions"

	infrav1 "github.com/anvil-metal/cluster-api-provider-anvil/api/v1alpha1"
	"github.com/anvil-metal/cluster-api-provider-anvil/internal/bmc"
)

func fixture() (*FakeHost, *Machine) {
	f := &bmc.FakeBMC{Password: "pw", Power: infrav1.PowerOff, Hardware: &infrav1.HardwareInventory{
		CPU:          infrav1.CPUInfo{Arch: "amd64", Cores: 32, Threads: 64, Sockets: 2},
		Memory:       resource.NewQuantity(256<<30, resource.BinarySI),
		Accelerators: []infrav1.Accelerator{{Class: "GPU", Model: "NVIDIA A100 80GB"}},
		NUMANodes:    []infrav1.NUMANode{{ID: 0}, {ID: 1}},
	}}
	pool := bmc.NewPool(bmc.PoolOptions{Dial: f.Dial, BackoffBase: time.Millisecond, BackoffMax: time.Millisecond, AuthHoldOff: time.Hour})
	m := &Machine{BMC: pool, Provisioner: Simulated{}, PowerSyncInterval: time.Hour}
	addr, _ := bmc.ParseAddress("redfish+https://10.0.0.5/redfish/v1/Systems/1")
	h := &infrav1.AnvilHost{ObjectMeta: metav1.ObjectMeta{Name: "h", Namespace: "ns"},
		Spec: infrav1.AnvilHostSpec{Online: true}}
	return &FakeHost{Host: h, BMC: f, Target: &bmc.Target{Address: addr, Username: "admin", Password: "pw"}}, m
}

// FakeHost bundles a host with its fake BMC for these tests.
type FakeHost struct {
	Host     *infrav1.AnvilHost
	BMC      *bmc.FakeBMC
	Target   *bmc.Target
	lastSync time.Time
}

func (f *FakeHost) step(m *Machine) Result {
	r := m.Step(context.Background(), Input{Host: f.Host, Target: f.Target, LastPowerSync: f.lastSync})
	if r.PowerSynced {
		f.lastSync = time.Now()
	}
	if r.ReleaseClaim {
		f.Host.Spec.Claim = nil
	}
	return r
}

func TestHealthyHostReachesAvailableInOneStep(t *testing.T) {
	fh, m := fixture()
	r := fh.step(m)
	h := fh.Host
	if h.Status.State != infrav1.HostStateAvailable {
		t.Fatalf("state %s, want Available (lastError %+v)", h.Status.State, h.Status.LastError)
	}
	if h.Status.Power != infrav1.PowerOn || fh.BMC.Power != infrav1.PowerOn {
		t.Errorf("spec.online=true: host power %s, BMC power %s", h.Status.Power, fh.BMC.Power)
	}
	want := map[string]string{LabelArch: "amd64", LabelCPUCores: "32", LabelMemoryGiB: "256", LabelGPUCount: "1",
		LabelGPUModel: "NVIDIA-A100-80GB", LabelNUMANodes: "2"}
	for k, v := range want {
		if h.Labels[k] != v {
			t.Errorf("label %s=%q, want %q", k, h.Labels[k], v)
		}
	}
	if !conditions.IsTrue(h, ConditionReady) || !conditions.IsTrue(h, ConditionInspected) || !conditions.IsTrue(h, ConditionBMCTLSVerified) {
		t.Errorf("conditions: %+v", h.Status.Conditions)
	}
	var reasons []string
	for _, e := range r.Events {
		reasons = append(reasons, e.Reason)
	}
	if got := strings.Join(reasons, ","); got != "Inspecting,Available,PowerChanged" {
		t.Errorf("events %s", got)
	}
	// Registration's power read serves the power check at Available: login aside, one read,
	// the inventory and the power-on.
	if logins, _, _, calls := fh.BMC.Counts(); logins != 1 || calls != 3 {
		t.Errorf("onboarding: %d logins, %d BMC calls; want 1 and 3 (power read once)", logins, calls)
	}
}

// Each host polls power on its own fixed period within ±10 %: a host requeued for its period
// finds power due (never wakes early to find nothing to do), and a fleet spreads out.
func TestPowerSyncPeriodIsFixedPerHostAndSpread(t *testing.T) {
	const period = time.Hour
	var shortest, longest time.Duration
	for i := range 50 {
		fh, m := fixture()
		fh.Host.UID = types.UID(fmt.Sprintf("uid-%d", i))
		now := time.Unix(1_700_000_000, 0)
		m.Now = func() time.Time { return now }
		r := m.Step(context.Background(), Input{Host: fh.Host, Target: fh.Target})
		if fh.Host.Status.State != infrav1.HostStateAvailable {
			t.Fatalf("state %s", fh.Host.Status.State)
		}
		if r.RequeueAfter < period*9/10 || r.RequeueAfter > period*11/10 {
			t.Fatalf("requeue after %s, want within 10 %% of %s", r.RequeueAfter, period)
		}
		if i == 0 || r.RequeueAfter < shortest {
			shortest = r.RequeueAfter
		}
		longest = max(longest, r.RequeueAfter)

		lastSync := now
		now = now.Add(r.RequeueAfter)
		_, _, _, calls := fh.BMC.Counts()
		r2 := m.Step(context.Background(), Input{Host: fh.Host, Target: fh.Target, LastPowerSync: lastSync})
		if _, _, _, after := fh.BMC.Counts(); after != calls+1 || !r2.PowerSynced {
			t.Fatalf("host %d woke after its requeue (%s) and did not find power due (%d BMC calls)", i, r.RequeueAfter, after-calls)
		}
		if r2.RequeueAfter != r.RequeueAfter {
			t.Fatalf("host %d: period %s then %s, want the same", i, r.RequeueAfter, r2.RequeueAfter)
		}
	}
	if longest-shortest < period/10 {
		t.Errorf("periods of 50 hosts span only %s..%s: not spread", shortest, longest)
	}
}

func TestSteadyStateChangesNothing(t *testing.T) {
	fh, m := fixture()
	fh.step(m)
	before := fh.Host.DeepCopy()
	_, _, _, callsBefore := fh.BMC.Counts()
	r := fh.step(m)
	if _, _, _, calls := fh.BMC.Counts(); calls != callsBefore {
		t.Errorf("%d BMC calls before the power sync was due", calls-callsBefore)
	}
	if !equality.Semantic.DeepEqual(before, fh.Host) {
		t.Error("a steady-state step changed the host (it would cost an API write)")
	}
	if r.RequeueAfter < 50*time.Minute {
		t.Errorf("requeue after %s, want about the power sync interval", r.RequeueAfter)
	}
}

func TestMissingCredentialsWaitThenRecover(t *testing.T) {
	fh, m := fixture()
	fh.Target = nil
	r := m.Step(context.Background(), Input{Host: fh.Host, TargetErr: errors.New(`Secret "h-bmc" not found: create it with keys username and password`)})
	h := fh.Host
	if h.Status.State != infrav1.HostStateRegistering || h.Status.LastError == nil || h.Status.LastError.Reason != "CredentialsUnavailable" {
		t.Fatalf("state %s, lastError %+v", h.Status.State, h.Status.LastError)
	}
	if c := conditions.Get(h, ConditionBMCReachable); c == nil || !strings.Contains(c.Message, "h-bmc") {
		t.Errorf("BMCReachable condition should say which Secret: %+v", c)
	}
	if r.RequeueAfter <= 0 {
		t.Error("must retry on its own")
	}
	fh2, _ := fixture()
	fh.Target = fh2.Target
	fh.step(m)
	if h.Status.State != infrav1.HostStateAvailable || h.Status.LastError != nil {
		t.Fatalf("after the Secret appeared: state %s, lastError %+v", h.Status.State, h.Status.LastError)
	}
}

func TestWrongPasswordIsReportedWithoutThePassword(t *testing.T) {
	fh, m := fixture()
	fh.Target.Password = "hunter2"
	fh.step(m)
	h := fh.Host
	if h.Status.LastError == nil || h.Status.LastError.Reason != "BMCAuthFailed" {
		t.Fatalf("lastError %+v", h.Status.LastError)
	}
	for _, c := range h.Status.Conditions {
		if strings.Contains(c.Message, "hunter2") {
			t.Fatalf("password in condition %s", c.Type)
		}
	}
	if strings.Contains(h.Status.LastError.Message, "hunter2") {
		t.Fatal("password in lastError")
	}
}

func TestMaintenanceStopsActionsAndReinspectsAfter(t *testing.T) {
	fh, m := fixture()
	fh.step(m)
	h := fh.Host
	h.Spec.Maintenance = &infrav1.Maintenance{Reason: "replacing DIMM B2"}
	h.Spec.Online = false // would power off — but not during maintenance
	fh.lastSync = time.Time{}
	fh.step(m)
	if h.Status.State != infrav1.HostStateMaintenance || fh.BMC.Power != infrav1.PowerOn {
		t.Fatalf("state %s, BMC power %s: maintenance must not act", h.Status.State, fh.BMC.Power)
	}
	if c := conditions.Get(h, ConditionMaintenance); c == nil || c.Message != "replacing DIMM B2" {
		t.Errorf("maintenance condition %+v", c)
	}
	h.Spec.Maintenance = nil
	fh.BMC.Hardware.CPU.Cores = 48 // the CPUs were swapped
	fh.step(m)
	if h.Status.State != infrav1.HostStateAvailable || h.Labels[LabelCPUCores] != "48" {
		t.Fatalf("after maintenance: state %s, cores label %s; want re-inspected", h.Status.State, h.Labels[LabelCPUCores])
	}
}

func TestProvisionReleaseAndRetire(t *testing.T) {
	fh, m := fixture()
	fh.step(m)
	h := fh.Host
	h.Spec.Claim = &infrav1.HostClaim{MachineRef: infrav1.MachineReference{Name: "m", UID: "u"},
		Image: &infrav1.Image{URL: "https://img/os.img", Checksum: "sha256:00"}, WipePolicy: infrav1.WipePolicyMetadata}
	fh.step(m)
	if h.Status.State != infrav1.HostStateProvisioned || fh.BMC.Boot != bmc.BootPXE || h.Status.BootSlots.Active != infrav1.SlotA {
		t.Fatalf("state %s boot %s slots %+v", h.Status.State, fh.BMC.Boot, h.Status.BootSlots)
	}
	// The install left the server on, and says so: the next power poll is a full period
	// away, however long ago the last one was.
	provisioned := h.DeepCopy()
	provisioned.Status.State = infrav1.HostStateProvisioning
	r := m.Step(context.Background(), Input{Host: provisioned, Target: fh.Target, LastPowerSync: time.Now().Add(-2 * time.Hour)})
	if provisioned.Status.State != infrav1.HostStateProvisioned || !r.PowerSynced || provisioned.Status.Power != infrav1.PowerOn {
		t.Fatalf("finishing an install: state %s, power %s, power synced %v; want Provisioned, On, true",
			provisioned.Status.State, provisioned.Status.Power, r.PowerSynced)
	}
	h.Spec.Claim.Released = true
	r = fh.step(m)
	if h.Status.State != infrav1.HostStateAvailable || !r.ReleaseClaim || h.Status.BootSlots != nil {
		t.Fatalf("after release: state %s releaseClaim %v", h.Status.State, r.ReleaseClaim)
	}

	h.Spec.Retire = true
	fh.step(m)
	if h.Status.State != infrav1.HostStateRetired || fh.BMC.Power != infrav1.PowerOff {
		t.Fatalf("retire: state %s power %s", h.Status.State, fh.BMC.Power)
	}
	// A retired host ignores claims and never powers on again.
	h.Spec.Claim = &infrav1.HostClaim{MachineRef: infrav1.MachineReference{Name: "m2", UID: "u2"}, Image: &infrav1.Image{URL: "https://x/y"}}
	fh.lastSync = time.Time{}
	fh.step(m)
	if h.Status.State != infrav1.HostStateRetired || fh.BMC.Power != infrav1.PowerOff {
		t.Fatalf("retired host acted: state %s power %s", h.Status.State, fh.BMC.Power)
	}
}

// TestHostWithLostStatusKeepsItsInstall covers what clusterctl move does to a host: the
// object is created again from its metadata and spec (the claim now names the machine's new
// UID) with no status. The host must go back to Provisioned without booting from the network,
// and only for exactly the install its annotation records.
func TestHostWithLostStatusKeepsItsInstall(t *testing.T) {
	fh, m := fixture()
	fh.step(m)
	h := fh.Host
	h.Spec.Claim = &infrav1.HostClaim{MachineRef: infrav1.MachineReference{Name: "m", UID: "u"}, ClusterName: "c",
		ProviderID: "anvil://ns/h", Image: &infrav1.Image{URL: "https://img/os.img", Checksum: "sha256:00"}}
	fh.step(m)
	if h.Status.State != infrav1.HostStateProvisioned {
		t.Fatalf("state %s", h.Status.State)
	}
	if got, want := h.Annotations[infrav1.ProvisionedForAnnotation], "c/m@anvil://ns/h@sha256:00"; got != want {
		t.Fatalf("annotation %s=%q after the install, want %q", infrav1.ProvisionedForAnnotation, got, want)
	}

	moved := func(mutate func(*infrav1.HostClaim)) *infrav1.AnvilHost {
		n := &infrav1.AnvilHost{ObjectMeta: metav1.ObjectMeta{Name: h.Name, Namespace: h.Namespace, Labels: h.Labels, Annotations: h.Annotations},
			Spec: *h.Spec.DeepCopy()}
		n = n.DeepCopy()
		n.Spec.Claim.MachineRef.UID = "u-after-move"
		mutate(n.Spec.Claim)
		return n
	}
	cases := []struct {
		name      string
		mutate    func(*infrav1.HostClaim)
		reinstall bool
	}{
		{"same machine, cluster, providerID and image", func(*infrav1.HostClaim) {}, false},
		{"another machine of that name's cluster", func(c *infrav1.HostClaim) { c.MachineRef.Name = "m2" }, true},
		{"another cluster", func(c *infrav1.HostClaim) { c.ClusterName = "c2" }, true},
		{"another image", func(c *infrav1.HostClaim) { c.Image.Checksum = "sha256:01" }, true},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			fh.Host = moved(tc.mutate)
			fh.BMC.Boot = "" // so that a network boot shows
			fh.lastSync = time.Time{}
			fh.step(m)
			n := fh.Host
			if tc.reinstall {
				if fh.BMC.Boot != bmc.BootPXE {
					t.Errorf("a claim for another install was not installed: boot %q, state %s", fh.BMC.Boot, n.Status.State)
				}
				return
			}
			if n.Status.State != infrav1.HostStateProvisioned || fh.BMC.Boot != "" || fh.BMC.Power != infrav1.PowerOn {
				t.Fatalf("state %s, boot override %q, power %s: want Provisioned, untouched and running", n.Status.State, fh.BMC.Boot, fh.BMC.Power)
			}
			if !conditions.IsTrue(n, ConditionProvisioned) || !conditions.IsTrue(n, ConditionReady) {
				t.Errorf("conditions %+v", n.Status.Conditions)
			}
		})
	}

	fh.Host = h
	// Releasing wipes the host and forgets the install.
	h.Spec.Claim.Released = true
	fh.step(m)
	if _, ok := h.Annotations[infrav1.ProvisionedForAnnotation]; ok || h.Status.State != infrav1.HostStateAvailable {
		t.Errorf("after the release: state %s, annotations %v", h.Status.State, h.Annotations)
	}
}

// TestBlockMoveFollowsTheClaim: a claimed host blocks clusterctl move until it is
// Provisioned, a released one until it is wiped; maintenance blocks nothing.
func TestBlockMoveFollowsTheClaim(t *testing.T) {
	fh, m := fixture()
	fh.step(m)
	h := fh.Host
	blocked := func() bool { _, ok := h.Annotations[infrav1.BlockMoveAnnotation]; return ok }
	if blocked() {
		t.Fatal("an unclaimed host blocks the move")
	}
	h.Spec.Claim = &infrav1.HostClaim{MachineRef: infrav1.MachineReference{Name: "m", UID: "u"}, ProviderID: "anvil://ns/h",
		Image: &infrav1.Image{URL: "https://img/os.img", Checksum: "sha256:00"}}
	fh.BMC.SetFail(errors.New("BMC unreachable"))
	fh.step(m)
	if !blocked() || h.Status.State == infrav1.HostStateProvisioned {
		t.Fatalf("claimed host that cannot install yet: state %s, blocked %v", h.Status.State, blocked())
	}
	h.Spec.Maintenance = &infrav1.Maintenance{Reason: "BMC replaced"}
	fh.step(m)
	if blocked() {
		t.Error("a host in maintenance blocks the move")
	}
	h.Spec.Maintenance = nil
	fh.BMC.SetFail(nil)
	for i := 0; i < 10 && h.Status.State != infrav1.HostStateProvisioned; i++ {
		time.Sleep(5 * time.Millisecond) // past the pool's back-off
		fh.step(m)
	}
	if h.Status.State != infrav1.HostStateProvisioned || blocked() {
		t.Fatalf("after the install: state %s, blocked %v", h.Status.State, blocked())
	}
	h.Spec.Claim.Released = true
	fh.BMC.SetFail(errors.New("BMC unreachable"))
	fh.lastSync = time.Time{}
	fh.step(m)
	if !blocked() {
		t.Errorf("a released host that is not wiped yet does not block the move (state %s)", h.Status.State)
	}
	fh.BMC.SetFail(nil)
	for i := 0; i < 10 && h.Spec.Claim != nil; i++ {
		time.Sleep(5 * time.Millisecond)
		fh.step(m)
	}
	if h.Spec.Claim != nil || blocked() {
		t.Errorf("after the wipe: claim %+v, blocked %v", h.Spec.Claim, blocked())
	}
}
