package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"strings"
	"text/tabwriter"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/rest"

	infrav1 "github.com/anvil-metal/cluster-api-provider-anvil/api/v1alpha1"
	"github.com/anvil-metal/cluster-api-provider-anvil/internal/hoststate"
)

type badHost struct {
	what string
	host *infrav1.AnvilHost
}

func badHosts() []badHost {
	base := func(name string) *infrav1.AnvilHost {
		return &infrav1.AnvilHost{
			ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: labNamespace},
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

// printTable asks the API server for its Table rendering, so the columns shown are the CRD's
// printer columns, exactly as kubectl would show them.
func printTable(ctx context.Context, cfg *rest.Config, out io.Writer, resource string, labelColumns ...string) error {
	httpClient, err := rest.HTTPClientFor(cfg)
	if err != nil {
		return err
	}
	url := fmt.Sprintf("%s/apis/%s/namespaces/%s/%s", strings.TrimSuffix(cfg.Host, "/"),
		infrav1.GroupVersion.String(), labNamespace, resource)
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

func showHosts(ctx context.Context, cfg *rest.Config, out io.Writer) error {
	fmt.Fprintln(out, "\n$ kubectl get anvilhosts -n "+labNamespace+" -L "+hoststate.LabelCPUCores+","+hoststate.LabelMemoryGiB+","+infrav1.DefaultFailureDomainLabel)
	return printTable(ctx, cfg, out, "anvilhosts", hoststate.LabelCPUCores, hoststate.LabelMemoryGiB, infrav1.DefaultFailureDomainLabel)
}
