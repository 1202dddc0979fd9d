package main

import (
	"archive/tar"
	"bufio"
	"bytes"
	"debug/buildinfo"
	"debug/elf"
	"errors"
	"fmt"
	"io"
	"os"
	"path"
	"strconv"
	"strings"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
)

type verifyOptions struct {
	WantUID           int    // required uid; -1 means any non-root
	BinaryName        string // required base name of the entrypoint; "" to skip
	Platform          string // required "os/arch"; "" to skip
	RequireBootAssets bool   // fail unless every ipxeFiles entry is under bootAssetsDir
	RequireAgent      bool   // fail unless every agentFiles entry is under agentAssetsDir
}

// elfMachine maps GOARCH to the ELF machine a binary for it must declare.
var elfMachine = map[string]elf.Machine{
	"amd64": elf.EM_X86_64, "arm64": elf.EM_AARCH64, "arm": elf.EM_ARM, "386": elf.EM_386,
	"ppc64le": elf.EM_PPC64, "s390x": elf.EM_S390, "riscv64": elf.EM_RISCV,
}

// verifyTarball checks the image tarball at p and returns a human-readable report plus one
// message per failed check. It keeps going after a failure so CI shows everything at once.
func verifyTarball(p string, o verifyOptions) (string, []string) {
	var rep strings.Builder
	var problems []string
	fail := func(format string, a ...any) { problems = append(problems, fmt.Sprintf(format, a...)) }
	fmt.Fprintf(&rep, "verify-image: %s\n", p)

	// One image: build.sh produces exactly one, and `docker load`/`kind load` of a tarball
	// with several would leave it unclear which one CI tested.
	m, err := tarball.LoadManifest(func() (io.ReadCloser, error) { return os.Open(p) })
	if err != nil {
		return rep.String(), []string{fmt.Sprintf("cannot read %s as an image tarball: %v", p, err)}
	}
	if len(m) != 1 {
		return rep.String(), []string{fmt.Sprintf("tarball holds %d images, want exactly 1", len(m))}
	}
	fmt.Fprintf(&rep, "  image:       %s\n", strings.Join(m[0].RepoTags, ", "))

	img, err := tarball.ImageFromPath(p, nil)
	if err != nil {
		return rep.String(), []string{fmt.Sprintf("loading image: %v", err)}
	}
	cfg, err := img.ConfigFile()
	if err != nil {
		return rep.String(), []string{fmt.Sprintf("reading image config: %v", err)}
	}
	if id, err := img.ConfigName(); err == nil {
		fmt.Fprintf(&rep, "  image id:    %s\n", id)
	}

	platform := cfg.OS + "/" + cfg.Architecture
	fmt.Fprintf(&rep, "  platform:    %s\n", platform)
	if o.Platform != "" && platform != o.Platform {
		fail("image platform is %s, want %s", platform, o.Platform)
	}

	// Read the merged filesystem once, keeping headers of everything and the contents of the
	// few files we look into. Image binaries are tens of MiB, so buffering them is fine.
	fsys, err := readFS(img)
	if err != nil {
		return rep.String(), append(problems, fmt.Sprintf("reading image filesystem: %v", err))
	}

	fmt.Fprintf(&rep, "  user:        %q\n", cfg.Config.User)
	checkUser(cfg.Config.User, fsys, o.WantUID, fail)

	ep := cfg.Config.Entrypoint
	fmt.Fprintf(&rep, "  entrypoint:  %q\n", ep)
	switch {
	case len(ep) == 0:
		fail("image has no entrypoint")
	case !path.IsAbs(ep[0]):
		fail("entrypoint %q is not an absolute path", ep[0])
	default:
		if o.BinaryName != "" && path.Base(ep[0]) != o.BinaryName {
			fail("entrypoint %q does not point at the %s binary", ep[0], o.BinaryName)
		}
		fmt.Fprintf(&rep, "  binary:      %s\n", checkBinary(ep[0], fsys, cfg.Architecture, fail))
	}

	var assets []string
	for _, name := range ipxeFiles {
		if h := fsys.headers[path.Join(bootAssetsDir, name)[1:]]; h != nil && h.Typeflag == tar.TypeReg {
			assets = append(assets, name)
		}
	}
	if len(assets) == 0 {
		fmt.Fprintf(&rep, "  boot assets: none\n")
	} else {
		fmt.Fprintf(&rep, "  boot assets: %s: %s\n", bootAssetsDir, strings.Join(assets, " "))
	}
	if o.RequireBootAssets && len(assets) != len(ipxeFiles) {
		fail("boot assets: want %s under %s, found only %q (was Debian's ipxe package installed when the image was built?)",
			strings.Join(ipxeFiles, ", "), bootAssetsDir, assets)
	}
	// The manager opens the agent directory at start-up (--agent-artifacts-dir); the kernel
	// and initramfs in it (make agent-image) are required with RequireAgent.
	var agent []string
	agentDir := fsys.headers[agentAssetsDir[1:]]
	for _, name := range agentFiles {
		if h := fsys.headers[path.Join(agentAssetsDir, name)[1:]]; h != nil && h.Typeflag == tar.TypeReg {
			agent = append(agent, name)
		}
	}
	switch {
	case agentDir == nil || agentDir.Typeflag != tar.TypeDir:
		fmt.Fprintf(&rep, "  agent:       no %s\n", agentAssetsDir)
		if o.RequireBootAssets {
			fail("no directory %s: the manager's boot services do not start without it", agentAssetsDir)
		}
	case len(agent) == 0:
		fmt.Fprintf(&rep, "  agent:       %s (empty: no agent kernel and initramfs)\n", agentAssetsDir)
	default:
		fmt.Fprintf(&rep, "  agent:       %s: %s\n", agentAssetsDir, strings.Join(agent, " "))
	}
	if o.RequireAgent && len(agent) != len(agentFiles) {
		fail("agent: want %s under %s, found only %q (run make agent-image before make image)",
			strings.Join(agentFiles, ", "), agentAssetsDir, agent)
	}
	return rep.String(), problems
}

// checkUser fails unless user names a non-root uid (and wantUID, if >= 0). Named users are
// resolved through the image's /etc/passwd, like the container runtime would.
func checkUser(user string, fsys *imageFS, wantUID int, fail func(string, ...any)) {
	name, _, _ := strings.Cut(user, ":")
	if name == "" {
		fail("image config has no user, so it runs as root; want uid %d", max(wantUID, 1))
		return
	}
	uid, err := strconv.Atoi(name)
	if err != nil {
		uid = lookupPasswd(fsys, name)
		if uid < 0 {
			fail("user %q is not numeric and not in the image's /etc/passwd", name)
			return
		}
	}
	switch {
	case uid == 0:
		fail("image runs as root (user %q)", user)
	case wantUID >= 0 && uid != wantUID:
		fail("image runs as uid %d (user %q), want %d", uid, user, wantUID)
	}
}

func lookupPasswd(fsys *imageFS, name string) int {
	body, ok := fsys.content("etc/passwd")
	if !ok {
		return -1
	}
	sc := bufio.NewScanner(bytes.NewReader(body))
	for sc.Scan() {
		f := strings.Split(sc.Text(), ":")
		if len(f) >= 3 && f[0] == name {
			if uid, err := strconv.Atoi(f[2]); err == nil {
				return uid
			}
		}
	}
	return -1
}

// checkBinary checks that the entrypoint exists in the image as an executable, statically
// linked ELF for the image's architecture. It returns a one-line description for the report.
func checkBinary(entry string, fsys *imageFS, arch string, fail func(string, ...any)) string {
	p, err := fsys.resolve(entry)
	if err != nil {
		fail("entrypoint %s: %v", entry, err)
		return "missing"
	}
	h := fsys.headers[p]
	if h.Typeflag == tar.TypeLink { // hard link: the body is stored under the link target
		p = cleanPath(h.Linkname)
		if h = fsys.headers[p]; h == nil {
			fail("entrypoint %s is a hard link to missing /%s", entry, p)
			return "missing"
		}
	}
	if h.Typeflag != tar.TypeReg {
		fail("entrypoint %s is not a regular file", entry)
		return "not a file"
	}
	// The process runs as a non-root user, so "other" execute (or group/owner execute for the
	// owner) must be set; in practice ko and COPY both produce 0755.
	if h.Mode&0o111 == 0 {
		fail("entrypoint /%s is not executable (mode %o)", p, h.Mode)
	}
	body, _ := fsys.content(p)
	desc := fmt.Sprintf("/%s, %.1f MiB", p, float64(len(body))/(1<<20))

	f, err := elf.NewFile(bytes.NewReader(body))
	if err != nil {
		fail("entrypoint /%s is not an ELF binary: %v", p, err)
		return desc
	}
	defer f.Close()
	if want, ok := elfMachine[arch]; ok && f.Machine != want {
		fail("entrypoint /%s is built for %v, but the image is %s", p, f.Machine, arch)
	}
	// A PT_INTERP header names the dynamic loader (e.g. /lib64/ld-linux-x86-64.so.2), which
	// neither distroless/static nor our base has: such a binary fails with "no such file".
	static := true
	for _, prog := range f.Progs {
		if prog.Type == elf.PT_INTERP {
			interp, _ := io.ReadAll(prog.Open())
			fail("entrypoint /%s is dynamically linked (PT_INTERP %s); build with CGO_ENABLED=0", p, strings.TrimRight(string(interp), "\x00"))
			static = false
		}
	}
	if libs, _ := f.ImportedLibraries(); len(libs) > 0 {
		fail("entrypoint /%s needs shared libraries %v; build with CGO_ENABLED=0", p, libs)
		static = false
	}
	if static {
		desc += ", static ELF " + f.Machine.String()
	}
	if bi, err := buildinfo.Read(bytes.NewReader(body)); err == nil {
		desc += ", " + bi.GoVersion + ", " + bi.Path
		for _, s := range bi.Settings {
			if s.Key == "CGO_ENABLED" {
				desc += ", CGO_ENABLED=" + s.Value
			}
		}
	}
	return desc
}

// imageFS is the merged (whiteouts applied) filesystem of an image: every entry's header,
// plus the bodies of the files we may need to read.
type imageFS struct {
	headers map[string]*tar.Header // keyed by cleaned path without leading "/"
	bodies  map[string][]byte
}

func (fsys *imageFS) content(p string) ([]byte, bool) {
	b, ok := fsys.bodies[p]
	return b, ok
}

// readFS flattens img. It keeps the bodies of regular files that are executable or are
// /etc/passwd, since those are all the checks read; everything else is headers only.
func readFS(img v1.Image) (*imageFS, error) {
	rc := mutate.Extract(img)
	defer rc.Close()
	fsys := &imageFS{headers: map[string]*tar.Header{}, bodies: map[string][]byte{}}
	tr := tar.NewReader(rc)
	for {
		h, err := tr.Next()
		if errors.Is(err, io.EOF) {
			return fsys, nil
		}
		if err != nil {
			return nil, err
		}
		p := cleanPath(h.Name)
		fsys.headers[p] = h
		if h.Typeflag == tar.TypeReg && (h.Mode&0o111 != 0 || p == "etc/passwd") {
			b, err := io.ReadAll(tr)
			if err != nil {
				return nil, err
			}
			fsys.bodies[p] = b
		}
	}
}

// resolve follows symlinks (in any path component) the way the kernel would inside the
// container, returning the cleaned path of the final entry.
func (fsys *imageFS) resolve(p string) (string, error) {
	parts := splitPath(p)
	cur := ""
	for hops := 0; len(parts) > 0; {
		next := path.Join(cur, parts[0])
		parts = parts[1:]
		h, ok := fsys.headers[next]
		if !ok {
			if len(parts) == 0 {
				return "", fmt.Errorf("/%s does not exist in the image", next)
			}
			// Layers need not record parent directories (ko's do not), so a missing
			// intermediate entry is an implicit directory; the final lookup still fails if
			// nothing is there.
			cur = next
			continue
		}
		if h.Typeflag == tar.TypeSymlink {
			if hops++; hops > 40 {
				return "", errors.New("too many levels of symbolic links")
			}
			target := h.Linkname
			if !path.IsAbs(target) {
				target = path.Join("/", cur, target)
			}
			parts = append(splitPath(target), parts...)
			cur = ""
			continue
		}
		cur = next
	}
	return cur, nil
}

func cleanPath(p string) string {
	return strings.TrimPrefix(path.Clean("/"+p), "/")
}

// splitPath returns the components of p below the root ("/" has none).
func splitPath(p string) []string {
	if c := cleanPath(p); c != "" {
		return strings.Split(c, "/")
	}
	return nil
}
