package main

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"time"

	"github.com/go-logr/logr"
	"k8s.io/apimachinery/pkg/api/resource"
	"k8s.io/utils/ptr"
	clusterv1 "sigs.k8s.io/cluster-api/api/core/v1beta2"
	"sigs.k8s.io/controller-runtime/pkg/event"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/rest"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/controller"
	metricsserver "sigs.k8s.io/controller-runtime/pkg/metrics/server"

	infrav1 "github.com/anvil-metal/cluster-api-provider-anvil/api/v1alpha1"
	"github.com/anvil-metal/cluster-api-provider-anvil/controllers"
	"github.com/anvil-metal/cluster-api-provider-anvil/internal/bmc"
	"github.com/anvil-metal/cluster-api-provider-anvil/internal/bootservices"
	"github.com/anvil-metal/cluster-api-provider-anvil/internal/hoststate"
	"github.com/anvil-metal/cluster-api-provider-anvil/internal/lab"
	"github.com/anvil-metal/cluster-api-provider-anvil/internal/mgmtplane"
	"github.com/anvil-metal/cluster-api-provider-anvil/internal/provision"
	"github.com/anvil-metal/cluster-api-provider-anvil/internal/vbmc/ipmi"
	"github.com/anvil-metal/cluster-api-provider-anvil/internal/vbmc/machine"
	"github.com/anvil-metal/cluster-api-provider-anvil/internal/vbmc/redfish"
)

// demoHosts runs the physical lifecycle against emulated servers: onboarding over Redfish
// and IPMI, a real network boot into the agent that installs an image into slot A of a
// sparse disk, the emulated OS coming up from that slot, release with a wipe, maintenance
// and retirement.
func demoHosts(ctx context.Context, env *mgmtplane.Environment, out io.Writer, step *stepper) error {
	workDir, err := os.MkdirTemp("", "anvil-demo-")
	if err != nil {
		return err
	}
	defer func() { _ = os.RemoveAll(workDir) }()
	server, err := redfish.NewServer(redfish.ServerOptions{TLS: true})
	if err != nil {
		return err
	}
	defer func() { _ = server.Close() }()

	step.start("start the Anvil manager: controllers, BMC pool, boot services (HTTP boot, image cache, agent API)")
	mgrCtx, stopMgr := context.WithCancel(ctx)
	defer stopMgr()
	boot, err := startManager(mgrCtx, env, workDir)
	if err != nil {
		return err
	}
	step.done()

	step.start("rack three emulated servers (2 Redfish over TLS, 1 IPMI via ipmi_sim when installed) with empty 20 GiB disks")
	c := env.Client
	if err := c.Create(ctx, &corev1.Secret{ObjectMeta: metav1.ObjectMeta{Name: "lab-bmc-ca", Namespace: demoNamespace},
		Data: map[string][]byte{"ca.crt": server.CACertPEM()}}); err != nil {
		return err
	}
	var names []string
	servers := map[string]*lab.Server{}
	for i, mockup := range redfish.Mockups() {
		name := fmt.Sprintf("lab-server-%d", i+1)
		names = append(names, name)
		m := machine.New(machine.Config{})
		password := fmt.Sprintf("lab-pw-%d", i)
		var address string
		var caRef *infrav1.LocalSecretReference
		if b, err := ipmi.Start(mgrCtx, ipmi.Config{Machine: m, Username: "admin", Password: password,
			FRU: ipmi.FRU{Manufacturer: "Anvil Lab", Product: "IPMI-1U", SerialNumber: "LAB-0003"}}); i == 2 && err == nil {
			address = b.Address()
			defer func() { _ = b.Stop() }()
		} else {
			if err == nil {
				_ = b.Stop()
			}
			b, err := server.AddBMC(redfish.BMCOptions{Mockup: mockup, Username: "admin", Password: password, Machine: m,
				Identity: redfish.NewIdentity(i + 1), Hardware: redfish.Hardware{Processors: 1 + i, MemoryGiB: 128 << i}})
			if err != nil {
				return err
			}
			address = "redfish+https://" + b.Addr() + "/redfish/v1/Systems/1"
			caRef = &infrav1.LocalSecretReference{Name: "lab-bmc-ca"}
		}
		mac := fmt.Sprintf("52:54:00:1a:b0:%02x", i+1)
		diskPath := filepath.Join(workDir, name+".img")
		if err := lab.NewDisk(diskPath, 20<<30); err != nil {
			return err
		}
		srv := &lab.Server{Name: name, MAC: mac, Machine: m, DiskPath: diskPath, BootURL: boot.PublicURL(), Log: logr.Discard(),
			Inventory: &infrav1.HardwareInventory{CPU: infrav1.CPUInfo{Arch: "amd64", Sockets: 1, Cores: int32(8 * (i + 1)), Threads: int32(16 * (i + 1))},
				NUMANodes: []infrav1.NUMANode{{ID: 0, CPUs: "0-7"}}, Memory: resource.NewQuantity(int64(128<<i)<<30, resource.BinarySI), System: infrav1.SystemInfo{Manufacturer: "Anvil Lab", SerialNumber: fmt.Sprintf("LAB-%04d", i+1)}},
			OSBooted: func(_ context.Context, o lab.OSBoot) bool {
				fmt.Fprintf(out, "    %s: OS up from slot %s; the config drive carries provider-id %s and the bootstrap data (%d bytes); health gate passed\n",
					o.Server, o.Slot, o.ProviderID(), len(o.UserData))
				return true
			}}
		srv.Start(mgrCtx)
		servers[name] = srv
		if err := c.Create(ctx, &corev1.Secret{ObjectMeta: metav1.ObjectMeta{Name: name + "-bmc", Namespace: demoNamespace},
			Data: map[string][]byte{"username": []byte("admin"), "password": []byte(password)}}); err != nil {
			return err
		}
		host := &infrav1.AnvilHost{ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: demoNamespace,
			Labels: map[string]string{infrav1.DefaultFailureDomainLabel: fmt.Sprintf("zone-%c", 'a'+i)}},
			Spec: infrav1.AnvilHostSpec{
				BMC:            infrav1.BMC{Address: address, CredentialsRef: infrav1.LocalSecretReference{Name: name + "-bmc"}, CABundleRef: caRef},
				BootMACAddress: mac, Online: false,
			}}
		if err := c.Create(ctx, host); err != nil {
			return err
		}
	}
	step.done()

	step.start("onboard: check each BMC, inspect out of band, label")
	if err := waitHosts(ctx, c, names, infrav1.HostStateAvailable); err != nil {
		return err
	}
	step.done()
	if err := showHosts(ctx, env.Config, out); err != nil {
		return err
	}

	step.start("a machine claims a host in zone-b: PXE via the BMC, the agent registers, streams and verifies the image into slot A, reboots")
	image, stopImages, err := serveImage()
	if err != nil {
		return err
	}
	defer stopImages()
	if err := createMachine(ctx, c, "demo-md-0", "zone-b", image); err != nil {
		return err
	}
	if err := waitMachineProvisioned(ctx, c, "demo-md-0"); err != nil {
		return err
	}
	step.done()
	if err := showHosts(ctx, env.Config, out); err != nil {
		return err
	}
	fmt.Fprintln(out, "\n$ kubectl get anvilmachines -n "+demoNamespace)
	if err := printTable(ctx, env.Config, out, "anvilmachines"); err != nil {
		return err
	}

	step.start("delete the machine: the host is released, the agent wipes its disks, the host is Available again")
	if err := c.Delete(ctx, &infrav1.AnvilMachine{ObjectMeta: metav1.ObjectMeta{Name: "demo-md-0", Namespace: demoNamespace}}); err != nil {
		return err
	}
	if err := waitHostsFree(ctx, c, names[1:2]); err != nil {
		return err
	}
	step.done()

	step.start("put lab-server-1 in maintenance (\"needs repair: PSU 2\"), then clear it: re-inspected")
	if err := mutateHost(ctx, c, names[0], func(h *infrav1.AnvilHost) { h.Spec.Maintenance = &infrav1.Maintenance{Reason: "needs repair: PSU 2"} }); err != nil {
		return err
	}
	if err := waitHosts(ctx, c, names[0:1], infrav1.HostStateMaintenance); err != nil {
		return err
	}
	if err := mutateHost(ctx, c, names[0], func(h *infrav1.AnvilHost) { h.Spec.Maintenance = nil }); err != nil {
		return err
	}
	if err := waitHosts(ctx, c, names[0:1], infrav1.HostStateAvailable); err != nil {
		return err
	}
	step.done()

	step.start("retire lab-server-3: the agent wipes it, it is powered off and scrapped")
	if err := mutateHost(ctx, c, names[2], func(h *infrav1.AnvilHost) { h.Spec.Retire = true }); err != nil {
		return err
	}
	if err := waitHosts(ctx, c, names[2:3], infrav1.HostStateRetired); err != nil {
		return err
	}
	step.done()
	return showHosts(ctx, env.Config, out)
}

// startManager runs Anvil's controllers with the real provisioning backend: boot services on
// loopback and the agent, as in production (DHCP is left to the emulated firmware, which asks
// the HTTP boot endpoint directly).
func startManager(ctx context.Context, env *mgmtplane.Environment, workDir string) (*bootservices.Services, error) {
	mgr, err := ctrl.NewManager(env.Config, ctrl.Options{Scheme: env.Scheme, Metrics: metricsserver.Options{BindAddress: "0"}})
	if err != nil {
		return nil, err
	}
	pool := bmc.NewPool(bmc.PoolOptions{CallTimeout: 10 * time.Second})
	if err := mgr.Add(pool); err != nil {
		return nil, err
	}
	wake := make(chan event.TypedGenericEvent[*infrav1.AnvilHost], 256)
	boot, err := bootservices.New(bootservices.Config{HTTPAddress: "127.0.0.1:0", ImageCacheDir: filepath.Join(workDir, "image-cache"),
		ImageCacheBytes: 4 << 30, AllowLocalImages: true, Log: logr.Discard(),
		Backend: provision.Options{Secrets: mgr.GetClient(), Notify: controllers.WakeFunc(wake), BootTimeout: time.Minute}})
	if err != nil {
		return nil, err
	}
	if err := mgr.Add(boot); err != nil {
		return nil, err
	}
	hosts := &controllers.AnvilHostReconciler{Client: mgr.GetClient(), Recorder: mgr.GetEventRecorder("anvilhost-controller"), Pool: pool,
		StateMachine: &hoststate.Machine{BMC: pool, Provisioner: boot.Backend, PowerSyncInterval: 10 * time.Second, RetryInterval: 2 * time.Second},
		Wake:         wake}
	if err := hosts.SetupWithManager(ctx, mgr, controller.Options{MaxConcurrentReconciles: 10}); err != nil {
		return nil, err
	}
	machines := &controllers.AnvilMachineReconciler{Client: mgr.GetClient(), APIReader: mgr.GetAPIReader()}
	if err := machines.SetupWithManager(ctx, mgr, controller.Options{MaxConcurrentReconciles: 5}); err != nil {
		return nil, err
	}
	clusters := &controllers.AnvilClusterReconciler{Client: mgr.GetClient()}
	if err := clusters.SetupWithManager(ctx, mgr, controller.Options{}); err != nil {
		return nil, err
	}
	go func() { _ = mgr.Start(ctx) }()
	return boot, nil
}

func mutateHost(ctx context.Context, c client.Client, name string, mutate func(*infrav1.AnvilHost)) error {
	for range 20 {
		h := &infrav1.AnvilHost{}
		if err := c.Get(ctx, client.ObjectKey{Namespace: demoNamespace, Name: name}, h); err != nil {
			return err
		}
		mutate(h)
		if err := c.Update(ctx, h); err == nil {
			return nil
		}
		time.Sleep(100 * time.Millisecond)
	}
	return fmt.Errorf("could not update host %s", name)
}

func waitHosts(ctx context.Context, c client.Client, names []string, state infrav1.HostState) error {
	deadline := time.Now().Add(90 * time.Second)
	for {
		pending := ""
		for _, n := range names {
			h := &infrav1.AnvilHost{}
			if err := c.Get(ctx, client.ObjectKey{Namespace: demoNamespace, Name: n}, h); err != nil || h.Status.State != state {
				pending = n
				if err == nil && h.Status.LastError != nil {
					pending += " (" + h.Status.LastError.Reason + ": " + h.Status.LastError.Message + ")"
				}
				break
			}
		}
		if pending == "" {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("host %s did not reach %s", pending, state)
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// serveImage serves a generated 32 MiB root filesystem image over HTTP on loopback and
// returns it with its checksum, as an image server would.
func serveImage() (infrav1.Image, func(), error) {
	content := bytes.Repeat([]byte("anvil demo root filesystem\n"), 32<<20/27)
	sum := sha256.Sum256(content)
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return infrav1.Image{}, nil, err
	}
	srv := &http.Server{ReadHeaderTimeout: 10 * time.Second, Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		http.ServeContent(w, r, "rootfs.img", time.Time{}, bytes.NewReader(content))
	})}
	go func() { _ = srv.Serve(l) }()
	img := infrav1.Image{URL: "http://" + l.Addr().String() + "/rootfs.img", Checksum: "sha256:" + hex.EncodeToString(sum[:]),
		Format: infrav1.ImageFormatRaw, Layout: infrav1.ImageLayoutABRoot}
	return img, func() { _ = srv.Close() }, nil
}

// createMachine creates what Cluster API's controllers would: a Cluster with its
// AnvilCluster, bootstrap data, a Machine and its AnvilMachine.
func createMachine(ctx context.Context, c client.Client, name, zone string, image infrav1.Image) error {
	cluster := &clusterv1.Cluster{ObjectMeta: metav1.ObjectMeta{Name: "demo", Namespace: demoNamespace},
		Spec: clusterv1.ClusterSpec{InfrastructureRef: clusterv1.ContractVersionedObjectReference{APIGroup: infrav1.GroupVersion.Group, Kind: "AnvilCluster", Name: "demo"}}}
	if err := c.Create(ctx, cluster); err != nil {
		return err
	}
	owner := func(o client.Object, kind string) []metav1.OwnerReference {
		return []metav1.OwnerReference{{APIVersion: clusterv1.GroupVersion.String(), Kind: kind, Name: o.GetName(), UID: o.GetUID()}}
	}
	labels := map[string]string{clusterv1.ClusterNameLabel: "demo"}
	if err := c.Create(ctx, &infrav1.AnvilCluster{ObjectMeta: metav1.ObjectMeta{Name: "demo", Namespace: demoNamespace, Labels: labels, OwnerReferences: owner(cluster, "Cluster")},
		Spec: infrav1.AnvilClusterSpec{ControlPlaneEndpoint: clusterv1.APIEndpoint{Host: "192.168.10.100", Port: 6443}}}); err != nil {
		return err
	}
	if err := c.Create(ctx, &corev1.Secret{ObjectMeta: metav1.ObjectMeta{Name: name + "-bootstrap", Namespace: demoNamespace},
		Data: map[string][]byte{"value": []byte("#cloud-config\nruncmd:\n  - kubeadm join 192.168.10.100:6443\n"), "format": []byte("cloud-config")}}); err != nil {
		return err
	}
	m := &clusterv1.Machine{ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: demoNamespace, Labels: labels},
		Spec: clusterv1.MachineSpec{ClusterName: "demo", FailureDomain: zone,
			Bootstrap:         clusterv1.Bootstrap{DataSecretName: ptr.To(name + "-bootstrap")},
			InfrastructureRef: clusterv1.ContractVersionedObjectReference{APIGroup: infrav1.GroupVersion.Group, Kind: "AnvilMachine", Name: name}}}
	if err := c.Create(ctx, m); err != nil {
		return err
	}
	return c.Create(ctx, &infrav1.AnvilMachine{ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: demoNamespace, Labels: labels, OwnerReferences: owner(m, "Machine")},
		Spec: infrav1.AnvilMachineSpec{Image: image, WipePolicy: infrav1.WipePolicyMetadata}})
}

func waitMachineProvisioned(ctx context.Context, c client.Client, name string) error {
	deadline := time.Now().Add(3 * time.Minute)
	for time.Now().Before(deadline) {
		am := &infrav1.AnvilMachine{}
		if err := c.Get(ctx, client.ObjectKey{Namespace: demoNamespace, Name: name}, am); err == nil && ptr.Deref(am.Status.Initialization.Provisioned, false) {
			return nil
		}
		time.Sleep(200 * time.Millisecond)
	}
	return fmt.Errorf("machine %s was not provisioned", name)
}

func waitHostsFree(ctx context.Context, c client.Client, names []string) error {
	deadline := time.Now().Add(3 * time.Minute)
	for time.Now().Before(deadline) {
		free := true
		for _, n := range names {
			h := &infrav1.AnvilHost{}
			if err := c.Get(ctx, client.ObjectKey{Namespace: demoNamespace, Name: n}, h); err != nil || h.Spec.Claim != nil || h.Status.State != infrav1.HostStateAvailable {
				free = false
			}
		}
		if free {
			return nil
		}
		time.Sleep(200 * time.Millisecond)
	}
	return fmt.Errorf("hosts %v were not released", names)
}

func showHosts(ctx context.Context, cfg *rest.Config, out io.Writer) error {
	fmt.Fprintln(out, "\n$ kubectl get anvilhosts -n "+demoNamespace+" -L "+hoststate.LabelCPUCores+","+hoststate.LabelMemoryGiB+","+infrav1.DefaultFailureDomainLabel)
	return printTable(ctx, cfg, out, "anvilhosts", hoststate.LabelCPUCores, hoststate.LabelMemoryGiB, infrav1.DefaultFailureDomainLabel)
}
