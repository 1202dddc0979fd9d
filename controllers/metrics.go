package controllers

import (
	"context"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"sigs.k8s.io/controller-runtime/pkg/client"

	infrav1 "github.com/anvil-metal/cluster-api-provider-anvil/api/v1alpha1"
)

// HostStateCollector exports anvil_hosts{state} from the informer cache at scrape time, so
// counting hosts costs nothing between scrapes and can never drift from the objects.
type HostStateCollector struct {
	Reader client.Reader
	desc   *prometheus.Desc
}

// NewHostStateCollector returns a collector reading hosts through reader (the manager's cache).
func NewHostStateCollector(reader client.Reader) *HostStateCollector {
	return &HostStateCollector{Reader: reader, desc: prometheus.NewDesc("anvil_hosts", "AnvilHosts by lifecycle state.", []string{"state"}, nil)}
}

// Describe implements prometheus.Collector.
func (c *HostStateCollector) Describe(ch chan<- *prometheus.Desc) { ch <- c.desc }

// Collect implements prometheus.Collector.
func (c *HostStateCollector) Collect(ch chan<- prometheus.Metric) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	hosts := &infrav1.AnvilHostList{}
	if err := c.Reader.List(ctx, hosts); err != nil {
		return
	}
	counts := map[infrav1.HostState]int{}
	for _, h := range hosts.Items {
		state := h.Status.State
		if state == "" {
			state = infrav1.HostStateRegistering
		}
		counts[state]++
	}
	for _, s := range []infrav1.HostState{infrav1.HostStateRegistering, infrav1.HostStateInspecting, infrav1.HostStateAvailable,
		infrav1.HostStateProvisioning, infrav1.HostStateProvisioned, infrav1.HostStateDeprovisioning,
		infrav1.HostStateMaintenance, infrav1.HostStateRetiring, infrav1.HostStateRetired} {
		ch <- prometheus.MustNewConstMetric(c.desc, prometheus.GaugeValue, float64(counts[s]), string(s))
	}
}
