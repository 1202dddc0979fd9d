package ipmi

import (
	"bufio"
	"crypto/subtle"
	"errors"
	"fmt"
	"net"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/anvil-metal/cluster-api-provider-anvil/internal/vbmc/machine"
)

// control is the endpoint ipmi_sim's chassis_control hook talks to.
//
// It listens on loopback TCP, not on a unix socket, because the hook is a
// bash script and bash can open TCP connections (/dev/tcp) but not unix
// sockets; socat and nc are not installed by default, and a Go helper binary
// would have to be built or be the test binary itself. Any local user can
// reach a loopback port, so each request carries a random token that only
// the hook script (mode 0700 in a 0700 directory) knows.
//
// The request is one line each: token, trace marker, argument count, then
// the arguments ipmi_sim gave the hook. The answer is the hook's exit code on
// a line, then what the hook prints.
type control struct {
	m     *machine.Machine
	ln    net.Listener
	token string
	trace *trace

	stop      chan struct{} // closed by close
	served    chan struct{} // closed when the accept loop has returned
	handlers  sync.WaitGroup
	closeOnce sync.Once

	mu    sync.Mutex
	conns map[net.Conn]struct{} // open requests, cut short by close
}

// hookTimeout bounds one hook request. ipmi_sim is single-threaded and waits
// for the hook, so a stuck request would stall the whole BMC.
const hookTimeout = 10 * time.Second

// traceWait bounds the wait for the hook's marker in the trace. It is
// normally read before the request arrives; if it never comes the request is
// served with what the hook alone says.
const traceWait = 2 * time.Second

func newControl(m *machine.Machine) (*control, error) {
	ln, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		return nil, fmt.Errorf("ipmi: control endpoint: %w", err)
	}
	c := &control{
		m: m, ln: ln, token: randomHex(16), trace: newTrace(),
		stop: make(chan struct{}), served: make(chan struct{}),
		conns: make(map[net.Conn]struct{}),
	}
	go c.serve()
	return c, nil
}

func (c *control) port() int { return c.ln.Addr().(*net.TCPAddr).Port }

func (c *control) close() {
	c.closeOnce.Do(func() {
		close(c.stop)
		_ = c.ln.Close()
		<-c.served
		// A local process that connects and says nothing must not hold
		// Stop for hookTimeout.
		c.mu.Lock()
		for conn := range c.conns {
			_ = conn.SetDeadline(time.Now())
		}
		c.mu.Unlock()
		c.handlers.Wait()
	})
}

func (c *control) serve() {
	defer close(c.served)
	for {
		conn, err := c.ln.Accept()
		if err != nil {
			return
		}
		c.mu.Lock()
		c.conns[conn] = struct{}{}
		c.mu.Unlock()
		c.handlers.Go(func() {
			c.handle(conn)
			c.mu.Lock()
			delete(c.conns, conn)
			c.mu.Unlock()
		})
	}
}

func (c *control) handle(conn net.Conn) {
	defer conn.Close()
	_ = conn.SetDeadline(time.Now().Add(hookTimeout))
	r := bufio.NewReader(conn)
	readLine := func() (string, error) {
		s, err := r.ReadString('\n')
		return strings.TrimSuffix(s, "\n"), err
	}
	token, err := readLine()
	if err != nil || subtle.ConstantTimeCompare([]byte(token), []byte(c.token)) != 1 {
		return
	}
	marker, err := readLine()
	if err != nil {
		return
	}
	n, err := readLine()
	if err != nil {
		return
	}
	argc, err := strconv.Atoi(n)
	if err != nil || argc < 0 || argc > 64 {
		return
	}
	args := make([]string, argc)
	for i := range args {
		if args[i], err = readLine(); err != nil {
			return
		}
	}
	out, err := c.run(marker, args)
	rc := 0
	if err != nil {
		rc, out = 1, err.Error()+"\n"
	}
	_, _ = fmt.Fprintf(conn, "%d\n%s", rc, out)
}

// run serves one hook call: "<mc> get <param>..." or "<mc> set <param> <value>...".
func (c *control) run(marker string, args []string) (string, error) {
	if len(args) < 2 {
		return "", errors.New("expected <mc> get|set|check [params]")
	}
	op, params := args[1], args[2:]
	if op == "set" && len(params)%2 != 0 {
		return "", errors.New("set needs parameter and value pairs")
	}
	// Claim the snapshot whatever the operation, so that it cannot be left
	// for a later call.
	snap := c.trace.await(marker, traceWait, c.stop)
	switch op {
	case "get":
		var out strings.Builder
		for _, p := range params {
			switch p {
			case "power":
				v := 0
				if c.m.Power() == machine.PowerOn {
					v = 1
				}
				fmt.Fprintf(&out, "power:%d\n", v)
			case "boot":
				fmt.Fprintf(&out, "boot:%s\n", ipmiBootDevice(c.m.BootOverride()))
			default:
				return "", fmt.Errorf("cannot get %q", p)
			}
		}
		return out.String(), nil
	case "set":
		for i := 0; i < len(params); i += 2 {
			if err := c.set(params[i], params[i+1], snap); err != nil {
				return "", err
			}
		}
		return "", nil
	default:
		// "check" validates LAN settings for other hooks; the chassis has none.
		return "", fmt.Errorf("operation %q not supported", op)
	}
}

func (c *control) set(param, value string, snap snapshot) error {
	switch param {
	case "power":
		switch {
		case value == "1" && snap.traced && snap.chassisOp != chassisControlOn:
			// No power-on request: this is ipmi_sim switching on again a
			// second after a power cycle, which the Machine has done already
			// (below). Obeying it would undo a power off sent meanwhile.
			return nil
		case value == "1":
			return c.m.Reset(machine.ResetOn)
		case value == "0" && snap.chassisOp == chassisControlCycle:
			// The first half of a power cycle: cycle at once, as the Redfish
			// emulator does, so clients see the server on when the command
			// returns and subscribers get one Boot event.
			return c.m.Reset(machine.ResetPowerCycle)
		case value == "0":
			return c.m.Reset(machine.ResetForceOff)
		}
	case "reset":
		// Hard reset. A server that is off cannot be reset: ErrPoweredOff
		// becomes an IPMI error, as on most BMCs.
		return c.m.Reset(machine.ResetForceRestart)
	case "shutdown":
		// "chassis power soft": the ACPI soft-off request.
		return c.m.Reset(machine.ResetGracefulShutdown)
	case "boot":
		return c.setBoot(value, snap)
	case "identify":
		return nil // The chassis LED; nothing in the Machine models it.
	}
	return fmt.Errorf("cannot set %s to %q", param, value)
}

// setBoot applies "chassis bootdev". ipmi_sim names the devices it supports
// (none, pxe, default, cdrom, bios); it refuses the others (disk safe mode,
// diagnostic, floppy) before calling the hook.
func (c *control) setBoot(device string, snap snapshot) error {
	cur := c.m.BootOverride()
	target, ok := map[string]machine.BootTarget{
		"none":    machine.BootNone,
		"pxe":     machine.BootPxe,
		"default": machine.BootHdd,
		"cdrom":   machine.BootCd,
		"bios":    machine.BootBiosSetup,
	}[device]
	if !ok {
		return fmt.Errorf("unknown boot device %q", device)
	}
	if target == machine.BootNone || (snap.haveBoot && !snap.boot.valid) {
		return c.m.SetBootOverride(machine.BootOverride{Target: machine.BootNone, Enabled: machine.OverrideDisabled, Mode: cur.Mode})
	}
	b := machine.BootOverride{Target: target, Enabled: machine.OverrideOnce, Mode: cur.Mode}
	// Without the trace, IPMI's default (the next boot only, mode unchanged).
	if snap.haveBoot {
		if snap.boot.persistent {
			b.Enabled = machine.OverrideContinuous
		}
		// IPMI's boot type bit: clear means "PC compatible (legacy)". Keep
		// it faithful, so that a client that forgets efiboot is caught.
		b.Mode = machine.BootModeLegacy
		if snap.boot.efi {
			b.Mode = machine.BootModeUEFI
		}
	}
	return c.m.SetBootOverride(b)
}

// ipmiBootDevice names an override as ipmi_sim's hook reports it; a target
// ipmi_sim has no name for (USB, UEFI HTTP, ...) reads as "none".
func ipmiBootDevice(b machine.BootOverride) string {
	if b.Enabled == machine.OverrideDisabled {
		return "none"
	}
	switch b.Target {
	case machine.BootPxe:
		return "pxe"
	case machine.BootHdd:
		return "default"
	case machine.BootCd:
		return "cdrom"
	case machine.BootBiosSetup:
		return "bios"
	}
	return "none"
}
