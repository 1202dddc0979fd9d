// Package clusterctl tests what users install and generate with clusterctl: the release
// (make release-manifests) is laid out as a local clusterctl repository, the real clusterctl
// v1.14.2 (built from its module, hack/clusterctl) reads it offline, and what it prints is
// created on a real API server with Cluster API's and Anvil's CRDs and admission webhooks,
// and, for the ClusterClass flavor, Cluster API's own ClusterClass and topology controllers.
package clusterctl

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"testing"
	"time"

	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/meta"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"sigs.k8s.io/controller-runtime/pkg/client"

	"github.com/anvil-metal/cluster-api-provider-anvil/internal/release"
)

// What the test generates with. The version must be in metadata.yaml's release series.
const (
	releaseVersion    = "v0.1.0"
	kubernetesVersion = "v1.36.3"
	controlPlaneVIP   = "192.0.2.10"
	imageURL          = "https://images.example.com/ubuntu-24.04-k8s-v1.36.3.img.zst"
	imageChecksum     = "sha256:9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
)

// requiredVariables are the variables every flavor needs from the user (documented in
// templates/README.md); everything else has a default.
var requiredVariables = []string{"ANVIL_IMAGE_CHECKSUM", "ANVIL_IMAGE_URL", "CONTROL_PLANE_ENDPOINT_IP", "KUBERNETES_VERSION"}

func repoRoot(t *testing.T) string {
	t.Helper()
	_, file, _, _ := runtime.Caller(0)
	return filepath.Join(filepath.Dir(file), "..", "..")
}

// clusterctl runs the clusterctl binary offline: its own HOME and config, no kubeconfig, no
// version check against GitHub, and only the variables the test gives it.
type clusterctl struct {
	bin, dir, config string
}

func (c clusterctl) run(t *testing.T, env map[string]string, args ...string) string {
	t.Helper()
	args = append(args, "--config", c.config)
	cmd := exec.Command(c.bin, args...)
	cmd.Dir = c.dir
	cmd.Env = []string{"PATH=" + os.Getenv("PATH"), "HOME=" + c.dir, "XDG_CONFIG_HOME=" + filepath.Join(c.dir, "xdg"),
		"KUBECONFIG=" + filepath.Join(c.dir, "no-kubeconfig"), "CLUSTERCTL_DISABLE_VERSIONCHECK=true"}
	for k, v := range env {
		cmd.Env = append(cmd.Env, k+"="+v)
	}
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	start := time.Now()
	if err := cmd.Run(); err != nil {
		t.Fatalf("clusterctl %s: %v\n%s", strings.Join(args, " "), err, stderr.String())
	}
	t.Logf("clusterctl %s (%.1fs)", strings.Join(args[:min(len(args), 2)], " "), time.Since(start).Seconds())
	return stdout.String()
}

// buildClusterctl builds (once, cached in bin/ by version) clusterctl from its module.
func buildClusterctl(t *testing.T, root string) string {
	t.Helper()
	start := time.Now()
	out, err := exec.Command(filepath.Join(root, "hack", "clusterctl", "build.sh")).Output()
	if err != nil {
		var stderr string
		if ee, ok := err.(*exec.ExitError); ok { //nolint:errorlint // only for the message
			stderr = string(ee.Stderr)
		}
		t.Fatalf("building clusterctl: %v\n%s", err, stderr)
	}
	t.Logf("clusterctl ready in %.1fs", time.Since(start).Seconds())
	return strings.TrimSpace(string(out))
}

// setup writes the release as a clusterctl repository (<repo>/infrastructure-anvil/<version>/)
// and a clusterctl.yaml pointing at it.
func setup(t *testing.T) (clusterctl, string) {
	t.Helper()
	root := repoRoot(t)
	bin := buildClusterctl(t, root)
	dir := t.TempDir()
	versionDir := filepath.Join(dir, "repository", release.ProviderLabelValue, releaseVersion)
	if _, err := release.Build(release.Options{Root: root, OutDir: versionDir, Version: releaseVersion,
		Image: release.DefaultImage + ":" + releaseVersion}); err != nil {
		t.Fatal(err)
	}
	config := fmt.Sprintf(`providers:
  - name: anvil
    type: InfrastructureProvider
    url: file://%s
CONTROL_PLANE_ENDPOINT_IP: %q
ANVIL_IMAGE_URL: %q
ANVIL_IMAGE_CHECKSUM: %q
`, filepath.Join(versionDir, release.ComponentsFile), controlPlaneVIP, imageURL, imageChecksum)
	cfgPath := filepath.Join(dir, "clusterctl.yaml")
	if err := os.WriteFile(cfgPath, []byte(config), 0o600); err != nil {
		t.Fatal(err)
	}
	return clusterctl{bin: bin, dir: dir, config: cfgPath}, versionDir
}

func TestClusterctl(t *testing.T) {
	ctl, versionDir := setup(t)
	components, err := os.ReadFile(filepath.Join(versionDir, release.ComponentsFile))
	if err != nil {
		t.Fatal(err)
	}
	env := startManagementPlane(t)

	t.Run("generate provider --describe", func(t *testing.T) {
		out := ctl.run(t, nil, "generate", "provider", "--infrastructure", "anvil", "--describe")
		fields := describeFields(out)
		for k, want := range map[string]string{"Name": "anvil", "Type": "InfrastructureProvider", "Version": releaseVersion,
			"TargetNamespace": "capanvil-system", "File": release.ComponentsFile} {
			if fields[k] != want {
				t.Errorf("%s: %q, want %q\n%s", k, fields[k], want, out)
			}
		}
		// clusterctl lists exactly the variables of the components, and the release image.
		if got, want := describeList(out, "Variables"), release.VariableNames(components); !slices.Equal(got, want) {
			t.Errorf("variables %v, want %v", got, want)
		}
		if got := describeList(out, "Images"); !slices.Equal(got, []string{release.DefaultImage + ":" + releaseVersion}) {
			t.Errorf("images %v, want the release image only", got)
		}
	})

	t.Run("generate provider", func(t *testing.T) {
		for _, c := range []struct {
			name string
			vars map[string]string
		}{
			{"defaults", nil},
			{"proxy DHCP on the provisioning network", map[string]string{"ANVIL_DHCP_MODE": "proxy", "ANVIL_DHCP_INTERFACE": "eno2",
				"ANVIL_PROVISIONING_IP": "192.168.10.2", "ANVIL_BOOT_PUBLIC_URL": "http://192.168.10.2:8081", "ANVIL_BOOT_SERVICE_TYPE": "LoadBalancer"}},
		} {
			t.Run(c.name, func(t *testing.T) {
				out := ctl.run(t, c.vars, "generate", "provider", "--infrastructure", "anvil")
				if strings.Contains(out, "${") {
					t.Fatalf("clusterctl left variables unsubstituted:\n%s", out)
				}
				for k, v := range c.vars {
					if !strings.Contains(out, v) {
						t.Errorf("%s=%s does not reach the components", k, v)
					}
				}
				skipped := env.acceptComponents(t, []byte(out))
				// Only cert-manager's kinds have no CRD here (cert-manager is a clusterctl init
				// prerequisite, not part of this API server).
				for _, gk := range skipped {
					if !strings.HasSuffix(gk, ".cert-manager.io") {
						t.Errorf("%s was not checked: no such kind on the API server", gk)
					}
				}
			})
		}
	})

	templates, err := release.TemplateFiles(repoRoot(t))
	if err != nil {
		t.Fatal(err)
	}
	for _, file := range templates {
		flavor, ok := release.Flavor(file)
		if !ok {
			continue
		}
		name := "default"
		if flavor != "" {
			name = flavor
		}
		t.Run("generate cluster --flavor "+name, func(t *testing.T) {
			args := []string{"generate", "cluster", "c-" + name, "--infrastructure", "anvil:" + releaseVersion,
				"--target-namespace", "ns-" + name}
			if flavor != "" {
				args = append(args, "--flavor", flavor)
			}
			listed := ctl.run(t, nil, append(slices.Clone(args), "--list-variables")...)
			if got := listedRequired(listed); !slices.Equal(got, requiredVariables) {
				t.Errorf("required variables %v, want %v (everything else needs a default)", got, requiredVariables)
			}
			out := ctl.run(t, nil, append(args, "--kubernetes-version", kubernetesVersion,
				"--control-plane-machine-count", "3", "--worker-machine-count", "2")...)
			objs, err := release.ParseObjects([]byte(out))
			if err != nil {
				t.Fatal(err)
			}
			if strings.Contains(out, "${") {
				t.Fatalf("clusterctl left variables unsubstituted:\n%s", out)
			}
			checkFlavor(t, env, name, objs)
		})
	}
}

// describeFields parses "Key:   value" lines of clusterctl's --describe output.
func describeFields(out string) map[string]string {
	m := map[string]string{}
	for _, line := range strings.Split(out, "\n") {
		if k, v, ok := strings.Cut(line, ":"); ok && !strings.HasPrefix(line, " ") {
			m[strings.TrimSpace(k)] = strings.TrimSpace(v)
		}
	}
	return m
}

// describeList returns the "  - item" lines under a heading.
func describeList(out, heading string) []string {
	var items []string
	in := false
	for _, line := range strings.Split(out, "\n") {
		switch {
		case strings.HasPrefix(line, heading+":"):
			in = true
		case in && strings.HasPrefix(line, "  - "):
			items = append(items, strings.TrimSpace(strings.TrimPrefix(line, "  - ")))
		case in:
			in = false
		}
	}
	slices.Sort(items)
	return items
}

func listedRequired(out string) []string {
	var req []string
	for _, v := range describeList(out, "Required Variables") {
		req = append(req, strings.Fields(v)[0])
	}
	return req
}

// createAll creates objects in order, failing on the first one the API server (schemas,
// CEL rules, admission webhooks) refuses.
func createAll(ctx context.Context, t *testing.T, c client.Client, objs []*unstructured.Unstructured) {
	t.Helper()
	for _, o := range objs {
		if err := c.Create(ctx, o.DeepCopy()); err != nil {
			t.Fatalf("%s %s/%s refused: %v", o.GetKind(), o.GetNamespace(), o.GetName(), err)
		}
	}
}

// dryRunCreate asks the API server to validate objects without keeping them; an object that
// exists already is validated as an update instead. It returns the group-kinds the server
// does not serve, which were not checked.
func dryRunCreate(ctx context.Context, t *testing.T, c client.Client, objs []*unstructured.Unstructured) []string {
	t.Helper()
	var skipped []string
	for _, o := range objs {
		o = o.DeepCopy()
		err := c.Create(ctx, o, client.DryRunAll)
		if meta.IsNoMatchError(err) {
			skipped = append(skipped, o.GroupVersionKind().GroupKind().String())
			continue
		}
		if apierrors.IsAlreadyExists(err) {
			cur := &unstructured.Unstructured{}
			cur.SetGroupVersionKind(o.GroupVersionKind())
			if err = c.Get(ctx, client.ObjectKeyFromObject(o), cur); err == nil {
				o.SetResourceVersion(cur.GetResourceVersion())
				err = c.Update(ctx, o, client.DryRunAll)
			}
		}
		if err != nil {
			t.Errorf("%s %s/%s refused: %v", o.GetKind(), o.GetNamespace(), o.GetName(), err)
		}
	}
	return skipped
}
