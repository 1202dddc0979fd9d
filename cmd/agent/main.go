// Command agent is the Anvil agent: the program a server network-boots into. As PID 1 of
// the agent initramfs (make agent-image) it mounts the kernel filesystems, loads the kernel
// modules the initramfs carries, takes a DHCP lease on the boot NIC, reads anvil.api /
// anvil.token from the kernel command line, and runs the task loop (inventory, wipe,
// install, reboot). As an ordinary process (tests, the lab) it takes the command line and
// the disk as flags.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io/fs"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/go-logr/logr"
	"golang.org/x/sys/unix"
	"sigs.k8s.io/controller-runtime/pkg/log/zap"

	"github.com/anvil-metal/cluster-api-provider-anvil/internal/agent"
	"github.com/anvil-metal/cluster-api-provider-anvil/internal/agentloop"
	"github.com/anvil-metal/cluster-api-provider-anvil/internal/boot/agentapi"
	"github.com/anvil-metal/cluster-api-provider-anvil/internal/disk"
	"github.com/anvil-metal/cluster-api-provider-anvil/internal/initramfs"
	"github.com/anvil-metal/cluster-api-provider-anvil/internal/pid1"
)

func main() {
	cmdlinePath := flag.String("cmdline", "/proc/cmdline", "File holding the kernel command line.")
	diskPath := flag.String("disk", "", "Install onto this disk or image file instead of choosing by root device hints.")
	noReboot := flag.Bool("no-reboot", os.Getpid() != 1, "Exit instead of rebooting or powering off (default unless PID 1).")
	bootFiles := flag.String("grub-images", pid1.BootFilesDir, "Directory with the GRUB images (BOOTX64.EFI, core.img, boot.img) an A/B layout gets.")
	flag.Parse()
	log := zap.New(zap.UseDevMode(false))
	// One thread per stage of an install's pipeline, also on machines with fewer CPUs.
	agent.EnsureProcs()
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, os.Interrupt)
	defer stop()

	if os.Getpid() == 1 {
		if err := pid1.MountKernelFilesystems(); err != nil {
			log.Error(err, "mounting kernel filesystems")
		}
	}
	raw, err := os.ReadFile(*cmdlinePath)
	if err != nil {
		fail(err)
	}
	params, err := agentapi.ParseKernelCmdline(string(raw))
	if err != nil {
		fail(err)
	}
	boot, err := pid1.ParseCmdline(string(raw))
	if err != nil {
		fail(err)
	}
	if os.Getpid() == 1 {
		if err := initSystem(ctx, log, boot); err != nil {
			fail(err)
		}
	}
	layout, err := layoutOptions(*bootFiles, boot)
	if err != nil {
		fail(err)
	}

	end := func(cmd int) func(context.Context) error {
		return func(context.Context) error {
			unix.Sync()
			if *noReboot {
				return nil
			}
			return unix.Reboot(cmd)
		}
	}
	err = agentloop.Run(ctx, agentloop.Config{Params: params, Disk: *diskPath, Log: log, Layout: layout,
		Reboot: end(unix.LINUX_REBOOT_CMD_RESTART), PowerOff: end(unix.LINUX_REBOOT_CMD_POWER_OFF)})
	if err != nil {
		fail(err)
	}
}

// initSystem does PID 1's work before the loop: the drivers, then the network.
func initSystem(ctx context.Context, log logr.Logger, boot pid1.Cmdline) error {
	start := time.Now()
	order, err := pid1.ReadLoadOrder(initramfs.LoadOrderFile)
	switch {
	case errors.Is(err, fs.ErrNotExist):
		log.Info("no kernel modules to load", "list", initramfs.LoadOrderFile)
	case err != nil:
		return err
	default:
		rep := pid1.LoadForDevices(order, pid1.DeviceModaliases, pid1.FinitModule)
		for p, e := range rep.Failed {
			log.Info("kernel module not loaded", "module", p, "reason", e.Error())
		}
		log.Info("kernel modules loaded", "loaded", rep.Loaded, "failed", len(rep.Failed), "took", time.Since(start).Round(time.Millisecond).String())
	}
	lease, err := pid1.ConfigureNetwork(ctx, pid1.NetworkOptions{BootMAC: boot.BootMAC, Log: log})
	if err != nil {
		return fmt.Errorf("network: %w", err)
	}
	log.Info("network configured", "interface", lease.Interface, "mac", lease.MAC.String(), "address", lease.Address.String(),
		"router", lease.Router.String(), "dhcpServer", lease.Server.String(), "took", time.Since(start).Round(time.Millisecond).String())
	return nil
}

// layoutOptions is how an A/B layout the agent creates boots: with the GRUB images the
// initramfs carries, and the installed OS's console where the agent's is. Without the
// images (an agent run as an ordinary process) the layout gets no bootloader.
func layoutOptions(dir string, boot pid1.Cmdline) (disk.LayoutOptions, error) {
	var o disk.LayoutOptions
	if _, err := os.Stat(dir); err == nil {
		if o.Boot, err = pid1.ReadBootFiles(dir); err != nil {
			return o, err
		}
	}
	o.KernelArgs, o.SerialConsole = boot.OSKernelArgs()
	return o, nil
}

func fail(err error) {
	fmt.Fprintln(os.Stderr, "anvil agent:", err)
	if os.Getpid() == 1 {
		// PID 1 must not exit (the kernel would panic); leave the console readable and wait
		// for the controller's boot timeout to start a new attempt. (A bare select{} would
		// be reported as a deadlock and end the process.)
		for {
			time.Sleep(time.Hour)
		}
	}
	os.Exit(1)
}
