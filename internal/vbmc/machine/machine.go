// Package machine holds the state of one emulated server as its BMC sees it:
// power, the boot source override and virtual media.
//
// It knows no management protocol. A Redfish emulator and an IPMI emulator can
// drive the same Machine, and the thing that plays the server (a VM launcher in
// the lab, a fake in tests) subscribes to its events to learn when to boot from
// where. The vocabulary is Redfish's (ResetType, BootSourceOverrideTarget,
// BootSourceOverrideEnabled), the richest of the protocols; IPMI maps onto it.
package machine

import (
	"errors"
	"fmt"
	"maps"
	"sync"
)

// PowerState is the power state of the server.
type PowerState string

// Power states.
const (
	PowerOff PowerState = "Off"
	PowerOn  PowerState = "On"
)

// ResetType is a power action, named as Redfish's ComputerSystem.Reset names them.
type ResetType string

// Power actions. IPMI's chassis controls map onto them: on→ResetOn, off→ResetForceOff,
// soft→ResetGracefulShutdown, reset→ResetForceRestart, cycle→ResetPowerCycle, diag→ResetNmi.
const (
	ResetOn               ResetType = "On"
	ResetForceOn          ResetType = "ForceOn"
	ResetForceOff         ResetType = "ForceOff"
	ResetGracefulShutdown ResetType = "GracefulShutdown"
	ResetForceRestart     ResetType = "ForceRestart"
	ResetGracefulRestart  ResetType = "GracefulRestart"
	ResetPowerCycle       ResetType = "PowerCycle"
	ResetPushPowerButton  ResetType = "PushPowerButton"
	ResetNmi              ResetType = "Nmi"
)

// ResetTypes lists every power action a Machine accepts, in a stable order.
func ResetTypes() []ResetType {
	return []ResetType{ResetOn, ResetForceOff, ResetGracefulShutdown, ResetGracefulRestart,
		ResetForceRestart, ResetNmi, ResetForceOn, ResetPushPowerButton, ResetPowerCycle}
}

// BootTarget is where the firmware boots from, in Redfish's BootSourceOverrideTarget terms.
type BootTarget string

// Boot targets. BootNone means "follow the normal boot order".
const (
	BootNone        BootTarget = "None"
	BootPxe         BootTarget = "Pxe"
	BootFloppy      BootTarget = "Floppy"
	BootCd          BootTarget = "Cd"
	BootUsb         BootTarget = "Usb"
	BootHdd         BootTarget = "Hdd"
	BootBiosSetup   BootTarget = "BiosSetup"
	BootUtilities   BootTarget = "Utilities"
	BootDiags       BootTarget = "Diags"
	BootUefiShell   BootTarget = "UefiShell"
	BootUefiTarget  BootTarget = "UefiTarget"
	BootSDCard      BootTarget = "SDCard"
	BootUefiHTTP    BootTarget = "UefiHttp"
	BootRemoteDrive BootTarget = "RemoteDrive"
)

// OverrideEnabled says whether and for how long a boot override applies.
type OverrideEnabled string

// Override lifetimes.
const (
	OverrideDisabled   OverrideEnabled = "Disabled"
	OverrideOnce       OverrideEnabled = "Once"
	OverrideContinuous OverrideEnabled = "Continuous"
)

// BootMode is the firmware mode used for an override boot.
type BootMode string

// Firmware modes.
const (
	BootModeUEFI   BootMode = "UEFI"
	BootModeLegacy BootMode = "Legacy"
)

// BootOverride is the boot source override as a BMC stores it.
type BootOverride struct {
	Target  BootTarget
	Enabled OverrideEnabled
	Mode    BootMode
	// UefiTarget is the UEFI device path used when Target is BootUefiTarget.
	UefiTarget string
	// HTTPBootURI is the URI used when Target is BootUefiHTTP.
	HTTPBootURI string
}

// Media is what a virtual media slot holds.
type Media struct {
	// Image is the URI of the inserted image.
	Image          string
	WriteProtected bool
	// TransferProtocol is the protocol the BMC would fetch Image with ("HTTP", "HTTPS", "NFS", ...).
	TransferProtocol string
}

// EventKind says what changed.
type EventKind string

// Event kinds.
const (
	// EventBoot: the server starts its firmware, from off or by a restart. Event.Boot
	// says where it boots from.
	EventBoot EventKind = "Boot"
	// EventPowerOff: the server lost power (hard or graceful).
	EventPowerOff EventKind = "PowerOff"
	// EventNMI: a diagnostic interrupt was sent to a running server.
	EventNMI EventKind = "NMI"
	// EventBootOverrideChanged: a client set the boot override (consumption of a
	// Once override by a boot is reported by EventBoot alone).
	EventBootOverrideChanged EventKind = "BootOverrideChanged"
	// EventMediaInserted and EventMediaEjected: a virtual media slot changed.
	EventMediaInserted EventKind = "MediaInserted"
	EventMediaEjected  EventKind = "MediaEjected"
)

// Event is one change of a Machine, delivered to subscribers in the order the
// changes happened.
type Event struct {
	// Seq numbers the machine's events from 1.
	Seq  uint64
	Kind EventKind
	// Reset is the power action that caused a Boot, PowerOff or NMI event.
	Reset ResetType
	// Boot is, for EventBoot, where the firmware boots: the override that applied
	// (Enabled Once or Continuous), or Target BootNone with Enabled Disabled when the
	// normal boot order applies. For EventBootOverrideChanged it is the new override.
	Boot BootOverride
	// Slot and Media describe a media event (Media is zero on eject).
	Slot  string
	Media Media
}

// Errors returned by Machine methods.
var (
	// ErrPoweredOff: the action needs a running server (a restart of a server that is off).
	ErrPoweredOff = errors.New("server is powered off")
	// ErrMediaInUse: the slot already holds an image; eject it first.
	ErrMediaInUse = errors.New("virtual media slot already holds an image")
)

// Config is a Machine's initial state.
type Config struct {
	// PoweredOn starts the machine running (without an EventBoot). Servers in a
	// rack are usually off until provisioning powers them on, hence the default.
	PoweredOn bool
	// BootMode is the firmware mode before any client sets one; default UEFI.
	BootMode BootMode
}

// Machine is the mutable state of one emulated server. It is safe for
// concurrent use.
type Machine struct {
	mu    sync.Mutex
	power PowerState
	boot  BootOverride
	media map[string]Media // by slot id; a slot is absent when empty
	seq   uint64
	subs  []*subscription
}

// New returns a machine in the state cfg describes, with no boot override.
func New(cfg Config) *Machine {
	m := &Machine{power: PowerOff, boot: BootOverride{Target: BootNone, Enabled: OverrideDisabled, Mode: BootModeUEFI}}
	if cfg.PoweredOn {
		m.power = PowerOn
	}
	if cfg.BootMode != "" {
		m.boot.Mode = cfg.BootMode
	}
	return m
}

// Power returns the current power state.
func (m *Machine) Power() PowerState {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.power
}

// BootOverride returns the current boot override.
func (m *Machine) BootOverride() BootOverride {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.boot
}

// SetBootOverride replaces the boot override. Target and Mode are not checked
// against a list: which targets a server offers is the protocol emulator's
// business. Enabled must be one of the three lifetimes.
func (m *Machine) SetBootOverride(b BootOverride) error {
	switch b.Enabled {
	case OverrideDisabled, OverrideOnce, OverrideContinuous:
	default:
		return fmt.Errorf("boot override lifetime %q is not Disabled, Once or Continuous", b.Enabled)
	}
	if b.Target == "" {
		b.Target = BootNone
	}
	m.mu.Lock()
	m.boot = b
	m.emitLocked(Event{Kind: EventBootOverrideChanged, Boot: b})
	m.mu.Unlock()
	return nil
}

// Reset performs a power action. Actions that leave the state as it is (On when
// on, ForceOff when off, Nmi when off) succeed and change nothing. A restart of a
// server that is off fails with ErrPoweredOff, as on most BMCs; PowerCycle of a
// server that is off powers it on.
func (m *Machine) Reset(t ResetType) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	on := m.power == PowerOn
	switch t {
	case ResetOn, ResetForceOn:
		if !on {
			m.bootLocked(t)
		}
	case ResetForceOff, ResetGracefulShutdown:
		if on {
			m.powerOffLocked(t)
		}
	case ResetPushPowerButton:
		if on {
			m.powerOffLocked(t)
		} else {
			m.bootLocked(t)
		}
	case ResetForceRestart, ResetGracefulRestart:
		if !on {
			return ErrPoweredOff
		}
		m.bootLocked(t)
	case ResetPowerCycle:
		m.bootLocked(t)
	case ResetNmi:
		if on {
			m.emitLocked(Event{Kind: EventNMI, Reset: t})
		}
	default:
		return fmt.Errorf("unknown reset type %q", t)
	}
	return nil
}

// bootLocked starts the firmware and consumes a Once override: the next boot
// after this one follows the normal order again.
func (m *Machine) bootLocked(t ResetType) {
	m.power = PowerOn
	used := m.boot
	switch m.boot.Enabled {
	case OverrideOnce:
		m.boot.Enabled = OverrideDisabled
	case OverrideDisabled:
		used = BootOverride{Target: BootNone, Enabled: OverrideDisabled, Mode: m.boot.Mode}
	}
	m.emitLocked(Event{Kind: EventBoot, Reset: t, Boot: used})
}

func (m *Machine) powerOffLocked(t ResetType) {
	m.power = PowerOff
	m.emitLocked(Event{Kind: EventPowerOff, Reset: t})
}

// Media returns what slot holds, and false when it is empty.
func (m *Machine) Media(slot string) (Media, bool) {
	m.mu.Lock()
	defer m.mu.Unlock()
	md, ok := m.media[slot]
	return md, ok
}

// InsertedMedia returns every slot that holds an image.
func (m *Machine) InsertedMedia() map[string]Media {
	m.mu.Lock()
	defer m.mu.Unlock()
	return maps.Clone(m.media)
}

// InsertMedia puts an image into slot. It fails with ErrMediaInUse when the slot
// is not empty, as real BMCs do: clients must eject first.
func (m *Machine) InsertMedia(slot string, md Media) error {
	if md.Image == "" {
		return errors.New("virtual media image is empty")
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if _, ok := m.media[slot]; ok {
		return ErrMediaInUse
	}
	if m.media == nil {
		m.media = make(map[string]Media)
	}
	m.media[slot] = md
	m.emitLocked(Event{Kind: EventMediaInserted, Slot: slot, Media: md})
	return nil
}

// EjectMedia empties slot; ejecting an empty slot does nothing.
func (m *Machine) EjectMedia(slot string) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if _, ok := m.media[slot]; !ok {
		return
	}
	delete(m.media, slot)
	m.emitLocked(Event{Kind: EventMediaEjected, Slot: slot})
}

// Subscribe calls fn with every later event, in order, on a goroutine of its
// own, so fn may block or call back into the Machine without stalling the BMC
// that caused the event. Events queue while fn runs; none are dropped. The
// returned function stops delivery (an fn call already running finishes).
func (m *Machine) Subscribe(fn func(Event)) (unsubscribe func()) {
	s := &subscription{fn: fn, wake: make(chan struct{}, 1), done: make(chan struct{})}
	m.mu.Lock()
	m.subs = append(m.subs, s)
	m.mu.Unlock()
	go s.run()
	return func() {
		m.mu.Lock()
		for i, x := range m.subs {
			if x == s {
				m.subs = append(m.subs[:i:i], m.subs[i+1:]...)
				break
			}
		}
		m.mu.Unlock()
		s.stop()
	}
}

func (m *Machine) emitLocked(e Event) {
	m.seq++
	e.Seq = m.seq
	for _, s := range m.subs {
		s.push(e)
	}
}

// subscription is one subscriber's queue and the goroutine that drains it.
type subscription struct {
	fn   func(Event)
	wake chan struct{} // has a token when queue may be non-empty
	done chan struct{} // closed by stop

	mu      sync.Mutex
	queue   []Event
	stopped bool
}

func (s *subscription) push(e Event) {
	s.mu.Lock()
	s.queue = append(s.queue, e)
	s.mu.Unlock()
	select {
	case s.wake <- struct{}{}:
	default:
	}
}

func (s *subscription) stop() {
	s.mu.Lock()
	defer s.mu.Unlock()
	if !s.stopped {
		s.stopped = true
		s.queue = nil
		close(s.done)
	}
}

func (s *subscription) run() {
	for {
		select {
		case <-s.done:
			return
		case <-s.wake:
		}
		for {
			s.mu.Lock()
			if s.stopped || len(s.queue) == 0 {
				s.mu.Unlock()
				break
			}
			e := s.queue[0]
			s.queue = s.queue[1:]
			s.mu.Unlock()
			s.fn(e)
		}
	}
}
