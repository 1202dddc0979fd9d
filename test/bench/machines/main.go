// Command machines benchmarks Anvil's Cluster API side at scale: N AnvilHosts (emulated
// Redfish BMCs) and N AnvilMachines with the simulated provisioning backend, from the hosts'
// creation until every machine is provisioned. It prints the time, the manager's peak RSS and
// the manager's API writes per host, each against the target (≤ 5 minutes, ≤ 512 MiB,
// ≤ 15 writes per host for 5,000 of each on a 2-core machine).
//
//	go run ./test/bench/machines [-hosts 5000] [-machines N] [-clusters 50] [-tls=true] [-dir DIR]
//
// What runs where, so that what is measured is the manager alone:
//   - kube-apiserver and etcd, as envtest runs them (internal/mgmtplane);
//   - a child process serving the emulated BMCs (this binary re-executed);
//   - cmd/manager, built from this tree and run as deployed (--provisioner=simulated, no
//     webhooks, no leader election) with a ServiceAccount token bound to config/rbac, straight
//     to the API server. Its requests are the API server's own request metrics by verb and
//     resource, less this process's requests. Its VmHWM is the peak RSS.
//   - this process: creates the Secrets, hosts, Clusters, Machines and AnvilMachines with its
//     own client (counted, to be taken off) and follows them with its own informers.
//
// Cluster API's controllers do not run: the benchmark creates Machines with bootstrap data as
// they would, and nothing but Anvil writes to them. The exit status is non-zero only when the
// run broke; a missed target prints FAIL.
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"strings"
	"syscall"

	"go.uber.org/zap/zapcore"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/log/zap"
)

func main() {
	if bmcChildMain() {
		return
	}
	cfg := DefaultConfig()
	fs := flag.NewFlagSet("machines", flag.ExitOnError)
	fs.IntVar(&cfg.Hosts, "hosts", cfg.Hosts, "AnvilHosts (one emulated BMC each).")
	machines := fs.Int("machines", 0, "AnvilMachines (default: as many as hosts).")
	fs.IntVar(&cfg.Clusters, "clusters", cfg.Clusters, "Clusters the machines are spread over.")
	fs.BoolVar(&cfg.TLS, "tls", cfg.TLS, "BMCs over HTTPS (redfish+https://); false: redfish+http://.")
	fs.IntVar(&cfg.HostConcurrency, "anvilhost-concurrency", 0, "Manager's --anvilhost-concurrency (0: its default).")
	fs.IntVar(&cfg.MachineConcurrency, "anvilmachine-concurrency", 0, "Manager's --anvilmachine-concurrency (0: its default).")
	fs.IntVar(&cfg.BMCConcurrency, "bmc-max-concurrency", 0, "Manager's --bmc-max-concurrency (0: its default).")
	extra := fs.String("manager-args", "", "More manager flags, space-separated (e.g. --pprof-bind-address=127.0.0.1:6060).")
	fs.IntVar(&cfg.CreateWorkers, "create-workers", cfg.CreateWorkers, "Parallel creators.")
	fs.DurationVar(&cfg.Timeout, "timeout", cfg.Timeout, "Give up after this long.")
	fs.StringVar(&cfg.Dir, "dir", "", "Keep the manager's binary, log and kubeconfig here.")
	fs.DurationVar(&cfg.APIServerProfile, "apiserver-profile", 0, "Record a kube-apiserver CPU profile this long at the start of each phase into -dir (e.g. 30s).")
	fs.DurationVar(&cfg.APIServerProfileDelay, "apiserver-profile-delay", 0, "Start the provisioning phase's kube-apiserver profile this long into the window.")
	_ = fs.Parse(os.Args[1:])
	cfg.Machines = cfg.Hosts
	if *machines > 0 {
		cfg.Machines = *machines
	}
	if cfg.APIServerProfile > 0 && cfg.Dir == "" {
		fmt.Fprintln(os.Stderr, "-apiserver-profile writes into -dir: give -dir")
		os.Exit(2)
	}
	cfg.ExtraManagerArgs = strings.Fields(*extra)
	cfg.Progress = os.Stdout

	ctrl.SetLogger(zap.New(zap.WriteTo(os.Stderr), zap.Level(zapcore.ErrorLevel)))
	ctx, cancel := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer cancel()
	res, err := Run(ctx, cfg)
	if res != nil && res.ProvisionedCount > 0 {
		res.Print(os.Stdout)
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "benchmark failed:", err)
		cancel()
		os.Exit(1)
	}
}
