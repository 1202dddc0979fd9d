package agent

import (
	"bufio"
	"net"
	"os"
	"path/filepath"
	"runtime"
	"sort"
	"strconv"
	"strings"
	"time"

	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	infrav1 "github.com/anvil-metal/cluster-api-provider-anvil/api/v1alpha1"
)

// InventoryOptions tune Inventory.
type InventoryOptions struct {
	Roots Roots
	// Addrs returns the IP addresses of an interface; nil uses the running kernel's (tests
	// with a fake sysfs tree pass their own).
	Addrs func(iface string) []string
	// Now stamps the inventory; nil uses time.Now.
	Now func() time.Time
}

// Inventory collects the in-band hardware inventory from procfs and sysfs.
func Inventory(opts InventoryOptions) (*infrav1.HardwareInventory, error) {
	roots := opts.Roots.withDefaults()
	if opts.Addrs == nil {
		opts.Addrs = interfaceAddrs
	}
	now := time.Now
	if opts.Now != nil {
		now = opts.Now
	}
	inv := &infrav1.HardwareInventory{Source: "InBand"}
	t := metav1.NewTime(now())
	inv.InspectedAt = &t

	dmi := filepath.Join(roots.Sys, "class", "dmi", "id")
	inv.System = infrav1.SystemInfo{
		Manufacturer: readTrim(filepath.Join(dmi, "sys_vendor")),
		Model:        readTrim(filepath.Join(dmi, "product_name")),
		SerialNumber: readTrim(filepath.Join(dmi, "product_serial")),
		UUID:         strings.ToLower(readTrim(filepath.Join(dmi, "product_uuid"))),
		Firmware:     readTrim(filepath.Join(dmi, "bios_version")),
	}
	cpu, err := cpuInfo(filepath.Join(roots.Proc, "cpuinfo"))
	if err != nil {
		return nil, err
	}
	inv.CPU = cpu
	inv.NUMANodes = numaNodes(filepath.Join(roots.Sys, "devices", "system", "node"))
	if mem := memoryBytes(roots); mem > 0 {
		inv.Memory = resource.NewQuantity(mem, resource.BinarySI)
	}
	disks, err := ListDisks(roots)
	if err != nil {
		return nil, err
	}
	for _, d := range disks {
		inv.Disks = append(inv.Disks, infrav1.Disk{Name: d.Path, SizeBytes: d.SizeBytes, Type: d.Type,
			Model: strings.TrimSpace(d.Vendor + " " + d.Model), SerialNumber: d.Serial, WWN: d.WWN})
	}
	inv.NICs = nics(filepath.Join(roots.Sys, "class", "net"), opts.Addrs)
	inv.Accelerators = accelerators(filepath.Join(roots.Sys, "bus", "pci", "devices"))
	return inv, nil
}

// cpuInfo counts sockets (distinct physical ids), cores (distinct physical id/core id pairs)
// and threads (processor entries).
func cpuInfo(path string) (infrav1.CPUInfo, error) {
	f, err := os.Open(path)
	if err != nil {
		return infrav1.CPUInfo{}, err
	}
	defer func() { _ = f.Close() }()
	info := infrav1.CPUInfo{Arch: runtime.GOARCH}
	sockets := map[string]bool{}
	cores := map[string]bool{}
	var threads int32
	phys, core := "0", ""
	flush := func() {
		if core != "" {
			cores[phys+"/"+core] = true
		}
		phys, core = "0", ""
	}
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		k, v, ok := strings.Cut(sc.Text(), ":")
		k, v = strings.TrimSpace(k), strings.TrimSpace(v)
		if !ok {
			if strings.TrimSpace(sc.Text()) == "" {
				flush()
			}
			continue
		}
		switch k {
		case "processor":
			threads++
		case "model name", "Model Name":
			if info.Model == "" {
				info.Model = v
			}
		case "physical id":
			phys = v
			sockets[v] = true
		case "core id":
			core = v
		}
	}
	flush()
	if err := sc.Err(); err != nil {
		return info, err
	}
	info.Threads = threads
	info.Sockets = int32(max(len(sockets), 1)) //nolint:gosec // small counts
	info.Cores = int32(len(cores))             //nolint:gosec // small counts
	if info.Cores == 0 {
		info.Cores = threads // no topology in cpuinfo (some VMs, arm64)
	}
	return info, nil
}

func numaNodes(dir string) []infrav1.NUMANode {
	ents, err := os.ReadDir(dir)
	if err != nil {
		return nil
	}
	var out []infrav1.NUMANode
	for _, e := range ents {
		idStr, ok := strings.CutPrefix(e.Name(), "node")
		id, err := strconv.Atoi(idStr)
		if !ok || err != nil {
			continue
		}
		n := infrav1.NUMANode{ID: int32(id), CPUs: readTrim(filepath.Join(dir, e.Name(), "cpulist"))} //nolint:gosec // small
		// "Node 0 MemTotal:       32768000 kB"
		for _, line := range strings.Split(readTrim(filepath.Join(dir, e.Name(), "meminfo")), "\n") {
			fields := strings.Fields(line)
			if len(fields) >= 4 && fields[2] == "MemTotal:" {
				if kb, err := strconv.ParseInt(fields[3], 10, 64); err == nil {
					n.Memory = resource.NewQuantity(kb*1024, resource.BinarySI)
				}
			}
		}
		out = append(out, n)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].ID < out[j].ID })
	return out
}

// memoryBytes prefers the online memory blocks (the installed RAM the kernel manages,
// without the firmware and kernel reservations MemTotal leaves out) and falls back to
// MemTotal.
func memoryBytes(roots Roots) int64 {
	mdir := filepath.Join(roots.Sys, "devices", "system", "memory")
	if bs, err := strconv.ParseInt(readTrim(filepath.Join(mdir, "block_size_bytes")), 16, 64); err == nil && bs > 0 {
		if ents, err := os.ReadDir(mdir); err == nil {
			var n int64
			for _, e := range ents {
				if strings.HasPrefix(e.Name(), "memory") && readTrim(filepath.Join(mdir, e.Name(), "online")) == "1" {
					n++
				}
			}
			if n > 0 {
				return n * bs
			}
		}
	}
	for _, line := range strings.Split(readTrim(filepath.Join(roots.Proc, "meminfo")), "\n") {
		fields := strings.Fields(line)
		if len(fields) >= 2 && fields[0] == "MemTotal:" {
			kb, _ := strconv.ParseInt(fields[1], 10, 64)
			return kb * 1024
		}
	}
	return 0
}

// nics lists interfaces backed by a device (physical NICs and their virtual functions; not
// lo, bridges, bonds or veths).
func nics(dir string, addrs func(string) []string) []infrav1.NIC {
	ents, err := os.ReadDir(dir)
	if err != nil {
		return nil
	}
	var out []infrav1.NIC
	for _, e := range ents {
		p := filepath.Join(dir, e.Name())
		if _, err := os.Stat(filepath.Join(p, "device")); err != nil {
			continue
		}
		mac := readTrim(filepath.Join(p, "address"))
		if mac == "" {
			continue
		}
		n := infrav1.NIC{Name: e.Name(), MACAddress: mac}
		if s, err := strconv.Atoi(readTrim(filepath.Join(p, "speed"))); err == nil && s > 0 {
			n.SpeedMbps = int32(s) //nolint:gosec // link speeds fit
		}
		up := readTrim(filepath.Join(p, "carrier")) == "1"
		n.LinkUp = &up
		n.IPs = addrs(e.Name())
		out = append(out, n)
	}
	return out
}

func interfaceAddrs(name string) []string {
	ifc, err := net.InterfaceByName(name)
	if err != nil {
		return nil
	}
	as, err := ifc.Addrs()
	if err != nil {
		return nil
	}
	var out []string
	for _, a := range as {
		if ipn, ok := a.(*net.IPNet); ok && !ipn.IP.IsLinkLocalUnicast() {
			out = append(out, ipn.IP.String())
		}
	}
	return out
}

// accelerators lists GPUs and processing accelerators by PCI class: 0x0302 (3D controller),
// 0x0300 (VGA) except the BMC's and emulated display adapters, and 0x12 (processing
// accelerators).
func accelerators(dir string) []infrav1.Accelerator {
	ents, err := os.ReadDir(dir)
	if err != nil {
		return nil
	}
	var out []infrav1.Accelerator
	for _, e := range ents {
		p := filepath.Join(dir, e.Name())
		class, err := strconv.ParseUint(strings.TrimPrefix(readTrim(filepath.Join(p, "class")), "0x"), 16, 32)
		if err != nil {
			continue
		}
		vendor := strings.TrimPrefix(readTrim(filepath.Join(p, "vendor")), "0x")
		device := strings.TrimPrefix(readTrim(filepath.Join(p, "device")), "0x")
		var kind string
		switch {
		case class>>8 == 0x0302:
			kind = "GPU"
		case class>>8 == 0x0300 && !displayOnlyVendor(vendor):
			kind = "GPU"
		case class>>16 == 0x12:
			kind = "ProcessingAccelerator"
		default:
			continue
		}
		out = append(out, infrav1.Accelerator{Vendor: pciVendorName(vendor), Model: vendor + ":" + device, Class: kind, PCIAddress: e.Name()})
	}
	return out
}

// displayOnlyVendor are makers of BMC and emulated display adapters (ASPEED, Matrox, QEMU,
// Red Hat QXL/virtio, Cirrus) that are not compute GPUs.
func displayOnlyVendor(v string) bool {
	switch strings.ToLower(v) {
	case "1a03", "102b", "1234", "1b36", "1af4", "1013":
		return true
	}
	return false
}

func pciVendorName(v string) string {
	switch strings.ToLower(v) {
	case "10de":
		return "NVIDIA"
	case "1002":
		return "AMD"
	case "8086":
		return "Intel"
	case "1da3":
		return "Habana"
	}
	return v
}
