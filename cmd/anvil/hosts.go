package main

import (
	"context"
	"fmt"
	"io"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/rest"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/controller"
	metricsserver "sigs.k8s.io/controller-runtime/pkg/metrics/server"

	infrav1 "github.com/anvil-metal/cluster-api-provider-anvil/api/v1alpha1"
	"github.com/anvil-metal/cluster-api-provider-anvil/controllers"
	"github.com/anvil-metal/cluster-api-provider-anvil/internal/bmc"
	"github.com/anvil-metal/cluster-api-provider-anvil/internal/hoststate"
	"github.com/anvil-metal/cluster-api-provider-anvil/internal/mgmtplane"
	"github.com/anvil-metal/cluster-api-provider-anvil/internal/vbmc/redfish"
)

// demoHosts runs the AnvilHost controller against emulated Redfish BMCs (one per DMTF
// mockup) and walks them through onboarding, maintenance and retirement.
func demoHosts(ctx context.Context, env *mgmtplane.Environment, out io.Writer, step *stepper) error {
	server, err := redfish.NewServer(redfish.ServerOptions{TLS: true})
	if err != nil {
		return err
	}
	defer func() { _ = server.Close() }()

	step.start("start the Anvil manager (AnvilHost controller, BMC pool)")
	mgrCtx, stopMgr := context.WithCancel(ctx)
	defer stopMgr()
	if err := startManager(mgrCtx, env); err != nil {
		return err
	}
	step.done()

	step.start("rack three emulated servers (Redfish over TLS, DMTF mockups) and register their BMCs")
	c := env.Client
	if err := c.Create(ctx, &corev1.Secret{ObjectMeta: metav1.ObjectMeta{Name: "lab-bmc-ca", Namespace: demoNamespace},
		Data: map[string][]byte{"ca.crt": server.CACertPEM()}}); err != nil {
		return err
	}
	var names []string
	for i, mockup := range redfish.Mockups() {
		b, err := server.AddBMC(redfish.BMCOptions{Mockup: mockup, Username: "admin", Password: fmt.Sprintf("lab-pw-%d", i),
			Identity: redfish.NewIdentity(i + 1), Hardware: redfish.Hardware{Processors: 1 + i, MemoryGiB: 128 << i}})
		if err != nil {
			return err
		}
		name := fmt.Sprintf("lab-server-%d", i+1)
		names = append(names, name)
		if err := c.Create(ctx, &corev1.Secret{ObjectMeta: metav1.ObjectMeta{Name: name + "-bmc", Namespace: demoNamespace},
			Data: map[string][]byte{"username": []byte("admin"), "password": []byte(fmt.Sprintf("lab-pw-%d", i))}}); err != nil {
			return err
		}
		host := &infrav1.AnvilHost{ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: demoNamespace,
			Labels: map[string]string{infrav1.DefaultFailureDomainLabel: fmt.Sprintf("zone-%c", 'a'+i)}},
			Spec: infrav1.AnvilHostSpec{
				BMC: infrav1.BMC{Address: "redfish+https://" + b.Addr() + "/redfish/v1/Systems/1",
					CredentialsRef: infrav1.LocalSecretReference{Name: name + "-bmc"},
					CABundleRef:    &infrav1.LocalSecretReference{Name: "lab-bmc-ca"}},
				BootMACAddress: fmt.Sprintf("52:54:00:1a:b0:%02x", i+1),
				Online:         true,
			}}
		if err := c.Create(ctx, host); err != nil {
			return err
		}
	}
	step.done()

	step.start("onboard: check each BMC, power on, inspect, label")
	if err := waitHosts(ctx, c, names, infrav1.HostStateAvailable); err != nil {
		return err
	}
	step.done()
	if err := showHosts(ctx, env.Config, out); err != nil {
		return err
	}

	step.start("put lab-server-2 in maintenance (\"needs repair: PSU 2\"), then clear it: re-inspected")
	if err := mutateHost(ctx, c, names[1], func(h *infrav1.AnvilHost) { h.Spec.Maintenance = &infrav1.Maintenance{Reason: "needs repair: PSU 2"} }); err != nil {
		return err
	}
	if err := waitHosts(ctx, c, names[1:2], infrav1.HostStateMaintenance); err != nil {
		return err
	}
	if err := mutateHost(ctx, c, names[1], func(h *infrav1.AnvilHost) { h.Spec.Maintenance = nil }); err != nil {
		return err
	}
	if err := waitHosts(ctx, c, names[1:2], infrav1.HostStateAvailable); err != nil {
		return err
	}
	step.done()

	step.start("retire lab-server-3: wiped (simulated until the agent lands), powered off, scrapped")
	if err := mutateHost(ctx, c, names[2], func(h *infrav1.AnvilHost) { h.Spec.Retire = true }); err != nil {
		return err
	}
	if err := waitHosts(ctx, c, names[2:3], infrav1.HostStateRetired); err != nil {
		return err
	}
	step.done()
	return showHosts(ctx, env.Config, out)
}

func startManager(ctx context.Context, env *mgmtplane.Environment) error {
	mgr, err := ctrl.NewManager(env.Config, ctrl.Options{Scheme: env.Scheme, Metrics: metricsserver.Options{BindAddress: "0"}})
	if err != nil {
		return err
	}
	pool := bmc.NewPool(bmc.PoolOptions{CallTimeout: 10 * time.Second})
	if err := mgr.Add(pool); err != nil {
		return err
	}
	r := &controllers.AnvilHostReconciler{Client: mgr.GetClient(), Recorder: mgr.GetEventRecorder("anvilhost-controller"), Pool: pool,
		StateMachine: &hoststate.Machine{BMC: pool, Provisioner: hoststate.Simulated{}, PowerSyncInterval: 10 * time.Second}}
	if err := r.SetupWithManager(ctx, mgr, controller.Options{MaxConcurrentReconciles: 10}); err != nil {
		return err
	}
	go func() { _ = mgr.Start(ctx) }()
	return nil
}

func mutateHost(ctx context.Context, c client.Client, name string, mutate func(*infrav1.AnvilHost)) error {
	for range 20 {
		h := &infrav1.AnvilHost{}
		if err := c.Get(ctx, client.ObjectKey{Namespace: demoNamespace, Name: name}, h); err != nil {
			return err
		}
		mutate(h)
		if err := c.Update(ctx, h); err == nil {
			return nil
		}
		time.Sleep(100 * time.Millisecond)
	}
	return fmt.Errorf("could not update host %s", name)
}

func waitHosts(ctx context.Context, c client.Client, names []string, state infrav1.HostState) error {
	deadline := time.Now().Add(90 * time.Second)
	for {
		pending := ""
		for _, n := range names {
			h := &infrav1.AnvilHost{}
			if err := c.Get(ctx, client.ObjectKey{Namespace: demoNamespace, Name: n}, h); err != nil || h.Status.State != state {
				pending = n
				if err == nil && h.Status.LastError != nil {
					pending += " (" + h.Status.LastError.Reason + ": " + h.Status.LastError.Message + ")"
				}
				break
			}
		}
		if pending == "" {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("host %s did not reach %s", pending, state)
		}
		time.Sleep(200 * time.Millisecond)
	}
}

func showHosts(ctx context.Context, cfg *rest.Config, out io.Writer) error {
	fmt.Fprintln(out, "\n$ kubectl get anvilhosts -n "+demoNamespace+" -L "+hoststate.LabelCPUCores+","+hoststate.LabelMemoryGiB+","+infrav1.DefaultFailureDomainLabel)
	return printTable(ctx, cfg, out, "anvilhosts", hoststate.LabelCPUCores, hoststate.LabelMemoryGiB, infrav1.DefaultFailureDomainLabel)
}
