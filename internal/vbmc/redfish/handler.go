package redfish

import (
	"bytes"
	crand "crypto/rand"
	"crypto/subtle"
	"encoding/hex"
	"encoding/json"
	"errors"
	"io"
	"maps"
	"math/rand/v2"
	"net/http"
	"net/url"
	"path"
	"slices"
	"sort"
	"strings"
	"time"

	"github.com/anvil-metal/cluster-api-provider-anvil/internal/vbmc/machine"
)

// bootTargets are the BootSourceOverrideTarget values the emulated servers offer.
func bootTargets() []string {
	return []string{
		string(machine.BootNone), string(machine.BootPxe), string(machine.BootFloppy), string(machine.BootCd),
		string(machine.BootUsb), string(machine.BootHdd), string(machine.BootBiosSetup), string(machine.BootUtilities),
		string(machine.BootDiags), string(machine.BootUefiShell), string(machine.BootUefiTarget),
		string(machine.BootSDCard), string(machine.BootUefiHTTP),
	}
}

func overrideLifetimes() []string {
	return []string{string(machine.OverrideDisabled), string(machine.OverrideOnce), string(machine.OverrideContinuous)}
}

func bootModes() []string {
	return []string{string(machine.BootModeUEFI), string(machine.BootModeLegacy)}
}

// transferProtocol maps an image URL scheme to its Redfish TransferProtocolType, or "".
func transferProtocol(scheme string) string {
	switch strings.ToLower(scheme) {
	case "http":
		return "HTTP"
	case "https":
		return "HTTPS"
	case "nfs":
		return "NFS"
	case "cifs", "smb":
		return "CIFS"
	case "ftp":
		return "FTP"
	case "sftp":
		return "SFTP"
	case "scp":
		return "SCP"
	case "tftp":
		return "TFTP"
	}
	return ""
}

const maxRequestBody = 1 << 20

func (b *BMC) serveHTTP(w http.ResponseWriter, r *http.Request) {
	b.requests[methodIndex(r.Method)].Add(1)
	if !b.injectFaults(w, r) {
		return
	}
	w.Header().Set("OData-Version", "4.0")
	p := path.Clean("/" + r.URL.Path)

	if p == "/redfish" {
		if r.Method != http.MethodGet && r.Method != http.MethodHead {
			methodNotAllowed(w, r, "GET, HEAD")
			return
		}
		writeJSON(w, http.StatusOK, []byte(`{"v1":"/redfish/v1/"}`+"\n"))
		return
	}
	if p == sessionsPath && r.Method == http.MethodPost {
		b.login(w, r)
		return
	}
	public := (r.Method == http.MethodGet || r.Method == http.MethodHead) &&
		(p == serviceRootPath || p == "/redfish/v1/odata" || p == "/redfish/v1/$metadata")
	if !public && !b.authenticate(r) {
		w.Header().Set("WWW-Authenticate", `Basic realm="Redfish"`)
		writeError(w, http.StatusUnauthorized, msgNoValidSession())
		return
	}
	switch r.Method {
	case http.MethodGet, http.MethodHead:
		b.get(w, r, p)
	case http.MethodPatch:
		b.patch(w, r, p)
	case http.MethodPost:
		b.post(w, r, p)
	case http.MethodDelete:
		b.delete(w, r, p)
	default:
		b.notAllowedOrMissing(w, r, p)
	}
}

// injectFaults applies the BMC's faults and reports whether the request should
// still be served.
func (b *BMC) injectFaults(w http.ResponseWriter, r *http.Request) bool {
	b.mu.Lock()
	f, unhang := b.faults, b.unhang
	b.mu.Unlock()
	ctx := r.Context()
	if f.Hang {
		select {
		case <-ctx.Done():
			return false
		case <-unhang:
		}
	}
	if f.Latency > 0 {
		t := time.NewTimer(f.Latency)
		defer t.Stop()
		select {
		case <-ctx.Done():
			return false
		case <-t.C:
		}
	}
	if f.Unavailable {
		seconds := retryAfter(f.RetryAfter)
		if f.RetryAfter > 0 {
			w.Header().Set("Retry-After", seconds)
		}
		writeError(w, http.StatusServiceUnavailable, msgUnavailable(seconds))
		return false
	}
	if f.ErrorRate > 0 && rand.Float64() < f.ErrorRate { //nolint:gosec // fault injection needs no unpredictability

		writeError(w, http.StatusInternalServerError, msgInternalError())
		return false
	}
	return true
}

// ---- authentication and sessions ----

func (b *BMC) credentialsOK(user, pass string) bool {
	u := subtle.ConstantTimeCompare([]byte(user), []byte(b.username))
	p := subtle.ConstantTimeCompare([]byte(pass), []byte(b.password))
	return u&p == 1
}

// authenticate accepts a live session token or, without one, Basic credentials.
// A token that is present decides alone: a stale token is a 401 even if Basic
// credentials come along, so clients notice they lost their session.
func (b *BMC) authenticate(r *http.Request) bool {
	if tok := r.Header.Get("X-Auth-Token"); tok != "" {
		b.mu.Lock()
		defer b.mu.Unlock()
		s := b.sessions[tok]
		if s == nil {
			return false
		}
		now := time.Now()
		if now.Sub(s.lastUsed) > b.sessionTimeout {
			delete(b.sessions, tok)
			return false
		}
		s.lastUsed = now
		return true
	}
	if user, pass, ok := r.BasicAuth(); ok {
		return b.credentialsOK(user, pass)
	}
	return false
}

func (b *BMC) login(w http.ResponseWriter, r *http.Request) {
	fields, ok := decodeObject(w, r)
	if !ok {
		return
	}
	var msgs []message
	creds := map[string]string{}
	for _, name := range []string{"UserName", "Password"} {
		raw, present := fields[name]
		if !present {
			msgs = append(msgs, msgPropertyMissing(name))
			continue
		}
		s, isString := jsonString(raw)
		if !isString {
			msgs = append(msgs, msgValueTypeError("#/"+name, name, quoteValue(raw)))
			continue
		}
		creds[name] = s
	}
	if len(msgs) > 0 {
		writeError(w, http.StatusBadRequest, msgs...)
		return
	}
	if !b.credentialsOK(creds["UserName"], creds["Password"]) {
		writeError(w, http.StatusUnauthorized, msgUnauthorized(sessionsPath))
		return
	}
	now := time.Now()
	s := &session{id: randomHex(8), token: randomHex(16), user: creds["UserName"], created: now, lastUsed: now}
	b.mu.Lock()
	b.expireSessionsLocked(now)
	if b.maxSessions > 0 && len(b.sessions) >= b.maxSessions {
		b.mu.Unlock()
		writeError(w, http.StatusServiceUnavailable, msgSessionLimitExceeded())
		return
	}
	b.sessions[s.token] = s
	b.mu.Unlock()

	body, _ := encodeJSON(sessionResource(s))
	h := w.Header()
	h.Set("Location", sessionsPath+"/"+s.id)
	h.Set("X-Auth-Token", s.token)
	writeJSON(w, http.StatusCreated, body)
}

func sessionResource(s *session) map[string]any {
	return map[string]any{
		"@odata.id":   sessionsPath + "/" + s.id,
		"@odata.type": "#Session.v1_7_0.Session",
		"Id":          s.id,
		"Name":        "User Session",
		"UserName":    s.user,
		"CreatedTime": s.created.UTC().Format(time.RFC3339),
	}
}

// sessionByID returns a copy of the live session with that id.
func (b *BMC) sessionByID(id string) (session, bool) {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.expireSessionsLocked(time.Now())
	for _, s := range b.sessions {
		if s.id == id {
			return *s, true
		}
	}
	return session{}, false
}

func (b *BMC) sessionCollection() map[string]any {
	b.mu.Lock()
	b.expireSessionsLocked(time.Now())
	ids := make([]string, 0, len(b.sessions))
	for _, s := range b.sessions {
		ids = append(ids, s.id)
	}
	b.mu.Unlock()
	sort.Strings(ids)
	members := make([]any, 0, len(ids))
	for _, id := range ids {
		members = append(members, link(sessionsPath+"/"+id))
	}
	return map[string]any{
		"@odata.id":           sessionsPath,
		"@odata.type":         "#SessionCollection.SessionCollection",
		"Name":                "Session Collection",
		"Members":             members,
		"Members@odata.count": len(members),
	}
}

func randomHex(n int) string {
	buf := make([]byte, n)
	_, _ = crand.Read(buf) // never fails on Linux; Go 1.24+ crashes rather than return an error
	return hex.EncodeToString(buf)
}

// ---- reading ----

func (b *BMC) get(w http.ResponseWriter, r *http.Request, p string) {
	body, etag, ok := b.representation(p)
	if !ok {
		writeError(w, http.StatusNotFound, msgResourceMissing(p))
		return
	}
	h := w.Header()
	h.Set("ETag", etag)
	h.Set("Allow", b.allow(p))
	if inm := r.Header.Get("If-None-Match"); inm != "" && etagMatches(inm, etag) {
		w.WriteHeader(http.StatusNotModified)
		return
	}
	writeJSON(w, http.StatusOK, body)
}

// representation returns the encoded resource at p and its ETag.
func (b *BMC) representation(p string) (body []byte, etag string, ok bool) {
	var props map[string]any
	switch {
	case p == sessionsPath:
		props = b.sessionCollection()
	case strings.HasPrefix(p, sessionsPath+"/"):
		s, found := b.sessionByID(strings.TrimPrefix(p, sessionsPath+"/"))
		if !found {
			return nil, "", false
		}
		props = sessionResource(&s)
	default:
		var res *resource
		props, res, ok = b.view(p)
		if !ok {
			return nil, "", false
		}
		if res != nil {
			return res.body, res.etag, true
		}
	}
	body, err := encodeJSON(props)
	if err != nil {
		return nil, "", false
	}
	return body, etagOf(body), true
}

// view returns the properties of the mockup resource at p as this BMC shows
// them. When the BMC changes nothing it returns the shared resource too, whose
// pre-encoded body the caller can send; otherwise a fresh shallow copy with the
// BMC's overlay and the machine's live state.
func (b *BMC) view(p string) (props map[string]any, shared *resource, ok bool) {
	res := b.tree.resources[p]
	o, hasOverlay := b.overlays[p]
	if hasOverlay {
		res = o.base
	}
	if res == nil {
		return nil, nil, false
	}
	slot, isMedia := b.tree.mediaSlots[p]
	live := p == b.tree.systemPath || p == b.tree.chassisPath || isMedia
	if !hasOverlay && !live {
		return res.props, res, true
	}
	props = maps.Clone(res.props)
	maps.Copy(props, o.set)
	switch {
	case p == b.tree.systemPath:
		b.renderSystem(props)
	case p == b.tree.chassisPath:
		if _, has := props["PowerState"]; has {
			props["PowerState"] = string(b.machine.Power())
		}
	case isMedia:
		b.renderMedia(props, p, slot)
	}
	return props, nil, true
}

func (b *BMC) renderSystem(props map[string]any) {
	power := b.machine.Power()
	boot := b.machine.BootOverride()
	props["PowerState"] = string(power)

	bootProps, _ := props["Boot"].(map[string]any)
	bootProps = maps.Clone(bootProps)
	if bootProps == nil {
		bootProps = make(map[string]any)
	}
	bootProps["BootSourceOverrideEnabled"] = string(boot.Enabled)
	bootProps["BootSourceOverrideTarget"] = string(boot.Target)
	bootProps["BootSourceOverrideTarget@Redfish.AllowableValues"] = bootTargets()
	bootProps["BootSourceOverrideMode"] = string(boot.Mode)
	bootProps["BootSourceOverrideMode@Redfish.AllowableValues"] = bootModes()
	bootProps["UefiTargetBootSourceOverride"] = nullIfEmpty(boot.UefiTarget)
	bootProps["HttpBootUri"] = nullIfEmpty(boot.HTTPBootURI)
	props["Boot"] = bootProps

	if progress, ok := props["BootProgress"].(map[string]any); ok {
		progress = maps.Clone(progress)
		progress["LastState"] = "None"
		if power == machine.PowerOn {
			progress["LastState"] = "OSRunning"
		}
		props["BootProgress"] = progress
	}
	resetTypes := make([]string, 0, 9)
	for _, t := range machine.ResetTypes() {
		resetTypes = append(resetTypes, string(t))
	}
	props["Actions"] = map[string]any{
		"#ComputerSystem.Reset": map[string]any{
			"target":                            b.tree.systemPath + "/Actions/ComputerSystem.Reset",
			"ResetType@Redfish.AllowableValues": resetTypes,
		},
	}
}

func (b *BMC) renderMedia(props map[string]any, p, slot string) {
	md, inserted := b.machine.Media(slot)
	props["Inserted"] = inserted
	if inserted {
		props["Image"] = md.Image
		props["ImageName"] = path.Base(md.Image)
		if u, err := url.Parse(md.Image); err == nil && u.Path != "" {
			props["ImageName"] = path.Base(u.Path)
		}
		props["WriteProtected"] = md.WriteProtected
		props["ConnectedVia"] = "URI"
		props["TransferProtocolType"] = md.TransferProtocol
	} else {
		props["Image"] = nil
		props["ImageName"] = nil
		props["ConnectedVia"] = "NotConnected"
		delete(props, "TransferProtocolType")
	}
	props["Actions"] = map[string]any{
		"#VirtualMedia.InsertMedia": map[string]any{"target": p + "/Actions/VirtualMedia.InsertMedia"},
		"#VirtualMedia.EjectMedia":  map[string]any{"target": p + "/Actions/VirtualMedia.EjectMedia"},
	}
}

func nullIfEmpty(s string) any {
	if s == "" {
		return nil
	}
	return s
}

// allow lists the methods the resource at p accepts.
func (b *BMC) allow(p string) string {
	switch {
	case p == b.tree.systemPath:
		return "GET, HEAD, PATCH"
	case p == sessionsPath:
		return "GET, HEAD, POST"
	case strings.HasPrefix(p, sessionsPath+"/"):
		return "GET, HEAD, DELETE"
	}
	return "GET, HEAD"
}

func (b *BMC) notAllowedOrMissing(w http.ResponseWriter, r *http.Request, p string) {
	if _, _, ok := b.representation(p); ok {
		methodNotAllowed(w, r, b.allow(p))
		return
	}
	writeError(w, http.StatusNotFound, msgResourceMissing(p))
}

func methodNotAllowed(w http.ResponseWriter, r *http.Request, allow string) {
	w.Header().Set("Allow", allow)
	writeError(w, http.StatusMethodNotAllowed, msgMethodNotAllowed(r.Method))
}

// ---- changing ----

func (b *BMC) delete(w http.ResponseWriter, r *http.Request, p string) {
	id, isSession := strings.CutPrefix(p, sessionsPath+"/")
	if !isSession {
		b.notAllowedOrMissing(w, r, p)
		return
	}
	b.mu.Lock()
	found := false
	for tok, s := range b.sessions {
		if s.id == id {
			delete(b.sessions, tok)
			found = true
			break
		}
	}
	b.mu.Unlock()
	if !found {
		writeError(w, http.StatusNotFound, msgResourceMissing(p))
		return
	}
	w.WriteHeader(http.StatusNoContent)
}

// patch changes the system's boot override, the one writable thing here.
// Every property is checked before anything changes: a request with one bad
// value changes nothing and lists all problems.
func (b *BMC) patch(w http.ResponseWriter, r *http.Request, p string) {
	if p != b.tree.systemPath {
		b.notAllowedOrMissing(w, r, p)
		return
	}
	fields, ok := decodeObject(w, r)
	if !ok {
		return
	}
	b.patchMu.Lock()
	defer b.patchMu.Unlock()
	current, _, _ := b.view(p)
	if im := r.Header.Get("If-Match"); im != "" {
		body, _ := encodeJSON(current)
		if !etagMatches(im, etagOf(body)) {
			writeError(w, http.StatusPreconditionFailed, msgPreconditionFailed())
			return
		}
	}
	boot := b.machine.BootOverride()
	var msgs []message
	for _, key := range sortedKeys(fields) {
		switch {
		case strings.Contains(key, "@"):
			// Annotations such as @odata.etag are ignored, as DSP0266 asks.
		case key == "Boot":
			msgs = append(msgs, patchBoot(fields[key], current["Boot"], &boot)...)
		default:
			if _, known := current[key]; known {
				msgs = append(msgs, msgPropertyNotWritable("#/"+key, key))
			} else {
				msgs = append(msgs, msgPropertyUnknown("#/"+key, key))
			}
		}
	}
	if len(msgs) > 0 {
		writeError(w, http.StatusBadRequest, msgs...)
		return
	}
	if _, ok := fields["Boot"]; ok {
		if err := b.machine.SetBootOverride(boot); err != nil {
			writeError(w, http.StatusBadRequest, msgValueNotInList("#/Boot/BootSourceOverrideEnabled", "BootSourceOverrideEnabled", string(boot.Enabled)))
			return
		}
	}
	b.get(w, r, p)
}

// patchBoot applies a PATCH's Boot object to boot and returns what is wrong with it.
func patchBoot(raw json.RawMessage, rendered any, boot *machine.BootOverride) []message {
	var fields map[string]json.RawMessage
	if err := json.Unmarshal(raw, &fields); err != nil || fields == nil {
		return []message{msgValueTypeError("#/Boot", "Boot", quoteValue(raw))}
	}
	renderedBoot, _ := rendered.(map[string]any)
	var msgs []message
	enum := func(key string, allowed []string, assign func(string)) {
		s, ok := jsonString(fields[key])
		switch {
		case !ok:
			msgs = append(msgs, msgValueTypeError("#/Boot/"+key, key, quoteValue(fields[key])))
		case !slices.Contains(allowed, s):
			msgs = append(msgs, msgValueNotInList("#/Boot/"+key, key, s))
		default:
			assign(s)
		}
	}
	text := func(key string, assign func(string)) {
		if string(fields[key]) == "null" {
			assign("")
			return
		}
		s, ok := jsonString(fields[key])
		if !ok {
			msgs = append(msgs, msgValueTypeError("#/Boot/"+key, key, quoteValue(fields[key])))
			return
		}
		assign(s)
	}
	for _, key := range sortedKeys(fields) {
		switch key {
		case "BootSourceOverrideTarget":
			enum(key, bootTargets(), func(s string) { boot.Target = machine.BootTarget(s) })
		case "BootSourceOverrideEnabled":
			enum(key, overrideLifetimes(), func(s string) { boot.Enabled = machine.OverrideEnabled(s) })
		case "BootSourceOverrideMode":
			enum(key, bootModes(), func(s string) { boot.Mode = machine.BootMode(s) })
		case "UefiTargetBootSourceOverride":
			text(key, func(s string) { boot.UefiTarget = s })
		case "HttpBootUri":
			text(key, func(s string) { boot.HTTPBootURI = s })
		default:
			if strings.Contains(key, "@") {
				continue
			}
			if _, known := renderedBoot[key]; known {
				msgs = append(msgs, msgPropertyNotWritable("#/Boot/"+key, key))
			} else {
				msgs = append(msgs, msgPropertyUnknown("#/Boot/"+key, key))
			}
		}
	}
	return msgs
}

func (b *BMC) post(w http.ResponseWriter, r *http.Request, p string) {
	target, action, isAction := strings.Cut(p, "/Actions/")
	switch {
	case !isAction:
		b.notAllowedOrMissing(w, r, p)
	case target == b.tree.systemPath && action == "ComputerSystem.Reset":
		b.resetSystem(w, r)
	case target == b.tree.managerPath && action == "Manager.Reset":
		b.resetManager(w, r)
	default:
		slot, isMedia := b.tree.mediaSlots[target]
		switch {
		case isMedia && action == "VirtualMedia.InsertMedia":
			b.insertMedia(w, r, target, slot)
		case isMedia && action == "VirtualMedia.EjectMedia":
			b.ejectMedia(w, r, slot)
		default:
			if _, _, ok := b.representation(target); ok {
				writeError(w, http.StatusBadRequest, msgActionNotSupported(action))
				return
			}
			writeError(w, http.StatusNotFound, msgResourceMissing(p))
		}
	}
}

func (b *BMC) resetSystem(w http.ResponseWriter, r *http.Request) {
	const action = "ComputerSystem.Reset"
	params, ok := decodeObject(w, r)
	if !ok {
		return
	}
	msgs := unknownParams(action, params, "ResetType")
	raw, present := params["ResetType"]
	var resetType machine.ResetType
	if !present {
		msgs = append(msgs, msgActionParameterMissing(action, "ResetType"))
	} else if s, isString := jsonString(raw); !isString {
		msgs = append(msgs, msgActionParameterValueTypeError(action, "ResetType", quoteValue(raw)))
	} else if resetType = machine.ResetType(s); !slices.Contains(machine.ResetTypes(), resetType) {
		msgs = append(msgs, msgActionParameterValueNotInList(action, "ResetType", s))
	}
	if len(msgs) > 0 {
		writeError(w, http.StatusBadRequest, msgs...)
		return
	}
	if err := b.machine.Reset(resetType); err != nil {
		if errors.Is(err, machine.ErrPoweredOff) {
			writeError(w, http.StatusConflict, msgOperationNotAllowed("the system is powered off"))
			return
		}
		writeError(w, http.StatusInternalServerError, msgInternalError())
		return
	}
	w.WriteHeader(http.StatusNoContent)
}

// resetManager reboots the BMC, which forgets its sessions.
func (b *BMC) resetManager(w http.ResponseWriter, r *http.Request) {
	const action = "Manager.Reset"
	params, ok := decodeObject(w, r)
	if !ok {
		return
	}
	msgs := unknownParams(action, params, "ResetType")
	if raw, present := params["ResetType"]; present {
		if s, _ := jsonString(raw); s != "ForceRestart" && s != "GracefulRestart" {
			msgs = append(msgs, msgActionParameterValueNotInList(action, "ResetType", quoteValue(raw)))
		}
	}
	if len(msgs) > 0 {
		writeError(w, http.StatusBadRequest, msgs...)
		return
	}
	b.DropSessions()
	w.WriteHeader(http.StatusNoContent)
}

func (b *BMC) insertMedia(w http.ResponseWriter, r *http.Request, p, slot string) {
	const action = "VirtualMedia.InsertMedia"
	params, ok := decodeObject(w, r)
	if !ok {
		return
	}
	msgs := unknownParams(action, params, "Image", "Inserted", "WriteProtected", "TransferProtocolType",
		"TransferMethod", "UserName", "Password", "MediaType")
	md := machine.Media{WriteProtected: true}
	raw, present := params["Image"]
	if !present {
		msgs = append(msgs, msgActionParameterMissing(action, "Image"))
	} else if image, isString := jsonString(raw); !isString {
		msgs = append(msgs, msgActionParameterValueTypeError(action, "Image", quoteValue(raw)))
	} else if u, err := url.Parse(image); err != nil || u.Host == "" || transferProtocol(u.Scheme) == "" {
		msgs = append(msgs, msgActionParameterValueFormatError(action, "Image", image))
	} else {
		md.Image = image
		md.TransferProtocol = transferProtocol(u.Scheme)
	}
	boolParam := func(name string, assign func(bool)) {
		raw, present := params[name]
		if !present {
			return
		}
		var v bool
		if err := json.Unmarshal(raw, &v); err != nil {
			msgs = append(msgs, msgActionParameterValueTypeError(action, name, quoteValue(raw)))
			return
		}
		assign(v)
	}
	boolParam("WriteProtected", func(v bool) { md.WriteProtected = v })
	boolParam("Inserted", func(v bool) {
		// Attaching an image without inserting it is not modelled.
		if !v {
			msgs = append(msgs, msgActionParameterValueNotInList(action, "Inserted", "false"))
		}
	})
	enumParam := func(name string, allowed []string, assign func(string)) {
		raw, present := params[name]
		if !present {
			return
		}
		s, isString := jsonString(raw)
		if !isString {
			msgs = append(msgs, msgActionParameterValueTypeError(action, name, quoteValue(raw)))
		} else if !slices.Contains(allowed, s) {
			msgs = append(msgs, msgActionParameterValueNotInList(action, name, s))
		} else if assign != nil {
			assign(s)
		}
	}
	enumParam("TransferProtocolType", []string{"CIFS", "FTP", "SFTP", "HTTP", "HTTPS", "NFS", "SCP", "TFTP"},
		func(s string) { md.TransferProtocol = s })
	enumParam("TransferMethod", []string{"Stream", "Upload"}, nil)
	mediaTypes := []string{}
	if res := b.tree.resources[p]; res != nil {
		if arr, ok := res.props["MediaTypes"].([]any); ok {
			for _, v := range arr {
				if s, ok := v.(string); ok {
					mediaTypes = append(mediaTypes, s)
				}
			}
		}
	}
	enumParam("MediaType", mediaTypes, nil)
	for _, name := range []string{"UserName", "Password"} {
		if raw, present := params[name]; present {
			if _, isString := jsonString(raw); !isString {
				msgs = append(msgs, msgActionParameterValueTypeError(action, name, "(hidden)"))
			}
		}
	}
	if len(msgs) > 0 {
		writeError(w, http.StatusBadRequest, msgs...)
		return
	}
	if err := b.machine.InsertMedia(slot, md); err != nil {
		writeError(w, http.StatusConflict, msgResourceInUse("media is already inserted; eject it first"))
		return
	}
	w.WriteHeader(http.StatusNoContent)
}

func (b *BMC) ejectMedia(w http.ResponseWriter, r *http.Request, slot string) {
	params, ok := decodeObject(w, r)
	if !ok {
		return
	}
	if msgs := unknownParams("VirtualMedia.EjectMedia", params); len(msgs) > 0 {
		writeError(w, http.StatusBadRequest, msgs...)
		return
	}
	b.machine.EjectMedia(slot)
	w.WriteHeader(http.StatusNoContent)
}

// ---- request bodies ----

// decodeObject reads a JSON object body; an empty body is an empty object, as
// clients post actions without parameters that way. On failure it has answered 400.
func decodeObject(w http.ResponseWriter, r *http.Request) (map[string]json.RawMessage, bool) {
	data, err := io.ReadAll(http.MaxBytesReader(w, r.Body, maxRequestBody))
	if err != nil {
		writeError(w, http.StatusBadRequest, msgMalformedJSON())
		return nil, false
	}
	fields := map[string]json.RawMessage{}
	if len(bytes.TrimSpace(data)) == 0 {
		return fields, true
	}
	if err := json.Unmarshal(data, &fields); err != nil || fields == nil {
		writeError(w, http.StatusBadRequest, msgMalformedJSON())
		return nil, false
	}
	return fields, true
}

func unknownParams(action string, params map[string]json.RawMessage, known ...string) []message {
	var msgs []message
	for _, k := range sortedKeys(params) {
		if !slices.Contains(known, k) && !strings.Contains(k, "@") {
			msgs = append(msgs, msgActionParameterUnknown(action, k))
		}
	}
	return msgs
}

func jsonString(raw json.RawMessage) (string, bool) {
	var s string
	if len(raw) == 0 || raw[0] != '"' || json.Unmarshal(raw, &s) != nil {
		return "", false
	}
	return s, true
}

func sortedKeys[V any](m map[string]V) []string { return slices.Sorted(maps.Keys(m)) }

// etagMatches implements If-Match / If-None-Match comparison. Weak and unquoted
// forms match too: some clients (gofish's StripEtagQuotes) send tags bare.
func etagMatches(header, etag string) bool {
	norm := func(s string) string { return strings.Trim(strings.TrimPrefix(strings.TrimSpace(s), "W/"), `"`) }
	for part := range strings.SplitSeq(header, ",") {
		if strings.TrimSpace(part) == "*" || norm(part) == norm(etag) {
			return true
		}
	}
	return false
}
