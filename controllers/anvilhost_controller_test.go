package controllers

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"testing"
	"time"

	coordinationv1 "k8s.io/api/coordination/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"sigs.k8s.io/cluster-api/util/conditions"
	"sigs.k8s.io/controller-runtime/pkg/client"

	infrav1 "github.com/anvil-metal/cluster-api-provider-anvil/api/v1alpha1"
	"github.com/anvil-metal/cluster-api-provider-anvil/internal/hoststate"
	"github.com/anvil-metal/cluster-api-provider-anvil/internal/vbmc/ipmi"
	"github.com/anvil-metal/cluster-api-provider-anvil/internal/vbmc/machine"
	"github.com/anvil-metal/cluster-api-provider-anvil/internal/vbmc/redfish"
)

const waitTimeout = 30 * time.Second

type hostFixture struct {
	t      *testing.T
	ns     string
	server *redfish.Server
}

func newHostFixture(t *testing.T) *hostFixture {
	t.Helper()
	server, err := redfish.NewServer(redfish.ServerOptions{TLS: true})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = server.Close() })
	ns := &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{GenerateName: "hosts-"}}
	if err := env.Client.Create(context.Background(), ns); err != nil {
		t.Fatal(err)
	}
	f := &hostFixture{t: t, ns: ns.Name, server: server}
	f.create(&corev1.Secret{ObjectMeta: metav1.ObjectMeta{Name: "bmc-ca", Namespace: ns.Name},
		Data: map[string][]byte{"ca.crt": server.CACertPEM()}})
	return f
}

func (f *hostFixture) create(o client.Object) {
	f.t.Helper()
	if err := env.Client.Create(context.Background(), o); err != nil {
		f.t.Fatal(err)
	}
}

// emulatedBMC starts a Redfish BMC and returns it with a host spec pointing at it.
func (f *hostFixture) emulatedBMC(name, password string, mockup redfish.Mockup, index int) (*redfish.BMC, *infrav1.AnvilHost) {
	f.t.Helper()
	b, err := f.server.AddBMC(redfish.BMCOptions{Mockup: mockup, Username: "admin", Password: password,
		Identity: redfish.NewIdentity(index), Machine: machine.New(machine.Config{})})
	if err != nil {
		f.t.Fatal(err)
	}
	host := &infrav1.AnvilHost{
		ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: f.ns},
		Spec: infrav1.AnvilHostSpec{
			BMC: infrav1.BMC{Address: "redfish+https://" + b.Addr() + "/redfish/v1/Systems/1",
				CredentialsRef: infrav1.LocalSecretReference{Name: name + "-bmc"},
				CABundleRef:    &infrav1.LocalSecretReference{Name: "bmc-ca"}},
			BootMACAddress: fmt.Sprintf("52:54:00:00:10:%02x", index),
			Online:         true,
		},
	}
	return b, host
}

func (f *hostFixture) secret(name, password string) *corev1.Secret {
	return &corev1.Secret{ObjectMeta: metav1.ObjectMeta{Name: name + "-bmc", Namespace: f.ns},
		Data: map[string][]byte{"username": []byte("admin"), "password": []byte(password)}}
}

// waitFor polls the host until cond holds.
func (f *hostFixture) waitFor(name, what string, cond func(*infrav1.AnvilHost) bool) *infrav1.AnvilHost {
	f.t.Helper()
	h := &infrav1.AnvilHost{}
	deadline := time.Now().Add(waitTimeout)
	for time.Now().Before(deadline) {
		if err := env.Client.Get(context.Background(), client.ObjectKey{Namespace: f.ns, Name: name}, h); err == nil && cond(h) {
			return h
		}
		time.Sleep(100 * time.Millisecond)
	}
	f.t.Fatalf("host %s never %s; state %s, lastError %+v, conditions %+v", name, what, h.Status.State, h.Status.LastError, h.Status.Conditions)
	return nil
}

func (f *hostFixture) update(name string, mutate func(*infrav1.AnvilHost)) {
	f.t.Helper()
	for range 10 {
		h := &infrav1.AnvilHost{}
		if err := env.Client.Get(context.Background(), client.ObjectKey{Namespace: f.ns, Name: name}, h); err != nil {
			f.t.Fatal(err)
		}
		mutate(h)
		if err := env.Client.Update(context.Background(), h); err == nil {
			return
		}
	}
	f.t.Fatalf("could not update host %s", name)
}

func conditionMessage(h *infrav1.AnvilHost, t string) string {
	if c := conditions.Get(h, t); c != nil {
		return c.Reason + ": " + c.Message
	}
	return ""
}

func TestHostOnboardsOverRedfish(t *testing.T) {
	f := newHostFixture(t)
	b, host := f.emulatedBMC("rack1-node01", "s3cret-pw", redfish.MockupRackmount, 1)
	f.create(f.secret(host.Name, "s3cret-pw"))
	f.create(host)

	h := f.waitFor(host.Name, "became Available", func(h *infrav1.AnvilHost) bool { return h.Status.State == infrav1.HostStateAvailable })
	if h.Status.Power != infrav1.PowerOn || b.Machine().Power() != machine.PowerOn {
		t.Errorf("spec.online: status power %s, emulated server %s", h.Status.Power, b.Machine().Power())
	}
	hw := h.Status.Hardware
	if hw == nil || hw.CPU.Cores == 0 || hw.Memory == nil || hw.System.SerialNumber == "" || hw.Source != "OutOfBand" {
		t.Fatalf("inventory incomplete: %+v", hw)
	}
	if h.Labels[hoststate.LabelCPUCores] == "" || h.Labels[hoststate.LabelArch] != "amd64" || h.Labels[hoststate.LabelMemoryGiB] == "" {
		t.Errorf("hardware labels missing: %v", h.Labels)
	}
	if !conditions.IsTrue(h, hoststate.ConditionBMCTLSVerified) {
		t.Errorf("TLS verified against the CA bundle should show: %s", conditionMessage(h, hoststate.ConditionBMCTLSVerified))
	}
	if !controllerHasFinalizer(h) {
		t.Error("finalizer missing")
	}

	// No per-host liveness Lease: BMCReachable carries liveness, and a heartbeat object would
	// cost writes in steady state (and the manager a cluster-wide Lease informer).
	leases := &coordinationv1.LeaseList{}
	if err := env.Client.List(context.Background(), leases, client.InNamespace(f.ns)); err != nil || len(leases.Items) != 0 {
		t.Errorf("Leases in the host's namespace: %d, %v", len(leases.Items), err)
	}

	// Events report each state change (several changes in one reconcile share one Event, as
	// a path); none carries the password.
	changes := []string{"Registering → Inspecting", "Inspecting → Available"}
	reportsAll := func(notes []string) bool {
		for _, c := range changes {
			if !strings.Contains(strings.Join(notes, "\n"), c) {
				return false
			}
		}
		return true
	}
	notes := hostEventNotes(t, f.ns, host.Name, reportsAll)
	for _, change := range changes {
		if !strings.Contains(strings.Join(notes, "\n"), change) {
			t.Errorf("no event reports %s among %q", change, notes)
		}
	}
	for _, n := range notes {
		if strings.Contains(n, "s3cret-pw") {
			t.Errorf("event leaks the password: %s", n)
		}
	}

	// Steady state: with nothing changing, the host is not written again.
	rv := h.ResourceVersion
	time.Sleep(5 * time.Second) // more than two power-sync intervals
	h2 := f.waitFor(host.Name, "stayed Available", func(h *infrav1.AnvilHost) bool { return h.Status.State == infrav1.HostStateAvailable })
	if h2.ResourceVersion != rv {
		before, _ := json.Marshal(h)
		after, _ := json.Marshal(h2)
		t.Errorf("steady-state polling rewrote the host (resourceVersion %s → %s)\nbefore %s\nafter  %s", rv, h2.ResourceVersion, before, after)
	}
	if b.Requests().Total() == 0 {
		t.Error("no BMC traffic")
	}
}

func TestHostRecoversFromBadCredentialsAndHangingBMC(t *testing.T) {
	f := newHostFixture(t)
	b, host := f.emulatedBMC("node02", "right-pw", redfish.MockupLocalStorage, 2)
	f.create(host) // no Secret yet

	h := f.waitFor(host.Name, "reported the missing Secret", func(h *infrav1.AnvilHost) bool {
		return h.Status.LastError != nil && h.Status.LastError.Reason == "CredentialsUnavailable"
	})
	if msg := conditionMessage(h, hoststate.ConditionBMCReachable); !strings.Contains(msg, "node02-bmc") || !strings.Contains(msg, "username and password") {
		t.Errorf("condition should name the Secret and the fix: %s", msg)
	}

	f.create(f.secret(host.Name, "wrong-pw"))
	h = f.waitFor(host.Name, "reported the wrong password", func(h *infrav1.AnvilHost) bool {
		return h.Status.LastError != nil && h.Status.LastError.Reason == "BMCAuthFailed"
	})
	for _, c := range h.Status.Conditions {
		if strings.Contains(c.Message, "wrong-pw") {
			t.Errorf("condition %s leaks the password", c.Type)
		}
	}

	// Rotating the Secret to the right password is picked up without a restart.
	sec := f.secret(host.Name, "right-pw")
	if err := env.Client.Update(context.Background(), sec); err != nil {
		t.Fatal(err)
	}
	f.waitFor(host.Name, "became Available after the fix", func(h *infrav1.AnvilHost) bool {
		return h.Status.State == infrav1.HostStateAvailable && h.Status.LastError == nil
	})

	// A BMC that hangs is reported unreachable, then recovers by itself once it answers.
	b.SetFaults(redfish.Faults{Hang: true})
	f.update(host.Name, func(h *infrav1.AnvilHost) { h.Spec.Online = false }) // wake the controller
	f.waitFor(host.Name, "reported the hanging BMC", func(h *infrav1.AnvilHost) bool {
		return h.Status.LastError != nil && h.Status.LastError.Reason == "BMCUnreachable"
	})
	b.SetFaults(redfish.Faults{})
	f.waitFor(host.Name, "recovered and powered off per spec", func(h *infrav1.AnvilHost) bool {
		return h.Status.LastError == nil && h.Status.Power == infrav1.PowerOff
	})
	if b.Machine().Power() != machine.PowerOff {
		t.Errorf("emulated server power %s, want Off", b.Machine().Power())
	}
}

func TestHostMaintenanceAndRetire(t *testing.T) {
	f := newHostFixture(t)
	b, host := f.emulatedBMC("node03", "pw", redfish.MockupSmartNIC, 3)
	f.create(f.secret(host.Name, "pw"))
	f.create(host)
	f.waitFor(host.Name, "became Available", func(h *infrav1.AnvilHost) bool { return h.Status.State == infrav1.HostStateAvailable })

	f.update(host.Name, func(h *infrav1.AnvilHost) {
		h.Spec.Maintenance = &infrav1.Maintenance{Reason: "needs repair: PSU 2"}
		h.Spec.Online = false
	})
	h := f.waitFor(host.Name, "entered Maintenance", func(h *infrav1.AnvilHost) bool { return h.Status.State == infrav1.HostStateMaintenance })
	if b.Machine().Power() != machine.PowerOn {
		t.Error("maintenance must not power the server off")
	}
	if msg := conditionMessage(h, hoststate.ConditionMaintenance); !strings.Contains(msg, "PSU 2") {
		t.Errorf("maintenance condition %q", msg)
	}

	f.update(host.Name, func(h *infrav1.AnvilHost) { h.Spec.Maintenance = nil })
	f.waitFor(host.Name, "returned to Available", func(h *infrav1.AnvilHost) bool {
		return h.Status.State == infrav1.HostStateAvailable && h.Status.Power == infrav1.PowerOff
	})

	f.update(host.Name, func(h *infrav1.AnvilHost) { h.Spec.Retire = true })
	f.waitFor(host.Name, "was Retired", func(h *infrav1.AnvilHost) bool { return h.Status.State == infrav1.HostStateRetired })
	if b.Machine().Power() != machine.PowerOff {
		t.Error("a retired host must be powered off")
	}

	// Deleting the host lets the finalizer go.
	if err := env.Client.Delete(context.Background(), &infrav1.AnvilHost{ObjectMeta: metav1.ObjectMeta{Name: host.Name, Namespace: f.ns}}); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(waitTimeout)
	for time.Now().Before(deadline) {
		if err := env.Client.Get(context.Background(), client.ObjectKey{Namespace: f.ns, Name: host.Name}, &infrav1.AnvilHost{}); client.IgnoreNotFound(err) == nil && err != nil {
			return
		}
		time.Sleep(100 * time.Millisecond)
	}
	t.Fatal("host was not deleted")
}

func controllerHasFinalizer(h *infrav1.AnvilHost) bool {
	for _, f := range h.Finalizers {
		if f == infrav1.HostFinalizer {
			return true
		}
	}
	return false
}

func TestHostOnboardsOverIPMI(t *testing.T) {
	f := newHostFixture(t)
	m := machine.New(machine.Config{})
	b, err := ipmi.Start(context.Background(), ipmi.Config{Machine: m, Username: "admin", Password: "ipmi-pw",
		FRU: ipmi.FRU{Manufacturer: "Supermicro", Product: "SYS-1029U", SerialNumber: "SM-0042"}})
	if errors.Is(err, ipmi.ErrNotInstalled) {
		t.Skip("ipmi_sim not installed (make test-deps)")
	}
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = b.Stop() })

	host := &infrav1.AnvilHost{ObjectMeta: metav1.ObjectMeta{Name: "ipmi-node", Namespace: f.ns},
		Spec: infrav1.AnvilHostSpec{BMC: infrav1.BMC{Address: b.Address(), CredentialsRef: infrav1.LocalSecretReference{Name: "ipmi-node-bmc"}},
			BootMACAddress: "52:54:00:00:20:01", BootMode: infrav1.BootModeLegacy, Online: true}}
	f.create(f.secret(host.Name, "ipmi-pw"))
	f.create(host)
	h := f.waitFor(host.Name, "became Available", func(h *infrav1.AnvilHost) bool { return h.Status.State == infrav1.HostStateAvailable })
	if hw := h.Status.Hardware; hw == nil || hw.System.SerialNumber != "SM-0042" || hw.System.Manufacturer != "Supermicro" {
		t.Errorf("FRU inventory: %+v", h.Status.Hardware)
	}
	if m.Power() != machine.PowerOn {
		t.Errorf("emulated server power %s, want On", m.Power())
	}
	if c := conditions.Get(h, hoststate.ConditionBMCTLSVerified); c == nil || c.Reason != "NotApplicable" {
		t.Errorf("IPMI TLS condition %+v", c)
	}
}
