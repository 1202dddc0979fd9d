package v1alpha1_test

// These tests run against a real kube-apiserver (envtest): the CRDs' OpenAPI and CEL rules are
// what users meet through kubectl, Flux or Argo CD, so they are checked where they execute.

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"

	corev1 "k8s.io/api/core/v1"
	apiextensionsv1 "k8s.io/apiextensions-apiserver/pkg/apis/apiextensions/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	utilyaml "k8s.io/apimachinery/pkg/util/yaml"
	"k8s.io/utils/ptr"
	"sigs.k8s.io/controller-runtime/pkg/client"

	infrav1 "github.com/anvil-metal/cluster-api-provider-anvil/api/v1alpha1"
	"github.com/anvil-metal/cluster-api-provider-anvil/internal/mgmtplane"
)

var env *mgmtplane.Environment

func TestMain(m *testing.M) {
	var err error
	env, err = mgmtplane.Start()
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	code := m.Run()
	if err := env.Stop(); err != nil {
		fmt.Fprintln(os.Stderr, "stopping envtest:", err)
	}
	os.Exit(code)
}

func newNamespace(t *testing.T) string {
	t.Helper()
	ns := &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{GenerateName: "validation-"}}
	if err := env.Client.Create(context.Background(), ns); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = env.Client.Delete(context.Background(), ns) })
	return ns.Name
}

func validHost(ns string) *infrav1.AnvilHost {
	return &infrav1.AnvilHost{
		ObjectMeta: metav1.ObjectMeta{Name: "node01", Namespace: ns},
		Spec: infrav1.AnvilHostSpec{
			BMC: infrav1.BMC{
				Address:        "redfish+https://10.0.0.5/redfish/v1/Systems/1",
				CredentialsRef: infrav1.LocalSecretReference{Name: "node01-bmc"},
			},
			BootMACAddress: "52:54:00:12:34:56",
		},
	}
}

func validImage() infrav1.Image {
	return infrav1.Image{
		URL:      "https://images.example.com/os.img",
		Checksum: "sha256:9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08",
	}
}

func validMachine(ns string) *infrav1.AnvilMachine {
	return &infrav1.AnvilMachine{
		ObjectMeta: metav1.ObjectMeta{Name: "m0", Namespace: ns},
		Spec:       infrav1.AnvilMachineSpec{Image: validImage()},
	}
}

// expectRejected asserts the API server refused err with a message naming field and
// containing hint (the fix).
func expectRejected(t *testing.T, err error, field, hint string) {
	t.Helper()
	if err == nil {
		t.Fatalf("accepted; want rejection naming %s", field)
	}
	msg := err.Error()
	if !strings.Contains(msg, field) {
		t.Errorf("rejection does not name the field %q:\n%s", field, msg)
	}
	if !strings.Contains(msg, hint) {
		t.Errorf("rejection does not say the fix %q:\n%s", hint, msg)
	}
}

func TestHostValidation(t *testing.T) {
	ctx := context.Background()
	ns := newNamespace(t)

	cases := []struct {
		name   string
		mutate func(*infrav1.AnvilHost)
		field  string
		hint   string
	}{
		{"http scheme is not a BMC scheme", func(h *infrav1.AnvilHost) { h.Spec.BMC.Address = "http://10.0.0.5/redfish/v1" },
			"spec.bmc.address", "redfish+https://"},
		{"idrac scheme is not supported", func(h *infrav1.AnvilHost) { h.Spec.BMC.Address = "idrac://10.0.0.5" },
			"spec.bmc.address", "ipmi://"},
		{"credentials in the URL", func(h *infrav1.AnvilHost) { h.Spec.BMC.Address = "ipmi://admin:pw@10.0.0.5" },
			"spec.bmc.address", "credentialsRef"},
		{"no host", func(h *infrav1.AnvilHost) { h.Spec.BMC.Address = "redfish:///redfish/v1" },
			"spec.bmc.address", "followed by a host"},
		{"MAC with dashes", func(h *infrav1.AnvilHost) { h.Spec.BootMACAddress = "52-54-00-12-34-56" },
			"spec.bootMACAddress", "six colon-separated hex pairs"},
		{"MAC too short", func(h *infrav1.AnvilHost) { h.Spec.BootMACAddress = "52:54:00:12:34" },
			"spec.bootMACAddress", "six colon-separated hex pairs"},
		{"unknown boot mode", func(h *infrav1.AnvilHost) { h.Spec.BootMode = "EFI" },
			"spec.bootMode", `"UEFI", "UEFISecureBoot", "Legacy"`},
		{"bad Secret name", func(h *infrav1.AnvilHost) { h.Spec.BMC.CredentialsRef.Name = "other/secret" },
			"spec.bmc.credentialsRef.name", "same namespace"},
		{"boot address without prefix", func(h *infrav1.AnvilHost) {
			h.Spec.BootNetwork = &infrav1.BootNetwork{Address: "192.168.10.21"}
		}, "spec.bootNetwork.address", "CIDR form"},
		{"root hint not a device path", func(h *infrav1.AnvilHost) {
			h.Spec.RootDeviceHints = &infrav1.RootDeviceHints{DeviceName: "sda"}
		}, "spec.rootDeviceHints.deviceName", "/dev/"},
		{"maintenance without reason", func(h *infrav1.AnvilHost) { h.Spec.Maintenance = &infrav1.Maintenance{} },
			"spec.maintenance.reason", "at least 1 chars long"},
		{"claimed with a file:// image", func(h *infrav1.AnvilHost) {
			img := validImage()
			img.URL = "file:///etc/shadow"
			h.Spec.Claim = &infrav1.HostClaim{MachineRef: infrav1.MachineReference{Name: "m", UID: "u"}, Image: &img}
		}, "spec.claim.image.url", "http:// or https://"},
	}
	for i, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			h := validHost(ns)
			h.Name = fmt.Sprintf("host-%d", i)
			tc.mutate(h)
			expectRejected(t, env.Client.Create(ctx, h), tc.field, tc.hint)
		})
	}

	t.Run("a Secret reference into another namespace", func(t *testing.T) {
		// There is no namespace field to set; a manifest that tries gets a strict-decoding
		// error naming the field (kubectl, Flux and Argo CD validate strictly).
		u := hostAsUnstructured(t, validHost(ns))
		if err := unstructured.SetNestedField(u.Object, "kube-system", "spec", "bmc", "credentialsRef", "namespace"); err != nil {
			t.Fatal(err)
		}
		err := env.Client.Create(ctx, u, client.FieldValidation("Strict"))
		expectRejected(t, err, "spec.bmc.credentialsRef.namespace", "unknown field")
	})

	t.Run("accepted schemes", func(t *testing.T) {
		for i, addr := range []string{
			"redfish://10.0.0.5", "redfish+http://127.0.0.1:8000/redfish/v1/Systems/1",
			"redfish+https://bmc.example.com:8443/redfish/v1/Systems/System.Embedded.1",
			"ipmi://10.0.0.5", "ipmi://10.0.0.5:623", "redfish+https://[fd00::5]/redfish/v1/Systems/1",
		} {
			h := validHost(ns)
			h.Name = fmt.Sprintf("ok-%d", i)
			h.Spec.BMC.Address = addr
			if err := env.Client.Create(ctx, h); err != nil {
				t.Errorf("%s rejected: %v", addr, err)
			}
		}
	})

	t.Run("defaults", func(t *testing.T) {
		h := validHost(ns)
		h.Name = "defaults"
		if err := env.Client.Create(ctx, h); err != nil {
			t.Fatal(err)
		}
		if h.Spec.BootMode != infrav1.BootModeUEFI {
			t.Errorf("bootMode defaulted to %q, want UEFI", h.Spec.BootMode)
		}
		if h.Spec.BMC.InsecureSkipVerify {
			t.Error("TLS verification must be on by default")
		}
	})

	t.Run("retire cannot be undone", func(t *testing.T) {
		h := validHost(ns)
		h.Name = "retired"
		h.Spec.Retire = true
		if err := env.Client.Create(ctx, h); err != nil {
			t.Fatal(err)
		}
		h.Spec.Retire = false
		expectRejected(t, env.Client.Update(ctx, h), "spec", "retire cannot be undone")
	})

	t.Run("a claim cannot pass to another machine", func(t *testing.T) {
		h := validHost(ns)
		h.Name = "claimed"
		h.Spec.Claim = &infrav1.HostClaim{MachineRef: infrav1.MachineReference{Name: "m1", UID: "uid-1"}, ClusterName: "c1"}
		if err := env.Client.Create(ctx, h); err != nil {
			t.Fatal(err)
		}
		if h.Spec.Claim.WipePolicy != infrav1.WipePolicyMetadata {
			t.Errorf("claim wipePolicy defaulted to %q, want metadata", h.Spec.Claim.WipePolicy)
		}
		claimed := h.DeepCopy()
		h.Spec.Claim.MachineRef = infrav1.MachineReference{Name: "m2", UID: "uid-2"}
		expectRejected(t, env.Client.Update(ctx, h), "spec", "release the claim first")
		h = claimed.DeepCopy()
		h.Spec.Claim.MachineRef.Name = "m2"
		expectRejected(t, env.Client.Update(ctx, h), "spec", "cannot pass to another machine or cluster")
		h = claimed.DeepCopy()
		h.Spec.Claim.ClusterName = "c2"
		expectRejected(t, env.Client.Update(ctx, h), "spec", "cannot pass to another machine or cluster")
		h = claimed.DeepCopy()
		h.Spec.Claim.ClusterName = ""
		expectRejected(t, env.Client.Update(ctx, h), "spec", "cannot pass to another machine or cluster")

		// The same machine recreated by clusterctl move (same name and cluster, new UID)
		// adopts its host.
		h = claimed.DeepCopy()
		h.Spec.Claim.MachineRef.UID = "uid-1-moved"
		if err := env.Client.Update(ctx, h); err != nil {
			t.Fatalf("adoption by the moved machine (new UID) rejected: %v", err)
		}

		// Releasing (removing the claim) and claiming afresh is allowed.
		if err := env.Client.Get(ctx, client.ObjectKeyFromObject(h), h); err != nil {
			t.Fatal(err)
		}
		h.Spec.Claim = nil
		if err := env.Client.Update(ctx, h); err != nil {
			t.Fatalf("release rejected: %v", err)
		}
		h.Spec.Claim = &infrav1.HostClaim{MachineRef: infrav1.MachineReference{Name: "m2", UID: "uid-2"}}
		if err := env.Client.Update(ctx, h); err != nil {
			t.Fatalf("new claim rejected: %v", err)
		}
	})
}

func TestMachineValidation(t *testing.T) {
	ctx := context.Background()
	ns := newNamespace(t)
	cases := []struct {
		name   string
		mutate func(*infrav1.AnvilMachine)
		field  string
		hint   string
	}{
		{"checksum without algorithm", func(m *infrav1.AnvilMachine) {
			m.Spec.Image.Checksum = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
		}, "spec.image.checksum", "sha256:<64 lowercase hex digits>"},
		{"md5 is not accepted", func(m *infrav1.AnvilMachine) { m.Spec.Image.Checksum = "md5:098f6bcd4621d373cade4e832627b4f6" },
			"spec.image.checksum", "sha512:<128"},
		{"short sha256", func(m *infrav1.AnvilMachine) { m.Spec.Image.Checksum = "sha256:abcd" },
			"spec.image.checksum", "sha256:<64"},
		{"missing checksum", func(m *infrav1.AnvilMachine) { m.Spec.Image.Checksum = "" },
			"spec.image.checksum", "sha256:<64"},
		{"file:// image", func(m *infrav1.AnvilMachine) { m.Spec.Image.URL = "file:///var/lib/images/os.img" },
			"spec.image.url", "http:// or https://"},
		{"ftp image", func(m *infrav1.AnvilMachine) { m.Spec.Image.URL = "ftp://images.example.com/os.img" },
			"spec.image.url", "file:// and other schemes are refused"},
		{"unknown format", func(m *infrav1.AnvilMachine) { m.Spec.Image.Format = "qcow2" },
			"spec.image.format", `"raw", "gzip", "zstd", "xz"`},
		{"unknown wipe policy", func(m *infrav1.AnvilMachine) { m.Spec.WipePolicy = "shred" },
			"spec.wipePolicy", `"disabled", "metadata", "full", "secure"`},
		{"foreign providerID", func(m *infrav1.AnvilMachine) { m.Spec.ProviderID = ptr.To("metal3://ns/bmh") },
			"spec.providerID", "anvil://<namespace>/<host>"},
		{"negative cores", func(m *infrav1.AnvilMachine) {
			m.Spec.Hardware = &infrav1.HardwareRequirements{MinCPUCores: -1}
		}, "spec.hardware.minCPUCores", "greater than or equal to 0"},
	}
	for i, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			m := validMachine(ns)
			m.Name = fmt.Sprintf("m-%d", i)
			tc.mutate(m)
			expectRejected(t, env.Client.Create(ctx, m), tc.field, tc.hint)
		})
	}

	t.Run("template carries the same rules", func(t *testing.T) {
		tmpl := &infrav1.AnvilMachineTemplate{
			ObjectMeta: metav1.ObjectMeta{Name: "bad-template", Namespace: ns},
			Spec: infrav1.AnvilMachineTemplateSpec{Template: infrav1.AnvilMachineTemplateResource{
				Spec: infrav1.AnvilMachineSpec{Image: infrav1.Image{URL: "file:///x", Checksum: "sha256:abc"}},
			}},
		}
		err := env.Client.Create(ctx, tmpl)
		expectRejected(t, err, "spec.template.spec.image.url", "http:// or https://")
		expectRejected(t, err, "spec.template.spec.image.checksum", "sha256:<64")
	})

	t.Run("providerID is immutable once provisioned", func(t *testing.T) {
		m := validMachine(ns)
		m.Name = "pid"
		m.Spec.ProviderID = ptr.To("anvil://" + ns + "/node01")
		if err := env.Client.Create(ctx, m); err != nil {
			t.Fatal(err)
		}
		if m.Spec.WipePolicy != infrav1.WipePolicyMetadata || m.Spec.Image.Format != infrav1.ImageFormatRaw ||
			m.Spec.Image.Layout != infrav1.ImageLayoutABRoot {
			t.Errorf("defaults not applied: wipePolicy=%q format=%q layout=%q",
				m.Spec.WipePolicy, m.Spec.Image.Format, m.Spec.Image.Layout)
		}
		// Before the machine is provisioned a claim that lost its host may name another.
		m.Spec.ProviderID = ptr.To("anvil://" + ns + "/node02")
		if err := env.Client.Update(ctx, m); err != nil {
			t.Fatalf("changing the providerID of a machine not yet provisioned: %v", err)
		}
		// ... or give it back.
		m.Spec.ProviderID = nil
		if err := env.Client.Update(ctx, m); err != nil {
			t.Fatalf("removing the providerID of a machine not yet provisioned: %v", err)
		}
		m.Spec.ProviderID = ptr.To("anvil://" + ns + "/node02")
		if err := env.Client.Update(ctx, m); err != nil {
			t.Fatal(err)
		}
		m.Status.Initialization.Provisioned = ptr.To(true)
		if err := env.Client.Status().Update(ctx, m); err != nil {
			t.Fatal(err)
		}
		m.Spec.ProviderID = ptr.To("anvil://" + ns + "/node03")
		expectRejected(t, env.Client.Update(ctx, m), "spec.providerID", "cannot change or go once the machine is provisioned")
		m.Spec.ProviderID = nil
		expectRejected(t, env.Client.Update(ctx, m), "spec.providerID", "cannot change or go once the machine is provisioned")
	})
}

func TestClusterAndRemediationValidation(t *testing.T) {
	ctx := context.Background()
	ns := newNamespace(t)

	c := &infrav1.AnvilCluster{ObjectMeta: metav1.ObjectMeta{Name: "c", Namespace: ns}}
	if err := env.Client.Create(ctx, c); err != nil {
		t.Fatal(err)
	}
	if c.Spec.FailureDomainLabel != infrav1.DefaultFailureDomainLabel {
		t.Errorf("failureDomainLabel defaulted to %q", c.Spec.FailureDomainLabel)
	}
	c.Spec.FailureDomainLabel = "example.com/rack"
	expectRejected(t, env.Client.Update(ctx, c), "spec.failureDomainLabel", "cannot change")

	r := &infrav1.AnvilRemediation{ObjectMeta: metav1.ObjectMeta{Name: "r", Namespace: ns},
		Spec: infrav1.AnvilRemediationSpec{RetryLimit: 11}}
	expectRejected(t, env.Client.Create(ctx, r), "spec.retryLimit", "less than or equal to 10")

	r.Spec.RetryLimit = 0
	if err := env.Client.Create(ctx, r); err != nil {
		t.Fatal(err)
	}
	if r.Spec.RetryLimit != 1 || r.Spec.Timeout == nil || r.Spec.Timeout.Minutes() != 10 {
		t.Errorf("remediation defaults: retryLimit=%d timeout=%v", r.Spec.RetryLimit, r.Spec.Timeout)
	}
}

// TestSamplesAccepted applies every documented example in config/samples, so the docs
// cannot drift from the schema.
func TestSamplesAccepted(t *testing.T) {
	ctx := context.Background()
	ns := newNamespace(t)
	files, err := filepath.Glob(filepath.Join("..", "..", "config", "samples", "*.yaml"))
	if err != nil || len(files) == 0 {
		t.Fatalf("no samples found: %v", err)
	}
	kinds := map[string]bool{}
	for _, f := range files {
		for _, u := range readObjects(t, f) {
			u.SetNamespace(ns)
			if err := env.Client.Create(ctx, u, client.FieldValidation("Strict")); err != nil {
				t.Errorf("%s: %s %s rejected: %v", filepath.Base(f), u.GetKind(), u.GetName(), err)
			}
			kinds[u.GetKind()] = true
		}
	}
	for _, k := range []string{"AnvilHost", "AnvilCluster", "AnvilClusterTemplate", "AnvilMachine",
		"AnvilMachineTemplate", "AnvilRemediationTemplate"} {
		if !kinds[k] {
			t.Errorf("config/samples has no %s example", k)
		}
	}
}

// TestCRDsCarryContractLabel checks what Cluster API reads to resolve our kinds.
func TestCRDsCarryContractLabel(t *testing.T) {
	list := &apiextensionsv1.CustomResourceDefinitionList{}
	if err := env.Client.List(context.Background(), list); err != nil {
		t.Fatal(err)
	}
	found := 0
	for _, crd := range list.Items {
		if crd.Spec.Group != infrav1.GroupVersion.Group {
			continue
		}
		found++
		if got := crd.Labels[mgmtplane.ContractLabel]; got != "v1alpha1" {
			t.Errorf("%s: label %s=%q, want v1alpha1", crd.Name, mgmtplane.ContractLabel, got)
		}
		// clusterctl move takes hosts (not part of any cluster's owner graph) because their
		// CRD asks for it; every other kind moves as part of its cluster.
		_, moveHierarchy := crd.Labels["clusterctl.cluster.x-k8s.io/move-hierarchy"]
		if want := crd.Spec.Names.Kind == "AnvilHost"; moveHierarchy != want {
			t.Errorf("%s: clusterctl move-hierarchy label present %v, want %v", crd.Name, moveHierarchy, want)
		}
	}
	if found != 7 {
		t.Errorf("found %d Anvil CRDs, want 7", found)
	}
}

func hostAsUnstructured(t *testing.T, h *infrav1.AnvilHost) *unstructured.Unstructured {
	t.Helper()
	h.SetGroupVersionKind(infrav1.GroupVersion.WithKind("AnvilHost"))
	obj, err := env.Scheme.ConvertToVersion(h, infrav1.GroupVersion)
	if err != nil {
		t.Fatal(err)
	}
	u := &unstructured.Unstructured{}
	if err := env.Scheme.Convert(obj, u, nil); err != nil {
		t.Fatal(err)
	}
	return u
}

func readObjects(t *testing.T, path string) []*unstructured.Unstructured {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	dec := utilyaml.NewYAMLOrJSONDecoder(f, 4096)
	var objs []*unstructured.Unstructured
	for {
		u := &unstructured.Unstructured{}
		if err := dec.Decode(&u.Object); err != nil {
			if errors.Is(err, io.EOF) {
				return objs
			}
			t.Fatalf("%s: %v", path, err)
		}
		if len(u.Object) > 0 {
			objs = append(objs, u)
		}
	}
}
