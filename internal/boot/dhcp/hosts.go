package dhcp

import (
	"encoding/binary"
	"fmt"
	"net"
	"net/netip"
	"slices"
	"sync"
	"sync/atomic"
)

// Host is what the DHCP server knows about one machine, found by its boot MAC.
type Host struct {
	// Name and Namespace of the AnvilHost, for logs and script URL templates.
	Name, Namespace string
	// IP is the reserved address with its prefix length (reservation mode). netip types are
	// values: a lookup copies them without allocating and nobody can alias them.
	IP netip.Prefix
	// Gateway and DNS are handed out with the address when set.
	Gateway netip.Addr
	DNS     []netip.Addr
	// BootEnabled says Anvil expects this host to network-boot now (it has just power-cycled
	// it into PXE). Without it the host gets its address but no boot file, and a proxy server
	// does not answer it at all, so its firmware falls through to the disk.
	BootEnabled bool
	// ScriptURL is the iPXE script for this host; empty uses Config.ScriptURL.
	ScriptURL string
}

// Hosts finds hosts by MAC. Lookup is on every request's path: implementations must be safe
// for concurrent use and should neither block nor allocate. The server never modifies what
// it gets back.
type Hosts interface {
	Lookup(mac net.HardwareAddr) (Host, bool)
}

// macKey packs an Ethernet MAC into an integer: a map key that needs no allocation.
func macKey(mac net.HardwareAddr) (uint64, bool) {
	if len(mac) != 6 {
		return 0, false
	}
	return uint64(mac[0])<<40 | uint64(mac[1])<<32 | uint64(mac[2])<<24 |
		uint64(mac[3])<<16 | uint64(mac[4])<<8 | uint64(mac[5]), true
}

const shardBits = 8

// MemoryHosts is an in-memory Hosts for tests and for the manager to fill from AnvilHosts.
//
// Reads are lock-free: each of 256 shards publishes an immutable map through an atomic
// pointer, and a writer copies its shard's map, changes the copy and swaps it in. A write
// costs a copy of 1/256 of the hosts (about 400 entries at 100,000 hosts), so updates stay
// cheap at any scale while lookups never wait for them.
type MemoryHosts struct {
	shards [1 << shardBits]hostShard
}

type hostShard struct {
	mu sync.Mutex // serialises writers of this shard only
	m  atomic.Pointer[map[uint64]Host]
}

// NewMemoryHosts returns an empty MemoryHosts.
func NewMemoryHosts() *MemoryHosts {
	return &MemoryHosts{}
}

func shardOf(k uint64) int {
	// Fibonacci hashing spreads sequential and vendor-prefixed MACs evenly.
	return int((k * 0x9E3779B97F4A7C15) >> (64 - shardBits))
}

// Lookup implements Hosts.
func (h *MemoryHosts) Lookup(mac net.HardwareAddr) (Host, bool) {
	k, ok := macKey(mac)
	if !ok {
		return Host{}, false
	}
	m := h.shards[shardOf(k)].m.Load()
	if m == nil {
		return Host{}, false
	}
	host, ok := (*m)[k]
	return host, ok
}

// Set adds or replaces the host with this MAC.
func (h *MemoryHosts) Set(mac net.HardwareAddr, host Host) error {
	k, ok := macKey(mac)
	if !ok {
		return fmt.Errorf("not an Ethernet MAC: %v", mac)
	}
	host.DNS = slices.Clone(host.DNS) // the caller may reuse its slice
	h.update(k, func(m map[uint64]Host) { m[k] = host })
	return nil
}

// Delete forgets the host with this MAC.
func (h *MemoryHosts) Delete(mac net.HardwareAddr) {
	k, ok := macKey(mac)
	if !ok {
		return
	}
	h.update(k, func(m map[uint64]Host) { delete(m, k) })
}

func (h *MemoryHosts) update(k uint64, change func(map[uint64]Host)) {
	s := &h.shards[shardOf(k)]
	s.mu.Lock()
	defer s.mu.Unlock()
	var next map[uint64]Host
	if old := s.m.Load(); old != nil {
		next = make(map[uint64]Host, len(*old)+1)
		for k, v := range *old {
			next[k] = v
		}
	} else {
		next = make(map[uint64]Host, 1)
	}
	change(next)
	s.m.Store(&next)
}

// Replace swaps in a whole new set of hosts, keyed by MAC, e.g. after a full resync from the
// API server. Each shard switches atomically; lookups see either the old or the new entry.
func (h *MemoryHosts) Replace(all map[string]Host) error {
	var next [1 << shardBits]map[uint64]Host
	for s, host := range all {
		mac, err := net.ParseMAC(s)
		if err != nil {
			return err
		}
		k, ok := macKey(mac)
		if !ok {
			return fmt.Errorf("not an Ethernet MAC: %q", s)
		}
		i := shardOf(k)
		if next[i] == nil {
			next[i] = make(map[uint64]Host)
		}
		host.DNS = slices.Clone(host.DNS)
		next[i][k] = host
	}
	for i := range h.shards {
		s := &h.shards[i]
		s.mu.Lock()
		if next[i] == nil {
			s.m.Store(nil)
		} else {
			m := next[i]
			s.m.Store(&m)
		}
		s.mu.Unlock()
	}
	return nil
}

// Len counts the hosts (not atomically across shards; for metrics and tests).
func (h *MemoryHosts) Len() int {
	n := 0
	for i := range h.shards {
		if m := h.shards[i].m.Load(); m != nil {
			n += len(*m)
		}
	}
	return n
}

// LabHosts reserves an address for every MAC in a contiguous block, without a table: MAC
// base+i gets the i-th address of the pool. It stands in for a fleet of emulated hosts, and for
// load generators such as perfdhcp, whose simulated clients count up from a base MAC.
type LabHosts struct {
	base, count, start uint64
	bits               int
	template           Host
}

// NewLabHosts reserves count MACs starting at base, handing MAC base+i the address first+i
// with prefix length bits. Other fields of template (gateway, DNS, boot) apply to every host.
func NewLabHosts(base net.HardwareAddr, count int, first netip.Addr, bits int, template Host) (*LabHosts, error) {
	k, ok := macKey(base)
	if !ok {
		return nil, fmt.Errorf("not an Ethernet MAC: %v", base)
	}
	if !first.Is4() || bits < 1 || bits > 32 {
		return nil, fmt.Errorf("need an IPv4 pool start and prefix length, got %v/%d", first, bits)
	}
	f := first.As4()
	start := uint64(f[0])<<24 | uint64(f[1])<<16 | uint64(f[2])<<8 | uint64(f[3])
	if count < 1 || start+uint64(count) > 1<<32 || k+uint64(count) > 1<<48 {
		return nil, fmt.Errorf("pool of %d hosts does not fit", count)
	}
	template.DNS = slices.Clone(template.DNS)
	return &LabHosts{base: k, count: uint64(count), start: start, bits: bits, template: template}, nil
}

// Lookup implements Hosts.
func (l *LabHosts) Lookup(mac net.HardwareAddr) (Host, bool) {
	k, ok := macKey(mac)
	if !ok || k < l.base || k-l.base >= l.count {
		return Host{}, false
	}
	// start+count fits 32 bits (checked in NewLabHosts): the low four bytes are the address.
	var b [8]byte
	binary.BigEndian.PutUint64(b[:], l.start+k-l.base)
	h := l.template
	h.IP = netip.PrefixFrom(netip.AddrFrom4([4]byte(b[4:])), l.bits)
	return h, true
}
