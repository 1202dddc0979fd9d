package bmc

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"slices"
	"strings"
	"time"

	"github.com/stmcginnis/gofish"
	"github.com/stmcginnis/gofish/redfish"

	infrav1 "github.com/anvil-metal/cluster-api-provider-anvil/api/v1alpha1"
)

// logoutTimeout bounds the logout that ends a session, on every path.
const logoutTimeout = 5 * time.Second

// redfishClient is one Redfish session, through gofish: one login, reused for power, boot,
// inventory and virtual media, over kept-alive connections. The ComputerSystem is read
// directly by its path (one GET), not found by listing the Systems collection each time.
type redfishClient struct {
	api        *gofish.APIClient
	transport  *sessionTransport
	target     Target
	systemPath string
}

// DialRedfish logs in to a Redfish BMC and returns the session.
func DialRedfish(ctx context.Context, t Target) (Client, error) {
	if t.Timeout <= 0 {
		t.Timeout = 30 * time.Second
	}
	transport := &sessionTransport{base: newHTTPTransport(t)}
	c := &redfishClient{transport: transport, target: t, systemPath: t.Address.SystemPath}
	err := c.call(ctx, func() error {
		// The session outlives this call: gofish keeps the context it connects with for every
		// later request, so give it one that is never cancelled; each operation's own context
		// bounds its requests through the transport.
		api, err := gofish.ConnectContext(context.WithoutCancel(ctx), gofish.ClientConfig{
			Endpoint: t.Address.BaseURL(), Username: t.Username, Password: t.Password,
			HTTPClient: &http.Client{Transport: transport, Timeout: t.Timeout},
		})
		if err != nil {
			return err
		}
		c.api = api
		if c.systemPath == "" {
			systems, err := api.Service.Systems()
			if err != nil {
				return err
			}
			if len(systems) == 0 {
				return fmt.Errorf("%w: the BMC lists no ComputerSystem", ErrBMC)
			}
			c.systemPath = strings.TrimRight(systems[0].ODataID, "/")
		}
		return nil
	})
	if err != nil {
		_ = c.Close(ctx) // logs out if the login got that far
		return nil, err
	}
	return c, nil
}

// call runs fn, whose requests are bounded by the call timeout, and classifies its error
// with the password redacted.
func (c *redfishClient) call(ctx context.Context, fn func() error) error {
	ctx, cancel := context.WithTimeout(ctx, c.target.Timeout)
	defer cancel()
	defer c.transport.begin(ctx)()
	err := fn()
	if err == nil && ctx.Err() != nil {
		// Cut short by the deadline: inventory skips what it cannot read, so a partial read
		// must not pass for a whole one.
		err = ctx.Err()
	}
	return classify(redact(err, c.target.Password))
}

func (c *redfishClient) system() (*redfish.ComputerSystem, error) {
	return redfish.GetComputerSystem(c.api, c.systemPath)
}

// maxSystemBytes bounds a ComputerSystem read for its power state (real ones are a few KiB).
const maxSystemBytes = 1 << 20

// PowerState reads the system's PowerState alone. It is the steady-state poll of every host,
// so it does not decode the whole ComputerSystem through gofish (which also keeps a raw copy
// for later updates) only to look at one property.
func (c *redfishClient) PowerState(ctx context.Context) (infrav1.PowerState, error) {
	power := infrav1.PowerUnknown
	err := c.call(ctx, func() error {
		resp, err := c.api.Get(c.systemPath)
		if err != nil {
			return err
		}
		defer resp.Body.Close()
		raw, err := io.ReadAll(io.LimitReader(resp.Body, maxSystemBytes))
		if err != nil {
			return err
		}
		var sys struct{ PowerState string }
		if err := json.Unmarshal(raw, &sys); err != nil {
			return fmt.Errorf("%w: %s is not a ComputerSystem: %w", ErrBMC, c.systemPath, err)
		}
		power = NormalizePowerState(sys.PowerState)
		return nil
	})
	return power, err
}

// SetPower asks for the power change; a server already in the wanted state is left alone,
// as BMCs refuse some actions then (e.g. ForceOff of a server that is off).
func (c *redfishClient) SetPower(ctx context.Context, action PowerAction) error {
	reset, ok := resetTypes[action]
	if !ok {
		return fmt.Errorf("%w: power action %q", ErrUnsupported, action)
	}
	return c.call(ctx, func() error {
		sys, err := c.system()
		if err != nil {
			return err
		}
		switch power := NormalizePowerState(string(sys.PowerState)); {
		case action == PowerActionOn && power == infrav1.PowerOn,
			(action == PowerActionOff || action == PowerActionSoftOff) && power == infrav1.PowerOff:
			return nil
		}
		return sys.Reset(reset)
	})
}

// resetTypes maps power actions to ComputerSystem.Reset types (ForceRestart for a cycle: the
// older and more widely supported of the two).
var resetTypes = map[PowerAction]redfish.ResetType{
	PowerActionOn:      redfish.OnResetType,
	PowerActionOff:     redfish.ForceOffResetType,
	PowerActionSoftOff: redfish.GracefulShutdownResetType,
	PowerActionCycle:   redfish.ForceRestartResetType,
}

func (c *redfishClient) SetBootDevice(ctx context.Context, device BootDevice, opts BootOptions) error {
	target := redfish.PxeBootSourceOverrideTarget
	switch device {
	case BootPXE:
	case BootDisk:
		target = redfish.HddBootSourceOverrideTarget
	default:
		return fmt.Errorf("%w: boot device %q", ErrUnsupported, device)
	}
	enabled := redfish.OnceBootSourceOverrideEnabled
	if opts.Persistent {
		enabled = redfish.ContinuousBootSourceOverrideEnabled
	}
	mode := redfish.LegacyBootSourceOverrideMode
	if opts.UEFI {
		mode = redfish.UEFIBootSourceOverrideMode
	}
	return c.call(ctx, func() error {
		sys, err := c.system()
		if err != nil {
			return err
		}
		boot := redfish.Boot{BootSourceOverrideTarget: target, BootSourceOverrideEnabled: enabled, BootSourceOverrideMode: mode}
		if err := sys.SetBoot(boot); err != nil {
			// Some BMCs refuse BootSourceOverrideMode in the same PATCH (HPE Gen10 among them):
			// try once more with the target and its lifetime only.
			if retryErr := sys.SetBoot(redfish.Boot{BootSourceOverrideTarget: target, BootSourceOverrideEnabled: enabled}); retryErr != nil {
				return err
			}
		}
		return nil
	})
}

func (c *redfishClient) Inventory(ctx context.Context) (*infrav1.HardwareInventory, error) {
	var inv *infrav1.HardwareInventory
	err := c.call(ctx, func() error {
		sys, err := c.system()
		if err != nil {
			return err
		}
		inv = redfishInventory(sys)
		return nil
	})
	return inv, err
}

// InsertVirtualMedia mounts url on the system's first virtual CD drive, after ejecting
// whatever any of its CD drives holds (BMCs refuse to insert over a mounted image, and a
// stale image on a second drive could be booted instead); "" only ejects.
func (c *redfishClient) InsertVirtualMedia(ctx context.Context, url string) error {
	return c.call(ctx, func() error {
		drives, err := c.virtualCDs()
		if err != nil {
			return err
		}
		for _, vm := range drives {
			if vm.Inserted && vm.SupportsMediaEject {
				if err := vm.EjectMedia(); err != nil {
					return fmt.Errorf("ejecting virtual media %s: %w", vm.ID, err)
				}
			}
		}
		if url == "" {
			return nil
		}
		if err := drives[0].InsertMedia(url, true, true); err != nil {
			// Some BMCs reject the Inserted and WriteProtected parameters: the image alone.
			if retryErr := drives[0].InsertMediaConfig(redfish.VirtualMediaConfig{Image: url}); retryErr != nil {
				return err
			}
		}
		return nil
	})
}

// virtualCDs lists the CD/DVD drives of the system's managers in a stable order (gofish
// fetches collection members concurrently, so they arrive in any order).
func (c *redfishClient) virtualCDs() ([]*redfish.VirtualMedia, error) {
	sys, err := c.system()
	if err != nil {
		return nil, err
	}
	managers, err := sys.ManagedBy()
	if err != nil {
		return nil, err
	}
	if len(managers) == 0 {
		if managers, err = c.api.Service.Managers(); err != nil {
			return nil, err
		}
	}
	var drives []*redfish.VirtualMedia
	for _, m := range managers {
		media, err := m.VirtualMedia()
		if err != nil {
			return nil, err
		}
		for _, vm := range media {
			if slices.Contains(vm.MediaTypes, redfish.CDMediaType) || slices.Contains(vm.MediaTypes, redfish.DVDMediaType) {
				drives = append(drives, vm)
			}
		}
	}
	if len(drives) == 0 {
		return nil, fmt.Errorf("%w: the BMC has no virtual CD drive", ErrUnsupported)
	}
	slices.SortFunc(drives, func(a, b *redfish.VirtualMedia) int { return strings.Compare(a.ODataID, b.ODataID) })
	return drives, nil
}

// Close logs out (deletes the session on the BMC) and drops the connections.
func (c *redfishClient) Close(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), min(c.target.Timeout, logoutTimeout))
	defer cancel()
	end := c.transport.begin(ctx)
	defer end()
	if c.api != nil {
		c.api.Logout() // also closes idle connections
	}
	c.transport.close()
	return nil
}
