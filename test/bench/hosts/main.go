// Command hosts benchmarks the AnvilHost controller at fleet scale: N emulated Redfish BMCs
// registered and inspected to Available, then a steady-state window in which nothing changes.
// It prints wall time, the manager's peak RSS, API writes per host to Available, and API
// writes and BMC requests per host per hour in steady state, each against its target.
//
//	go run ./test/bench/hosts [-hosts 1000] [-steady 2m] [-time-scale 5] [-tls=true] [-profile DIR]
//
// Four kinds of process take part, so that what is measured is the manager alone:
//
//   - this one: starts the others, creates the Secrets and AnvilHosts (with its own client, not
//     counted) and watches the hosts to time them;
//   - kube-apiserver and etcd, as envtest runs them (internal/mgmtplane; binaries from
//     KUBEBUILDER_ASSETS or bin/envtest, which `make envtest` builds);
//   - a child running the emulated BMCs (internal/vbmc/redfish), which counts their requests;
//   - a child running the Anvil manager as cmd/manager wires it (AnvilHost controller, BMC
//     pool, Simulated provisioner, leader election, default concurrency and client settings),
//     with its API requests counted by a wrapped transport. Its VmHWM is the peak RSS reported.
//
// The children are this binary re-executed with a role in the environment; they exit when
// this process closes their stdin or dies.
//
// Time scale: the manager's periodic intervals (power sync 120 s, BMC session idle 5 min, BMC
// connection idle 90 s) are
// divided by -time-scale, so a short window covers a long stretch of production time;
// per-hour figures are scaled back. -time-scale 1 with -steady 11m runs the real defaults.
// The scale applies from the start, so hosts that are Available early are polled a little
// more often during onboarding than in production.
//
// The BMCs speak HTTPS (redfish+https://, verified against a CA bundle Secret), as
// production BMCs should; -tls=false uses redfish+http://. -profile DIR keeps the manager's
// CPU and heap profiles for onboarding and steady state, its log and result.json.
//
// Besides the targets, the report shows where the numbers come from: writes by request,
// reconciles and BMC operations per host, mean BMC latencies, CPU by process (and how busy
// the whole machine was), and how far the manager's informer cache lagged behind an idle
// watch on the same hosts.
//
// The exit status is non-zero only when the run broke or not every host became Available:
// missed targets print FAIL but exit 0, since timings on a shared machine are noisy.
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"syscall"

	"go.uber.org/zap/zapcore"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/log/zap"
)

func main() {
	if childMain() {
		return
	}
	cfg := DefaultConfig()
	fs := flag.NewFlagSet("hosts", flag.ExitOnError)
	fs.IntVar(&cfg.Hosts, "hosts", cfg.Hosts, "Emulated BMCs and AnvilHosts.")
	fs.DurationVar(&cfg.Steady, "steady", cfg.Steady, "Steady-state window (wall time).")
	fs.Float64Var(&cfg.TimeScale, "time-scale", cfg.TimeScale, "Divide the manager's periodic intervals by this (1: production defaults).")
	fs.BoolVar(&cfg.TLS, "tls", cfg.TLS, "Serve the BMCs over HTTPS (redfish+https://); false: redfish+http://.")
	fs.IntVar(&cfg.HostConcurrency, "anvilhost-concurrency", cfg.HostConcurrency, "Manager's --anvilhost-concurrency.")
	fs.IntVar(&cfg.BMCConcurrency, "bmc-max-concurrency", cfg.BMCConcurrency, "Manager's --bmc-max-concurrency.")
	qps := fs.Float64("kube-api-qps", 0, "Manager's client-side QPS limit (0: cmd/manager's, i.e. none).")
	fs.IntVar(&cfg.Burst, "kube-api-burst", 30, "Manager's client-side burst, with -kube-api-qps.")
	fs.BoolVar(&cfg.LeaderElect, "leader-elect", cfg.LeaderElect, "Run leader election, as cmd/manager does by default.")
	fs.IntVar(&cfg.MaxSessions, "bmc-max-sessions", cfg.MaxSessions, "Redfish sessions each emulated BMC allows (0: no cap).")
	fs.DurationVar(&cfg.Timeout, "timeout", cfg.Timeout, "Give up if not every host is Available by then.")
	fs.IntVar(&cfg.CreateWorkers, "create-workers", cfg.CreateWorkers, "Parallel creators of Secrets and hosts.")
	fs.StringVar(&cfg.ProfileDir, "profile", "", "Directory for the manager's CPU/heap profiles and log (kept).")
	_ = fs.Parse(os.Args[1:])
	cfg.QPS = float32(*qps)
	cfg.Progress = os.Stdout

	// envtest logs through controller-runtime's logger; keep only its errors.
	ctrl.SetLogger(zap.New(zap.WriteTo(os.Stderr), zap.Level(zapcore.ErrorLevel)))
	ctx, cancel := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer cancel()
	res, err := Run(ctx, cfg)
	if res != nil && res.Onboard.Duration > 0 {
		res.Print(os.Stdout)
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "benchmark failed:", err)
		if res != nil {
			for state, n := range res.NotAvailable {
				fmt.Fprintf(os.Stderr, "  %d hosts %s\n", n, state)
			}
			for _, e := range res.Errors {
				fmt.Fprintln(os.Stderr, "  ", e)
			}
		}
		cancel()
		os.Exit(1)
	}
}
