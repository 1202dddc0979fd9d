package main

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"net"
	"net/http"
	"sort"
	"strconv"
	"strings"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/utils/ptr"
	controlplanev1 "sigs.k8s.io/cluster-api/api/controlplane/kubeadm/v1beta2"
	clusterv1 "sigs.k8s.io/cluster-api/api/core/v1beta2"
	"sigs.k8s.io/cluster-api/util/conditions"
	"sigs.k8s.io/controller-runtime/pkg/client"

	infrav1 "github.com/anvil-metal/cluster-api-provider-anvil/api/v1alpha1"
	"github.com/anvil-metal/cluster-api-provider-anvil/internal/lab"
)

// remediationTemplate is the AnvilRemediationTemplate the lab's MachineHealthCheck uses:
// one power cycle, then 20 s for the node to come back.
const remediationTemplate = "demo-power-cycle"

func (r *labRun) clusterKey() client.ObjectKey {
	return client.ObjectKey{Namespace: labNamespace, Name: labClusterName}
}

// createCluster serves the OS image, generates the cluster from the template with its
// variables filled in, applies it, and adds a MachineHealthCheck on the workers.
func (r *labRun) createCluster(ctx context.Context) error {
	images, err := serveImages("v1", "v2", "v3-BROKEN")
	if err != nil {
		return err
	}
	if r.vm != nil {
		// The VMs boot what they install: v1 is a real bootable image (the emulated servers
		// install it as well; their emulated OS only reads its first bytes).
		images.images["v1"] = r.vm.image
	}
	r.images = images
	r.stops = append(r.stops, images.stop)
	image := images.image("v1")
	endpoint, err := r.workloads.AddCluster(ctx, r.clusterKey())
	if err != nil {
		return err
	}
	// The template's variables (templates/README.md); the rest keep their defaults.
	vars := map[string]string{
		"CLUSTER_NAME":                labClusterName,
		"NAMESPACE":                   labNamespace,
		"KUBERNETES_VERSION":          r.opts.KubernetesVersion,
		"CONTROL_PLANE_MACHINE_COUNT": strconv.Itoa(r.opts.ControlPlanes),
		"WORKER_MACHINE_COUNT":        strconv.Itoa(r.opts.Workers),
		"CONTROL_PLANE_ENDPOINT_IP":   endpoint.Host,
		"CONTROL_PLANE_ENDPOINT_PORT": strconv.Itoa(int(endpoint.Port)),
		"ANVIL_IMAGE_URL":             image.URL,
		"ANVIL_IMAGE_CHECKSUM":        image.Checksum,
		"ANVIL_IMAGE_FORMAT":          string(image.Format),
		"ANVIL_IMAGE_LAYOUT":          string(image.Layout),
	}
	if r.vm != nil {
		// The VMs have 1 GiB: let control-plane machines (the first servers, zone by zone,
		// where the VMs are) claim them; workers keep their 16 GiB minimum.
		vars["ANVIL_CONTROL_PLANE_MIN_MEMORY_GIB"] = strconv.Itoa(vmMemoryMiB >> 10)
	}
	g, err := generateCluster(r.opts.Template, vars, r.env.Scheme)
	if err != nil {
		return err
	}
	r.cluster = g
	created, err := g.apply(ctx, r.env.Client)
	if err != nil {
		return err
	}
	fmt.Fprintf(r.out, "    created %s\n", strings.Join(created, ", "))
	return r.createHealthCheck(ctx)
}

// createHealthCheck watches the workers' nodes: NotReady or Unknown for 5 s is unhealthy, and
// remediation goes to Anvil (power cycle first).
func (r *labRun) createHealthCheck(ctx context.Context) error {
	c := r.env.Client
	if err := c.Create(ctx, &infrav1.AnvilRemediationTemplate{ObjectMeta: metav1.ObjectMeta{Name: remediationTemplate, Namespace: labNamespace},
		Spec: infrav1.AnvilRemediationTemplateSpec{Template: infrav1.AnvilRemediationTemplateResource{
			Spec: infrav1.AnvilRemediationSpec{RetryLimit: 1, Timeout: &metav1.Duration{Duration: 20 * time.Second}}}}}); err != nil {
		return err
	}
	mhc := &clusterv1.MachineHealthCheck{
		ObjectMeta: metav1.ObjectMeta{Name: labClusterName + "-workers", Namespace: labNamespace,
			Labels: map[string]string{clusterv1.ClusterNameLabel: labClusterName}},
		Spec: clusterv1.MachineHealthCheckSpec{
			ClusterName: labClusterName,
			Selector:    metav1.LabelSelector{MatchLabels: map[string]string{clusterv1.MachineDeploymentNameLabel: r.cluster.md}},
			Checks: clusterv1.MachineHealthCheckChecks{UnhealthyNodeConditions: []clusterv1.UnhealthyNodeCondition{
				{Type: corev1.NodeReady, Status: corev1.ConditionFalse, TimeoutSeconds: ptr.To[int32](5)},
				{Type: corev1.NodeReady, Status: corev1.ConditionUnknown, TimeoutSeconds: ptr.To[int32](5)},
			}},
			Remediation: clusterv1.MachineHealthCheckRemediation{TemplateRef: clusterv1.MachineHealthCheckRemediationTemplateReference{
				APIVersion: infrav1.GroupVersion.String(), Kind: "AnvilRemediationTemplate", Name: remediationTemplate}},
		}}
	if err := c.Create(ctx, mhc); err != nil {
		return err
	}
	fmt.Fprintf(r.out, "    created machinehealthcheck/%s (workers' Ready condition, remediated by anvilremediationtemplate/%s)\n", mhc.Name, remediationTemplate)
	return nil
}

// imageServer serves the lab's OS images over HTTP on loopback, as an image server would:
// root filesystems of 32 MiB whose first line says what they are (the emulated OS reads it;
// a "BROKEN" image never gets its kubelet healthy).
type imageServer struct {
	url    string
	images map[string][]byte
	stop   func()
}

func serveImages(names ...string) (*imageServer, error) {
	s := &imageServer{images: map[string][]byte{}}
	for _, n := range names {
		s.images[n] = bytes.Repeat([]byte("anvil lab root filesystem "+n+"\n"), 32<<20/(len(n)+27))
	}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	srv := &http.Server{ReadHeaderTimeout: 10 * time.Second, Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		content, ok := s.images[strings.TrimSuffix(strings.TrimPrefix(r.URL.Path, "/"), ".img")]
		if !ok {
			http.NotFound(w, r)
			return
		}
		http.ServeContent(w, r, "rootfs.img", time.Time{}, bytes.NewReader(content))
	})}
	go func() { _ = srv.Serve(l) }()
	s.url, s.stop = "http://"+l.Addr().String(), func() { _ = srv.Close() }
	return s, nil
}

// image is the named image with its checksum, as a machine spec names it.
func (s *imageServer) image(name string) infrav1.Image {
	sum := sha256.Sum256(s.images[name])
	return infrav1.Image{URL: s.url + "/" + name + ".img", Checksum: "sha256:" + hex.EncodeToString(sum[:]),
		Format: infrav1.ImageFormatRaw, Layout: infrav1.ImageLayoutABRoot}
}

func (r *labRun) machines(ctx context.Context) ([]clusterv1.Machine, error) {
	ms := &clusterv1.MachineList{}
	if err := r.env.Client.List(ctx, ms, client.InNamespace(labNamespace), client.MatchingLabels{clusterv1.ClusterNameLabel: labClusterName}); err != nil {
		return nil, err
	}
	sort.Slice(ms.Items, func(i, j int) bool { return ms.Items[i].Name < ms.Items[j].Name })
	return ms.Items, nil
}

func isWorker(m *clusterv1.Machine) bool {
	_, cp := m.Labels[clusterv1.MachineControlPlaneLabel]
	return !cp
}

// hostOf is the host a machine runs on, from its providerID (anvil://<namespace>/<host>).
func hostOf(m *clusterv1.Machine) string {
	return strings.TrimPrefix(m.Spec.ProviderID, "anvil://"+labNamespace+"/")
}

// waitClusterReady waits until the control plane and the workers are available with the
// wanted replicas, every machine's Node is Ready with the machine's providerID, and the
// control-plane machines sit in distinct zones.
func (r *labRun) waitClusterReady(ctx context.Context, controlPlanes, workers int) error {
	return r.eventually(ctx, 6*time.Minute, func() (bool, string, error) {
		kcp := &controlplanev1.KubeadmControlPlane{}
		md := &clusterv1.MachineDeployment{}
		if err := r.env.Client.Get(ctx, client.ObjectKey{Namespace: labNamespace, Name: r.cluster.kcp}, kcp); err != nil {
			return false, "", err
		}
		if err := r.env.Client.Get(ctx, client.ObjectKey{Namespace: labNamespace, Name: r.cluster.md}, md); err != nil {
			return false, "", err
		}
		switch {
		case ptr.Deref(kcp.Status.ReadyReplicas, 0) != int32(controlPlanes) || ptr.Deref(kcp.Status.Replicas, 0) != int32(controlPlanes): //nolint:gosec // small
			return false, fmt.Sprintf("KubeadmControlPlane has %d of %d replicas ready", ptr.Deref(kcp.Status.ReadyReplicas, 0), controlPlanes), nil
		case !conditions.IsTrue(kcp, controlplanev1.KubeadmControlPlaneAvailableCondition):
			return false, "KubeadmControlPlane is not Available", nil
		case ptr.Deref(md.Status.AvailableReplicas, 0) != int32(workers) || ptr.Deref(md.Status.Replicas, 0) != int32(workers): //nolint:gosec // small
			return false, fmt.Sprintf("MachineDeployment has %d of %d replicas available", ptr.Deref(md.Status.AvailableReplicas, 0), workers), nil
		}
		ms, err := r.machines(ctx)
		if err != nil {
			return false, "", err
		}
		if len(ms) != controlPlanes+workers {
			return false, fmt.Sprintf("%d machines", len(ms)), nil
		}
		nodes, err := r.workloads.Nodes(ctx, r.clusterKey())
		if err != nil {
			return false, "workload cluster: " + err.Error(), nil //nolint:nilerr // not up yet: keep waiting
		}
		byName := map[string]corev1.Node{}
		for _, n := range nodes {
			byName[n.Name] = n
		}
		cpZones := map[string]string{}
		for _, m := range ms {
			n, ok := byName[m.Status.NodeRef.Name]
			switch {
			case !ok || !m.Status.NodeRef.IsDefined():
				return false, fmt.Sprintf("machine %s has no node yet (phase %s)", m.Name, m.Status.Phase), nil
			case n.Spec.ProviderID != m.Spec.ProviderID || m.Spec.ProviderID != "anvil://"+labNamespace+"/"+n.Name:
				return false, fmt.Sprintf("machine %s: node %s has providerID %q, machine %q", m.Name, n.Name, n.Spec.ProviderID, m.Spec.ProviderID), nil
			case nodeReady(n) != "Ready" || !conditions.IsTrue(&m, clusterv1.MachineReadyCondition):
				return false, fmt.Sprintf("machine %s is not Ready yet", m.Name), nil
			}
			if !isWorker(&m) {
				if other, dup := cpZones[m.Spec.FailureDomain]; dup && controlPlanes <= len(zones) {
					return false, "", fmt.Errorf("control-plane machines %s and %s share failure domain %s", other, m.Name, m.Spec.FailureDomain)
				}
				cpZones[m.Spec.FailureDomain] = m.Name
			}
		}
		return true, "", nil
	})
}

// scaleDown removes one worker and waits for its host to be wiped and Available.
func (r *labRun) scaleDown(ctx context.Context) error {
	before, err := r.machines(ctx)
	if err != nil {
		return err
	}
	workerHosts := map[string]bool{}
	for _, m := range before {
		if isWorker(&m) {
			workerHosts[hostOf(&m)] = true
		}
	}
	md := &clusterv1.MachineDeployment{}
	if err := r.env.Client.Get(ctx, client.ObjectKey{Namespace: labNamespace, Name: r.cluster.md}, md); err != nil {
		return err
	}
	patch := client.MergeFrom(md.DeepCopy())
	md.Spec.Replicas = ptr.To(int32(r.opts.Workers - 1)) //nolint:gosec // small
	if err := r.env.Client.Patch(ctx, md, patch); err != nil {
		return err
	}
	if err := r.waitClusterReady(ctx, r.opts.ControlPlanes, r.opts.Workers-1); err != nil {
		return err
	}
	return r.eventually(ctx, 2*time.Minute, func() (bool, string, error) {
		hosts, err := r.hosts(ctx)
		if err != nil {
			return false, "", err
		}
		for _, h := range hosts {
			if workerHosts[h.Name] && h.Spec.Claim == nil && h.Status.State == infrav1.HostStateAvailable {
				fmt.Fprintf(r.out, "    %s was wiped (metadata) and is Available again\n", h.Name)
				return true, "", nil
			}
		}
		return false, "no released worker host is Available yet", nil
	})
}

// aWorker returns a worker machine and the host it runs on.
func (r *labRun) aWorker(ctx context.Context) (*clusterv1.Machine, string, error) {
	ms, err := r.machines(ctx)
	if err != nil {
		return nil, "", err
	}
	for i := range ms {
		// The qemu VMs stay out of the upgrade and fault steps: their tiny OS has no kubelet
		// to fail and an upgrade's reboots take minutes under TCG.
		if isWorker(&ms[i]) && ms[i].DeletionTimestamp.IsZero() && r.rack.vms[hostOf(&ms[i])] == nil {
			return &ms[i], hostOf(&ms[i]), nil
		}
	}
	return nil, "", fmt.Errorf("no worker machine")
}

// transientFault makes a worker's node NotReady until its next boot, and waits for the
// MachineHealthCheck and Anvil to cure it with a power cycle: same machine, node Ready.
func (r *labRun) transientFault(ctx context.Context) error {
	m, host, err := r.aWorker(ctx)
	if err != nil {
		return err
	}
	boots := r.countBoots(host)
	r.rack.setFault(host, transientFault)
	if err := r.workloads.SetNodeReady(ctx, r.clusterKey(), host, false, "KubeletStoppedPostingStatus"); err != nil {
		return err
	}
	fmt.Fprintf(r.out, "    node %s (machine %s) reports NotReady\n", host, m.Name)
	if err := r.eventually(ctx, 2*time.Minute, func() (bool, string, error) {
		return boots() > 0, "waiting for the MachineHealthCheck to see the node and Anvil to power-cycle " + host, nil
	}); err != nil {
		return err
	}
	if !r.nodeTainted(ctx, host) {
		return fmt.Errorf("node %s lacks the out-of-service taint while its server is power-cycled", host)
	}
	fmt.Fprintf(r.out, "    node %s has the out-of-service taint (its pods and volumes move at once)\n", host)
	fmt.Fprintf(r.out, "    %s was power-cycled through its BMC and booted again; its kubelet reports Ready\n", host)
	if err := r.workloads.SetNodeReady(ctx, r.clusterKey(), host, true, "KubeletReady"); err != nil {
		return err
	}
	return r.eventually(ctx, 2*time.Minute, func() (bool, string, error) {
		rem := &infrav1.AnvilRemediation{}
		err := r.env.Client.Get(ctx, client.ObjectKey{Namespace: labNamespace, Name: m.Name}, rem)
		if err == nil {
			return false, "the AnvilRemediation is still there (the MachineHealthCheck removes it once the node is healthy)", nil
		}
		if !apierrors.IsNotFound(err) {
			return false, "", err
		}
		cur := &clusterv1.Machine{}
		if err := r.env.Client.Get(ctx, client.ObjectKeyFromObject(m), cur); err != nil || cur.UID != m.UID || !cur.DeletionTimestamp.IsZero() {
			return false, "", fmt.Errorf("machine %s was replaced, though a power cycle cured it", m.Name)
		}
		if r.nodeTainted(ctx, host) {
			return false, "node " + host + " still has the out-of-service taint", nil
		}
		return conditions.IsTrue(cur, clusterv1.MachineHealthCheckSucceededCondition), "machine not yet healthy again", nil
	})
}

// nodeTainted reports whether the workload Node carries the out-of-service taint.
func (r *labRun) nodeTainted(ctx context.Context, node string) bool {
	nodes, err := r.workloads.Nodes(ctx, r.clusterKey())
	if err != nil {
		return false
	}
	for _, n := range nodes {
		for _, t := range n.Spec.Taints {
			if n.Name == node && t.Key == corev1.TaintNodeOutOfService {
				return true
			}
		}
	}
	return false
}

// countBoots returns a function that counts the server's OS boots since now.
func (r *labRun) countBoots(server string) func() int {
	ch := make(chan struct{}, 100)
	r.rack.onOSBoot(func(o lab.OSBoot) {
		if o.Server == server {
			select {
			case ch <- struct{}{}:
			default:
			}
		}
	})
	n := 0
	return func() int {
		for {
			select {
			case <-ch:
				n++
			default:
				return n
			}
		}
	}
}

// permanentFault makes a worker's node NotReady for good and waits for Anvil to give up
// after its power cycle: the machine is replaced on another host, and the broken host is in
// maintenance ("needs repair") with its released claim.
func (r *labRun) permanentFault(ctx context.Context) (string, error) {
	m, host, err := r.aWorker(ctx)
	if err != nil {
		return "", err
	}
	r.rack.setFault(host, permanentFault)
	if err := r.workloads.SetNodeReady(ctx, r.clusterKey(), host, false, "KubeletStoppedPostingStatus"); err != nil {
		return "", err
	}
	fmt.Fprintf(r.out, "    node %s (machine %s) reports NotReady, and will after every boot\n", host, m.Name)
	if err := r.eventually(ctx, 3*time.Minute, func() (bool, string, error) {
		h, err := r.host(ctx, host)
		if err != nil {
			return false, "", err
		}
		cur := &clusterv1.Machine{}
		err = r.env.Client.Get(ctx, client.ObjectKeyFromObject(m), cur)
		gone := apierrors.IsNotFound(err) || (err == nil && cur.UID != m.UID)
		switch {
		case err != nil && !apierrors.IsNotFound(err):
			return false, "", err
		case h.Spec.Maintenance == nil:
			return false, "host " + host + " is not in maintenance yet", nil
		case !gone:
			return false, "machine " + m.Name + " is not replaced yet", nil
		}
		fmt.Fprintf(r.out, "    %s is in maintenance: %q\n", host, h.Spec.Maintenance.Reason)
		return true, "", nil
	}); err != nil {
		return "", err
	}
	if err := r.waitClusterReady(ctx, r.opts.ControlPlanes, r.opts.Workers-1); err != nil {
		return "", err
	}
	nm, newHost, err := r.aWorker(ctx)
	if err != nil {
		return "", err
	}
	fmt.Fprintf(r.out, "    machine %s replaced it on %s\n", nm.Name, newHost)
	return host, nil
}

// repair clears a host's maintenance: it is re-inspected and, its claim being released,
// wiped before it is Available.
func (r *labRun) repair(ctx context.Context, host string) error {
	r.rack.setFault(host, noFault)
	if err := r.mutateHost(ctx, host, func(h *infrav1.AnvilHost) { h.Spec.Maintenance = nil }); err != nil {
		return err
	}
	return r.waitHostsAvailable(ctx, []string{host})
}

func (r *labRun) waitHostsAvailable(ctx context.Context, names []string) error {
	return r.eventually(ctx, 3*time.Minute, func() (bool, string, error) {
		for _, n := range names {
			h, err := r.host(ctx, n)
			if err != nil {
				return false, "", err
			}
			if h.Spec.Claim != nil || h.Status.State != infrav1.HostStateAvailable {
				return false, hostWhy(*h), nil
			}
		}
		return true, "", nil
	})
}

// retire retires an unclaimed Available host.
func (r *labRun) retire(ctx context.Context) (string, error) {
	hosts, err := r.hosts(ctx)
	if err != nil {
		return "", err
	}
	sort.Slice(hosts, func(i, j int) bool { return hostIndex(hosts[i].Name) > hostIndex(hosts[j].Name) })
	name := ""
	for _, h := range hosts {
		if h.Spec.Claim == nil && h.Status.State == infrav1.HostStateAvailable {
			name = h.Name
			break
		}
	}
	if name == "" {
		return "", fmt.Errorf("no spare host to retire")
	}
	if err := r.mutateHost(ctx, name, func(h *infrav1.AnvilHost) { h.Spec.Retire = true }); err != nil {
		return "", err
	}
	return name, r.eventually(ctx, 2*time.Minute, func() (bool, string, error) {
		h, err := r.host(ctx, name)
		if err != nil {
			return false, "", err
		}
		if h.Status.State != infrav1.HostStateRetired || h.Status.Power != infrav1.PowerOff {
			return false, hostWhy(*h) + ", power " + string(h.Status.Power), nil
		}
		fmt.Fprintf(r.out, "    %s is Retired and powered off\n", name)
		return true, "", nil
	})
}

// deleteCluster deletes the Cluster and waits until every machine is gone and every host
// but the retired one is unclaimed and Available.
func (r *labRun) deleteCluster(ctx context.Context, retired string) error {
	if err := r.env.Client.Delete(ctx, &clusterv1.Cluster{ObjectMeta: metav1.ObjectMeta{Name: labClusterName, Namespace: labNamespace}}); err != nil {
		return err
	}
	if err := r.eventually(ctx, 4*time.Minute, func() (bool, string, error) {
		err := r.env.Client.Get(ctx, r.clusterKey(), &clusterv1.Cluster{})
		if apierrors.IsNotFound(err) {
			return true, "", nil
		}
		ms, _ := r.machines(ctx)
		return false, fmt.Sprintf("the Cluster is still being deleted (%d machines left)", len(ms)), err
	}); err != nil {
		return err
	}
	var names []string
	for _, n := range r.rack.names {
		if n != retired {
			names = append(names, n)
		}
	}
	return r.waitHostsAvailable(ctx, names)
}
