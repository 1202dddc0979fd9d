package bmc

import (
	"strings"
	"time"

	"github.com/bmc-toolbox/common"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	infrav1 "github.com/anvil-metal/cluster-api-provider-anvil/api/v1alpha1"
)

// inventoryFromDevice maps bmclib's device model onto the host's hardware inventory. What a
// BMC cannot see (NUMA layout, in-band disk names) is filled later by the agent.
func inventoryFromDevice(dev *common.Device) *infrav1.HardwareInventory {
	now := metav1.NewTime(time.Now().UTC().Truncate(time.Second))
	inv := &infrav1.HardwareInventory{Source: "OutOfBand", InspectedAt: &now}
	if dev == nil {
		return inv
	}
	inv.System = infrav1.SystemInfo{Manufacturer: dev.Vendor, Model: firstNonEmpty(dev.Model, dev.ProductName), SerialNumber: dev.Serial}
	if dev.BIOS != nil && dev.BIOS.Firmware != nil {
		inv.System.Firmware = dev.BIOS.Firmware.Installed
	}
	if dev.BMC != nil && dev.BMC.Firmware != nil {
		inv.System.BMCFirmware = dev.BMC.Firmware.Installed
	}

	for _, cpu := range dev.CPUs {
		if cpu == nil {
			continue
		}
		inv.CPU.Sockets++
		inv.CPU.Cores += int32(cpu.Cores)     //nolint:gosec // core counts are small
		inv.CPU.Threads += int32(cpu.Threads) //nolint:gosec // thread counts are small
		if inv.CPU.Model == "" {
			inv.CPU.Model = firstNonEmpty(cpu.Model, cpu.ProductName)
		}
		if inv.CPU.Arch == "" {
			inv.CPU.Arch = GoArch(cpu.Architecture)
		}
	}

	var memBytes int64
	for _, m := range dev.Memory {
		if m != nil {
			memBytes += m.SizeBytes
		}
	}
	if memBytes > 0 {
		inv.Memory = resource.NewQuantity(memBytes, resource.BinarySI)
	}

	for _, d := range dev.Drives {
		if d == nil {
			continue
		}
		inv.Disks = append(inv.Disks, infrav1.Disk{
			Name: firstNonEmpty(d.LogicalName, d.ID, d.Description), SizeBytes: d.CapacityBytes,
			Type: diskType(d.Type, d.Protocol), Model: d.Model, SerialNumber: d.Serial, WWN: d.WWN,
		})
	}

	for _, nic := range dev.NICs {
		if nic == nil {
			continue
		}
		for _, port := range nic.NICPorts {
			if port == nil || port.MacAddress == "" {
				continue
			}
			n := infrav1.NIC{Name: firstNonEmpty(port.ID, nic.ID), MACAddress: strings.ToLower(port.MacAddress),
				SpeedMbps: int32(port.SpeedBits / 1_000_000)} //nolint:gosec // link speeds fit
			if port.LinkStatus != "" {
				up := strings.EqualFold(port.LinkStatus, "linkup") || strings.EqualFold(port.LinkStatus, "up")
				n.LinkUp = &up
			}
			inv.NICs = append(inv.NICs, n)
		}
	}

	for _, gpu := range dev.GPUs {
		if gpu != nil {
			inv.Accelerators = append(inv.Accelerators, infrav1.Accelerator{Vendor: gpu.Vendor, Model: firstNonEmpty(gpu.Model, gpu.ProductName), Class: "GPU"})
		}
	}
	return inv
}

// GoArch maps Redfish/SMBIOS architecture names onto Go's (which Kubernetes uses for
// kubernetes.io/arch).
func GoArch(a string) string {
	switch strings.ToLower(strings.ReplaceAll(a, "_", "-")) {
	case "x86", "x86-64", "x64", "amd64", "intel64":
		return "amd64"
	case "arm", "arm-a64", "aarch64", "arm64":
		return "arm64"
	case "power", "ppc64le":
		return "ppc64le"
	default:
		return strings.ToLower(a)
	}
}

func diskType(mediaType, protocol string) infrav1.DiskType {
	switch {
	case strings.EqualFold(protocol, "nvme"):
		return infrav1.DiskNVMe
	case strings.EqualFold(mediaType, "ssd"):
		return infrav1.DiskSSD
	case strings.EqualFold(mediaType, "hdd"):
		return infrav1.DiskHDD
	default:
		return infrav1.DiskUnknown
	}
}

func firstNonEmpty(s ...string) string {
	for _, v := range s {
		if v != "" {
			return v
		}
	}
	return ""
}
