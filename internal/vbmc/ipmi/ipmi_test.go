package ipmi

import (
	"context"
	"errors"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/anvil-metal/cluster-api-provider-anvil/internal/vbmc/machine"
)

func TestChassisPower(t *testing.T) {
	needIpmitool(t)
	b := startBMC(t, Config{})
	m := b.Machine()
	ev := events(t, m)

	if out := mustIpmitool(t, b, "chassis", "power", "status"); out != "Chassis Power is off\n" {
		t.Fatalf("status = %q", out)
	}

	if out := mustIpmitool(t, b, "chassis", "power", "on"); out != "Chassis Power Control: Up/On\n" {
		t.Fatalf("on = %q", out)
	}
	if e := nextEvent(t, ev); e.Kind != machine.EventBoot || e.Reset != machine.ResetOn {
		t.Fatalf("after on: %+v", e)
	}
	if out := mustIpmitool(t, b, "chassis", "power", "status"); out != "Chassis Power is on\n" {
		t.Fatalf("status = %q", out)
	}
	// On when on changes nothing.
	mustIpmitool(t, b, "chassis", "power", "on")

	// A cycle is one PowerCycle, done when the command returns, although
	// ipmi_sim itself would switch off and back on a second later.
	if out := mustIpmitool(t, b, "chassis", "power", "cycle"); out != "Chassis Power Control: Cycle\n" {
		t.Fatalf("cycle = %q", out)
	}
	if e := nextEvent(t, ev); e.Kind != machine.EventBoot || e.Reset != machine.ResetPowerCycle {
		t.Fatalf("after cycle: %+v", e)
	}
	if m.Power() != machine.PowerOn {
		t.Fatal("off after cycle")
	}
	// ipmi_sim's delayed power-on must not undo a power off sent meanwhile.
	if out := mustIpmitool(t, b, "chassis", "power", "off"); out != "Chassis Power Control: Down/Off\n" {
		t.Fatalf("off = %q", out)
	}
	if e := nextEvent(t, ev); e.Kind != machine.EventPowerOff || e.Reset != machine.ResetForceOff {
		t.Fatalf("after off: %+v", e)
	}
	noEvent(t, ev, 1500*time.Millisecond)
	if m.Power() != machine.PowerOff {
		t.Fatal("the power cycle's late power-on came through")
	}

	// A cycle of a server that is off powers it on.
	mustIpmitool(t, b, "chassis", "power", "cycle")
	if e := nextEvent(t, ev); e.Kind != machine.EventBoot || e.Reset != machine.ResetPowerCycle {
		t.Fatalf("after cycle from off: %+v", e)
	}

	if out := mustIpmitool(t, b, "chassis", "power", "reset"); out != "Chassis Power Control: Reset\n" {
		t.Fatalf("reset = %q", out)
	}
	if e := nextEvent(t, ev); e.Kind != machine.EventBoot || e.Reset != machine.ResetForceRestart {
		t.Fatalf("after reset: %+v", e)
	}

	if out := mustIpmitool(t, b, "chassis", "power", "soft"); out != "Chassis Power Control: Soft\n" {
		t.Fatalf("soft = %q", out)
	}
	if e := nextEvent(t, ev); e.Kind != machine.EventPowerOff || e.Reset != machine.ResetGracefulShutdown {
		t.Fatalf("after soft: %+v", e)
	}

	// A reset of a server that is off fails, as on most BMCs.
	out, err := ipmitool(t, b, testPassword, "chassis", "power", "reset")
	if err == nil || !strings.Contains(out, "Unspecified error") {
		t.Fatalf("reset when off: err %v, output %q", err, out)
	}
	// ipmi_sim does not implement the diagnostic interrupt (NMI).
	out, err = ipmitool(t, b, testPassword, "chassis", "power", "diag")
	if err == nil || !strings.Contains(out, "Invalid data field") {
		t.Fatalf("diag: err %v, output %q", err, out)
	}
	noEvent(t, ev, 0)

	// Changes made on the Machine (by another emulator, say) show over IPMI.
	if err := m.Reset(machine.ResetOn); err != nil {
		t.Fatal(err)
	}
	if out := mustIpmitool(t, b, "chassis", "status"); !strings.Contains(out, "System Power         : on") {
		t.Fatalf("chassis status:\n%s", out)
	}
}

func TestBootDevice(t *testing.T) {
	needIpmitool(t)
	b := startBMC(t, Config{})
	m := b.Machine()
	ev := events(t, m)

	for _, tc := range []struct {
		args     []string
		want     machine.BootOverride
		selector string // as "chassis bootparam get 5" prints it
	}{
		{[]string{"pxe"}, machine.BootOverride{Target: machine.BootPxe, Enabled: machine.OverrideOnce, Mode: machine.BootModeLegacy}, "Force PXE"},
		{[]string{"pxe", "options=efiboot"}, machine.BootOverride{Target: machine.BootPxe, Enabled: machine.OverrideOnce, Mode: machine.BootModeUEFI}, "Force PXE"},
		{[]string{"pxe", "options=persistent,efiboot"}, machine.BootOverride{Target: machine.BootPxe, Enabled: machine.OverrideContinuous, Mode: machine.BootModeUEFI}, "Force PXE"},
		{[]string{"disk", "options=efiboot"}, machine.BootOverride{Target: machine.BootHdd, Enabled: machine.OverrideOnce, Mode: machine.BootModeUEFI}, "Force Boot from default Hard-Drive"},
		{[]string{"cdrom", "options=persistent"}, machine.BootOverride{Target: machine.BootCd, Enabled: machine.OverrideContinuous, Mode: machine.BootModeLegacy}, "Force Boot from CD/DVD"},
		{[]string{"bios", "options=efiboot"}, machine.BootOverride{Target: machine.BootBiosSetup, Enabled: machine.OverrideOnce, Mode: machine.BootModeUEFI}, "Force Boot into BIOS Setup"},
		{[]string{"none"}, machine.BootOverride{Target: machine.BootNone, Enabled: machine.OverrideDisabled, Mode: machine.BootModeUEFI}, "No override"},
	} {
		name := strings.Join(tc.args, " ")
		out := mustIpmitool(t, b, append([]string{"chassis", "bootdev"}, tc.args...)...)
		if out != "Set Boot Device to "+tc.args[0]+"\n" {
			t.Errorf("bootdev %s: %q", name, out)
		}
		if e := nextEvent(t, ev); e.Kind != machine.EventBootOverrideChanged || e.Boot != tc.want {
			t.Errorf("bootdev %s: event %+v, want override %+v", name, e, tc.want)
		}
		out = mustIpmitool(t, b, "chassis", "bootparam", "get", "5")
		if !strings.Contains(out, "Boot Device Selector : "+tc.selector+"\n") {
			t.Errorf("bootdev %s: bootparam get 5:\n%s", name, out)
		}
		// Set efiboot back for the next case when it was cleared.
		if tc.want.Mode != machine.BootModeUEFI {
			o := m.BootOverride()
			o.Mode = machine.BootModeUEFI
			if err := m.SetBootOverride(o); err != nil {
				t.Fatal(err)
			}
			nextEvent(t, ev)
		}
	}

	// ipmi_sim knows no floppy, safe mode or diagnostic partition.
	// ipmitool exits 0 all the same.
	if out, _ := ipmitool(t, b, testPassword, "chassis", "bootdev", "floppy"); !strings.Contains(out, "Set Chassis Boot Parameter 5 failed: Unspecified error") {
		t.Errorf("bootdev floppy: %q", out)
	}

	// A Once override is used by the next boot and then reads as none.
	mustIpmitool(t, b, "chassis", "bootdev", "pxe", "options=efiboot")
	nextEvent(t, ev)
	mustIpmitool(t, b, "chassis", "power", "on")
	want := machine.BootOverride{Target: machine.BootPxe, Enabled: machine.OverrideOnce, Mode: machine.BootModeUEFI}
	e := nextEvent(t, ev)
	// ipmitool may write the boot parameter more than once; a late copy of the same
	// override can arrive before the boot.
	for e.Kind == machine.EventBootOverrideChanged && e.Boot == want {
		e = nextEvent(t, ev)
	}
	if e.Kind != machine.EventBoot || e.Boot != want {
		t.Fatalf("boot event %+v, want boot %+v", e, want)
	}
	if out := mustIpmitool(t, b, "chassis", "bootparam", "get", "5"); !strings.Contains(out, "Boot Device Selector : No override") {
		t.Fatalf("after the boot, bootparam get 5:\n%s", out)
	}

	// Overrides set on the Machine (by a Redfish client, say) read back, and
	// targets IPMI cannot name read as no override.
	if err := m.SetBootOverride(machine.BootOverride{Target: machine.BootCd, Enabled: machine.OverrideContinuous}); err != nil {
		t.Fatal(err)
	}
	if out := mustIpmitool(t, b, "chassis", "bootparam", "get", "5"); !strings.Contains(out, "Boot Device Selector : Force Boot from CD/DVD") {
		t.Fatalf("Cd override, bootparam get 5:\n%s", out)
	}
	if err := m.SetBootOverride(machine.BootOverride{Target: machine.BootUefiHTTP, Enabled: machine.OverrideOnce}); err != nil {
		t.Fatal(err)
	}
	if out := mustIpmitool(t, b, "chassis", "bootparam", "get", "5"); !strings.Contains(out, "Boot Device Selector : No override") {
		t.Fatalf("UefiHttp override, bootparam get 5:\n%s", out)
	}
}

func TestInventory(t *testing.T) {
	needIpmitool(t)
	b := startBMC(t, Config{FRU: FRU{
		Manufacturer: "Anvil Metal", Product: "AM-1000", SerialNumber: "ANV0000042",
		PartNumber: "PN-7", Version: "r2", AssetTag: "rack3-u12",
	}})
	out := mustIpmitool(t, b, "fru", "print", "0")
	for _, want := range []string{
		"Chassis Type          : Rack Mount Chassis",
		"Chassis Serial        : ANV0000042",
		"Board Mfg             : Anvil Metal",
		"Board Product         : AM-1000",
		"Product Manufacturer  : Anvil Metal",
		"Product Name          : AM-1000",
		"Product Part Number   : PN-7",
		"Product Version       : r2",
		"Product Serial        : ANV0000042",
		"Product Asset Tag     : rack3-u12",
	} {
		if !strings.Contains(out, want+"\n") {
			t.Errorf("fru print 0 lacks %q:\n%s", want, out)
		}
	}
	out = mustIpmitool(t, b, "mc", "info")
	if !strings.Contains(out, "IPMI Version              : 2.0\n") || !strings.Contains(out, "Chassis Device\n") {
		t.Errorf("mc info:\n%s", out)
	}
	if out := mustIpmitool(t, b, "mc", "guid"); !strings.Contains(out, "System GUID") {
		t.Errorf("mc guid:\n%s", out)
	}
}

func TestWrongCredentialsFailFast(t *testing.T) {
	needIpmitool(t)
	b := startBMC(t, Config{})
	start := time.Now()
	out, err := ipmitool(t, b, "wrong", "chassis", "power", "status")
	if err == nil || !strings.Contains(out, "Unable to establish IPMI v2 / RMCP+ session") {
		t.Fatalf("wrong password: err %v, output %q", err, out)
	}
	if d := time.Since(start); d > 3*time.Second {
		t.Errorf("wrong password took %v to fail", d)
	}
	if p := b.Machine().Power(); p != machine.PowerOff {
		t.Errorf("power %v", p)
	}
}

func TestFixedPortAndStop(t *testing.T) {
	port, err := freeUDPPort("127.0.0.1")
	if err != nil {
		t.Fatal(err)
	}
	b, err := Start(context.Background(), Config{Port: port})
	if errors.Is(err, ErrNotInstalled) {
		t.Skip(err)
	}
	if err != nil {
		t.Fatal(err)
	}
	if b.Port() != port || b.Address() != "ipmi://127.0.0.1:"+strconv.Itoa(port) {
		t.Fatalf("port %d, address %s", b.Port(), b.Address())
	}
	// A second BMC cannot have the same port.
	if b2, err := Start(context.Background(), Config{Port: port}); err == nil {
		_ = b2.Stop()
		t.Fatal("two BMCs on one port")
	}
	pid, dir := b.pid(), b.tmpDir
	if err := b.Stop(); err != nil {
		t.Fatal(err)
	}
	if err := b.Stop(); err != nil {
		t.Fatalf("second Stop: %v", err)
	}
	assertGone(t, pid)
	if _, err := os.Stat(dir); !os.IsNotExist(err) {
		t.Errorf("temporary directory left: %v", err)
	}
	conn, err := net.Dial("udp", net.JoinHostPort("127.0.0.1", strconv.Itoa(port)))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	if rmcpPing(conn, 200*time.Millisecond) {
		t.Error("BMC answers after Stop")
	}
}

func TestContextCancelStops(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	b, err := Start(ctx, Config{})
	if errors.Is(err, ErrNotInstalled) {
		t.Skip(err)
	}
	if err != nil {
		t.Fatal(err)
	}
	pid := b.pid()
	cancel()
	deadline := time.Now().Add(5 * time.Second)
	for alive(pid) {
		if time.Now().After(deadline) {
			t.Fatal("ipmi_sim still runs after its context was canceled")
		}
		time.Sleep(10 * time.Millisecond)
	}
	_ = b.Stop()
}

func TestStartWithCanceledContext(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	b, err := Start(ctx, Config{})
	if err == nil {
		_ = b.Stop()
		t.Fatal("Start with a canceled context succeeded")
	}
	if !errors.Is(err, context.Canceled) {
		t.Fatalf("Start = %v", err)
	}
}

func TestStateDirKeepsUsers(t *testing.T) {
	needIpmitool(t)
	dir := t.TempDir()
	b := startBMC(t, Config{StateDir: dir})
	// Change the password over IPMI; ipmi_sim persists it.
	mustIpmitool(t, b, "user", "set", "password", "2", "newpw")
	// ipmi_sim writes its state on a timer, about a second after the change;
	// changes younger than that are lost when it exits.
	users := filepath.Join(dir, "ipmi_sim", "anvil", "users.mc20")
	for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(50 * time.Millisecond) {
		if _, err := os.Stat(users); err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("ipmi_sim did not persist the users")
		}
	}
	if err := b.Stop(); err != nil {
		t.Fatal(err)
	}
	b = startBMC(t, Config{StateDir: dir})
	if out, err := ipmitool(t, b, "newpw", "chassis", "power", "status"); err != nil {
		t.Fatalf("persisted password refused: %v\n%s", err, out)
	}
	if _, err := ipmitool(t, b, testPassword, "chassis", "power", "status"); err == nil {
		t.Fatal("configured password accepted although IPMI changed it")
	}
}

func TestConfigValidation(t *testing.T) {
	for _, cfg := range []Config{
		{Addr: "::1"},
		{Addr: "not-an-ip"},
		{Port: 70000},
		{Username: "a-user-name-longer-than-16"},
		{Password: "a-password-longer-than-20"},
		{Password: `quote"`},
	} {
		if b, err := Start(context.Background(), cfg); err == nil {
			_ = b.Stop()
			t.Errorf("Start(%+v) succeeded", cfg)
		} else if errors.Is(err, ErrNotInstalled) {
			t.Skip(err)
		}
	}
}

// assertGone fails the test unless process pid has exited.
func assertGone(t *testing.T, pid int) {
	t.Helper()
	if alive(pid) {
		t.Errorf("process %d still runs", pid)
	}
}

func TestStopReportsDeadSimulator(t *testing.T) {
	b, err := Start(context.Background(), Config{})
	if errors.Is(err, ErrNotInstalled) {
		t.Skip(err)
	}
	if err != nil {
		t.Fatal(err)
	}
	if err := b.cmd.Process.Kill(); err != nil {
		t.Fatal(err)
	}
	<-b.exited
	if err := b.Stop(); err == nil || !strings.Contains(err.Error(), "ipmi_sim had exited: signal: killed") {
		t.Fatalf("Stop = %v", err)
	}
}
