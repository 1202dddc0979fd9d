package ipmi

import (
	"encoding/hex"
	"strconv"
	"strings"
	"sync"
	"time"
)

// ipmi_sim calls its chassis_control hook with less than the request held:
// "set boot pxe" without the persistent and EFI bits of Set System Boot
// Options, and "set power 0" both for power off and for the first half of a
// power cycle. Its console trace ("debug msg" in the emu file) prints every
// decoded request before handling it, flushed, so the bytes are in our pipe
// before the hook even starts. The hook then writes a marker to the same pipe
// (its stderr is ipmi_sim's). When the parser reaches that marker it has seen
// everything ipmi_sim received up to the hook call; the last chassis control
// and boot flags requests it saw are the ones that caused the call.
//
// A trace request looks like this:
//
//	Receive message:
//	 channel=1 netfn=0x0 cmd=0x8 rs_addr=0x20 rs_lun=0x0 rq_addr=0x81
//	 rq_lun=0x0 rq_seq=0x8
//	 05 e0 04 00 00 00

// IPMI chassis requests the trace is read for (netfn 0x00).
const (
	cmdChassisControl    = 0x02
	cmdSetBootOptions    = 0x08
	bootParamBootFlags   = 5
	chassisControlOn     = 0x01
	chassisControlCycle  = 0x02
	syncMarker           = "anvil-hook-sync "
	maxUnclaimedSnapshot = 256
)

// bootFlags is the data of a Set System Boot Options request for parameter 5.
type bootFlags struct {
	valid, persistent, efi bool
	device                 byte // boot device selector, bits 5:2 of the second byte
}

// snapshot is what the trace held when a hook call started: the latest
// requests of interest not yet claimed by an earlier hook call.
type snapshot struct {
	chassisOp int // the chassis control code, or -1
	boot      bootFlags
	haveBoot  bool
	// traced is false when the marker never showed up: the caller falls
	// back to what the hook's arguments say.
	traced bool
}

// trace parses ipmi_sim's console output.
type trace struct {
	mu        sync.Mutex
	state     int // parser state, see line
	netfn     int
	cmd       int
	chassisOp int
	boot      bootFlags
	haveBoot  bool
	synced    map[string]snapshot // by hook marker, until claimed
	wake      chan struct{}       // closed and replaced at each marker
}

func newTrace() *trace {
	return &trace{chassisOp: -1, synced: make(map[string]snapshot), wake: make(chan struct{})}
}

const (
	stateIdle = iota
	stateHeader
	stateData
)

// line takes one line of ipmi_sim's console output.
func (t *trace) line(s string) {
	t.mu.Lock()
	defer t.mu.Unlock()
	// The console prompt ("> ") has no newline, so it can prefix any line.
	if i := strings.Index(s, syncMarker); i >= 0 {
		t.markLocked(strings.TrimSpace(s[i+len(syncMarker):]))
		return
	}
	if strings.Contains(s, "Receive message:") {
		t.state = stateHeader
		return
	}
	switch t.state {
	case stateHeader:
		t.state = stateIdle
		netfn, ok1 := traceField(s, "netfn=")
		cmd, ok2 := traceField(s, "cmd=")
		if ok1 && ok2 {
			t.netfn, t.cmd, t.state = netfn, cmd, stateData
		}
	case stateData:
		if strings.HasPrefix(strings.TrimSpace(s), "rq_lun=") {
			return
		}
		t.state = stateIdle
		data, err := hex.DecodeString(strings.ReplaceAll(strings.TrimSpace(s), " ", ""))
		if err == nil {
			t.requestLocked(t.netfn, t.cmd, data)
		}
	}
}

// requestLocked records a request the hook may be called for. The lengths
// checked are the ones ipmi_sim requires before it calls the hook.
func (t *trace) requestLocked(netfn, cmd int, data []byte) {
	if netfn != 0 {
		return
	}
	switch {
	case cmd == cmdChassisControl && len(data) >= 1:
		t.chassisOp = int(data[0] & 0x0f)
	case cmd == cmdSetBootOptions && len(data) >= 6 && data[0]&0x7f == bootParamBootFlags:
		t.boot = bootFlags{
			valid:      data[1]&0x80 != 0,
			persistent: data[1]&0x40 != 0,
			efi:        data[1]&0x20 != 0,
			device:     (data[2] >> 2) & 0x0f,
		}
		t.haveBoot = true
	}
}

// markLocked stores, for the hook call that wrote marker, the requests seen
// so far, and clears them: each request causes at most one hook call.
func (t *trace) markLocked(marker string) {
	if len(t.synced) >= maxUnclaimedSnapshot {
		// Hooks that wrote a marker but never reached the endpoint.
		clear(t.synced)
	}
	t.synced[marker] = snapshot{chassisOp: t.chassisOp, boot: t.boot, haveBoot: t.haveBoot, traced: true}
	t.chassisOp, t.haveBoot = -1, false
	close(t.wake)
	t.wake = make(chan struct{})
}

// await returns the snapshot for marker, waiting up to timeout for the
// parser to reach it (it normally has already), or until stop is closed.
func (t *trace) await(marker string, timeout time.Duration, stop <-chan struct{}) snapshot {
	deadline := time.NewTimer(timeout)
	defer deadline.Stop()
	for {
		t.mu.Lock()
		s, ok := t.synced[marker]
		delete(t.synced, marker)
		wake := t.wake
		t.mu.Unlock()
		if ok {
			return s
		}
		select {
		case <-wake:
		case <-deadline.C:
			return snapshot{chassisOp: -1}
		case <-stop:
			return snapshot{chassisOp: -1}
		}
	}
}

// traceField parses "name=0x.." out of a trace header line.
func traceField(s, name string) (int, bool) {
	i := strings.Index(s, " "+name)
	if i < 0 {
		return 0, false
	}
	v := s[i+1+len(name):]
	if j := strings.IndexByte(v, ' '); j >= 0 {
		v = v[:j]
	}
	n, err := strconv.ParseInt(v, 0, 32)
	return int(n), err == nil
}
