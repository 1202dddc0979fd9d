package bootservices

import (
	"encoding/binary"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"

	"github.com/anvil-metal/cluster-api-provider-anvil/internal/netns"
)

// standInMarker starts every line the stand-in kernel prints.
const standInMarker = "ANVIL-STAND-IN"

// standInScript is the stand-in kernel's first 512 bytes: what iPXE for UEFI runs. It lists
// the images iPXE holds (the executing one excepted) and waits.
const standInScript = "#!ipxe\necho " + standInMarker + " script\nimgstat\necho " + standInMarker + " end\n:hold\nsleep 60\ngoto hold\n"

// standInKernel assembles testdata/standin-kernel.S, writes standInScript into its first
// 512 bytes and pads it to size bytes, with load_end_addr covering all of them so that the
// kernel's sum of itself covers the padding.
func standInKernel(t *testing.T, size int) []byte {
	t.Helper()
	dir := t.TempDir()
	obj, bin := filepath.Join(dir, "k.o"), filepath.Join(dir, "k.bin")
	for _, c := range [][]string{
		{"as", "--32", "-o", obj, "testdata/standin-kernel.S"},
		{"ld", "-m", "elf_i386", "-Ttext=0x100000", "--oformat", "binary", "-o", bin, obj},
	} {
		if out, err := exec.Command(c[0], c[1:]...).CombinedOutput(); err != nil {
			t.Fatalf("%v: %v\n%s", c, err, out)
		}
	}
	code, err := os.ReadFile(bin)
	must(t, err)
	const header = 512
	if len(code) > size || len(code) < header+32 || binary.LittleEndian.Uint32(code[header:]) != 0x1BADB002 {
		t.Fatalf("stand-in kernel: %d bytes, no Multiboot header at %d", len(code), header)
	}
	k := make([]byte, size)
	copy(k, code)
	script := standInScript + strings.Repeat("#", header-1-len(standInScript)) + "\n"
	copy(k, script)
	for i := len(code); i < size; i++ {
		k[i] = byte(i ^ i>>9)
	}
	binary.LittleEndian.PutUint32(k[header+20:], uint32(0x100000+size))
	return k
}

// byteSum is the stand-in kernel's checksum: the 32-bit sum of the bytes.
func byteSum(b []byte) uint32 {
	var s uint32
	for _, c := range b {
		s += uint32(c)
	}
	return s
}

// standInReport is what the stand-in kernel printed: its own size and sum, its command line,
// and each module's by name.
type standInReport struct {
	kernel  sizeSum
	cmdline string
	modules map[string]sizeSum
	ended   bool
	// script: the script part ran (iPXE for UEFI), and images is what its imgstat listed.
	script bool
	images map[string]int
}

type sizeSum struct{ size, sum uint32 }

var standInRE = regexp.MustCompile(`^` + standInMarker + ` (kernel|module (\S+)) size=([0-9a-f]{8}) sum=([0-9a-f]{8})$`)

// imgstatRE matches an imgstat line: "NAME : SIZE bytes [TYPE] CMDLINE".
var imgstatRE = regexp.MustCompile(`^(\S+) : (\d+) bytes`)

func parseStandIn(console string) standInReport {
	r := standInReport{modules: map[string]sizeSum{}, images: map[string]int{}}
	for _, l := range strings.Split(console, "\n") {
		l = strings.TrimSpace(l)
		if l == standInMarker+" script" {
			r.script = true
			continue
		}
		if m := imgstatRE.FindStringSubmatch(l); m != nil && r.script && !r.ended {
			n, _ := strconv.Atoi(m[2])
			r.images[m[1]] = n
			continue
		}
		if rest, ok := strings.CutPrefix(l, standInMarker+" cmdline "); ok {
			r.cmdline = rest
			continue
		}
		if l == standInMarker+" end" {
			r.ended = true
			continue
		}
		m := standInRE.FindStringSubmatch(l)
		if m == nil {
			continue
		}
		size, _ := strconv.ParseUint(m[3], 16, 32)
		sum, _ := strconv.ParseUint(m[4], 16, 32)
		v := sizeSum{uint32(size), uint32(sum)}
		if m[1] == "kernel" {
			r.kernel = v
		} else {
			r.modules[m[2]] = v
		}
	}
	return r
}

var ansiRE = regexp.MustCompile(`\x1b(\[[0-9;?]*[A-Za-z]|[A-Za-z])`)

// readConsole returns the serial console so far, without terminal control sequences.
func readConsole(path string) string {
	b, _ := os.ReadFile(path)
	s := ansiRE.ReplaceAllString(string(b), "")
	s = strings.ReplaceAll(s, "\r", "")
	return strings.ReplaceAll(s, "\b \b", "")
}

func needQEMU(t *testing.T) (qemu, ovmf string) {
	t.Helper()
	netns.Require(t)
	qemu, err := exec.LookPath("qemu-system-x86_64")
	if err != nil {
		t.Skip("qemu-system-x86_64 not installed (hack/install-test-deps.sh installs qemu-system-x86)")
	}
	for _, tool := range []string{"as", "ld"} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Skipf("%s not installed (hack/install-test-deps.sh installs binutils, which builds the stand-in kernel)", tool)
		}
	}
	ovmf = "/usr/share/ovmf/OVMF.fd"
	for _, f := range []string{"/usr/lib/ipxe/qemu/efi-e1000.rom", "/usr/lib/ipxe/undionly.kpxe", "/usr/lib/ipxe/ipxe.efi", ovmf} {
		if _, err := os.Stat(f); err != nil {
			t.Skipf("%s missing (hack/install-test-deps.sh installs ipxe, ipxe-qemu and ovmf)", f)
		}
	}
	if _, err := os.Stat("/dev/net/tun"); err != nil {
		t.Skip("/dev/net/tun missing: qemu needs a tap device")
	}
	return qemu, ovmf
}
