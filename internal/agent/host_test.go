package agent

import (
	"context"
	"crypto/rand"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
	"unsafe"

	infrav1 "github.com/anvil-metal/cluster-api-provider-anvil/api/v1alpha1"
	"github.com/anvil-metal/cluster-api-provider-anvil/internal/disk"
)

func TestSelectDisk(t *testing.T) {
	h := newFakeHost(t,
		fakeDisk{name: "nvme0n1", size: 960 * 1000 * 1000 * 1000, model: "SAMSUNG MZQL2960HCJR-00A07", serial: "S64FNE0R123456", wwid: "eui.36344630525012340025384500000001"},
		fakeDisk{name: "sda", size: 480 * 1000 * 1000 * 1000, model: "MTFDDAK480TDS", serial: "2117311AB7C1", wwid: "naa.500a07512b7c1ab7"},
		fakeDisk{name: "sdb", size: 4000 * 1000 * 1000 * 1000, model: "ST4000NM000A", serial: "ZC1A2B3C", wwid: "naa.5000c500d1234567", rotational: true},
		fakeDisk{name: "sdc", size: 32 * 1000 * 1000 * 1000, model: "USB Flash", serial: "USB1", removable: true},
	)
	disks, err := ListDisks(h.roots)
	if err != nil {
		t.Fatal(err)
	}
	if len(disks) != 4 || disks[0].Name != "nvme0n1" || disks[0].Type != infrav1.DiskNVMe || disks[1].Serial != "2117311AB7C1" ||
		disks[3].Type != infrav1.DiskSSD || disks[2].Type != infrav1.DiskHDD {
		t.Fatalf("%+v", disks)
	}
	// by-path link as the device name hint.
	byPath := filepath.Join(h.roots.Dev, "disk", "by-path")
	if err := os.MkdirAll(byPath, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink("../../sdb", filepath.Join(byPath, "pci-0000:00:17.0-ata-2")); err != nil {
		t.Fatal(err)
	}
	yes, no := true, false
	for _, tc := range []struct {
		hints *infrav1.RootDeviceHints
		want  string
	}{
		{nil, "sda"}, // smallest non-removable
		{&infrav1.RootDeviceHints{DeviceName: "/dev/nvme0n1"}, "nvme0n1"},
		{&infrav1.RootDeviceHints{DeviceName: "/dev/disk/by-path/pci-0000:00:17.0-ata-2"}, "sdb"},
		{&infrav1.RootDeviceHints{SerialNumber: "zc1a2b3c"}, "sdb"},
		{&infrav1.RootDeviceHints{WWN: "0x500A07512B7C1AB7"}, "sda"},
		{&infrav1.RootDeviceHints{Model: "samsung"}, "nvme0n1"},
		{&infrav1.RootDeviceHints{Rotational: &yes}, "sdb"},
		{&infrav1.RootDeviceHints{Rotational: &no, MinSizeGigabytes: 500}, "nvme0n1"},
		{&infrav1.RootDeviceHints{Model: "USB"}, "sdc"}, // removable only when asked for
		{&infrav1.RootDeviceHints{Model: "MTFD", SerialNumber: "wrong"}, ""},
	} {
		got, err := SelectDisk(disks, tc.hints, 0, h.roots.Dev)
		if tc.want == "" {
			if !errors.Is(err, ErrNoMatchingDisk) || !strings.Contains(err.Error(), "serialNumber=wrong") {
				t.Errorf("%s: %v", describeHints(tc.hints), err)
			}
			continue
		}
		if err != nil || got.Name != tc.want {
			t.Errorf("%s: got %s (%v), want %s", describeHints(tc.hints), got.Name, err, tc.want)
		}
	}
	if _, err := SelectDisk(disks, nil, 5000*1000*1000*1000, h.roots.Dev); !errors.Is(err, ErrNoMatchingDisk) {
		t.Errorf("min size: %v", err)
	}
	all, err := WipeTargets(h.roots, WipeAllDisks, nil)
	if err != nil || len(all) != 3 {
		t.Fatalf("wipe all: %v %v", all, err)
	}
	one, err := WipeTargets(h.roots, WipeInstallDisk, &infrav1.RootDeviceHints{SerialNumber: "S64FNE0R123456"})
	if err != nil || len(one) != 1 || filepath.Base(one[0]) != "nvme0n1" {
		t.Fatalf("wipe install disk: %v %v", one, err)
	}
}

func TestWipeMetadata(t *testing.T) {
	h := newFakeHost(t, fakeDisk{name: "sda", size: 2 * disk.GiB})
	srv := newImageServer(t)
	installAGood(t, srv, h.path("sda"))
	d, _ := disk.Open(h.path("sda"))
	ab, err := disk.OpenAB(d)
	if err != nil {
		t.Fatal(err)
	}
	dataOff, _ := ab.Range(ab.Data)
	_ = d.Close()
	var phases []string
	res, err := Wipe(context.Background(), []string{h.path("sda")}, WipeOptions{Policy: infrav1.WipePolicyMetadata,
		Progress: func(p WipeProgress) { phases = append(phases, p.Phase) }})
	if err != nil {
		t.Fatal(err)
	}
	if !res[0].Verified || res[0].Method != "metadata" {
		t.Fatalf("%+v", res)
	}
	if !strings.Contains(strings.Join(phases, ","), "zero") || phases[len(phases)-1] != "verify" {
		t.Fatalf("phases %v", phases)
	}
	d, _ = disk.OpenReadOnly(h.path("sda"))
	defer func() { _ = d.Close() }()
	if _, _, err := disk.ReadGPT(d, d.Size, 512); err == nil {
		t.Fatal("partition table survived")
	}
	if _, err := disk.OpenAB(d); err == nil {
		t.Fatal("A/B layout survived")
	}
	// Signatures at the ends of the partitions are gone; the pattern in the middle of
	// DATA (user data, not metadata) is not this policy's business.
	if ok, _ := d.IsZero(dataOff, disk.MiB); !ok {
		t.Fatal("DATA head not wiped")
	}
	if ok, _ := d.IsZero(dataOff+disk.MiB, 4096); ok {
		t.Fatal("metadata wipe erased more than metadata")
	}
}

func TestWipeFullAndSecure(t *testing.T) {
	const size = 32 * disk.MiB
	h := newFakeHost(t, fakeDisk{name: "sda", size: size}, fakeDisk{name: "nvme0n1", size: size})
	fill := func(name string) {
		junk := make([]byte, size)
		_, _ = rand.Read(junk)
		if err := os.WriteFile(h.path(name), junk, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	allZeroFile := func(name string) bool {
		b, err := os.ReadFile(h.path(name))
		if err != nil {
			t.Fatal(err)
		}
		return allZero(b)
	}
	fill("sda")
	fill("nvme0n1")
	var last WipeProgress
	res, err := Wipe(context.Background(), []string{h.path("sda"), h.path("nvme0n1")}, WipeOptions{Policy: infrav1.WipePolicyFull,
		ChunkSize: 1 << 20, Progress: func(p WipeProgress) {
			if p.Phase == "zero" {
				last = p
			}
		}})
	if err != nil {
		t.Fatal(err)
	}
	for _, r := range res {
		if !r.Verified || r.Method != "zero" {
			t.Fatalf("%+v", r)
		}
	}
	if last.Done != size || last.Total != size {
		t.Fatalf("progress %+v", last)
	}
	if !allZeroFile("sda") || !allZeroFile("nvme0n1") {
		t.Fatal("full wipe left data")
	}

	// Secure: an image file has no drive-level erase, so it falls back to overwriting.
	fill("sda")
	r, err := WipeDisk(context.Background(), h.path("sda"), WipeOptions{Policy: infrav1.WipePolicySecure, Samples: 32})
	if err != nil || r.Method != "zero" || !strings.Contains(r.Note, "not supported") || !r.Verified || !allZeroFile("sda") {
		t.Fatalf("secure fallback: %+v %v", r, err)
	}
	// A drive erase that does nothing is caught by the sampling.
	fill("sda")
	_, err = WipeDisk(context.Background(), h.path("sda"), WipeOptions{Policy: infrav1.WipePolicySecure, Secure: fakeEraser{}})
	if !errors.Is(err, ErrWipeVerify) {
		t.Fatalf("lying eraser: %v", err)
	}
	// A crypto erase (random data everywhere afterwards) verifies.
	r, err = WipeDisk(context.Background(), h.path("sda"), WipeOptions{Policy: infrav1.WipePolicySecure, Secure: fakeEraser{randomize: true}})
	if err != nil || r.Method != "fake-crypto-erase" || !r.Verified {
		t.Fatalf("crypto erase: %+v %v", r, err)
	}
}

type fakeEraser struct{ randomize bool }

func (f fakeEraser) Erase(_ context.Context, d *disk.Disk) (string, error) {
	if !f.randomize {
		return "fake-noop", nil
	}
	buf := make([]byte, 1<<20)
	for off := int64(0); off < d.Size; off += int64(len(buf)) {
		_, _ = rand.Read(buf)
		if _, err := d.WriteAt(buf, off); err != nil {
			return "", err
		}
	}
	return "fake-crypto-erase", d.Sync()
}

func TestNVMeFormatCommand(t *testing.T) {
	if unsafe.Sizeof(nvmeAdminCmd{}) != 72 {
		t.Fatalf("struct nvme_admin_cmd is 72 bytes, ours %d", unsafe.Sizeof(nvmeAdminCmd{}))
	}
	cmd, method := formatCmd(1, 0x01, 0x04)
	if cmd.Opcode != 0x80 || cmd.NSID != 1 || cmd.Cdw10 != 1|2<<9 || method != "nvme-format-crypto-erase" {
		t.Fatalf("%+v %s", cmd, method)
	}
	cmd, method = formatCmd(2, 0x20|0x03, 0)
	if cmd.Cdw10 != 3|1<<12|1<<9 || method != "nvme-format-user-data-erase" {
		t.Fatalf("%+v %s", cmd, method)
	}
	// An image file is not an NVMe namespace.
	h := newFakeHost(t, fakeDisk{name: "nvme0n1", size: 8 * disk.MiB})
	d, _ := disk.Open(h.path("nvme0n1"))
	defer func() { _ = d.Close() }()
	if _, err := (nvmeEraser{}).Erase(context.Background(), d); !errors.Is(err, ErrSecureEraseUnsupported) {
		t.Fatal(err)
	}
}

func TestInventory(t *testing.T) {
	h := newFakeHost(t, fakeDisk{name: "nvme0n1", size: 960 * 1000 * 1000 * 1000, model: "SAMSUNG MZQL2960HCJR", serial: "S64F", wwid: "eui.3634"})
	w := func(rel, s string) {
		p := filepath.Join(filepath.Dir(h.roots.Sys), rel)
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(p, []byte(s), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	var cpuinfo strings.Builder
	for sock := 0; sock < 2; sock++ {
		for core := 0; core < 4; core++ {
			for thr := 0; thr < 2; thr++ {
				cpuinfo.WriteString("processor\t: 0\nmodel name\t: AMD EPYC 9124 16-Core Processor\nphysical id\t: " +
					itoa(sock) + "\ncore id\t\t: " + itoa(core) + "\n\n")
			}
		}
	}
	w("proc/cpuinfo", cpuinfo.String())
	w("proc/meminfo", "MemTotal:       65536000 kB\nMemFree: 1 kB\n")
	w("sys/devices/system/memory/block_size_bytes", "8000000\n")
	for i := 0; i < 512; i++ { // 512 x 128 MiB = 64 GiB
		w("sys/devices/system/memory/memory"+itoa(i)+"/online", "1\n")
	}
	w("sys/devices/system/node/node0/cpulist", "0-7\n")
	w("sys/devices/system/node/node0/meminfo", "Node 0 MemTotal:       33554432 kB\nNode 0 MemFree: 1 kB\n")
	w("sys/devices/system/node/node1/cpulist", "8-15\n")
	w("sys/devices/system/node/node1/meminfo", "Node 1 MemTotal:       33554432 kB\n")
	w("sys/devices/system/node/possible", "0-1\n")
	w("sys/class/dmi/id/sys_vendor", "Supermicro\n")
	w("sys/class/dmi/id/product_name", "AS-1115CS-TNR\n")
	w("sys/class/dmi/id/product_serial", "S123\n")
	w("sys/class/dmi/id/product_uuid", "00000000-0000-0000-0000-3CECEF000001\n")
	w("sys/class/dmi/id/bios_version", "1.4a\n")
	w("sys/class/net/eno1/address", "3c:ec:ef:00:00:01\n")
	w("sys/class/net/eno1/speed", "25000\n")
	w("sys/class/net/eno1/carrier", "1\n")
	w("sys/class/net/eno1/device/vendor", "0x15b3\n")
	w("sys/class/net/lo/address", "00:00:00:00:00:00\n")
	w("sys/class/net/br0/address", "3c:ec:ef:00:00:09\n")
	for addr, d := range map[string][3]string{
		"0000:01:00.0": {"0x030200", "0x10de", "0x2330"}, // NVIDIA H100
		"0000:03:00.0": {"0x030000", "0x1a03", "0x2000"}, // ASPEED BMC VGA: not a GPU
		"0000:04:00.0": {"0x120000", "0x1da3", "0x1020"}, // Habana Gaudi
		"0000:05:00.0": {"0x020000", "0x15b3", "0x101d"}, // a NIC
	} {
		w("sys/bus/pci/devices/"+addr+"/class", d[0]+"\n")
		w("sys/bus/pci/devices/"+addr+"/vendor", d[1]+"\n")
		w("sys/bus/pci/devices/"+addr+"/device", d[2]+"\n")
	}
	now := time.Date(2025, 1, 2, 3, 4, 5, 0, time.UTC)
	inv, err := Inventory(InventoryOptions{Roots: h.roots, Now: func() time.Time { return now },
		Addrs: func(n string) []string { return map[string][]string{"eno1": {"10.0.0.5"}}[n] }})
	if err != nil {
		t.Fatal(err)
	}
	if inv.Source != "InBand" || !inv.InspectedAt.Time.Equal(now) {
		t.Fatalf("%+v", inv)
	}
	if inv.CPU.Sockets != 2 || inv.CPU.Cores != 8 || inv.CPU.Threads != 16 || inv.CPU.Model != "AMD EPYC 9124 16-Core Processor" {
		t.Fatalf("cpu %+v", inv.CPU)
	}
	if inv.Memory == nil || inv.Memory.Value() != 64<<30 {
		t.Fatalf("memory %v", inv.Memory)
	}
	if len(inv.NUMANodes) != 2 || inv.NUMANodes[1].CPUs != "8-15" || inv.NUMANodes[0].Memory.Value() != 32<<30 {
		t.Fatalf("numa %+v", inv.NUMANodes)
	}
	if inv.System.Manufacturer != "Supermicro" || inv.System.UUID != "00000000-0000-0000-0000-3cecef000001" || inv.System.Firmware != "1.4a" {
		t.Fatalf("system %+v", inv.System)
	}
	if len(inv.Disks) != 1 || inv.Disks[0].Type != infrav1.DiskNVMe || inv.Disks[0].SerialNumber != "S64F" || inv.Disks[0].WWN != "eui.3634" {
		t.Fatalf("disks %+v", inv.Disks)
	}
	if len(inv.NICs) != 1 || inv.NICs[0].MACAddress != "3c:ec:ef:00:00:01" || inv.NICs[0].SpeedMbps != 25000 || !*inv.NICs[0].LinkUp ||
		inv.NICs[0].IPs[0] != "10.0.0.5" {
		t.Fatalf("nics %+v", inv.NICs)
	}
	if len(inv.Accelerators) != 2 || inv.Accelerators[0].Vendor != "NVIDIA" || inv.Accelerators[0].Class != "GPU" ||
		inv.Accelerators[1].Class != "ProcessingAccelerator" {
		t.Fatalf("accelerators %+v", inv.Accelerators)
	}
	// Memory falls back to MemTotal without memory blocks.
	_ = os.RemoveAll(filepath.Join(h.roots.Sys, "devices", "system", "memory"))
	inv, _ = Inventory(InventoryOptions{Roots: h.roots, Addrs: func(string) []string { return nil }})
	if inv.Memory.Value() != 65536000*1024 {
		t.Fatalf("MemTotal fallback %v", inv.Memory)
	}
}

func itoa(i int) string {
	var b [20]byte
	n := len(b)
	for {
		n--
		b[n] = byte('0' + i%10)
		i /= 10
		if i == 0 {
			return string(b[n:])
		}
	}
}

func TestRunningHostInventory(t *testing.T) {
	// The real /proc and /sys of the test machine: no error, plausible numbers.
	inv, err := Inventory(InventoryOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if inv.CPU.Threads < 1 || inv.Memory == nil || inv.Memory.Value() < 1<<28 {
		t.Fatalf("%+v", inv)
	}
}
