package agent

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"

	infrav1 "github.com/anvil-metal/cluster-api-provider-anvil/api/v1alpha1"
)

// Roots locate the kernel interfaces the agent reads. Tests point them at fake trees.
type Roots struct {
	// Sys is where sysfs is mounted (default /sys).
	Sys string
	// Proc is where procfs is mounted (default /proc).
	Proc string
	// Dev is the device directory (default /dev). Disk paths are Dev/<kernel name>; tests
	// put image files there.
	Dev string
}

func (r Roots) withDefaults() Roots {
	if r.Sys == "" {
		r.Sys = "/sys"
	}
	if r.Proc == "" {
		r.Proc = "/proc"
	}
	if r.Dev == "" {
		r.Dev = "/dev"
	}
	return r
}

// BlockDevice is a disk as sysfs describes it.
type BlockDevice struct {
	Name       string // kernel name, e.g. nvme0n1
	Path       string // device node
	SizeBytes  int64
	Rotational bool
	Removable  bool
	ReadOnly   bool
	Model      string
	Vendor     string
	Serial     string
	WWN        string
	Type       infrav1.DiskType
}

func readTrim(path string) string {
	b, err := os.ReadFile(path)
	if err != nil {
		return ""
	}
	return strings.TrimSpace(string(b))
}

// ListDisks returns the physical disks: block devices backed by a device (so no loop, dm,
// md, zram or ram devices), excluding optical drives, sorted by name.
func ListDisks(roots Roots) ([]BlockDevice, error) {
	roots = roots.withDefaults()
	ents, err := os.ReadDir(filepath.Join(roots.Sys, "block"))
	if err != nil {
		return nil, err
	}
	var out []BlockDevice
	for _, e := range ents {
		name := e.Name()
		dir := filepath.Join(roots.Sys, "block", name)
		if _, err := os.Stat(filepath.Join(dir, "device")); err != nil {
			continue
		}
		if strings.HasPrefix(name, "sr") || strings.HasPrefix(name, "fd") {
			continue
		}
		sectors, _ := strconv.ParseInt(readTrim(filepath.Join(dir, "size")), 10, 64)
		if sectors <= 0 {
			continue
		}
		d := BlockDevice{
			Name:       name,
			Path:       filepath.Join(roots.Dev, name),
			SizeBytes:  sectors * 512, // sysfs counts 512-byte units whatever the sector size
			Rotational: readTrim(filepath.Join(dir, "queue", "rotational")) == "1",
			Removable:  readTrim(filepath.Join(dir, "removable")) == "1",
			ReadOnly:   readTrim(filepath.Join(dir, "ro")) == "1",
			Model:      readTrim(filepath.Join(dir, "device", "model")),
			Vendor:     readTrim(filepath.Join(dir, "device", "vendor")),
			Serial:     readTrim(filepath.Join(dir, "device", "serial")),
		}
		if d.Serial == "" {
			d.Serial = vpdSerial(filepath.Join(dir, "device", "vpd_pg80"))
		}
		for _, p := range []string{filepath.Join(dir, "wwid"), filepath.Join(dir, "device", "wwid")} {
			if w := readTrim(p); w != "" {
				d.WWN = w
				break
			}
		}
		switch {
		case strings.HasPrefix(name, "nvme"):
			d.Type = infrav1.DiskNVMe
		case d.Rotational:
			d.Type = infrav1.DiskHDD
		default:
			d.Type = infrav1.DiskSSD
		}
		out = append(out, d)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Name < out[j].Name })
	return out, nil
}

// vpdSerial reads the unit serial number from a SCSI VPD page 0x80 (SATA and SAS disks have
// no "serial" attribute in sysfs).
func vpdSerial(path string) string {
	b, err := os.ReadFile(path)
	if err != nil || len(b) < 4 || b[1] != 0x80 {
		return ""
	}
	n := int(b[2])<<8 | int(b[3])
	if 4+n > len(b) {
		n = len(b) - 4
	}
	return strings.TrimSpace(string(b[4 : 4+n]))
}

// normWWN makes "naa.5000C500...", "0x5000c500..." and "eui.0025..." comparable.
func normWWN(s string) string {
	s = strings.ToLower(strings.TrimSpace(s))
	for _, p := range []string{"naa.", "eui.", "wwn-", "0x"} {
		s = strings.TrimPrefix(s, p)
	}
	return s
}

// ErrNoMatchingDisk means no disk satisfies the root device hints.
var ErrNoMatchingDisk = errors.New("no disk matches the root device hints")

// matches reports whether d satisfies every hint given, and which one failed.
func matches(d BlockDevice, h *infrav1.RootDeviceHints, devRoot string) (bool, string) {
	if h == nil {
		return true, ""
	}
	if h.DeviceName != "" {
		name := h.DeviceName
		// /dev/disk/by-* links resolve to the kernel name.
		if rel, ok := strings.CutPrefix(name, "/dev/"); ok {
			if strings.HasPrefix(rel, "disk/") {
				if target, err := filepath.EvalSymlinks(filepath.Join(devRoot, rel)); err == nil {
					name = filepath.Base(target)
				}
			} else {
				name = rel
			}
		}
		if name != d.Name {
			return false, "deviceName"
		}
	}
	if h.SerialNumber != "" && !strings.EqualFold(h.SerialNumber, d.Serial) {
		return false, "serialNumber"
	}
	if h.WWN != "" && normWWN(h.WWN) != normWWN(d.WWN) {
		return false, "wwn"
	}
	if h.Model != "" && !strings.Contains(strings.ToLower(d.Model), strings.ToLower(h.Model)) {
		return false, "model"
	}
	if h.MinSizeGigabytes > 0 && d.SizeBytes < int64(h.MinSizeGigabytes)*1_000_000_000 {
		return false, "minSizeGigabytes"
	}
	if h.Rotational != nil && *h.Rotational != d.Rotational {
		return false, "rotational"
	}
	return true, ""
}

// SelectDisk picks the install disk: among disks matching every hint and at least minSize
// bytes, the smallest (then by name, so the choice is deterministic). Without hints,
// removable and read-only disks are not considered.
func SelectDisk(disks []BlockDevice, hints *infrav1.RootDeviceHints, minSize int64, devRoot string) (BlockDevice, error) {
	if devRoot == "" {
		devRoot = "/dev"
	}
	var cands []BlockDevice
	var why []string
	for _, d := range disks {
		ok, failed := matches(d, hints, devRoot)
		switch {
		case !ok:
			why = append(why, fmt.Sprintf("%s: %s differs", d.Name, failed))
		case d.ReadOnly:
			why = append(why, d.Name+": read-only")
		case hints == nil && d.Removable:
			why = append(why, d.Name+": removable")
		case d.SizeBytes < minSize:
			why = append(why, fmt.Sprintf("%s: %d bytes, need %d", d.Name, d.SizeBytes, minSize))
		default:
			cands = append(cands, d)
		}
	}
	if len(cands) == 0 {
		if len(disks) == 0 {
			why = append(why, "no disks found")
		}
		return BlockDevice{}, fmt.Errorf("%w %s (%s)", ErrNoMatchingDisk, describeHints(hints), strings.Join(why, "; "))
	}
	sort.SliceStable(cands, func(i, j int) bool {
		if cands[i].SizeBytes != cands[j].SizeBytes {
			return cands[i].SizeBytes < cands[j].SizeBytes
		}
		return cands[i].Name < cands[j].Name
	})
	return cands[0], nil
}

func describeHints(h *infrav1.RootDeviceHints) string {
	if h == nil {
		return "{}"
	}
	var p []string
	add := func(k, v string) {
		if v != "" {
			p = append(p, k+"="+v)
		}
	}
	add("deviceName", h.DeviceName)
	add("serialNumber", h.SerialNumber)
	add("wwn", h.WWN)
	add("model", h.Model)
	if h.MinSizeGigabytes > 0 {
		add("minSizeGigabytes", strconv.Itoa(int(h.MinSizeGigabytes)))
	}
	if h.Rotational != nil {
		add("rotational", strconv.FormatBool(*h.Rotational))
	}
	return "{" + strings.Join(p, ", ") + "}"
}
