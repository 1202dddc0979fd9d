package pid1

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/go-logr/logr"
	"github.com/insomniacslk/dhcp/dhcpv4"
	"github.com/insomniacslk/dhcp/dhcpv4/nclient4"
)

// NetworkOptions say which NIC to configure.
type NetworkOptions struct {
	// BootMAC picks the NIC; nil takes the first Ethernet NIC that has link.
	BootMAC net.HardwareAddr
	// SysClassNet is where carrier is read (default /sys/class/net).
	SysClassNet string
	// LinkWait bounds the wait for the NIC to appear and have link (default 60 s); the DHCP
	// exchange then retries until ctx ends.
	LinkWait time.Duration
	Log      logr.Logger
}

// Lease is the configuration applied.
type Lease struct {
	Interface string
	MAC       net.HardwareAddr
	Address   netip.Prefix
	Router    netip.Addr
	DNS       []netip.Addr
	Server    netip.Addr
}

// ConfigureNetwork brings up loopback and the boot NIC, takes a DHCP lease on it and
// configures its address, default route and /etc/resolv.conf.
func ConfigureNetwork(ctx context.Context, o NetworkOptions) (Lease, error) {
	if o.SysClassNet == "" {
		o.SysClassNet = "/sys/class/net"
	}
	if o.LinkWait <= 0 {
		o.LinkWait = time.Minute
	}
	nl, err := openRTNL()
	if err != nil {
		return Lease{}, err
	}
	defer func() { _ = nl.Close() }()
	if lo, err := net.InterfaceByName("lo"); err == nil {
		if err := nl.linkUp(lo.Index); err != nil {
			return Lease{}, err
		}
	}
	ifc, err := waitForNIC(ctx, nl, o)
	if err != nil {
		return Lease{}, err
	}
	o.Log.Info("NIC has link", "interface", ifc.Name, "mac", ifc.HardwareAddr.String())

	ack, err := dhcpRequest(ctx, ifc.Name, o.Log)
	if err != nil {
		return Lease{}, err
	}
	l, err := leaseFrom(ifc, ack)
	if err != nil {
		return Lease{}, err
	}
	if err := nl.addAddr(ifc.Index, l.Address); err != nil {
		return l, err
	}
	if l.Router.IsValid() {
		if err := nl.addDefaultRoute(ifc.Index, l.Router); err != nil {
			return l, err
		}
	}
	if len(l.DNS) > 0 {
		var b strings.Builder
		for _, d := range l.DNS {
			fmt.Fprintf(&b, "nameserver %s\n", d)
		}
		if err := os.MkdirAll("/etc", 0o755); err == nil { //nolint:gosec // /etc is world-readable
			_ = os.WriteFile("/etc/resolv.conf", []byte(b.String()), 0o644) //nolint:gosec // resolv.conf is world-readable
		}
	}
	return l, nil
}

// waitForNIC finds the boot NIC (or, without a boot MAC, every Ethernet NIC), sets it up and
// waits for carrier.
func waitForNIC(ctx context.Context, nl *rtnl, o NetworkOptions) (net.Interface, error) {
	deadline := time.Now().Add(o.LinkWait)
	up := map[int]bool{}
	for {
		ifcs, err := net.Interfaces()
		if err != nil {
			return net.Interface{}, err
		}
		var seen []string
		for _, ifc := range ifcs {
			if ifc.Flags&net.FlagLoopback != 0 || len(ifc.HardwareAddr) != 6 {
				continue
			}
			seen = append(seen, ifc.Name+" "+ifc.HardwareAddr.String())
			if o.BootMAC != nil && !bytes.Equal(ifc.HardwareAddr, o.BootMAC) {
				continue
			}
			if !up[ifc.Index] {
				if err := nl.linkUp(ifc.Index); err != nil {
					return net.Interface{}, err
				}
				up[ifc.Index] = true
			}
			if carrier(o.SysClassNet, ifc.Name) {
				return ifc, nil
			}
		}
		if time.Now().After(deadline) {
			want := "any Ethernet NIC with link"
			if o.BootMAC != nil {
				want = "the boot NIC " + o.BootMAC.String() + " with link"
			}
			return net.Interface{}, fmt.Errorf("no %s after %s (NICs: %s); is its driver in the initramfs?", want, o.LinkWait, strings.Join(seen, ", "))
		}
		select {
		case <-ctx.Done():
			return net.Interface{}, ctx.Err()
		case <-time.After(200 * time.Millisecond):
		}
	}
}

func carrier(sysClassNet, name string) bool {
	b, err := os.ReadFile(filepath.Join(sysClassNet, name, "carrier"))
	return err == nil && strings.TrimSpace(string(b)) == "1"
}

// dhcpRequest runs DISCOVER/OFFER/REQUEST/ACK on a raw socket of the interface until it
// gets a lease or ctx ends.
func dhcpRequest(ctx context.Context, ifname string, log logr.Logger) (*dhcpv4.DHCPv4, error) {
	c, err := nclient4.New(ifname, nclient4.WithTimeout(4*time.Second), nclient4.WithRetry(3))
	if err != nil {
		return nil, fmt.Errorf("DHCP client on %s: %w", ifname, err)
	}
	defer func() { _ = c.Close() }()
	for {
		lease, err := c.Request(ctx)
		if err == nil {
			return lease.ACK, nil
		}
		if ctx.Err() != nil {
			return nil, fmt.Errorf("DHCP on %s: %w", ifname, err)
		}
		log.Info("no DHCP lease yet; retrying", "interface", ifname, "reason", err.Error())
		select {
		case <-ctx.Done():
			return nil, ctx.Err()
		case <-time.After(2 * time.Second):
		}
	}
}

func leaseFrom(ifc net.Interface, ack *dhcpv4.DHCPv4) (Lease, error) {
	ip, ok := netip.AddrFromSlice(ack.YourIPAddr.To4())
	if !ok || ip.IsUnspecified() {
		return Lease{}, errors.New("DHCP ACK without an address")
	}
	bits := 24
	if m := ack.SubnetMask(); m != nil {
		if ones, size := m.Size(); size == 32 {
			bits = ones
		}
	}
	l := Lease{Interface: ifc.Name, MAC: ifc.HardwareAddr, Address: netip.PrefixFrom(ip, bits)}
	if rs := ack.Router(); len(rs) > 0 {
		if r, ok := netip.AddrFromSlice(rs[0].To4()); ok && !r.IsUnspecified() {
			l.Router = r
		}
	}
	for _, d := range ack.DNS() {
		if a, ok := netip.AddrFromSlice(d.To4()); ok {
			l.DNS = append(l.DNS, a)
		}
	}
	if s, ok := netip.AddrFromSlice(ack.ServerIdentifier().To4()); ok {
		l.Server = s
	}
	return l, nil
}
