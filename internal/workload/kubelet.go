package workload

import (
	"context"
	"crypto/rsa"
	"crypto/x509"
	"fmt"
	"math/rand/v2"
	"strconv"
	"sync"
	"time"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	kerrors "k8s.io/apimachinery/pkg/util/errors"
	clusterv1 "sigs.k8s.io/cluster-api/api/core/v1beta2"
	cloudv1 "sigs.k8s.io/cluster-api/test/infrastructure/inmemory/pkg/cloud/api/v1alpha1"
	inmemoryruntime "sigs.k8s.io/cluster-api/test/infrastructure/inmemory/pkg/runtime"
	"sigs.k8s.io/cluster-api/util"
	"sigs.k8s.io/cluster-api/util/certs"
	"sigs.k8s.io/cluster-api/util/secret"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/controller"

	infrav1 "github.com/anvil-metal/cluster-api-provider-anvil/api/v1alpha1"
)

const etcdMemberRemovedAnnotation = cloudv1.EtcdMemberRemoved

// OmitProviderIDAnnotation on an AnvilHost makes the Kubelet register its Node without a
// providerID, as a kubelet started without --provider-id would: tests use it to check that
// Anvil gives such a Node its providerID.
const OmitProviderIDAnnotation = "workload.anvil.cluster.x-k8s.io/kubelet-omits-provider-id"

// Kubelet plays "the OS boots and kubeadm runs" for hosts that Anvil has provisioned: when a
// host is Provisioned under a live claim it registers a Ready Node named after the host with
// the claim's providerID in the claim's workload cluster, and for control-plane machines the
// kubeadm static pods, an etcd member and an API server instance (plus, once per cluster,
// what kubeadm init leaves behind: the kubeadm-config ConfigMap, its RBAC, kube-proxy and
// CoreDNS). When the host leaves Provisioned or its claim changes, all of it goes away, as a
// wiped server's would.
//
// It keeps what it booted in memory only (like the in-memory clusters themselves): run one
// per Server for the life of the process.
type Kubelet struct {
	// Client reads the management cluster: hosts, machines and the clusters' CA Secrets.
	Client client.Client
	Server *Server

	mu     sync.Mutex
	booted map[types.NamespacedName]bootRecord
}

// bootRecord is what a host runs: the machine it was installed for and what it registered.
type bootRecord struct {
	cluster      client.ObjectKey
	node         string
	machine      string // the AnvilMachine's name: a move changes its UID, not what runs
	controlPlane bool
}

// SetupWithManager registers the controller; it watches AnvilHosts, status included.
func (k *Kubelet) SetupWithManager(mgr ctrl.Manager, options controller.Options) error {
	k.booted = map[types.NamespacedName]bootRecord{}
	return ctrl.NewControllerManagedBy(mgr).
		Named("workload-kubelet").
		For(&infrav1.AnvilHost{}).
		WithOptions(options).
		Complete(k)
}

// Booted returns how many hosts currently run a registered Node.
func (k *Kubelet) Booted() int {
	k.mu.Lock()
	defer k.mu.Unlock()
	return len(k.booted)
}

// Reconcile boots or wipes one host's workload-cluster presence.
func (k *Kubelet) Reconcile(ctx context.Context, req ctrl.Request) (ctrl.Result, error) {
	host := &infrav1.AnvilHost{}
	if err := k.Client.Get(ctx, req.NamespacedName, host); err != nil {
		// A host object that disappeared (e.g. moved to another management cluster) says
		// nothing about the server: whatever runs there keeps running.
		return ctrl.Result{}, client.IgnoreNotFound(err)
	}
	claim := host.Spec.Claim
	if claim != nil && claim.Released {
		claim = nil
	}

	k.mu.Lock()
	rec, wasBooted := k.booted[req.NamespacedName]
	k.mu.Unlock()
	if wasBooted && !stillRunning(host, claim, rec) {
		if err := k.wipe(ctx, rec); err != nil {
			return ctrl.Result{}, err
		}
		k.mu.Lock()
		delete(k.booted, req.NamespacedName)
		k.mu.Unlock()
		wasBooted = false
	}
	if claim == nil || host.Status.State != infrav1.HostStateProvisioned {
		return ctrl.Result{}, nil
	}

	// The machine the host was installed for; without it (e.g. its objects are being moved)
	// nothing joins, and a host that already joined keeps running.
	am := &infrav1.AnvilMachine{}
	if err := k.Client.Get(ctx, client.ObjectKey{Namespace: host.Namespace, Name: claim.MachineRef.Name}, am); err != nil || am.UID != claim.MachineRef.UID {
		return ctrl.Result{}, client.IgnoreNotFound(err)
	}
	machine, err := util.GetOwnerMachine(ctx, k.Client, am.ObjectMeta)
	if err != nil || machine == nil {
		return ctrl.Result{RequeueAfter: pollInterval}, client.IgnoreNotFound(err)
	}
	rec = bootRecord{cluster: client.ObjectKey{Namespace: host.Namespace, Name: claim.ClusterName}, node: host.Name,
		machine: claim.MachineRef.Name, controlPlane: util.IsControlPlaneMachine(machine)}
	providerID := claim.ProviderID
	if _, omit := host.Annotations[OmitProviderIDAnnotation]; omit {
		providerID = ""
	}
	if err := k.boot(ctx, rec, providerID, machine); err != nil {
		return ctrl.Result{}, fmt.Errorf("booting host %s for machine %s: %w", host.Name, machine.Name, err)
	}
	if !wasBooted {
		k.mu.Lock()
		k.booted[req.NamespacedName] = rec
		k.mu.Unlock()
		ctrl.LoggerFrom(ctx).V(2).Info("host joined its workload cluster", "node", rec.node, "cluster", rec.cluster, "controlPlane", rec.controlPlane)
	}
	return ctrl.Result{}, nil
}

// stillRunning reports whether the OS installed for rec still runs on the host: it does
// until the host is handed to another machine, released, or goes through a state that wipes
// or reinstalls it. Reading the BMC (Registering, Inspecting) or maintenance leaves it running.
func stillRunning(host *infrav1.AnvilHost, claim *infrav1.HostClaim, rec bootRecord) bool {
	if claim == nil || claim.MachineRef.Name != rec.machine || claim.ClusterName != rec.cluster.Name {
		return false
	}
	switch host.Status.State {
	case infrav1.HostStateProvisioned, infrav1.HostStateUpgrading, infrav1.HostStateRegistering, infrav1.HostStateInspecting, infrav1.HostStateMaintenance, "":
		return true
	}
	return false
}

// boot registers everything a booted machine shows in its workload cluster. Every step is
// idempotent.
func (k *Kubelet) boot(ctx context.Context, rec bootRecord, providerID string, machine *clusterv1.Machine) error {
	c, err := k.Server.client(rec.cluster)
	if err != nil {
		return err
	}
	if err := createNode(ctx, c, rec, providerID, machine.Spec.Version); err != nil {
		return err
	}
	if !rec.controlPlane {
		return nil
	}
	if err := k.bootEtcd(ctx, c, rec); err != nil {
		return err
	}
	if err := k.bootAPIServer(ctx, c, rec); err != nil {
		return err
	}
	for _, component := range []string{"kube-scheduler", "kube-controller-manager"} {
		if err := createIfMissing(ctx, c, staticPod(component, rec.node)); err != nil {
			return err
		}
	}
	return kubeadmInitObjects(ctx, c, machine.Spec.Version)
}

func createNode(ctx context.Context, c inmemoryruntime.Client, rec bootRecord, providerID, version string) error {
	now := metav1.Now()
	node := &corev1.Node{
		ObjectMeta: metav1.ObjectMeta{Name: rec.node, Labels: map[string]string{corev1.LabelHostname: rec.node}},
		Spec:       corev1.NodeSpec{ProviderID: providerID},
		Status: corev1.NodeStatus{
			NodeInfo: corev1.NodeSystemInfo{KubeletVersion: version},
			Conditions: []corev1.NodeCondition{
				{Type: corev1.NodeReady, Status: corev1.ConditionTrue, Reason: "KubeletReady", LastTransitionTime: now},
				{Type: corev1.NodeMemoryPressure, Status: corev1.ConditionFalse, Reason: "KubeletHasSufficientMemory", LastTransitionTime: now},
				{Type: corev1.NodeDiskPressure, Status: corev1.ConditionFalse, Reason: "KubeletHasNoDiskPressure", LastTransitionTime: now},
				{Type: corev1.NodePIDPressure, Status: corev1.ConditionFalse, Reason: "KubeletHasSufficientPID", LastTransitionTime: now},
			},
		},
	}
	if rec.controlPlane {
		node.Labels["node-role.kubernetes.io/control-plane"] = ""
		node.Spec.Taints = []corev1.Taint{{Key: "node-role.kubernetes.io/control-plane", Effect: corev1.TaintEffectNoSchedule}}
	}
	return createIfMissing(ctx, c, node)
}

// staticPod is a running, ready kubeadm static pod of component on node.
func staticPod(component, node string) *corev1.Pod {
	return &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Namespace: metav1.NamespaceSystem, Name: component + "-" + node,
			Labels: map[string]string{"component": component, "tier": "control-plane"}},
		Spec: corev1.PodSpec{NodeName: node},
		Status: corev1.PodStatus{Phase: corev1.PodRunning,
			Conditions: []corev1.PodCondition{{Type: corev1.PodReady, Status: corev1.ConditionTrue}}},
	}
}

// bootEtcd adds the node's etcd member: a pod carrying the fake etcd's cluster and member ids
// (the first member also leads), and a serving certificate from the cluster's etcd CA.
func (k *Kubelet) bootEtcd(ctx context.Context, c inmemoryruntime.Client, rec bootRecord) error {
	pod := staticPod("etcd", rec.node)
	if err := c.Get(ctx, client.ObjectKeyFromObject(pod), pod); err != nil {
		if !apierrors.IsNotFound(err) {
			return err
		}
		clusterID, leader, members, err := etcdInfo(ctx, c)
		if err != nil {
			return err
		}
		if clusterID == "" {
			clusterID = strconv.FormatUint(uint64(rand.Uint32N(1<<31)+1), 10) //nolint:gosec // an id, not a secret
		}
		memberID := ""
		for memberID == "" || members[memberID] {
			memberID = strconv.FormatUint(uint64(rand.Uint32N(1<<31)+1), 10) //nolint:gosec // an id, not a secret
		}
		pod.Annotations = map[string]string{cloudv1.EtcdClusterIDAnnotationName: clusterID, cloudv1.EtcdMemberIDAnnotationName: memberID}
		if leader == "" {
			pod.Annotations[cloudv1.EtcdLeaderFromAnnotationName] = time.Now().Format(time.RFC3339)
		}
		if err := createIfMissing(ctx, c, pod); err != nil {
			return err
		}
	}
	name := groupName(rec.cluster)
	if k.Server.mux.HasEtcdMember(name, pod.Name) {
		return nil
	}
	cert, key, err := k.clusterCA(ctx, rec.cluster, secret.EtcdCA)
	if err != nil {
		return err
	}
	return k.Server.mux.AddEtcdMember(name, pod.Name, cert, key)
}

// etcdInfo reads the fake etcd cluster's id, leader and members from the etcd pods.
func etcdInfo(ctx context.Context, c inmemoryruntime.Client) (clusterID, leader string, members map[string]bool, err error) {
	pods, err := listPods(ctx, c, client.InNamespace(metav1.NamespaceSystem), client.MatchingLabels{"component": "etcd", "tier": "control-plane"})
	if err != nil {
		return "", "", nil, err
	}
	members = map[string]bool{}
	var leaderFrom time.Time
	for _, p := range pods {
		if _, removed := p.Annotations[etcdMemberRemovedAnnotation]; removed {
			continue
		}
		id := p.Annotations[cloudv1.EtcdMemberIDAnnotationName]
		members[id] = true
		if cid := p.Annotations[cloudv1.EtcdClusterIDAnnotationName]; clusterID == "" {
			clusterID = cid
		} else if cid != clusterID {
			return "", "", nil, fmt.Errorf("invalid etcd cluster: members have cluster ids %s and %s", clusterID, cid)
		}
		if t, err := time.Parse(time.RFC3339, p.Annotations[cloudv1.EtcdLeaderFromAnnotationName]); err == nil && t.After(leaderFrom) {
			leader, leaderFrom = id, t
		}
	}
	if len(members) > 0 && leader == "" {
		return "", "", nil, errNoLeader
	}
	return clusterID, leader, members, nil
}

// bootAPIServer adds the node's API server pod and instance; the first one makes the
// cluster's endpoint answer TLS with a certificate from the cluster CA.
func (k *Kubelet) bootAPIServer(ctx context.Context, c inmemoryruntime.Client, rec bootRecord) error {
	pod := staticPod("kube-apiserver", rec.node)
	if err := createIfMissing(ctx, c, pod); err != nil {
		return err
	}
	name := groupName(rec.cluster)
	if k.Server.mux.HasAPIServer(name, pod.Name) {
		return nil
	}
	cert, key, err := k.clusterCA(ctx, rec.cluster, secret.ClusterCA)
	if err != nil {
		return err
	}
	return k.Server.mux.AddAPIServer(name, pod.Name, cert, key)
}

// clusterCA reads a CA that Cluster API generated for the cluster (the in-memory server needs
// RSA keys, which is what CAPI generates).
func (k *Kubelet) clusterCA(ctx context.Context, cluster client.ObjectKey, purpose secret.Purpose) (*x509.Certificate, *rsa.PrivateKey, error) {
	s, err := secret.Get(ctx, k.Client, cluster, purpose)
	if err != nil {
		return nil, nil, fmt.Errorf("reading the %s CA of cluster %s: %w", purpose, cluster, err)
	}
	cert, err := certs.DecodeCertPEM(s.Data[secret.TLSCrtDataName])
	if err != nil {
		return nil, nil, fmt.Errorf("the %s CA of cluster %s has no valid %s: %w", purpose, cluster, secret.TLSCrtDataName, err)
	}
	if cert == nil {
		return nil, nil, fmt.Errorf("the %s CA of cluster %s has no %s", purpose, cluster, secret.TLSCrtDataName)
	}
	key, err := certs.DecodePrivateKeyPEM(s.Data[secret.TLSKeyDataName])
	if err != nil {
		return nil, nil, fmt.Errorf("the %s CA of cluster %s has no valid %s: %w", purpose, cluster, secret.TLSKeyDataName, err)
	}
	rsaKey, ok := key.(*rsa.PrivateKey)
	if !ok {
		return nil, nil, fmt.Errorf("the %s CA key of cluster %s is a %T; the in-memory server needs RSA", purpose, cluster, key)
	}
	return cert, rsaKey, nil
}

// kubeadmInitObjects creates what kubeadm init leaves in a new cluster; the kubeadm-config
// ConfigMap is what makes KubeadmControlPlane consider the control plane initialized.
func kubeadmInitObjects(ctx context.Context, c inmemoryruntime.Client, version string) error {
	objs := []client.Object{
		&rbacv1.ClusterRole{ObjectMeta: metav1.ObjectMeta{Name: "kubeadm:get-nodes"},
			Rules: []rbacv1.PolicyRule{{Verbs: []string{"get"}, APIGroups: []string{""}, Resources: []string{"nodes"}}}},
		&rbacv1.ClusterRoleBinding{ObjectMeta: metav1.ObjectMeta{Name: "kubeadm:get-nodes"},
			RoleRef:  rbacv1.RoleRef{APIGroup: rbacv1.GroupName, Kind: "ClusterRole", Name: "kubeadm:get-nodes"},
			Subjects: []rbacv1.Subject{{Kind: rbacv1.GroupKind, Name: "system:bootstrappers:kubeadm:default-node-token"}}},
		&corev1.ConfigMap{ObjectMeta: metav1.ObjectMeta{Namespace: metav1.NamespaceSystem, Name: "kubeadm-config"},
			Data: map[string]string{"ClusterConfiguration": ""}},
		&appsv1.DaemonSet{ObjectMeta: metav1.ObjectMeta{Namespace: metav1.NamespaceSystem, Name: "kube-proxy", Labels: map[string]string{"component": "kube-proxy"}},
			Spec: appsv1.DaemonSetSpec{Template: corev1.PodTemplateSpec{Spec: corev1.PodSpec{Containers: []corev1.Container{
				{Name: "kube-proxy", Image: "registry.k8s.io/kube-proxy:" + semverTag(version)}}}}}},
		&corev1.ConfigMap{ObjectMeta: metav1.ObjectMeta{Namespace: metav1.NamespaceSystem, Name: "coredns"}, Data: map[string]string{"Corefile": "ANG"}},
		&appsv1.Deployment{ObjectMeta: metav1.ObjectMeta{Namespace: metav1.NamespaceSystem, Name: "coredns"},
			Spec: appsv1.DeploymentSpec{Template: corev1.PodTemplateSpec{Spec: corev1.PodSpec{Containers: []corev1.Container{
				{Name: "coredns", Image: "registry.k8s.io/coredns/coredns:v1.12.1"}}}}}},
	}
	for _, o := range objs {
		if err := createIfMissing(ctx, c, o); err != nil {
			return err
		}
	}
	return nil
}

// semverTag turns a Kubernetes version into an image tag (a "+" is not allowed in tags).
func semverTag(version string) string {
	out := []rune(version)
	for i, r := range out {
		if r == '+' {
			out[i] = '_'
		}
	}
	return string(out)
}

// wipe removes what a host registered, as a wiped server would leave it.
func (k *Kubelet) wipe(ctx context.Context, rec bootRecord) error {
	if !k.Server.hasCluster(rec.cluster) {
		return nil // the cluster is gone, and everything in it
	}
	c, err := k.Server.client(rec.cluster)
	if err != nil {
		return err
	}
	var errs []error
	del := func(o client.Object) {
		if err := c.Delete(ctx, o); err != nil && !apierrors.IsNotFound(err) {
			errs = append(errs, err)
		}
	}
	del(&corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: rec.node}})
	if rec.controlPlane {
		name := groupName(rec.cluster)
		for _, component := range []string{"etcd", "kube-apiserver", "kube-scheduler", "kube-controller-manager"} {
			del(staticPod(component, rec.node))
		}
		if err := k.Server.mux.DeleteEtcdMember(name, "etcd-"+rec.node); err != nil {
			errs = append(errs, err)
		}
		if err := k.Server.mux.DeleteAPIServer(name, "kube-apiserver-"+rec.node); err != nil {
			errs = append(errs, err)
		}
	}
	return kerrors.NewAggregate(errs)
}

func createIfMissing(ctx context.Context, c inmemoryruntime.Client, o client.Object) error {
	if err := c.Create(ctx, o); err != nil && !apierrors.IsAlreadyExists(err) {
		return fmt.Errorf("creating %T %s in the workload cluster: %w", o, o.GetName(), err)
	}
	return nil
}
