package release

import (
	"encoding/json"
	"go/build"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// tiltProvider is the shape Cluster API's Tiltfile and tilt-prepare read from a provider's
// tilt-provider.json (load_provider_tilt_files, tiltProviderConfig).
type tiltProvider struct {
	Name   string `json:"name"`
	Config struct {
		Image            string   `json:"image"`
		LiveReloadDeps   []string `json:"live_reload_deps"`
		Label            string   `json:"label"`
		GoMain           string   `json:"go_main"`
		Context          string   `json:"context"`
		KustomizeFolder  string   `json:"kustomize_folder"`
		KustomizeOptions []string `json:"kustomize_options"`
	} `json:"config"`
}

// Tilt builds our image under tilt-provider.json's image name and swaps it into what
// kustomize renders from config/default; if the names differ, Tilt deploys the released
// image instead of the developer's build. It also finds the Deployment and Namespace by the
// provider label and the container by name.
func TestTiltProviderMatchesConfig(t *testing.T) {
	root := repoRoot(t)
	raw, err := os.ReadFile(filepath.Join(root, "tilt-provider.json"))
	if err != nil {
		t.Fatal(err)
	}
	var p tiltProvider
	dec := json.NewDecoder(strings.NewReader(string(raw)))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&p); err != nil {
		t.Fatalf("tilt-provider.json: %v (fields the Tiltfile reads: name, config.{image, live_reload_deps, label, go_main, context, kustomize_folder, kustomize_options})", err)
	}
	if p.Name != "anvil" || p.Config.Label == "" {
		t.Errorf("name %q label %q: want name anvil (the clusterctl provider name) and a label", p.Name, p.Config.Label)
	}

	kustomizeDir := filepath.Join(root, p.Config.Context, "config", "default")
	if p.Config.KustomizeFolder != "" {
		kustomizeDir = filepath.Join(root, p.Config.Context, p.Config.KustomizeFolder)
	}
	rendered, err := Components(filepath.Dir(filepath.Dir(kustomizeDir)), "")
	if err != nil {
		t.Fatal(err)
	}
	rep, err := CheckComponents(rendered)
	if err != nil {
		t.Fatal(err)
	}
	name := rep.Image
	if i := strings.LastIndex(name, ":"); i > strings.LastIndex(name, "/") {
		name = name[:i]
	}
	if name != p.Config.Image {
		t.Errorf("tilt-provider.json image %q, but config/default deploys %q: Tilt would not substitute its build", p.Config.Image, rep.Image)
	}

	// go_main is what Tilt passes to `go build` in the context directory.
	main := strings.TrimPrefix(p.Config.GoMain, "./")
	pkg, err := build.ImportDir(filepath.Join(root, p.Config.Context, main), 0)
	if err != nil || pkg.Name != "main" {
		t.Errorf("go_main %q is not a main package: %v", p.Config.GoMain, err)
	}
	for _, dep := range p.Config.LiveReloadDeps {
		if _, err := os.Stat(filepath.Join(root, p.Config.Context, dep)); err != nil {
			t.Errorf("live_reload_deps %q: %v", dep, err)
		}
	}
	for _, dep := range []string{"go.mod", "api", "cmd/manager", "controllers", "internal"} {
		found := false
		for _, d := range p.Config.LiveReloadDeps {
			found = found || d == dep
		}
		if !found {
			t.Errorf("live_reload_deps lacks %q: edits there would not rebuild the manager", dep)
		}
	}
}
