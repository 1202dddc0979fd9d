package controllers

import (
	"context"
	"fmt"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/utils/ptr"
	clusterv1 "sigs.k8s.io/cluster-api/api/core/v1beta2"
	"sigs.k8s.io/cluster-api/util/conditions"
	"sigs.k8s.io/cluster-api/util/kubeconfig"
	"sigs.k8s.io/controller-runtime/pkg/client"

	infrav1 "github.com/anvil-metal/cluster-api-provider-anvil/api/v1alpha1"
	"github.com/anvil-metal/cluster-api-provider-anvil/internal/hoststate"
)

// nodeWait covers the machine controller's poll for a Node that has not joined (nodeRequeue)
// and the ClusterCache's connection.
const nodeWait = 2*nodeRequeue + 10*time.Second

// TestNodeGetsProviderIDAndHostLabels makes the envtest API server the Cluster's workload
// cluster too (its kubeconfig Secret points back at it, as Cluster API would write one), and
// registers Nodes the way kubelets would: one without a providerID, which Anvil must give
// the machine's; one whose name is the host's but whose providerID is another machine's,
// which Anvil must leave alone and report.
func TestNodeGetsProviderIDAndHostLabels(t *testing.T) {
	ctx := context.Background()
	f := newCAPIFixture(t, "zone-a", "zone-b")
	// Cluster API's part: the kubeconfig Secret, then the infrastructure and control plane
	// reported up.
	f.create(kubeconfig.GenerateSecret(f.cluster, kubeconfig.FromEnvTestConfig(env.Config, f.cluster)))
	patch := client.MergeFrom(f.cluster.DeepCopy())
	f.cluster.Status.Initialization = clusterv1.ClusterInitializationStatus{InfrastructureProvisioned: ptr.To(true),
		ControlPlaneInitialized: ptr.To(true)}
	if err := env.Client.Status().Patch(ctx, f.cluster, patch); err != nil {
		t.Fatal(err)
	}

	// The kubelets: host-0's registers without a providerID; host-1's name is taken by a
	// Node of another machine. (Nodes are cluster-wide: other tests' hosts have these names
	// too, hence the cleanup; their Clusters never initialize a control plane.)
	foreign := "anvil://elsewhere/host-1"
	for host, providerID := range map[string]string{"host-0": "", "host-1": foreign} {
		n := &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: host, Labels: map[string]string{"kept": "yes"}},
			Spec: corev1.NodeSpec{ProviderID: providerID}}
		f.create(n)
		t.Cleanup(func() { _ = env.Client.Delete(context.Background(), n) })
	}

	copied := []string{infrav1.DefaultFailureDomainLabel, infrav1.LabelDomain + "/"}
	for name, zone := range map[string]string{"w-0": "zone-a", "w-1": "zone-b"} {
		am := f.machine(name, zone)
		patch := client.MergeFrom(am.DeepCopy())
		am.Spec.HostLabelsToNode = copied
		if err := env.Client.Patch(ctx, am, patch); err != nil {
			t.Fatal(err)
		}
	}
	w0 := f.waitMachine("w-0", "was provisioned", provisioned)
	if w0.Status.HostRef == nil || w0.Status.HostRef.Name != "host-0" {
		t.Fatalf("w-0 holds %+v, want host-0 (zone-a)", w0.Status.HostRef)
	}
	host0 := f.waitFor("host-0", "was provisioned", func(h *infrav1.AnvilHost) bool { return h.Status.State == infrav1.HostStateProvisioned })

	node := f.waitNode("host-0", "got its providerID and the host's labels", func(n *corev1.Node) bool {
		return n.Spec.ProviderID == providerIDFor(host0) && n.Labels[infrav1.DefaultFailureDomainLabel] == "zone-a"
	})
	for _, key := range []string{hoststate.LabelCPUCores, hoststate.LabelArch, hoststate.LabelMemoryGiB} {
		if host0.Labels[key] == "" || node.Labels[key] != host0.Labels[key] {
			t.Errorf("Node label %s=%q, host has %q", key, node.Labels[key], host0.Labels[key])
		}
	}
	if _, ok := node.Labels[ClaimedByLabel]; ok {
		t.Errorf("the claim's bookkeeping label reached the Node: %v", node.Labels)
	}
	if node.Labels["kept"] != "yes" {
		t.Errorf("the Node's own labels were not kept: %v", node.Labels)
	}

	// The Node of another machine keeps its providerID and labels; the machine says why it
	// does not touch it.
	w1 := f.waitMachine("w-1", "reported the Node that is not its own", func(m *infrav1.AnvilMachine) bool {
		c := conditions.Get(m, ConditionNodeIdentity)
		return m != nil && c != nil && c.Status == metav1.ConditionFalse && c.Reason == "NodeNameTaken"
	})
	if msg := conditions.Get(w1, ConditionNodeIdentity).Message; msg != fmt.Sprintf("Node host-1 has providerID %s, not anvil://%s/host-1: it is not this machine's and is left alone", foreign, f.ns) {
		t.Errorf("NodeIdentity message %q", msg)
	}
	other := &corev1.Node{}
	if err := env.Client.Get(ctx, client.ObjectKey{Name: "host-1"}, other); err != nil {
		t.Fatal(err)
	}
	if other.Spec.ProviderID != foreign || other.Labels[infrav1.DefaultFailureDomainLabel] != "" {
		t.Errorf("another machine's Node was changed: providerID %s, labels %v", other.Spec.ProviderID, other.Labels)
	}

	// Cluster API links the Node (it finds it by providerID); a host label added later still
	// reaches it.
	m := &clusterv1.Machine{}
	if err := env.Client.Get(ctx, client.ObjectKey{Namespace: f.ns, Name: "w-0"}, m); err != nil {
		t.Fatal(err)
	}
	mpatch := client.MergeFrom(m.DeepCopy())
	m.Status.NodeRef = clusterv1.MachineNodeReference{Name: "host-0"}
	if err := env.Client.Status().Patch(ctx, m, mpatch); err != nil {
		t.Fatal(err)
	}
	f.update("host-0", func(h *infrav1.AnvilHost) { h.Labels[infrav1.LabelDomain+"/rack"] = "r7" })
	f.waitNode("host-0", "got the host's new label", func(n *corev1.Node) bool { return n.Labels[infrav1.LabelDomain+"/rack"] == "r7" })
}

// waitNode polls the Node until cond holds.
func (f *capiFixture) waitNode(name, what string, cond func(*corev1.Node) bool) *corev1.Node {
	f.t.Helper()
	n := &corev1.Node{}
	var err error
	for deadline := time.Now().Add(nodeWait); time.Now().Before(deadline); time.Sleep(100 * time.Millisecond) {
		if err = env.Client.Get(context.Background(), client.ObjectKey{Name: name}, n); err == nil && cond(n) {
			return n
		}
		if err != nil && !apierrors.IsNotFound(err) {
			break
		}
	}
	f.t.Fatalf("Node %s never %s (%v): providerID %q, labels %v", name, what, err, n.Spec.ProviderID, n.Labels)
	return nil
}
