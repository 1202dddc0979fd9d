package ipmi

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// helperEnv makes the test binary a process that starts a BMC, prints
// ipmi_sim's pid and waits to be killed.
const helperEnv = "ANVIL_IPMI_TEST_HELPER"

func TestMain(m *testing.M) {
	if os.Getenv(helperEnv) == "1" {
		b, err := Start(context.Background(), Config{})
		if err != nil {
			fmt.Println("error", err)
			os.Exit(1)
		}
		fmt.Println("pid", b.pid(), b.tmpDir)
		select {}
	}
	os.Exit(m.Run())
}

// TestNoLeakWhenOwnerDies kills the process that owns a BMC without letting
// it clean up, as a test binary killed by a timeout is: ipmi_sim must go too.
func TestNoLeakWhenOwnerDies(t *testing.T) {
	if _, err := exec.LookPath("ipmi_sim"); err != nil {
		t.Skip("skipping: ipmi_sim is not installed")
	}
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), helperEnv+"=1")
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { _ = cmd.Process.Kill(); _ = cmd.Wait() }()
	line, err := bufio.NewReader(stdout).ReadString('\n')
	if err != nil {
		t.Fatalf("helper: %v", err)
	}
	f := strings.Fields(line)
	if len(f) != 3 || f[0] != "pid" {
		t.Fatalf("helper said %q", line)
	}
	pid, _ := strconv.Atoi(f[1])
	// The helper dies without cleaning up its files.
	t.Cleanup(func() { _ = os.RemoveAll(f[2]) })
	if !alive(pid) {
		t.Fatalf("ipmi_sim %d not running", pid)
	}
	if err := cmd.Process.Signal(syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	_ = cmd.Wait()
	deadline := time.Now().Add(5 * time.Second)
	for alive(pid) {
		if time.Now().After(deadline) {
			_ = syscall.Kill(-pid, syscall.SIGKILL)
			t.Fatalf("ipmi_sim %d outlived its owner", pid)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// TestManyBMCs runs BMCs side by side, as the lab (3) and benchmarks (more)
// do, and reports what each costs.
func TestManyBMCs(t *testing.T) {
	needIpmitool(t)
	n := 12
	if testing.Short() {
		n = 3
	}
	bmcs := make([]*BMC, n)
	errs := make([]error, n)
	start := time.Now()
	var wg sync.WaitGroup
	for i := range bmcs {
		wg.Go(func() {
			bmcs[i], errs[i] = Start(context.Background(), Config{Username: testUser, Password: testPassword})
		})
	}
	wg.Wait()
	for i, b := range bmcs {
		if b != nil {
			t.Cleanup(func() {
				if err := b.Stop(); err != nil {
					t.Errorf("Stop: %v", err)
				}
			})
		} else if errors.Is(errs[i], ErrNotInstalled) {
			t.Skip(errs[i])
		} else {
			t.Fatal(errs[i])
		}
	}
	t.Logf("%d BMCs started in %v", n, time.Since(start).Round(time.Millisecond))

	var rss int
	for _, b := range bmcs {
		rss += rssKiB(t, b.pid())
	}
	t.Logf("ipmi_sim RSS: %d KiB on average", rss/n)

	// Each answers for its own machine.
	for i, b := range bmcs {
		if i%2 == 0 {
			mustIpmitool(t, b, "chassis", "power", "on")
		}
	}
	for i, b := range bmcs {
		want := map[bool]string{true: "Chassis Power is on\n", false: "Chassis Power is off\n"}[i%2 == 0]
		if out := mustIpmitool(t, b, "chassis", "power", "status"); out != want {
			t.Errorf("BMC %d: %q, want %q", i, out, want)
		}
	}
}

// rssKiB reads a process's resident set size.
func rssKiB(t testing.TB, pid int) int {
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(string(data), "\n") {
		if v, ok := strings.CutPrefix(line, "VmRSS:"); ok {
			kib, _ := strconv.Atoi(strings.TrimSuffix(strings.TrimSpace(v), " kB"))
			return kib
		}
	}
	t.Fatal("no VmRSS")
	return 0
}

// BenchmarkIpmitoolStatus is one ipmitool call (a whole RMCP+ session) that
// does not reach the hook.
func BenchmarkIpmitoolStatus(b *testing.B) {
	needIpmitool(b)
	bmc := startBMC(b, Config{})
	for b.Loop() {
		mustIpmitool(b, bmc, "mc", "info")
	}
}

// BenchmarkIpmitoolPowerStatus goes through the hook to the Machine.
func BenchmarkIpmitoolPowerStatus(b *testing.B) {
	needIpmitool(b)
	bmc := startBMC(b, Config{})
	for b.Loop() {
		mustIpmitool(b, bmc, "chassis", "power", "status")
	}
}

// BenchmarkIpmitoolBootdev sets the boot device (two hook calls and the trace).
func BenchmarkIpmitoolBootdev(b *testing.B) {
	needIpmitool(b)
	bmc := startBMC(b, Config{})
	for b.Loop() {
		mustIpmitool(b, bmc, "chassis", "bootdev", "pxe", "options=efiboot")
	}
}

// BenchmarkStartStop is the cost of one BMC's life.
func BenchmarkStartStop(b *testing.B) {
	for b.Loop() {
		bmc, err := Start(context.Background(), Config{})
		if err != nil {
			b.Skip(err)
		}
		if err := bmc.Stop(); err != nil {
			b.Fatal(err)
		}
	}
}

// alive reports whether process pid runs. An orphan that has exited stays a
// zombie until init reaps it, which may take a while in containers.
func alive(pid int) bool {
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return false
	}
	return !strings.Contains(string(data), "\nState:\tZ")
}
