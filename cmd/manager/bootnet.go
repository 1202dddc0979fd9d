package main

import (
	"fmt"
	"net"
	"net/netip"
)

// Values the boot-network flags accept besides a literal setting. They exist because
// clusterctl treats a variable whose default is empty as unset and refuses to install, so
// the released manifests need a non-empty default for settings that are often unset
// (config/manager/manager.yaml: --dhcp-interface=${ANVIL_DHCP_INTERFACE:=none}).
const (
	// interfaceNone means no provisioning interface (DHCP off).
	interfaceNone = "none"
	// valueAuto derives the provisioning IP from the interface, and the public URL from
	// the provisioning IP and the boot HTTP port.
	valueAuto = "auto"
)

// interfaceAddrs returns the addresses of a network interface; a variable so tests can
// describe interfaces this machine does not have.
type interfaceAddrs func(name string) ([]netip.Prefix, error)

func systemInterfaceAddrs(name string) ([]netip.Prefix, error) {
	iface, err := net.InterfaceByName(name)
	if err != nil {
		return nil, err
	}
	addrs, err := iface.Addrs()
	if err != nil {
		return nil, err
	}
	var out []netip.Prefix
	for _, a := range addrs {
		if p, err := netip.ParsePrefix(a.String()); err == nil {
			out = append(out, p)
		}
	}
	return out, nil
}

// resolveBootNetwork turns the "none" and "auto" values of the boot-network flags into
// settings, and refuses combinations the boot services cannot serve, naming the flag (and
// the clusterctl variable that sets it) to fix.
func resolveBootNetwork(o *options, addrs interfaceAddrs) error {
	if o.dhcpInterface == interfaceNone {
		o.dhcpInterface = ""
	}
	dhcpOn := o.dhcpMode != "" && o.dhcpMode != "off"
	if dhcpOn && o.dhcpInterface == "" {
		return fmt.Errorf("--dhcp-mode=%s needs --dhcp-interface (clusterctl variable ANVIL_DHCP_INTERFACE): the interface on the provisioning network", o.dhcpMode)
	}
	if o.provisioningIP == valueAuto {
		o.provisioningIP = ""
		if o.dhcpInterface != "" {
			prefixes, err := addrs(o.dhcpInterface)
			if err != nil {
				return fmt.Errorf("--provisioning-ip=auto: reading the addresses of --dhcp-interface %s: %w", o.dhcpInterface, err)
			}
			for _, p := range prefixes {
				if a := p.Addr(); a.Is4() && !a.IsLoopback() && !a.IsLinkLocalUnicast() {
					o.provisioningIP = a.String()
					break
				}
			}
			if o.provisioningIP == "" {
				return fmt.Errorf("--provisioning-ip=auto: interface %s has no IPv4 address; give it one or set --provisioning-ip (ANVIL_PROVISIONING_IP)", o.dhcpInterface)
			}
		}
	}
	if dhcpOn && o.provisioningIP == "" {
		return fmt.Errorf("--dhcp-mode=%s needs --provisioning-ip (ANVIL_PROVISIONING_IP) or an address on --dhcp-interface %s", o.dhcpMode, o.dhcpInterface)
	}
	if o.bootPublicURL == valueAuto {
		o.bootPublicURL = ""
		if o.provisioningIP != "" {
			_, port, err := net.SplitHostPort(o.bootHTTPAddress)
			if err != nil {
				return fmt.Errorf("--boot-http-address %q: %w", o.bootHTTPAddress, err)
			}
			o.bootPublicURL = "http://" + net.JoinHostPort(o.provisioningIP, port)
		}
	}
	return nil
}
