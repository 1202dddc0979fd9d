package e2e

import (
	"context"
	"crypto/tls"
	"fmt"
	"net"
	"net/http"
	"testing"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/utils/ptr"
	clusterv1 "sigs.k8s.io/cluster-api/api/core/v1beta2"
	runtimecatalog "sigs.k8s.io/cluster-api/api/runtime/catalog"
	runtimehooksv1 "sigs.k8s.io/cluster-api/api/runtime/hooks/v1alpha1"
	ctrl "sigs.k8s.io/controller-runtime"

	infrav1 "github.com/anvil-metal/cluster-api-provider-anvil/api/v1alpha1"
	"github.com/anvil-metal/cluster-api-provider-anvil/internal/inplace"
	"github.com/anvil-metal/cluster-api-provider-anvil/internal/testcert"
)

// TestInPlaceUpgradeThroughClusterAPI: with Cluster API's InPlaceUpdates gate on and Anvil's
// Runtime Extension served, rolling a MachineDeployment out to a template that differs only
// in its image upgrades the worker in place: the same Machine, AnvilMachine, host and node,
// the host's active slot running the new image; nothing is replaced.
func TestInPlaceUpgradeThroughClusterAPI(t *testing.T) {
	f := newFixture(t, 1)
	c := f.createCluster("inplace", 1, 1)
	c.waitReady(1, 1, 3*time.Minute)
	before := map[string]string{}
	for _, m := range c.machines() {
		before[m.Name] = string(m.UID)
	}

	url, hc := serveExtension(t, &inplace.Extension{Client: f.api.Client, RetryAfter: time.Second})
	t.Cleanup(extensions.serve(url, hc, map[string]string{
		runtimecatalog.HookName(runtimehooksv1.CanUpdateMachine):    inplace.CanUpdateMachineHandler,
		runtimecatalog.HookName(runtimehooksv1.CanUpdateMachineSet): inplace.CanUpdateMachineSetHandler,
		runtimecatalog.HookName(runtimehooksv1.UpdateMachine):       inplace.UpdateMachineHandler,
	}))

	v2 := infrav1.Image{URL: "https://images.example.com/ubuntu-24.04-k8s-1.35-v2.img",
		Checksum: "sha256:60303ae22b998861bce3b28f33eec1be758a213c86c93c076dbe9f558c11c752"}
	// The new template is the cluster's worker template with only the image changed: any other
	// difference makes the extension refuse, and Cluster API replaces the machine.
	v1 := &infrav1.AnvilMachineTemplate{}
	if err := f.get("inplace-worker", v1); err != nil {
		t.Fatal(err)
	}
	spec := v1.Spec.Template.Spec.DeepCopy()
	spec.Image = v2
	f.create(&infrav1.AnvilMachineTemplate{ObjectMeta: metav1.ObjectMeta{Name: "inplace-worker-v2", Namespace: f.ns},
		Spec: infrav1.AnvilMachineTemplateSpec{Template: infrav1.AnvilMachineTemplateResource{Spec: *spec}}})
	start := time.Now()
	md := &clusterv1.MachineDeployment{}
	md.Namespace, md.Name = f.ns, c.mdName()
	// In-place updates count as unavailability: with maxUnavailable 0 Cluster API would first
	// create a surge machine, which for one replica means a plain replacement.
	f.update(md, func() {
		md.Spec.Template.Spec.InfrastructureRef.Name = "inplace-worker-v2"
		md.Spec.Rollout.Strategy.RollingUpdate.MaxSurge = ptr.To(intstr.FromInt32(0))
		md.Spec.Rollout.Strategy.RollingUpdate.MaxUnavailable = ptr.To(intstr.FromInt32(1))
	})

	f.eventually("the worker runs the new image in place", 3*time.Minute, func() (bool, string) {
		workers := 0
		for _, m := range c.machines() {
			if isControlPlane(&m) {
				continue
			}
			workers++
			if before[m.Name] != string(m.UID) {
				return false, fmt.Sprintf("machine %s is new (a rollout replaced the worker)", m.Name)
			}
			if _, ok := m.Annotations[clusterv1.UpdateInProgressAnnotation]; ok {
				return false, fmt.Sprintf("machine %s is updating in place", m.Name)
			}
			am := &infrav1.AnvilMachine{}
			if err := f.get(m.Spec.InfrastructureRef.Name, am); err != nil {
				return false, err.Error()
			}
			if am.Spec.Image.Checksum != v2.Checksum || am.Status.HostRef == nil {
				return false, fmt.Sprintf("AnvilMachine %s image %s", am.Name, am.Spec.Image.URL)
			}
			h := &infrav1.AnvilHost{}
			if err := f.get(am.Status.HostRef.Name, h); err != nil {
				return false, err.Error()
			}
			s := h.Status.BootSlots
			if s == nil || s.Active == "" || s.Pending != "" || (s.Active == infrav1.SlotA && (s.A == nil || s.A.Checksum != v2.Checksum)) ||
				(s.Active == infrav1.SlotB && (s.B == nil || s.B.Checksum != v2.Checksum)) {
				return false, fmt.Sprintf("host %s is %s, boot slots %+v", h.Name, h.Status.State, s)
			}
		}
		return workers == 1, fmt.Sprintf("%d workers", workers)
	})
	t.Logf("MachineDeployment rollout to a new image, in place: %s", time.Since(start).Round(100*time.Millisecond))
	c.waitReady(1, 1, 2*time.Minute)
	for _, m := range c.machines() {
		if before[m.Name] != string(m.UID) {
			t.Errorf("machine %s was created by the rollout; want every machine kept", m.Name)
		}
	}
}

// serveExtension serves Anvil's Runtime Extension on a free local port with a fresh
// certificate, and returns its URL and a client that trusts it.
func serveExtension(t *testing.T, e *inplace.Extension) (string, *http.Client) {
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
	srv, err := inplace.NewServer(e, inplace.ServerOptions{Host: "127.0.0.1", Port: port, CertDir: dir})
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
	tlsConfig := &tls.Config{RootCAs: pool, MinVersion: tls.VersionTLS12}
	addr := fmt.Sprintf("127.0.0.1:%d", port)
	for deadline := time.Now().Add(10 * time.Second); ; {
		conn, err := tls.Dial("tcp", addr, tlsConfig)
		if err == nil {
			_ = conn.Close()
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("extension server not serving: %v", err)
		}
		time.Sleep(20 * time.Millisecond)
	}
	return "https://" + addr, &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{TLSClientConfig: tlsConfig}}
}
