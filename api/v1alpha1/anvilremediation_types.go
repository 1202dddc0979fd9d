package v1alpha1

import (
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	clusterv1 "sigs.k8s.io/cluster-api/api/core/v1beta2"
)

// RemediationFinalizer keeps an AnvilRemediation until its Node's out-of-service taint is
// removed.
const RemediationFinalizer = "anvilremediation.infrastructure.cluster.x-k8s.io"

// AnvilRemediationSpec says how hard to try a power cycle before giving a machine back to
// Cluster API for replacement.
type AnvilRemediationSpec struct {
	// retryLimit is the number of power cycles before the machine is handed back.
	// +optional
	// +kubebuilder:default=1
	// +kubebuilder:validation:Minimum=0
	// +kubebuilder:validation:Maximum=10
	RetryLimit int32 `json:"retryLimit,omitempty"`

	// timeout is how long to wait for the Node to become healthy after each power cycle.
	// +optional
	// +kubebuilder:default="10m"
	Timeout *metav1.Duration `json:"timeout,omitempty"`
}

// RemediationPhase is where a remediation stands.
// +kubebuilder:validation:Enum=Running;Waiting;Succeeded;Failed
type RemediationPhase string

const (
	RemediationRunning   RemediationPhase = "Running"
	RemediationWaiting   RemediationPhase = "Waiting"
	RemediationSucceeded RemediationPhase = "Succeeded"
	RemediationFailed    RemediationPhase = "Failed"
)

// AnvilRemediationStatus is what the remediation controller did.
type AnvilRemediationStatus struct {
	// +optional
	Phase RemediationPhase `json:"phase,omitempty"`
	// retryCount is the number of power cycles done.
	// +optional
	RetryCount int32 `json:"retryCount,omitempty"`
	// lastRemediated is when the last power cycle was issued.
	// +optional
	LastRemediated *metav1.Time `json:"lastRemediated,omitempty"`
	// +optional
	// +listType=map
	// +listMapKey=type
	// +kubebuilder:validation:MaxItems=32
	Conditions []metav1.Condition `json:"conditions,omitempty"`
}

// +kubebuilder:object:root=true
// +kubebuilder:resource:path=anvilremediations,scope=Namespaced,categories=cluster-api;anvil
// +kubebuilder:subresource:status
// +kubebuilder:metadata:labels="cluster.x-k8s.io/v1beta2=v1alpha1"
// +kubebuilder:printcolumn:name="Phase",type="string",JSONPath=".status.phase"
// +kubebuilder:printcolumn:name="Retries",type="integer",JSONPath=".status.retryCount"
// +kubebuilder:printcolumn:name="Age",type="date",JSONPath=".metadata.creationTimestamp"

// AnvilRemediation power-cycles an unhealthy machine's host (CAPI external remediation).
type AnvilRemediation struct {
	metav1.TypeMeta   `json:",inline"`
	metav1.ObjectMeta `json:"metadata,omitempty"`

	// +optional
	Spec AnvilRemediationSpec `json:"spec,omitempty"`
	// +optional
	Status AnvilRemediationStatus `json:"status,omitempty"`
}

// GetConditions returns the remediation's conditions.
func (r *AnvilRemediation) GetConditions() []metav1.Condition { return r.Status.Conditions }

// SetConditions sets the remediation's conditions.
func (r *AnvilRemediation) SetConditions(c []metav1.Condition) { r.Status.Conditions = c }

// +kubebuilder:object:root=true

// AnvilRemediationList is a list of AnvilRemediations.
type AnvilRemediationList struct {
	metav1.TypeMeta `json:",inline"`
	metav1.ListMeta `json:"metadata,omitempty"`
	Items           []AnvilRemediation `json:"items"`
}

// AnvilRemediationTemplateResource is the template's remediation.
type AnvilRemediationTemplateResource struct {
	// +optional
	ObjectMeta clusterv1.ObjectMeta `json:"metadata,omitempty,omitzero"`
	// +optional
	Spec AnvilRemediationSpec `json:"spec,omitempty"`
}

// AnvilRemediationTemplateSpec holds the template.
type AnvilRemediationTemplateSpec struct {
	// +required
	Template AnvilRemediationTemplateResource `json:"template"`
}

// +kubebuilder:object:root=true
// +kubebuilder:resource:path=anvilremediationtemplates,scope=Namespaced,categories=cluster-api;anvil
// +kubebuilder:metadata:labels="cluster.x-k8s.io/v1beta2=v1alpha1"
// +kubebuilder:printcolumn:name="Age",type="date",JSONPath=".metadata.creationTimestamp"

// AnvilRemediationTemplate is referenced by a MachineHealthCheck's remediationTemplate.
type AnvilRemediationTemplate struct {
	metav1.TypeMeta   `json:",inline"`
	metav1.ObjectMeta `json:"metadata,omitempty"`

	// +required
	Spec AnvilRemediationTemplateSpec `json:"spec"`
}

// +kubebuilder:object:root=true

// AnvilRemediationTemplateList is a list of AnvilRemediationTemplates.
type AnvilRemediationTemplateList struct {
	metav1.TypeMeta `json:",inline"`
	metav1.ListMeta `json:"metadata,omitempty"`
	Items           []AnvilRemediationTemplate `json:"items"`
}

func init() {
	objectTypes = append(objectTypes, &AnvilRemediation{}, &AnvilRemediationList{},
		&AnvilRemediationTemplate{}, &AnvilRemediationTemplateList{})
}
