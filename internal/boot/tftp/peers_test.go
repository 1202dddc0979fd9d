package tftp

import (
	"bytes"
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"
)

// Debian's own TFTP clients against the server, on loopback, downloading Debian's iPXE
// binaries: what PXE firmware does, minus the firmware.

func needTool(t *testing.T, name string) string {
	t.Helper()
	p, err := exec.LookPath(name)
	if err != nil {
		t.Skipf("%s not installed (see hack/install-test-deps.sh)", name)
	}
	return p
}

func ipxeFiles(t *testing.T) IPXEFiles {
	t.Helper()
	f := FindIPXE("")
	if err := f.Err(); err != nil {
		t.Skip(err)
	}
	return f
}

func hostPort(t *testing.T, addr string) (string, string) {
	t.Helper()
	i := strings.LastIndexByte(addr, ':')
	return addr[:i], addr[i+1:]
}

func run(t *testing.T, name string, args ...string) (string, error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	out, err := exec.CommandContext(ctx, name, args...).CombinedOutput()
	return string(out), err
}

func sameFile(t *testing.T, got, want string) {
	t.Helper()
	a, err := os.ReadFile(got)
	if err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(want)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(a, b) {
		t.Fatalf("%s: %d bytes differ from %s (%d bytes)", got, len(a), want, len(b))
	}
}

func TestDebianClientsDownloadIPXE(t *testing.T) {
	files := ipxeFiles(t)
	for _, single := range []bool{false, true} {
		t.Run("singlePort="+strconv.FormatBool(single), func(t *testing.T) {
			var logs logLines
			_, addr := startServer(t, Config{Files: files.FS(), SinglePort: single, Log: logs.logger()})
			host, port := hostPort(t, addr)
			dir := t.TempDir()

			t.Run("curl with blksize", func(t *testing.T) {
				needTool(t, "curl")
				for name, src := range files.Paths {
					out := filepath.Join(dir, "curl-"+name)
					if o, err := run(t, "curl", "-sS", "--tftp-blksize", "1428", "-o", out, "tftp://"+addr+"/"+name); err != nil {
						t.Fatalf("curl %s: %v %s", name, err, o)
					}
					sameFile(t, out, src)
				}
			})
			t.Run("atftp with blksize and tsize", func(t *testing.T) {
				needTool(t, "atftp")
				out := filepath.Join(dir, "atftp-undionly.kpxe")
				o, err := run(t, "atftp", "--trace", "--option", "blksize 1024", "--option", "tsize 0",
					"-g", "-r", "undionly.kpxe", "-l", out, host, port)
				if err != nil {
					t.Fatalf("atftp: %v %s", err, o)
				}
				sameFile(t, out, files.Paths["undionly.kpxe"])
				st, _ := os.Stat(files.Paths["undionly.kpxe"])
				if !strings.Contains(o, "blksize: 1024") || !strings.Contains(o, "tsize: "+strconv.FormatInt(st.Size(), 10)) {
					t.Fatalf("OACK without the options asked for:\n%s", o)
				}
			})
			t.Run("busybox tftp with blksize", func(t *testing.T) {
				needTool(t, "busybox")
				out := filepath.Join(dir, "bb-ipxe.efi")
				if o, err := run(t, "busybox", "tftp", "-g", "-b", "1468", "-r", "ipxe.efi", "-l", out, host, port); err != nil {
					t.Fatalf("busybox tftp: %v %s", err, o)
				}
				sameFile(t, out, files.Paths["ipxe.efi"])
			})
			t.Run("tftp-hpa", func(t *testing.T) {
				needTool(t, "tftp")
				out := filepath.Join(dir, "hpa-snponly.efi")
				if o, err := run(t, "tftp", "-m", "binary", host, port, "-c", "get", "snponly.efi", out); err != nil || strings.Contains(o, "Error") {
					t.Fatalf("tftp-hpa: %v %s", err, o)
				}
				sameFile(t, out, files.Paths["snponly.efi"])
			})
			t.Run("traversal refused", func(t *testing.T) {
				needTool(t, "atftp")
				for _, name := range []string{"../../../../etc/passwd", "/etc/passwd", "../ipxe/undionly.kpxe", "/usr/lib/ipxe/undionly.kpxe"} {
					out := filepath.Join(dir, "evil")
					o, err := run(t, "atftp", "-g", "-r", name, "-l", out, host, port)
					if err == nil {
						t.Fatalf("atftp got %q: %s", name, o)
					}
					if b, _ := os.ReadFile(out); len(b) > 0 {
						t.Fatalf("%q: %d bytes written", name, len(b))
					}
				}
				// curl normalises paths itself, so ask for an encoded one.
				if o, err := run(t, "curl", "-sS", "-o", filepath.Join(dir, "evil2"), "tftp://"+addr+"/..%2F..%2Fetc%2Fpasswd"); err == nil {
					t.Fatalf("curl traversal succeeded: %s", o)
				}
			})
			if len(logs.find(`"blksize"="1428"`)) == 0 {
				t.Errorf("no transfer with blksize 1428 logged: %q", logs.find("TFTP sent"))
			}
		})
	}
}
