package lab

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"

	"github.com/anvil-metal/cluster-api-provider-anvil/internal/boot/dhcp"
	"github.com/anvil-metal/cluster-api-provider-anvil/internal/bootservices"
	"github.com/anvil-metal/cluster-api-provider-anvil/internal/netns"
)

// NamespacePrefix names every network namespace the lab makes. A lab that was killed leaves
// its namespaces behind; the next one deletes them (netns.Sweep: only those whose process is
// gone, so two labs can run side by side).
const NamespacePrefix = "anvil-lab-"

// Network is the lab's provisioning network: a bridge in a network namespace of its own, on
// which the boot services' DHCP and TFTP sockets live, and one namespace per emulated server
// plugged into the bridge by a veth pair, where that server's firmware opens its sockets. No
// packet leaves these namespaces, so the lab's DHCP server can never answer a real machine.
type Network struct {
	// Switch holds the bridge and the boot services' address on it.
	Switch *netns.Namespace
	// Bridge is the bridge's name inside Switch.
	Bridge string
	// Subnet is the provisioning network; ServerIP is the boot services' address in it.
	Subnet   netip.Prefix
	ServerIP netip.Addr

	mu    sync.Mutex
	ports int
	hosts []*netns.Host
}

// labSubnet is the lab's provisioning network. It exists only inside the lab's namespaces, so
// it cannot clash with the machine's own networks.
var labSubnet = netip.MustParsePrefix("10.77.0.0/24")

// firstHost is the last octet of the first server's reserved address.
const firstHost = 10

// MaxServers is how many servers the lab's /24 holds.
const MaxServers = 254 - firstHost

// NewNetwork makes the provisioning network (after deleting what killed labs left behind).
// Its error says why when network namespaces can't be made here (not root, no iproute2).
func NewNetwork() (*Network, error) {
	sw, err := netns.Create(NamespacePrefix)
	if err != nil {
		return nil, err
	}
	n := &Network{Switch: sw, Bridge: "br0", Subnet: labSubnet, ServerIP: labSubnet.Addr().Next()}
	if err := sw.AddBridge(n.Bridge, netip.PrefixFrom(n.ServerIP, labSubnet.Bits())); err != nil {
		_ = sw.Delete()
		return nil, err
	}
	return n, nil
}

// HostAddr is the address reserved for the i-th server (from 0).
func (n *Network) HostAddr(i int) (netip.Prefix, error) {
	if i < 0 || i >= MaxServers {
		return netip.Prefix{}, fmt.Errorf("server %d: the lab's provisioning network holds %d servers", i+1, MaxServers)
	}
	a := n.Subnet.Addr().As4()
	a[3] = byte(firstHost + i)
	return netip.PrefixFrom(netip.AddrFrom4(a), n.Subnet.Bits()), nil
}

// Plug makes a namespace for one server and plugs it into the bridge; its interface (eth0)
// carries mac and no address: the firmware's DHCP client starts from nothing.
func (n *Network) Plug(mac string) (*netns.Host, error) {
	hw, err := net.ParseMAC(mac)
	if err != nil {
		return nil, err
	}
	ns, err := netns.Create(NamespacePrefix)
	if err != nil {
		return nil, err
	}
	n.mu.Lock()
	port := "p" + strconv.Itoa(n.ports)
	n.ports++
	n.mu.Unlock()
	h, err := n.Switch.Plug(n.Bridge, port, ns, netns.HostConfig{MAC: hw})
	if err != nil {
		_ = ns.Delete()
		return nil, err
	}
	n.mu.Lock()
	n.hosts = append(n.hosts, h)
	n.mu.Unlock()
	return h, nil
}

// BootServices makes the boot services for this network with cfg's other settings: their HTTP
// endpoints (scripts, artifacts, agent API, image cache) listen on ServerIP at a port the
// kernel picks, and PublicURL points there, so that servers on the bridge (qemu VMs among
// them) reach them; DHCP (reservation mode) and TFTP (single port) listen on the bridge.
// Every socket is opened inside Switch, where it stays; the lab's in-process servers reach
// them by dialing from their own namespaces (Server.Net). tftpDir holds the iPXE binaries.
func (n *Network) BootServices(cfg bootservices.Config, tftpDir string) (*bootservices.Services, error) {
	cfg.HTTPAddress, cfg.PublicURL = netip.AddrPortFrom(n.ServerIP, 0).String(), ""
	cfg.DHCPMode, cfg.DHCPInterface, cfg.ServerIP = dhcp.ModeReservation, n.Bridge, n.ServerIP
	// Transfers must stay in the network's namespace: serve them all from port 69's socket.
	cfg.TFTPDir, cfg.TFTPSinglePort = tftpDir, true
	var boot *bootservices.Services
	err := n.Switch.Do(func() (err error) {
		// Sockets belong to the namespace of the thread that opens them: New binds HTTP.
		if boot, err = bootservices.New(cfg); err != nil {
			return err
		}
		return boot.Listen()
	})
	if err != nil {
		return nil, fmt.Errorf("boot services on the provisioning network: %w", err)
	}
	return boot, nil
}

// Close deletes every namespace of the network (their links go with them).
func (n *Network) Close() error {
	n.mu.Lock()
	hosts := n.hosts
	n.hosts = nil
	n.mu.Unlock()
	var errs []error
	for _, h := range hosts {
		errs = append(errs, h.Delete())
	}
	errs = append(errs, n.Switch.Delete())
	return errors.Join(errs...)
}

// NewWorkDir makes the lab's working directory (disks, image cache, artifacts) in the
// temporary directory, named NamespacePrefix + the process's netns.OwnerTag, after removing
// those that killed labs left behind.
func NewWorkDir() (string, error) {
	tag, err := netns.OwnerTag()
	if err != nil {
		return os.MkdirTemp("", NamespacePrefix) // no /proc: nothing to tell leftovers by
	}
	SweepWorkDirs(os.TempDir())
	return os.MkdirTemp("", NamespacePrefix+tag+"-")
}

// SweepWorkDirs removes the work directories in dir whose lab process is gone.
func SweepWorkDirs(dir string) {
	entries, err := os.ReadDir(dir)
	if err != nil {
		return
	}
	for _, e := range entries {
		rest, ok := strings.CutPrefix(e.Name(), NamespacePrefix)
		if !ok || !e.IsDir() {
			continue
		}
		parts := strings.Split(rest, "-")
		if len(parts) == 3 && netns.OwnerGone(parts[0]+"-"+parts[1]) {
			_ = os.RemoveAll(filepath.Join(dir, e.Name()))
		}
	}
}
