package redfish

import (
	"encoding/json"
	"fmt"
	"maps"
	"strings"
	"time"
)

// overlay is how one resource of the shared tree looks on one BMC.
type overlay struct {
	base *resource      // the shared resource to start from; nil hides the path
	set  map[string]any // top-level properties that replace base's
}

// overlayBuilder collects one BMC's overlays. Values it stores are fresh (maps
// are cloned before they are changed), so the shared tree is never written.
type overlayBuilder struct {
	t  *tree
	ov map[string]overlay
}

// set replaces a top-level property of the resource at p.
func (ob *overlayBuilder) set(p, key string, v any) {
	o, ok := ob.ov[p]
	if !ok {
		o = overlay{base: ob.t.resources[p]}
	}
	if o.set == nil {
		o.set = make(map[string]any)
	}
	o.set[key] = v
	ob.ov[p] = o
}

// add serves a copy of base at p (a resource the mockup lacks).
func (ob *overlayBuilder) add(p string, base *resource) {
	ob.ov[p] = overlay{base: base, set: map[string]any{"@odata.id": p}}
}

// hide makes p answer 404.
func (ob *overlayBuilder) hide(p string) { ob.ov[p] = overlay{} }

// get returns a top-level property of p as this BMC shows it so far.
func (ob *overlayBuilder) get(p, key string) any {
	if o, ok := ob.ov[p]; ok {
		if v, ok := o.set[key]; ok {
			return v
		}
		if o.base != nil {
			return o.base.props[key]
		}
		return nil
	}
	if r := ob.t.resources[p]; r != nil {
		return r.props[key]
	}
	return nil
}

// object returns a copy of an object property of p, to change some of its members.
func (ob *overlayBuilder) object(p, key string) map[string]any {
	m, _ := ob.get(p, key).(map[string]any)
	if m == nil {
		return map[string]any{}
	}
	return maps.Clone(m)
}

// overlaysFor computes what a BMC with this identity and hardware changes in the tree.
func (t *tree) overlaysFor(id Identity, hw Hardware, sessionTimeout time.Duration) (map[string]overlay, error) {
	ob := &overlayBuilder{t: t, ov: make(map[string]overlay)}

	if p := "/redfish/v1/SessionService"; t.resources[p] != nil {
		ob.set(p, "SessionTimeout", int64(sessionTimeout/time.Second))
	}
	if id.SerialNumber != "" {
		ob.set(t.systemPath, "SerialNumber", id.SerialNumber)
		if t.chassisPath != "" {
			ob.set(t.chassisPath, "SerialNumber", id.SerialNumber)
		}
	}
	if id.UUID != "" {
		ob.set(t.systemPath, "UUID", id.UUID)
		// The service and manager UUIDs are the BMC's own; derive them so they differ too.
		bmcUUID := nameUUID("anvil-vbmc/bmc/" + id.UUID)
		ob.set(serviceRootPath, "UUID", bmcUUID)
		if t.managerPath != "" {
			ob.set(t.managerPath, "UUID", bmcUUID)
			ob.set(t.managerPath, "ServiceEntryPointUUID", bmcUUID)
		}
	}
	if id.HostName != "" {
		ob.set(t.systemPath, "HostName", id.HostName)
		for _, n := range t.nics {
			props := t.resources[n.path].props
			if n.nested || props["HostName"] == nil {
				continue
			}
			ob.set(n.path, "HostName", id.HostName)
			if fqdn, ok := props["FQDN"].(string); ok {
				if _, domain, found := strings.Cut(fqdn, "."); found {
					ob.set(n.path, "FQDN", id.HostName+"."+domain)
				}
			}
		}
	}
	for _, n := range t.nics {
		if n.port >= len(id.MACs) {
			continue
		}
		mac := strings.ToUpper(id.MACs[n.port].String())
		if n.nested {
			eth := ob.object(n.path, "Ethernet")
			eth["MACAddress"] = mac
			eth["PermanentMACAddress"] = mac
			ob.set(n.path, "Ethernet", eth)
			continue
		}
		ob.set(n.path, "MACAddress", mac)
		ob.set(n.path, "PermanentMACAddress", mac)
	}
	if hw.Processors > 0 {
		if err := ob.resizeProcessors(hw.Processors); err != nil {
			return nil, err
		}
	}
	if hw.MemoryGiB > 0 {
		if err := ob.resizeMemory(hw.MemoryGiB); err != nil {
			return nil, err
		}
	}
	return ob.ov, nil
}

// resizeProcessors shows n CPUs named CPU1..CPUn: the mockup's own where it has
// them, copies of its first populated CPU elsewhere. Other processors (an FPGA) stay.
func (ob *overlayBuilder) resizeProcessors(n int) error {
	t := ob.t
	collPath := linkAt(t.resources[t.systemPath].props, "Processors")
	coll := t.resources[collPath]
	if coll == nil {
		return fmt.Errorf("mockup %s has no Processors to resize", t.name)
	}
	// A socket the mockup shows as Absent is replaced too (public-localstorage
	// has an empty CPU2 socket yet counts two processors).
	populatedCPU := func(r *resource) bool {
		status, _ := r.props["Status"].(map[string]any)
		return r.props["ProcessorType"] == "CPU" && status["State"] != "Absent"
	}
	var cpus, others []string
	for _, p := range memberPaths(coll.props) {
		r := t.resources[p]
		switch {
		case r == nil:
		case r.props["ProcessorType"] == "CPU":
			cpus = append(cpus, p)
		default:
			others = append(others, p)
		}
	}
	var template *resource
	for _, p := range cpus {
		if populatedCPU(t.resources[p]) {
			template = t.resources[p]
			break
		}
	}
	if template == nil {
		return fmt.Errorf("mockup %s has no CPU to copy", t.name)
	}
	wanted := make(map[string]bool)
	members := make([]any, 0, n+len(others))
	for i := 1; i <= n; i++ {
		p := fmt.Sprintf("%s/CPU%d", collPath, i)
		wanted[p] = true
		if r := t.resources[p]; r == nil || !populatedCPU(r) {
			ob.add(p, template)
			ob.set(p, "Id", fmt.Sprintf("CPU%d", i))
			ob.set(p, "Socket", fmt.Sprintf("CPU %d", i))
		}
		members = append(members, link(p))
	}
	for _, p := range cpus {
		if !wanted[p] {
			ob.hide(p)
		}
	}
	for _, p := range others {
		members = append(members, link(p))
	}
	ob.set(collPath, "Members", members)
	ob.set(collPath, "Members@odata.count", len(members))

	summary := ob.object(t.systemPath, "ProcessorSummary")
	summary["Count"] = n
	if cores, ok := intProp(template.props, "TotalCores"); ok {
		summary["CoreCount"] = int64(n) * cores
	}
	if threads, ok := intProp(template.props, "TotalThreads"); ok {
		summary["LogicalProcessorCount"] = int64(n) * threads
	}
	ob.set(t.systemPath, "ProcessorSummary", summary)
	return nil
}

// resizeMemory spreads gib GiB evenly over the populated DIMM slots (the first
// takes what does not divide evenly), so that DIMM sizes add up to the summary.
func (ob *overlayBuilder) resizeMemory(gib int) error {
	t := ob.t
	coll := t.resources[linkAt(t.resources[t.systemPath].props, "Memory")]
	if coll == nil {
		return fmt.Errorf("mockup %s has no Memory to resize", t.name)
	}
	var dimms []string
	for _, p := range memberPaths(coll.props) {
		r := t.resources[p]
		if r == nil {
			continue
		}
		if _, ok := intProp(r.props, "CapacityMiB"); ok {
			dimms = append(dimms, p)
		}
	}
	if len(dimms) == 0 {
		return fmt.Errorf("mockup %s has no populated DIMM", t.name)
	}
	total := int64(gib) * 1024
	each := total / int64(len(dimms))
	for i, p := range dimms {
		size := each
		if i == 0 {
			size += total - each*int64(len(dimms))
		}
		ob.set(p, "CapacityMiB", size)
	}
	summary := ob.object(t.systemPath, "MemorySummary")
	summary["TotalSystemMemoryGiB"] = gib
	ob.set(t.systemPath, "MemorySummary", summary)
	return nil
}

func intProp(props map[string]any, key string) (int64, bool) {
	n, ok := props[key].(json.Number)
	if !ok {
		return 0, false
	}
	v, err := n.Int64()
	return v, err == nil
}
