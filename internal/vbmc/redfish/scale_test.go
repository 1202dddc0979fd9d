package redfish

import (
	"bufio"
	"bytes"
	"crypto/tls"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"
)

const fleetSize = 1000

// fleet is many BMCs in one Server and what starting them cost.
type fleet struct {
	server *Server
	bmcs   []*BMC
	client *http.Client
	// memPerBMC is the heap and goroutine stack added per BMC, measured after GC.
	memPerBMC float64
	startup   time.Duration
}

func startFleet(tb testing.TB, n int, useTLS bool) *fleet {
	tb.Helper()
	before := memInUse()
	start := time.Now()
	s, err := NewServer(ServerOptions{TLS: useTLS})
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { s.Close() })
	f := &fleet{server: s}
	mockups := Mockups()
	for i := range n {
		b, err := s.AddBMC(BMCOptions{Mockup: mockups[i%len(mockups)], Identity: NewIdentity(i),
			Hardware: Hardware{Processors: 1 + i%4, MemoryGiB: 64 << (i % 3)}})
		if err != nil {
			tb.Fatalf("BMC %d: %v", i, err)
		}
		f.bmcs = append(f.bmcs, b)
	}
	f.startup = time.Since(start)
	f.memPerBMC = float64(memInUse()-before) / float64(n)
	transport := &http.Transport{MaxIdleConnsPerHost: 1, MaxIdleConns: 2 * n, IdleConnTimeout: time.Minute}
	if useTLS {
		transport.TLSClientConfig = &tls.Config{RootCAs: s.CertPool()}
	}
	f.client = &http.Client{Transport: transport, Timeout: 30 * time.Second}
	tb.Cleanup(transport.CloseIdleConnections)
	return f
}

// memInUse is heap plus goroutine stacks in use, after a GC.
func memInUse() uint64 {
	runtime.GC()
	var m runtime.MemStats
	runtime.ReadMemStats(&m)
	return m.HeapInuse + m.StackInuse
}

// session does what a controller's BMC poll does: log in, read the system, log out.
func (f *fleet) session(b *BMC) error {
	body := []byte(`{"UserName":"admin","Password":"password"}`)
	resp, err := f.client.Post(b.URL()+sessionsPath, "application/json", bytes.NewReader(body))
	if err != nil {
		return err
	}
	drain(resp)
	if resp.StatusCode != http.StatusCreated {
		return fmt.Errorf("login: %d", resp.StatusCode)
	}
	token, location := resp.Header.Get("X-Auth-Token"), resp.Header.Get("Location")

	req, _ := http.NewRequest(http.MethodGet, b.URL()+systemPath, nil)
	req.Header.Set("X-Auth-Token", token)
	resp, err = f.client.Do(req)
	if err != nil {
		return err
	}
	var sys struct{ PowerState, SerialNumber string }
	err = json.NewDecoder(resp.Body).Decode(&sys)
	drain(resp)
	if err != nil {
		return fmt.Errorf("get system: %w", err)
	}
	if resp.StatusCode != http.StatusOK || sys.PowerState == "" {
		return fmt.Errorf("get system: %d, power state %q", resp.StatusCode, sys.PowerState)
	}

	req, _ = http.NewRequest(http.MethodDelete, b.URL()+location, nil)
	req.Header.Set("X-Auth-Token", token)
	resp, err = f.client.Do(req)
	if err != nil {
		return err
	}
	drain(resp)
	if resp.StatusCode != http.StatusNoContent {
		return fmt.Errorf("logout: %d", resp.StatusCode)
	}
	return nil
}

func drain(resp *http.Response) {
	_, _ = io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
}

// sweep runs one session against every BMC with a few workers.
func (f *fleet) sweep(workers int) error {
	work := make(chan *BMC)
	errs := make(chan error, len(f.bmcs))
	var wg sync.WaitGroup
	for range workers {
		wg.Go(func() {
			for b := range work {
				if err := f.session(b); err != nil {
					errs <- fmt.Errorf("%s: %w", b.URL(), err)
				}
			}
		})
	}
	for _, b := range f.bmcs {
		work <- b
	}
	close(work)
	wg.Wait()
	close(errs)
	return <-errs
}

// TestThousandBMCsAreCheap starts 1,000 BMCs in one process, talks to each,
// and checks that each costs little memory: the mockup trees are shared.
func TestThousandBMCsAreCheap(t *testing.T) {
	if testing.Short() {
		t.Skip("starts 1,000 BMCs")
	}
	f := startFleet(t, fleetSize, false)
	if err := f.sweep(8); err != nil {
		t.Fatal(err)
	}
	for i, b := range f.bmcs {
		if b.Requests().Total() != 3 || b.Sessions() != 0 {
			t.Fatalf("BMC %d: %+v requests, %d sessions", i, b.Requests(), b.Sessions())
		}
	}
	t.Logf("%d BMCs: started in %v, %.1f KiB each (heap + stacks)", fleetSize, f.startup, f.memPerBMC/1024)
	// A BMC is a listener, its accept goroutine and a few small maps. The
	// bound leaves room for the race detector's larger stacks.
	if limit := 64.0 * 1024; f.memPerBMC > limit {
		t.Fatalf("%.0f bytes per BMC, want under %.0f", f.memPerBMC, limit)
	}
}

// BenchmarkThousandBMCs: 1,000 HTTPS BMCs in one process; each op is one
// login + GET system + logout against the next BMC in turn.
func BenchmarkThousandBMCs(b *testing.B) {
	f := startFleet(b, fleetSize, true)
	if err := f.sweep(8); err != nil { // every BMC answers, connections are warm
		b.Fatal(err)
	}
	afterSweep := memInUse()
	b.ReportAllocs()
	i := 0
	for b.Loop() {
		if err := f.session(f.bmcs[i%fleetSize]); err != nil {
			b.Fatal(err)
		}
		i++
	}
	b.StopTimer()
	b.ReportMetric(f.memPerBMC/1024, "KiB/bmc")
	b.ReportMetric(float64(afterSweep)/(1<<20), "MiB-inuse-with-1000-conns")
	b.ReportMetric(float64(f.startup.Milliseconds()), "ms-startup")
	if rss, ok := procStatus("VmRSS"); ok {
		b.ReportMetric(float64(rss)/1024, "MiB-rss")
	}
	b.ReportMetric(float64(runtime.NumGoroutine())/fleetSize, "goroutines/bmc")
}

// procStatus reads a kB value from /proc/self/status (Linux only).
func procStatus(field string) (kib int64, ok bool) {
	file, err := os.Open("/proc/self/status")
	if err != nil {
		return 0, false
	}
	defer file.Close()
	sc := bufio.NewScanner(file)
	for sc.Scan() {
		if rest, found := strings.CutPrefix(sc.Text(), field+":"); found {
			v, err := strconv.ParseInt(strings.TrimSuffix(strings.TrimSpace(rest), " kB"), 10, 64)
			return v, err == nil
		}
	}
	return 0, false
}
