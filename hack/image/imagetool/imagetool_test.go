package main

import (
	"archive/tar"
	"debug/elf"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/layout"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/random"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
)

func quiet(string, ...any) {}

// staticBinary builds the testdata stand-in manager with CGO_ENABLED=0, once per test run.
var staticBinary = sync.OnceValues(func() ([]byte, error) {
	dir, err := os.MkdirTemp("", "imagetool-test")
	if err != nil {
		return nil, err
	}
	defer os.RemoveAll(dir)
	out := filepath.Join(dir, "manager")
	cmd := exec.Command("go", "build", "-trimpath", "-o", out, "../testdata/manager")
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0", "GOOS=linux", "GOARCH=amd64")
	if b, err := cmd.CombinedOutput(); err != nil {
		return nil, fmt.Errorf("%w: %s", err, b)
	}
	return os.ReadFile(out)
})

// dynamicBinary returns a dynamically linked host executable, or skips the test.
func dynamicBinary(t *testing.T) []byte {
	t.Helper()
	for _, p := range []string{"/bin/true", "/usr/bin/true"} {
		f, err := elf.Open(p)
		if err != nil {
			continue
		}
		libs, _ := f.ImportedLibraries()
		f.Close()
		if len(libs) > 0 && f.Machine == elf.EM_X86_64 {
			b, err := os.ReadFile(p)
			if err == nil {
				return b
			}
		}
	}
	t.Skip("no dynamically linked x86-64 /bin/true on this host")
	return nil
}

func testBase(t *testing.T, o baseOptions) v1.Image {
	t.Helper()
	if o.Arch == "" {
		o.Arch = "amd64"
	}
	img, err := buildBase(o, quiet)
	if err != nil {
		t.Fatal(err)
	}
	return img
}

// appImage layers files on base and sets the config the way ko or a Dockerfile would.
func appImage(t *testing.T, base v1.Image, user string, entrypoint []string, files ...tarEntry) v1.Image {
	t.Helper()
	img, err := mutate.Append(base, newLayer(files, "app"))
	if err != nil {
		t.Fatal(err)
	}
	cfg, err := img.ConfigFile()
	if err != nil {
		t.Fatal(err)
	}
	cfg = cfg.DeepCopy()
	cfg.Config.User = user
	cfg.Config.Entrypoint = entrypoint
	img, err = mutate.ConfigFile(img, cfg)
	if err != nil {
		t.Fatal(err)
	}
	return img
}

func writeTarball(t *testing.T, imgs ...v1.Image) string {
	t.Helper()
	refs := map[name.Reference]v1.Image{}
	for i, img := range imgs {
		tag, err := name.NewTag("ghcr.io/anvil-metal/test:v" + string(rune('0'+i)))
		if err != nil {
			t.Fatal(err)
		}
		refs[tag] = img
	}
	p := filepath.Join(t.TempDir(), "image.tar")
	if err := tarball.MultiRefWriteToFile(p, refs); err != nil {
		t.Fatal(err)
	}
	return p
}

func TestVerify(t *testing.T) {
	static, err := staticBinary()
	if err != nil {
		t.Fatalf("building stand-in manager: %v", err)
	}
	exe := func(p string, body []byte) tarEntry { return tarEntry{name: p, mode: 0o755, body: body} }
	base := testBase(t, baseOptions{})
	defaults := verifyOptions{WantUID: 65532, BinaryName: "manager", Platform: "linux/amd64"}

	tests := []struct {
		name string
		img  func(t *testing.T) v1.Image
		opts func(*verifyOptions)
		want []string // substrings of the expected problems; none means the image passes
	}{{
		name: "ko-like image passes",
		img: func(t *testing.T) v1.Image {
			return appImage(t, base, "65532:65532", []string{"/ko-app/manager"}, exe("/ko-app/manager", static))
		},
	}, {
		name: "Dockerfile-like image with a named user passes",
		img: func(t *testing.T) v1.Image {
			return appImage(t, base, "nonroot", []string{"/manager", "--leader-elect"}, exe("/manager", static))
		},
	}, {
		name: "entrypoint through a symlink passes",
		img: func(t *testing.T) v1.Image {
			return appImage(t, base, "65532", []string{"/usr/bin/manager"},
				exe("/opt/anvil/manager", static), tarEntry{name: "/usr/bin/manager", link: "../../opt/anvil/manager"})
		},
	}, {
		name: "no user means root",
		img: func(t *testing.T) v1.Image {
			return appImage(t, base, "", []string{"/manager"}, exe("/manager", static))
		},
		want: []string{"no user, so it runs as root"},
	}, {
		name: "uid 0",
		img: func(t *testing.T) v1.Image {
			return appImage(t, base, "0:65532", []string{"/manager"}, exe("/manager", static))
		},
		want: []string{"runs as root"},
	}, {
		name: "other non-root uid",
		img: func(t *testing.T) v1.Image {
			return appImage(t, base, "1000", []string{"/manager"}, exe("/manager", static))
		},
		want: []string{"runs as uid 1000", "want 65532"},
	}, {
		name: "other non-root uid accepted with -uid=-1",
		img: func(t *testing.T) v1.Image {
			return appImage(t, base, "1000", []string{"/manager"}, exe("/manager", static))
		},
		opts: func(o *verifyOptions) { o.WantUID = -1 },
	}, {
		name: "dynamically linked binary",
		img: func(t *testing.T) v1.Image {
			return appImage(t, base, "65532", []string{"/manager"}, exe("/manager", dynamicBinary(t)))
		},
		want: []string{"dynamically linked (PT_INTERP /lib64/ld-linux-x86-64.so.2)", "needs shared libraries"},
	}, {
		name: "entrypoint missing from the filesystem",
		img: func(t *testing.T) v1.Image {
			return appImage(t, base, "65532", []string{"/ko-app/manager"}, exe("/manager", static))
		},
		want: []string{"/ko-app/manager does not exist"},
	}, {
		name: "entrypoint is another binary",
		img: func(t *testing.T) v1.Image {
			return appImage(t, base, "65532", []string{"/bin/sh"}, exe("/bin/sh", static))
		},
		want: []string{`"/bin/sh" does not point at the manager binary`},
	}, {
		name: "not executable",
		img: func(t *testing.T) v1.Image {
			return appImage(t, base, "65532", []string{"/manager"}, tarEntry{name: "/manager", mode: 0o644, body: static})
		},
		want: []string{"not executable"},
	}, {
		name: "not an ELF file",
		img: func(t *testing.T) v1.Image {
			return appImage(t, base, "65532", []string{"/manager"}, exe("/manager", []byte("#!/bin/sh\n")))
		},
		want: []string{"not an ELF binary"},
	}, {
		name: "no entrypoint",
		img: func(t *testing.T) v1.Image {
			return appImage(t, base, "65532", nil, exe("/manager", static))
		},
		want: []string{"no entrypoint"},
	}, {
		name: "platform mismatch",
		img: func(t *testing.T) v1.Image {
			return appImage(t, testBase(t, baseOptions{Arch: "arm64"}), "65532", []string{"/manager"}, exe("/manager", static))
		},
		want: []string{"platform is linux/arm64, want linux/amd64", "built for EM_X86_64, but the image is arm64"},
	}, {
		name: "boot assets required but absent",
		img: func(t *testing.T) v1.Image {
			return appImage(t, base, "65532", []string{"/manager"}, exe("/manager", static))
		},
		opts: func(o *verifyOptions) { o.RequireBootAssets = true },
		want: []string{"boot assets: want undionly.kpxe, ipxe.efi, snponly.efi"},
	}, {
		name: "boot assets required and present",
		img: func(t *testing.T) v1.Image {
			b := testBase(t, baseOptions{IPXEDir: fakeIPXE(t)})
			return appImage(t, b, "65532", []string{"/manager"}, exe("/manager", static))
		},
		opts: func(o *verifyOptions) { o.RequireBootAssets = true },
	}, {
		name: "agent required but absent",
		img: func(t *testing.T) v1.Image {
			return appImage(t, base, "65532", []string{"/manager"}, exe("/manager", static))
		},
		opts: func(o *verifyOptions) { o.RequireAgent = true },
		want: []string{"agent: want vmlinuz, initramfs under /usr/share/anvil/agent"},
	}, {
		name: "agent required and present",
		img: func(t *testing.T) v1.Image {
			agent := t.TempDir()
			for _, name := range []string{"vmlinuz", "initramfs"} {
				if err := os.WriteFile(filepath.Join(agent, name), []byte(name), 0o644); err != nil {
					t.Fatal(err)
				}
			}
			return appImage(t, testBase(t, baseOptions{AgentDir: agent}), "65532", []string{"/manager"}, exe("/manager", static))
		},
		opts: func(o *verifyOptions) { o.RequireAgent = true },
	}}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			o := defaults
			if tc.opts != nil {
				tc.opts(&o)
			}
			rep, problems := verifyTarball(writeTarball(t, tc.img(t)), o)
			checkProblems(t, rep, problems, tc.want)
		})
	}

	t.Run("two images", func(t *testing.T) {
		img := appImage(t, base, "65532", []string{"/manager"}, exe("/manager", static))
		rep, problems := verifyTarball(writeTarball(t, img, base), defaults)
		checkProblems(t, rep, problems, []string{"holds 2 images, want exactly 1"})
	})
	t.Run("not a tarball", func(t *testing.T) {
		p := filepath.Join(t.TempDir(), "x.tar")
		if err := os.WriteFile(p, []byte("nope"), 0o644); err != nil {
			t.Fatal(err)
		}
		rep, problems := verifyTarball(p, defaults)
		checkProblems(t, rep, problems, []string{"cannot read"})
	})
}

func checkProblems(t *testing.T, rep string, problems, want []string) {
	t.Helper()
	all := strings.Join(problems, "\n")
	if len(want) == 0 && len(problems) > 0 {
		t.Fatalf("unexpected problems:\n%s\nreport:\n%s", all, rep)
	}
	if len(want) > 0 && len(problems) == 0 {
		t.Fatalf("expected problems %q, got none; report:\n%s", want, rep)
	}
	for _, w := range want {
		if !strings.Contains(all, w) {
			t.Errorf("problems do not mention %q:\n%s", w, all)
		}
	}
}

// fakeIPXE lays out a directory shaped like Debian's ipxe package: /usr/lib/ipxe with
// ipxe.efi as a symlink into /boot, and the copyright file under /usr/share/doc.
func fakeIPXE(t *testing.T) string {
	t.Helper()
	root := t.TempDir()
	write := func(p, body string) {
		p = filepath.Join(root, p)
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(p, []byte(body), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	write("usr/lib/ipxe/undionly.kpxe", "bios")
	write("usr/lib/ipxe/snponly.efi", "snp")
	write("boot/ipxe.efi", "efi")
	write("usr/share/doc/ipxe/copyright", "GPL-2")
	if err := os.Symlink("../../../boot/ipxe.efi", filepath.Join(root, "usr/lib/ipxe/ipxe.efi")); err != nil {
		t.Fatal(err)
	}
	return filepath.Join(root, "usr/lib/ipxe")
}

// layerFiles returns path -> content of the regular files in a base image's layers.
func layerFiles(t *testing.T, img v1.Image) map[string]string {
	t.Helper()
	files := map[string]string{}
	rc := mutate.Extract(img)
	defer rc.Close()
	tr := tar.NewReader(rc)
	for {
		h, err := tr.Next()
		if err == io.EOF {
			return files
		}
		if err != nil {
			t.Fatal(err)
		}
		if h.Typeflag == tar.TypeReg {
			b, _ := io.ReadAll(tr)
			files[h.Name] = string(b)
		}
	}
}

func TestBaseContents(t *testing.T) {
	ca := filepath.Join(t.TempDir(), "ca.crt")
	if err := os.WriteFile(ca, []byte("-----BEGIN CERTIFICATE-----\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	img := testBase(t, baseOptions{CABundle: ca, IPXEDir: fakeIPXE(t)})

	files := layerFiles(t, img)
	for p, want := range map[string]string{
		"etc/ssl/certs/ca-certificates.crt":  "-----BEGIN CERTIFICATE-----\n",
		"usr/share/anvil/ipxe/undionly.kpxe": "bios",
		"usr/share/anvil/ipxe/ipxe.efi":      "efi", // followed the symlink
		"usr/share/anvil/ipxe/snponly.efi":   "snp",
		"usr/share/anvil/ipxe/copyright":     "GPL-2",
	} {
		if files[p] != want {
			t.Errorf("%s = %q, want %q", p, files[p], want)
		}
	}
	if !strings.Contains(files["etc/passwd"], "nonroot:x:65532:65532:") {
		t.Errorf("passwd lacks the nonroot user:\n%s", files["etc/passwd"])
	}

	cfg, err := img.ConfigFile()
	if err != nil {
		t.Fatal(err)
	}
	if cfg.Config.User != "65532:65532" || cfg.OS != "linux" || cfg.Architecture != "amd64" {
		t.Errorf("config user/os/arch = %q %s/%s", cfg.Config.User, cfg.OS, cfg.Architecture)
	}
	if !strings.Contains(strings.Join(cfg.Config.Env, " "), "SSL_CERT_FILE=") {
		t.Errorf("SSL_CERT_FILE not set: %v", cfg.Config.Env)
	}

	// Missing inputs are skipped, not errors: a machine without ca-certificates or ipxe
	// still gets an image.
	bare := testBase(t, baseOptions{CABundle: filepath.Join(t.TempDir(), "none"), IPXEDir: t.TempDir()})
	if layers, _ := bare.Layers(); len(layers) != 2 {
		t.Errorf("base without CA/iPXE/agent has %d layers, want 2 (files, empty agent directory)", len(layers))
	}
}

// The agent directory is always there (the manager opens it at start-up); the kernel and
// initramfs go in only as a pair.
func TestBaseAgentArtifacts(t *testing.T) {
	agent := t.TempDir()
	for name, body := range map[string]string{"vmlinuz": "kernel", "initramfs": "cpio"} {
		if err := os.WriteFile(filepath.Join(agent, name), []byte(body), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	files := layerFiles(t, testBase(t, baseOptions{AgentDir: agent}))
	if files["usr/share/anvil/agent/vmlinuz"] != "kernel" || files["usr/share/anvil/agent/initramfs"] != "cpio" {
		t.Errorf("agent artifacts missing: %v", files)
	}
	if err := os.Remove(filepath.Join(agent, "initramfs")); err != nil {
		t.Fatal(err)
	}
	files = layerFiles(t, testBase(t, baseOptions{AgentDir: agent}))
	if _, ok := files["usr/share/anvil/agent/vmlinuz"]; ok {
		t.Error("a kernel without its initramfs was included")
	}
}

func TestBaseIsReproducible(t *testing.T) {
	ipxe := fakeIPXE(t)
	a, _ := testBase(t, baseOptions{IPXEDir: ipxe}).Digest()
	b, _ := testBase(t, baseOptions{IPXEDir: ipxe}).Digest()
	if a != b {
		t.Fatalf("same inputs gave digests %s and %s", a, b)
	}
	c, _ := testBase(t, baseOptions{}).Digest()
	if a == c {
		t.Fatal("adding iPXE did not change the digest")
	}
}

func TestWriteBase(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "img")

	// Something ko itself cached earlier must survive our updates.
	p, err := layout.Write(dir, empty.Index)
	if err != nil {
		t.Fatal(err)
	}
	foreign, err := random.Image(64, 1)
	if err != nil {
		t.Fatal(err)
	}
	if err := p.AppendImage(foreign); err != nil {
		t.Fatal(err)
	}

	first := testBase(t, baseOptions{})
	for range 2 { // the second write must be a no-op, not a second index entry
		ref, err := writeBase(dir, defaultBaseName, first)
		if err != nil {
			t.Fatal(err)
		}
		d, _ := first.Digest()
		if ref != defaultBaseName+"@"+d.String() {
			t.Fatalf("ref = %s", ref)
		}
	}
	assertIndex(t, dir, first, foreign)

	// A base for another architecture is kept alongside...
	arm := testBase(t, baseOptions{Arch: "arm64"})
	if _, err := writeBase(dir, defaultBaseName, arm); err != nil {
		t.Fatal(err)
	}
	assertIndex(t, dir, first, arm, foreign)

	// ...but a changed base for the same one replaces its predecessor.
	second := testBase(t, baseOptions{IPXEDir: fakeIPXE(t)})
	if _, err := writeBase(dir, defaultBaseName, second); err != nil {
		t.Fatal(err)
	}
	assertIndex(t, dir, second, arm, foreign)

	// Every blob ko will read (config and layers, by digest) must be in the layout.
	got, err := p.Image(mustDigest(t, second))
	if err != nil {
		t.Fatal(err)
	}
	layers, err := got.Layers()
	if err != nil {
		t.Fatal(err)
	}
	for _, l := range layers {
		d, _ := l.Digest()
		if _, err := p.Blob(d); err != nil {
			t.Errorf("layer blob %s missing: %v", d, err)
		}
	}
}

func mustDigest(t *testing.T, img v1.Image) v1.Hash {
	t.Helper()
	d, err := img.Digest()
	if err != nil {
		t.Fatal(err)
	}
	return d
}

// assertIndex checks that index.json lists exactly the given images.
func assertIndex(t *testing.T, dir string, want ...v1.Image) {
	t.Helper()
	p, err := layout.FromPath(dir)
	if err != nil {
		t.Fatal(err)
	}
	ii, err := p.ImageIndex()
	if err != nil {
		t.Fatal(err)
	}
	im, err := ii.IndexManifest()
	if err != nil {
		t.Fatal(err)
	}
	got := map[v1.Hash]bool{}
	for _, d := range im.Manifests {
		got[d.Digest] = true
	}
	if len(im.Manifests) != len(want) {
		t.Errorf("index has %d entries, want %d", len(im.Manifests), len(want))
	}
	for _, img := range want {
		if d := mustDigest(t, img); !got[d] {
			t.Errorf("index lacks %s", d)
		}
	}
}
