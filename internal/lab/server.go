// Package lab emulates servers that behave like hardware for the demo and end-to-end tests:
// power follows the emulated BMC; a network boot does what a PXE ROM and iPXE do on the lab's
// provisioning network (a DHCP lease, TFTP of iPXE, the script and the agent's kernel and
// initramfs over HTTP; see netboot) and then runs the real agent loop, with the script's kernel
// command line, against a sparse disk file; a disk boot does what
// GRUB's boot counting does with the installed environment block, then "runs the OS": reads
// the config drive and passes the health gate.
package lab

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"regexp"
	"strings"
	"sync"
	"time"

	"github.com/go-logr/logr"

	infrav1 "github.com/anvil-metal/cluster-api-provider-anvil/api/v1alpha1"
	"github.com/anvil-metal/cluster-api-provider-anvil/internal/agentloop"
	"github.com/anvil-metal/cluster-api-provider-anvil/internal/boot/agentapi"
	"github.com/anvil-metal/cluster-api-provider-anvil/internal/disk"
	"github.com/anvil-metal/cluster-api-provider-anvil/internal/netns"
	"github.com/anvil-metal/cluster-api-provider-anvil/internal/vbmc/machine"
)

// OSBoot is what the emulated OS found when it came up from disk.
type OSBoot struct {
	Server string
	Slot   infrav1.Slot
	// MetaData and UserData are the config drive's files.
	MetaData, UserData []byte
	// RootHead is the first bytes of the slot's root filesystem: what the OS image is.
	RootHead []byte
}

// ProviderID reads provider-id from the meta-data.
func (o OSBoot) ProviderID() string {
	m := regexp.MustCompile(`(?m)^provider-id:\s*"?([^"\n]+)"?`).FindSubmatch(o.MetaData)
	if m == nil {
		return ""
	}
	return strings.TrimSpace(string(m[1]))
}

// Server is one emulated server.
type Server struct {
	Name     string
	MAC      string
	Machine  *machine.Machine
	DiskPath string
	// Net is the server's port on the lab's provisioning network (its own network namespace),
	// where its firmware takes a DHCP lease and loads iPXE over TFTP. Nil means no such
	// network: the firmware then asks BootURL's script endpoint for its MAC directly.
	Net *netns.Host
	// OnNetworkBoot is told what the firmware did on each network boot over Net.
	OnNetworkBoot func(NetworkBoot)
	// BootURL is the boot services' public URL.
	BootURL   string
	Inventory *infrav1.HardwareInventory
	// OSBooted is called when the emulated OS is up; its answer is the health gate (true
	// marks the slot good).
	OSBooted func(context.Context, OSBoot) bool
	Log      logr.Logger

	mu     sync.Mutex
	cancel context.CancelFunc // stops whatever the server is running (agent or OS)
	// Slot is the slot the running OS booted from ("" when not running an OS).
	slot infrav1.Slot
}

// NewDisk creates a sparse disk file of size bytes.
func NewDisk(path string, size int64) error {
	f, err := os.Create(path)
	if err != nil {
		return err
	}
	if err := f.Truncate(size); err != nil {
		_ = f.Close()
		return err
	}
	return f.Close()
}

// Start follows the machine's power until ctx ends.
func (s *Server) Start(ctx context.Context) {
	unsubscribe := s.Machine.Subscribe(func(e machine.Event) {
		switch e.Kind {
		case machine.EventPowerOff:
			s.stopRunning()
		case machine.EventBoot:
			s.stopRunning()
			runCtx, cancel := context.WithCancel(ctx)
			s.mu.Lock()
			s.cancel = cancel
			s.mu.Unlock()
			go s.boot(runCtx, e.Boot)
		}
	})
	go func() {
		<-ctx.Done()
		unsubscribe()
		s.stopRunning()
	}()
}

// RunningSlot is the slot the emulated OS runs from, "" when it runs none.
func (s *Server) RunningSlot() infrav1.Slot {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.slot
}

func (s *Server) stopRunning() {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.cancel != nil {
		s.cancel()
		s.cancel = nil
	}
	s.slot = ""
}

func (s *Server) boot(ctx context.Context, b machine.BootOverride) {
	if b.Target == machine.BootPxe {
		fetch := s.fetchScript
		if s.Net != nil {
			fetch = func(ctx context.Context) (agentapi.BootParams, bool) { return s.netboot(ctx, b.Mode) }
		}
		if params, ok := fetch(ctx); ok {
			s.runAgent(ctx, params)
			return
		}
		// The script said exit: the firmware moves on to the disk, as real firmware does.
	}
	s.bootDisk(ctx)
}

// fetchScript is the firmware without a network: ask the boot services' HTTP endpoint what
// this MAC should boot.
func (s *Server) fetchScript(ctx context.Context) (agentapi.BootParams, bool) {
	url := s.BootURL + "/ipxe/mac/" + strings.ReplaceAll(s.MAC, ":", "-")
	req, _ := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		s.Log.Info("network boot failed", "error", err.Error())
		return agentapi.BootParams{}, false
	}
	defer func() { _ = resp.Body.Close() }()
	script, _ := io.ReadAll(io.LimitReader(resp.Body, 64<<10))
	line := regexp.MustCompile(`(?m)^kernel .*$`).FindString(string(script))
	if line == "" {
		return agentapi.BootParams{}, false
	}
	params, err := agentapi.ParseKernelCmdline(line)
	if err != nil {
		s.Log.Info("bad kernel line in the boot script", "error", err.Error())
		return agentapi.BootParams{}, false
	}
	return params, true
}

// dial is how the server's firmware, agent and OS open connections: from its own namespace on
// the provisioning network (where the boot services' HTTP listens), or, without one, from the
// lab's (nil: the default dialer, the boot services on loopback).
func (s *Server) dial() func(ctx context.Context, network, addr string) (net.Conn, error) {
	if s.Net == nil {
		return nil
	}
	return s.Net.DialContext
}

// httpClient is a client that dials as the server does (see dial), with the given timeout.
func (s *Server) httpClient(timeout time.Duration) *http.Client {
	return dialingClient(s.dial(), timeout)
}

// dialingClient is an HTTP client whose connections dial opens (nil: the default dialer).
func dialingClient(dial func(ctx context.Context, network, addr string) (net.Conn, error), timeout time.Duration) *http.Client {
	if dial == nil {
		return &http.Client{Timeout: timeout}
	}
	tr := http.DefaultTransport.(*http.Transport).Clone()
	tr.Proxy, tr.DialContext = nil, dial
	return &http.Client{Transport: tr, Timeout: timeout}
}

func (s *Server) runAgent(ctx context.Context, params agentapi.BootParams) {
	restart := func(t machine.ResetType) func(context.Context) error {
		// The agent's reboot must not wait for its own subscriber callback: reset from a
		// fresh goroutine after the agent returned.
		return func(context.Context) error {
			go func() { _ = s.Machine.Reset(t) }()
			return nil
		}
	}
	err := agentloop.Run(ctx, agentloop.Config{Params: params, Disk: s.DiskPath, Log: s.Log.WithName("agent"),
		Inventory: func() (*infrav1.HardwareInventory, error) { return s.Inventory.DeepCopy(), nil },
		Reboot:    restart(machine.ResetForceRestart), PowerOff: restart(machine.ResetForceOff), Dial: s.dial(),
		// The gate's files (and its boot-report URL and token) go on the config drive; the
		// emulated OS does what they do (see bootDisk). User-data stays as CABPK wrote it.
		HealthGate: &disk.HealthGate{NoUserDataHook: true},
		Client:     agentapi.ClientOptions{MaxAttempts: 5, InitialBackoff: 100 * time.Millisecond}})
	if err != nil && ctx.Err() == nil {
		s.Log.Info("agent stopped", "error", err.Error())
	}
}

// bootDisk does what the installed GRUB configuration does: try the pending slot while it
// has tries (saving the decrement first), otherwise boot the active one.
func (s *Server) bootDisk(ctx context.Context) {
	d, err := disk.Open(s.DiskPath)
	if err != nil {
		return
	}
	defer func() { _ = d.Close() }()
	ab, err := disk.OpenAB(d)
	if err != nil {
		s.Log.Info("no bootable disk: the firmware stops here", "server", s.Name)
		return
	}
	env, err := ab.ReadEnv()
	if err != nil {
		return
	}
	slot := infrav1.Slot(env.Get("active"))
	if next := env.Get("next"); next != "" {
		tries := 0
		_, _ = fmt.Sscanf(env.Get("tries"), "%d", &tries)
		if tries > 0 {
			env.Set("tries", fmt.Sprint(tries-1))
			slot = infrav1.Slot(next)
		} else {
			env.Set("failed", next)
			env.Unset("next")
		}
		if err := ab.WriteEnv(env); err != nil {
			return
		}
	}
	if slot == "" {
		return
	}
	onTrial := env.Get("next") == string(slot)
	meta, _ := ab.ReadConfigDrive("meta-data")
	user, _ := ab.ReadConfigDrive("user-data")
	gateEnv, _ := ab.ReadConfigDrive("anvil/anvil.env")
	head := make([]byte, 256)
	if part, err := ab.Slot(slot); err == nil {
		off, _ := ab.Range(part)
		_, _ = d.ReadAt(head, off)
	}
	s.mu.Lock()
	s.slot = slot
	s.mu.Unlock()
	good := s.OSBooted != nil && s.OSBooted(ctx, OSBoot{Server: s.Name, Slot: slot, MetaData: meta, UserData: user, RootHead: head})
	// What anvil-mark-good does: mark the slot good once healthy, report the boot, and spend
	// another try when the slot on trial is not healthy.
	if good {
		_ = ab.MarkGood(slot)
	}
	failed := ""
	if e, err := ab.ReadEnv(); err == nil {
		failed = e.Get("failed")
	}
	s.reportBoot(ctx, gateEnv, slot, good, failed)
	if !good && onTrial {
		go func() { _ = s.Machine.Reset(machine.ResetForceRestart) }()
	}
}

// reportBoot posts the boot report the health gate sends, with the URL and token the agent
// put into anvil/anvil.env.
func (s *Server) reportBoot(ctx context.Context, gateEnv []byte, slot infrav1.Slot, good bool, failed string) {
	s.reportVia(ctx, s.dial(), gateEnv, slot, good, failed)
}

// reportVia posts the boot report with connections dial opens.
func (s *Server) reportVia(ctx context.Context, dial func(ctx context.Context, network, addr string) (net.Conn, error),
	gateEnv []byte, slot infrav1.Slot, good bool, failed string) {
	vars := map[string]string{}
	for _, line := range strings.Split(string(gateEnv), "\n") {
		if k, v, ok := strings.Cut(line, "="); ok {
			vars[k] = v
		}
	}
	url, token := vars["ANVIL_REPORT_URL"], vars["ANVIL_REPORT_TOKEN"]
	if url == "" || token == "" {
		return
	}
	body, _ := json.Marshal(agentapi.BootReport{Slot: slot, Good: good, Failed: infrav1.Slot(failed)})
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, url, bytes.NewReader(body))
	if err != nil {
		return
	}
	req.Header.Set("Authorization", "Bearer "+token)
	req.Header.Set("Content-Type", "application/json")
	resp, err := dialingClient(dial, time.Minute).Do(req)
	if err != nil {
		s.Log.Info("boot report failed", "error", err.Error())
		return
	}
	_ = resp.Body.Close()
}
