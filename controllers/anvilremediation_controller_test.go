package controllers

import (
	"context"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	clusterv1 "sigs.k8s.io/cluster-api/api/core/v1beta2"
	"sigs.k8s.io/cluster-api/util/conditions"
	"sigs.k8s.io/controller-runtime/pkg/client"

	infrav1 "github.com/anvil-metal/cluster-api-provider-anvil/api/v1alpha1"
	"github.com/anvil-metal/cluster-api-provider-anvil/internal/vbmc/machine"
)

// remediate creates what a MachineHealthCheck would: an AnvilRemediation named after the
// Machine and owned by it.
func (f *capiFixture) remediate(machineName string, retries int32, timeout time.Duration) *infrav1.AnvilRemediation {
	f.t.Helper()
	m := &clusterv1.Machine{}
	if err := env.Client.Get(context.Background(), client.ObjectKey{Namespace: f.ns, Name: machineName}, m); err != nil {
		f.t.Fatal(err)
	}
	rem := &infrav1.AnvilRemediation{ObjectMeta: metav1.ObjectMeta{Name: machineName, Namespace: f.ns,
		OwnerReferences: []metav1.OwnerReference{ownerRef(m, "Machine")}},
		Spec: infrav1.AnvilRemediationSpec{RetryLimit: retries, Timeout: &metav1.Duration{Duration: timeout}}}
	f.create(rem)
	return rem
}

func (f *capiFixture) countBoots(host string) *atomic.Int32 {
	var boots atomic.Int32
	unsubscribe := f.bmcs[host].Machine().Subscribe(func(e machine.Event) {
		if e.Kind == machine.EventBoot {
			boots.Add(1)
		}
	})
	f.t.Cleanup(unsubscribe)
	return &boots
}

func TestRemediationPowerCyclesThenHandsBack(t *testing.T) {
	f := newCAPIFixture(t, "zone-a")
	f.waitMachine(f.machine("w-0", "").Name, "was provisioned", provisioned)
	boots := f.countBoots("host-0")

	rem := f.remediate("w-0", 2, time.Second)
	deadline := time.Now().Add(waitTimeout)
	for time.Now().Before(deadline) {
		if err := env.Client.Get(context.Background(), client.ObjectKeyFromObject(rem), rem); err == nil && rem.Status.Phase == infrav1.RemediationFailed {
			break
		}
		time.Sleep(200 * time.Millisecond)
	}
	if rem.Status.Phase != infrav1.RemediationFailed || rem.Status.RetryCount != 2 {
		t.Fatalf("remediation %+v, want Failed after 2 power cycles", rem.Status)
	}
	if n := boots.Load(); n < 2 {
		t.Errorf("the server booted %d times, want a boot per power cycle", n)
	}
	h := f.waitFor("host-0", "went to repair", func(h *infrav1.AnvilHost) bool { return h.Spec.Maintenance != nil })
	if !strings.Contains(h.Spec.Maintenance.Reason, "needs repair") {
		t.Errorf("maintenance reason %q", h.Spec.Maintenance.Reason)
	}
	m := &clusterv1.Machine{}
	if err := env.Client.Get(context.Background(), client.ObjectKey{Namespace: f.ns, Name: "w-0"}, m); err != nil {
		t.Fatal(err)
	}
	if c := conditions.Get(m, clusterv1.MachineOwnerRemediatedCondition); c == nil || c.Status != metav1.ConditionFalse {
		t.Errorf("Machine OwnerRemediated condition %+v, want False so its owner replaces it", c)
	}
}

func TestRemediationStopsWhenTheNodeRecovers(t *testing.T) {
	f := newCAPIFixture(t, "zone-a")
	f.waitMachine(f.machine("w-0", "").Name, "was provisioned", provisioned)
	boots := f.countBoots("host-0")

	rem := f.remediate("w-0", 3, time.Minute)
	deadline := time.Now().Add(waitTimeout)
	for time.Now().Before(deadline) && boots.Load() == 0 {
		time.Sleep(100 * time.Millisecond)
	}
	if boots.Load() == 0 {
		t.Fatal("no power cycle")
	}
	// The MachineHealthCheck deletes the remediation once the node is healthy again.
	if err := env.Client.Delete(context.Background(), rem); err != nil {
		t.Fatal(err)
	}
	time.Sleep(2 * time.Second)
	h := f.waitFor("host-0", "stayed provisioned", func(h *infrav1.AnvilHost) bool { return true })
	if h.Spec.Maintenance != nil || h.Status.State != infrav1.HostStateProvisioned {
		t.Errorf("a recovered machine's host: maintenance %+v, state %s", h.Spec.Maintenance, h.Status.State)
	}
	if n := boots.Load(); n != 1 {
		t.Errorf("%d power cycles, want exactly 1", n)
	}
}
