package clusterctl

import (
	"fmt"
	"slices"
	"strings"
	"testing"
	"time"

	apiextensionsv1 "k8s.io/apiextensions-apiserver/pkg/apis/apiextensions/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/meta"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/apimachinery/pkg/util/json"
	kubeletv1beta1 "k8s.io/kubelet/config/v1beta1"
	bootstrapv1 "sigs.k8s.io/cluster-api/api/bootstrap/kubeadm/v1beta2"
	controlplanev1 "sigs.k8s.io/cluster-api/api/controlplane/kubeadm/v1beta2"
	clusterv1 "sigs.k8s.io/cluster-api/api/core/v1beta2"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/yaml"

	infrav1 "github.com/anvil-metal/cluster-api-provider-anvil/api/v1alpha1"
)

// checkTopology creates the ClusterClass and its templates, waits for Cluster API's
// ClusterClass controller to accept the class's variables, then creates the Cluster and lets
// Cluster API's topology controller stamp out the cluster from the class. Every object it
// creates passes the same API server checks, and carries what the class's patches put in.
func checkTopology(t *testing.T, env *managementPlane, objs []*unstructured.Unstructured) {
	t.Helper()
	var cluster *unstructured.Unstructured
	var rest []*unstructured.Unstructured
	for _, o := range objs {
		if o.GetKind() == "Cluster" {
			cluster = o
		} else {
			rest = append(rest, o)
		}
	}
	if cluster == nil || len(ofKind(objs, "ClusterClass")) != 1 {
		t.Fatal("the topology flavor must hold a Cluster and (added by clusterctl) the ClusterClass")
	}
	createAll(env.ctx, t, env.client, rest)
	class := ofKind(objs, "ClusterClass")[0]
	ns := cluster.GetNamespace()

	// Cluster API's ClusterClass controller resolves the templates and the variables.
	eventually(t, 30*time.Second, "ClusterClass reconciled", func() error {
		cc := &clusterv1.ClusterClass{}
		if err := env.client.Get(env.ctx, client.ObjectKey{Namespace: ns, Name: class.GetName()}, cc); err != nil {
			return err
		}
		c := meta.FindStatusCondition(cc.Status.Conditions, clusterv1.ClusterClassVariablesReadyCondition)
		if c == nil || c.Status != "True" || cc.Status.ObservedGeneration != cc.Generation {
			return fmt.Errorf("%w: VariablesReady %+v", errNotYet, c)
		}
		if len(cc.Status.Variables) < 5 {
			return fmt.Errorf("%w: %d variables", errNotYet, len(cc.Status.Variables))
		}
		return nil
	})

	// The class's variable schemas are enforced by Cluster API's webhook.
	bad := cluster.DeepCopy()
	bad.SetName(cluster.GetName() + "-bad-image")
	setVariable(t, bad, "image", map[string]any{"url": imageURL, "checksum": "md5:0123"})
	if err := env.client.Create(env.ctx, bad, client.DryRunAll); err == nil || !strings.Contains(err.Error(), "checksum") {
		t.Errorf("a Cluster whose image checksum breaks the class's schema was not refused: %v", err)
	}

	createAll(env.ctx, t, env.client, []*unstructured.Unstructured{cluster})
	key := client.ObjectKeyFromObject(cluster)
	c := &clusterv1.Cluster{}
	eventually(t, 60*time.Second, "the topology controller creates the infrastructure cluster and control plane", func() error {
		if err := env.client.Get(env.ctx, key, c); err != nil {
			return err
		}
		if !c.Spec.InfrastructureRef.IsDefined() || !c.Spec.ControlPlaneRef.IsDefined() {
			return fmt.Errorf("%w: refs %+v %+v", errNotYet, c.Spec.InfrastructureRef, c.Spec.ControlPlaneRef)
		}
		return nil
	})

	ac := &infrav1.AnvilCluster{}
	mustGet(t, env, ns, c.Spec.InfrastructureRef.Name, ac)
	if ac.Spec.ControlPlaneEndpoint.Host != controlPlaneVIP || ac.Spec.ControlPlaneEndpoint.Port != 6443 {
		t.Errorf("AnvilCluster endpoint %+v, want %s:6443 from the controlPlaneEndpoint variable", ac.Spec.ControlPlaneEndpoint, controlPlaneVIP)
	}
	if ac.Spec.FailureDomainLabel != infrav1.DefaultFailureDomainLabel {
		t.Errorf("AnvilCluster failureDomainLabel %q", ac.Spec.FailureDomainLabel)
	}

	kcp := &controlplanev1.KubeadmControlPlane{}
	mustGet(t, env, ns, c.Spec.ControlPlaneRef.Name, kcp)
	checkNodeIdentity(t, "topology KubeadmControlPlane", kcp.Spec.KubeadmConfigSpec, true)
	checkKubeVIP(t, env, kcp.Spec.KubeadmConfigSpec)
	checkNodePractices(t, "topology KubeadmControlPlane", kcp.Spec.KubeadmConfigSpec, true)
	if kcp.Spec.Version != kubernetesVersion || kcp.Spec.Replicas == nil || *kcp.Spec.Replicas != 3 {
		t.Errorf("KubeadmControlPlane version %s replicas %v", kcp.Spec.Version, kcp.Spec.Replicas)
	}
	cpMachines := &infrav1.AnvilMachineTemplate{}
	mustGet(t, env, ns, kcp.Spec.MachineTemplate.Spec.InfrastructureRef.Name, cpMachines)
	checkMachineTemplate(t, "control plane", cpMachines, 8)

	// Workers come once the control plane is stable: report it provisioned at the
	// topology's version, as KCP would once its machines run.
	status := fmt.Sprintf(`{"status":{"version":%q,"replicas":3,"readyReplicas":3,"availableReplicas":3,"upToDateReplicas":3,"initialization":{"controlPlaneInitialized":true}}}`, kubernetesVersion)
	if err := env.client.Status().Patch(env.ctx, kcp, client.RawPatch(types.MergePatchType, []byte(status))); err != nil {
		t.Fatal(err)
	}
	mds := &clusterv1.MachineDeploymentList{}
	eventually(t, 60*time.Second, "the topology controller creates the workers' MachineDeployment", func() error {
		if err := env.client.List(env.ctx, mds, client.InNamespace(ns), client.MatchingLabels{clusterv1.ClusterNameLabel: key.Name}); err != nil {
			return err
		}
		if len(mds.Items) != 1 {
			return fmt.Errorf("%w: %d MachineDeployments", errNotYet, len(mds.Items))
		}
		return nil
	})
	md := mds.Items[0]
	if md.Spec.Replicas == nil || *md.Spec.Replicas != 2 {
		t.Errorf("MachineDeployment replicas %v, want 2", md.Spec.Replicas)
	}
	kct := &bootstrapv1.KubeadmConfigTemplate{}
	mustGet(t, env, ns, md.Spec.Template.Spec.Bootstrap.ConfigRef.Name, kct)
	checkNodeIdentity(t, "topology KubeadmConfigTemplate", kct.Spec.Template.Spec, false)
	checkNodePractices(t, "topology KubeadmConfigTemplate", kct.Spec.Template.Spec, false)
	workers := &infrav1.AnvilMachineTemplate{}
	mustGet(t, env, ns, md.Spec.Template.Spec.InfrastructureRef.Name, workers)
	checkMachineTemplate(t, "workers", workers, 16)

	// The class's health checks become MachineHealthChecks remediating through Anvil.
	mhcs := &clusterv1.MachineHealthCheckList{}
	eventually(t, 30*time.Second, "the topology controller creates the MachineHealthChecks", func() error {
		if err := env.client.List(env.ctx, mhcs, client.InNamespace(ns), client.MatchingLabels{clusterv1.ClusterNameLabel: key.Name}); err != nil {
			return err
		}
		if len(mhcs.Items) != 2 {
			return fmt.Errorf("%w: %d MachineHealthChecks", errNotYet, len(mhcs.Items))
		}
		return nil
	})
	for _, mhc := range mhcs.Items {
		checkMHCSpec(t, mhc.Name, mhc.Spec.Checks.UnhealthyNodeConditions, mhc.Spec.Remediation.TemplateRef)
	}
	checkNodeProblemDetector(t, env, objs)

	// A changed variable rolls through to the generated objects.
	mustGet(t, env, ns, key.Name, c)
	patch := client.MergeFrom(c.DeepCopy())
	// Cluster API's defaulting webhook wrote every variable's default into the Cluster;
	// replace the kubelet object with one that sets only podPidsLimit.
	raw, _ := json.Marshal(map[string]any{"podPidsLimit": 2048})
	vars := slices.DeleteFunc(c.Spec.Topology.Variables, func(v clusterv1.ClusterVariable) bool { return v.Name == "kubelet" })
	c.Spec.Topology.Variables = append(vars, clusterv1.ClusterVariable{Name: "kubelet", Value: apiextensionsv1.JSON{Raw: raw}})
	if err := env.client.Patch(env.ctx, c, patch); err != nil {
		t.Fatalf("setting the kubelet variable: %v", err)
	}
	eventually(t, 60*time.Second, "podPidsLimit reaches the control plane's kubelet patch", func() error {
		if err := env.client.Get(env.ctx, client.ObjectKeyFromObject(kcp), kcp); err != nil {
			return err
		}
		f, _ := file(kcp.Spec.KubeadmConfigSpec, kubeletPatch)
		kc := &kubeletv1beta1.KubeletConfiguration{}
		if err := yaml.UnmarshalStrict([]byte(f.Content), kc); err != nil {
			return err
		}
		if kc.PodPidsLimit == nil || *kc.PodPidsLimit != 2048 {
			return fmt.Errorf("%w: podPidsLimit %v", errNotYet, kc.PodPidsLimit)
		}
		// The other kubelet settings keep their defaults.
		checkKubeletConfiguration(t, "topology KubeadmControlPlane after the change", kc)
		return nil
	})
}

func checkMachineTemplate(t *testing.T, what string, tpl *infrav1.AnvilMachineTemplate, minMemoryGiB int32) {
	t.Helper()
	spec := tpl.Spec.Template.Spec
	if spec.Image.URL != imageURL || spec.Image.Checksum != imageChecksum || spec.Image.Layout != infrav1.ImageLayoutABRoot {
		t.Errorf("%s AnvilMachineTemplate image %+v, want the image variable", what, spec.Image)
	}
	if spec.Hardware == nil || spec.Hardware.MinMemoryGiB != minMemoryGiB || spec.Hardware.Architecture != "amd64" {
		t.Errorf("%s AnvilMachineTemplate hardware %+v, want the %s hardware variable", what, spec.Hardware, what)
	}
	if spec.WipePolicy != infrav1.WipePolicyMetadata {
		t.Errorf("%s wipePolicy %q", what, spec.WipePolicy)
	}
}

func mustGet(t *testing.T, env *managementPlane, ns, name string, obj client.Object) {
	t.Helper()
	if err := env.client.Get(env.ctx, client.ObjectKey{Namespace: ns, Name: name}, obj); err != nil {
		if apierrors.IsNotFound(err) {
			t.Fatalf("%T %s/%s was not created", obj, ns, name)
		}
		t.Fatal(err)
	}
}

func setVariable(t *testing.T, cluster *unstructured.Unstructured, name string, value any) {
	t.Helper()
	vars, _, _ := unstructured.NestedSlice(cluster.Object, "spec", "topology", "variables")
	for i, v := range vars {
		if m, ok := v.(map[string]any); ok && m["name"] == name {
			m["value"] = value
			vars[i] = m
		}
	}
	if err := unstructured.SetNestedSlice(cluster.Object, vars, "spec", "topology", "variables"); err != nil {
		t.Fatal(err)
	}
}
