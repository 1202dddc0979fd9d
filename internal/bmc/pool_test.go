package bmc

import (
	"context"
	"errors"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	infrav1 "github.com/anvil-metal/cluster-api-provider-anvil/api/v1alpha1"
)

// fakeClock is a settable clock for back-off tests.
type fakeClock struct {
	mu  sync.Mutex
	now time.Time
}

func (c *fakeClock) Now() time.Time { c.mu.Lock(); defer c.mu.Unlock(); return c.now }
func (c *fakeClock) Advance(d time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.now = c.now.Add(d)
}

func target(password string) Target {
	a, _ := ParseAddress("redfish+http://127.0.0.1:8000/redfish/v1/Systems/1")
	return Target{Address: a, Username: "admin", Password: password}
}

func readPower(ctx context.Context, c Client) error { _, err := c.PowerState(ctx); return err }

func newTestPool(f *FakeBMC, clock *fakeClock) *Pool {
	return NewPool(PoolOptions{Dial: f.Dial, Now: clock.Now, BackoffBase: time.Second, BackoffMax: time.Minute, AuthHoldOff: 15 * time.Minute})
}

func TestPoolReusesOneSession(t *testing.T) {
	f := &FakeBMC{Password: "pw", Power: infrav1.PowerOn}
	p := newTestPool(f, &fakeClock{now: time.Unix(0, 0)})
	for range 5 {
		if err := p.Do(context.Background(), "ns/h", target("pw"), "power", readPower); err != nil {
			t.Fatal(err)
		}
	}
	if logins, _, _, calls := f.Counts(); logins != 1 || calls != 5 {
		t.Fatalf("logins=%d calls=%d, want 1 login for 5 calls", logins, calls)
	}
}

func TestPoolRotatedCredentialsOpenNewSession(t *testing.T) {
	f := &FakeBMC{Password: "old"}
	p := newTestPool(f, &fakeClock{now: time.Unix(0, 0)})
	ctx := context.Background()
	if err := p.Do(ctx, "ns/h", target("old"), "power", readPower); err != nil {
		t.Fatal(err)
	}
	f.mu.Lock()
	f.Password = "new"
	f.mu.Unlock()
	if err := p.Do(ctx, "ns/h", target("new"), "power", readPower); err != nil {
		t.Fatal(err)
	}
	if logins, logouts, _, _ := f.Counts(); logins != 2 || logouts != 1 {
		t.Fatalf("logins=%d logouts=%d, want the old session closed and a new one opened", logins, logouts)
	}
}

func TestPoolNeverStormsAWrongPassword(t *testing.T) {
	f := &FakeBMC{Password: "right"}
	clock := &fakeClock{now: time.Unix(0, 0)}
	p := newTestPool(f, clock)
	ctx := context.Background()

	err := p.Do(ctx, "ns/h", target("wrong"), "power", readPower)
	if !errors.Is(err, ErrAuth) {
		t.Fatalf("first attempt: %v, want ErrAuth", err)
	}
	// Reconciles keep coming (every few seconds for 14 minutes): none may try to log in.
	for range 100 {
		clock.Advance(8 * time.Second)
		err = p.Do(ctx, "ns/h", target("wrong"), "power", readPower)
		if !errors.Is(err, ErrBackoff) || !errors.Is(err, ErrAuth) {
			t.Fatalf("during hold-off: %v, want a back-off that names the auth failure", err)
		}
	}
	if _, _, failed, _ := f.Counts(); failed != 1 {
		t.Fatalf("%d failed logins, want exactly 1 within the hold-off", failed)
	}
	// Fixing the Secret is tried at once, without waiting out the hold-off.
	if err := p.Do(ctx, "ns/h", target("right"), "power", readPower); err != nil {
		t.Fatalf("after the Secret was fixed: %v", err)
	}
}

func TestPoolBacksOffExponentiallyAndRecovers(t *testing.T) {
	f := &FakeBMC{Password: "pw"}
	clock := &fakeClock{now: time.Unix(0, 0)}
	p := newTestPool(f, clock)
	ctx := context.Background()
	if err := p.Do(ctx, "ns/h", target("pw"), "power", readPower); err != nil {
		t.Fatal(err)
	}
	f.SetFail(wrap(ErrUnreachable, errString("connection refused")))

	var delays []time.Duration
	for range 4 {
		err := p.Do(ctx, "ns/h", target("pw"), "power", readPower)
		if !errors.Is(err, ErrUnreachable) {
			t.Fatalf("got %v, want ErrUnreachable", err)
		}
		d := p.RetryAfter("ns/h")
		delays = append(delays, d)
		clock.Advance(d)
	}
	for i := 1; i < len(delays); i++ {
		// Doubling with ±25 % jitter: each delay is at least 1.2× the one before.
		if float64(delays[i]) < 1.2*float64(delays[i-1]) {
			t.Errorf("delays %v do not grow exponentially", delays)
		}
	}
	if _, logouts, _, _ := f.Counts(); logouts != 1 {
		t.Errorf("logouts=%d: the session must be closed after the first error", logouts)
	}

	f.SetFail(nil)
	if err := p.Do(ctx, "ns/h", target("pw"), "power", readPower); err != nil {
		t.Fatalf("after recovery: %v", err)
	}
	if p.RetryAfter("ns/h") != 0 {
		t.Error("success must clear the back-off")
	}
}

func TestPoolConcurrencyLimits(t *testing.T) {
	f := &FakeBMC{Password: "pw"}
	p := NewPool(PoolOptions{Dial: f.Dial, MaxConcurrent: 3})
	var perBMC [4]atomic.Int32
	var perBMCMax [4]atomic.Int32
	var global, globalMax atomic.Int32
	bump := func(cur, peak *atomic.Int32) {
		n := cur.Add(1)
		for {
			m := peak.Load()
			if n <= m || peak.CompareAndSwap(m, n) {
				return
			}
		}
	}
	var wg sync.WaitGroup
	for i := range 40 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			bmc := i % 4
			err := p.Do(context.Background(), []string{"a", "b", "c", "d"}[bmc], target("pw"), "power",
				func(context.Context, Client) error {
					bump(&perBMC[bmc], &perBMCMax[bmc])
					bump(&global, &globalMax)
					time.Sleep(2 * time.Millisecond)
					global.Add(-1)
					perBMC[bmc].Add(-1)
					return nil
				})
			if err != nil {
				t.Error(err)
			}
		}()
	}
	wg.Wait()
	for i := range perBMCMax {
		if perBMCMax[i].Load() != 1 {
			t.Errorf("BMC %d had %d operations in flight, want 1", i, perBMCMax[i].Load())
		}
	}
	if globalMax.Load() > 3 {
		t.Errorf("%d operations in flight, global cap is 3", globalMax.Load())
	}
}

func TestPoolClosesIdleSessions(t *testing.T) {
	f := &FakeBMC{Password: "pw"}
	clock := &fakeClock{now: time.Unix(0, 0)}
	p := NewPool(PoolOptions{Dial: f.Dial, Now: clock.Now, IdleTimeout: time.Minute})
	for _, key := range []string{"a", "b"} {
		if err := p.Do(context.Background(), key, target("pw"), "power", readPower); err != nil {
			t.Fatal(err)
		}
	}
	if n := p.closeIdle(context.Background(), time.Minute); n != 0 {
		t.Fatalf("closed %d fresh sessions", n)
	}
	clock.Advance(2 * time.Minute)
	if n := p.closeIdle(context.Background(), time.Minute); n != 2 || p.OpenSessions() != 0 {
		t.Fatalf("closed %d, %d still open; want both idle sessions logged out", n, p.OpenSessions())
	}
}

func TestErrorsNeverCarryThePassword(t *testing.T) {
	err := classify(redact(errors.New(`exit status 1: ipmitool -H 10.0.0.5 -U admin -P hunter2 power status`), "hunter2"))
	if strings.Contains(err.Error(), "hunter2") {
		t.Fatalf("password in error: %v", err)
	}
	if Reason(err) != "BMCError" {
		t.Errorf("reason %q", Reason(err))
	}
	if Reason(classify(errors.New("401 Unauthorized"))) != "BMCAuthFailed" ||
		Reason(classify(errors.New("dial tcp: connection refused"))) != "BMCUnreachable" ||
		Reason(classify(errors.New("x509: certificate signed by unknown authority"))) != "BMCTLSUntrusted" {
		t.Error("classification of common BMC errors is wrong")
	}
}

func TestNormalizePowerState(t *testing.T) {
	for raw, want := range map[string]infrav1.PowerState{
		"On": infrav1.PowerOn, "off": infrav1.PowerOff, "Chassis Power is on\n": infrav1.PowerOn,
		"Chassis Power is off\n": infrav1.PowerOff, "PoweringOn": infrav1.PowerOff, "???": infrav1.PowerUnknown,
	} {
		if got := NormalizePowerState(raw); got != want {
			t.Errorf("%q → %s, want %s", raw, got, want)
		}
	}
}
