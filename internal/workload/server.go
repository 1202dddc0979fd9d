// Package workload stands in for what runs on a server after Anvil has installed it: the OS
// boots, kubeadm runs and the kubelet registers a Node. It serves fake workload clusters (an
// API server and etcd per cluster, all from this process) with Cluster API's in-memory
// server, and its Kubelet controller registers a Node, and for control-plane machines the
// kubeadm static pods and an etcd member, whenever a host reaches Provisioned. Tests use it
// to run Cluster API's own controllers (core, kubeadm bootstrap, kubeadm control plane)
// against Anvil end to end without real servers.
package workload

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"strconv"
	"sync"
	"time"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	policyv1 "k8s.io/api/policy/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	storagev1 "k8s.io/api/storage/v1"
	apiextensionsv1 "k8s.io/apiextensions-apiserver/pkg/apis/apiextensions/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime"
	clusterv1 "sigs.k8s.io/cluster-api/api/core/v1beta2"
	inmemoryruntime "sigs.k8s.io/cluster-api/test/infrastructure/inmemory/pkg/runtime"
	inmemoryserver "sigs.k8s.io/cluster-api/test/infrastructure/inmemory/pkg/server"
	"sigs.k8s.io/controller-runtime/pkg/client"
)

// DefaultHost is the address workload API servers are reached at. The serving certificates
// of the in-memory server name localhost, 127.0.0.1, ::1 and this host.
const DefaultHost = "127.0.0.1"

// Options configure a Server.
type Options struct {
	// Host is the address clients use for every workload cluster; default DefaultHost.
	Host string
	// MinPort and MaxPort bound the ports given to workload clusters (one each). The default,
	// 31000–32700, sits below Linux's ephemeral range so outgoing connections never take one.
	// Ports are checked before use, so parallel runs only need to avoid exhausting the range.
	MinPort, MaxPort int
}

// Server serves fake workload clusters. Create one per process with Start, add a cluster
// before its first control-plane machine boots, and Stop it after every controller that
// talks to it has stopped.
type Server struct {
	host             string
	minPort, maxPort int
	runtime          inmemoryruntime.Manager
	mux              *inmemoryserver.WorkloadClustersMux
	cancel           context.CancelFunc

	mu       sync.Mutex
	clusters map[client.ObjectKey]clusterv1.APIEndpoint
}

// Start runs the in-memory object store and the workload clusters' multiplexer. The
// multiplexer's debug server listens on a free port.
func Start(opts Options) (*Server, error) {
	if opts.Host == "" {
		opts.Host = DefaultHost
	}
	if opts.MinPort == 0 || opts.MaxPort == 0 {
		opts.MinPort, opts.MaxPort = 31000, 32700
	}
	if opts.MinPort > opts.MaxPort {
		return nil, fmt.Errorf("port range %d-%d is empty", opts.MinPort, opts.MaxPort)
	}
	scheme := runtime.NewScheme()
	for _, add := range []func(*runtime.Scheme) error{corev1.AddToScheme, appsv1.AddToScheme, rbacv1.AddToScheme,
		storagev1.AddToScheme, apiextensionsv1.AddToScheme, policyv1.AddToScheme} {
		if err := add(scheme); err != nil {
			return nil, err
		}
	}
	ctx, cancel := context.WithCancel(context.Background())
	rt := inmemoryruntime.NewManager(scheme)
	if err := rt.Start(ctx); err != nil {
		cancel()
		return nil, fmt.Errorf("starting the in-memory object store: %w", err)
	}
	// DebugPort 0 makes the debug server listen on a free port instead of the fixed :19000.
	mux, err := inmemoryserver.NewWorkloadClustersMux(rt, opts.Host,
		inmemoryserver.CustomPorts{MinPort: int32(opts.MinPort), MaxPort: int32(opts.MaxPort), DebugPort: 0}) //nolint:gosec // ports fit
	if err != nil {
		cancel()
		return nil, fmt.Errorf("starting the workload clusters' server: %w", err)
	}
	return &Server{host: opts.Host, minPort: opts.MinPort, maxPort: opts.MaxPort, runtime: rt, mux: mux, cancel: cancel,
		clusters: map[client.ObjectKey]clusterv1.APIEndpoint{}}, nil
}

// Stop closes every listener. Stop the controllers that talk to workload clusters first:
// the multiplexer waits for open connections to finish (up to ctx's deadline).
func (s *Server) Stop(ctx context.Context) error {
	defer s.cancel()
	return s.mux.Shutdown(ctx)
}

// groupName names the resource group and listener of a cluster.
func groupName(cluster client.ObjectKey) string { return cluster.Namespace + "/" + cluster.Name }

// AddCluster prepares a workload cluster (its objects' store, default namespaces and a
// listening port) and returns the endpoint to put in the infrastructure cluster's
// spec.controlPlaneEndpoint. The port accepts connections at once; TLS handshakes succeed
// once the first control-plane machine has booted (as with a real cluster's API server).
func (s *Server) AddCluster(ctx context.Context, cluster client.ObjectKey) (clusterv1.APIEndpoint, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if ep, ok := s.clusters[cluster]; ok {
		return ep, nil
	}
	name := groupName(cluster)
	s.runtime.AddResourceGroup(name)
	c := s.runtime.GetResourceGroup(name).GetClient()
	for _, ns := range []string{metav1.NamespaceDefault, metav1.NamespacePublic, metav1.NamespaceSystem} {
		obj := &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: ns, Labels: map[string]string{"kubernetes.io/metadata.name": ns}}}
		if err := c.Create(ctx, obj); err != nil && !apierrors.IsAlreadyExists(err) {
			return clusterv1.APIEndpoint{}, fmt.Errorf("creating namespace %s in workload cluster %s: %w", ns, name, err)
		}
	}
	var lastErr error
	for range 20 {
		port, err := s.freePort()
		if err != nil {
			lastErr = err
			continue
		}
		if _, err := s.mux.InitWorkloadClusterListener(name, int32(port)); err != nil { //nolint:gosec // port fits
			return clusterv1.APIEndpoint{}, err
		}
		if err := s.mux.RegisterResourceGroup(name, name); err != nil {
			return clusterv1.APIEndpoint{}, err
		}
		// Listen now, so nobody takes the port before the API server "boots".
		if err := s.mux.StartListener(name); err != nil {
			lastErr = err
			_ = s.mux.DeleteWorkloadClusterListener(name)
			continue
		}
		ep := clusterv1.APIEndpoint{Host: s.host, Port: int32(port)} //nolint:gosec // port fits
		s.clusters[cluster] = ep
		return ep, nil
	}
	s.runtime.DeleteResourceGroup(name)
	return clusterv1.APIEndpoint{}, fmt.Errorf("no free port for workload cluster %s in %d-%d: %w", name, s.minPort, s.maxPort, lastErr)
}

// freePort picks a random port of the range that nothing listens on right now.
func (s *Server) freePort() (int, error) {
	port := s.minPort + rand.IntN(s.maxPort-s.minPort+1) //nolint:gosec // not security relevant
	l, err := net.Listen("tcp", ":"+strconv.Itoa(port))  //nolint:noctx // a probe, closed at once
	if err != nil {
		return 0, err
	}
	return port, l.Close()
}

// RemoveCluster stops a workload cluster's listener and forgets its objects.
func (s *Server) RemoveCluster(cluster client.ObjectKey) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if _, ok := s.clusters[cluster]; !ok {
		return nil
	}
	delete(s.clusters, cluster)
	name := groupName(cluster)
	err := s.mux.DeleteWorkloadClusterListener(name)
	s.runtime.DeleteResourceGroup(name)
	return err
}

func (s *Server) hasCluster(cluster client.ObjectKey) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	_, ok := s.clusters[cluster]
	return ok
}

// client returns the object store of a cluster added with AddCluster.
func (s *Server) client(cluster client.ObjectKey) (inmemoryruntime.Client, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if _, ok := s.clusters[cluster]; !ok {
		return nil, fmt.Errorf("workload cluster %s was not added to the server (call AddCluster first)", groupName(cluster))
	}
	return s.runtime.GetResourceGroup(groupName(cluster)).GetClient(), nil
}

// Nodes lists the Nodes registered in a workload cluster.
func (s *Server) Nodes(ctx context.Context, cluster client.ObjectKey) ([]corev1.Node, error) {
	c, err := s.client(cluster)
	if err != nil {
		return nil, err
	}
	return listNodes(ctx, c)
}

// EtcdMembers lists the etcd members of a workload cluster (the names of their pods),
// leaving out members that etcd has already removed.
func (s *Server) EtcdMembers(ctx context.Context, cluster client.ObjectKey) ([]string, error) {
	c, err := s.client(cluster)
	if err != nil {
		return nil, err
	}
	pods, err := listPods(ctx, c, client.InNamespace(metav1.NamespaceSystem), client.MatchingLabels{"component": "etcd"})
	if err != nil {
		return nil, err
	}
	var names []string
	for _, p := range pods {
		if _, removed := p.Annotations[etcdMemberRemovedAnnotation]; !removed {
			names = append(names, p.Name)
		}
	}
	return names, nil
}

// The in-memory store keeps objects written through its API server (e.g. a Node that Cluster
// API labelled) as unstructured, and cannot list those into typed lists: list unstructured
// and convert.
func listNodes(ctx context.Context, c inmemoryruntime.Client, opts ...client.ListOption) ([]corev1.Node, error) {
	items, err := listUnstructured(ctx, c, "NodeList", opts...)
	out := make([]corev1.Node, len(items))
	for i := range items {
		if err := runtime.DefaultUnstructuredConverter.FromUnstructured(items[i].Object, &out[i]); err != nil {
			return nil, err
		}
	}
	return out, err
}

func listPods(ctx context.Context, c inmemoryruntime.Client, opts ...client.ListOption) ([]corev1.Pod, error) {
	items, err := listUnstructured(ctx, c, "PodList", opts...)
	out := make([]corev1.Pod, len(items))
	for i := range items {
		if err := runtime.DefaultUnstructuredConverter.FromUnstructured(items[i].Object, &out[i]); err != nil {
			return nil, err
		}
	}
	return out, err
}

func listUnstructured(ctx context.Context, c inmemoryruntime.Client, kind string, opts ...client.ListOption) ([]unstructured.Unstructured, error) {
	list := &unstructured.UnstructuredList{}
	list.SetGroupVersionKind(corev1.SchemeGroupVersion.WithKind(kind))
	if err := c.List(ctx, list, opts...); err != nil {
		return nil, err
	}
	return list.Items, nil
}

var errNoLeader = errors.New("invalid etcd cluster: no leader found")

// pollInterval paces retries of the Kubelet controller.
const pollInterval = 500 * time.Millisecond

// SetNodeReady sets a workload Node's Ready condition, as its kubelet does when it stops or
// resumes posting status: what a MachineHealthCheck watches.
func (s *Server) SetNodeReady(ctx context.Context, cluster client.ObjectKey, node string, ready bool, reason string) error {
	c, err := s.client(cluster)
	if err != nil {
		return err
	}
	// Read and write unstructured: the store may hold the Node in either form (see listNodes).
	u := &unstructured.Unstructured{}
	u.SetGroupVersionKind(corev1.SchemeGroupVersion.WithKind("Node"))
	if err := c.Get(ctx, client.ObjectKey{Name: node}, u); err != nil {
		return err
	}
	n := &corev1.Node{}
	if err := runtime.DefaultUnstructuredConverter.FromUnstructured(u.Object, n); err != nil {
		return err
	}
	status := corev1.ConditionFalse
	if ready {
		status = corev1.ConditionTrue
	}
	found := false
	for i := range n.Status.Conditions {
		if cond := &n.Status.Conditions[i]; cond.Type == corev1.NodeReady {
			found = true
			if cond.Status != status {
				cond.Status, cond.Reason, cond.LastTransitionTime = status, reason, metav1.Now()
			}
		}
	}
	if !found {
		n.Status.Conditions = append(n.Status.Conditions, corev1.NodeCondition{Type: corev1.NodeReady, Status: status, Reason: reason, LastTransitionTime: metav1.Now()})
	}
	obj, err := runtime.DefaultUnstructuredConverter.ToUnstructured(n)
	if err != nil {
		return err
	}
	u.Object = obj
	u.SetGroupVersionKind(corev1.SchemeGroupVersion.WithKind("Node"))
	return c.Update(ctx, u)
}
