package httpboot

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"

	"k8s.io/apimachinery/pkg/types"

	infrav1 "github.com/anvil-metal/cluster-api-provider-anvil/api/v1alpha1"
	"github.com/anvil-metal/cluster-api-provider-anvil/internal/boot/agentapi"
	"github.com/anvil-metal/cluster-api-provider-anvil/internal/boot/token"
	"github.com/anvil-metal/cluster-api-provider-anvil/internal/imagecache"
)

// TestAgentBootEndToEnd runs one boot the way the pieces meet in the manager: the iPXE
// script hands the agent a token and the API URL, the agent registers, gets an install task
// whose image URL points at the cache, downloads and verifies the image, fetches the
// bootstrap data and reports success. A second agent replaying the token is refused.
func TestAgentBootEndToEnd(t *testing.T) {
	ctx := context.Background()
	host := types.NamespacedName{Namespace: "lab", Name: "server-a"}
	mac := "52:54:00:aa:bb:01"

	image := []byte(strings.Repeat("root filesystem ", 1<<14))
	sum := sha256.Sum256(image)
	checksum := "sha256:" + hex.EncodeToString(sum[:])
	upstream := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) { _, _ = w.Write(image) }))
	defer upstream.Close()

	issuer, err := token.NewIssuer(token.Options{})
	if err != nil {
		t.Fatal(err)
	}
	cache, err := imagecache.New(imagecache.Options{Dir: t.TempDir(), MaxBytes: 1 << 30, AllowLocal: true})
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = cache.Close() }()
	backend := agentapi.NewFakeBackend()
	var mu sync.Mutex
	var events []agentapi.SecurityEvent
	api, err := agentapi.NewServer(agentapi.ServerOptions{Tokens: issuer, Backend: backend,
		OnSecurityEvent: func(e agentapi.SecurityEvent) { mu.Lock(); defer mu.Unlock(); events = append(events, e) }})
	if err != nil {
		t.Fatal(err)
	}

	// One listener for everything, as in the manager; its URL is only known once it listens.
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	public := "http://" + ln.Addr().String()
	hosts := &fakeHosts{byMAC: map[string]HostBoot{mac: {Host: host, Action: ActionAgent, Attempt: "attempt-1", BootMode: infrav1.BootModeUEFI}}}
	h, err := NewHandler(Options{Hosts: hosts, Tokens: issuer, PublicURL: public, Images: cache, AgentAPI: api})
	if err != nil {
		t.Fatal(err)
	}
	srv := &httptest.Server{Listener: ln, Config: &http.Server{Handler: h}}
	srv.Start()
	defer srv.Close()

	imageURL, err := cache.URL(public, imagecache.Source{URL: upstream.URL + "/os.raw", Checksum: checksum})
	if err != nil {
		t.Fatal(err)
	}
	backend.SetHost(host, agentapi.FakeHost{
		View:      agentapi.HostView{State: infrav1.HostStateProvisioning, Attempt: "attempt-1"},
		Bootstrap: []byte("#cloud-config\n"),
		Tasks: []agentapi.Task{{ID: "install-1", Kind: agentapi.TaskInstall,
			Image:       &agentapi.Image{URL: imageURL, Checksum: checksum, Format: infrav1.ImageFormatRaw, Layout: infrav1.ImageLayoutABRoot},
			ConfigDrive: &agentapi.ConfigDrive{MetaData: agentapi.MetaData{InstanceID: "i-1", LocalHostname: "server-a", ProviderID: "anvil://lab/server-a"}}}},
	})

	// Firmware → iPXE → script.
	resp, err := http.Get(public + "/ipxe/mac/52-54-00-aa-bb-01") //nolint:noctx // test
	if err != nil {
		t.Fatal(err)
	}
	script, _ := io.ReadAll(resp.Body)
	_ = resp.Body.Close()
	lines := parseIPXE(t, string(script))
	params, err := agentapi.ParseKernelCmdline(strings.Join(lines[2].cmds[0].argv[4:], " "))
	if err != nil {
		t.Fatal(err)
	}

	// The agent.
	client, err := agentapi.NewClient(params.APIURL, params.Token, agentapi.ClientOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := client.Register(ctx, "test", infrav1.HardwareInventory{Source: "InBand"}); err != nil {
		t.Fatal(err)
	}
	task, err := client.NextTask(ctx)
	if err != nil || task.Kind != agentapi.TaskInstall {
		t.Fatalf("task %+v %v", task, err)
	}
	img, err := http.Get(task.Image.URL) //nolint:noctx // test
	if err != nil {
		t.Fatal(err)
	}
	got := sha256.New()
	_, _ = io.Copy(got, img.Body)
	_ = img.Body.Close()
	if "sha256:"+hex.EncodeToString(got.Sum(nil)) != task.Image.Checksum {
		t.Fatal("image from the cache does not match its checksum")
	}
	if ud, err := client.BootstrapData(ctx); err != nil || string(ud) != "#cloud-config\n" {
		t.Fatalf("bootstrap: %v", err)
	}
	if err := client.Result(ctx, agentapi.Result{TaskID: task.ID, Kind: task.Kind, OK: true, Slot: infrav1.SlotB, ImageChecksum: checksum}); err != nil {
		t.Fatal(err)
	}

	// Someone who copied the token (it travelled over plain HTTP) tries to register.
	thief, _ := agentapi.NewClient(params.APIURL, params.Token, agentapi.ClientOptions{MaxAttempts: 1})
	if _, err := thief.Register(ctx, "evil", infrav1.HardwareInventory{}); err == nil {
		t.Fatal("second registration accepted")
	}
	if _, err := thief.BootstrapData(ctx); err == nil {
		t.Fatal("bootstrap data handed to a second session")
	}
	mu.Lock()
	defer mu.Unlock()
	if len(events) != 2 || events[0].Kind != agentapi.EventSecondRegistration || events[1].Kind != agentapi.EventSessionMismatch {
		t.Fatalf("security events %+v", events)
	}
	if st := cache.Stats(); st.Downloads != 1 {
		t.Fatalf("cache stats %+v", st)
	}
}
