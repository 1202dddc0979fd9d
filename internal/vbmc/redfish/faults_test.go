package redfish

import (
	"crypto/tls"
	"errors"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/stmcginnis/gofish"
)

func TestFaultLatency(t *testing.T) {
	s, b := startBMC(t, ServerOptions{}, BMCOptions{})
	c := newClient(t, s, b)
	const latency = 500 * time.Millisecond
	b.SetFaults(Faults{Latency: latency})
	start := time.Now()
	c.mustGet(systemPath)
	if d := time.Since(start); d < latency {
		t.Fatalf("answered in %v despite %v latency", d, latency)
	}
	b.SetFaults(Faults{})
	start = time.Now()
	c.mustGet(systemPath)
	if d := time.Since(start); d >= latency {
		t.Fatalf("still slow after clearing: %v", d)
	}
}

func TestFaultUnavailableWithRetryAfter(t *testing.T) {
	s, b := startBMC(t, ServerOptions{}, BMCOptions{})
	c := newClient(t, s, b)
	b.SetFaults(Faults{Unavailable: true, RetryAfter: 1500 * time.Millisecond})
	for _, r := range []response{
		c.do("GET", systemPath, nil),
		c.do("POST", sessionsPath, map[string]string{"UserName": "admin", "Password": "password"}),
	} {
		expectStatus(t, r, http.StatusServiceUnavailable, "ServiceTemporarilyUnavailable")
		if got := r.header.Get("Retry-After"); got != "2" {
			t.Fatalf("Retry-After %q, want 2 (1.5 s rounded up)", got)
		}
	}
	b.SetFaults(Faults{})
	c.mustGet(systemPath)
}

func TestFaultErrorRate(t *testing.T) {
	s, b := startBMC(t, ServerOptions{}, BMCOptions{})
	c := newClient(t, s, b)
	b.SetFaults(Faults{ErrorRate: 1})
	expectStatus(t, c.do("GET", systemPath, nil), http.StatusInternalServerError, "InternalError")
	b.SetFaults(Faults{ErrorRate: 0.5})
	failed := 0
	const n = 200
	for range n {
		if c.do("GET", "/redfish/v1", nil).status == http.StatusInternalServerError {
			failed++
		}
	}
	// Binomial(200, 0.5): outside 60..140 happens with probability below 1e-8.
	if failed < 60 || failed > 140 {
		t.Fatalf("%d of %d failed at rate 0.5", failed, n)
	}
}

func TestFaultHang(t *testing.T) {
	s, b := startBMC(t, ServerOptions{}, BMCOptions{})
	c := newClient(t, s, b)
	b.SetFaults(Faults{Hang: true})

	// A client with a timeout gives up.
	impatient := &http.Client{Timeout: 300 * time.Millisecond}
	start := time.Now()
	resp, err := impatient.Get(b.URL() + "/redfish/v1")
	if err == nil {
		resp.Body.Close()
	}
	var timeout interface{ Timeout() bool }
	if err == nil || !errors.As(err, &timeout) || !timeout.Timeout() {
		t.Fatalf("hanging BMC answered or failed otherwise: %v", err)
	}
	if d := time.Since(start); d < 300*time.Millisecond {
		t.Fatalf("gave up after %v", d)
	}

	// A patient one gets its answer once the hang is cleared.
	done := make(chan int, 1)
	go func() {
		resp, err := http.Get(b.URL() + "/redfish/v1")
		if err != nil {
			done <- 0
			return
		}
		resp.Body.Close()
		done <- resp.StatusCode
	}()
	select {
	case code := <-done:
		t.Fatalf("answered %d while hanging", code)
	case <-time.After(200 * time.Millisecond):
	}
	b.SetFaults(Faults{})
	select {
	case code := <-done:
		if code != http.StatusOK {
			t.Fatalf("released request got %d", code)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("request still held after clearing Hang")
	}
	c.mustGet(systemPath)

	// Closing the BMC cuts hanging requests off.
	b.SetFaults(Faults{Hang: true})
	go func() {
		resp, err := http.Get(b.URL() + "/redfish/v1")
		if err == nil {
			resp.Body.Close()
			done <- resp.StatusCode
			return
		}
		done <- 0
	}()
	time.Sleep(100 * time.Millisecond)
	b.Close()
	select {
	case code := <-done:
		if code != 0 {
			t.Fatalf("closed BMC answered %d", code)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("Close left a hanging request")
	}
}

// TestDroppedSessions: a BMC that forgets its sessions (reboot, fault) answers
// 401 to old tokens, and logging in again works.
func TestDroppedSessions(t *testing.T) {
	s, b := startBMC(t, ServerOptions{TLS: true}, BMCOptions{})
	httpClient := &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: s.CertPool()}}}
	connect := func() *gofish.APIClient {
		api, err := gofish.Connect(gofish.ClientConfig{Endpoint: b.URL(), Username: "admin", Password: "password", HTTPClient: httpClient})
		if err != nil {
			t.Fatal(err)
		}
		return api
	}
	api := connect()
	if _, err := api.Service.Systems(); err != nil {
		t.Fatal(err)
	}
	if n := b.DropSessions(); n != 1 {
		t.Fatalf("dropped %d sessions", n)
	}
	if _, err := api.Service.Systems(); err == nil || !strings.Contains(err.Error(), "401") {
		t.Fatalf("old token: %v, want 401", err)
	}
	api = connect()
	if _, err := api.Service.Systems(); err != nil {
		t.Fatalf("after re-login: %v", err)
	}
	// Manager.Reset reboots the BMC: sessions go too.
	c := newClient(t, s, b)
	expectStatus(t, c.do("POST", "/redfish/v1/Managers/1/Actions/Manager.Reset", map[string]string{"ResetType": "GracefulRestart"}), http.StatusNoContent)
	if _, err := api.Service.Systems(); err == nil {
		t.Fatal("session survived a BMC reset")
	}
}

func TestRequestCounts(t *testing.T) {
	s, b := startBMC(t, ServerOptions{}, BMCOptions{})
	c := newClient(t, s, b)
	c.mustGet("/redfish/v1")
	c.mustGet(systemPath)
	c.do("PATCH", systemPath, map[string]any{"Boot": map[string]any{"BootSourceOverrideTarget": "Hdd"}})
	c.do("POST", systemPath+"/Actions/ComputerSystem.Reset", map[string]string{"ResetType": "On"})
	login := c.do("POST", sessionsPath, map[string]string{"UserName": "admin", "Password": "password"})
	c.do("DELETE", login.header.Get("Location"), nil)
	b.SetFaults(Faults{Unavailable: true}) // failed requests count too
	c.do("GET", systemPath, nil)
	c.do("PUT", systemPath, []byte("{}"))
	want := RequestCounts{Get: 3, Post: 2, Patch: 1, Delete: 1, Other: 1}
	if got := b.Requests(); got != want || got.Total() != 8 {
		t.Fatalf("counts %+v (total %d), want %+v", got, got.Total(), want)
	}
}
