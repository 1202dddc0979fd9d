package controllers

import (
	"context"
	"fmt"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/utils/ptr"
	clusterv1 "sigs.k8s.io/cluster-api/api/core/v1beta2"
	"sigs.k8s.io/cluster-api/util/conditions"
	"sigs.k8s.io/controller-runtime/pkg/client"

	infrav1 "github.com/anvil-metal/cluster-api-provider-anvil/api/v1alpha1"
	"github.com/anvil-metal/cluster-api-provider-anvil/internal/vbmc/redfish"
)

// capiFixture is a Cluster with its AnvilCluster and hosts in three zones, driven by the real
// host controller against emulated BMCs. Cluster API's own controllers are not running here:
// the test plays their part by creating Machines and owner references.
type capiFixture struct {
	*hostFixture
	cluster *clusterv1.Cluster
	bmcs    map[string]*redfish.BMC // by host name
}

func newCAPIFixture(t *testing.T, zones ...string) *capiFixture {
	f := &capiFixture{hostFixture: newHostFixture(t), bmcs: map[string]*redfish.BMC{}}
	ctx := context.Background()
	f.cluster = &clusterv1.Cluster{ObjectMeta: metav1.ObjectMeta{Name: "prod", Namespace: f.ns},
		Spec: clusterv1.ClusterSpec{InfrastructureRef: clusterv1.ContractVersionedObjectReference{
			APIGroup: infrav1.GroupVersion.Group, Kind: "AnvilCluster", Name: "prod"}}}
	f.create(f.cluster)
	ac := &infrav1.AnvilCluster{ObjectMeta: metav1.ObjectMeta{Name: "prod", Namespace: f.ns,
		Labels:          map[string]string{clusterv1.ClusterNameLabel: "prod"},
		OwnerReferences: []metav1.OwnerReference{ownerRef(f.cluster, "Cluster")}},
		Spec: infrav1.AnvilClusterSpec{ControlPlaneEndpoint: clusterv1.APIEndpoint{Host: "192.168.10.100", Port: 6443}}}
	f.create(ac)
	for i, zone := range zones {
		b, host := f.emulatedBMC(fmt.Sprintf("host-%d", i), "pw", redfish.MockupLocalStorage, i+10)
		f.bmcs[host.Name] = b
		host.Labels = map[string]string{infrav1.DefaultFailureDomainLabel: zone}
		host.Spec.BootNetwork = &infrav1.BootNetwork{Address: fmt.Sprintf("192.168.10.%d/24", 20+i)}
		f.create(f.secret(host.Name, "pw"))
		f.create(host)
	}
	for i := range zones {
		f.waitFor(fmt.Sprintf("host-%d", i), "became Available", func(h *infrav1.AnvilHost) bool { return h.Status.State == infrav1.HostStateAvailable })
	}
	_ = ctx
	return f
}

func ownerRef(o client.Object, kind string) metav1.OwnerReference {
	return metav1.OwnerReference{APIVersion: clusterv1.GroupVersion.String(), Kind: kind, Name: o.GetName(), UID: o.GetUID()}
}

// machine creates a Machine (with bootstrap data) and its AnvilMachine.
func (f *capiFixture) machine(name, failureDomain string) *infrav1.AnvilMachine {
	f.t.Helper()
	f.create(&corev1.Secret{ObjectMeta: metav1.ObjectMeta{Name: name + "-bootstrap", Namespace: f.ns},
		Data: map[string][]byte{"value": []byte("#cloud-config\n"), "format": []byte("cloud-config")}})
	m := &clusterv1.Machine{ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: f.ns, Labels: map[string]string{clusterv1.ClusterNameLabel: "prod"}},
		Spec: clusterv1.MachineSpec{ClusterName: "prod", FailureDomain: failureDomain,
			Bootstrap:         clusterv1.Bootstrap{DataSecretName: ptr.To(name + "-bootstrap")},
			InfrastructureRef: clusterv1.ContractVersionedObjectReference{APIGroup: infrav1.GroupVersion.Group, Kind: "AnvilMachine", Name: name}}}
	f.create(m)
	am := &infrav1.AnvilMachine{ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: f.ns,
		Labels:          map[string]string{clusterv1.ClusterNameLabel: "prod"},
		OwnerReferences: []metav1.OwnerReference{ownerRef(m, "Machine")}},
		Spec: infrav1.AnvilMachineSpec{Image: infrav1.Image{URL: "https://images.example.com/os.img",
			Checksum: "sha256:9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"}}}
	f.create(am)
	return am
}

func (f *capiFixture) waitMachine(name, what string, cond func(*infrav1.AnvilMachine) bool) *infrav1.AnvilMachine {
	f.t.Helper()
	am := &infrav1.AnvilMachine{}
	deadline := time.Now().Add(waitTimeout)
	for time.Now().Before(deadline) {
		err := env.Client.Get(context.Background(), client.ObjectKey{Namespace: f.ns, Name: name}, am)
		if (err == nil && cond(am)) || (cond(nil) && client.IgnoreNotFound(err) == nil && err != nil) {
			return am
		}
		time.Sleep(100 * time.Millisecond)
	}
	f.t.Fatalf("machine %s never %s; status %+v", name, what, am.Status)
	return nil
}

func provisioned(am *infrav1.AnvilMachine) bool {
	return am != nil && ptr.Deref(am.Status.Initialization.Provisioned, false)
}

func TestClusterPublishesFailureDomains(t *testing.T) {
	f := newCAPIFixture(t, "zone-b", "zone-a", "zone-c", "zone-a")
	ac := &infrav1.AnvilCluster{}
	deadline := time.Now().Add(waitTimeout)
	for time.Now().Before(deadline) {
		if err := env.Client.Get(context.Background(), client.ObjectKey{Namespace: f.ns, Name: "prod"}, ac); err == nil &&
			len(ac.Status.FailureDomains) == 3 && ptr.Deref(ac.Status.Initialization.Provisioned, false) {
			break
		}
		time.Sleep(100 * time.Millisecond)
	}
	var names []string
	for _, fd := range ac.Status.FailureDomains {
		names = append(names, fd.Name)
		if !ptr.Deref(fd.ControlPlane, false) {
			t.Errorf("failure domain %s not eligible for the control plane", fd.Name)
		}
	}
	if strings.Join(names, ",") != "zone-a,zone-b,zone-c" || !ptr.Deref(ac.Status.Initialization.Provisioned, false) {
		t.Fatalf("failure domains %v, provisioned %v", names, ac.Status.Initialization.Provisioned)
	}
}

func TestMachineClaimsProvisionsAndReleases(t *testing.T) {
	f := newCAPIFixture(t, "zone-a", "zone-b", "zone-c")
	am := f.machine("cp-0", "zone-b")
	am = f.waitMachine(am.Name, "was provisioned", provisioned)
	if am.Spec.ProviderID == nil || *am.Spec.ProviderID != "anvil://"+f.ns+"/host-1" {
		t.Fatalf("providerID %v, want the zone-b host", am.Spec.ProviderID)
	}
	if am.Status.FailureDomain != "zone-b" {
		t.Errorf("failureDomain %q", am.Status.FailureDomain)
	}
	var ips []string
	for _, a := range am.Status.Addresses {
		ips = append(ips, string(a.Type)+"="+a.Address)
	}
	if !strings.Contains(strings.Join(ips, ","), "InternalIP=192.168.10.21") {
		t.Errorf("addresses %v", ips)
	}
	h := f.waitFor("host-1", "was provisioned", func(h *infrav1.AnvilHost) bool { return h.Status.State == infrav1.HostStateProvisioned })
	if h.Spec.Claim.BootstrapDataSecretRef.Name != "cp-0-bootstrap" || h.Spec.Claim.ProviderID != *am.Spec.ProviderID {
		t.Errorf("claim %+v", h.Spec.Claim)
	}

	// A second machine for the same zone waits, and says why.
	f.machine("cp-1", "zone-b")
	waiting := f.waitMachine("cp-1", "explained the wait", func(m *infrav1.AnvilMachine) bool {
		c := conditions.Get(m, ConditionHostClaimed)
		return m != nil && c != nil && c.Reason == "NoMatchingHost"
	})
	msg := conditions.Get(waiting, ConditionHostClaimed).Message
	if !strings.Contains(msg, "0 of 3 hosts match") || !strings.Contains(msg, "2 are in other failure domains") || !strings.Contains(msg, "1 are claimed by other machines") {
		t.Errorf("wait message %q", msg)
	}

	// Deleting the first machine wipes its host back to Available, and the waiting machine
	// takes it.
	if err := env.Client.Delete(context.Background(), am); err != nil {
		t.Fatal(err)
	}
	f.waitMachine("cp-0", "was deleted", func(m *infrav1.AnvilMachine) bool { return m == nil })
	f.waitMachine("cp-1", "took the released host", provisioned)
	h = f.waitFor("host-1", "was re-claimed", func(h *infrav1.AnvilHost) bool { return h.Spec.Claim != nil && h.Spec.Claim.MachineRef.Name == "cp-1" })
	if h.Labels[ClaimedByLabel] == string(am.UID) {
		t.Error("old claim label survived the release")
	}
}

func TestRacingMachinesNeverShareAHost(t *testing.T) {
	f := newCAPIFixture(t, "zone-a")
	for i := range 4 {
		f.machine(fmt.Sprintf("racer-%d", i), "")
	}
	winners := 0
	deadline := time.Now().Add(waitTimeout)
	for time.Now().Before(deadline) && winners == 0 {
		time.Sleep(200 * time.Millisecond)
		winners = 0
		for i := range 4 {
			m := &infrav1.AnvilMachine{}
			if err := env.Client.Get(context.Background(), client.ObjectKey{Namespace: f.ns, Name: fmt.Sprintf("racer-%d", i)}, m); err == nil && provisioned(m) {
				winners++
			}
		}
	}
	time.Sleep(2 * time.Second) // give any double claim time to show
	winners = 0
	for i := range 4 {
		m := &infrav1.AnvilMachine{}
		if err := env.Client.Get(context.Background(), client.ObjectKey{Namespace: f.ns, Name: fmt.Sprintf("racer-%d", i)}, m); err != nil {
			t.Fatal(err)
		}
		if provisioned(m) {
			winners++
			continue
		}
		if c := conditions.Get(m, ConditionHostClaimed); c == nil || !strings.Contains(c.Message, "1 are claimed by other machines") {
			t.Errorf("loser %s: condition %+v", m.Name, c)
		}
		if m.Spec.ProviderID != nil {
			t.Errorf("loser %s names a host it does not hold: providerID %s", m.Name, *m.Spec.ProviderID)
		}
	}
	if winners != 1 {
		t.Fatalf("%d machines provisioned on one host", winners)
	}
}

func TestPausedClusterKeepsHostsOnDelete(t *testing.T) {
	f := newCAPIFixture(t, "zone-a")
	am := f.machine("w-0", "")
	f.waitMachine(am.Name, "was provisioned", provisioned)

	// What clusterctl move does: pause, then delete the source objects.
	cluster := &clusterv1.Cluster{}
	if err := env.Client.Get(context.Background(), client.ObjectKeyFromObject(f.cluster), cluster); err != nil {
		t.Fatal(err)
	}
	cluster.Spec.Paused = ptr.To(true)
	if err := env.Client.Update(context.Background(), cluster); err != nil {
		t.Fatal(err)
	}
	f.waitMachine(am.Name, "saw the pause", func(m *infrav1.AnvilMachine) bool { return m != nil && conditions.IsTrue(m, clusterv1.PausedCondition) })
	if err := env.Client.Delete(context.Background(), am); err != nil {
		t.Fatal(err)
	}
	time.Sleep(3 * time.Second)
	h := f.waitFor("host-0", "stayed claimed", func(h *infrav1.AnvilHost) bool { return true })
	if h.Status.State != infrav1.HostStateProvisioned || h.Spec.Claim == nil || h.Spec.Claim.Released {
		t.Fatalf("paused deletion touched the host: state %s claim %+v", h.Status.State, h.Spec.Claim)
	}
}
