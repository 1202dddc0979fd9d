// Package v1alpha1 contains the Anvil infrastructure API: AnvilHost (one physical server),
// AnvilMachine and AnvilCluster (the Cluster API infrastructure contract, v1beta2) and
// AnvilRemediation (CAPI's external remediation contract).
//
// +kubebuilder:object:generate=true
// +groupName=infrastructure.cluster.x-k8s.io
package v1alpha1

import (
	"k8s.io/apimachinery/pkg/runtime/schema"
	"sigs.k8s.io/controller-runtime/pkg/scheme"
)

var (
	// GroupVersion is the group and version of every Anvil kind.
	GroupVersion = schema.GroupVersion{Group: "infrastructure.cluster.x-k8s.io", Version: "v1alpha1"}

	// SchemeBuilder registers the Anvil kinds with a runtime.Scheme.
	SchemeBuilder = &scheme.Builder{GroupVersion: GroupVersion}

	// AddToScheme adds the Anvil kinds to a runtime.Scheme.
	AddToScheme = SchemeBuilder.AddToScheme
)
