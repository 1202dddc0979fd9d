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
	"time"

	"github.com/go-logr/logr"

	infrav1 "github.com/anvil-metal/cluster-api-provider-anvil/api/v1alpha1"
	"github.com/anvil-metal/cluster-api-provider-anvil/internal/boot/agentapi"
	"github.com/anvil-metal/cluster-api-provider-anvil/internal/boot/httpboot"
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
	// Backend options (Secrets reader, Notify, timeouts); ImageURL is filled in here.
	Backend provision.Options
	Log     logr.Logger
}

// Services is the running (or ready to run) boot services.
type Services struct {
	cfg      Config
	Backend  *provision.Backend
	Tokens   *token.Issuer
	Images   *imagecache.Cache
	listener net.Listener
	server   *http.Server
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
	s.Backend = provision.New(backendOpts)

	api, err := agentapi.NewServer(agentapi.ServerOptions{Tokens: s.Tokens, Backend: s.Backend, Log: cfg.Log.WithName("agentapi"),
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
		ArtifactsDir: cfg.ArtifactsDir, Images: s.Images, AgentAPI: api, Log: cfg.Log.WithName("httpboot")})
	if err != nil {
		_ = s.listener.Close()
		return nil, err
	}
	s.server = httpboot.NewServer(cfg.HTTPAddress, handler)
	return s, nil
}

// PublicURL is the base URL servers boot from.
func (s *Services) PublicURL() string { return s.cfg.PublicURL }

// Start serves until ctx ends (manager.Runnable).
func (s *Services) Start(ctx context.Context) error {
	errCh := make(chan error, 1)
	go func() { errCh <- s.server.Serve(s.listener) }()
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
