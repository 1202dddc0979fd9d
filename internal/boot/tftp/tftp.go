// Package tftp serves the iPXE binaries that PXE firmware loads before iPXE takes over
// (everything after that goes over HTTP). It is read-only and serves only plain file names
// from one set of files: no directories, no paths, no way out.
package tftp

import (
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/go-logr/logr"
	"github.com/pin/tftp/v3"
	"golang.org/x/sys/unix"
)

// Config configures a Server.
type Config struct {
	// Files is what the server offers, by plain name: DirFS for a directory, or
	// IPXEFiles.FS for the binaries FindIPXE found.
	Files fs.FS
	// Addr to listen on. Default ":69".
	Addr string
	// Interface, if set, binds the listening socket to one network interface.
	Interface string
	// SinglePort serves every transfer from the listening socket instead of one new socket
	// per transfer (RFC 1350's transfer IDs). It passes firewalls and NAT that allow only
	// port 69, and keeps all traffic on a socket made in a chosen network namespace.
	SinglePort bool
	// MaxBlockSize caps the blksize option (RFC 2348). Default 1468: the largest block whose
	// packet fits an Ethernet frame unfragmented; bigger blocks on a lossy network resend more.
	MaxBlockSize int
	// Timeout per packet and Retries before a transfer is abandoned. Defaults 5s and 5.
	Timeout time.Duration
	Retries int
	// Log receives refusals (Info) and transfers (V(1)).
	Log logr.Logger
}

// Server is a read-only TFTP server. It is a controller-runtime Runnable and also runs
// standalone.
type Server struct {
	cfg     Config
	log     logr.Logger
	srv     *tftp.Server
	limiter *limiter

	listenOnce sync.Once
	listenErr  error
	conn       net.PacketConn
	started    atomic.Bool

	served, refused, failed, sizeQueries atomic.Uint64
}

// Stats counts transfers.
type Stats struct {
	Served, Refused, Failed uint64
	// SizeQueries are transfers the client ended after option negotiation (RFC 2347 error
	// 8), as UEFI firmware does to learn a file's size (tsize) before fetching it.
	SizeQueries uint64
}

// New checks cfg and returns a server. It opens no socket: Start (or Listen) does.
func New(cfg Config) (*Server, error) {
	if cfg.Files == nil {
		return nil, errors.New("TFTP needs files to serve")
	}
	if cfg.Addr == "" {
		cfg.Addr = ":69"
	}
	if cfg.MaxBlockSize == 0 {
		cfg.MaxBlockSize = 1468
	}
	if cfg.MaxBlockSize < 512 || cfg.MaxBlockSize > 65464 {
		return nil, fmt.Errorf("TFTP block size %d out of range 512..65464", cfg.MaxBlockSize)
	}
	if cfg.Timeout <= 0 {
		cfg.Timeout = 5 * time.Second
	}
	if cfg.Retries <= 0 {
		cfg.Retries = 5
	}
	s := &Server{cfg: cfg, log: cfg.Log.WithValues("service", "tftp"), limiter: &limiter{limit: 10}}
	// No write handler: write requests are refused by the library.
	s.srv = tftp.NewServer(s.read, nil)
	if cfg.SinglePort {
		s.srv.EnableSinglePort()
	}
	s.srv.SetBlockSize(cfg.MaxBlockSize)
	s.srv.SetTimeout(cfg.Timeout)
	s.srv.SetRetries(cfg.Retries)
	s.srv.SetHook(hook{s})
	return s, nil
}

// NeedLeaderElection implements controller-runtime's LeaderElectionRunnable: every replica can
// serve the same read-only files.
func (s *Server) NeedLeaderElection() bool { return false }

// Stats returns the transfer counters.
func (s *Server) Stats() Stats {
	return Stats{Served: s.served.Load(), Refused: s.refused.Load(), Failed: s.failed.Load(), SizeQueries: s.sizeQueries.Load()}
}

// Listen opens the server's socket. Start calls it; calling it first lets a caller open the
// socket in a particular network namespace, learn the port (Addr), or fail early.
func (s *Server) Listen() error {
	s.listenOnce.Do(func() {
		lc := net.ListenConfig{}
		if s.cfg.Interface != "" {
			lc.Control = func(_, _ string, rc syscall.RawConn) error {
				var serr error
				if err := rc.Control(func(fd uintptr) { serr = unix.BindToDevice(int(fd), s.cfg.Interface) }); err != nil {
					return err
				}
				return serr
			}
		}
		s.conn, s.listenErr = lc.ListenPacket(context.Background(), "udp", s.cfg.Addr)
		if s.listenErr != nil {
			s.listenErr = fmt.Errorf("TFTP listen on %s: %w", s.cfg.Addr, s.listenErr)
		}
	})
	return s.listenErr
}

// Addr is the listening address (after Listen).
func (s *Server) Addr() net.Addr {
	if s.conn == nil {
		return nil
	}
	return s.conn.LocalAddr()
}

// Start serves until ctx ends. In-flight transfers get their retry budget to finish.
func (s *Server) Start(ctx context.Context) error {
	if !s.started.CompareAndSwap(false, true) {
		return errors.New("TFTP server already started")
	}
	if err := s.Listen(); err != nil {
		return err
	}
	s.log.Info("TFTP listening", "addr", s.conn.LocalAddr().String())
	done := make(chan error, 1)
	go func() { done <- s.srv.Serve(s.conn) }()
	select {
	case <-ctx.Done():
	case err := <-done:
		return err
	}
	s.srv.Shutdown()
	// In single-port mode Shutdown leaves the socket open and Serve blocked reading it.
	_ = s.conn.Close()
	return <-done
}

// errNotFound is all a refused client learns: no hint whether a name exists or why not.
type tftpError string

func (e tftpError) Error() string { return string(e) }

const errNotFound tftpError = "file not found"

func (s *Server) read(name string, rf io.ReaderFrom) error {
	peer := ""
	if ot, ok := rf.(tftp.OutgoingTransfer); ok {
		a := ot.RemoteAddr()
		peer = a.String()
	}
	if err := CheckName(name); err != nil {
		s.refuse(name, peer, err)
		return errNotFound
	}
	f, err := s.cfg.Files.Open(name)
	if err != nil {
		s.refuse(name, peer, err)
		return errNotFound
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil || !st.Mode().IsRegular() {
		s.refuse(name, peer, errors.New("not a regular file"))
		return errNotFound
	}
	if ot, ok := rf.(tftp.OutgoingTransfer); ok {
		ot.SetSize(st.Size()) // answers the tsize option (RFC 2349)
	}
	_, err = rf.ReadFrom(f)
	return err
}

func (s *Server) refuse(name, peer string, why error) {
	s.refused.Add(1)
	if s.limiter.allow() {
		s.log.Info("TFTP request refused", "file", name, "peer", peer, "reason", why.Error())
	}
}

// CheckName accepts only a plain file name: no directories, no absolute or relative paths, no
// hidden files, nothing a shell or an operator would misread.
func CheckName(name string) error {
	switch {
	case name == "" || len(name) > 255:
		return errors.New("empty or overlong name")
	case strings.ContainsAny(name, `/\`):
		return errors.New("paths are not served, only file names")
	case name[0] == '.':
		return errors.New("hidden or relative name")
	}
	for i := 0; i < len(name); i++ {
		if name[i] <= ' ' || name[i] >= 0x7f {
			return errors.New("control, space or non-ASCII character in name")
		}
	}
	if !fs.ValidPath(name) {
		return errors.New("invalid name")
	}
	return nil
}

type hook struct{ s *Server }

func (h hook) OnSuccess(st tftp.TransferStats) {
	h.s.served.Add(1)
	if h.s.log.V(1).Enabled() {
		h.s.log.V(1).Info("TFTP sent", "file", st.Filename, "peer", st.RemoteAddr.String(),
			"duration", st.Duration.String(), "blocks", st.DatagramsSent, "blksize", st.Opts["blksize"], "tsize", st.Opts["tsize"])
	}
}

func (h hook) OnFailure(st tftp.TransferStats, err error) {
	if st.Filename == "" {
		return // the library reports read errors on the listening socket here too
	}
	// pin/tftp reports the client's error packet only as text. Error 8 in answer to our
	// option acknowledgement (block 0) is a client that asked for the size and is done.
	if strings.HasPrefix(err.Error(), "sending block 0: code=8,") {
		h.s.sizeQueries.Add(1)
		if h.s.log.V(1).Enabled() {
			h.s.log.V(1).Info("TFTP size query", "file", st.Filename, "peer", st.RemoteAddr.String(), "tsize", st.Opts["tsize"])
		}
		return
	}
	h.s.failed.Add(1)
	if h.s.limiter.allow() {
		h.s.log.Info("TFTP transfer failed", "file", st.Filename, "peer", st.RemoteAddr.String(), "error", err.Error())
	}
}

// limiter bounds log lines per second, so a scan of the TFTP port can't flood the logs.
type limiter struct {
	limit  int64
	window atomic.Int64
	count  atomic.Int64
}

func (l *limiter) allow() bool {
	now := time.Now().Unix()
	if w := l.window.Load(); w != now && l.window.CompareAndSwap(w, now) {
		l.count.Store(0)
	}
	return l.count.Add(1) <= l.limit
}
