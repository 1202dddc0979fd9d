package redfish

import (
	"bytes"
	"embed"
	"encoding/json"
	"fmt"
	"hash/fnv"
	"io/fs"
	"path"
	"slices"
	"strings"
)

// The DMTF public mockups, trimmed by mockups/import.py (see mockups/README.md).
// They are BSD-3 licensed; mockups/LICENSE.md travels with them.
//
//go:embed mockups/LICENSE.md mockups/public-localstorage mockups/public-rackmount1 mockups/public-smartnic
var mockupFiles embed.FS

// Mockup names one of the embedded resource trees an emulated BMC serves.
type Mockup string

// The embedded mockups.
const (
	// MockupLocalStorage: a rack server with a RAID controller and four drives
	// (Storage, Drives, Volumes) and virtual media under the manager. The default.
	MockupLocalStorage Mockup = "public-localstorage"
	// MockupRackmount: DMTF's richest rack server: FPGA, VLANs, SimpleStorage,
	// virtual media under the system (also linked from the manager).
	MockupRackmount Mockup = "public-rackmount1"
	// MockupSmartNIC: a server whose NICs are SmartNICs (NetworkAdapters,
	// NetworkDeviceFunctions carry the MAC addresses; no EthernetInterfaces).
	MockupSmartNIC Mockup = "public-smartnic"
)

// Mockups lists the embedded mockups.
func Mockups() []Mockup { return []Mockup{MockupLocalStorage, MockupRackmount, MockupSmartNIC} }

const (
	serviceRootPath = "/redfish/v1"
	sessionsPath    = "/redfish/v1/SessionService/Sessions"
)

// resource is one parsed mockup resource. It is shared by every BMC that serves
// the mockup and never changes after loading: BMCs render their own values over
// a shallow copy of props instead of writing to it.
type resource struct {
	props map[string]any // decoded with json.Number, so numbers re-encode verbatim
	body  []byte         // props encoded, sent as is when a BMC changes nothing
	etag  string
}

// tree is one mockup, parsed once per Server, and where its interesting parts are.
type tree struct {
	name      Mockup
	resources map[string]*resource // by URI path, without trailing slash

	systemPath  string            // the one ComputerSystem the BMC's machine drives
	chassisPath string            // the system's chassis; it shows the system's power state
	managerPath string            // the system's manager
	mediaSlots  map[string]string // VirtualMedia resource path → slot id (its Id)
	// nics are the host's network ports in the order per-BMC MAC addresses are
	// given to them: physical EthernetInterfaces of the system, or, where the
	// system has none, Ethernet NetworkDeviceFunctions.
	nics []nic
}

// nic is a resource carrying a host MAC address.
type nic struct {
	path string
	// nested: the MAC lives in the resource's "Ethernet" object (NetworkDeviceFunction).
	nested bool
	// port is the index of the physical port: a VLAN interface has its port's.
	port int
}

// treeKey names a parsed tree: a mockup, with its own ids or renamed.
type treeKey struct {
	mockup    Mockup
	mockupIDs bool
}

// vendorID is the id most BMCs give their one system, chassis and manager
// (HPE iLO and Supermicro among them). bmclib's inventory recognises only such
// well-known paths, so trees use it unless BMCOptions.MockupIDs is set.
const vendorID = "1"

// loadTree parses one embedded mockup and, unless mockupIDs, renames its
// system, chassis and manager to vendorID.
func loadTree(name Mockup, mockupIDs bool) (*tree, error) {
	t, err := parseTree(name)
	if err != nil {
		return nil, err
	}
	if mockupIDs {
		return t, nil
	}
	renames := map[string]string{}
	for _, old := range []string{t.systemPath, t.chassisPath, t.managerPath} {
		if old != "" {
			renames[old] = path.Join(path.Dir(old), vendorID)
		}
	}
	resources := make(map[string]*resource, len(t.resources))
	for p, r := range t.resources {
		props := renamePaths(r.props, renames).(map[string]any)
		if _, renamed := renames[p]; renamed {
			props["Id"] = path.Base(renames[p])
		}
		body, err := encodeJSON(props)
		if err != nil {
			return nil, err
		}
		resources[renamePath(p, renames)] = &resource{props: props, body: body, etag: etagOf(body)}
	}
	t = &tree{name: name, resources: resources, mediaSlots: make(map[string]string)}
	if err := t.index(); err != nil {
		return nil, fmt.Errorf("mockup %s renamed: %w", name, err)
	}
	return t, nil
}

// renamePaths returns a copy of v in which every string that is a renamed path,
// or lies under one, is renamed.
func renamePaths(v any, renames map[string]string) any {
	switch x := v.(type) {
	case map[string]any:
		out := make(map[string]any, len(x))
		for k, e := range x {
			out[k] = renamePaths(e, renames)
		}
		return out
	case []any:
		out := make([]any, len(x))
		for i, e := range x {
			out[i] = renamePaths(e, renames)
		}
		return out
	case string:
		return renamePath(x, renames)
	}
	return v
}

func renamePath(s string, renames map[string]string) string {
	if !strings.HasPrefix(s, serviceRootPath+"/") {
		return s
	}
	for old, repl := range renames {
		if s == old {
			return repl
		}
		if rest, ok := strings.CutPrefix(s, old); ok && (rest[0] == '/' || rest[0] == '#') {
			return repl + rest
		}
	}
	return s
}

// parseTree parses one embedded mockup as DMTF wrote it.
func parseTree(name Mockup) (*tree, error) {
	root := path.Join("mockups", string(name))
	t := &tree{name: name, resources: make(map[string]*resource), mediaSlots: make(map[string]string)}
	err := fs.WalkDir(mockupFiles, root, func(file string, d fs.DirEntry, err error) error {
		if err != nil || d.IsDir() || d.Name() != "index.json" {
			return err
		}
		data, err := mockupFiles.ReadFile(file)
		if err != nil {
			return err
		}
		dec := json.NewDecoder(bytes.NewReader(data))
		dec.UseNumber()
		var props map[string]any
		if err := dec.Decode(&props); err != nil {
			return fmt.Errorf("%s: %w", file, err)
		}
		rel := strings.TrimPrefix(path.Dir(file), root)
		p := serviceRootPath + rel
		body, err := encodeJSON(props)
		if err != nil {
			return fmt.Errorf("%s: %w", file, err)
		}
		t.resources[p] = &resource{props: props, body: body, etag: etagOf(body)}
		return nil
	})
	if err != nil {
		return nil, err
	}
	if len(t.resources) == 0 {
		return nil, fmt.Errorf("unknown mockup %q", name)
	}
	if err := t.index(); err != nil {
		return nil, fmt.Errorf("mockup %s: %w", name, err)
	}
	return t, nil
}

// index finds the resources the emulator gives behaviour to.
func (t *tree) index() error {
	rootRes := t.resources[serviceRootPath]
	if rootRes == nil {
		return fmt.Errorf("no service root")
	}
	if got := linkAt(rootRes.props, "Links", "Sessions"); got != sessionsPath {
		return fmt.Errorf("sessions at %q, want %q", got, sessionsPath)
	}
	systems := t.resources[linkAt(rootRes.props, "Systems")]
	if systems == nil {
		return fmt.Errorf("no Systems collection")
	}
	members := memberPaths(systems.props)
	if len(members) != 1 {
		return fmt.Errorf("want exactly one ComputerSystem, found %d", len(members))
	}
	t.systemPath = members[0]
	system := t.resources[t.systemPath]
	if system == nil {
		return fmt.Errorf("system %s missing", t.systemPath)
	}
	t.chassisPath = firstLink(system.props, "Links", "Chassis")
	t.managerPath = firstLink(system.props, "Links", "ManagedBy")

	for p, r := range t.resources {
		if typ, _ := r.props["@odata.type"].(string); strings.HasPrefix(typ, "#VirtualMedia.") {
			id, _ := r.props["Id"].(string)
			t.mediaSlots[p] = id
		}
	}

	// Host NICs: the system's EthernetInterfaces in collection order.
	if coll := t.resources[linkAt(system.props, "EthernetInterfaces")]; coll != nil {
		var virtual []string
		for _, p := range memberPaths(coll.props) {
			r := t.resources[p]
			if r == nil || r.props["MACAddress"] == nil {
				continue
			}
			if r.props["EthernetInterfaceType"] == "Virtual" {
				virtual = append(virtual, p)
				continue
			}
			t.nics = append(t.nics, nic{path: p, port: len(t.nics)})
		}
		// A VLAN interface carries its physical port's MAC; keep them equal.
		ports := len(t.nics)
		for _, p := range virtual {
			for _, n := range t.nics[:ports] {
				if t.resources[n.path].props["PermanentMACAddress"] == t.resources[p].props["PermanentMACAddress"] {
					t.nics = append(t.nics, nic{path: p, port: n.port})
					break
				}
			}
		}
	}
	if len(t.nics) == 0 {
		var ndfs []string
		for p, r := range t.resources {
			typ, _ := r.props["@odata.type"].(string)
			eth, _ := r.props["Ethernet"].(map[string]any)
			if strings.HasPrefix(typ, "#NetworkDeviceFunction.") && eth["MACAddress"] != nil {
				ndfs = append(ndfs, p)
			}
		}
		slices.Sort(ndfs)
		for _, p := range ndfs {
			t.nics = append(t.nics, nic{path: p, nested: true, port: len(t.nics)})
		}
	}
	return nil
}

// linkAt returns the "@odata.id" of the object found by following keys from props.
func linkAt(props map[string]any, keys ...string) string {
	var cur any = props
	for _, k := range keys {
		m, _ := cur.(map[string]any)
		cur = m[k]
	}
	m, _ := cur.(map[string]any)
	s, _ := m["@odata.id"].(string)
	return s
}

// firstLink returns the first "@odata.id" of the array of links found by following keys.
func firstLink(props map[string]any, keys ...string) string {
	var cur any = props
	for _, k := range keys {
		m, _ := cur.(map[string]any)
		cur = m[k]
	}
	arr, _ := cur.([]any)
	if len(arr) == 0 {
		return ""
	}
	m, _ := arr[0].(map[string]any)
	s, _ := m["@odata.id"].(string)
	return s
}

// memberPaths returns the member paths of a collection, in order.
func memberPaths(props map[string]any) []string {
	arr, _ := props["Members"].([]any)
	out := make([]string, 0, len(arr))
	for _, v := range arr {
		m, _ := v.(map[string]any)
		if s, ok := m["@odata.id"].(string); ok {
			out = append(out, s)
		}
	}
	return out
}

func link(p string) map[string]any { return map[string]any{"@odata.id": p} }

// encodeJSON encodes v without escaping <, > and &, which Redfish text contains.
func encodeJSON(v any) ([]byte, error) {
	var buf bytes.Buffer
	enc := json.NewEncoder(&buf)
	enc.SetEscapeHTML(false)
	if err := enc.Encode(v); err != nil {
		return nil, err
	}
	return buf.Bytes(), nil
}

// etagOf derives a strong ETag from a representation: equal bodies, equal tags.
func etagOf(body []byte) string {
	h := fnv.New64a()
	_, _ = h.Write(body) // a hash.Hash never returns an error
	return fmt.Sprintf(`"%016x"`, h.Sum64())
}
