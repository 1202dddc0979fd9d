// Package e2e runs Anvil under Cluster API's own controllers: a real kube-apiserver and etcd
// (envtest) with CAPI's core, kubeadm bootstrap and kubeadm control-plane reconcilers running
// in this process, exactly as their binaries set them up; Anvil's host, machine and cluster
// controllers against emulated Redfish BMCs with the Simulated provisioner; and CAPI's
// in-memory API server and etcd as the workload clusters, where internal/workload's Kubelet
// registers a Node (and, for control-plane machines, static pods and an etcd member) for
// every host that Anvil provisions.
//
// Cluster API's controllers and the workload server live for the whole package; each test
// runs its own Anvil manager, BMCs and namespace, and removes them when it ends. The move test
// adds a second management cluster (API server, Cluster API's controllers, Anvil) as the
// target of clusterctl's own move code.
//
// The suite is part of `make test` (about 3.5 minutes on two cores); `make test-e2e` runs it
// alone.
package e2e

import (
	"context"
	"fmt"
	"io"
	"log"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"go.uber.org/zap/zapcore"
	"k8s.io/klog/v2"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/log/zap"

	"github.com/anvil-metal/cluster-api-provider-anvil/internal/capistack"
	"github.com/anvil-metal/cluster-api-provider-anvil/internal/mgmtplane"
	"github.com/anvil-metal/cluster-api-provider-anvil/internal/workload"
)

var (
	// env is the management cluster: a real API server with CAPI's and Anvil's CRDs.
	env *mgmtplane.Environment
	// workloads serves every test's workload cluster.
	workloads *workload.Server
	// logPath is where controller logs go (errors only, unless ANVIL_TEST_VERBOSE is set).
	logPath string
)

func TestMain(m *testing.M) { os.Exit(run(m)) }

func run(m *testing.M) int {
	logFile, err := os.CreateTemp("", "anvil-e2e-*.log")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	logPath = logFile.Name()
	var out io.Writer = logFile
	level := zapcore.ErrorLevel
	if os.Getenv("ANVIL_TEST_VERBOSE") != "" {
		out, level = io.MultiWriter(logFile, os.Stderr), zapcore.Level(-4)
	}
	logger := zap.New(zap.UseDevMode(false), zap.WriteTo(out), zap.Level(level))
	ctrl.SetLogger(logger)
	klog.SetLogger(logger)
	// net/http servers without an ErrorLog (the in-memory API server's) write to the standard
	// logger, e.g. "superfluous response.WriteHeader call" for every watch it ends.
	log.SetOutput(logFile)

	start := time.Now()
	env, err = mgmtplane.Start()
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	defer func() { _ = env.Stop() }()
	workloads, err = workload.Start(workload.Options{})
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	capi, err := capistack.Start(env.Config, capistack.Options{Workloads: workloads})
	if err != nil {
		fmt.Fprintln(os.Stderr, "starting Cluster API's controllers:", err)
		return 1
	}
	fmt.Fprintf(os.Stderr, "management plane and Cluster API controllers up in %s; controller logs in %s\n",
		time.Since(start).Round(100*time.Millisecond), logPath)

	code := m.Run()

	// Controllers first, then the workload server they talk to (its shutdown waits for open
	// connections), then the API server.
	if err := capi.Stop(time.Minute); err != nil {
		fmt.Fprintln(os.Stderr, "stopping Cluster API's controllers:", err)
		code = 1
	}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	if err := workloads.Stop(ctx); err != nil {
		fmt.Fprintln(os.Stderr, "stopping the workload clusters' server:", err)
		code = 1
	}
	_ = logFile.Close()
	if code == 0 && os.Getenv("ANVIL_TEST_VERBOSE") == "" {
		_ = os.Remove(logPath)
	}
	return code
}

// logTail returns the last n controller log lines, for failure messages (leaving out the
// in-memory server's net/http chatter, which is in the file too).
func logTail(n int) string {
	raw, err := os.ReadFile(filepath.Clean(logPath))
	if err != nil {
		return err.Error()
	}
	var lines []string
	for _, l := range strings.Split(strings.TrimRight(string(raw), "\n"), "\n") {
		if strings.HasPrefix(l, "{") {
			lines = append(lines, l)
		}
	}
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	for i, l := range lines {
		if len(l) > 600 { // drop stack traces
			lines[i] = l[:600] + "…"
		}
	}
	return strings.Join(lines, "\n")
}
