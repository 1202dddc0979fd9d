package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/tools/clientcmd"
	clientcmdapi "k8s.io/client-go/tools/clientcmd/api"
	"sigs.k8s.io/controller-runtime/pkg/client"

	infrav1 "github.com/anvil-metal/cluster-api-provider-anvil/api/v1alpha1"
	"github.com/anvil-metal/cluster-api-provider-anvil/internal/bootservices"
	"github.com/anvil-metal/cluster-api-provider-anvil/internal/capistack"
	"github.com/anvil-metal/cluster-api-provider-anvil/internal/lab"
	"github.com/anvil-metal/cluster-api-provider-anvil/internal/mgmtplane"
	"github.com/anvil-metal/cluster-api-provider-anvil/internal/workload"
)

const (
	labNamespace   = "anvil-demo"
	labClusterName = "demo"
)

// labOptions are the lab's flags.
type labOptions struct {
	Servers, ControlPlanes, Workers int
	// Keep leaves everything running after the cluster is up and the faults are handled,
	// and prints a kubeconfig; the lab then ends on an interrupt.
	Keep bool
	// VM makes VMs of the servers (the first ones) qemu VMs booting the real agent (see
	// lab.VM); they need the provisioning network.
	VM  bool
	VMs int
	// Live redraws the host and machine tables in place (a terminal); otherwise each change
	// is printed as a line.
	Live bool
	Out  io.Writer
	// Template is the cluster template the lab generates its cluster from.
	Template          string
	KubernetesVersion string
}

func defaultLabOptions() labOptions {
	return labOptions{Servers: 6, ControlPlanes: 1, Workers: 2, Template: filepath.Join("templates", "cluster-template.yaml"),
		KubernetesVersion: "v1.35.0", Out: os.Stdout}
}

func (o labOptions) validate() error {
	switch {
	case o.ControlPlanes != 1 && o.ControlPlanes != 3 && o.ControlPlanes != 5:
		return fmt.Errorf("--control-planes=%d: a kubeadm control plane has 1, 3 or 5 machines", o.ControlPlanes)
	case o.Workers < 2:
		return fmt.Errorf("--workers=%d: the lab scales one worker down and fails another; give at least 2", o.Workers)
	case o.Servers < o.ControlPlanes+o.Workers+2:
		return fmt.Errorf("--servers=%d: %d control-plane and %d worker machines need at least %d servers "+
			"(one spare replaces the failed worker, one is retired)", o.Servers, o.ControlPlanes, o.Workers, o.ControlPlanes+o.Workers+2)
	case o.Servers > lab.MaxServers:
		return fmt.Errorf("--servers=%d: the lab's provisioning network holds at most %d servers", o.Servers, lab.MaxServers)
	case o.VM && (o.VMs < 1 || o.VMs > 2):
		return fmt.Errorf("--vms=%d: the lab runs 1 or 2 qemu VMs (each takes 1 GiB and a core's worth of TCG)", o.VMs)
	}
	return nil
}

// labRun is one run of the lab: what it started, so it can stop it all.
type labRun struct {
	opts      labOptions
	out       io.Writer
	env       *mgmtplane.Environment
	workloads *workload.Server
	capi      *capistack.Managers
	rack      *rack
	cluster   *generatedCluster
	images    *imageServer
	workDir   string
	// vm is what the qemu VMs need (nil without --vm).
	vm *vmSetup
	// net is what the servers network-boot from (its network is nil where namespaces can't
	// be made), boot the boot services, netboots what the firmware did on the network.
	net      *provisioningNet
	boot     *bootservices.Services
	netboots netbootLog
	stops    []func()
}

// runLab runs the whole lifecycle; the error names the step that failed.
func runLab(ctx context.Context, opts labOptions) (err error) {
	if err := opts.validate(); err != nil {
		return err
	}
	con := newConsole(opts.Out, opts.Live)
	r := &labRun{opts: opts, out: con}
	defer func() {
		con.hideTable()
		r.stop()
	}()
	st := newSteps(con)
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()

	if err := st.run("start the management plane: kube-apiserver and etcd, Cluster API and Anvil CRDs", r.startPlane); err != nil {
		return err
	}
	if err := st.run("start Cluster API v1.14.2: core (with MachineHealthCheck), kubeadm bootstrap, kubeadm control plane; in-memory workload clusters",
		r.startCAPI); err != nil {
		return err
	}
	if err := st.run("show that bad input is refused with the field and the fix", func() error { return r.badInput(ctx) }); err != nil {
		return err
	}
	var bootURL string
	if err := st.run("start Anvil: host, machine, cluster and remediation controllers; BMC pool; boot services (iPXE scripts, image cache, agent API)",
		func() (err error) { bootURL, err = r.startAnvil(ctx); return err }); err != nil {
		return err
	}
	if err := st.run(fmt.Sprintf("rack %d emulated servers over %d zones, each with an empty 20 GiB disk", opts.Servers, len(zones)),
		func() error { return r.rackServers(ctx, bootURL) }); err != nil {
		return err
	}
	go con.follow(ctx, r.env.Client, labNamespace, r.workloads, client.ObjectKey{Namespace: labNamespace, Name: labClusterName}, r.rack.bmcKind)
	if err := st.run("onboard: check every BMC, power on, inspect (Redfish out of band, IPMI by booting the agent), label by hardware", func() error { return r.onboard(ctx) }); err != nil {
		return err
	}
	if err := st.run(fmt.Sprintf("generate the cluster from %s with clusterctl's template processor (%d control plane, %d workers) and apply it",
		opts.Template, opts.ControlPlanes, opts.Workers), func() error { return r.createCluster(ctx) }); err != nil {
		return err
	}
	if err := st.run("provision: each machine claims a host, PXE-boots the agent, installs the image into slot A, reboots; kubeadm joins the node",
		func() error {
			if err := r.waitClusterReady(ctx, opts.ControlPlanes, opts.Workers); err != nil {
				return err
			}
			if err := r.checkVMs(ctx); err != nil {
				return err
			}
			return r.checkNetworkBoots()
		}); err != nil {
		return err
	}
	if err := st.run("scale the workers down by one: the machine goes, its host is wiped and Available again",
		func() error { return r.scaleDown(ctx) }); err != nil {
		return err
	}
	if err := st.run("upgrade a worker in place: the new image goes into the inactive slot, boots on trial, passes its health gate, commits",
		func() error { return r.upgradeInPlace(ctx, "v2", "committed") }); err != nil {
		return err
	}
	if err := st.run("upgrade it to a broken image: its kubelet never gets healthy; after 3 tries GRUB boots the old slot and Anvil says so",
		func() error { return r.upgradeInPlace(ctx, "v3-BROKEN", "rolled back") }); err != nil {
		return err
	}
	if err := st.run("a worker's kubelet stops reporting Ready (transient): MachineHealthCheck → AnvilRemediation power-cycles it → Ready again",
		func() error { return r.transientFault(ctx) }); err != nil {
		return err
	}
	var broken string
	if err := st.run("a worker stays NotReady after the power cycle (permanent): the machine is replaced, its host goes to repair",
		func() (err error) { broken, err = r.permanentFault(ctx); return err }); err != nil {
		return err
	}
	if err := st.run("the operator repairs "+broken+" and clears maintenance: its released claim makes it wipe before it is Available",
		func() error { return r.repair(ctx, broken) }); err != nil {
		return err
	}
	var retired string
	if err := st.run("retire a spare server: wiped by the agent, powered off, Retired (never claimed again)",
		func() (err error) { retired, err = r.retire(ctx); return err }); err != nil {
		return err
	}
	if opts.Keep {
		con.hideTable()
		return r.keep(ctx)
	}
	if err := st.run("delete the cluster: every machine goes, every host is wiped back to Available",
		func() error { return r.deleteCluster(ctx, retired) }); err != nil {
		return err
	}
	con.hideTable()
	if err := showHosts(ctx, r.env.Config, opts.Out); err != nil {
		return err
	}
	st.printTimeline()
	if err := r.checkNetworkBoots(); err != nil {
		return err
	}
	r.printNetworkBoots()
	return nil
}

// checkNetworkBoots fails unless, on the provisioning network, servers network-booted and
// every boot took its lease from Anvil's DHCP and loaded iPXE, the script and exactly the
// kernel and initramfs the boot services serve. Without a network there is nothing to check.
func (r *labRun) checkNetworkBoots() error {
	if r.net.network == nil {
		return nil
	}
	s := r.netboots.summary(r.net.network.ServerIP.String())
	if err := s.check(); err != nil {
		return err
	}
	for name, got := range map[string]int64{"vmlinuz": s.Kernel, "initramfs": s.Initrd} {
		fi, err := os.Stat(filepath.Join(r.net.artifacts, name))
		if err != nil {
			return err
		}
		if got != fi.Size() {
			return fmt.Errorf("the firmware loaded %d bytes of %s, the boot services serve %d", got, name, fi.Size())
		}
	}
	return nil
}

// printNetworkBoots prints what the firmware did on the provisioning network, and what Anvil's
// DHCP and TFTP servers counted.
func (r *labRun) printNetworkBoots() {
	n := r.net.network
	if n == nil {
		fmt.Fprintln(r.opts.Out, "\nNetwork boots: no provisioning network; the firmware fetched its scripts over loopback HTTP")
		return
	}
	s := r.netboots.summary(n.ServerIP.String())
	files := make([]string, 0, len(s.BootFiles))
	for f, c := range s.BootFiles {
		files = append(files, fmt.Sprintf("%s ×%d", f, c))
	}
	sort.Strings(files)
	dhcpStats, tftpStats := r.boot.DHCPStats(), r.boot.TFTPStats()
	fmt.Fprintf(r.opts.Out, "\nNetwork boots over %s: %d, %d with a lease from Anvil's DHCP (%s); TFTP %s; "+
		"%d loaded the agent (kernel %.1f MiB, initramfs %.1f MiB), %d went on to the disk, %d failed. "+
		"Anvil's DHCP sent %d ACKs, its TFTP served %d files.\n",
		n.Subnet, s.Boots, s.FromAnvil, n.ServerIP, strings.Join(files, ", "), s.Agent, float64(s.Kernel)/(1<<20), float64(s.Initrd)/(1<<20),
		s.Disk, s.Failed, dhcpStats.Acks, tftpStats.Served)
}

func (r *labRun) stop() {
	for i := len(r.stops) - 1; i >= 0; i-- {
		r.stops[i]()
	}
}

func (r *labRun) startPlane() error {
	env, err := mgmtplane.Start()
	if err != nil {
		return err
	}
	r.env = env
	r.stops = append(r.stops, func() { _ = env.Stop() })
	return r.env.Client.Create(context.Background(), &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: labNamespace}})
}

func (r *labRun) startCAPI() error {
	w, err := workload.Start(workload.Options{})
	if err != nil {
		return err
	}
	r.workloads = w
	r.stops = append(r.stops, func() {
		ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
		defer cancel()
		_ = w.Stop(ctx)
	})
	capi, err := capistack.Start(r.env.Config, capistack.Options{Workloads: w})
	if err != nil {
		return err
	}
	// Stopped before the workload server (whose shutdown waits for their connections).
	r.stops = append(r.stops, func() { _ = capi.Stop(time.Minute) })
	r.capi = capi
	return nil
}

func (r *labRun) badInput(ctx context.Context) error {
	for _, bad := range badHosts() {
		err := r.env.Client.Create(ctx, bad.host)
		if err == nil {
			return fmt.Errorf("the API server accepted %s", bad.what)
		}
		fmt.Fprintf(r.out, "    %s\n      → %s\n", bad.what, firstCause(err))
	}
	return nil
}

func (r *labRun) startAnvil(ctx context.Context) (string, error) {
	dir, err := lab.NewWorkDir()
	if err != nil {
		return "", err
	}
	r.workDir = dir
	r.stops = append(r.stops, func() { removeWorkDir(dir, false) })
	if r.opts.VM {
		// Before the boot services copy their artifacts: the VMs boot the real agent.
		if r.vm, err = prepareVM(dir, r.out); err != nil {
			return "", fmt.Errorf("--vm: %w", err)
		}
	}
	pn, err := newProvisioningNet(dir, r.out, lab.NewNetwork)
	if err != nil {
		return "", err
	}
	r.net = pn
	r.stops = append(r.stops, pn.close)
	if r.opts.VM && pn.network == nil {
		return "", errors.New("--vm: qemu VMs boot over the lab's provisioning network, which needs root (network namespaces)")
	}
	mgrCtx, stopMgr := context.WithCancel(ctx)
	r.stops = append(r.stops, stopMgr)
	// How long a network-booted agent has to register before the attempt is retried: the
	// emulated servers take milliseconds, a qemu VM under TCG a minute or two.
	bootTimeout := time.Minute
	if r.vm != nil {
		bootTimeout = 6 * time.Minute
	}
	boot, err := startManager(mgrCtx, r.env, dir, pn, bootTimeout)
	if err != nil {
		return "", err
	}
	r.boot = boot
	return boot.PublicURL(), nil
}

func (r *labRun) rackServers(ctx context.Context, bootURL string) error {
	vms := 0
	if r.vm != nil {
		vms = r.opts.VMs
		r.vm.onPowerOn = func(vm string, network bool) {
			if network {
				fmt.Fprintf(r.out, "    %s (qemu VM) powered on: network boot once (SeaBIOS, iPXE ROM, DHCP from 10.77.0.1, the agent's kernel and initramfs over HTTP), console %s-console.log\n", vm, vm)
			} else {
				fmt.Fprintf(r.out, "    %s (qemu VM) powered on: boots its disk (GRUB)\n", vm)
			}
		}
	}
	rk, err := newRack(ctx, r.env.Client, labNamespace, r.opts.Servers, r.workDir, bootURL, r.net.network, r.vm, vms, func(nb lab.NetworkBoot) {
		r.netboots.add(nb)
		fmt.Fprintf(r.out, "    %s network boot (%s): %s\n", nb.Server, nb.Mode, nb)
	})
	if err != nil {
		return err
	}
	r.rack = rk
	r.stops = append(r.stops, rk.close)
	fmt.Fprintf(r.out, "    BMCs: %s\n", rk.describe())
	rk.onOSBoot(func(o lab.OSBoot) {
		kind := "no bootstrap data"
		switch {
		case strings.Contains(string(o.UserData), "kubeadm init"):
			kind = "kubeadm init"
		case strings.Contains(string(o.UserData), "kubeadm join"):
			kind = "kubeadm join"
		}
		vm := ""
		if rk.vms[o.Server] != nil {
			vm = " [qemu VM: its OS printed its boot line on the serial console; it cannot run kubeadm, so the lab plays its kubelet]"
		}
		fmt.Fprintf(r.out, "    %s: OS up from slot %s; config drive: provider-id %s, user-data runs %s (%d bytes)%s\n",
			o.Server, o.Slot, o.ProviderID(), kind, len(o.UserData), vm)
	})
	return nil
}

func (r *labRun) onboard(ctx context.Context) error {
	return r.eventually(ctx, 2*time.Minute, func() (bool, string, error) {
		hosts, err := r.hosts(ctx)
		if err != nil {
			return false, "", err
		}
		for _, h := range hosts {
			if h.Status.State != infrav1.HostStateAvailable {
				return false, hostWhy(h), nil
			}
		}
		return len(hosts) == r.opts.Servers, "", nil
	})
}

// keep prints how to look at the lab and waits for an interrupt.
func (r *labRun) keep(ctx context.Context) error {
	path := filepath.Join(r.workDir, "kubeconfig")
	cfg := r.env.Config
	kc := clientcmdapi.NewConfig()
	kc.Clusters["anvil-lab"] = &clientcmdapi.Cluster{Server: cfg.Host, CertificateAuthorityData: cfg.CAData}
	kc.AuthInfos["anvil-lab"] = &clientcmdapi.AuthInfo{ClientCertificateData: cfg.CertData, ClientKeyData: cfg.KeyData, Token: cfg.BearerToken}
	kc.Contexts["anvil-lab"] = &clientcmdapi.Context{Cluster: "anvil-lab", AuthInfo: "anvil-lab", Namespace: labNamespace}
	kc.CurrentContext = "anvil-lab"
	if err := clientcmd.WriteToFile(*kc, path); err != nil {
		return err
	}
	fmt.Fprintf(r.opts.Out, "\nThe lab keeps running (Ctrl-C ends it and removes everything). Try:\n\n"+
		"  export KUBECONFIG=%s\n  kubectl get anvilhosts,anvilmachines,machines,kubeadmcontrolplanes\n", path)
	<-ctx.Done()
	return nil
}

// eventually polls cond every 250 ms until it holds; on timeout the error carries cond's
// last explanation.
func (r *labRun) eventually(ctx context.Context, timeout time.Duration, cond func() (bool, string, error)) error {
	deadline := time.Now().Add(timeout)
	for {
		ok, why, err := cond()
		if err != nil {
			return err
		}
		if ok {
			return nil
		}
		if time.Now().After(deadline) {
			if why == "" {
				why = "condition not met"
			}
			return fmt.Errorf("not within %s: %s", timeout, why)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(250 * time.Millisecond):
		}
	}
}

func (r *labRun) hosts(ctx context.Context) ([]infrav1.AnvilHost, error) {
	list := &infrav1.AnvilHostList{}
	if err := r.env.Client.List(ctx, list, client.InNamespace(labNamespace)); err != nil {
		return nil, err
	}
	return list.Items, nil
}

func (r *labRun) host(ctx context.Context, name string) (*infrav1.AnvilHost, error) {
	h := &infrav1.AnvilHost{}
	return h, r.env.Client.Get(ctx, client.ObjectKey{Namespace: labNamespace, Name: name}, h)
}

// hostWhy explains why a host is not where the lab waits for it.
func hostWhy(h infrav1.AnvilHost) string {
	why := fmt.Sprintf("host %s is %s", h.Name, orDash(string(h.Status.State)))
	if e := h.Status.LastError; e != nil {
		why += fmt.Sprintf(" (%s: %s)", e.Reason, e.Message)
	}
	return why
}

// mutateHost re-reads, changes and writes a host until the write does not conflict.
func (r *labRun) mutateHost(ctx context.Context, name string, mutate func(*infrav1.AnvilHost)) error {
	var err error
	for range 20 {
		var h *infrav1.AnvilHost
		if h, err = r.host(ctx, name); err != nil {
			return err
		}
		mutate(h)
		if err = r.env.Client.Update(ctx, h); err == nil {
			return nil
		}
		time.Sleep(100 * time.Millisecond)
	}
	return fmt.Errorf("updating host %s: %w", name, err)
}
