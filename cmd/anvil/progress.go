package main

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"sort"
	"strings"
	"sync"
	"text/tabwriter"
	"time"

	corev1 "k8s.io/api/core/v1"
	clusterv1 "sigs.k8s.io/cluster-api/api/core/v1beta2"
	"sigs.k8s.io/controller-runtime/pkg/client"

	infrav1 "github.com/anvil-metal/cluster-api-provider-anvil/api/v1alpha1"
	"github.com/anvil-metal/cluster-api-provider-anvil/internal/hoststate"
	"github.com/anvil-metal/cluster-api-provider-anvil/internal/workload"
)

// console is the lab's output. On a terminal it keeps a table of hosts and machines at the
// bottom, redrawn in place, with the lab's messages scrolling above it; elsewhere (a log, a
// test) it prints each change of a host or machine as a line instead.
type console struct {
	out  io.Writer
	live bool
	t0   time.Time

	mu    sync.Mutex
	shown int               // lines of the table now on screen (live mode)
	table string            // the table as last rendered
	last  map[string]string // per row key, the state last printed (line mode)
	// done stops the table for good (the lab's closing output follows).
	done bool
}

func newConsole(out io.Writer, live bool) *console {
	return &console{out: out, live: live, t0: time.Now(), last: map[string]string{}}
}

// Write prints lab messages above the live table.
func (c *console) Write(p []byte) (int, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.erase()
	n, err := c.out.Write(p)
	c.draw()
	return n, err
}

func (c *console) erase() {
	if c.live && c.shown > 0 {
		fmt.Fprintf(c.out, "\033[%dA\033[J", c.shown)
		c.shown = 0
	}
}

func (c *console) draw() {
	if c.live && c.table != "" {
		_, _ = io.WriteString(c.out, c.table)
		c.shown = strings.Count(c.table, "\n")
	}
}

// hideTable takes the live table off the screen for good (before the closing output).
func (c *console) hideTable() {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.erase()
	c.table, c.done = "", true
}

// snapshot is what the table shows at one moment.
type snapshot struct {
	hosts    []infrav1.AnvilHost
	machines []clusterv1.Machine
	nodes    map[string]corev1.Node // by name
}

// follow polls the namespace until ctx ends and updates the table (or prints changes).
func (c *console) follow(ctx context.Context, cl client.Client, ns string, workloads *workload.Server, cluster client.ObjectKey, bmcKind map[string]string) {
	tick := time.NewTicker(500 * time.Millisecond)
	defer tick.Stop()
	for {
		s := snapshot{nodes: map[string]corev1.Node{}}
		hosts := &infrav1.AnvilHostList{}
		machines := &clusterv1.MachineList{}
		if cl.List(ctx, hosts, client.InNamespace(ns)) == nil && cl.List(ctx, machines, client.InNamespace(ns)) == nil {
			s.hosts, s.machines = hosts.Items, machines.Items
			if nodes, err := workloads.Nodes(ctx, cluster); err == nil {
				for _, n := range nodes {
					s.nodes[n.Name] = n
				}
			}
			c.update(s, bmcKind)
		}
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		}
	}
}

func (c *console) update(s snapshot, bmcKind map[string]string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.done {
		return
	}
	if !c.live {
		c.printChanges(s)
		return
	}
	table := renderTables(s, bmcKind)
	if table == c.table {
		return
	}
	c.erase()
	c.table = table
	c.draw()
}

// printChanges prints one line per host or machine whose state changed since the last poll.
func (c *console) printChanges(s snapshot) {
	at := "+" + round(time.Since(c.t0)).String()
	for _, h := range s.hosts {
		state := string(h.Status.State)
		if h.Spec.Claim != nil && !h.Spec.Claim.Released && h.Status.State != infrav1.HostStateAvailable {
			state += " for " + h.Spec.Claim.MachineRef.Name
		}
		if h.Spec.Maintenance != nil {
			state += " (" + h.Spec.Maintenance.Reason + ")"
		}
		c.printIfChanged("host "+h.Name, state, at)
	}
	for _, m := range s.machines {
		state := m.Status.Phase
		if node, ok := s.nodes[m.Status.NodeRef.Name]; ok && m.Status.NodeRef.IsDefined() {
			state += ", node " + node.Name + " " + nodeReady(node)
		}
		c.printIfChanged("machine "+m.Name, state, at)
	}
}

func (c *console) printIfChanged(key, state, at string) {
	if c.last[key] == state || state == "" {
		return
	}
	c.last[key] = state
	fmt.Fprintf(c.out, "    %8s  %-34s %s\n", at, key, state)
}

// renderTables renders the hosts and machines as two tables.
func renderTables(s snapshot, bmcKind map[string]string) string {
	var b bytes.Buffer
	tw := tabwriter.NewWriter(&b, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "  HOST\tBMC\tZONE\tSTATE\tPOWER\tMACHINE\tSLOT\tCORES\tMEM")
	sort.Slice(s.hosts, func(i, j int) bool { return hostIndex(s.hosts[i].Name) < hostIndex(s.hosts[j].Name) })
	for _, h := range s.hosts {
		machine, slot := "-", "-"
		if h.Spec.Claim != nil {
			machine = h.Spec.Claim.MachineRef.Name
			if h.Spec.Claim.Released {
				machine += " (released)"
			}
		}
		if bs := h.Status.BootSlots; bs != nil && bs.Active != "" {
			slot = string(bs.Active)
		}
		state := string(h.Status.State)
		if h.Spec.Maintenance != nil && h.Status.State == infrav1.HostStateMaintenance {
			state += ": " + h.Spec.Maintenance.Reason
		}
		fmt.Fprintf(tw, "  %s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n", h.Name, bmcKind[h.Name], h.Labels[infrav1.DefaultFailureDomainLabel],
			state, orDash(string(h.Status.Power)), machine, slot, orDash(h.Labels[hoststate.LabelCPUCores]), orDash(h.Labels[hoststate.LabelMemoryGiB]))
	}
	_ = tw.Flush()
	if len(s.machines) > 0 {
		b.WriteString("\n")
		tw = tabwriter.NewWriter(&b, 0, 4, 2, ' ', 0)
		fmt.Fprintln(tw, "  MACHINE\tROLE\tZONE\tPHASE\tPROVIDER ID\tNODE")
		sort.Slice(s.machines, func(i, j int) bool { return s.machines[i].Name < s.machines[j].Name })
		for _, m := range s.machines {
			role := "worker"
			if _, ok := m.Labels[clusterv1.MachineControlPlaneLabel]; ok {
				role = "control-plane"
			}
			node := "-"
			if n, ok := s.nodes[m.Status.NodeRef.Name]; ok && m.Status.NodeRef.IsDefined() {
				node = n.Name + " " + nodeReady(n)
			}
			fmt.Fprintf(tw, "  %s\t%s\t%s\t%s\t%s\t%s\n", m.Name, role, orDash(m.Spec.FailureDomain), m.Status.Phase, orDash(m.Spec.ProviderID), node)
		}
		_ = tw.Flush()
	}
	return b.String()
}

func nodeReady(n corev1.Node) string {
	for _, cond := range n.Status.Conditions {
		if cond.Type == corev1.NodeReady {
			if cond.Status == corev1.ConditionTrue {
				return "Ready"
			}
			return "NotReady"
		}
	}
	return "Unknown"
}

func orDash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}

// hostIndex orders lab-server-2 before lab-server-10.
func hostIndex(name string) int {
	var i int
	if _, err := fmt.Sscanf(name, "lab-server-%d", &i); err != nil {
		return 1 << 30
	}
	return i
}
