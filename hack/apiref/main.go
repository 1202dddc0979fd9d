// Command apiref writes docs/api-reference.md from the Go types in api/v1alpha1: every kind,
// every field with its JSON name, type, whether it is required, and the validation the CRD
// enforces (from the kubebuilder markers), and the doc comments as descriptions. `make
// generate` runs it and `make verify-gen` fails when the committed file is stale.
package main

import (
	"bytes"
	"flag"
	"fmt"
	"go/ast"
	"go/parser"
	"go/token"
	"os"
	"path/filepath"
	"reflect"
	"regexp"
	"sort"
	"strconv"
	"strings"
)

// kindOrder puts the kinds in the order a user meets them.
var kindOrder = []string{"AnvilHost", "AnvilMachine", "AnvilMachineTemplate", "AnvilCluster", "AnvilClusterTemplate",
	"AnvilRemediation", "AnvilRemediationTemplate"}

type field struct {
	name, goType, doc string
	markers           []string
	inline            bool
}

type typeInfo struct {
	name, doc  string
	markers    []string
	fields     []field
	isStruct   bool
	underlying string
	values     []string // constants of a string type
}

func main() {
	dir := flag.String("dir", "api/v1alpha1", "package with the API types")
	out := flag.String("out", "docs/api-reference.md", "file to write")
	flag.Parse()
	types, group, version, err := load(*dir)
	if err != nil {
		fmt.Fprintln(os.Stderr, "apiref:", err)
		os.Exit(1)
	}
	if err := os.WriteFile(*out, render(types, group, version), 0o644); err != nil { //nolint:gosec // documentation
		fmt.Fprintln(os.Stderr, "apiref:", err)
		os.Exit(1)
	}
}

func load(dir string) (map[string]*typeInfo, string, string, error) {
	fset := token.NewFileSet()
	files, err := filepath.Glob(filepath.Join(dir, "*.go"))
	if err != nil {
		return nil, "", "", err
	}
	types := map[string]*typeInfo{}
	var group string
	version := filepath.Base(dir)
	for _, path := range files {
		if strings.HasSuffix(path, "_test.go") || strings.HasPrefix(filepath.Base(path), "zz_generated") {
			continue
		}
		f, err := parser.ParseFile(fset, path, nil, parser.ParseComments)
		if err != nil {
			return nil, "", "", err
		}
		if f.Doc != nil {
			if m := regexp.MustCompile(`\+groupName=(\S+)`).FindStringSubmatch(f.Doc.Text()); m != nil {
				group = m[1]
			}
		}
		for _, c := range f.Comments {
			if m := regexp.MustCompile(`\+groupName=(\S+)`).FindStringSubmatch(c.Text()); m != nil {
				group = m[1]
			}
		}
		for _, decl := range f.Decls {
			gd, ok := decl.(*ast.GenDecl)
			if !ok {
				continue
			}
			switch gd.Tok {
			case token.TYPE:
				for _, spec := range gd.Specs {
					ts := spec.(*ast.TypeSpec)
					doc := gd.Doc
					if ts.Doc != nil {
						doc = ts.Doc
					}
					t := &typeInfo{name: ts.Name.Name}
					t.doc, t.markers = splitDoc(doc)
					switch st := ts.Type.(type) {
					case *ast.StructType:
						t.isStruct = true
						for _, fl := range st.Fields.List {
							t.fields = append(t.fields, readField(fl))
						}
					default:
						t.underlying = expr(ts.Type)
					}
					types[t.name] = t
				}
			case token.CONST:
				for _, spec := range gd.Specs {
					vs := spec.(*ast.ValueSpec)
					id, ok := vs.Type.(*ast.Ident)
					if !ok || len(vs.Values) != 1 {
						continue
					}
					if lit, ok := vs.Values[0].(*ast.BasicLit); ok && lit.Kind == token.STRING {
						if t := types[id.Name]; t != nil {
							v, _ := strconv.Unquote(lit.Value)
							t.values = append(t.values, v)
						} else {
							types[id.Name] = &typeInfo{name: id.Name, values: []string{mustUnquote(lit.Value)}}
						}
					}
				}
			}
		}
	}
	// Constants may come before their type in file order: merge placeholders.
	for _, t := range types {
		if !t.isStruct && t.underlying == "" && len(t.values) > 0 {
			delete(types, t.name)
		}
	}
	return types, group, version, nil
}

func mustUnquote(s string) string {
	v, _ := strconv.Unquote(s)
	return v
}

func readField(fl *ast.Field) field {
	f := field{goType: expr(fl.Type)}
	f.doc, f.markers = splitDoc(fl.Doc)
	if len(fl.Names) > 0 {
		f.name = fl.Names[0].Name
	}
	if fl.Tag != nil {
		tag := reflect.StructTag(mustUnquote(fl.Tag.Value)).Get("json")
		name, opts, _ := strings.Cut(tag, ",")
		if name != "" {
			f.name = name
		}
		f.inline = strings.Contains(opts, "inline")
	}
	return f
}

// splitDoc separates a doc comment into prose and +markers.
func splitDoc(cg *ast.CommentGroup) (string, []string) {
	if cg == nil {
		return "", nil
	}
	var prose, markers []string
	for _, line := range strings.Split(cg.Text(), "\n") {
		line = strings.TrimSpace(line)
		if strings.HasPrefix(line, "+") {
			markers = append(markers, line)
			continue
		}
		prose = append(prose, line)
	}
	return strings.TrimSpace(strings.Join(prose, " ")), markers
}

func expr(e ast.Expr) string {
	switch t := e.(type) {
	case *ast.Ident:
		return t.Name
	case *ast.StarExpr:
		return expr(t.X)
	case *ast.ArrayType:
		return "[]" + expr(t.Elt)
	case *ast.MapType:
		return "map[" + expr(t.Key) + "]" + expr(t.Value)
	case *ast.SelectorExpr:
		return expr(t.X) + "." + t.Sel.Name
	}
	return fmt.Sprintf("%T", e)
}

// rules turns kubebuilder markers into the constraints a user sees.
func rules(markers []string) (required bool, out []string) {
	for _, m := range markers {
		switch {
		case m == "+required":
			required = true
		case strings.HasPrefix(m, "+kubebuilder:default="):
			out = append(out, "default `"+strings.Trim(strings.TrimPrefix(m, "+kubebuilder:default="), `"`)+"`")
		case strings.HasPrefix(m, "+kubebuilder:validation:Enum="):
			out = append(out, "one of `"+strings.ReplaceAll(strings.TrimPrefix(m, "+kubebuilder:validation:Enum="), ";", "`, `")+"`")
		case strings.HasPrefix(m, "+kubebuilder:validation:XValidation:") || strings.HasPrefix(m, "+kubebuilder:validation:items:XValidation:"):
			if i := strings.Index(m, `message="`); i >= 0 {
				out = append(out, strings.TrimSuffix(m[i+len(`message="`):], `"`))
			}
		case strings.HasPrefix(m, "+kubebuilder:validation:items:"):
			k, v, _ := strings.Cut(strings.TrimPrefix(m, "+kubebuilder:validation:items:"), "=")
			out = append(out, "each item: "+k+" "+v)
		case strings.HasPrefix(m, "+kubebuilder:validation:"):
			k, v, _ := strings.Cut(strings.TrimPrefix(m, "+kubebuilder:validation:"), "=")
			out = append(out, k+" "+v)
		}
	}
	return required, out
}

func anchor(name string) string { return strings.ToLower(name) }

func render(types map[string]*typeInfo, group, version string) []byte {
	var b bytes.Buffer
	fmt.Fprintf(&b, "# API reference: `%s/%s`\n\n", group, version)
	b.WriteString("<!-- Generated by hack/apiref from api/v1alpha1 (make generate). Do not edit. -->\n\n")
	b.WriteString("Every kind, with each field's JSON name, type and the validation the API server enforces\n" +
		"(CRD schema and CEL rules; the admission webhooks add cross-field checks described in the README).\n\n")
	var kinds []string
	for _, k := range kindOrder {
		if types[k] != nil {
			kinds = append(kinds, k)
		}
	}
	b.WriteString("Kinds: ")
	for i, k := range kinds {
		if i > 0 {
			b.WriteString(" · ")
		}
		fmt.Fprintf(&b, "[%s](#%s)", k, anchor(k))
	}
	b.WriteString("\n\n")

	seen := map[string]bool{}
	var queue []string
	writeType := func(name, heading string) {
		t := types[name]
		if t == nil || seen[name] {
			return
		}
		seen[name] = true
		fmt.Fprintf(&b, "%s %s\n\n", heading, name)
		if t.doc != "" {
			b.WriteString(t.doc + "\n\n")
		}
		if !t.isStruct {
			_, r := rules(t.markers)
			fmt.Fprintf(&b, "Type: `%s`.", t.underlying)
			if len(t.values) > 0 {
				fmt.Fprintf(&b, " Values: `%s`.", strings.Join(t.values, "`, `"))
			} else if len(r) > 0 {
				fmt.Fprintf(&b, " %s.", strings.Join(r, "; "))
			}
			b.WriteString("\n\n")
			return
		}
		b.WriteString("| Field | Type | Required | Validation | Description |\n|---|---|---|---|---|\n")
		for _, f := range t.fields {
			if f.inline || f.name == "-" {
				continue
			}
			required, r := rules(f.markers)
			typ := "`" + f.goType + "`"
			base := strings.TrimPrefix(strings.TrimPrefix(f.goType, "[]"), "map[string]")
			if types[base] != nil {
				typ = strings.Replace(f.goType, base, fmt.Sprintf("[%s](#%s)", base, anchor(base)), 1)
				queue = append(queue, base)
			}
			req := ""
			if required {
				req = "yes"
			}
			fmt.Fprintf(&b, "| `%s` | %s | %s | %s | %s |\n", f.name, typ, req, cell(strings.Join(r, "; ")), cell(f.doc))
		}
		b.WriteString("\n")
	}
	for _, k := range kinds {
		writeType(k, "##")
	}
	b.WriteString("## Types\n\n")
	for len(queue) > 0 {
		sort.Strings(queue)
		name := queue[0]
		queue = queue[1:]
		writeType(name, "###")
	}
	return b.Bytes()
}

func cell(s string) string { return strings.ReplaceAll(s, "|", `\|`) }
