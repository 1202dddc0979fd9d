package v1alpha1

import (
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	clusterv1 "sigs.k8s.io/cluster-api/api/core/v1beta2"
)

// MachineFinalizer keeps an AnvilMachine until its host has been released and wiped.
const MachineFinalizer = "anvilmachine.infrastructure.cluster.x-k8s.io"

// HardwareRequirements are minimums a host must meet to be chosen. Zero means "any".
type HardwareRequirements struct {
	// minCPUCores is the least number of physical cores.
	// +optional
	// +kubebuilder:validation:Minimum=0
	MinCPUCores int32 `json:"minCPUCores,omitempty"`
	// minMemoryGiB is the least memory in GiB.
	// +optional
	// +kubebuilder:validation:Minimum=0
	MinMemoryGiB int32 `json:"minMemoryGiB,omitempty"`
	// minGPUs is the least number of GPUs.
	// +optional
	// +kubebuilder:validation:Minimum=0
	MinGPUs int32 `json:"minGPUs,omitempty"`
	// gpuModel, when set, must be a substring of every counted GPU's model.
	// +optional
	// +kubebuilder:validation:MaxLength=128
	GPUModel string `json:"gpuModel,omitempty"`
	// architecture, e.g. amd64 or arm64.
	// +optional
	// +kubebuilder:validation:Enum=amd64;arm64
	Architecture string `json:"architecture,omitempty"`
}

// AnvilMachineSpec says which host a machine wants and what to install on it.
type AnvilMachineSpec struct {
	// providerID is anvil://<namespace>/<host>, set as the machine claims its host (with the
	// finalizer, in the write before the claim). It cannot change once the machine is
	// provisioned, which is when Cluster API copies it to the Machine; until then a claim that
	// loses a race for one host takes it back or moves it to another.
	// +optional
	// +kubebuilder:validation:MaxLength=512
	// +kubebuilder:validation:XValidation:rule="self.startsWith('anvil://')",message="must have the form anvil://<namespace>/<host>"
	ProviderID *string `json:"providerID,omitempty"`

	// hostSelector picks hosts by label. Hardware labels that Anvil sets on inspected hosts
	// (see the README) make plain selectors work for hardware too.
	// +optional
	HostSelector *metav1.LabelSelector `json:"hostSelector,omitempty"`

	// hardware lists minimums a host must meet.
	// +optional
	Hardware *HardwareRequirements `json:"hardware,omitempty"`

	// image to install.
	// +required
	Image Image `json:"image"`

	// wipePolicy used when the machine releases its host.
	// +optional
	// +kubebuilder:default=metadata
	WipePolicy WipePolicy `json:"wipePolicy,omitempty"`

	// hostLabelsToNode lists host labels to copy to the machine's Node once it has joined:
	// label keys (e.g. topology.kubernetes.io/zone), or prefixes ending in "/" for every label
	// under them (e.g. anvil.cluster.x-k8s.io/ for the hardware labels). Labels are added or
	// updated on the Node, never removed.
	// +optional
	// +listType=set
	// +kubebuilder:validation:MaxItems=32
	// +kubebuilder:validation:items:MinLength=1
	// +kubebuilder:validation:items:MaxLength=317
	HostLabelsToNode []string `json:"hostLabelsToNode,omitempty"`
}

// AnvilMachineInitializationStatus is the v1beta2 contract's initialization block.
// +kubebuilder:validation:MinProperties=1
type AnvilMachineInitializationStatus struct {
	// provisioned is true once the host runs the machine's image with its bootstrap data.
	// +optional
	Provisioned *bool `json:"provisioned,omitempty"`
}

// AnvilMachineStatus is what the machine controller observed.
type AnvilMachineStatus struct {
	// initialization tells Cluster API when the machine is provisioned.
	// +optional
	Initialization AnvilMachineInitializationStatus `json:"initialization,omitempty,omitzero"`

	// hostRef names the AnvilHost this machine holds.
	// +optional
	HostRef *MachineHostReference `json:"hostRef,omitempty"`

	// addresses of the host, from its inspected NICs.
	// +optional
	Addresses clusterv1.MachineAddresses `json:"addresses,omitempty"`

	// failureDomain the host is in.
	// +optional
	// +kubebuilder:validation:MaxLength=256
	FailureDomain string `json:"failureDomain,omitempty"`

	// conditions: Ready, HostClaimed, HostProvisioned, NodeIdentity (only once a Node of the
	// host's name had another machine's providerID). The list is atomic: the machine
	// controller alone writes it, always whole.
	// +optional
	// +listType=atomic
	// +kubebuilder:validation:MaxItems=32
	Conditions []metav1.Condition `json:"conditions,omitempty"`
}

// MachineHostReference names an AnvilHost in the machine's namespace.
type MachineHostReference struct {
	// +required
	// +kubebuilder:validation:MinLength=1
	// +kubebuilder:validation:MaxLength=253
	Name string `json:"name"`
}

// +kubebuilder:object:root=true
// +kubebuilder:resource:path=anvilmachines,scope=Namespaced,categories=cluster-api;anvil,shortName=am
// +kubebuilder:subresource:status
// +kubebuilder:validation:XValidation:rule="!has(oldSelf.spec.providerID) || !(has(oldSelf.status) && has(oldSelf.status.initialization) && has(oldSelf.status.initialization.provisioned) && oldSelf.status.initialization.provisioned) || has(self.spec.providerID) && self.spec.providerID == oldSelf.spec.providerID",message="providerID cannot change or go once the machine is provisioned",fieldPath=".spec.providerID"
// +kubebuilder:metadata:labels="cluster.x-k8s.io/v1beta2=v1alpha1"
// +kubebuilder:printcolumn:name="Cluster",type="string",JSONPath=".metadata.labels['cluster\\.x-k8s\\.io/cluster-name']",description="Cluster"
// +kubebuilder:printcolumn:name="Host",type="string",JSONPath=".status.hostRef.name",description="AnvilHost"
// +kubebuilder:printcolumn:name="ProviderID",type="string",JSONPath=".spec.providerID"
// +kubebuilder:printcolumn:name="Provisioned",type="boolean",JSONPath=".status.initialization.provisioned"
// +kubebuilder:printcolumn:name="Age",type="date",JSONPath=".metadata.creationTimestamp"

// AnvilMachine is the infrastructure of one Cluster API Machine: a claimed AnvilHost.
type AnvilMachine struct {
	metav1.TypeMeta   `json:",inline"`
	metav1.ObjectMeta `json:"metadata,omitempty"`

	// +required
	Spec AnvilMachineSpec `json:"spec"`
	// +optional
	Status AnvilMachineStatus `json:"status,omitempty"`
}

// GetConditions returns the machine's conditions.
func (m *AnvilMachine) GetConditions() []metav1.Condition { return m.Status.Conditions }

// SetConditions sets the machine's conditions.
func (m *AnvilMachine) SetConditions(c []metav1.Condition) { m.Status.Conditions = c }

// +kubebuilder:object:root=true

// AnvilMachineList is a list of AnvilMachines.
type AnvilMachineList struct {
	metav1.TypeMeta `json:",inline"`
	metav1.ListMeta `json:"metadata,omitempty"`
	Items           []AnvilMachine `json:"items"`
}

// AnvilMachineTemplateResource is the template's machine.
type AnvilMachineTemplateResource struct {
	// metadata copied to each AnvilMachine.
	// +optional
	ObjectMeta clusterv1.ObjectMeta `json:"metadata,omitempty,omitzero"`
	// +required
	Spec AnvilMachineSpec `json:"spec"`
}

// AnvilMachineTemplateSpec holds the template.
type AnvilMachineTemplateSpec struct {
	// +required
	Template AnvilMachineTemplateResource `json:"template"`
}

// +kubebuilder:object:root=true
// +kubebuilder:resource:path=anvilmachinetemplates,scope=Namespaced,categories=cluster-api;anvil
// +kubebuilder:metadata:labels="cluster.x-k8s.io/v1beta2=v1alpha1"
// +kubebuilder:printcolumn:name="Age",type="date",JSONPath=".metadata.creationTimestamp"

// AnvilMachineTemplate is the template MachineDeployments and KubeadmControlPlanes stamp
// AnvilMachines from.
type AnvilMachineTemplate struct {
	metav1.TypeMeta   `json:",inline"`
	metav1.ObjectMeta `json:"metadata,omitempty"`

	// +required
	Spec AnvilMachineTemplateSpec `json:"spec"`
}

// +kubebuilder:object:root=true

// AnvilMachineTemplateList is a list of AnvilMachineTemplates.
type AnvilMachineTemplateList struct {
	metav1.TypeMeta `json:",inline"`
	metav1.ListMeta `json:"metadata,omitempty"`
	Items           []AnvilMachineTemplate `json:"items"`
}

func init() {
	objectTypes = append(objectTypes, &AnvilMachine{}, &AnvilMachineList{}, &AnvilMachineTemplate{}, &AnvilMachineTemplateList{})
}
