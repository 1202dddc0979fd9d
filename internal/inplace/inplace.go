// Package inplace is Anvil's Runtime Extension for Cluster API's in-place updates (feature
// gate InPlaceUpdates, with RuntimeSDK). Cluster API asks it, before a rollout, whether the
// change between a Machine's current and desired objects can be applied without replacing the
// Machine (CanUpdateMachine for KubeadmControlPlane, CanUpdateMachineSet for
// MachineDeployments), and then asks it to apply the change (UpdateMachine) until it answers
// done or failed.
//
// Anvil can apply one change in place: a new spec.image of an ABRoot AnvilMachine, which the
// host writes into its inactive A/B slot and commits only once the node passes its health
// gate (internal/hoststate/upgrade.go). Any other change, to the AnvilMachine or to the
// Machine or bootstrap config, gets no patch, so Cluster API falls back to a rollout.
package inplace

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"time"

	"k8s.io/apimachinery/pkg/api/equality"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
	runtimehooksv1 "sigs.k8s.io/cluster-api/api/runtime/hooks/v1alpha1"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/client"

	infrav1 "github.com/anvil-metal/cluster-api-provider-anvil/api/v1alpha1"
	"github.com/anvil-metal/cluster-api-provider-anvil/internal/hoststate"
)

// DefaultRetryAfter is how soon Cluster API asks again while an upgrade runs. A real server
// takes minutes per reboot, so asking more often would only cost API reads.
const DefaultRetryAfter = 15 * time.Second

// Extension answers the in-place update hooks.
type Extension struct {
	// Client reads AnvilMachines and AnvilHosts and patches an AnvilMachine's spec.image.
	Client client.Client
	// RetryAfter is the wait UpdateMachine asks for while an upgrade runs (default
	// DefaultRetryAfter, at least a second).
	RetryAfter time.Duration
}

var (
	machineKind  = infrav1.GroupVersion.WithKind("AnvilMachine")
	templateKind = infrav1.GroupVersion.WithKind("AnvilMachineTemplate")
)

// CanUpdateMachine offers to apply a change of the AnvilMachine's spec.image in place.
func (e *Extension) CanUpdateMachine(ctx context.Context, req *runtimehooksv1.CanUpdateMachineRequest, resp *runtimehooksv1.CanUpdateMachineResponse) {
	log := ctrl.LoggerFrom(ctx).WithValues("Machine", req.Current.Machine.Namespace+"/"+req.Current.Machine.Name)
	resp.SetStatus(runtimehooksv1.ResponseStatusSuccess)
	current, desired := &infrav1.AnvilMachine{}, &infrav1.AnvilMachine{}
	if err := decode(req.Current.InfrastructureMachine, machineKind, current); err != nil {
		fail(resp, "current.infrastructureMachine", err)
		return
	}
	if err := decode(req.Desired.InfrastructureMachine, machineKind, desired); err != nil {
		fail(resp, "desired.infrastructureMachine", err)
		return
	}
	patch, why := imagePatch(current.Spec, desired.Spec, "/spec/image")
	if why != "" {
		log.V(2).Info("not an in-place change", "reason", why)
		resp.SetMessage(why)
		return
	}
	resp.InfrastructureMachinePatch = patch
	resp.SetMessage(fmt.Sprintf("the image of AnvilMachine %s can be upgraded in place", current.Name))
}

// CanUpdateMachineSet offers to apply a change of the AnvilMachineTemplate's image in place.
func (e *Extension) CanUpdateMachineSet(ctx context.Context, req *runtimehooksv1.CanUpdateMachineSetRequest, resp *runtimehooksv1.CanUpdateMachineSetResponse) {
	log := ctrl.LoggerFrom(ctx).WithValues("MachineSet", req.Current.MachineSet.Namespace+"/"+req.Current.MachineSet.Name)
	resp.SetStatus(runtimehooksv1.ResponseStatusSuccess)
	current, desired := &infrav1.AnvilMachineTemplate{}, &infrav1.AnvilMachineTemplate{}
	if err := decode(req.Current.InfrastructureMachineTemplate, templateKind, current); err != nil {
		fail(resp, "current.infrastructureMachineTemplate", err)
		return
	}
	if err := decode(req.Desired.InfrastructureMachineTemplate, templateKind, desired); err != nil {
		fail(resp, "desired.infrastructureMachineTemplate", err)
		return
	}
	patch, why := imagePatch(current.Spec.Template.Spec, desired.Spec.Template.Spec, "/spec/template/spec/image")
	if why != "" {
		log.V(2).Info("not an in-place change", "reason", why)
		resp.SetMessage(why)
		return
	}
	resp.InfrastructureMachineTemplatePatch = patch
	resp.SetMessage(fmt.Sprintf("machines of AnvilMachineTemplate %s can have their image upgraded in place", desired.Name))
}

// UpdateMachine makes sure the AnvilMachine asks for the desired image (Cluster API has
// usually written it already) and reports the host's progress: retry while the image is
// written and on trial, done once committed, failed with the reason once rolled back. It is
// idempotent: every call reads the current state.
func (e *Extension) UpdateMachine(ctx context.Context, req *runtimehooksv1.UpdateMachineRequest, resp *runtimehooksv1.UpdateMachineResponse) {
	desired := &infrav1.AnvilMachine{}
	if err := decode(req.Desired.InfrastructureMachine, machineKind, desired); err != nil {
		fail(resp, "desired.infrastructureMachine", err)
		return
	}
	log := ctrl.LoggerFrom(ctx).WithValues("AnvilMachine", desired.Namespace+"/"+desired.Name)
	am := &infrav1.AnvilMachine{}
	if err := e.Client.Get(ctx, client.ObjectKey{Namespace: desired.Namespace, Name: desired.Name}, am); err != nil {
		fail(resp, "desired.infrastructureMachine", fmt.Errorf("reading AnvilMachine %s/%s: %w", desired.Namespace, desired.Name, err))
		return
	}
	if _, why := imagePatch(am.Spec, desired.Spec, "/spec/image"); why != "" && !equality.Semantic.DeepEqual(am.Spec.Image, desired.Spec.Image) {
		fail(resp, "desired.infrastructureMachine", errors.New(why))
		return
	}
	if !equality.Semantic.DeepEqual(am.Spec.Image, desired.Spec.Image) {
		base := am.DeepCopy()
		am.Spec.Image = desired.Spec.Image
		if err := e.Client.Patch(ctx, am, client.MergeFromWithOptions(base, client.MergeFromWithOptimisticLock{})); err != nil {
			e.retry(resp, fmt.Sprintf("setting the image of AnvilMachine %s: %v", am.Name, err))
			return
		}
		log.Info("in-place upgrade: image set", "image", desired.Spec.Image.URL)
	}
	if am.Status.HostRef == nil {
		fail(resp, "desired.infrastructureMachine", fmt.Errorf("AnvilMachine %s holds no host", am.Name))
		return
	}
	host := &infrav1.AnvilHost{}
	if err := e.Client.Get(ctx, client.ObjectKey{Namespace: am.Namespace, Name: am.Status.HostRef.Name}, host); err != nil {
		e.retry(resp, fmt.Sprintf("reading host %s: %v", am.Status.HostRef.Name, err))
		return
	}
	p := hoststate.UpgradeProgressOf(host, desired.Spec.Image)
	switch {
	case p.Committed:
		resp.SetStatus(runtimehooksv1.ResponseStatusSuccess)
		resp.SetMessage(p.Message)
		resp.SetRetryAfterSeconds(0)
		log.Info("in-place upgrade committed", "host", host.Name)
	case p.RolledBack:
		resp.SetStatus(runtimehooksv1.ResponseStatusFailure)
		resp.SetMessage(p.Message)
		log.Info("in-place upgrade rolled back", "host", host.Name)
	default:
		e.retry(resp, p.Message)
	}
}

func (e *Extension) retry(resp *runtimehooksv1.UpdateMachineResponse, msg string) {
	wait := e.RetryAfter
	if wait <= 0 {
		wait = DefaultRetryAfter
	}
	resp.SetStatus(runtimehooksv1.ResponseStatusSuccess)
	resp.SetMessage(msg)
	resp.SetRetryAfterSeconds(int32(max(wait, time.Second) / time.Second))
}

// imagePatch returns the JSON patch that turns current into desired at path, or why the
// change cannot be made in place. No change at all needs no patch and is not refused.
func imagePatch(current, desired infrav1.AnvilMachineSpec, path string) (runtimehooksv1.Patch, string) {
	if equality.Semantic.DeepEqual(current.Image, desired.Image) {
		return runtimehooksv1.Patch{}, "the image does not change"
	}
	if current.Image.Layout != infrav1.ImageLayoutABRoot || desired.Image.Layout != infrav1.ImageLayoutABRoot {
		return runtimehooksv1.Patch{}, "only ABRoot images are upgraded in place (image.layout); a whole-disk image changes by replacing the machine"
	}
	// providerID is written by Anvil, not the template: it is no change of the user's.
	rest := current.DeepCopy()
	rest.Image, rest.ProviderID = desired.Image, desired.ProviderID
	if !equality.Semantic.DeepEqual(*rest, desired) {
		return runtimehooksv1.Patch{}, "the change is not limited to spec.image (hostSelector, hardware and wipePolicy take a new machine)"
	}
	raw, err := json.Marshal([]map[string]any{{"op": "replace", "path": path, "value": desired.Image}})
	if err != nil {
		return runtimehooksv1.Patch{}, err.Error()
	}
	return runtimehooksv1.Patch{PatchType: runtimehooksv1.JSONPatchType, Patch: raw}, ""
}

// decode reads an object of kind want from a hook request (JSON from the wire, or an object
// when called in-process).
func decode(raw runtime.RawExtension, want schema.GroupVersionKind, into runtime.Object) error {
	data := raw.Raw
	if len(data) == 0 && raw.Object != nil {
		var err error
		if data, err = json.Marshal(raw.Object); err != nil {
			return err
		}
	}
	if len(data) == 0 {
		return errors.New("missing")
	}
	var tm struct {
		APIVersion string `json:"apiVersion"`
		Kind       string `json:"kind"`
	}
	if err := json.Unmarshal(data, &tm); err != nil {
		return fmt.Errorf("not a JSON object: %w", err)
	}
	if tm.APIVersion != want.GroupVersion().String() || tm.Kind != want.Kind {
		return fmt.Errorf("is a %s %s, not an %s %s: register this extension only for clusters whose machines are Anvil's (ExtensionConfig namespaceSelector)",
			tm.APIVersion, tm.Kind, want.GroupVersion(), want.Kind)
	}
	return json.Unmarshal(data, into)
}

func fail(resp runtimehooksv1.ResponseObject, field string, err error) {
	resp.SetStatus(runtimehooksv1.ResponseStatusFailure)
	resp.SetMessage(field + ": " + err.Error())
}
