// Package webhooks holds the admission webhooks for every Anvil kind: what the CRDs' OpenAPI
// and CEL rules cannot check (cross-field rules, parsing with the same code the controllers
// use, template immutability with ClusterClass's dry-run exception). Each rejection names the
// field and says how to fix it.
package webhooks

import (
	"context"
	"fmt"
	"net"
	"net/url"
	"reflect"
	"strings"
	"time"

	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/apimachinery/pkg/util/validation"
	"k8s.io/apimachinery/pkg/util/validation/field"
	"sigs.k8s.io/cluster-api/util/topology"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/webhook/admission"

	infrav1 "github.com/anvil-metal/cluster-api-provider-anvil/api/v1alpha1"
	"github.com/anvil-metal/cluster-api-provider-anvil/internal/bmc"
)

// Options change what the webhooks accept.
type Options struct {
	// AllowLocalImages accepts image URLs on loopback or link-local addresses (the lab serves
	// images from 127.0.0.1); production refuses them, as they reach the provisioner itself.
	AllowLocalImages bool
}

// SetupWithManager registers all Anvil webhooks.
func SetupWithManager(mgr ctrl.Manager, opts Options) error {
	if err := ctrl.NewWebhookManagedBy(mgr, &infrav1.AnvilHost{}).WithValidator(&hostWebhook{}).Complete(); err != nil {
		return err
	}
	machine := &machineWebhook{opts: opts}
	if err := ctrl.NewWebhookManagedBy(mgr, &infrav1.AnvilMachine{}).WithValidator(machine).WithDefaulter(machine).Complete(); err != nil {
		return err
	}
	if err := ctrl.NewWebhookManagedBy(mgr, &infrav1.AnvilMachineTemplate{}).WithValidator(&machineTemplateWebhook{machine: machine}).Complete(); err != nil {
		return err
	}
	if err := ctrl.NewWebhookManagedBy(mgr, &infrav1.AnvilCluster{}).WithValidator(&clusterWebhook{}).WithDefaulter(&clusterWebhook{}).Complete(); err != nil {
		return err
	}
	if err := ctrl.NewWebhookManagedBy(mgr, &infrav1.AnvilClusterTemplate{}).WithValidator(&clusterTemplateWebhook{}).Complete(); err != nil {
		return err
	}
	if err := ctrl.NewWebhookManagedBy(mgr, &infrav1.AnvilRemediation{}).WithValidator(&remediationWebhook{}).Complete(); err != nil {
		return err
	}
	return ctrl.NewWebhookManagedBy(mgr, &infrav1.AnvilRemediationTemplate{}).WithValidator(&remediationTemplateWebhook{}).Complete()
}

func invalid(kind, name string, errs field.ErrorList) error {
	if len(errs) == 0 {
		return nil
	}
	return apierrors.NewInvalid(schema.GroupKind{Group: infrav1.GroupVersion.Group, Kind: kind}, name, errs)
}

// +kubebuilder:webhook:verbs=create;update,path=/validate-infrastructure-cluster-x-k8s-io-v1alpha1-anvilhost,mutating=false,failurePolicy=fail,matchPolicy=Equivalent,groups=infrastructure.cluster.x-k8s.io,resources=anvilhosts,versions=v1alpha1,name=validation.anvilhost.infrastructure.cluster.x-k8s.io,sideEffects=None,admissionReviewVersions=v1

type hostWebhook struct{}

func (w *hostWebhook) ValidateCreate(_ context.Context, h *infrav1.AnvilHost) (admission.Warnings, error) {
	warnings, errs := validateHost(h)
	return warnings, invalid("AnvilHost", h.Name, errs)
}

func (w *hostWebhook) ValidateUpdate(_ context.Context, _, h *infrav1.AnvilHost) (admission.Warnings, error) {
	warnings, errs := validateHost(h)
	return warnings, invalid("AnvilHost", h.Name, errs)
}

func (w *hostWebhook) ValidateDelete(context.Context, *infrav1.AnvilHost) (admission.Warnings, error) {
	return nil, nil
}

// validateHost parses the BMC address with the controllers' own parser and checks what each
// protocol can actually do (the scheme → capability table Metal3 users know).
func validateHost(h *infrav1.AnvilHost) (admission.Warnings, field.ErrorList) {
	var errs field.ErrorList
	var warnings admission.Warnings
	spec := field.NewPath("spec")
	addr, err := bmc.ParseAddress(h.Spec.BMC.Address)
	if err != nil {
		errs = append(errs, field.Invalid(spec.Child("bmc", "address"), h.Spec.BMC.Address, err.Error()))
		return warnings, errs
	}
	if addr.Protocol == bmc.IPMI && h.Spec.BootMode == infrav1.BootModeUEFISecureBoot {
		errs = append(errs, field.Invalid(spec.Child("bootMode"), h.Spec.BootMode,
			"IPMI cannot control Secure Boot: use a redfish:// address or bootMode UEFI"))
	}
	if !addr.HTTPS && h.Spec.BMC.CABundleRef != nil {
		errs = append(errs, field.Forbidden(spec.Child("bmc", "caBundleRef"),
			"a CA bundle only applies to redfish:// or redfish+https:// addresses"))
	}
	if !addr.HTTPS && h.Spec.BMC.InsecureSkipVerify {
		warnings = append(warnings, "spec.bmc.insecureSkipVerify has no effect: this address does not use TLS")
	}
	if addr.Protocol == bmc.Redfish && !addr.HTTPS {
		warnings = append(warnings, "spec.bmc.address uses redfish+http://: BMC credentials cross the network unencrypted")
	}
	switch h.Spec.Inspection {
	case "", infrav1.InspectionAuto, infrav1.InspectionInBand:
	case infrav1.InspectionOutOfBand:
		if addr.Protocol == bmc.IPMI {
			warnings = append(warnings, "spec.inspection is OutOfBand on an ipmi:// host: IPMI reports no CPU, memory or disks, "+
				"so the host gets no hardware labels until the agent runs for an install or a wipe; use Auto to inspect it in band")
		}
	default:
		errs = append(errs, field.NotSupported(spec.Child("inspection"), h.Spec.Inspection,
			[]string{string(infrav1.InspectionAuto), string(infrav1.InspectionOutOfBand), string(infrav1.InspectionInBand)}))
	}
	if h.Spec.Claim != nil && h.Spec.Claim.Image != nil {
		errs = append(errs, validateImage(*h.Spec.Claim.Image, spec.Child("claim", "image"), true)...)
	}
	return warnings, errs
}

// validateImage checks an image URL beyond its scheme. allowLocal skips the address check.
func validateImage(img infrav1.Image, path *field.Path, allowLocal bool) field.ErrorList {
	var errs field.ErrorList
	u, err := url.Parse(img.URL)
	if err != nil {
		return append(errs, field.Invalid(path.Child("url"), img.URL, "not a URL"))
	}
	if u.User != nil {
		errs = append(errs, field.Invalid(path.Child("url"), "(redacted)", "credentials must not be in the image URL; serve the image without them or through the image cache"))
	}
	if !allowLocal {
		if ip := net.ParseIP(u.Hostname()); ip != nil && (ip.IsLoopback() || ip.IsLinkLocalUnicast() || ip.IsUnspecified()) {
			errs = append(errs, field.Invalid(path.Child("url"), img.URL,
				"loopback, link-local and unspecified addresses reach the provisioner itself; use an address of your image server"))
		}
		if strings.EqualFold(u.Hostname(), "localhost") {
			errs = append(errs, field.Invalid(path.Child("url"), img.URL, "localhost reaches the provisioner itself; use your image server's name"))
		}
	}
	if img.Layout == infrav1.ImageLayoutWholeDisk && strings.HasSuffix(strings.ToLower(u.Path), ".qcow2") {
		errs = append(errs, field.Invalid(path.Child("url"), img.URL, "qcow2 images are not supported: convert with qemu-img convert -O raw"))
	}
	return errs
}

// +kubebuilder:webhook:verbs=create;update,path=/validate-infrastructure-cluster-x-k8s-io-v1alpha1-anvilmachine,mutating=false,failurePolicy=fail,matchPolicy=Equivalent,groups=infrastructure.cluster.x-k8s.io,resources=anvilmachines,versions=v1alpha1,name=validation.anvilmachine.infrastructure.cluster.x-k8s.io,sideEffects=None,admissionReviewVersions=v1
// +kubebuilder:webhook:verbs=create;update,path=/mutate-infrastructure-cluster-x-k8s-io-v1alpha1-anvilmachine,mutating=true,failurePolicy=fail,matchPolicy=Equivalent,groups=infrastructure.cluster.x-k8s.io,resources=anvilmachines,versions=v1alpha1,name=default.anvilmachine.infrastructure.cluster.x-k8s.io,sideEffects=None,admissionReviewVersions=v1

type machineWebhook struct{ opts Options }

func (w *machineWebhook) Default(_ context.Context, m *infrav1.AnvilMachine) error {
	defaultMachineSpec(&m.Spec)
	return nil
}

func defaultMachineSpec(s *infrav1.AnvilMachineSpec) {
	if s.WipePolicy == "" {
		s.WipePolicy = infrav1.WipePolicyMetadata
	}
	if s.Image.Format == "" {
		s.Image.Format = infrav1.ImageFormatRaw
	}
	if s.Image.Layout == "" {
		s.Image.Layout = infrav1.ImageLayoutABRoot
	}
}

func (w *machineWebhook) validateSpec(s infrav1.AnvilMachineSpec, path *field.Path) field.ErrorList {
	errs := validateImage(s.Image, path.Child("image"), w.opts.AllowLocalImages)
	if s.HostSelector != nil {
		if _, err := metav1.LabelSelectorAsSelector(s.HostSelector); err != nil {
			errs = append(errs, field.Invalid(path.Child("hostSelector"), s.HostSelector, err.Error()))
		}
	}
	if hw := s.Hardware; hw != nil && hw.GPUModel != "" && hw.MinGPUs == 0 {
		errs = append(errs, field.Invalid(path.Child("hardware", "gpuModel"), hw.GPUModel, "set hardware.minGPUs too: a GPU model without a count selects nothing"))
	}
	for i, key := range s.HostLabelsToNode {
		errs = append(errs, validateLabelKeyOrPrefix(key, path.Child("hostLabelsToNode").Index(i))...)
	}
	return errs
}

// validateLabelKeyOrPrefix accepts a label key (prefix/name or name) or a prefix ending in
// "/" (a DNS subdomain) that stands for every label under it, if the labels it names may be
// copied to a Node (not the kubelet's, Cluster API's or Anvil's claim bookkeeping).
func validateLabelKeyOrPrefix(key string, path *field.Path) field.ErrorList {
	if prefix, ok := strings.CutSuffix(key, "/"); ok {
		if msgs := validation.IsDNS1123Subdomain(prefix); len(msgs) > 0 {
			return field.ErrorList{field.Invalid(path, key, "a prefix must be a DNS subdomain followed by \"/\", e.g. anvil.cluster.x-k8s.io/: "+strings.Join(msgs, "; "))}
		}
	} else if msgs := validation.IsQualifiedName(key); len(msgs) > 0 {
		return field.ErrorList{field.Invalid(path, key, "must be a label key such as topology.kubernetes.io/zone, or a prefix ending in \"/\": "+strings.Join(msgs, "; "))}
	}
	if why := infrav1.NodeLabelRestriction(key); why != "" {
		return field.ErrorList{field.Forbidden(path, fmt.Sprintf("%q may not be copied to the Node: %s", key, why))}
	}
	return nil
}

func (w *machineWebhook) ValidateCreate(_ context.Context, m *infrav1.AnvilMachine) (admission.Warnings, error) {
	return nil, invalid("AnvilMachine", m.Name, w.validateSpec(m.Spec, field.NewPath("spec")))
}

func (w *machineWebhook) ValidateUpdate(_ context.Context, oldM, m *infrav1.AnvilMachine) (admission.Warnings, error) {
	errs := w.validateSpec(m.Spec, field.NewPath("spec"))
	// Selection only matters before a host is claimed; changing it afterwards would silently
	// do nothing, so refuse it and say so.
	if oldM.Status.HostRef != nil {
		if !reflect.DeepEqual(oldM.Spec.HostSelector, m.Spec.HostSelector) {
			errs = append(errs, field.Forbidden(field.NewPath("spec", "hostSelector"), "cannot change once the machine holds a host; replace the machine instead"))
		}
		if !reflect.DeepEqual(oldM.Spec.Hardware, m.Spec.Hardware) {
			errs = append(errs, field.Forbidden(field.NewPath("spec", "hardware"), "cannot change once the machine holds a host; replace the machine instead"))
		}
		// A changed image is an in-place A/B upgrade, which needs a root filesystem image on
		// both sides; a whole-disk image replaces everything, so it takes a new machine.
		if oldM.Spec.Image.Layout != m.Spec.Image.Layout {
			errs = append(errs, field.Forbidden(field.NewPath("spec", "image", "layout"),
				"cannot change once the machine holds a host: in-place upgrades keep the ABRoot layout; replace the machine for a whole-disk image"))
		}
	}
	return nil, invalid("AnvilMachine", m.Name, errs)
}

func (w *machineWebhook) ValidateDelete(context.Context, *infrav1.AnvilMachine) (admission.Warnings, error) {
	return nil, nil
}

// +kubebuilder:webhook:verbs=create;update,path=/validate-infrastructure-cluster-x-k8s-io-v1alpha1-anvilmachinetemplate,mutating=false,failurePolicy=fail,matchPolicy=Equivalent,groups=infrastructure.cluster.x-k8s.io,resources=anvilmachinetemplates,versions=v1alpha1,name=validation.anvilmachinetemplate.infrastructure.cluster.x-k8s.io,sideEffects=None,admissionReviewVersions=v1

type machineTemplateWebhook struct{ machine *machineWebhook }

func (w *machineTemplateWebhook) ValidateCreate(_ context.Context, t *infrav1.AnvilMachineTemplate) (admission.Warnings, error) {
	return nil, invalid("AnvilMachineTemplate", t.Name, w.machine.validateSpec(t.Spec.Template.Spec, field.NewPath("spec", "template", "spec")))
}

func (w *machineTemplateWebhook) ValidateUpdate(ctx context.Context, oldT, t *infrav1.AnvilMachineTemplate) (admission.Warnings, error) {
	errs := w.machine.validateSpec(t.Spec.Template.Spec, field.NewPath("spec", "template", "spec"))
	errs = append(errs, immutableTemplate(ctx, t, oldT.Spec.Template.Spec, t.Spec.Template.Spec)...)
	return nil, invalid("AnvilMachineTemplate", t.Name, errs)
}

func (w *machineTemplateWebhook) ValidateDelete(context.Context, *infrav1.AnvilMachineTemplate) (admission.Warnings, error) {
	return nil, nil
}

// immutableTemplate refuses changes to a template's spec: machines already stamped from it
// would silently differ from new ones. ClusterClass's topology controller dry-runs changes to
// find out whether a rotation is needed; those requests are let through.
func immutableTemplate(ctx context.Context, obj metav1.Object, oldSpec, newSpec any) field.ErrorList {
	if reflect.DeepEqual(oldSpec, newSpec) {
		return nil
	}
	if req, err := admission.RequestFromContext(ctx); err == nil && topology.IsDryRunRequest(req, obj) {
		return nil
	}
	return field.ErrorList{field.Forbidden(field.NewPath("spec", "template", "spec"),
		"templates are immutable: create a new template and point the MachineDeployment, KubeadmControlPlane or ClusterClass at it")}
}

// +kubebuilder:webhook:verbs=create;update,path=/validate-infrastructure-cluster-x-k8s-io-v1alpha1-anvilcluster,mutating=false,failurePolicy=fail,matchPolicy=Equivalent,groups=infrastructure.cluster.x-k8s.io,resources=anvilclusters,versions=v1alpha1,name=validation.anvilcluster.infrastructure.cluster.x-k8s.io,sideEffects=None,admissionReviewVersions=v1
// +kubebuilder:webhook:verbs=create;update,path=/mutate-infrastructure-cluster-x-k8s-io-v1alpha1-anvilcluster,mutating=true,failurePolicy=fail,matchPolicy=Equivalent,groups=infrastructure.cluster.x-k8s.io,resources=anvilclusters,versions=v1alpha1,name=default.anvilcluster.infrastructure.cluster.x-k8s.io,sideEffects=None,admissionReviewVersions=v1

type clusterWebhook struct{}

func (w *clusterWebhook) Default(_ context.Context, c *infrav1.AnvilCluster) error {
	if c.Spec.FailureDomainLabel == "" {
		c.Spec.FailureDomainLabel = infrav1.DefaultFailureDomainLabel
	}
	if c.Spec.ControlPlaneEndpoint.Host != "" && c.Spec.ControlPlaneEndpoint.Port == 0 {
		c.Spec.ControlPlaneEndpoint.Port = 6443
	}
	return nil
}

func validateClusterSpec(s infrav1.AnvilClusterSpec, path *field.Path) field.ErrorList {
	var errs field.ErrorList
	if s.FailureDomainLabel != "" {
		for _, msg := range validation.IsQualifiedName(s.FailureDomainLabel) {
			errs = append(errs, field.Invalid(path.Child("failureDomainLabel"), s.FailureDomainLabel, msg))
		}
	}
	if h := s.ControlPlaneEndpoint.Host; h != "" && net.ParseIP(h) == nil && len(validation.IsDNS1123Subdomain(h)) > 0 {
		errs = append(errs, field.Invalid(path.Child("controlPlaneEndpoint", "host"), h, "must be an IP address or a DNS name"))
	}
	for i, fd := range s.ControlPlaneFailureDomains {
		for _, msg := range validation.IsValidLabelValue(fd) {
			errs = append(errs, field.Invalid(path.Child("controlPlaneFailureDomains").Index(i), fd, msg))
		}
	}
	return errs
}

func (w *clusterWebhook) ValidateCreate(_ context.Context, c *infrav1.AnvilCluster) (admission.Warnings, error) {
	return nil, invalid("AnvilCluster", c.Name, validateClusterSpec(c.Spec, field.NewPath("spec")))
}

func (w *clusterWebhook) ValidateUpdate(_ context.Context, oldC, c *infrav1.AnvilCluster) (admission.Warnings, error) {
	errs := validateClusterSpec(c.Spec, field.NewPath("spec"))
	if oldC.Spec.ControlPlaneEndpoint.IsValid() && oldC.Spec.ControlPlaneEndpoint != c.Spec.ControlPlaneEndpoint {
		errs = append(errs, field.Forbidden(field.NewPath("spec", "controlPlaneEndpoint"), "cannot change once set: every node and kubeconfig uses it"))
	}
	return nil, invalid("AnvilCluster", c.Name, errs)
}

func (w *clusterWebhook) ValidateDelete(context.Context, *infrav1.AnvilCluster) (admission.Warnings, error) {
	return nil, nil
}

// +kubebuilder:webhook:verbs=create;update,path=/validate-infrastructure-cluster-x-k8s-io-v1alpha1-anvilclustertemplate,mutating=false,failurePolicy=fail,matchPolicy=Equivalent,groups=infrastructure.cluster.x-k8s.io,resources=anvilclustertemplates,versions=v1alpha1,name=validation.anvilclustertemplate.infrastructure.cluster.x-k8s.io,sideEffects=None,admissionReviewVersions=v1

type clusterTemplateWebhook struct{}

func (w *clusterTemplateWebhook) ValidateCreate(_ context.Context, t *infrav1.AnvilClusterTemplate) (admission.Warnings, error) {
	return nil, invalid("AnvilClusterTemplate", t.Name, validateClusterSpec(t.Spec.Template.Spec, field.NewPath("spec", "template", "spec")))
}

func (w *clusterTemplateWebhook) ValidateUpdate(ctx context.Context, oldT, t *infrav1.AnvilClusterTemplate) (admission.Warnings, error) {
	errs := validateClusterSpec(t.Spec.Template.Spec, field.NewPath("spec", "template", "spec"))
	errs = append(errs, immutableTemplate(ctx, t, oldT.Spec.Template.Spec, t.Spec.Template.Spec)...)
	return nil, invalid("AnvilClusterTemplate", t.Name, errs)
}

func (w *clusterTemplateWebhook) ValidateDelete(context.Context, *infrav1.AnvilClusterTemplate) (admission.Warnings, error) {
	return nil, nil
}

// +kubebuilder:webhook:verbs=create;update,path=/validate-infrastructure-cluster-x-k8s-io-v1alpha1-anvilremediation,mutating=false,failurePolicy=fail,matchPolicy=Equivalent,groups=infrastructure.cluster.x-k8s.io,resources=anvilremediations,versions=v1alpha1,name=validation.anvilremediation.infrastructure.cluster.x-k8s.io,sideEffects=None,admissionReviewVersions=v1

type remediationWebhook struct{}

func validateRemediationSpec(s infrav1.AnvilRemediationSpec, path *field.Path) field.ErrorList {
	if s.Timeout != nil && s.Timeout.Duration < time.Minute {
		return field.ErrorList{field.Invalid(path.Child("timeout"), s.Timeout.Duration.String(),
			"must be at least 1m: a server needs minutes to reboot (5–15 on real hardware)")}
	}
	return nil
}

func (w *remediationWebhook) ValidateCreate(_ context.Context, r *infrav1.AnvilRemediation) (admission.Warnings, error) {
	return nil, invalid("AnvilRemediation", r.Name, validateRemediationSpec(r.Spec, field.NewPath("spec")))
}

func (w *remediationWebhook) ValidateUpdate(_ context.Context, oldR, r *infrav1.AnvilRemediation) (admission.Warnings, error) {
	errs := validateRemediationSpec(r.Spec, field.NewPath("spec"))
	if !reflect.DeepEqual(oldR.Spec, r.Spec) {
		errs = append(errs, field.Forbidden(field.NewPath("spec"), "a running remediation cannot change; edit the AnvilRemediationTemplate"))
	}
	return nil, invalid("AnvilRemediation", r.Name, errs)
}

func (w *remediationWebhook) ValidateDelete(context.Context, *infrav1.AnvilRemediation) (admission.Warnings, error) {
	return nil, nil
}

// +kubebuilder:webhook:verbs=create;update,path=/validate-infrastructure-cluster-x-k8s-io-v1alpha1-anvilremediationtemplate,mutating=false,failurePolicy=fail,matchPolicy=Equivalent,groups=infrastructure.cluster.x-k8s.io,resources=anvilremediationtemplates,versions=v1alpha1,name=validation.anvilremediationtemplate.infrastructure.cluster.x-k8s.io,sideEffects=None,admissionReviewVersions=v1

type remediationTemplateWebhook struct{}

func (w *remediationTemplateWebhook) ValidateCreate(_ context.Context, t *infrav1.AnvilRemediationTemplate) (admission.Warnings, error) {
	return nil, invalid("AnvilRemediationTemplate", t.Name, validateRemediationSpec(t.Spec.Template.Spec, field.NewPath("spec", "template", "spec")))
}

func (w *remediationTemplateWebhook) ValidateUpdate(_ context.Context, _, t *infrav1.AnvilRemediationTemplate) (admission.Warnings, error) {
	// Remediation templates may change: MachineHealthChecks clone them per remediation.
	return nil, invalid("AnvilRemediationTemplate", t.Name, validateRemediationSpec(t.Spec.Template.Spec, field.NewPath("spec", "template", "spec")))
}

func (w *remediationTemplateWebhook) ValidateDelete(context.Context, *infrav1.AnvilRemediationTemplate) (admission.Warnings, error) {
	return nil, nil
}
