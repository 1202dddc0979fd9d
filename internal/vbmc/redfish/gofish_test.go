package redfish

import (
	"crypto/tls"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/stmcginnis/gofish"
	"github.com/stmcginnis/gofish/redfish"
)

// TestGofish drives the emulator with gofish v0.20.0, the library under bmclib's
// Redfish provider, over verified TLS, with session and with Basic auth.
func TestGofish(t *testing.T) {
	for _, mk := range Mockups() {
		for _, basic := range []bool{false, true} {
			name := string(mk) + "/session"
			if basic {
				name = string(mk) + "/basic"
			}
			t.Run(name, func(t *testing.T) { testGofish(t, mk, basic) })
		}
	}
}

func testGofish(t *testing.T, mk Mockup, basicAuth bool) {
	// Basic auth runs against DMTF's own ids, sessions against the vendor-style ones.
	s, b := startBMC(t, ServerOptions{TLS: true}, BMCOptions{Mockup: mk, MockupIDs: basicAuth, Username: "ops", Password: "s3cret",
		Identity: NewIdentity(42), Hardware: Hardware{Processors: 2, MemoryGiB: 64}})
	httpClient := &http.Client{
		Timeout:   10 * time.Second,
		Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: s.CertPool()}},
	}
	api, err := gofish.Connect(gofish.ClientConfig{Endpoint: b.URL(), Username: "ops", Password: "s3cret",
		BasicAuth: basicAuth, HTTPClient: httpClient})
	if err != nil {
		t.Fatal(err)
	}
	if want := map[bool]int{false: 1, true: 0}[basicAuth]; b.Sessions() != want {
		t.Fatalf("%d sessions open, want %d", b.Sessions(), want)
	}
	service := api.GetService()

	systems, err := service.Systems()
	if err != nil || len(systems) != 1 {
		t.Fatalf("systems %v, %v", len(systems), err)
	}
	sys := systems[0]
	if sys.SerialNumber != "ANV0000042" || sys.UUID != NewIdentity(42).UUID {
		t.Fatalf("identity %s %s", sys.SerialNumber, sys.UUID)
	}

	// Inventory.
	procs, err := sys.Processors()
	if err != nil {
		t.Fatal(err)
	}
	cpus := 0
	for _, p := range procs {
		if p.ProcessorType == redfish.CPUProcessorType {
			cpus++
			if p.TotalCores == 0 {
				t.Errorf("CPU %s has no cores", p.ID)
			}
		}
	}
	if cpus != 2 || sys.ProcessorSummary.Count != 2 {
		t.Fatalf("%d CPUs, summary %d", cpus, sys.ProcessorSummary.Count)
	}
	dimms, err := sys.Memory()
	if err != nil {
		t.Fatal(err)
	}
	var mib int
	for _, d := range dimms {
		mib += d.CapacityMiB
	}
	if mib != 64*1024 || sys.MemorySummary.TotalSystemMemoryGiB != 64 {
		t.Fatalf("memory %d MiB, summary %v GiB", mib, sys.MemorySummary.TotalSystemMemoryGiB)
	}
	nics, err := sys.EthernetInterfaces()
	if err != nil {
		t.Fatal(err)
	}
	if mk != MockupSmartNIC {
		if len(nics) == 0 || !strings.HasPrefix(nics[0].MACAddress, "02:A7:00:00:2A:") {
			t.Fatalf("NICs %d, first MAC %q", len(nics), macOf(nics))
		}
	}
	switch mk {
	case MockupLocalStorage:
		storage, err := sys.Storage()
		if err != nil || len(storage) == 0 {
			t.Fatalf("storage %d %v", len(storage), err)
		}
		drives, err := storage[0].Drives()
		if err != nil || len(drives) != 4 {
			t.Fatalf("drives %d %v", len(drives), err)
		}
		if drives[0].CapacityBytes == 0 {
			t.Errorf("drive %s has no capacity", drives[0].ID)
		}
	default:
		simple, err := sys.SimpleStorages()
		if err != nil || len(simple) == 0 || len(simple[0].Devices) == 0 {
			t.Fatalf("simple storage %d %v", len(simple), err)
		}
	}

	// Power.
	for _, step := range []struct {
		reset redfish.ResetType
		want  redfish.PowerState
	}{{redfish.OnResetType, redfish.OnPowerState}, {redfish.ForceOffResetType, redfish.OffPowerState},
		{redfish.PowerCycleResetType, redfish.OnPowerState}, {redfish.GracefulShutdownResetType, redfish.OffPowerState}} {
		sys = onlySystem(t, service)
		if err := sys.Reset(step.reset); err != nil {
			t.Fatalf("reset %s: %v", step.reset, err)
		}
		if got := onlySystem(t, service).PowerState; got != step.want {
			t.Fatalf("after %s: %s, want %s", step.reset, got, step.want)
		}
	}

	// Boot override: gofish sends If-Match with the ETag it read.
	sys = onlySystem(t, service)
	if err := sys.SetBoot(redfish.Boot{BootSourceOverrideTarget: redfish.PxeBootSourceOverrideTarget,
		BootSourceOverrideEnabled: redfish.OnceBootSourceOverrideEnabled,
		BootSourceOverrideMode:    redfish.UEFIBootSourceOverrideMode}); err != nil {
		t.Fatal(err)
	}
	boot := onlySystem(t, service).Boot
	if boot.BootSourceOverrideTarget != redfish.PxeBootSourceOverrideTarget || boot.BootSourceOverrideEnabled != redfish.OnceBootSourceOverrideEnabled {
		t.Fatalf("boot read back %+v", boot)
	}
	// A stale object's ETag is refused, as real BMCs do.
	if err := sys.SetBoot(redfish.Boot{BootSourceOverrideTarget: redfish.HddBootSourceOverrideTarget}); err == nil ||
		!strings.Contains(err.Error(), "412") {
		t.Fatalf("stale If-Match accepted: %v", err)
	}
	if err := sys.SetBoot(redfish.Boot{BootSourceOverrideTarget: "Teleport"}); err == nil {
		t.Fatal("bad target accepted")
	}

	// Virtual media through the manager, where gofish and bmclib look.
	managers, err := service.Managers()
	if err != nil || len(managers) != 1 {
		t.Fatalf("managers %d %v", len(managers), err)
	}
	media, err := managers[0].VirtualMedia()
	if err != nil || len(media) == 0 {
		t.Fatalf("virtual media %d %v", len(media), err)
	}
	var cd *redfish.VirtualMedia
	for _, m := range media {
		if m.ID == "CD1" {
			cd = m
		}
	}
	if cd == nil || !cd.SupportsMediaInsert || !cd.SupportsMediaEject {
		t.Fatalf("CD1 %+v", cd)
	}
	if err := cd.InsertMedia("https://images.example/agent.iso", true, true); err != nil {
		t.Fatal(err)
	}
	cd, err = redfish.GetVirtualMedia(api, cd.ODataID)
	if err != nil || !cd.Inserted || cd.Image != "https://images.example/agent.iso" {
		t.Fatalf("after insert %+v %v", cd, err)
	}
	if err := cd.EjectMedia(); err != nil {
		t.Fatal(err)
	}
	cd, err = redfish.GetVirtualMedia(api, cd.ODataID)
	if err != nil || cd.Inserted {
		t.Fatalf("after eject %+v %v", cd, err)
	}

	api.Logout()
	if b.Sessions() != 0 {
		t.Fatalf("%d sessions after logout", b.Sessions())
	}
}

func onlySystem(t *testing.T, service *gofish.Service) *redfish.ComputerSystem {
	t.Helper()
	systems, err := service.Systems()
	if err != nil || len(systems) != 1 {
		t.Fatalf("systems %d %v", len(systems), err)
	}
	return systems[0]
}

func macOf(nics []*redfish.EthernetInterface) string {
	if len(nics) == 0 {
		return ""
	}
	return nics[0].MACAddress
}

func TestGofishWrongPassword(t *testing.T) {
	_, b := startBMC(t, ServerOptions{}, BMCOptions{})
	_, err := gofish.Connect(gofish.ClientConfig{Endpoint: b.URL(), Username: "admin", Password: "wrong"})
	if err == nil || !strings.Contains(err.Error(), "401") {
		t.Fatalf("login with a wrong password: %v", err)
	}
}
