// Package bootservices assembles what a powered-on server talks to — the HTTP boot endpoints
// (iPXE scripts, agent artifacts, the image cache, the agent API) and, where configured, DHCP
// and TFTP — around the provisioning backend, as one Runnable the manager starts (or a
// standalone process runs with hostNetwork on the provisioning network).
package bootservices

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/netip"
	"time"

	"github.com/go-logr/logr"
	"k8s.io/apimachinery/pkg/types"

	infrav1 "github.com/anvil-metal/cluster-api-provider-anvil/api/v1alpha1"
	"github.com/anvil-metal/cluster-api-provider-anvil/internal/boot/agentapi"
	"github.com/anvil-metal/cluster-api-provider-anvil/internal/boot/dhcp"
	"github.com/anvil-metal/cluster-api-provider-anvil/internal/boot/httpboot"
	"github.com/anvil-metal/cluster-api-provider-anvil/internal/boot/tftp"
	"github.com/anvil-metal/cluster-api-provider-anvil/internal/boot/token"
	"github.com/anvil-metal/cluster-api-provider-anvil/internal/imagecache"
	"github.com/anvil-metal/cluster-api-provider-anvil/internal/provision"
)

// Config describes the boot services.
type Config struct {
	// HTTPAddress to listen on, e.g. ":8081" or "127.0.0.1:0".
	HTTPAddress string
	// PublicURL is how booting servers reach the HTTP endpoints, e.g. http://192.168.10.1:8081.
	// Empty means http://<the listener's address>.
	PublicURL string
	// ArtifactsDir holds the agent kernel (vmlinuz) and initramfs.
	ArtifactsDir string
	// ImageCacheDir and ImageCacheBytes configure the pull-through image cache.
	ImageCacheDir   string
	ImageCacheBytes int64
	// AllowLocalImages lets the cache fetch from loopback (labs only).
	AllowLocalImages bool
	// TokenKey signs boot tokens; empty draws a random one (tokens then die with the process).
	TokenKey []byte
	// DHCP serves proxy or reservation DHCP on DHCPInterface (mode off: the site's DHCP
	// points servers at TFTPDir's iPXE and at PublicURL/ipxe/boot.ipxe itself).
	DHCPMode      dhcp.Mode
	DHCPInterface string
	// ServerIP is this machine's address on the provisioning network (DHCP server id, TFTP).
	ServerIP netip.Addr
	// TFTPAddress serves the iPXE binaries (default ":69" when DHCP is on); TFTPDir holds them
	// (default Debian's /usr/lib/ipxe).
	TFTPAddress, TFTPDir string
	// TFTPSinglePort serves every transfer from the port-69 socket (tftp.Config.SinglePort):
	// for firewalls that only pass port 69, and for callers that opened the sockets in a
	// network namespace other than the process's (a transfer's own socket would be made in
	// the process's).
	TFTPSinglePort bool
	// Backend options (Secrets reader, Notify, timeouts); ImageURL is filled in here.
	Backend provision.Options
	// AgentKernelArgs are added to the agent kernel's command line (httpboot.Options.ExtraKernelArgs).
	AgentKernelArgs []string
	// OnServed is told of every iPXE script and agent artifact served (httpboot.Options).
	OnServed func(httpboot.Served)
	Log      logr.Logger
}

// Services is the running (or ready to run) boot services.
type Services struct {
	cfg      Config
	Backend  *provision.Backend
	Tokens   *token.Issuer
	Images   *imagecache.Cache
	listener net.Listener
	server   *http.Server
	dhcp     *dhcp.Server
	tftp     *tftp.Server
	// Booting is the DHCP server's view: the MACs Anvil is network-booting now.
	Booting *dhcp.MemoryHosts
	// SecurityEvents receives what the agent API flags (forged tokens, second registrations).
	SecurityEvents func(agentapi.SecurityEvent)
}

// New builds the services and binds the HTTP listener (so PublicURL is known at once).
func New(cfg Config) (*Services, error) {
	s := &Services{cfg: cfg}
	var err error
	if s.Tokens, err = token.NewIssuer(token.Options{Key: cfg.TokenKey}); err != nil {
		return nil, err
	}
	if s.Images, err = imagecache.New(imagecache.Options{Dir: cfg.ImageCacheDir, MaxBytes: cfg.ImageCacheBytes,
		AllowLocal: cfg.AllowLocalImages, Log: cfg.Log.WithName("imagecache")}); err != nil {
		return nil, err
	}
	if s.listener, err = net.Listen("tcp", cfg.HTTPAddress); err != nil {
		return nil, fmt.Errorf("boot HTTP listener: %w", err)
	}
	if s.cfg.PublicURL == "" {
		s.cfg.PublicURL = "http://" + s.listener.Addr().String()
	}
	backendOpts := cfg.Backend
	backendOpts.ImageURL = func(img infrav1.Image) (string, error) {
		return s.Images.URL(s.cfg.PublicURL, imagecache.Source{URL: img.URL, Checksum: img.Checksum, Format: img.Format})
	}
	s.Booting = dhcp.NewMemoryHosts()
	backendOpts.OnBoot = func(mac net.HardwareAddr, h *infrav1.AnvilHost) { _ = s.Booting.Set(mac, dhcpHost(h)) }
	backendOpts.OnBootDone = s.Booting.Delete
	s.Backend = provision.New(backendOpts)
	if cfg.DHCPMode != "" && cfg.DHCPMode != dhcp.ModeOff {
		if err := s.setupDHCPAndTFTP(); err != nil {
			_ = s.listener.Close()
			return nil, err
		}
	}

	api, err := agentapi.NewServer(agentapi.ServerOptions{Tokens: s.Tokens, Backend: s.Backend, Log: cfg.Log.WithName("agentapi"),
		BootReports: s.Backend,
		ReportTokens: func(host types.NamespacedName, attempt string) (string, error) {
			return s.Tokens.Issue(host, attempt, token.MaxTTL)
		},
		OnSecurityEvent: func(e agentapi.SecurityEvent) {
			cfg.Log.Info("agent API security event", "kind", e.Kind, "host", e.Host, "token", e.TokenID)
			if s.SecurityEvents != nil {
				s.SecurityEvents(e)
			}
		}})
	if err != nil {
		_ = s.listener.Close()
		return nil, err
	}
	handler, err := httpboot.NewHandler(httpboot.Options{Hosts: s.Backend, Tokens: s.Tokens, PublicURL: s.cfg.PublicURL,
		ArtifactsDir: cfg.ArtifactsDir, Images: s.Images, AgentAPI: api, OnServed: cfg.OnServed, ExtraKernelArgs: cfg.AgentKernelArgs, Log: cfg.Log.WithName("httpboot")})
	if err != nil {
		_ = s.listener.Close()
		return nil, err
	}
	s.server = httpboot.NewServer(cfg.HTTPAddress, handler)
	return s, nil
}

func (s *Services) setupDHCPAndTFTP() error {
	dir := s.cfg.TFTPDir
	if dir == "" {
		dir = "/usr/lib/ipxe"
	}
	ipxe := tftp.FindIPXE(dir)
	if len(ipxe.Missing) > 0 {
		return fmt.Errorf("iPXE binaries missing from %s: %v (install Debian's ipxe package or set the TFTP directory)", dir, ipxe.Missing)
	}
	addr := s.cfg.TFTPAddress
	if addr == "" {
		addr = ":69"
	}
	var err error
	if s.tftp, err = tftp.New(tftp.Config{Files: ipxe.FS(), Addr: addr, Interface: s.cfg.DHCPInterface,
		SinglePort: s.cfg.TFTPSinglePort, Log: s.cfg.Log.WithName("tftp")}); err != nil {
		return err
	}
	s.dhcp, err = dhcp.New(dhcp.Config{Mode: s.cfg.DHCPMode, Interface: s.cfg.DHCPInterface, ServerIP: s.cfg.ServerIP,
		TFTPServer: s.cfg.ServerIP, HTTPBaseURL: s.cfg.PublicURL, ScriptURL: s.cfg.PublicURL + "/ipxe/mac/{mac}",
		Hosts: s.Booting, Log: s.cfg.Log.WithName("dhcp")})
	return err
}

// dhcpHost is the DHCP server's record of a host being network-booted.
func dhcpHost(h *infrav1.AnvilHost) dhcp.Host {
	host := dhcp.Host{Name: h.Name, Namespace: h.Namespace, BootEnabled: true}
	if bn := h.Spec.BootNetwork; bn != nil {
		if p, err := netip.ParsePrefix(bn.Address); err == nil {
			host.IP = p
		}
		if g, err := netip.ParseAddr(bn.Gateway); err == nil {
			host.Gateway = g
		}
		for _, d := range bn.Nameservers {
			if a, err := netip.ParseAddr(d); err == nil {
				host.DNS = append(host.DNS, a)
			}
		}
	}
	return host
}

// Listen opens the DHCP and TFTP sockets now (Start opens them otherwise). Sockets belong to
// the network namespace of the thread that opens them: calling Listen first lets a caller
// (a test, a standalone boot server) open them on a chosen network.
func (s *Services) Listen() error {
	if s.dhcp == nil {
		return nil
	}
	if err := s.dhcp.Listen(); err != nil {
		return err
	}
	return s.tftp.Listen()
}

// DHCPStats returns the DHCP server's counters (zero when DHCP is off).
func (s *Services) DHCPStats() dhcp.Stats {
	if s.dhcp == nil {
		return dhcp.Stats{}
	}
	return s.dhcp.Stats()
}

// TFTPStats returns the TFTP server's counters (zero when DHCP, and so TFTP, is off).
func (s *Services) TFTPStats() tftp.Stats {
	if s.tftp == nil {
		return tftp.Stats{}
	}
	return s.tftp.Stats()
}

// PublicURL is the base URL servers boot from.
func (s *Services) PublicURL() string { return s.cfg.PublicURL }

// Start serves until ctx ends (manager.Runnable).
func (s *Services) Start(ctx context.Context) error {
	errCh := make(chan error, 3)
	go func() { errCh <- s.server.Serve(s.listener) }()
	if s.dhcp != nil {
		go func() { errCh <- s.dhcp.Start(ctx) }()
		go func() { errCh <- s.tftp.Start(ctx) }()
	}
	select {
	case <-ctx.Done():
		shutdown, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		return s.server.Shutdown(shutdown)
	case err := <-errCh:
		if errors.Is(err, http.ErrServerClosed) {
			return nil
		}
		return err
	}
}

// NeedLeaderElection: boot services answer on every replica (they hold no cluster state of
// their own), but only the leader's backend has attempts, so run them with the leader.
func (s *Services) NeedLeaderElection() bool { return true }
