package inplace

import (
	"bytes"
	"context"
	"crypto/tls"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"strings"
	"testing"
	"time"

	jsonpatch "github.com/evanphx/json-patch/v5"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	clusterv1 "sigs.k8s.io/cluster-api/api/core/v1beta2"
	runtimecatalog "sigs.k8s.io/cluster-api/api/runtime/catalog"
	runtimehooksv1 "sigs.k8s.io/cluster-api/api/runtime/hooks/v1alpha1"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/client"

	infrav1 "github.com/anvil-metal/cluster-api-provider-anvil/api/v1alpha1"
	"github.com/anvil-metal/cluster-api-provider-anvil/internal/mgmtplane"
	"github.com/anvil-metal/cluster-api-provider-anvil/internal/testcert"
)

// These tests talk to the extension as Cluster API does: JSON over HTTPS to the paths its
// discovery announces, verified against the serving certificate's CA; UpdateMachine works on
// AnvilMachines and AnvilHosts in a real API server (envtest), the test playing the host
// controller's part by writing host status.

var env *mgmtplane.Environment

func TestMain(m *testing.M) {
	var err error
	env, err = mgmtplane.Start()
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	code := m.Run()
	_ = env.Stop()
	os.Exit(code)
}

// extensionClient calls a running extension server.
type extensionClient struct {
	base    string
	http    *http.Client
	catalog *runtimecatalog.Catalog
}

// startExtension serves e on a free local port with a fresh certificate.
func startExtension(t *testing.T, e *Extension) *extensionClient {
	t.Helper()
	dir := t.TempDir()
	pool, err := testcert.WriteServingPair(dir)
	if err != nil {
		t.Fatal(err)
	}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	port := l.Addr().(*net.TCPAddr).Port
	_ = l.Close()
	srv, err := NewServer(e, ServerOptions{Host: "127.0.0.1", Port: port, CertDir: dir})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(ctrl.LoggerInto(context.Background(), ctrl.Log))
	done := make(chan error, 1)
	go func() { done <- srv.Start(ctx) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("extension server: %v", err)
		}
	})
	catalog := runtimecatalog.New()
	if err := runtimehooksv1.AddToCatalog(catalog); err != nil {
		t.Fatal(err)
	}
	c := &extensionClient{base: fmt.Sprintf("https://127.0.0.1:%d", port), catalog: catalog,
		http: &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool, MinVersion: tls.VersionTLS12}}}}
	deadline := time.Now().Add(10 * time.Second)
	for {
		conn, err := tls.Dial("tcp", fmt.Sprintf("127.0.0.1:%d", port), &tls.Config{RootCAs: pool, MinVersion: tls.VersionTLS12})
		if err == nil {
			_ = conn.Close()
			return c
		}
		if time.Now().After(deadline) {
			t.Fatalf("extension server not serving: %v", err)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// call posts req to the handler name of hook and decodes the response into resp.
func (c *extensionClient) call(t *testing.T, hook runtimecatalog.Hook, name string, req runtime.Object, resp any) {
	t.Helper()
	gvh, err := c.catalog.GroupVersionHook(hook)
	if err != nil {
		t.Fatal(err)
	}
	reqGVK, err := c.catalog.GroupVersionKind(req)
	if err != nil {
		t.Fatal(err)
	}
	req.GetObjectKind().SetGroupVersionKind(reqGVK)
	body, err := json.Marshal(req)
	if err != nil {
		t.Fatal(err)
	}
	r, err := c.http.Post(c.base+"/"+strings.TrimPrefix(runtimecatalog.GVHToPath(gvh, name), "/"), "application/json", bytes.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = r.Body.Close() }()
	out, _ := io.ReadAll(r.Body)
	if r.StatusCode != http.StatusOK {
		t.Fatalf("%s: HTTP %d: %s", name, r.StatusCode, out)
	}
	if err := json.Unmarshal(out, resp); err != nil {
		t.Fatalf("%s: %v: %s", name, err, out)
	}
}

func abImage(name string) infrav1.Image {
	return infrav1.Image{URL: "https://images.example.com/" + name + ".img", Checksum: "sha256:" + strings.Repeat(name[len(name)-1:], 64),
		Format: infrav1.ImageFormatRaw, Layout: infrav1.ImageLayoutABRoot}
}

// raw is an object as Cluster API puts it into a request: apiVersion, kind, metadata, spec.
func raw(t *testing.T, obj runtime.Object, kind string) runtime.RawExtension {
	t.Helper()
	obj.GetObjectKind().SetGroupVersionKind(infrav1.GroupVersion.WithKind(kind))
	b, err := json.Marshal(obj)
	if err != nil {
		t.Fatal(err)
	}
	var m map[string]any
	_ = json.Unmarshal(b, &m)
	delete(m, "status")
	b, _ = json.Marshal(m)
	return runtime.RawExtension{Raw: b}
}

func anvilMachine(name string, spec infrav1.AnvilMachineSpec) *infrav1.AnvilMachine {
	return &infrav1.AnvilMachine{ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: "default",
		Annotations: map[string]string{clusterv1.TemplateClonedFromNameAnnotation: "workers"}}, Spec: spec}
}

func machine(name string) clusterv1.Machine {
	return clusterv1.Machine{ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: "default"},
		Spec: clusterv1.MachineSpec{ClusterName: "c", Version: "v1.35.2",
			InfrastructureRef: clusterv1.ContractVersionedObjectReference{APIGroup: infrav1.GroupVersion.Group, Kind: "AnvilMachine", Name: name}}}
}

// applied applies a hook's patch to the spec of current (JSON), as Cluster API does before it
// compares the result with desired.
func applied(t *testing.T, current runtime.RawExtension, p runtimehooksv1.Patch) map[string]any {
	t.Helper()
	if p.PatchType != runtimehooksv1.JSONPatchType {
		t.Fatalf("patch type %q", p.PatchType)
	}
	patch, err := jsonpatch.DecodePatch(p.Patch)
	if err != nil {
		t.Fatalf("patch %s: %v", p.Patch, err)
	}
	out, err := patch.Apply(current.Raw)
	if err != nil {
		t.Fatalf("applying %s: %v", p.Patch, err)
	}
	var m map[string]any
	_ = json.Unmarshal(out, &m)
	return m["spec"].(map[string]any)
}

func specOf(t *testing.T, r runtime.RawExtension) map[string]any {
	t.Helper()
	var m map[string]any
	if err := json.Unmarshal(r.Raw, &m); err != nil {
		t.Fatal(err)
	}
	return m["spec"].(map[string]any)
}

func TestCanUpdateMachineOffersOnlyImageChanges(t *testing.T) {
	c := startExtension(t, &Extension{Client: env.Client})
	base := infrav1.AnvilMachineSpec{ProviderID: new("anvil://default/h1"), Image: abImage("v1"), WipePolicy: infrav1.WipePolicyMetadata,
		HostSelector: &metav1.LabelSelector{MatchLabels: map[string]string{"rack": "r1"}}}
	wholeDisk := base.DeepCopy()
	wholeDisk.Image.Layout = infrav1.ImageLayoutWholeDisk

	cases := []struct {
		name      string
		current   infrav1.AnvilMachineSpec
		desired   func(*infrav1.AnvilMachineSpec)
		inPlace   bool
		wantInMsg string
	}{
		{"a new image", base, func(s *infrav1.AnvilMachineSpec) { s.Image = abImage("v2") }, true, "in place"},
		{"a new image and a new selector", base, func(s *infrav1.AnvilMachineSpec) {
			s.Image = abImage("v2")
			s.HostSelector = &metav1.LabelSelector{MatchLabels: map[string]string{"rack": "r2"}}
		}, false, "not limited to spec.image"},
		{"a new wipe policy only", base, func(s *infrav1.AnvilMachineSpec) { s.WipePolicy = infrav1.WipePolicyFull }, false, "image does not change"},
		{"whole-disk images", *wholeDisk, func(s *infrav1.AnvilMachineSpec) {
			s.Image = abImage("v2")
			s.Image.Layout = infrav1.ImageLayoutWholeDisk
		}, false, "only ABRoot"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			desired := tc.current.DeepCopy()
			tc.desired(desired)
			req := &runtimehooksv1.CanUpdateMachineRequest{
				Current: runtimehooksv1.CanUpdateMachineRequestObjects{Machine: machine("m1"), InfrastructureMachine: raw(t, anvilMachine("m1", tc.current), "AnvilMachine")},
				Desired: runtimehooksv1.CanUpdateMachineRequestObjects{Machine: machine("m1"), InfrastructureMachine: raw(t, anvilMachine("m1", *desired), "AnvilMachine")},
			}
			resp := &runtimehooksv1.CanUpdateMachineResponse{}
			c.call(t, runtimehooksv1.CanUpdateMachine, CanUpdateMachineHandler, req, resp)
			if resp.Status != runtimehooksv1.ResponseStatusSuccess || !strings.Contains(resp.Message, tc.wantInMsg) {
				t.Fatalf("status %s, message %q; want Success mentioning %q", resp.Status, resp.Message, tc.wantInMsg)
			}
			if resp.MachinePatch.IsDefined() || resp.BootstrapConfigPatch.IsDefined() {
				t.Errorf("patches for the Machine or bootstrap config: %+v", resp)
			}
			if !tc.inPlace {
				if resp.InfrastructureMachinePatch.IsDefined() {
					t.Errorf("a patch for a change that is not in place: %s", resp.InfrastructureMachinePatch.Patch)
				}
				return
			}
			got, want := applied(t, req.Current.InfrastructureMachine, resp.InfrastructureMachinePatch), specOf(t, req.Desired.InfrastructureMachine)
			if gb, wb := mustJSON(got), mustJSON(want); gb != wb {
				t.Errorf("current spec with the patch applied:\n%s\nwant the desired spec:\n%s", gb, wb)
			}
		})
	}

	// An object of another provider is refused by field, not misread.
	req := &runtimehooksv1.CanUpdateMachineRequest{
		Current: runtimehooksv1.CanUpdateMachineRequestObjects{Machine: machine("m1"), InfrastructureMachine: runtime.RawExtension{Raw: []byte(`{"apiVersion":"infrastructure.cluster.x-k8s.io/v1beta2","kind":"DockerMachine","spec":{}}`)}},
		Desired: runtimehooksv1.CanUpdateMachineRequestObjects{Machine: machine("m1"), InfrastructureMachine: raw(t, anvilMachine("m1", base), "AnvilMachine")},
	}
	resp := &runtimehooksv1.CanUpdateMachineResponse{}
	c.call(t, runtimehooksv1.CanUpdateMachine, CanUpdateMachineHandler, req, resp)
	if resp.Status != runtimehooksv1.ResponseStatusFailure || !strings.Contains(resp.Message, "current.infrastructureMachine") || !strings.Contains(resp.Message, "DockerMachine") {
		t.Errorf("another provider's machine: status %s, message %q", resp.Status, resp.Message)
	}
}

func TestCanUpdateMachineSetPatchesTheTemplateImage(t *testing.T) {
	c := startExtension(t, &Extension{Client: env.Client})
	tmpl := func(name string, img infrav1.Image) *infrav1.AnvilMachineTemplate {
		return &infrav1.AnvilMachineTemplate{ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: "default"},
			Spec: infrav1.AnvilMachineTemplateSpec{Template: infrav1.AnvilMachineTemplateResource{Spec: infrav1.AnvilMachineSpec{Image: img, WipePolicy: infrav1.WipePolicyMetadata}}}}
	}
	ms := clusterv1.MachineSet{ObjectMeta: metav1.ObjectMeta{Name: "md-0-abc", Namespace: "default"}}
	req := &runtimehooksv1.CanUpdateMachineSetRequest{
		Current: runtimehooksv1.CanUpdateMachineSetRequestObjects{MachineSet: ms, InfrastructureMachineTemplate: raw(t, tmpl("workers-v1", abImage("v1")), "AnvilMachineTemplate")},
		Desired: runtimehooksv1.CanUpdateMachineSetRequestObjects{MachineSet: ms, InfrastructureMachineTemplate: raw(t, tmpl("workers-v2", abImage("v2")), "AnvilMachineTemplate")},
	}
	resp := &runtimehooksv1.CanUpdateMachineSetResponse{}
	c.call(t, runtimehooksv1.CanUpdateMachineSet, CanUpdateMachineSetHandler, req, resp)
	if resp.Status != runtimehooksv1.ResponseStatusSuccess || !resp.InfrastructureMachineTemplatePatch.IsDefined() {
		t.Fatalf("status %s, message %q, patch %s", resp.Status, resp.Message, resp.InfrastructureMachineTemplatePatch.Patch)
	}
	if !strings.HasPrefix(string(resp.InfrastructureMachineTemplatePatch.Patch), `[{"op":"replace","path":"/spec/template/spec/image"`) {
		t.Errorf("patch %s must touch only spec.template.spec (Cluster API refuses others)", resp.InfrastructureMachineTemplatePatch.Patch)
	}
	got, want := applied(t, req.Current.InfrastructureMachineTemplate, resp.InfrastructureMachineTemplatePatch), specOf(t, req.Desired.InfrastructureMachineTemplate)
	if gb, wb := mustJSON(got), mustJSON(want); gb != wb {
		t.Errorf("patched template spec\n%s\nwant\n%s", gb, wb)
	}
}

func TestDiscoveryAnnouncesTheHandlers(t *testing.T) {
	c := startExtension(t, &Extension{Client: env.Client})
	resp := &runtimehooksv1.DiscoveryResponse{}
	c.call(t, runtimehooksv1.Discovery, "", &runtimehooksv1.DiscoveryRequest{}, resp)
	got := map[string]string{}
	for _, h := range resp.Handlers {
		got[h.Name] = h.RequestHook.Hook
	}
	want := map[string]string{CanUpdateMachineHandler: "CanUpdateMachine", CanUpdateMachineSetHandler: "CanUpdateMachineSet", UpdateMachineHandler: "UpdateMachine"}
	if mustJSON(got) != mustJSON(want) {
		t.Errorf("discovery lists %v, want %v", got, want)
	}
}

func mustJSON(v any) string {
	b, _ := json.Marshal(v)
	return string(b)
}

// TestUpdateMachineFollowsTheHost drives UpdateMachine through an upgrade that commits and one
// that rolls back, with the host's status written as the host controller would.
func TestUpdateMachineFollowsTheHost(t *testing.T) {
	ctx := context.Background()
	c := startExtension(t, &Extension{Client: env.Client, RetryAfter: 2 * time.Second})
	namespace := &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{GenerateName: "inplace-"}}
	if err := env.Client.Create(ctx, namespace); err != nil {
		t.Fatal(err)
	}
	ns := struct{ name string }{namespace.Name}

	setup := func(name string) (*infrav1.AnvilMachine, *infrav1.AnvilHost) {
		t.Helper()
		v1 := abImage("v1")
		am := anvilMachine(name, infrav1.AnvilMachineSpec{Image: v1})
		am.Namespace = ns.name
		if err := env.Client.Create(ctx, am); err != nil {
			t.Fatal(err)
		}
		host := &infrav1.AnvilHost{ObjectMeta: metav1.ObjectMeta{Name: name + "-host", Namespace: ns.name},
			Spec: infrav1.AnvilHostSpec{BMC: infrav1.BMC{Address: "redfish+https://10.0.0.9/redfish/v1/Systems/1", CredentialsRef: infrav1.LocalSecretReference{Name: "bmc"}},
				BootMACAddress: "52:54:00:00:00:09", Online: true,
				Claim: &infrav1.HostClaim{MachineRef: infrav1.MachineReference{Name: name, UID: am.UID}, ClusterName: "c", Image: v1.DeepCopy()}}}
		if err := env.Client.Create(ctx, host); err != nil {
			t.Fatal(err)
		}
		installed := metav1.NewTime(time.Now().Add(-time.Hour).Truncate(time.Second))
		host.Status = infrav1.AnvilHostStatus{State: infrav1.HostStateProvisioned, BootSlots: &infrav1.BootSlots{Active: infrav1.SlotA,
			A: &infrav1.SlotContent{ImageURL: v1.URL, Checksum: v1.Checksum, InstalledAt: &installed}}}
		if err := env.Client.Status().Update(ctx, host); err != nil {
			t.Fatal(err)
		}
		am.Status.HostRef = &infrav1.MachineHostReference{Name: host.Name}
		if err := env.Client.Status().Update(ctx, am); err != nil {
			t.Fatal(err)
		}
		return am, host
	}
	update := func(am *infrav1.AnvilMachine, img infrav1.Image) *runtimehooksv1.UpdateMachineResponse {
		t.Helper()
		desired := am.DeepCopy()
		desired.Spec.Image = img
		m := machine(am.Name)
		m.Namespace = am.Namespace
		resp := &runtimehooksv1.UpdateMachineResponse{}
		c.call(t, runtimehooksv1.UpdateMachine, UpdateMachineHandler, &runtimehooksv1.UpdateMachineRequest{
			Desired: runtimehooksv1.UpdateMachineRequestObjects{Machine: m, InfrastructureMachine: raw(t, desired, "AnvilMachine")}}, resp)
		return resp
	}
	// hostController plays the host controller: the claim gets the image, the new slot is
	// installed (pending), then committed or rolled back.
	hostController := func(host *infrav1.AnvilHost, mutate func(h *infrav1.AnvilHost)) {
		t.Helper()
		if err := env.Client.Get(ctx, client.ObjectKeyFromObject(host), host); err != nil {
			t.Fatal(err)
		}
		mutate(host)
		status := host.Status.DeepCopy()
		if err := env.Client.Update(ctx, host); err != nil {
			t.Fatal(err)
		}
		host.Status = *status
		if err := env.Client.Status().Update(ctx, host); err != nil {
			t.Fatal(err)
		}
	}
	inProgress := func(resp *runtimehooksv1.UpdateMachineResponse, wantInMsg string) {
		t.Helper()
		if resp.Status != runtimehooksv1.ResponseStatusSuccess || resp.RetryAfterSeconds != 2 || !strings.Contains(resp.Message, wantInMsg) {
			t.Fatalf("status %s, retry after %d s, message %q; want Success, retry after 2 s, mentioning %q", resp.Status, resp.RetryAfterSeconds, resp.Message, wantInMsg)
		}
	}
	v2 := abImage("v2")
	install := func(h *infrav1.AnvilHost) {
		now := metav1.NewTime(time.Now().Truncate(time.Second))
		h.Spec.Claim.Image = v2.DeepCopy()
		h.Status.BootSlots.B = &infrav1.SlotContent{ImageURL: v2.URL, Checksum: v2.Checksum, InstalledAt: &now}
		h.Status.BootSlots.Pending, h.Status.BootSlots.TriesLeft = infrav1.SlotB, 3
	}

	t.Run("committed", func(t *testing.T) {
		am, host := setup("good")
		inProgress(update(am, v2), "waiting for host good-host")
		stored := &infrav1.AnvilMachine{}
		if err := env.Client.Get(ctx, client.ObjectKeyFromObject(am), stored); err != nil {
			t.Fatal(err)
		}
		if stored.Spec.Image.Checksum != v2.Checksum {
			t.Fatalf("AnvilMachine image %s after UpdateMachine, want %s", stored.Spec.Image.URL, v2.URL)
		}
		hostController(host, install)
		inProgress(update(am, v2), "on trial")
		hostController(host, func(h *infrav1.AnvilHost) { h.Status.BootSlots.Active, h.Status.BootSlots.Pending = infrav1.SlotB, "" })
		resp := update(am, v2)
		if resp.Status != runtimehooksv1.ResponseStatusSuccess || resp.RetryAfterSeconds != 0 || !strings.Contains(resp.Message, "slot B") {
			t.Fatalf("after the commit: status %s, retry after %d, message %q; want done", resp.Status, resp.RetryAfterSeconds, resp.Message)
		}
	})

	t.Run("rolled back", func(t *testing.T) {
		am, host := setup("bad")
		inProgress(update(am, v2), "waiting for host")
		hostController(host, install)
		hostController(host, func(h *infrav1.AnvilHost) {
			h.Status.BootSlots.LastFailed, h.Status.BootSlots.Pending = infrav1.SlotB, ""
		})
		for range 2 { // and it stays failed: the image is not tried again
			resp := update(am, v2)
			if resp.Status != runtimehooksv1.ResponseStatusFailure || !strings.Contains(resp.Message, "failed its health gate in slot B") || !strings.Contains(resp.Message, "rolled back to slot A") {
				t.Fatalf("after the rollback: status %s, message %q", resp.Status, resp.Message)
			}
		}
	})
}
