// Package mgmtplane runs an embedded management plane: a real kube-apiserver and etcd
// (controller-runtime's envtest machinery) with Cluster API's and Anvil's CRDs installed.
// Tests use it to meet the real API server's validation rather than a fake client's; the
// demo and the lab use it as their management cluster.
package mgmtplane

import (
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"sort"
	"strings"

	admissionv1 "k8s.io/api/admissionregistration/v1"
	apiextensionsv1 "k8s.io/apiextensions-apiserver/pkg/apis/apiextensions/v1"
	"k8s.io/apimachinery/pkg/runtime/serializer"
	utilyaml "k8s.io/apimachinery/pkg/util/yaml"
	clientgoscheme "k8s.io/client-go/kubernetes/scheme"
	"k8s.io/client-go/rest"
	bootstrapv1 "sigs.k8s.io/cluster-api/api/bootstrap/kubeadm/v1beta2"
	controlplanev1 "sigs.k8s.io/cluster-api/api/controlplane/kubeadm/v1beta2"
	clusterv1 "sigs.k8s.io/cluster-api/api/core/v1beta2"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/envtest"
	"sigs.k8s.io/controller-runtime/pkg/webhook"

	k8sruntime "k8s.io/apimachinery/pkg/runtime"

	infrav1 "github.com/anvil-metal/cluster-api-provider-anvil/api/v1alpha1"
)

// ContractLabel is the label Cluster API reads to learn which API versions of a CRD speak
// which contract.
const ContractLabel = "cluster.x-k8s.io/v1beta2"

// Environment is a running API server with a client for it.
type Environment struct {
	Config *rest.Config
	Client client.Client
	Scheme *k8sruntime.Scheme
	env    *envtest.Environment
}

// NewScheme returns a scheme with the Kubernetes, Cluster API and Anvil types.
func NewScheme() *k8sruntime.Scheme {
	s := k8sruntime.NewScheme()
	for _, add := range []func(*k8sruntime.Scheme) error{
		clientgoscheme.AddToScheme, apiextensionsv1.AddToScheme, clusterv1.AddToScheme,
		bootstrapv1.AddToScheme, controlplanev1.AddToScheme, infrav1.AddToScheme,
	} {
		if err := add(s); err != nil {
			panic(err) // only programming errors reach here
		}
	}
	return s
}

// Options change what Start installs.
type Options struct {
	// Webhooks installs Anvil's webhook configurations (config/webhook), pointed at a local
	// serving address and certificate that Environment.WebhookServer uses.
	Webhooks bool
	// CAPIWebhooks also installs Cluster API's webhook configurations (core, kubeadm
	// bootstrap, kubeadm control plane) against the same local server; the caller registers
	// CAPI's admission handlers there (sigs.k8s.io/cluster-api/.../webhooks/admission).
	CAPIWebhooks bool
}

// Start runs kube-apiserver and etcd with every CRD installed. The binaries come from
// KUBEBUILDER_ASSETS, or from bin/envtest/<version> as built by hack/envtest-bins.sh.
func Start() (*Environment, error) { return StartWithOptions(Options{}) }

// StartWithOptions is Start with options.
func StartWithOptions(opts Options) (*Environment, error) {
	root, err := repoRoot()
	if err != nil {
		return nil, err
	}
	assets := os.Getenv("KUBEBUILDER_ASSETS")
	if assets == "" {
		assets, err = findAssets(root)
		if err != nil {
			return nil, err
		}
	}
	crds, err := loadCRDs(root)
	if err != nil {
		return nil, err
	}
	scheme := NewScheme()
	env := &envtest.Environment{
		BinaryAssetsDirectory: assets,
		CRDs:                  crds,
		ErrorIfCRDPathMissing: true,
		Scheme:                scheme,
	}
	if opts.Webhooks && !opts.CAPIWebhooks {
		env.WebhookInstallOptions = envtest.WebhookInstallOptions{Paths: []string{filepath.Join(root, "config", "webhook", "manifests.yaml")}}
	}
	if opts.CAPIWebhooks {
		capiDir, err := moduleDir(root, "sigs.k8s.io/cluster-api")
		if err != nil {
			return nil, err
		}
		sources := map[string]string{}
		if opts.Webhooks {
			sources["anvil"] = filepath.Join(root, "config", "webhook", "manifests.yaml")
		}
		for prefix, d := range map[string]string{"capi": "core", "capi-kubeadm-bootstrap": "bootstrap/kubeadm", "capi-kubeadm-control-plane": "controlplane/kubeadm"} {
			sources[prefix] = filepath.Join(capiDir, d, "config", "webhook", "manifests.yaml")
		}
		if env.WebhookInstallOptions, err = webhookConfigurations(sources); err != nil {
			return nil, err
		}
	}
	cfg, err := env.Start()
	if err != nil {
		return nil, fmt.Errorf("starting envtest with binaries from %s: %w", assets, err)
	}
	c, err := client.New(cfg, client.Options{Scheme: scheme})
	if err != nil {
		_ = env.Stop()
		return nil, err
	}
	return &Environment{Config: cfg, Client: c, Scheme: scheme, env: env}, nil
}

// WebhookServer returns a webhook server options matching the installed configurations
// (valid only when started with Options.Webhooks or Options.CAPIWebhooks).
func (e *Environment) WebhookServer() webhook.Options {
	w := e.env.WebhookInstallOptions
	return webhook.Options{Host: w.LocalServingHost, Port: w.LocalServingPort, CertDir: w.LocalServingCertDir}
}

// webhookConfigurations reads generated webhook manifests (file by name prefix). Every
// controller-gen manifest names its configurations mutating-webhook-configuration and
// validating-webhook-configuration; kustomize's namePrefix tells them apart in real installs,
// and the prefix does here, or all but one provider's would be lost.
func webhookConfigurations(sources map[string]string) (envtest.WebhookInstallOptions, error) {
	var o envtest.WebhookInstallOptions
	codec := serializer.NewCodecFactory(NewScheme()).UniversalDeserializer()
	for prefix, path := range sources {
		raw, err := os.ReadFile(path)
		if err != nil {
			return o, err
		}
		for _, doc := range strings.Split(string(raw), "\n---") {
			if strings.TrimSpace(doc) == "" {
				continue
			}
			js, err := utilyaml.ToJSON([]byte(doc))
			if err != nil {
				return o, fmt.Errorf("%s: %w", path, err)
			}
			obj, _, err := codec.Decode(js, nil, nil)
			if err != nil {
				return o, fmt.Errorf("%s: %w", path, err)
			}
			switch w := obj.(type) {
			case *admissionv1.MutatingWebhookConfiguration:
				w.Name = prefix + "-" + w.Name
				o.MutatingWebhooks = append(o.MutatingWebhooks, w)
			case *admissionv1.ValidatingWebhookConfiguration:
				w.Name = prefix + "-" + w.Name
				o.ValidatingWebhooks = append(o.ValidatingWebhooks, w)
			default:
				return o, fmt.Errorf("%s: unexpected %T", path, obj)
			}
		}
	}
	return o, nil
}

// Stop shuts the API server and etcd down.
func (e *Environment) Stop() error { return e.env.Stop() }

func repoRoot() (string, error) {
	_, file, _, ok := runtime.Caller(0)
	if !ok {
		return "", fmt.Errorf("cannot locate the repository root")
	}
	return filepath.Abs(filepath.Join(filepath.Dir(file), "..", ".."))
}

func findAssets(root string) (string, error) {
	matches, _ := filepath.Glob(filepath.Join(root, "bin", "envtest", "*", "kube-apiserver"))
	if len(matches) == 0 {
		return "", fmt.Errorf("no envtest binaries: run hack/envtest-bins.sh (make test does) or set KUBEBUILDER_ASSETS")
	}
	sort.Strings(matches)
	return filepath.Dir(matches[len(matches)-1]), nil
}

// loadCRDs reads Anvil's CRDs from config/crd/bases and Cluster API's from the module cache,
// adding the contract label to CAPI's own (kustomize adds it in real installs).
func loadCRDs(root string) ([]*apiextensionsv1.CustomResourceDefinition, error) {
	capiDir, err := moduleDir(root, "sigs.k8s.io/cluster-api")
	if err != nil {
		return nil, err
	}
	dirs := []string{
		filepath.Join(root, "config", "crd", "bases"),
		filepath.Join(capiDir, "core", "config", "crd", "bases"),
		filepath.Join(capiDir, "bootstrap", "kubeadm", "config", "crd", "bases"),
		filepath.Join(capiDir, "controlplane", "kubeadm", "config", "crd", "bases"),
	}
	var crds []*apiextensionsv1.CustomResourceDefinition
	for _, dir := range dirs {
		files, err := filepath.Glob(filepath.Join(dir, "*.yaml"))
		if err != nil || len(files) == 0 {
			return nil, fmt.Errorf("no CRDs in %s", dir)
		}
		for _, f := range files {
			crd, err := readCRD(f)
			if err != nil {
				return nil, err
			}
			if crd.Labels == nil {
				crd.Labels = map[string]string{}
			}
			if _, ok := crd.Labels[ContractLabel]; !ok {
				crd.Labels[ContractLabel] = servedVersions(crd)
			}
			crds = append(crds, crd)
		}
	}
	return crds, nil
}

func readCRD(path string) (*apiextensionsv1.CustomResourceDefinition, error) {
	raw, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	js, err := utilyaml.ToJSON(raw)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	crd := &apiextensionsv1.CustomResourceDefinition{}
	codec := serializer.NewCodecFactory(NewScheme()).UniversalDeserializer()
	if _, _, err := codec.Decode(js, nil, crd); err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return crd, nil
}

func servedVersions(crd *apiextensionsv1.CustomResourceDefinition) string {
	var served []string
	for _, v := range crd.Spec.Versions {
		if v.Served {
			served = append(served, v.Name)
		}
	}
	return strings.Join(served, "_")
}

// moduleDir asks the go command where a dependency lives, so the module cache location is
// never guessed.
func moduleDir(root, module string) (string, error) {
	cmd := exec.Command("go", "list", "-m", "-json", module) //nolint:gosec // module is one of our own constants
	cmd.Dir = root
	out, err := cmd.Output()
	if err != nil {
		return "", fmt.Errorf("go list -m %s: %w", module, err)
	}
	var info struct{ Dir string }
	if err := json.Unmarshal(out, &info); err != nil || info.Dir == "" {
		return "", fmt.Errorf("go list -m %s: no directory (run go mod download)", module)
	}
	return info.Dir, nil
}
