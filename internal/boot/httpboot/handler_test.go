package httpboot

import (
	"bytes"
	"context"
	"errors"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/go-logr/logr/funcr"
	"k8s.io/apimachinery/pkg/types"

	infrav1 "github.com/anvil-metal/cluster-api-provider-anvil/api/v1alpha1"
	"github.com/anvil-metal/cluster-api-provider-anvil/internal/boot/agentapi"
	"github.com/anvil-metal/cluster-api-provider-anvil/internal/boot/token"
)

type fakeHosts struct {
	byMAC map[string]HostBoot
	err   error
}

func (f *fakeHosts) BootFor(_ context.Context, mac net.HardwareAddr) (HostBoot, error) {
	if f.err != nil {
		return HostBoot{}, f.err
	}
	hb, ok := f.byMAC[mac.String()]
	if !ok {
		return HostBoot{}, ErrUnknownHost
	}
	return hb, nil
}

type fixture struct {
	issuer *token.Issuer
	hosts  *fakeHosts
	srv    *httptest.Server
	dir    string
	mu     sync.Mutex
	logs   bytes.Buffer
}

func newFixture(t *testing.T, mod func(*Options)) *fixture {
	t.Helper()
	fx := &fixture{hosts: &fakeHosts{byMAC: map[string]HostBoot{
		"52:54:00:00:00:01": {Host: types.NamespacedName{Namespace: "lab", Name: "provisioning"}, Action: ActionAgent, Attempt: "att-3", BootMode: infrav1.BootModeUEFI},
		"52:54:00:00:00:02": {Host: types.NamespacedName{Namespace: "lab", Name: "done-uefi"}, Action: ActionLocalDisk, BootMode: infrav1.BootModeUEFI},
		"52:54:00:00:00:03": {Host: types.NamespacedName{Namespace: "lab", Name: "done-bios"}, Action: ActionLocalDisk, BootMode: infrav1.BootModeLegacy},
		"52:54:00:00:00:04": {Host: types.NamespacedName{Namespace: "lab", Name: "idle"}, Action: ActionExit},
		"52:54:00:00:00:05": {Host: types.NamespacedName{Namespace: "lab", Name: "no-attempt"}, Action: ActionAgent},
		"52:54:00:00:00:06": {Host: types.NamespacedName{Namespace: "lab", Name: "Bad_Name"}, Action: ActionAgent, Attempt: "a"},
	}}, dir: t.TempDir()}
	var err error
	if fx.issuer, err = token.NewIssuer(token.Options{}); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(fx.dir, "vmlinuz"), bytes.Repeat([]byte("K"), 10000), 0o600); err != nil {
		t.Fatal(err)
	}
	_ = os.Mkdir(filepath.Join(fx.dir, "sub"), 0o700)
	if err := os.Symlink("/etc/passwd", filepath.Join(fx.dir, "escape")); err != nil {
		t.Fatal(err)
	}
	o := Options{
		Hosts: fx.hosts, Tokens: fx.issuer, PublicURL: "http://192.168.10.1:8080/", ArtifactsDir: fx.dir,
		Log: funcr.New(func(p, a string) { fx.mu.Lock(); defer fx.mu.Unlock(); fx.logs.WriteString(p + a + "\n") }, funcr.Options{Verbosity: 5}),
	}
	if mod != nil {
		mod(&o)
	}
	h, err := NewHandler(o)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = h.Close() })
	fx.srv = httptest.NewServer(h)
	t.Cleanup(fx.srv.Close)
	return fx
}

// answer is a response with its body read and closed.
type answer struct {
	StatusCode int
	Header     http.Header
}

func (fx *fixture) get(t *testing.T, p string, hdr ...string) (answer, string) {
	t.Helper()
	req, _ := http.NewRequest(http.MethodGet, fx.srv.URL+p, nil)
	for i := 0; i+1 < len(hdr); i += 2 {
		req.Header.Set(hdr[i], hdr[i+1])
	}
	resp, err := fx.srv.Client().Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = resp.Body.Close() }()
	b, _ := io.ReadAll(resp.Body)
	return answer{StatusCode: resp.StatusCode, Header: resp.Header}, string(b)
}

func TestScriptsByHostState(t *testing.T) {
	fx := newFixture(t, nil)
	exit := "#!ipxe\nexit\n"
	for mac, want := range map[string]string{
		"52:54:00:ff:ff:ff": exit, // unknown
		"52-54-00-00-00-02": exit, // provisioned, UEFI: same answer as unknown
		"52:54:00:00:00:03": "#!ipxe\nsanboot --no-describe --drive 0x80 || exit\n",
		"52:54:00:00:00:04": exit,
		"52:54:00:00:00:05": exit, // agent boot without attempt: refuse to hand out a token
		"52:54:00:00:00:06": exit, // invalid name cannot be rendered
	} {
		resp, body := fx.get(t, "/ipxe/mac/"+mac)
		if resp.StatusCode != http.StatusOK || body != want {
			t.Errorf("%s: %d %q, want %q", mac, resp.StatusCode, body, want)
		}
		if resp.Header.Get("Cache-Control") != "no-store" {
			t.Errorf("%s: cacheable script", mac)
		}
	}
	for _, bad := range []string{"/ipxe/mac/52:54:00:00:00", "/ipxe/mac/52:54:00:00:00:01:02", "/ipxe/mac/52:54-00:00:00:01",
		"/ipxe/mac/zz:54:00:00:00:01", "/ipxe/script?mac=%24%7Bmac%7D", "/ipxe/script"} {
		if resp, _ := fx.get(t, bad); resp.StatusCode != http.StatusBadRequest {
			t.Errorf("%s: %d", bad, resp.StatusCode)
		}
	}
}

func TestAgentScriptCarriesAValidToken(t *testing.T) {
	fx := newFixture(t, func(o *Options) { o.ExtraKernelArgs = []string{"quiet"} })
	for _, p := range []string{"/ipxe/mac/52-54-00-00-00-01", "/ipxe/script?mac=52:54:00:00:00:01", "/ipxe/mac/52:54:00:00:00:01"} {
		resp, body := fx.get(t, p)
		if resp.StatusCode != http.StatusOK {
			t.Fatalf("%s: %d", p, resp.StatusCode)
		}
		lines := parseIPXE(t, body)
		if shape(lines) != agentShape {
			t.Fatalf("%s: shape\n%s", p, shape(lines))
		}
		k := lines[2].cmds[0].argv
		if k[3] != "http://192.168.10.1:8080/artifacts/vmlinuz" || lines[3].cmds[0].argv[3] != "http://192.168.10.1:8080/artifacts/initramfs" {
			t.Fatalf("artifact URLs %q", k)
		}
		bp, err := agentapi.ParseKernelCmdline(strings.Join(k[4:], " "))
		if err != nil || bp.APIURL != "http://192.168.10.1:8080" {
			t.Fatalf("cmdline: %+v %v", bp, err)
		}
		cl, err := fx.issuer.Verify(bp.Token)
		if err != nil || cl.Host.Name != "provisioning" || cl.Attempt != "att-3" || time.Until(cl.Expiry) > time.Hour+time.Second {
			t.Fatalf("token claims %+v %v", cl, err)
		}
		if lines[8].cmds[0].argv[3] != "http://192.168.10.1:8080/ipxe/mac/52-54-00-00-00-01" {
			t.Fatalf("retry URL %q", lines[8].cmds[0].argv)
		}
		fx.mu.Lock()
		leaked := strings.Contains(fx.logs.String(), bp.Token)
		fx.mu.Unlock()
		if leaked {
			t.Fatal("token in logs")
		}
	}
}

func TestLookupFailureRetries(t *testing.T) {
	fx := newFixture(t, nil)
	fx.hosts.err = errors.New("cache not synced")
	_, body := fx.get(t, "/ipxe/mac/52:54:00:00:00:01")
	lines := parseIPXE(t, body)
	if shape(lines) != "\n echo\n sleep\n chain || exit\n" || !strings.HasSuffix(lines[3].cmds[0].argv[3], "/ipxe/mac/52-54-00-00-00-01") {
		t.Fatalf("retry script %q", body)
	}
}

func TestEntryScript(t *testing.T) {
	fx := newFixture(t, nil)
	_, body := fx.get(t, "/ipxe/boot.ipxe")
	if body != "#!ipxe\nchain --replace --autofree http://192.168.10.1:8080/ipxe/mac/${mac:hexhyp} || exit\n" {
		t.Fatalf("%q", body)
	}
}

func TestArtifacts(t *testing.T) {
	fx := newFixture(t, nil)
	resp, body := fx.get(t, "/artifacts/vmlinuz")
	if resp.StatusCode != http.StatusOK || len(body) != 10000 {
		t.Fatalf("vmlinuz: %d %d", resp.StatusCode, len(body))
	}
	resp, body = fx.get(t, "/artifacts/vmlinuz", "Range", "bytes=0-9")
	if resp.StatusCode != http.StatusPartialContent || body != "KKKKKKKKKK" {
		t.Fatalf("range: %d %q", resp.StatusCode, body)
	}
	for _, p := range []string{"/artifacts/escape", "/artifacts/sub", "/artifacts/../../etc/passwd", "/artifacts/%2e%2e/%2e%2e/etc/passwd",
		"/artifacts/nope", "/artifacts/.hidden", "/artifacts/"} {
		if resp, body := fx.get(t, p); resp.StatusCode == http.StatusOK || strings.Contains(body, "root:") {
			t.Errorf("%s: %d", p, resp.StatusCode)
		}
	}
}

func TestMounts(t *testing.T) {
	fx := newFixture(t, func(o *Options) {
		o.Images = http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) { _, _ = io.WriteString(w, "images") })
		o.AgentAPI = http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) { _, _ = io.WriteString(w, "agent") })
	})
	if _, b := fx.get(t, "/images/abc"); b != "images" {
		t.Fatal(b)
	}
	if _, b := fx.get(t, "/agent/v1/task"); b != "agent" {
		t.Fatal(b)
	}
}

func TestNewHandlerValidatesConfig(t *testing.T) {
	is, _ := token.NewIssuer(token.Options{})
	base := Options{Hosts: &fakeHosts{}, Tokens: is, PublicURL: "http://10.0.0.1:8080"}
	for name, mod := range map[string]func(*Options){
		"file public URL": func(o *Options) { o.PublicURL = "file:///srv" },
		"no public URL":   func(o *Options) { o.PublicURL = "" },
		"bad console":     func(o *Options) { o.Console = []string{"ttyS0 init=/bin/sh"} },
		"bad extra arg":   func(o *Options) { o.ExtraKernelArgs = []string{"anvil.token=x"} },
		"bad kernel URL":  func(o *Options) { o.KernelURL = "tftp://x/vmlinuz" },
		"bad CA":          func(o *Options) { o.CAFingerprint = "md5:00" },
		"missing dir":     func(o *Options) { o.ArtifactsDir = "/nonexistent/anvil" },
		"no hosts":        func(o *Options) { o.Hosts = nil },
	} {
		o := base
		mod(&o)
		if h, err := NewHandler(o); err == nil {
			_ = h.Close()
			t.Errorf("%s: accepted", name)
		}
	}
}

// TestServedRecords checks the handler's own account of what it served: the host and action
// behind each script, and the bytes of each artifact against the file's size.
func TestServedRecords(t *testing.T) {
	var mu sync.Mutex
	var recs []Served
	fx := newFixture(t, func(o *Options) {
		o.OnServed = func(s Served) { mu.Lock(); defer mu.Unlock(); recs = append(recs, s) }
	})
	fx.get(t, "/ipxe/boot.ipxe")
	fx.get(t, "/ipxe/mac/52-54-00-00-00-01")
	fx.get(t, "/ipxe/mac/52:54:00:ff:ff:ff")
	fx.get(t, "/ipxe/mac/nonsense")
	fx.get(t, "/artifacts/vmlinuz")
	fx.get(t, "/artifacts/vmlinuz", "Range", "bytes=0-9")
	fx.get(t, "/artifacts/nope")

	// Records are made before the handler returns, which may be after the client has read
	// the last byte (sendfile): wait for them.
	deadline := time.Now().Add(5 * time.Second)
	for {
		mu.Lock()
		n := len(recs)
		mu.Unlock()
		if n >= 6 || time.Now().After(deadline) {
			break
		}
		time.Sleep(10 * time.Millisecond)
	}
	mu.Lock()
	defer mu.Unlock()
	if len(recs) != 6 {
		t.Fatalf("%d records, want 6 (a missing artifact is not served): %+v", len(recs), recs)
	}
	entry, agent, unknown, bad, full, part := recs[0], recs[1], recs[2], recs[3], recs[4], recs[5]
	if entry.Kind != ServedEntry || entry.Path != "/ipxe/boot.ipxe" || entry.MAC != nil || entry.Bytes < 50 {
		t.Errorf("entry script record %+v", entry)
	}
	if agent.Kind != ServedScript || agent.MAC.String() != "52:54:00:00:00:01" || agent.Host.Name != "provisioning" ||
		agent.Action != ActionAgent || agent.Status != http.StatusOK || agent.Bytes < 100 {
		t.Errorf("agent script record %+v", agent)
	}
	if unknown.Action != ActionExit || unknown.Host.Name != "" || unknown.Bytes != int64(len("#!ipxe\nexit\n")) {
		t.Errorf("unknown host record %+v", unknown)
	}
	if bad.Status != http.StatusBadRequest || bad.MAC != nil {
		t.Errorf("bad MAC record %+v", bad)
	}
	if full.Kind != ServedArtifact || full.Path != "/artifacts/vmlinuz" || full.Status != http.StatusOK || full.Bytes != 10000 || full.Size != 10000 {
		t.Errorf("full download record %+v", full)
	}
	if part.Status != http.StatusPartialContent || part.Bytes != 10 || part.Size != 10000 {
		t.Errorf("range download record %+v", part)
	}
}
