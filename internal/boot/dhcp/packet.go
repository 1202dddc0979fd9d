package dhcp

import (
	"encoding/binary"
	"net/netip"
)

// The DHCPv4 wire format (RFC 2131, 2132) as far as this server needs it. Parsing and building
// work in place on per-worker buffers: a request is a set of offsets and small fixed fields,
// never a map of options, so the hot path allocates nothing.

// Message types (option 53).
const (
	msgDiscover byte = 1
	msgOffer    byte = 2
	msgRequest  byte = 3
	msgDecline  byte = 4
	msgAck      byte = 5
	msgNak      byte = 6
	msgRelease  byte = 7
	msgInform   byte = 8
)

// Option codes used here.
const (
	optPad           byte = 0
	optSubnetMask    byte = 1
	optRouter        byte = 3
	optDNS           byte = 6
	optVendorSpec    byte = 43
	optRequestedIP   byte = 50
	optLeaseTime     byte = 51
	optOverload      byte = 52
	optMessageType   byte = 53
	optServerID      byte = 54
	optMessage       byte = 56
	optMaxSize       byte = 57
	optRenewalTime   byte = 58
	optRebindingTime byte = 59
	optVendorClass   byte = 60
	optTFTPServer    byte = 66
	optBootfile      byte = 67
	optUserClass     byte = 77
	optAgentInfo     byte = 82
	optClientArch    byte = 93
	optClientUUID    byte = 97
	optIPXEEncap     byte = 175
	optEnd           byte = 255

	// ipxeNoPXEDHCP is iPXE's "don't wait for ProxyDHCP" setting, inside option 175.
	ipxeNoPXEDHCP byte = 176
)

const (
	opBootRequest = 1
	opBootReply   = 2
	htypeEthernet = 1

	// Fixed BOOTP header, then the magic cookie, then options.
	offFlags  = 10
	offCiaddr = 12
	offYiaddr = 16
	offSiaddr = 20
	offGiaddr = 24
	offChaddr = 28
	offSname  = 44
	offFile   = 108
	offCookie = 236
	offOpts   = 240

	magicCookie = 0x63825363

	// minReply pads replies to the BOOTP minimum: some PXE ROMs drop shorter packets.
	minReply = 300
	// defaultMaxSize is what every DHCP client must accept (RFC 2131 §2) when it names no
	// larger maximum.
	defaultMaxSize = 576
	// maxReply bounds what we send even when a client accepts more: one Ethernet frame.
	maxReply = 1472

	flagBroadcast = 0x8000
)

// parseError is a constant error type, so the parser's errors need no package variables.
type parseError string

func (e parseError) Error() string { return string(e) }

const (
	errShort     parseError = "shorter than a DHCP header"
	errNotReq    parseError = "not a BOOTREQUEST"
	errNotEther  parseError = "hardware type is not Ethernet"
	errCookie    parseError = "no DHCP magic cookie"
	errOption    parseError = "option runs past the end of the packet"
	errNoMsgType parseError = "no message type"
)

// request is one parsed client message. Slices point into the receive buffer and are valid
// only until the worker reads the next packet.
type request struct {
	raw []byte

	msgType   byte
	flags     uint16
	ciaddr    netip.Addr
	giaddr    netip.Addr
	mac       [6]byte
	requested netip.Addr // option 50
	serverID  netip.Addr // option 54
	maxSize   int        // option 57, or defaultMaxSize

	vendorClass []byte // option 60
	userClass   []byte // option 77
	arch        uint16 // first entry of option 93
	hasArch     bool
	ipxe        bool   // option 175 present: an iPXE client
	uuid        []byte // option 97, echoed to PXE clients
	agentInfo   []byte // option 82, echoed to the relay (RFC 3046)
}

// parse fills r from b. It checks every length against the packet, so arbitrary bytes are
// safe to give it.
func (r *request) parse(b []byte) error {
	*r = request{raw: b, maxSize: defaultMaxSize}
	if len(b) < offOpts {
		return errShort
	}
	if b[0] != opBootRequest {
		return errNotReq
	}
	// Anvil hosts are identified by their Ethernet MAC; other hardware types can't be hosts.
	if b[1] != htypeEthernet || b[2] != 6 {
		return errNotEther
	}
	if binary.BigEndian.Uint32(b[offCookie:]) != magicCookie {
		return errCookie
	}
	r.flags = binary.BigEndian.Uint16(b[offFlags:])
	r.ciaddr = addr4(b[offCiaddr:])
	r.giaddr = addr4(b[offGiaddr:])
	copy(r.mac[:], b[offChaddr:offChaddr+6])

	overload, err := r.options(b[offOpts:], true)
	if err != nil {
		return err
	}
	// Option 52 moves more options into the file and sname fields (RFC 2132 §9.3).
	if overload&1 != 0 {
		if _, err := r.options(b[offFile:offFile+128], false); err != nil {
			return err
		}
	}
	if overload&2 != 0 {
		if _, err := r.options(b[offSname:offSname+64], false); err != nil {
			return err
		}
	}
	if r.msgType == 0 {
		return errNoMsgType
	}
	return nil
}

// options reads one option area. The first occurrence of an option wins; RFC 3396
// concatenation matters only for long options that no client sends to a boot server.
func (r *request) options(b []byte, main bool) (overload byte, err error) {
	for i := 0; i < len(b); {
		code := b[i]
		if code == optPad {
			i++
			continue
		}
		if code == optEnd {
			return overload, nil
		}
		if i+1 >= len(b) {
			return 0, errOption
		}
		n := int(b[i+1])
		if i+2+n > len(b) {
			return 0, errOption
		}
		v := b[i+2 : i+2+n]
		i += 2 + n
		switch code {
		case optMessageType:
			if n == 1 && r.msgType == 0 {
				r.msgType = v[0]
			}
		case optRequestedIP:
			if n == 4 && !r.requested.IsValid() {
				r.requested = addr4(v)
			}
		case optServerID:
			if n == 4 && !r.serverID.IsValid() {
				r.serverID = addr4(v)
			}
		case optMaxSize:
			if n == 2 {
				if m := int(binary.BigEndian.Uint16(v)); m > defaultMaxSize {
					r.maxSize = m
				}
			}
		case optVendorClass:
			if r.vendorClass == nil {
				r.vendorClass = v
			}
		case optUserClass:
			if r.userClass == nil {
				r.userClass = v
			}
		case optClientArch:
			if n >= 2 && !r.hasArch {
				r.arch, r.hasArch = binary.BigEndian.Uint16(v), true
			}
		case optClientUUID:
			if r.uuid == nil {
				r.uuid = v
			}
		case optAgentInfo:
			if r.agentInfo == nil {
				r.agentInfo = v
			}
		case optIPXEEncap:
			r.ipxe = true
		case optOverload:
			if main && n == 1 {
				overload = v[0]
			}
		}
	}
	// A missing end option is common enough in the wild (and harmless) to accept.
	return overload, nil
}

func addr4(b []byte) netip.Addr {
	return netip.AddrFrom4([4]byte{b[0], b[1], b[2], b[3]})
}

// reply builds one answer into a worker's buffer with appends that never outgrow it.
type reply struct {
	b []byte
}

// start writes the fixed header of a reply to req.
func (p *reply) start(buf []byte, req *request, yiaddr, siaddr netip.Addr, ciaddr bool) {
	b := buf[:offOpts]
	clear(b)
	b[0] = opBootReply
	b[1] = htypeEthernet
	b[2] = 6
	copy(b[4:8], req.raw[4:8]) // xid
	binary.BigEndian.PutUint16(b[offFlags:], req.flags)
	if ciaddr {
		copy(b[offCiaddr:offCiaddr+4], req.raw[offCiaddr:offCiaddr+4])
	}
	put4(b[offYiaddr:], yiaddr)
	put4(b[offSiaddr:], siaddr)
	copy(b[offGiaddr:offGiaddr+4], req.raw[offGiaddr:offGiaddr+4])
	copy(b[offChaddr:offChaddr+16], req.raw[offChaddr:offChaddr+16])
	binary.BigEndian.PutUint32(b[offCookie:], magicCookie)
	p.b = b
}

func put4(dst []byte, a netip.Addr) {
	if a.Is4() {
		v := a.As4()
		copy(dst[:4], v[:])
	}
}

func (p *reply) opt(code byte, v []byte) {
	if len(v) > 255 {
		v = v[:255] // callers check lengths; this only keeps a bug from corrupting the packet
	}
	p.b = append(p.b, code, byte(len(v))) //nolint:gosec // at most 255, just above
	p.b = append(p.b, v...)
}

func (p *reply) optMessageType(v byte) {
	p.b = append(p.b, optMessageType, 1, v)
}

func (p *reply) optAddr(code byte, a netip.Addr) {
	v := a.As4()
	p.b = append(p.b, code, 4, v[0], v[1], v[2], v[3])
}

func (p *reply) optUint32(code byte, v uint32) {
	p.b = append(p.b, code, 4)
	p.b = binary.BigEndian.AppendUint32(p.b, v)
}

func (p *reply) optString(code byte, s string) {
	if len(s) > 255 {
		s = s[:255]
	}
	p.b = append(p.b, code, byte(len(s))) //nolint:gosec // at most 255, just above
	p.b = append(p.b, s...)
}

// setFile puts the boot file name into the header's file field, where BIOS PXE ROMs look for
// it, when it fits (with its terminating NUL).
func (p *reply) setFile(name []byte) bool {
	if len(name) > 127 {
		return false
	}
	copy(p.b[offFile:offFile+128], name)
	return true
}

// finish ends the options and pads to the BOOTP minimum.
func (p *reply) finish() []byte {
	p.b = append(p.b, optEnd)
	if n := minReply - len(p.b); n > 0 {
		p.b = append(p.b, make([]byte, n)...) // zeros are pad options; the compiler doesn't allocate here
	}
	return p.b
}
