// Command manager runs Anvil's controllers, webhooks and boot services against a
// management cluster.
package main

import (
	"flag"
	"net/netip"
	"os"
	"time"

	"k8s.io/apimachinery/pkg/runtime"
	clientgoscheme "k8s.io/client-go/kubernetes/scheme"
	"k8s.io/utils/ptr"
	clusterv1 "sigs.k8s.io/cluster-api/api/core/v1beta2"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/cache"
	"sigs.k8s.io/controller-runtime/pkg/config"
	"sigs.k8s.io/controller-runtime/pkg/controller"
	"sigs.k8s.io/controller-runtime/pkg/event"
	"sigs.k8s.io/controller-runtime/pkg/healthz"
	"sigs.k8s.io/controller-runtime/pkg/log/zap"
	ctrlmetrics "sigs.k8s.io/controller-runtime/pkg/metrics"
	metricsserver "sigs.k8s.io/controller-runtime/pkg/metrics/server"
	"sigs.k8s.io/controller-runtime/pkg/webhook"

	infrav1 "github.com/anvil-metal/cluster-api-provider-anvil/api/v1alpha1"
	"github.com/anvil-metal/cluster-api-provider-anvil/controllers"
	"github.com/anvil-metal/cluster-api-provider-anvil/internal/bmc"
	"github.com/anvil-metal/cluster-api-provider-anvil/internal/boot/dhcp"
	"github.com/anvil-metal/cluster-api-provider-anvil/internal/bootservices"
	"github.com/anvil-metal/cluster-api-provider-anvil/internal/hoststate"
	"github.com/anvil-metal/cluster-api-provider-anvil/internal/inplace"
	"github.com/anvil-metal/cluster-api-provider-anvil/internal/provision"
	"github.com/anvil-metal/cluster-api-provider-anvil/internal/webhooks"
)

// options are the manager's command-line settings.
type options struct {
	metricsAddr        string
	probeAddr          string
	pprofAddr          string
	leaderElect        bool
	watchNamespace     string
	watchFilterValue   string
	webhookPort        int
	webhookCertDir     string
	extensionPort      int
	hostConcurrency    int
	bmcMaxConcurrent   int
	bmcTimeout         time.Duration
	powerSyncInterval  time.Duration
	machineConcurrency int
	releaseTimeout     time.Duration
	enableWebhooks     bool
	allowLocalImages   bool
	provisioner        string
	bootHTTPAddress    string
	bootPublicURL      string
	artifactsDir       string
	imageCacheDir      string
	imageCacheBytes    int64
	dhcpMode           string
	dhcpInterface      string
	provisioningIP     string
	tftpDir            string
	zapOptions         zap.Options
}

func parseFlags(args []string) (options, error) {
	var o options
	fs := flag.NewFlagSet("manager", flag.ContinueOnError)
	fs.StringVar(&o.metricsAddr, "metrics-bind-address", ":8443", "Address the metrics endpoint binds to; 0 disables it.")
	fs.StringVar(&o.probeAddr, "health-probe-bind-address", ":9440", "Address the health and readiness probes bind to.")
	fs.StringVar(&o.pprofAddr, "pprof-bind-address", "", "Address of the Go profiling endpoint (/debug/pprof); empty turns it off.")
	fs.BoolVar(&o.leaderElect, "leader-elect", true, "Elect a leader so only one replica reconciles.")
	fs.StringVar(&o.watchNamespace, "namespace", "", "Watch only this namespace (default: all).")
	fs.StringVar(&o.watchFilterValue, "watch-filter", "", "Reconcile only objects labelled cluster.x-k8s.io/watch-filter with this value.")
	fs.IntVar(&o.hostConcurrency, "anvilhost-concurrency", 50, "AnvilHosts reconciled at once (BMC calls are further capped by --bmc-max-concurrency).")
	fs.IntVar(&o.bmcMaxConcurrent, "bmc-max-concurrency", 20, "BMC operations in flight at once across all BMCs.")
	fs.DurationVar(&o.bmcTimeout, "bmc-timeout", 30*time.Second, "Timeout of each BMC call.")
	fs.DurationVar(&o.powerSyncInterval, "power-sync-interval", 120*time.Second, "How often each host's power state is read (±10 % jitter).")
	fs.IntVar(&o.machineConcurrency, "anvilmachine-concurrency", 20, "AnvilMachines reconciled at once.")
	fs.DurationVar(&o.releaseTimeout, "release-timeout", controllers.DefaultReleaseTimeout, "How long a deleted machine waits for its host to be wiped before leaving the host in maintenance.")
	fs.BoolVar(&o.enableWebhooks, "webhooks", true, "Serve the admission webhooks.")
	fs.BoolVar(&o.allowLocalImages, "allow-local-images", false, "Accept image URLs on loopback or link-local addresses (labs only).")
	fs.StringVar(&o.provisioner, "provisioner", "agent", "Provisioning backend: agent (network-boot the Anvil agent) or simulated (BMC only; for tests and demos).")
	fs.StringVar(&o.bootHTTPAddress, "boot-http-address", ":8081", "Address of the boot HTTP endpoints (iPXE scripts, artifacts, image cache, agent API).")
	fs.StringVar(&o.bootPublicURL, "boot-public-url", "", "How servers on the provisioning network reach the boot HTTP endpoints, e.g. http://192.168.10.1:8081; auto: http://<provisioning IP>:<boot HTTP port>.")
	fs.StringVar(&o.artifactsDir, "agent-artifacts-dir", "/usr/share/anvil/agent", "Directory with the agent kernel (vmlinuz) and initramfs.")
	fs.StringVar(&o.imageCacheDir, "image-cache-dir", "/var/cache/anvil/images", "Directory of the pull-through image cache.")
	fs.Int64Var(&o.imageCacheBytes, "image-cache-bytes", 50<<30, "Size limit of the image cache in bytes.")
	fs.StringVar(&o.dhcpMode, "dhcp-mode", "off", "DHCP on the provisioning network: proxy (beside the site's DHCP), reservation (addresses from spec.bootNetwork), or off.")
	fs.StringVar(&o.dhcpInterface, "dhcp-interface", "", "Interface on the provisioning network (required unless --dhcp-mode=off; none: no interface).")
	fs.StringVar(&o.provisioningIP, "provisioning-ip", "", "This machine's address on the provisioning network (DHCP server id and TFTP server); auto: the first IPv4 address of --dhcp-interface.")
	fs.StringVar(&o.tftpDir, "tftp-dir", "/usr/lib/ipxe", "Directory with the iPXE binaries served over TFTP.")
	fs.IntVar(&o.webhookPort, "webhook-port", 9443, "Port the webhook server listens on.")
	fs.StringVar(&o.webhookCertDir, "webhook-cert-dir", "/tmp/k8s-webhook-server/serving-certs", "Directory holding the webhook serving certificate.")
	fs.IntVar(&o.extensionPort, "runtime-extension-port", 0, "Serve the Runtime Extension for Cluster API's InPlaceUpdates feature gate on this port, with the webhook certificate (0: off).")
	o.zapOptions.BindFlags(fs)
	return o, fs.Parse(args)
}

// The event recorder (mgr.GetEventRecorder) writes events.k8s.io/v1 Events, not core ones:
// without this grant the API server refuses every Event the manager records.
// +kubebuilder:rbac:groups=events.k8s.io,resources=events,verbs=create;patch

func main() {
	o, err := parseFlags(os.Args[1:])
	if err != nil {
		os.Exit(2)
	}
	ctrl.SetLogger(zap.New(zap.UseFlagOptions(&o.zapOptions)))
	setupLog := ctrl.Log.WithName("setup")
	if err := resolveBootNetwork(&o, systemInterfaceAddrs); err != nil {
		setupLog.Error(err, "boot network settings")
		os.Exit(2)
	}

	scheme := runtime.NewScheme()
	for _, add := range []func(*runtime.Scheme) error{clientgoscheme.AddToScheme, clusterv1.AddToScheme, infrav1.AddToScheme} {
		if err := add(scheme); err != nil {
			setupLog.Error(err, "building scheme")
			os.Exit(1)
		}
	}

	mgrOptions := ctrl.Options{
		Scheme:                 scheme,
		Metrics:                metricsserver.Options{BindAddress: o.metricsAddr, SecureServing: true},
		HealthProbeBindAddress: o.probeAddr,
		PprofBindAddress:       o.pprofAddr,
		LeaderElection:         o.leaderElect,
		LeaderElectionID:       "controller-leader-election-capanvil",
		// controller-runtime v0.24.1's priority queue can deadlock on shutdown
		// (kubernetes-sigs/controller-runtime#3538, fixed in v0.25.2, which CAPI v1.14.2 does
		// not allow yet): a manager killed and restarted must come back cleanly.
		Controller:    config.Controller{UsePriorityQueue: ptr.To(false)},
		WebhookServer: webhook.NewServer(webhook.Options{Port: o.webhookPort, CertDir: o.webhookCertDir}),
	}
	// The cache keeps no managedFields: nothing here reads them, and at thousands of hosts
	// they are a third of every cached object, so of the memory and garbage collection the
	// cache costs. (An update that omits them leaves them as they are on the server.)
	mgrOptions.Cache = cache.Options{DefaultTransform: cache.TransformStripManagedFields()}
	if o.watchNamespace != "" {
		mgrOptions.Cache.DefaultNamespaces = map[string]cache.Config{o.watchNamespace: {}}
	}
	mgr, err := ctrl.NewManager(ctrl.GetConfigOrDie(), mgrOptions)
	if err != nil {
		setupLog.Error(err, "creating manager")
		os.Exit(1)
	}
	if err := mgr.AddHealthzCheck("healthz", healthz.Ping); err != nil {
		setupLog.Error(err, "adding health check")
		os.Exit(1)
	}
	if err := mgr.AddReadyzCheck("readyz", healthz.Ping); err != nil {
		setupLog.Error(err, "adding ready check")
		os.Exit(1)
	}

	ctx := ctrl.SetupSignalHandler()
	pool := bmc.NewPool(bmc.PoolOptions{MaxConcurrent: o.bmcMaxConcurrent, CallTimeout: o.bmcTimeout,
		Metrics: bmc.NewMetrics(ctrlmetrics.Registry)})
	if err := mgr.Add(pool); err != nil {
		setupLog.Error(err, "adding BMC pool")
		os.Exit(1)
	}
	ctrlmetrics.Registry.MustRegister(controllers.NewHostStateCollector(mgr.GetClient()))
	wake := make(chan event.TypedGenericEvent[*infrav1.AnvilHost], 1024)
	var provisioner hoststate.Provisioner = hoststate.Simulated{}
	var bootReports hoststate.BootReportSource
	switch o.provisioner {
	case "simulated":
	case "agent":
		var provisioningIP netip.Addr
		if o.provisioningIP != "" {
			if provisioningIP, err = netip.ParseAddr(o.provisioningIP); err != nil {
				setupLog.Error(err, "--provisioning-ip")
				os.Exit(2)
			}
		}
		boot, err := bootservices.New(bootservices.Config{HTTPAddress: o.bootHTTPAddress, PublicURL: o.bootPublicURL,
			ArtifactsDir: o.artifactsDir, ImageCacheDir: o.imageCacheDir, ImageCacheBytes: o.imageCacheBytes,
			AllowLocalImages: o.allowLocalImages, Log: ctrl.Log.WithName("boot"),
			DHCPMode: dhcp.Mode(o.dhcpMode), DHCPInterface: o.dhcpInterface, ServerIP: provisioningIP, TFTPDir: o.tftpDir,
			Backend: provision.Options{Secrets: mgr.GetClient(), Notify: controllers.WakeFunc(wake)}})
		if err != nil {
			setupLog.Error(err, "setting up the boot services")
			os.Exit(1)
		}
		if err := mgr.Add(boot); err != nil {
			setupLog.Error(err, "adding the boot services")
			os.Exit(1)
		}
		provisioner, bootReports = boot.Backend, boot.Backend
	default:
		setupLog.Error(nil, "--provisioner must be agent or simulated", "provisioner", o.provisioner)
		os.Exit(2)
	}
	hosts := &controllers.AnvilHostReconciler{
		Client:   mgr.GetClient(),
		Recorder: mgr.GetEventRecorder("anvilhost-controller"),
		Pool:     pool,
		StateMachine: &hoststate.Machine{BMC: pool, Provisioner: provisioner, BootReports: bootReports,
			PowerSyncInterval: o.powerSyncInterval},
		BMCTimeout:       o.bmcTimeout,
		WatchFilterValue: o.watchFilterValue,
		Wake:             wake,
	}
	if err := hosts.SetupWithManager(ctx, mgr, controller.Options{MaxConcurrentReconciles: o.hostConcurrency}); err != nil {
		setupLog.Error(err, "setting up the AnvilHost controller")
		os.Exit(1)
	}

	// Workload clusters, reached with the kubeconfig Secrets Cluster API writes: remediation,
	// Nodes that join without their providerID, host labels copied to Nodes.
	clusterCache, err := controllers.SetupClusterCache(ctx, mgr, o.watchFilterValue)
	if err != nil {
		setupLog.Error(err, "setting up the workload clusters' cache")
		os.Exit(1)
	}
	machines := &controllers.AnvilMachineReconciler{Client: mgr.GetClient(), APIReader: mgr.GetAPIReader(),
		ReleaseTimeout: o.releaseTimeout, WatchFilterValue: o.watchFilterValue, ClusterCache: clusterCache}
	if err := machines.SetupWithManager(ctx, mgr, controller.Options{MaxConcurrentReconciles: o.machineConcurrency}); err != nil {
		setupLog.Error(err, "setting up the AnvilMachine controller")
		os.Exit(1)
	}
	clusters := &controllers.AnvilClusterReconciler{Client: mgr.GetClient(), WatchFilterValue: o.watchFilterValue}
	if err := clusters.SetupWithManager(ctx, mgr, controller.Options{MaxConcurrentReconciles: 5}); err != nil {
		setupLog.Error(err, "setting up the AnvilCluster controller")
		os.Exit(1)
	}

	if err := (&controllers.AnvilRemediationReconciler{Client: mgr.GetClient(), ClusterCache: clusterCache}).SetupWithManager(mgr, controller.Options{MaxConcurrentReconciles: 5}); err != nil {
		setupLog.Error(err, "setting up the AnvilRemediation controller")
		os.Exit(1)
	}
	if o.enableWebhooks {
		if err := webhooks.SetupWithManager(mgr, webhooks.Options{AllowLocalImages: o.allowLocalImages}); err != nil {
			setupLog.Error(err, "setting up webhooks")
			os.Exit(1)
		}
	}

	if o.extensionPort != 0 {
		ext, err := inplace.NewServer(&inplace.Extension{Client: mgr.GetClient()}, inplace.ServerOptions{Port: o.extensionPort, CertDir: o.webhookCertDir})
		if err != nil {
			setupLog.Error(err, "setting up the in-place update Runtime Extension")
			os.Exit(1)
		}
		if err := mgr.Add(ext); err != nil {
			setupLog.Error(err, "adding the in-place update Runtime Extension")
			os.Exit(1)
		}
	}

	setupLog.Info("starting manager")
	if err := mgr.Start(ctx); err != nil {
		setupLog.Error(err, "running manager")
		os.Exit(1)
	}
}
