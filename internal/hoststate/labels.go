package hoststate

import (
	"regexp"
	"strconv"
	"strings"

	"k8s.io/apimachinery/pkg/api/resource"

	infrav1 "github.com/anvil-metal/cluster-api-provider-anvil/api/v1alpha1"
)

// Hardware labels, so that plain label selectors pick hosts by hardware.
const (
	LabelArch      = infrav1.LabelDomain + "/arch"
	LabelCPUCores  = infrav1.LabelDomain + "/cpu-cores"
	LabelMemoryGiB = infrav1.LabelDomain + "/memory-gib"
	LabelGPUCount  = infrav1.LabelDomain + "/gpu-count"
	LabelGPUModel  = infrav1.LabelDomain + "/gpu-model"
	LabelNUMANodes = infrav1.LabelDomain + "/numa-nodes"
)

var hardwareLabels = []string{LabelArch, LabelCPUCores, LabelMemoryGiB, LabelGPUCount, LabelGPUModel, LabelNUMANodes}

// IsHardwareLabel says whether key is one of the hardware labels this package sets.
func IsHardwareLabel(key string) bool {
	for _, k := range hardwareLabels {
		if k == key {
			return true
		}
	}
	return false
}

// ApplyHardwareLabels sets the hardware labels from status.hardware and removes those that no
// longer apply (a GPU pulled during maintenance must not keep attracting GPU workloads).
func ApplyHardwareLabels(h *infrav1.AnvilHost) {
	want := HardwareLabels(h.Status.Hardware)
	if h.Labels == nil {
		h.Labels = map[string]string{}
	}
	for _, k := range hardwareLabels {
		if v, ok := want[k]; ok {
			h.Labels[k] = v
		} else {
			delete(h.Labels, k)
		}
	}
}

// HardwareLabels computes the labels for an inventory.
func HardwareLabels(inv *infrav1.HardwareInventory) map[string]string {
	labels := map[string]string{}
	if inv == nil {
		return labels
	}
	if inv.CPU.Arch != "" {
		labels[LabelArch] = labelValue(inv.CPU.Arch)
	}
	if inv.CPU.Cores > 0 {
		labels[LabelCPUCores] = strconv.Itoa(int(inv.CPU.Cores))
	}
	if gib := MemoryGiB(inv.Memory); gib > 0 {
		labels[LabelMemoryGiB] = strconv.FormatInt(gib, 10)
	}
	gpus := 0
	model := ""
	for _, a := range inv.Accelerators {
		if a.Class == "GPU" {
			gpus++
			if model == "" {
				model = a.Model
			}
		}
	}
	if gpus > 0 {
		labels[LabelGPUCount] = strconv.Itoa(gpus)
		if v := labelValue(model); v != "" {
			labels[LabelGPUModel] = v
		}
	}
	if len(inv.NUMANodes) > 0 {
		labels[LabelNUMANodes] = strconv.Itoa(len(inv.NUMANodes))
	}
	return labels
}

// MemoryGiB rounds memory down to whole GiB.
func MemoryGiB(q *resource.Quantity) int64 {
	if q == nil {
		return 0
	}
	return q.Value() >> 30
}

func quantityString(q *resource.Quantity) string {
	if q == nil {
		return "unknown"
	}
	return strconv.FormatInt(MemoryGiB(q), 10) + " GiB"
}

var notLabelChars = regexp.MustCompile(`[^A-Za-z0-9._-]+`)

// labelValue makes s a valid label value: allowed characters only, at most 63, starting
// and ending alphanumeric.
func labelValue(s string) string {
	v := notLabelChars.ReplaceAllString(strings.TrimSpace(s), "-")
	if len(v) > 63 {
		v = v[:63]
	}
	return strings.Trim(v, "-_.")
}
