package machine

import (
	"errors"
	"testing"
	"time"
)

// collect subscribes and returns a function that waits for the next n events.
func collect(t *testing.T, m *Machine) func(n int) []Event {
	events := make(chan Event, 100)
	t.Cleanup(m.Subscribe(func(e Event) { events <- e }))
	return func(n int) []Event {
		t.Helper()
		var out []Event
		for len(out) < n {
			select {
			case e := <-events:
				out = append(out, e)
			case <-time.After(5 * time.Second):
				t.Fatalf("got %d events, want %d: %+v", len(out), n, out)
			}
		}
		return out
	}
}

func TestNewMachine(t *testing.T) {
	m := New(Config{})
	if m.Power() != PowerOff {
		t.Fatalf("power %s", m.Power())
	}
	if got, want := m.BootOverride(), (BootOverride{Target: BootNone, Enabled: OverrideDisabled, Mode: BootModeUEFI}); got != want {
		t.Fatalf("override %+v", got)
	}
	if New(Config{PoweredOn: true, BootMode: BootModeLegacy}).BootOverride().Mode != BootModeLegacy {
		t.Fatal("boot mode not applied")
	}
}

func TestResetTransitions(t *testing.T) {
	m := New(Config{})
	next := collect(t, m)
	if err := m.Reset(ResetForceRestart); !errors.Is(err, ErrPoweredOff) {
		t.Fatalf("restart while off: %v", err)
	}
	steps := []struct {
		reset ResetType
		power PowerState
		event EventKind // "" when nothing happens
	}{
		{ResetOn, PowerOn, EventBoot},
		{ResetOn, PowerOn, ""},
		{ResetNmi, PowerOn, EventNMI},
		{ResetForceRestart, PowerOn, EventBoot},
		{ResetGracefulRestart, PowerOn, EventBoot},
		{ResetPowerCycle, PowerOn, EventBoot},
		{ResetGracefulShutdown, PowerOff, EventPowerOff},
		{ResetForceOff, PowerOff, ""},
		{ResetNmi, PowerOff, ""},
		{ResetPowerCycle, PowerOn, EventBoot},
		{ResetPushPowerButton, PowerOff, EventPowerOff},
		{ResetPushPowerButton, PowerOn, EventBoot},
		{ResetForceOff, PowerOff, EventPowerOff},
		{ResetForceOn, PowerOn, EventBoot},
	}
	var want []EventKind
	for _, s := range steps {
		if err := m.Reset(s.reset); err != nil {
			t.Fatalf("%s: %v", s.reset, err)
		}
		if m.Power() != s.power {
			t.Fatalf("after %s: %s, want %s", s.reset, m.Power(), s.power)
		}
		if s.event != "" {
			want = append(want, s.event)
		}
	}
	got := next(len(want))
	for i, e := range got {
		if e.Kind != want[i] || e.Seq != uint64(i+1) {
			t.Fatalf("event %d: %+v, want kind %s seq %d", i, e, want[i], i+1)
		}
	}
	if err := m.Reset("Explode"); err == nil {
		t.Fatal("unknown reset accepted")
	}
}

func TestBootOverrideLifetimes(t *testing.T) {
	m := New(Config{})
	next := collect(t, m)
	if err := m.SetBootOverride(BootOverride{Target: BootPxe, Enabled: OverrideOnce, Mode: BootModeUEFI}); err != nil {
		t.Fatal(err)
	}
	mustReset := func(r ResetType) {
		t.Helper()
		if err := m.Reset(r); err != nil {
			t.Fatal(err)
		}
	}
	mustReset(ResetOn)
	mustReset(ResetForceRestart)
	evs := next(3)
	if evs[0].Kind != EventBootOverrideChanged || evs[0].Boot.Target != BootPxe {
		t.Fatalf("override event %+v", evs[0])
	}
	if evs[1].Kind != EventBoot || evs[1].Boot.Target != BootPxe || evs[1].Boot.Enabled != OverrideOnce || evs[1].Reset != ResetOn {
		t.Fatalf("first boot %+v, want PXE once", evs[1])
	}
	if evs[2].Boot.Target != BootNone || evs[2].Boot.Enabled != OverrideDisabled {
		t.Fatalf("second boot %+v, want the normal order", evs[2])
	}
	if got := m.BootOverride(); got.Enabled != OverrideDisabled || got.Target != BootPxe {
		t.Fatalf("override after the boot %+v: Once becomes Disabled, the target stays", got)
	}

	if err := m.SetBootOverride(BootOverride{Target: BootHdd, Enabled: OverrideContinuous, Mode: BootModeLegacy}); err != nil {
		t.Fatal(err)
	}
	mustReset(ResetPowerCycle)
	mustReset(ResetPowerCycle)
	for _, e := range next(3)[1:] {
		if e.Boot.Target != BootHdd || e.Boot.Mode != BootModeLegacy {
			t.Fatalf("continuous override not applied: %+v", e)
		}
	}
	if err := m.SetBootOverride(BootOverride{Target: BootPxe, Enabled: "Sometimes"}); err == nil {
		t.Fatal("bad lifetime accepted")
	}
}

func TestMedia(t *testing.T) {
	m := New(Config{})
	next := collect(t, m)
	if _, ok := m.Media("CD1"); ok {
		t.Fatal("new machine has media")
	}
	md := Media{Image: "http://x/a.iso", WriteProtected: true, TransferProtocol: "HTTP"}
	if err := m.InsertMedia("CD1", md); err != nil {
		t.Fatal(err)
	}
	if err := m.InsertMedia("CD1", md); !errors.Is(err, ErrMediaInUse) {
		t.Fatalf("second insert: %v", err)
	}
	if err := m.InsertMedia("CD2", Media{}); err == nil {
		t.Fatal("empty image accepted")
	}
	all := m.InsertedMedia()
	all["CD9"] = md // a copy: the machine must not see this
	if got, ok := m.Media("CD1"); !ok || got != md || len(m.InsertedMedia()) != 1 {
		t.Fatalf("media %+v %v, all %v", got, ok, m.InsertedMedia())
	}
	m.EjectMedia("CD1")
	m.EjectMedia("CD1") // nothing to do, no event
	evs := next(2)
	if evs[0].Kind != EventMediaInserted || evs[0].Slot != "CD1" || evs[0].Media != md || evs[1].Kind != EventMediaEjected {
		t.Fatalf("events %+v", evs)
	}
}

// TestSubscribers: a subscriber may block or call back into the machine
// without stalling it, and stops hearing events once it unsubscribes.
func TestSubscribers(t *testing.T) {
	m := New(Config{})
	release := make(chan struct{})
	var booted []Event
	done := make(chan struct{})
	unsubscribe := m.Subscribe(func(e Event) {
		<-release // a slow subscriber
		if e.Kind == EventBoot {
			booted = append(booted, e)
			_ = m.Reset(ResetForceOff) // calls back into the machine
		}
		if e.Kind == EventPowerOff {
			close(done)
		}
	})
	start := time.Now()
	if err := m.Reset(ResetOn); err != nil {
		t.Fatal(err)
	}
	if time.Since(start) > time.Second {
		t.Fatal("Reset waited for a subscriber")
	}
	close(release)
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		t.Fatal("subscriber did not see its own power-off")
	}
	if len(booted) != 1 || m.Power() != PowerOff {
		t.Fatalf("booted %v, power %s", booted, m.Power())
	}
	unsubscribe()
	unsubscribe() // idempotent
	if err := m.Reset(ResetOn); err != nil {
		t.Fatal(err)
	}
	time.Sleep(50 * time.Millisecond)
	if len(booted) != 1 {
		t.Fatal("event delivered after unsubscribe")
	}
}
