// Command agentimage assembles the agent's network-boot artifacts from an extracted Debian
// kernel package and a static agent binary (hack/agent-image.sh fetches and builds those):
//
//	OUT/vmlinuz              the kernel
//	OUT/initramfs.cpio.gz    /init (the agent), the kernel modules it loads, the GRUB images
//	OUT/initramfs            a link to initramfs.cpio.gz (the name the boot services serve)
//	OUT/SHA256SUMS           sha256 of both files, as sha256sum writes them
//
// The initramfs is built in Go (package initramfs): no cpio, depmod or root needed.
package main

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/anvil-metal/cluster-api-provider-anvil/internal/disk"
	"github.com/anvil-metal/cluster-api-provider-anvil/internal/initramfs"
	"github.com/anvil-metal/cluster-api-provider-anvil/internal/pid1"
)

// AgentModules are the drivers the agent needs to see disks and reach the network: virtio
// (qemu/KVM and clouds), NVMe, AHCI/SATA and SCSI disks, and the common server NICs. Their
// dependencies come along by themselves.
var agentModules = []string{
	"virtio_pci", "virtio_blk", "virtio_scsi", "virtio_net",
	"nvme", "ahci", "sd_mod", "megaraid_sas", "mpt3sas",
	"e1000", "e1000e", "igb", "ixgbe", "i40e", "ice", "bnxt_en", "tg3", "r8169", "mlx5_core",
}

func main() {
	kernelRoot := flag.String("kernel-root", "", "Extracted linux-image package (holds boot/vmlinuz-VERSION and lib/modules/VERSION).")
	version := flag.String("kernel-version", "", "Kernel version, e.g. 6.1.0-56-amd64.")
	agentBin := flag.String("agent", "", "Static agent binary (becomes /init).")
	out := flag.String("out", "out/agent", "Output directory.")
	modules := flag.String("modules", strings.Join(agentModules, ","), "Kernel modules to include (comma-separated; dependencies are added).")
	flag.Parse()
	if *kernelRoot == "" || *version == "" || *agentBin == "" {
		fmt.Fprintln(os.Stderr, "agentimage: -kernel-root, -kernel-version and -agent are required")
		os.Exit(2)
	}
	if err := build(*kernelRoot, *version, *agentBin, *out, strings.Split(*modules, ",")); err != nil {
		fmt.Fprintln(os.Stderr, "agentimage:", err)
		os.Exit(1)
	}
}

func build(kernelRoot, version, agentBin, out string, modules []string) error {
	start := time.Now()
	kernel, err := os.ReadFile(filepath.Join(kernelRoot, "boot", "vmlinuz-"+version))
	if err != nil {
		return fmt.Errorf("kernel: %w", err)
	}
	agent, err := os.ReadFile(agentBin)
	if err != nil {
		return err
	}
	a := initramfs.New()
	if err := a.AddFile("init", agent, 0o755); err != nil {
		return err
	}
	mods, err := a.AddKernelModules(filepath.Join(kernelRoot, "lib", "modules", version), version, modules)
	if err != nil {
		return err
	}
	grub, err := disk.MakeBootFiles(context.Background(), "")
	if err != nil {
		return fmt.Errorf("GRUB images (Debian: grub-common grub-efi-amd64-bin grub-pc-bin): %w", err)
	}
	for name, data := range map[string][]byte{pid1.BootFileEFI: grub.EFI, pid1.BootFileBIOSCore: grub.BIOSCore, pid1.BootFileBIOSBoot: grub.BIOSBoot} {
		if err := a.AddFile(filepath.Join(pid1.BootFilesDir, name), data, 0o644); err != nil {
			return err
		}
	}
	for _, d := range []string{"proc", "sys", "dev", "tmp", "etc", "run"} {
		if err := a.AddDir(d, 0o755); err != nil {
			return err
		}
	}
	cpio, err := a.Gzip()
	if err != nil {
		return err
	}
	if err := os.MkdirAll(out, 0o755); err != nil { //nolint:gosec // build output
		return err
	}
	files := []struct {
		name string
		data []byte
	}{{"vmlinuz", kernel}, {"initramfs.cpio.gz", cpio}}
	var sums strings.Builder
	for _, f := range files {
		if err := os.WriteFile(filepath.Join(out, f.name), f.data, 0o644); err != nil { //nolint:gosec // served to booting servers
			return err
		}
		s := sha256.Sum256(f.data)
		fmt.Fprintf(&sums, "%s  %s\n", hex.EncodeToString(s[:]), f.name)
	}
	link := filepath.Join(out, "initramfs")
	_ = os.Remove(link)
	if err := os.Symlink("initramfs.cpio.gz", link); err != nil {
		return err
	}
	if err := os.WriteFile(filepath.Join(out, "SHA256SUMS"), []byte(sums.String()), 0o644); err != nil { //nolint:gosec // build output
		return err
	}
	fmt.Printf("agentimage: kernel %s (%.1f MiB), initramfs %.1f MiB (%.1f MiB unpacked, %d kernel modules) in %s -> %s\n",
		version, float64(len(kernel))/(1<<20), float64(len(cpio))/(1<<20), float64(a.Size())/(1<<20), len(mods),
		time.Since(start).Round(100*time.Millisecond), out)
	return nil
}
