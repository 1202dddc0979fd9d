package agent

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
	"time"
	"unsafe"

	"github.com/klauspost/compress/zstd"
	"golang.org/x/sys/unix"

	infrav1 "github.com/anvil-metal/cluster-api-provider-anvil/api/v1alpha1"
	"github.com/anvil-metal/cluster-api-provider-anvil/internal/disk"
)

const testSlot = 64 * disk.MiB

func testOpts() InstallOptions {
	return InstallOptions{
		Layout:       disk.LayoutOptions{RootSize: testSlot, ESPSize: 64 * disk.MiB},
		RetryBackoff: 5 * time.Millisecond,
		ChunkSize:    1 << 20,
		// The built-in decoders; TestExternalDecompressors covers the command-line ones.
		Decompressor: DecompressorGo,
		ConfigDrive: &disk.ConfigDrive{
			UserData:   []byte("#cloud-config\nruncmd: [kubeadm join]\n"),
			MetaData:   disk.MetaData{InstanceID: "m-1", LocalHostname: "node-1", ProviderID: "anvil://ns/host-1"},
			HealthGate: &disk.HealthGate{},
		},
	}
}

func grubFstest(t *testing.T, img string, args ...string) (string, bool) {
	t.Helper()
	p, err := exec.LookPath("grub-fstest")
	if err != nil {
		return "", false
	}
	out, err := exec.Command(p, append([]string{img}, args...)...).CombinedOutput()
	if err != nil {
		t.Fatalf("grub-fstest %v: %v\n%s", args, err, out)
	}
	return string(out), true
}

// installAGood installs image A on a fresh fake disk and marks it good, as the OS's health
// gate would after its first healthy boot; it also writes a pattern into DATA.
func installAGood(t *testing.T, srv *imageServer, target string) (rawA []byte, dataPattern []byte) {
	t.Helper()
	rawA = rootFS(t, 32*disk.MiB, "A")
	url := srv.put("a.img.zst", compress(t, infrav1.ImageFormatZstd, rawA))
	res, err := Install(context.Background(), ImageSource{URL: url, Checksum: sha256Of(rawA), Format: infrav1.ImageFormatZstd}, target, testOpts())
	if err != nil {
		t.Fatal(err)
	}
	if res.Slot != infrav1.SlotA || !res.LayoutCreated || res.Written != int64(len(rawA)) {
		t.Fatalf("first install: %+v", res)
	}
	d, err := disk.Open(target)
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = d.Close() }()
	ab, err := disk.OpenAB(d)
	if err != nil {
		t.Fatal(err)
	}
	if st, _ := ab.BootState(); st != (disk.BootState{Next: infrav1.SlotA, Tries: 3}) {
		t.Fatalf("after first install: %+v", st)
	}
	if err := ab.MarkGood(infrav1.SlotA); err != nil {
		t.Fatal(err)
	}
	dataPattern = bytes.Repeat([]byte("DATA survives every install. "), 50000)
	off, _ := ab.Range(ab.Data)
	if _, err := d.WriteAt(dataPattern, off+disk.MiB); err != nil {
		t.Fatal(err)
	}
	return rawA, dataPattern
}

func readAt(t *testing.T, path string, off int64, n int) []byte {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = f.Close() }()
	b := make([]byte, n)
	if _, err := f.ReadAt(b, off); err != nil {
		t.Fatal(err)
	}
	return b
}

func TestInstallIntoAThenB(t *testing.T) {
	h := newFakeHost(t, fakeDisk{name: "sda", size: 2 * disk.GiB, serial: "S1"})
	target := h.path("sda")
	srv := newImageServer(t)
	rawA, pattern := installAGood(t, srv, target)

	rawB := rootFS(t, 48*disk.MiB, "B")
	url := srv.put("b.img.gz", compress(t, infrav1.ImageFormatGzip, rawB))
	before := takeSnapshot(t, target)
	var progressCalls int
	opts := testOpts()
	opts.ConfigDrive.UserData = []byte("#cloud-config\nruncmd: [kubeadm join --second]\n")
	opts.Progress = func(p Progress) {
		progressCalls++
		if p.Written <= 0 || p.Downloaded <= 0 {
			t.Errorf("progress %+v", p)
		}
	}
	res, err := Install(context.Background(), ImageSource{URL: url, Checksum: sha256Of(rawB), Format: infrav1.ImageFormatGzip}, target, opts)
	if err != nil {
		t.Fatal(err)
	}
	if res.Slot != infrav1.SlotB || res.LayoutCreated || res.BootSlots.Active != infrav1.SlotA || res.BootSlots.Pending != infrav1.SlotB ||
		res.BootSlots.B == nil || res.BootSlots.B.Checksum != sha256Of(rawB) {
		t.Fatalf("second install: %+v %+v", res, res.BootSlots)
	}
	if progressCalls == 0 {
		t.Fatal("no progress reported")
	}
	after := takeSnapshot(t, target)
	if after.slotA != before.slotA || after.data != before.data {
		t.Fatal("installing into B touched A or DATA")
	}
	if after.env != "active=A next=B tries=3" {
		t.Fatalf("grubenv after B: %q", after.env)
	}
	d, _ := disk.OpenReadOnly(target)
	ab, err := disk.OpenAB(d)
	if err != nil {
		t.Fatal(err)
	}
	offA, _ := ab.Range(ab.RootA)
	offB, _ := ab.Range(ab.RootB)
	offD, _ := ab.Range(ab.Data)
	if !bytes.Equal(readAt(t, target, offA, len(rawA)), rawA) || !bytes.Equal(readAt(t, target, offB, len(rawB)), rawB) {
		t.Fatal("slot contents differ from the images")
	}
	if !bytes.Equal(readAt(t, target, offD+disk.MiB, len(pattern)), pattern) {
		t.Fatal("DATA changed")
	}
	if ud, _ := ab.ReadConfigDrive("user-data"); !bytes.Contains(ud, []byte("Content-Type: multipart/mixed")) {
		t.Fatalf("user-data not wrapped for the health gate: %q", ud)
	}
	if md, _ := ab.ReadConfigDrive("meta-data"); !strings.Contains(string(md), `provider-id: "anvil://ns/host-1"`) {
		t.Fatalf("meta-data %q", md)
	}
	// GRUB's own code reads both slots and the environment block.
	if out, ok := grubFstest(t, target, "cat", "(loop0,gpt4)/etc/anvil-marker"); ok && out != "B" {
		t.Fatalf("grub-fstest slot B marker: %q", out)
	}
	if out, ok := grubFstest(t, target, "ls", "(loop0,gpt3)/boot"); ok && !strings.Contains(out, "vmlinuz") {
		t.Fatalf("grub-fstest ls slot A: %q", out)
	}
	if out, ok := grubFstest(t, target, "cat", "(loop0,gpt2)/EFI/BOOT/grubenv"); ok && !strings.Contains(out, "next=B\ntries=3\n") {
		t.Fatalf("grub-fstest grubenv: %q", out)
	}

	_ = d.Close()

	// B proves itself; the next image goes back into A, and B stays.
	dw, _ := disk.Open(target)
	abw, err := disk.OpenAB(dw)
	if err != nil {
		t.Fatal(err)
	}
	if err := abw.MarkGood(infrav1.SlotB); err != nil {
		t.Fatal(err)
	}
	_ = dw.Close()
	rawA2 := rootFS(t, 16*disk.MiB, "A2")
	url = srv.put("a2.img.xz", compress(t, infrav1.ImageFormatXz, rawA2))
	before = takeSnapshot(t, target)
	res, err = Install(context.Background(), ImageSource{URL: url, Checksum: sha256Of(rawA2), Format: infrav1.ImageFormatXz}, target, testOpts())
	if err != nil {
		t.Fatal(err)
	}
	after = takeSnapshot(t, target)
	if res.Slot != infrav1.SlotA || after.slotB != before.slotB || after.data != before.data || after.env != "active=B next=A tries=3" {
		t.Fatalf("third install: slot %s env %q", res.Slot, after.env)
	}
}

func TestInstallFailuresKeepTheActiveSlot(t *testing.T) {
	h := newFakeHost(t,
		fakeDisk{name: "sda", size: 2 * disk.GiB, serial: "S1", model: "Good Disk"},
		fakeDisk{name: "sdb", size: 2 * disk.GiB, serial: "S2", model: "Other Disk"})
	target := h.path("sda")
	srv := newImageServer(t)
	installAGood(t, srv, target)

	good := rootFS(t, 16*disk.MiB, "good")
	truncatedZst := compress(t, infrav1.ImageFormatZstd, good)
	truncatedZst = truncatedZst[:len(truncatedZst)/2]
	// Damaged in the middle, not truncated: the decoder skips the frames' own checksums,
	// the image's checksum still refuses it.
	damagedZst := damageZstd(t, compress(t, infrav1.ImageFormatZstd, good), good)
	tooBig := make([]byte, testSlot+4096)
	copy(tooBig[1080:], []byte{0x53, 0xEF})
	qcow := append([]byte{'Q', 'F', 'I', 0xfb, 0, 0, 0, 3}, make([]byte, 4096)...)
	wholeDisk := make([]byte, 1<<20)
	copy(wholeDisk[510:], []byte{0x55, 0xAA})
	copy(wholeDisk[512:], "EFI PART")

	cases := []struct {
		name     string
		src      ImageSource
		target   string
		hints    *infrav1.RootDeviceHints
		want     error
		bTouched bool // whether slot B may have been (partially) written
	}{
		{name: "checksum mismatch", src: ImageSource{URL: srv.put("bad-sum.zst", compress(t, infrav1.ImageFormatZstd, good)),
			Checksum: sha256Of([]byte("something else")), Format: infrav1.ImageFormatZstd}, want: ErrChecksumMismatch, bTouched: true},
		{name: "sha512 mismatch", src: ImageSource{URL: srv.put("bad-sum.raw", good),
			Checksum: "sha512:" + strings.Repeat("ab", 64)}, want: ErrChecksumMismatch, bTouched: true},
		{name: "truncated compressed stream", src: ImageSource{URL: srv.put("trunc.zst", truncatedZst),
			Checksum: sha256Of(good), Format: infrav1.ImageFormatZstd}, bTouched: true},
		{name: "damaged compressed stream", src: ImageSource{URL: srv.put("damaged.zst", damagedZst),
			Checksum: sha256Of(good), Format: infrav1.ImageFormatZstd}, bTouched: true},
		{name: "truncated raw stream", src: ImageSource{URL: srv.put("trunc.raw", good[:len(good)-12345]),
			Checksum: sha256Of(good)}, want: ErrChecksumMismatch, bTouched: true},
		{name: "oversize raw (known size)", src: ImageSource{URL: srv.put("big.raw", tooBig), Checksum: sha256Of(tooBig)},
			want: ErrImageTooLarge},
		{name: "oversize declared size", src: ImageSource{URL: srv.put("big2.raw", good), Checksum: sha256Of(good), Size: testSlot + 1},
			want: ErrImageTooLarge},
		{name: "oversize while streaming", src: ImageSource{URL: srv.put("big.zst", compress(t, infrav1.ImageFormatZstd, tooBig)),
			Checksum: sha256Of(tooBig), Format: infrav1.ImageFormatZstd}, want: ErrImageTooLarge, bTouched: true},
		{name: "qcow2 declared raw", src: ImageSource{URL: srv.put("x.qcow2", qcow), Checksum: sha256Of(qcow)}, want: ErrUnsupportedFormat},
		{name: "whole-disk image as ABRoot", src: ImageSource{URL: srv.put("disk.img.gz", compress(t, infrav1.ImageFormatGzip, wholeDisk)),
			Checksum: sha256Of(wholeDisk), Format: infrav1.ImageFormatGzip}, want: ErrUnsupportedFormat},
		{name: "unknown format", src: ImageSource{URL: srv.put("x.bz2", good), Checksum: sha256Of(good), Format: "bzip2"}, want: ErrUnsupportedFormat},
		{name: "declared zstd, is gzip", src: ImageSource{URL: srv.put("x.gz", compress(t, infrav1.ImageFormatGzip, good)),
			Checksum: sha256Of(good), Format: infrav1.ImageFormatZstd}, want: ErrUnsupportedFormat},
		{name: "no disk matches the hints", src: ImageSource{URL: srv.put("ok.raw", good), Checksum: sha256Of(good)},
			target: "-", hints: &infrav1.RootDeviceHints{SerialNumber: "NOPE"}, want: ErrNoMatchingDisk},
		{name: "server error", src: ImageSource{URL: srv.URL + "/missing", Checksum: sha256Of(good)}},
		{name: "not http", src: ImageSource{URL: "file:///etc/shadow", Checksum: sha256Of(good)}},
		{name: "bad checksum syntax", src: ImageSource{URL: srv.put("ok2.raw", good), Checksum: "md5:abc"}},
	}
	base := runtime.NumGoroutine()
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			before := takeSnapshot(t, target)
			opts := testOpts()
			opts.MaxRetries = 2
			opts.Hints, opts.Roots = tc.hints, h.roots
			tgt := target
			if tc.target == "-" {
				tgt = ""
			}
			_, err := Install(context.Background(), tc.src, tgt, opts)
			if err == nil {
				t.Fatal("install succeeded")
			}
			if tc.want != nil && !errors.Is(err, tc.want) {
				t.Fatalf("error %v, want %v", err, tc.want)
			}
			t.Logf("refused: %v", err)
			after := takeSnapshot(t, target)
			if after.slotA != before.slotA || after.data != before.data || after.env != before.env || after.config != before.config || after.esp != before.esp {
				t.Fatalf("failure changed the active slot, DATA, CONFIG or the boot environment (env %q -> %q)", before.env, after.env)
			}
			if !tc.bTouched && after.slotB != before.slotB {
				t.Fatal("slot B was written although the image was refused up front")
			}
		})
	}
	goroutinesSettle(t, base)
	// And the active slot still boots: GRUB reads it.
	if out, ok := grubFstest(t, target, "cat", "(loop0,gpt3)/etc/anvil-marker"); ok && out != "A" {
		t.Fatalf("slot A marker %q", out)
	}
}

// TestPendingSlotIsDisarmedBeforeOverwrite: a slot armed for trial is never left armed while
// it is being overwritten.
func TestPendingSlotIsDisarmedBeforeOverwrite(t *testing.T) {
	h := newFakeHost(t, fakeDisk{name: "sda", size: 2 * disk.GiB})
	target := h.path("sda")
	srv := newImageServer(t)
	installAGood(t, srv, target)
	img := rootFS(t, 16*disk.MiB, "B1")
	if _, err := Install(context.Background(), ImageSource{URL: srv.put("b1", img), Checksum: sha256Of(img)}, target, testOpts()); err != nil {
		t.Fatal(err)
	}
	// Next image, with a bad checksum, while B is still on trial.
	_, err := Install(context.Background(), ImageSource{URL: srv.put("b2", img), Checksum: sha256Of([]byte("x"))}, target, testOpts())
	if !errors.Is(err, ErrChecksumMismatch) {
		t.Fatal(err)
	}
	if s := takeSnapshot(t, target); s.env != "active=A next= tries=0" {
		t.Fatalf("B still armed after a failed overwrite: %q", s.env)
	}
}

func TestInstallResumesAfterDroppedConnections(t *testing.T) {
	h := newFakeHost(t, fakeDisk{name: "sda", size: 2 * disk.GiB})
	srv := newImageServer(t)
	raw := rootFS(t, 24*disk.MiB, "resume")
	zst := compress(t, infrav1.ImageFormatZstd, raw)
	url := srv.put("r.zst", zst)
	n := int64(len(zst))
	srv.dropAt("r.zst", n/5, n/10, 0, n/3) // the third attempt dies before its first byte
	res, err := Install(context.Background(), ImageSource{URL: url, Checksum: sha256Of(raw), Format: infrav1.ImageFormatZstd}, h.path("sda"), testOpts())
	if err != nil {
		t.Fatal(err)
	}
	if res.Resumes != 4 || res.Written != int64(len(raw)) {
		t.Fatalf("resumes %d written %d", res.Resumes, res.Written)
	}
	var ranged int
	for _, r := range srv.ranges {
		if strings.HasPrefix(r, "bytes=") {
			ranged++
		}
	}
	if ranged != 4 {
		t.Fatalf("range requests: %q", srv.ranges)
	}

	// Retries are bounded: a server that always drops fails the install.
	srv.dropAt("r.zst", 1000, 1000, 1000, 1000, 1000, 1000, 1000, 1000, 1000, 1000, 1000, 1000)
	opts := testOpts()
	opts.MaxRetries = 3
	url2 := srv.put("r2.zst", zst)
	srv.dropAt("r2.zst", 1000, 0, 0, 0, 0, 0)
	if _, err := Install(context.Background(), ImageSource{URL: url2, Checksum: sha256Of(raw), Format: infrav1.ImageFormatZstd}, h.path("sda"), opts); err == nil ||
		!strings.Contains(err.Error(), "after 4 attempts") {
		t.Fatalf("endless drops: %v", err)
	}

	// The image changes between attempts (the server swaps it as the first response
	// dies): If-Range catches it.
	url3 := srv.put("r3.zst", zst)
	srv.dropAt("r3.zst", n/2)
	srv.swapOnDrop("r3.zst", compress(t, infrav1.ImageFormatZstd, raw[:len(raw)/2]))
	_, err = Install(context.Background(), ImageSource{URL: url3, Checksum: sha256Of(raw), Format: infrav1.ImageFormatZstd}, h.path("sda"), opts)
	if !errors.Is(err, ErrImageChanged) {
		t.Fatalf("changed image: %v", err)
	}
}

func TestInstallWholeDisk(t *testing.T) {
	h := newFakeHost(t, fakeDisk{name: "nvme0n1", size: 512 * disk.MiB, serial: "N1", wwid: "eui.0025388b71b1a1c2"})
	srv := newImageServer(t)
	// A whole-disk image: 64 MiB with its own GPT (made by our own writer) and an ESP.
	imgPath := filepath.Join(t.TempDir(), "whole.img")
	if err := os.WriteFile(imgPath, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(imgPath, 64*disk.MiB); err != nil {
		t.Fatal(err)
	}
	d, err := disk.Open(imgPath)
	if err != nil {
		t.Fatal(err)
	}
	tbl, _ := disk.NewTable(d.Size, 512)
	tbl.Partitions = []disk.Partition{
		{Index: 1, Type: disk.MustParseGUID(disk.TypeESP), ID: disk.NewGUID(), FirstLBA: 2048, LastLBA: 2048 + 32767, Name: "EFI"},
		{Index: 2, Type: disk.MustParseGUID(disk.TypeLinuxData), ID: disk.NewGUID(), FirstLBA: 2048 + 32768, LastLBA: tbl.LastUsable, Name: "root"},
	}
	if err := tbl.Write(d, nil); err != nil {
		t.Fatal(err)
	}
	if _, err := d.WriteAt([]byte("root filesystem"), int64(2048+32768)*512); err != nil {
		t.Fatal(err)
	}
	_ = d.Close()
	raw, _ := os.ReadFile(imgPath)
	url := srv.put("whole.img.zst", compress(t, infrav1.ImageFormatZstd, raw))
	opts := testOpts()
	opts.Roots = h.roots
	opts.Hints = &infrav1.RootDeviceHints{WWN: "0x0025388B71B1A1C2"}
	src := ImageSource{URL: url, Checksum: sha256Of(raw), Format: infrav1.ImageFormatZstd, Layout: infrav1.ImageLayoutWholeDisk}
	res, err := Install(context.Background(), src, "", opts)
	if err != nil {
		t.Fatal(err)
	}
	if res.Disk != h.path("nvme0n1") || res.Written != int64(len(raw)) || len(res.Repaired) != 1 {
		t.Fatalf("%+v", res)
	}
	got := readAt(t, res.Disk, 0, len(raw))
	// Sectors 0-33 change: the backup GPT moves to the end of the larger disk and the
	// config drive partition is added.
	if !bytes.Equal(got[34*512:512*2048], raw[34*512:512*2048]) || !bytes.Equal(got[int64(2048+32768)*512:], raw[int64(2048+32768)*512:]) {
		t.Fatal("disk content differs from the image")
	}
	dd, _ := disk.OpenReadOnly(res.Disk)
	tb, info, err := disk.ReadGPT(dd, dd.Size, 512)
	_ = dd.Close()
	if err != nil || !info.BackupAtEnd || len(tb.Partitions) != 3 || tb.Partitions[2].Name != disk.NameConfig {
		t.Fatalf("table after install: %v %+v %+v", err, info, tb)
	}
	if sgdisk, err := exec.LookPath("sgdisk"); err == nil {
		if out, _ := exec.Command(sgdisk, "-v", res.Disk).CombinedOutput(); !strings.Contains(string(out), "No problems found") {
			t.Fatalf("sgdisk -v: %s", out)
		}
	}
	if mtype, err := exec.LookPath("mtype"); err == nil {
		cmd := exec.Command(mtype, "-i", fmt.Sprintf("%s@@%d", res.Disk, int64(tb.Partitions[2].FirstLBA)*512), "::meta-data")
		cmd.Env = append(os.Environ(), "MTOOLS_SKIP_CHECK=1")
		if out, err := cmd.CombinedOutput(); err != nil || !strings.Contains(string(out), "instance-id") {
			t.Fatalf("config drive: %v %s", err, out)
		}
	}

	// A bad checksum leaves no partition table: the disk cannot boot a corrupt image.
	src.Checksum = sha256Of([]byte("nope"))
	if _, err := Install(context.Background(), src, res.Disk, opts); !errors.Is(err, ErrChecksumMismatch) {
		t.Fatal(err)
	}
	dd, _ = disk.OpenReadOnly(res.Disk)
	defer func() { _ = dd.Close() }()
	if _, _, err := disk.ReadGPT(dd, dd.Size, 512); err == nil {
		t.Fatal("a partition table survived a failed whole-disk install")
	}
}

func TestZstdContentSizeRefusedEarly(t *testing.T) {
	enc, _ := zstd.NewWriter(nil)
	big := make([]byte, testSlot+1)
	frame := enc.EncodeAll(big, nil) // EncodeAll records the content size
	if zstdContentSize(frame) != int64(len(big)) {
		t.Fatalf("content size %d", zstdContentSize(frame))
	}
	h := newFakeHost(t, fakeDisk{name: "sda", size: 2 * disk.GiB})
	srv := newImageServer(t)
	installAGood(t, srv, h.path("sda"))
	before := takeSnapshot(t, h.path("sda"))
	_, err := Install(context.Background(), ImageSource{URL: srv.put("big.zst", frame), Checksum: sha256Of(big), Format: infrav1.ImageFormatZstd}, h.path("sda"), testOpts())
	if !errors.Is(err, ErrImageTooLarge) {
		t.Fatal(err)
	}
	if takeSnapshot(t, h.path("sda")) != before {
		t.Fatal("disk changed")
	}
	// On a blank disk the layout is not even created for an image that cannot fit.
	h2 := newFakeHost(t, fakeDisk{name: "sdb", size: 2 * disk.GiB})
	if _, err := Install(context.Background(), ImageSource{URL: srv.put("big2.zst", frame), Checksum: sha256Of(big), Format: infrav1.ImageFormatZstd}, h2.path("sdb"), testOpts()); !errors.Is(err, ErrImageTooLarge) {
		t.Fatal(err)
	}
	dd, _ := disk.OpenReadOnly(h2.path("sdb"))
	defer func() { _ = dd.Close() }()
	if _, _, err := disk.ReadGPT(dd, dd.Size, 512); err == nil {
		t.Fatal("layout created for an image that cannot fit")
	}
}

// TestExternalDecompressors runs installs through the command-line decoders (zstd, xz,
// gzip/pigz), including a truncated stream and a dropped connection.
func TestExternalDecompressors(t *testing.T) {
	h := newFakeHost(t, fakeDisk{name: "sda", size: 2 * disk.GiB})
	target := h.path("sda")
	srv := newImageServer(t)
	installAGood(t, srv, target)
	raw := rootFS(t, 16*disk.MiB, "ext")
	for _, f := range []infrav1.ImageFormat{infrav1.ImageFormatZstd, infrav1.ImageFormatXz, infrav1.ImageFormatGzip} {
		t.Run(string(f), func(t *testing.T) {
			if externalCommand(f) == nil {
				t.Skipf("no command-line decoder for %s (apt-get install zstd xz-utils gzip)", f)
			}
			opts := testOpts()
			opts.Decompressor = DecompressorExternal
			comp := compress(t, f, raw)
			before := takeSnapshot(t, target)
			// Truncated: refused, the active slot untouched.
			_, err := Install(context.Background(), ImageSource{URL: srv.put("t-"+string(f), comp[:len(comp)*2/3]), Checksum: sha256Of(raw), Format: f}, target, opts)
			if !errors.Is(err, ErrCorruptImage) {
				t.Fatalf("truncated: %v", err)
			}
			after := takeSnapshot(t, target)
			active := map[bool][32]byte{true: after.slotA, false: after.slotB}
			wasActive := map[bool][32]byte{true: before.slotA, false: before.slotB}
			isA := strings.Contains(before.env, "active=A")
			if active[isA] != wasActive[isA] || after.env != before.env || after.data != before.data {
				t.Fatalf("failed install changed the active slot or the boot state (%q -> %q)", before.env, after.env)
			}
			// Dropped connection mid-stream: resumed, verified.
			url := srv.put("ok-"+string(f), comp)
			srv.dropAt("ok-"+string(f), int64(len(comp)/3))
			res, err := Install(context.Background(), ImageSource{URL: url, Checksum: sha256Of(raw), Format: f}, target, opts)
			if err != nil {
				t.Fatal(err)
			}
			if res.Resumes != 1 || res.Written != int64(len(raw)) {
				t.Fatalf("%+v", res)
			}
			markGood(t, target, res.Slot)
		})
	}
}

// markGood does what the OS's health gate does after a healthy boot.
func markGood(t *testing.T, target string, slot infrav1.Slot) {
	t.Helper()
	d, err := disk.Open(target)
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = d.Close() }()
	ab, err := disk.OpenAB(d)
	if err != nil {
		t.Fatal(err)
	}
	if err := ab.MarkGood(slot); err != nil {
		t.Fatal(err)
	}
}

// TestInstallWriteModes installs with O_DIRECT writes (the default: image files on a
// filesystem that supports them take them too) and with buffered ones: an image whose size
// is not a multiple of the chunk or sector size, so the last write goes through the page
// cache, into an A/B slot and as a whole-disk image whose first MiB is written last.
func TestInstallWriteModes(t *testing.T) {
	for _, buffered := range []bool{false, true} {
		t.Run(fmt.Sprintf("BufferedWrites=%v", buffered), func(t *testing.T) { testInstallWriteMode(t, buffered) })
	}
}

func testInstallWriteMode(t *testing.T, buffered bool) {
	h := newFakeHost(t, fakeDisk{name: "sda", size: 2 * disk.GiB})
	target := h.path("sda")
	srv := newImageServer(t)
	base := runtime.NumGoroutine()
	raw := rootFS(t, 8*disk.MiB, "direct")
	raw = append(raw, bytes.Repeat([]byte("tail"), 1000)...) // 8 MiB + 4000 bytes
	opts := testOpts()
	opts.BufferedWrites = buffered
	var last int64
	opts.Progress = func(p Progress) {
		if p.Written <= last {
			t.Errorf("progress went from %d to %d", last, p.Written)
		}
		last = p.Written
	}
	res, err := Install(context.Background(), ImageSource{URL: srv.put("d.zst", compress(t, infrav1.ImageFormatZstd, raw)),
		Checksum: sha256Of(raw), Format: infrav1.ImageFormatZstd}, target, opts)
	if err != nil {
		t.Fatal(err)
	}
	if res.Written != int64(len(raw)) || last != int64(len(raw)) {
		t.Fatalf("written %d, last progress %d, want %d", res.Written, last, len(raw))
	}
	d, _ := disk.OpenReadOnly(target)
	ab, err := disk.OpenAB(d)
	if err != nil {
		t.Fatal(err)
	}
	off, _ := ab.Range(ab.RootA)
	_ = d.Close()
	// O_DIRECT writes leave nothing in the page cache but the last, partial chunk.
	if f := openDirect(target); f != nil {
		_ = f.Close()
		cached := residentBytes(t, target, off, int64(len(raw)))
		if !buffered && cached > int64(opts.ChunkSize) {
			t.Fatalf("%d bytes of the slot in the page cache after O_DIRECT writes", cached)
		}
		t.Logf("%d of %d bytes in the page cache", cached, len(raw))
	}
	if !bytes.Equal(readAt(t, target, off, len(raw)), raw) {
		t.Fatal("slot A differs from the image")
	}

	// Whole disk: the image's GPT is held back and written after the checksum matched.
	whole := make([]byte, 3*disk.MiB+512)
	copy(whole[510:], []byte{0x55, 0xAA})
	for i := int(disk.MiB); i < len(whole); i++ {
		whole[i] = byte(i / 4093)
	}
	opts.ConfigDrive, last = nil, 0
	src := ImageSource{URL: srv.put("w.gz", compress(t, infrav1.ImageFormatGzip, whole)), Checksum: sha256Of(whole),
		Format: infrav1.ImageFormatGzip, Layout: infrav1.ImageLayoutWholeDisk}
	if _, err := Install(context.Background(), src, target, opts); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(readAt(t, target, 0, len(whole)), whole) {
		t.Fatal("disk differs from the whole-disk image")
	}
	// Nothing of either install is left running (kept-alive connections included).
	goroutinesSettle(t, base)
}

// residentBytes tells how much of [off, off+n) of a file is in the page cache.
func residentBytes(t *testing.T, path string, off, n int64) int64 {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = f.Close() }()
	page := int64(os.Getpagesize())
	start := off / page * page
	m, err := unix.Mmap(int(f.Fd()), start, int(off+n-start), unix.PROT_READ, unix.MAP_SHARED)
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = unix.Munmap(m) }()
	vec := make([]byte, (len(m)+int(page)-1)/int(page))
	if _, _, errno := unix.Syscall(unix.SYS_MINCORE, uintptr(unsafe.Pointer(&m[0])), uintptr(len(m)), uintptr(unsafe.Pointer(&vec[0]))); errno != 0 {
		t.Fatal(errno)
	}
	var resident int64
	for _, v := range vec {
		resident += int64(v&1) * page
	}
	return resident
}

// damageZstd flips one bit in the middle of a zstd stream, at the first offset where the
// flip changes what a decoder that skips frame checksums (as the agent's does) produces.
// A flip inside a match offset that points into a run of zeros decodes to the same bytes,
// and the image checksum then rightly accepts it; such a stream tests nothing.
func damageZstd(t *testing.T, stream, want []byte) []byte {
	t.Helper()
	dec, err := zstd.NewReader(nil, zstd.IgnoreChecksum(true), zstd.WithDecoderConcurrency(1))
	if err != nil {
		t.Fatal(err)
	}
	defer dec.Close()
	for off := len(stream) / 2; off < len(stream); off++ {
		damaged := bytes.Clone(stream)
		damaged[off] ^= 0x40
		got, err := dec.DecodeAll(damaged, nil)
		if err == nil && bytes.Equal(got, want) {
			continue
		}
		return damaged
	}
	t.Fatal("no single-bit flip in the second half of the stream changes the decoded image")
	return nil
}
