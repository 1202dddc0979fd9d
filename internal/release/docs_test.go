package release

import (
	"os"
	"path/filepath"
	"regexp"
	"sort"
	"strings"
	"testing"
)

func read(t *testing.T, parts ...string) string {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(append([]string{repoRoot(t)}, parts...)...))
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

// Every value a user may change is documented: installation variables in
// docs/real-hardware.md, template variables and ClusterClass variables in templates/README.md,
// each with the default the files really use.
func TestEveryVariableIsDocumented(t *testing.T) {
	components, err := Components(repoRoot(t), "")
	if err != nil {
		t.Fatal(err)
	}
	hardware := read(t, "docs", "real-hardware.md")
	for _, v := range Variables(components) {
		row := regexp.MustCompile("(?m)^\\| `" + v.Name + "` \\| `" + regexp.QuoteMeta(v.Default) + "` \\|")
		if !row.MatchString(hardware) {
			t.Errorf("docs/real-hardware.md has no row | `%s` | `%s` | for the installation variable", v.Name, v.Default)
		}
	}
	readme := read(t, "templates", "README.md")
	files, err := TemplateFiles(repoRoot(t))
	if err != nil {
		t.Fatal(err)
	}
	standard := map[string]bool{"CLUSTER_NAME": true, "NAMESPACE": true, "KUBERNETES_VERSION": true,
		"CONTROL_PLANE_MACHINE_COUNT": true, "WORKER_MACHINE_COUNT": true}
	for _, f := range files {
		b, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		for _, v := range Variables(b) {
			if standard[v.Name] {
				if !strings.Contains(readme, "`"+v.Name+"`") {
					t.Errorf("templates/README.md does not mention %s", v.Name)
				}
				continue
			}
			want := "`" + v.Default + "`"
			if !v.HasDefault {
				want = "\\*\\*required\\*\\*"
			} else {
				want = regexp.QuoteMeta(want)
			}
			if !regexp.MustCompile("(?m)^\\| `" + v.Name + "` \\| " + want + " \\|").MatchString(readme) {
				t.Errorf("%s: templates/README.md has no row | `%s` | %s |", filepath.Base(f), v.Name, want)
			}
		}
		if filepath.Base(f) == "clusterclass-anvil.yaml" {
			objs, err := ParseObjects(b)
			if err != nil {
				t.Fatal(err)
			}
			vars := unstructuredSlice(objs[0].Object, "spec", "variables")
			for _, v := range vars {
				name := v.(map[string]any)["name"].(string)
				if !regexp.MustCompile("(?m)^\\| `" + name + "` \\|").MatchString(readme) {
					t.Errorf("templates/README.md has no row for ClusterClass variable %s", name)
				}
			}
		}
	}
}

// Every condition reason the controllers set has an entry in docs/troubleshooting.md.
func TestEveryConditionReasonIsInTroubleshooting(t *testing.T) {
	doc := read(t, "docs", "troubleshooting.md")
	patterns := []*regexp.Regexp{
		regexp.MustCompile(`Reason:\s*"([A-Z][A-Za-z]+)"`),
		regexp.MustCompile(`recordError\("([A-Z][A-Za-z]+)"`),
		regexp.MustCompile(`setCondition\([^,]+,[^,]+,[^,]+,\s*"([A-Z][A-Za-z]+)"`),
		regexp.MustCompile(`return "(BMC[A-Za-z]+)"`),
		regexp.MustCompile(`(?m)^\s*reason[A-Z][A-Za-z]*\s*=\s*"([A-Z][A-Za-z]+)"`), // named reason constants
	}
	reasons := map[string]string{}
	for _, dir := range []string{"controllers", "internal/hoststate", "internal/bmc"} {
		files, _ := filepath.Glob(filepath.Join(repoRoot(t), dir, "*.go"))
		for _, f := range files {
			if strings.HasSuffix(f, "_test.go") {
				continue
			}
			b, err := os.ReadFile(f)
			if err != nil {
				t.Fatal(err)
			}
			for _, re := range patterns {
				for _, m := range re.FindAllStringSubmatch(string(b), -1) {
					reasons[m[1]] = filepath.Join(dir, filepath.Base(f))
				}
			}
		}
	}
	if len(reasons) < 20 {
		t.Fatalf("found only %d condition reasons in the sources: the patterns no longer match the code", len(reasons))
	}
	var missing []string
	for r, where := range reasons {
		// Events (Rebooted, PowerChanged) and the positive Ready reason are covered in prose.
		if !strings.Contains(doc, "`"+r+"`") {
			missing = append(missing, r+" ("+where+")")
		}
	}
	sort.Strings(missing)
	if len(missing) > 0 {
		t.Errorf("docs/troubleshooting.md has no entry for: %s", strings.Join(missing, ", "))
	}
}
