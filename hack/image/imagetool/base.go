package main

import (
	"archive/tar"
	"bytes"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path"
	"path/filepath"
	"sort"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/layout"
	"github.com/google/go-containerregistry/pkg/v1/match"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/partial"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
	"github.com/google/go-containerregistry/pkg/v1/types"
)

const (
	// defaultBaseName is the name the base is given in ko's cache and in the
	// org.opencontainers.image.base.name annotation ko puts on the result. ".local" is not a
	// resolvable registry, so if ko ever misses its cache it fails with an obvious "pulling
	// anvil.local/..." error instead of silently fetching something else.
	defaultBaseName = "anvil.local/static-base"

	// nonRootID matches distroless' "nonroot" user, so the ko image and the Dockerfile image
	// run as the same uid/gid and manifests (runAsUser etc.) fit both.
	nonRootID = 65532

	// bootAssetsDir is where the iPXE binaries live in both images (the Dockerfile copies to
	// the same place).
	bootAssetsDir = "/usr/share/anvil/ipxe"

	// refNameAnnotation tags our entry in the shared cache index (as NAME:OS-ARCH) so a
	// rebuilt base (new CA bundle, iPXE added) replaces the old entry for its platform instead
	// of piling up next to it, while bases for other architectures stay.
	refNameAnnotation = "org.opencontainers.image.ref.name"
)

// ipxeFiles are the Debian ipxe package files Anvil serves: BIOS (undionly.kpxe) and UEFI
// (ipxe.efi with its own drivers, snponly.efi using the firmware's network stack).
var ipxeFiles = []string{"undionly.kpxe", "ipxe.efi", "snponly.efi"}

// agentAssetsDir holds the agent's kernel and initramfs, the names the boot HTTP server
// serves under /artifacts/ (cmd/manager --agent-artifacts-dir).
const agentAssetsDir = "/usr/share/anvil/agent"

var agentFiles = []string{"vmlinuz", "initramfs"}

// epoch is the timestamp of every file and of the config: fixed, so the same inputs give the
// same digest on every machine and run, and ko's cache keeps hitting.
var epoch = time.Unix(0, 0).UTC()

type baseOptions struct {
	Arch     string // GOARCH-style architecture recorded in the config.
	CABundle string // Host CA bundle to copy in; skipped if "" or missing.
	IPXEDir  string // Directory holding ipxeFiles; skipped if "" or none present.
	AgentDir string // Directory holding agentFiles; the image always gets agentAssetsDir.
}

// tarEntry is one file or directory of a generated layer.
type tarEntry struct {
	name     string // absolute path in the image
	mode     int64  // permission bits, including sticky for /tmp
	uid, gid int
	body     []byte // nil for a directory (or a symlink)
	link     string // symlink target; makes the entry a symlink
}

// buildBase assembles the base image: a distroless-static-like root filesystem (passwd,
// group, nsswitch, CA bundle, home and tmp dirs) and, if available, a layer of iPXE binaries.
func buildBase(o baseOptions, logf func(string, ...any)) (v1.Image, error) {
	files := []tarEntry{
		dir("/etc", 0o755), dir("/etc/ssl", 0o755), dir("/etc/ssl/certs", 0o755),
		dir("/home", 0o755),
		{name: "/home/nonroot", mode: 0o700, uid: nonRootID, gid: nonRootID},
		dir("/root", 0o700),
		dir("/tmp", 0o1777),
		file("/etc/passwd", 0o644, "root:x:0:0:root:/root:/sbin/nologin\n"+
			"nobody:x:65534:65534:nobody:/nonexistent:/sbin/nologin\n"+
			fmt.Sprintf("nonroot:x:%d:%d:nonroot:/home/nonroot:/sbin/nologin\n", nonRootID, nonRootID)),
		file("/etc/group", 0o644, "root:x:0:\nnobody:x:65534:\n"+fmt.Sprintf("nonroot:x:%d:\n", nonRootID)),
		// Without nsswitch.conf some resolvers skip /etc/hosts; distroless ships the same line.
		file("/etc/nsswitch.conf", 0o644, "hosts: files dns\n"),
	}
	env := []string{"PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"}

	// CA certificates let the manager talk TLS to BMCs and APIs outside the cluster. The
	// host's bundle is the cheapest source we have offline; its content feeds the digest, so
	// a ca-certificates update simply produces (and caches) a new base.
	if o.CABundle != "" {
		ca, err := os.ReadFile(o.CABundle)
		switch {
		case err == nil:
			files = append(files, tarEntry{name: "/etc/ssl/certs/ca-certificates.crt", mode: 0o644, body: ca})
			env = append(env, "SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt")
		case errors.Is(err, fs.ErrNotExist):
			logf("no CA bundle at %s; the image will have no CA certificates", o.CABundle)
		default:
			return nil, fmt.Errorf("reading CA bundle: %w", err)
		}
	}

	layers := []mutate.Addendum{newLayer(files, "base filesystem: passwd, group, CA certificates")}

	boot, err := ipxeLayer(o.IPXEDir, logf)
	if err != nil {
		return nil, err
	}
	if boot != nil {
		layers = append(layers, *boot)
	}
	agent, err := agentLayer(o.AgentDir, logf)
	if err != nil {
		return nil, err
	}
	layers = append(layers, agent)

	// OCI media types throughout: ko types the layers it adds after the base's manifest.
	img := mutate.MediaType(empty.Image, types.OCIManifestSchema1)
	img = mutate.ConfigMediaType(img, types.OCIConfigJSON)
	img, err = mutate.ConfigFile(img, &v1.ConfigFile{
		OS:           "linux",
		Architecture: o.Arch,
		Created:      v1.Time{Time: epoch},
		RootFS:       v1.RootFS{Type: "layers"},
		Config: v1.Config{
			// Numeric user:group, so Kubernetes' runAsNonRoot check can verify it without
			// reading /etc/passwd, which it cannot do.
			User:       fmt.Sprintf("%d:%d", nonRootID, nonRootID),
			WorkingDir: "/home/nonroot",
			Env:        env,
		},
	})
	if err != nil {
		return nil, err
	}
	return mutate.Append(img, layers...)
}

// ipxeLayer returns a layer with whichever of ipxeFiles exist in ipxeDir (and the package's
// copyright file, since iPXE is GPL and we redistribute it), or nil if none do.
func ipxeLayer(ipxeDir string, logf func(string, ...any)) (*mutate.Addendum, error) {
	if ipxeDir == "" {
		return nil, nil
	}
	entries := []tarEntry{dir("/usr", 0o755), dir("/usr/share", 0o755), dir("/usr/share/anvil", 0o755), dir(bootAssetsDir, 0o755)}
	var found, missing []string
	for _, name := range ipxeFiles {
		// ReadFile follows symlinks: Debian ships ipxe.efi as a link to /boot/ipxe.efi.
		b, err := os.ReadFile(filepath.Join(ipxeDir, name))
		if errors.Is(err, fs.ErrNotExist) {
			missing = append(missing, name)
			continue
		}
		if err != nil {
			return nil, fmt.Errorf("reading iPXE binary: %w", err)
		}
		found = append(found, name)
		entries = append(entries, tarEntry{name: path.Join(bootAssetsDir, name), mode: 0o644, body: b})
	}
	if len(found) == 0 {
		logf("no iPXE binaries in %s (install Debian's ipxe package to include them); building without boot assets", ipxeDir)
		return nil, nil
	}
	if len(missing) > 0 {
		logf("iPXE: including %v, missing %v in %s", found, missing, ipxeDir)
	} else {
		logf("iPXE: including %v from %s", found, ipxeDir)
	}
	// The copyright file lives at the package's doc path, relative to /usr/lib/ipxe.
	if b, err := os.ReadFile(filepath.Join(ipxeDir, "..", "..", "share", "doc", "ipxe", "copyright")); err == nil {
		entries = append(entries, tarEntry{name: path.Join(bootAssetsDir, "copyright"), mode: 0o644, body: b})
	}
	add := newLayer(entries, "iPXE boot binaries at "+bootAssetsDir)
	return &add, nil
}

// agentLayer returns a layer with agentAssetsDir, holding the agent kernel and initramfs
// from agentDir when both are there. The directory itself is always created: the manager's
// boot HTTP server opens it at start-up and would not start without it.
func agentLayer(agentDir string, logf func(string, ...any)) (mutate.Addendum, error) {
	entries := []tarEntry{dir("/usr", 0o755), dir("/usr/share", 0o755), dir("/usr/share/anvil", 0o755), dir(agentAssetsDir, 0o755)}
	var bodies [][]byte
	for _, name := range agentFiles {
		if agentDir == "" {
			break
		}
		b, err := os.ReadFile(filepath.Join(agentDir, name))
		if errors.Is(err, fs.ErrNotExist) {
			bodies = nil
			break
		}
		if err != nil {
			return mutate.Addendum{}, fmt.Errorf("reading agent artifact: %w", err)
		}
		bodies = append(bodies, b)
	}
	if len(bodies) == len(agentFiles) {
		for i, name := range agentFiles {
			entries = append(entries, tarEntry{name: path.Join(agentAssetsDir, name), mode: 0o644, body: bodies[i]})
		}
		logf("agent: including %v from %s", agentFiles, agentDir)
	} else {
		logf("agent: no %v in %q; the image has an empty %s (servers cannot boot the agent from it)", agentFiles, agentDir, agentAssetsDir)
	}
	return newLayer(entries, "agent kernel and initramfs at "+agentAssetsDir), nil
}

func dir(name string, mode int64) tarEntry { return tarEntry{name: name, mode: mode} }

func file(name string, mode int64, body string) tarEntry {
	return tarEntry{name: name, mode: mode, body: []byte(body)}
}

// newLayer tars entries deterministically (sorted, fixed times, no host user names) so that
// equal inputs always give an equal layer digest.
func newLayer(entries []tarEntry, comment string) mutate.Addendum {
	sort.Slice(entries, func(i, j int) bool { return entries[i].name < entries[j].name })
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	for _, e := range entries {
		h := &tar.Header{
			Name:    e.name[1:], // layer paths are relative to the root
			Mode:    e.mode,
			Uid:     e.uid,
			Gid:     e.gid,
			ModTime: epoch,
			Format:  tar.FormatPAX,
		}
		switch {
		case e.link != "":
			h.Typeflag, h.Linkname = tar.TypeSymlink, e.link
		case e.body == nil:
			h.Typeflag, h.Name = tar.TypeDir, h.Name+"/"
		default:
			h.Typeflag, h.Size = tar.TypeReg, int64(len(e.body))
		}
		// Writes to a bytes.Buffer cannot fail, and the headers are well-formed by construction.
		if err := tw.WriteHeader(h); err != nil {
			panic(err)
		}
		_, _ = tw.Write(e.body)
	}
	_ = tw.Close()
	raw := buf.Bytes()

	layer, err := tarball.LayerFromOpener(func() (io.ReadCloser, error) {
		return io.NopCloser(bytes.NewReader(raw)), nil
	}, tarball.WithMediaType(types.OCILayer))
	if err != nil {
		panic(err) // only fails if the opener does
	}
	return mutate.Addendum{
		Layer:     layer,
		MediaType: types.OCILayer,
		History:   v1.History{Created: v1.Time{Time: epoch}, CreatedBy: "hack/image/imagetool base", Comment: comment},
	}
}

// writeBase stores img in the OCI layout at layoutDir (creating it if needed) under name, and
// returns "name@digest". It is a no-op if that exact image is already there, which keeps a
// warm run from rewriting the cache.
func writeBase(layoutDir, name string, img v1.Image) (string, error) {
	dig, err := img.Digest()
	if err != nil {
		return "", err
	}
	ref := name + "@" + dig.String()

	p, err := layout.FromPath(layoutDir)
	if err != nil {
		// Same fallback ko uses when it initialises its cache: start with an empty index.
		if p, err = layout.Write(layoutDir, empty.Index); err != nil {
			return "", fmt.Errorf("creating OCI layout %s: %w", layoutDir, err)
		}
	}
	ii, err := p.ImageIndex()
	if err != nil {
		return "", fmt.Errorf("reading OCI layout %s: %w", layoutDir, err)
	}
	if descs, err := partial.FindManifests(ii, match.Digests(dig)); err == nil && len(descs) > 0 {
		return ref, nil
	}
	cfg, err := img.ConfigFile()
	if err != nil {
		return "", err
	}
	key := name + ":" + cfg.OS + "-" + cfg.Architecture
	// ReplaceImage writes manifest, config and layer blobs (ko's cache looks them all up by
	// digest), then swaps our previous entry in index.json, leaving ko's own entries alone.
	err = p.ReplaceImage(img, match.Annotation(refNameAnnotation, key),
		layout.WithAnnotations(map[string]string{refNameAnnotation: key}))
	if err != nil {
		return "", fmt.Errorf("writing base image to %s: %w", layoutDir, err)
	}
	return ref, nil
}
