package ipmi

import (
	"bytes"
	"fmt"
	"io"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/anvil-metal/cluster-api-provider-anvil/internal/vbmc/machine"
)

func TestEncodeFRU(t *testing.T) {
	data := encodeFRU(FRU{SerialNumber: "S", PartNumber: "a very long part number that goes on and on past the sixty-three bytes IPMI allows"})
	if data[0] != 1 || zeroChecksum(data[:8]) != 0 {
		t.Fatalf("bad common header % x", data[:8])
	}
	for i, name := range []string{"chassis", "board", "product"} {
		off := int(data[2+i]) * 8
		n := int(data[off+1]) * 8
		if data[off] != 1 || off+n > len(data) {
			t.Fatalf("%s area at %d: bad header", name, off)
		}
		if zeroChecksum(data[off:off+n]) != 0 {
			t.Errorf("%s area: bad checksum", name)
		}
	}
	// Defaults, and the one-byte serial padded so it is not read as the end marker.
	for _, want := range [][]byte{[]byte("\xc5Anvil"), []byte("\xcfEmulated Server"), []byte("\xc2S ")} {
		if !bytes.Contains(data, want) {
			t.Errorf("FRU lacks %q", want)
		}
	}
	if bytes.Contains(data, []byte("IPMI allows")) {
		t.Error("field not cut to 63 bytes")
	}
}

func TestTraceParser(t *testing.T) {
	tr := newTrace()
	feed := func(lines ...string) {
		for _, l := range lines {
			tr.line(l)
		}
	}
	// Set System Boot Options, parameter 5: valid, persistent, EFI, PXE.
	feed("> Receive message:",
		" channel=1 netfn=0x0 cmd=0x8 rs_addr=0x20 rs_lun=0x0 rq_addr=0x81",
		" rq_lun=0x0 rq_seq=0x8",
		" 05 e0 04 00 00 00",
		"anvil-hook-sync 1.2")
	s := tr.await("1.2", time.Second, nil)
	want := bootFlags{valid: true, persistent: true, efi: true, device: 1}
	if !s.traced || !s.haveBoot || s.boot != want || s.chassisOp != -1 {
		t.Fatalf("snapshot %+v", s)
	}

	// Chassis control "cycle"; requests of other commands are ignored; a
	// claimed request does not carry over to the next hook call.
	feed("Receive message:",
		" channel=1 netfn=0x0 cmd=0x2 rs_addr=0x20 rs_lun=0x0 rq_addr=0x81",
		" rq_lun=0x0 rq_seq=0x7",
		" 02",
		"Response message: 1795769521.273382",
		" 00",
		"Receive message:",
		" channel=1 netfn=0x6 cmd=0x1 rs_addr=0x20 rs_lun=0x0 rq_addr=0x81",
		" rq_lun=0x0 rq_seq=0x3",
		"",
		"> anvil-hook-sync 3.4",
		"anvil-hook-sync 5.6")
	if s := tr.await("3.4", time.Second, nil); s.chassisOp != chassisControlCycle || s.haveBoot {
		t.Fatalf("snapshot %+v", s)
	}
	if s := tr.await("5.6", time.Second, nil); !s.traced || s.chassisOp != -1 || s.haveBoot {
		t.Fatalf("second snapshot %+v", s)
	}

	// A marker that never comes: give up, untraced.
	if s := tr.await("7.8", 10*time.Millisecond, nil); s.traced {
		t.Fatalf("snapshot for a missing marker %+v", s)
	}
	// A marker that comes while waiting.
	go func() {
		time.Sleep(20 * time.Millisecond)
		feed("anvil-hook-sync 9.9")
	}()
	if s := tr.await("9.9", 5*time.Second, nil); !s.traced {
		t.Fatalf("late marker missed: %+v", s)
	}
}

// Without the trace (the marker never came) the hook's arguments alone decide.
func TestControlWithoutTrace(t *testing.T) {
	m := machine.New(machine.Config{})
	c, err := newControl(m)
	if err != nil {
		t.Fatal(err)
	}
	defer c.close()
	untraced := snapshot{chassisOp: -1}

	if err := c.set("boot", "pxe", untraced); err != nil {
		t.Fatal(err)
	}
	// IPMI's default lifetime, and the mode the machine had.
	want := machine.BootOverride{Target: machine.BootPxe, Enabled: machine.OverrideOnce, Mode: machine.BootModeUEFI}
	if got := m.BootOverride(); got != want {
		t.Fatalf("override %+v, want %+v", got, want)
	}
	// A power cycle arrives as off then, a second later, on.
	for _, v := range []string{"1", "0", "1"} {
		if err := c.set("power", v, untraced); err != nil {
			t.Fatal(err)
		}
	}
	if m.Power() != machine.PowerOn {
		t.Fatal("not on")
	}
	if err := c.set("boot", "floppy", untraced); err == nil {
		t.Fatal("unknown boot device accepted")
	}
}

// Only the hook script, which knows the token, gets an answer.
func TestControlRejectsWrongToken(t *testing.T) {
	m := machine.New(machine.Config{})
	c, err := newControl(m)
	if err != nil {
		t.Fatal(err)
	}
	defer c.close()
	ask := func(token string) string {
		conn, err := net.Dial("tcp", c.ln.Addr().String())
		if err != nil {
			t.Fatal(err)
		}
		defer conn.Close()
		fmt.Fprintf(conn, "%s\nno-marker\n3\n0x20\nset\npower\n", token)
		_ = conn.SetReadDeadline(time.Now().Add(5 * time.Second))
		out, _ := io.ReadAll(conn)
		return string(out)
	}
	if out := ask("wrong"); out != "" {
		t.Fatalf("answer to a wrong token: %q", out)
	}
	// Right token: "set power" without a value is refused.
	if out := ask(c.token); !strings.HasPrefix(out, "1\n") {
		t.Fatalf("answer %q", out)
	}
}
