package hoststate

import (
	"context"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	infrav1 "github.com/anvil-metal/cluster-api-provider-anvil/api/v1alpha1"
	"github.com/anvil-metal/cluster-api-provider-anvil/internal/bmc"
)

// Simulated provisions through the BMC alone: it sets a one-time PXE boot and power-cycles
// (what the real flow does before the agent takes over), then records the image as installed
// in slot A. It is the backend for tests and benchmarks of everything above the agent, and it
// is named for what it is: nothing is written to any disk.
type Simulated struct{}

// Provision boots the host towards the network and records the install.
func (Simulated) Provision(_ context.Context, h *infrav1.AnvilHost, run BMCRunner) (Outcome, error) {
	err := run("boot-pxe", func(ctx context.Context, c bmc.Client) error {
		if err := c.SetBootDevice(ctx, bmc.BootPXE, bmc.BootOptions{UEFI: h.Spec.BootMode != infrav1.BootModeLegacy}); err != nil {
			return err
		}
		return PowerCycleOrOn(ctx, c)
	})
	if err != nil {
		return Outcome{}, err
	}
	now := metav1.NewTime(time.Now().UTC().Truncate(time.Second))
	h.Status.BootSlots = &infrav1.BootSlots{Active: infrav1.SlotA,
		A: &infrav1.SlotContent{ImageURL: h.Spec.Claim.Image.URL, Checksum: h.Spec.Claim.Image.Checksum, InstalledAt: &now}}
	return Outcome{Done: true}, nil
}

// Deprovision powers the host off (a real backend wipes first).
func (Simulated) Deprovision(_ context.Context, _ *infrav1.AnvilHost, _ infrav1.WipePolicy, run BMCRunner) (Outcome, error) {
	err := run("power-off", func(ctx context.Context, c bmc.Client) error {
		return c.SetPower(ctx, bmc.PowerActionOff)
	})
	if err != nil {
		return Outcome{}, err
	}
	return Outcome{Done: true}, nil
}

// Inspect is done at once and reports nothing: there is no agent to report an inventory (and
// none is made up), so the host keeps what its BMC reports.
func (Simulated) Inspect(context.Context, *infrav1.AnvilHost, BMCRunner) (Outcome, error) {
	return Outcome{Done: true}, nil
}

// PowerCycleOrOn reboots a running server or starts a stopped one: BMCs refuse a power cycle
// of a server that is off (Redfish answers "not supported in present state").
func PowerCycleOrOn(ctx context.Context, c bmc.Client) error {
	power, err := c.PowerState(ctx)
	if err != nil {
		return err
	}
	if power == infrav1.PowerOff {
		return c.SetPower(ctx, bmc.PowerActionOn)
	}
	return c.SetPower(ctx, bmc.PowerActionCycle)
}
