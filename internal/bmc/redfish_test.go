package bmc

import (
	"context"
	"errors"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	infrav1 "github.com/anvil-metal/cluster-api-provider-anvil/api/v1alpha1"
	"github.com/anvil-metal/cluster-api-provider-anvil/internal/vbmc/machine"
	"github.com/anvil-metal/cluster-api-provider-anvil/internal/vbmc/redfish"
)

// These tests drive the Redfish client against the emulated Redfish BMC and against
// misbehaving servers.

func emulated(t *testing.T, tls bool) (*redfish.Server, *redfish.BMC) {
	t.Helper()
	srv, err := redfish.NewServer(redfish.ServerOptions{TLS: tls})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = srv.Close() })
	b, err := srv.AddBMC(redfish.BMCOptions{Mockup: redfish.MockupRackmount, Username: "admin", Password: "pw", Identity: redfish.NewIdentity(7)})
	if err != nil {
		t.Fatal(err)
	}
	return srv, b
}

func targetFor(t *testing.T, raw, password string) Target {
	t.Helper()
	a, err := ParseAddress(raw)
	if err != nil {
		t.Fatal(err)
	}
	return Target{Address: a, Username: "admin", Password: password, Timeout: 3 * time.Second}
}

func TestRedfishPowerBootAndInventory(t *testing.T) {
	srv, b := emulated(t, true)
	tg := targetFor(t, "redfish+https://"+b.Addr()+"/redfish/v1/Systems/1", "pw")
	tg.CAPool = srv.CertPool()
	ctx := context.Background()
	c, err := DialRedfish(ctx, tg)
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = c.Close(ctx) }()

	if p, err := c.PowerState(ctx); err != nil || p != infrav1.PowerOff {
		t.Fatalf("power %s, %v; want off as the emulated server starts", p, err)
	}
	if err := c.SetPower(ctx, PowerActionOn); err != nil {
		t.Fatal(err)
	}
	if p, err := c.PowerState(ctx); err != nil || p != infrav1.PowerOn {
		t.Fatalf("power %s, %v", p, err)
	}
	if err := c.SetBootDevice(ctx, BootPXE, BootOptions{UEFI: true}); err != nil {
		t.Fatal(err)
	}
	if o := b.Machine().BootOverride(); o.Target != machine.BootPxe || o.Enabled != machine.OverrideOnce {
		t.Errorf("boot override %+v, want PXE once", o)
	}
	inv, err := c.Inventory(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if inv.CPU.Cores == 0 || inv.Memory == nil || len(inv.NICs) == 0 || inv.System.SerialNumber == "" {
		t.Errorf("inventory incomplete: %+v", inv)
	}
	for i := 1; i < len(inv.NICs); i++ {
		if inv.NICs[i-1].MACAddress > inv.NICs[i].MACAddress {
			t.Errorf("NICs not in a stable order: %v", inv.NICs)
		}
	}
}

func TestTLSIsVerifiedUnlessTheHostOptsOut(t *testing.T) {
	_, b := emulated(t, true)
	tg := targetFor(t, "redfish+https://"+b.Addr()+"/redfish/v1/Systems/1", "pw")
	_, err := DialRedfish(context.Background(), tg) // self-signed, no CA given
	if !errors.Is(err, ErrTLS) {
		t.Fatalf("got %v, want ErrTLS", err)
	}
	tg.InsecureSkipVerify = true
	c, err := DialRedfish(context.Background(), tg)
	if err != nil {
		t.Fatalf("with insecureSkipVerify: %v", err)
	}
	_ = c.Close(context.Background())
}

func TestBadPeersGiveClearErrors(t *testing.T) {
	ctx := context.Background()

	// Nothing listening.
	l, _ := net.Listen("tcp", "127.0.0.1:0")
	addr := l.Addr().String()
	_ = l.Close()
	if _, err := DialRedfish(ctx, targetFor(t, "redfish+http://"+addr, "pw")); !errors.Is(err, ErrUnreachable) {
		t.Errorf("closed port: %v, want ErrUnreachable", err)
	}

	// A server that answers with malformed JSON.
	garbage := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		_, _ = w.Write([]byte(`{"@odata.id": "/redfish/v1", "Systems": {`))
	}))
	defer garbage.Close()
	_, err := DialRedfish(ctx, targetFor(t, "redfish+http://"+strings.TrimPrefix(garbage.URL, "http://"), "pw"))
	if err == nil || Reason(err) == "" {
		t.Errorf("malformed JSON: %v", err)
	}

	// Wrong password: classified as an auth failure, password not in the text.
	_, b := emulated(t, false)
	_, err = DialRedfish(ctx, targetFor(t, "redfish+http://"+b.Addr(), "wrong-pw-123"))
	if !errors.Is(err, ErrAuth) || strings.Contains(err.Error(), "wrong-pw-123") {
		t.Errorf("wrong password: %v", err)
	}

	// A BMC that hangs: the call times out instead of blocking the controller.
	b.SetFaults(redfish.Faults{Hang: true})
	tg := targetFor(t, "redfish+http://"+b.Addr(), "pw")
	tg.Timeout = 500 * time.Millisecond
	start := time.Now()
	_, err = DialRedfish(ctx, tg)
	if !errors.Is(err, ErrUnreachable) || time.Since(start) > 5*time.Second {
		t.Errorf("hanging BMC: %v after %s", err, time.Since(start))
	}
	b.SetFaults(redfish.Faults{})
}
