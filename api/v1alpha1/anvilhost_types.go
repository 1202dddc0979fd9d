package v1alpha1

import (
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
)

// HostFinalizer keeps an AnvilHost until its controller has let go of the BMC session and
// the host's boot token.
const HostFinalizer = "anvilhost.infrastructure.cluster.x-k8s.io"

// BMC says how to reach a host's baseboard management controller.
type BMC struct {
	// address of the BMC as a URL. Schemes: redfish:// and redfish+https:// (Redfish over
	// HTTPS), redfish+http:// (plain HTTP, labs only), ipmi:// (IPMI v2.0 LAN, default port
	// 623). A Redfish URL may carry the system's path, e.g.
	// redfish+https://10.0.0.5/redfish/v1/Systems/1.
	// +required
	// +kubebuilder:validation:MinLength=1
	// +kubebuilder:validation:MaxLength=512
	// +kubebuilder:validation:XValidation:rule="self.matches('^(redfish|redfish\\\\+https|redfish\\\\+http|ipmi)://[^/?#@\\\\s]+([/?#].*)?$')",message="must be a URL with scheme redfish://, redfish+https://, redfish+http:// or ipmi:// followed by a host, e.g. redfish+https://10.0.0.5/redfish/v1/Systems/1 or ipmi://10.0.0.5:623; credentials go in credentialsRef, not the URL"
	Address string `json:"address"`

	// credentialsRef names a Secret in the host's namespace with the keys `username` and
	// `password`. A change to the Secret is picked up without a restart.
	// +required
	CredentialsRef LocalSecretReference `json:"credentialsRef"`

	// caBundleRef names a Secret in the host's namespace whose key `ca.crt` holds the PEM CA
	// bundle that signs the BMC's TLS certificate. Without it the system trust store is used.
	// +optional
	CABundleRef *LocalSecretReference `json:"caBundleRef,omitempty"`

	// insecureSkipVerify turns off TLS certificate verification for this BMC. It is never the
	// default; when set, the host's BMCTLSVerified condition says so.
	// +optional
	InsecureSkipVerify bool `json:"insecureSkipVerify,omitempty"`
}

// BootMode is the firmware mode a host boots in.
// +kubebuilder:validation:Enum=UEFI;UEFISecureBoot;Legacy
type BootMode string

const (
	// BootModeUEFI boots through UEFI firmware.
	BootModeUEFI BootMode = "UEFI"
	// BootModeUEFISecureBoot boots through UEFI with Secure Boot enforced.
	BootModeUEFISecureBoot BootMode = "UEFISecureBoot"
	// BootModeLegacy boots through BIOS (PC-compatible) firmware.
	BootModeLegacy BootMode = "Legacy"
)

// RootDeviceHints select the disk the operating system is installed on. Every hint given must
// match; with no hints the smallest disk of at least the image's size is used.
type RootDeviceHints struct {
	// deviceName is the kernel name or a /dev/disk/by-path link, e.g. /dev/nvme0n1.
	// +optional
	// +kubebuilder:validation:MaxLength=256
	// +kubebuilder:validation:XValidation:rule="self.startsWith('/dev/')",message="must be a device path starting with /dev/"
	DeviceName string `json:"deviceName,omitempty"`
	// serialNumber of the disk.
	// +optional
	// +kubebuilder:validation:MaxLength=128
	SerialNumber string `json:"serialNumber,omitempty"`
	// wwn (World Wide Name) of the disk.
	// +optional
	// +kubebuilder:validation:MaxLength=128
	WWN string `json:"wwn,omitempty"`
	// model of the disk (substring match).
	// +optional
	// +kubebuilder:validation:MaxLength=128
	Model string `json:"model,omitempty"`
	// minSizeGigabytes is the smallest acceptable disk size.
	// +optional
	// +kubebuilder:validation:Minimum=1
	MinSizeGigabytes int32 `json:"minSizeGigabytes,omitempty"`
	// rotational selects spinning disks (true) or solid-state disks (false).
	// +optional
	Rotational *bool `json:"rotational,omitempty"`
}

// Maintenance takes a host out of service: while it is set Anvil only reads the host's status
// and never powers, boots, wipes or hands it out.
type Maintenance struct {
	// reason says why, for the next operator (e.g. "needs repair: DIMM B2 errors").
	// +required
	// +kubebuilder:validation:MinLength=1
	// +kubebuilder:validation:MaxLength=1024
	Reason string `json:"reason"`
}

// BootNetwork is the host's address on the provisioning network, used by the boot server in
// reservation DHCP mode.
type BootNetwork struct {
	// address in CIDR form, e.g. 192.168.10.21/24.
	// +required
	// +kubebuilder:validation:MaxLength=64
	// +kubebuilder:validation:XValidation:rule="isCIDR(self)",message="must be an address in CIDR form, e.g. 192.168.10.21/24"
	Address string `json:"address"`
	// gateway is the default route handed out with the lease.
	// +optional
	// +kubebuilder:validation:MaxLength=64
	// +kubebuilder:validation:XValidation:rule="isIP(self)",message="must be an IP address"
	Gateway string `json:"gateway,omitempty"`
	// nameservers handed out with the lease.
	// +optional
	// +kubebuilder:validation:MaxItems=4
	// +kubebuilder:validation:items:MaxLength=64
	// +kubebuilder:validation:items:XValidation:rule="isIP(self)",message="must be an IP address"
	// +listType=atomic
	Nameservers []string `json:"nameservers,omitempty"`
}

// InspectionMode says where a host's hardware inventory (CPU, memory, disks, NICs) comes from.
// +kubebuilder:validation:Enum=Auto;OutOfBand;InBand
type InspectionMode string

const (
	// InspectionAuto reads the inventory from the BMC, and network-boots the agent once to
	// report it when the BMC reports no CPU or memory (IPMI reports only its FRU).
	InspectionAuto InspectionMode = "Auto"
	// InspectionOutOfBand reads the inventory from the BMC only: the agent is never booted
	// just to inspect, so an IPMI host has no hardware labels until the agent runs for an
	// install or a wipe.
	InspectionOutOfBand InspectionMode = "OutOfBand"
	// InspectionInBand prefers what the agent reports: the agent is network-booted to inspect
	// whenever the host has no in-band inventory yet, and an in-band inventory is kept over
	// the BMC's (for BMCs whose inventory is incomplete or wrong).
	InspectionInBand InspectionMode = "InBand"
)

// MachineReference identifies the AnvilMachine that claimed a host (same namespace).
type MachineReference struct {
	// name of the AnvilMachine.
	// +required
	// +kubebuilder:validation:MinLength=1
	// +kubebuilder:validation:MaxLength=253
	Name string `json:"name"`
	// uid of the AnvilMachine, so that a new object with the same name is not mistaken for
	// the owner of an old claim. It is the one part of a claim that may change: `clusterctl
	// move` recreates the AnvilMachine with a new UID, and the machine then adopts its host by
	// name, cluster and providerID.
	// +required
	UID types.UID `json:"uid"`
}

// HostClaim is what an AnvilMachine writes into the host it takes. It lives in spec, not
// status, because `clusterctl move` carries spec only: a moved cluster must keep its hosts.
// The AnvilMachine controller writes it; the host controller removes it once a released host
// has been wiped.
type HostClaim struct {
	// machineRef is the AnvilMachine that holds the host.
	// +required
	MachineRef MachineReference `json:"machineRef"`

	// clusterName is the Cluster API cluster of that machine.
	// +optional
	// +kubebuilder:validation:MaxLength=63
	ClusterName string `json:"clusterName,omitempty"`

	// image to install.
	// +optional
	Image *Image `json:"image,omitempty"`

	// bootstrapDataSecretRef names the Secret (key `value`) with the machine's bootstrap data,
	// written to the config drive as cloud-init user-data. It carries cluster CA keys, so it is
	// handed only to the authenticated agent of the current boot attempt.
	// +optional
	BootstrapDataSecretRef *LocalSecretReference `json:"bootstrapDataSecretRef,omitempty"`

	// providerID the node will register with, written into the config drive's meta-data.
	// +optional
	// +kubebuilder:validation:MaxLength=512
	ProviderID string `json:"providerID,omitempty"`

	// wipePolicy applied when the claim is released.
	// +optional
	// +kubebuilder:default=metadata
	WipePolicy WipePolicy `json:"wipePolicy,omitempty"`

	// released is set by the machine when it lets go of the host. The host is then
	// deprovisioned with wipePolicy and the claim removed.
	// +optional
	Released bool `json:"released,omitempty"`
}

// ProvisionedFor identifies the install this claim asks for: the machine by name and cluster
// (not by UID, which `clusterctl move` changes), the providerID and the image checksum. It is
// the value of ProvisionedForAnnotation once that install has completed.
func (c *HostClaim) ProvisionedFor() string {
	checksum := ""
	if c.Image != nil {
		checksum = c.Image.Checksum
	}
	return c.ClusterName + "/" + c.MachineRef.Name + "@" + c.ProviderID + "@" + checksum
}

// AnvilHostSpec is what an operator (and, within spec.claim, an AnvilMachine) wants of one
// physical server.
// +kubebuilder:validation:XValidation:rule="!has(oldSelf.retire) || !oldSelf.retire || (has(self.retire) && self.retire)",message="retire cannot be undone: a retired host is scrapped; create a new AnvilHost to bring the server back"
// +kubebuilder:validation:XValidation:rule="!has(oldSelf.claim) || !has(self.claim) || (self.claim.machineRef.name == oldSelf.claim.machineRef.name && has(self.claim.clusterName) == has(oldSelf.claim.clusterName) && (!has(self.claim.clusterName) || self.claim.clusterName == oldSelf.claim.clusterName))",message="a claim cannot pass to another machine or cluster (claim.machineRef.name and claim.clusterName are fixed while the host is claimed): release the claim first"
type AnvilHostSpec struct {
	// bmc says how to reach the server's BMC.
	// +required
	BMC BMC `json:"bmc"`

	// bootMACAddress is the MAC of the NIC that network-boots; it identifies the server to
	// the boot services.
	// +required
	// +kubebuilder:validation:MaxLength=17
	// +kubebuilder:validation:XValidation:rule="self.matches('^([0-9a-fA-F]{2}:){5}[0-9a-fA-F]{2}$')",message="must be a MAC address of six colon-separated hex pairs, e.g. 52:54:00:12:34:56"
	BootMACAddress string `json:"bootMACAddress"`

	// bootMode is the firmware mode the server boots in.
	// +optional
	// +kubebuilder:default=UEFI
	BootMode BootMode `json:"bootMode,omitempty"`

	// bootNetwork is the server's address on the provisioning network (reservation DHCP).
	// +optional
	BootNetwork *BootNetwork `json:"bootNetwork,omitempty"`

	// rootDeviceHints choose the disk to install on.
	// +optional
	RootDeviceHints *RootDeviceHints `json:"rootDeviceHints,omitempty"`

	// online is the power state wanted while the host is not being provisioned or wiped.
	// +optional
	// +kubebuilder:default=true
	Online bool `json:"online"`

	// inspection says where the hardware inventory comes from: Auto (the BMC, and the agent
	// network-booted once when the BMC reports no CPU or memory, as IPMI BMCs do), OutOfBand
	// (the BMC only; the agent is never booted just to inspect) or InBand (the agent whenever
	// the host has no in-band inventory yet, kept over the BMC's).
	// +optional
	// +kubebuilder:default=Auto
	Inspection InspectionMode `json:"inspection,omitempty"`

	// maintenance, when set, stops every action on the host except reading its status.
	// Removing it from an unclaimed host wipes the host (metadata) and re-inspects it before it
	// is Available again; a claimed host resumes where it was.
	// +optional
	Maintenance *Maintenance `json:"maintenance,omitempty"`

	// retire sends the host to scrap: it is wiped, powered off and marked Retired, and is
	// never claimed again. It cannot be undone.
	// +optional
	Retire bool `json:"retire,omitempty"`

	// claim is written by the AnvilMachine that holds the host.
	// +optional
	// +structType=atomic
	Claim *HostClaim `json:"claim,omitempty"`
}

// HostState is the lifecycle state of a host.
// +kubebuilder:validation:Enum=Registering;Inspecting;Available;Provisioning;Provisioned;Upgrading;Deprovisioning;Maintenance;Retiring;Retired;Deleting
type HostState string

// The host lifecycle. Registering → Inspecting → Available ⇄ Provisioning → Provisioned →
// Deprovisioning → Available; Provisioned → Upgrading → Provisioned writes a new image into the
// inactive A/B slot; Maintenance from anywhere; Retiring → Retired is terminal.
const (
	HostStateRegistering    HostState = "Registering"
	HostStateInspecting     HostState = "Inspecting"
	HostStateAvailable      HostState = "Available"
	HostStateProvisioning   HostState = "Provisioning"
	HostStateProvisioned    HostState = "Provisioned"
	HostStateUpgrading      HostState = "Upgrading"
	HostStateDeprovisioning HostState = "Deprovisioning"
	HostStateMaintenance    HostState = "Maintenance"
	HostStateRetiring       HostState = "Retiring"
	HostStateRetired        HostState = "Retired"
	HostStateDeleting       HostState = "Deleting"
)

// PowerState is a server's power as its BMC last reported it.
// +kubebuilder:validation:Enum=On;Off;Unknown
type PowerState string

const (
	PowerOn      PowerState = "On"
	PowerOff     PowerState = "Off"
	PowerUnknown PowerState = "Unknown"
)

// SystemInfo identifies the server.
type SystemInfo struct {
	// +optional
	Manufacturer string `json:"manufacturer,omitempty"`
	// +optional
	Model string `json:"model,omitempty"`
	// +optional
	SerialNumber string `json:"serialNumber,omitempty"`
	// +optional
	UUID string `json:"uuid,omitempty"`
	// firmware is the BIOS/UEFI version.
	// +optional
	Firmware string `json:"firmware,omitempty"`
	// bmcFirmware is the BMC's firmware version.
	// +optional
	BMCFirmware string `json:"bmcFirmware,omitempty"`
}

// CPUInfo describes the processors.
type CPUInfo struct {
	// +optional
	Model string `json:"model,omitempty"`
	// arch is the architecture as Go and Kubernetes name it: amd64, arm64, ...
	// +optional
	Arch string `json:"arch,omitempty"`
	// +optional
	Sockets int32 `json:"sockets,omitempty"`
	// cores is the number of physical cores over all sockets.
	// +optional
	Cores int32 `json:"cores,omitempty"`
	// threads is the number of hardware threads over all sockets.
	// +optional
	Threads int32 `json:"threads,omitempty"`
}

// NUMANode is one NUMA node.
type NUMANode struct {
	// +required
	ID int32 `json:"id"`
	// cpus as a Linux cpulist, e.g. 0-15,32-47.
	// +optional
	CPUs string `json:"cpus,omitempty"`
	// +optional
	Memory *resource.Quantity `json:"memory,omitempty"`
}

// DiskType is the kind of storage device.
// +kubebuilder:validation:Enum=HDD;SSD;NVMe;Unknown
type DiskType string

const (
	DiskHDD     DiskType = "HDD"
	DiskSSD     DiskType = "SSD"
	DiskNVMe    DiskType = "NVMe"
	DiskUnknown DiskType = "Unknown"
)

// Disk is one storage device.
type Disk struct {
	// name is the kernel device path when known (in-band), else the BMC's name for it.
	// +required
	Name string `json:"name"`
	// +optional
	SizeBytes int64 `json:"sizeBytes,omitempty"`
	// +optional
	Type DiskType `json:"type,omitempty"`
	// +optional
	Model string `json:"model,omitempty"`
	// +optional
	SerialNumber string `json:"serialNumber,omitempty"`
	// +optional
	WWN string `json:"wwn,omitempty"`
}

// NIC is one network interface.
type NIC struct {
	// +optional
	Name string `json:"name,omitempty"`
	// +required
	MACAddress string `json:"macAddress"`
	// +optional
	SpeedMbps int32 `json:"speedMbps,omitempty"`
	// +optional
	LinkUp *bool `json:"linkUp,omitempty"`
	// ips seen on the interface (in-band only).
	// +optional
	// +listType=atomic
	IPs []string `json:"ips,omitempty"`
}

// Accelerator is a GPU or other PCI accelerator.
type Accelerator struct {
	// +optional
	Vendor string `json:"vendor,omitempty"`
	// +optional
	Model string `json:"model,omitempty"`
	// class is the PCI class, e.g. GPU, ProcessingAccelerator.
	// +optional
	Class string `json:"class,omitempty"`
	// +optional
	PCIAddress string `json:"pciAddress,omitempty"`
}

// HardwareInventory is what inspection found. Out-of-band data comes from the BMC; in-band
// data from the agent replaces it where both exist.
type HardwareInventory struct {
	// +optional
	System SystemInfo `json:"system,omitempty"`
	// +optional
	CPU CPUInfo `json:"cpu,omitempty"`
	// +optional
	// +listType=atomic
	NUMANodes []NUMANode `json:"numaNodes,omitempty"`
	// +optional
	Memory *resource.Quantity `json:"memory,omitempty"`
	// +optional
	// +listType=atomic
	Disks []Disk `json:"disks,omitempty"`
	// +optional
	// +listType=atomic
	NICs []NIC `json:"nics,omitempty"`
	// +optional
	// +listType=atomic
	Accelerators []Accelerator `json:"accelerators,omitempty"`
	// source says where the data came from: OutOfBand (BMC) or InBand (agent).
	// +optional
	// +kubebuilder:validation:Enum=OutOfBand;InBand
	Source string `json:"source,omitempty"`
	// inspectedAt is when this inventory was taken.
	// +optional
	InspectedAt *metav1.Time `json:"inspectedAt,omitempty"`
}

// Slot names one of the two root slots of the A/B layout.
// +kubebuilder:validation:Enum=A;B
type Slot string

const (
	SlotA Slot = "A"
	SlotB Slot = "B"
)

// SlotContent records what was installed in one slot.
type SlotContent struct {
	// +optional
	ImageURL string `json:"imageURL,omitempty"`
	// +optional
	Checksum string `json:"checksum,omitempty"`
	// +optional
	InstalledAt *metav1.Time `json:"installedAt,omitempty"`
}

// BootSlots is the A/B state of the installed disk.
type BootSlots struct {
	// active is the slot marked good, the one the firmware falls back to.
	// +optional
	Active Slot `json:"active,omitempty"`
	// pending is a slot being tried with a boot counter; empty when none.
	// +optional
	Pending Slot `json:"pending,omitempty"`
	// triesLeft on the pending slot.
	// +optional
	TriesLeft int32 `json:"triesLeft,omitempty"`
	// lastFailed is the slot whose tries ran out, if any.
	// +optional
	LastFailed Slot `json:"lastFailed,omitempty"`
	// +optional
	A *SlotContent `json:"a,omitempty"`
	// +optional
	B *SlotContent `json:"b,omitempty"`
}

// HostError is the last failure and the back-off it caused.
type HostError struct {
	// reason is a CamelCase code, e.g. BMCUnreachable, BMCAuthFailed, InstallFailed.
	// +required
	Reason string `json:"reason"`
	// message for humans; never carries secrets.
	// +optional
	Message string `json:"message,omitempty"`
	// count of consecutive failures, which sets the back-off.
	// +optional
	Count int32 `json:"count,omitempty"`
	// +optional
	LastTransitionTime metav1.Time `json:"lastTransitionTime,omitempty"`
}

// The structures one controller writes whole (status conditions, hardware and bootSlots here,
// spec.claim, AnvilMachine's conditions) are atomic for server-side field tracking: tracked
// field by field, their managedFields were about 40 % of every stored object, which the API
// server decodes, compares and encodes again on every write. Atomic, `make bench-machines`
// needs 14 % less kube-apiserver CPU. Nobody can own a single condition with server-side
// apply, which no writer of these objects does.

// AnvilHostStatus is what the host controller observed. Only the host controller writes it.
type AnvilHostStatus struct {
	// state is where the host is in its lifecycle.
	// +optional
	State HostState `json:"state,omitempty"`

	// power is the power state the BMC last reported.
	// +optional
	Power PowerState `json:"power,omitempty"`

	// hardware is the inspected inventory.
	// +optional
	// +structType=atomic
	Hardware *HardwareInventory `json:"hardware,omitempty"`

	// bootSlots is the A/B state of the installed disk.
	// +optional
	// +structType=atomic
	BootSlots *BootSlots `json:"bootSlots,omitempty"`

	// lastError is the most recent failure, cleared on success.
	// +optional
	LastError *HostError `json:"lastError,omitempty"`

	// observedGeneration is the spec generation the status reflects.
	// +optional
	ObservedGeneration int64 `json:"observedGeneration,omitempty"`

	// conditions: Ready, BMCReachable, BMCTLSVerified, Inspected, Provisioned.
	// The list is atomic: the host controller alone writes it, always whole.
	// +optional
	// +listType=atomic
	// +kubebuilder:validation:MaxItems=32
	Conditions []metav1.Condition `json:"conditions,omitempty"`
}

// +kubebuilder:object:root=true
// +kubebuilder:resource:path=anvilhosts,scope=Namespaced,categories=cluster-api;anvil,shortName=ah
// +kubebuilder:subresource:status
// +kubebuilder:metadata:labels="cluster.x-k8s.io/v1beta2=v1alpha1"
// +kubebuilder:metadata:labels="clusterctl.cluster.x-k8s.io/move-hierarchy=true"
// +kubebuilder:printcolumn:name="State",type="string",JSONPath=".status.state",description="Lifecycle state"
// +kubebuilder:printcolumn:name="Power",type="string",JSONPath=".status.power",description="Power state reported by the BMC"
// +kubebuilder:printcolumn:name="Machine",type="string",JSONPath=".spec.claim.machineRef.name",description="AnvilMachine holding the host"
// +kubebuilder:printcolumn:name="Cluster",type="string",JSONPath=".spec.claim.clusterName",description="Cluster of that machine"
// +kubebuilder:printcolumn:name="Maintenance",type="string",JSONPath=".spec.maintenance.reason",priority=1
// +kubebuilder:printcolumn:name="Error",type="string",JSONPath=".status.lastError.reason",priority=1
// +kubebuilder:printcolumn:name="Age",type="date",JSONPath=".metadata.creationTimestamp"

// AnvilHost is one physical server under Anvil's management.
//
// Its CRD carries clusterctl's move-hierarchy label: `clusterctl move` takes every host of the
// namespace it moves (with what the host owns) along with the clusters, since a cluster's
// machines cannot be managed without their hosts. BMC Secrets go too: the host controller
// labels the Secrets its hosts use with clusterctl's move label.
type AnvilHost struct {
	metav1.TypeMeta   `json:",inline"`
	metav1.ObjectMeta `json:"metadata,omitempty"`

	// +required
	Spec AnvilHostSpec `json:"spec"`
	// +optional
	Status AnvilHostStatus `json:"status,omitempty"`
}

// GetConditions returns the host's conditions (CAPI's conditions helpers use it).
func (h *AnvilHost) GetConditions() []metav1.Condition { return h.Status.Conditions }

// SetConditions sets the host's conditions.
func (h *AnvilHost) SetConditions(c []metav1.Condition) { h.Status.Conditions = c }

// +kubebuilder:object:root=true

// AnvilHostList is a list of AnvilHosts.
type AnvilHostList struct {
	metav1.TypeMeta `json:",inline"`
	metav1.ListMeta `json:"metadata,omitempty"`
	Items           []AnvilHost `json:"items"`
}

func init() {
	objectTypes = append(objectTypes, &AnvilHost{}, &AnvilHostList{})
}
