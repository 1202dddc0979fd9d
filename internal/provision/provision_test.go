package provision

import (
	"context"
	"net"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	clientgoscheme "k8s.io/client-go/kubernetes/scheme"
	"sigs.k8s.io/controller-runtime/pkg/client/fake"

	infrav1 "github.com/anvil-metal/cluster-api-provider-anvil/api/v1alpha1"
	"github.com/anvil-metal/cluster-api-provider-anvil/internal/bmc"
	"github.com/anvil-metal/cluster-api-provider-anvil/internal/boot/agentapi"
	"github.com/anvil-metal/cluster-api-provider-anvil/internal/boot/httpboot"
	"github.com/anvil-metal/cluster-api-provider-anvil/internal/boot/token"
	"github.com/anvil-metal/cluster-api-provider-anvil/internal/hoststate"
)

// rig is the backend behind a real agent API server, a token issuer, a fake BMC, and a
// settable clock.
type rig struct {
	t       *testing.T
	backend *Backend
	tokens  *token.Issuer
	api     *httptest.Server
	bmc     *bmc.FakeBMC
	pool    *bmc.Pool
	host    *infrav1.AnvilHost
	mu      sync.Mutex
	now     time.Time
	woken   int
}

func newRig(t *testing.T) *rig {
	r := &rig{t: t, now: time.Unix(1_700_000_000, 0), bmc: &bmc.FakeBMC{Password: "pw", Power: infrav1.PowerOff}}
	secrets := fake.NewClientBuilder().WithScheme(clientgoscheme.Scheme).WithObjects(&corev1.Secret{
		ObjectMeta: metav1.ObjectMeta{Name: "m-0-bootstrap", Namespace: "ns"}, Data: map[string][]byte{"value": []byte("#cloud-config\nsecret-ca-key: xyz\n")}}).Build()
	r.backend = New(Options{Secrets: secrets, Now: r.clock, BootTimeout: 10 * time.Minute,
		Notify:   func(types.NamespacedName) { r.mu.Lock(); r.woken++; r.mu.Unlock() },
		ImageURL: func(img infrav1.Image) (string, error) { return "http://boot.lab/images/" + img.Checksum[7:15], nil }})
	var err error
	r.tokens, err = token.NewIssuer(token.Options{Now: r.clock})
	if err != nil {
		t.Fatal(err)
	}
	srv, err := agentapi.NewServer(agentapi.ServerOptions{Tokens: r.tokens, Backend: r.backend})
	if err != nil {
		t.Fatal(err)
	}
	r.api = httptest.NewServer(srv)
	t.Cleanup(r.api.Close)
	r.pool = bmc.NewPool(bmc.PoolOptions{Dial: r.bmc.Dial})
	r.host = &infrav1.AnvilHost{ObjectMeta: metav1.ObjectMeta{Name: "h-0", Namespace: "ns"},
		Spec: infrav1.AnvilHostSpec{BootMACAddress: "52:54:00:00:00:07", BootMode: infrav1.BootModeUEFI,
			Claim: &infrav1.HostClaim{MachineRef: infrav1.MachineReference{Name: "m-0", UID: "u"}, ProviderID: "anvil://ns/h-0",
				Image:                  &infrav1.Image{URL: "https://images.example.com/os.img", Checksum: "sha256:" + strings.Repeat("c", 64), Layout: infrav1.ImageLayoutABRoot},
				BootstrapDataSecretRef: &infrav1.LocalSecretReference{Name: "m-0-bootstrap"}}},
		Status: infrav1.AnvilHostStatus{State: infrav1.HostStateProvisioning}}
	return r
}

func (r *rig) clock() time.Time { r.mu.Lock(); defer r.mu.Unlock(); return r.now }
func (r *rig) advance(d time.Duration) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.now = r.now.Add(d)
}

func (r *rig) run() hoststate.BMCRunner {
	a, _ := bmc.ParseAddress("ipmi://10.0.0.5")
	return func(op string, fn func(context.Context, bmc.Client) error) error {
		return r.pool.Do(context.Background(), "ns/h-0", bmc.Target{Address: a, Username: "u", Password: "pw"}, op, fn)
	}
}

func (r *rig) provision() (hoststate.Outcome, error) {
	return r.backend.Provision(context.Background(), r.host, r.run())
}

// agent plays the agent: the token comes from what the boot script would carry.
func (r *rig) agent() *agentapi.Client {
	r.t.Helper()
	mac, _ := net.ParseMAC(r.host.Spec.BootMACAddress)
	boot, err := r.backend.BootFor(context.Background(), mac)
	if err != nil || boot.Action != httpboot.ActionAgent {
		r.t.Fatalf("boot for the host's MAC: %+v, %v; want the agent", boot, err)
	}
	tok, err := r.tokens.Issue(boot.Host, boot.Attempt, time.Hour)
	if err != nil {
		r.t.Fatal(err)
	}
	c, err := agentapi.NewClient(r.api.URL, tok, agentapi.ClientOptions{MaxAttempts: 1})
	if err != nil {
		r.t.Fatal(err)
	}
	return c
}

func TestInstallThroughTheAgent(t *testing.T) {
	r := newRig(t)
	ctx := context.Background()
	out, err := r.provision()
	if err != nil || out.Done {
		t.Fatalf("first step: %+v, %v", out, err)
	}
	if r.bmc.Boot != bmc.BootPXE || r.bmc.Power != infrav1.PowerOn {
		t.Fatalf("the host was not network-booted: boot %s power %s", r.bmc.Boot, r.bmc.Power)
	}
	if !strings.Contains(out.Message, "network-booting") {
		t.Errorf("message %q", out.Message)
	}

	ag := r.agent()
	inv := infrav1.HardwareInventory{CPU: infrav1.CPUInfo{Arch: "amd64", Cores: 24}, NUMANodes: []infrav1.NUMANode{{ID: 0}, {ID: 1}}}
	if _, err := ag.Register(ctx, "test", inv); err != nil {
		t.Fatal(err)
	}
	task, err := ag.NextTask(ctx)
	if err != nil || task.Kind != agentapi.TaskInstall {
		t.Fatalf("first task %+v, %v", task, err)
	}
	if task.Image.URL != "http://boot.lab/images/cccccccc" || task.ConfigDrive.MetaData.ProviderID != "anvil://ns/h-0" {
		t.Errorf("install task %+v %+v", task.Image, task.ConfigDrive)
	}
	data, err := ag.BootstrapData(ctx)
	if err != nil || !strings.HasPrefix(string(data), "#cloud-config") {
		t.Fatalf("bootstrap data %q, %v", data, err)
	}
	if err := ag.Progress(ctx, agentapi.Progress{TaskID: task.ID, Step: "write", Percent: 40}); err != nil {
		t.Fatal(err)
	}
	if out, _ := r.provision(); out.Done || !strings.Contains(out.Message, "write 40%") {
		t.Errorf("progress not reported: %+v", out)
	}
	if err := ag.Result(ctx, agentapi.Result{TaskID: task.ID, Kind: task.Kind, OK: true, Slot: infrav1.SlotA}); err != nil {
		t.Fatal(err)
	}
	// A lost response makes the agent send its result again: accepted, not double-counted.
	if err := ag.Result(ctx, agentapi.Result{TaskID: task.ID, Kind: task.Kind, OK: true, Slot: infrav1.SlotA}); err != nil {
		t.Fatalf("repeat result: %v", err)
	}
	reboot, _ := ag.NextTask(ctx)
	if reboot.Kind != agentapi.TaskReboot {
		t.Fatalf("second task %+v", reboot)
	}
	if err := ag.Result(ctx, agentapi.Result{TaskID: reboot.ID, Kind: reboot.Kind, OK: true}); err != nil {
		t.Fatal(err)
	}

	out, err = r.provision()
	if err != nil || !out.Done {
		t.Fatalf("after the agent finished: %+v, %v", out, err)
	}
	s := r.host.Status
	if s.BootSlots == nil || s.BootSlots.Pending != infrav1.SlotA || s.BootSlots.TriesLeft != 3 || s.BootSlots.A.Checksum != r.host.Spec.Claim.Image.Checksum {
		t.Errorf("boot slots %+v", s.BootSlots)
	}
	if s.Hardware == nil || s.Hardware.Source != "InBand" || r.host.Labels[hoststate.LabelNUMANodes] != "2" {
		t.Errorf("in-band inventory not applied: %+v labels %v", s.Hardware, r.host.Labels)
	}
	mac, _ := net.ParseMAC(r.host.Spec.BootMACAddress)
	if b, _ := r.backend.BootFor(ctx, mac); b.Action != httpboot.ActionExit {
		t.Errorf("after install the MAC still boots %s", b.Action)
	}
	if _, err := ag.BootstrapData(ctx); err == nil {
		t.Error("bootstrap data still served after the attempt ended")
	}
}

func TestFailedInstallIsReportedAndRetriedWithANewAttempt(t *testing.T) {
	r := newRig(t)
	ctx := context.Background()
	if _, err := r.provision(); err != nil {
		t.Fatal(err)
	}
	ag := r.agent()
	if _, err := ag.Register(ctx, "test", infrav1.HardwareInventory{}); err != nil {
		t.Fatal(err)
	}
	task, _ := ag.NextTask(ctx)
	if err := ag.Result(ctx, agentapi.Result{TaskID: task.ID, Kind: task.Kind, OK: false, Error: "checksum mismatch: want sha256:cccc…, got sha256:dead…"}); err != nil {
		t.Fatal(err)
	}
	_, err := r.provision()
	if err == nil || !strings.Contains(err.Error(), "checksum mismatch") {
		t.Fatalf("failure not surfaced: %v", err)
	}
	if _, err := r.provision(); err != nil {
		t.Fatalf("retry: %v", err)
	}
	// The old agent's token belongs to the old attempt.
	if _, err := ag.NextTask(ctx); err == nil {
		t.Error("the previous attempt's agent still gets tasks")
	}
}

func TestAgentThatNeverRegistersTimesOut(t *testing.T) {
	r := newRig(t)
	if _, err := r.provision(); err != nil {
		t.Fatal(err)
	}
	r.advance(11 * time.Minute)
	_, err := r.provision()
	if err == nil || !strings.Contains(err.Error(), "did not register") || !strings.Contains(err.Error(), "PXE") {
		t.Fatalf("timeout not explained: %v", err)
	}
}

func TestWipeThenPowerOff(t *testing.T) {
	r := newRig(t)
	ctx := context.Background()
	r.host.Status.State = infrav1.HostStateDeprovisioning
	if _, err := r.backend.Deprovision(ctx, r.host, infrav1.WipePolicyFull, r.run()); err != nil {
		t.Fatal(err)
	}
	ag := r.agent()
	if _, err := ag.Register(ctx, "test", infrav1.HardwareInventory{}); err != nil {
		t.Fatal(err)
	}
	if _, err := ag.BootstrapData(ctx); err == nil {
		t.Error("bootstrap data served to a wiping agent")
	}
	for _, want := range []agentapi.TaskKind{agentapi.TaskWipe, agentapi.TaskPowerOff} {
		task, err := ag.NextTask(ctx)
		if err != nil || task.Kind != want {
			t.Fatalf("task %+v, %v; want %s", task, err, want)
		}
		if want == agentapi.TaskWipe && task.WipePolicy != infrav1.WipePolicyFull {
			t.Errorf("wipe policy %s", task.WipePolicy)
		}
		if err := ag.Result(ctx, agentapi.Result{TaskID: task.ID, Kind: task.Kind, OK: true}); err != nil {
			t.Fatal(err)
		}
	}
	if out, err := r.backend.Deprovision(ctx, r.host, infrav1.WipePolicyFull, r.run()); err != nil || !out.Done {
		t.Fatalf("after wipe: %+v %v", out, err)
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.woken == 0 {
		t.Error("the host controller was never woken by agent reports")
	}
}

// In-band inspection is a network boot whose agent only powers off: the inventory comes with
// its registration and becomes the host's InBand inventory; nothing is installed or wiped and
// no bootstrap data is served.
func TestInspectionBootsTheAgentForItsInventory(t *testing.T) {
	r := newRig(t)
	ctx := context.Background()
	r.host.Spec.Claim = nil
	r.host.Status.State = infrav1.HostStateInspecting
	out, err := r.backend.Inspect(ctx, r.host, r.run())
	if err != nil || out.Done || !strings.Contains(out.Message, "network-booting") {
		t.Fatalf("first step: %+v, %v", out, err)
	}
	if r.bmc.Boot != bmc.BootPXE || r.bmc.Power != infrav1.PowerOn {
		t.Fatalf("the host was not network-booted: boot %s power %s", r.bmc.Boot, r.bmc.Power)
	}
	if out, _ := r.backend.Inspect(ctx, r.host, r.run()); out.Done || !strings.Contains(out.Message, "register") {
		t.Errorf("before registration: %+v; want a wait for the agent", out)
	}

	ag := r.agent()
	inv := infrav1.HardwareInventory{CPU: infrav1.CPUInfo{Arch: "amd64", Cores: 16}, NUMANodes: []infrav1.NUMANode{{ID: 0}},
		Disks: []infrav1.Disk{{Name: "/dev/nvme0n1"}}}
	if _, err := ag.Register(ctx, "test", inv); err != nil {
		t.Fatal(err)
	}
	if _, err := ag.BootstrapData(ctx); err == nil {
		t.Error("bootstrap data served to an inspecting agent")
	}
	task, err := ag.NextTask(ctx)
	if err != nil || task.Kind != agentapi.TaskPowerOff {
		t.Fatalf("task %+v, %v; want power-off only", task, err)
	}
	if out, _ := r.backend.Inspect(ctx, r.host, r.run()); out.Done || r.host.Status.Hardware != nil {
		t.Errorf("before the agent finished: %+v, hardware %+v", out, r.host.Status.Hardware)
	}
	if err := ag.Result(ctx, agentapi.Result{TaskID: task.ID, Kind: task.Kind, OK: true}); err != nil {
		t.Fatal(err)
	}
	if next, err := ag.NextTask(ctx); err != nil || next.Kind != agentapi.TaskNone {
		t.Errorf("after power-off: task %+v, %v; want none", next, err)
	}
	out, err = r.backend.Inspect(ctx, r.host, r.run())
	if err != nil || !out.Done {
		t.Fatalf("after the agent finished: %+v, %v", out, err)
	}
	hw := r.host.Status.Hardware
	if hw == nil || hw.Source != "InBand" || hw.CPU.Cores != 16 || len(hw.Disks) != 1 || hw.InspectedAt == nil {
		t.Errorf("in-band inventory %+v; want the registration's, source InBand", hw)
	}
	if r.host.Labels[hoststate.LabelCPUCores] != "16" || r.host.Status.BootSlots != nil {
		t.Errorf("labels %v, boot slots %+v; want the cores label and no install recorded", r.host.Labels, r.host.Status.BootSlots)
	}
	mac, _ := net.ParseMAC(r.host.Spec.BootMACAddress)
	if b, _ := r.backend.BootFor(ctx, mac); b.Action != httpboot.ActionExit {
		t.Errorf("after inspection the MAC still boots %s", b.Action)
	}
}

// An inspection whose agent never registers fails after the boot timeout with an error that
// says what to check; the next call starts a new attempt, and the old token stops working.
func TestInspectionTimesOutAndStartsOver(t *testing.T) {
	r := newRig(t)
	ctx := context.Background()
	r.host.Spec.Claim = nil
	r.host.Status.State = infrav1.HostStateInspecting
	if _, err := r.backend.Inspect(ctx, r.host, r.run()); err != nil {
		t.Fatal(err)
	}
	old := r.agent()
	r.advance(11 * time.Minute)
	_, err := r.backend.Inspect(ctx, r.host, r.run())
	if err == nil || !strings.Contains(err.Error(), "did not register") || !strings.Contains(err.Error(), "PXE") {
		t.Fatalf("timeout not explained: %v", err)
	}
	if out, err := r.backend.Inspect(ctx, r.host, r.run()); err != nil || out.Done {
		t.Fatalf("retry: %+v, %v; want a new attempt", out, err)
	}
	if _, err := old.Register(ctx, "test", infrav1.HardwareInventory{}); err == nil {
		t.Error("the timed-out attempt's agent could still register")
	}
	if _, err := r.agent().Register(ctx, "test", infrav1.HardwareInventory{}); err != nil {
		t.Errorf("the new attempt's agent: %v", err)
	}
}
