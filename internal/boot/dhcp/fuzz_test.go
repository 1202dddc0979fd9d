package dhcp

import (
	"bytes"
	"net"
	"net/netip"
	"testing"

	"github.com/go-logr/logr"
	"github.com/insomniacslk/dhcp/dhcpv4"
	"github.com/insomniacslk/dhcp/iana"
)

// FuzzHandle feeds arbitrary bytes to the handler in both modes and on both ports. Whatever
// arrives, it must not panic, must never answer a MAC that isn't a known host, and anything
// it sends must be a well-formed reply to that request that fits one frame.
func FuzzHandle(f *testing.F) {
	mods := [][]dhcpv4.Modifier{
		nil,
		pxe(iana.INTEL_X86PC),
		pxe(iana.EFI_X86_64),
		append(pxe(iana.EFI_X86_64), dhcpv4.WithUserClass("iPXE", false)),
		append(pxe(iana.EFI_X86_64), dhcpv4.WithUserClass("iPXE", true)),
		{dhcpv4.WithOption(dhcpv4.OptClassIdentifier("HTTPClient:Arch:00016")), dhcpv4.WithOption(dhcpv4.OptClientArch(iana.EFI_X86_64_HTTP))},
		{dhcpv4.WithMessageType(dhcpv4.MessageTypeRequest), dhcpv4.WithOption(dhcpv4.OptServerIdentifier(net.ParseIP("198.18.0.1"))), dhcpv4.WithOption(dhcpv4.OptRequestedIPAddress(net.ParseIP("198.18.0.11")))},
		{dhcpv4.WithMessageType(dhcpv4.MessageTypeRequest), dhcpv4.WithOption(dhcpv4.OptRequestedIPAddress(net.ParseIP("198.18.0.12")))},
		{dhcpv4.WithMessageType(dhcpv4.MessageTypeRequest), dhcpv4.WithClientIP(net.ParseIP("198.18.0.11"))},
		{dhcpv4.WithMessageType(dhcpv4.MessageTypeInform), dhcpv4.WithClientIP(net.ParseIP("198.18.0.11"))},
		{dhcpv4.WithMessageType(dhcpv4.MessageTypeRelease)},
		{dhcpv4.WithMessageType(dhcpv4.MessageTypeDecline)},
		{dhcpv4.WithGatewayIP(net.ParseIP("198.18.9.1")), dhcpv4.WithOption(dhcpv4.OptRelayAgentInfo(dhcpv4.OptGeneric(dhcpv4.GenericOptionCode(1), []byte("x"))))},
		{dhcpv4.WithOption(dhcpv4.OptMaxMessageSize(1500))},
	}
	for _, mac := range []net.HardwareAddr{knownMAC, bootMAC, unknownMAC} {
		for _, m := range mods {
			d, err := dhcpv4.NewDiscovery(mac, m...)
			if err != nil {
				f.Fatal(err)
			}
			for mode := range byte(2) {
				f.Add(d.ToBytes(), mode, false)
				f.Add(d.ToBytes(), mode, true)
			}
		}
	}
	f.Add([]byte{}, byte(0), false)

	hosts := testHosts(f)
	servers := []*Server{
		newTestServer(f, ModeReservation, hosts, logr.Discard()),
		newTestServer(f, ModeProxy, hosts, logr.Discard()),
	}
	f.Fuzz(func(t *testing.T, pkt []byte, mode byte, pxePort bool) {
		s := servers[int(mode)%len(servers)]
		in := bytes.Clone(pkt) // the handler must not depend on the caller keeping it
		out, dst := s.handle(new(worker), in, netip.MustParseAddrPort("198.18.0.50:68"), pxePort)
		if out == nil {
			return
		}
		if len(pkt) < offOpts {
			t.Fatalf("answered a %d-byte packet", len(pkt))
		}
		mac := net.HardwareAddr(pkt[offChaddr : offChaddr+6])
		if _, known := hosts.Lookup(mac); !known {
			t.Fatalf("answered unknown MAC %v", mac)
		}
		if len(out) > maxReply || len(out) < minReply {
			t.Fatalf("reply of %d bytes", len(out))
		}
		resp, err := dhcpv4.FromBytes(out)
		if err != nil {
			t.Fatalf("reply does not parse: %v", err)
		}
		if resp.OpCode != dhcpv4.OpcodeBootReply || !bytes.Equal(out[4:8], pkt[4:8]) || !bytes.Equal(out[offChaddr:offChaddr+16], pkt[offChaddr:offChaddr+16]) {
			t.Fatalf("reply header does not match request")
		}
		switch resp.MessageType() {
		case dhcpv4.MessageTypeOffer, dhcpv4.MessageTypeAck, dhcpv4.MessageTypeNak:
		default:
			t.Fatalf("reply type %v", resp.MessageType())
		}
		if !dst.IsValid() || dst.Port() == 0 {
			t.Fatalf("reply to %v", dst)
		}
		if s.cfg.Mode == ModeProxy && !resp.YourIPAddr.IsUnspecified() {
			t.Fatalf("proxy handed out an address")
		}
	})
}
