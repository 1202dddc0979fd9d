// Package v1alpha1 contains the Anvil infrastructure API: AnvilHost (one physical server),
// AnvilMachine and AnvilCluster (the Cluster API infrastructure contract, v1beta2) and
// AnvilRemediation (CAPI's external remediation contract).
//
// +kubebuilder:object:generate=true
// +groupName=infrastructure.cluster.x-k8s.io
package v1alpha1

import (
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
)

var (
	// GroupVersion is the group and version of every Anvil kind.
	GroupVersion = schema.GroupVersion{Group: "infrastructure.cluster.x-k8s.io", Version: "v1alpha1"}

	schemeBuilder = runtime.NewSchemeBuilder(addKnownTypes)

	// AddToScheme adds the Anvil kinds to a runtime.Scheme.
	AddToScheme = schemeBuilder.AddToScheme

	// objectTypes is filled by each kind's file at init, so the API package depends only on
	// apimachinery (as Cluster API's own API packages do).
	objectTypes = []runtime.Object{}
)

func addKnownTypes(scheme *runtime.Scheme) error {
	scheme.AddKnownTypes(GroupVersion, objectTypes...)
	metav1.AddToGroupVersion(scheme, GroupVersion)
	return nil
}
