// Package capistack runs Cluster API's own controllers (core with MachineHealthCheck, kubeadm
// bootstrap, kubeadm control plane) at v1.14.2 in this process, each manager set up as its
// binary's main does. The end-to-end tests and the lab use it so that Anvil always meets the
// real Cluster API, not a stand-in.
package capistack

import (
	"context"
	"errors"
	"fmt"
	"time"

	"go.uber.org/zap"
	k8sruntime "k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/util/sets"
	"k8s.io/client-go/rest"
	"k8s.io/utils/ptr"
	addonsv1 "sigs.k8s.io/cluster-api/api/addons/v1beta2"
	clusterv1 "sigs.k8s.io/cluster-api/api/core/v1beta2"
	ipamv1 "sigs.k8s.io/cluster-api/api/ipam/v1beta2"
	runtimev1 "sigs.k8s.io/cluster-api/api/runtime/v1beta2"
	"sigs.k8s.io/cluster-api/bootstrap/kubeadm/reconcilers/kubeadmconfig"
	bootstrapsetup "sigs.k8s.io/cluster-api/bootstrap/kubeadm/setup"
	"sigs.k8s.io/cluster-api/controllers/clustercache"
	"sigs.k8s.io/cluster-api/controlplane/kubeadm/reconcilers/kubeadmcontrolplane"
	controlplanesetup "sigs.k8s.io/cluster-api/controlplane/kubeadm/setup"
	clusterreconciler "sigs.k8s.io/cluster-api/core/reconcilers/cluster"
	machinereconciler "sigs.k8s.io/cluster-api/core/reconcilers/machine"
	"sigs.k8s.io/cluster-api/core/reconcilers/machinedeployment"
	"sigs.k8s.io/cluster-api/core/reconcilers/machinehealthcheck"
	"sigs.k8s.io/cluster-api/core/reconcilers/machineset"
	coresetup "sigs.k8s.io/cluster-api/core/setup"
	runtimeclient "sigs.k8s.io/cluster-api/exp/runtime/client"
	"sigs.k8s.io/cluster-api/util/index"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/config"
	"sigs.k8s.io/controller-runtime/pkg/controller"
	"sigs.k8s.io/controller-runtime/pkg/manager"
	metricsserver "sigs.k8s.io/controller-runtime/pkg/metrics/server"

	"github.com/anvil-metal/cluster-api-provider-anvil/internal/mgmtplane"
	"github.com/anvil-metal/cluster-api-provider-anvil/internal/workload"
)

// Settings that Cluster API's binaries take from flags. The grace periods are their defaults
// (the conditions one must be at least 2m); the ClusterCache retry is shortened from 30 s
// because a workload cluster's API server only answers once its first control-plane machine
// has booted.
const (
	remoteConnectionGracePeriod = 50 * time.Second
	remoteConditionsGracePeriod = 5 * time.Minute
	etcdDialTimeout             = 10 * time.Second
	etcdCallTimeout             = 15 * time.Second
	clusterCacheRetry           = time.Second
)

// Managers are Cluster API's three managers (core, kubeadm bootstrap, kubeadm control
// plane) running in this process.
type Managers struct {
	cancel context.CancelFunc
	done   []chan error
}

// Scheme is what Cluster API's managers read: the management plane's kinds and the Cluster
// API groups they watch beyond those (addons, IPAM, runtime extensions).
func Scheme() *k8sruntime.Scheme {
	s := mgmtplane.NewScheme()
	for _, add := range []func(*k8sruntime.Scheme) error{addonsv1.AddToScheme, ipamv1.AddToScheme, runtimev1.AddToScheme} {
		if err := add(s); err != nil {
			panic(err) // only a programming error (two kinds under one name) gets here
		}
	}
	return s
}

// Options say what one set of Cluster API managers serves.
type Options struct {
	// Workloads plays the workload clusters: their API servers and the booted servers' kubelets.
	Workloads *workload.Server
	// Instance tells apart two sets started in one process (a clusterctl move's source and
	// target): client-go refuses two informers of the same name.
	Instance string
	// RuntimeClient calls Runtime Extensions for the machine, MachineDeployment and
	// KubeadmControlPlane controllers; Cluster API requires one when its InPlaceUpdates
	// feature gate is on.
	RuntimeClient runtimeclient.Client
}

// Start starts Cluster API's controllers against the management cluster at cfg, and the
// workload Kubelet (which plays the booted servers of opts.Workloads) beside the core ones.
func Start(cfg *rest.Config, opts Options) (*Managers, error) {
	ctx, cancel := context.WithCancel(context.Background())
	c := &Managers{cancel: cancel}
	setups := []func(context.Context, *rest.Config, Options) (manager.Manager, error){setupCore, setupBootstrap, setupControlPlane}
	for _, setup := range setups {
		mgr, err := setup(ctx, cfg, opts)
		if err != nil {
			_ = c.Stop(time.Minute)
			return nil, err
		}
		done := make(chan error, 1)
		go func() { done <- mgr.Start(ctx) }()
		c.done = append(c.done, done)
	}
	return c, nil
}

// Stop cancels the managers and waits for each to return.
func (c *Managers) Stop(timeout time.Duration) error {
	c.cancel()
	deadline := time.After(timeout)
	var errs []error
	for _, done := range c.done {
		select {
		case err := <-done:
			if err != nil {
				errs = append(errs, err)
			}
		case <-deadline:
			return fmt.Errorf("a Cluster API manager did not stop within %s", timeout)
		}
	}
	return errors.Join(errs...)
}

func newCAPIManager(cfg *rest.Config, name string, cache func(*k8sruntime.Scheme) ctrl.Options) (manager.Manager, error) {
	scheme := Scheme()
	opts := cache(scheme)
	opts.Scheme = scheme
	opts.Metrics = metricsserver.Options{BindAddress: "0"}
	// Three ClusterCaches in one process share a controller name; names are only unique per
	// binary. CAPI's binaries use controller-runtime's priority queue (feature gate
	// PriorityQueue); it can deadlock on shutdown in v0.24.1 (kubernetes-sigs/controller-runtime
	// #3538), which would only cost these managers a clean stop at the end, so it is off here.
	opts.Controller = config.Controller{UsePriorityQueue: ptr.To(false), SkipNameValidation: ptr.To(true)}
	cfg = rest.CopyConfig(cfg)
	cfg.QPS, cfg.Burst = 100, 200
	cfg.UserAgent = name
	return ctrl.NewManager(cfg, opts)
}

func concurrency(n int) controller.Options { return controller.Options{MaxConcurrentReconciles: n} }

// ShortenClusterCacheRetry applies clusterCacheRetry (the method is on the unexported type):
// the in-process managers, and Anvil's own ClusterCache in tests, reconnect to a workload
// cluster within a second instead of the default ten.
func ShortenClusterCacheRetry(cc clustercache.ClusterCache) {
	if s, ok := cc.(interface{ SetConnectionCreationRetryInterval(time.Duration) }); ok {
		s.SetConnectionCreationRetryInterval(clusterCacheRetry)
	}
}

// setupCore mirrors core/main.go for the Cluster, Machine, MachineSet, MachineDeployment and
// MachineHealthCheck controllers, and adds the workload Kubelet.
func setupCore(ctx context.Context, cfg *rest.Config, opts Options) (manager.Manager, error) {
	name := "capi-core" + opts.Instance
	mgr, err := newCAPIManager(cfg, name, func(s *k8sruntime.Scheme) ctrl.Options {
		return ctrl.Options{Cache: coresetup.ManagerCacheOptions(s, name, "", 10*time.Minute), Client: coresetup.ManagerClientOptions()}
	})
	if err != nil {
		return nil, err
	}
	if err := index.AddDefaultIndexes(ctx, mgr); err != nil {
		return nil, err
	}
	secrets, err := coresetup.CreateSecretCachingClient(mgr)
	if err != nil {
		return nil, err
	}
	cc, err := clustercache.SetupWithManager(ctx, mgr, clustercache.Options{SecretClient: secrets,
		Cache: coresetup.ClusterCacheCacheOptions(), Client: coresetup.ClusterCacheClientOptions(name, 20, 30)}, concurrency(10))
	if err != nil {
		return nil, err
	}
	ShortenClusterCacheRetry(cc)
	if err := (&clusterreconciler.Reconciler{Client: mgr.GetClient(), APIReader: mgr.GetAPIReader(), ClusterCache: cc,
		RemoteConnectionGracePeriod: remoteConnectionGracePeriod}).SetupWithManager(ctx, mgr, concurrency(10)); err != nil {
		return nil, err
	}
	if err := (&machinereconciler.Reconciler{Client: mgr.GetClient(), APIReader: mgr.GetAPIReader(), ClusterCache: cc,
		RemoteConditionsGracePeriod: remoteConditionsGracePeriod, RuntimeClient: opts.RuntimeClient}).SetupWithManager(ctx, mgr, concurrency(10)); err != nil {
		return nil, err
	}
	if err := (&machineset.Reconciler{Client: mgr.GetClient(), APIReader: mgr.GetAPIReader(), ClusterCache: cc,
		PreflightChecks: sets.New(clusterv1.MachineSetPreflightCheckAll)}).SetupWithManager(ctx, mgr, concurrency(10)); err != nil {
		return nil, err
	}
	if err := (&machinedeployment.Reconciler{Client: mgr.GetClient(), APIReader: mgr.GetAPIReader(), RuntimeClient: opts.RuntimeClient}).
		SetupWithManager(ctx, mgr, concurrency(10)); err != nil {
		return nil, err
	}
	if err := (&machinehealthcheck.Reconciler{Client: mgr.GetClient(), ClusterCache: cc}).
		SetupWithManager(ctx, mgr, concurrency(10)); err != nil {
		return nil, err
	}
	kubelet := &workload.Kubelet{Client: mgr.GetClient(), Server: opts.Workloads}
	return mgr, kubelet.SetupWithManager(mgr, concurrency(5))
}

// setupBootstrap mirrors bootstrap/kubeadm/main.go.
func setupBootstrap(ctx context.Context, cfg *rest.Config, opts Options) (manager.Manager, error) {
	name := "capi-kubeadm-bootstrap" + opts.Instance
	mgr, err := newCAPIManager(cfg, name, func(s *k8sruntime.Scheme) ctrl.Options {
		return ctrl.Options{Cache: bootstrapsetup.ManagerCacheOptions(s, name, "", 10*time.Minute), Client: bootstrapsetup.ManagerClientOptions()}
	})
	if err != nil {
		return nil, err
	}
	secrets, err := bootstrapsetup.CreateSecretCachingClient(mgr)
	if err != nil {
		return nil, err
	}
	cc, err := clustercache.SetupWithManager(ctx, mgr, clustercache.Options{SecretClient: secrets,
		Cache: bootstrapsetup.ClusterCacheCacheOptions(), Client: bootstrapsetup.ClusterCacheClientOptions(name, 20, 30)}, concurrency(10))
	if err != nil {
		return nil, err
	}
	ShortenClusterCacheRetry(cc)
	return mgr, (&kubeadmconfig.Reconciler{Client: mgr.GetClient(), SecretCachingClient: secrets, APIReader: mgr.GetAPIReader(),
		ClusterCache: cc, TokenTTL: kubeadmconfig.DefaultTokenTTL}).SetupWithManager(ctx, mgr, concurrency(10))
}

// setupControlPlane mirrors controlplane/kubeadm/main.go.
func setupControlPlane(ctx context.Context, cfg *rest.Config, opts Options) (manager.Manager, error) {
	name := "capi-kubeadm-control-plane" + opts.Instance
	mgr, err := newCAPIManager(cfg, name, func(s *k8sruntime.Scheme) ctrl.Options {
		return ctrl.Options{Cache: controlplanesetup.ManagerCacheOptions(s, name, "", 10*time.Minute), Client: controlplanesetup.ManagerClientOptions()}
	})
	if err != nil {
		return nil, err
	}
	secrets, err := controlplanesetup.CreateSecretCachingClient(mgr)
	if err != nil {
		return nil, err
	}
	cc, err := clustercache.SetupWithManager(ctx, mgr, clustercache.Options{SecretClient: secrets,
		Cache: controlplanesetup.ClusterCacheCacheOptions(), Client: controlplanesetup.ClusterCacheClientOptions(name, 20, 30)}, concurrency(10))
	if err != nil {
		return nil, err
	}
	ShortenClusterCacheRetry(cc)
	return mgr, (&kubeadmcontrolplane.Reconciler{Client: mgr.GetClient(), APIReader: mgr.GetAPIReader(), SecretCachingClient: secrets,
		ClusterCache: cc, EtcdDialTimeout: etcdDialTimeout, EtcdCallTimeout: etcdCallTimeout, EtcdLogger: zap.NewNop(),
		RemoteConditionsGracePeriod: remoteConditionsGracePeriod, RuntimeClient: opts.RuntimeClient}).SetupWithManager(ctx, mgr,
		controller.Options{MaxConcurrentReconciles: 10, ReconciliationTimeout: 3 * time.Minute})
}
