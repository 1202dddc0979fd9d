package main

import (
	"context"
	"path/filepath"
	"time"

	"github.com/go-logr/logr"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/controller"
	"sigs.k8s.io/controller-runtime/pkg/event"
	metricsserver "sigs.k8s.io/controller-runtime/pkg/metrics/server"

	infrav1 "github.com/anvil-metal/cluster-api-provider-anvil/api/v1alpha1"
	"github.com/anvil-metal/cluster-api-provider-anvil/controllers"
	"github.com/anvil-metal/cluster-api-provider-anvil/internal/bmc"
	"github.com/anvil-metal/cluster-api-provider-anvil/internal/bootservices"
	"github.com/anvil-metal/cluster-api-provider-anvil/internal/hoststate"
	"github.com/anvil-metal/cluster-api-provider-anvil/internal/mgmtplane"
	"github.com/anvil-metal/cluster-api-provider-anvil/internal/provision"
)

// startManager runs Anvil's controllers (hosts, machines, clusters, remediation) with the
// real provisioning backend: boot services and the agent, as in production. With a
// provisioning network, HTTP, DHCP (reservation mode) and TFTP all listen on its bridge,
// inside its namespace, and answer the servers there (the emulated ones dial from their own
// namespaces, qemu VMs from their taps); without one, HTTP listens on loopback, DHCP is off and
// the emulated firmware asks the HTTP boot endpoint directly. It runs until ctx ends.
func startManager(ctx context.Context, env *mgmtplane.Environment, workDir string, pn *provisioningNet, bootTimeout time.Duration) (*bootservices.Services, error) {
	mgr, err := ctrl.NewManager(env.Config, ctrl.Options{Scheme: env.Scheme, Metrics: metricsserver.Options{BindAddress: "0"}})
	if err != nil {
		return nil, err
	}
	pool := bmc.NewPool(bmc.PoolOptions{CallTimeout: 10 * time.Second})
	if err := mgr.Add(pool); err != nil {
		return nil, err
	}
	wake := make(chan event.TypedGenericEvent[*infrav1.AnvilHost], 256)
	cfg := bootservices.Config{HTTPAddress: "127.0.0.1:0", ImageCacheDir: filepath.Join(workDir, "image-cache"),
		ImageCacheBytes: 4 << 30, AllowLocalImages: true, ArtifactsDir: pn.artifacts, Log: logr.Discard(),
		Backend: provision.Options{Secrets: mgr.GetClient(), Notify: controllers.WakeFunc(wake), BootTimeout: bootTimeout}}
	var boot *bootservices.Services
	if n := pn.network; n != nil {
		boot, err = n.BootServices(cfg, pn.tftpDir)
	} else {
		boot, err = bootservices.New(cfg)
	}
	if err != nil {
		return nil, err
	}
	if err := mgr.Add(boot); err != nil {
		return nil, err
	}
	// The power sync runs every 10 s instead of 120 s so that the tables follow the BMCs.
	hosts := &controllers.AnvilHostReconciler{Client: mgr.GetClient(), Recorder: mgr.GetEventRecorder("anvilhost-controller"), Pool: pool,
		StateMachine: &hoststate.Machine{BMC: pool, Provisioner: boot.Backend, BootReports: boot.Backend, PowerSyncInterval: 10 * time.Second, RetryInterval: 2 * time.Second},
		Wake:         wake}
	if err := hosts.SetupWithManager(ctx, mgr, controller.Options{MaxConcurrentReconciles: 10}); err != nil {
		return nil, err
	}
	// The workload clusters: Nodes without a providerID, host labels to Nodes, remediation.
	clusterCache, err := controllers.SetupClusterCache(ctx, mgr, "")
	if err != nil {
		return nil, err
	}
	machines := &controllers.AnvilMachineReconciler{Client: mgr.GetClient(), APIReader: mgr.GetAPIReader(), ClusterCache: clusterCache}
	if err := machines.SetupWithManager(ctx, mgr, controller.Options{MaxConcurrentReconciles: 5}); err != nil {
		return nil, err
	}
	clusters := &controllers.AnvilClusterReconciler{Client: mgr.GetClient()}
	if err := clusters.SetupWithManager(ctx, mgr, controller.Options{}); err != nil {
		return nil, err
	}
	remediations := &controllers.AnvilRemediationReconciler{Client: mgr.GetClient(), ClusterCache: clusterCache}
	if err := remediations.SetupWithManager(mgr, controller.Options{}); err != nil {
		return nil, err
	}
	go func() { _ = mgr.Start(ctx) }()
	return boot, nil
}
