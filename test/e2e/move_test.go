package e2e

import (
	"context"
	"fmt"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	apiextensionsv1 "k8s.io/apiextensions-apiserver/pkg/apis/apiextensions/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"
	clientcmdapi "k8s.io/client-go/tools/clientcmd/api"
	"k8s.io/utils/ptr"
	clusterctlv1 "sigs.k8s.io/cluster-api/cmd/clusterctl/api/v1alpha3"
	clusterctlcluster "sigs.k8s.io/cluster-api/cmd/clusterctl/client/cluster"
	clusterctlconfig "sigs.k8s.io/cluster-api/cmd/clusterctl/client/config"
	"sigs.k8s.io/controller-runtime/pkg/client"

	infrav1 "github.com/anvil-metal/cluster-api-provider-anvil/api/v1alpha1"
	"github.com/anvil-metal/cluster-api-provider-anvil/internal/capistack"
	"github.com/anvil-metal/cluster-api-provider-anvil/internal/mgmtplane"
)

// TestClusterctlMove moves a running cluster to a second management cluster with clusterctl's
// own move code (sigs.k8s.io/cluster-api/cmd/clusterctl/client/cluster, v1.14.2): it discovers
// the objects (the hosts through their CRD's move-hierarchy label, their BMC Secrets through
// the move label the host controller puts on them), pauses the Cluster, waits for block-move,
// creates everything in the target with new UIDs and no status, deletes it from the source
// and unpauses.
//
// The source must leave the servers alone: no host released, wiped or powered off, though every
// host object is deleted there. The target (its own API server, Cluster API controllers and
// Anvil manager) must take the hosts back as they were: each machine adopts the host it ran
// on, nothing is installed again, the spare host stays spare, and the cluster is Ready.
func TestClusterctlMove(t *testing.T) {
	f := newFixture(t, 1)
	defer func() { f.t = t }() // steps run as subtests with their own t
	c := f.createCluster("moving", 1, 1)
	c.waitReady(1, 1, 3*time.Minute)
	placed := f.checkPlacement(c)
	source := prepareForClusterctl(t, f.api)

	target := startTargetManagementCluster(t, f)
	targetHistory := watchHosts(target.ctx, t, target.api, f.ns)
	sourceHistory := f.history.render()
	sourceHosts := hostStates(f.listHosts())

	moveStart := time.Now()
	if err := source.ObjectMover().Move(f.ctx, f.ns, target.clusterctl, false); err != nil {
		t.Fatalf("clusterctl move: %v\n%s", err, f.describe())
	}
	t.Logf("clusterctl move: %s", time.Since(moveStart).Round(100*time.Millisecond))

	t.Run("source: every object is gone and no server was touched", func(t *testing.T) {
		f.t = t
		if left := f.listHosts(); len(left) != 0 {
			t.Errorf("%d hosts left in the source", len(left))
		}
		if after := f.history.render(); after != sourceHistory {
			t.Errorf("hosts changed in the source during the move (they were %v):\nbefore:\n%s\nafter:\n%s", sourceHosts, sourceHistory, after)
		}
		for _, h := range f.hosts {
			for _, kind := range []string{"PowerOff", "PXEBoot"} {
				if n := f.serverEventsSince(h, kind, moveStart); n > 0 {
					t.Errorf("server %s: %d %s events since the move began", h, n, kind)
				}
			}
		}
	})

	// From here on the fixture works on the target.
	f.t, f.api = t, target.api
	t.Run("target: each machine takes back its host without installing it again", func(t *testing.T) {
		f.t = t
		for _, name := range []string{"bmc", "bmc-ca"} {
			if err := f.get(name, &corev1.Secret{}); err != nil {
				t.Errorf("BMC Secret %s was not moved: %v", name, err)
			}
		}
		hostOf := map[string]string{}
		for _, p := range placed {
			hostOf[p.host] = p.machine
		}
		problems := map[string]bool{}
		var firstProblem time.Time
		f.eventually("the moved machines hold their hosts again", time.Minute, func() (bool, string) {
			for _, h := range f.listHosts() {
				if hostOf[h.Name] == "" && h.Spec.Claim != nil {
					problems[fmt.Sprintf("machine %s claimed spare host %s instead of taking back its own", h.Spec.Claim.MachineRef.Name, h.Name)] = true
				}
				if n := f.serverEventsSince(h.Name, "PXEBoot", moveStart); n > 0 {
					problems[fmt.Sprintf("host %s was installed (booted from the network) after the move began", h.Name)] = true
				}
			}
			for host, seq := range targetHistory.all() {
				for _, s := range seq {
					if s.State == infrav1.HostStateProvisioning || s.State == infrav1.HostStateDeprovisioning {
						problems[fmt.Sprintf("host %s went through %s in the target: %v", host, s.State, seq)] = true
					}
				}
			}
			if len(problems) > 0 && firstProblem.IsZero() {
				firstProblem = time.Now()
			}
			// A wrong claim or install fails the test at once; give others a moment to show.
			if len(problems) > 0 && time.Since(firstProblem) > 3*time.Second {
				f.t.Fatalf("after the move:\n  %s\n%s\ntarget host history:\n%s", strings.Join(slices.Sorted(maps.Keys(problems)), "\n  "),
					f.describe(), targetHistory.render())
			}
			for _, am := range f.listAnvilMachines() {
				if am.Status.HostRef == nil || !ptr.Deref(am.Status.Initialization.Provisioned, false) {
					return false, fmt.Sprintf("AnvilMachine %s: hostRef %+v, %s", am.Name, am.Status.HostRef, conditionSummary(am.Status.Conditions))
				}
			}
			return len(problems) == 0, ""
		})
		c.waitReady(1, 1, 2*time.Minute)
		after := f.checkPlacement(c)
		for m, p := range placed {
			if after[m].host != p.host {
				t.Errorf("machine %s ran on host %s before the move and on %q after", m, p.host, after[m].host)
			}
		}
		t.Logf("target host history:\n%s", targetHistory.render())
	})
}

// targetCluster is a second management cluster: its own API server, Cluster API's
// controllers and an Anvil manager, with clusterctl's inventory.
type targetCluster struct {
	api        *mgmtplane.Environment
	clusterctl clusterctlcluster.Client
	// ctx ends before the target's API server stops.
	ctx context.Context
}

// startTargetManagementCluster starts the target of a move. It stops when the test ends,
// before f's own cleanup, which then works on the source again.
func startTargetManagementCluster(t *testing.T, f *fixture) *targetCluster {
	t.Helper()
	start := time.Now()
	api, err := mgmtplane.Start()
	if err != nil {
		t.Fatal(err)
	}
	capi, err := capistack.Start(api.Config, capistack.Options{Workloads: workloads, Instance: "-target"})
	if err != nil {
		_ = api.Stop()
		t.Fatal(err)
	}
	source := f.api
	anvil := startAnvil(t, api)
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(func() {
		cancel()
		anvil.stop(t)
		if err := capi.Stop(time.Minute); err != nil {
			t.Errorf("stopping the target's Cluster API controllers: %v", err)
		}
		f.api = source // f's cleanup purges the source
		if err := api.Stop(); err != nil {
			t.Errorf("stopping the target API server: %v", err)
		}
	})
	tc := &targetCluster{api: api, clusterctl: prepareForClusterctl(t, api), ctx: ctx}
	t.Logf("target management cluster up in %s", time.Since(start).Round(100*time.Millisecond))
	return tc
}

// providers are the inventory entries `clusterctl init` would have written.
var providers = []clusterctlv1.Provider{
	{ObjectMeta: metav1.ObjectMeta{Namespace: "capi-system", Name: "cluster-api"}, ProviderName: "cluster-api",
		Type: string(clusterctlv1.CoreProviderType), Version: "v1.14.2"},
	{ObjectMeta: metav1.ObjectMeta{Namespace: "capi-kubeadm-bootstrap-system", Name: "bootstrap-kubeadm"}, ProviderName: "kubeadm",
		Type: string(clusterctlv1.BootstrapProviderType), Version: "v1.14.2"},
	{ObjectMeta: metav1.ObjectMeta{Namespace: "capi-kubeadm-control-plane-system", Name: "control-plane-kubeadm"}, ProviderName: "kubeadm",
		Type: string(clusterctlv1.ControlPlaneProviderType), Version: "v1.14.2"},
	{ObjectMeta: metav1.ObjectMeta{Namespace: "anvil-system", Name: "infrastructure-anvil"}, ProviderName: "anvil",
		Type: string(clusterctlv1.InfrastructureProviderType), Version: "v0.1.0"},
}

// prepareForClusterctl makes api look as `clusterctl init` leaves a management cluster (the
// clusterctl label on every provider CRD, the inventory CRD and one entry per provider) and
// returns a clusterctl client for it.
func prepareForClusterctl(t *testing.T, api *mgmtplane.Environment) clusterctlcluster.Client {
	t.Helper()
	ctx := context.Background()
	crds := &apiextensionsv1.CustomResourceDefinitionList{}
	if err := api.Client.List(ctx, crds); err != nil {
		t.Fatal(err)
	}
	for i := range crds.Items {
		crd := &crds.Items[i]
		if _, ok := crd.Labels[clusterctlv1.ClusterctlLabel]; ok {
			continue
		}
		patch := client.MergeFrom(crd.DeepCopy())
		if crd.Labels == nil {
			crd.Labels = map[string]string{}
		}
		crd.Labels[clusterctlv1.ClusterctlLabel] = ""
		if err := api.Client.Patch(ctx, crd, patch); err != nil {
			t.Fatal(err)
		}
	}
	kubeconfig := writeKubeconfig(t, api.Config)
	config, err := clusterctlconfig.New(ctx, "", clusterctlconfig.InjectReader(emptyReader{}))
	if err != nil {
		t.Fatal(err)
	}
	cc := clusterctlcluster.New(clusterctlcluster.Kubeconfig{Path: kubeconfig}, config)
	inventory := cc.ProviderInventory()
	if err := inventory.EnsureCustomResourceDefinitions(ctx); err != nil {
		t.Fatal(err)
	}
	for _, p := range providers {
		ns := &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: p.Namespace}}
		if err := api.Client.Create(ctx, ns); client.IgnoreAlreadyExists(err) != nil {
			t.Fatal(err)
		}
		p.Labels = map[string]string{clusterctlv1.ClusterctlLabel: "", "cluster.x-k8s.io/provider": p.ManifestLabel()}
		if err := inventory.Create(ctx, p); err != nil {
			t.Fatal(err)
		}
	}
	return cc
}

// writeKubeconfig writes a kubeconfig for cfg (envtest's client certificate) into the test's
// temporary directory.
func writeKubeconfig(t *testing.T, cfg *rest.Config) string {
	t.Helper()
	kc := clientcmdapi.NewConfig()
	kc.Clusters["envtest"] = &clientcmdapi.Cluster{Server: cfg.Host, CertificateAuthorityData: cfg.CAData}
	kc.AuthInfos["envtest"] = &clientcmdapi.AuthInfo{ClientCertificateData: cfg.CertData, ClientKeyData: cfg.KeyData, Token: cfg.BearerToken}
	kc.Contexts["envtest"] = &clientcmdapi.Context{Cluster: "envtest", AuthInfo: "envtest"}
	kc.CurrentContext = "envtest"
	path := filepath.Join(t.TempDir(), "kubeconfig")
	if err := clientcmd.WriteToFile(*kc, path); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(path, 0o600); err != nil {
		t.Fatal(err)
	}
	return path
}

// emptyReader is a clusterctl configuration with nothing in it (no file, no environment):
// move needs none.
type emptyReader struct{}

func (emptyReader) Init(context.Context, string) error { return nil }
func (emptyReader) Get(key string) (string, error) {
	return "", fmt.Errorf("clusterctl configuration %q not set", key)
}
func (emptyReader) Set(string, string)                     {}
func (emptyReader) UnmarshalKey(string, interface{}) error { return nil }

// all returns every host's snapshots.
func (h *hostHistory) all() map[string][]hostSnapshot {
	h.mu.Lock()
	defer h.mu.Unlock()
	out := map[string][]hostSnapshot{}
	for k, v := range h.byHost {
		out[k] = append([]hostSnapshot(nil), v...)
	}
	return out
}
