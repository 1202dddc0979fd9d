package webhooks

import (
	"context"
	"fmt"
	"os"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	clusterv1 "sigs.k8s.io/cluster-api/api/core/v1beta2"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/client"
	metricsserver "sigs.k8s.io/controller-runtime/pkg/metrics/server"
	"sigs.k8s.io/controller-runtime/pkg/webhook"

	infrav1 "github.com/anvil-metal/cluster-api-provider-anvil/api/v1alpha1"
	"github.com/anvil-metal/cluster-api-provider-anvil/internal/mgmtplane"
)

// These tests run the webhooks in a real webhook server that a real kube-apiserver calls.
var env *mgmtplane.Environment

func TestMain(m *testing.M) {
	var err error
	env, err = mgmtplane.StartWithOptions(mgmtplane.Options{Webhooks: true})
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	ctx, cancel := context.WithCancel(context.Background())
	mgr, err := ctrl.NewManager(env.Config, ctrl.Options{Scheme: env.Scheme, Metrics: metricsserver.Options{BindAddress: "0"},
		WebhookServer: webhook.NewServer(env.WebhookServer())})
	if err == nil {
		err = SetupWithManager(mgr, Options{})
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	go func() { _ = mgr.Start(ctx) }()
	if err := waitForWebhooks(ctx); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	code := m.Run()
	cancel()
	_ = env.Stop()
	os.Exit(code)
}

// waitForWebhooks retries a dry-run create until the API server reaches the webhook server.
func waitForWebhooks(ctx context.Context) error {
	deadline := time.Now().Add(30 * time.Second)
	for {
		c := &infrav1.AnvilCluster{ObjectMeta: metav1.ObjectMeta{Name: "probe", Namespace: "default"}}
		err := env.Client.Create(ctx, c, client.DryRunAll)
		if err == nil {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("webhooks never answered: %w", err)
		}
		time.Sleep(200 * time.Millisecond)
	}
}

func namespace(t *testing.T) string {
	t.Helper()
	ns := &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{GenerateName: "webhooks-"}}
	if err := env.Client.Create(context.Background(), ns); err != nil {
		t.Fatal(err)
	}
	return ns.Name
}

func expectRejected(t *testing.T, err error, field, hint string) {
	t.Helper()
	if err == nil {
		t.Fatalf("accepted; want a rejection naming %s", field)
	}
	if !strings.Contains(err.Error(), field) || !strings.Contains(err.Error(), hint) {
		t.Errorf("rejection should name %q and say %q:\n%v", field, hint, err)
	}
}

func host(ns, name, addr string) *infrav1.AnvilHost {
	return &infrav1.AnvilHost{ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: ns}, Spec: infrav1.AnvilHostSpec{
		BMC:            infrav1.BMC{Address: addr, CredentialsRef: infrav1.LocalSecretReference{Name: "bmc"}},
		BootMACAddress: "52:54:00:00:00:01",
	}}
}

func TestHostWebhook(t *testing.T) {
	ctx := context.Background()
	ns := namespace(t)
	h := host(ns, "secureboot-ipmi", "ipmi://10.0.0.5")
	h.Spec.BootMode = infrav1.BootModeUEFISecureBoot
	expectRejected(t, env.Client.Create(ctx, h), "spec.bootMode", "IPMI cannot control Secure Boot")

	h = host(ns, "ca-on-ipmi", "ipmi://10.0.0.5")
	h.Spec.BMC.CABundleRef = &infrav1.LocalSecretReference{Name: "ca"}
	expectRejected(t, env.Client.Create(ctx, h), "spec.bmc.caBundleRef", "only applies to redfish")

	h = host(ns, "bad-host", "redfish://bad_host!/redfish/v1/Systems/1")
	expectRejected(t, env.Client.Create(ctx, h), "spec.bmc.address", "not a DNS name or IP address")

	if err := env.Client.Create(ctx, host(ns, "ok", "redfish+https://10.0.0.5/redfish/v1/Systems/1")); err != nil {
		t.Fatalf("valid host rejected: %v", err)
	}

	h = host(ns, "bad-inspection", "ipmi://10.0.0.5")
	h.Spec.Inspection = "Manual"
	expectRejected(t, env.Client.Create(ctx, h), "spec.inspection", "Auto")
	h = host(ns, "ipmi-default-inspection", "ipmi://10.0.0.5")
	if err := env.Client.Create(ctx, h); err != nil {
		t.Fatalf("IPMI host rejected: %v", err)
	}
	if h.Spec.Inspection != infrav1.InspectionAuto {
		t.Errorf("spec.inspection defaulted to %q, want Auto", h.Spec.Inspection)
	}
}

// The CRD's enum already refuses unknown modes; the webhook says so too (for API servers that
// skip the schema, e.g. a dry run of an older CRD) and warns when an IPMI host opts out of
// in-band inspection.
func TestHostInspectionModeValidation(t *testing.T) {
	h := host("ns", "h", "ipmi://10.0.0.5")
	h.Spec.Inspection = infrav1.InspectionOutOfBand
	warnings, errs := validateHost(h)
	if len(errs) != 0 || len(warnings) != 1 || !strings.Contains(warnings[0], "no hardware labels") {
		t.Errorf("OutOfBand on IPMI: warnings %q, errors %v; want one warning about missing hardware labels", warnings, errs)
	}
	h.Spec.BMC.Address = "redfish+https://10.0.0.5/redfish/v1/Systems/1"
	if warnings, errs := validateHost(h); len(errs) != 0 || len(warnings) != 0 {
		t.Errorf("OutOfBand on Redfish: warnings %q, errors %v; want none", warnings, errs)
	}
	h.Spec.Inspection = "Manual"
	if _, errs := validateHost(h); len(errs) != 1 || errs[0].Field != "spec.inspection" || !strings.Contains(errs[0].Error(), `"InBand"`) {
		t.Errorf("unknown mode: %v; want an error on spec.inspection listing the modes", errs)
	}
}

func TestMachineWebhook(t *testing.T) {
	ctx := context.Background()
	ns := namespace(t)
	img := infrav1.Image{URL: "http://127.0.0.1:8080/os.img", Checksum: "sha256:" + strings.Repeat("a", 64)}
	m := &infrav1.AnvilMachine{ObjectMeta: metav1.ObjectMeta{Name: "loopback", Namespace: ns}, Spec: infrav1.AnvilMachineSpec{Image: img}}
	expectRejected(t, env.Client.Create(ctx, m), "spec.image.url", "reach the provisioner itself")

	m = &infrav1.AnvilMachine{ObjectMeta: metav1.ObjectMeta{Name: "gpu-model", Namespace: ns}, Spec: infrav1.AnvilMachineSpec{
		Image: infrav1.Image{URL: "https://images.example.com/os.img", Checksum: img.Checksum}, Hardware: &infrav1.HardwareRequirements{GPUModel: "H100"}}}
	expectRejected(t, env.Client.Create(ctx, m), "spec.hardware.gpuModel", "set hardware.minGPUs too")

	m.Spec.Hardware.MinGPUs = 1
	m.Spec.HostLabelsToNode = []string{"topology.kubernetes.io/zone", "anvil.cluster.x-k8s.io/", "Rack Name"}
	expectRejected(t, env.Client.Create(ctx, m), "spec.hostLabelsToNode[2]", "must be a label key such as topology.kubernetes.io/zone")
	m.Spec.HostLabelsToNode[2] = "not_a_domain/"
	expectRejected(t, env.Client.Create(ctx, m), "spec.hostLabelsToNode[2]", "a prefix must be a DNS subdomain")
	// Labels that belong to the kubelet, Kubernetes, Cluster API or Anvil's bookkeeping.
	for key, hint := range map[string]string{
		"kubernetes.io/hostname":            "only topology.kubernetes.io/zone and topology.kubernetes.io/region may be copied",
		"node-role.kubernetes.io/":          "belong to the kubelet and Kubernetes",
		"topology.kubernetes.io/":           "by their exact key",
		"node.cluster.x-k8s.io/":            "set them on the Machine template instead",
		"anvil.cluster.x-k8s.io/claimed-by": "Anvil's bookkeeping of the claim",
	} {
		m.Spec.HostLabelsToNode[2] = key
		expectRejected(t, env.Client.Create(ctx, m), "spec.hostLabelsToNode[2]", hint)
	}
	m.Spec.HostLabelsToNode[2] = "topology.kubernetes.io/region"
	tmpl := &infrav1.AnvilMachineTemplate{ObjectMeta: metav1.ObjectMeta{Name: "labels", Namespace: ns},
		Spec: infrav1.AnvilMachineTemplateSpec{Template: infrav1.AnvilMachineTemplateResource{Spec: *m.Spec.DeepCopy()}}}
	tmpl.Spec.Template.Spec.HostLabelsToNode = append(tmpl.Spec.Template.Spec.HostLabelsToNode, "kubernetes.io/arch")
	expectRejected(t, env.Client.Create(ctx, tmpl), "spec.template.spec.hostLabelsToNode[3]", "belong to the kubelet and Kubernetes")
	tmpl.Spec.Template.Spec.HostLabelsToNode = tmpl.Spec.Template.Spec.HostLabelsToNode[:3]
	if err := env.Client.Create(ctx, tmpl); err != nil {
		t.Fatalf("valid template rejected: %v", err)
	}
	m.Spec.WipePolicy = ""
	if err := env.Client.Create(ctx, m); err != nil {
		t.Fatal(err)
	}
	if m.Spec.WipePolicy != infrav1.WipePolicyMetadata {
		t.Errorf("wipePolicy defaulted to %q", m.Spec.WipePolicy)
	}
	// Once it holds a host, a new image is an in-place upgrade (allowed); a new layout is not.
	m.Status.HostRef = &infrav1.MachineHostReference{Name: "h"}
	if err := env.Client.Status().Update(ctx, m); err != nil {
		t.Fatal(err)
	}
	m.Spec.Image.URL, m.Spec.Image.Checksum = "https://images.example.com/os-v2.img", "sha256:"+strings.Repeat("b", 64)
	if err := env.Client.Update(ctx, m); err != nil {
		t.Fatalf("an image change of a provisioned machine was refused: %v", err)
	}
	m.Spec.Image.Layout = infrav1.ImageLayoutWholeDisk
	expectRejected(t, env.Client.Update(ctx, m), "spec.image.layout", "replace the machine")
}

func TestTemplatesAreImmutableExceptClusterClassDryRun(t *testing.T) {
	ctx := context.Background()
	ns := namespace(t)
	tmpl := &infrav1.AnvilMachineTemplate{ObjectMeta: metav1.ObjectMeta{Name: "workers", Namespace: ns},
		Spec: infrav1.AnvilMachineTemplateSpec{Template: infrav1.AnvilMachineTemplateResource{Spec: infrav1.AnvilMachineSpec{
			Image: infrav1.Image{URL: "https://images.example.com/v1.img", Checksum: "sha256:" + strings.Repeat("b", 64)}}}}}
	if err := env.Client.Create(ctx, tmpl); err != nil {
		t.Fatal(err)
	}
	tmpl.Spec.Template.Spec.Image.URL = "https://images.example.com/v2.img"
	expectRejected(t, env.Client.Update(ctx, tmpl), "spec.template.spec", "templates are immutable")

	// The topology controller's dry-run (annotated) is let through and changes nothing.
	tmpl.Annotations = map[string]string{clusterv1.TopologyDryRunAnnotation: ""}
	if err := env.Client.Update(ctx, tmpl, client.DryRunAll); err != nil {
		t.Fatalf("ClusterClass dry-run rejected: %v", err)
	}
	stored := &infrav1.AnvilMachineTemplate{}
	if err := env.Client.Get(ctx, client.ObjectKeyFromObject(tmpl), stored); err != nil {
		t.Fatal(err)
	}
	if stored.Spec.Template.Spec.Image.URL != "https://images.example.com/v1.img" {
		t.Error("a dry run changed the stored template")
	}

	ct := &infrav1.AnvilClusterTemplate{ObjectMeta: metav1.ObjectMeta{Name: "c", Namespace: ns}}
	if err := env.Client.Create(ctx, ct); err != nil {
		t.Fatal(err)
	}
	ct.Spec.Template.Spec.ControlPlaneFailureDomains = []string{"zone-a"}
	expectRejected(t, env.Client.Update(ctx, ct), "spec.template.spec", "templates are immutable")
}

func TestClusterAndRemediationWebhooks(t *testing.T) {
	ctx := context.Background()
	ns := namespace(t)
	c := &infrav1.AnvilCluster{ObjectMeta: metav1.ObjectMeta{Name: "c", Namespace: ns},
		Spec: infrav1.AnvilClusterSpec{ControlPlaneEndpoint: clusterv1.APIEndpoint{Host: "192.168.10.100"}}}
	if err := env.Client.Create(ctx, c); err != nil {
		t.Fatal(err)
	}
	if c.Spec.ControlPlaneEndpoint.Port != 6443 {
		t.Errorf("port defaulted to %d", c.Spec.ControlPlaneEndpoint.Port)
	}
	c.Spec.ControlPlaneEndpoint.Host = "192.168.10.101"
	expectRejected(t, env.Client.Update(ctx, c), "spec.controlPlaneEndpoint", "cannot change once set")

	bad := &infrav1.AnvilCluster{ObjectMeta: metav1.ObjectMeta{Name: "bad", Namespace: ns},
		Spec: infrav1.AnvilClusterSpec{ControlPlaneEndpoint: clusterv1.APIEndpoint{Host: "not a host", Port: 6443}}}
	expectRejected(t, env.Client.Create(ctx, bad), "spec.controlPlaneEndpoint.host", "IP address or a DNS name")

	r := &infrav1.AnvilRemediationTemplate{ObjectMeta: metav1.ObjectMeta{Name: "fast", Namespace: ns},
		Spec: infrav1.AnvilRemediationTemplateSpec{Template: infrav1.AnvilRemediationTemplateResource{
			Spec: infrav1.AnvilRemediationSpec{Timeout: &metav1.Duration{Duration: 30 * time.Second}}}}}
	expectRejected(t, env.Client.Create(ctx, r), "spec.template.spec.timeout", "at least 1m")
}
