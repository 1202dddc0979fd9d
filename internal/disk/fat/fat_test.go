package fat

import (
	"bytes"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

func tool(t *testing.T, name string) string {
	t.Helper()
	p, err := exec.LookPath(name)
	if err != nil {
		t.Skipf("%s not installed (apt-get install mtools dosfstools)", name)
	}
	return p
}

func run(t *testing.T, name string, args ...string) string {
	t.Helper()
	cmd := exec.Command(name, args...)
	cmd.Env = append(os.Environ(), "MTOOLS_SKIP_CHECK=1")
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
	return string(out)
}

func newImage(t *testing.T, size int64) (*os.File, string) {
	t.Helper()
	p := filepath.Join(t.TempDir(), "vol.img")
	f, err := os.Create(p)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = f.Close() })
	// Garbage everywhere first: Build must not depend on a zeroed partition.
	junk := bytes.Repeat([]byte{0xA5}, 1<<20)
	for off := int64(0); off < size; off += int64(len(junk)) {
		if _, err := f.WriteAt(junk, off); err != nil {
			t.Fatal(err)
		}
	}
	return f, p
}

func testFiles() []File {
	big := bytes.Repeat([]byte("0123456789abcdef"), 10000) // 160000 bytes, many clusters
	return []File{
		{Path: "EFI/BOOT/BOOTX64.EFI", Data: big},
		{Path: "EFI/BOOT/grub.cfg", Data: []byte("set timeout=0\n")},
		{Path: "EFI/BOOT/grubenv", Data: bytes.Repeat([]byte{'#'}, 1024)},
		{Path: "user-data", Data: []byte("#cloud-config\n")},
		{Path: "meta-data", Data: []byte("instance-id: i-1\n")},
		{Path: "network-config", Data: []byte{}},
		{Path: "anvil/A Very Long File Name With Spaces.service", Data: []byte("x")},
	}
}

func TestBuildReadWithOwnReaderAndTools(t *testing.T) {
	for _, tc := range []struct {
		typ  Type
		size int64
	}{{FAT16, 64 << 20}, {FAT32, 256 << 20}, {FAT32, 40 << 20}} {
		t.Run(fmt.Sprintf("%v-%dMiB", tc.typ, tc.size>>20), func(t *testing.T) {
			f, p := newImage(t, tc.size)
			opts := Options{Type: tc.typ, Label: "cidata", VolumeID: 0x1234abcd, Time: time.Date(2025, 3, 4, 5, 6, 8, 0, time.UTC)}
			if err := Build(f, 0, tc.size, opts, testFiles()); err != nil {
				t.Fatal(err)
			}
			fs, err := Open(f, 0)
			if err != nil {
				t.Fatal(err)
			}
			if fs.Type != tc.typ || fs.Label != "cidata" {
				t.Fatalf("type %v label %q", fs.Type, fs.Label)
			}
			for _, want := range testFiles() {
				got, err := fs.ReadFile(want.Path)
				if err != nil {
					t.Fatalf("%s: %v", want.Path, err)
				}
				if !bytes.Equal(got, want.Data) {
					t.Fatalf("%s: content differs", want.Path)
				}
			}
			if _, err := fs.ReadFile("EFI/boot/GRUB.CFG"); err != nil {
				t.Fatalf("case-insensitive lookup: %v", err)
			}

			fsck := tool(t, "fsck.fat")
			run(t, fsck, "-n", "-v", p)
			tool(t, "mtype")
			for _, want := range testFiles() {
				if got := run(t, "mtype", "-i", p, "::"+want.Path); got != string(want.Data) {
					t.Fatalf("mtype %s = %q", want.Path, got)
				}
			}
			if out := run(t, "mlabel", "-s", "-i", p, "::"); !strings.Contains(out, "cidata") {
				t.Fatalf("mlabel: %q", out)
			}
			if blkid, err := exec.LookPath("blkid"); err == nil {
				out, _ := exec.Command(blkid, "-p", "-o", "export", p).CombinedOutput()
				if !strings.Contains(string(out), "LABEL=cidata") || !strings.Contains(string(out), "TYPE=vfat") {
					t.Fatalf("blkid: %s", out)
				}
			}
		})
	}
}

func TestWriteFileInPlace(t *testing.T) {
	for _, typ := range []Type{FAT16, FAT32} {
		t.Run(typ.String(), func(t *testing.T) {
			size := int64(64 << 20)
			if typ == FAT32 {
				size = 256 << 20
			}
			f, p := newImage(t, size)
			if err := Build(f, 0, size, Options{Type: typ}, testFiles()); err != nil {
				t.Fatal(err)
			}
			fs, err := Open(f, 0)
			if err != nil {
				t.Fatal(err)
			}
			before, _ := fs.Lookup("EFI/BOOT/grubenv")
			// Same size: bytes change, clusters do not.
			env := bytes.Repeat([]byte{'x'}, 1024)
			if err := fs.WriteFile(f, "EFI/BOOT/grubenv", env); err != nil {
				t.Fatal(err)
			}
			after, _ := fs.Lookup("EFI/BOOT/grubenv")
			if after.FirstCluster != before.FirstCluster {
				t.Fatalf("grubenv moved from cluster %d to %d", before.FirstCluster, after.FirstCluster)
			}
			// Grow a file across clusters and shrink another to nothing, then grow it again
			// (what a power cut during grub-editenv leaves behind, then a repair).
			grown := bytes.Repeat([]byte("grow"), 5000)
			if err := fs.WriteFile(f, "user-data", grown); err != nil {
				t.Fatal(err)
			}
			if err := fs.WriteFile(f, "EFI/BOOT/BOOTX64.EFI", nil); err != nil {
				t.Fatal(err)
			}
			if err := fs.WriteFile(f, "network-config", []byte("version: 2\n")); err != nil {
				t.Fatal(err)
			}
			run(t, tool(t, "fsck.fat"), "-n", p)
			tool(t, "mtype")
			for name, want := range map[string][]byte{"EFI/BOOT/grubenv": env, "user-data": grown, "EFI/BOOT/BOOTX64.EFI": {}, "network-config": []byte("version: 2\n")} {
				if got := run(t, "mtype", "-i", p, "::"+name); got != string(want) {
					t.Fatalf("%s: %d bytes, want %d", name, len(got), len(want))
				}
			}
		})
	}
}

// TestReadToolBuiltVolumes reads volumes made by mkfs.fat and mcopy, including FAT12.
func TestReadToolBuiltVolumes(t *testing.T) {
	mkfs := tool(t, "mkfs.fat")
	tool(t, "mcopy")
	for _, tc := range []struct {
		args []string
		size int64
		typ  Type
	}{
		{[]string{"-F", "12"}, 2 << 20, FAT12},
		{[]string{"-F", "16"}, 64 << 20, FAT16},
		{[]string{"-F", "32"}, 256 << 20, FAT32},
	} {
		t.Run(tc.typ.String(), func(t *testing.T) {
			dir := t.TempDir()
			p := filepath.Join(dir, "v.img")
			if err := os.WriteFile(p, nil, 0o600); err != nil {
				t.Fatal(err)
			}
			if err := os.Truncate(p, tc.size); err != nil {
				t.Fatal(err)
			}
			run(t, mkfs, append(append([]string{}, tc.args...), "-n", "CIDATA", p)...)
			src := filepath.Join(dir, "network-config")
			content := bytes.Repeat([]byte("abc"), 3000)
			if err := os.WriteFile(src, content, 0o600); err != nil {
				t.Fatal(err)
			}
			run(t, "mmd", "-i", p, "::EFI", "::EFI/BOOT")
			run(t, "mcopy", "-i", p, src, "::EFI/BOOT/network-config")
			f, err := os.OpenFile(p, os.O_RDWR, 0)
			if err != nil {
				t.Fatal(err)
			}
			defer func() { _ = f.Close() }()
			fs, err := Open(f, 0)
			if err != nil {
				t.Fatal(err)
			}
			if fs.Type != tc.typ || fs.Label != "CIDATA" {
				t.Fatalf("type %v label %q", fs.Type, fs.Label)
			}
			got, err := fs.ReadFile("efi/boot/network-config")
			if err != nil || !bytes.Equal(got, content) {
				t.Fatalf("read: %v (%d bytes)", err, len(got))
			}
			if tc.typ == FAT12 {
				return
			}
			repl := bytes.Repeat([]byte("z"), len(content))
			if err := fs.WriteFile(f, "EFI/BOOT/network-config", repl); err != nil {
				t.Fatal(err)
			}
			if out := run(t, "mtype", "-i", p, "::EFI/BOOT/network-config"); out != string(repl) {
				t.Fatal("mtype after in-place write differs")
			}
			run(t, mkfs[:len(mkfs)-len("mkfs.fat")]+"fsck.fat", "-n", p)
		})
	}
}

func TestShortNames(t *testing.T) {
	for name, want := range map[string]bool{"BOOTX64.EFI": true, "grub.cfg": true, "Grub.cfg": false, "user-data": false, "a.b.c": false, "README": true} {
		if _, _, ok := exactShortName(name); ok != want {
			t.Errorf("exactShortName(%q) ok=%v, want %v", name, ok, want)
		}
	}
	taken := map[[11]byte]bool{}
	a, _ := generatedShortName("network-config", taken)
	taken[a] = true
	b, _ := generatedShortName("network-config2", taken)
	if string(a[:]) != "NETWOR~1   " || string(b[:]) != "NETWOR~2   " {
		t.Fatalf("%q %q", a, b)
	}
}
