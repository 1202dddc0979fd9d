package v1alpha1

// LabelDomain prefixes every label and annotation that Anvil owns.
const LabelDomain = "anvil.cluster.x-k8s.io"

// SyncPowerAnnotation on an AnvilHost asks for its power state to be read now rather than at
// the next periodic sync; the controller removes it once done.
const SyncPowerAnnotation = LabelDomain + "/sync-power"

// RebootAnnotation on an AnvilHost asks the host controller (the only component that talks to
// BMCs) to power-cycle the server once; its value identifies the request. The controller
// removes it when the cycle was issued.
const RebootAnnotation = LabelDomain + "/reboot"

// ProvisionedForAnnotation on an AnvilHost records what the host last installed, as
// "<cluster>/<machine>@<providerID>@<image checksum>" (see HostClaim.ProvisionedFor). The host
// controller sets it when an install completes and removes it with the claim. It lives in
// metadata because `clusterctl move` does not carry status: a moved host whose claim still
// asks for exactly this install goes back to Provisioned without being installed again.
const ProvisionedForAnnotation = LabelDomain + "/provisioned-for"

// BlockMoveAnnotation is clusterctl's block-move annotation: `clusterctl move` waits while any
// object it moves carries it. A host carries it from the moment a machine claims it until it
// is Provisioned (or, after a release, wiped): the AnvilMachine controller sets it with the
// claim, the host controller removes it, and neither stops for a paused cluster.
const BlockMoveAnnotation = "clusterctl.cluster.x-k8s.io/block-move"

// DefaultFailureDomainLabel is the host label that names a host's failure domain unless an
// AnvilCluster says otherwise.
const DefaultFailureDomainLabel = "topology.kubernetes.io/zone"

// LocalSecretReference names a Secret in the namespace of the object that holds the
// reference. There is deliberately no namespace field: a reference can never reach into
// another namespace (a Metal3 advisory came from exactly that), and the API server rejects a
// manifest that tries to set one as an unknown field.
type LocalSecretReference struct {
	// name of the Secret, in the same namespace as the referring object.
	// +required
	// +kubebuilder:validation:MinLength=1
	// +kubebuilder:validation:MaxLength=253
	// +kubebuilder:validation:XValidation:rule="self.matches('^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$')",message="must be a Secret name (lowercase RFC 1123 subdomain); the Secret must live in the same namespace"
	Name string `json:"name"`
}

// ImageFormat is how the bytes at an image URL are encoded.
// +kubebuilder:validation:Enum=raw;gzip;zstd;xz
type ImageFormat string

const (
	// ImageFormatRaw is an uncompressed image.
	ImageFormatRaw ImageFormat = "raw"
	// ImageFormatGzip is a gzip-compressed raw image.
	ImageFormatGzip ImageFormat = "gzip"
	// ImageFormatZstd is a zstd-compressed raw image.
	ImageFormatZstd ImageFormat = "zstd"
	// ImageFormatXz is an xz-compressed raw image.
	ImageFormatXz ImageFormat = "xz"
)

// ImageLayout says what an image contains and so where the agent writes it.
// +kubebuilder:validation:Enum=ABRoot;WholeDisk
type ImageLayout string

const (
	// ImageLayoutABRoot is a root filesystem written into the inactive A/B slot of Anvil's disk
	// layout; the DATA partition survives every install.
	ImageLayoutABRoot ImageLayout = "ABRoot"
	// ImageLayoutWholeDisk is a whole-disk image that brings its own partition table; it has a
	// single slot and no rollback.
	ImageLayoutWholeDisk ImageLayout = "WholeDisk"
)

// Image is an operating-system image to install.
type Image struct {
	// url to download the image from. Only http:// and https:// are accepted: file:// and
	// other local schemes would read the provisioner's own files.
	// +required
	// +kubebuilder:validation:MinLength=1
	// +kubebuilder:validation:MaxLength=2048
	// +kubebuilder:validation:XValidation:rule="isURL(self) && url(self).getScheme() in ['http', 'https'] && url(self).getHostname() != ''",message="must be an http:// or https:// URL with a host (file:// and other schemes are refused)"
	URL string `json:"url"`

	// checksum of the decompressed image as <algorithm>:<hex digest>, e.g.
	// sha256:<64 hex digits> or sha512:<128 hex digits>. Mandatory: nothing counts as
	// installed unless the bytes written match it.
	// +required
	// +kubebuilder:validation:MaxLength=135
	// +kubebuilder:validation:XValidation:rule="self.matches('^(sha256:[0-9a-f]{64}|sha512:[0-9a-f]{128})$')",message="must be sha256:<64 lowercase hex digits> or sha512:<128 lowercase hex digits>"
	Checksum string `json:"checksum"`

	// format is how the image is encoded on the wire; the agent decompresses it while it
	// streams.
	// +optional
	// +kubebuilder:default=raw
	Format ImageFormat `json:"format,omitempty"`

	// layout says whether the image is a root filesystem for an A/B slot or a whole disk.
	// +optional
	// +kubebuilder:default=ABRoot
	Layout ImageLayout `json:"layout,omitempty"`
}

// WipePolicy says how much of a host's disks is erased when it is released or retired.
// +kubebuilder:validation:Enum=disabled;metadata;full;secure
type WipePolicy string

const (
	// WipePolicyDisabled erases nothing. Only for hosts whose next user may see the data.
	WipePolicyDisabled WipePolicy = "disabled"
	// WipePolicyMetadata erases partition tables and filesystem signatures at both ends of
	// each disk (and discards where supported).
	WipePolicyMetadata WipePolicy = "metadata"
	// WipePolicyFull overwrites every byte and verifies by sampling.
	WipePolicyFull WipePolicy = "full"
	// WipePolicySecure uses the drive's own sanitize/secure-erase command, falling back to full.
	WipePolicySecure WipePolicy = "secure"
)
