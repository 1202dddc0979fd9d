package loadgen

import (
	"context"
	"net"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/go-logr/logr"

	"github.com/anvil-metal/cluster-api-provider-anvil/internal/boot/dhcp"
	"github.com/anvil-metal/cluster-api-provider-anvil/internal/netns"
)

func must(t testing.TB, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}

var baseMAC = net.HardwareAddr{0x02, 0x10, 0, 0, 0, 0}

// TestAgainstAnvil runs clients on the link and behind a relay against Anvil's reservation
// DHCP: every client gets its own address and script URL, with no retry.
func TestAgainstAnvil(t *testing.T) {
	for _, relay := range []bool{false, true} {
		t.Run(map[bool]string{false: "link", true: "relay"}[relay], func(t *testing.T) {
			server, client := netns.NewPair(t,
				netns.HostConfig{Addr: netip.MustParsePrefix("198.18.0.1/15")},
				netns.HostConfig{Addr: netip.MustParsePrefix("198.18.0.2/15")})
			const n = 500
			hosts, err := dhcp.NewLabHosts(baseMAC, n, netip.MustParseAddr("198.18.1.0"), 15, dhcp.Host{BootEnabled: true})
			must(t, err)
			s, err := dhcp.New(dhcp.Config{Mode: dhcp.ModeReservation, Interface: server.Link, Hosts: hosts,
				ScriptURL: "http://198.18.0.1/ipxe/mac/{mac}", Log: logr.Discard()})
			must(t, err)
			must(t, server.Do(s.Listen))
			ctx, cancel := context.WithCancel(context.Background())
			done := make(chan error, 1)
			go func() { done <- s.Start(ctx) }()
			defer func() { cancel(); must(t, <-done) }()

			o := DHCPOptions{Interface: client.Link, BaseMAC: baseMAC, Clients: n, Rate: 5000}
			if relay {
				o.Relay, o.Server = netip.MustParseAddr("198.18.0.2"), netip.MustParseAddr("198.18.0.1")
			}
			got := map[int]string{}
			o.OnBound = func(i int, mac net.HardwareAddr, ip netip.Addr, bootfile string) {
				got[i] = mac.String() + " " + ip.String() + " " + bootfile
			}
			// The socket is made in the namespace; the run itself may use any thread.
			var g *generator
			must(t, client.Do(func() error {
				var err error
				g, err = newGenerator(o.withDefaults())
				return err
			}))
			defer g.conn.Close()
			res, err := g.run(context.Background())
			must(t, err)
			if res.Started != n || res.Bound != n || res.Failed != 0 || res.Retransmits != 0 || res.Restarts != 0 || res.Strays != 0 {
				t.Fatalf("result %s", res)
			}
			if res.Sent != 2*n {
				t.Errorf("sent %d datagrams, want %d", res.Sent, 2*n)
			}
			if want := "02:10:00:00:01:2c 198.18.2.44 http://198.18.0.1/ipxe/mac/02:10:00:00:01:2c"; got[300] != want {
				t.Errorf("client 300 bound as %q, want %q", got[300], want)
			}
			if len(got) != n {
				t.Errorf("OnBound called for %d clients", len(got))
			}
		})
	}
}

// TestRetriesAreCounted puts the generator in front of a server that ignores each client's
// first DISCOVER and first REQUEST and NAKs its second REQUEST: every client needs two
// retransmissions and one restart, and all of them must show.
func TestRetriesAreCounted(t *testing.T) {
	server, client := netns.NewPair(t,
		netns.HostConfig{Addr: netip.MustParsePrefix("198.18.0.1/15")},
		netns.HostConfig{Addr: netip.MustParsePrefix("198.18.0.2/15")})
	var conn *net.UDPConn
	must(t, server.Do(func() error {
		var err error
		conn, err = net.ListenUDP("udp4", &net.UDPAddr{Port: 67})
		return err
	}))
	defer conn.Close()
	go grudgingServer(conn)

	const n = 20
	var res DHCPResult
	must(t, client.Do(func() error {
		g, err := newGenerator((DHCPOptions{Interface: client.Link, BaseMAC: baseMAC, Clients: n,
			Relay: netip.MustParseAddr("198.18.0.2"), Server: netip.MustParseAddr("198.18.0.1"), FirstTimeout: 500 * time.Millisecond}).withDefaults())
		if err != nil {
			return err
		}
		defer g.conn.Close()
		res, err = g.run(context.Background())
		return err
	}))
	// Per client: DISCOVER (ignored), DISCOVER, REQUEST (ignored), REQUEST (NAK), DISCOVER,
	// REQUEST (ACK).
	if res.Bound != n || res.Retransmits != 2*n || res.Naks != n || res.Restarts != n || res.Failed != 0 || res.Sent != 6*n {
		t.Fatalf("result %s (sent %d)", res, res.Sent)
	}
}

// grudgingServer answers relayed requests (to giaddr:67) after ignoring the first DISCOVER
// and the first REQUEST of each client, and NAKs its second REQUEST.
func grudgingServer(c *net.UDPConn) {
	seen := map[string]int{}
	buf := make([]byte, 1500)
	for {
		n, _, err := c.ReadFromUDP(buf)
		if err != nil {
			return
		}
		req := buf[:n]
		if n < 240 || req[0] != 1 {
			continue
		}
		var msg byte
		for o := req[240:]; len(o) >= 2 && o[0] != 255; o = o[2+int(o[1]):] {
			if o[0] == 53 {
				msg = o[2]
			}
		}
		key := string(req[28:34]) + string(msg)
		seen[key]++
		var answer byte
		switch {
		case msg == 1 && seen[key] == 1, msg == 3 && seen[key] == 1:
			continue
		case msg == 1:
			answer = 2
		case msg == 3 && seen[key] == 2:
			answer = 6
		case msg == 3:
			answer = 5
		default:
			continue
		}
		out := make([]byte, 240, 300)
		copy(out, req[:240])
		out[0] = 2
		if answer != 6 {
			copy(out[16:20], []byte{198, 18, 9, req[33]})
		}
		out = append(out, 53, 1, answer, 54, 4, 198, 18, 0, 1, 255)
		giaddr := netip.AddrFrom4([4]byte(req[24:28]))
		_, _ = c.WriteToUDPAddrPort(out, netip.AddrPortFrom(giaddr, 67))
	}
}

func TestBooterCountsRetries(t *testing.T) {
	var fails sync.Map // path -> failures left
	var kernelGets atomic.Int64
	mux := http.NewServeMux()
	var srvURL string
	mux.HandleFunc("/script", func(w http.ResponseWriter, _ *http.Request) {
		_, _ = w.Write([]byte("#!ipxe\nkernel --name vmlinuz " + srvURL + "/vmlinuz initrd=initramfs a=b\ninitrd --name initramfs " + srvURL + "/initramfs\nboot\n"))
	})
	mux.HandleFunc("/vmlinuz", func(w http.ResponseWriter, r *http.Request) {
		kernelGets.Add(1)
		if v, _ := fails.LoadOrStore(r.URL.Path, 1); v.(int) > 0 {
			fails.Store(r.URL.Path, 0)
			http.Error(w, "busy", http.StatusServiceUnavailable)
			return
		}
		_, _ = w.Write([]byte(strings.Repeat("k", 100000)))
	})
	mux.HandleFunc("/initramfs", func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Content-Length", "1000")
		_, _ = w.Write([]byte(strings.Repeat("i", 10))) // short body: the client sees an unexpected EOF
	})
	srv := httptest.NewServer(mux)
	defer srv.Close()
	srvURL = srv.URL

	b := NewBooter(BootOptions{RetryDelay: time.Millisecond})
	must(t, b.Boot(context.Background(), srv.URL+"/script"))
	r := b.Result()
	if r.Boots != 1 || r.Retries != 1 || r.Files != 2 || r.Bytes < 100000 || kernelGets.Load() != 2 {
		t.Fatalf("kernel once refused: %+v (kernel GETs %d)", r, kernelGets.Load())
	}

	withInitrd := NewBooter(BootOptions{RetryDelay: time.Millisecond, Attempts: 3, Initrd: true})
	if err := withInitrd.Boot(context.Background(), srv.URL+"/script"); err == nil || !strings.Contains(err.Error(), "/initramfs") {
		t.Fatalf("short initramfs: %v", err)
	}
	if r := withInitrd.Result(); r.Failed != 1 || r.Retries != 2 || len(r.Errors) != 1 {
		t.Fatalf("short initramfs: %+v", r)
	}
}

func TestBooterIdleTimeout(t *testing.T) {
	release := make(chan struct{})
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Content-Length", "2")
		_, _ = w.Write([]byte("x"))
		w.(http.Flusher).Flush()
		<-release // stall mid-body
	}))
	defer srv.Close()
	defer close(release)
	b := NewBooter(BootOptions{Timeout: 200 * time.Millisecond, Attempts: 1})
	start := time.Now()
	err := b.Boot(context.Background(), srv.URL+"/script")
	if err == nil || !strings.Contains(err.Error(), "no progress") || time.Since(start) > 5*time.Second {
		t.Fatalf("stalled download: %v after %v", err, time.Since(start))
	}
}

func TestScriptFiles(t *testing.T) {
	k, i := scriptFiles("#!ipxe\necho x\nkernel --name vmlinuz http://a/k x=y\ninitrd --name initramfs https://a/i\nboot\n")
	if k != "http://a/k" || i != "https://a/i" {
		t.Fatalf("%q %q", k, i)
	}
	if k, _ := scriptFiles("#!ipxe\nexit\n"); k != "" {
		t.Fatal(k)
	}
}
