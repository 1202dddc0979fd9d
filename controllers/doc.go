// Package controllers holds Anvil's reconcilers. Each is thin: it loads objects, holds the
// patch helper and hands the work to a package by responsibility under internal/.
//
// The RBAC the manager needs is declared here, in one place, so `make manifests` renders the
// ClusterRole from it. Secrets are patched only to add clusterctl's move label to the BMC
// Secrets that hosts use (see movableSecrets); their data is never written.
//
// +kubebuilder:rbac:groups=infrastructure.cluster.x-k8s.io,resources=anvilhosts;anvilmachines;anvilclusters;anvilremediations,verbs=get;list;watch;create;update;patch;delete
// +kubebuilder:rbac:groups=infrastructure.cluster.x-k8s.io,resources=anvilhosts/status;anvilmachines/status;anvilclusters/status;anvilremediations/status,verbs=get;update;patch
// +kubebuilder:rbac:groups=infrastructure.cluster.x-k8s.io,resources=anvilmachinetemplates;anvilclustertemplates;anvilremediationtemplates,verbs=get;list;watch
// +kubebuilder:rbac:groups=cluster.x-k8s.io,resources=clusters;clusters/status;machines;machines/status,verbs=get;list;watch;patch;update
// +kubebuilder:rbac:groups="",resources=secrets,verbs=get;list;watch;patch
// +kubebuilder:rbac:groups="",resources=events,verbs=create;patch
package controllers
