package pid1

import (
	"encoding/binary"
	"fmt"
	"net/netip"
	"os"

	"golang.org/x/sys/unix"
)

// rtnl is a route netlink socket: the three requests PID 1 needs (link up, add an address,
// add the default route), each acknowledged.
type rtnl struct {
	fd  int
	seq uint32
}

func openRTNL() (*rtnl, error) {
	fd, err := unix.Socket(unix.AF_NETLINK, unix.SOCK_RAW|unix.SOCK_CLOEXEC, unix.NETLINK_ROUTE)
	if err != nil {
		return nil, fmt.Errorf("netlink socket: %w", err)
	}
	if err := unix.Bind(fd, &unix.SockaddrNetlink{Family: unix.AF_NETLINK}); err != nil {
		_ = unix.Close(fd)
		return nil, fmt.Errorf("netlink bind: %w", err)
	}
	return &rtnl{fd: fd}, nil
}

func (r *rtnl) Close() error { return unix.Close(r.fd) }

// attr appends a route attribute (type, value), padded to 4 bytes.
func attr(b []byte, typ uint16, v []byte) []byte {
	n := unix.SizeofRtAttr + len(v)
	b = binary.NativeEndian.AppendUint16(b, uint16(n)) //nolint:gosec // attributes are a few bytes
	b = binary.NativeEndian.AppendUint16(b, typ)
	b = append(b, v...)
	for len(b)%4 != 0 {
		b = append(b, 0)
	}
	return b
}

// do sends one request and waits for its acknowledgement.
func (r *rtnl) do(typ uint16, flags uint16, body []byte) error {
	r.seq++
	msg := make([]byte, 0, unix.SizeofNlMsghdr+len(body))
	msg = binary.NativeEndian.AppendUint32(msg, uint32(unix.SizeofNlMsghdr+len(body))) //nolint:gosec // small
	msg = binary.NativeEndian.AppendUint16(msg, typ)
	msg = binary.NativeEndian.AppendUint16(msg, flags|unix.NLM_F_REQUEST|unix.NLM_F_ACK)
	msg = binary.NativeEndian.AppendUint32(msg, r.seq)
	msg = binary.NativeEndian.AppendUint32(msg, 0)
	msg = append(msg, body...)
	if err := unix.Sendto(r.fd, msg, 0, &unix.SockaddrNetlink{Family: unix.AF_NETLINK}); err != nil {
		return err
	}
	buf := make([]byte, os.Getpagesize())
	for {
		n, _, err := unix.Recvfrom(r.fd, buf, 0)
		if err != nil {
			return err
		}
		for b := buf[:n]; len(b) >= unix.SizeofNlMsghdr; {
			l := int(binary.NativeEndian.Uint32(b))
			typ, seq := binary.NativeEndian.Uint16(b[4:]), binary.NativeEndian.Uint32(b[8:])
			if l < unix.SizeofNlMsghdr || l > len(b) {
				return fmt.Errorf("netlink: malformed answer")
			}
			data := b[unix.SizeofNlMsghdr:l]
			if seq == r.seq && typ == unix.NLMSG_ERROR && len(data) >= 4 {
				// nlmsgerr.error: 0 or a negated errno.
				if errno := -int32(binary.NativeEndian.Uint32(data)); errno > 0 { //nolint:gosec // a signed field
					return unix.Errno(uint32(errno))
				}
				return nil
			}
			b = b[min((l+3)&^3, len(b)):]
		}
	}
}

// linkUp sets IFF_UP on an interface.
func (r *rtnl) linkUp(index int) error {
	b := make([]byte, 0, unix.SizeofIfInfomsg)
	b = append(b, unix.AF_UNSPEC, 0)
	b = binary.NativeEndian.AppendUint16(b, 0)
	b = binary.NativeEndian.AppendUint32(b, uint32(index)) //nolint:gosec // interface index
	b = binary.NativeEndian.AppendUint32(b, unix.IFF_UP)
	b = binary.NativeEndian.AppendUint32(b, unix.IFF_UP)
	if err := r.do(unix.RTM_NEWLINK, 0, b); err != nil {
		return fmt.Errorf("setting link %d up: %w", index, err)
	}
	return nil
}

// addAddr adds (or replaces) an IPv4 address with its prefix length on an interface.
func (r *rtnl) addAddr(index int, p netip.Prefix) error {
	a := p.Addr().As4()
	b := []byte{unix.AF_INET, byte(p.Bits()), 0, unix.RT_SCOPE_UNIVERSE} //nolint:gosec // 0..32
	b = binary.NativeEndian.AppendUint32(b, uint32(index))               //nolint:gosec // interface index
	b = attr(b, unix.IFA_LOCAL, a[:])
	b = attr(b, unix.IFA_ADDRESS, a[:])
	if p.Bits() < 31 {
		bc := a
		for i := p.Bits(); i < 32; i++ {
			bc[i/8] |= 0x80 >> (i % 8)
		}
		b = attr(b, unix.IFA_BROADCAST, bc[:])
	}
	if err := r.do(unix.RTM_NEWADDR, unix.NLM_F_CREATE|unix.NLM_F_REPLACE, b); err != nil {
		return fmt.Errorf("adding address %s: %w", p, err)
	}
	return nil
}

// addDefaultRoute adds a default route through gw on an interface.
func (r *rtnl) addDefaultRoute(index int, gw netip.Addr) error {
	g := gw.As4()
	b := []byte{unix.AF_INET, 0, 0, 0, unix.RT_TABLE_MAIN, unix.RTPROT_BOOT, unix.RT_SCOPE_UNIVERSE, unix.RTN_UNICAST}
	b = binary.NativeEndian.AppendUint32(b, 0)
	b = attr(b, unix.RTA_GATEWAY, g[:])
	b = attr(b, unix.RTA_OIF, binary.NativeEndian.AppendUint32(nil, uint32(index))) //nolint:gosec // interface index
	if err := r.do(unix.RTM_NEWROUTE, unix.NLM_F_CREATE|unix.NLM_F_REPLACE, b); err != nil {
		return fmt.Errorf("adding default route via %s: %w", gw, err)
	}
	return nil
}
