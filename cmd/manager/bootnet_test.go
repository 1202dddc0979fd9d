package main

import (
	"errors"
	"net/netip"
	"path/filepath"
	"runtime"
	"strings"
	"testing"

	"github.com/anvil-metal/cluster-api-provider-anvil/internal/release"
)

func fakeAddrs(m map[string][]string) interfaceAddrs {
	return func(name string) ([]netip.Prefix, error) {
		list, ok := m[name]
		if !ok {
			return nil, errors.New("no such interface")
		}
		var out []netip.Prefix
		for _, s := range list {
			out = append(out, netip.MustParsePrefix(s))
		}
		return out, nil
	}
}

func TestResolveBootNetwork(t *testing.T) {
	addrs := fakeAddrs(map[string][]string{
		"prov0":  {"fe80::1/64", "169.254.3.4/16", "192.168.10.2/24", "10.0.0.1/8"},
		"v6only": {"2001:db8::1/64"},
	})
	cases := []struct {
		name                   string
		in                     options
		wantIP, wantURL, wantI string
		wantErr                string
	}{
		{name: "DHCP off, everything left to defaults",
			in: options{dhcpMode: "off", dhcpInterface: "none", provisioningIP: "auto", bootPublicURL: "auto", bootHTTPAddress: ":8081"}},
		{name: "proxy DHCP derives IP and URL from the interface",
			in:     options{dhcpMode: "proxy", dhcpInterface: "prov0", provisioningIP: "auto", bootPublicURL: "auto", bootHTTPAddress: ":8081"},
			wantIP: "192.168.10.2", wantURL: "http://192.168.10.2:8081", wantI: "prov0"},
		{name: "explicit values are kept",
			in:     options{dhcpMode: "reservation", dhcpInterface: "prov0", provisioningIP: "192.168.10.9", bootPublicURL: "https://boot.example.com", bootHTTPAddress: ":8081"},
			wantIP: "192.168.10.9", wantURL: "https://boot.example.com", wantI: "prov0"},
		{name: "a public URL from an explicit IP and another port",
			in:     options{dhcpMode: "off", dhcpInterface: "none", provisioningIP: "10.1.2.3", bootPublicURL: "auto", bootHTTPAddress: "0.0.0.0:9000"},
			wantIP: "10.1.2.3", wantURL: "http://10.1.2.3:9000"},
		{name: "DHCP without an interface",
			in:      options{dhcpMode: "proxy", dhcpInterface: "none", provisioningIP: "auto", bootPublicURL: "auto", bootHTTPAddress: ":8081"},
			wantErr: "needs --dhcp-interface (clusterctl variable ANVIL_DHCP_INTERFACE)"},
		{name: "an interface that does not exist",
			in:      options{dhcpMode: "proxy", dhcpInterface: "eth9", provisioningIP: "auto", bootPublicURL: "auto", bootHTTPAddress: ":8081"},
			wantErr: "reading the addresses of --dhcp-interface eth9"},
		{name: "an interface without IPv4",
			in:      options{dhcpMode: "proxy", dhcpInterface: "v6only", provisioningIP: "auto", bootPublicURL: "auto", bootHTTPAddress: ":8081"},
			wantErr: "interface v6only has no IPv4 address"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			o := c.in
			err := resolveBootNetwork(&o, addrs)
			if c.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), c.wantErr) {
					t.Fatalf("error %v, want %q", err, c.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if o.provisioningIP != c.wantIP || o.bootPublicURL != c.wantURL || o.dhcpInterface != c.wantI {
				t.Errorf("got ip %q url %q iface %q, want %q %q %q", o.provisioningIP, o.bootPublicURL, o.dhcpInterface, c.wantIP, c.wantURL, c.wantI)
			}
		})
	}
}

// The released Deployment's arguments, with clusterctl's variables filled in, are flags this
// manager accepts and a boot network it can serve: with the defaults, and with the settings
// docs/real-hardware.md gives for proxy DHCP.
func TestReleasedManifestArgumentsParse(t *testing.T) {
	_, file, _, _ := runtime.Caller(0)
	root := filepath.Join(filepath.Dir(file), "..", "..")
	components, err := release.Components(root, "")
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		name      string
		variables map[string]string
		check     func(t *testing.T, o options)
	}{
		{"defaults", nil, func(t *testing.T, o options) {
			if o.dhcpMode != "off" || o.dhcpInterface != "" || o.provisioningIP != "" || o.bootPublicURL != "" {
				t.Errorf("defaults: %+v", o)
			}
			if o.tftpDir != "/usr/share/anvil/ipxe" || o.artifactsDir != "/usr/share/anvil/agent" {
				t.Errorf("boot assets not where the image puts them: tftp %q agent %q", o.tftpDir, o.artifactsDir)
			}
		}},
		{"proxy DHCP", map[string]string{"ANVIL_DHCP_MODE": "proxy", "ANVIL_DHCP_INTERFACE": "prov0", "ANVIL_LOG_LEVEL": "debug"}, func(t *testing.T, o options) {
			if o.dhcpMode != "proxy" || o.provisioningIP != "192.168.10.2" || o.bootPublicURL != "http://192.168.10.2:8081" {
				t.Errorf("proxy DHCP: %+v", o)
			}
		}},
	} {
		t.Run(c.name, func(t *testing.T) {
			filled, err := release.Substitute(components, c.variables)
			if err != nil {
				t.Fatal(err)
			}
			args := managerArgs(t, filled)
			o, err := parseFlags(args)
			if err != nil {
				t.Fatalf("manager refuses its own manifest's arguments %q: %v", args, err)
			}
			if err := resolveBootNetwork(&o, fakeAddrs(map[string][]string{"prov0": {"192.168.10.2/24"}})); err != nil {
				t.Fatal(err)
			}
			c.check(t, o)
		})
	}
}

func managerArgs(t *testing.T, components []byte) []string {
	t.Helper()
	objs, err := release.ParseObjects(components)
	if err != nil {
		t.Fatal(err)
	}
	for _, o := range objs {
		if o.GetKind() != "Deployment" {
			continue
		}
		containers := o.Object["spec"].(map[string]any)["template"].(map[string]any)["spec"].(map[string]any)["containers"].([]any)
		for _, c := range containers {
			m := c.(map[string]any)
			if m["name"] != release.ManagerContainer {
				continue
			}
			var args []string
			for _, a := range m["args"].([]any) {
				args = append(args, a.(string))
			}
			return args
		}
	}
	t.Fatal("no manager container in the components")
	return nil
}
