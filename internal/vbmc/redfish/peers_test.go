package redfish

import (
	"context"
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/anvil-metal/cluster-api-provider-anvil/internal/vbmc/machine"
)

// Tests against clients nobody here wrote: DMTF's redfishtool and OpenStack's
// sushy, both from Debian (testdata/install-peers.sh installs them). They skip
// only when the tool is missing.

const (
	redfishtoolPath = "/usr/bin/redfishtool"
	// Debian's interpreter: a python3 earlier on PATH (pyenv) may not see Debian's packages.
	debianPython = "/usr/bin/python3"
)

func requirePeer(t *testing.T, check ...string) {
	t.Helper()
	if err := exec.Command(check[0], check[1:]...).Run(); err != nil {
		t.Skipf("%s not usable (%v); run internal/vbmc/redfish/testdata/install-peers.sh", strings.Join(check, " "), err)
	}
}

// run runs a peer tool with a deadline and returns its stdout, stderr and error.
func run(t *testing.T, env []string, name string, args ...string) (string, string, error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, name, args...)
	cmd.Env = env
	var stdout, stderr strings.Builder
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	err := cmd.Run()
	return stdout.String(), stderr.String(), err
}

// peerEnv is the environment for Python clients. requests lets
// REQUESTS_CA_BUNDLE and CURL_CA_BUNDLE override the CA a client passes
// (sushy's verify=...), so they are removed.
func peerEnv() []string {
	var env []string
	for _, kv := range os.Environ() {
		if !strings.HasPrefix(kv, "REQUESTS_CA_BUNDLE=") && !strings.HasPrefix(kv, "CURL_CA_BUNDLE=") {
			env = append(env, kv)
		}
	}
	return env
}

func TestRedfishtool(t *testing.T) {
	requirePeer(t, redfishtoolPath, "-V")
	for _, mk := range Mockups() {
		t.Run(string(mk), func(t *testing.T) {
			t.Parallel()
			// redfishtool sends credentials over https only, and does not verify certificates.
			_, b := startBMC(t, ServerOptions{TLS: true}, BMCOptions{Mockup: mk, Username: "rt", Password: "pw", Identity: NewIdentity(9)})
			tool := func(auth string, args ...string) (string, error) {
				t.Helper()
				argv := append([]string{"-r", b.Addr(), "-u", "rt", "-p", "pw", "-S", "Always", "-A", auth, "-T", "10"}, args...)
				out, stderr, err := run(t, peerEnv(), redfishtoolPath, argv...)
				if err != nil {
					return out + stderr, err
				}
				return out, nil
			}
			mustTool := func(auth string, args ...string) map[string]any {
				t.Helper()
				out, err := tool(auth, args...)
				if err != nil {
					t.Fatalf("redfishtool %v: %v\n%s", args, err, out)
				}
				var doc map[string]any
				if strings.TrimSpace(out) != "" {
					if err := json.Unmarshal([]byte(out), &doc); err != nil {
						t.Fatalf("redfishtool %v: output is not JSON: %v\n%s", args, err, out)
					}
				}
				return doc
			}

			// Each run costs redfishtool about half a second of Python start-up, so
			// reads are combined and the full set runs on one mockup only.
			full := mk == MockupLocalStorage

			// Power through a session (login, action, logout in one run), read back with Basic.
			mustTool("Session", "Systems", "-1", "reset", "On")
			sys := mustTool("Basic", "Systems", "-1", "get")
			if sys["PowerState"] != "On" || b.Machine().Power() != machine.PowerOn || sys["SerialNumber"] != "ANV0000009" {
				t.Fatalf("after On: power %v (machine %s), serial %v", sys["PowerState"], b.Machine().Power(), sys["SerialNumber"])
			}
			if !full {
				if n := b.Sessions(); n != 0 {
					t.Fatalf("redfishtool left %d sessions", n)
				}
				return
			}
			// Boot override: redfishtool reads the allowable values and the ETag, then PATCHes with If-Match.
			mustTool("Session", "Systems", "-1", "setBootOverride", "Once", "Pxe")
			if got := b.Machine().BootOverride(); got.Target != machine.BootPxe || got.Enabled != machine.OverrideOnce {
				t.Fatalf("machine override %+v", got)
			}
			mustTool("Session", "Systems", "-1", "reset", "ForceOff")
			sys = mustTool("Session", "Systems", "-1", "get")
			boot := sys["Boot"].(map[string]any)
			if sys["PowerState"] != "Off" || boot["BootSourceOverrideTarget"] != "Pxe" || boot["BootSourceOverrideEnabled"] != "Once" {
				t.Fatalf("after ForceOff: power %v, boot %v", sys["PowerState"], boot)
			}
			mustTool("Basic", "Systems", "-1", "reset", "PowerCycle")
			if b.Machine().Power() != machine.PowerOn || b.Machine().BootOverride().Enabled != machine.OverrideDisabled {
				t.Fatalf("PowerCycle from off: %s, override %+v", b.Machine().Power(), b.Machine().BootOverride())
			}
			if v := mustTool("None", "root")["RedfishVersion"]; v == nil {
				t.Fatal("service root without RedfishVersion")
			}
			if out, err := tool("Basic", "Systems", "-1", "patch", `{"Colour": "blue"}`); err == nil || !strings.Contains(out, "400") {
				t.Fatalf("PATCH of an unknown property: %v\n%s", err, out)
			}
			procs := mustTool("Basic", "Systems", "-1", "Processors", "list")
			if n := procs["Members@odata.count"].(float64); n < 2 {
				t.Fatalf("processors %v", procs)
			}
			nics := mustTool("Basic", "Systems", "-1", "EthernetInterfaces", "-a")
			if !strings.Contains(mustJSON(t, nics), "02:A7:00:00:09:00") {
				t.Fatalf("identity MAC missing from %s", mustJSON(t, nics))
			}
			out, _, err := run(t, peerEnv(), redfishtoolPath, "-r", b.Addr(), "-u", "rt", "-p", "bad", "-S", "Always", "-A", "Session", "Systems")
			if err == nil {
				t.Fatalf("login with a wrong password succeeded:\n%s", out)
			}
			if n := b.Sessions(); n != 0 {
				t.Fatalf("redfishtool left %d sessions", n)
			}
		})
	}
}

func mustJSON(t *testing.T, v any) string {
	data, err := json.Marshal(v)
	if err != nil {
		t.Fatal(err)
	}
	return string(data)
}

// sushyReport is what testdata/sushy_check.py prints.
type sushyReport struct {
	Systems       int      `json:"systems"`
	Serial        string   `json:"serial"`
	SystemUUID    string   `json:"system_uuid"`
	CPUs          int      `json:"cpus"`
	MemoryGiB     float64  `json:"memory_gib"`
	MACs          []string `json:"macs"`
	Drives        int      `json:"drives"`
	Powers        []string `json:"powers"`
	AllowedResets []string `json:"allowed_resets"`
	Boot          struct{ Target, Enabled, Mode string }
	BadTarget     string `json:"bad_target"`
	MediaInserted struct {
		Inserted  bool   `json:"inserted"`
		Image     string `json:"image"`
		ImageName string `json:"image_name"`
	} `json:"media_inserted"`
	MediaEjected struct {
		Inserted bool    `json:"inserted"`
		Image    *string `json:"image"`
	} `json:"media_ejected"`
	RedfishVersion string `json:"redfish_version"`
}

func TestSushy(t *testing.T) {
	requirePeer(t, debianPython, "-c", "import sushy")
	script, err := filepath.Abs("testdata/sushy_check.py")
	if err != nil {
		t.Fatal(err)
	}
	cases := []struct {
		mk   Mockup
		auth string
	}{{MockupLocalStorage, "session"}, {MockupRackmount, "session"}, {MockupSmartNIC, "session"}, {MockupLocalStorage, "basic"}}
	for _, tc := range cases {
		t.Run(string(tc.mk)+"/"+tc.auth, func(t *testing.T) {
			t.Parallel()
			s, b := startBMC(t, ServerOptions{TLS: true}, BMCOptions{Mockup: tc.mk, Username: "sushy", Password: "pw",
				Identity: NewIdentity(11), Hardware: Hardware{Processors: 4, MemoryGiB: 512}})
			ca := filepath.Join(t.TempDir(), "ca.pem")
			if err := os.WriteFile(ca, s.CACertPEM(), 0o600); err != nil {
				t.Fatal(err)
			}
			// sushy verifies the certificate against the CA: a real TLS check.
			out, stderr, err := run(t, peerEnv(), debianPython, script, b.URL(), "sushy", "pw", ca, tc.auth)
			if err != nil {
				t.Fatalf("sushy: %v\n%s%s", err, out, stderr)
			}
			var rep sushyReport
			if err := json.Unmarshal([]byte(out), &rep); err != nil {
				t.Fatalf("sushy output: %v\n%s", err, out)
			}
			id := NewIdentity(11)
			if rep.Systems != 1 || rep.Serial != id.SerialNumber || rep.SystemUUID != id.UUID {
				t.Errorf("systems %d, serial %q, uuid %q", rep.Systems, rep.Serial, rep.SystemUUID)
			}
			if rep.CPUs != 4 || rep.MemoryGiB != 512 {
				t.Errorf("%d CPUs, %v GiB", rep.CPUs, rep.MemoryGiB)
			}
			if tc.mk != MockupSmartNIC && (len(rep.MACs) == 0 || !strings.HasPrefix(rep.MACs[0], "02:A7:00:00:0B:")) {
				t.Errorf("MACs %v", rep.MACs)
			}
			if tc.mk == MockupLocalStorage && rep.Drives != 4 {
				t.Errorf("%d drives", rep.Drives)
			}
			if !slices.Equal(rep.Powers, []string{"On", "Off", "On"}) || b.Machine().Power() != machine.PowerOn {
				t.Errorf("power states %v, machine %s", rep.Powers, b.Machine().Power())
			}
			if !slices.Contains(rep.AllowedResets, "PowerCycle") {
				t.Errorf("allowed resets %v", rep.AllowedResets)
			}
			if rep.Boot.Target != "Pxe" || rep.Boot.Enabled != "Once" || rep.Boot.Mode != "UEFI" {
				t.Errorf("boot %+v", rep.Boot)
			}
			if rep.BadTarget == "accepted" {
				t.Error("a bad boot target was accepted")
			}
			if !rep.MediaInserted.Inserted || rep.MediaInserted.Image != "http://10.0.0.1/images/agent.iso" || rep.MediaInserted.ImageName != "agent.iso" {
				t.Errorf("inserted media %+v", rep.MediaInserted)
			}
			if rep.MediaEjected.Inserted || rep.MediaEjected.Image != nil {
				t.Errorf("ejected media %+v", rep.MediaEjected)
			}
			if n := b.Sessions(); n != 0 {
				t.Errorf("%d sessions left after sushy logged out", n)
			}
		})
	}
}
