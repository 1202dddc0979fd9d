package main

import (
	"bytes"
	"compress/gzip"
	"errors"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/anvil-metal/cluster-api-provider-anvil/internal/lab"
)

func TestWithoutNetworkTheLabSaysSoAndServesArtifacts(t *testing.T) {
	dir := t.TempDir()
	var out bytes.Buffer
	pn, err := newProvisioningNet(dir, &out, func() (*lab.Network, error) { return nil, errors.New("network namespaces need root") })
	if err != nil {
		t.Fatal(err)
	}
	defer pn.close()
	if pn.network != nil {
		t.Fatal("a network without namespaces")
	}
	if got := out.String(); strings.Count(got, "\n") != 1 || !strings.Contains(got, "no provisioning network (network namespaces need root)") ||
		!strings.Contains(got, "without DHCP or TFTP") {
		t.Fatalf("the lab says %q", got)
	}
	// The stand-ins pass the firmware's checks: an x86 boot header, a gzipped newc cpio.
	kernel, err := os.ReadFile(filepath.Join(pn.artifacts, "vmlinuz"))
	if err != nil {
		t.Fatal(err)
	}
	if len(kernel) != 2<<20 || kernel[0x1FE] != 0x55 || kernel[0x1FF] != 0xAA || string(kernel[0x202:0x206]) != "HdrS" {
		t.Fatalf("stand-in kernel: %d bytes, header %x", len(kernel), kernel[0x1FE:0x206])
	}
	initramfs, err := os.ReadFile(filepath.Join(pn.artifacts, "initramfs"))
	if err != nil {
		t.Fatal(err)
	}
	z, err := gzip.NewReader(bytes.NewReader(initramfs))
	if err != nil {
		t.Fatal(err)
	}
	cpio, err := io.ReadAll(z)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.HasPrefix(cpio, []byte("070701")) || !bytes.Contains(cpio, []byte("init\x00")) || !bytes.Contains(cpio, []byte("TRAILER!!!\x00")) ||
		len(cpio)%4 != 0 {
		t.Fatalf("stand-in initramfs is not a newc cpio archive (%d bytes)", len(cpio))
	}
}
