package ipmi

import (
	"context"
	"errors"
	"os/exec"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/anvil-metal/cluster-api-provider-anvil/internal/vbmc/machine"
)

const (
	testUser     = "admin"
	testPassword = "pw"
)

// startBMC starts a BMC for the test and stops it at the end, skipping the
// test when ipmi_sim is not installed.
func startBMC(t testing.TB, cfg Config) *BMC {
	t.Helper()
	if cfg.Username == "" {
		cfg.Username, cfg.Password = testUser, testPassword
	}
	b, err := Start(context.Background(), cfg)
	if errors.Is(err, ErrNotInstalled) {
		t.Skipf("skipping: %v (apt-get install openipmi)", err)
	}
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := b.Stop(); err != nil {
			t.Errorf("Stop: %v", err)
		}
	})
	return b
}

// needIpmitool skips the test when Debian's ipmitool is missing.
func needIpmitool(t testing.TB) {
	t.Helper()
	if _, err := exec.LookPath("ipmitool"); err != nil {
		t.Skip("skipping: ipmitool is not installed (apt-get install ipmitool)")
	}
}

// ipmitool runs Debian's ipmitool against b over RMCP+ with cipher suite 3
// (without -C ipmitool spends about 10 s discovering suites).
func ipmitool(t testing.TB, b *BMC, password string, args ...string) (string, error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	full := append([]string{"-I", "lanplus", "-C", "3", "-H", b.Host(), "-p", strconv.Itoa(b.Port()),
		"-U", testUser, "-P", password}, args...)
	out, err := exec.CommandContext(ctx, "ipmitool", full...).CombinedOutput()
	return string(out), err
}

// mustIpmitool is ipmitool that fails the test on error.
func mustIpmitool(t testing.TB, b *BMC, args ...string) string {
	t.Helper()
	out, err := ipmitool(t, b, testPassword, args...)
	if err != nil {
		t.Fatalf("ipmitool %s: %v\n%s", strings.Join(args, " "), err, out)
	}
	return out
}

// events subscribes to m and returns the channel its events arrive on.
func events(t testing.TB, m *machine.Machine) <-chan machine.Event {
	t.Helper()
	ch := make(chan machine.Event, 100)
	t.Cleanup(m.Subscribe(func(e machine.Event) { ch <- e }))
	return ch
}

// nextEvent returns the next event, failing the test if none comes.
func nextEvent(t testing.TB, ch <-chan machine.Event) machine.Event {
	t.Helper()
	select {
	case e := <-ch:
		return e
	case <-time.After(5 * time.Second):
		t.Fatal("no machine event")
		return machine.Event{}
	}
}

// noEvent fails the test if an event arrives within d.
func noEvent(t testing.TB, ch <-chan machine.Event, d time.Duration) {
	t.Helper()
	select {
	case e := <-ch:
		t.Fatalf("unexpected machine event %+v", e)
	case <-time.After(d):
	}
}
