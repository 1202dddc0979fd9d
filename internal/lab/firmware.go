package lab

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/netip"
	"regexp"
	"strings"
	"time"

	"github.com/insomniacslk/dhcp/dhcpv4"
	"github.com/insomniacslk/dhcp/dhcpv4/nclient4"
	"github.com/insomniacslk/dhcp/iana"
	"github.com/pin/tftp/v3"

	"github.com/anvil-metal/cluster-api-provider-anvil/internal/boot/agentapi"
	"github.com/anvil-metal/cluster-api-provider-anvil/internal/vbmc/machine"
)

// NetworkBoot is what the emulated firmware did on one network boot, exchange by exchange.
type NetworkBoot struct {
	Server string
	// Mode is the firmware mode the BMC asked for (UEFI or Legacy).
	Mode machine.BootMode
	// Lease is the address the PXE ROM took, DHCPServer who gave it.
	Lease      netip.Prefix
	DHCPServer netip.Addr
	// BootFile is the file the first answer named and TFTPServer served; BootFileBytes its size.
	BootFile      string
	TFTPServer    netip.Addr
	BootFileBytes int
	// ScriptURL is what the second answer, to iPXE (user class "iPXE"), named.
	ScriptURL string
	// Agent says the script boots the agent; otherwise it sent the firmware on to the disk.
	Agent bool
	// Kernel and Initrd are the artifacts the script named, as downloaded.
	Kernel, Initrd Download
	Took           time.Duration
	// Err is where the boot failed (the firmware then moves on to the disk); nil if it didn't.
	Err error
}

// Download is one artifact fetched over HTTP.
type Download struct {
	URL   string
	Bytes int64
}

// String is the one-line account the lab prints, e.g. "DHCP lease 10.77.0.11/24 from
// 10.77.0.1, TFTP ipxe.efi (1021 KiB), script, kernel 12.0 MiB, initramfs 30.1 MiB".
func (b NetworkBoot) String() string {
	if b.Err != nil {
		return "network boot failed: " + b.Err.Error()
	}
	s := fmt.Sprintf("DHCP lease %s from %s, TFTP %s (%d KiB), script", b.Lease, b.DHCPServer, b.BootFile, b.BootFileBytes>>10)
	if !b.Agent {
		return s + " says boot the disk"
	}
	return s + fmt.Sprintf(", kernel %s, initramfs %s (%s)", mib(b.Kernel.Bytes), mib(b.Initrd.Bytes), b.Took.Round(time.Millisecond))
}

func mib(n int64) string { return fmt.Sprintf("%.1f MiB", float64(n)/(1<<20)) }

// firmwareDHCP bounds how long the PXE ROM waits for an answer (per try; 3 tries). Real ROMs
// wait up to a minute; the lab's DHCP server answers in milliseconds.
const firmwareDHCP = time.Second

// pxeClient is what a PXE ROM sends in options 93 and 60 in each mode: x86 BIOS (arch 0), or
// x86-64 UEFI (arch 7, EFI BC) as EDK2 sends it.
func pxeClient(mode machine.BootMode) (iana.Arch, string) {
	if mode == machine.BootModeLegacy {
		return iana.INTEL_X86PC, "PXEClient:Arch:00000:UNDI:002001"
	}
	return iana.EFI_BC, "PXEClient:Arch:00007:UNDI:003016"
}

// netboot is the emulated firmware's network boot over the lab's provisioning network, the
// way a PXE ROM and iPXE do it: DHCP as the PXE ROM, TFTP of the boot file named, DHCP again as
// iPXE (user class "iPXE"), HTTP GET of the script named, and HTTP GETs of the kernel and
// initramfs the script names, checked. Its answer is the kernel command line's boot
// parameters, or false when the script (or a failed exchange) sends the firmware on to the
// disk. OnNetworkBoot hears of every boot but those cut short by the power going.
func (s *Server) netboot(ctx context.Context, mode machine.BootMode) (agentapi.BootParams, bool) {
	start := time.Now()
	nb := NetworkBoot{Server: s.Name, Mode: mode}
	params, err := s.pxe(ctx, &nb)
	if ctx.Err() != nil {
		return agentapi.BootParams{}, false
	}
	nb.Took, nb.Err = time.Since(start), err
	if err != nil {
		nb.Agent = false
		s.Log.Info("network boot failed; the firmware moves on to the disk", "server", s.Name, "error", err.Error())
	}
	if s.OnNetworkBoot != nil {
		s.OnNetworkBoot(nb)
	}
	return params, nb.Agent
}

func (s *Server) pxe(ctx context.Context, nb *NetworkBoot) (agentapi.BootParams, error) {
	arch, class := pxeClient(nb.Mode)
	pxe := []dhcpv4.Modifier{
		dhcpv4.WithOption(dhcpv4.OptClassIdentifier(class)),
		dhcpv4.WithOption(dhcpv4.OptClientArch(arch)),
		dhcpv4.WithRequestedOptions(dhcpv4.OptionSubnetMask, dhcpv4.OptionRouter, dhcpv4.OptionTFTPServerName,
			dhcpv4.OptionBootfileName, dhcpv4.OptionClassIdentifier),
	}
	// The NIC's PXE ROM: an address and the iPXE binary to load.
	ack, err := s.dhcpExchange(ctx, pxe...)
	if err != nil {
		return agentapi.BootParams{}, fmt.Errorf("PXE DHCP: %w", err)
	}
	if err := s.takeLease(ack, nb); err != nil {
		return agentapi.BootParams{}, err
	}
	nb.BootFile = ack.BootFileName
	if nb.BootFile == "" || strings.Contains(nb.BootFile, "://") {
		return agentapi.BootParams{}, fmt.Errorf("PXE DHCP answer names no TFTP boot file (%q)", nb.BootFile)
	}
	nb.TFTPServer = nb.DHCPServer
	if ip, ok := netip.AddrFromSlice(ack.ServerIPAddr.To4()); ok && !ip.IsUnspecified() {
		nb.TFTPServer = ip // siaddr, "next-server"
	}
	file, err := s.tftpGet(nb.TFTPServer, nb.BootFile)
	if err != nil {
		return agentapi.BootParams{}, fmt.Errorf("TFTP %s from %s: %w", nb.BootFile, nb.TFTPServer, err)
	}
	nb.BootFileBytes = len(file)

	// iPXE, now running: DHCP again, saying who it is, for the script.
	ack, err = s.dhcpExchange(ctx, append(pxe, dhcpv4.WithUserClass("iPXE", false))...)
	if err != nil {
		return agentapi.BootParams{}, fmt.Errorf("iPXE DHCP: %w", err)
	}
	if err := s.takeLease(ack, nb); err != nil {
		return agentapi.BootParams{}, err
	}
	nb.ScriptURL = ack.BootFileName
	if !strings.HasPrefix(nb.ScriptURL, "http://") && !strings.HasPrefix(nb.ScriptURL, "https://") {
		return agentapi.BootParams{}, fmt.Errorf("iPXE DHCP answer names no script URL (%q)", nb.ScriptURL)
	}
	script, err := s.httpGet(ctx, nb.ScriptURL, 64<<10)
	if err != nil {
		return agentapi.BootParams{}, fmt.Errorf("iPXE script: %w", err)
	}
	kernelURL, cmdline, initrdURL, ok := parseScript(string(script))
	if !ok {
		return agentapi.BootParams{}, nil // exit or local disk: the firmware's next boot device
	}
	params, err := agentapi.ParseKernelCmdline(cmdline)
	if err != nil {
		return agentapi.BootParams{}, fmt.Errorf("the script's kernel command line: %w", err)
	}
	if nb.Kernel, err = s.download(ctx, kernelURL, isKernel); err != nil {
		return agentapi.BootParams{}, fmt.Errorf("kernel: %w", err)
	}
	if nb.Initrd, err = s.download(ctx, initrdURL, isInitramfs); err != nil {
		return agentapi.BootParams{}, fmt.Errorf("initramfs: %w", err)
	}
	nb.Agent = true
	return params, nil
}

// dhcpExchange runs DISCOVER/OFFER/REQUEST/ACK from the server's namespace (nclient4's raw
// socket is opened there, so it stays there) and returns the ACK.
func (s *Server) dhcpExchange(ctx context.Context, mods ...dhcpv4.Modifier) (*dhcpv4.DHCPv4, error) {
	var c *nclient4.Client
	if err := s.Net.Do(func() (err error) {
		c, err = nclient4.New(s.Net.Link, nclient4.WithTimeout(firmwareDHCP), nclient4.WithRetry(3))
		return err
	}); err != nil {
		return nil, err
	}
	defer func() { _ = c.Close() }()
	lease, err := c.Request(ctx, mods...)
	if err != nil {
		return nil, err
	}
	return lease.ACK, nil
}

// takeLease configures the leased address on the server's interface (nclient4 leaves that
// to its caller) and records it.
func (s *Server) takeLease(ack *dhcpv4.DHCPv4, nb *NetworkBoot) error {
	ip, ok := netip.AddrFromSlice(ack.YourIPAddr.To4())
	if !ok || ip.IsUnspecified() {
		return errors.New("DHCP answer carries no address")
	}
	mask := ack.SubnetMask()
	if mask == nil {
		return errors.New("DHCP answer carries no subnet mask")
	}
	bits, _ := mask.Size()
	lease := netip.PrefixFrom(ip, bits)
	server, _ := netip.AddrFromSlice(ack.ServerIdentifier().To4())
	nb.DHCPServer = server
	if lease == nb.Lease {
		return nil
	}
	nb.Lease = lease
	if err := s.Net.IP("addr", "flush", "dev", s.Net.Link); err != nil {
		return err
	}
	return s.Net.AddAddr(lease)
}

// tftpGet reads a file over TFTP from the server's namespace, with the options a PXE ROM
// asks for (block size, transfer size), and checks the size announced.
func (s *Server) tftpGet(server netip.Addr, name string) ([]byte, error) {
	var data []byte
	err := s.Net.Do(func() error {
		c, err := tftp.NewClient(netip.AddrPortFrom(server, 69).String())
		if err != nil {
			return err
		}
		c.SetTimeout(time.Second)
		c.SetRetries(3)
		c.SetBlockSize(1456)
		c.RequestTSize(true)
		wt, err := c.Receive(name, "octet")
		if err != nil {
			return err
		}
		var buf bytes.Buffer
		if _, err := wt.WriteTo(&buf); err != nil {
			return err
		}
		if size, ok := wt.(tftp.IncomingTransfer).Size(); ok && size != int64(buf.Len()) {
			return fmt.Errorf("announced %d bytes, received %d", size, buf.Len())
		}
		if buf.Len() == 0 {
			return errors.New("empty file")
		}
		data = buf.Bytes()
		return nil
	})
	return data, err
}

func (s *Server) httpGet(ctx context.Context, url string, limit int64) ([]byte, error) {
	resp, err := s.get(ctx, url)
	if err != nil {
		return nil, err
	}
	defer func() { _ = resp.Body.Close() }()
	return io.ReadAll(io.LimitReader(resp.Body, limit))
}

func (s *Server) get(ctx context.Context, url string) (*http.Response, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return nil, err
	}
	resp, err := s.httpClient(5 * time.Minute).Do(req)
	if err != nil {
		return nil, err
	}
	if resp.StatusCode != http.StatusOK {
		_ = resp.Body.Close()
		return nil, fmt.Errorf("GET %s: %s", url, resp.Status)
	}
	return resp, nil
}

// download fetches an artifact whole, checks it is as long as announced and that its first
// bytes are what the firmware would load (check).
func (s *Server) download(ctx context.Context, url string, check func([]byte) error) (Download, error) {
	resp, err := s.get(ctx, url)
	if err != nil {
		return Download{}, err
	}
	defer func() { _ = resp.Body.Close() }()
	head := make([]byte, 1024)
	n, err := io.ReadFull(resp.Body, head)
	if err != nil && !errors.Is(err, io.ErrUnexpectedEOF) {
		return Download{}, fmt.Errorf("GET %s: %w", url, err)
	}
	rest, err := io.Copy(io.Discard, resp.Body)
	if err != nil {
		return Download{}, fmt.Errorf("GET %s: %w", url, err)
	}
	total := int64(n) + rest
	if resp.ContentLength >= 0 && total != resp.ContentLength {
		return Download{}, fmt.Errorf("GET %s: %d bytes announced, %d received", url, resp.ContentLength, total)
	}
	if err := check(head[:n]); err != nil {
		return Download{}, fmt.Errorf("GET %s: %w", url, err)
	}
	return Download{URL: url, Bytes: total}, nil
}

// isKernel checks for an x86 Linux boot image: the boot sector signature and the "HdrS" setup
// header, which iPXE's bzImage loader requires.
func isKernel(b []byte) error {
	if len(b) < 0x206 || b[0x1FE] != 0x55 || b[0x1FF] != 0xAA || string(b[0x202:0x206]) != "HdrS" {
		return errors.New("not an x86 Linux kernel (no boot signature and HdrS header)")
	}
	return nil
}

// isInitramfs checks for a cpio archive, plain or compressed as the kernel unpacks it.
func isInitramfs(b []byte) error {
	for _, magic := range [][]byte{{0x1f, 0x8b}, []byte("070701"), {0x28, 0xb5, 0x2f, 0xfd}, {0xfd, '7', 'z', 'X', 'Z', 0}, {0x02, 0x21, 0x4c, 0x18}} {
		if bytes.HasPrefix(b, magic) {
			return nil
		}
	}
	return errors.New("not an initramfs (neither cpio nor gzip, zstd, xz or lz4)")
}

// scriptLine matches an iPXE command line up to an "|| goto ..." fallback.
var scriptLine = regexp.MustCompile(`(?m)^(kernel|initrd)\s+(.*?)\s*(?:\|\|.*)?$`)

// parseScript reads the kernel and initrd commands of an iPXE script: the kernel's URL and
// command line, the initrd's URL. ok is false when the script boots no kernel.
func parseScript(script string) (kernelURL, cmdline, initrdURL string, ok bool) {
	for _, m := range scriptLine.FindAllStringSubmatch(script, -1) {
		args := strings.Fields(m[2])
		// Skip iPXE's own options (--name X, --autofree, --timeout=N).
		for len(args) > 0 && strings.HasPrefix(args[0], "--") {
			if (args[0] == "--name" || args[0] == "--timeout") && len(args) > 1 {
				args = args[1:]
			}
			args = args[1:]
		}
		if len(args) == 0 {
			continue
		}
		switch m[1] {
		case "kernel":
			kernelURL, cmdline = args[0], strings.Join(args[1:], " ")
		case "initrd":
			initrdURL = args[0]
		}
	}
	return kernelURL, cmdline, initrdURL, kernelURL != "" && initrdURL != ""
}
