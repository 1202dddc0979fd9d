package disk

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/base64"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"mime"
	"mime/multipart"
	"net/http"
	"net/http/httptest"
	"net/mail"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"golang.org/x/sys/unix"

	infrav1 "github.com/anvil-metal/cluster-api-provider-anvil/api/v1alpha1"
)

func needTool(t *testing.T, name string) string {
	t.Helper()
	p, err := exec.LookPath(name)
	if err != nil {
		t.Skipf("%s not installed (apt-get install gdisk fdisk mtools dosfstools grub-common grub-efi-amd64-bin grub-pc-bin)", name)
	}
	return p
}

func runTool(t *testing.T, name string, args ...string) string {
	t.Helper()
	cmd := exec.Command(name, args...)
	cmd.Env = append(os.Environ(), "MTOOLS_SKIP_CHECK=1", "LC_ALL=C")
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
	return string(out)
}

func sparseDisk(t *testing.T, size int64) *Disk {
	t.Helper()
	p := filepath.Join(t.TempDir(), "disk.img")
	if err := os.WriteFile(p, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(p, size); err != nil {
		t.Fatal(err)
	}
	d, err := Open(p)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = d.Close() })
	return d
}

// testBoot builds GRUB images once per test binary when grub-mkimage is available.
var testBoot = sync.OnceValues(func() (BootFiles, error) {
	if _, err := exec.LookPath("grub-mkimage"); err != nil {
		return BootFiles{}, err
	}
	return MakeBootFiles(context.Background(), "")
})

func layoutOpts(t *testing.T) LayoutOptions {
	t.Helper()
	o := LayoutOptions{RootSize: 256 * MiB, KernelArgs: "console=ttyS0,115200n8", SerialConsole: true}
	if bf, err := testBoot(); err == nil {
		o.Boot = bf
	} else {
		t.Logf("no GRUB images (%v); layout without bootloader", err)
	}
	return o
}

// contentHash hashes a sparse image's data segments with their offsets (holes read as
// zeros, so any change of content changes the hash) without reading gigabytes of holes.
func contentHash(t *testing.T, d *Disk) [32]byte {
	t.Helper()
	h := sha256.New()
	fd := int(d.File().Fd())
	for off := int64(0); off < d.Size; {
		data, err := unix.Seek(fd, off, unix.SEEK_DATA)
		if err != nil {
			break // ENXIO: no data after off
		}
		hole, err := unix.Seek(fd, data, unix.SEEK_HOLE)
		if err != nil {
			t.Fatal(err)
		}
		fmt.Fprintf(h, "%d:", data)
		if _, err := io.Copy(h, io.NewSectionReader(d, data, hole-data)); err != nil {
			t.Fatal(err)
		}
		off = hole
	}
	var s [32]byte
	copy(s[:], h.Sum(nil))
	return s
}

func TestGUIDText(t *testing.T) {
	g := MustParseGUID(TypeESP)
	if g.String() != TypeESP {
		t.Fatalf("%s", g)
	}
	// On-disk bytes of the ESP type GUID (UEFI spec).
	want := []byte{0x28, 0x73, 0x2a, 0xc1, 0x1f, 0xf8, 0xd2, 0x11, 0xba, 0x4b, 0x00, 0xa0, 0xc9, 0x3e, 0xc9, 0x3b}
	if !bytes.Equal(g[:], want) {
		t.Fatalf("% x", g[:])
	}
	if _, err := ParseGUID("nope"); err == nil {
		t.Fatal("parsed garbage")
	}
}

func TestGPTAgainstSgdisk(t *testing.T) {
	sgdisk := needTool(t, "sgdisk")
	d := sparseDisk(t, 4*GiB)
	tbl, err := PlanLayout(d.Size, 512, LayoutOptions{RootSize: GiB})
	if err != nil {
		t.Fatal(err)
	}
	if err := tbl.Write(d, nil); err != nil {
		t.Fatal(err)
	}
	out := runTool(t, sgdisk, "-v", d.Path)
	if !strings.Contains(out, "No problems found") {
		t.Fatalf("sgdisk -v:\n%s", out)
	}
	for _, p := range tbl.Partitions {
		info := runTool(t, sgdisk, "-i", fmt.Sprint(p.Index), d.Path)
		for _, want := range []string{p.Type.String(), p.ID.String(), fmt.Sprintf("First sector: %d ", p.FirstLBA),
			fmt.Sprintf("Last sector: %d ", p.LastLBA), fmt.Sprintf("Partition name: '%s'", p.Name)} {
			if !strings.Contains(info, want) {
				t.Errorf("partition %d: sgdisk -i lacks %q:\n%s", p.Index, want, info)
			}
		}
	}
	if tbl.Partitions[0].FirstLBA != 34 || tbl.Partitions[0].LastLBA != 2047 || tbl.Partitions[1].FirstLBA != 2048 {
		t.Fatalf("BIOS boot/ESP placement: %+v", tbl.Partitions[:2])
	}
	got, info, err := ReadGPT(d, d.Size, 512)
	if err != nil || !info.PrimaryOK || !info.BackupOK || !info.BackupAtEnd {
		t.Fatalf("read back: %v %+v", err, info)
	}
	if fmt.Sprint(got.Partitions) != fmt.Sprint(tbl.Partitions) || got.DiskGUID != tbl.DiskGUID {
		t.Fatalf("read back differs:\n%v\n%v", got.Partitions, tbl.Partitions)
	}

	// And the other way: a table sgdisk writes, with a non-ASCII name.
	d2 := sparseDisk(t, 64*MiB)
	runTool(t, sgdisk, "-n", "1:2048:+8M", "-t", "1:EF00", "-c", "1:Système", "-n", "3:0:0", "-t", "3:8300", d2.Path)
	got2, _, err := ReadGPT(d2, d2.Size, 512)
	if err != nil {
		t.Fatal(err)
	}
	if len(got2.Partitions) != 2 || got2.Partitions[0].Name != "Système" || got2.Partitions[0].Type.String() != TypeESP ||
		got2.Partitions[1].Index != 3 || got2.Partitions[1].LastLBA != got2.LastUsable {
		t.Fatalf("%+v", got2.Partitions)
	}
}

func TestEnsureABLayoutCreatesAndKeeps(t *testing.T) {
	d := sparseDisk(t, 2*GiB)
	// Stale signatures where the new partitions will be: an ext4 magic inside the future
	// DATA partition must not survive creation.
	if _, err := d.WriteAt([]byte{0x53, 0xEF}, 1500*MiB+1024+0x38); err != nil {
		t.Fatal(err)
	}
	o := layoutOpts(t)
	ab, err := EnsureABLayout(d, o)
	if err != nil {
		t.Fatal(err)
	}
	if !ab.Created {
		t.Fatal("not created")
	}
	dataOff, dataSize := ab.Range(ab.Data)
	if ok, _ := d.IsZero(dataOff, MiB); !ok {
		t.Fatal("DATA start not cleared on creation")
	}
	st, err := ab.BootState()
	if err != nil || st != (BootState{}) {
		t.Fatalf("fresh state %+v %v", st, err)
	}
	if st.InstallTarget() != infrav1.SlotA {
		t.Fatal("first install should go to A")
	}
	// Put something in DATA and a slot, then ensure again: nothing may change.
	pattern := bytes.Repeat([]byte("persistent data "), 4096)
	if _, err := d.WriteAt(pattern, dataOff+dataSize/2); err != nil {
		t.Fatal(err)
	}
	before := contentHash(t, d)
	ab2, err := EnsureABLayout(d, LayoutOptions{RootSize: 512 * MiB})
	if err != nil {
		t.Fatal(err)
	}
	if ab2.Created || len(ab2.Repaired) > 0 {
		t.Fatalf("second ensure changed the layout: created=%v repaired=%v", ab2.Created, ab2.Repaired)
	}
	if ab2.RootA.Sectors()*512 != uint64(256*MiB) {
		t.Fatal("existing slot size not kept")
	}
	if contentHash(t, d) != before {
		t.Fatal("second EnsureABLayout wrote to the disk")
	}

	if sgdisk, err := exec.LookPath("sgdisk"); err == nil {
		out := runTool(t, sgdisk, "-p", d.Path)
		for _, n := range []string{NameBIOSBoot, NameESP, NameRootA, NameRootB, NameConfig, NameData} {
			if !strings.Contains(out, n) {
				t.Fatalf("sgdisk -p lacks %s:\n%s", n, out)
			}
		}
	}
	checkESPWithTools(t, ab)
}

func checkESPWithTools(t *testing.T, ab *AB) {
	t.Helper()
	espOff, espSize := ab.Range(ab.ESP)
	if _, err := exec.LookPath("fsck.fat"); err == nil {
		// fsck.fat wants a file: copy the partition out.
		p := filepath.Join(t.TempDir(), "esp.img")
		f, err := os.Create(p)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := io.Copy(f, io.NewSectionReader(ab.Disk, espOff, espSize)); err != nil {
			t.Fatal(err)
		}
		_ = f.Close()
		runTool(t, "fsck.fat", "-n", p)
	}
	if _, err := exec.LookPath("mtype"); err == nil {
		img := fmt.Sprintf("%s@@%d", ab.Disk.Path, espOff)
		env := runTool(t, "mtype", "-i", img, "::"+ESPGRUBEnv)
		if len(env) != EnvBlockSize || !strings.HasPrefix(env, envBlockHeader) {
			t.Fatalf("mtype grubenv: %q", env)
		}
		cfg := runTool(t, "mtype", "-i", img, "::"+ESPGRUBConfig)
		if !strings.Contains(cfg, "load_env") {
			t.Fatalf("grub.cfg: %q", cfg)
		}
	}
	if _, err := exec.LookPath("grub-fstest"); err == nil {
		// GRUB's own GPT and FAT code.
		out := runTool(t, "grub-fstest", ab.Disk.Path, "ls", "(loop0,gpt2)/EFI/BOOT")
		for _, want := range []string{"grub.cfg", "grubenv"} {
			if !strings.Contains(out, want) {
				t.Fatalf("grub-fstest ls: %q", out)
			}
		}
		env := runTool(t, "grub-fstest", ab.Disk.Path, "cat", "(loop0,gpt2)/"+ESPGRUBEnv)
		if !strings.HasPrefix(env, envBlockHeader) {
			t.Fatalf("grub-fstest cat grubenv: %q", env)
		}
	}
}

func TestGRUBEnvBlock(t *testing.T) {
	e := NewEnv()
	e.Set("active", "A")
	e.Set("next", "B")
	e.Set("tries", "3")
	e.Set("odd", "back\\slash\nnew line")
	b, err := e.MarshalBlock()
	if err != nil {
		t.Fatal(err)
	}
	if len(b) != EnvBlockSize || !bytes.HasSuffix(b, []byte("###")) {
		t.Fatalf("block %q", b)
	}
	got, err := ParseEnvBlock(b)
	if err != nil || !got.Equal(e) {
		t.Fatalf("round trip: %v %v", err, got.values)
	}
	e.Set("big", strings.Repeat("x", 1000))
	if _, err := e.MarshalBlock(); !errors.Is(err, ErrEnvTooLarge) {
		t.Fatalf("oversized block: %v", err)
	}
	if _, err := ParseEnvBlock(b[:1000]); err == nil {
		t.Fatal("short block accepted")
	}

	editenv, err := exec.LookPath("grub-editenv")
	if err != nil {
		t.Skip("grub-editenv not installed (grub-common)")
	}
	p := filepath.Join(t.TempDir(), "grubenv")
	if err := os.WriteFile(p, b, 0o600); err != nil {
		t.Fatal(err)
	}
	out := runTool(t, editenv, p, "list")
	for _, want := range []string{"active=A\n", "next=B\n", "tries=3\n", "odd=back\\slash\nnew line\n"} {
		if !strings.Contains(out, want) {
			t.Fatalf("grub-editenv list lacks %q:\n%s", want, out)
		}
	}
	runTool(t, editenv, p, "set", "failed=B", "path=a\\b")
	runTool(t, editenv, p, "unset", "next")
	raw, _ := os.ReadFile(p)
	got, err = ParseEnvBlock(raw)
	if err != nil {
		t.Fatal(err)
	}
	if got.Get("failed") != "B" || got.Get("path") != "a\\b" || got.Get("odd") != "back\\slash\nnew line" {
		t.Fatalf("after grub-editenv: %v", got.values)
	}
	if _, ok := got.Lookup("next"); ok {
		t.Fatal("next still set")
	}
	// What we write, grub-editenv reads identically.
	if raw2, _ := got.MarshalBlock(); !bytes.Equal(raw, raw2) {
		t.Fatalf("re-encoding differs from grub-editenv's block:\n%q\n%q", raw, raw2)
	}
}

func TestGRUBConfigSyntax(t *testing.T) {
	cfg, err := RenderGRUBConfig(GRUBConfig{PartitionA: 3, PartitionB: 4, PartUUIDA: NewGUID(), PartUUIDB: NewGUID(),
		KernelArgs: "console=tty0 console=ttyS0,115200n8", SerialConsole: true, MaxTries: 3})
	if err != nil {
		t.Fatal(err)
	}
	s := string(cfg)
	for _, want := range []string{`if [ "${tries}" = "3" ]; then`, `elif [ "${tries}" = "1" ]; then`, "set tries=0",
		"save_env --file \"${anvil_env}\" next tries failed", "load_env --file \"${anvil_env}\" active next tries failed",
		"root=PARTUUID=${anvil_uuid} ro console=tty0 console=ttyS0,115200n8 anvil.slot=$1"} {
		if !strings.Contains(s, want) {
			t.Errorf("grub.cfg lacks %q", want)
		}
	}
	// The counter is saved before any kernel is loaded.
	if strings.Index(s, "save_env") > strings.Index(s, "menuentry") {
		t.Error("save_env after the menu entries")
	}
	if _, err := RenderGRUBConfig(GRUBConfig{PartitionA: 3, PartitionB: 4, KernelArgs: `x"; reboot; "`}); err == nil {
		t.Error("kernel arguments with quotes accepted")
	}
	check, err := exec.LookPath("grub-script-check")
	if err != nil {
		t.Skip("grub-script-check not installed (grub-common)")
	}
	p := filepath.Join(t.TempDir(), "grub.cfg")
	if err := os.WriteFile(p, cfg, 0o600); err != nil {
		t.Fatal(err)
	}
	runTool(t, check, p)
}

func TestBootStateTransitions(t *testing.T) {
	d := sparseDisk(t, 2*GiB)
	ab, err := EnsureABLayout(d, LayoutOptions{RootSize: 256 * MiB})
	if err != nil {
		t.Fatal(err)
	}
	step := func(want BootState) {
		t.Helper()
		st, err := ab.BootState()
		if err != nil || st != want {
			t.Fatalf("state %+v (%v), want %+v", st, err, want)
		}
	}
	if err := ab.Arm(infrav1.SlotA, 3); err != nil {
		t.Fatal(err)
	}
	step(BootState{Next: infrav1.SlotA, Tries: 3})
	if got := (BootState{Next: infrav1.SlotA, Tries: 3}).InstallTarget(); got != infrav1.SlotB {
		t.Fatalf("target while A pending with no active: %s", got)
	}
	if err := ab.MarkGood(infrav1.SlotA); err != nil {
		t.Fatal(err)
	}
	step(BootState{Active: infrav1.SlotA})
	if err := ab.Arm(infrav1.SlotB, 3); err != nil {
		t.Fatal(err)
	}
	if err := ab.Disarm(infrav1.SlotB); err != nil {
		t.Fatal(err)
	}
	step(BootState{Active: infrav1.SlotA})
	// The env block never moves on the ESP.
	e1, _ := ab.ESPFS().Lookup(ESPGRUBEnv)
	for i := 0; i < 5; i++ {
		if err := ab.Arm(infrav1.SlotB, 3); err != nil {
			t.Fatal(err)
		}
	}
	e2, _ := ab.ESPFS().Lookup(ESPGRUBEnv)
	if e1.FirstCluster != e2.FirstCluster || e2.Size != EnvBlockSize {
		t.Fatalf("grubenv moved or resized: %+v %+v", e1, e2)
	}
}

func TestDamagedEnvAndTables(t *testing.T) {
	d := sparseDisk(t, 2*GiB)
	ab, err := EnsureABLayout(d, LayoutOptions{RootSize: 256 * MiB})
	if err != nil {
		t.Fatal(err)
	}
	if err := ab.MarkGood(infrav1.SlotB); err != nil {
		t.Fatal(err)
	}
	// Primary GPT header destroyed: restored from the backup, state kept.
	if err := d.ZeroRange(512, 512); err != nil {
		t.Fatal(err)
	}
	ab, err = EnsureABLayout(d, LayoutOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if ab.Created || len(ab.Repaired) != 1 || !strings.Contains(ab.Repaired[0], "primary") {
		t.Fatalf("created=%v repaired=%v", ab.Created, ab.Repaired)
	}
	if st, _ := ab.BootState(); st.Active != infrav1.SlotB {
		t.Fatalf("state lost: %+v", st)
	}
	if sgdisk, err := exec.LookPath("sgdisk"); err == nil {
		if out := runTool(t, sgdisk, "-v", d.Path); !strings.Contains(out, "No problems found") {
			t.Fatalf("after repair: %s", out)
		}
	}
	// The disk grew (a whole-disk copy onto a larger disk, or a resized virtual disk).
	if err := os.Truncate(d.Path, 3*GiB); err != nil {
		t.Fatal(err)
	}
	d2, err := Open(d.Path)
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = d2.Close() }()
	ab, err = EnsureABLayout(d2, LayoutOptions{})
	if err != nil || len(ab.Repaired) != 1 || !strings.Contains(ab.Repaired[0], "moved") {
		t.Fatalf("grown disk: %v %v", err, ab)
	}
	// An env block cut short (what grub-editenv leaves after a power cut): refused unless
	// the caller says which slot is good.
	if err := ab.ESPFS().WriteFile(d2, ESPGRUBEnv, nil); err != nil {
		t.Fatal(err)
	}
	if _, err := EnsureABLayout(d2, LayoutOptions{}); !errors.Is(err, ErrBootEnvDamaged) {
		t.Fatalf("damaged env: %v", err)
	}
	ab, err = EnsureABLayout(d2, LayoutOptions{AssumeActive: infrav1.SlotB})
	if err != nil {
		t.Fatal(err)
	}
	if st, _ := ab.BootState(); st.Active != infrav1.SlotB || len(ab.Repaired) != 1 {
		t.Fatalf("repaired state %+v %v", st, ab.Repaired)
	}
	// A broken Anvil layout is never re-partitioned on its own.
	tbl := ab.Table
	tbl.Partitions = tbl.Partitions[2:]
	if err := tbl.Write(d2, nil); err != nil {
		t.Fatal(err)
	}
	if _, err := EnsureABLayout(d2, LayoutOptions{}); !errors.Is(err, ErrForeignLayout) {
		t.Fatalf("foreign layout: %v", err)
	}
}

func TestConfigDrive(t *testing.T) {
	d := sparseDisk(t, 2*GiB)
	ab, err := EnsureABLayout(d, LayoutOptions{RootSize: 256 * MiB})
	if err != nil {
		t.Fatal(err)
	}
	userData := []byte("## template: jinja\n#cloud-config\nruncmd:\n  - kubeadm join\n")
	cd := &ConfigDrive{
		UserData:      userData,
		MetaData:      MetaData{InstanceID: "m-1", LocalHostname: "node-1", ProviderID: "anvil://default/host-1"},
		NetworkConfig: []byte("version: 2\nethernets: {}\n"),
		HealthGate:    &HealthGate{},
	}
	if err := ab.WriteConfigDrive(cd); err != nil {
		t.Fatal(err)
	}
	md, err := ab.ReadConfigDrive("meta-data")
	if err != nil {
		t.Fatal(err)
	}
	wantMD := "instance-id: \"m-1\"\nlocal-hostname: \"node-1\"\nprovider-id: \"anvil://default/host-1\"\n"
	if string(md) != wantMD {
		t.Fatalf("meta-data %q", md)
	}
	ud, err := ab.ReadConfigDrive("user-data")
	if err != nil {
		t.Fatal(err)
	}
	parts := parseMultipart(t, ud)
	if len(parts) != 2 || !bytes.Equal(parts[0], userData) || !strings.Contains(string(parts[1]), strings.ToLower(ab.Config.ID.String())) {
		t.Fatalf("user-data parts: %q", parts)
	}
	env, err := ab.ReadConfigDrive("anvil/anvil.env")
	if err != nil || !strings.Contains(string(env), "ANVIL_ESP_PARTUUID="+strings.ToLower(ab.ESP.ID.String())) {
		t.Fatalf("anvil.env %q %v", env, err)
	}
	// Ignition or NoUserDataHook: user-data untouched.
	cd.UserData = []byte(`{"ignition":{"version":"3.4.0"}}`)
	if err := ab.WriteConfigDrive(cd); err != nil {
		t.Fatal(err)
	}
	if ud, _ := ab.ReadConfigDrive("user-data"); !bytes.Equal(ud, cd.UserData) {
		t.Fatalf("ignition user-data changed: %q", ud)
	}

	off, _ := ab.Range(ab.Config)
	if _, err := exec.LookPath("mtype"); err == nil {
		img := fmt.Sprintf("%s@@%d", d.Path, off)
		if got := runTool(t, "mtype", "-i", img, "::meta-data"); got != wantMD {
			t.Fatalf("mtype meta-data %q", got)
		}
		if got := runTool(t, "mtype", "-i", img, "::network-config"); got != string(cd.NetworkConfig) {
			t.Fatalf("mtype network-config %q", got)
		}
		dir := runTool(t, "mdir", "-i", img, "::")
		if !strings.Contains(dir, "cidata") || !strings.Contains(dir, "user-data") || !strings.Contains(dir, "anvil") {
			t.Fatalf("mdir:\n%s", dir)
		}
	}
	if blkid, err := exec.LookPath("blkid"); err == nil {
		out := runTool(t, blkid, "-p", "-O", fmt.Sprint(off), "-o", "export", d.Path)
		if !strings.Contains(out, "LABEL=cidata") || !strings.Contains(out, "TYPE=vfat") {
			t.Fatalf("blkid: %s", out)
		}
	}
}

func parseMultipart(t *testing.T, b []byte) [][]byte {
	t.Helper()
	msg, err := mail.ReadMessage(bytes.NewReader(b))
	if err != nil {
		t.Fatal(err)
	}
	mt, params, err := mime.ParseMediaType(msg.Header.Get("Content-Type"))
	if err != nil || mt != "multipart/mixed" {
		t.Fatalf("%s %v", mt, err)
	}
	r := multipart.NewReader(msg.Body, params["boundary"])
	var out [][]byte
	for {
		p, err := r.NextPart()
		if errors.Is(err, io.EOF) {
			return out
		}
		if err != nil {
			t.Fatal(err)
		}
		if p.Header.Get("Content-Transfer-Encoding") != "base64" {
			t.Fatal("part not base64")
		}
		raw, _ := io.ReadAll(p)
		dec, err := decodeBase64Lines(raw)
		if err != nil {
			t.Fatal(err)
		}
		out = append(out, dec)
	}
}

func decodeBase64Lines(b []byte) ([]byte, error) {
	var s strings.Builder
	for _, l := range strings.Split(string(b), "\n") {
		s.WriteString(strings.TrimSpace(l))
	}
	return base64.StdEncoding.DecodeString(s.String())
}

// TestHealthGateScript runs anvil-mark-good against a directory standing in for the ESP and
// a fake kubelet healthz.
func TestHealthGateScript(t *testing.T) {
	needTool(t, "curl")
	var healthy sync.Map
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
		if _, ok := healthy.Load("ok"); ok {
			_, _ = io.WriteString(w, "ok")
			return
		}
		http.Error(w, "not yet", http.StatusServiceUnavailable)
	}))
	defer srv.Close()
	dir := t.TempDir()
	script := filepath.Join(dir, "anvil-mark-good")
	if err := os.WriteFile(script, []byte(HealthGateScript), 0o600); err != nil {
		t.Fatal(err)
	}
	esp := filepath.Join(dir, "esp")
	if err := os.MkdirAll(filepath.Join(esp, ESPBootDir), 0o755); err != nil {
		t.Fatal(err)
	}
	envPath := filepath.Join(esp, ESPGRUBEnv)
	cmdline := filepath.Join(dir, "cmdline")
	if err := os.WriteFile(cmdline, []byte("BOOT_IMAGE=/boot/vmlinuz root=PARTUUID=x ro anvil.slot=B quiet\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	writeEnv := func(kv ...string) {
		e := NewEnv()
		e.Set("keep", "me\\too")
		for i := 0; i < len(kv); i += 2 {
			e.Set(kv[i], kv[i+1])
		}
		b, _ := e.MarshalBlock()
		if err := os.WriteFile(envPath, b, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	run := func(timeout string) (string, error) {
		cmd := exec.Command("sh", script)
		cmd.Env = append(os.Environ(), "ANVIL_ESP_PARTUUID=unused", "ANVIL_ESP_DIR="+esp, "ANVIL_CMDLINE_FILE="+cmdline,
			"ANVIL_HEALTHZ_URL="+srv.URL+"/healthz", "ANVIL_TIMEOUT_SECONDS="+timeout, "ANVIL_INTERVAL_SECONDS=0.1",
			"ANVIL_REBOOT_COMMAND=echo REBOOTING")
		out, err := cmd.CombinedOutput()
		return string(out), err
	}
	readEnv := func() *Env {
		b, err := os.ReadFile(envPath)
		if err != nil {
			t.Fatal(err)
		}
		e, err := ParseEnvBlock(b)
		if err != nil {
			t.Fatal(err)
		}
		return e
	}

	// Unhealthy: times out, asks for a reboot, changes nothing.
	writeEnv("active", "A", "next", "B", "tries", "2")
	before, _ := os.ReadFile(envPath)
	out, err := run("1")
	if err == nil || !strings.Contains(out, "REBOOTING") {
		t.Fatalf("unhealthy run: %v\n%s", err, out)
	}
	if after, _ := os.ReadFile(envPath); !bytes.Equal(before, after) {
		t.Fatal("unhealthy run changed grubenv")
	}
	// Healthy: active=B next= tries=0, other variables kept, still 1024 bytes, same inode.
	healthy.Store("ok", true)
	st1, _ := os.Stat(envPath)
	if out, err := run("10"); err != nil {
		t.Fatalf("%v\n%s", err, out)
	}
	st2, _ := os.Stat(envPath)
	if !os.SameFile(st1, st2) || st2.Size() != EnvBlockSize {
		t.Fatal("grubenv replaced or resized")
	}
	e := readEnv()
	if e.Get("active") != "B" || e.Get("next") != "" || e.Get("tries") != "0" || e.Get("keep") != "me\\too" {
		t.Fatalf("after marking good: %v", e.values)
	}
	if editenv, err := exec.LookPath("grub-editenv"); err == nil {
		if out := runTool(t, editenv, envPath, "list"); !strings.Contains(out, "active=B\n") {
			t.Fatalf("grub-editenv list: %s", out)
		}
	}
	// Already good: exits at once, even with the kubelet down.
	healthy.Delete("ok")
	if out, err := run("1"); err != nil || !strings.Contains(out, "already marked good") {
		t.Fatalf("%v\n%s", err, out)
	}
	// First install (no active yet): active is added.
	writeEnv("next", "B", "tries", "3")
	healthy.Store("ok", true)
	if out, err := run("10"); err != nil {
		t.Fatalf("%v\n%s", err, out)
	}
	if e := readEnv(); e.Get("active") != "B" || e.Get("next") != "" {
		t.Fatalf("first install: %v", e.values)
	}
}

func TestBIOSBootInstall(t *testing.T) {
	bf, err := testBoot()
	if err != nil {
		t.Skipf("no GRUB images: %v", err)
	}
	d := sparseDisk(t, 2*GiB)
	ab, err := EnsureABLayout(d, LayoutOptions{RootSize: 256 * MiB, Boot: bf})
	if err != nil {
		t.Fatal(err)
	}
	mbr := make([]byte, 512)
	if _, err := d.ReadAt(mbr, 0); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(mbr[:0x5C], bf.BIOSBoot[:0x5C]) || binary.LittleEndian.Uint64(mbr[0x5C:]) != 34 || mbr[0x66] != 0x90 {
		t.Fatal("MBR boot code not GRUB's or not pointing at sector 34")
	}
	if !HasProtectiveMBR(d) {
		t.Fatal("protective MBR entry lost")
	}
	core := make([]byte, 512)
	if _, err := d.ReadAt(core, 34*512); err != nil {
		t.Fatal(err)
	}
	if binary.LittleEndian.Uint64(core[grubCoreBlocklist:]) != 35 {
		t.Fatal("core.img block list not patched")
	}
	efi, err := ab.ESPFS().ReadFile(ESPEFIBinary)
	if err != nil || !bytes.Equal(efi, bf.EFI) {
		t.Fatalf("BOOTX64.EFI: %v", err)
	}
	if sgdisk, err := exec.LookPath("sgdisk"); err == nil {
		if out := runTool(t, sgdisk, "-v", d.Path); !strings.Contains(out, "No problems found") {
			t.Fatalf("sgdisk -v: %s", out)
		}
	}
}

// TestHealthGateReports checks what anvil-mark-good tells Anvil after each boot: an unhealthy
// trial, a committed slot, and the old slot running again after GRUB gave up on the new one.
func TestHealthGateReports(t *testing.T) {
	needTool(t, "curl")
	var mu sync.Mutex
	var reports []string
	var healthy sync.Map
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/healthz" {
			if _, ok := healthy.Load("ok"); ok {
				_, _ = io.WriteString(w, "ok")
				return
			}
			http.Error(w, "not yet", http.StatusServiceUnavailable)
			return
		}
		body, _ := io.ReadAll(r.Body)
		mu.Lock()
		reports = append(reports, r.Header.Get("Authorization")+" "+string(body))
		mu.Unlock()
		w.WriteHeader(http.StatusNoContent)
	}))
	defer srv.Close()
	dir := t.TempDir()
	script := filepath.Join(dir, "anvil-mark-good")
	if err := os.WriteFile(script, []byte(HealthGateScript), 0o600); err != nil {
		t.Fatal(err)
	}
	esp := filepath.Join(dir, "esp")
	if err := os.MkdirAll(filepath.Join(esp, ESPBootDir), 0o755); err != nil {
		t.Fatal(err)
	}
	envPath := filepath.Join(esp, ESPGRUBEnv)
	boot := func(slot string, kv ...string) string {
		t.Helper()
		e := NewEnv()
		for i := 0; i < len(kv); i += 2 {
			e.Set(kv[i], kv[i+1])
		}
		b, _ := e.MarshalBlock()
		if err := os.WriteFile(envPath, b, 0o600); err != nil {
			t.Fatal(err)
		}
		cmdline := filepath.Join(dir, "cmdline")
		if err := os.WriteFile(cmdline, []byte("ro anvil.slot="+slot+"\n"), 0o600); err != nil {
			t.Fatal(err)
		}
		mu.Lock()
		reports = nil
		mu.Unlock()
		cmd := exec.Command("sh", script)
		cmd.Env = append(os.Environ(), "ANVIL_ESP_PARTUUID=unused", "ANVIL_ESP_DIR="+esp, "ANVIL_CMDLINE_FILE="+cmdline,
			"ANVIL_HEALTHZ_URL="+srv.URL+"/healthz", "ANVIL_TIMEOUT_SECONDS=1", "ANVIL_INTERVAL_SECONDS=0.1",
			"ANVIL_REBOOT_COMMAND=true", "ANVIL_REPORT_URL="+srv.URL+"/agent/v1/boot-report", "ANVIL_REPORT_TOKEN=v1.abc_DEF-1.sig")
		_, _ = cmd.CombinedOutput()
		mu.Lock()
		defer mu.Unlock()
		return strings.Join(reports, "\n")
	}
	const auth = "Bearer v1.abc_DEF-1.sig "
	if got := boot("B", "active", "A", "next", "B", "tries", "2"); got != auth+`{"slot":"B","good":false,"failed":""}` {
		t.Fatalf("unhealthy trial reported %q", got)
	}
	healthy.Store("ok", true)
	if got := boot("B", "active", "A", "next", "B", "tries", "1"); got != auth+`{"slot":"B","good":true,"failed":""}` {
		t.Fatalf("committed trial reported %q", got)
	}
	// GRUB spent B's tries and went back to A: A's gate says so.
	if got := boot("A", "active", "A", "failed", "B"); got != auth+`{"slot":"A","good":true,"failed":"B"}` {
		t.Fatalf("rollback reported %q", got)
	}
	// Anything but A or B in failed= never reaches the JSON.
	if got := boot("A", "active", "A", "failed", `B","good":false`); got != auth+`{"slot":"A","good":true,"failed":""}` {
		t.Fatalf("a hostile failed= reported %q", got)
	}
}

func TestHealthGateReportSettingsAreChecked(t *testing.T) {
	for _, bad := range []HealthGate{
		{ReportURL: "file:///etc/passwd", ReportToken: "t"},
		{ReportURL: "http://x/$(reboot)", ReportToken: "t"},
		{ReportURL: "http://x/r", ReportToken: "a b"},
		{ReportURL: "http://x/r", ReportToken: ""},
	} {
		cd := &ConfigDrive{MetaData: MetaData{InstanceID: "i"}, HealthGate: &bad}
		if _, err := cd.Render(GUID{}, GUID{}); err == nil {
			t.Errorf("rendered a gate with report URL %q and token %q", bad.ReportURL, bad.ReportToken)
		}
	}
}
