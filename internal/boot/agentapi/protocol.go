// Package agentapi is the wire protocol between the boot services and the Anvil agent (the
// program that runs as PID 1 in the agent initramfs), with both ends: Server, an http.Handler
// backed by a Backend the host controller implements, and Client, which the agent uses.
//
// Protocol v1, JSON over HTTP(S), every path under /agent/v1/:
//
//	POST /agent/v1/register   RegisterRequest  → RegisterResponse   (once per boot attempt)
//	GET  /agent/v1/task                        → Task
//	POST /agent/v1/progress   Progress         → 204
//	POST /agent/v1/result     Result           → 204
//	GET  /agent/v1/bootstrap                   → user-data bytes (application/octet-stream)
//
// Every request carries "Authorization: Bearer <boot token>" (package token: HMAC-signed,
// bound to host and boot attempt, expiring) and "X-Anvil-Agent-Session: <64 hex digits>", a
// random key the agent draws once at start. The first registration of a boot attempt binds the
// attempt to that session; from then on the token is useful only together with that session,
// a registration with the same token and another session is refused (409) and reported as a
// security event, and a repeat with the same session (a retry after a lost response) succeeds
// without registering twice. Nothing is decided by source IP, MAC or UUID.
//
// Errors are JSON {"code": "...", "error": "..."}: 400 bad_request, 401 unauthorized (no,
// malformed, forged or expired token), 403 forbidden (host unknown, attempt no longer current,
// agent not registered, session mismatch, bootstrap data outside provisioning), 409 conflict
// (second registration), 503 unavailable (retry).
package agentapi

import (
	infrav1 "github.com/anvil-metal/cluster-api-provider-anvil/api/v1alpha1"
)

// Paths and headers of protocol v1.
const (
	PathPrefix    = "/agent/v1/"
	PathRegister  = PathPrefix + "register"
	PathTask      = PathPrefix + "task"
	PathProgress  = PathPrefix + "progress"
	PathResult    = PathPrefix + "result"
	PathBootstrap = PathPrefix + "bootstrap"

	// SessionHeader carries the agent's session key (hex of 32 random bytes).
	SessionHeader = "X-Anvil-Agent-Session"
)

// Kernel command-line parameters the boot script sets and the agent reads.
const (
	// KernelParamAPI is the base URL of the agent API (scheme, host, port; no path needed).
	KernelParamAPI = "anvil.api"
	// KernelParamToken is the boot token.
	KernelParamToken = "anvil.token"
	// KernelParamCA pins the agent API's TLS certificate or CA: sha256:<64 hex digits> of its DER.
	KernelParamCA = "anvil.ca"
)

// RegisterRequest is the agent's first call: who it is running on.
type RegisterRequest struct {
	// AgentVersion is the agent's build version, for the host's events.
	AgentVersion string `json:"agentVersion,omitempty"`
	// Inventory is the in-band hardware inventory (source InBand).
	Inventory infrav1.HardwareInventory `json:"inventory"`
}

// RegisterResponse confirms a registration.
type RegisterResponse struct {
	// Host is namespace/name of the AnvilHost the token belongs to (for the agent's logs).
	Host string `json:"host"`
	// Attempt is the boot attempt the agent serves.
	Attempt string `json:"attempt"`
	// PollIntervalSeconds is how long to wait between GET task calls that return kind none.
	PollIntervalSeconds int32 `json:"pollIntervalSeconds"`
}

// TaskKind says what the agent is to do next.
type TaskKind string

// Task kinds.
const (
	// TaskNone: nothing yet; ask again after RetryAfterSeconds.
	TaskNone TaskKind = "none"
	// TaskWipe: erase the disks per WipePolicy.
	TaskWipe TaskKind = "wipe"
	// TaskInstall: write Image (to the inactive slot for ABRoot), then the config drive.
	TaskInstall TaskKind = "install"
	// TaskReboot: reboot into the installed system.
	TaskReboot TaskKind = "reboot"
	// TaskPowerOff: power the machine off (after a release wipe or retirement).
	TaskPowerOff TaskKind = "poweroff"
)

// Valid says whether k is a known kind.
func (k TaskKind) Valid() bool {
	switch k {
	case TaskNone, TaskWipe, TaskInstall, TaskReboot, TaskPowerOff:
		return true
	}
	return false
}

// Task is one unit of work for the agent.
type Task struct {
	// ID names this task; Progress and Result refer to it. Empty for kind none.
	ID string `json:"id,omitempty"`
	// Kind of work.
	Kind TaskKind `json:"kind"`
	// WipePolicy for wipe tasks (and, for install tasks, what to erase first).
	WipePolicy infrav1.WipePolicy `json:"wipePolicy,omitempty"`
	// Image for install tasks. Its URL points at the boot services' image cache.
	Image *Image `json:"image,omitempty"`
	// RootDeviceHints choose the disk for install tasks.
	RootDeviceHints *infrav1.RootDeviceHints `json:"rootDeviceHints,omitempty"`
	// ConfigDrive for install tasks. User-data is not in it: it is fetched separately from
	// GET /agent/v1/bootstrap, so that the task can be logged and the secret cannot.
	ConfigDrive *ConfigDrive `json:"configDrive,omitempty"`
	// RetryAfterSeconds, for kind none, is when to ask again.
	RetryAfterSeconds int32 `json:"retryAfterSeconds,omitempty"`
}

// Image is an image to install, as the agent fetches it.
type Image struct {
	// URL to GET the image from (http or https; supports Range for resuming).
	URL string `json:"url"`
	// Checksum of the decompressed image as <algorithm>:<hex>, sha256 or sha512 (as in the
	// AnvilHost's spec.claim.image). The cache verified it before serving; the agent verifies
	// it again for everything it writes.
	Checksum string `json:"checksum"`
	// Format is the encoding at URL: raw, gzip, zstd or xz.
	Format infrav1.ImageFormat `json:"format,omitempty"`
	// Layout is ABRoot (root filesystem for the inactive slot) or WholeDisk.
	Layout infrav1.ImageLayout `json:"layout,omitempty"`
}

// ConfigDrive is what the agent writes to the config drive besides user-data.
type ConfigDrive struct {
	// MetaData becomes cloud-init meta-data.
	MetaData MetaData `json:"metaData"`
	// NetworkConfig is a cloud-init network-config document, written verbatim; empty for DHCP.
	NetworkConfig string `json:"networkConfig,omitempty"`
}

// MetaData is the cloud-init meta-data of the installed system.
type MetaData struct {
	// InstanceID changes with every install, so cloud-init runs again.
	InstanceID string `json:"instanceID"`
	// LocalHostname is the node's hostname.
	LocalHostname string `json:"localHostname"`
	// ProviderID is what the kubelet registers with (--provider-id).
	ProviderID string `json:"providerID,omitempty"`
}

// Progress reports how far a task has got.
type Progress struct {
	// TaskID is the Task.ID being worked on.
	TaskID string `json:"taskID"`
	// Step is a short machine-friendly name, e.g. "download", "write", "verify".
	Step string `json:"step"`
	// Percent done of the step, 0..100.
	Percent int32 `json:"percent"`
	// Message for humans (no secrets: it ends up in events).
	Message string `json:"message,omitempty"`
}

// Result reports how a task ended.
type Result struct {
	// TaskID is the Task.ID that ended.
	TaskID string `json:"taskID"`
	// Kind of the task.
	Kind TaskKind `json:"kind"`
	// OK is true on success.
	OK bool `json:"ok"`
	// Error says what went wrong when OK is false.
	Error string `json:"error,omitempty"`
	// Slot the image was installed into (install, ABRoot).
	Slot infrav1.Slot `json:"slot,omitempty"`
	// Disk the image was installed onto (install).
	Disk string `json:"disk,omitempty"`
	// ImageChecksum of the bytes written, as verified by the agent (install).
	ImageChecksum string `json:"imageChecksum,omitempty"`
}

// errorBody is the JSON body of every error response.
type errorBody struct {
	Code  string `json:"code"`
	Error string `json:"error"`
}

// Limits the server enforces on what it receives. Generous for real agents, small enough
// that a hostile caller cannot make the server buffer much.
const (
	maxRegisterBody = 1 << 20
	maxSmallBody    = 64 << 10
	maxStepLen      = 64
	maxMessageLen   = 1024
	maxTaskIDLen    = 128
	maxBootstrap    = 4 << 20
)
