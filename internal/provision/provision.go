// Package provision is the real provisioning backend: it network-boots a host into the Anvil
// agent and hands the agent its tasks (install, wipe, reboot, power off; an inspection is a
// boot whose only task is power off, the inventory coming with registration). It implements
//   - hoststate.Provisioner, which the host controller calls;
//   - agentapi.Backend, which the agent API server calls for an authenticated agent;
//   - httpboot.Hosts, which decides what iPXE script a booting MAC gets.
//
// Attempts live in memory. Losing them (a restart) costs one retry: the host stays in
// Provisioning or Deprovisioning, the next reconcile starts a new attempt with a new token,
// and the old agent's token stops working.
package provision

import (
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"net"
	"strings"
	"sync"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"sigs.k8s.io/controller-runtime/pkg/client"

	infrav1 "github.com/anvil-metal/cluster-api-provider-anvil/api/v1alpha1"
	"github.com/anvil-metal/cluster-api-provider-anvil/internal/bmc"
	"github.com/anvil-metal/cluster-api-provider-anvil/internal/boot/agentapi"
	"github.com/anvil-metal/cluster-api-provider-anvil/internal/boot/httpboot"
	"github.com/anvil-metal/cluster-api-provider-anvil/internal/hoststate"
)

// Options configure the backend.
type Options struct {
	// Secrets reads bootstrap data Secrets (the manager's client).
	Secrets client.Reader
	// ImageURL maps an image to the URL the agent downloads it from (the image cache); nil
	// hands out the upstream URL.
	ImageURL func(infrav1.Image) (string, error)
	// Notify wakes the host controller for a host when its agent reports.
	Notify func(types.NamespacedName)
	// OnBoot and OnBootDone tell the DHCP server which MACs Anvil is network-booting (it
	// answers no others).
	OnBoot     func(mac net.HardwareAddr, h *infrav1.AnvilHost)
	OnBootDone func(mac net.HardwareAddr)
	// BootTimeout is how long to wait for the agent to register before trying a new boot
	// (default 15 minutes: real servers take 5–15 minutes to reach the network).
	BootTimeout time.Duration
	// TaskTimeout bounds one task after registration (default 2 hours: a full wipe of a large
	// disk is slow).
	TaskTimeout time.Duration
	Now         func() time.Time
}

// Backend is the agent-driven provisioner.
type Backend struct {
	opts Options

	// mu guards attempts and byMAC only: one small map per boot service, never held during
	// BMC or API calls.
	mu       sync.Mutex
	attempts map[types.NamespacedName]*attempt
	byMAC    map[string]types.NamespacedName
	// reports are the installed OSes' latest boot reports (see agentapi.BootReport).
	reports map[types.NamespacedName]hoststate.BootReport
}

type purpose string

const (
	purposeInstall purpose = "install"
	purposeWipe    purpose = "wipe"
	// purposeInspect boots the agent only for the inventory its registration carries.
	purposeInspect purpose = "inspect"
)

// attempt is one network boot of one host, with the tasks its agent is to run.
type attempt struct {
	id        string
	purpose   purpose
	hostState infrav1.HostState
	mac       string
	bootMode  infrav1.BootMode
	started   time.Time
	// bootstrapSecret names the claim's bootstrap data Secret (install only).
	bootstrapSecret string

	registered   bool
	registeredAt time.Time
	inventory    *infrav1.HardwareInventory
	tasks        []agentapi.Task
	next         int // index of the task the agent is working on
	progress     string
	lastResult   *agentapi.Result
	// installedSlot is the slot the install task wrote ("" for whole-disk images), and
	// installedAt when it said so: before the reboot, so before any boot report of the new
	// slot (the host controller may record the install only after that report arrived).
	installedSlot infrav1.Slot
	installedAt   time.Time
	err           error
}

func (a *attempt) done() bool { return a.err == nil && a.next >= len(a.tasks) }

// New returns a backend.
func New(opts Options) *Backend {
	if opts.BootTimeout <= 0 {
		opts.BootTimeout = 15 * time.Minute
	}
	if opts.TaskTimeout <= 0 {
		opts.TaskTimeout = 2 * time.Hour
	}
	if opts.Now == nil {
		opts.Now = time.Now
	}
	return &Backend{opts: opts, attempts: map[types.NamespacedName]*attempt{}, byMAC: map[string]types.NamespacedName{},
		reports: map[types.NamespacedName]hoststate.BootReport{}}
}

var _ hoststate.Provisioner = (*Backend)(nil)
var _ agentapi.Backend = (*Backend)(nil)
var _ httpboot.Hosts = (*Backend)(nil)
var _ agentapi.BootReporter = (*Backend)(nil)
var _ hoststate.BootReportSource = (*Backend)(nil)

// Provision installs the claim's image through the agent.
func (b *Backend) Provision(ctx context.Context, h *infrav1.AnvilHost, run hoststate.BMCRunner) (hoststate.Outcome, error) {
	claim := h.Spec.Claim
	if claim == nil || claim.Image == nil {
		return hoststate.Outcome{}, errors.New("the claim has no image")
	}
	if claim.BootstrapDataSecretRef == nil {
		return hoststate.Outcome{}, errors.New("the claim has no bootstrap data Secret")
	}
	return b.advance(h, purposeInstall, run, func(id string) ([]agentapi.Task, error) {
		url, err := b.imageURL(*claim.Image)
		if err != nil {
			return nil, err
		}
		install := agentapi.Task{ID: id + "-install", Kind: agentapi.TaskInstall, RootDeviceHints: h.Spec.RootDeviceHints,
			Image:       &agentapi.Image{URL: url, Checksum: claim.Image.Checksum, Format: claim.Image.Format, Layout: claim.Image.Layout},
			ConfigDrive: &agentapi.ConfigDrive{MetaData: agentapi.MetaData{InstanceID: instanceID(h), LocalHostname: h.Name, ProviderID: claim.ProviderID}}}
		return []agentapi.Task{install, {ID: id + "-reboot", Kind: agentapi.TaskReboot}}, nil
	})
}

// instanceID is the cloud-init instance-id of the claim's installs. It stays the same for an
// in-place upgrade, so cloud-init (whose state an A/B image keeps on DATA) does not run the
// bootstrap (kubeadm join) a second time, and changes with every new claim. It is derived from
// what survives clusterctl move (the machine's name and the providerID), not the machine's UID.
func instanceID(h *infrav1.AnvilHost) string {
	sum := sha256.Sum256([]byte(h.Spec.Claim.MachineRef.Name + "\x00" + h.Spec.Claim.ProviderID))
	return h.Name + "-" + hex.EncodeToString(sum[:6])
}

// Deprovision wipes through the agent and powers off. With wipe policy "disabled" no agent is
// booted: the host is only powered off.
func (b *Backend) Deprovision(ctx context.Context, h *infrav1.AnvilHost, policy infrav1.WipePolicy, run hoststate.BMCRunner) (hoststate.Outcome, error) {
	b.mu.Lock()
	delete(b.reports, types.NamespacedName{Namespace: h.Namespace, Name: h.Name}) // the OS that reported is going away
	b.mu.Unlock()
	if policy == infrav1.WipePolicyDisabled {
		err := run("power-off", func(ctx context.Context, c bmc.Client) error { return c.SetPower(ctx, bmc.PowerActionOff) })
		return hoststate.Outcome{Done: err == nil}, err
	}
	return b.advance(h, purposeWipe, run, func(id string) ([]agentapi.Task, error) {
		return []agentapi.Task{{ID: id + "-wipe", Kind: agentapi.TaskWipe, WipePolicy: policy}, {ID: id + "-poweroff", Kind: agentapi.TaskPowerOff}}, nil
	})
}

// Inspect network-boots the agent for its inventory alone: registration carries it (and a
// finished attempt writes it into status as the InBand inventory), so the agent's one task is
// to power the server off. Nothing is written to any disk.
func (b *Backend) Inspect(ctx context.Context, h *infrav1.AnvilHost, run hoststate.BMCRunner) (hoststate.Outcome, error) {
	return b.advance(h, purposeInspect, run, func(id string) ([]agentapi.Task, error) {
		return []agentapi.Task{{ID: id + "-poweroff", Kind: agentapi.TaskPowerOff}}, nil
	})
}

// advance starts an attempt if none runs and reports on the one that does.
func (b *Backend) advance(h *infrav1.AnvilHost, p purpose, run hoststate.BMCRunner, tasks func(id string) ([]agentapi.Task, error)) (hoststate.Outcome, error) {
	key := types.NamespacedName{Namespace: h.Namespace, Name: h.Name}
	now := b.opts.Now()

	b.mu.Lock()
	a := b.attempts[key]
	if a != nil && (a.purpose != p || a.hostState != h.Status.State) {
		b.dropLocked(key) // the host moved on (e.g. released while installing)
		a = nil
	}
	var outcome hoststate.Outcome
	var failure error
	switch {
	case a == nil:
	case a.err != nil:
		failure = a.err
		b.dropLocked(key)
		a = nil
	case a.done():
		b.applyLocked(h, a)
		b.dropLocked(key)
		b.mu.Unlock()
		return hoststate.Outcome{Done: true}, nil
	case !a.registered && now.Sub(a.started) > b.opts.BootTimeout:
		failure = fmt.Errorf("the agent did not register within %s of the network boot: check that the host PXE-boots on the provisioning network (DHCP %s mode) and reaches the boot services",
			b.opts.BootTimeout, "proxy/reservation")
		b.dropLocked(key)
		a = nil
	case a.registered && now.Sub(a.registeredAt) > b.opts.TaskTimeout:
		failure = fmt.Errorf("the agent registered but did not finish within %s (last progress: %s)", b.opts.TaskTimeout, a.progress)
		b.dropLocked(key)
		a = nil
	default:
		outcome = hoststate.Outcome{RequeueAfter: 5 * time.Second, Message: a.describe()}
	}
	b.mu.Unlock()
	if failure != nil {
		return hoststate.Outcome{}, failure
	}
	if a != nil {
		return outcome, nil
	}

	// Start a new attempt: a fresh id (and so a fresh token), tasks, then the network boot.
	id := newAttemptID()
	list, err := tasks(id)
	if err != nil {
		return hoststate.Outcome{}, err
	}
	mac, err := net.ParseMAC(h.Spec.BootMACAddress)
	if err != nil {
		return hoststate.Outcome{}, fmt.Errorf("spec.bootMACAddress: %w", err)
	}
	na := &attempt{id: id, purpose: p, hostState: h.Status.State, mac: mac.String(), bootMode: h.Spec.BootMode, started: now, tasks: list}
	if p == purposeInstall {
		na.bootstrapSecret = h.Spec.Claim.BootstrapDataSecretRef.Name
	}
	b.mu.Lock()
	b.attempts[key] = na
	b.byMAC[na.mac] = key
	b.mu.Unlock()
	if b.opts.OnBoot != nil {
		b.opts.OnBoot(mac, h)
	}

	err = run("network-boot", func(ctx context.Context, c bmc.Client) error {
		if err := c.SetBootDevice(ctx, bmc.BootPXE, bmc.BootOptions{UEFI: h.Spec.BootMode != infrav1.BootModeLegacy}); err != nil {
			return err
		}
		return hoststate.PowerCycleOrOn(ctx, c)
	})
	if err != nil {
		b.mu.Lock()
		b.dropLocked(key)
		b.mu.Unlock()
		return hoststate.Outcome{}, err
	}
	return hoststate.Outcome{RequeueAfter: 5 * time.Second, Message: fmt.Sprintf("network-booting the agent (attempt %s)", id)}, nil
}

// applyLocked copies a finished attempt's findings into the host's status.
func (b *Backend) applyLocked(h *infrav1.AnvilHost, a *attempt) {
	if a.inventory != nil {
		inv := a.inventory.DeepCopy()
		inv.Source = "InBand"
		if inv.InspectedAt == nil {
			t := metav1.NewTime(b.opts.Now().UTC().Truncate(time.Second))
			inv.InspectedAt = &t
		}
		h.Status.Hardware = inv
		hoststate.ApplyHardwareLabels(h)
	}
	if a.purpose != purposeInstall || h.Spec.Claim == nil || h.Spec.Claim.Image == nil {
		return
	}
	installed := a.installedAt
	if installed.IsZero() {
		installed = b.opts.Now()
	}
	now := metav1.NewTime(installed.UTC().Truncate(time.Second))
	content := &infrav1.SlotContent{ImageURL: h.Spec.Claim.Image.URL, Checksum: h.Spec.Claim.Image.Checksum, InstalledAt: &now}
	slot := infrav1.SlotA
	if a.installedSlot != "" {
		slot = a.installedSlot
	}
	slots := h.Status.BootSlots
	if slots == nil {
		slots = &infrav1.BootSlots{}
	}
	if h.Spec.Claim.Image.Layout == infrav1.ImageLayoutWholeDisk {
		slots = &infrav1.BootSlots{Active: infrav1.SlotA, A: content}
	} else {
		// The new slot is pending with three tries until the OS marks it good.
		slots.Pending, slots.TriesLeft = slot, 3
		if slots.Active == "" {
			slots.Active = slot
		}
		if slot == infrav1.SlotA {
			slots.A = content
		} else {
			slots.B = content
		}
	}
	h.Status.BootSlots = slots
}

func (a *attempt) describe() string {
	switch {
	case !a.registered:
		return fmt.Sprintf("waiting for the agent to network-boot and register (attempt %s)", a.id)
	case a.progress != "":
		return a.progress
	default:
		return fmt.Sprintf("agent registered; running %s", a.tasks[min(a.next, len(a.tasks)-1)].Kind)
	}
}

func (b *Backend) dropLocked(key types.NamespacedName) {
	if a, ok := b.attempts[key]; ok {
		delete(b.byMAC, a.mac)
		delete(b.attempts, key)
		if b.opts.OnBootDone != nil {
			if mac, err := net.ParseMAC(a.mac); err == nil {
				b.opts.OnBootDone(mac) // must not call back into the backend (b.mu is held)
			}
		}
	}
}

func (b *Backend) imageURL(img infrav1.Image) (string, error) {
	if b.opts.ImageURL == nil {
		return img.URL, nil
	}
	return b.opts.ImageURL(img)
}

func newAttemptID() string {
	buf := make([]byte, 8)
	_, _ = rand.Read(buf)
	return hex.EncodeToString(buf)
}

func (b *Backend) notify(key types.NamespacedName) {
	if b.opts.Notify != nil {
		b.opts.Notify(key)
	}
}

// BootFor tells the HTTP boot service what a MAC should boot: the agent while an attempt
// expects it, otherwise nothing (iPXE exits and the firmware boots the next device, the disk).
func (b *Backend) BootFor(_ context.Context, mac net.HardwareAddr) (httpboot.HostBoot, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	key, ok := b.byMAC[mac.String()]
	if !ok {
		return httpboot.HostBoot{Action: httpboot.ActionExit}, nil
	}
	a := b.attempts[key]
	return httpboot.HostBoot{Host: key, Action: httpboot.ActionAgent, Attempt: a.id, BootMode: a.bootMode}, nil
}

// Expecting reports whether a MAC belongs to a host Anvil is network-booting right now (for
// the DHCP server, which answers nothing else).
func (b *Backend) Expecting(mac net.HardwareAddr) (types.NamespacedName, bool) {
	b.mu.Lock()
	defer b.mu.Unlock()
	key, ok := b.byMAC[mac.String()]
	return key, ok
}

// Expected implements agentapi.Backend.
func (b *Backend) Expected(_ context.Context, host types.NamespacedName) (agentapi.HostView, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	a, ok := b.attempts[host]
	if !ok {
		return agentapi.HostView{}, agentapi.ErrUnknownHost
	}
	return agentapi.HostView{State: a.hostState, Attempt: a.id, Registered: a.registered}, nil
}

// Registered implements agentapi.Backend.
func (b *Backend) Registered(_ context.Context, r agentapi.Registration) error {
	b.mu.Lock()
	a, err := b.current(r.Agent)
	if err == nil {
		if a.registered {
			err = agentapi.ErrAlreadyRegistered
		} else {
			a.registered, a.registeredAt = true, b.opts.Now()
			inv := r.Inventory
			a.inventory = &inv
		}
	}
	b.mu.Unlock()
	if err == nil {
		b.notify(r.Host)
	}
	return err
}

// NextTask implements agentapi.Backend: tasks are handed out one at a time, the next only
// after the previous one reported success.
func (b *Backend) NextTask(_ context.Context, ag agentapi.Agent) (agentapi.Task, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	a, err := b.current(ag)
	if err != nil {
		return agentapi.Task{}, err
	}
	if a.err != nil || a.next >= len(a.tasks) {
		return agentapi.Task{Kind: agentapi.TaskNone, RetryAfterSeconds: 30}, nil
	}
	return a.tasks[a.next], nil
}

// Progress implements agentapi.Backend.
func (b *Backend) Progress(_ context.Context, ag agentapi.Agent, p agentapi.Progress) error {
	b.mu.Lock()
	defer b.mu.Unlock()
	a, err := b.current(ag)
	if err != nil {
		return err
	}
	if a.next >= len(a.tasks) || p.TaskID != a.tasks[a.next].ID {
		return agentapi.ErrConflict
	}
	a.progress = fmt.Sprintf("%s: %s %d%%", a.tasks[a.next].Kind, p.Step, p.Percent)
	if p.Message != "" {
		a.progress += " (" + p.Message + ")"
	}
	return nil
}

// Result implements agentapi.Backend. A repeat of the last result is accepted (the agent
// retries when a response is lost).
func (b *Backend) Result(_ context.Context, ag agentapi.Agent, r agentapi.Result) error {
	b.mu.Lock()
	a, err := b.current(ag)
	switch {
	case err != nil:
	case a.lastResult != nil && a.lastResult.TaskID == r.TaskID:
		// repeat
	case a.next >= len(a.tasks) || r.TaskID != a.tasks[a.next].ID:
		err = agentapi.ErrConflict
	default:
		res := r
		a.lastResult = &res
		if r.OK && r.Kind == agentapi.TaskInstall {
			a.installedSlot = r.Slot // the reboot's result replaces lastResult before the host controller looks
			a.installedAt = b.opts.Now()
		}
		if !r.OK {
			a.err = fmt.Errorf("agent %s task failed: %s", r.Kind, strings.TrimSpace(r.Error))
		} else {
			a.next++
			a.progress = ""
		}
	}
	b.mu.Unlock()
	if err == nil {
		b.notify(ag.Host)
	}
	return err
}

// BootstrapData implements agentapi.Backend: the claim's bootstrap Secret, read when asked
// and never kept.
func (b *Backend) BootstrapData(ctx context.Context, host types.NamespacedName) ([]byte, error) {
	b.mu.Lock()
	a, ok := b.attempts[host]
	name := ""
	if ok {
		name = a.bootstrapSecret
	}
	b.mu.Unlock()
	if name == "" {
		return nil, agentapi.ErrUnknownHost
	}
	s := &corev1.Secret{}
	if err := b.opts.Secrets.Get(ctx, types.NamespacedName{Namespace: host.Namespace, Name: name}, s); err != nil {
		return nil, fmt.Errorf("reading bootstrap Secret %q: %w", name, client.IgnoreNotFound(err))
	}
	data, ok := s.Data["value"]
	if !ok {
		return nil, fmt.Errorf("bootstrap Secret %q has no key value", name)
	}
	return data, nil
}

// BootReported implements agentapi.BootReporter: it keeps the host's latest report and wakes
// its controller. The report token (HMAC, bound to the host) already proved who reports.
func (b *Backend) BootReported(_ context.Context, host types.NamespacedName, _ string, r agentapi.BootReport) error {
	b.mu.Lock()
	b.reports[host] = hoststate.BootReport{Slot: r.Slot, Good: r.Good, Failed: r.Failed, At: b.opts.Now()}
	b.mu.Unlock()
	b.notify(host)
	return nil
}

// LastBootReport implements hoststate.BootReportSource.
func (b *Backend) LastBootReport(h *infrav1.AnvilHost) (hoststate.BootReport, bool) {
	b.mu.Lock()
	defer b.mu.Unlock()
	r, ok := b.reports[types.NamespacedName{Namespace: h.Namespace, Name: h.Name}]
	return r, ok
}

// current returns the attempt an authenticated agent serves (b.mu held).
func (b *Backend) current(ag agentapi.Agent) (*attempt, error) {
	a, ok := b.attempts[ag.Host]
	if !ok || a.id != ag.Attempt {
		return nil, agentapi.ErrUnknownHost
	}
	return a, nil
}
