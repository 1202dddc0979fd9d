package dhcp

import (
	"fmt"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
	"testing"
)

func macN(i int) net.HardwareAddr {
	return net.HardwareAddr{0x02, 0x10, byte(i >> 24), byte(i >> 16), byte(i >> 8), byte(i)}
}

// 100,000 hosts, replaced wholesale and then changed one by one while readers look them up:
// no cap, no torn reads, and lookups never see a host that was never set.
func TestMemoryHostsAtScale(t *testing.T) {
	t.Parallel()
	const n = 100_000
	h := NewMemoryHosts()
	all := make(map[string]Host, n)
	for i := range n {
		all[macN(i).String()] = Host{Name: fmt.Sprint("h", i), IP: netip.PrefixFrom(netip.AddrFrom4([4]byte{10, byte(i >> 16), byte(i >> 8), byte(i)}), 8)}
	}
	must(t, h.Replace(all))
	if h.Len() != n {
		t.Fatalf("Len %d", h.Len())
	}
	for _, i := range []int{0, 1, n / 2, n - 1} {
		got, ok := h.Lookup(macN(i))
		if !ok || got.Name != fmt.Sprint("h", i) {
			t.Fatalf("host %d: %+v %v", i, got, ok)
		}
	}
	if _, ok := h.Lookup(macN(n)); ok {
		t.Fatal("found a host never set")
	}
	if _, ok := h.Lookup(net.HardwareAddr{1, 2, 3}); ok {
		t.Fatal("found a short MAC")
	}

	var stop atomic.Bool
	var wg sync.WaitGroup
	for r := range 2 {
		wg.Go(func() {
			for i := r; !stop.Load(); i = (i + 7919) % (n + 1000) {
				got, ok := h.Lookup(macN(i))
				if ok && got.Name != fmt.Sprint("h", i) && got.Name != fmt.Sprint("new", i) {
					t.Errorf("torn read for %d: %+v", i, got)
					return
				}
				if ok && i >= n && got.Name != fmt.Sprint("new", i) {
					t.Errorf("host %d never set: %+v", i, got)
					return
				}
			}
		})
	}
	for i := range 300 {
		must(t, h.Set(macN(n+i%1000), Host{Name: fmt.Sprint("new", n+i%1000)}))
		must(t, h.Set(macN(i), Host{Name: fmt.Sprint("new", i)}))
		h.Delete(macN(n + (i+500)%1000))
	}
	stop.Store(true)
	wg.Wait()
	if err := h.Set(net.HardwareAddr{1}, Host{}); err == nil {
		t.Fatal("short MAC accepted")
	}
	if err := h.Replace(map[string]Host{"not-a-mac": {}}); err == nil {
		t.Fatal("bad MAC accepted")
	}
}

func TestMemoryHostsCopiesDNS(t *testing.T) {
	h := NewMemoryHosts()
	dns := []netip.Addr{netip.MustParseAddr("198.18.0.53")}
	must(t, h.Set(knownMAC, Host{DNS: dns}))
	dns[0] = netip.MustParseAddr("198.18.0.99")
	got, _ := h.Lookup(knownMAC)
	if got.DNS[0] != netip.MustParseAddr("198.18.0.53") {
		t.Fatal("caller's slice aliased")
	}
}

func TestLabHosts(t *testing.T) {
	l, err := NewLabHosts(net.HardwareAddr{2, 0, 0, 0, 0xff, 0xfe}, 1000, netip.MustParseAddr("198.18.1.250"), 15,
		Host{BootEnabled: true, Gateway: netip.MustParseAddr("198.18.0.1")})
	must(t, err)
	cases := map[string]string{
		"02:00:00:00:ff:fe": "198.18.1.250/15",
		"02:00:00:00:ff:ff": "198.18.1.251/15",
		"02:00:00:01:00:05": "198.18.2.1/15", // MAC and address both carry into the next byte
		"02:00:00:01:03:e5": "198.18.5.225/15",
	}
	for mac, want := range cases {
		h, ok := l.Lookup(must2(net.ParseMAC(mac)))
		if !ok || h.IP.String() != want || !h.BootEnabled {
			t.Errorf("%s: %+v %v, want %s", mac, h, ok, want)
		}
	}
	for _, mac := range []string{"02:00:00:00:ff:fd", "02:00:00:01:03:e6", "03:00:00:00:ff:fe"} {
		if _, ok := l.Lookup(must2(net.ParseMAC(mac))); ok {
			t.Errorf("%s reserved", mac)
		}
	}
	if _, err := NewLabHosts(net.HardwareAddr{2, 0, 0, 0, 0, 0}, 10, netip.MustParseAddr("255.255.255.250"), 24, Host{}); err == nil {
		t.Error("pool past 255.255.255.255 accepted")
	}
	if _, err := NewLabHosts(net.HardwareAddr{2, 0, 0, 0, 0, 0}, 10, netip.MustParseAddr("::1"), 24, Host{}); err == nil {
		t.Error("IPv6 pool accepted")
	}
}

func must2[T any](v T, err error) T {
	if err != nil {
		panic(err)
	}
	return v
}
