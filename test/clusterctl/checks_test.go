package clusterctl

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/resource"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/labels"
	k8sruntime "k8s.io/apimachinery/pkg/runtime"
	kubeletv1beta1 "k8s.io/kubelet/config/v1beta1"
	addonsv1 "sigs.k8s.io/cluster-api/api/addons/v1beta2"
	bootstrapv1 "sigs.k8s.io/cluster-api/api/bootstrap/kubeadm/v1beta2"
	controlplanev1 "sigs.k8s.io/cluster-api/api/controlplane/kubeadm/v1beta2"
	clusterv1 "sigs.k8s.io/cluster-api/api/core/v1beta2"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/yaml"

	infrav1 "github.com/anvil-metal/cluster-api-provider-anvil/api/v1alpha1"
	"github.com/anvil-metal/cluster-api-provider-anvil/internal/release"
)

// Where templates put node configuration.
const (
	kubeVIPManifest = "/etc/kubernetes/manifests/kube-vip.yaml"
	kubeletPatch    = "/etc/kubernetes/patches/kubeletconfiguration0+merge.yaml"
	journaldDropIn  = "/etc/systemd/journald.conf.d/50-anvil.conf"
	logrotateConfig = "/etc/logrotate.d/anvil-kubernetes"
	providerIDJinja = "{{ ds.meta_data.provider_id }}"
	hostnameJinja   = "{{ ds.meta_data.local_hostname }}"
)

func convert[T any](t *testing.T, o *unstructured.Unstructured) *T {
	t.Helper()
	out := new(T)
	if err := k8sruntime.DefaultUnstructuredConverter.FromUnstructured(o.Object, out); err != nil {
		t.Fatalf("%s %s: %v", o.GetKind(), o.GetName(), err)
	}
	return out
}

func ofKind(objs []*unstructured.Unstructured, kind string) []*unstructured.Unstructured {
	var out []*unstructured.Unstructured
	for _, o := range objs {
		if o.GetKind() == kind {
			out = append(out, o)
		}
	}
	return out
}

func checkFlavor(t *testing.T, env *managementPlane, flavor string, objs []*unstructured.Unstructured) {
	ns := objs[0].GetNamespace()
	env.namespace(t, ns)
	if flavor == "topology" {
		checkTopology(t, env, objs)
		return
	}
	for _, o := range ofKind(objs, "KubeadmControlPlane") {
		kcp := convert[controlplanev1.KubeadmControlPlane](t, o)
		checkNodeIdentity(t, "KubeadmControlPlane", kcp.Spec.KubeadmConfigSpec, true)
		checkKubeVIP(t, env, kcp.Spec.KubeadmConfigSpec)
		if flavor == "production" {
			checkNodePractices(t, "KubeadmControlPlane", kcp.Spec.KubeadmConfigSpec, true)
		}
	}
	for _, o := range ofKind(objs, "KubeadmConfigTemplate") {
		kct := convert[bootstrapv1.KubeadmConfigTemplate](t, o)
		checkNodeIdentity(t, "KubeadmConfigTemplate", kct.Spec.Template.Spec, false)
		if flavor == "production" {
			checkNodePractices(t, "KubeadmConfigTemplate", kct.Spec.Template.Spec, false)
		}
	}
	if flavor == "production" {
		checkHealthChecks(t, objs)
		checkNodeProblemDetector(t, env, objs)
	}
	createAll(env.ctx, t, env.client, objs)
	checkWebhooksAreLive(t, env, objs)
}

// checkNodeIdentity: the kubelet registers with the providerID and hostname Anvil writes into
// the config drive's meta-data, rendered by cloud-init's Jinja on the machine (CABPK's
// cloud-config starts with "## template: jinja").
func checkNodeIdentity(t *testing.T, where string, spec bootstrapv1.KubeadmConfigSpec, withInit bool) {
	t.Helper()
	regs := map[string]bootstrapv1.NodeRegistrationOptions{"join": spec.JoinConfiguration.NodeRegistration}
	if withInit {
		regs["init"] = spec.InitConfiguration.NodeRegistration
	}
	for phase, reg := range regs {
		if reg.Name != hostnameJinja {
			t.Errorf("%s %s: node name %q, want %q", where, phase, reg.Name, hostnameJinja)
		}
		found := false
		for _, a := range reg.KubeletExtraArgs {
			found = found || (a.Name == "provider-id" && a.Value != nil && *a.Value == providerIDJinja)
		}
		if !found {
			t.Errorf("%s %s: kubelet --provider-id is not %s: %+v", where, phase, providerIDJinja, reg.KubeletExtraArgs)
		}
	}
	if spec.Format != "" && spec.Format != bootstrapv1.CloudConfig {
		t.Errorf("%s: format %q; the Jinja provider-id needs cloud-config", where, spec.Format)
	}
}

func file(spec bootstrapv1.KubeadmConfigSpec, path string) (bootstrapv1.File, bool) {
	for _, f := range spec.Files {
		if f.Path == path {
			return f, true
		}
	}
	return bootstrapv1.File{}, false
}

// checkKubeVIP runs the template's own shell commands on a copy of the kube-vip manifest (as
// cloud-init's runcmd would), then has the API server validate the resulting static pod.
func checkKubeVIP(t *testing.T, env *managementPlane, spec bootstrapv1.KubeadmConfigSpec) {
	t.Helper()
	f, ok := file(spec, kubeVIPManifest)
	if !ok {
		t.Fatalf("no %s in the control plane's files", kubeVIPManifest)
	}
	dir := t.TempDir()
	manifest := filepath.Join(dir, "kube-vip.yaml")
	initMarker := filepath.Join(dir, "kubeadm.yaml") // CABPK writes /run/kubeadm/kubeadm.yaml on the init node only
	if err := os.WriteFile(manifest, []byte(f.Content), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(initMarker, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	runOnNode := func(cmds []string) {
		for _, c := range cmds {
			if !strings.Contains(c, kubeVIPManifest) {
				continue
			}
			c = strings.ReplaceAll(c, kubeVIPManifest, manifest)
			c = strings.ReplaceAll(c, "/run/kubeadm/kubeadm.yaml", initMarker)
			if out, err := exec.Command("sh", "-c", c).CombinedOutput(); err != nil {
				t.Fatalf("%q: %v\n%s", c, err, out)
			}
		}
	}
	runOnNode(spec.PreKubeadmCommands)
	during, _ := os.ReadFile(manifest)
	pod := &corev1.Pod{}
	if err := yaml.UnmarshalStrict(during, pod); err != nil {
		t.Fatalf("kube-vip manifest after preKubeadmCommands: %v\n%s", err, during)
	}
	envs := map[string]string{}
	for _, e := range pod.Spec.Containers[0].Env {
		envs[e.Name] = e.Value
	}
	if envs["address"] != controlPlaneVIP || envs["port"] != "6443" || envs["cp_enable"] != "true" {
		t.Errorf("kube-vip env %v: want address %s, port 6443, control-plane mode", envs, controlPlaneVIP)
	}
	if strings.Contains(envs["vip_interface"], "@") {
		t.Errorf("preKubeadmCommands left the interface placeholder: %q", envs["vip_interface"])
	}
	if !strings.Contains(pod.Spec.Volumes[0].HostPath.Path, "super-admin.conf") {
		t.Errorf("on the init node kube-vip must use super-admin.conf during kubeadm init, uses %s", pod.Spec.Volumes[0].HostPath.Path)
	}
	runOnNode(spec.PostKubeadmCommands)
	after, _ := os.ReadFile(manifest)
	if !strings.Contains(string(after), "path: /etc/kubernetes/admin.conf") {
		t.Errorf("postKubeadmCommands did not switch kube-vip back to admin.conf:\n%s", after)
	}
	pod.Namespace = "kube-system"
	if err := env.client.Create(env.ctx, pod, client.DryRunAll); err != nil {
		t.Errorf("kube-vip static pod refused by the API server: %v", err)
	}
}

// checkNodePractices: the production node settings, decoded the way the kubelet decodes them.
func checkNodePractices(t *testing.T, where string, spec bootstrapv1.KubeadmConfigSpec, withInit bool) {
	t.Helper()
	f, ok := file(spec, kubeletPatch)
	if !ok {
		t.Fatalf("%s: no %s", where, kubeletPatch)
	}
	dirs := []string{spec.JoinConfiguration.Patches.Directory}
	if withInit {
		dirs = append(dirs, spec.InitConfiguration.Patches.Directory)
	}
	for _, d := range dirs {
		if d != filepath.Dir(kubeletPatch) {
			t.Errorf("%s: kubeadm patches directory %q, want %q", where, d, filepath.Dir(kubeletPatch))
		}
	}
	kc := &kubeletv1beta1.KubeletConfiguration{}
	if err := yaml.UnmarshalStrict([]byte(f.Content), kc); err != nil {
		t.Fatalf("%s: kubelet configuration patch does not decode strictly: %v\n%s", where, err, f.Content)
	}
	checkKubeletConfiguration(t, where, kc)
	if f, ok := file(spec, journaldDropIn); !ok || !strings.Contains(f.Content, "SystemMaxUse=") || !strings.Contains(f.Content, "MaxRetentionSec=") {
		t.Errorf("%s: journald limits missing: %q", where, f.Content)
	}
	if f, ok := file(spec, logrotateConfig); !ok || !strings.Contains(f.Content, "rotate ") || !strings.Contains(f.Content, "maxsize ") {
		t.Errorf("%s: logrotate policy missing: %q", where, f.Content)
	}
	restarts := false
	for _, c := range spec.PreKubeadmCommands {
		restarts = restarts || c == "systemctl restart systemd-journald"
	}
	if !restarts {
		t.Errorf("%s: journald is not restarted to take its limits before kubeadm", where)
	}
}

var evictionSignals = []string{"memory.available", "nodefs.available", "nodefs.inodesFree", "imagefs.available"}

func checkKubeletConfiguration(t *testing.T, where string, kc *kubeletv1beta1.KubeletConfiguration) {
	t.Helper()
	for name, reserved := range map[string]map[string]string{"kubeReserved": kc.KubeReserved, "systemReserved": kc.SystemReserved} {
		for _, r := range []string{"cpu", "memory", "ephemeral-storage"} {
			if _, err := resource.ParseQuantity(reserved[r]); err != nil {
				t.Errorf("%s: %s[%s] = %q: %v", where, name, r, reserved[r], err)
			}
		}
	}
	for _, s := range evictionSignals {
		hard, soft, grace := kc.EvictionHard[s], kc.EvictionSoft[s], kc.EvictionSoftGracePeriod[s]
		if hard == "" || soft == "" {
			t.Errorf("%s: eviction %s hard %q soft %q: both are needed", where, s, hard, soft)
			continue
		}
		if _, err := time.ParseDuration(grace); err != nil {
			t.Errorf("%s: soft eviction %s has no grace period (the kubelet refuses that): %q", where, s, grace)
		}
		// A soft threshold that fires after the hard one never warns anybody.
		if !evictsEarlier(soft, hard) {
			t.Errorf("%s: soft eviction %s=%s is not earlier than hard %s", where, s, soft, hard)
		}
	}
	if kc.EvictionMaxPodGracePeriod <= 0 {
		t.Errorf("%s: evictionMaxPodGracePeriod %d", where, kc.EvictionMaxPodGracePeriod)
	}
	if _, err := resource.ParseQuantity(kc.ContainerLogMaxSize); err != nil {
		t.Errorf("%s: containerLogMaxSize %q: %v", where, kc.ContainerLogMaxSize, err)
	}
	if kc.ContainerLogMaxFiles == nil || *kc.ContainerLogMaxFiles < 2 {
		t.Errorf("%s: containerLogMaxFiles %v (the kubelet needs at least 2)", where, kc.ContainerLogMaxFiles)
	}
	if kc.PodPidsLimit == nil || *kc.PodPidsLimit <= 0 {
		t.Errorf("%s: podPidsLimit %v", where, kc.PodPidsLimit)
	}
	if kc.CPUManagerPolicy != "static" || kc.TopologyManagerPolicy == "" || kc.TopologyManagerPolicy == "none" {
		t.Errorf("%s: cpuManagerPolicy %q topologyManagerPolicy %q: want static and an aligning topology policy for NUMA hosts",
			where, kc.CPUManagerPolicy, kc.TopologyManagerPolicy)
	}
	if kc.ShutdownGracePeriod.Duration <= kc.ShutdownGracePeriodCriticalPods.Duration {
		t.Errorf("%s: shutdownGracePeriod %v must exceed the critical pods' share %v", where, kc.ShutdownGracePeriod, kc.ShutdownGracePeriodCriticalPods)
	}
}

// evictsEarlier: for "available"/"free" signals a larger threshold fires earlier.
func evictsEarlier(soft, hard string) bool {
	if strings.HasSuffix(soft, "%") && strings.HasSuffix(hard, "%") {
		var s, h float64
		_, err1 := fmt.Sscanf(soft, "%g%%", &s)
		_, err2 := fmt.Sscanf(hard, "%g%%", &h)
		return err1 == nil && err2 == nil && s > h
	}
	s, err1 := resource.ParseQuantity(soft)
	h, err2 := resource.ParseQuantity(hard)
	return err1 == nil && err2 == nil && s.Cmp(h) > 0
}

// checkHealthChecks: MachineHealthChecks on node conditions (node-problem-detector's too),
// remediating through an AnvilRemediationTemplate that is part of the output.
func checkHealthChecks(t *testing.T, objs []*unstructured.Unstructured) {
	t.Helper()
	remediation := map[string]bool{}
	for _, o := range ofKind(objs, "AnvilRemediationTemplate") {
		remediation[o.GetName()] = true
	}
	mhcs := ofKind(objs, "MachineHealthCheck")
	if len(mhcs) != 2 {
		t.Fatalf("%d MachineHealthChecks, want one for the control plane and one for the workers", len(mhcs))
	}
	for _, o := range mhcs {
		mhc := convert[clusterv1.MachineHealthCheck](t, o)
		checkMHCSpec(t, mhc.Name, mhc.Spec.Checks.UnhealthyNodeConditions, mhc.Spec.Remediation.TemplateRef)
		if !remediation[mhc.Spec.Remediation.TemplateRef.Name] {
			t.Errorf("MachineHealthCheck %s remediates with %s, which the flavor does not create", mhc.Name, mhc.Spec.Remediation.TemplateRef.Name)
		}
	}
}

func checkMHCSpec(t *testing.T, name string, conds []clusterv1.UnhealthyNodeCondition, ref clusterv1.MachineHealthCheckRemediationTemplateReference) {
	t.Helper()
	have := map[string]bool{}
	for _, c := range conds {
		have[string(c.Type)+"="+string(c.Status)] = true
	}
	for _, want := range []string{"Ready=Unknown", "Ready=False", "KernelDeadlock=True", "ReadonlyFilesystem=True"} {
		if !have[want] {
			t.Errorf("MachineHealthCheck %s does not act on %s", name, want)
		}
	}
	if ref.Kind != "AnvilRemediationTemplate" || ref.APIVersion != infrav1.GroupVersion.String() {
		t.Errorf("MachineHealthCheck %s remediates with %s %s, want an AnvilRemediationTemplate", name, ref.APIVersion, ref.Kind)
	}
}

// checkNodeProblemDetector: the ClusterResourceSet selects the generated Cluster and carries
// node-problem-detector, whose objects the API server accepts as they are.
func checkNodeProblemDetector(t *testing.T, env *managementPlane, objs []*unstructured.Unstructured) {
	t.Helper()
	cluster := ofKind(objs, "Cluster")[0]
	sets := ofKind(objs, "ClusterResourceSet")
	if len(sets) != 1 {
		t.Fatalf("%d ClusterResourceSets, want 1", len(sets))
	}
	crs := convert[addonsv1.ClusterResourceSet](t, sets[0])
	sel, err := labels.Parse(labels.Set(crs.Spec.ClusterSelector.MatchLabels).String())
	if err != nil || len(crs.Spec.ClusterSelector.MatchLabels) == 0 || !sel.Matches(labels.Set(cluster.GetLabels())) {
		t.Errorf("ClusterResourceSet selector %v does not select Cluster %s (labels %v)", crs.Spec.ClusterSelector, cluster.GetName(), cluster.GetLabels())
	}
	var payload []*unstructured.Unstructured
	for _, r := range crs.Spec.Resources {
		for _, o := range ofKind(objs, r.Kind) {
			if o.GetName() != r.Name {
				continue
			}
			cm := convert[corev1.ConfigMap](t, o)
			for key, data := range cm.Data {
				p, err := release.ParseObjects([]byte(data))
				if err != nil {
					t.Fatalf("ConfigMap %s key %s: %v", cm.Name, key, err)
				}
				payload = append(payload, p...)
			}
		}
	}
	var ds *unstructured.Unstructured
	for _, o := range payload {
		if o.GetKind() == "DaemonSet" {
			ds = o
		}
	}
	if ds == nil {
		t.Fatal("the ClusterResourceSet carries no node-problem-detector DaemonSet")
	}
	c := convert[struct {
		Spec struct {
			Template corev1.PodTemplateSpec `json:"template"`
		} `json:"spec"`
	}](t, ds).Spec.Template.Spec.Containers[0]
	args := strings.Join(c.Command, " ")
	for _, monitor := range []string{"kernel-monitor.json", "readonly-monitor.json"} {
		if !strings.Contains(args, monitor) {
			t.Errorf("node-problem-detector does not run %s (the MachineHealthChecks wait on its conditions)", monitor)
		}
	}
	if skipped := dryRunCreate(env.ctx, t, env.client, payload); len(skipped) > 0 {
		t.Errorf("node-problem-detector kinds unknown to the API server: %v", skipped)
	}
}

// checkWebhooksAreLive proves the "accepted" above means something: the same API server
// refuses a template that Anvil's webhook must refuse (an image on the provisioner's own
// loopback).
func checkWebhooksAreLive(t *testing.T, env *managementPlane, objs []*unstructured.Unstructured) {
	t.Helper()
	bad := ofKind(objs, "AnvilMachineTemplate")[0].DeepCopy()
	bad.SetName(bad.GetName() + "-loopback")
	if err := unstructured.SetNestedField(bad.Object, "http://localhost:8080/image.raw", "spec", "template", "spec", "image", "url"); err != nil {
		t.Fatal(err)
	}
	err := env.client.Create(env.ctx, bad, client.DryRunAll)
	if err == nil || !apierrors.IsInvalid(err) || !strings.Contains(err.Error(), "localhost") {
		t.Errorf("an AnvilMachineTemplate with a localhost image was not refused by Anvil's webhook: %v", err)
	}
}
