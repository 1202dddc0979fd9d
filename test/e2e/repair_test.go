package e2e

import (
	"context"
	"fmt"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"k8s.io/apimachinery/pkg/types"

	infrav1 "github.com/anvil-metal/cluster-api-provider-anvil/api/v1alpha1"
	"github.com/anvil-metal/cluster-api-provider-anvil/internal/bmc"
	"github.com/anvil-metal/cluster-api-provider-anvil/internal/hoststate"
)

// gatedWipe wipes the way the agent-driven provisioner does, as seen from the BMC: a wipe
// network-boots the server, and once the (here imaginary) agent is done it powers the server
// off. The agent finishes only while the test holds the gate open, so the test decides when a
// wipe can end. Attempts live in the instance, as the real backend's live in memory: a new
// manager starts every wipe over.
type gatedWipe struct {
	open *atomic.Bool

	mu      sync.Mutex
	started map[types.NamespacedName]bool
}

func newGatedWipe(open *atomic.Bool) *gatedWipe {
	return &gatedWipe{open: open, started: map[types.NamespacedName]bool{}}
}

func (g *gatedWipe) Provision(ctx context.Context, h *infrav1.AnvilHost, run hoststate.BMCRunner) (hoststate.Outcome, error) {
	return hoststate.Simulated{}.Provision(ctx, h, run)
}

func (g *gatedWipe) Inspect(ctx context.Context, h *infrav1.AnvilHost, run hoststate.BMCRunner) (hoststate.Outcome, error) {
	return hoststate.Simulated{}.Inspect(ctx, h, run)
}

func (g *gatedWipe) Deprovision(_ context.Context, h *infrav1.AnvilHost, _ infrav1.WipePolicy, run hoststate.BMCRunner) (hoststate.Outcome, error) {
	key := types.NamespacedName{Namespace: h.Namespace, Name: h.Name}
	g.mu.Lock()
	started := g.started[key]
	g.mu.Unlock()
	if !started {
		if err := run("network-boot", func(ctx context.Context, c bmc.Client) error {
			if err := c.SetBootDevice(ctx, bmc.BootPXE, bmc.BootOptions{UEFI: true}); err != nil {
				return err
			}
			return hoststate.PowerCycleOrOn(ctx, c)
		}); err != nil {
			return hoststate.Outcome{}, err
		}
		g.mu.Lock()
		g.started[key] = true
		g.mu.Unlock()
		return hoststate.Outcome{RequeueAfter: 200 * time.Millisecond, Message: "wiping"}, nil
	}
	if !g.open.Load() {
		return hoststate.Outcome{RequeueAfter: 200 * time.Millisecond, Message: "wiping"}, nil
	}
	if err := run("power-off", func(ctx context.Context, c bmc.Client) error { return c.SetPower(ctx, bmc.PowerActionOff) }); err != nil {
		return hoststate.Outcome{}, err
	}
	g.mu.Lock()
	delete(g.started, key)
	g.mu.Unlock()
	return hoststate.Outcome{Done: true}, nil
}

// TestRepairWipesAcrossRestarts: clearing an unclaimed host's maintenance wipes it before it
// is Available, and a manager that restarts mid-wipe wipes it again from the start rather
// than hand it out. The wipe shows on the emulated server: a network boot, then a power-off.
func TestRepairWipesAcrossRestarts(t *testing.T) {
	f := newFixture(t, 1)
	var gate atomic.Bool
	f.anvil.stop(t)
	f.anvil = startAnvil(t, f.api, newGatedWipe(&gate))
	name := f.hosts[0]
	host := &infrav1.AnvilHost{}
	if err := f.get(name, host); err != nil {
		t.Fatal(err)
	}
	f.update(host, func() { host.Spec.Maintenance = &infrav1.Maintenance{Reason: "needs repair: replacing disk 2"} })
	state := func() (infrav1.HostState, string) {
		h := &infrav1.AnvilHost{}
		if err := f.get(name, h); err != nil {
			return "", err.Error()
		}
		return h.Status.State, fmt.Sprintf("state %s, lastError %+v", h.Status.State, h.Status.LastError)
	}
	f.eventually("the host enters Maintenance", time.Minute, func() (bool, string) {
		s, why := state()
		return s == infrav1.HostStateMaintenance, why
	})

	start := time.Now()
	clearedAt := time.Now()
	f.update(host, func() { host.Spec.Maintenance = nil })
	f.eventually("the wipe network-boots the server", time.Minute, func() (bool, string) {
		s, why := state()
		return s == infrav1.HostStateDeprovisioning && f.serverEventsSince(name, "PXEBoot", clearedAt) == 1, why
	})

	// A restart mid-wipe: the new manager knows nothing of the wipe but what status says.
	restartedAt := time.Now()
	f.anvil.stop(t)
	f.anvil = startAnvil(t, f.api, newGatedWipe(&gate))
	f.eventually("the restarted manager starts the wipe over", time.Minute, func() (bool, string) {
		_, why := state()
		return f.serverEventsSince(name, "PXEBoot", restartedAt) == 1, why + fmt.Sprintf(", %d network boots since the restart", f.serverEventsSince(name, "PXEBoot", restartedAt))
	})
	time.Sleep(time.Second) // several reconciles of the restarted manager while the agent works
	if s, why := state(); s != infrav1.HostStateDeprovisioning {
		t.Fatalf("the host left Deprovisioning before its wipe finished: %s", why)
	}

	gate.Store(true)
	f.eventually("the host is wiped and Available", time.Minute, func() (bool, string) {
		s, why := state()
		return s == infrav1.HostStateAvailable, why
	})
	t.Logf("maintenance cleared → Available (one restart mid-wipe): %s", time.Since(start).Round(100*time.Millisecond))
	if f.serverEventsSince(name, "PowerOff", restartedAt) == 0 {
		t.Error("the server was not powered off by the wipe after the restart")
	}
	var path []infrav1.HostState
	var availableAt time.Time
	// The history's watch may deliver the Available write a moment after the Get above saw it.
	f.eventually("the host history shows Available", 30*time.Second, func() (bool, string) {
		path, availableAt = nil, time.Time{}
		for _, s := range f.history.of(name) {
			if s.At.Before(clearedAt) {
				continue
			}
			path = append(path, s.State)
			if s.State == infrav1.HostStateAvailable && availableAt.IsZero() {
				availableAt = s.At
			}
		}
		return !availableAt.IsZero(), fmt.Sprintf("states seen since maintenance was cleared: %v", path)
	})
	if len(path) == 0 || path[0] == infrav1.HostStateAvailable || !contains(path, infrav1.HostStateDeprovisioning) {
		t.Errorf("states after maintenance was cleared: %v; want Deprovisioning before Available", path)
	}
	if f.serverEventsSince(name, "PowerOff", availableAt) > 0 {
		t.Errorf("the wipe's power-off came after the host was Available (%v)", path)
	}
	if !f.hasEvent(name, "MaintenanceCleared") && !f.hasEvent(name, string(infrav1.HostStateDeprovisioning)) {
		t.Error("no Event says the host is being wiped")
	}
}

func contains[T comparable](s []T, v T) bool {
	for _, x := range s {
		if x == v {
			return true
		}
	}
	return false
}
