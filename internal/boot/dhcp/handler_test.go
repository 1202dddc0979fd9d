package dhcp

import (
	"bytes"
	"context"
	"fmt"
	"net"
	"net/netip"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/go-logr/logr"
	"github.com/go-logr/logr/funcr"
	"github.com/insomniacslk/dhcp/dhcpv4"
	"github.com/insomniacslk/dhcp/iana"
)

// These tests drive the handler with packets built, and check replies parsed, by an
// independent DHCP implementation (insomniacslk/dhcp), so both sides of the wire format are
// checked against someone else's reading of the RFCs.

var (
	// Test fixtures only; tests never modify them.
	knownMAC   = net.HardwareAddr{0x52, 0x54, 0x00, 0x00, 0x00, 0x01}
	bootMAC    = net.HardwareAddr{0x52, 0x54, 0x00, 0x00, 0x00, 0x02}
	unknownMAC = net.HardwareAddr{0x52, 0x54, 0x00, 0x00, 0x00, 0x99}
	serverIP   = netip.MustParseAddr("198.18.0.1")
)

func testHosts(t testing.TB) *MemoryHosts {
	t.Helper()
	h := NewMemoryHosts()
	must(t, h.Set(knownMAC, Host{
		Name: "idle", Namespace: "lab",
		IP:      netip.MustParsePrefix("198.18.0.10/24"),
		Gateway: netip.MustParseAddr("198.18.0.1"),
		DNS:     []netip.Addr{netip.MustParseAddr("198.18.0.53"), netip.MustParseAddr("198.18.0.54")},
	}))
	must(t, h.Set(bootMAC, Host{
		Name: "booting", Namespace: "lab",
		IP:          netip.MustParsePrefix("198.18.0.11/24"),
		Gateway:     netip.MustParseAddr("198.18.0.1"),
		BootEnabled: true,
	}))
	return h
}

func must(t testing.TB, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}

func newTestServer(t testing.TB, mode Mode, hosts Hosts, log logr.Logger) *Server {
	t.Helper()
	s, err := New(Config{
		Mode: mode, Interface: "test0", ServerIP: serverIP, Hosts: hosts, Log: log,
		ScriptURL:   "http://198.18.0.1:8080/ipxe/{namespace}/{name}?mac={mac}",
		HTTPBaseURL: "http://198.18.0.1:8080/boot/",
	})
	must(t, err)
	return s
}

// exchange feeds one request to the handler and parses the reply (nil for silence).
func exchange(t testing.TB, s *Server, req *dhcpv4.DHCPv4, pxePort bool) (*dhcpv4.DHCPv4, netip.AddrPort) {
	t.Helper()
	w := new(worker)
	src := netip.MustParseAddrPort("0.0.0.0:68")
	if !req.ClientIPAddr.IsUnspecified() {
		src = netip.AddrPortFrom(netip.MustParseAddr(req.ClientIPAddr.String()), 68)
	}
	out, dst := s.handle(w, req.ToBytes(), src, pxePort)
	if out == nil {
		return nil, dst
	}
	if len(out) < minReply {
		t.Fatalf("reply of %d bytes is shorter than the BOOTP minimum", len(out))
	}
	resp, err := dhcpv4.FromBytes(out)
	if err != nil {
		t.Fatalf("reply does not parse: %v", err)
	}
	if resp.TransactionID != req.TransactionID || !bytes.Equal(resp.ClientHWAddr, req.ClientHWAddr) {
		t.Fatalf("reply xid/chaddr %v/%v, want %v/%v", resp.TransactionID, resp.ClientHWAddr, req.TransactionID, req.ClientHWAddr)
	}
	if resp.OpCode != dhcpv4.OpcodeBootReply {
		t.Fatalf("reply opcode %v", resp.OpCode)
	}
	return resp, dst
}

func discover(t testing.TB, mac net.HardwareAddr, mods ...dhcpv4.Modifier) *dhcpv4.DHCPv4 {
	t.Helper()
	d, err := dhcpv4.NewDiscovery(mac, mods...)
	must(t, err)
	return d
}

func pxe(arch iana.Arch) []dhcpv4.Modifier {
	return []dhcpv4.Modifier{
		dhcpv4.WithOption(dhcpv4.OptClassIdentifier(fmt.Sprintf("PXEClient:Arch:%05d:UNDI:002001", arch))),
		dhcpv4.WithOption(dhcpv4.OptClientArch(arch)),
		dhcpv4.WithOption(dhcpv4.OptGeneric(dhcpv4.OptionClientMachineIdentifier, append([]byte{0}, bytes.Repeat([]byte{0xab}, 16)...))),
	}
}

var bcast68 = netip.MustParseAddrPort("255.255.255.255:68")

func TestReservationOfferAndAck(t *testing.T) {
	s := newTestServer(t, ModeReservation, testHosts(t), logr.Discard())
	offer, dst := exchange(t, s, discover(t, knownMAC), false)
	if offer == nil {
		t.Fatal("no offer for a known host")
	}
	if offer.MessageType() != dhcpv4.MessageTypeOffer || !offer.YourIPAddr.Equal(net.ParseIP("198.18.0.10")) {
		t.Fatalf("offer: %s", offer.Summary())
	}
	if dst != bcast68 {
		t.Fatalf("offer sent to %v, want broadcast", dst)
	}
	if got := offer.SubnetMask().String(); got != "ffffff00" {
		t.Errorf("mask %s", got)
	}
	if r := offer.Router(); len(r) != 1 || !r[0].Equal(net.ParseIP("198.18.0.1")) {
		t.Errorf("router %v", r)
	}
	if d := offer.DNS(); len(d) != 2 || !d[1].Equal(net.ParseIP("198.18.0.54")) {
		t.Errorf("dns %v", d)
	}
	if lt := offer.IPAddressLeaseTime(0); lt != time.Hour {
		t.Errorf("lease %v", lt)
	}
	if !offer.ServerIdentifier().Equal(net.ParseIP("198.18.0.1")) {
		t.Errorf("server id %v", offer.ServerIdentifier())
	}
	if offer.BootFileName != "" || offer.BootFileNameOption() != "" {
		t.Errorf("idle host got a boot file %q", offer.BootFileName)
	}

	req, err := dhcpv4.NewRequestFromOffer(offer)
	must(t, err)
	ack, dst := exchange(t, s, req, false)
	if ack == nil || ack.MessageType() != dhcpv4.MessageTypeAck || !ack.YourIPAddr.Equal(net.ParseIP("198.18.0.10")) {
		t.Fatalf("ack: %v", ack)
	}
	if dst != bcast68 {
		t.Fatalf("ack sent to %v", dst)
	}

	// Renewal from the leased address: unicast ACK back to it.
	renew, err := dhcpv4.NewRenewFromAck(ack)
	must(t, err)
	ack2, dst := exchange(t, s, renew, false)
	if ack2 == nil || ack2.MessageType() != dhcpv4.MessageTypeAck {
		t.Fatalf("renew: %v", ack2)
	}
	if dst != netip.MustParseAddrPort("198.18.0.10:68") {
		t.Fatalf("renew ACK sent to %v", dst)
	}
	if st := s.Stats(); st.Offers != 1 || st.Acks != 2 {
		t.Fatalf("stats %+v", st)
	}
}

func TestReservationNak(t *testing.T) {
	s := newTestServer(t, ModeReservation, testHosts(t), logr.Discard())
	cases := map[string][]dhcpv4.Modifier{
		"selecting wrong address": {
			dhcpv4.WithMessageType(dhcpv4.MessageTypeRequest),
			dhcpv4.WithOption(dhcpv4.OptServerIdentifier(net.ParseIP("198.18.0.1"))),
			dhcpv4.WithOption(dhcpv4.OptRequestedIPAddress(net.ParseIP("198.18.0.77"))),
		},
		"init-reboot wrong address": {
			dhcpv4.WithMessageType(dhcpv4.MessageTypeRequest),
			dhcpv4.WithOption(dhcpv4.OptRequestedIPAddress(net.ParseIP("10.9.9.9"))),
		},
		"renewing wrong address": {
			dhcpv4.WithMessageType(dhcpv4.MessageTypeRequest),
			dhcpv4.WithClientIP(net.ParseIP("198.18.0.99")),
		},
	}
	for name, mods := range cases {
		t.Run(name, func(t *testing.T) {
			req, err := dhcpv4.New(append([]dhcpv4.Modifier{dhcpv4.WithHwAddr(knownMAC)}, mods...)...)
			must(t, err)
			nak, dst := exchange(t, s, req, false)
			if nak == nil || nak.MessageType() != dhcpv4.MessageTypeNak {
				t.Fatalf("want NAK, got %v", nak)
			}
			if !nak.YourIPAddr.IsUnspecified() || dst != bcast68 {
				t.Fatalf("NAK yiaddr %v to %v", nak.YourIPAddr, dst)
			}
		})
	}

	// A REQUEST naming another server is that server's business: silence, not NAK.
	req, err := dhcpv4.New(dhcpv4.WithHwAddr(knownMAC), dhcpv4.WithMessageType(dhcpv4.MessageTypeRequest),
		dhcpv4.WithOption(dhcpv4.OptServerIdentifier(net.ParseIP("198.18.0.2"))),
		dhcpv4.WithOption(dhcpv4.OptRequestedIPAddress(net.ParseIP("198.18.0.77"))))
	must(t, err)
	if r, _ := exchange(t, s, req, false); r != nil {
		t.Fatalf("answered a REQUEST for another server: %s", r.Summary())
	}
	// INIT-REBOOT for the right address: ACK.
	req, err = dhcpv4.New(dhcpv4.WithHwAddr(knownMAC), dhcpv4.WithMessageType(dhcpv4.MessageTypeRequest),
		dhcpv4.WithOption(dhcpv4.OptRequestedIPAddress(net.ParseIP("198.18.0.10"))))
	must(t, err)
	if r, _ := exchange(t, s, req, false); r == nil || r.MessageType() != dhcpv4.MessageTypeAck {
		t.Fatalf("init-reboot: %v", r)
	}
}

func TestUnknownMACNeverAnswered(t *testing.T) {
	var lines []string
	var mu sync.Mutex
	log := funcr.New(func(prefix, args string) {
		mu.Lock()
		lines = append(lines, args)
		mu.Unlock()
	}, funcr.Options{})
	for _, mode := range []Mode{ModeReservation, ModeProxy} {
		s := newTestServer(t, mode, testHosts(t), log)
		for _, typ := range []dhcpv4.MessageType{dhcpv4.MessageTypeDiscover, dhcpv4.MessageTypeRequest, dhcpv4.MessageTypeInform, dhcpv4.MessageTypeRelease} {
			for _, port := range []bool{false, true} {
				for range 5 {
					req := discover(t, unknownMAC, append(pxe(iana.EFI_X86_64), dhcpv4.WithMessageType(typ),
						dhcpv4.WithOption(dhcpv4.OptRequestedIPAddress(net.ParseIP("198.18.0.10"))))...)
					if r, _ := exchange(t, s, req, port); r != nil {
						t.Fatalf("%s: answered unknown MAC: %s", mode, r.Summary())
					}
				}
			}
		}
		if st := s.Stats(); st.Unknown != 40 {
			t.Fatalf("unknown count %d", st.Unknown)
		}
	}
	// Logged once per MAC per server, not per packet.
	n := 0
	for _, l := range lines {
		if strings.Contains(l, "unknown MAC") {
			n++
		}
	}
	if n != 2 {
		t.Fatalf("unknown MAC logged %d times, want once per server: %q", n, lines)
	}
}

func TestUnknownMACLogRateLimited(t *testing.T) {
	n := 0
	log := funcr.New(func(_, args string) { n++ }, funcr.Options{})
	s := newTestServer(t, ModeReservation, testHosts(t), log)
	w := new(worker)
	pkt := discover(t, unknownMAC).ToBytes()
	start := time.Now()
	for i := range 5000 {
		copy(pkt[offChaddr:], []byte{0x02, 0, 0, byte(i >> 16), byte(i >> 8), byte(i)})
		s.handle(w, pkt, netip.AddrPort{}, false)
	}
	// 10 lines per started second.
	if limit := 10 * (int(time.Since(start)/time.Second) + 2); n < 10 || n > limit {
		t.Fatalf("%d log lines for 5000 unknown MACs (limit %d)", n, limit)
	}
}

func TestBootfileSelection(t *testing.T) {
	s := newTestServer(t, ModeReservation, testHosts(t), logr.Discard())
	efiHTTP := "http://198.18.0.1:8080/boot/ipxe.efi"
	script := "http://198.18.0.1:8080/ipxe/lab/booting?mac=52:54:00:00:00:02"
	// A full DHCP answer carries no "PXEClient" (see bootOptions: EDK2 would take it for a
	// BINL offer); only UEFI HTTP boot needs option 60, "HTTPClient".
	cases := []struct {
		name       string
		mods       []dhcpv4.Modifier
		file       string
		vendor     string
		tftp, pxe4 bool // option 66 expected; PXE UUID echo expected
	}{
		{"plain OS client", nil, "", "", false, false},
		{"BIOS PXE", pxe(iana.INTEL_X86PC), "undionly.kpxe", "", true, true},
		{"UEFI x64 PXE (BC)", pxe(iana.EFI_BC), "ipxe.efi", "", true, true},
		{"UEFI x64 PXE", pxe(iana.EFI_X86_64), "ipxe.efi", "", true, true},
		{"UEFI arm64 PXE without binary", pxe(iana.EFI_ARM64), "", "", false, false},
		{"PXE arch only in vendor class", []dhcpv4.Modifier{dhcpv4.WithOption(dhcpv4.OptClassIdentifier("PXEClient:Arch:00007:UNDI:003016"))}, "ipxe.efi", "", true, false},
		{"old PXE ROM without arch", []dhcpv4.Modifier{dhcpv4.WithOption(dhcpv4.OptClassIdentifier("PXEClient"))}, "undionly.kpxe", "", true, false},
		{"UEFI HTTP boot", []dhcpv4.Modifier{
			dhcpv4.WithOption(dhcpv4.OptClassIdentifier("HTTPClient:Arch:00016:UNDI:003001")),
			dhcpv4.WithOption(dhcpv4.OptClientArch(iana.EFI_X86_64_HTTP)),
		}, efiHTTP, "HTTPClient", false, false},
		{"iPXE user class", append(pxe(iana.EFI_X86_64), dhcpv4.WithUserClass("iPXE", false)), script, "", false, true},
		{"iPXE RFC 3004 user class", append(pxe(iana.INTEL_X86PC), dhcpv4.WithUserClass("iPXE", true)), script, "", false, true},
		{"iPXE option 175", append(pxe(iana.INTEL_X86PC), dhcpv4.WithOption(dhcpv4.OptGeneric(dhcpv4.GenericOptionCode(175), []byte{0x13, 1, 1}))), script, "", false, true},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			offer, _ := exchange(t, s, discover(t, bootMAC, c.mods...), false)
			if offer == nil || !offer.YourIPAddr.Equal(net.ParseIP("198.18.0.11")) {
				t.Fatalf("offer %v", offer)
			}
			if got := offer.BootFileNameOption(); got != c.file {
				t.Errorf("option 67 %q, want %q", got, c.file)
			}
			if c.file != "" && len(c.file) < 128 && offer.BootFileName != c.file {
				t.Errorf("file field %q", offer.BootFileName)
			}
			if got := offer.ClassIdentifier(); got != c.vendor {
				t.Errorf("option 60 %q, want %q", got, c.vendor)
			}
			if got := offer.TFTPServerName() != ""; got != c.tftp {
				t.Errorf("option 66 present %v, want %v", got, c.tftp)
			}
			if c.tftp && !offer.ServerIPAddr.Equal(net.ParseIP("198.18.0.1")) {
				t.Errorf("siaddr %v", offer.ServerIPAddr)
			}
			if got := offer.GetOneOption(dhcpv4.OptionClientMachineIdentifier) != nil; got != c.pxe4 {
				t.Errorf("UUID echoed %v, want %v", got, c.pxe4)
			}
			if offer.GetOneOption(dhcpv4.OptionVendorSpecificInformation) != nil {
				t.Errorf("option 43 in a full DHCP offer")
			}
			// iPXE is told not to wait for ProxyDHCP offers; nothing else gets option 175.
			noWait := []byte{176, 1, 1}
			if got, want := offer.GetOneOption(dhcpv4.GenericOptionCode(175)), strings.HasPrefix(c.name, "iPXE"); bytes.Equal(got, noWait) != want || (!want && got != nil) {
				t.Errorf("option 175 %v, want no-pxedhcp %v", got, want)
			}
		})
	}

	// A host Anvil is not booting gets its address and no boot file, even from its PXE ROM.
	offer, _ := exchange(t, s, discover(t, knownMAC, pxe(iana.INTEL_X86PC)...), false)
	if offer == nil || offer.BootFileNameOption() != "" || offer.BootFileName != "" {
		t.Fatalf("idle host's PXE ROM: %v", offer)
	}
}

func TestHostScriptURLOverridesTemplate(t *testing.T) {
	h := testHosts(t)
	must(t, h.Set(bootMAC, Host{IP: netip.MustParsePrefix("198.18.0.11/24"), BootEnabled: true, ScriptURL: "https://boot.example/s/abc"}))
	s := newTestServer(t, ModeReservation, h, logr.Discard())
	offer, _ := exchange(t, s, discover(t, bootMAC, dhcpv4.WithUserClass("iPXE", false)), false)
	if offer == nil || offer.BootFileNameOption() != "https://boot.example/s/abc" {
		t.Fatalf("offer %v", offer)
	}
	// A script URL with a space could smuggle iPXE commands: refuse to hand it out.
	must(t, h.Set(bootMAC, Host{IP: netip.MustParsePrefix("198.18.0.11/24"), BootEnabled: true, ScriptURL: "http://x/ y"}))
	offer, _ = exchange(t, s, discover(t, bootMAC, dhcpv4.WithUserClass("iPXE", false)), false)
	if offer == nil || offer.BootFileNameOption() != "" {
		t.Fatalf("offer with unsafe script URL %v", offer)
	}
}

func TestProxyMode(t *testing.T) {
	s := newTestServer(t, ModeProxy, testHosts(t), logr.Discard())

	offer, dst := exchange(t, s, discover(t, bootMAC, pxe(iana.INTEL_X86PC)...), false)
	if offer == nil || offer.MessageType() != dhcpv4.MessageTypeOffer {
		t.Fatalf("no proxy offer: %v", offer)
	}
	if !offer.YourIPAddr.IsUnspecified() || offer.IPAddressLeaseTime(0) != 0 || offer.SubnetMask() != nil {
		t.Fatalf("proxy offer carries an address: %s", offer.Summary())
	}
	if offer.ClassIdentifier() != "PXEClient" || offer.BootFileNameOption() != "undionly.kpxe" ||
		!offer.ServerIPAddr.Equal(net.ParseIP("198.18.0.1")) || dst != bcast68 {
		t.Fatalf("proxy offer: %s to %v", offer.Summary(), dst)
	}
	if v := offer.GetOneOption(dhcpv4.OptionVendorSpecificInformation); !bytes.Equal(v, []byte{6, 1, 8, 255}) {
		t.Fatalf("option 43 %x", v)
	}

	// The site server's business: REQUESTs on 67, and non-PXE clients.
	req, err := dhcpv4.NewRequestFromOffer(offer)
	must(t, err)
	if r, _ := exchange(t, s, req, false); r != nil {
		t.Fatalf("proxy answered REQUEST on 67: %s", r.Summary())
	}
	if r, _ := exchange(t, s, discover(t, bootMAC), false); r != nil {
		t.Fatalf("proxy answered a non-PXE client")
	}
	// A host Anvil isn't booting gets nothing from a proxy.
	if r, _ := exchange(t, s, discover(t, knownMAC, pxe(iana.INTEL_X86PC)...), false); r != nil {
		t.Fatalf("proxy answered an idle host")
	}

	// Port 4011: the PXE client asks the boot server from its new address and gets an ACK
	// back at that address.
	preq, err := dhcpv4.New(dhcpv4.WithHwAddr(bootMAC), dhcpv4.WithMessageType(dhcpv4.MessageTypeRequest),
		dhcpv4.WithClientIP(net.ParseIP("198.18.5.5")))
	must(t, err)
	for _, m := range pxe(iana.EFI_X86_64) {
		m(preq)
	}
	ack, dst := exchange(t, s, preq, true)
	if ack == nil || ack.MessageType() != dhcpv4.MessageTypeAck || ack.BootFileNameOption() != "ipxe.efi" {
		t.Fatalf("4011 ack: %v", ack)
	}
	if dst != netip.MustParseAddrPort("198.18.5.5:68") || !ack.ClientIPAddr.Equal(net.ParseIP("198.18.5.5")) {
		t.Fatalf("4011 ack to %v ciaddr %v", dst, ack.ClientIPAddr)
	}
	// DISCOVER on 4011 is not a thing.
	if r, _ := exchange(t, s, discover(t, bootMAC, pxe(iana.INTEL_X86PC)...), true); r != nil {
		t.Fatal("answered DISCOVER on 4011")
	}
}

func TestRelayAndInform(t *testing.T) {
	s := newTestServer(t, ModeReservation, testHosts(t), logr.Discard())
	d := discover(t, knownMAC, dhcpv4.WithGatewayIP(net.ParseIP("198.18.9.1")),
		dhcpv4.WithOption(dhcpv4.OptRelayAgentInfo(dhcpv4.OptGeneric(dhcpv4.GenericOptionCode(1), []byte("port7")))))
	offer, dst := exchange(t, s, d, false)
	if offer == nil || dst != netip.MustParseAddrPort("198.18.9.1:67") || !offer.GatewayIPAddr.Equal(net.ParseIP("198.18.9.1")) {
		t.Fatalf("relayed offer %v to %v", offer, dst)
	}
	if ri := offer.RelayAgentInfo(); ri == nil || string(ri.Get(dhcpv4.GenericOptionCode(1))) != "port7" {
		t.Fatalf("relay agent info not echoed: %v", ri)
	}

	inf, err := dhcpv4.NewInform(knownMAC, net.ParseIP("198.18.0.10"))
	must(t, err)
	ack, dst := exchange(t, s, inf, false)
	if ack == nil || ack.MessageType() != dhcpv4.MessageTypeAck || !ack.YourIPAddr.IsUnspecified() || ack.IPAddressLeaseTime(0) != 0 {
		t.Fatalf("inform ack %v", ack)
	}
	if dst != netip.MustParseAddrPort("198.18.0.10:68") || len(ack.DNS()) != 2 {
		t.Fatalf("inform ack to %v: %s", dst, ack.Summary())
	}

	for _, typ := range []dhcpv4.MessageType{dhcpv4.MessageTypeRelease, dhcpv4.MessageTypeDecline} {
		m := discover(t, knownMAC, dhcpv4.WithMessageType(typ))
		if r, _ := exchange(t, s, m, false); r != nil {
			t.Fatalf("answered %v", typ)
		}
	}
	if st := s.Stats(); st.Releases != 1 || st.Declines != 1 {
		t.Fatalf("stats %+v", st)
	}
}

func TestMalformed(t *testing.T) {
	s := newTestServer(t, ModeReservation, testHosts(t), logr.Discard())
	good := discover(t, knownMAC).ToBytes()
	bad := map[string][]byte{
		"empty":          nil,
		"short":          good[:100],
		"reply op":       append([]byte{2}, good[1:]...),
		"token ring":     append([]byte{1, 6}, good[2:]...),
		"no cookie":      append(append([]byte{}, good[:236]...), 1, 2, 3, 4, 53, 1, 1, 255),
		"truncated opt":  append(append([]byte{}, good[:240]...), 53, 5, 1),
		"no message":     append(append([]byte{}, good[:240]...), 255),
		"odd length opt": append(append([]byte{}, good[:240]...), 53, 2, 1, 1, 255),
	}
	for name, b := range bad {
		if out, _ := s.handle(new(worker), b, netip.AddrPort{}, false); out != nil {
			t.Errorf("%s: answered", name)
		}
	}
	if st := s.Stats(); st.Malformed != uint64(len(bad)) {
		t.Fatalf("malformed %d, want %d", st.Malformed, len(bad))
	}
	// Options overloaded into the file field are read.
	raw := append([]byte{}, good[:240]...)
	raw = append(raw, 52, 1, 1, 255)
	copy(raw[offFile:], []byte{53, 1, 1, 255})
	if out, _ := s.handle(new(worker), raw, netip.AddrPort{}, false); out == nil {
		t.Fatal("overloaded message type not read")
	}
}

func TestReplySizeLimit(t *testing.T) {
	h := NewMemoryHosts()
	dns := make([]netip.Addr, 63)
	for i := range dns {
		dns[i] = netip.AddrFrom4([4]byte{198, 18, 1, byte(i)})
	}
	long := "http://198.18.0.1/" + strings.Repeat("a", 230)
	must(t, h.Set(bootMAC, Host{IP: netip.MustParsePrefix("198.18.0.11/24"), DNS: dns, BootEnabled: true, ScriptURL: long}))
	s := newTestServer(t, ModeReservation, h, logr.Discard())
	// 252 bytes of DNS and a 248-byte URL don't fit the 576-byte default.
	if r, _ := exchange(t, s, discover(t, bootMAC, dhcpv4.WithUserClass("iPXE", false)), false); r != nil {
		t.Fatalf("sent %d-byte reply to a client limited to 576", len(r.ToBytes()))
	}
	// They do when the client says it takes more.
	r, _ := exchange(t, s, discover(t, bootMAC, dhcpv4.WithUserClass("iPXE", false), dhcpv4.WithOption(dhcpv4.OptMaxMessageSize(1500))), false)
	if r == nil || r.BootFileNameOption() != long || len(r.DNS()) != 63 {
		t.Fatalf("large reply: %v", r)
	}
}

func TestConfigValidation(t *testing.T) {
	h := NewMemoryHosts()
	bad := []Config{
		{Mode: "dynamic", Interface: "x", Hosts: h},
		{Mode: ModeProxy, Hosts: h},
		{Mode: ModeProxy, Interface: "x"},
		{Mode: ModeProxy, Interface: "x", Hosts: h, ScriptURL: "ftp://x/{mac}"},
		{Mode: ModeProxy, Interface: "x", Hosts: h, ScriptURL: "http://x/{uuid}"},
		{Mode: ModeProxy, Interface: "x", Hosts: h, ScriptURL: "http://x/{mac"},
		{Mode: ModeProxy, Interface: "x", Hosts: h, ScriptURL: "http://x/a b"},
		{Mode: ModeProxy, Interface: "x", Hosts: h, Bootfiles: Bootfiles{BIOS: "a b"}},
		{Mode: ModeProxy, Interface: "x", Hosts: h, ServerIP: netip.MustParseAddr("::1")},
		{Mode: ModeProxy, Interface: "x", Hosts: h, LeaseTime: time.Second},
		{Mode: ModeProxy, Interface: "x", Hosts: h, HTTPBaseURL: "file:///boot"},
		{Mode: ModeProxy, Interface: "x", Hosts: h, Port: 70000},
	}
	for _, c := range bad {
		if _, err := New(c); err == nil {
			t.Errorf("accepted %+v", c)
		}
	}
	if _, err := New(Config{Mode: ModeOff}); err != nil {
		t.Fatal(err)
	}
}

func TestHandleAllocatesNothing(t *testing.T) {
	for _, mode := range []Mode{ModeReservation, ModeProxy} {
		s := newTestServer(t, mode, testHosts(t), logr.Discard())
		w := new(worker)
		disc := discover(t, bootMAC, append(pxe(iana.EFI_X86_64), dhcpv4.WithUserClass("iPXE", false))...).ToBytes()
		req, err := dhcpv4.New(dhcpv4.WithHwAddr(bootMAC), dhcpv4.WithMessageType(dhcpv4.MessageTypeRequest),
			dhcpv4.WithOption(dhcpv4.OptServerIdentifier(net.ParseIP("198.18.0.1"))),
			dhcpv4.WithOption(dhcpv4.OptRequestedIPAddress(net.ParseIP("198.18.0.11"))),
			dhcpv4.WithOption(dhcpv4.OptClassIdentifier("PXEClient:Arch:00007")))
		must(t, err)
		reqb := req.ToBytes()
		unknown := discover(t, unknownMAC).ToBytes()
		allocs := testing.AllocsPerRun(1000, func() {
			s.handle(w, disc, netip.AddrPort{}, false)
			s.handle(w, reqb, netip.AddrPort{}, mode == ModeProxy)
			s.handle(w, unknown, netip.AddrPort{}, false)
		})
		if allocs != 0 {
			t.Errorf("%s: %.1f allocations per exchange", mode, allocs)
		}
	}
}

// BenchmarkHandle measures the handler alone: a DISCOVER and a REQUEST per iteration.
func BenchmarkHandle(b *testing.B) {
	hosts, err := NewLabHosts(net.HardwareAddr{2, 0, 0, 0, 0, 0}, 100000, netip.MustParseAddr("198.18.1.0"), 15, Host{BootEnabled: true})
	must(b, err)
	s := newTestServer(b, ModeReservation, hosts, logr.Discard())
	disc := discover(b, net.HardwareAddr{2, 0, 0, 0, 1, 2}, pxe(iana.EFI_X86_64)...).ToBytes()
	req, err := dhcpv4.New(dhcpv4.WithHwAddr(net.HardwareAddr{2, 0, 0, 0, 1, 2}), dhcpv4.WithMessageType(dhcpv4.MessageTypeRequest),
		dhcpv4.WithOption(dhcpv4.OptServerIdentifier(net.ParseIP("198.18.0.1"))),
		dhcpv4.WithOption(dhcpv4.OptRequestedIPAddress(net.ParseIP("198.18.2.2"))))
	must(b, err)
	reqb := req.ToBytes()
	b.ReportAllocs()
	b.RunParallel(func(pb *testing.PB) {
		w := new(worker)
		for pb.Next() {
			if out, _ := s.handle(w, disc, netip.AddrPort{}, false); out == nil {
				b.Fatal("no offer")
			}
			if out, _ := s.handle(w, reqb, netip.AddrPort{}, false); out == nil {
				b.Fatal("no ack")
			}
		}
	})
}

func TestModeOffOnlyWaits(t *testing.T) {
	s, err := New(Config{Mode: ModeOff})
	must(t, err)
	if s.NeedLeaderElection() {
		t.Fatal("boot services should run on every replica")
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- s.Start(ctx) }()
	select {
	case err := <-done:
		t.Fatalf("returned before its context ended: %v", err)
	case <-time.After(50 * time.Millisecond):
	}
	cancel()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
}
