package dhcp

import (
	"bufio"
	"context"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/go-logr/logr"
	"github.com/go-logr/logr/funcr"
	"github.com/insomniacslk/dhcp/dhcpv4"
	"github.com/insomniacslk/dhcp/dhcpv4/nclient4"
	"github.com/insomniacslk/dhcp/iana"

	"github.com/anvil-metal/cluster-api-provider-anvil/internal/netns"
)

// Real DHCP clients and a real site DHCP server (Debian's dhclient, udhcpc and dnsmasq)
// against Anvil, each in its own network namespace on a private bridge. Nothing leaves the
// namespaces these tests make.

func needTools(t *testing.T, tools ...string) {
	t.Helper()
	netns.Require(t)
	for _, tool := range tools {
		if _, err := exec.LookPath(tool); err != nil {
			t.Skipf("%s not installed (see hack/install-test-deps.sh)", tool)
		}
	}
}

// testLog sends the server's log to the test log, V(1) included.
func testLog(t *testing.T) logr.Logger {
	return funcr.New(func(prefix, args string) { t.Log(prefix, args) }, funcr.Options{Verbosity: 1})
}

// runServer starts an Anvil DHCP server with its sockets in h's namespace, until the test ends.
func runServer(t *testing.T, h *netns.Host, cfg Config) *Server {
	t.Helper()
	cfg.Interface = h.Link
	if cfg.Log.GetSink() == nil {
		cfg.Log = testLog(t)
	}
	s, err := New(cfg)
	must(t, err)
	must(t, h.Do(s.Listen))
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- s.Start(ctx) }()
	t.Cleanup(func() {
		cancel()
		select {
		case err := <-done:
			must(t, err)
		case <-time.After(10 * time.Second):
			t.Error("DHCP server did not stop")
		}
	})
	return s
}

// waitFor polls f until it returns true or the timeout passes.
func waitFor(t *testing.T, timeout time.Duration, what string, f func() bool) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for !f() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func writeScript(t *testing.T, dir, body string) string {
	t.Helper()
	p := filepath.Join(dir, "hook.sh")
	must(t, os.WriteFile(p, []byte("#!/bin/sh\n"+body+"\n"), 0o755))
	return p
}

// dhclient runs ISC dhclient in the foreground with its own files and a hook script that only
// records what it was told (so the host's resolv.conf and routes are never touched), and
// returns the first line whose reason is BOUND or REBOOT.
func dhclient(t *testing.T, h *netns.Host, conf, lease string) string {
	t.Helper()
	dir := t.TempDir()
	events := filepath.Join(dir, "events")
	script := writeScript(t, dir, `echo "$reason ip=$new_ip_address mask=$new_subnet_mask routers=$new_routers dns=$new_domain_name_servers file=$new_filename server=$new_dhcp_server_identifier" >> `+events)
	cf := filepath.Join(dir, "dhclient.conf")
	must(t, os.WriteFile(cf, []byte(conf), 0o644))
	lf := filepath.Join(dir, "leases")
	must(t, os.WriteFile(lf, []byte(lease), 0o644))
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	cmd := h.Command(ctx, "dhclient", "-4", "-d", "-1", "-v", "-cf", cf, "-lf", lf,
		"-pf", filepath.Join(dir, "pid"), "-df", filepath.Join(dir, "duid"), "-sf", script, h.Link)
	var out strings.Builder
	cmd.Stdout, cmd.Stderr = &out, &out
	must(t, cmd.Start())
	defer func() {
		_ = cmd.Process.Kill()
		_ = cmd.Wait()
		t.Logf("dhclient output:\n%s", out.String())
	}()
	var bound string
	waitFor(t, 30*time.Second, "dhclient lease", func() bool {
		b, _ := os.ReadFile(events)
		for _, l := range strings.Split(string(b), "\n") {
			if strings.HasPrefix(l, "BOUND ") || strings.HasPrefix(l, "REBOOT ") {
				bound = l
				return true
			}
		}
		return false
	})
	return bound
}

// udhcpc runs busybox's udhcpc once; it returns the "bound" line, or "" if no lease came.
func udhcpc(t *testing.T, h *netns.Host, extra ...string) string {
	t.Helper()
	dir := t.TempDir()
	events := filepath.Join(dir, "events")
	script := writeScript(t, dir, `[ "$1" = bound ] && echo "bound ip=$ip mask=$subnet router=$router dns=$dns serverid=$serverid boot_file=$boot_file siaddr=$siaddr bootfile=$bootfile tftp=$tftp" >> `+events+`; exit 0`)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	args := append([]string{"-f", "-q", "-n", "-i", h.Link, "-s", script, "-t", "3", "-T", "1"}, extra...)
	out, _ := h.Run(ctx, "udhcpc", args...)
	t.Logf("udhcpc output:\n%s", out)
	b, _ := os.ReadFile(events)
	return strings.TrimSpace(string(b))
}

func TestPeersReservation(t *testing.T) {
	needTools(t, "dhclient", "udhcpc")
	t.Parallel()
	knownMAC := net.HardwareAddr{0x02, 0xa0, 0, 0, 0, 0x10}
	hosts := netns.NewLAN(t,
		netns.HostConfig{Addr: netip.MustParsePrefix("198.18.0.1/24")},
		netns.HostConfig{MAC: knownMAC},
		netns.HostConfig{MAC: net.HardwareAddr{0x02, 0xa0, 0, 0, 0, 0x66}})
	srvHost, client, stranger := hosts[0], hosts[1], hosts[2]

	hs := NewMemoryHosts()
	must(t, hs.Set(knownMAC, Host{
		Name: "node-1", Namespace: "lab", IP: netip.MustParsePrefix("198.18.0.10/24"),
		Gateway: netip.MustParseAddr("198.18.0.1"), DNS: []netip.Addr{netip.MustParseAddr("198.18.0.53")},
		BootEnabled: true,
	}))
	srv := runServer(t, srvHost, Config{Mode: ModeReservation, Hosts: hs, ScriptURL: "http://198.18.0.1:8080/ipxe/{mac}"})

	t.Run("dhclient", func(t *testing.T) {
		got := dhclient(t, client, "", "")
		want := "BOUND ip=198.18.0.10 mask=255.255.255.0 routers=198.18.0.1 dns=198.18.0.53 file= server=198.18.0.1"
		if got != want {
			t.Fatalf("dhclient: %q\nwant %q", got, want)
		}
	})

	t.Run("dhclient init-reboot with a wrong remembered address is NAKed", func(t *testing.T) {
		naks := srv.Stats().Naks
		old := `lease {
  interface "eth0";
  fixed-address 198.18.0.99;
  option subnet-mask 255.255.255.0;
  option dhcp-lease-time 3600;
  option dhcp-server-identifier 198.18.0.1;
  renew 4 2037/01/01 00:00:00;
  rebind 4 2037/01/01 00:00:00;
  expire 4 2037/01/01 00:00:00;
}
`
		got := dhclient(t, client, "", old)
		if !strings.HasPrefix(got, "BOUND ip=198.18.0.10 ") {
			t.Fatalf("after NAK: %q", got)
		}
		if srv.Stats().Naks == naks {
			t.Fatal("no NAK sent for the remembered wrong address")
		}
	})

	t.Run("dhclient as a PXE client gets the boot file", func(t *testing.T) {
		got := dhclient(t, client, `send vendor-class-identifier "PXEClient:Arch:00000:UNDI:002001";`+"\n", "")
		if !strings.HasPrefix(got, "BOUND ip=198.18.0.10 ") || !strings.Contains(got, "file=undionly.kpxe") {
			t.Fatalf("PXE dhclient: %q", got)
		}
	})

	t.Run("udhcpc", func(t *testing.T) {
		got := udhcpc(t, client)
		want := "bound ip=198.18.0.10 mask=255.255.255.0 router=198.18.0.1 dns=198.18.0.53 serverid=198.18.0.1 boot_file= siaddr= bootfile= tftp="
		if got != want {
			t.Fatalf("udhcpc: %q\nwant %q", got, want)
		}
	})

	t.Run("udhcpc as iPXE gets the script", func(t *testing.T) {
		got := udhcpc(t, client, "-V", "PXEClient:Arch:00007:UNDI:003016", "-x", "0x4d:69505845") // option 77 "iPXE"
		if !strings.Contains(got, "bootfile=http://198.18.0.1:8080/ipxe/02:a0:00:00:00:10") {
			t.Fatalf("udhcpc iPXE: %q", got)
		}
	})

	t.Run("unknown MAC gets nothing", func(t *testing.T) {
		before := srv.Stats()
		if got := udhcpc(t, stranger); got != "" {
			t.Fatalf("stranger got a lease: %q", got)
		}
		after := srv.Stats()
		if after.Unknown <= before.Unknown || after.Offers != before.Offers || after.Acks != before.Acks {
			t.Fatalf("stats before %+v after %+v", before, after)
		}
	})
}

// dnsmasq runs Debian's dnsmasq as the site's DHCP server, logging to the test, until the
// test ends.
func dnsmasq(t *testing.T, h *netns.Host, args ...string) {
	t.Helper()
	dir := t.TempDir()
	ctx, cancel := context.WithCancel(context.Background())
	base := []string{"--no-daemon", "--conf-file=/dev/null", "--interface=" + h.Link, "--bind-interfaces", "--port=0",
		"--dhcp-leasefile=" + filepath.Join(dir, "leases"), "--pid-file=" + filepath.Join(dir, "pid"),
		"--user=root", "--group=root", "--log-facility=-", "--log-dhcp"}
	cmd := h.Command(ctx, "dnsmasq", append(base, args...)...)
	stderr, err := cmd.StderrPipe()
	must(t, err)
	must(t, cmd.Start())
	ready := make(chan struct{})
	var once sync.Once
	go func() {
		sc := bufio.NewScanner(stderr)
		for sc.Scan() {
			t.Log("dnsmasq:", sc.Text())
			if strings.Contains(sc.Text(), "DHCP, IP range") {
				once.Do(func() { close(ready) })
			}
		}
	}()
	t.Cleanup(func() {
		cancel()
		_ = cmd.Wait()
	})
	select {
	case <-ready:
	case <-time.After(10 * time.Second):
		t.Fatal("dnsmasq did not start")
	}
}

// pxeClient is a PXE-like client: nclient4 with the options a PXE ROM sends.
func pxeClient(t *testing.T, h *netns.Host, opts ...nclient4.ClientOpt) *nclient4.Client {
	t.Helper()
	var c *nclient4.Client
	must(t, h.Do(func() (err error) {
		c, err = nclient4.New(h.Link, append([]nclient4.ClientOpt{nclient4.WithTimeout(2 * time.Second), nclient4.WithRetry(2)}, opts...)...)
		return err
	}))
	t.Cleanup(func() { c.Close() })
	return c
}

func pxeMods(arch iana.Arch) []dhcpv4.Modifier {
	return []dhcpv4.Modifier{
		dhcpv4.WithOption(dhcpv4.OptClassIdentifier("PXEClient:Arch:0000" + string(rune('0'+arch)) + ":UNDI:002001")),
		dhcpv4.WithOption(dhcpv4.OptClientArch(arch)),
		dhcpv4.WithRequestedOptions(dhcpv4.OptionBootfileName, dhcpv4.OptionVendorSpecificInformation),
	}
}

// discoverAll broadcasts one DISCOVER and collects offers until want of them came or the
// client's timeout passed. It asks for broadcast answers: a server that unicasts to chaddr
// (dnsmasq does) can't reach a client whose chaddr isn't its interface's MAC.
func discoverAll(t *testing.T, c *nclient4.Client, want int, mods ...dhcpv4.Modifier) []*dhcpv4.DHCPv4 {
	t.Helper()
	d, err := dhcpv4.NewDiscovery(c.InterfaceAddr(), append([]dhcpv4.Modifier{dhcpv4.WithBroadcast(true)}, mods...)...)
	must(t, err)
	var offers []*dhcpv4.DHCPv4
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
	defer cancel()
	_, _ = c.SendAndRead(ctx, c.RemoteAddr(), d, func(p *dhcpv4.DHCPv4) bool {
		if p.MessageType() == dhcpv4.MessageTypeOffer {
			offers = append(offers, p)
		}
		return len(offers) >= want
	})
	return offers
}

func TestPeersProxyBesideDnsmasq(t *testing.T) {
	needTools(t, "dnsmasq")
	t.Parallel()
	pxeMAC := net.HardwareAddr{0x02, 0xb0, 0, 0, 0, 0x20}
	idleMAC := net.HardwareAddr{0x02, 0xb0, 0, 0, 0, 0x21}
	hosts := netns.NewLAN(t,
		netns.HostConfig{Addr: netip.MustParsePrefix("198.18.1.1/24")}, // Anvil
		netns.HostConfig{Addr: netip.MustParsePrefix("198.18.1.2/24")}, // the site's DHCP server
		netns.HostConfig{MAC: pxeMAC},
		netns.HostConfig{})
	anvil, site, client, other := hosts[0], hosts[1], hosts[2], hosts[3]

	hs := NewMemoryHosts()
	must(t, hs.Set(pxeMAC, Host{Name: "node-2", Namespace: "lab", BootEnabled: true}))
	must(t, hs.Set(idleMAC, Host{Name: "node-3", Namespace: "lab"}))
	srv := runServer(t, anvil, Config{Mode: ModeProxy, Hosts: hs, ScriptURL: "http://198.18.1.1:8080/ipxe/{name}"})
	dnsmasq(t, site, "--dhcp-range=198.18.1.100,198.18.1.150,255.255.255.0,1h", "--no-ping")

	c := pxeClient(t, client)
	t.Run("PXE client sees both offers and completes the PXE exchange", func(t *testing.T) {
		offers := discoverAll(t, c, 2, pxeMods(iana.EFI_X86_64)...)
		var siteOffer, proxyOffer *dhcpv4.DHCPv4
		for _, o := range offers {
			switch {
			case o.ServerIdentifier().Equal(net.ParseIP("198.18.1.2")):
				siteOffer = o
			case o.ServerIdentifier().Equal(net.ParseIP("198.18.1.1")):
				proxyOffer = o
			}
		}
		if siteOffer == nil || proxyOffer == nil {
			t.Fatalf("offers: %v", offers)
		}
		if siteOffer.YourIPAddr.IsUnspecified() || siteOffer.BootFileNameOption() != "" {
			t.Fatalf("site offer: %s", siteOffer.Summary())
		}
		if !proxyOffer.YourIPAddr.IsUnspecified() || proxyOffer.BootFileNameOption() != "ipxe.efi" ||
			proxyOffer.ClassIdentifier() != "PXEClient" || !proxyOffer.ServerIPAddr.Equal(net.ParseIP("198.18.1.1")) {
			t.Fatalf("proxy offer: %s", proxyOffer.Summary())
		}

		// The address comes from the site server...
		lease, err := c.RequestFromOffer(context.Background(), siteOffer, pxeMods(iana.EFI_X86_64)...)
		must(t, err)
		yiaddr := lease.ACK.YourIPAddr
		ip, _ := netip.AddrFromSlice(yiaddr.To4())
		must(t, client.AddAddr(netip.PrefixFrom(ip, 24)))

		// ...and the boot file from Anvil on port 4011, asked from the new address.
		req, err := dhcpv4.New(dhcpv4.WithHwAddr(pxeMAC), dhcpv4.WithMessageType(dhcpv4.MessageTypeRequest),
			dhcpv4.WithClientIP(yiaddr))
		must(t, err)
		for _, m := range pxeMods(iana.EFI_X86_64) {
			m(req)
		}
		var conn net.PacketConn
		must(t, client.Do(func() (err error) {
			conn, err = net.ListenPacket("udp4", ip.String()+":0")
			return err
		}))
		defer conn.Close()
		_, err = conn.WriteTo(req.ToBytes(), &net.UDPAddr{IP: net.ParseIP("198.18.1.1"), Port: 4011})
		must(t, err)
		must(t, conn.SetReadDeadline(time.Now().Add(5*time.Second)))
		buf := make([]byte, 1500)
		n, from, err := conn.ReadFrom(buf)
		must(t, err)
		ack, err := dhcpv4.FromBytes(buf[:n])
		must(t, err)
		if ack.MessageType() != dhcpv4.MessageTypeAck || ack.BootFileNameOption() != "ipxe.efi" || from.String() != "198.18.1.1:4011" {
			t.Fatalf("4011 answer from %v: %s", from, ack.Summary())
		}
	})

	t.Run("iPXE client gets the script from the proxy", func(t *testing.T) {
		offers := discoverAll(t, c, 2, append(pxeMods(iana.EFI_X86_64), dhcpv4.WithUserClass("iPXE", false))...)
		found := false
		for _, o := range offers {
			if o.ServerIdentifier().Equal(net.ParseIP("198.18.1.1")) {
				found = o.BootFileNameOption() == "http://198.18.1.1:8080/ipxe/node-2"
			}
		}
		if !found {
			t.Fatalf("offers: %v", offers)
		}
	})

	t.Run("idle and unknown hosts get only the site's offer", func(t *testing.T) {
		for _, mac := range []net.HardwareAddr{idleMAC, {0x02, 0xb0, 0, 0, 0, 0x99}} {
			// nclient4 matches answers by its own hardware address, so one client per MAC.
			// One try of two seconds: long enough for any answer on a bridge, even on a busy machine.
			oc := pxeClient(t, other, nclient4.WithHWAddr(mac), nclient4.WithTimeout(2*time.Second), nclient4.WithRetry(1))
			before := srv.Stats()
			offers := discoverAll(t, oc, 2, pxeMods(iana.INTEL_X86PC)...)
			if len(offers) == 0 {
				t.Fatalf("%v: no offer from the site server", mac)
			}
			for _, o := range offers {
				if !o.ServerIdentifier().Equal(net.ParseIP("198.18.1.2")) {
					t.Fatalf("%v: offer from %v", mac, o.ServerIdentifier())
				}
			}
			if srv.Stats().Offers != before.Offers {
				t.Fatalf("%v: Anvil offered", mac)
			}
		}
	})
}
