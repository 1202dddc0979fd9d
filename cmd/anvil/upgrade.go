package main

import (
	"bytes"
	"context"
	"fmt"
	"time"

	"sigs.k8s.io/cluster-api/util/conditions"
	"sigs.k8s.io/controller-runtime/pkg/client"

	clusterv1 "sigs.k8s.io/cluster-api/api/core/v1beta2"

	infrav1 "github.com/anvil-metal/cluster-api-provider-anvil/api/v1alpha1"
	"github.com/anvil-metal/cluster-api-provider-anvil/internal/disk"
	"github.com/anvil-metal/cluster-api-provider-anvil/internal/hoststate"
)

// dataMarker is what the lab writes into a server's DATA partition before its upgrades, as a
// workload would, to show that no install touches DATA.
var dataMarker = []byte("etcd and kubelet state that must survive every upgrade\n")

// upgradeInPlace changes a worker's AnvilMachine image and waits until the host committed it
// (want "committed") or rolled it back (want "rolled back"); the machine, its node and DATA
// stay.
func (r *labRun) upgradeInPlace(ctx context.Context, imageName, want string) error {
	m, host, err := r.aWorker(ctx)
	if err != nil {
		return err
	}
	if want == "committed" {
		if err := r.writeData(host); err != nil {
			return err
		}
	}
	before, err := r.host(ctx, host)
	if err != nil {
		return err
	}
	am := &infrav1.AnvilMachine{}
	if err := r.env.Client.Get(ctx, client.ObjectKey{Namespace: labNamespace, Name: m.Spec.InfrastructureRef.Name}, am); err != nil {
		return err
	}
	image := r.images.image(imageName)
	patch := client.MergeFrom(am.DeepCopy())
	am.Spec.Image = image
	if err := r.env.Client.Patch(ctx, am, patch); err != nil {
		return err
	}
	activeBefore := before.Status.BootSlots.Active
	fmt.Fprintf(r.out, "    anvilmachine/%s: spec.image → %s (host %s runs slot %s)\n", am.Name, image.URL, host, activeBefore)
	if err := r.eventually(ctx, 3*time.Minute, func() (bool, string, error) {
		h, err := r.host(ctx, host)
		if err != nil {
			return false, "", err
		}
		cond := conditions.Get(h, hoststate.ConditionImageUpToDate)
		if cond == nil || h.Status.State != infrav1.HostStateProvisioned {
			return false, hostWhy(*h), nil
		}
		slots := h.Status.BootSlots
		switch want {
		case "committed":
			if cond.Reason == "UpToDate" && slots.Active != activeBefore {
				fmt.Fprintf(r.out, "    %s: %s\n", host, cond.Message)
				return true, "", nil
			}
		default:
			if cond.Reason == "RolledBack" && slots.Active == activeBefore {
				fmt.Fprintf(r.out, "    %s: %s\n", host, cond.Message)
				return true, "", nil
			}
		}
		return false, fmt.Sprintf("host %s: %s: %s", host, cond.Reason, cond.Message), nil
	}); err != nil {
		return err
	}
	cur := &clusterv1.Machine{}
	if err := r.env.Client.Get(ctx, client.ObjectKeyFromObject(m), cur); err != nil || cur.UID != m.UID {
		return fmt.Errorf("machine %s was replaced by an in-place upgrade", m.Name)
	}
	if err := r.checkData(host); err != nil {
		return err
	}
	fmt.Fprintf(r.out, "    machine %s kept its node; DATA on %s is intact\n", m.Name, host)
	return nil
}

func (r *labRun) writeData(host string) error {
	return r.withAB(host, func(ab *disk.AB) error {
		off, _ := ab.Range(ab.Data)
		_, err := ab.Disk.File().WriteAt(dataMarker, off+4096)
		return err
	})
}

func (r *labRun) checkData(host string) error {
	return r.withAB(host, func(ab *disk.AB) error {
		off, _ := ab.Range(ab.Data)
		got := make([]byte, len(dataMarker))
		if _, err := ab.Disk.ReadAt(got, off+4096); err != nil {
			return err
		}
		if !bytes.Equal(got, dataMarker) {
			return fmt.Errorf("DATA on %s changed: %q", host, got)
		}
		return nil
	})
}

func (r *labRun) withAB(host string, do func(*disk.AB) error) error {
	d, err := disk.Open(r.rack.servers[host].DiskPath)
	if err != nil {
		return err
	}
	defer func() { _ = d.Close() }()
	ab, err := disk.OpenAB(d)
	if err != nil {
		return err
	}
	return do(ab)
}
