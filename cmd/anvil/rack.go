package main

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"

	"github.com/go-logr/logr"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"sigs.k8s.io/controller-runtime/pkg/client"

	infrav1 "github.com/anvil-metal/cluster-api-provider-anvil/api/v1alpha1"
	"github.com/anvil-metal/cluster-api-provider-anvil/internal/lab"
	"github.com/anvil-metal/cluster-api-provider-anvil/internal/vbmc/ipmi"
	"github.com/anvil-metal/cluster-api-provider-anvil/internal/vbmc/machine"
	"github.com/anvil-metal/cluster-api-provider-anvil/internal/vbmc/redfish"
)

// zones are the failure domains the lab spreads its servers over.
var zones = []string{"zone-a", "zone-b", "zone-c"}

// fault is what ails a server's OS: the kubelet stops reporting Ready. A transient fault is
// cured by the next boot; a permanent one is not.
type fault int

const (
	noFault fault = iota
	transientFault
	permanentFault
)

// rack is the lab's emulated servers: their BMCs (Redfish over TLS and IPMI through
// ipmi_sim), sparse disks, and the OS each runs once installed.
type rack struct {
	redfish *redfish.Server
	names   []string
	servers map[string]*lab.Server
	// vms are the servers that are qemu VMs (the first ones, with --vm).
	vms     map[string]*lab.VM
	bmcKind map[string]string
	stops   []func()

	mu sync.Mutex
	// faults are the servers whose OS is unhealthy.
	faults map[string]fault
	// osBoots are called (outside mu) whenever a server's OS comes up.
	osBoots []func(lab.OSBoot)
	// network is the provisioning network the servers are plugged into (nil: none);
	// netBoot hears of every network boot over it.
	network *lab.Network
	netBoot func(lab.NetworkBoot)
}

// serverSpec is the hardware of the i-th server: varied cores, memory and BMCs, and its zone.
func serverSpec(i int, ipmiAvailable bool) (mockup redfish.Mockup, sockets, memGiB int, zone string, useIPMI bool) {
	mockups := redfish.Mockups()
	return mockups[i%len(mockups)], 1 + i%2, 64 << (i % 3), zones[i%len(zones)], ipmiAvailable && (i%5 == 2 || i%5 == 3)
}

// newRack racks n servers, creates their BMC Secrets and AnvilHosts (powered off, labelled
// with their zone) in ns, and starts the emulated hardware. With a provisioning network each
// server is plugged into it, its host gets a reserved address there (spec.bootNetwork), and
// netBoot hears of each of its network boots.
func newRack(ctx context.Context, c client.Client, ns string, n int, workDir, bootURL string,
	network *lab.Network, vm *vmSetup, vms int, netBoot func(lab.NetworkBoot)) (*rack, error) {
	server, err := redfish.NewServer(redfish.ServerOptions{TLS: true})
	if err != nil {
		return nil, err
	}
	r := &rack{redfish: server, servers: map[string]*lab.Server{}, vms: map[string]*lab.VM{}, bmcKind: map[string]string{}, faults: map[string]fault{},
		network: network, netBoot: netBoot}
	r.stops = append(r.stops, func() { _ = server.Close() })
	if err := c.Create(ctx, &corev1.Secret{ObjectMeta: metav1.ObjectMeta{Name: "lab-bmc-ca", Namespace: ns},
		Data: map[string][]byte{"ca.crt": server.CACertPEM()}}); err != nil {
		r.close()
		return nil, err
	}
	_, ipmiErr := exec.LookPath("ipmi_sim")
	ipmiAvailable := ipmiErr == nil
	for i := range n {
		var qemu *vmSetup
		if i < vms {
			qemu = vm
		}
		if err := r.add(ctx, c, ns, i, workDir, bootURL, ipmiAvailable, qemu); err != nil {
			r.close()
			return nil, fmt.Errorf("racking server %d: %w", i+1, err)
		}
	}
	return r, nil
}

func (r *rack) add(ctx context.Context, c client.Client, ns string, i int, workDir, bootURL string, ipmiAvailable bool, vm *vmSetup) error {
	name := fmt.Sprintf("lab-server-%d", i+1)
	mockup, sockets, memGiB, zone, useIPMI := serverSpec(i, ipmiAvailable)
	if vm != nil {
		// A VM's BMC is Redfish and says what the VM has: the smallest server, so that
		// placement (best fit) claims it first.
		sockets, memGiB, useIPMI = 1, vmMemoryMiB>>10, false
	}
	m := machine.New(machine.Config{})
	password := fmt.Sprintf("lab-pw-%d", i+1)
	var address string
	var caRef *infrav1.LocalSecretReference
	if useIPMI {
		b, err := ipmi.Start(ctx, ipmi.Config{Machine: m, Username: "admin", Password: password,
			FRU: ipmi.FRU{Manufacturer: "Anvil Lab", Product: "IPMI-1U", SerialNumber: fmt.Sprintf("LAB-%04d", i+1)}})
		if err != nil {
			return err
		}
		r.stops = append(r.stops, func() { _ = b.Stop() })
		address, r.bmcKind[name] = b.Address(), "ipmi"
	} else {
		b, err := r.redfish.AddBMC(redfish.BMCOptions{Mockup: mockup, Username: "admin", Password: password, Machine: m,
			Identity: redfish.NewIdentity(i + 1), Hardware: redfish.Hardware{Processors: sockets, MemoryGiB: memGiB}})
		if err != nil {
			return err
		}
		address, r.bmcKind[name] = "redfish+https://"+b.Addr()+"/redfish/v1/Systems/1", "redfish"
		caRef = &infrav1.LocalSecretReference{Name: "lab-bmc-ca"}
	}
	mac := fmt.Sprintf("52:54:00:1a:b0:%02x", i+1)
	diskPath := filepath.Join(workDir, name+".img")
	if err := lab.NewDisk(diskPath, 20<<30); err != nil {
		return err
	}
	var bootNet *infrav1.BootNetwork
	if r.network != nil {
		addr, err := r.network.HostAddr(i)
		if err != nil {
			return err
		}
		bootNet = &infrav1.BootNetwork{Address: addr.String()}
	}
	if vm != nil {
		v := &lab.VM{Name: name, MAC: mac, Machine: m, DiskPath: diskPath, Network: r.network, QEMU: vm.qemu,
			Console: filepath.Join(workDir, name+"-console.log"), MemoryMiB: vmMemoryMiB, OSBooted: r.osBooted, Log: logr.Discard(),
			OnPowerOn: vm.onPowerOn}
		if err := v.Start(ctx); err != nil {
			return err
		}
		r.vms[name] = v
		r.bmcKind[name] += " vm"
	} else if err := r.addEmulated(ctx, name, mac, m, diskPath, bootURL, sockets, memGiB, i); err != nil {
		return err
	}
	r.names = append(r.names, name)
	if err := c.Create(ctx, &corev1.Secret{ObjectMeta: metav1.ObjectMeta{Name: name + "-bmc", Namespace: ns},
		Data: map[string][]byte{"username": []byte("admin"), "password": []byte(password)}}); err != nil {
		return err
	}
	return c.Create(ctx, &infrav1.AnvilHost{
		ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: ns, Labels: map[string]string{infrav1.DefaultFailureDomainLabel: zone}},
		Spec: infrav1.AnvilHostSpec{
			BMC:            infrav1.BMC{Address: address, CredentialsRef: infrav1.LocalSecretReference{Name: name + "-bmc"}, CABundleRef: caRef},
			BootMACAddress: mac,
			BootNetwork:    bootNet,
		}})
}

// addEmulated starts an emulated server (lab.Server) for the i-th server.
func (r *rack) addEmulated(ctx context.Context, name, mac string, m *machine.Machine, diskPath, bootURL string, sockets, memGiB, i int) error {
	cores := int32(8 * sockets) //nolint:gosec // 1 or 2 sockets
	srv := &lab.Server{Name: name, MAC: mac, Machine: m, DiskPath: diskPath, BootURL: bootURL, Log: logr.Discard(),
		Inventory: &infrav1.HardwareInventory{
			CPU:       infrav1.CPUInfo{Arch: "amd64", Sockets: int32(sockets), Cores: cores, Threads: 2 * cores}, //nolint:gosec // 1 or 2 sockets
			NUMANodes: numaNodes(sockets), Memory: resource.NewQuantity(int64(memGiB)<<30, resource.BinarySI),
			System: infrav1.SystemInfo{Manufacturer: "Anvil Lab", SerialNumber: fmt.Sprintf("LAB-%04d", i+1)}},
		OSBooted: r.osBooted,
	}
	if r.network != nil {
		var err error
		if srv.Net, err = r.network.Plug(mac); err != nil {
			return err
		}
		srv.OnNetworkBoot = r.netBoot
	}
	srv.Start(ctx)
	r.servers[name] = srv
	return nil
}

func numaNodes(sockets int) []infrav1.NUMANode {
	nodes := make([]infrav1.NUMANode, sockets)
	for i := range nodes {
		nodes[i] = infrav1.NUMANode{ID: int32(i), CPUs: fmt.Sprintf("%d-%d", 8*i, 8*i+7)}
	}
	return nodes
}

// osBooted is every server's emulated OS coming up from disk: the health gate passes (the
// slot is marked good) unless the server has a fault; a reboot cures a transient fault.
func (r *rack) osBooted(_ context.Context, o lab.OSBoot) bool {
	r.mu.Lock()
	f := r.faults[o.Server]
	if f == transientFault {
		delete(r.faults, o.Server)
		f = noFault
	}
	watchers := append([]func(lab.OSBoot){}, r.osBoots...)
	r.mu.Unlock()
	for _, w := range watchers {
		w(o)
	}
	// A broken image boots, but its kubelet never becomes healthy.
	return f == noFault && !bytes.Contains(o.RootHead, []byte("BROKEN"))
}

// onOSBoot registers a function called whenever a server's OS comes up.
func (r *rack) onOSBoot(f func(lab.OSBoot)) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.osBoots = append(r.osBoots, f)
}

func (r *rack) setFault(server string, f fault) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.faults[server] = f
}

// describe says what the rack holds, e.g. "4 Redfish (TLS) and 2 IPMI (ipmi_sim)".
func (r *rack) describe() string {
	counts := map[string]int{}
	for _, k := range r.bmcKind {
		kind, _, _ := strings.Cut(k, " ")
		counts[kind]++
	}
	parts := []string{fmt.Sprintf("%d Redfish over TLS", counts["redfish"])}
	if len(r.vms) > 0 {
		parts[0] += fmt.Sprintf(" (%d of them for qemu VMs)", len(r.vms))
	}
	if counts["ipmi"] > 0 {
		parts = append(parts, fmt.Sprintf("%d IPMI through ipmi_sim", counts["ipmi"]))
	} else {
		parts = append(parts, "no IPMI (ipmi_sim is not installed: apt-get install openipmi ipmitool)")
	}
	return strings.Join(parts, ", ")
}

func (r *rack) close() {
	for i := len(r.stops) - 1; i >= 0; i-- {
		r.stops[i]()
	}
}

// removeWorkDir removes the lab's disks when --keep is given; otherwise they go with the lab.
func removeWorkDir(dir string, keep bool) {
	if !keep {
		_ = os.RemoveAll(dir)
	}
}
