package e2e

import (
	"context"
	"fmt"
	"net"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/watch"
	"sigs.k8s.io/controller-runtime/pkg/client"

	infrav1 "github.com/anvil-metal/cluster-api-provider-anvil/api/v1alpha1"
	"github.com/anvil-metal/cluster-api-provider-anvil/controllers"
	"github.com/anvil-metal/cluster-api-provider-anvil/internal/mgmtplane"
	"github.com/anvil-metal/cluster-api-provider-anvil/internal/vbmc/machine"
	"github.com/anvil-metal/cluster-api-provider-anvil/internal/vbmc/redfish"
)

// zones are the failure domains every fixture spreads its hosts over.
var zones = []string{"zone-a", "zone-b", "zone-c"}

// fixture is one test's namespace: emulated Redfish BMCs, an AnvilHost for each, an Anvil
// manager, and a record of every change the API server saw on the hosts.
type fixture struct {
	t   *testing.T
	ctx context.Context
	// api is the management cluster the test works on: env, or a move's target.
	api      *mgmtplane.Environment
	ns       string
	bmcs     *redfish.Server
	anvil    *anvilManager
	hosts    []string
	history  *hostHistory
	clusters []client.ObjectKey
	// listeners are the addresses this test served (BMCs, workload API servers): all must be
	// closed when it ends.
	listeners []string

	mu sync.Mutex
	// serverEvents records, per host, when its emulated server lost power or booted from the
	// network (what an install does).
	serverEvents map[string][]serverEvent
}

type serverEvent struct {
	kind string // "PowerOff" or "PXEBoot"
	at   time.Time
}

// newFixture creates perZone hosts in each zone (named <zone>-<i>), starts an Anvil manager
// and waits until every host is Available.
func newFixture(t *testing.T, perZone int) *fixture {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	bmcs, err := redfish.NewServer(redfish.ServerOptions{TLS: true})
	if err != nil {
		t.Fatal(err)
	}
	ns := &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{GenerateName: "e2e-"}}
	if err := env.Client.Create(ctx, ns); err != nil {
		t.Fatal(err)
	}
	f := &fixture{t: t, ctx: ctx, api: env, ns: ns.Name, bmcs: bmcs, serverEvents: map[string][]serverEvent{}}
	f.history = watchHosts(ctx, t, f.api, f.ns)
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("last controller log lines (all in %s):\n%s", logPath, logTail(30))
		}
		f.anvil.stop(t)
		f.purge()
		for _, c := range f.clusters {
			if err := workloads.RemoveCluster(c); err != nil {
				t.Errorf("removing workload cluster %s: %v", c, err)
			}
		}
		cancel()
		f.history.wait()
		_ = bmcs.Close()
		for _, addr := range f.listeners {
			if conn, err := net.DialTimeout("tcp", addr, time.Second); err == nil {
				_ = conn.Close()
				t.Errorf("%s still accepts connections after the test", addr)
			}
		}
	})

	f.create(&corev1.Secret{ObjectMeta: metav1.ObjectMeta{Name: "bmc-ca", Namespace: f.ns}, Data: map[string][]byte{"ca.crt": bmcs.CACertPEM()}})
	f.create(&corev1.Secret{ObjectMeta: metav1.ObjectMeta{Name: "bmc", Namespace: f.ns},
		Data: map[string][]byte{"username": []byte("admin"), "password": []byte("pw")}})
	index := 0
	for z, zone := range zones {
		for i := range perZone {
			index++
			name := fmt.Sprintf("%s-%d", zone, i)
			server := machine.New(machine.Config{})
			t.Cleanup(server.Subscribe(func(e machine.Event) {
				kind := ""
				switch {
				case e.Kind == machine.EventPowerOff:
					kind = "PowerOff"
				case e.Kind == machine.EventBoot && e.Boot.Target == machine.BootPxe:
					kind = "PXEBoot"
				default:
					return
				}
				f.mu.Lock()
				f.serverEvents[name] = append(f.serverEvents[name], serverEvent{kind: kind, at: time.Now()})
				f.mu.Unlock()
			}))
			b, err := bmcs.AddBMC(redfish.BMCOptions{Mockup: redfish.MockupLocalStorage, Username: "admin", Password: "pw",
				Identity: redfish.NewIdentity(index), Machine: server})
			if err != nil {
				t.Fatal(err)
			}
			f.hosts = append(f.hosts, name)
			f.listeners = append(f.listeners, b.Addr())
			f.create(&infrav1.AnvilHost{
				ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: f.ns, Labels: map[string]string{infrav1.DefaultFailureDomainLabel: zone}},
				Spec: infrav1.AnvilHostSpec{
					BMC: infrav1.BMC{Address: "redfish+https://" + b.Addr() + "/redfish/v1/Systems/1",
						CredentialsRef: infrav1.LocalSecretReference{Name: "bmc"}, CABundleRef: &infrav1.LocalSecretReference{Name: "bmc-ca"}},
					BootMACAddress: fmt.Sprintf("52:54:00:00:%02x:%02x", z, i),
					BootNetwork:    &infrav1.BootNetwork{Address: fmt.Sprintf("192.168.%d.%d/24", 10+z, 20+i)},
					Online:         true,
				},
			})
		}
	}
	f.anvil = startAnvil(t, f.api, nil)
	f.eventually("every host becomes Available", 2*time.Minute, func() (bool, string) {
		hosts := f.listHosts()
		for _, h := range hosts {
			if h.Status.State != infrav1.HostStateAvailable {
				return false, ""
			}
		}
		return len(hosts) == len(f.hosts), ""
	})
	return f
}

func (f *fixture) create(o client.Object) {
	f.t.Helper()
	if err := f.api.Client.Create(f.ctx, o); err != nil {
		f.t.Fatalf("creating %T %s: %v", o, o.GetName(), err)
	}
}

func (f *fixture) get(name string, o client.Object) error {
	return f.api.Client.Get(f.ctx, client.ObjectKey{Namespace: f.ns, Name: name}, o)
}

// update re-reads, mutates and writes o until the write does not conflict.
func (f *fixture) update(o client.Object, mutate func()) {
	f.t.Helper()
	for range 20 {
		if err := f.api.Client.Get(f.ctx, client.ObjectKeyFromObject(o), o); err != nil {
			f.t.Fatalf("reading %T %s: %v", o, o.GetName(), err)
		}
		mutate()
		err := f.api.Client.Update(f.ctx, o)
		if err == nil {
			return
		}
		if !apierrors.IsConflict(err) {
			f.t.Fatalf("updating %T %s: %v", o, o.GetName(), err)
		}
	}
	f.t.Fatalf("updating %T %s: conflicts did not stop", o, o.GetName())
}

func (f *fixture) listHosts() []infrav1.AnvilHost {
	f.t.Helper()
	hosts := &infrav1.AnvilHostList{}
	if err := f.api.Client.List(f.ctx, hosts, client.InNamespace(f.ns)); err != nil {
		f.t.Fatal(err)
	}
	return hosts.Items
}

func (f *fixture) listAnvilMachines() []infrav1.AnvilMachine {
	f.t.Helper()
	ams := &infrav1.AnvilMachineList{}
	if err := f.api.Client.List(f.ctx, ams, client.InNamespace(f.ns)); err != nil {
		f.t.Fatal(err)
	}
	return ams.Items
}

// eventually polls cond until it holds; on timeout it fails with cond's last explanation and
// the namespace's state.
func (f *fixture) eventually(what string, timeout time.Duration, cond func() (bool, string)) {
	f.t.Helper()
	start := time.Now()
	var why string
	for {
		var ok bool
		ok, why = cond()
		if ok {
			f.t.Logf("%s: %s", what, time.Since(start).Round(100*time.Millisecond))
			return
		}
		if time.Since(start) > timeout {
			break
		}
		time.Sleep(200 * time.Millisecond)
	}
	if why != "" {
		why = "\n" + why
	}
	f.t.Fatalf("not within %s: %s%s\n%s", timeout, what, why, f.describe())
}

// describe renders the namespace's hosts, machines and Cluster API objects for failure messages.
func (f *fixture) describe() string {
	var b strings.Builder
	b.WriteString("hosts:\n")
	for _, h := range f.listHosts() {
		claim := "-"
		if c := h.Spec.Claim; c != nil {
			claim = fmt.Sprintf("%s(uid %s, released %v)", c.MachineRef.Name, short(string(c.MachineRef.UID)), c.Released)
		}
		fmt.Fprintf(&b, "  %-10s %-6s %-15s claim=%s claimed-by=%s", h.Name, h.Labels[infrav1.DefaultFailureDomainLabel], h.Status.State,
			claim, short(h.Labels[controllers.ClaimedByLabel]))
		if e := h.Status.LastError; e != nil {
			fmt.Fprintf(&b, " lastError=%s: %s", e.Reason, e.Message)
		}
		b.WriteString("\n")
	}
	b.WriteString("anvil machines:\n")
	for _, am := range f.listAnvilMachines() {
		host := "-"
		if am.Status.HostRef != nil {
			host = am.Status.HostRef.Name
		}
		fmt.Fprintf(&b, "  %-28s uid=%s host=%s provisioned=%v deleting=%v %s\n", am.Name, short(string(am.UID)), host,
			am.Status.Initialization.Provisioned != nil && *am.Status.Initialization.Provisioned, !am.DeletionTimestamp.IsZero(),
			conditionSummary(am.Status.Conditions))
	}
	b.WriteString(describeCAPI(f))
	return b.String()
}

func short(uid string) string {
	if len(uid) > 8 {
		return uid[:8]
	}
	if uid == "" {
		return "-"
	}
	return uid
}

func conditionSummary(conds []metav1.Condition) string {
	var parts []string
	for _, c := range conds {
		if c.Status != metav1.ConditionTrue {
			parts = append(parts, fmt.Sprintf("%s=%s(%s: %s)", c.Type, c.Status, c.Reason, c.Message))
		}
	}
	if len(parts) == 0 {
		return "all conditions true"
	}
	return strings.Join(parts, " ")
}

// purge removes everything the test left, finalizers included, once no controller of ours
// runs: Cluster API's controllers keep running, so their objects go first.
func (f *fixture) purge() {
	for _, list := range purgeOrder() {
		if err := f.api.Client.List(context.Background(), list, client.InNamespace(f.ns)); err != nil {
			continue
		}
		items, _ := metaItems(list)
		for _, o := range items {
			_ = f.api.Client.Delete(context.Background(), o)
			if len(o.GetFinalizers()) > 0 {
				patch := client.MergeFrom(o.DeepCopyObject().(client.Object))
				o.SetFinalizers(nil)
				_ = f.api.Client.Patch(context.Background(), o, patch)
			}
		}
	}
	_ = f.api.Client.Delete(context.Background(), &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: f.ns}})
}

// serverEventsSince counts the host's server events of a kind ("PowerOff", "PXEBoot") after t.
func (f *fixture) serverEventsSince(host, kind string, t time.Time) int {
	f.mu.Lock()
	defer f.mu.Unlock()
	n := 0
	for _, e := range f.serverEvents[host] {
		if e.kind == kind && e.at.After(t) {
			n++
		}
	}
	return n
}

// hostSnapshot is what matters of a host at one resourceVersion.
type hostSnapshot struct {
	State     infrav1.HostState
	Machine   string // the claim's machine, "" without a claim
	UID       string
	Released  bool
	ClaimedBy string
	At        time.Time // when the watch delivered it
}

func (s hostSnapshot) same(o hostSnapshot) bool {
	s.At, o.At = time.Time{}, time.Time{}
	return s == o
}

func (s hostSnapshot) String() string {
	if s.Machine == "" {
		return string(s.State)
	}
	r := ""
	if s.Released {
		r = ",released"
	}
	return fmt.Sprintf("%s[%s%s]", s.State, s.Machine, r)
}

// hostHistory records every distinct snapshot of every host, from a watch on the namespace.
type hostHistory struct {
	mu      sync.Mutex
	byHost  map[string][]hostSnapshot
	changes chan string // the name of each host whose snapshot changed (dropped when full)
	done    chan struct{}
}

func watchHosts(ctx context.Context, t *testing.T, api *mgmtplane.Environment, ns string) *hostHistory {
	t.Helper()
	wc, err := client.NewWithWatch(api.Config, client.Options{Scheme: api.Scheme})
	if err != nil {
		t.Fatal(err)
	}
	h := &hostHistory{byHost: map[string][]hostSnapshot{}, changes: make(chan string, 1000), done: make(chan struct{})}
	w, err := wc.Watch(ctx, &infrav1.AnvilHostList{}, client.InNamespace(ns))
	if err != nil {
		t.Fatal(err)
	}
	go func() {
		defer close(h.done)
		rv := ""
		for {
			for ev := range w.ResultChan() {
				host, ok := ev.Object.(*infrav1.AnvilHost)
				if !ok || ev.Type == watch.Error {
					continue
				}
				rv = host.ResourceVersion
				if ev.Type != watch.Deleted {
					h.record(host)
				}
			}
			if ctx.Err() != nil {
				return
			}
			// The server ended the watch (they time out): resume where it stopped.
			w, err = wc.Watch(ctx, &infrav1.AnvilHostList{}, client.InNamespace(ns), &client.ListOptions{Raw: &metav1.ListOptions{ResourceVersion: rv}})
			if err != nil {
				if ctx.Err() != nil {
					return
				}
				time.Sleep(100 * time.Millisecond)
				w, err = wc.Watch(ctx, &infrav1.AnvilHostList{}, client.InNamespace(ns))
				if err != nil {
					return
				}
			}
		}
	}()
	return h
}

func (h *hostHistory) record(host *infrav1.AnvilHost) {
	s := hostSnapshot{State: host.Status.State, ClaimedBy: host.Labels[controllers.ClaimedByLabel], At: time.Now()}
	if c := host.Spec.Claim; c != nil {
		s.Machine, s.UID, s.Released = c.MachineRef.Name, string(c.MachineRef.UID), c.Released
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	seq := h.byHost[host.Name]
	if len(seq) > 0 && seq[len(seq)-1].same(s) {
		return
	}
	h.byHost[host.Name] = append(seq, s)
	select {
	case h.changes <- host.Name:
	default:
	}
}

// of returns the snapshots of one host, oldest first.
func (h *hostHistory) of(host string) []hostSnapshot {
	h.mu.Lock()
	defer h.mu.Unlock()
	return append([]hostSnapshot(nil), h.byHost[host]...)
}

func (h *hostHistory) wait() { <-h.done }

// render shows every host's history, one line each.
func (h *hostHistory) render() string {
	h.mu.Lock()
	defer h.mu.Unlock()
	names := make([]string, 0, len(h.byHost))
	for n := range h.byHost {
		names = append(names, n)
	}
	sort.Strings(names)
	var b strings.Builder
	for _, n := range names {
		parts := make([]string, 0, len(h.byHost[n]))
		for _, s := range h.byHost[n] {
			parts = append(parts, s.String())
		}
		fmt.Fprintf(&b, "  %s: %s\n", n, strings.Join(parts, " → "))
	}
	return b.String()
}
