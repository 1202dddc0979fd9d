package redfish

import (
	"context"
	"net"
	"strings"
	"testing"
	"time"

	bmclib "github.com/bmc-toolbox/bmclib/v2"

	"github.com/anvil-metal/cluster-api-provider-anvil/internal/vbmc/machine"
)

// TestBmclib drives the emulator with bmclib's Redfish provider, the client
// Anvil's BMC pool uses, through the calls provisioning makes.
func TestBmclib(t *testing.T) {
	for _, mk := range Mockups() {
		t.Run(string(mk), func(t *testing.T) {
			s, b := startBMC(t, ServerOptions{TLS: true}, BMCOptions{Mockup: mk, Username: "anvil", Password: "pw", Identity: NewIdentity(3)})
			host, port, err := net.SplitHostPort(b.Addr())
			if err != nil {
				t.Fatal(err)
			}
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			defer cancel()
			cl := bmclib.NewClient(host, "anvil", "pw", bmclib.WithRedfishPort(port), bmclib.WithSecureTLS(s.CertPool()))
			cl.Registry.Drivers = cl.Registry.Using("redfish")
			if err := cl.Open(ctx); err != nil {
				t.Fatal(err)
			}
			defer cl.Close(ctx)

			if state, err := cl.GetPowerState(ctx); err != nil || !strings.EqualFold(state, "off") {
				t.Fatalf("power state %q %v", state, err)
			}
			if ok, err := cl.SetBootDevice(ctx, "pxe", false, true); err != nil || !ok {
				t.Fatalf("set boot device: %v %v", ok, err)
			}
			want := machine.BootOverride{Target: machine.BootPxe, Enabled: machine.OverrideOnce, Mode: machine.BootModeUEFI}
			if got := b.Machine().BootOverride(); got != want {
				t.Fatalf("override %+v, want %+v", got, want)
			}
			if ov, err := cl.GetBootDeviceOverride(ctx); err != nil || ov.Device != "pxe" || ov.IsPersistent || !ov.IsEFIBoot {
				t.Fatalf("boot override read back %+v %v", ov, err)
			}
			for _, step := range []struct{ action, want string }{{"on", "on"}, {"cycle", "on"}, {"off", "off"}, {"reset", "on"}, {"soft", "off"}} {
				// bmclib's redfish "soft" returns ok=false after a successful
				// GracefulShutdown (redfishwrapper.SystemPowerOff), which its client
				// reports as an error: only the state read back tells.
				if _, err := cl.SetPowerState(ctx, step.action); err != nil && step.action != "soft" {
					t.Fatalf("power %s: %v", step.action, err)
				}
				if state, err := cl.GetPowerState(ctx); err != nil || !strings.EqualFold(state, step.want) {
					t.Fatalf("after %s: %q %v", step.action, state, err)
				}
			}
			if ok, err := cl.SetVirtualMedia(ctx, "CD", "http://10.0.0.1/agent.iso"); err != nil || !ok {
				t.Fatalf("virtual media: %v %v", ok, err)
			}
			// bmclib takes the first CD-capable slot it fetched; gofish fetches in parallel.
			if media := b.Machine().InsertedMedia(); len(media) != 1 || !strings.HasPrefix(mediaImage(media), "http://10.0.0.1/agent.iso") {
				t.Fatalf("media %+v", media)
			}
			// Replacing the image: bmclib ejects first.
			if ok, err := cl.SetVirtualMedia(ctx, "CD", "http://10.0.0.1/other.iso"); err != nil || !ok {
				t.Fatalf("virtual media again: %v %v", ok, err)
			}
			inv, err := cl.Inventory(ctx)
			if err != nil {
				t.Fatalf("inventory: %v", err)
			}
			if inv.Serial != "ANV0000003" || len(inv.CPUs) == 0 || len(inv.Memory) == 0 {
				t.Fatalf("inventory serial %q, %d CPUs, %d DIMMs", inv.Serial, len(inv.CPUs), len(inv.Memory))
			}
			// bmclib finds NICs through NetworkInterfaces and NetworkAdapters only,
			// which of the mockups only the SmartNIC one has.
			if mk == MockupSmartNIC && len(inv.NICs) == 0 {
				t.Fatalf("inventory without NICs")
			}
			for _, n := range inv.NICs {
				for _, p := range n.NICPorts {
					t.Logf("bmclib NIC %s port %s MAC %s", n.ID, p.ID, p.MacAddress)
				}
			}
			if err := cl.Close(ctx); err != nil {
				t.Fatal(err)
			}
			if n := b.Sessions(); n != 0 {
				t.Fatalf("bmclib left %d sessions open", n)
			}
		})
	}
}

func mediaImage(media map[string]machine.Media) string {
	for _, md := range media {
		return md.Image
	}
	return ""
}
