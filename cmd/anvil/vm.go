package main

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"

	corev1 "k8s.io/api/core/v1"

	infrav1 "github.com/anvil-metal/cluster-api-provider-anvil/api/v1alpha1"
	"github.com/anvil-metal/cluster-api-provider-anvil/internal/lab"
)

// vmMemoryMiB is each qemu VM's memory (its BMC reports it too).
const vmMemoryMiB = 1024

// vmSetup is what --vm needs: qemu, and the OS image the VMs can boot (also the lab's v1 image,
// so that whichever host a machine claims installs the same image).
type vmSetup struct {
	qemu  string
	image []byte
	// onPowerOn hears of each VM's power-on (the lab prints it).
	onPowerOn func(vm string, network bool)
}

// prepareVM finds qemu, builds the agent's kernel and initramfs into out/agent when they are
// missing (hack/agent-image.sh, as make agent-image does), and builds the VMs' OS image: the
// agent's Debian kernel and test/qemuos as init (lab.VMImage).
func prepareVM(workDir string, out io.Writer) (*vmSetup, error) {
	qemu, err := exec.LookPath("qemu-system-x86_64")
	if err != nil {
		return nil, fmt.Errorf("qemu-system-x86_64 not found (apt-get install qemu-system-x86): %w", err)
	}
	if _, err := exec.LookPath("mkfs.ext4"); err != nil {
		return nil, fmt.Errorf("mkfs.ext4 not found (apt-get install e2fsprogs): %w", err)
	}
	cwd, err := os.Getwd()
	if err != nil {
		return nil, err
	}
	root, err := lab.RootDir(cwd)
	if err != nil {
		return nil, err
	}
	script := filepath.Join(root, "hack", "agent-image.sh")
	agentDir := filepath.Join(root, agentImageDir)
	start := time.Now()
	if !fileExists(filepath.Join(agentDir, "vmlinuz")) || !fileExists(filepath.Join(agentDir, "initramfs.cpio.gz")) {
		fmt.Fprintf(out, "    building the agent image into %s (make agent-image)...\n", agentImageDir)
		if b, err := exec.Command(script, agentDir).CombinedOutput(); err != nil { //nolint:gosec // the repository's own script
			return nil, fmt.Errorf("%s: %w: %s", script, err, bytes.TrimSpace(b))
		}
	}
	kernel, err := exec.Command(script, "--kernel").Output() //nolint:gosec // the repository's own script
	if err != nil {
		return nil, fmt.Errorf("%s --kernel: %w", script, err)
	}
	version, tree, ok := strings.Cut(strings.TrimSpace(string(kernel)), " ")
	if !ok {
		return nil, fmt.Errorf("%s --kernel printed %q", script, kernel)
	}
	path, err := lab.VMImage(workDir, root, tree, version, "v1")
	if err != nil {
		return nil, err
	}
	image, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	_ = os.Remove(path)
	fmt.Fprintf(out, "    qemu VMs: %s; OS image v1 = Debian kernel %s + test/qemuos as init (%.0f MiB), built in %.1fs\n",
		qemu, version, float64(len(image))/(1<<20), time.Since(start).Seconds())
	return &vmSetup{qemu: qemu, image: image}, nil
}

// checkVMs says, for each qemu VM, whether a machine claimed it and, if so, that its host is
// Provisioned, with the in-band inventory the agent reported, and that its Node is Ready. A
// VM no machine claimed is only said to be spare.
func (r *labRun) checkVMs(ctx context.Context) error {
	if r.vm == nil {
		return nil
	}
	nodes, err := r.workloads.Nodes(ctx, r.clusterKey())
	if err != nil {
		return err
	}
	for _, name := range r.rack.names {
		if r.rack.vms[name] == nil {
			continue
		}
		h, err := r.host(ctx, name)
		if err != nil {
			return err
		}
		if h.Spec.Claim == nil {
			fmt.Fprintf(r.out, "    %s (qemu VM) is %s: no machine claimed it\n", name, h.Status.State)
			continue
		}
		if h.Status.State != infrav1.HostStateProvisioned {
			return fmt.Errorf("qemu VM %s is claimed but %s", name, hostWhy(*h))
		}
		// The host is Provisioned once the agent reported and rebooted; the VM then still has
		// to get through SeaBIOS, GRUB and its kernel under TCG.
		vm := r.rack.vms[name]
		if err := r.eventually(ctx, 6*time.Minute, func() (bool, string, error) {
			return vm.RunningSlot() != "", "waiting for qemu VM " + name + "'s OS to print its boot line on the serial console", nil
		}); err != nil {
			return err
		}
		ready := false
		for _, n := range nodes {
			if n.Name == name {
				for _, c := range n.Status.Conditions {
					ready = ready || (c.Type == corev1.NodeReady && c.Status == corev1.ConditionTrue)
				}
			}
		}
		if !ready {
			return fmt.Errorf("qemu VM %s is Provisioned but its node is not Ready", name)
		}
		inv := "no in-band inventory"
		if hw := h.Status.Hardware; hw != nil {
			inv = fmt.Sprintf("in-band inventory: %d CPU cores, %s memory, %d disks, %d NICs", hw.CPU.Cores, hw.Memory, len(hw.Disks), len(hw.NICs))
		}
		fmt.Fprintf(r.out, "    %s (qemu VM) is Provisioned for machine %s, runs slot %s, node %s Ready; %s\n",
			name, h.Spec.Claim.MachineRef.Name, vm.RunningSlot(), name, inv)
	}
	return nil
}
