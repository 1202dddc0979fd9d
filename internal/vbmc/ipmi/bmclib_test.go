package ipmi

import (
	"context"
	"strconv"
	"testing"
	"time"

	bmclib "github.com/bmc-toolbox/bmclib/v2"

	"github.com/anvil-metal/cluster-api-provider-anvil/internal/vbmc/machine"
)

// TestBmclib drives the emulator through bmclib's ipmitool provider, the way
// Anvil's controllers talk to IPMI BMCs, and pins down what bmclib returns.
func TestBmclib(t *testing.T) {
	needIpmitool(t)
	b := startBMC(t, Config{})
	m := b.Machine()
	ev := events(t, m)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()

	cl := bmclib.NewClient(b.Host(), testUser, testPassword,
		// Without a suite, bmclib tries 3 then 17, each after ipmitool's own
		// ~10 s suite discovery; ipmi_sim has 3.
		bmclib.WithIpmitoolCipherSuite("3"),
		bmclib.WithIpmitoolPort(strconv.Itoa(b.Port())),
		bmclib.WithPerProviderTimeout(30*time.Second))
	cl.Registry.Drivers = cl.Registry.Using("ipmi")
	if err := cl.Open(ctx); err != nil {
		t.Fatalf("Open: %v", err)
	}
	defer func() {
		if err := cl.Close(ctx); err != nil {
			t.Errorf("Close: %v", err)
		}
	}()

	// Quirk: the ipmitool provider returns ipmitool's raw line, newline
	// included, where the Redfish providers return "On"/"Off".
	state, err := cl.GetPowerState(ctx)
	if err != nil || state != "Chassis Power is off\n" {
		t.Fatalf("GetPowerState = %q, %v", state, err)
	}

	ok, err := cl.SetPowerState(ctx, "on")
	if !ok || err != nil {
		t.Fatalf(`SetPowerState("on") = %v, %v`, ok, err)
	}
	if e := nextEvent(t, ev); e.Kind != machine.EventBoot {
		t.Fatalf("after on: %+v", e)
	}
	if state, _ := cl.GetPowerState(ctx); state != "Chassis Power is on\n" {
		t.Fatalf("GetPowerState after on = %q", state)
	}

	// "cycle" returns with the server on (see TestChassisPower).
	ok, err = cl.SetPowerState(ctx, "cycle")
	if !ok || err != nil {
		t.Fatalf(`SetPowerState("cycle") = %v, %v`, ok, err)
	}
	if e := nextEvent(t, ev); e.Kind != machine.EventBoot || e.Reset != machine.ResetPowerCycle {
		t.Fatalf("after cycle: %+v", e)
	}
	if state, _ := cl.GetPowerState(ctx); state != "Chassis Power is on\n" {
		t.Fatalf("GetPowerState after cycle = %q", state)
	}

	ok, err = cl.SetPowerState(ctx, "reset")
	if !ok || err != nil {
		t.Fatalf(`SetPowerState("reset") = %v, %v`, ok, err)
	}
	if e := nextEvent(t, ev); e.Kind != machine.EventBoot || e.Reset != machine.ResetForceRestart {
		t.Fatalf("after reset: %+v", e)
	}

	ok, err = cl.SetPowerState(ctx, "off")
	if !ok || err != nil {
		t.Fatalf(`SetPowerState("off") = %v, %v`, ok, err)
	}
	if e := nextEvent(t, ev); e.Kind != machine.EventPowerOff || e.Reset != machine.ResetForceOff {
		t.Fatalf("after off: %+v", e)
	}
	// Off when off: bmclib checks the status first and sends nothing.
	if ok, err := cl.SetPowerState(ctx, "off"); !ok || err != nil {
		t.Fatalf(`second SetPowerState("off") = %v, %v`, ok, err)
	}

	for _, tc := range []struct {
		persistent, efi bool
		want            machine.BootOverride
	}{
		{false, true, machine.BootOverride{Target: machine.BootPxe, Enabled: machine.OverrideOnce, Mode: machine.BootModeUEFI}},
		{true, true, machine.BootOverride{Target: machine.BootPxe, Enabled: machine.OverrideContinuous, Mode: machine.BootModeUEFI}},
		// Without efiBoot IPMI asks for a legacy (BIOS) boot.
		{false, false, machine.BootOverride{Target: machine.BootPxe, Enabled: machine.OverrideOnce, Mode: machine.BootModeLegacy}},
	} {
		ok, err := cl.SetBootDevice(ctx, "pxe", tc.persistent, tc.efi)
		if !ok || err != nil {
			t.Fatalf("SetBootDevice(pxe, %v, %v) = %v, %v", tc.persistent, tc.efi, ok, err)
		}
		if e := nextEvent(t, ev); e.Kind != machine.EventBootOverrideChanged || e.Boot != tc.want {
			t.Fatalf("SetBootDevice(pxe, %v, %v): event %+v, want %+v", tc.persistent, tc.efi, e, tc.want)
		}
	}

	// Quirk: the ipmitool provider cannot read the override back.
	if o, err := cl.GetBootDeviceOverride(ctx); err == nil {
		t.Errorf("GetBootDeviceOverride worked through ipmitool: %+v", o)
	} else {
		t.Logf("GetBootDeviceOverride: %v", err)
	}
	// ipmi_sim has no NMI ("chassis power diag").
	if err := cl.SendNMI(ctx); err == nil {
		t.Error("SendNMI worked")
	} else {
		t.Logf("SendNMI: %v", err)
	}
	// A reset of a server that is off fails (see TestChassisPower).
	if ok, err := cl.SetPowerState(ctx, "reset"); ok || err == nil {
		t.Errorf(`SetPowerState("reset") when off = %v, %v`, ok, err)
	} else {
		t.Logf(`SetPowerState("reset") when off: %v`, err)
	}
	users, err := cl.ReadUsers(ctx)
	if err != nil {
		t.Fatalf("ReadUsers: %v", err)
	}
	t.Logf("ReadUsers = %v", users)
}
