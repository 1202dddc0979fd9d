package bmc

import (
	"sort"
	"strings"
	"time"

	"github.com/stmcginnis/gofish/redfish"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	infrav1 "github.com/anvil-metal/cluster-api-provider-anvil/api/v1alpha1"
)

// redfishInventory reads the ComputerSystem's Processors, Memory, EthernetInterfaces and
// Storage/Drives, over the session that read the system. bmclib's own Inventory finds NICs
// only through NetworkAdapters, reads no MACs, and ignores systems not named like a vendor's,
// so it misses most of what placement needs. Sub-collections a BMC fails to serve are left
// out rather than failing the inspection.
func redfishInventory(sys *redfish.ComputerSystem) *infrav1.HardwareInventory {
	now := metav1.NewTime(time.Now().UTC().Truncate(time.Second))
	inv := &infrav1.HardwareInventory{Source: "OutOfBand", InspectedAt: &now, System: infrav1.SystemInfo{
		Manufacturer: sys.Manufacturer, Model: sys.Model, SerialNumber: sys.SerialNumber, UUID: sys.UUID, Firmware: sys.BIOSVersion,
	}}

	if procs, err := sys.Processors(); err == nil {
		for _, p := range procs {
			switch p.ProcessorType {
			case redfish.GPUProcessorType, redfish.AcceleratorProcessorType, redfish.FPGAProcessorType:
				inv.Accelerators = append(inv.Accelerators, infrav1.Accelerator{Vendor: p.Manufacturer, Model: p.Model, Class: acceleratorClass(p.ProcessorType)})
				continue
			}
			inv.CPU.Sockets++
			inv.CPU.Cores += int32(p.TotalCores)     //nolint:gosec // small counts
			inv.CPU.Threads += int32(p.TotalThreads) //nolint:gosec // small counts
			if inv.CPU.Model == "" {
				inv.CPU.Model = p.Model
			}
			if inv.CPU.Arch == "" {
				inv.CPU.Arch = GoArch(firstNonEmpty(string(p.InstructionSet), string(p.ProcessorArchitecture)))
			}
		}
	}

	memGiB := float64(sys.MemorySummary.TotalSystemMemoryGiB)
	if memGiB == 0 {
		if dimms, err := sys.Memory(); err == nil {
			for _, d := range dimms {
				memGiB += float64(d.CapacityMiB) / 1024
			}
		}
	}
	if memGiB > 0 {
		inv.Memory = resource.NewQuantity(int64(memGiB*(1<<30)), resource.BinarySI)
	}

	if nics, err := sys.EthernetInterfaces(); err == nil {
		for _, n := range nics {
			mac := strings.ToLower(firstNonEmpty(n.PermanentMACAddress, n.MACAddress))
			if mac == "" {
				continue
			}
			up := n.LinkStatus == redfish.LinkUpLinkStatus
			inv.NICs = append(inv.NICs, infrav1.NIC{Name: n.ID, MACAddress: mac, SpeedMbps: int32(n.SpeedMbps), LinkUp: &up}) //nolint:gosec // link speeds fit
		}
	}

	if storages, err := sys.Storage(); err == nil {
		for _, st := range storages {
			drives, err := st.Drives()
			if err != nil {
				continue
			}
			for _, d := range drives {
				inv.Disks = append(inv.Disks, infrav1.Disk{Name: firstNonEmpty(d.Name, d.ID), SizeBytes: d.CapacityBytes,
					Type: diskType(string(d.MediaType), string(d.Protocol)), Model: d.Model, SerialNumber: d.SerialNumber})
			}
		}
	}
	SortInventory(inv)
	return inv
}

// SortInventory orders lists by stable keys: BMCs list collection members in any order, and an
// unordered list would rewrite status on every inspection.
func SortInventory(inv *infrav1.HardwareInventory) {
	sort.SliceStable(inv.NICs, func(i, j int) bool {
		if inv.NICs[i].MACAddress != inv.NICs[j].MACAddress {
			return inv.NICs[i].MACAddress < inv.NICs[j].MACAddress
		}
		return inv.NICs[i].Name < inv.NICs[j].Name
	})
	sort.SliceStable(inv.Disks, func(i, j int) bool { return inv.Disks[i].Name < inv.Disks[j].Name })
	sort.SliceStable(inv.Accelerators, func(i, j int) bool {
		return inv.Accelerators[i].PCIAddress+inv.Accelerators[i].Model < inv.Accelerators[j].PCIAddress+inv.Accelerators[j].Model
	})
	sort.SliceStable(inv.NUMANodes, func(i, j int) bool { return inv.NUMANodes[i].ID < inv.NUMANodes[j].ID })
}

func acceleratorClass(t redfish.ProcessorType) string {
	switch t {
	case redfish.GPUProcessorType:
		return "GPU"
	case redfish.FPGAProcessorType:
		return "FPGA"
	default:
		return "ProcessingAccelerator"
	}
}
