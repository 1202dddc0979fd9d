package controllers

import (
	"context"
	"fmt"
	"os"
	"testing"
	"time"

	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/controller"
	"sigs.k8s.io/controller-runtime/pkg/log/zap"
	metricsserver "sigs.k8s.io/controller-runtime/pkg/metrics/server"

	"github.com/anvil-metal/cluster-api-provider-anvil/internal/bmc"
	"github.com/anvil-metal/cluster-api-provider-anvil/internal/hoststate"
	"github.com/anvil-metal/cluster-api-provider-anvil/internal/mgmtplane"
)

// env is a real kube-apiserver + etcd with the Anvil manager running against it.
var env *mgmtplane.Environment

func TestMain(m *testing.M) {
	ctrl.SetLogger(zap.New(zap.UseDevMode(false), zap.WriteTo(os.Stderr), zap.Level(zapLevel())))
	var err error
	env, err = mgmtplane.Start()
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	ctx, cancel := context.WithCancel(context.Background())
	mgr, err := ctrl.NewManager(env.Config, ctrl.Options{Scheme: env.Scheme, Metrics: metricsserver.Options{BindAddress: "0"}})
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	// Short back-offs and sync intervals so recovery paths finish within a test.
	pool := bmc.NewPool(bmc.PoolOptions{MaxConcurrent: 10, CallTimeout: 3 * time.Second,
		BackoffBase: 200 * time.Millisecond, BackoffMax: time.Second, AuthHoldOff: 2 * time.Second})
	if err := mgr.Add(pool); err != nil {
		panic(err)
	}
	hosts := &AnvilHostReconciler{Client: mgr.GetClient(), Recorder: mgr.GetEventRecorder("anvilhost-controller"), Pool: pool,
		StateMachine: &hoststate.Machine{BMC: pool, Provisioner: hoststate.Simulated{}, PowerSyncInterval: 2 * time.Second,
			RetryInterval: 500 * time.Millisecond},
		BMCTimeout: 3 * time.Second}
	if err := hosts.SetupWithManager(ctx, mgr, controller.Options{MaxConcurrentReconciles: 10}); err != nil {
		panic(err)
	}
	// The workload clusters are reached as cmd/manager reaches them; a test that needs one
	// gives its Cluster a kubeconfig Secret for this same API server (anvilmachine_node_test.go).
	clusterCache, err := SetupClusterCache(ctx, mgr, "")
	if err != nil {
		panic(err)
	}
	machines := &AnvilMachineReconciler{Client: mgr.GetClient(), APIReader: mgr.GetAPIReader(), ClusterCache: clusterCache}
	if err := machines.SetupWithManager(ctx, mgr, controller.Options{MaxConcurrentReconciles: 10}); err != nil {
		panic(err)
	}
	clusters := &AnvilClusterReconciler{Client: mgr.GetClient()}
	if err := clusters.SetupWithManager(ctx, mgr, controller.Options{}); err != nil {
		panic(err)
	}
	if err := (&AnvilRemediationReconciler{Client: mgr.GetClient()}).SetupWithManager(mgr, controller.Options{}); err != nil {
		panic(err)
	}
	go func() {
		if err := mgr.Start(ctx); err != nil {
			panic(err)
		}
	}()
	code := m.Run()
	cancel()
	_ = env.Stop()
	os.Exit(code)
}

func zapLevel() zapLevelT {
	if os.Getenv("ANVIL_TEST_VERBOSE") != "" {
		return -4
	}
	return 2 // errors only: keep test output readable
}
