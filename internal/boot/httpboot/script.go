package httpboot

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"net/url"
	"regexp"
	"strconv"
	"strings"

	"k8s.io/apimachinery/pkg/types"

	infrav1 "github.com/anvil-metal/cluster-api-provider-anvil/api/v1alpha1"
	"github.com/anvil-metal/cluster-api-provider-anvil/internal/boot/agentapi"
)

// Action is what a host's iPXE script does.
type Action string

const (
	// ActionExit leaves iPXE at once, so the firmware moves on to its next boot device. It is
	// the answer for unknown hosts and hosts Anvil expects nothing of.
	ActionExit Action = "exit"
	// ActionLocalDisk boots the installed system from the local disk.
	ActionLocalDisk Action = "localdisk"
	// ActionAgent boots the Anvil agent.
	ActionAgent Action = "agent"
)

// Script is everything a rendered iPXE script depends on.
type Script struct {
	Action Action
	// BootMode decides how ActionLocalDisk boots the disk (UEFI: exit to the firmware's boot
	// order; Legacy: sanboot the first BIOS disk).
	BootMode infrav1.BootMode
	// Agent is required for ActionAgent.
	Agent *AgentBoot
}

// AgentBoot is the agent boot of one host.
type AgentBoot struct {
	// Host is shown on the console.
	Host types.NamespacedName
	// KernelURL and InitrdURL are the agent's kernel and initramfs (http or https).
	KernelURL, InitrdURL string
	// APIURL is the agent API's base URL (anvil.api).
	APIURL string
	// Token is the boot token (anvil.token).
	Token string
	// CAFingerprint pins the API's TLS certificate (anvil.ca), sha256:<64 hex>; optional.
	CAFingerprint string
	// Console devices, e.g. tty0, ttyS0,115200n8.
	Console []string
	// ExtraArgs are further kernel arguments (key or key=value; anvil.* and initrd are ours).
	ExtraArgs []string
	// RetryURL is chained to (fresh state, fresh token) when loading the agent fails.
	RetryURL string
	// BootMAC is the NIC the host boots from, passed as BOOTIF=01-aa-bb-… so that the agent
	// takes its DHCP lease on that NIC (servers have several); nil passes none.
	BootMAC net.HardwareAddr
}

// maxCmdline is the x86 kernel's COMMAND_LINE_SIZE less room for the terminating NUL; a longer
// command line would be cut off silently, perhaps in the middle of the token.
const maxCmdline = 2047

// maxToken bounds the boot token (package token's own limit).
const maxToken = 1024

// Rendering is strict by construction: every value is checked against a small character set
// that contains no iPXE or kernel-command-line syntax (no whitespace, '$', '{', '}', '#',
// '|', '&', ';', quotes, backslash or control characters), and URLs are rebuilt from their
// parsed parts with every other byte percent-encoded. A value that does not fit is an error;
// nothing is silently dropped or "cleaned".
var (
	tokenRE   = regexp.MustCompile(`^[A-Za-z0-9._-]+$`)
	caRE      = regexp.MustCompile(`^sha256:[0-9a-f]{64}$`)
	consoleRE = regexp.MustCompile(`^[A-Za-z][A-Za-z0-9]{0,15}(,[0-9]{1,7}([noe]([5-8]r?)?)?)?$`)
	argKeyRE  = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$`)
	argValRE  = regexp.MustCompile(`^[A-Za-z0-9._,:/@+=-]{0,256}$`)
	dnsRE     = regexp.MustCompile(`^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$`)
	hostRE    = regexp.MustCompile(`^[A-Za-z0-9]([A-Za-z0-9.-]{0,251}[A-Za-z0-9])?$`)
)

// RenderScript renders s as an iPXE script.
func RenderScript(s Script) ([]byte, error) {
	var b strings.Builder
	b.WriteString("#!ipxe\n")
	switch s.Action {
	case ActionExit:
		b.WriteString("exit\n")
	case ActionLocalDisk:
		switch s.BootMode {
		case infrav1.BootModeLegacy:
			// The first BIOS disk; --no-describe keeps iPXE from announcing a SAN boot
			// device (iBFT) to the OS.
			b.WriteString("sanboot --no-describe --drive 0x80 || exit\n")
		case "", infrav1.BootModeUEFI, infrav1.BootModeUEFISecureBoot:
			// Back to the firmware, whose boot order has the disk after the one-time PXE boot.
			// The same script as for unknown hosts, so the answer says nothing about a MAC.
			b.WriteString("exit\n")
		default:
			return nil, fmt.Errorf("unknown boot mode %q", s.BootMode)
		}
	case ActionAgent:
		if s.Agent == nil {
			return nil, errors.New("agent boot without agent parameters")
		}
		if err := renderAgent(&b, s.Agent); err != nil {
			return nil, err
		}
	default:
		return nil, fmt.Errorf("unknown action %q", s.Action)
	}
	return []byte(b.String()), nil
}

func renderAgent(b *strings.Builder, a *AgentBoot) error {
	if len(a.Host.Namespace) > 63 || !dnsRE.MatchString(a.Host.Namespace) || !dnsRE.MatchString(a.Host.Name) {
		return errors.New("host namespace/name is not a valid Kubernetes name")
	}
	kernel, err := scriptURL("kernel URL", a.KernelURL)
	if err != nil {
		return err
	}
	initrd, err := scriptURL("initrd URL", a.InitrdURL)
	if err != nil {
		return err
	}
	api, err := scriptURL("API URL", a.APIURL)
	if err != nil {
		return err
	}
	retry, err := scriptURL("retry URL", a.RetryURL)
	if err != nil {
		return err
	}
	if len(a.Token) > maxToken || !tokenRE.MatchString(a.Token) {
		// Never echo the value: it is a secret.
		return errors.New("boot token has characters outside [A-Za-z0-9._-] or is too long")
	}
	// quiet keeps the kernel from printing its command line, and with it the token, on the
	// consoles (serial consoles are often logged by the BMC); the agent's own output still
	// shows. An operator's loglevel= among ExtraArgs comes later and wins.
	args := []string{"initrd=initramfs", "quiet", agentapi.KernelParamAPI + "=" + api, agentapi.KernelParamToken + "=" + a.Token}
	if a.CAFingerprint != "" {
		if !caRE.MatchString(a.CAFingerprint) {
			return errors.New("CA fingerprint must be sha256:<64 lowercase hex digits>")
		}
		args = append(args, agentapi.KernelParamCA+"="+a.CAFingerprint)
	}
	if a.BootMAC != nil {
		if len(a.BootMAC) != 6 {
			return errors.New("boot MAC is not an Ethernet MAC")
		}
		args = append(args, "BOOTIF=01-"+strings.ReplaceAll(a.BootMAC.String(), ":", "-"))
	}
	for _, c := range a.Console {
		if !consoleRE.MatchString(c) {
			return fmt.Errorf("console %q is not a device with optional serial options (e.g. ttyS0,115200n8)", c)
		}
		args = append(args, "console="+c)
	}
	for _, x := range a.ExtraArgs {
		if err := checkExtraArg(x); err != nil {
			return err
		}
		args = append(args, x)
	}
	cmdline := strings.Join(args, " ")
	if len(cmdline) > maxCmdline {
		return fmt.Errorf("kernel command line would be %d bytes, more than %d", len(cmdline), maxCmdline)
	}

	fmt.Fprintf(b, "echo Anvil: booting the agent for %s/%s\n", a.Host.Namespace, a.Host.Name)
	fmt.Fprintf(b, "kernel --name vmlinuz %s %s || goto anvil_retry\n", kernel, cmdline)
	fmt.Fprintf(b, "initrd --name initramfs %s || goto anvil_retry\n", initrd)
	b.WriteString("boot || goto anvil_retry\n")
	b.WriteString(":anvil_retry\n")
	b.WriteString("echo Anvil: loading the agent failed, retrying in 10 seconds\n")
	b.WriteString("sleep 10\n")
	fmt.Fprintf(b, "chain --replace --autofree %s || exit\n", retry)
	return nil
}

func checkExtraArg(x string) error {
	k, v, hasVal := strings.Cut(x, "=")
	if !argKeyRE.MatchString(k) || (hasVal && !argValRE.MatchString(v)) {
		return fmt.Errorf("kernel argument %q must be key or key=value of [A-Za-z0-9._,:/@+=-]", x)
	}
	if k == "initrd" || strings.HasPrefix(k, "anvil.") {
		return fmt.Errorf("kernel argument %q is set by Anvil itself", k)
	}
	return nil
}

// scriptURL validates an http(s) URL and rebuilds it from its parts so that only
// [A-Za-z0-9-._~:/%[]] remain: scheme, host (DNS name or IP literal), optional port and a
// path whose every other byte is percent-encoded. Credentials, queries and fragments are
// refused: none of the URLs Anvil renders needs them.
func scriptURL(what, raw string) (string, error) {
	u, err := url.Parse(raw)
	if err != nil || raw == "" {
		return "", fmt.Errorf("%s is not a URL", what)
	}
	if u.Scheme != "http" && u.Scheme != "https" {
		return "", fmt.Errorf("%s must be http or https", what)
	}
	if u.User != nil || u.RawQuery != "" || u.ForceQuery || u.Fragment != "" || u.Opaque != "" {
		return "", fmt.Errorf("%s must not carry credentials, a query or a fragment", what)
	}
	host := u.Hostname()
	var hostPart string
	if ip, err := netip.ParseAddr(host); err == nil {
		if ip.Zone() != "" {
			return "", fmt.Errorf("%s must not use a zoned IPv6 address", what)
		}
		if ip.Is6() && !ip.Is4In6() {
			hostPart = "[" + ip.String() + "]"
		} else {
			hostPart = ip.Unmap().String()
		}
	} else if hostRE.MatchString(host) {
		hostPart = strings.ToLower(host)
	} else {
		return "", fmt.Errorf("%s has an invalid host", what)
	}
	if p := u.Port(); p != "" {
		n, err := strconv.Atoi(p)
		if err != nil || n < 1 || n > 65535 {
			return "", fmt.Errorf("%s has an invalid port", what)
		}
		hostPart += ":" + strconv.Itoa(n)
	}
	return u.Scheme + "://" + hostPart + escapePath(u.Path), nil
}

// escapePath percent-encodes every byte of p except unreserved characters and '/'.
func escapePath(p string) string {
	const hexdig = "0123456789ABCDEF"
	var b strings.Builder
	for i := 0; i < len(p); i++ {
		c := p[i]
		if c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '-' || c == '.' || c == '_' || c == '~' || c == '/' {
			b.WriteByte(c)
			continue
		}
		b.WriteByte('%')
		b.WriteByte(hexdig[c>>4])
		b.WriteByte(hexdig[c&15])
	}
	return b.String()
}
