package dhcp

import (
	"bytes"
	"encoding/binary"
	"net"
	"net/netip"
)

// Client architecture types (option 93, RFC 4578 and the IANA registry).
const (
	archBIOS      = 0
	archEFIBC     = 7
	archEFIx64    = 9
	archEFIARM64  = 11
	archHTTPx64   = 16
	archHTTPARM64 = 19
)

// handle answers one packet. It returns the reply and where to send it, or nil for silence.
// pxePort says the packet came to port 4011 (proxy mode's boot server port).
func (s *Server) handle(w *worker, pkt []byte, src netip.AddrPort, pxePort bool) ([]byte, netip.AddrPort) {
	s.stats.received.Add(1)
	req := &w.req
	if err := req.parse(pkt); err != nil {
		s.stats.malformed.Add(1)
		if s.log.V(1).Enabled() && s.limiter.allow() {
			s.log.V(1).Info("ignoring malformed DHCP packet", "from", src.String(), "reason", err.Error())
		}
		return nil, netip.AddrPort{}
	}
	// The worker owns req, so this slice costs no allocation.
	host, ok := s.hosts.Lookup(net.HardwareAddr(req.mac[:]))
	if !ok {
		s.unknown(req)
		return nil, netip.AddrPort{}
	}
	if s.cfg.Mode == ModeProxy {
		return s.proxy(w, req, &host, src, pxePort)
	}
	if pxePort {
		return nil, netip.AddrPort{}
	}
	return s.reservation(w, req, &host)
}

// reservation answers a known host as a full DHCP server.
func (s *Server) reservation(w *worker, req *request, host *Host) ([]byte, netip.AddrPort) {
	addr := host.IP.Addr()
	if !addr.Is4() || host.IP.Bits() < 1 || host.IP.Bits() > 32 {
		s.stats.misconfigured.Add(1)
		if s.limiter.allow() {
			s.log.Info("known host has no IPv4 reservation; not answering", "host", host.Namespace+"/"+host.Name, "mac", net.HardwareAddr(req.mac[:]).String())
		}
		return nil, netip.AddrPort{}
	}
	switch req.msgType {
	case msgDiscover:
		return s.addressReply(w, req, host, msgOffer)
	case msgRequest:
		var want netip.Addr
		switch {
		case req.serverID.IsValid():
			// SELECTING: the client picked an offer. If not ours, it isn't our business.
			if req.serverID != s.serverID {
				s.stats.otherServers.Add(1)
				return nil, netip.AddrPort{}
			}
			want = req.requested
			if !want.IsValid() {
				want = req.ciaddr
			}
		case req.requested.IsValid():
			want = req.requested // INIT-REBOOT: checking a remembered address
		case !req.ciaddr.IsUnspecified():
			want = req.ciaddr // RENEWING or REBINDING
		default:
			s.stats.ignored.Add(1)
			return nil, netip.AddrPort{}
		}
		if want != addr {
			return s.nak(w, req, host, want)
		}
		return s.addressReply(w, req, host, msgAck)
	case msgInform:
		return s.informReply(w, req, host)
	case msgRelease:
		// Reservations outlive leases: nothing to free. Counted for visibility.
		s.stats.releases.Add(1)
		return nil, netip.AddrPort{}
	case msgDecline:
		// Someone else answers ARP for the host's reserved address: a duplicate in the
		// inventory or a stray static configuration. Worth a person's attention.
		s.stats.declines.Add(1)
		if s.limiter.allow() {
			s.log.Info("host declined its reserved address: another machine is using it",
				"host", host.Namespace+"/"+host.Name, "address", addr.String())
		}
		return nil, netip.AddrPort{}
	}
	s.stats.ignored.Add(1)
	return nil, netip.AddrPort{}
}

// addressReply builds an OFFER or ACK carrying the host's reserved address, its network
// settings and, when Anvil is booting it, its boot file.
func (s *Server) addressReply(w *worker, req *request, host *Host, typ byte) ([]byte, netip.AddrPort) {
	file, vendor := s.bootfile(w, req, host)
	var siaddr netip.Addr
	if file != nil {
		siaddr = s.tftp
	}
	var p reply
	p.start(w.out[:], req, host.IP.Addr(), siaddr, typ == msgAck)
	p.optMessageType(typ)
	p.optAddr(optServerID, s.serverID)
	p.optUint32(optLeaseTime, s.lease)
	p.optUint32(optRenewalTime, s.t1)
	p.optUint32(optRebindingTime, s.t2)
	s.networkOptions(&p, host)
	s.bootOptions(&p, req, file, vendor, false)
	out, ok := s.finish(&p, req)
	if !ok {
		return nil, netip.AddrPort{}
	}
	if typ == msgOffer {
		s.stats.offers.Add(1)
	} else {
		s.stats.acks.Add(1)
	}
	if s.log.V(1).Enabled() {
		s.log.V(1).Info("DHCP answer", "type", msgName(typ), "host", host.Namespace+"/"+host.Name,
			"address", host.IP.String(), "bootfile", string(file))
	}
	return out, s.dest(req, typ)
}

func (s *Server) networkOptions(p *reply, host *Host) {
	bits := host.IP.Bits()
	p.optUint32(optSubnetMask, ^uint32(0)<<(32-bits))
	if host.Gateway.Is4() {
		p.optAddr(optRouter, host.Gateway)
	}
	n := 0
	for _, d := range host.DNS {
		if d.Is4() && n < 63 {
			n++
		}
	}
	if n > 0 {
		p.b = append(p.b, optDNS, byte(4*n))
		for _, d := range host.DNS {
			if d.Is4() && n > 0 {
				v := d.As4()
				p.b = append(p.b, v[:]...)
				n--
			}
		}
	}
}

// informReply answers DHCPINFORM: settings, no address (RFC 2131 §4.3.5).
func (s *Server) informReply(w *worker, req *request, host *Host) ([]byte, netip.AddrPort) {
	file, vendor := s.bootfile(w, req, host)
	var siaddr netip.Addr
	if file != nil {
		siaddr = s.tftp
	}
	var p reply
	p.start(w.out[:], req, netip.IPv4Unspecified(), siaddr, true)
	p.optMessageType(msgAck)
	p.optAddr(optServerID, s.serverID)
	s.networkOptions(&p, host)
	s.bootOptions(&p, req, file, vendor, false)
	out, ok := s.finish(&p, req)
	if !ok {
		return nil, netip.AddrPort{}
	}
	s.stats.acks.Add(1)
	return out, s.dest(req, msgAck)
}

func (s *Server) nak(w *worker, req *request, host *Host, asked netip.Addr) ([]byte, netip.AddrPort) {
	var p reply
	p.start(w.out[:], req, netip.IPv4Unspecified(), netip.IPv4Unspecified(), false)
	if req.giaddr.IsValid() && !req.giaddr.IsUnspecified() {
		// The relay must broadcast a NAK: the client may not own the address it asked for.
		binary.BigEndian.PutUint16(p.b[offFlags:], req.flags|flagBroadcast)
	}
	p.optMessageType(msgNak)
	p.optAddr(optServerID, s.serverID)
	p.optString(optMessage, "address not reserved for this host")
	out, ok := s.finish(&p, req)
	if !ok {
		return nil, netip.AddrPort{}
	}
	s.stats.naks.Add(1)
	if s.log.V(1).Enabled() {
		s.log.V(1).Info("DHCP NAK", "host", host.Namespace+"/"+host.Name, "asked", asked.String(), "reserved", host.IP.String())
	}
	return out, s.dest(req, msgNak)
}

// proxy answers a known host as a ProxyDHCP server: boot information only, to PXE and HTTP
// boot clients only, and only while Anvil is booting the host.
func (s *Server) proxy(w *worker, req *request, host *Host, src netip.AddrPort, pxePort bool) ([]byte, netip.AddrPort) {
	var typ byte
	var dst netip.AddrPort
	switch {
	case !pxePort && req.msgType == msgDiscover:
		typ, dst = msgOffer, s.dest(req, msgOffer)
	case pxePort && (req.msgType == msgRequest || req.msgType == msgInform):
		// A PXE client asks the boot server directly, from its new address.
		typ, dst = msgAck, src
	default:
		// REQUESTs on port 67 are for the site's server; RELEASE/DECLINE aren't ours either.
		s.stats.ignored.Add(1)
		return nil, netip.AddrPort{}
	}
	if !hasPrefix(req.vendorClass, "PXEClient") && !hasPrefix(req.vendorClass, "HTTPClient") {
		s.stats.ignored.Add(1)
		return nil, netip.AddrPort{}
	}
	file, vendor := s.bootfile(w, req, host)
	if file == nil {
		s.stats.ignored.Add(1)
		return nil, netip.AddrPort{}
	}
	var p reply
	p.start(w.out[:], req, netip.IPv4Unspecified(), s.tftp, pxePort)
	p.optMessageType(typ)
	p.optAddr(optServerID, s.serverID)
	s.bootOptions(&p, req, file, vendor, true)
	out, ok := s.finish(&p, req)
	if !ok {
		return nil, netip.AddrPort{}
	}
	if typ == msgOffer {
		s.stats.offers.Add(1)
	} else {
		s.stats.acks.Add(1)
	}
	if s.log.V(1).Enabled() {
		s.log.V(1).Info("ProxyDHCP answer", "type", msgName(typ), "host", host.Namespace+"/"+host.Name, "bootfile", string(file))
	}
	return out, dst
}

// bootOptions adds what a boot client needs to load file.
func (s *Server) bootOptions(p *reply, req *request, file []byte, vendor string, proxy bool) {
	if file == nil {
		return
	}
	p.setFile(file)
	p.opt(optBootfile, file)
	if vendor == "HTTPClient" || (proxy && vendor != "") {
		// PXE clients recognise a ProxyDHCP offer by option 60; UEFI HTTP clients only accept
		// an offer that says "HTTPClient". A full DHCP answer for a PXE client leaves it out:
		// EDK2-based UEFI firmware (most servers' and OVMF's) takes an answer that carries an
		// address and "PXEClient" but no PXE boot-server options for a BINL offer and asks
		// port 4011 for the boot file instead of loading the one named here — and nothing
		// answers there in reservation mode. Without option 60 the answer is a plain DHCP
		// offer with a boot file, which EDK2, BIOS PXE ROMs and iPXE all load (as they do
		// from an ISC dhcpd with "filename" and "next-server").
		p.optString(optVendorClass, vendor)
	}
	if !bytes.Contains(file, []byte("://")) {
		p.optString(optTFTPServer, s.tftpName)
	}
	if !proxy && isIPXE(req) {
		// iPXE's no-pxedhcp setting (encapsulated option 175.176): this full answer is all
		// there is, so iPXE need not wait for ProxyDHCP offers — which it otherwise does for
		// a few seconds after an offer without "PXEClient".
		p.b = append(p.b, optIPXEEncap, 3, ipxeNoPXEDHCP, 1, 1)
	}
	if vendor == "PXEClient" {
		if proxy {
			// PXE vendor options: discovery control = 8, "download the boot file named in
			// this offer, skip boot server discovery". Old ROMs ignore proxy offers without
			// option 43.
			p.b = append(p.b, optVendorSpec, 4, 6, 1, 8, optEnd)
		}
		if len(req.uuid) > 0 {
			p.opt(optClientUUID, req.uuid) // some PXE ROMs drop replies that don't echo it
		}
	}
}

// finish echoes relay information, ends the packet and checks it fits what the client takes.
func (s *Server) finish(p *reply, req *request) ([]byte, bool) {
	if len(req.agentInfo) > 0 {
		p.opt(optAgentInfo, req.agentInfo)
	}
	limit := min(req.maxSize-28, maxReply) // the client's limit counts IP and UDP headers
	out := p.finish()
	if len(out) > limit && len(out) > minReply {
		s.stats.misconfigured.Add(1)
		if s.limiter.allow() {
			s.log.Info("DHCP reply larger than the client accepts; not sent", "size", len(out), "limit", limit)
		}
		return nil, false
	}
	return out, true
}

// dest picks where a reply goes (RFC 2131 §4.1): back to the relay, to the client's address if
// it has one, else broadcast on the link (a client without an address can't take unicast
// without an ARP entry we would have to forge).
func (s *Server) dest(req *request, typ byte) netip.AddrPort {
	if req.giaddr.IsValid() && !req.giaddr.IsUnspecified() {
		return netip.AddrPortFrom(req.giaddr, s.port)
	}
	if typ != msgNak && !req.ciaddr.IsUnspecified() {
		return netip.AddrPortFrom(req.ciaddr, s.clientPort)
	}
	return netip.AddrPortFrom(netip.AddrFrom4([4]byte{255, 255, 255, 255}), s.clientPort)
}

// bootfile picks what this client should load, or nil when it should get no boot file: the
// host isn't expected to boot, the client isn't a boot client (an installed OS renewing its
// address), or it's an architecture we have no binary for. vendor is the option 60 to echo.
func (s *Server) bootfile(w *worker, req *request, host *Host) (file []byte, vendor string) {
	if !host.BootEnabled {
		return nil, ""
	}
	pxe := hasPrefix(req.vendorClass, "PXEClient")
	httpc := hasPrefix(req.vendorClass, "HTTPClient")
	if isIPXE(req) {
		// iPXE, loaded by an earlier step of this boot: give it the script.
		url := s.scriptURL(w, host)
		if url == nil {
			return nil, ""
		}
		switch {
		case httpc:
			return url, "HTTPClient"
		case pxe:
			return url, "PXEClient"
		}
		return url, ""
	}
	if !pxe && !httpc {
		return nil, ""
	}
	arch, ok := req.arch, req.hasArch
	if !ok {
		arch, ok = vendorArch(req.vendorClass)
	}
	if !ok {
		arch = archBIOS // PXE 2.0 BIOS ROMs may predate option 93
	}
	if httpc || arch == archHTTPx64 || arch == archHTTPARM64 {
		switch arch {
		case archHTTPx64:
			file = s.http64
		case archHTTPARM64:
			file = s.httpARM
		}
		vendor = "HTTPClient"
	} else {
		switch arch {
		case archBIOS:
			file = s.bios
		case archEFIBC, archEFIx64:
			file = s.efi64
		case archEFIARM64:
			file = s.efiARM
		}
		vendor = "PXEClient"
	}
	if len(file) == 0 {
		return nil, ""
	}
	return file, vendor
}

// isIPXE recognises iPXE by its user class (option 77, raw or in RFC 3004 form) or by its own
// encapsulated option 175.
func isIPXE(req *request) bool {
	if req.ipxe {
		return true
	}
	uc := req.userClass
	if string(uc) == "iPXE" {
		return true
	}
	for len(uc) > 0 {
		n := int(uc[0])
		if 1+n > len(uc) {
			return false
		}
		if string(uc[1:1+n]) == "iPXE" {
			return true
		}
		uc = uc[1+n:]
	}
	return false
}

// vendorArch reads the architecture from "PXEClient:Arch:00007:UNDI:003016".
func vendorArch(vc []byte) (uint16, bool) {
	i := bytes.Index(vc, []byte(":Arch:"))
	if i < 0 || len(vc) < i+6+5 {
		return 0, false
	}
	var v uint16
	for _, c := range vc[i+6 : i+11] {
		if c < '0' || c > '9' {
			return 0, false
		}
		v = v*10 + uint16(c-'0')
	}
	return v, true
}

func hasPrefix(b []byte, p string) bool {
	return len(b) >= len(p) && string(b[:len(p)]) == p
}

// scriptURL expands the host's iPXE script URL into the worker's buffer.
func (s *Server) scriptURL(w *worker, host *Host) []byte {
	if host.ScriptURL != "" {
		if len(host.ScriptURL) > len(w.file)-1 || !printable(host.ScriptURL) {
			s.stats.misconfigured.Add(1)
			if s.limiter.allow() {
				s.log.Info("host's script URL is too long or has spaces or control characters", "host", host.Namespace+"/"+host.Name)
			}
			return nil
		}
		return append(w.file[:0], host.ScriptURL...)
	}
	if s.script == nil {
		s.stats.misconfigured.Add(1)
		if s.limiter.allow() {
			s.log.Info("iPXE client but no script URL configured", "host", host.Namespace+"/"+host.Name)
		}
		return nil
	}
	b := w.file[:0]
	for _, part := range s.script {
		switch part.field {
		case fieldMAC:
			b = appendMAC(b, w.req.mac)
		case fieldName:
			b = append(b, host.Name...)
		case fieldNamespace:
			b = append(b, host.Namespace...)
		default:
			b = append(b, part.lit...)
		}
	}
	if len(b) > 255 || !printable(b) {
		s.stats.misconfigured.Add(1)
		if s.limiter.allow() {
			s.log.Info("expanded script URL is too long or has spaces or control characters", "host", host.Namespace+"/"+host.Name)
		}
		return nil
	}
	return b
}

func appendMAC(b []byte, mac [6]byte) []byte {
	const hexdigits = "0123456789abcdef"
	for i, c := range mac {
		if i > 0 {
			b = append(b, ':')
		}
		b = append(b, hexdigits[c>>4], hexdigits[c&0xf])
	}
	return b
}

func msgName(t byte) string {
	switch t {
	case msgDiscover:
		return "DISCOVER"
	case msgOffer:
		return "OFFER"
	case msgRequest:
		return "REQUEST"
	case msgDecline:
		return "DECLINE"
	case msgAck:
		return "ACK"
	case msgNak:
		return "NAK"
	case msgRelease:
		return "RELEASE"
	case msgInform:
		return "INFORM"
	}
	return "unknown"
}

// unknown counts and (once per MAC, at a bounded rate) logs a request from a MAC that is not a
// known host.
func (s *Server) unknown(req *request) {
	s.stats.unknown.Add(1)
	k, _ := macKey(net.HardwareAddr(req.mac[:]))
	if !s.limiter.firstTime(k) || !s.limiter.allow() {
		return
	}
	s.log.Info("ignoring DHCP from unknown MAC", "mac", net.HardwareAddr(req.mac[:]).String(),
		"type", msgName(req.msgType), "vendorClass", string(req.vendorClass))
}
