package bmc

import (
	"context"
	"sync"

	infrav1 "github.com/anvil-metal/cluster-api-provider-anvil/api/v1alpha1"
)

// FakeBMC is an in-memory BMC for unit tests of the pool and the controllers. Its Dial
// method is a Dialer.
type FakeBMC struct {
	mu sync.Mutex
	// Password is the one login accepted.
	Password string
	// Fail, if set, is returned by every call (login included) instead of doing it.
	Fail error
	// Power is the current power state.
	Power infrav1.PowerState
	// Boot is the last boot override set.
	Boot BootDevice
	// Hardware is what Inventory returns.
	Hardware *infrav1.HardwareInventory

	Logins, Logouts, FailedLogins, Calls int
}

// Dial opens a fake session.
func (f *FakeBMC) Dial(_ context.Context, t Target) (Client, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.Fail != nil {
		return nil, f.Fail
	}
	if t.Password != f.Password {
		f.FailedLogins++
		return nil, wrap(ErrAuth, errString("401 Unauthorized"))
	}
	f.Logins++
	return &fakeClient{bmc: f}, nil
}

// Counts returns (logins, logouts, failed logins, calls) under the lock.
func (f *FakeBMC) Counts() (logins, logouts, failedLogins, calls int) {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.Logins, f.Logouts, f.FailedLogins, f.Calls
}

// SetFail changes the injected failure.
func (f *FakeBMC) SetFail(err error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.Fail = err
}

type errString string

func (e errString) Error() string { return string(e) }

type fakeClient struct{ bmc *FakeBMC }

func (c *fakeClient) do(fn func(f *FakeBMC)) error {
	c.bmc.mu.Lock()
	defer c.bmc.mu.Unlock()
	c.bmc.Calls++
	if c.bmc.Fail != nil {
		return c.bmc.Fail
	}
	fn(c.bmc)
	return nil
}

func (c *fakeClient) PowerState(context.Context) (infrav1.PowerState, error) {
	var p infrav1.PowerState
	err := c.do(func(f *FakeBMC) { p = f.Power })
	return p, err
}

func (c *fakeClient) SetPower(_ context.Context, a PowerAction) error {
	return c.do(func(f *FakeBMC) {
		switch a {
		case PowerActionOn, PowerActionCycle:
			f.Power = infrav1.PowerOn
		case PowerActionOff, PowerActionSoftOff:
			f.Power = infrav1.PowerOff
		}
	})
}

func (c *fakeClient) SetBootDevice(_ context.Context, d BootDevice, _ BootOptions) error {
	return c.do(func(f *FakeBMC) { f.Boot = d })
}

func (c *fakeClient) Inventory(context.Context) (*infrav1.HardwareInventory, error) {
	var inv *infrav1.HardwareInventory
	err := c.do(func(f *FakeBMC) { inv = f.Hardware.DeepCopy() })
	return inv, err
}

func (c *fakeClient) InsertVirtualMedia(context.Context, string) error {
	return c.do(func(*FakeBMC) {})
}

func (c *fakeClient) Close(context.Context) error {
	c.bmc.mu.Lock()
	defer c.bmc.mu.Unlock()
	c.bmc.Logouts++
	return nil
}
