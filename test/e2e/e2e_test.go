package e2e

import (
	"fmt"
	"slices"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	eventsv1 "k8s.io/api/events/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/utils/ptr"
	clusterv1 "sigs.k8s.io/cluster-api/api/core/v1beta2"
	"sigs.k8s.io/cluster-api/util/conditions"
	"sigs.k8s.io/controller-runtime/pkg/client"

	infrav1 "github.com/anvil-metal/cluster-api-provider-anvil/api/v1alpha1"
	"github.com/anvil-metal/cluster-api-provider-anvil/controllers"
	"github.com/anvil-metal/cluster-api-provider-anvil/internal/workload"
)

// TestClusterLifecycle builds a highly available cluster on nine hosts in three zones with
// Cluster API's real controllers, scales its workers down, and deletes it.
func TestClusterLifecycle(t *testing.T) {
	f := newFixture(t, 3)
	defer func() { f.t = t }() // steps run as subtests with their own t
	// The kubelets of the hosts the workers take (after a control-plane machine in each zone,
	// spread over the zones, best fit, then name) register their Nodes without a
	// providerID: Anvil must set it through the ClusterCache.
	withoutProviderID := []string{"zone-a-1", "zone-b-1", "zone-c-1"}
	for _, name := range withoutProviderID {
		h := &infrav1.AnvilHost{}
		h.Namespace, h.Name = f.ns, name
		f.update(h, func() { metav1.SetMetaDataAnnotation(&h.ObjectMeta, workload.OmitProviderIDAnnotation, "") })
	}
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
			// checkPlacement found every Node by the providerID Anvil set where the kubelet
			// gave none; make sure that happened, and that host labels reached the Nodes.
			fellBack := 0
			for _, p := range placed {
				if slices.Contains(withoutProviderID, p.host) {
					fellBack++
				}
			}
			if fellBack == 0 {
				t.Errorf("no machine landed on %v, whose kubelets omit the providerID: the fallback was not exercised (placements %v)", withoutProviderID, placed)
			}
			nodes, err := workloads.Nodes(f.ctx, c.key())
			if err != nil {
				t.Fatal(err)
			}
			hosts := map[string]infrav1.AnvilHost{}
			for _, h := range f.listHosts() {
				hosts[h.Name] = h
			}
			f.eventually("host labels are copied to every Node", 30*time.Second, func() (bool, string) {
				nodes, err = workloads.Nodes(f.ctx, c.key())
				if err != nil {
					return false, err.Error()
				}
				for _, n := range nodes {
					h := hosts[n.Name]
					for _, key := range []string{infrav1.DefaultFailureDomainLabel, infrav1.LabelDomain + "/cpu-cores"} {
						if n.Labels[key] == "" || n.Labels[key] != h.Labels[key] {
							return false, fmt.Sprintf("Node %s: %s=%q, host %q", n.Name, key, n.Labels[key], h.Labels[key])
						}
					}
					if v, ok := n.Labels[controllers.ClaimedByLabel]; ok {
						t.Errorf("Node %s carries the claim's bookkeeping label %s=%s", n.Name, controllers.ClaimedByLabel, v)
					}
				}
				return true, ""
			})
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
			f.waitWiped(released, time.Minute, true)
			// The machines that stayed kept their hosts.
			for _, p := range after {
				if b, ok := before[p.machine]; !ok || b.host != p.host {
					t.Errorf("machine %s moved from host %s to %s", p.machine, b.host, p.host)
				}
			}
		}},
		{"more workers than hosts: the last host goes to one machine, the other waits and says why", func(t *testing.T) {
			f.t = t
			spare := len(f.hosts) - len(f.claimedHosts())
			md := &clusterv1.MachineDeployment{}
			md.Namespace, md.Name = f.ns, c.mdName()
			f.update(md, func() { md.Spec.Replicas = ptr.To(*md.Spec.Replicas + int32(spare) + 1) })
			var waiting []string
			f.eventually(fmt.Sprintf("%d new machines race for %d free hosts: all but one provisioned", spare+1, spare), 2*time.Minute, func() (bool, string) {
				waiting = nil
				provisioned := 0
				for _, am := range f.listAnvilMachines() {
					if ptr.Deref(am.Status.Initialization.Provisioned, false) {
						provisioned++
						continue
					}
					c := conditions.Get(&am, controllers.ConditionHostClaimed)
					if c == nil || c.Reason != "NoMatchingHost" {
						return false, fmt.Sprintf("AnvilMachine %s: %s", am.Name, conditionSummary(am.Status.Conditions))
					}
					waiting = append(waiting, am.Name+": "+c.Message)
				}
				return provisioned == len(f.hosts) && len(waiting) == 1, fmt.Sprintf("%d provisioned, waiting: %v", provisioned, waiting)
			})
			want := fmt.Sprintf("0 of %d hosts match: %d are claimed by other machines", len(f.hosts), len(f.hosts))
			if !strings.HasSuffix(waiting[0], want) {
				t.Errorf("the waiting machine says %q, want %q", waiting[0], want)
			}
			// Cluster API shows the reason on the Machine too.
			// (The Machine controller mirrors the AnvilMachine's Ready condition on its next
			// reconcile, which can lag on a loaded machine.)
			name := strings.SplitN(waiting[0], ":", 2)[0]
			f.eventually("the Machine says why it waits", time.Minute, func() (bool, string) {
				m := &clusterv1.Machine{}
				if err := f.get(name, m); err != nil {
					return false, err.Error()
				}
				c := conditions.Get(m, clusterv1.MachineInfrastructureReadyCondition)
				return c != nil && strings.Contains(c.Message, want), fmt.Sprintf("Machine %s's InfrastructureReady condition: %+v", name, c)
			})
			f.checkNoDoubleClaims()
		}},
		{"deleting the cluster wipes every host", func(t *testing.T) {
			f.t = t
			claimed := f.claimedHosts()
			cluster := &clusterv1.Cluster{}
			if err := f.get(c.name, cluster); err != nil {
				t.Fatal(err)
			}
			if err := f.api.Client.Delete(f.ctx, cluster); err != nil {
				t.Fatal(err)
			}
			f.eventually("the Cluster and all its machines are gone", 3*time.Minute, func() (bool, string) {
				err := f.get(c.name, &clusterv1.Cluster{})
				ams := f.listAnvilMachines()
				return isNotFound(err) && len(ams) == 0, fmt.Sprintf("cluster: %v; %d AnvilMachines left", err, len(ams))
			})
			f.waitWiped(claimed, time.Minute, true)
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
	// Events are best effort: one sent by a manager that is stopped right after its write
	// may never arrive, so here the wipe shows by the state and the power-off alone.
	f.waitWiped(releasedHosts(before, after), time.Minute, false)
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
		f.anvil = startAnvil(f.t, f.api, nil)
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
		// A machine may wait for a host, but only one that says so and has none recorded.
		waiting := am.Status.HostRef == nil && conditions.GetReason(&am, controllers.ConditionHostClaimed) == "NoMatchingHost"
		if holder[string(am.UID)] == "" && !waiting {
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
func (f *fixture) waitWiped(hosts []string, timeout time.Duration, wantEvent bool) {
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
			if wantEvent && !f.hasEvent(name, string(infrav1.HostStateDeprovisioning)) {
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
	if err := f.api.Client.List(f.ctx, evs, client.InNamespace(f.ns)); err != nil {
		return false
	}
	for _, e := range evs.Items {
		// The host controller sends one Event per reconcile; its note lists every state the
		// host passed through ("Provisioned → Deprovisioning → Inspecting → Available").
		if e.Regarding.Kind == "AnvilHost" && e.Regarding.Name == host && (e.Reason == reason || strings.Contains(e.Note, "→ "+reason)) {
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

func nodeNames(nodes []corev1.Node) []string {
	out := make([]string, 0, len(nodes))
	for _, n := range nodes {
		out = append(out, n.Name)
	}
	return out
}
