package release

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"regexp"
	"sort"
	"strings"

	"github.com/drone/envsubst/v2"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	utilyaml "k8s.io/apimachinery/pkg/util/yaml"
)

// Variable is one clusterctl variable in a manifest.
type Variable struct {
	Name string
	// Default is the text after ":=", when HasDefault.
	Default    string
	HasDefault bool
}

// variableRE matches the two forms we write: ${NAME} and ${NAME:=default}.
var variableRE = regexp.MustCompile(`\$\{([A-Z][A-Z0-9_]*)(:=([^}]*))?\}`)

// anyVariableRE matches anything clusterctl's envsubst would treat as a variable. Only the
// braced form counts: envsubst leaves $NAME and $(command) alone, so shell in templates can
// use them as they are.
var anyVariableRE = regexp.MustCompile(`\$\{[^}]*\}`)

// Variables returns the variables of a manifest in order of first appearance. A variable
// written both with and without a default counts as having one (clusterctl uses the first
// default it finds).
func Variables(b []byte) []Variable {
	seen := map[string]int{}
	var out []Variable
	for _, m := range variableRE.FindAllSubmatch(b, -1) {
		name := string(m[1])
		hasDefault := len(m[2]) > 0
		if i, ok := seen[name]; ok {
			if hasDefault && !out[i].HasDefault {
				out[i].Default, out[i].HasDefault = string(m[3]), true
			}
			continue
		}
		seen[name] = len(out)
		out = append(out, Variable{Name: name, Default: string(m[3]), HasDefault: hasDefault})
	}
	return out
}

// VariableNames returns the sorted names of the variables of a manifest.
func VariableNames(b []byte) []string {
	var out []string
	for _, v := range Variables(b) {
		out = append(out, v.Name)
	}
	sort.Strings(out)
	return out
}

// MalformedVariables returns what clusterctl would substitute but is not written as
// ${NAME} or ${NAME:=default}: other envsubst functions, shell's ${var} (write $${var}),
// empty defaults (clusterctl treats them as required) and lower-case names. Each is a bug
// waiting for a user's environment.
func MalformedVariables(b []byte) []string {
	var bad []string
	// $$ is envsubst's escape for a literal $.
	clean := bytes.ReplaceAll(b, []byte("$$"), nil)
	for _, m := range anyVariableRE.FindAll(clean, -1) {
		s := string(m)
		if sm := variableRE.FindStringSubmatch(s); sm != nil && sm[0] == s {
			if sm[2] == ":=" {
				bad = append(bad, s+" (empty default: clusterctl treats it as unset and refuses to run)")
			}
			continue
		}
		bad = append(bad, s)
	}
	return bad
}

// Substitute fills in variables the way clusterctl does (drone/envsubst, which is what
// clusterctl uses): values first, then defaults. A variable with neither is an error naming
// it.
func Substitute(b []byte, values map[string]string) ([]byte, error) {
	var missing []string
	for _, v := range Variables(b) {
		if _, ok := values[v.Name]; !ok && !v.HasDefault {
			missing = append(missing, v.Name)
		}
	}
	if len(missing) > 0 {
		return nil, fmt.Errorf("no value for variables %s", strings.Join(missing, ", "))
	}
	out, err := envsubst.Eval(string(b), func(name string) string { return values[name] })
	if err != nil {
		return nil, err
	}
	return []byte(out), nil
}

// ParseObjects decodes a multi-document YAML stream into objects; documents without a kind
// are an error (a stray fragment in a template), empty documents are skipped.
func ParseObjects(b []byte) ([]*unstructured.Unstructured, error) {
	dec := utilyaml.NewYAMLOrJSONDecoder(bytes.NewReader(b), 4096)
	var out []*unstructured.Unstructured
	for i := 0; ; i++ {
		var obj map[string]any
		if err := dec.Decode(&obj); err != nil {
			if errors.Is(err, io.EOF) {
				return out, nil
			}
			return nil, fmt.Errorf("YAML document %d: %w", i+1, err)
		}
		if len(obj) == 0 {
			continue
		}
		u := &unstructured.Unstructured{Object: obj}
		if u.GetKind() == "" || u.GetAPIVersion() == "" {
			return nil, fmt.Errorf("YAML document %d has no apiVersion or kind", i+1)
		}
		out = append(out, u)
	}
}
