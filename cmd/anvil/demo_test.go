package main

import (
	"bytes"
	"context"
	"os"
	"regexp"
	"strings"
	"testing"
	"time"
)

// TestLab runs `make demo` as make test does, so the README's first command cannot rot: every
// lifecycle step must happen, in order, and the final table must show the end states.
func TestLab(t *testing.T) {
	if err := os.Chdir("../.."); err != nil { // the lab reads templates/ from the repository root
		t.Fatal(err)
	}
	quietLogs()
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Minute)
	defer cancel()
	var out bytes.Buffer
	opts := defaultLabOptions()
	opts.Out = &out
	if err := runLab(ctx, opts); err != nil {
		t.Fatalf("lab failed: %v\n%s", err, out.String())
	}
	text := out.String()
	defer func() {
		if t.Failed() {
			t.Log(text)
		}
	}()
	steps := []string{
		"spec.bmc.address: Invalid value",
		"OS up from slot A; config drive: provider-id anvil://anvil-demo/lab-server-",
		"user-data runs kubeadm init",
		"user-data runs kubeadm join",
		"was wiped (metadata) and is Available again",
		"runs http://127.0.0.1", // ImageUpToDate after the committed upgrade: "slot B runs …/v2.img"
		"kept its node; DATA on lab-server-",
		"failed its health gate in slot",
		"kept its node; DATA on lab-server-",
		"has the out-of-service taint",
		"was power-cycled through its BMC and booted again",
		"is in maintenance: \"needs repair",
		"replaced it on lab-server-",
		"is Retired and powered off",
		"Timeline (total",
	}
	last := 0
	for _, want := range steps {
		i := strings.Index(text[last:], want)
		if i < 0 {
			t.Fatalf("lab output lacks %q after offset %d", want, last)
		}
		last += i
	}
	final := text[strings.LastIndex(text, "$ kubectl get anvilhosts"):strings.LastIndex(text, "Timeline (total")]
	if n := len(regexp.MustCompile(`(?m)^lab-server-\d+\s+Available\s+Off`).FindAllString(final, -1)); n != opts.Servers-1 {
		t.Errorf("final table has %d Available hosts powered off, want %d:\n%s", n, opts.Servers-1, final)
	}
	if n := len(regexp.MustCompile(`(?m)^lab-server-\d+\s+Retired\s+Off`).FindAllString(final, -1)); n != 1 {
		t.Errorf("final table has %d Retired hosts powered off, want 1:\n%s", n, final)
	}
}
