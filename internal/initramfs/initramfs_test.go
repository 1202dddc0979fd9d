package initramfs

import (
	"bytes"
	"compress/gzip"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
)

// TestCPIOReadByBusybox checks the archive with another cpio implementation (busybox's):
// every entry with its type, mode and content, parents before children.
func TestCPIOReadByBusybox(t *testing.T) {
	busybox, err := exec.LookPath("busybox")
	if err != nil {
		t.Fatal("busybox not installed: make test-deps installs it")
	}
	a := New()
	for _, err := range []error{
		a.AddFile("init", []byte("#!/bin/sh\necho hi\n"), 0o755),
		a.AddFile("lib/modules/x/a.ko", bytes.Repeat([]byte{1, 2, 3}, 1001), 0o644),
		a.AddSymlink("bin/sh", "/init"),
		a.AddDir("proc", 0o555),
		a.AddFile("etc/odd-size", []byte("12345"), 0o600),
	} {
		if err != nil {
			t.Fatal(err)
		}
	}
	if err := a.AddFile("init", nil, 0o644); err == nil {
		t.Error("a second /init was accepted")
	}
	if err := a.AddFile("init/x", nil, 0o644); err == nil {
		t.Error("a file under a regular file was accepted")
	}
	gz, err := a.Gzip()
	if err != nil {
		t.Fatal(err)
	}
	zr, err := gzip.NewReader(bytes.NewReader(gz))
	if err != nil {
		t.Fatal(err)
	}
	raw, err := io.ReadAll(zr)
	if err != nil {
		t.Fatal(err)
	}
	if len(raw)%4 != 0 {
		t.Errorf("archive is %d bytes, not a multiple of 4", len(raw))
	}
	list := exec.Command(busybox, "cpio", "-t")
	list.Stdin = bytes.NewReader(raw)
	out, err := list.Output() // the names; the block count goes to stderr
	if err != nil {
		t.Fatalf("busybox cpio -t: %v", err)
	}
	want := []string{"bin", "bin/sh", "etc", "etc/odd-size", "init", "lib", "lib/modules", "lib/modules/x", "lib/modules/x/a.ko", "proc"}
	if got := strings.Fields(string(out)); !reflect.DeepEqual(got, want) {
		t.Errorf("busybox lists %q, want %q", got, want)
	}
	dir := t.TempDir()
	extract := exec.Command(busybox, "cpio", "-i", "-d")
	extract.Dir, extract.Stdin = dir, bytes.NewReader(raw)
	if out, err := extract.CombinedOutput(); err != nil {
		t.Fatalf("busybox cpio -i: %v\n%s", err, out)
	}
	for name, want := range map[string]struct {
		data string
		mode os.FileMode
	}{
		"init":               {"#!/bin/sh\necho hi\n", 0o755},
		"etc/odd-size":       {"12345", 0o600},
		"lib/modules/x/a.ko": {string(bytes.Repeat([]byte{1, 2, 3}, 1001)), 0o644},
	} {
		p := filepath.Join(dir, name)
		b, err := os.ReadFile(p)
		fi, serr := os.Stat(p)
		if err != nil || serr != nil || string(b) != want.data || fi.Mode().Perm() != want.mode {
			t.Errorf("%s extracted: %d bytes, mode %v (%v %v); want %d bytes, mode %v", name, len(b), fi.Mode(), err, serr, len(want.data), want.mode)
		}
	}
	if target, err := os.Readlink(filepath.Join(dir, "bin/sh")); err != nil || target != "/init" {
		t.Errorf("bin/sh -> %q (%v), want /init", target, err)
	}
	if fi, err := os.Stat(filepath.Join(dir, "proc")); err != nil || !fi.IsDir() {
		t.Errorf("proc: %v %v, want a directory", fi, err)
	}
}

func TestDependencyOrder(t *testing.T) {
	graph := map[string][]string{
		"virtio_net":   {"net_failover", "virtio"},
		"net_failover": {"failover"},
		"virtio_blk":   {"virtio", "virtio_ring"},
		"virtio":       {"virtio_ring"},
		"builtin_dep":  {"hidden"},
	}
	builtin := map[string]bool{"builtin_dep": true}
	deps := func(n string) ([]string, bool, error) { return graph[n], !builtin[n], nil }
	got, err := DependencyOrder([]string{"virtio-net", "virtio_blk", "builtin_dep", "virtio"}, deps)
	if err != nil {
		t.Fatal(err)
	}
	// Each module after its dependencies, each once; built-in modules left out (and what
	// only they need is still loaded: the kernel cannot resolve it for them).
	want := []string{"failover", "net_failover", "virtio_ring", "virtio", "virtio_net", "virtio_blk", "hidden"}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("order %q, want %q", got, want)
	}
	graph["virtio_ring"] = []string{"virtio_net"}
	if _, err := DependencyOrder([]string{"virtio_net"}, deps); err == nil || !strings.Contains(err.Error(), "cycle") {
		t.Errorf("a dependency cycle gave %v, want a cycle error", err)
	}
}

func TestParseModInfo(t *testing.T) {
	info := []byte("license=GPL\x00depends=virtio,net_failover\x00softdep=pre: crc32c post: other\x00alias=virtio:d00000001v*\x00alias=pci:v00008086d*\x00vermagic=6.1.0 SMP\x00")
	got, err := ParseModInfo(info)
	if err != nil {
		t.Fatal(err)
	}
	want := ModInfo{Depends: []string{"virtio", "net_failover", "crc32c"}, Aliases: []string{"virtio:d00000001v*", "pci:v00008086d*"}}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("got %+v, want %+v", got, want)
	}
	if _, err := ParseModInfo(nil); err == nil {
		t.Error("an empty .modinfo was accepted")
	}
}

func TestLoadOrderRoundTrip(t *testing.T) {
	in := []ModuleEntry{
		{Path: "/lib/modules/v/kernel/drivers/virtio/virtio.ko", Name: "virtio"},
		{Path: "/lib/modules/v/kernel/drivers/net/virtio_net.ko", Name: "virtio_net", Depends: []string{"virtio", "net_failover"},
			Aliases: []string{"virtio:d00000001v*"}},
	}
	var b strings.Builder
	b.WriteString("# comment\n\n")
	for _, e := range in {
		b.WriteString(e.String() + "\n")
	}
	got, err := ParseLoadOrder([]byte(b.String()))
	if err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(got, in) {
		t.Errorf("round trip: %+v, want %+v", got, in)
	}
	if _, err := ParseLoadOrder([]byte("/only/a/path\n")); err == nil || !strings.Contains(err.Error(), "line 1") {
		t.Errorf("a short line gave %v, want an error naming line 1", err)
	}
}
