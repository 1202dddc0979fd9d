package disk

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
)

// grubModules are the GRUB modules built into the images. Everything the A/B grub.cfg uses
// is here, plus the filesystems a root image may use (ext2 covers ext2/3/4). No module is
// ever loaded from disk, so the ESP needs no grub/ directory.
func grubModules(format string) []string {
	m := []string{
		"part_gpt", "fat", "ext2", "xfs", "btrfs", "normal", "linux", "loadenv", "test", "regexp", "echo",
		"serial", "terminal", "search", "search_fs_uuid", "search_label", "configfile", "halt", "reboot",
		"sleep", "gzio", "probe", "true",
	}
	if format == "i386-pc" {
		return append(m, "biosdisk")
	}
	return append(m, "efi_gop")
}

// MakeBootFiles builds the GRUB images with grub-mkimage (Debian: grub-common,
// grub-efi-amd64-bin, grub-pc-bin). It is a build-time helper for tests and image pipelines;
// the agent itself only writes the results. grubLib is GRUB's module directory root
// (default /usr/lib/grub).
func MakeBootFiles(ctx context.Context, grubLib string) (BootFiles, error) {
	if grubLib == "" {
		grubLib = "/usr/lib/grub"
	}
	dir, err := os.MkdirTemp("", "anvil-grub-")
	if err != nil {
		return BootFiles{}, err
	}
	defer func() { _ = os.RemoveAll(dir) }()
	var bf BootFiles
	mk := func(format, prefix, out string) ([]byte, error) {
		args := []string{"-d", filepath.Join(grubLib, format), "-O", format, "-p", prefix, "-o", filepath.Join(dir, out)}
		args = append(args, grubModules(format)...)
		cmd := exec.CommandContext(ctx, "grub-mkimage", args...) //nolint:gosec // fixed program; arguments are our constants and paths
		if b, err := cmd.CombinedOutput(); err != nil {
			return nil, fmt.Errorf("grub-mkimage -O %s: %w: %s", format, err, b)
		}
		return os.ReadFile(filepath.Join(dir, out))
	}
	if bf.EFI, err = mk("x86_64-efi", "/"+ESPBootDir, "BOOTX64.EFI"); err != nil {
		return bf, err
	}
	// (,gpt2): partition 2 (the ESP) of the disk the BIOS booted from.
	if bf.BIOSCore, err = mk("i386-pc", fmt.Sprintf("(,gpt%d)/%s", PartESP, ESPBootDir), "core.img"); err != nil {
		return bf, err
	}
	if bf.BIOSBoot, err = os.ReadFile(filepath.Join(grubLib, "i386-pc", "boot.img")); err != nil {
		return bf, err
	}
	return bf, nil
}
