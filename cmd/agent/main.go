// Command agent is the Anvil agent: the program a server network-boots into. As PID 1 of
// the agent initramfs it mounts the kernel filesystems, reads anvil.api/anvil.token from the
// kernel command line, and runs the task loop (inventory, wipe, install, reboot). As an
// ordinary process (tests, the lab) it takes the command line and the disk as flags.
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"syscall"

	"golang.org/x/sys/unix"
	"sigs.k8s.io/controller-runtime/pkg/log/zap"

	"github.com/anvil-metal/cluster-api-provider-anvil/internal/agent"
	"github.com/anvil-metal/cluster-api-provider-anvil/internal/agentloop"
	"github.com/anvil-metal/cluster-api-provider-anvil/internal/boot/agentapi"
)

func main() {
	cmdlinePath := flag.String("cmdline", "/proc/cmdline", "File holding the kernel command line.")
	diskPath := flag.String("disk", "", "Install onto this disk or image file instead of choosing by root device hints.")
	noReboot := flag.Bool("no-reboot", os.Getpid() != 1, "Exit instead of rebooting or powering off (default unless PID 1).")
	flag.Parse()
	log := zap.New(zap.UseDevMode(false))
	// One thread per stage of an install's pipeline, also on machines with fewer CPUs.
	agent.EnsureProcs()

	if os.Getpid() == 1 {
		if err := mountKernelFilesystems(); err != nil {
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
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, os.Interrupt)
	defer stop()

	end := func(cmd int) func(context.Context) error {
		return func(context.Context) error {
			unix.Sync()
			if *noReboot {
				return nil
			}
			return unix.Reboot(cmd)
		}
	}
	err = agentloop.Run(ctx, agentloop.Config{Params: params, Disk: *diskPath, Log: log,
		Reboot: end(unix.LINUX_REBOOT_CMD_RESTART), PowerOff: end(unix.LINUX_REBOOT_CMD_POWER_OFF)})
	if err != nil {
		fail(err)
	}
}

// mountKernelFilesystems gives PID 1 the /proc, /sys and /dev that inventory and disk
// access need.
func mountKernelFilesystems() error {
	for _, m := range []struct{ source, target, fstype string }{
		{"proc", "/proc", "proc"}, {"sysfs", "/sys", "sysfs"}, {"devtmpfs", "/dev", "devtmpfs"},
	} {
		if err := os.MkdirAll(m.target, 0o755); err != nil { //nolint:gosec // /proc, /sys and /dev must be world-readable
			return err
		}
		if err := unix.Mount(m.source, m.target, m.fstype, 0, ""); err != nil && err != unix.EBUSY {
			return fmt.Errorf("mount %s: %w", m.target, err)
		}
	}
	return nil
}

func fail(err error) {
	fmt.Fprintln(os.Stderr, "anvil agent:", err)
	if os.Getpid() == 1 {
		// PID 1 must not exit (the kernel would panic); leave the console readable and wait
		// for the controller's boot timeout to start a new attempt.
		select {}
	}
	os.Exit(1)
}
