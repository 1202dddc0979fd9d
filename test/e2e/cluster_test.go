package e2e

import (
	"fmt"
	"net"
	"sort"
	"strconv"
	"strings"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/utils/ptr"
	bootstrapv1 "sigs.k8s.io/cluster-api/api/bootstrap/kubeadm/v1beta2"
	controlplanev1 "sigs.k8s.io/cluster-api/api/controlplane/kubeadm/v1beta2"
	clusterv1 "sigs.k8s.io/cluster-api/api/core/v1beta2"
	"sigs.k8s.io/cluster-api/util/conditions"
	"sigs.k8s.io/controller-runtime/pkg/client"

	infrav1 "github.com/anvil-metal/cluster-api-provider-anvil/api/v1alpha1"
)

// kubernetesVersion is the workload clusters' version (the in-memory server doesn't care).
const kubernetesVersion = "v1.35.0"

// nodeLabelsFromHosts are the host labels every test cluster's machines copy to their Nodes:
// the zone, and the hardware labels by their prefix.
var nodeLabelsFromHosts = []string{infrav1.DefaultFailureDomainLabel, infrav1.LabelDomain + "/"}

// testCluster is a Cluster with a KubeadmControlPlane and one MachineDeployment.
type testCluster struct {
	f    *fixture
	name string
}

func (c *testCluster) key() client.ObjectKey {
	return client.ObjectKey{Namespace: c.f.ns, Name: c.name}
}
func (c *testCluster) kcpName() string { return c.name + "-control-plane" }
func (c *testCluster) mdName() string  { return c.name + "-md-0" }

// createCluster creates what a cluster template would: the Cluster, an AnvilCluster whose
// endpoint is a fresh in-memory workload cluster, a KubeadmControlPlane and a
// MachineDeployment, each with its templates. Fields that Cluster API's defaulting webhooks
// would fill are set here, since no webhooks run.
func (f *fixture) createCluster(name string, controlPlanes, workers int32) *testCluster {
	f.t.Helper()
	c := &testCluster{f: f, name: name}
	endpoint, err := workloads.AddCluster(f.ctx, c.key())
	if err != nil {
		f.t.Fatal(err)
	}
	f.clusters = append(f.clusters, c.key())
	f.listeners = append(f.listeners, net.JoinHostPort(endpoint.Host, strconv.Itoa(int(endpoint.Port))))
	image := infrav1.Image{URL: "https://images.example.com/ubuntu-24.04-k8s-1.35.img",
		Checksum: "sha256:9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"}
	infraRef := func(kind, name string) clusterv1.ContractVersionedObjectReference {
		return clusterv1.ContractVersionedObjectReference{APIGroup: infrav1.GroupVersion.Group, Kind: kind, Name: name}
	}
	f.create(&infrav1.AnvilCluster{ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: f.ns},
		Spec: infrav1.AnvilClusterSpec{ControlPlaneEndpoint: endpoint}})
	for _, tmpl := range []string{name + "-control-plane", name + "-worker"} {
		f.create(&infrav1.AnvilMachineTemplate{ObjectMeta: metav1.ObjectMeta{Name: tmpl, Namespace: f.ns},
			Spec: infrav1.AnvilMachineTemplateSpec{Template: infrav1.AnvilMachineTemplateResource{Spec: infrav1.AnvilMachineSpec{Image: image,
				HostLabelsToNode: nodeLabelsFromHosts}}}})
	}
	f.create(&controlplanev1.KubeadmControlPlane{ObjectMeta: metav1.ObjectMeta{Name: c.kcpName(), Namespace: f.ns},
		Spec: controlplanev1.KubeadmControlPlaneSpec{
			Replicas: ptr.To(controlPlanes),
			Version:  kubernetesVersion,
			MachineTemplate: controlplanev1.KubeadmControlPlaneMachineTemplate{Spec: controlplanev1.KubeadmControlPlaneMachineTemplateSpec{
				InfrastructureRef: infraRef("AnvilMachineTemplate", name+"-control-plane")}},
			// The KubeadmControlPlane webhook's defaults.
			Rollout: controlplanev1.KubeadmControlPlaneRolloutSpec{Strategy: controlplanev1.KubeadmControlPlaneRolloutStrategy{
				Type:          controlplanev1.RollingUpdateStrategyType,
				RollingUpdate: controlplanev1.KubeadmControlPlaneRolloutStrategyRollingUpdate{MaxSurge: ptr.To(intstr.FromInt32(1))}}},
		}})
	f.create(&bootstrapv1.KubeadmConfigTemplate{ObjectMeta: metav1.ObjectMeta{Name: name + "-worker", Namespace: f.ns}})
	// The MachineDeployment webhook's defaults: cluster-name label, selector and template
	// labels, rolling update with maxSurge 1 and maxUnavailable 0.
	labels := map[string]string{clusterv1.ClusterNameLabel: name, clusterv1.MachineDeploymentNameLabel: c.mdName()}
	f.create(&clusterv1.MachineDeployment{ObjectMeta: metav1.ObjectMeta{Name: c.mdName(), Namespace: f.ns,
		Labels: map[string]string{clusterv1.ClusterNameLabel: name}},
		Spec: clusterv1.MachineDeploymentSpec{
			ClusterName: name,
			Replicas:    ptr.To(workers),
			Selector:    metav1.LabelSelector{MatchLabels: labels},
			Rollout: clusterv1.MachineDeploymentRolloutSpec{Strategy: clusterv1.MachineDeploymentRolloutStrategy{
				Type: clusterv1.RollingUpdateMachineDeploymentStrategyType,
				RollingUpdate: clusterv1.MachineDeploymentRolloutStrategyRollingUpdate{
					MaxSurge: ptr.To(intstr.FromInt32(1)), MaxUnavailable: ptr.To(intstr.FromInt32(0))}}},
			Template: clusterv1.MachineTemplateSpec{ObjectMeta: clusterv1.ObjectMeta{Labels: labels},
				Spec: clusterv1.MachineSpec{
					ClusterName: name,
					Version:     kubernetesVersion,
					Bootstrap: clusterv1.Bootstrap{ConfigRef: clusterv1.ContractVersionedObjectReference{
						APIGroup: bootstrapv1.GroupVersion.Group, Kind: "KubeadmConfigTemplate", Name: name + "-worker"}},
					InfrastructureRef: infraRef("AnvilMachineTemplate", name+"-worker"),
				}},
		}})
	f.create(&clusterv1.Cluster{ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: f.ns},
		Spec: clusterv1.ClusterSpec{
			ClusterNetwork: clusterv1.ClusterNetwork{Pods: clusterv1.NetworkRanges{CIDRBlocks: []string{"10.244.0.0/16"}},
				Services: clusterv1.NetworkRanges{CIDRBlocks: []string{"10.96.0.0/12"}}},
			ControlPlaneRef: clusterv1.ContractVersionedObjectReference{APIGroup: controlplanev1.GroupVersion.Group,
				Kind: "KubeadmControlPlane", Name: c.kcpName()},
			InfrastructureRef: infraRef("AnvilCluster", name),
		}})
	return c
}

// machines lists the cluster's Machines, control plane first, then by name.
func (c *testCluster) machines() []clusterv1.Machine {
	c.f.t.Helper()
	ms := &clusterv1.MachineList{}
	if err := c.f.api.Client.List(c.f.ctx, ms, client.InNamespace(c.f.ns), client.MatchingLabels{clusterv1.ClusterNameLabel: c.name}); err != nil {
		c.f.t.Fatal(err)
	}
	sort.Slice(ms.Items, func(i, j int) bool {
		ci, cj := isControlPlane(&ms.Items[i]), isControlPlane(&ms.Items[j])
		if ci != cj {
			return ci
		}
		return ms.Items[i].Name < ms.Items[j].Name
	})
	return ms.Items
}

func isControlPlane(m *clusterv1.Machine) bool {
	_, ok := m.Labels[clusterv1.MachineControlPlaneLabel]
	return ok
}

// waitReady waits until the control plane and the MachineDeployment are Available with the
// wanted replicas, and every Machine has a Node and is Ready.
func (c *testCluster) waitReady(controlPlanes, workers int32, timeout time.Duration) {
	c.f.t.Helper()
	c.f.eventually(fmt.Sprintf("cluster %s: %d control-plane and %d worker machines ready, KubeadmControlPlane and MachineDeployment available",
		c.name, controlPlanes, workers), timeout, func() (bool, string) {
		kcp := &controlplanev1.KubeadmControlPlane{}
		md := &clusterv1.MachineDeployment{}
		if err := c.f.get(c.kcpName(), kcp); err != nil {
			return false, err.Error()
		}
		if err := c.f.get(c.mdName(), md); err != nil {
			return false, err.Error()
		}
		switch {
		case !conditions.IsTrue(kcp, controlplanev1.KubeadmControlPlaneAvailableCondition):
			return false, "KubeadmControlPlane not Available"
		case ptr.Deref(kcp.Status.ReadyReplicas, 0) != controlPlanes || ptr.Deref(kcp.Status.Replicas, 0) != controlPlanes:
			return false, fmt.Sprintf("KubeadmControlPlane has %d of %d replicas ready", ptr.Deref(kcp.Status.ReadyReplicas, 0), controlPlanes)
		case !conditions.IsTrue(md, clusterv1.MachineDeploymentAvailableCondition):
			return false, "MachineDeployment not Available"
		case ptr.Deref(md.Status.AvailableReplicas, 0) != workers || ptr.Deref(md.Status.Replicas, 0) != workers:
			return false, fmt.Sprintf("MachineDeployment has %d of %d replicas available", ptr.Deref(md.Status.AvailableReplicas, 0), workers)
		}
		ms := c.machines()
		if len(ms) != int(controlPlanes+workers) {
			return false, fmt.Sprintf("%d machines", len(ms))
		}
		for _, m := range ms {
			if !m.Status.NodeRef.IsDefined() || !conditions.IsTrue(&m, clusterv1.MachineReadyCondition) {
				return false, fmt.Sprintf("machine %s: nodeRef %q, phase %s", m.Name, m.Status.NodeRef.Name, m.Status.Phase)
			}
		}
		return true, ""
	})
}

// describeCAPI renders the namespace's Cluster API objects.
func describeCAPI(f *fixture) string {
	var b strings.Builder
	clusters := &clusterv1.ClusterList{}
	_ = f.api.Client.List(f.ctx, clusters, client.InNamespace(f.ns))
	for _, c := range clusters.Items {
		fmt.Fprintf(&b, "cluster %s: phase %s paused=%v deleting=%v %s\n", c.Name, c.Status.Phase, ptr.Deref(c.Spec.Paused, false),
			!c.DeletionTimestamp.IsZero(), conditionSummary(c.Status.Conditions))
	}
	kcps := &controlplanev1.KubeadmControlPlaneList{}
	_ = f.api.Client.List(f.ctx, kcps, client.InNamespace(f.ns))
	for _, k := range kcps.Items {
		fmt.Fprintf(&b, "kubeadmcontrolplane %s: replicas %d ready %d available %d %s\n", k.Name, ptr.Deref(k.Status.Replicas, 0),
			ptr.Deref(k.Status.ReadyReplicas, 0), ptr.Deref(k.Status.AvailableReplicas, 0), conditionSummary(k.Status.Conditions))
	}
	mds := &clusterv1.MachineDeploymentList{}
	_ = f.api.Client.List(f.ctx, mds, client.InNamespace(f.ns))
	for _, md := range mds.Items {
		fmt.Fprintf(&b, "machinedeployment %s: replicas %d available %d %s\n", md.Name, ptr.Deref(md.Status.Replicas, 0),
			ptr.Deref(md.Status.AvailableReplicas, 0), conditionSummary(md.Status.Conditions))
	}
	machines := &clusterv1.MachineList{}
	_ = f.api.Client.List(f.ctx, machines, client.InNamespace(f.ns))
	for _, m := range machines.Items {
		fmt.Fprintf(&b, "machine %s: phase %s fd=%q providerID=%q node=%q deleting=%v %s\n", m.Name, m.Status.Phase, m.Spec.FailureDomain,
			m.Spec.ProviderID, m.Status.NodeRef.Name, !m.DeletionTimestamp.IsZero(), conditionSummary(m.Status.Conditions))
	}
	for _, key := range f.clusters {
		nodes, err := workloads.Nodes(f.ctx, key)
		if err != nil {
			continue
		}
		var names []string
		for _, n := range nodes {
			names = append(names, n.Name+"="+n.Spec.ProviderID)
		}
		members, _ := workloads.EtcdMembers(f.ctx, key)
		fmt.Fprintf(&b, "workload cluster %s: nodes %v, etcd members %v\n", key.Name, names, members)
	}
	return b.String()
}

// purgeOrder lists every kind a test creates, leaves first.
func purgeOrder() []client.ObjectList {
	return []client.ObjectList{
		&infrav1.AnvilMachineList{}, &bootstrapv1.KubeadmConfigList{}, &clusterv1.MachineList{}, &clusterv1.MachineSetList{},
		&clusterv1.MachineDeploymentList{}, &controlplanev1.KubeadmControlPlaneList{}, &infrav1.AnvilClusterList{},
		&clusterv1.ClusterList{}, &bootstrapv1.KubeadmConfigTemplateList{}, &infrav1.AnvilMachineTemplateList{},
		&infrav1.AnvilHostList{}, &corev1.SecretList{},
	}
}

func metaItems(list client.ObjectList) ([]client.Object, error) {
	objs, err := meta.ExtractList(list)
	if err != nil {
		return nil, err
	}
	out := make([]client.Object, 0, len(objs))
	for _, o := range objs {
		if co, ok := o.(client.Object); ok {
			out = append(out, co)
		}
	}
	return out, nil
}

func isNotFound(err error) bool { return apierrors.IsNotFound(err) }
