package disk

import (
	"bufio"
	"context"
	"errors"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	infrav1 "github.com/anvil-metal/cluster-api-provider-anvil/api/v1alpha1"
)

// grubEmuBoot runs GRUB's emulator (grub-emu, Debian package grub-emu) on the disk image with
// the ESP as its root, as the UEFI image starts, and returns the slots GRUB tried to boot,
// in order, until it tried want of them. grub-emu has no Linux loader, so every
// entry fails after "Anvil: booting slot X" and GRUB moves on to its fallback entry: just
// what a slot without a kernel does on real firmware.
func grubEmuBoot(t *testing.T, img string, want int) (slots []string) {
	t.Helper()
	dir := t.TempDir()
	dm := filepath.Join(dir, "device.map")
	if err := os.WriteFile(dm, []byte("(hd0) "+img+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, "grub-emu", "-m", dm, "-r", "hd0,gpt2", "-d", "/"+ESPBootDir)
	stdin, _ := cmd.StdinPipe()
	out, _ := cmd.StdoutPipe()
	cmd.Stderr = cmd.Stdout
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	go func() { // "Press any key to continue" after a failed entry
		defer close(done)
		for ctx.Err() == nil {
			if _, err := io.WriteString(stdin, "\n"); err != nil {
				return
			}
			time.Sleep(200 * time.Millisecond)
		}
	}()
	re := regexp.MustCompile(`Anvil: booting slot ([AB]) from \(hd0,gpt([34])\)|Anvil: no bootable slot`)
	sc := bufio.NewScanner(out)
	sc.Split(func(data []byte, atEOF bool) (int, []byte, error) { // GRUB ends lines with \r\n or \r
		for i, b := range data {
			if b == '\r' || b == '\n' {
				return i + 1, data[:i], nil
			}
		}
		if atEOF && len(data) > 0 {
			return len(data), data, nil
		}
		return 0, nil, nil
	})
	var log strings.Builder
	for sc.Scan() {
		line := sc.Text()
		log.WriteString(line + "\n")
		if m := re.FindStringSubmatch(line); m != nil {
			if m[1] == "" {
				slots = append(slots, "none")
			} else {
				if (m[1] == "A") != (m[2] == "3") {
					t.Fatalf("slot %s booted from gpt%s", m[1], m[2])
				}
				slots = append(slots, m[1])
			}
			if len(slots) == want {
				break
			}
		}
	}
	_ = cmd.Process.Kill()
	_ = cmd.Wait()
	timedOut := errors.Is(ctx.Err(), context.DeadlineExceeded)
	cancel()
	<-done
	if timedOut || len(slots) < want {
		t.Fatalf("grub-emu: tried %v, want %d boots; output:\n%s", slots, want, log.String())
	}
	return slots
}

// TestBootCountingInGRUB runs the real grub.cfg in GRUB 2.06's emulator against a disk image:
// the counter goes down before each boot, a slot that cannot load falls back to active,
// spent attempts record failed= and return to the good slot for good.
func TestBootCountingInGRUB(t *testing.T) {
	if _, err := exec.LookPath("grub-emu"); err != nil {
		t.Skip("grub-emu not installed (apt-get install grub-emu)")
	}
	d := sparseDisk(t, GiB)
	ab, err := EnsureABLayout(d, LayoutOptions{RootSize: 128 * MiB, ESPSize: 64 * MiB})
	if err != nil {
		t.Fatal(err)
	}
	if err := ab.MarkGood(infrav1.SlotA); err != nil {
		t.Fatal(err)
	}
	if err := ab.Arm(infrav1.SlotB, 3); err != nil {
		t.Fatal(err)
	}
	state := func() BootState {
		t.Helper()
		st, err := ab.BootState()
		if err != nil {
			t.Fatal(err)
		}
		return st
	}
	for boot, wantTries := range []int{2, 1, 0} {
		slots := grubEmuBoot(t, d.Path, 2)
		// B is tried first; it cannot load (no Linux loader in grub-emu), so the fallback
		// entry boots A.
		if strings.Join(slots, ",") != "B,A" {
			t.Fatalf("boot %d tried %v", boot+1, slots)
		}
		if st := state(); st != (BootState{Active: infrav1.SlotA, Next: infrav1.SlotB, Tries: wantTries}) {
			t.Fatalf("after boot %d: %+v", boot+1, st)
		}
	}
	// Attempts spent: failed=B, next cleared, A only.
	slots := grubEmuBoot(t, d.Path, 1)
	if slots[0] != "A" {
		t.Fatalf("after the last attempt GRUB booted %v", slots)
	}
	if st := state(); st != (BootState{Active: infrav1.SlotA, Failed: infrav1.SlotB}) {
		t.Fatalf("after the attempts ran out: %+v", st)
	}
	// The OS marking B good (as anvil-mark-good would) makes B the default.
	if err := ab.Arm(infrav1.SlotB, 3); err != nil {
		t.Fatal(err)
	}
	if slots := grubEmuBoot(t, d.Path, 1); slots[0] != "B" {
		t.Fatalf("armed again: %v", slots)
	}
	if err := ab.MarkGood(infrav1.SlotB); err != nil {
		t.Fatal(err)
	}
	if slots := grubEmuBoot(t, d.Path, 1); slots[0] != "B" {
		t.Fatalf("after marking B good: %v", slots)
	}
	if st := state(); st != (BootState{Active: infrav1.SlotB}) {
		t.Fatalf("B good: %+v", st)
	}
	// A first install that never proves itself: no good slot left, GRUB gives up (on real
	// firmware, "exit" returns to the next boot option, e.g. the network).
	env := NewEnv()
	env.Set("next", "A")
	env.Set("tries", "0")
	if err := ab.WriteEnv(env); err != nil {
		t.Fatal(err)
	}
	if slots := grubEmuBoot(t, d.Path, 1); slots[0] != "none" {
		t.Fatalf("no good slot: %v", slots)
	}
	if st := state(); st != (BootState{Failed: infrav1.SlotA}) {
		t.Fatalf("%+v", st)
	}
}
