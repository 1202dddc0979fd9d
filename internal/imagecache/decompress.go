package imagecache

import (
	"context"
	"errors"
	"fmt"
	"io"

	"github.com/klauspost/compress/gzip"
	"github.com/klauspost/compress/zstd"
	"github.com/ulikunitz/xz"

	infrav1 "github.com/anvil-metal/cluster-api-provider-anvil/api/v1alpha1"
)

// decompressInto returns a pipe whose compressed input is decompressed, in a goroutine, into
// dst (the checksum's hash), so that a compressed image is verified in the same pass that
// writes it to disk. wait returns the decoder's verdict once the writer is closed. A decoder
// error closes the pipe, which fails the download's copy early instead of reading gigabytes
// of a corrupt image.
func decompressInto(ctx context.Context, format infrav1.ImageFormat, dst io.Writer) (*io.PipeWriter, func() error) {
	pr, pw := io.Pipe()
	done := make(chan error, 1)
	go func() {
		err := decode(format, pr, dst)
		if err == nil {
			// The decoder stopped at the end of its stream; anything after it would be
			// unverified bytes served to agents.
			var one [1]byte
			if n, _ := io.ReadFull(pr, one[:]); n > 0 {
				err = errors.New("data after the end of the compressed stream")
			}
		}
		_ = pr.CloseWithError(errOr(err, io.ErrClosedPipe))
		done <- err
	}()
	var res error
	got := false
	wait := func() error {
		if !got {
			select {
			case res = <-done:
			case <-ctx.Done():
				_ = pw.CloseWithError(ctx.Err())
				res = <-done
			}
			got = true
		}
		return res
	}
	return pw, wait
}

func errOr(err, def error) error {
	if err != nil {
		return err
	}
	return def
}

func decode(format infrav1.ImageFormat, r io.Reader, dst io.Writer) error {
	buf := make([]byte, 1<<20)
	switch format {
	case infrav1.ImageFormatGzip:
		zr, err := gzip.NewReader(r)
		if err != nil {
			return err
		}
		defer func() { _ = zr.Close() }()
		// Multistream (the default) accepts concatenated members, as gzip(1) does.
		_, err = io.CopyBuffer(dst, zr, buf)
		return err
	case infrav1.ImageFormatZstd:
		zr, err := zstd.NewReader(r, zstd.WithDecoderConcurrency(1))
		if err != nil {
			return err
		}
		defer zr.Close()
		_, err = io.CopyBuffer(dst, zr, buf)
		return err
	case infrav1.ImageFormatXz:
		zr, err := xz.NewReader(r)
		if err != nil {
			return err
		}
		_, err = io.CopyBuffer(dst, zr, buf)
		return err
	}
	return fmt.Errorf("image format %q is not supported", format)
}
