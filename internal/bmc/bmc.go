package bmc

import (
	"context"
	"crypto/sha256"
	"crypto/x509"
	"encoding/hex"
	"errors"
	"fmt"
	"strings"
	"time"

	infrav1 "github.com/anvil-metal/cluster-api-provider-anvil/api/v1alpha1"
)

// PowerAction is a change of power asked of a BMC.
type PowerAction string

const (
	PowerActionOn      PowerAction = "on"
	PowerActionOff     PowerAction = "off"  // hard off
	PowerActionSoftOff PowerAction = "soft" // ACPI shutdown
	PowerActionCycle   PowerAction = "cycle"
)

// BootDevice is a one-time or persistent boot override target.
type BootDevice string

const (
	BootPXE  BootDevice = "pxe"
	BootDisk BootDevice = "disk"
)

// BootOptions qualify a boot override.
type BootOptions struct {
	// Persistent keeps the override for every later boot, not just the next.
	Persistent bool
	// UEFI boots the device in UEFI mode rather than legacy BIOS mode.
	UEFI bool
}

// Client is one open session with one BMC. Implementations are not safe for concurrent use;
// the Pool guarantees one operation in flight per BMC.
type Client interface {
	PowerState(ctx context.Context) (infrav1.PowerState, error)
	SetPower(ctx context.Context, action PowerAction) error
	SetBootDevice(ctx context.Context, device BootDevice, opts BootOptions) error
	Inventory(ctx context.Context) (*infrav1.HardwareInventory, error)
	// InsertVirtualMedia mounts an ISO from url as a CD; an empty url ejects it.
	InsertVirtualMedia(ctx context.Context, url string) error
	// Close logs out. It is called on every error path, so it must not fail loudly.
	Close(ctx context.Context) error
}

// Target is everything needed to open a session with one BMC.
type Target struct {
	Address  Address
	Username string
	Password string
	// CAPool verifies the BMC's certificate; nil means the system trust store. CADigest
	// identifies its content (e.g. a hash of the PEM), so a rotated bundle opens a new session
	// rather than resuming one verified against the old bundle.
	CAPool   *x509.CertPool
	CADigest string
	// InsecureSkipVerify is only ever set from the host's explicit spec field.
	InsecureSkipVerify bool
	// Timeout bounds every single call to the BMC.
	Timeout time.Duration
	// ConnIdleTimeout closes an idle kept-alive connection (Redfish; default
	// DefaultConnIdleTimeout).
	ConnIdleTimeout time.Duration
}

// fingerprint identifies the credentials, endpoint and CA bundle a session was opened with,
// so a changed Secret (rotation) or address opens a new session. The password enters only as a
// hash and the fingerprint is never logged.
func (t Target) fingerprint() string {
	sum := sha256.Sum256([]byte(t.Address.String() + "\x00" + t.Username + "\x00" + t.Password + "\x00" + t.CADigest))
	tls := "verify"
	if t.InsecureSkipVerify {
		tls = "insecure"
	}
	return hex.EncodeToString(sum[:8]) + "/" + tls
}

// Dialer opens a session with a BMC (login included).
type Dialer func(ctx context.Context, t Target) (Client, error)

// Dial opens a session with the BMC the target names: Redfish through gofish (DialRedfish),
// IPMI through bmclib's ipmitool provider (DialIPMI).
func Dial(ctx context.Context, t Target) (Client, error) {
	switch t.Address.Protocol {
	case Redfish:
		return DialRedfish(ctx, t)
	case IPMI:
		return DialIPMI(ctx, t)
	default:
		return nil, fmt.Errorf("%w: protocol %q", ErrUnsupported, t.Address.Protocol)
	}
}

// Errors the pool and the controllers act on. Every error from this package wraps one of them
// so callers can pick a condition reason without parsing text.
var (
	// ErrAuth means the BMC refused the credentials. The pool will not log in again with the
	// same credentials until they change or a long hold-off passes, so a wrong password never
	// locks the account.
	ErrAuth = errors.New("BMC rejected the credentials")
	// ErrUnreachable means no answer (refused, timed out, TLS failure, hang).
	ErrUnreachable = errors.New("BMC unreachable")
	// ErrTLS means the BMC's certificate did not verify.
	ErrTLS = errors.New("BMC TLS certificate not trusted")
	// ErrBMC means the BMC answered but refused or failed the operation.
	ErrBMC = errors.New("BMC operation failed")
	// ErrBackoff means the pool is holding off after earlier failures; RetryAfter says how long.
	ErrBackoff = errors.New("holding off after BMC failures")
	// ErrUnsupported means the protocol cannot do this (e.g. virtual media over IPMI).
	ErrUnsupported = errors.New("not supported by this BMC protocol")
)

// redact removes a secret from an error's text. bmclib and ipmitool sometimes echo command
// lines or URLs; a password must never reach a log, event or status through them.
func redact(err error, secrets ...string) error {
	if err == nil {
		return nil
	}
	msg := err.Error()
	changed := false
	for _, s := range secrets {
		if s != "" && strings.Contains(msg, s) {
			msg = strings.ReplaceAll(msg, s, "[redacted]")
			changed = true
		}
	}
	if !changed {
		return err
	}
	return &redactedError{msg: msg, cause: err}
}

// redactedError keeps errors.Is working through the cause while showing only redacted text.
type redactedError struct {
	msg   string
	cause error
}

func (e *redactedError) Error() string { return e.msg }
func (e *redactedError) Unwrap() error { return e.cause }

// classify wraps a raw protocol error in one of the package's sentinel errors.
func classify(err error) error {
	if err == nil {
		return nil
	}
	for _, sentinel := range []error{ErrAuth, ErrUnreachable, ErrTLS, ErrBMC, ErrBackoff, ErrUnsupported} {
		if errors.Is(err, sentinel) {
			return err
		}
	}
	msg := strings.ToLower(err.Error())
	switch {
	case strings.Contains(msg, "x509"), strings.Contains(msg, "certificate"):
		return wrap(ErrTLS, err)
	case strings.Contains(msg, "401"), strings.Contains(msg, "unauthorized"),
		strings.Contains(msg, "rakp"), strings.Contains(msg, "invalid user"),
		strings.Contains(msg, "authentication failed"):
		return wrap(ErrAuth, err)
	case errors.Is(err, context.DeadlineExceeded), strings.Contains(msg, "deadline exceeded"),
		strings.Contains(msg, "timeout"), strings.Contains(msg, "connection refused"),
		strings.Contains(msg, "no route to host"), strings.Contains(msg, "no such host"),
		strings.Contains(msg, "connection reset"), strings.Contains(msg, "eof"),
		strings.Contains(msg, "unable to establish"), strings.Contains(msg, "503"):
		return wrap(ErrUnreachable, err)
	default:
		return wrap(ErrBMC, err)
	}
}

func wrap(sentinel, err error) error { return &classified{sentinel: sentinel, cause: err} }

type classified struct{ sentinel, cause error }

func (c *classified) Error() string   { return c.sentinel.Error() + ": " + c.cause.Error() }
func (c *classified) Unwrap() []error { return []error{c.sentinel, c.cause} }

// Reason is the CamelCase condition reason for an error from this package.
func Reason(err error) string {
	switch {
	case err == nil:
		return ""
	case errors.Is(err, ErrAuth):
		return "BMCAuthFailed"
	case errors.Is(err, ErrTLS):
		return "BMCTLSUntrusted"
	case errors.Is(err, ErrUnreachable):
		return "BMCUnreachable"
	case errors.Is(err, ErrBackoff):
		return "BMCBackingOff"
	case errors.Is(err, ErrUnsupported):
		return "BMCUnsupported"
	default:
		return "BMCError"
	}
}
