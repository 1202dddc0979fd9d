// Package release renders what clusterctl downloads for the Anvil provider: the
// infrastructure-components.yaml built from config/default, metadata.yaml and the cluster
// templates, laid out as one version of a clusterctl provider repository. It also checks
// them against the clusterctl provider contract, so a broken kustomization or template fails
// the build rather than a user's `clusterctl init`.
package release

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"strings"

	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime"
	clientgoscheme "k8s.io/client-go/kubernetes/scheme"
	"sigs.k8s.io/kustomize/api/krusty"
	kustomizetypes "sigs.k8s.io/kustomize/api/types"
	"sigs.k8s.io/kustomize/kyaml/filesys"
)

// Names fixed by the clusterctl provider contract and by config/.
const (
	// ProviderLabelValue is the value of cluster.x-k8s.io/provider on every object we ship,
	// and the name of the provider's folder in a local clusterctl repository.
	ProviderLabelValue = "infrastructure-anvil"
	// ProviderLabel is the label clusterctl uses to find a provider's objects.
	ProviderLabel = "cluster.x-k8s.io/provider"
	// ContractLabel is the label on each CRD that lists the API versions speaking the
	// Cluster API v1beta2 contract.
	ContractLabel = "cluster.x-k8s.io/v1beta2"
	// ComponentsFile is the file clusterctl init applies.
	ComponentsFile = "infrastructure-components.yaml"
	// MetadataFile maps release series to contracts.
	MetadataFile = "metadata.yaml"
	// ManagerContainer is the container clusterctl and Tilt look for in the Deployment.
	ManagerContainer = "manager"
	// DefaultImage is the image config/manager names; releases replace it.
	DefaultImage = "ghcr.io/anvil-metal/cluster-api-provider-anvil"
)

// Options say what to build and where.
type Options struct {
	// Root is the repository root (config/, templates/, metadata.yaml).
	Root string
	// OutDir receives the files; it is created if needed.
	OutDir string
	// Version is the release version (vMAJOR.MINOR.PATCH); metadata.yaml must cover it.
	Version string
	// Image is the manager image reference written into the Deployment, e.g.
	// ghcr.io/anvil-metal/cluster-api-provider-anvil:v0.1.0. Empty keeps config/'s image.
	Image string
}

// Build renders config/default (with the image replaced), checks it, and writes it with
// metadata.yaml and every template into o.OutDir. It returns the names of the files written.
func Build(o Options) ([]string, error) {
	if o.Root == "" || o.OutDir == "" {
		return nil, errors.New("release: Root and OutDir are required")
	}
	components, err := Components(o.Root, o.Image)
	if err != nil {
		return nil, err
	}
	if _, err := CheckComponents(components); err != nil {
		return nil, err
	}
	metadata, err := os.ReadFile(filepath.Join(o.Root, MetadataFile))
	if err != nil {
		return nil, err
	}
	if o.Version != "" {
		if err := CheckMetadataCovers(metadata, o.Version); err != nil {
			return nil, err
		}
	}
	templates, err := TemplateFiles(o.Root)
	if err != nil {
		return nil, err
	}
	if err := os.MkdirAll(o.OutDir, 0o755); err != nil { //nolint:gosec // release files are public
		return nil, err
	}
	files := map[string][]byte{ComponentsFile: components, MetadataFile: metadata}
	for _, t := range templates {
		b, err := os.ReadFile(t)
		if err != nil {
			return nil, err
		}
		if err := CheckTemplate(filepath.Base(t), b); err != nil {
			return nil, err
		}
		files[filepath.Base(t)] = b
	}
	names := make([]string, 0, len(files))
	for name, b := range files {
		if err := os.WriteFile(filepath.Join(o.OutDir, name), b, 0o644); err != nil { //nolint:gosec // release files are public
			return nil, err
		}
		names = append(names, name)
	}
	sort.Strings(names)
	return names, nil
}

// TemplateFiles lists the files clusterctl serves as flavors and ClusterClasses:
// templates/cluster-template*.yaml and templates/clusterclass-*.yaml.
func TemplateFiles(root string) ([]string, error) {
	var out []string
	for _, pattern := range []string{"cluster-template*.yaml", "clusterclass-*.yaml"} {
		m, err := filepath.Glob(filepath.Join(root, "templates", pattern))
		if err != nil {
			return nil, err
		}
		out = append(out, m...)
	}
	if len(out) == 0 {
		return nil, fmt.Errorf("release: no templates in %s", filepath.Join(root, "templates"))
	}
	sort.Strings(out)
	return out, nil
}

// Flavor returns the clusterctl flavor name of a template file ("" for the default
// cluster-template.yaml), and false for files that are not flavors.
func Flavor(file string) (string, bool) {
	base := filepath.Base(file)
	if base == "cluster-template.yaml" {
		return "", true
	}
	if f, ok := strings.CutPrefix(base, "cluster-template-"); ok && strings.HasSuffix(f, ".yaml") {
		return strings.TrimSuffix(f, ".yaml"), true
	}
	return "", false
}

// Components renders config/default with kustomize, replacing the manager image when image
// is set (through kustomize's own image transformer, in a throwaway overlay).
func Components(root, image string) ([]byte, error) {
	base, err := filepath.Abs(filepath.Join(root, "config", "default"))
	if err != nil {
		return nil, err
	}
	dir := base
	opts := krusty.MakeDefaultOptions()
	if image != "" {
		name, tag, digest, err := splitImage(image)
		if err != nil {
			return nil, err
		}
		overlay, err := os.MkdirTemp("", "anvil-release-")
		if err != nil {
			return nil, err
		}
		defer func() { _ = os.RemoveAll(overlay) }()
		// kustomize takes only relative resource paths.
		rel, err := filepath.Rel(overlay, base)
		if err != nil {
			return nil, err
		}
		k := fmt.Sprintf("apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\nresources:\n  - %q\nimages:\n  - name: %s\n    newName: %s\n",
			rel, DefaultImage, name)
		if digest != "" {
			k += fmt.Sprintf("    digest: %s\n", digest)
		} else {
			k += fmt.Sprintf("    newTag: %q\n", tag)
		}
		if err := os.WriteFile(filepath.Join(overlay, "kustomization.yaml"), []byte(k), 0o600); err != nil {
			return nil, err
		}
		dir = overlay
		// The overlay lives outside the repository and points back into it.
		opts.LoadRestrictions = kustomizetypes.LoadRestrictionsNone
	}
	m, err := krusty.MakeKustomizer(opts).Run(filesys.MakeFsOnDisk(), dir)
	if err != nil {
		return nil, fmt.Errorf("kustomize build %s: %w", base, err)
	}
	return m.AsYaml()
}

// splitImage splits name[:tag][@digest]; a reference needs a tag or a digest.
func splitImage(ref string) (name, tag, digest string, err error) {
	name = ref
	if i := strings.Index(name, "@"); i >= 0 {
		name, digest = name[:i], name[i+1:]
	}
	if i := strings.LastIndex(name, ":"); i > strings.LastIndex(name, "/") {
		name, tag = name[:i], name[i+1:]
	}
	if name == "" || (tag == "" && digest == "") || strings.Contains(ref, "$") {
		return "", "", "", fmt.Errorf("release: image %q must be NAME:TAG or NAME@DIGEST, without variables", ref)
	}
	return name, tag, digest, nil
}

// CheckMetadataCovers fails unless metadata.yaml has a release series for version's
// major.minor: clusterctl refuses versions it cannot map to a contract.
func CheckMetadataCovers(metadata []byte, version string) error {
	var major, minor, patch int
	if _, err := fmt.Sscanf(version, "v%d.%d.%d", &major, &minor, &patch); err != nil {
		return fmt.Errorf("release: version %q is not vMAJOR.MINOR.PATCH", version)
	}
	objs, err := ParseObjects(metadata)
	if err != nil || len(objs) != 1 {
		return fmt.Errorf("release: %s: want one Metadata object (%w)", MetadataFile, err)
	}
	series := unstructuredSlice(objs[0].Object, "releaseSeries")
	for _, s := range series {
		m, ok := s.(map[string]any)
		if !ok {
			continue
		}
		if toInt(m["major"]) == major && toInt(m["minor"]) == minor {
			if m["contract"] != "v1beta2" {
				return fmt.Errorf("release: %s maps v%d.%d to contract %v, want v1beta2", MetadataFile, major, minor, m["contract"])
			}
			return nil
		}
	}
	return fmt.Errorf("release: %s has no releaseSeries entry for v%d.%d; add one before releasing %s", MetadataFile, major, minor, version)
}

func toInt(v any) int {
	switch n := v.(type) {
	case int64:
		return int(n)
	case float64:
		return int(n)
	case int:
		return n
	}
	return -1
}

// CheckTemplate checks one template file: it parses as YAML objects once its variables are
// filled in, and every variable is written ${NAME} or ${NAME:=default}.
func CheckTemplate(name string, b []byte) error {
	if bad := MalformedVariables(b); len(bad) > 0 {
		return fmt.Errorf("release: %s: variables must be ${NAME} or ${NAME:=default}: %s", name, strings.Join(bad, ", "))
	}
	values := map[string]string{}
	for _, v := range Variables(b) {
		values[v.Name] = "1" // any scalar: only the YAML structure is checked here
	}
	filled, err := Substitute(b, values)
	if err != nil {
		return fmt.Errorf("release: %s: %w", name, err)
	}
	if _, err := ParseObjects(filled); err != nil {
		return fmt.Errorf("release: %s: %w", name, err)
	}
	return nil
}

// Report describes a checked infrastructure-components.yaml.
type Report struct {
	Namespace string
	Image     string
	Kinds     map[string]int
	Variables []Variable
}

// CheckComponents checks infrastructure-components.yaml against the clusterctl provider
// contract and our own rules, reporting every problem at once:
//   - exactly one Namespace, and every namespaced object in it;
//   - every object labelled cluster.x-k8s.io/provider=infrastructure-anvil;
//   - one Deployment with a container named manager;
//   - images without variables (clusterctl's image overrides need literal names);
//   - every CRD labelled with the v1beta2 contract, listing exactly its served versions;
//   - every variable has a default, so `clusterctl init` works with no settings.
func CheckComponents(components []byte) (Report, error) {
	var rep Report
	var problems []string
	fail := func(format string, a ...any) { problems = append(problems, fmt.Sprintf(format, a...)) }
	if bad := MalformedVariables(components); len(bad) > 0 {
		fail("variables must be ${NAME:=default}: %s", strings.Join(bad, ", "))
	}
	// clusterctl decodes built-in kinds into their Go types before it substitutes variables
	// (image overrides, --describe), so a variable in a bool or int field breaks it.
	raw, err := ParseObjects(components)
	if err != nil {
		return rep, err
	}
	for _, o := range raw {
		if err := decodeTyped(o); err != nil {
			fail("%s %s does not decode before variable substitution (variables may only be in string fields): %v", o.GetKind(), o.GetName(), err)
		}
		for _, img := range images(o.Object) {
			if strings.Contains(img, "$") {
				fail("%s %s: image %q contains a variable", o.GetKind(), o.GetName(), img)
			}
		}
	}
	rep.Variables = Variables(components)
	placeholders := map[string]string{}
	for _, v := range rep.Variables {
		if !v.HasDefault {
			fail("variable %s has no default; write ${%s:=<default>} so clusterctl init needs no settings", v.Name, v.Name)
			placeholders[v.Name] = "unset"
		}
	}
	// Fill variables with their defaults before parsing, as clusterctl does.
	filled, err := Substitute(components, placeholders)
	if err != nil {
		return rep, err
	}
	objs, err := ParseObjects(filled)
	if err != nil {
		return rep, err
	}
	rep.Kinds = map[string]int{}
	var namespaces, deployments []string
	for _, o := range objs {
		kind, name := o.GetKind(), o.GetName()
		rep.Kinds[kind]++
		if o.GetLabels()[ProviderLabel] != ProviderLabelValue {
			fail("%s %s: label %s=%s missing", kind, name, ProviderLabel, ProviderLabelValue)
		}
		switch kind {
		case "Namespace":
			namespaces = append(namespaces, name)
		case "Deployment":
			deployments = append(deployments, name)
		case "CustomResourceDefinition":
			checkCRD(o.Object, name, fail)
		}
	}
	if len(namespaces) != 1 {
		fail("want exactly one Namespace, found %d %v", len(namespaces), namespaces)
	} else {
		rep.Namespace = namespaces[0]
		for _, o := range objs {
			if ns := o.GetNamespace(); ns != "" && ns != rep.Namespace {
				fail("%s %s is in namespace %s, not %s", o.GetKind(), o.GetName(), ns, rep.Namespace)
			}
		}
	}
	if len(deployments) != 1 {
		fail("want exactly one Deployment, found %v", deployments)
	}
	for _, o := range objs {
		if o.GetKind() != "Deployment" {
			continue
		}
		containers := unstructuredSlice(o.Object, "spec", "template", "spec", "containers")
		found := false
		for _, c := range containers {
			if m, ok := c.(map[string]any); ok && m["name"] == ManagerContainer {
				found = true
				rep.Image, _ = m["image"].(string)
			}
		}
		if !found {
			fail("Deployment %s has no container named %q", o.GetName(), ManagerContainer)
		}
	}
	if len(problems) > 0 {
		return rep, fmt.Errorf("release: %s breaks the clusterctl contract:\n  %s", ComponentsFile, strings.Join(problems, "\n  "))
	}
	return rep, nil
}

// decodeTyped converts an object of a built-in kind to its Go type, as clusterctl does.
func decodeTyped(o *unstructured.Unstructured) error {
	typed, err := clientgoscheme.Scheme.New(o.GroupVersionKind())
	if err != nil {
		return nil //nolint:nilerr // not a built-in kind: clusterctl keeps it unstructured
	}
	return runtime.DefaultUnstructuredConverter.FromUnstructured(o.Object, typed)
}

func checkCRD(obj map[string]any, name string, fail func(string, ...any)) {
	versions := unstructuredSlice(obj, "spec", "versions")
	var served []string
	for _, v := range versions {
		if m, ok := v.(map[string]any); ok && m["served"] == true {
			served = append(served, fmt.Sprint(m["name"]))
		}
	}
	labels, _ := obj["metadata"].(map[string]any)["labels"].(map[string]any)
	got, _ := labels[ContractLabel].(string)
	if got == "" {
		fail("CRD %s: label %s missing (Cluster API refuses CRDs without it)", name, ContractLabel)
		return
	}
	gotVersions := strings.Split(got, "_")
	slices.Sort(gotVersions)
	slices.Sort(served)
	if !slices.Equal(gotVersions, served) {
		fail("CRD %s: label %s=%s, but the served versions are %v", name, ContractLabel, got, served)
	}
}

// images returns every container and initContainer image in a workload object.
func images(obj map[string]any) []string {
	var out []string
	for _, field := range []string{"containers", "initContainers"} {
		cs := unstructuredSlice(obj, "spec", "template", "spec", field)
		for _, c := range cs {
			if m, ok := c.(map[string]any); ok {
				if img, ok := m["image"].(string); ok {
					out = append(out, img)
				}
			}
		}
	}
	return out
}

func unstructuredSlice(obj map[string]any, path ...string) []any {
	var cur any = obj
	for _, p := range path {
		m, ok := cur.(map[string]any)
		if !ok {
			return nil
		}
		cur = m[p]
	}
	s, _ := cur.([]any)
	return s
}
