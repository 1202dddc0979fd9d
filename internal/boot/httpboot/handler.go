// Package httpboot is the HTTP side of the boot services: per-host iPXE scripts derived from
// host state, the agent's kernel and initramfs, and one place to mount the image cache and the
// agent API on the same listener.
//
//	GET /ipxe/boot.ipxe        static entry script: chains to /ipxe/mac/<the booting NIC's MAC>
//	GET /ipxe/mac/<mac>        the host's script (also /ipxe/script?mac=<mac>)
//	GET /artifacts/<path>      files from ArtifactsDir (agent kernel, initramfs)
//	    /images/...            Options.Images (the image cache), when set
//	    /agent/...             Options.AgentAPI, when set
//
// The script depends on host state only: unknown host or nothing expected → "exit" (the
// firmware tries its next boot device at once); provisioned → local disk; a boot Anvil is
// expecting → the agent, with a fresh boot token for the expected attempt on its kernel
// command line. The script endpoint is unauthenticated, as PXE is: a token is handed out only
// while the host controller expects that host to boot, it is bound to that one attempt,
// expires, and is single-use at registration (package agentapi), so a copy taken by someone
// else is detected when the real agent registers.
package httpboot

import (
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net"
	"net/http"
	"os"
	"regexp"
	"strings"
	"time"

	"github.com/go-logr/logr"
	"k8s.io/apimachinery/pkg/types"

	infrav1 "github.com/anvil-metal/cluster-api-provider-anvil/api/v1alpha1"
)

// ErrUnknownHost is what Hosts returns for a MAC that belongs to no host.
var ErrUnknownHost = errors.New("unknown host")

// HostBoot is what the host controller wants of a host that is network-booting now.
type HostBoot struct {
	Host types.NamespacedName
	// Action: ActionExit, ActionLocalDisk or ActionAgent.
	Action Action
	// Attempt is the boot attempt the controller expects (required for ActionAgent); the token
	// is bound to it.
	Attempt  string
	BootMode infrav1.BootMode
}

// Hosts finds the host that boots from a MAC. The host controller implements it from its
// cache of AnvilHosts (spec.bootMACAddress, status).
type Hosts interface {
	BootFor(ctx context.Context, mac net.HardwareAddr) (HostBoot, error)
}

// TokenIssuer issues boot tokens; *token.Issuer implements it.
type TokenIssuer interface {
	Issue(host types.NamespacedName, attempt string, ttl time.Duration) (string, error)
}

// Options configure a Handler.
type Options struct {
	Hosts  Hosts
	Tokens TokenIssuer
	// PublicURL is how booting hosts reach this server, e.g. http://192.168.10.1:8080. Script,
	// artifact and (by default) API URLs are built from it.
	PublicURL string
	// APIURL is the agent API's base URL; default PublicURL.
	APIURL string
	// KernelURL and InitrdURL of the agent; default PublicURL/artifacts/vmlinuz and
	// PublicURL/artifacts/initramfs.
	KernelURL, InitrdURL string
	// ArtifactsDir is served under /artifacts/; empty serves nothing.
	ArtifactsDir string
	// CAFingerprint, when the API is https, pins its certificate (anvil.ca).
	CAFingerprint string
	// Console devices for the agent kernel; default tty0 and ttyS0,115200n8.
	Console []string
	// ExtraKernelArgs for the agent kernel.
	ExtraKernelArgs []string
	// TokenTTL is the lifetime of the tokens in scripts; default 1h (a boot plus an install;
	// the attempt binding ends a token's use sooner when the controller moves on).
	TokenTTL time.Duration
	// Images and AgentAPI are mounted under /images/ and /agent/ when set.
	Images   http.Handler
	AgentAPI http.Handler
	// OnServed, when set, is told of every script and artifact response once it is written
	// (after the last byte for artifacts). It runs on the request's goroutine: keep it short.
	OnServed func(Served)
	Log      logr.Logger
}

// ServedKind says what a Served record is about.
type ServedKind string

// Kinds of Served records.
const (
	ServedEntry    ServedKind = "entry-script" // /ipxe/boot.ipxe, the same for every machine
	ServedScript   ServedKind = "script"       // a per-host script
	ServedArtifact ServedKind = "artifact"
)

// Served records one response of the boot endpoints: which host got which script, and how
// much of which artifact went out. It is the boot services' own account of a boot, for
// operators' logs and for tests that boot real firmware.
type Served struct {
	Kind ServedKind
	// Path is the request path; Remote the client's address.
	Path, Remote string
	// Status is the HTTP status sent.
	Status int
	// MAC (scripts: the MAC asked for, nil if unparsable), the host it belongs to (empty if
	// unknown) and the script's action.
	MAC    net.HardwareAddr
	Host   types.NamespacedName
	Action Action
	// Bytes of body written to the connection; Size is the artifact's full size, so a
	// complete download of the whole file has Bytes == Size (a Range request sends less).
	Bytes, Size int64
}

// Handler serves the boot services' HTTP endpoints.
type Handler struct {
	opts      Options
	public    string
	artifacts *os.Root
	mux       *http.ServeMux
}

// NewHandler checks o (by rendering a sample agent script) and returns a Handler.
func NewHandler(o Options) (*Handler, error) {
	if o.Hosts == nil || o.Tokens == nil {
		return nil, errors.New("httpboot: Hosts and Tokens are required")
	}
	public, err := scriptURL("PublicURL", strings.TrimSuffix(o.PublicURL, "/"))
	if err != nil {
		return nil, fmt.Errorf("httpboot: %w", err)
	}
	public = strings.TrimSuffix(public, "/")
	if o.APIURL == "" {
		o.APIURL = public
	}
	if o.KernelURL == "" {
		o.KernelURL = public + "/artifacts/vmlinuz"
	}
	if o.InitrdURL == "" {
		o.InitrdURL = public + "/artifacts/initramfs"
	}
	if o.Console == nil {
		o.Console = []string{"tty0", "ttyS0,115200n8"}
	}
	if o.TokenTTL <= 0 {
		o.TokenTTL = time.Hour
	}
	if o.Log.GetSink() == nil {
		o.Log = logr.Discard()
	}
	h := &Handler{opts: o, public: public}
	// Fail at start-up, not at a host's boot, on a bad URL, console or argument.
	sample := h.agentBoot(HostBoot{Host: types.NamespacedName{Namespace: "check", Name: "check"}}, "check", "check")
	if _, err := RenderScript(Script{Action: ActionAgent, Agent: sample}); err != nil {
		return nil, fmt.Errorf("httpboot: %w", err)
	}
	if o.ArtifactsDir != "" {
		// os.Root confines every open to the directory, symlinks and ".." included.
		if h.artifacts, err = os.OpenRoot(o.ArtifactsDir); err != nil {
			return nil, fmt.Errorf("httpboot: artifacts: %w", err)
		}
	}

	mux := http.NewServeMux()
	mux.HandleFunc("GET /ipxe/boot.ipxe", h.entryScript)
	mux.HandleFunc("GET /ipxe/mac/{mac}", func(w http.ResponseWriter, r *http.Request) { h.hostScript(w, r, r.PathValue("mac")) })
	mux.HandleFunc("GET /ipxe/script", func(w http.ResponseWriter, r *http.Request) { h.hostScript(w, r, r.URL.Query().Get("mac")) })
	if h.artifacts != nil {
		mux.HandleFunc("GET /artifacts/{path...}", h.artifact)
	}
	if o.Images != nil {
		mux.Handle("/images/", o.Images)
	}
	if o.AgentAPI != nil {
		mux.Handle("/agent/", o.AgentAPI)
	}
	h.mux = mux
	return h, nil
}

// Close releases the artifacts directory.
func (h *Handler) Close() error {
	if h.artifacts != nil {
		return h.artifacts.Close()
	}
	return nil
}

// ServeHTTP implements http.Handler.
func (h *Handler) ServeHTTP(w http.ResponseWriter, r *http.Request) { h.mux.ServeHTTP(w, r) }

// NewServer returns an http.Server for h with timeouts fit for slow firmware and large
// downloads: a bounded header read, no overall write timeout (images take minutes).
func NewServer(addr string, h http.Handler) *http.Server {
	return &http.Server{
		Addr:              addr,
		Handler:           h,
		ReadHeaderTimeout: 15 * time.Second,
		ReadTimeout:       2 * time.Minute,
		IdleTimeout:       2 * time.Minute,
		MaxHeaderBytes:    64 << 10,
	}
}

func (h *Handler) agentBoot(hb HostBoot, tok, mac string) *AgentBoot {
	hw, err := net.ParseMAC(strings.ReplaceAll(mac, "-", ":"))
	if err != nil || len(hw) != 6 {
		hw = nil
	}
	return &AgentBoot{
		BootMAC:       hw,
		Host:          hb.Host,
		KernelURL:     h.opts.KernelURL,
		InitrdURL:     h.opts.InitrdURL,
		APIURL:        h.opts.APIURL,
		Token:         tok,
		CAFingerprint: h.opts.CAFingerprint,
		Console:       h.opts.Console,
		ExtraArgs:     h.opts.ExtraKernelArgs,
		RetryURL:      h.public + "/ipxe/mac/" + mac,
	}
}

// entryScript is what DHCP hands to iPXE (or what an embedded iPXE script chains to). It is
// the only script with an iPXE expansion in it, and that expansion is our own constant.
func (h *Handler) entryScript(w http.ResponseWriter, r *http.Request) {
	b := []byte("#!ipxe\nchain --replace --autofree " + h.public + "/ipxe/mac/${mac:hexhyp} || exit\n")
	writeScript(w, b)
	if h.opts.OnServed != nil {
		h.opts.OnServed(Served{Kind: ServedEntry, Path: r.URL.Path, Remote: r.RemoteAddr, Status: http.StatusOK, Bytes: int64(len(b)), Size: -1})
	}
}

var macRE = regexp.MustCompile(`^[0-9a-fA-F]{2}([:-][0-9a-fA-F]{2}){5}$`)

// parseMAC accepts six hex pairs separated by ':' or '-' (iPXE's hexhyp) and nothing else.
func parseMAC(s string) (net.HardwareAddr, bool) {
	if !macRE.MatchString(s) || strings.Contains(s, ":") && strings.Contains(s, "-") {
		return nil, false
	}
	mac, err := net.ParseMAC(strings.ReplaceAll(s, "-", ":"))
	return mac, err == nil && len(mac) == 6
}

func (h *Handler) hostScript(w http.ResponseWriter, r *http.Request, rawMAC string) {
	rec := Served{Kind: ServedScript, Path: r.URL.Path, Remote: r.RemoteAddr, Status: http.StatusOK, Size: -1}
	if h.opts.OnServed != nil {
		cw := &countingWriter{ResponseWriter: w}
		w = cw
		defer func() {
			rec.Bytes = cw.n
			if cw.status != 0 {
				rec.Status = cw.status
			}
			h.opts.OnServed(rec)
		}()
	}
	mac, ok := parseMAC(rawMAC)
	if !ok {
		http.Error(w, "mac must be six hex pairs separated by ':' or '-'", http.StatusBadRequest)
		return
	}
	rec.MAC, rec.Action = mac, ActionExit
	canon := strings.ReplaceAll(mac.String(), ":", "-")
	log := h.opts.Log.WithValues("mac", mac.String(), "remote", r.RemoteAddr)

	hb, err := h.opts.Hosts.BootFor(r.Context(), mac)
	switch {
	case errors.Is(err, ErrUnknownHost):
		log.V(1).Info("iPXE script: unknown host, exit")
		h.render(w, log, Script{Action: ActionExit})
		return
	case err != nil:
		log.Error(err, "iPXE script: host lookup failed, telling iPXE to retry")
		rec.Action = ""
		h.retryScript(w, canon)
		return
	}
	log = log.WithValues("host", hb.Host.String(), "action", hb.Action)
	rec.Host, rec.Action = hb.Host, hb.Action
	switch hb.Action {
	case ActionExit, ActionLocalDisk:
		log.V(1).Info("iPXE script")
		h.render(w, log, Script{Action: hb.Action, BootMode: hb.BootMode})
	case ActionAgent:
		if hb.Attempt == "" {
			log.Error(nil, "iPXE script: agent boot without a boot attempt; exit")
			rec.Action = ActionExit
			h.render(w, log, Script{Action: ActionExit})
			return
		}
		tok, err := h.opts.Tokens.Issue(hb.Host, hb.Attempt, h.opts.TokenTTL)
		if err != nil {
			log.Error(err, "iPXE script: issuing boot token failed, telling iPXE to retry")
			rec.Action = ""
			h.retryScript(w, canon)
			return
		}
		log.Info("iPXE script: agent boot", "attempt", hb.Attempt)
		h.render(w, log, Script{Action: ActionAgent, BootMode: hb.BootMode, Agent: h.agentBoot(hb, tok, canon)})
	default:
		log.Error(nil, "iPXE script: unknown action; exit")
		rec.Action = ActionExit
		h.render(w, log, Script{Action: ActionExit})
	}
}

func (h *Handler) render(w http.ResponseWriter, log logr.Logger, s Script) {
	b, err := RenderScript(s)
	if err != nil {
		// Host names and the token are validated here; a failure is a bug or bad host data.
		// Exit rather than boot something half-specified.
		log.Error(err, "iPXE script: rendering failed; exit")
		b, _ = RenderScript(Script{Action: ActionExit})
	}
	writeScript(w, b)
}

// retryScript makes iPXE wait and ask again instead of falling through to the disk when the
// boot services are briefly unable to answer.
func (h *Handler) retryScript(w http.ResponseWriter, canonMAC string) {
	writeScript(w, []byte("#!ipxe\necho Anvil: boot server busy, retrying in 5 seconds\nsleep 5\nchain --replace --autofree "+
		h.public+"/ipxe/mac/"+canonMAC+" || exit\n"))
}

func writeScript(w http.ResponseWriter, b []byte) {
	w.Header().Set("Content-Type", "text/plain; charset=us-ascii")
	// Scripts carry boot tokens and reflect the moment's host state.
	w.Header().Set("Cache-Control", "no-store")
	w.Header().Set("X-Content-Type-Options", "nosniff")
	// b is a rendered script: every value in it passed RenderScript's validation.
	_, _ = w.Write(b) //nolint:gosec // G705: plain text, validated values only
}

var artifactRE = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._-]{0,127}(/[A-Za-z0-9][A-Za-z0-9._-]{0,127}){0,3}$`)

// artifact serves a regular file from ArtifactsDir with Range support (iPXE resumes nothing,
// but the agent and curl do) and sendfile.
func (h *Handler) artifact(w http.ResponseWriter, r *http.Request) {
	p := r.PathValue("path")
	if !artifactRE.MatchString(p) || strings.Contains(p, "..") {
		http.NotFound(w, r)
		return
	}
	f, err := h.artifacts.Open(p)
	if err != nil {
		if !errors.Is(err, fs.ErrNotExist) {
			h.opts.Log.Error(err, "artifact open failed", "path", p)
		}
		http.NotFound(w, r)
		return
	}
	defer func() { _ = f.Close() }()
	fi, err := f.Stat()
	if err != nil || !fi.Mode().IsRegular() {
		http.NotFound(w, r)
		return
	}
	w.Header().Set("Content-Type", "application/octet-stream")
	cw := &countingWriter{ResponseWriter: w}
	http.ServeContent(cw, r, "", fi.ModTime(), f)
	status := cw.status
	if status == 0 {
		status = http.StatusOK
	}
	h.opts.Log.V(1).Info("artifact served", "path", p, "remote", r.RemoteAddr, "status", status, "bytes", cw.n, "size", fi.Size())
	if h.opts.OnServed != nil {
		h.opts.OnServed(Served{Kind: ServedArtifact, Path: r.URL.Path, Remote: r.RemoteAddr, Status: status, Bytes: cw.n, Size: fi.Size()})
	}
}

// countingWriter counts the body bytes of a response and remembers its status. It passes
// ReadFrom through, so http.ServeContent still hands files to sendfile.
type countingWriter struct {
	http.ResponseWriter
	status int
	n      int64
}

func (c *countingWriter) WriteHeader(code int) {
	if c.status == 0 {
		c.status = code
	}
	c.ResponseWriter.WriteHeader(code)
}

func (c *countingWriter) Write(b []byte) (int, error) {
	n, err := c.ResponseWriter.Write(b)
	c.n += int64(n)
	return n, err
}

func (c *countingWriter) ReadFrom(r io.Reader) (int64, error) {
	if rf, ok := c.ResponseWriter.(io.ReaderFrom); ok {
		n, err := rf.ReadFrom(r)
		c.n += n
		return n, err
	}
	return io.Copy(struct{ io.Writer }{c}, r)
}

// Unwrap lets http.ResponseController reach the connection.
func (c *countingWriter) Unwrap() http.ResponseWriter { return c.ResponseWriter }
