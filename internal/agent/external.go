package agent

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os/exec"
	"strings"
	"sync"

	infrav1 "github.com/anvil-metal/cluster-api-provider-anvil/api/v1alpha1"
)

// Decompressor chooses the implementation of decompression.
type Decompressor string

const (
	// DecompressorAuto uses the built-in decoders for zstd and gzip, and the xz command
	// (xz-utils) for xz when it is on PATH. Measured on the install path (decode, sha256,
	// write; see bench_test.go): the built-in zstd decoder needs less CPU per GiB installed
	// than the zstd command once the pipes to and from the process are counted, the
	// built-in gzip decoder about half the CPU of gzip, while the built-in xz decoder is
	// slower than xz by more than 2x. The agent thus needs no tools but for xz images.
	DecompressorAuto Decompressor = ""
	// DecompressorGo always uses the built-in decoders (no external process).
	DecompressorGo Decompressor = "go"
	// DecompressorExternal requires the command-line tool (zstd, xz, pigz or gzip).
	DecompressorExternal Decompressor = "external"
)

// useExternal tells whether format is decoded by a command-line tool.
func useExternal(format infrav1.ImageFormat, d Decompressor) bool {
	switch {
	case format == infrav1.ImageFormatRaw || d == DecompressorGo:
		return false
	case d == DecompressorExternal:
		return true
	}
	return format == infrav1.ImageFormatXz && externalCommand(format) != nil
}

// externalCommand returns the decompressor command for a format, or nil if none is on PATH.
func externalCommand(format infrav1.ImageFormat) []string {
	var cands [][]string
	switch format {
	case infrav1.ImageFormatZstd:
		cands = [][]string{{"zstd", "-d", "-q", "-c"}}
	case infrav1.ImageFormatXz:
		cands = [][]string{{"xz", "-d", "-q", "-c", "-T0"}}
	case infrav1.ImageFormatGzip:
		cands = [][]string{{"pigz", "-d", "-c"}, {"gzip", "-d", "-c"}}
	}
	for _, c := range cands {
		if p, err := exec.LookPath(c[0]); err == nil {
			return append([]string{p}, c[1:]...)
		}
	}
	return nil
}

// errRecorder remembers the first error its source returned (a download failure must win
// over the decompressor's "unexpected end of input" that it causes).
type errRecorder struct {
	r   io.Reader
	mu  sync.Mutex
	err error
}

func (e *errRecorder) Read(p []byte) (int, error) {
	n, err := e.r.Read(p)
	if err != nil && !errors.Is(err, io.EOF) {
		e.mu.Lock()
		if e.err == nil {
			e.err = err
		}
		e.mu.Unlock()
	}
	return n, err
}

func (e *errRecorder) get() error {
	e.mu.Lock()
	defer e.mu.Unlock()
	return e.err
}

// procReader reads a decompressor's standard output and reports its failure at the end.
type procReader struct {
	out    io.ReadCloser
	cmd    *exec.Cmd
	stderr *bytes.Buffer
	src    *errRecorder
	format infrav1.ImageFormat
	waited bool
}

func (p *procReader) Read(b []byte) (int, error) {
	n, err := p.out.Read(b)
	if err == nil {
		return n, nil
	}
	if errors.Is(err, io.EOF) {
		p.waited = true
		if werr := p.cmd.Wait(); werr != nil {
			if serr := p.src.get(); serr != nil {
				return n, serr
			}
			return n, fmt.Errorf("decoding %s with %s: %w: %s (%w)", p.format, p.cmd.Args[0], werr,
				strings.TrimSpace(p.stderr.String()), ErrCorruptImage)
		}
		return n, io.EOF
	}
	return n, err
}

func (p *procReader) close() {
	if !p.waited {
		_ = p.cmd.Process.Kill()
		_ = p.cmd.Wait()
	}
}

// externalDecoder starts the format's command-line decompressor reading r.
func externalDecoder(ctx context.Context, format infrav1.ImageFormat, r io.Reader) (io.Reader, func(), error) {
	argv := externalCommand(format)
	if argv == nil {
		return nil, nil, fmt.Errorf("no command-line decompressor for %s on PATH", format)
	}
	src := &errRecorder{r: r}
	cmd := exec.CommandContext(ctx, argv[0], argv[1:]...) //nolint:gosec // fixed programs found on PATH, fixed arguments
	cmd.Stdin = src
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.StdoutPipe()
	if err != nil {
		return nil, nil, err
	}
	if err := cmd.Start(); err != nil {
		return nil, nil, err
	}
	p := &procReader{out: out, cmd: cmd, stderr: &stderr, src: src, format: format}
	return p, p.close, nil
}
