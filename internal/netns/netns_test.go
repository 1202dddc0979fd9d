package netns_test

import (
	"context"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/anvil-metal/cluster-api-provider-anvil/internal/netns"
)

func TestPairReachesOnlyItself(t *testing.T) {
	t.Parallel()
	a, b := netns.NewPair(t,
		netns.HostConfig{Addr: netip.MustParsePrefix("198.18.7.1/24")},
		netns.HostConfig{Addr: netip.MustParsePrefix("198.18.7.2/24"), MAC: net.HardwareAddr{0x02, 0, 0, 0, 0, 0x42}})
	if b.MAC.String() != "02:00:00:00:00:42" {
		t.Fatalf("MAC = %s", b.MAC)
	}
	if len(a.MAC) != 6 {
		t.Fatalf("kernel MAC = %v", a.MAC)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()

	// A UDP socket opened by Do lives in a's namespace: b can reach it at a's address.
	var conn net.PacketConn
	if err := a.Do(func() (err error) {
		conn, err = net.ListenPacket("udp4", "198.18.7.1:9999")
		return err
	}); err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	if err := b.Do(func() error {
		c, err := net.Dial("udp4", "198.18.7.1:9999")
		if err != nil {
			return err
		}
		defer c.Close()
		_, err = c.Write([]byte("hi"))
		return err
	}); err != nil {
		t.Fatal(err)
	}
	// Command runs inside the namespace too.
	out, err := b.Run(ctx, "ip", "-4", "-o", "addr", "show", "dev", b.Link)
	if err != nil || !strings.Contains(string(out), "198.18.7.2/24") {
		t.Fatalf("ip addr in b: %v %s", err, out)
	}
	_ = conn.SetReadDeadline(time.Now().Add(5 * time.Second))
	buf := make([]byte, 16)
	n, from, err := conn.ReadFrom(buf)
	if err != nil {
		t.Fatal(err)
	}
	if strings.TrimSpace(string(buf[:n])) != "hi" || !strings.HasPrefix(from.String(), "198.18.7.2:") {
		t.Fatalf("got %q from %v", buf[:n], from)
	}

	// The test process's own namespace has no such address.
	if l, err := net.ListenPacket("udp4", "198.18.7.1:0"); err == nil {
		l.Close()
		t.Fatal("address of the test namespace leaked into the root namespace")
	}
}

func TestLANBroadcastReachesAllHosts(t *testing.T) {
	t.Parallel()
	hosts := netns.NewLAN(t,
		netns.HostConfig{Addr: netip.MustParsePrefix("198.18.8.1/24")},
		netns.HostConfig{Addr: netip.MustParsePrefix("198.18.8.2/24")},
		netns.HostConfig{})
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if _, err := hosts[1].Run(ctx, "busybox", "ping", "-c1", "-W2", "198.18.8.1"); err != nil {
		t.Fatal(err)
	}
	if hosts[2].Addr.IsValid() {
		t.Fatal("third host should be unconfigured")
	}
}

func TestCleanupDeletesNamespaces(t *testing.T) {
	t.Parallel()
	var name string
	t.Run("inner", func(t *testing.T) {
		name = netns.New(t).Name
		if _, err := os.Stat(filepath.Join("/run/netns", name)); err != nil {
			t.Fatal(err)
		}
	})
	if name == "" {
		t.Skip("namespaces unavailable")
	}
	if _, err := os.Stat(filepath.Join("/run/netns", name)); !os.IsNotExist(err) {
		t.Fatalf("namespace %s still exists after its test: %v", name, err)
	}
}

// A connection DialContext opens leaves from the namespace: it reaches a listener on the
// pair's other side, which the process's own namespace cannot reach.
func TestDialContextLeavesFromTheNamespace(t *testing.T) {
	t.Parallel()
	a, b := netns.NewPair(t,
		netns.HostConfig{Addr: netip.MustParsePrefix("198.18.9.1/24")},
		netns.HostConfig{Addr: netip.MustParsePrefix("198.18.9.2/24")})
	var l net.Listener
	if err := a.Do(func() (err error) {
		l, err = net.Listen("tcp4", "198.18.9.1:0")
		return err
	}); err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	accepted := make(chan string, 1)
	go func() {
		c, err := l.Accept()
		if err != nil {
			accepted <- err.Error()
			return
		}
		accepted <- c.RemoteAddr().(*net.TCPAddr).IP.String()
		_ = c.Close()
	}()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if c, err := (&net.Dialer{Timeout: time.Second}).DialContext(ctx, "tcp4", l.Addr().String()); err == nil {
		_ = c.Close()
		t.Fatalf("the process's own namespace reached %s", l.Addr())
	}
	c, err := b.DialContext(ctx, "tcp4", l.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if got := <-accepted; got != "198.18.9.2" {
		t.Fatalf("accepted from %s, want 198.18.9.2", got)
	}
}
