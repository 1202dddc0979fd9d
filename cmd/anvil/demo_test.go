package main

import (
	"bytes"
	"os"
	"strings"
	"testing"
)

// TestDemo runs `make demo` as make test does, so the README's first command cannot rot:
// every step must happen, and the final table must show the lifecycle's end states.
func TestDemo(t *testing.T) {
	if err := os.Chdir("../.."); err != nil { // the demo reads config/samples from the repository root
		t.Fatal(err)
	}
	var out bytes.Buffer
	if err := runDemo(&out); err != nil {
		t.Fatalf("demo failed: %v\n%s", err, out.String())
	}
	text := out.String()
	for _, want := range []string{
		"spec.bmc.address: Invalid value",
		"OS up from slot A; the config drive carries provider-id anvil://anvil-demo/lab-server-2",
		"health gate passed",
		"anvil://anvil-demo/lab-server-2   true",
	} {
		if !strings.Contains(text, want) {
			t.Errorf("demo output lacks %q", want)
		}
	}
	final := text[strings.LastIndex(text, "$ kubectl get anvilhosts"):]
	for _, row := range []string{"lab-server-1   Available", "lab-server-2   Available", "lab-server-3   Retired"} {
		if !strings.Contains(final, row) {
			t.Errorf("final table lacks %q:\n%s", row, final)
		}
	}
}
