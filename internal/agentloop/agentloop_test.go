package agentloop

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/go-logr/logr"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	clientgoscheme "k8s.io/client-go/kubernetes/scheme"
	"sigs.k8s.io/controller-runtime/pkg/client/fake"

	infrav1 "github.com/anvil-metal/cluster-api-provider-anvil/api/v1alpha1"
	"github.com/anvil-metal/cluster-api-provider-anvil/internal/bmc"
	"github.com/anvil-metal/cluster-api-provider-anvil/internal/boot/agentapi"
	"github.com/anvil-metal/cluster-api-provider-anvil/internal/bootservices"
	"github.com/anvil-metal/cluster-api-provider-anvil/internal/disk"
	"github.com/anvil-metal/cluster-api-provider-anvil/internal/provision"
)

// TestNetworkBootInstallsIntoSlotA runs the whole agent path on loopback: the provisioning
// backend network-boots the host (a fake BMC), the "firmware" fetches the host's iPXE script
// from the real boot HTTP server, the agent loop registers with the token from the script's
// kernel line, pulls the image through the verifying cache, writes slot A and the config
// drive onto a sparse disk file, and reboots; the backend then reports the host provisioned.
func TestNetworkBootInstallsIntoSlotA(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	dir := t.TempDir()

	// An "OS image": a root filesystem's worth of bytes, served upstream.
	rootfs := bytes.Repeat([]byte("anvil root filesystem block\n"), 300_000) // ~8 MiB
	sum := sha256.Sum256(rootfs)
	upstream := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		http.ServeContent(w, r, "os.img", time.Time{}, bytes.NewReader(rootfs))
	}))
	defer upstream.Close()

	secrets := fake.NewClientBuilder().WithScheme(clientgoscheme.Scheme).WithObjects(&corev1.Secret{
		ObjectMeta: metav1.ObjectMeta{Name: "m-0-bootstrap", Namespace: "ns"},
		Data:       map[string][]byte{"value": []byte("#cloud-config\nruncmd: [kubeadm join]\n")}}).Build()
	svc, err := bootservices.New(bootservices.Config{HTTPAddress: "127.0.0.1:0", ImageCacheDir: filepath.Join(dir, "cache"),
		ImageCacheBytes: 1 << 30, AllowLocalImages: true, Log: logr.Discard(), Backend: provision.Options{Secrets: secrets}})
	if err != nil {
		t.Fatal(err)
	}
	go func() { _ = svc.Start(ctx) }()

	host := &infrav1.AnvilHost{ObjectMeta: metav1.ObjectMeta{Name: "h-0", Namespace: "ns"},
		Spec: infrav1.AnvilHostSpec{BootMACAddress: "52:54:00:ab:cd:01", BootMode: infrav1.BootModeUEFI,
			Claim: &infrav1.HostClaim{MachineRef: infrav1.MachineReference{Name: "m-0", UID: "u"}, ProviderID: "anvil://ns/h-0",
				Image: &infrav1.Image{URL: upstream.URL + "/os.img", Checksum: "sha256:" + hex.EncodeToString(sum[:]),
					Format: infrav1.ImageFormatRaw, Layout: infrav1.ImageLayoutABRoot},
				BootstrapDataSecretRef: &infrav1.LocalSecretReference{Name: "m-0-bootstrap"}}},
		Status: infrav1.AnvilHostStatus{State: infrav1.HostStateProvisioning}}
	fakeBMC := &bmc.FakeBMC{Password: "pw", Power: infrav1.PowerOff}
	pool := bmc.NewPool(bmc.PoolOptions{Dial: fakeBMC.Dial})
	addr, _ := bmc.ParseAddress("ipmi://10.0.0.5")
	run := func(op string, fn func(context.Context, bmc.Client) error) error {
		return pool.Do(ctx, "ns/h-0", bmc.Target{Address: addr, Password: "pw"}, op, fn)
	}

	if out, err := svc.Backend.Provision(ctx, host, run); err != nil || out.Done {
		t.Fatalf("provision start: %+v %v", out, err)
	}
	if fakeBMC.Boot != bmc.BootPXE {
		t.Fatal("not network-booted")
	}

	// Firmware: fetch the script for this MAC and read the agent's kernel line.
	resp, err := http.Get(svc.PublicURL() + "/ipxe/mac/52-54-00-ab-cd-01")
	if err != nil {
		t.Fatal(err)
	}
	script, _ := io.ReadAll(resp.Body)
	_ = resp.Body.Close()
	kernelLine := regexp.MustCompile(`(?m)^kernel .*$`).FindString(string(script))
	if kernelLine == "" {
		t.Fatalf("no kernel line in the script:\n%s", script)
	}
	params, err := agentapi.ParseKernelCmdline(kernelLine)
	if err != nil {
		t.Fatal(err)
	}

	diskPath := filepath.Join(dir, "disk.img")
	f, err := os.Create(diskPath)
	if err != nil {
		t.Fatal(err)
	}
	if err := f.Truncate(20 << 30); err != nil { // sparse: 2 × 8 GiB slots + DATA
		t.Fatal(err)
	}
	_ = f.Close()

	rebooted := false
	err = Run(ctx, Config{Params: params, Disk: diskPath, Log: logr.Discard(),
		Inventory: func() (*infrav1.HardwareInventory, error) {
			return &infrav1.HardwareInventory{CPU: infrav1.CPUInfo{Arch: "amd64", Cores: 16}}, nil
		},
		Reboot:   func(context.Context) error { rebooted = true; return nil },
		PowerOff: func(context.Context) error { return fmt.Errorf("unexpected power off") }})
	if err != nil {
		t.Fatalf("agent: %v", err)
	}
	if !rebooted {
		t.Fatal("the agent did not reboot after installing")
	}

	out, err := svc.Backend.Provision(ctx, host, run)
	if err != nil || !out.Done {
		t.Fatalf("after the agent: %+v %v", out, err)
	}
	if s := host.Status.BootSlots; s == nil || s.Pending != infrav1.SlotA || s.A == nil {
		t.Fatalf("boot slots %+v", host.Status.BootSlots)
	}
	if host.Status.Hardware == nil || host.Status.Hardware.Source != "InBand" || host.Status.Hardware.CPU.Cores != 16 {
		t.Errorf("in-band inventory %+v", host.Status.Hardware)
	}

	// What the emulated firmware and OS would read: slot A armed, config drive in place.
	d, err := disk.Open(diskPath)
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = d.Close() }()
	ab, err := disk.OpenAB(d)
	if err != nil {
		t.Fatal(err)
	}
	state, err := ab.BootState()
	if err != nil || state.Next != infrav1.SlotA || state.Tries != 3 {
		t.Fatalf("boot state %+v %v; want slot A armed with 3 tries", state, err)
	}
	meta, err := ab.ReadConfigDrive("meta-data")
	if err != nil || !strings.Contains(string(meta), "anvil://ns/h-0") {
		t.Errorf("meta-data %q %v", meta, err)
	}
	user, err := ab.ReadConfigDrive("user-data")
	if err != nil || !strings.Contains(string(user), "kubeadm join") {
		t.Errorf("user-data does not carry the bootstrap data: %v", err)
	}
}
