package bmc

import (
	"context"
	"errors"
	"io"
	"net"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	infrav1 "github.com/anvil-metal/cluster-api-provider-anvil/api/v1alpha1"
	"github.com/anvil-metal/cluster-api-provider-anvil/internal/vbmc/machine"
	"github.com/anvil-metal/cluster-api-provider-anvil/internal/vbmc/redfish"
)

// connCounter is a TCP relay in front of a BMC that counts the connections clients open.
type connCounter struct {
	addr  string
	conns atomic.Int64
}

func countConnections(t *testing.T, backend string) *connCounter {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	cc := &connCounter{addr: l.Addr().String()}
	var wg sync.WaitGroup
	t.Cleanup(func() { _ = l.Close(); wg.Wait() })
	wg.Go(func() {
		for {
			client, err := l.Accept()
			if err != nil {
				return
			}
			cc.conns.Add(1)
			wg.Go(func() {
				defer client.Close()
				server, err := net.Dial("tcp", backend)
				if err != nil {
					return
				}
				defer server.Close()
				go func() { _, _ = io.Copy(server, client); _ = server.Close() }()
				_, _ = io.Copy(client, server)
			})
		}
	})
	return cc
}

// A host's onboarding and its provisioning steps run over one login and one TLS connection:
// gofish alone would close the connection after every request, and the inventory used to
// log in a second time.
func TestRedfishSessionKeepsOneLoginAndOneConnection(t *testing.T) {
	srv, b := emulated(t, true)
	relay := countConnections(t, b.Addr())
	tg := targetFor(t, "redfish+https://"+relay.addr+"/redfish/v1/Systems/1", "pw")
	tg.CAPool = srv.CertPool()
	pool := NewPool(PoolOptions{}) // the production dialer
	ctx := context.Background()

	do := func(name string, op func(context.Context, Client) error) {
		t.Helper()
		if err := pool.Do(ctx, "ns/h", tg, name, op); err != nil {
			t.Fatalf("%s: %v", name, err)
		}
	}
	do("power-status", readPower)
	before := b.Requests()
	do("power-status", readPower)
	if d := b.Requests().Total() - before.Total(); d != 1 {
		t.Errorf("a power read cost %d requests, want 1 GET of the system", d)
	}
	do("inventory", func(ctx context.Context, c Client) error {
		inv, err := c.Inventory(ctx)
		if err == nil && (inv.CPU.Cores == 0 || len(inv.NICs) == 0) {
			t.Errorf("inventory incomplete: %+v", inv)
		}
		return err
	})
	do("power-on", func(ctx context.Context, c Client) error { return c.SetPower(ctx, PowerActionOn) })
	do("boot-pxe", func(ctx context.Context, c Client) error {
		return c.SetBootDevice(ctx, BootPXE, BootOptions{UEFI: true})
	})
	do("power-status", readPower)

	if n := relay.conns.Load(); n != 1 {
		t.Errorf("%d TCP connections for one session, want 1", n)
	}
	// One POST to log in, one to power on; no logout yet.
	if r := b.Requests(); r.Post != 2 || r.Delete != 0 || b.Sessions() != 1 {
		t.Errorf("requests %+v with %d sessions open: want one login kept", r, b.Sessions())
	}
	if b.Machine().Power() != machine.PowerOn || b.Machine().BootOverride().Target != machine.BootPxe {
		t.Errorf("power %s, boot %+v", b.Machine().Power(), b.Machine().BootOverride())
	}

	pool.Forget(ctx, "ns/h")
	if n := b.Sessions(); n != 0 {
		t.Errorf("%d sessions left after the pool let go: no logout", n)
	}
}

// A connection idle longer than ConnIdleTimeout is closed (the next call dials again, in the
// same session): it serves bursts without holding a BMC slot between power polls.
func TestRedfishIdleConnectionCloses(t *testing.T) {
	srv, b := emulated(t, true)
	relay := countConnections(t, b.Addr())
	tg := targetFor(t, "redfish+https://"+relay.addr+"/redfish/v1/Systems/1", "pw")
	tg.CAPool = srv.CertPool()
	pool := NewPool(PoolOptions{ConnIdleTimeout: 200 * time.Millisecond})
	ctx := context.Background()
	defer pool.Forget(ctx, "ns/h")
	for range 2 {
		if err := pool.Do(ctx, "ns/h", tg, "power-status", readPower); err != nil {
			t.Fatal(err)
		}
	}
	if n := relay.conns.Load(); n != 1 {
		t.Fatalf("%d connections for back-to-back calls, want 1", n)
	}
	time.Sleep(600 * time.Millisecond)
	if err := pool.Do(ctx, "ns/h", tg, "power-status", readPower); err != nil {
		t.Fatal(err)
	}
	if n, logins := relay.conns.Load(), b.Requests().Post; n != 2 || logins != 1 {
		t.Errorf("after an idle spell: %d connections (want 2), %d logins (want the same session)", n, logins)
	}
}

func TestRedfishPowerActionsAndVirtualMedia(t *testing.T) {
	srv, b := emulated(t, true)
	tg := targetFor(t, "redfish+https://"+b.Addr(), "pw") // no system path: found once, at login
	tg.CAPool = srv.CertPool()
	ctx := context.Background()
	c, err := Dial(ctx, tg)
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = c.Close(ctx) }()

	for _, step := range []struct {
		action PowerAction
		want   infrav1.PowerState
	}{{PowerActionOn, infrav1.PowerOn}, {PowerActionCycle, infrav1.PowerOn}, {PowerActionOff, infrav1.PowerOff},
		{PowerActionOn, infrav1.PowerOn}, {PowerActionSoftOff, infrav1.PowerOff}} {
		if err := c.SetPower(ctx, step.action); err != nil {
			t.Fatalf("power %s: %v", step.action, err)
		}
		if p, err := c.PowerState(ctx); err != nil || p != step.want {
			t.Fatalf("after %s: %s, %v", step.action, p, err)
		}
	}
	// Off when already off changes nothing and sends no action (BMCs refuse some).
	posts := b.Requests().Post
	if err := c.SetPower(ctx, PowerActionOff); err != nil || b.Requests().Post != posts {
		t.Errorf("off while off: %v, %d POSTs", err, b.Requests().Post-posts)
	}

	for _, image := range []string{"http://10.0.0.1/agent.iso", "http://10.0.0.1/other.iso"} { // the second replaces the first
		if err := c.InsertVirtualMedia(ctx, image); err != nil {
			t.Fatalf("insert %s: %v", image, err)
		}
		if media := b.Machine().InsertedMedia(); len(media) != 1 || !strings.HasPrefix(onlyImage(media), image) {
			t.Fatalf("media %+v, want %s", media, image)
		}
	}
	if err := c.InsertVirtualMedia(ctx, ""); err != nil || len(b.Machine().InsertedMedia()) != 0 {
		t.Fatalf("eject: %v, media %+v", err, b.Machine().InsertedMedia())
	}
	if err := c.SetBootDevice(ctx, BootDisk, BootOptions{Persistent: true}); err != nil {
		t.Fatal(err)
	}
	if o := b.Machine().BootOverride(); o.Target != machine.BootHdd || o.Enabled != machine.OverrideContinuous || o.Mode != machine.BootModeLegacy {
		t.Errorf("boot override %+v, want Hdd, continuous, legacy", o)
	}
	if err := c.Close(ctx); err != nil || b.Sessions() != 0 {
		t.Errorf("close: %v, %d sessions left", err, b.Sessions())
	}
}

// A BMC that stops answering mid-session: each call ends at the call timeout, and the
// session's context (which gofish keeps) is not the one that timed out, so the next call
// works once the BMC answers again.
func TestRedfishCallTimeoutDoesNotPoisonTheSession(t *testing.T) {
	_, b := emulated(t, false)
	tg := targetFor(t, "redfish+http://"+b.Addr()+"/redfish/v1/Systems/1", "pw")
	tg.Timeout = 300 * time.Millisecond
	ctx, cancel := context.WithCancel(context.Background())
	c, err := Dial(ctx, tg)
	if err != nil {
		t.Fatal(err)
	}
	cancel() // the login's context ends; the session must not
	b.SetFaults(redfish.Faults{Hang: true})
	start := time.Now()
	if _, err := c.PowerState(context.Background()); !errors.Is(err, ErrUnreachable) || time.Since(start) > 3*time.Second {
		t.Fatalf("hanging BMC: %v after %s", err, time.Since(start))
	}
	b.SetFaults(redfish.Faults{})
	if _, err := c.PowerState(context.Background()); err != nil {
		t.Fatalf("after the BMC recovered: %v", err)
	}
	_ = c.Close(context.Background())
	if b.Sessions() != 0 {
		t.Errorf("%d sessions left", b.Sessions())
	}
}

func onlyImage(media map[string]machine.Media) string {
	for _, md := range media {
		return md.Image
	}
	return ""
}
