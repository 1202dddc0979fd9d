//go:build e2e

package e2e

import (
	"fmt"
	"maps"
	"reflect"
	"slices"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	eventsv1 "k8s.io/api/events/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/utils/ptr"
	bootstrapv1 "sigs.k8s.io/cluster-api/api/bootstrap/kubeadm/v1beta2"
	controlplanev1 "sigs.k8s.io/cluster-api/api/controlplane/kubeadm/v1beta2"
	clusterv1 "sigs.k8s.io/cluster-api/api/core/v1beta2"
	"sigs.k8s.io/cluster-api/util/conditions"
	"sigs.k8s.io/controller-runtime/pkg/client"

	infrav1 "github.com/anvil-metal/cluster-api-provider-anvil/api/v1alpha1"
	"github.com/anvil-metal/cluster-api-provider-anvil/controllers"
)

// TestClusterLifecycle builds a highly available cluster on nine hosts in three zones with
// Cluster API's real controllers, scales its workers down, and deletes it.
func TestClusterLifecycle(t *testing.T) {
	f := newFixture(t, 3)
	defer func() { f.t = t }() // steps run as subtests with their own t
	c := f.createCluster("prod", 3, 2)

	steps := []struct {
		name string
		run  func(t *testing.T)
	}{
		{"three control-plane and two worker machines, one host each", func(t *testing.T) {
			f.t = t
			c.waitReady(3, 2, 3*time.Minute)
			placed := f.checkPlacement(c)
			var zonesUsed []string
			for _, p := range placed {
				if p.controlPlane {
					zonesUsed = append(zonesUsed, p.zone)
				}
			}
			slices.Sort(zonesUsed)
			if !slices.Equal(zonesUsed, zones) {
				t.Errorf("control-plane machines are in zones %v, want one in each of %v", zonesUsed, zones)
			}
			members, err := workloads.EtcdMembers(f.ctx, c.key())
			if err != nil || len(members) != 3 {
				t.Errorf("etcd members %v (%v), want one per control-plane machine", members, err)
			}
		}},
		{"scaling workers 2 to 1 wipes the released host", func(t *testing.T) {
			f.t = t
			before := f.checkPlacement(c)
			md := &clusterv1.MachineDeployment{}
			md.Namespace, md.Name = f.ns, c.mdName()
			f.update(md, func() { md.Spec.Replicas = ptr.To[int32](1) })
			c.waitReady(3, 1, 2*time.Minute)
			after := f.checkPlacement(c)
			released := releasedHosts(before, after)
			if len(released) != 1 {
				t.Fatalf("hosts released by the scale-down: %v, want exactly one\n%s", released, f.describe())
			}
			f.waitWiped(released, time.Minute)
			// The machines that stayed kept their hosts.
			for _, p := range after {
				if b, ok := before[p.machine]; !ok || b.host != p.host {
					t.Errorf("machine %s moved from host %s to %s", p.machine, b.host, p.host)
				}
			}
		}},
		{"deleting the cluster wipes every host", func(t *testing.T) {
			f.t = t
			claimed := f.claimedHosts()
			cluster := &clusterv1.Cluster{}
			if err := f.get(c.name, cluster); err != nil {
				t.Fatal(err)
			}
			if err := env.Client.Delete(f.ctx, cluster); err != nil {
				t.Fatal(err)
			}
			f.eventually("the Cluster and all its machines are gone", 3*time.Minute, func() (bool, string) {
				err := f.get(c.name, &clusterv1.Cluster{})
				ams := f.listAnvilMachines()
				return isNotFound(err) && len(ams) == 0, fmt.Sprintf("cluster: %v; %d AnvilMachines left", err, len(ams))
			})
			f.waitWiped(claimed, time.Minute)
			for _, h := range f.listHosts() {
				if h.Status.State != infrav1.HostStateAvailable || h.Spec.Claim != nil || h.Labels[controllers.ClaimedByLabel] != "" {
					t.Errorf("host %s after the cluster's deletion: state %s, claim %+v, claimed-by %q", h.Name, h.Status.State, h.Spec.Claim,
						h.Labels[controllers.ClaimedByLabel])
				}
			}
			if nodes, err := workloads.Nodes(f.ctx, c.key()); err != nil || len(nodes) != 0 {
				t.Errorf("workload cluster still has nodes %v (%v)", nodeNames(nodes), err)
			}
		}},
	}
	for _, s := range steps {
		if !t.Run(s.name, s.run) {
			t.Logf("host history:\n%s", f.history.render())
			return
		}
	}
}

// TestClusterctlMove does to one management cluster what clusterctl move does to the source
// and then to the target (here the same API server and namespace).
//
// Source: pause the Cluster, wait until nothing blocks the move, then annotate, delete and
// strip the finalizers of every object of the cluster, leaves first. The hosts must stay
// exactly as they were: Provisioned, claimed, running their Nodes.
//
// Target: the hosts move too (a target without them could not manage the machines), so they
// are deleted for the move like the rest; then everything is created again as clusterctl
// creates it in the target: same names, labels and specs, new UIDs, owner references rebuilt,
// no status. After the unpause each machine must take back the host it ran on, and no host
// may be claimed by another machine or installed again.
func TestClusterctlMove(t *testing.T) {
	f := newFixture(t, 1)
	defer func() { f.t = t }() // the halves run as subtests with their own t
	c := f.createCluster("moving", 1, 1)
	c.waitReady(1, 1, 3*time.Minute)
	placed := f.checkPlacement(c)
	var objects []client.Object

	source := func(t *testing.T) {
		f.t = t
		hostsBefore := hostStates(f.listHosts())
		cluster := &clusterv1.Cluster{}
		cluster.Namespace, cluster.Name = f.ns, c.name
		f.update(cluster, func() { cluster.Spec.Paused = ptr.To(true) })
		f.eventually("the Anvil machines and cluster acknowledge the pause and nothing blocks the move", 30*time.Second, func() (bool, string) {
			ac := &infrav1.AnvilCluster{}
			if err := f.get(c.name, ac); err != nil || !conditions.IsTrue(ac, clusterv1.PausedCondition) {
				return false, "AnvilCluster not paused"
			}
			for _, am := range f.listAnvilMachines() {
				if !conditions.IsTrue(&am, clusterv1.PausedCondition) {
					return false, "AnvilMachine " + am.Name + " not paused"
				}
				if _, blocked := am.Annotations[controllers.BlockMoveAnnotation]; blocked {
					return false, "AnvilMachine " + am.Name + " blocks the move"
				}
			}
			return true, ""
		})
		historyBefore := f.history.render()
		objects = f.movedObjects(c.name)

		f.deleteForMove(objects)
		f.eventually("the cluster's objects are gone from the source", 30*time.Second, func() (bool, string) {
			left := f.movedObjects(c.name)
			if len(left) > 0 {
				return false, fmt.Sprintf("%d objects left, e.g. %T %s", len(left), left[0], left[0].GetName())
			}
			return true, ""
		})
		// Nothing must happen now; watch for a while (the history sees transient changes too).
		deadline := time.Now().Add(5 * time.Second)
		for time.Now().Before(deadline) {
			if got := hostStates(f.listHosts()); !reflect.DeepEqual(got, hostsBefore) {
				t.Fatalf("hosts changed after the move's deletion:\nbefore %v\nafter  %v\n%s", hostsBefore, got, f.describe())
			}
			time.Sleep(250 * time.Millisecond)
		}
		if after := f.history.render(); after != historyBefore {
			t.Errorf("host history changed during the move:\nbefore:\n%s\nafter:\n%s", historyBefore, after)
		}
		if nodes, err := workloads.Nodes(f.ctx, c.key()); err != nil || len(nodes) != 2 {
			t.Errorf("the workload cluster should keep running both nodes; nodes %v (%v)", nodeNames(nodes), err)
		}
	}

	target := func(t *testing.T) {
		f.t = t
		moveStart := time.Now()
		var hosts []client.Object
		for _, h := range f.listHosts() {
			hosts = append(hosts, h.DeepCopy())
		}
		f.deleteForMove(hosts)
		f.eventually("the hosts are gone from the source", 30*time.Second, func() (bool, string) {
			left := f.listHosts()
			return len(left) == 0, fmt.Sprintf("%d hosts left", len(left))
		})
		// Hosts first (nothing owns them), then the cluster from its root.
		f.createForMove(append(objects, hosts...))
		cluster := &clusterv1.Cluster{}
		cluster.Namespace, cluster.Name = f.ns, c.name
		f.update(cluster, func() { cluster.Spec.Paused = nil })

		hostOf := map[string]string{}
		for _, p := range placed {
			hostOf[p.host] = p.machine
		}
		// A host claimed by the wrong machine or installed again is a failure at once; give
		// the others a few seconds to show too.
		problems := map[string]bool{}
		var firstProblem time.Time
		f.eventually("the moved machines hold their hosts again", time.Minute, func() (bool, string) {
			for _, h := range f.listHosts() {
				if hostOf[h.Name] == "" && h.Spec.Claim != nil {
					problems[fmt.Sprintf("machine %s claimed spare host %s instead of taking back its own", h.Spec.Claim.MachineRef.Name, h.Name)] = true
				}
				if n := f.serverEventsSince(h.Name, "PXEBoot", moveStart); n > 0 {
					problems[fmt.Sprintf("host %s was installed (booted from the network) after the move began", h.Name)] = true
				}
			}
			if len(problems) > 0 && firstProblem.IsZero() {
				firstProblem = time.Now()
			}
			if len(problems) > 0 && time.Since(firstProblem) > 3*time.Second {
				list := slices.Sorted(maps.Keys(problems))
				t.Fatalf("after the move:\n  %s\n%s\nhost history:\n%s", strings.Join(list, "\n  "), f.describe(), f.history.render())
			}
			for _, am := range f.listAnvilMachines() {
				if am.Status.HostRef == nil || !ptr.Deref(am.Status.Initialization.Provisioned, false) {
					return false, fmt.Sprintf("AnvilMachine %s: hostRef %+v, %s", am.Name, am.Status.HostRef, conditionSummary(am.Status.Conditions))
				}
			}
			return len(problems) == 0, ""
		})
		c.waitReady(1, 1, time.Minute)
		after := f.checkPlacement(c)
		for m, p := range placed {
			if after[m].host != p.host {
				t.Errorf("machine %s ran on host %s before the move and on %q after", m, p.host, after[m].host)
			}
		}
	}

	if t.Run("source: pause and delete leave the hosts alone", source) {
		t.Run("target: the machines take back their hosts without reinstalling them", target)
	}
}

// TestAnvilRestartsAtEveryTransition provisions a cluster, then scales its workers down,
// while replacing the Anvil manager (a new process in miniature: new caches, new BMC pool, no
// memory) right after every change of any host's state or claim. At the end no host was
// claimed twice, none was lost, every machine was provisioned and every released host wiped.
func TestAnvilRestartsAtEveryTransition(t *testing.T) {
	f := newFixture(t, 2)
	const workers = 3
	c := f.createCluster("restarts", 1, workers)
	restarts := f.restartAtTransitions("every machine is provisioned", 3*time.Minute, func() bool {
		ams := f.listAnvilMachines()
		for _, am := range ams {
			if !ptr.Deref(am.Status.Initialization.Provisioned, false) {
				return false
			}
		}
		return len(ams) == 1+workers
	})
	t.Logf("%d restarts of the Anvil manager while provisioning", restarts)
	c.waitReady(1, workers, 2*time.Minute)
	before := f.checkPlacement(c)
	f.checkNoDoubleClaims()

	md := &clusterv1.MachineDeployment{}
	md.Namespace, md.Name = f.ns, c.mdName()
	f.update(md, func() { md.Spec.Replicas = ptr.To[int32](1) })
	restarts = f.restartAtTransitions("two hosts are released and wiped", 2*time.Minute, func() bool {
		claimed := 0
		for _, h := range f.listHosts() {
			switch {
			case h.Spec.Claim != nil:
				claimed++
			case h.Status.State != infrav1.HostStateAvailable:
				return false
			}
		}
		return claimed == 2 && len(f.listAnvilMachines()) == 2
	})
	t.Logf("%d restarts of the Anvil manager while scaling down", restarts)
	c.waitReady(1, 1, 2*time.Minute)
	after := f.checkPlacement(c)
	f.waitWiped(releasedHosts(before, after), time.Minute)
	f.checkNoDoubleClaims()
	t.Logf("host history:\n%s", f.history.render())
}

// restartAtTransitions replaces the Anvil manager right after each change the host watch
// reports, until done holds; it returns the number of restarts.
func (f *fixture) restartAtTransitions(what string, timeout time.Duration, done func() bool) int {
	f.t.Helper()
	restarts := 0
	start := time.Now()
	for !done() {
		if time.Since(start) > timeout {
			f.t.Fatalf("not within %s: %s (after %d restarts of the Anvil manager)\n%s\nhost history:\n%s", timeout, what, restarts,
				f.describe(), f.history.render())
		}
		select {
		case <-f.history.changes:
		case <-time.After(500 * time.Millisecond):
			continue
		}
		// Changes that land while we restart are covered by this restart.
		for drained := false; !drained; {
			select {
			case <-f.history.changes:
			default:
				drained = true
			}
		}
		f.anvil.stop(f.t)
		f.anvil = startAnvil(f.t)
		restarts++
	}
	f.t.Logf("%s: %s", what, time.Since(start).Round(100*time.Millisecond))
	return restarts
}

// placement is where one Machine runs.
type placement struct {
	machine, host, zone string
	controlPlane        bool
}

// checkPlacement checks that every Machine of the cluster runs on its own host, that host,
// AnvilMachine, Machine and Node agree on it, and that unclaimed hosts are Available. It
// returns the placements by Machine name.
func (f *fixture) checkPlacement(c *testCluster) map[string]placement {
	f.t.Helper()
	hosts := map[string]infrav1.AnvilHost{}
	for _, h := range f.listHosts() {
		hosts[h.Name] = h
	}
	nodes, err := workloads.Nodes(f.ctx, c.key())
	if err != nil {
		f.t.Fatal(err)
	}
	nodeByProviderID := map[string]string{}
	for _, n := range nodes {
		nodeByProviderID[n.Spec.ProviderID] = n.Name
	}
	out := map[string]placement{}
	usedBy := map[string]string{}
	var problems []string
	for _, m := range c.machines() {
		am := &infrav1.AnvilMachine{}
		if err := f.get(m.Spec.InfrastructureRef.Name, am); err != nil {
			problems = append(problems, fmt.Sprintf("machine %s: AnvilMachine: %v", m.Name, err))
			continue
		}
		if am.Status.HostRef == nil {
			problems = append(problems, fmt.Sprintf("machine %s: AnvilMachine %s holds no host", m.Name, am.Name))
			continue
		}
		hostName := am.Status.HostRef.Name
		h, ok := hosts[hostName]
		p := placement{machine: m.Name, host: hostName, zone: h.Labels[infrav1.DefaultFailureDomainLabel], controlPlane: isControlPlane(&m)}
		out[m.Name] = p
		wantID := fmt.Sprintf("anvil://%s/%s", f.ns, hostName)
		switch {
		case !ok:
			problems = append(problems, fmt.Sprintf("machine %s: host %s does not exist", m.Name, hostName))
		case usedBy[hostName] != "":
			problems = append(problems, fmt.Sprintf("machines %s and %s both run on host %s", usedBy[hostName], m.Name, hostName))
		case h.Spec.Claim == nil || h.Spec.Claim.MachineRef.UID != am.UID || h.Spec.Claim.Released:
			problems = append(problems, fmt.Sprintf("machine %s: host %s has claim %+v, want one for AnvilMachine %s (%s)", m.Name, hostName, h.Spec.Claim, am.Name, am.UID))
		case h.Labels[controllers.ClaimedByLabel] != string(am.UID):
			problems = append(problems, fmt.Sprintf("machine %s: host %s is labelled claimed-by %q, want %q", m.Name, hostName, h.Labels[controllers.ClaimedByLabel], am.UID))
		case h.Status.State != infrav1.HostStateProvisioned:
			problems = append(problems, fmt.Sprintf("machine %s: host %s is %s", m.Name, hostName, h.Status.State))
		case m.Spec.ProviderID != wantID || ptr.Deref(am.Spec.ProviderID, "") != wantID:
			problems = append(problems, fmt.Sprintf("machine %s: providerID %q, AnvilMachine's %q, want %q", m.Name, m.Spec.ProviderID, ptr.Deref(am.Spec.ProviderID, ""), wantID))
		case nodeByProviderID[wantID] != hostName || m.Status.NodeRef.Name != hostName:
			problems = append(problems, fmt.Sprintf("machine %s: node %q for %s, nodeRef %q", m.Name, nodeByProviderID[wantID], wantID, m.Status.NodeRef.Name))
		case am.Status.FailureDomain != p.zone:
			problems = append(problems, fmt.Sprintf("machine %s: AnvilMachine reports failure domain %q, host is in %q", m.Name, am.Status.FailureDomain, p.zone))
		case p.controlPlane && m.Spec.FailureDomain != p.zone:
			problems = append(problems, fmt.Sprintf("control-plane machine %s: failure domain %q but host %s is in %q", m.Name, m.Spec.FailureDomain, hostName, p.zone))
		}
		usedBy[hostName] = m.Name
	}
	for name, h := range hosts {
		if usedBy[name] == "" && (h.Spec.Claim != nil || h.Status.State != infrav1.HostStateAvailable) {
			problems = append(problems, fmt.Sprintf("host %s runs no machine of the cluster but is %s with claim %+v", name, h.Status.State, h.Spec.Claim))
		}
	}
	if len(nodes) != len(out) {
		problems = append(problems, fmt.Sprintf("the workload cluster has %d nodes %v for %d machines", len(nodes), nodeNames(nodes), len(out)))
	}
	if len(problems) > 0 {
		f.t.Fatalf("placement:\n  %s\n%s", strings.Join(problems, "\n  "), f.describe())
	}
	return out
}

// checkNoDoubleClaims checks the claims across the namespace and across time: every claim
// names a live AnvilMachine that holds exactly that host, labels agree with claims, no
// machine ever had its claim on two hosts, and every unclaimed host is Available.
func (f *fixture) checkNoDoubleClaims() {
	f.t.Helper()
	var problems []string
	machines := map[string]infrav1.AnvilMachine{}
	for _, am := range f.listAnvilMachines() {
		machines[am.Name] = am
	}
	holder := map[string]string{}
	for _, h := range f.listHosts() {
		c := h.Spec.Claim
		if c == nil {
			if h.Status.State != infrav1.HostStateAvailable || h.Labels[controllers.ClaimedByLabel] != "" {
				problems = append(problems, fmt.Sprintf("unclaimed host %s is %s, claimed-by %q", h.Name, h.Status.State, h.Labels[controllers.ClaimedByLabel]))
			}
			continue
		}
		am, ok := machines[c.MachineRef.Name]
		switch {
		case !ok || am.UID != c.MachineRef.UID:
			problems = append(problems, fmt.Sprintf("host %s is claimed by %s (%s), which does not exist: lost", h.Name, c.MachineRef.Name, c.MachineRef.UID))
		case holder[string(c.MachineRef.UID)] != "":
			problems = append(problems, fmt.Sprintf("machine %s claims hosts %s and %s", c.MachineRef.Name, holder[string(c.MachineRef.UID)], h.Name))
		case h.Labels[controllers.ClaimedByLabel] != string(c.MachineRef.UID):
			problems = append(problems, fmt.Sprintf("host %s: claimed-by label %q, claim %s", h.Name, h.Labels[controllers.ClaimedByLabel], c.MachineRef.UID))
		case am.Status.HostRef == nil || am.Status.HostRef.Name != h.Name:
			problems = append(problems, fmt.Sprintf("host %s is claimed by %s, whose hostRef is %+v", h.Name, am.Name, am.Status.HostRef))
		}
		holder[string(c.MachineRef.UID)] = h.Name
	}
	for name, am := range machines {
		if holder[string(am.UID)] == "" {
			problems = append(problems, fmt.Sprintf("AnvilMachine %s holds no host", name))
		}
	}
	// Across time: a machine's claim never sat on two hosts.
	everOn := map[string]string{}
	for _, host := range f.hosts {
		for _, s := range f.history.of(host) {
			if s.UID == "" {
				continue
			}
			if other := everOn[s.UID]; other != "" && other != host {
				problems = append(problems, fmt.Sprintf("machine %s (%s) was claimed on host %s and on host %s", s.Machine, short(s.UID), other, host))
			}
			everOn[s.UID] = host
		}
	}
	if len(problems) > 0 {
		f.t.Fatalf("claims:\n  %s\n%s\nhost history:\n%s", strings.Join(problems, "\n  "), f.describe(), f.history.render())
	}
}

// releasedHosts are the hosts of machines in before but not in after.
func releasedHosts(before, after map[string]placement) []string {
	var out []string
	for m, p := range before {
		if _, ok := after[m]; !ok {
			out = append(out, p.host)
		}
	}
	slices.Sort(out)
	return out
}

// claimedHosts returns the names of the hosts that carry a claim.
func (f *fixture) claimedHosts() []string {
	var out []string
	for _, h := range f.listHosts() {
		if h.Spec.Claim != nil {
			out = append(out, h.Name)
		}
	}
	return out
}

// waitWiped waits until each host is Available without a claim or boot slots, and checks
// that it got there the way a release must: the claim marked released, the host state
// machine through Deprovisioning (an Event says so; the Simulated provisioner finishes it
// within one reconcile, so the state is never written), and the server powered off by the
// wipe after the release.
func (f *fixture) waitWiped(hosts []string, timeout time.Duration) {
	f.t.Helper()
	f.eventually(fmt.Sprintf("hosts %v are wiped and Available without a claim", hosts), timeout, func() (bool, string) {
		for _, name := range hosts {
			h := &infrav1.AnvilHost{}
			if err := f.get(name, h); err != nil {
				return false, err.Error()
			}
			if h.Status.State != infrav1.HostStateAvailable || h.Spec.Claim != nil || h.Labels[controllers.ClaimedByLabel] != "" || h.Status.BootSlots != nil {
				return false, fmt.Sprintf("host %s: %s, claim %+v, boot slots %+v", name, h.Status.State, h.Spec.Claim, h.Status.BootSlots)
			}
			if !f.hasEvent(name, string(infrav1.HostStateDeprovisioning)) {
				return false, fmt.Sprintf("host %s: no %s Event", name, infrav1.HostStateDeprovisioning)
			}
		}
		return true, ""
	})
	for _, name := range hosts {
		seq := f.history.of(name)
		var releasedAt time.Time
		for _, s := range seq {
			if s.Released {
				releasedAt = s.At
				break
			}
		}
		switch {
		case releasedAt.IsZero():
			f.t.Errorf("host %s was never seen with a released claim: %v", name, seq)
		case f.serverEventsSince(name, "PowerOff", releasedAt.Add(-time.Second)) == 0:
			f.t.Errorf("host %s: the server was not powered off (wiped) after its claim was released at %s", name, releasedAt.Format(time.StampMilli))
		}
	}
}

// hasEvent reports whether an Event with this reason was recorded for the host.
func (f *fixture) hasEvent(host, reason string) bool {
	evs := &eventsv1.EventList{}
	if err := env.Client.List(f.ctx, evs, client.InNamespace(f.ns)); err != nil {
		return false
	}
	for _, e := range evs.Items {
		if e.Regarding.Kind == "AnvilHost" && e.Regarding.Name == host && e.Reason == reason {
			return true
		}
	}
	return false
}

// hostStates is the part of the hosts that a paused move must not touch.
func hostStates(hosts []infrav1.AnvilHost) map[string]string {
	out := map[string]string{}
	for _, h := range hosts {
		claim := "none"
		if c := h.Spec.Claim; c != nil {
			claim = fmt.Sprintf("%s/%s released=%v", c.MachineRef.Name, c.MachineRef.UID, c.Released)
		}
		out[h.Name] = fmt.Sprintf("%s claim=%s claimed-by=%s maintenance=%v", h.Status.State, claim, h.Labels[controllers.ClaimedByLabel], h.Spec.Maintenance != nil)
	}
	return out
}

// movedObjects lists a cluster's objects in the order clusterctl move deletes them from the
// source: leaves first, the Cluster last. Hosts are not part of a cluster's object graph, and
// of the Secrets only the cluster's own (CAs, kubeconfig, bootstrap data) are.
func (f *fixture) movedObjects(clusterName string) []client.Object {
	f.t.Helper()
	lists := []client.ObjectList{&corev1.SecretList{}, &infrav1.AnvilMachineList{}, &bootstrapv1.KubeadmConfigList{},
		&clusterv1.MachineList{}, &clusterv1.MachineSetList{}, &clusterv1.MachineDeploymentList{}, &controlplanev1.KubeadmControlPlaneList{},
		&bootstrapv1.KubeadmConfigTemplateList{}, &infrav1.AnvilMachineTemplateList{}, &infrav1.AnvilClusterList{}, &clusterv1.ClusterList{}}
	var out []client.Object
	for _, list := range lists {
		opts := []client.ListOption{client.InNamespace(f.ns)}
		if _, ok := list.(*corev1.SecretList); ok {
			opts = append(opts, client.MatchingLabels{clusterv1.ClusterNameLabel: clusterName})
		}
		if err := env.Client.List(f.ctx, list, opts...); err != nil {
			f.t.Fatal(err)
		}
		items, err := metaItems(list)
		if err != nil {
			f.t.Fatal(err)
		}
		out = append(out, items...)
	}
	return out
}

// deleteForMove deletes objects (as movedObjects lists them, leaves first) the way
// clusterctl move does once they exist in the target: each annotated delete-for-move,
// deleted, then its finalizers removed.
func (f *fixture) deleteForMove(objects []client.Object) {
	f.t.Helper()
	const deleteForMove = "clusterctl.cluster.x-k8s.io/delete-for-move"
	for _, o := range objects {
		o = o.DeepCopyObject().(client.Object)
		patch := client.MergeFrom(o.DeepCopyObject().(client.Object))
		a := o.GetAnnotations()
		if a == nil {
			a = map[string]string{}
		}
		a[deleteForMove] = ""
		o.SetAnnotations(a)
		if err := env.Client.Patch(f.ctx, o, patch); err != nil && !isNotFound(err) {
			f.t.Fatalf("annotating %T %s: %v", o, o.GetName(), err)
		}
		if err := env.Client.Delete(f.ctx, o); err != nil && !isNotFound(err) {
			f.t.Fatalf("deleting %T %s: %v", o, o.GetName(), err)
		}
		if len(o.GetFinalizers()) > 0 {
			patch := client.MergeFrom(o.DeepCopyObject().(client.Object))
			o.SetFinalizers(nil)
			if err := env.Client.Patch(f.ctx, o, patch); err != nil && !isNotFound(err) {
				f.t.Fatalf("removing finalizers of %T %s: %v", o, o.GetName(), err)
			}
		}
	}
}

// createForMove creates objects (as movedObjects listed them, leaves first) again the way
// clusterctl move creates them in the target: owners first, without UID, resourceVersion or
// status, owner references pointing at the owners' new UIDs.
func (f *fixture) createForMove(objects []client.Object) {
	f.t.Helper()
	newUID := map[string]string{} // old UID → new UID
	for i := len(objects) - 1; i >= 0; i-- {
		o := objects[i].DeepCopyObject().(client.Object)
		oldUID := string(o.GetUID())
		o.SetUID("")
		o.SetResourceVersion("")
		o.SetCreationTimestamp(metav1.Time{})
		o.SetManagedFields(nil)
		o.SetGeneration(0)
		refs := o.GetOwnerReferences()
		for j := range refs {
			if uid, ok := newUID[string(refs[j].UID)]; ok {
				refs[j].UID = types.UID(uid)
			}
		}
		o.SetOwnerReferences(refs)
		if err := env.Client.Create(f.ctx, o); err != nil {
			f.t.Fatalf("creating %T %s in the target: %v", o, o.GetName(), err)
		}
		newUID[oldUID] = string(o.GetUID())
	}
}

func nodeNames(nodes []corev1.Node) []string {
	out := make([]string, 0, len(nodes))
	for _, n := range nodes {
		out = append(out, n.Name)
	}
	return out
}
