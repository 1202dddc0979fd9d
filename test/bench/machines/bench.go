package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/client-go/rest"
	toolscache "k8s.io/client-go/tools/cache"
	"k8s.io/client-go/tools/clientcmd"
	clientcmdapi "k8s.io/client-go/tools/clientcmd/api"
	"k8s.io/utils/ptr"
	clusterv1 "sigs.k8s.io/cluster-api/api/core/v1beta2"
	"sigs.k8s.io/controller-runtime/pkg/cache"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/yaml"

	infrav1 "github.com/anvil-metal/cluster-api-provider-anvil/api/v1alpha1"
	"github.com/anvil-metal/cluster-api-provider-anvil/internal/mgmtplane"
	"github.com/anvil-metal/cluster-api-provider-anvil/internal/vbmc/redfish"
	"github.com/anvil-metal/cluster-api-provider-anvil/test/bench/apimeter"
)

const benchNamespace = "anvil-bench"

// Config is one run.
type Config struct {
	// Hosts is the number of emulated servers (and AnvilHosts); Machines the number of
	// AnvilMachines (at most Hosts, so that every machine can be provisioned).
	Hosts, Machines int
	// Clusters the machines are spread over (each a Cluster and an AnvilCluster).
	Clusters int
	// TLS serves the BMCs over HTTPS (redfish+https:// with a CA bundle); false: redfish+http://.
	TLS bool
	// SharedCredentials gives every host the same BMC credentials Secret; false: one each.
	SharedCredentials bool
	// Manager flags; 0 keeps cmd/manager's default.
	HostConcurrency, MachineConcurrency, BMCConcurrency int
	// ExtraManagerArgs are appended to the manager's command line.
	ExtraManagerArgs []string
	// CreateWorkers create objects in parallel (the benchmark's own client, not counted).
	CreateWorkers int
	// Timeout bounds the whole run.
	Timeout time.Duration
	// Dir keeps the manager's log and binary; empty: a temporary directory, removed.
	Dir string
	// Progress receives progress lines (nil: none).
	Progress io.Writer
	// APIServerProfile, when positive, records a CPU profile of the kube-apiserver this long
	// at the start of each phase into Dir (apiserver-onboarding.pprof, apiserver-provisioning.pprof).
	APIServerProfile time.Duration
	// APIServerProfileDelay starts the provisioning phase's profile this long into the window.
	APIServerProfileDelay time.Duration
}

// DefaultConfig is the benchmark: 5,000 hosts and 5,000 machines.
func DefaultConfig() Config {
	return Config{Hosts: 5000, Machines: 5000, Clusters: 50, TLS: true, CreateWorkers: 16, Timeout: 20 * time.Minute}
}

// Result is what a run measured.
type Result struct {
	Config Config
	// HostsAvailable is from the first host created until every host was Available;
	// Provisioned from the first AnvilMachine created until every machine was provisioned;
	// EndToEnd from the first host created until every machine was provisioned.
	HostsAvailable, Provisioned, EndToEnd time.Duration
	// CreateHosts, CreateOwners (Clusters, AnvilClusters, Machines) and CreateMachines
	// (AnvilMachines) are how long the benchmark took to create them.
	CreateHosts, CreateOwners, CreateMachines time.Duration
	// OwnerWrites are the manager's requests while the benchmark created Cluster API's
	// objects (counted in Provision too).
	OwnerWrites apiCounts
	// ProvisionedCount machines reached initialization.provisioned.
	ProvisionedCount int
	// PeakRSSKiB is the manager's VmHWM at the end of the run.
	PeakRSSKiB int64
	// Onboard and Provision are the manager's API requests in each phase.
	Onboard, Provision apiCounts
	// CPU by process over the whole run, seconds; MachineBusy is what every process on
	// the machine used meanwhile (other work included).
	CPU         map[string]float64
	MachineBusy float64
	// WindowCPU and WindowMachineBusy are the same over the provisioning window;
	// WindowWrites every write the API server took in it (the manager's and the benchmark's
	// AnvilMachine creates).
	WindowCPU         map[string]float64
	WindowMachineBusy float64
	WindowWrites      int64
	// Load is /proc/loadavg at the end of the run.
	Load string
	// Problems found when checking the claims at the end (none expected).
	Problems []string
	// Latencies of machines from creation to provisioned.
	Latencies []time.Duration
	// WriteLatency is the mean time each kind of write took, as the manager saw it.
	WriteLatency map[string]time.Duration
	// ManagerEnv is the environment config/manager/manager.yaml gives the manager.
	ManagerEnv []string
	// HostBytes and MachineBytes are the mean size of a stored AnvilHost and AnvilMachine
	// as JSON at the end (what the API server decodes and encodes on every write to one), and
	// HostManagedFieldsBytes, MachineManagedFieldsBytes the part of it that is managedFields.
	HostBytes, HostManagedFieldsBytes, MachineBytes, MachineManagedFieldsBytes int
}

// WritesPerHost is the manager's writes (any outcome) per host, end to end.
func (r *Result) WritesPerHost() float64 {
	return float64(r.Onboard.writes()+r.Provision.writes()) / float64(r.Config.Hosts)
}

func (r *Result) progressf(format string, args ...any) {
	if r.Config.Progress != nil {
		fmt.Fprintf(r.Config.Progress, format+"\n", args...)
	}
}

// Run runs the benchmark: the API server, the BMC emulators and the manager each in their
// own process, this one creating the objects and watching them.
func Run(ctx context.Context, cfg Config) (*Result, error) {
	if cfg.Machines > cfg.Hosts || cfg.Machines <= 0 || cfg.Clusters <= 0 {
		return nil, fmt.Errorf("want 0 < machines (%d) <= hosts (%d) and at least one cluster", cfg.Machines, cfg.Hosts)
	}
	ctx, cancel := context.WithTimeout(ctx, cfg.Timeout)
	defer cancel()
	res := &Result{Config: cfg}
	dir := cfg.Dir
	if dir == "" {
		tmp, err := os.MkdirTemp("", "anvil-bench-machines-")
		if err != nil {
			return nil, err
		}
		defer os.RemoveAll(tmp)
		dir = tmp
	} else if err := os.MkdirAll(dir, 0o750); err != nil {
		return nil, err
	}

	managerBin, err := buildManager(ctx, dir)
	if err != nil {
		return nil, err
	}
	env, err := mgmtplane.Start()
	if err != nil {
		return nil, err
	}
	defer func() { _ = env.Stop() }()
	bmcs, ready, err := startBMCs(ctx, cfg.Hosts, cfg.TLS, dir)
	if err != nil {
		return nil, err
	}
	defer bmcs.stop()
	managerCfg, err := managerIdentity(ctx, env.Config)
	if err != nil {
		return nil, err
	}
	kubeconfig := filepath.Join(dir, "kubeconfig")
	if err := writeKubeconfig(kubeconfig, managerCfg); err != nil {
		return nil, err
	}
	res.ManagerEnv, err = deployedEnv()
	if err != nil {
		return nil, err
	}
	mgr, err := startManager(managerBin, kubeconfig, res.ManagerEnv, cfg, dir)
	if err != nil {
		return nil, err
	}
	defer mgr.stop()
	res.progressf("kube-apiserver, %d emulated BMCs and cmd/manager (pid %d) running", cfg.Hosts, mgr.pid())

	// The benchmark's own requests are counted so that the API server's counts less them
	// are the manager's.
	counter := &benchCounter{}
	benchCfg := counter.wrap(env.Config)
	c, err := client.New(benchCfg, client.Options{Scheme: env.Client.Scheme()})
	if err != nil {
		return nil, err
	}
	meter := &managerMeter{admin: env.Config, bench: counter}
	tr, err := startTracker(ctx, benchCfg, env.Client.Scheme())
	if err != nil {
		return nil, err
	}
	if err := c.Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: benchNamespace}}); err != nil {
		return nil, err
	}

	// Phase 1: hosts arrive and are onboarded.
	base, err := meter.snapshot(ctx)
	if err != nil {
		return nil, err
	}
	busy0 := apimeter.MachineBusySeconds()
	labels := map[int]string{mgr.pid(): "manager", bmcs.pid(): "BMC emulators"}
	cpu0 := cpuByProcess(labels)
	t0 := time.Now()
	if cfg.APIServerProfile > 0 {
		profileAPIServer(ctx, env.Config, 0, cfg.APIServerProfile, dir, "onboarding", res.progressf)
	}
	if err := createHosts(ctx, c, cfg, ready); err != nil {
		return nil, err
	}
	res.CreateHosts = time.Since(t0)
	res.progressf("created %d hosts and their Secrets in %s", cfg.Hosts, res.CreateHosts.Round(100*time.Millisecond))
	if err := waitFor(ctx, mgr, res, "hosts Available", cfg.Hosts, tr.available.Load); err != nil {
		return res, err
	}
	res.HostsAvailable = time.Since(t0)
	if err := tr.stopHosts(ctx); err != nil {
		return res, err
	}
	afterOnboard, err := meter.snapshot(ctx)
	if err != nil {
		return res, err
	}
	res.Onboard = afterOnboard.minus(base)

	// Phase 2: machines claim hosts and are provisioned. Cluster API's objects come first,
	// outside the window: Anvil does nothing with a Machine until its AnvilMachine exists
	// (in Cluster API the MachineSet creates the infrastructure machine too). The window
	// opens as the first AnvilMachine is created and includes creating the rest.
	t1 := time.Now()
	owners, err := createOwners(ctx, c, cfg)
	if err != nil {
		return res, err
	}
	res.CreateOwners = time.Since(t1)
	res.progressf("created %d Clusters, AnvilClusters and %d Machines in %s (before the window)", cfg.Clusters, cfg.Machines, res.CreateOwners.Round(100*time.Millisecond))
	beforeMachines, err := meter.snapshot(ctx)
	if err != nil {
		return res, err
	}
	res.OwnerWrites = beforeMachines.minus(afterOnboard)
	cpu1 := cpuByProcess(labels)
	busy1 := apimeter.MachineBusySeconds()
	t1 = time.Now()
	if cfg.APIServerProfile > 0 {
		profileAPIServer(ctx, env.Config, cfg.APIServerProfileDelay, cfg.APIServerProfile, dir, "provisioning", res.progressf)
	}
	if err := createAnvilMachines(ctx, c, cfg, owners, tr); err != nil {
		return res, err
	}
	res.CreateMachines = time.Since(t1)
	res.progressf("created %d AnvilMachines in %s", cfg.Machines, res.CreateMachines.Round(100*time.Millisecond))
	if err := waitFor(ctx, mgr, res, "machines provisioned", cfg.Machines, tr.provisioned.Load); err != nil {
		return res, err
	}
	now := time.Now()
	res.Provisioned, res.EndToEnd = now.Sub(t1), now.Sub(t0)
	res.ProvisionedCount = int(tr.provisioned.Load())
	final, err := meter.snapshot(ctx)
	if err != nil {
		return res, err
	}
	res.Provision = final.minus(afterOnboard)
	res.PeakRSSKiB = apimeter.StatusKiB(strconv.Itoa(mgr.pid()), "VmHWM")
	res.CPU = cpuByProcess(labels)
	for p, v := range cpu0 {
		res.CPU[p] -= v
	}
	res.WindowCPU = cpuByProcess(labels)
	for p, v := range cpu1 {
		res.WindowCPU[p] -= v
	}
	res.MachineBusy = apimeter.MachineBusySeconds() - busy0
	res.WindowMachineBusy = apimeter.MachineBusySeconds() - busy1
	res.WindowWrites = res.Provision.minus(res.OwnerWrites).writes() + int64(cfg.Machines)
	res.Load = loadAverage()
	res.Latencies = tr.latencies()
	res.WriteLatency = meter.writeLatencies()
	res.Problems, err = checkClaims(ctx, c, cfg)
	if err != nil {
		return res, err
	}
	err = measureObjects(ctx, c, res, dir)
	return res, err
}

// measureObjects records the mean stored size of hosts and machines, and with -dir writes
// the first of each there (host-sample.json, machine-sample.json) to show what is stored.
func measureObjects(ctx context.Context, c client.Client, res *Result, dir string) error {
	hosts := &infrav1.AnvilHostList{}
	if err := c.List(ctx, hosts, client.InNamespace(benchNamespace)); err != nil {
		return err
	}
	machines := &infrav1.AnvilMachineList{}
	if err := c.List(ctx, machines, client.InNamespace(benchNamespace)); err != nil {
		return err
	}
	var err error
	res.HostBytes, res.HostManagedFieldsBytes, err = meanSizes(len(hosts.Items), func(i int) client.Object { return &hosts.Items[i] },
		filepath.Join(dir, "host-sample.json"), res.Config.Dir != "")
	if err != nil {
		return err
	}
	res.MachineBytes, res.MachineManagedFieldsBytes, err = meanSizes(len(machines.Items), func(i int) client.Object { return &machines.Items[i] },
		filepath.Join(dir, "machine-sample.json"), res.Config.Dir != "")
	return err
}

// meanSizes is the mean JSON size of n objects and of their managedFields; with writeSample
// the first goes to samplePath.
func meanSizes(n int, object func(int) client.Object, samplePath string, writeSample bool) (total, managedFields int, err error) {
	if n == 0 {
		return 0, 0, nil
	}
	for i := range n {
		o := object(i)
		raw, err := json.Marshal(o)
		if err != nil {
			return 0, 0, err
		}
		mf, err := json.Marshal(o.GetManagedFields())
		if err != nil {
			return 0, 0, err
		}
		total += len(raw)
		managedFields += len(mf)
		if i == 0 && writeSample {
			if err := os.WriteFile(samplePath, raw, 0o600); err != nil {
				return 0, 0, err
			}
		}
	}
	return total / n, managedFields / n, nil
}

// startManager runs cmd/manager as deployed, with the simulated provisioner, against the
// API server with its ServiceAccount token. Leader election is off: outside a cluster it needs a namespace that
// cmd/manager takes from the pod it runs in.
func startManager(bin, kubeconfig string, env []string, cfg Config, dir string) (*process, error) {
	args := []string{"--provisioner=simulated", "--webhooks=false", "--leader-elect=false",
		"--metrics-bind-address=0", "--health-probe-bind-address=0"}
	if cfg.HostConcurrency > 0 {
		args = append(args, fmt.Sprintf("--anvilhost-concurrency=%d", cfg.HostConcurrency))
	}
	if cfg.MachineConcurrency > 0 {
		args = append(args, fmt.Sprintf("--anvilmachine-concurrency=%d", cfg.MachineConcurrency))
	}
	if cfg.BMCConcurrency > 0 {
		args = append(args, fmt.Sprintf("--bmc-max-concurrency=%d", cfg.BMCConcurrency))
	}
	args = append(args, cfg.ExtraManagerArgs...)
	cmd := exec.Command(bin, args...)
	cmd.Env = append(append(os.Environ(), env...), "KUBECONFIG="+kubeconfig)
	return start("manager", cmd, dir)
}

// deployedEnv is the manager container's environment in config/manager/manager.yaml (e.g.
// GOMEMLIMIT), so that the manager runs here as it is deployed.
func deployedEnv() ([]string, error) {
	root, err := repoRoot()
	if err != nil {
		return nil, err
	}
	raw, err := os.ReadFile(filepath.Join(root, "config", "manager", "manager.yaml"))
	if err != nil {
		return nil, err
	}
	var out []string
	for _, doc := range strings.Split(string(raw), "\n---") {
		d := &appsv1.Deployment{}
		if err := yaml.Unmarshal([]byte(doc), d); err != nil || d.Kind != "Deployment" {
			continue
		}
		for _, c := range d.Spec.Template.Spec.Containers {
			if c.Name != "manager" {
				continue
			}
			for _, e := range c.Env {
				if e.ValueFrom == nil {
					out = append(out, e.Name+"="+e.Value)
				}
			}
		}
	}
	return out, nil
}

// writeKubeconfig gives the manager the API server and its ServiceAccount token.
func writeKubeconfig(path string, cfg *rest.Config) error {
	kc := clientcmdapi.NewConfig()
	kc.Clusters["bench"] = &clientcmdapi.Cluster{Server: cfg.Host, CertificateAuthorityData: cfg.CAData, CertificateAuthority: cfg.CAFile}
	kc.AuthInfos["bench"] = &clientcmdapi.AuthInfo{Token: cfg.BearerToken}
	kc.Contexts["bench"] = &clientcmdapi.Context{Cluster: "bench", AuthInfo: "bench"}
	kc.CurrentContext = "bench"
	return clientcmd.WriteToFile(*kc, path)
}

func hostName(i int) string { return fmt.Sprintf("host-%05d", i) }
func zone(i int) string     { return fmt.Sprintf("zone-%c", 'a'+i%3) }

// createHosts creates the BMC Secrets and one AnvilHost per BMC, spread over three zones.
func createHosts(ctx context.Context, c client.Client, cfg Config, ready bmcsReady) error {
	if cfg.TLS {
		if err := c.Create(ctx, &corev1.Secret{ObjectMeta: metav1.ObjectMeta{Name: "bmc-ca", Namespace: benchNamespace},
			Data: map[string][]byte{"ca.crt": ready.CAPEM}}); err != nil {
			return err
		}
	}
	scheme := "redfish+http://"
	if cfg.TLS {
		scheme = "redfish+https://"
	}
	if cfg.SharedCredentials {
		// Every BMC then needs the same password.
		return errors.New("shared credentials need BMCs with one password: not supported by this emulator setup")
	}
	return parallel(ctx, cfg.Hosts, cfg.CreateWorkers, func(i int) error {
		secret := &corev1.Secret{ObjectMeta: metav1.ObjectMeta{Name: hostName(i) + "-bmc", Namespace: benchNamespace},
			Data: map[string][]byte{"username": []byte("admin"), "password": []byte(bmcPassword(i))}}
		if err := c.Create(ctx, secret); err != nil {
			return err
		}
		h := &infrav1.AnvilHost{ObjectMeta: metav1.ObjectMeta{Name: hostName(i), Namespace: benchNamespace,
			Labels: map[string]string{infrav1.DefaultFailureDomainLabel: zone(i)}},
			Spec: infrav1.AnvilHostSpec{
				BMC: infrav1.BMC{Address: scheme + ready.Addrs[i] + "/redfish/v1/Systems/1",
					CredentialsRef: infrav1.LocalSecretReference{Name: secret.Name}},
				BootMACAddress: redfish.NewIdentity(i).MACs[0].String(),
				Online:         true,
			}}
		if cfg.TLS {
			h.Spec.BMC.CABundleRef = &infrav1.LocalSecretReference{Name: "bmc-ca"}
		}
		return c.Create(ctx, h)
	})
}

// machineOwners is what createOwners made: each machine's Machine and its cluster's name.
type machineOwners struct {
	machines []*clusterv1.Machine
}

// createOwners creates what Cluster API would before an infrastructure machine is needed:
// per cluster a Cluster and its AnvilCluster, the bootstrap data Secret, and each Machine
// with bootstrap data in a failure domain (machine i in zone i mod 3, as the hosts are).
// Cluster API's own controllers do not run: nothing else writes to these objects.
func createOwners(ctx context.Context, c client.Client, cfg Config) (*machineOwners, error) {
	if err := c.Create(ctx, &corev1.Secret{ObjectMeta: metav1.ObjectMeta{Name: "bootstrap", Namespace: benchNamespace},
		Data: map[string][]byte{"value": []byte("#cloud-config\n"), "format": []byte("cloud-config")}}); err != nil {
		return nil, err
	}
	clusters := make([]string, cfg.Clusters)
	err := parallel(ctx, cfg.Clusters, cfg.CreateWorkers, func(i int) error {
		name := fmt.Sprintf("cluster-%03d", i)
		cl := &clusterv1.Cluster{ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: benchNamespace},
			Spec: clusterv1.ClusterSpec{InfrastructureRef: clusterv1.ContractVersionedObjectReference{
				APIGroup: infrav1.GroupVersion.Group, Kind: "AnvilCluster", Name: name}}}
		if err := c.Create(ctx, cl); err != nil {
			return err
		}
		clusters[i] = name
		return c.Create(ctx, &infrav1.AnvilCluster{ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: benchNamespace,
			Labels:          map[string]string{clusterv1.ClusterNameLabel: name},
			OwnerReferences: []metav1.OwnerReference{{APIVersion: clusterv1.GroupVersion.String(), Kind: "Cluster", Name: name, UID: cl.UID}}},
			Spec: infrav1.AnvilClusterSpec{ControlPlaneEndpoint: clusterv1.APIEndpoint{Host: "192.0.2.1", Port: 6443}}})
	})
	if err != nil {
		return nil, err
	}
	owners := &machineOwners{machines: make([]*clusterv1.Machine, cfg.Machines)}
	err = parallel(ctx, cfg.Machines, cfg.CreateWorkers, func(i int) error {
		cluster := clusters[i%len(clusters)]
		name := fmt.Sprintf("%s-m-%05d", cluster, i)
		m := &clusterv1.Machine{ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: benchNamespace,
			Labels: map[string]string{clusterv1.ClusterNameLabel: cluster}},
			Spec: clusterv1.MachineSpec{ClusterName: cluster, FailureDomain: zone(i),
				Bootstrap: clusterv1.Bootstrap{DataSecretName: ptr.To("bootstrap")},
				InfrastructureRef: clusterv1.ContractVersionedObjectReference{APIGroup: infrav1.GroupVersion.Group,
					Kind: "AnvilMachine", Name: name}}}
		if err := c.Create(ctx, m); err != nil {
			return err
		}
		owners.machines[i] = m
		return nil
	})
	return owners, err
}

// createAnvilMachines creates each Machine's AnvilMachine, owned by it, without hardware
// minimums.
func createAnvilMachines(ctx context.Context, c client.Client, cfg Config, owners *machineOwners, tr *tracker) error {
	image := infrav1.Image{URL: "https://images.example.com/ubuntu-24.04.img",
		Checksum: "sha256:9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"}
	return parallel(ctx, cfg.Machines, cfg.CreateWorkers, func(i int) error {
		m := owners.machines[i]
		tr.created(m.Name)
		return c.Create(ctx, &infrav1.AnvilMachine{ObjectMeta: metav1.ObjectMeta{Name: m.Name, Namespace: benchNamespace,
			Labels:          map[string]string{clusterv1.ClusterNameLabel: m.Spec.ClusterName},
			OwnerReferences: []metav1.OwnerReference{{APIVersion: clusterv1.GroupVersion.String(), Kind: "Machine", Name: m.Name, UID: m.UID}}},
			Spec: infrav1.AnvilMachineSpec{Image: image}})
	})
}

// parallel runs fn(0..n-1) on workers goroutines and returns the first error.
func parallel(ctx context.Context, n, workers int, fn func(int) error) error {
	var next atomic.Int64
	var firstErr error
	var once sync.Once
	var wg sync.WaitGroup
	for range max(workers, 1) {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				i := int(next.Add(1) - 1)
				if i >= n || ctx.Err() != nil {
					return
				}
				if err := fn(i); err != nil {
					once.Do(func() { firstErr = err })
					return
				}
			}
		}()
	}
	wg.Wait()
	if firstErr == nil {
		firstErr = ctx.Err()
	}
	return firstErr
}

// waitFor waits until count() reaches want, reporting progress every 10 s.
func waitFor(ctx context.Context, mgr *process, res *Result, what string, want int, count func() int64) error {
	start := time.Now()
	last := start
	for {
		n := count()
		if int(n) >= want {
			res.progressf("%d %s after %s", n, what, time.Since(start).Round(100*time.Millisecond))
			return nil
		}
		if err := mgr.exited(); err != nil {
			return err
		}
		if time.Since(last) >= 10*time.Second {
			last = time.Now()
			res.progressf("  %d/%d %s after %s; manager RSS %d MiB", n, want, what, time.Since(start).Round(time.Second),
				apimeter.StatusKiB(strconv.Itoa(mgr.pid()), "VmRSS")>>10)
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("%d of %d %s when the run timed out: %w", n, want, what, ctx.Err())
		case <-time.After(100 * time.Millisecond):
		}
	}
}

// tracker follows hosts and machines through the benchmark's own informers.
type tracker struct {
	available, provisioned atomic.Int64
	// cache holds the informers; the hosts' goes once they are all Available (see stopHosts).
	cache cache.Cache

	mu          sync.Mutex
	hostState   map[string]infrav1.HostState
	createdAt   map[string]time.Time
	provisionAt map[string]time.Time
}

func startTracker(ctx context.Context, cfg *rest.Config, scheme *runtime.Scheme) (*tracker, error) {
	c, err := cache.New(cfg, cache.Options{Scheme: scheme, DefaultNamespaces: map[string]cache.Config{benchNamespace: {}},
		DefaultTransform: trackedFieldsOnly})
	if err != nil {
		return nil, err
	}
	t := &tracker{cache: c, hostState: map[string]infrav1.HostState{}, createdAt: map[string]time.Time{}, provisionAt: map[string]time.Time{}}
	hosts, err := c.GetInformer(ctx, &infrav1.AnvilHost{})
	if err != nil {
		return nil, err
	}
	if _, err := hosts.AddEventHandler(toolscache.ResourceEventHandlerFuncs{
		AddFunc:    func(o any) { t.host(o) },
		UpdateFunc: func(_, o any) { t.host(o) },
	}); err != nil {
		return nil, err
	}
	machines, err := c.GetInformer(ctx, &infrav1.AnvilMachine{})
	if err != nil {
		return nil, err
	}
	if _, err := machines.AddEventHandler(toolscache.ResourceEventHandlerFuncs{
		AddFunc:    func(o any) { t.machine(o) },
		UpdateFunc: func(_, o any) { t.machine(o) },
	}); err != nil {
		return nil, err
	}
	go func() { _ = c.Start(ctx) }()
	if !c.WaitForCacheSync(ctx) {
		return nil, errors.New("the benchmark's informers did not sync")
	}
	return t, nil
}

// stopHosts ends the watch on hosts once onboarding is measured: the provisioning window
// waits only for machines, and a benchmark that kept decoding every host write would take
// CPU from what it measures on a machine it shares with it. The claims are checked at the
// end by reading the hosts once.
func (t *tracker) stopHosts(ctx context.Context) error {
	return t.cache.RemoveInformer(ctx, &infrav1.AnvilHost{})
}

// trackedFieldsOnly keeps of each object what the tracker reads (its name and the status
// field it waits for): the benchmark shares the machine with what it measures, and its copy
// of 10,000 objects should cost as little memory and garbage collection as it can.
func trackedFieldsOnly(o any) (any, error) {
	switch o := o.(type) {
	case *infrav1.AnvilHost:
		slim := &infrav1.AnvilHost{}
		slim.Namespace, slim.Name, slim.ResourceVersion = o.Namespace, o.Name, o.ResourceVersion
		slim.Status.State = o.Status.State
		return slim, nil
	case *infrav1.AnvilMachine:
		slim := &infrav1.AnvilMachine{}
		slim.Namespace, slim.Name, slim.ResourceVersion = o.Namespace, o.Name, o.ResourceVersion
		slim.Status.Initialization.Provisioned = o.Status.Initialization.Provisioned
		return slim, nil
	}
	return o, nil
}

// host counts hosts that have been Available at least once.
func (t *tracker) host(o any) {
	h, ok := o.(*infrav1.AnvilHost)
	if !ok {
		return
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	if _, seen := t.hostState[h.Name]; seen {
		return
	}
	if h.Status.State == infrav1.HostStateAvailable || h.Status.State == infrav1.HostStateProvisioned {
		t.hostState[h.Name] = h.Status.State
		t.available.Add(1)
	}
}

func (t *tracker) created(name string) {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.createdAt[name] = time.Now()
}

func (t *tracker) machine(o any) {
	am, ok := o.(*infrav1.AnvilMachine)
	if !ok || !ptr.Deref(am.Status.Initialization.Provisioned, false) {
		return
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	if _, seen := t.provisionAt[am.Name]; !seen {
		t.provisionAt[am.Name] = time.Now()
		t.provisioned.Add(1)
	}
}

func (t *tracker) latencies() []time.Duration {
	t.mu.Lock()
	defer t.mu.Unlock()
	out := make([]time.Duration, 0, len(t.provisionAt))
	for name, at := range t.provisionAt {
		if c, ok := t.createdAt[name]; ok {
			out = append(out, at.Sub(c))
		}
	}
	sort.Slice(out, func(i, j int) bool { return out[i] < out[j] })
	return out
}

// checkClaims reads everything back: every machine holds exactly one host, in its failure
// domain, whose claim and label name it, and no host is held twice.
func checkClaims(ctx context.Context, c client.Client, cfg Config) ([]string, error) {
	hosts := &infrav1.AnvilHostList{}
	if err := c.List(ctx, hosts, client.InNamespace(benchNamespace)); err != nil {
		return nil, err
	}
	machines := &infrav1.AnvilMachineList{}
	if err := c.List(ctx, machines, client.InNamespace(benchNamespace)); err != nil {
		return nil, err
	}
	var problems []string
	byUID := map[string]string{}
	claimed := 0
	for _, h := range hosts.Items {
		cl := h.Spec.Claim
		if cl == nil {
			continue
		}
		claimed++
		if other, dup := byUID[string(cl.MachineRef.UID)]; dup {
			problems = append(problems, fmt.Sprintf("machine %s claims hosts %s and %s", cl.MachineRef.Name, other, h.Name))
		}
		byUID[string(cl.MachineRef.UID)] = h.Name
		if h.Status.State != infrav1.HostStateProvisioned {
			problems = append(problems, fmt.Sprintf("host %s is claimed but %s", h.Name, h.Status.State))
		}
	}
	zoneOf := map[string]string{}
	for _, h := range hosts.Items {
		zoneOf[h.Name] = h.Labels[infrav1.DefaultFailureDomainLabel]
	}
	for _, am := range machines.Items {
		host, ok := byUID[string(am.UID)]
		switch {
		case !ok:
			problems = append(problems, fmt.Sprintf("machine %s holds no host", am.Name))
		case am.Status.HostRef == nil || am.Status.HostRef.Name != host:
			problems = append(problems, fmt.Sprintf("machine %s reports host %+v, the claim is on %s", am.Name, am.Status.HostRef, host))
		case am.Status.FailureDomain != zoneOf[host]:
			problems = append(problems, fmt.Sprintf("machine %s is in %q, its host in %q", am.Name, am.Status.FailureDomain, zoneOf[host]))
		}
	}
	if claimed != cfg.Machines {
		problems = append(problems, fmt.Sprintf("%d hosts claimed for %d machines", claimed, cfg.Machines))
	}
	if len(problems) > 20 {
		problems = append(problems[:20], fmt.Sprintf("… and %d more", len(problems)-20))
	}
	return problems, nil
}
