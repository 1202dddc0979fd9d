package redfish

import (
	"bytes"
	"crypto/tls"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/anvil-metal/cluster-api-provider-anvil/internal/vbmc/machine"
)

// startBMC starts a Server with one BMC, both closed when the test ends.
func startBMC(t testing.TB, sopts ServerOptions, opts BMCOptions) (*Server, *BMC) {
	t.Helper()
	s, err := NewServer(sopts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	b, err := s.AddBMC(opts)
	if err != nil {
		t.Fatal(err)
	}
	return s, b
}

// client is a bare HTTP client for one BMC, to see exactly what goes over the wire.
type client struct {
	t     testing.TB
	base  string
	http  *http.Client
	user  string // Basic credentials when token is empty
	pass  string
	token string
}

func newClient(t testing.TB, s *Server, b *BMC) *client {
	c := &client{t: t, base: b.URL(), user: "admin", pass: "password", http: &http.Client{Timeout: 10 * time.Second}}
	if pool := s.CertPool(); pool != nil {
		c.http.Transport = &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool}}
	}
	return c
}

type response struct {
	status int
	header http.Header
	body   map[string]any
	raw    []byte
}

// errorIDs returns the MessageIds of a Redfish error body, without registry versions.
func (r response) errorIDs() []string {
	e, _ := r.body["error"].(map[string]any)
	info, _ := e["@Message.ExtendedInfo"].([]any)
	var ids []string
	for _, m := range info {
		id, _ := m.(map[string]any)["MessageId"].(string)
		ids = append(ids, id[strings.LastIndex(id, ".")+1:])
	}
	return ids
}

func (c *client) do(method, path string, body any, headers ...string) response {
	c.t.Helper()
	var rd io.Reader
	if body != nil {
		data, ok := body.([]byte)
		if !ok {
			var err error
			if data, err = json.Marshal(body); err != nil {
				c.t.Fatal(err)
			}
		}
		rd = bytes.NewReader(data)
	}
	req, err := http.NewRequest(method, c.base+path, rd)
	if err != nil {
		c.t.Fatal(err)
	}
	if body != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	if c.token != "" {
		req.Header.Set("X-Auth-Token", c.token)
	} else if c.user != "" {
		req.SetBasicAuth(c.user, c.pass)
	}
	for i := 0; i+1 < len(headers); i += 2 {
		req.Header.Set(headers[i], headers[i+1])
	}
	resp, err := c.http.Do(req)
	if err != nil {
		c.t.Fatalf("%s %s: %v", method, path, err)
	}
	defer resp.Body.Close()
	raw, err := io.ReadAll(resp.Body)
	if err != nil {
		c.t.Fatal(err)
	}
	r := response{status: resp.StatusCode, header: resp.Header, raw: raw}
	if len(raw) > 0 {
		if err := json.Unmarshal(raw, &r.body); err != nil {
			c.t.Fatalf("%s %s: body is not a JSON object: %v\n%s", method, path, err, raw)
		}
	}
	return r
}

func (c *client) mustGet(path string) map[string]any {
	c.t.Helper()
	r := c.do("GET", path, nil)
	if r.status != http.StatusOK {
		c.t.Fatalf("GET %s: %d %s", path, r.status, r.raw)
	}
	return r.body
}

func expectStatus(t testing.TB, r response, want int, ids ...string) {
	t.Helper()
	if r.status != want {
		t.Fatalf("status %d, want %d: %s", r.status, want, r.raw)
	}
	for _, id := range ids {
		if !slices.Contains(r.errorIDs(), id) {
			t.Fatalf("error ids %v lack %s: %s", r.errorIDs(), id, r.raw)
		}
	}
}

const systemPath = "/redfish/v1/Systems/1"

func TestAuthentication(t *testing.T) {
	s, b := startBMC(t, ServerOptions{}, BMCOptions{Username: "root", Password: "calvin"})
	c := newClient(t, s, b)
	c.user, c.pass = "", ""

	// The version document, service root and OData documents are public.
	for _, p := range []string{"/redfish", "/redfish/v1", "/redfish/v1/", "/redfish/v1/odata"} {
		expectStatus(t, c.do("GET", p, nil), http.StatusOK)
	}
	r := c.do("GET", "/redfish/v1/Systems", nil)
	expectStatus(t, r, http.StatusUnauthorized, "NoValidSession")
	if r.header.Get("WWW-Authenticate") == "" {
		t.Error("401 without WWW-Authenticate")
	}
	c.user, c.pass = "root", "wrong"
	expectStatus(t, c.do("GET", "/redfish/v1/Systems", nil), http.StatusUnauthorized)
	c.user, c.pass = "root", "calvin"
	expectStatus(t, c.do("GET", "/redfish/v1/Systems", nil), http.StatusOK)

	// Sessions: wrong password, missing fields, then a good login.
	c.user, c.pass = "", ""
	expectStatus(t, c.do("POST", sessionsPath, map[string]string{"UserName": "root", "Password": "nope"}), http.StatusUnauthorized)
	expectStatus(t, c.do("POST", sessionsPath, map[string]string{"UserName": "root"}), http.StatusBadRequest, "PropertyMissing")
	expectStatus(t, c.do("POST", sessionsPath, []byte("{")), http.StatusBadRequest, "MalformedJSON")
	login := c.do("POST", sessionsPath, map[string]string{"UserName": "root", "Password": "calvin"})
	expectStatus(t, login, http.StatusCreated)
	token, location := login.header.Get("X-Auth-Token"), login.header.Get("Location")
	if token == "" || !strings.HasPrefix(location, sessionsPath+"/") || login.body["@odata.id"] != location {
		t.Fatalf("login: token %q location %q body %s", token, location, login.raw)
	}
	if strings.Contains(string(login.raw), "calvin") {
		t.Fatal("session resource shows the password")
	}
	c.token = token
	if got := c.mustGet(location)["UserName"]; got != "root" {
		t.Fatalf("session UserName %v", got)
	}
	if n := c.mustGet(sessionsPath)["Members@odata.count"]; n != 1.0 || b.Sessions() != 1 {
		t.Fatalf("sessions: collection %v, BMC %d", n, b.Sessions())
	}
	expectStatus(t, c.do("DELETE", location, nil), http.StatusNoContent)
	expectStatus(t, c.do("GET", "/redfish/v1/Systems", nil), http.StatusUnauthorized)
	if b.Sessions() != 0 {
		t.Fatalf("%d sessions after logout", b.Sessions())
	}
}

func TestSessionsExpireAndAreCapped(t *testing.T) {
	s, b := startBMC(t, ServerOptions{}, BMCOptions{SessionTimeout: 600 * time.Millisecond, MaxSessions: 2})
	c := newClient(t, s, b)
	c.user = ""
	login := func() response {
		return c.do("POST", sessionsPath, map[string]string{"UserName": "admin", "Password": "password"})
	}
	first := login()
	expectStatus(t, first, http.StatusCreated)
	expectStatus(t, login(), http.StatusCreated)
	expectStatus(t, login(), http.StatusServiceUnavailable, "SessionLimitExceeded")

	// A session in use stays alive past the timeout; an idle one expires.
	c.token = first.header.Get("X-Auth-Token")
	for range 4 {
		time.Sleep(200 * time.Millisecond)
		expectStatus(t, c.do("GET", systemPath, nil), http.StatusOK)
	}
	if n := b.Sessions(); n != 1 {
		t.Fatalf("%d sessions, want the used one only", n)
	}
	time.Sleep(800 * time.Millisecond)
	expectStatus(t, c.do("GET", systemPath, nil), http.StatusUnauthorized)
	c.token, c.user = "", "admin"
	if got := c.mustGet("/redfish/v1/SessionService")["SessionTimeout"]; got != 0.0 {
		// 600 ms rounds down to 0 s; the property shows whole seconds.
		t.Fatalf("SessionTimeout %v", got)
	}
}

func TestResetChangesPowerState(t *testing.T) {
	s, b := startBMC(t, ServerOptions{}, BMCOptions{})
	c := newClient(t, s, b)
	reset := func(kind string) response {
		return c.do("POST", systemPath+"/Actions/ComputerSystem.Reset", map[string]string{"ResetType": kind})
	}
	power := func() string { return c.mustGet(systemPath)["PowerState"].(string) }

	if got := power(); got != "Off" {
		t.Fatalf("new server is %s, want Off", got)
	}
	expectStatus(t, reset("ForceRestart"), http.StatusConflict, "OperationNotAllowed")
	steps := []struct{ reset, want string }{
		{"On", "On"}, {"On", "On"}, {"ForceOff", "Off"}, {"ForceOff", "Off"}, {"PowerCycle", "On"},
		{"GracefulRestart", "On"}, {"ForceRestart", "On"}, {"Nmi", "On"}, {"GracefulShutdown", "Off"},
		{"PushPowerButton", "On"}, {"PushPowerButton", "Off"}, {"ForceOn", "On"},
	}
	for _, st := range steps {
		expectStatus(t, reset(st.reset), http.StatusNoContent)
		if got := power(); got != st.want {
			t.Fatalf("after %s: %s, want %s", st.reset, got, st.want)
		}
		if got := string(b.Machine().Power()); got != st.want {
			t.Fatalf("machine after %s: %s", st.reset, got)
		}
	}
	if got := c.mustGet("/redfish/v1/Chassis/1")["PowerState"]; got != "On" {
		t.Fatalf("chassis PowerState %v", got)
	}
	expectStatus(t, reset("Explode"), http.StatusBadRequest, "ActionParameterValueNotInList")
	expectStatus(t, c.do("POST", systemPath+"/Actions/ComputerSystem.Reset", map[string]any{}), http.StatusBadRequest, "ActionParameterMissing")
	expectStatus(t, c.do("POST", systemPath+"/Actions/ComputerSystem.Reset", map[string]any{"ResetType": "On", "Force": true}),
		http.StatusBadRequest, "ActionParameterUnknown")
	expectStatus(t, c.do("POST", systemPath+"/Actions/ComputerSystem.Reset", map[string]any{"ResetType": 1}),
		http.StatusBadRequest, "ActionParameterValueTypeError")
	expectStatus(t, c.do("POST", systemPath+"/Actions/Contoso.Reset", map[string]any{}), http.StatusBadRequest, "ActionNotSupported")
	expectStatus(t, c.do("POST", "/redfish/v1/Nowhere/Actions/X.Y", map[string]any{}), http.StatusNotFound)

	allowed := c.mustGet(systemPath)["Actions"].(map[string]any)["#ComputerSystem.Reset"].(map[string]any)["ResetType@Redfish.AllowableValues"]
	if !slices.Contains(allowed.([]any), "PowerCycle") {
		t.Fatalf("allowable reset types %v lack PowerCycle", allowed)
	}
}

func TestBootOverridePatch(t *testing.T) {
	s, b := startBMC(t, ServerOptions{}, BMCOptions{})
	c := newClient(t, s, b)
	boot := func() map[string]any { return c.mustGet(systemPath)["Boot"].(map[string]any) }

	r := c.do("PATCH", systemPath, map[string]any{"Boot": map[string]any{
		"BootSourceOverrideTarget": "Pxe", "BootSourceOverrideEnabled": "Once", "BootSourceOverrideMode": "UEFI"}})
	expectStatus(t, r, http.StatusOK)
	if got := r.body["Boot"].(map[string]any)["BootSourceOverrideTarget"]; got != "Pxe" {
		t.Fatalf("PATCH response shows target %v", got)
	}
	got := boot()
	if got["BootSourceOverrideTarget"] != "Pxe" || got["BootSourceOverrideEnabled"] != "Once" || got["BootSourceOverrideMode"] != "UEFI" {
		t.Fatalf("boot after PATCH: %v", got)
	}
	want := machine.BootOverride{Target: machine.BootPxe, Enabled: machine.OverrideOnce, Mode: machine.BootModeUEFI}
	if m := b.Machine().BootOverride(); m != want {
		t.Fatalf("machine override %+v", m)
	}

	// Bad requests change nothing and name every problem.
	bad := []struct {
		body any
		ids  []string
	}{
		{map[string]any{"Boot": map[string]any{"BootSourceOverrideTarget": "Floppy2"}}, []string{"PropertyValueNotInList"}},
		{map[string]any{"Boot": map[string]any{"BootSourceOverrideEnabled": "Twice", "BootSourceOverrideMode": "BIOS"}},
			[]string{"PropertyValueNotInList"}},
		{map[string]any{"Boot": map[string]any{"BootSourceOverrideTarget": 3}}, []string{"PropertyValueTypeError"}},
		{map[string]any{"Boot": "Pxe"}, []string{"PropertyValueTypeError"}},
		{map[string]any{"Boot": map[string]any{"BootSourceOverrideTarget": "Hdd", "Colour": "blue"}}, []string{"PropertyUnknown"}},
		{map[string]any{"Boot": map[string]any{"BootSourceOverrideTarget": "Hdd"}, "Flavour": "x"}, []string{"PropertyUnknown"}},
		{map[string]any{"PowerState": "On"}, []string{"PropertyNotWritable"}},
		{[]byte(`{"Boot": `), []string{"MalformedJSON"}},
	}
	for _, tc := range bad {
		r := c.do("PATCH", systemPath, tc.body)
		expectStatus(t, r, http.StatusBadRequest, tc.ids...)
		if m := b.Machine().BootOverride(); m != want {
			t.Fatalf("PATCH %v changed the override to %+v", tc.body, m)
		}
	}
	r = c.do("PATCH", systemPath, map[string]any{"Boot": map[string]any{"BootSourceOverrideEnabled": "Twice", "BootSourceOverrideMode": "BIOS"}})
	if len(r.errorIDs()) != 2 {
		t.Fatalf("want both problems reported: %s", r.raw)
	}

	// ETags: stale If-Match fails, the current one works, If-None-Match gives 304.
	first := c.do("GET", systemPath, nil)
	etag := first.header.Get("ETag")
	if etag == "" {
		t.Fatal("no ETag")
	}
	expectStatus(t, c.do("GET", systemPath, nil, "If-None-Match", etag), http.StatusNotModified)
	expectStatus(t, c.do("PATCH", systemPath, map[string]any{"Boot": map[string]any{"BootSourceOverrideTarget": "Hdd"}}, "If-Match", etag), http.StatusOK)
	expectStatus(t, c.do("PATCH", systemPath, map[string]any{"Boot": map[string]any{"BootSourceOverrideTarget": "Cd"}}, "If-Match", etag),
		http.StatusPreconditionFailed, "PreconditionFailed")
	now := c.do("GET", systemPath, nil).header.Get("ETag")
	if now == etag {
		t.Fatal("ETag did not change with the resource")
	}
	// Unquoted, as gofish sends with StripEtagQuotes, and annotations in the body.
	expectStatus(t, c.do("PATCH", systemPath, map[string]any{"@odata.etag": now, "Boot": map[string]any{
		"BootSourceOverrideTarget": "UefiHttp", "HttpBootUri": "http://10.0.0.1/boot.efi", "BootSourceOverrideEnabled": "Continuous"}},
		"If-Match", strings.Trim(now, `"`)), http.StatusOK)
	if got := boot(); got["HttpBootUri"] != "http://10.0.0.1/boot.efi" || got["BootSourceOverrideTarget"] != "UefiHttp" {
		t.Fatalf("boot %v", got)
	}
	// PATCH elsewhere is not allowed.
	r = c.do("PATCH", "/redfish/v1/Managers/1", map[string]any{"DateTime": "now"})
	expectStatus(t, r, http.StatusMethodNotAllowed)
	if r.header.Get("Allow") == "" {
		t.Error("405 without Allow")
	}
}

func TestBootOverrideOnceIsConsumedByBoot(t *testing.T) {
	m := machine.New(machine.Config{})
	s, b := startBMC(t, ServerOptions{}, BMCOptions{Machine: m})
	c := newClient(t, s, b)
	events := make(chan machine.Event, 16)
	defer m.Subscribe(func(e machine.Event) { events <- e })()
	next := func(kind machine.EventKind) machine.Event {
		t.Helper()
		for {
			select {
			case e := <-events:
				if e.Kind == kind {
					return e
				}
			case <-time.After(5 * time.Second):
				t.Fatalf("no %s event", kind)
			}
		}
	}
	expectStatus(t, c.do("PATCH", systemPath, map[string]any{"Boot": map[string]any{"BootSourceOverrideTarget": "Pxe", "BootSourceOverrideEnabled": "Once"}}), http.StatusOK)
	if e := next(machine.EventBootOverrideChanged); e.Boot.Target != machine.BootPxe {
		t.Fatalf("override event %+v", e)
	}
	expectStatus(t, c.do("POST", systemPath+"/Actions/ComputerSystem.Reset", map[string]string{"ResetType": "On"}), http.StatusNoContent)
	if e := next(machine.EventBoot); e.Boot.Target != machine.BootPxe || e.Boot.Enabled != machine.OverrideOnce || e.Reset != machine.ResetOn {
		t.Fatalf("first boot %+v, want PXE once", e)
	}
	if got := c.mustGet(systemPath)["Boot"].(map[string]any)["BootSourceOverrideEnabled"]; got != "Disabled" {
		t.Fatalf("override after boot: %v, want Disabled", got)
	}
	expectStatus(t, c.do("POST", systemPath+"/Actions/ComputerSystem.Reset", map[string]string{"ResetType": "ForceRestart"}), http.StatusNoContent)
	if e := next(machine.EventBoot); e.Boot.Target != machine.BootNone {
		t.Fatalf("second boot %+v, want the normal order", e)
	}
}

func TestVirtualMedia(t *testing.T) {
	for _, mk := range Mockups() {
		t.Run(string(mk), func(t *testing.T) {
			s, b := startBMC(t, ServerOptions{}, BMCOptions{Mockup: mk})
			c := newClient(t, s, b)
			// Clients find virtual media under the manager.
			coll := c.mustGet(c.mustGet("/redfish/v1/Managers/1")["VirtualMedia"].(map[string]any)["@odata.id"].(string))
			var cd string
			for _, m := range coll["Members"].([]any) {
				if p := m.(map[string]any)["@odata.id"].(string); strings.HasSuffix(p, "/CD1") {
					cd = p
				}
			}
			if cd == "" {
				t.Fatalf("no CD1 in %v", coll)
			}
			vm := c.mustGet(cd)
			if vm["Inserted"] != false || vm["Image"] != nil {
				t.Fatalf("new server has media: %v", vm)
			}
			actions := vm["Actions"].(map[string]any)
			insert := actions["#VirtualMedia.InsertMedia"].(map[string]any)["target"].(string)
			eject := actions["#VirtualMedia.EjectMedia"].(map[string]any)["target"].(string)

			expectStatus(t, c.do("POST", insert, map[string]any{"Image": "ftp//nohost"}), http.StatusBadRequest, "ActionParameterValueFormatError")
			expectStatus(t, c.do("POST", insert, map[string]any{}), http.StatusBadRequest, "ActionParameterMissing")
			expectStatus(t, c.do("POST", insert, map[string]any{"Image": "http://10.1.1.1/a.iso", "Speed": 9}), http.StatusBadRequest, "ActionParameterUnknown")
			expectStatus(t, c.do("POST", insert, map[string]any{"Image": "http://10.1.1.1/a.iso", "TransferProtocolType": "Pigeon"}),
				http.StatusBadRequest, "ActionParameterValueNotInList")
			expectStatus(t, c.do("POST", insert, map[string]any{"Image": "http://10.1.1.1/boot/agent.iso?x=1", "WriteProtected": true}), http.StatusNoContent)
			vm = c.mustGet(cd)
			if vm["Inserted"] != true || vm["Image"] != "http://10.1.1.1/boot/agent.iso?x=1" || vm["ImageName"] != "agent.iso" ||
				vm["ConnectedVia"] != "URI" || vm["TransferProtocolType"] != "HTTP" {
				t.Fatalf("after insert: %v", vm)
			}
			if md, ok := b.Machine().Media("CD1"); !ok || md.Image != "http://10.1.1.1/boot/agent.iso?x=1" {
				t.Fatalf("machine media %+v %v", md, ok)
			}
			expectStatus(t, c.do("POST", insert, map[string]any{"Image": "http://10.1.1.1/b.iso"}), http.StatusConflict, "ResourceInUse")
			// sushy posts EjectMedia without a body.
			expectStatus(t, c.do("POST", eject, nil), http.StatusNoContent)
			expectStatus(t, c.do("POST", eject, map[string]any{}), http.StatusNoContent)
			if vm := c.mustGet(cd); vm["Inserted"] != false || vm["Image"] != nil {
				t.Fatalf("after eject: %v", vm)
			}
		})
	}
}

func TestIdentityAndHardware(t *testing.T) {
	for _, mk := range Mockups() {
		t.Run(string(mk), func(t *testing.T) {
			s, err := NewServer(ServerOptions{})
			if err != nil {
				t.Fatal(err)
			}
			defer s.Close()
			plain, err := s.AddBMC(BMCOptions{Mockup: mk})
			if err != nil {
				t.Fatal(err)
			}
			seen := map[string]bool{}
			for i := 1; i <= 2; i++ {
				id := NewIdentity(i)
				b, err := s.AddBMC(BMCOptions{Mockup: mk, Identity: id, Hardware: Hardware{Processors: 3 + i, MemoryGiB: 128 * i}})
				if err != nil {
					t.Fatal(err)
				}
				c := newClient(t, s, b)
				sys := c.mustGet(systemPath)
				if sys["SerialNumber"] != id.SerialNumber || sys["UUID"] != id.UUID || sys["HostName"] != id.HostName {
					t.Fatalf("identity %v %v %v", sys["SerialNumber"], sys["UUID"], sys["HostName"])
				}
				root := c.mustGet("/redfish/v1")
				if seen[root["UUID"].(string)] {
					t.Fatal("two BMCs share a service UUID")
				}
				seen[root["UUID"].(string)] = true

				macs := hostMACs(c)
				if len(macs) == 0 {
					t.Fatal("no MAC addresses found")
				}
				for _, mac := range macs {
					if !strings.HasPrefix(mac, fmt.Sprintf("02:A7:00:00:%02X:", i)) {
						t.Fatalf("MAC %s not from identity %d (all: %v)", mac, i, macs)
					}
				}

				procs := c.mustGet(linkOf(sys, "Processors"))
				var cpus int
				for _, m := range procs["Members"].([]any) {
					p := c.mustGet(m.(map[string]any)["@odata.id"].(string))
					if p["ProcessorType"] == "CPU" {
						cpus++
					}
				}
				if cpus != 3+i || sys["ProcessorSummary"].(map[string]any)["Count"] != float64(3+i) {
					t.Fatalf("%d CPUs, summary %v; want %d", cpus, sys["ProcessorSummary"], 3+i)
				}
				var mib float64
				for _, m := range c.mustGet(linkOf(sys, "Memory"))["Members"].([]any) {
					if v, ok := c.mustGet(m.(map[string]any)["@odata.id"].(string))["CapacityMiB"].(float64); ok {
						mib += v
					}
				}
				if mib != float64(128*i*1024) || sys["MemorySummary"].(map[string]any)["TotalSystemMemoryGiB"] != float64(128*i) {
					t.Fatalf("memory %v MiB, summary %v", mib, sys["MemorySummary"])
				}
			}
			// The BMC without overrides still shows the mockup, so nothing leaked into the shared tree.
			c := newClient(t, s, plain)
			if got := c.mustGet(systemPath)["SerialNumber"]; got != "437XR1138R2" {
				t.Fatalf("plain BMC serial %v", got)
			}
			if got := c.mustGet(systemPath)["ProcessorSummary"].(map[string]any)["Count"]; got != 2.0 {
				t.Fatalf("plain BMC CPU count %v", got)
			}
		})
	}
}

func TestFewerProcessorsHidesCPUs(t *testing.T) {
	s, b := startBMC(t, ServerOptions{}, BMCOptions{Mockup: MockupRackmount, Hardware: Hardware{Processors: 1}})
	c := newClient(t, s, b)
	expectStatus(t, c.do("GET", systemPath+"/Processors/CPU2", nil), http.StatusNotFound, "ResourceMissingAtURI")
	members := c.mustGet(systemPath + "/Processors")["Members"].([]any)
	if len(members) != 2 { // CPU1 and the FPGA
		t.Fatalf("members %v", members)
	}
}

// hostMACs returns the MACs of the host's ports, wherever the mockup keeps them.
func hostMACs(c *client) []string {
	sys := c.mustGet(systemPath)
	var macs []string
	if p := linkOf(sys, "EthernetInterfaces"); p != "" {
		for _, m := range c.mustGet(p)["Members"].([]any) {
			nic := c.mustGet(m.(map[string]any)["@odata.id"].(string))
			if mac, ok := nic["MACAddress"].(string); ok {
				macs = append(macs, mac)
			}
		}
		return macs
	}
	for _, ch := range c.mustGet("/redfish/v1/Chassis")["Members"].([]any) {
		chassis := c.mustGet(ch.(map[string]any)["@odata.id"].(string))
		p := linkOf(chassis, "NetworkAdapters")
		if p == "" {
			continue
		}
		for _, a := range c.mustGet(p)["Members"].([]any) {
			adapter := c.mustGet(a.(map[string]any)["@odata.id"].(string))
			for _, f := range c.mustGet(linkOf(adapter, "NetworkDeviceFunctions"))["Members"].([]any) {
				ndf := c.mustGet(f.(map[string]any)["@odata.id"].(string))
				macs = append(macs, ndf["Ethernet"].(map[string]any)["MACAddress"].(string))
			}
		}
	}
	return macs
}

func linkOf(props map[string]any, key string) string {
	m, _ := props[key].(map[string]any)
	s, _ := m["@odata.id"].(string)
	return s
}

// TestMockupLinksResolve walks every link of every mockup, as a crawling client
// would: the trimmed trees must not point at resources they dropped.
func TestMockupLinksResolve(t *testing.T) {
	for _, tc := range []struct {
		mk        Mockup
		mockupIDs bool
	}{{MockupLocalStorage, false}, {MockupRackmount, false}, {MockupSmartNIC, false},
		{MockupLocalStorage, true}, {MockupRackmount, true}, {MockupSmartNIC, true}} {
		t.Run(fmt.Sprintf("%s/mockupIDs=%v", tc.mk, tc.mockupIDs), func(t *testing.T) {
			s, b := startBMC(t, ServerOptions{}, BMCOptions{Mockup: tc.mk, MockupIDs: tc.mockupIDs,
				Identity: NewIdentity(7), Hardware: Hardware{Processors: 3, MemoryGiB: 64}})
			c := newClient(t, s, b)
			seen := map[string]bool{}
			queue := []string{"/redfish/v1"}
			for len(queue) > 0 {
				p := queue[0]
				queue = queue[1:]
				if seen[p] {
					continue
				}
				seen[p] = true
				r := c.do("GET", p, nil)
				if r.status != http.StatusOK {
					t.Errorf("GET %s: %d", p, r.status)
					continue
				}
				for _, l := range links(r.body) {
					l = strings.TrimSuffix(strings.SplitN(l, "#", 2)[0], "/")
					if strings.HasPrefix(l, "/redfish/v1") && !seen[l] {
						queue = append(queue, l)
					}
				}
			}
			if len(seen) < 30 {
				t.Fatalf("crawled only %d resources", len(seen))
			}
			wantSystem := map[bool]string{false: systemPath, true: "/redfish/v1/Systems/437XR1138R2"}[tc.mockupIDs]
			if !seen[wantSystem] {
				t.Fatalf("system %s not reached", wantSystem)
			}
		})
	}
}

func links(v any) []string {
	var out []string
	switch x := v.(type) {
	case map[string]any:
		for k, e := range x {
			if s, ok := e.(string); ok && k == "@odata.id" {
				out = append(out, s)
			}
			out = append(out, links(e)...)
		}
	case []any:
		for _, e := range x {
			out = append(out, links(e)...)
		}
	}
	return out
}

func TestTLSVerifiesWithTheServerCA(t *testing.T) {
	s, b := startBMC(t, ServerOptions{TLS: true}, BMCOptions{})
	if !strings.HasPrefix(b.URL(), "https://") || len(s.CACertPEM()) == 0 {
		t.Fatalf("URL %s, CA %d bytes", b.URL(), len(s.CACertPEM()))
	}
	c := newClient(t, s, b)
	c.mustGet(systemPath)
	// Without the CA, verification must fail.
	if resp, err := http.Get(b.URL() + "/redfish/v1"); err == nil {
		resp.Body.Close()
		t.Fatal("TLS verified without the CA")
	}
}

// A Go client offers X25519MLKEM768 first; the emulated BMC answers with X25519, as BMC
// firmware does, and still with P-256 to a client that offers nothing else.
func TestTLSKeyExchangeIsWhatBMCFirmwareOffers(t *testing.T) {
	s, b := startBMC(t, ServerOptions{TLS: true}, BMCOptions{})
	addr := strings.TrimPrefix(b.URL(), "https://")
	for _, tc := range []struct {
		offer []tls.CurveID
		want  tls.CurveID
	}{
		{offer: nil, want: tls.X25519},
		{offer: []tls.CurveID{tls.X25519MLKEM768}, want: 0},
		{offer: []tls.CurveID{tls.CurveP256}, want: tls.CurveP256},
	} {
		conn, err := tls.Dial("tcp", addr, &tls.Config{RootCAs: s.CertPool(), ServerName: "127.0.0.1", CurvePreferences: tc.offer})
		if tc.want == 0 {
			if err == nil {
				conn.Close()
				t.Errorf("offering only %v: handshake succeeded, want it refused", tc.offer)
			}
			continue
		}
		if err != nil {
			t.Fatalf("offering %v: %v", tc.offer, err)
		}
		if got := conn.ConnectionState().CurveID; got != tc.want {
			t.Errorf("offering %v: negotiated %v, want %v", tc.offer, got, tc.want)
		}
		conn.Close()
	}
}

func TestCloseRefusesConnections(t *testing.T) {
	s, b := startBMC(t, ServerOptions{}, BMCOptions{})
	c := newClient(t, s, b)
	c.mustGet("/redfish/v1")
	if err := b.Close(); err != nil {
		t.Fatal(err)
	}
	if resp, err := http.Get(b.URL() + "/redfish/v1"); err == nil {
		resp.Body.Close()
		t.Fatal("closed BMC still answers")
	}
}
