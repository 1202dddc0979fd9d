package release

import (
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
)

func repoRoot(t *testing.T) string {
	t.Helper()
	_, file, _, _ := runtime.Caller(0)
	return filepath.Join(filepath.Dir(file), "..", "..")
}

// The real config/ renders into components that pass every contract check, with the image
// replaced by kustomize and nothing else touched.
func TestComponentsFromConfigPassTheContract(t *testing.T) {
	components, err := Components(repoRoot(t), "registry.example.com/anvil/manager:v9.8.7")
	if err != nil {
		t.Fatal(err)
	}
	rep, err := CheckComponents(components)
	if err != nil {
		t.Fatal(err)
	}
	if rep.Namespace != "capanvil-system" {
		t.Errorf("namespace %q, want capanvil-system", rep.Namespace)
	}
	if rep.Image != "registry.example.com/anvil/manager:v9.8.7" {
		t.Errorf("manager image %q, want the release image", rep.Image)
	}
	if rep.Kinds["CustomResourceDefinition"] != 7 {
		t.Errorf("%d CRDs, want 7 (every Anvil kind)", rep.Kinds["CustomResourceDefinition"])
	}
	// The boot-network settings are clusterctl variables with defaults.
	want := map[string]string{"ANVIL_DHCP_MODE": "off", "ANVIL_DHCP_INTERFACE": "none", "ANVIL_PROVISIONING_IP": "auto",
		"ANVIL_BOOT_PUBLIC_URL": "auto", "ANVIL_BOOT_HTTP_ADDRESS": ":8081", "ANVIL_BOOT_SERVICE_TYPE": "ClusterIP"}
	got := map[string]string{}
	for _, v := range rep.Variables {
		got[v.Name] = v.Default
	}
	for name, def := range want {
		if got[name] != def {
			t.Errorf("variable %s: default %q, want %q", name, got[name], def)
		}
	}
	digest, err := Components(repoRoot(t), "registry.example.com/anvil/manager@sha256:"+strings.Repeat("a", 64))
	if err != nil {
		t.Fatal(err)
	}
	if rep, err := CheckComponents(digest); err != nil || !strings.HasSuffix(rep.Image, "@sha256:"+strings.Repeat("a", 64)) {
		t.Errorf("digest reference: image %q, err %v", rep.Image, err)
	}
}

const okComponents = `apiVersion: v1
kind: Namespace
metadata:
  name: capanvil-system
  labels: {cluster.x-k8s.io/provider: infrastructure-anvil}
---
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata:
  name: anvilhosts.infrastructure.cluster.x-k8s.io
  labels: {cluster.x-k8s.io/provider: infrastructure-anvil, cluster.x-k8s.io/v1beta2: v1alpha1}
spec:
  versions: [{name: v1alpha1, served: true}, {name: v1alpha0, served: false}]
---
apiVersion: apps/v1
kind: Deployment
metadata:
  name: capanvil-controller-manager
  namespace: capanvil-system
  labels: {cluster.x-k8s.io/provider: infrastructure-anvil}
spec:
  template:
    spec:
      containers:
        - name: manager
          image: ghcr.io/anvil-metal/cluster-api-provider-anvil:v0.1.0
          args: ["--dhcp-mode=${ANVIL_DHCP_MODE:=off}"]
`

// Each broken rule is reported, naming the object and the fix.
func TestCheckComponentsRefusesContractBreaks(t *testing.T) {
	if _, err := CheckComponents([]byte(okComponents)); err != nil {
		t.Fatalf("the valid sample was refused: %v", err)
	}
	cases := []struct {
		name, from, to, want string
	}{
		{"second namespace", "---\napiVersion: apps/v1", "---\napiVersion: v1\nkind: Namespace\nmetadata: {name: other, labels: {cluster.x-k8s.io/provider: infrastructure-anvil}}\n---\napiVersion: apps/v1",
			"want exactly one Namespace"},
		{"container renamed", "- name: manager", "- name: controller", `no container named "manager"`},
		{"variable in image", "provider-anvil:v0.1.0", "provider-anvil:${TAG:=dev}", "contains a variable"},
		{"no contract label", ", cluster.x-k8s.io/v1beta2: v1alpha1", "", "label cluster.x-k8s.io/v1beta2 missing"},
		{"contract label lists an unserved version", "cluster.x-k8s.io/v1beta2: v1alpha1", "cluster.x-k8s.io/v1beta2: v1alpha0_v1alpha1", "served versions are [v1alpha1]"},
		{"variable without default", "${ANVIL_DHCP_MODE:=off}", "${ANVIL_DHCP_MODE}", "ANVIL_DHCP_MODE has no default"},
		{"empty default", "${ANVIL_DHCP_MODE:=off}", "${ANVIL_DHCP_MODE:=}", "empty default"},
		{"variable in a bool field", "      containers:", "      hostNetwork: ${ANVIL_HOST_NETWORK:=false}\n      containers:", "variables may only be in string fields"},
		{"provider label missing", "  name: capanvil-controller-manager\n  namespace: capanvil-system\n  labels: {cluster.x-k8s.io/provider: infrastructure-anvil}",
			"  name: capanvil-controller-manager\n  namespace: capanvil-system", "Deployment capanvil-controller-manager: label cluster.x-k8s.io/provider"},
		{"object in another namespace", "  namespace: capanvil-system\n  labels: {cluster.x-k8s.io/provider: infrastructure-anvil}\nspec:\n  template",
			"  namespace: kube-system\n  labels: {cluster.x-k8s.io/provider: infrastructure-anvil}\nspec:\n  template", "is in namespace kube-system"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			if !strings.Contains(okComponents, c.from) {
				t.Fatalf("test case does not apply: %q not in the sample", c.from)
			}
			_, err := CheckComponents([]byte(strings.Replace(okComponents, c.from, c.to, 1)))
			if err == nil || !strings.Contains(err.Error(), c.want) {
				t.Fatalf("error %v, want one containing %q", err, c.want)
			}
		})
	}
}

func TestVariables(t *testing.T) {
	in := []byte(`a: ${A}
b: ${B:=x:y}
c: ${A:=late}
d: "$$HOME ${C:=1}"
e: $shell $(cmd) ${lower}`)
	got := Variables(in)
	want := []Variable{{Name: "A", Default: "late", HasDefault: true}, {Name: "B", Default: "x:y", HasDefault: true}, {Name: "C", Default: "1", HasDefault: true}}
	if len(got) != len(want) {
		t.Fatalf("got %+v, want %+v", got, want)
	}
	for i := range want {
		if got[i] != want[i] {
			t.Errorf("variable %d: got %+v, want %+v", i, got[i], want[i])
		}
	}
	if bad := MalformedVariables(in); len(bad) != 1 || bad[0] != "${lower}" {
		t.Errorf("malformed: %q, want only ${lower} ($NAME and $(cmd) are left alone by envsubst)", bad)
	}
	out, err := Substitute([]byte(`x: ${A} ${B:=d} $$HOME $iface`), map[string]string{"A": "1"})
	if err != nil || string(out) != "x: 1 d $HOME $iface" {
		t.Errorf("substitute: %q, %v", out, err)
	}
	if _, err := Substitute([]byte(`${NEEDED}`), nil); err == nil || !strings.Contains(err.Error(), "NEEDED") {
		t.Errorf("missing variable: %v, want an error naming NEEDED", err)
	}
}

func TestMetadataCoversVersion(t *testing.T) {
	md, err := os.ReadFile(filepath.Join(repoRoot(t), MetadataFile))
	if err != nil {
		t.Fatal(err)
	}
	if err := CheckMetadataCovers(md, "v0.1.3"); err != nil {
		t.Errorf("v0.1.3: %v", err)
	}
	if err := CheckMetadataCovers(md, "v0.2.0"); err == nil || !strings.Contains(err.Error(), "no releaseSeries entry for v0.2") {
		t.Errorf("v0.2.0: %v, want a missing release series", err)
	}
	if err := CheckMetadataCovers(md, "latest"); err == nil {
		t.Error("a version that is not vX.Y.Z was accepted")
	}
}

// make release-manifests writes what a clusterctl provider repository holds for one version.
func TestBuildWritesTheRepositoryLayout(t *testing.T) {
	out := t.TempDir()
	files, err := Build(Options{Root: repoRoot(t), OutDir: out, Version: "v0.1.0", Image: DefaultImage + ":v0.1.0"})
	if err != nil {
		t.Fatal(err)
	}
	want := []string{"cluster-template-production.yaml", "cluster-template-topology.yaml", "cluster-template.yaml",
		"clusterclass-anvil.yaml", ComponentsFile, MetadataFile}
	if strings.Join(files, ",") != strings.Join(want, ",") {
		t.Fatalf("files %v, want %v", files, want)
	}
	for _, f := range files {
		if st, err := os.Stat(filepath.Join(out, f)); err != nil || st.Size() == 0 {
			t.Errorf("%s: %v", f, err)
		}
	}
	for _, f := range []string{"cluster-template.yaml", "cluster-template-production.yaml"} {
		if flavor, ok := Flavor(f); !ok || (f == "cluster-template.yaml") != (flavor == "") {
			t.Errorf("Flavor(%s) = %q, %v", f, flavor, ok)
		}
	}
	if _, ok := Flavor("clusterclass-anvil.yaml"); ok {
		t.Error("a ClusterClass file counted as a flavor")
	}
	if _, err := Build(Options{Root: repoRoot(t), OutDir: out, Version: "v0.1.0", Image: "no-tag"}); err == nil {
		t.Error("an image without tag or digest was accepted")
	}
}
