// Package agentloop is the Anvil agent's main loop: register with the boot services' agent
// API, then run the tasks it hands out (install, wipe, reboot, power off) one at a time and
// report each result. cmd/agent runs it as PID 1 on a real server; the lab runs it in-process
// for each emulated server, against a disk image file.
package agentloop

import (
	"context"
	"errors"
	"fmt"
	"net"
	"strings"
	"time"

	"github.com/go-logr/logr"

	infrav1 "github.com/anvil-metal/cluster-api-provider-anvil/api/v1alpha1"
	"github.com/anvil-metal/cluster-api-provider-anvil/internal/agent"
	"github.com/anvil-metal/cluster-api-provider-anvil/internal/boot/agentapi"
	"github.com/anvil-metal/cluster-api-provider-anvil/internal/disk"
)

// Version is reported at registration.
const Version = "anvil-agent/v1alpha1"

// Config is where the loop runs.
type Config struct {
	// Params come from the kernel command line (anvil.api, anvil.token, anvil.ca).
	Params agentapi.BootParams
	// Roots locate /sys, /proc and /dev (a fake tree in tests).
	Roots agent.Roots
	// Disk, when set, is the only disk (a path; the lab's sparse image file); otherwise disks
	// are found under Roots and chosen by the task's root device hints.
	Disk string
	// Inventory reports the hardware; default agent.Inventory over Roots.
	Inventory func() (*infrav1.HardwareInventory, error)
	// Reboot and PowerOff end the loop the way the platform does it (the reboot(2) syscall
	// on a real server; the emulated server's power in the lab).
	Reboot, PowerOff func(context.Context) error
	// HealthGate goes onto config drives (nil: none; the OS then keeps a pending slot only
	// until GRUB's tries run out, unless the image marks it good itself).
	HealthGate *disk.HealthGate
	// Layout configures an A/B layout the install creates: the GRUB images the agent carries
	// and grub.cfg's kernel arguments and console.
	Layout disk.LayoutOptions
	Client agentapi.ClientOptions
	// Dial, when set, opens every connection the agent makes (API calls, image downloads)
	// unless Client names its own HTTPClient; nil means the default dialer. The lab's
	// emulated servers dial from their own network namespace with it.
	Dial func(ctx context.Context, network, addr string) (net.Conn, error)
	Log  logr.Logger
}

// Run registers and works until a reboot or power-off task ends it, or ctx ends.
func Run(ctx context.Context, cfg Config) error {
	log := cfg.Log
	opts := cfg.Client
	if opts.DialContext == nil {
		opts.DialContext = cfg.Dial
	}
	client, err := agentapi.NewClient(cfg.Params.APIURL, cfg.Params.Token, opts)
	if err != nil {
		return err
	}
	inventory := cfg.Inventory
	if inventory == nil {
		inventory = func() (*infrav1.HardwareInventory, error) {
			return agent.Inventory(agent.InventoryOptions{Roots: cfg.Roots})
		}
	}
	inv, err := inventory()
	if err != nil {
		return fmt.Errorf("inventory: %w", err)
	}
	reg, err := client.Register(ctx, Version, *inv)
	if err != nil {
		return fmt.Errorf("register: %w", err)
	}
	log.Info("registered", "host", reg.Host, "attempt", reg.Attempt)

	for {
		task, err := client.NextTask(ctx)
		if err != nil {
			return fmt.Errorf("next task: %w", err)
		}
		switch task.Kind {
		case agentapi.TaskNone:
			wait := time.Duration(max(task.RetryAfterSeconds, 1)) * time.Second
			select {
			case <-ctx.Done():
				return ctx.Err()
			case <-time.After(wait):
			}
			continue
		case agentapi.TaskReboot, agentapi.TaskPowerOff:
			if err := client.Result(ctx, agentapi.Result{TaskID: task.ID, Kind: task.Kind, OK: true}); err != nil {
				return err
			}
			log.Info("finished", "task", task.Kind)
			if task.Kind == agentapi.TaskReboot {
				return cfg.Reboot(ctx)
			}
			return cfg.PowerOff(ctx)
		}

		result := agentapi.Result{TaskID: task.ID, Kind: task.Kind, OK: true}
		var taskErr error
		switch task.Kind {
		case agentapi.TaskInstall:
			taskErr = install(ctx, cfg, client, task, &result)
		case agentapi.TaskWipe:
			taskErr = wipe(ctx, cfg, client, task)
		default:
			taskErr = fmt.Errorf("unknown task kind %q", task.Kind)
		}
		if taskErr != nil {
			result.OK, result.Error = false, taskErr.Error()
			log.Error(taskErr, "task failed", "task", task.Kind)
		}
		if err := client.Result(ctx, result); err != nil {
			return fmt.Errorf("reporting %s: %w", task.Kind, err)
		}
		if taskErr != nil {
			return taskErr // the controller starts a new attempt; this agent's work is over
		}
	}
}

func install(ctx context.Context, cfg Config, client *agentapi.Client, task agentapi.Task, result *agentapi.Result) error {
	if task.Image == nil || task.ConfigDrive == nil {
		return errors.New("install task without image or config drive")
	}
	userData, err := client.BootstrapData(ctx)
	if err != nil {
		return fmt.Errorf("bootstrap data: %w", err)
	}
	cd := &disk.ConfigDrive{UserData: userData, HealthGate: reportingGate(ctx, cfg, client), MetaData: disk.MetaData{
		InstanceID: task.ConfigDrive.MetaData.InstanceID, LocalHostname: task.ConfigDrive.MetaData.LocalHostname,
		ProviderID: task.ConfigDrive.MetaData.ProviderID}}
	if task.ConfigDrive.NetworkConfig != "" {
		cd.NetworkConfig = []byte(task.ConfigDrive.NetworkConfig)
	}
	src := agent.ImageSource{URL: task.Image.URL, Checksum: task.Image.Checksum, Format: task.Image.Format, Layout: task.Image.Layout}
	if cfg.Dial != nil {
		src.Client = agent.ImageClient(cfg.Dial)
	}
	lastPercent := int32(-10)
	res, err := agent.Install(ctx, src, cfg.Disk, agent.InstallOptions{Hints: task.RootDeviceHints, Roots: cfg.Roots, ConfigDrive: cd, Layout: cfg.Layout,
		Progress: func(p agent.Progress) {
			if p.DownloadTotal <= 0 {
				return
			}
			percent := int32(min(p.Downloaded*100/p.DownloadTotal, 100)) //nolint:gosec // bounded to 0..100
			if percent-lastPercent >= 10 {                               // a report per tenth keeps the API quiet
				lastPercent = percent
				_ = client.Progress(ctx, agentapi.Progress{TaskID: task.ID, Step: "write", Percent: percent,
					Message: fmt.Sprintf("%d MiB written", p.Written>>20)})
			}
		}})
	if err != nil {
		return err
	}
	result.Slot, result.Disk, result.ImageChecksum = res.Slot, res.Disk, res.Checksum
	return nil
}

// reportingGate is the configured health gate, with the report URL and this install's report
// token when the boot services hand one out (older ones do not: the gate then only marks the
// slot good, and Anvil learns nothing of the boot).
func reportingGate(ctx context.Context, cfg Config, client *agentapi.Client) *disk.HealthGate {
	if cfg.HealthGate == nil {
		return nil
	}
	gate := *cfg.HealthGate
	tok, err := client.ReportToken(ctx)
	if err != nil {
		cfg.Log.Info("no boot-report token; the installed OS will not report its boots", "reason", err.Error())
		return &gate
	}
	gate.ReportURL, gate.ReportToken = strings.TrimSuffix(cfg.Params.APIURL, "/")+agentapi.PathBootReport, tok
	return &gate
}

func wipe(ctx context.Context, cfg Config, client *agentapi.Client, task agentapi.Task) error {
	targets := []string{cfg.Disk}
	if cfg.Disk == "" {
		var err error
		if targets, err = agent.WipeTargets(cfg.Roots, agent.WipeAllDisks, nil); err != nil {
			return err
		}
	}
	_, err := agent.Wipe(ctx, targets, agent.WipeOptions{Policy: task.WipePolicy, Progress: func(p agent.WipeProgress) {
		if p.Total > 0 && p.Done == p.Total {
			_ = client.Progress(ctx, agentapi.Progress{TaskID: task.ID, Step: p.Phase, Percent: 100, Message: p.Disk})
		}
	}})
	return err
}
