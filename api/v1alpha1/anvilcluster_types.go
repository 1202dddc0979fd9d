package v1alpha1

import (
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	clusterv1 "sigs.k8s.io/cluster-api/api/core/v1beta2"
)

// ClusterFinalizer keeps an AnvilCluster until its machines are gone.
const ClusterFinalizer = "anvilcluster.infrastructure.cluster.x-k8s.io"

// AnvilClusterSpec describes a cluster's infrastructure. Bare metal has no load balancer to
// create: the control-plane endpoint is a VIP the user provides (kube-vip in the templates).
type AnvilClusterSpec struct {
	// controlPlaneEndpoint is the VIP or DNS name the API server is reached at.
	// +optional
	ControlPlaneEndpoint clusterv1.APIEndpoint `json:"controlPlaneEndpoint,omitempty,omitzero"`

	// failureDomainLabel is the host label whose values name failure domains (zones with
	// independent power, cooling and network).
	// +optional
	// +kubebuilder:default="topology.kubernetes.io/zone"
	// +kubebuilder:validation:MaxLength=317
	// +kubebuilder:validation:XValidation:rule="self == oldSelf",message="failureDomainLabel cannot change: machines are already placed by it"
	FailureDomainLabel string `json:"failureDomainLabel,omitempty"`

	// controlPlaneFailureDomains, when set, limits control-plane machines to these domains;
	// otherwise every domain is eligible.
	// +optional
	// +listType=set
	// +kubebuilder:validation:MaxItems=64
	// +kubebuilder:validation:items:MaxLength=256
	ControlPlaneFailureDomains []string `json:"controlPlaneFailureDomains,omitempty"`
}

// AnvilClusterInitializationStatus is the v1beta2 contract's initialization block.
// +kubebuilder:validation:MinProperties=1
type AnvilClusterInitializationStatus struct {
	// provisioned is true once the cluster infrastructure is ready for machines.
	// +optional
	Provisioned *bool `json:"provisioned,omitempty"`
}

// AnvilClusterStatus is what the cluster controller observed.
type AnvilClusterStatus struct {
	// initialization tells Cluster API when the infrastructure is ready.
	// +optional
	Initialization AnvilClusterInitializationStatus `json:"initialization,omitempty,omitzero"`

	// failureDomains found on the hosts of the cluster's namespace.
	// +optional
	// +listType=map
	// +listMapKey=name
	// +kubebuilder:validation:MaxItems=100
	FailureDomains []clusterv1.FailureDomain `json:"failureDomains,omitempty"`

	// conditions: Ready.
	// +optional
	// +listType=map
	// +listMapKey=type
	// +kubebuilder:validation:MaxItems=32
	Conditions []metav1.Condition `json:"conditions,omitempty"`
}

// +kubebuilder:object:root=true
// +kubebuilder:resource:path=anvilclusters,scope=Namespaced,categories=cluster-api;anvil
// +kubebuilder:subresource:status
// +kubebuilder:metadata:labels="cluster.x-k8s.io/v1beta2=v1alpha1"
// +kubebuilder:printcolumn:name="Cluster",type="string",JSONPath=".metadata.labels['cluster\\.x-k8s\\.io/cluster-name']",description="Cluster"
// +kubebuilder:printcolumn:name="Endpoint",type="string",JSONPath=".spec.controlPlaneEndpoint.host"
// +kubebuilder:printcolumn:name="Provisioned",type="boolean",JSONPath=".status.initialization.provisioned"
// +kubebuilder:printcolumn:name="Age",type="date",JSONPath=".metadata.creationTimestamp"

// AnvilCluster is the infrastructure of one Cluster API Cluster.
type AnvilCluster struct {
	metav1.TypeMeta   `json:",inline"`
	metav1.ObjectMeta `json:"metadata,omitempty"`

	// +optional
	Spec AnvilClusterSpec `json:"spec,omitempty"`
	// +optional
	Status AnvilClusterStatus `json:"status,omitempty"`
}

// GetConditions returns the cluster's conditions.
func (c *AnvilCluster) GetConditions() []metav1.Condition { return c.Status.Conditions }

// SetConditions sets the cluster's conditions.
func (c *AnvilCluster) SetConditions(conds []metav1.Condition) { c.Status.Conditions = conds }

// +kubebuilder:object:root=true

// AnvilClusterList is a list of AnvilClusters.
type AnvilClusterList struct {
	metav1.TypeMeta `json:",inline"`
	metav1.ListMeta `json:"metadata,omitempty"`
	Items           []AnvilCluster `json:"items"`
}

// AnvilClusterTemplateResource is the template's cluster.
type AnvilClusterTemplateResource struct {
	// +optional
	ObjectMeta clusterv1.ObjectMeta `json:"metadata,omitempty,omitzero"`
	// +required
	Spec AnvilClusterSpec `json:"spec"`
}

// AnvilClusterTemplateSpec holds the template.
type AnvilClusterTemplateSpec struct {
	// +required
	Template AnvilClusterTemplateResource `json:"template"`
}

// +kubebuilder:object:root=true
// +kubebuilder:resource:path=anvilclustertemplates,scope=Namespaced,categories=cluster-api;anvil
// +kubebuilder:metadata:labels="cluster.x-k8s.io/v1beta2=v1alpha1"
// +kubebuilder:printcolumn:name="Age",type="date",JSONPath=".metadata.creationTimestamp"

// AnvilClusterTemplate is the template a ClusterClass stamps AnvilClusters from.
type AnvilClusterTemplate struct {
	metav1.TypeMeta   `json:",inline"`
	metav1.ObjectMeta `json:"metadata,omitempty"`

	// +required
	Spec AnvilClusterTemplateSpec `json:"spec"`
}

// +kubebuilder:object:root=true

// AnvilClusterTemplateList is a list of AnvilClusterTemplates.
type AnvilClusterTemplateList struct {
	metav1.TypeMeta `json:",inline"`
	metav1.ListMeta `json:"metadata,omitempty"`
	Items           []AnvilClusterTemplate `json:"items"`
}

func init() {
	objectTypes = append(objectTypes, &AnvilCluster{}, &AnvilClusterList{}, &AnvilClusterTemplate{}, &AnvilClusterTemplateList{})
}
