package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"text/tabwriter"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	utilyaml "k8s.io/apimachinery/pkg/util/yaml"
	"k8s.io/client-go/rest"
	"sigs.k8s.io/controller-runtime/pkg/client"

	infrav1 "github.com/anvil-metal/cluster-api-provider-anvil/api/v1alpha1"
	"github.com/anvil-metal/cluster-api-provider-anvil/internal/mgmtplane"
)

const demoNamespace = "anvil-demo"

// runDemo starts the embedded management plane, applies the documented samples, shows the
// API server refusing bad input with messages that name the field, and prints the hosts as
// `kubectl get anvilhosts` would.
func runDemo(out io.Writer) error {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	step := newStepper(out)

	step.start("start the management plane (kube-apiserver + etcd, CAPI and Anvil CRDs)")
	env, err := mgmtplane.Start()
	if err != nil {
		return err
	}
	defer func() { _ = env.Stop() }()
	step.done()

	step.start("apply config/samples")
	if err := env.Client.Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: demoNamespace}}); err != nil {
		return err
	}
	applied, err := applySamples(ctx, env.Client)
	if err != nil {
		return err
	}
	step.done()
	for _, a := range applied {
		fmt.Fprintf(out, "    created %s\n", a)
	}

	step.start("show that bad input is refused with the field and the fix")
	for _, bad := range badHosts() {
		err := env.Client.Create(ctx, bad.host)
		if err == nil {
			return fmt.Errorf("the API server accepted %s", bad.what)
		}
		fmt.Fprintf(out, "    %s\n      → %s\n", bad.what, firstCause(err))
	}
	step.done()

	fmt.Fprintln(out, "\n$ kubectl get anvilmachinetemplates,anvilmachines -n "+demoNamespace)
	for _, r := range []string{"anvilmachinetemplates", "anvilmachines"} {
		if err := printTable(ctx, env.Config, out, r); err != nil {
			return err
		}
	}
	if err := demoHosts(ctx, env, out, step); err != nil {
		return err
	}
	fmt.Fprintln(out, "\nNot in this demo yet: Cluster API's own controllers (KubeadmControlPlane, MachineDeployment), a workload cluster,")
	fmt.Fprintln(out, "remediation and A/B upgrades; the machine above was created the way Cluster API would create it.")
	return nil
}

type badHost struct {
	what string
	host *infrav1.AnvilHost
}

func badHosts() []badHost {
	base := func(name string) *infrav1.AnvilHost {
		return &infrav1.AnvilHost{
			ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: demoNamespace},
			Spec: infrav1.AnvilHostSpec{
				BMC: infrav1.BMC{
					Address:        "redfish+https://10.0.0.9/redfish/v1/Systems/1",
					CredentialsRef: infrav1.LocalSecretReference{Name: "bmc"},
				},
				BootMACAddress: "52:54:00:00:00:09",
			},
		}
	}
	scheme := base("bad-scheme")
	scheme.Spec.BMC.Address = "http://10.0.0.9/redfish/v1"
	mac := base("bad-mac")
	mac.Spec.BootMACAddress = "52-54-00-00-00-09"
	image := base("bad-image")
	image.Spec.Claim = &infrav1.HostClaim{
		MachineRef: infrav1.MachineReference{Name: "m", UID: "u"},
		Image:      &infrav1.Image{URL: "file:///etc/shadow", Checksum: "abc123"},
	}
	return []badHost{
		{"a BMC address with an http:// scheme", scheme},
		{"a boot MAC written with dashes", mac},
		{"a file:// image with a checksum that names no algorithm", image},
	}
}

func firstCause(err error) string {
	msg := err.Error()
	if i := strings.Index(msg, "is invalid: "); i >= 0 {
		msg = msg[i+len("is invalid: "):]
	}
	return msg
}

func applySamples(ctx context.Context, c client.Client) ([]string, error) {
	files, err := filepath.Glob(filepath.Join("config", "samples", "*.yaml"))
	if err != nil || len(files) == 0 {
		return nil, fmt.Errorf("no samples in config/samples (run from the repository root)")
	}
	var applied []string
	for _, f := range files {
		raw, err := os.ReadFile(f)
		if err != nil {
			return nil, err
		}
		dec := utilyaml.NewYAMLOrJSONDecoder(strings.NewReader(string(raw)), 4096)
		for {
			u := &unstructured.Unstructured{}
			if err := dec.Decode(&u.Object); err != nil {
				if errors.Is(err, io.EOF) {
					break
				}
				return nil, fmt.Errorf("%s: %w", f, err)
			}
			if len(u.Object) == 0 {
				continue
			}
			u.SetNamespace(demoNamespace)
			if err := c.Create(ctx, u, client.FieldValidation("Strict")); err != nil {
				return nil, fmt.Errorf("%s: %w", f, err)
			}
			applied = append(applied, fmt.Sprintf("%s/%s", strings.ToLower(u.GetKind()), u.GetName()))
		}
	}
	return applied, nil
}

// printTable asks the API server for its Table rendering, so the columns shown are the CRD's
// printer columns, exactly as kubectl would show them.
func printTable(ctx context.Context, cfg *rest.Config, out io.Writer, resource string, labelColumns ...string) error {
	httpClient, err := rest.HTTPClientFor(cfg)
	if err != nil {
		return err
	}
	url := fmt.Sprintf("%s/apis/%s/namespaces/%s/%s", strings.TrimSuffix(cfg.Host, "/"),
		infrav1.GroupVersion.String(), demoNamespace, resource)
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return err
	}
	req.Header.Set("Accept", "application/json;as=Table;v=v1;g=meta.k8s.io")
	q := req.URL.Query()
	q.Set("includeObject", "Metadata") // the rows carry labels for the -L columns
	req.URL.RawQuery = q.Encode()
	resp, err := httpClient.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("listing %s: %s", resource, resp.Status)
	}
	var table metav1.Table
	if err := json.NewDecoder(resp.Body).Decode(&table); err != nil {
		return err
	}
	tw := tabwriter.NewWriter(out, 0, 4, 3, ' ', 0)
	var header []string
	var shown []int
	for i, col := range table.ColumnDefinitions {
		if col.Priority == 0 {
			header = append(header, strings.ToUpper(col.Name))
			shown = append(shown, i)
		}
	}
	for _, l := range labelColumns {
		header = append(header, strings.ToUpper(l[strings.LastIndex(l, "/")+1:]))
	}
	fmt.Fprintln(tw, strings.Join(header, "\t"))
	for _, row := range table.Rows {
		var cells []string
		var meta metav1.PartialObjectMetadata
		_ = json.Unmarshal(row.Object.Raw, &meta)
		for _, i := range shown {
			if row.Cells[i] == nil {
				cells = append(cells, "")
				continue
			}
			cells = append(cells, fmt.Sprint(row.Cells[i]))
		}
		for _, l := range labelColumns {
			cells = append(cells, meta.Labels[l])
		}
		fmt.Fprintln(tw, strings.Join(cells, "\t"))
	}
	return tw.Flush()
}

// stepper prints each step with its duration.
type stepper struct {
	out   io.Writer
	began time.Time
}

func newStepper(out io.Writer) *stepper { return &stepper{out: out} }

func (s *stepper) start(what string) {
	s.began = time.Now()
	fmt.Fprintf(s.out, "==> %s\n", what)
}

func (s *stepper) done() {
	fmt.Fprintf(s.out, "    done in %s\n", time.Since(s.began).Round(10*time.Millisecond))
}
