package bmc

import (
	"strings"

	infrav1 "github.com/anvil-metal/cluster-api-provider-anvil/api/v1alpha1"
)

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
