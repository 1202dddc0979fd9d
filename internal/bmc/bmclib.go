package bmc

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"time"

	bmclib "github.com/bmc-toolbox/bmclib/v2"
	"github.com/go-logr/logr"

	infrav1 "github.com/anvil-metal/cluster-api-provider-anvil/api/v1alpha1"
)

// IPMICipherSuite is given to ipmitool on every call: without an explicit suite ipmitool
// spends about ten seconds discovering one on each invocation.
const IPMICipherSuite = "3"

// DialIPMI opens an IPMI session through bmclib/v2's ipmitool provider, the only provider
// enabled, so a failure is never masked by a fallback to another protocol. (Redfish goes
// through DialRedfish, which keeps one login and its connections for the whole session.)
func DialIPMI(ctx context.Context, t Target) (Client, error) {
	if t.Address.Protocol != IPMI {
		return nil, fmt.Errorf("%w: protocol %q through bmclib", ErrUnsupported, t.Address.Protocol)
	}
	if t.Timeout <= 0 {
		t.Timeout = 30 * time.Second
	}
	c := bmclib.NewClient(t.Address.Host, t.Username, t.Password,
		bmclib.WithLogger(logr.Discard()), // bmclib logs request details we don't control
		bmclib.WithPerProviderTimeout(t.Timeout),
		bmclib.WithIpmitoolPort(strconv.Itoa(t.Address.Port)),
		bmclib.WithIpmitoolCipherSuite(IPMICipherSuite),
	)
	// Registry.For keeps exactly the one driver named.
	c.Registry.Drivers = c.Registry.For("ipmitool")
	openCtx, cancel := context.WithTimeout(ctx, t.Timeout)
	defer cancel()
	if err := c.Open(openCtx); err != nil {
		_ = c.Close(context.Background())
		return nil, classify(redact(err, t.Password))
	}
	// bmclib's Open succeeds for ipmitool without talking to the BMC (it only checks the
	// binary); one power read proves reachability and credentials before we call it a session.
	bc := &bmclibClient{c: c, target: t}
	if _, err := bc.PowerState(openCtx); err != nil {
		_ = c.Close(context.Background())
		return nil, err
	}
	return bc, nil
}

type bmclibClient struct {
	c      *bmclib.Client
	target Target
}

func (b *bmclibClient) call(ctx context.Context) (context.Context, context.CancelFunc) {
	return context.WithTimeout(ctx, b.target.Timeout)
}

func (b *bmclibClient) err(err error) error { return classify(redact(err, b.target.Password)) }

func (b *bmclibClient) PowerState(ctx context.Context) (infrav1.PowerState, error) {
	ctx, cancel := b.call(ctx)
	defer cancel()
	raw, err := b.c.GetPowerState(ctx)
	if err != nil {
		return infrav1.PowerUnknown, b.err(err)
	}
	return NormalizePowerState(raw), nil
}

// NormalizePowerState maps what providers return — Redfish's "On"/"Off"/"PoweringOn", and
// ipmitool's raw "Chassis Power is on\n" — onto the API's values.
func NormalizePowerState(raw string) infrav1.PowerState {
	s := strings.ToLower(strings.TrimSpace(raw))
	s = strings.TrimPrefix(s, "chassis power is ")
	switch s {
	case "on", "poweringoff": // still drawing power until it is off
		return infrav1.PowerOn
	case "off", "poweringon":
		return infrav1.PowerOff
	default:
		return infrav1.PowerUnknown
	}
}

func (b *bmclibClient) SetPower(ctx context.Context, action PowerAction) error {
	ctx, cancel := b.call(ctx)
	defer cancel()
	ok, err := b.c.SetPowerState(ctx, string(action))
	if err != nil {
		return b.err(err)
	}
	if !ok {
		return fmt.Errorf("%w: power %s not acknowledged", ErrBMC, action)
	}
	return nil
}

func (b *bmclibClient) SetBootDevice(ctx context.Context, device BootDevice, opts BootOptions) error {
	ctx, cancel := b.call(ctx)
	defer cancel()
	ok, err := b.c.SetBootDevice(ctx, string(device), opts.Persistent, opts.UEFI)
	if err != nil {
		return b.err(err)
	}
	if !ok {
		return fmt.Errorf("%w: boot device %s not acknowledged", ErrBMC, device)
	}
	return nil
}

// Inventory reads the FRU: bmclib's ipmitool provider has no inventory of its own.
func (b *bmclibClient) Inventory(ctx context.Context) (*infrav1.HardwareInventory, error) {
	ctx, cancel := b.call(ctx)
	defer cancel()
	return ipmiFRUInventory(ctx, b.target)
}

func (b *bmclibClient) InsertVirtualMedia(context.Context, string) error {
	return fmt.Errorf("%w: virtual media needs Redfish", ErrUnsupported)
}

func (b *bmclibClient) Close(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	return b.err(b.c.Close(ctx))
}

// ipmiFRUInventory runs `ipmitool fru print` with the password in the environment (-E), not
// on the command line where every user of the machine could read it in ps.
func ipmiFRUInventory(ctx context.Context, t Target) (*infrav1.HardwareInventory, error) {
	cmd := exec.CommandContext(ctx, "ipmitool", "-I", "lanplus", "-C", IPMICipherSuite, //nolint:gosec // fixed program, arguments from a parsed address
		"-H", t.Address.Host, "-p", strconv.Itoa(t.Address.Port), "-U", t.Username, "-E", "fru", "print", "0")
	cmd.Env = append(os.Environ(), "IPMI_PASSWORD="+t.Password)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		return nil, classify(redact(fmt.Errorf("ipmitool fru print: %w: %s", err, strings.TrimSpace(stderr.String())), t.Password))
	}
	return parseFRU(out), nil
}

// parseFRU reads ipmitool's "Key : Value" FRU listing.
func parseFRU(out []byte) *infrav1.HardwareInventory {
	inv := &infrav1.HardwareInventory{Source: "OutOfBand"}
	sc := bufio.NewScanner(bytes.NewReader(out))
	for sc.Scan() {
		key, value, ok := strings.Cut(sc.Text(), ":")
		if !ok {
			continue
		}
		key, value = strings.TrimSpace(key), strings.TrimSpace(value)
		switch key {
		case "Product Manufacturer", "Board Mfg":
			if inv.System.Manufacturer == "" {
				inv.System.Manufacturer = value
			}
		case "Product Name", "Board Product":
			if inv.System.Model == "" {
				inv.System.Model = value
			}
		case "Product Serial", "Board Serial":
			if inv.System.SerialNumber == "" {
				inv.System.SerialNumber = value
			}
		case "Product Version":
			inv.System.Firmware = value
		}
	}
	return inv
}
