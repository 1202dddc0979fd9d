// Command anvil is Anvil's operator tool. Its one subcommand, demo (also called lab), runs
// the whole physical lifecycle on this machine: an embedded management plane, Cluster API's
// controllers, Anvil, and emulated servers that network-boot the real agent (see README.md).
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log"
	"os"
	"os/signal"
	"path/filepath"
	"syscall"

	"github.com/go-logr/logr"
	"go.uber.org/zap/zapcore"
	"k8s.io/klog/v2"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/log/zap"
)

func main() {
	if len(os.Args) < 2 || (os.Args[1] != "demo" && os.Args[1] != "lab") {
		fmt.Fprintln(os.Stderr, "usage: anvil demo [flags]   (anvil demo -h lists them)")
		os.Exit(2)
	}
	opts := defaultLabOptions()
	fs := flag.NewFlagSet("anvil "+os.Args[1], flag.ExitOnError)
	fs.IntVar(&opts.Servers, "servers", opts.Servers, "emulated servers to rack (Redfish and IPMI BMCs mixed, over 3 zones)")
	fs.IntVar(&opts.ControlPlanes, "control-planes", opts.ControlPlanes, "control-plane machines of the demo cluster (1, 3 or 5)")
	fs.IntVar(&opts.Workers, "workers", opts.Workers, "worker machines of the demo cluster (at least 1: one is scaled down, one fails)")
	fs.BoolVar(&opts.Keep, "keep", false, "leave the lab running at the end and print a kubeconfig for kubectl")
	fs.BoolVar(&opts.VM, "vm", false, "make servers qemu VMs that PXE-boot the real agent (make agent-image), install a bootable image and boot it (needs root and qemu)")
	fs.IntVar(&opts.VMs, "vms", 1, "with --vm: how many servers are qemu VMs (1 or 2)")
	logFile := fs.String("log-file", "", "write the controllers' logs (Anvil's and Cluster API's) to this file")
	_ = fs.Parse(os.Args[2:])
	opts.Out = os.Stdout
	opts.Live = isTerminal(os.Stdout)

	if *logFile == "" {
		quietLogs()
	} else {
		f, err := os.Create(filepath.Clean(*logFile)) //nolint:gosec // the operator names the file
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(2)
		}
		defer func() { _ = f.Close() }()
		logger := zap.New(zap.WriteTo(f), zap.UseDevMode(false), zap.Level(zapcore.Level(-2)))
		ctrl.SetLogger(logger)
		klog.SetLogger(logger)
		log.SetOutput(f)
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := runLab(ctx, opts); err != nil {
		if errors.Is(err, context.Canceled) {
			fmt.Fprintln(os.Stderr, "lab interrupted")
		} else {
			fmt.Fprintln(os.Stderr, "lab failed:", err)
		}
		os.Exit(1)
	}
}

// quietLogs silences the controllers: their logs would drown the lab's own progress, and
// errors surface through it. net/http servers without an ErrorLog (the in-memory workload API
// server's) write to the standard logger, e.g. "superfluous response.WriteHeader call" for
// every watch they end, and TLS handshakes refused before a workload cluster has booted.
func quietLogs() {
	ctrl.SetLogger(logr.Discard())
	klog.SetLogger(logr.Discard())
	log.SetOutput(io.Discard)
}

func isTerminal(f *os.File) bool {
	fi, err := f.Stat()
	return err == nil && fi.Mode()&os.ModeCharDevice != 0 && os.Getenv("TERM") != "dumb"
}
