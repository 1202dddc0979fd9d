package clusterctl

import (
	"context"
	"errors"
	"net/http"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	k8sruntime "k8s.io/apimachinery/pkg/runtime"
	"k8s.io/utils/ptr"
	addonsv1beta1 "sigs.k8s.io/cluster-api/api/addons/v1beta1" //nolint:staticcheck // conversion webhooks need v1beta1
	addonsv1 "sigs.k8s.io/cluster-api/api/addons/v1beta2"
	bootstrapv1beta1 "sigs.k8s.io/cluster-api/api/bootstrap/kubeadm/v1beta1"       //nolint:staticcheck // conversion webhooks need v1beta1
	controlplanev1beta1 "sigs.k8s.io/cluster-api/api/controlplane/kubeadm/v1beta1" //nolint:staticcheck // conversion webhooks need v1beta1
	clusterv1beta1 "sigs.k8s.io/cluster-api/api/core/v1beta1"                      //nolint:staticcheck // conversion webhooks need v1beta1
	ipamv1beta1 "sigs.k8s.io/cluster-api/api/ipam/v1beta1"                         //nolint:staticcheck // conversion webhooks need v1beta1
	ipamv1 "sigs.k8s.io/cluster-api/api/ipam/v1beta2"
	runtimev1 "sigs.k8s.io/cluster-api/api/runtime/v1beta2"
	bootstrapadmission "sigs.k8s.io/cluster-api/bootstrap/kubeadm/webhooks/admission"
	"sigs.k8s.io/cluster-api/controllers/clustercache"
	controlplaneadmission "sigs.k8s.io/cluster-api/controlplane/kubeadm/webhooks/admission"
	"sigs.k8s.io/cluster-api/core/reconcilers/clusterclass"
	topologycluster "sigs.k8s.io/cluster-api/core/reconcilers/topology/cluster"
	coresetup "sigs.k8s.io/cluster-api/core/setup"
	coreadmission "sigs.k8s.io/cluster-api/core/webhooks/admission"
	"sigs.k8s.io/cluster-api/feature"
	"sigs.k8s.io/cluster-api/util/index"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/config"
	"sigs.k8s.io/controller-runtime/pkg/controller"
	metricsserver "sigs.k8s.io/controller-runtime/pkg/metrics/server"
	"sigs.k8s.io/controller-runtime/pkg/webhook"

	"github.com/anvil-metal/cluster-api-provider-anvil/internal/mgmtplane"
	"github.com/anvil-metal/cluster-api-provider-anvil/internal/release"
	"github.com/anvil-metal/cluster-api-provider-anvil/internal/webhooks"
)

// managementPlane is a real kube-apiserver and etcd with Cluster API's and Anvil's CRDs, the
// admission webhooks of both (so objects meet the same checks as in a real management
// cluster), and Cluster API's ClusterClass and topology controllers.
type managementPlane struct {
	client client.Client
	ctx    context.Context
}

func startManagementPlane(t *testing.T) *managementPlane {
	t.Helper()
	// What clusterctl init sets with CLUSTER_TOPOLOGY=true; the webhooks refuse topologies
	// without it. (CAPI's feature gates are process-wide; this test binary owns its process.)
	if err := feature.MutableGates.Set(string(feature.ClusterTopology) + "=true"); err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	env, err := mgmtplane.StartWithOptions(mgmtplane.Options{Webhooks: true, CAPIWebhooks: true})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = env.Stop() })
	// The webhooks also convert from the v1beta1 versions Cluster API still serves (hence the
	// deprecated packages).
	for _, add := range []func(*k8sruntime.Scheme) error{addonsv1.AddToScheme, ipamv1.AddToScheme, runtimev1.AddToScheme,
		clusterv1beta1.AddToScheme, addonsv1beta1.AddToScheme, bootstrapv1beta1.AddToScheme, controlplanev1beta1.AddToScheme, ipamv1beta1.AddToScheme} {
		if err := add(env.Scheme); err != nil {
			t.Fatal(err)
		}
	}
	ctx, cancel := context.WithCancel(context.Background())
	mgr, err := ctrl.NewManager(env.Config, ctrl.Options{
		Scheme:                 env.Scheme,
		Metrics:                metricsserver.Options{BindAddress: "0"},
		HealthProbeBindAddress: "0",
		WebhookServer:          webhook.NewServer(env.WebhookServer()),
		// The priority queue of controller-runtime v0.24.1 can deadlock on shutdown (see
		// cmd/manager); several of CAPI's controllers share names with nothing here, but
		// names are only unique per binary.
		Controller: config.Controller{UsePriorityQueue: ptr.To(false), SkipNameValidation: ptr.To(true)},
	})
	if err != nil {
		t.Fatal(err)
	}
	must := func(err error) {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
	}
	must(webhooks.SetupWithManager(mgr, webhooks.Options{}))
	must(index.AddDefaultIndexes(ctx, mgr))
	secrets, err := coresetup.CreateSecretCachingClient(mgr)
	must(err)
	cc, err := clustercache.SetupWithManager(ctx, mgr, clustercache.Options{SecretClient: secrets,
		Cache: coresetup.ClusterCacheCacheOptions(), Client: coresetup.ClusterCacheClientOptions("clusterctl-test", 20, 30)},
		controller.Options{MaxConcurrentReconciles: 2})
	must(err)
	for _, w := range []interface{ SetupWebhookWithManager(ctrl.Manager) error }{
		&coreadmission.Cluster{Client: mgr.GetClient(), ClusterCacheReader: cc},
		&coreadmission.ClusterClass{Client: mgr.GetClient()},
		&coreadmission.MachineDeployment{},
		&coreadmission.MachineSet{},
		&coreadmission.Machine{},
		&coreadmission.MachineHealthCheck{},
		&coreadmission.ClusterResourceSet{},
		&controlplaneadmission.KubeadmControlPlane{},
		&controlplaneadmission.KubeadmControlPlaneTemplate{},
		&bootstrapadmission.KubeadmConfig{},
		&bootstrapadmission.KubeadmConfigTemplate{},
	} {
		must(w.SetupWebhookWithManager(mgr))
	}
	must((&clusterclass.Reconciler{Client: mgr.GetClient()}).SetupWithManager(ctx, mgr, controller.Options{MaxConcurrentReconciles: 2}))
	must((&topologycluster.Reconciler{Client: mgr.GetClient(), APIReader: mgr.GetAPIReader(), ClusterCache: cc}).
		SetupWithManager(ctx, mgr, controller.Options{MaxConcurrentReconciles: 2}))

	done := make(chan error, 1)
	go func() { done <- mgr.Start(ctx) }()
	t.Cleanup(func() {
		cancel()
		select {
		case err := <-done:
			if err != nil {
				t.Errorf("manager: %v", err)
			}
		case <-time.After(30 * time.Second):
			t.Error("manager did not stop within 30s")
		}
	})
	check := mgr.GetWebhookServer().StartedChecker()
	deadline := time.Now().Add(30 * time.Second)
	for check(&http.Request{}) != nil {
		if time.Now().After(deadline) {
			t.Fatal("webhook server did not start")
		}
		time.Sleep(50 * time.Millisecond)
	}
	if !mgr.GetCache().WaitForCacheSync(ctx) {
		t.Fatal("caches did not sync")
	}
	t.Logf("management plane with CAPI and Anvil webhooks and the topology controllers up in %.1fs", time.Since(start).Seconds())
	return &managementPlane{client: env.Client, ctx: ctx}
}

// acceptComponents creates the components' Namespace and has the API server validate every
// other object (dry run; the CRDs exist already, so they are validated as updates). It
// returns the kinds the server does not know.
func (m *managementPlane) acceptComponents(t *testing.T, components []byte) []string {
	t.Helper()
	objs, err := release.ParseObjects(components)
	if err != nil {
		t.Fatal(err)
	}
	var rest = objs[:0:0]
	for _, o := range objs {
		if o.GetKind() != "Namespace" {
			rest = append(rest, o)
			continue
		}
		ns := &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: o.GetName()}}
		if err := m.client.Create(m.ctx, ns); err != nil && !apierrors.IsAlreadyExists(err) {
			t.Fatal(err)
		}
	}
	return dryRunCreate(m.ctx, t, m.client, rest)
}

func (m *managementPlane) namespace(t *testing.T, name string) {
	t.Helper()
	err := m.client.Create(m.ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: name}})
	if err != nil && !apierrors.IsAlreadyExists(err) {
		t.Fatal(err)
	}
}

// eventually polls f until it returns nil or the timeout passes.
func eventually(t *testing.T, timeout time.Duration, what string, f func() error) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	var err error
	for {
		if err = f(); err == nil {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: not within %s: %v", what, timeout, err)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

var errNotYet = errors.New("not yet")
