package v1alpha1

import "strings"

// ClaimedByLabel marks a claimed host with its machine's UID: Anvil's bookkeeping, never
// copied to a Node.
const ClaimedByLabel = LabelDomain + "/claimed-by"

// copyableKubernetesLabels are the only labels in the kubernetes.io and k8s.io namespaces
// that hostLabelsToNode may copy: topology the scheduler and storage read, which the kubelet
// does not set on bare metal. The others (kubernetes.io/hostname, kubernetes.io/arch,
// node-role.kubernetes.io/...) belong to the kubelet and to Kubernetes.
var copyableKubernetesLabels = []string{"topology.kubernetes.io/zone", "topology.kubernetes.io/region"}

// NodeLabelRestriction says why a hostLabelsToNode entry (a label key, or a prefix ending in
// "/") may not be copied to a Node, or returns "" if it may. The webhook rejects such entries;
// the machine controller also skips the labels they would select.
func NodeLabelRestriction(keyOrPrefix string) string {
	domain, _, hasDomain := strings.Cut(keyOrPrefix, "/")
	if !hasDomain {
		return ""
	}
	inDomain := func(d string) bool { return domain == d || strings.HasSuffix(domain, "."+d) }
	switch {
	case inDomain("kubernetes.io") || inDomain("k8s.io"):
		for _, k := range copyableKubernetesLabels {
			if keyOrPrefix == k {
				return ""
			}
		}
		return "labels under kubernetes.io and k8s.io belong to the kubelet and Kubernetes; of those only " +
			strings.Join(copyableKubernetesLabels, " and ") + " may be copied, by their exact key"
	case inDomain("cluster.x-k8s.io") && domain != LabelDomain:
		return "labels under cluster.x-k8s.io belong to Cluster API (it syncs node.cluster.x-k8s.io/ labels " +
			"from the Machine to the Node: set them on the Machine template instead)"
	case keyOrPrefix == ClaimedByLabel:
		return ClaimedByLabel + " is Anvil's bookkeeping of the claim, not a property of the host"
	}
	return ""
}
