package main

import (
	"context"
	"fmt"
	"os"
	"sort"
	"strings"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	k8sruntime "k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/utils/ptr"
	controlplanev1 "sigs.k8s.io/cluster-api/api/controlplane/kubeadm/v1beta2"
	clusterv1 "sigs.k8s.io/cluster-api/api/core/v1beta2"
	"sigs.k8s.io/cluster-api/cmd/clusterctl/client/yamlprocessor"
	utilyaml "sigs.k8s.io/cluster-api/util/yaml"
	"sigs.k8s.io/controller-runtime/pkg/client"
)

// generatedCluster is what `clusterctl generate cluster` made of a template, ready to apply.
type generatedCluster struct {
	objects []client.Object
	// kcp and md name the KubeadmControlPlane and the (first) MachineDeployment.
	kcp, md string
}

// generateCluster renders a cluster template with clusterctl's own template processor, as
// `clusterctl generate cluster` does, and decodes its objects into the scheme's types. A
// variable the template needs that vars lacks (and has no default) is an error naming it.
func generateCluster(path string, vars map[string]string, scheme *k8sruntime.Scheme) (*generatedCluster, error) {
	raw, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	out, err := yamlprocessor.NewSimpleProcessor().Process(raw, func(name string) (string, error) {
		if v, ok := vars[name]; ok {
			return v, nil
		}
		return "", fmt.Errorf("variable %s is not set", name)
	})
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	items, err := utilyaml.ToUnstructured(out)
	if err != nil {
		return nil, fmt.Errorf("%s after substitution: %w", path, err)
	}
	g := &generatedCluster{}
	for i := range items {
		obj, err := typed(&items[i], scheme)
		if err != nil {
			return nil, fmt.Errorf("%s: %s %s: %w", path, items[i].GetKind(), items[i].GetName(), err)
		}
		switch o := obj.(type) {
		case *controlplanev1.KubeadmControlPlane:
			g.kcp = o.Name
		case *clusterv1.MachineDeployment:
			if g.md == "" {
				g.md = o.Name
			}
		}
		g.objects = append(g.objects, obj)
	}
	if g.kcp == "" || g.md == "" {
		return nil, fmt.Errorf("%s has no KubeadmControlPlane or no MachineDeployment", path)
	}
	return g, nil
}

// typed converts an object into its Go type when the scheme knows it (so defaults can be
// applied), and leaves it unstructured otherwise.
func typed(u *unstructured.Unstructured, scheme *k8sruntime.Scheme) (client.Object, error) {
	obj, err := scheme.New(u.GroupVersionKind())
	if err != nil {
		return u, nil //nolint:nilerr // a kind the scheme lacks is applied as it is
	}
	if err := k8sruntime.DefaultUnstructuredConverter.FromUnstructured(u.Object, obj); err != nil {
		return nil, err
	}
	co, ok := obj.(client.Object)
	if !ok {
		return u, nil
	}
	co.GetObjectKind().SetGroupVersionKind(u.GroupVersionKind())
	return co, nil
}

// applyWebhookDefaults fills what Cluster API's defaulting webhooks would: the lab runs the
// controllers but not their webhook servers (which need certificates and a reachable
// webhook configuration). These are the v1.14.2 webhooks' defaults for the fields the
// templates leave out.
func applyWebhookDefaults(objs []client.Object) {
	for _, obj := range objs {
		switch o := obj.(type) {
		case *clusterv1.MachineDeployment:
			labels := map[string]string{clusterv1.ClusterNameLabel: o.Spec.ClusterName, clusterv1.MachineDeploymentNameLabel: o.Name}
			if o.Labels == nil {
				o.Labels = map[string]string{}
			}
			o.Labels[clusterv1.ClusterNameLabel] = o.Spec.ClusterName
			if len(o.Spec.Selector.MatchLabels) == 0 && len(o.Spec.Selector.MatchExpressions) == 0 {
				o.Spec.Selector = metav1.LabelSelector{MatchLabels: labels}
			}
			if o.Spec.Template.Labels == nil {
				o.Spec.Template.Labels = map[string]string{}
			}
			for k, v := range labels {
				o.Spec.Template.Labels[k] = v
			}
			if o.Spec.Template.Spec.ClusterName == "" {
				o.Spec.Template.Spec.ClusterName = o.Spec.ClusterName
			}
			if o.Spec.Rollout.Strategy.Type == "" {
				o.Spec.Rollout.Strategy = clusterv1.MachineDeploymentRolloutStrategy{Type: clusterv1.RollingUpdateMachineDeploymentStrategyType,
					RollingUpdate: clusterv1.MachineDeploymentRolloutStrategyRollingUpdate{
						MaxSurge: ptr.To(intstr.FromInt32(1)), MaxUnavailable: ptr.To(intstr.FromInt32(0))}}
			}
		case *controlplanev1.KubeadmControlPlane:
			if o.Spec.Rollout.Strategy.Type == "" {
				o.Spec.Rollout.Strategy = controlplanev1.KubeadmControlPlaneRolloutStrategy{Type: controlplanev1.RollingUpdateStrategyType,
					RollingUpdate: controlplanev1.KubeadmControlPlaneRolloutStrategyRollingUpdate{MaxSurge: ptr.To(intstr.FromInt32(1))}}
			}
		case *clusterv1.MachineHealthCheck:
			if o.Labels == nil {
				o.Labels = map[string]string{}
			}
			o.Labels[clusterv1.ClusterNameLabel] = o.Spec.ClusterName
		}
	}
}

// apply creates the objects with strict field validation, so a template field the API does
// not know is an error rather than silently dropped.
func (g *generatedCluster) apply(ctx context.Context, c client.Client) ([]string, error) {
	applyWebhookDefaults(g.objects)
	var created []string
	for _, o := range g.objects {
		kind := o.GetObjectKind().GroupVersionKind().Kind // Create clears a typed object's kind
		if err := c.Create(ctx, o, client.FieldValidation("Strict")); err != nil {
			return created, fmt.Errorf("creating %s %s: %w", kind, o.GetName(), err)
		}
		created = append(created, strings.ToLower(kind)+"/"+o.GetName())
	}
	sort.Strings(created)
	return created, nil
}
