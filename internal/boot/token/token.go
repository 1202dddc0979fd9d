// Package token issues and verifies Anvil's per-host boot tokens.
//
// PXE is unauthenticated by nature, so the token handed to the agent on its kernel command line
// is what authenticates every call it makes to the agent API. A token is an HMAC-SHA256-signed
// statement "this is host <namespace/name>, boot attempt <attempt>, valid until <expiry>". It
// is bound to one boot attempt, so a new boot (a new attempt) makes every older token useless
// to the agent API, and it expires on its own. No source IP, MAC or UUID is ever part of the
// decision.
//
// Format (URL-, iPXE- and kernel-command-line-safe; no JSON, no third-party JWT library):
//
//	v1.<base64url(payload)>.<base64url(HMAC-SHA256(key, domain || payload))>
//
// where payload = version(1) | keyID(4) | expiry unix seconds(8) | nonce(12) |
// len(namespace)(1) namespace | len(name)(1) name | len(attempt)(1) attempt.
//
// The key can be rotated: the issuer keeps the previous key for verification only, so tokens
// already handed out keep working until they expire, while new tokens use the new key.
package token

import (
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"encoding/base64"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"strings"
	"sync"
	"time"

	"k8s.io/apimachinery/pkg/types"
)

const (
	// KeySize is the size of a signing key in bytes.
	KeySize = 32
	// MaxTTL caps a token's lifetime: a boot plus an install fits well inside it, and a token
	// that outlives its purpose is only a liability.
	MaxTTL = 24 * time.Hour
	// MaxLen is the longest token Verify will look at; longer input is rejected before any
	// decoding so that a hostile caller cannot make us allocate.
	MaxLen = 1024
	// MaxAttemptLen is the longest boot-attempt identifier a token can carry.
	MaxAttemptLen = 128

	prefix       = "v1."
	version      = 1
	nonceSize    = 12
	keyIDSize    = 4
	fixedPayload = 1 + keyIDSize + 8 + nonceSize
	// domain separates these MACs from any other use of the same key.
	domain = "anvil/boot-token/v1\x00"
)

// Errors returned by Verify. They never contain the token or any part of it.
var (
	ErrMalformed    = errors.New("boot token is malformed")
	ErrBadSignature = errors.New("boot token signature is invalid")
	ErrExpired      = errors.New("boot token has expired")
)

// Claims is what a valid token says.
type Claims struct {
	// Host the token was issued to.
	Host types.NamespacedName
	// Attempt is the boot attempt the token belongs to.
	Attempt string
	// Expiry is when the token stops being valid (whole seconds).
	Expiry time.Time
	// ID identifies this token in logs and events without revealing it (hex of its nonce).
	ID string
}

// Options configure an Issuer.
type Options struct {
	// Key is the current signing key (KeySize bytes). Empty means a fresh random key: tokens
	// then do not survive a restart, which is fine for a single boot-services process; pass a
	// persisted key when several replicas must accept each other's tokens.
	Key []byte
	// PreviousKey, when set, is accepted for verification only (rotation in progress).
	PreviousKey []byte
	// Now is the clock; nil means time.Now. Tests use it to move past expiry.
	Now func() time.Time
}

type signingKey struct {
	id     [keyIDSize]byte
	secret []byte
}

// Issuer signs and verifies boot tokens. It is safe for concurrent use.
type Issuer struct {
	now func() time.Time

	mu       sync.RWMutex
	current  signingKey
	previous *signingKey
}

// NewIssuer returns an Issuer using o.Key, or a fresh random key when o.Key is empty.
func NewIssuer(o Options) (*Issuer, error) {
	i := &Issuer{now: o.Now}
	if i.now == nil {
		i.now = time.Now
	}
	key := o.Key
	if len(key) == 0 {
		var err error
		if key, err = NewKey(); err != nil {
			return nil, err
		}
	}
	cur, err := makeKey(key)
	if err != nil {
		return nil, err
	}
	i.current = cur
	if len(o.PreviousKey) > 0 {
		prev, err := makeKey(o.PreviousKey)
		if err != nil {
			return nil, fmt.Errorf("previous key: %w", err)
		}
		i.previous = &prev
	}
	return i, nil
}

// NewKey returns KeySize random bytes from the operating system's CSPRNG.
func NewKey() ([]byte, error) {
	k := make([]byte, KeySize)
	if _, err := rand.Read(k); err != nil {
		return nil, fmt.Errorf("generating boot token key: %w", err)
	}
	return k, nil
}

func makeKey(secret []byte) (signingKey, error) {
	if len(secret) != KeySize {
		return signingKey{}, fmt.Errorf("boot token key must be %d bytes, got %d", KeySize, len(secret))
	}
	k := signingKey{secret: append([]byte(nil), secret...)}
	// The key ID lets Verify pick the key without trying each; it is a MAC of a constant, so
	// it says nothing about the key itself.
	m := hmac.New(sha256.New, k.secret)
	m.Write([]byte("anvil/boot-token/key-id"))
	copy(k.id[:], m.Sum(nil))
	return k, nil
}

// Rotate makes a new random key current and keeps the old current key for verification.
// The key before that is forgotten: tokens signed with it stop verifying.
func (i *Issuer) Rotate() error {
	k, err := NewKey()
	if err != nil {
		return err
	}
	return i.RotateTo(k)
}

// RotateTo is Rotate with a given key (for keys persisted elsewhere).
func (i *Issuer) RotateTo(key []byte) error {
	nk, err := makeKey(key)
	if err != nil {
		return err
	}
	i.mu.Lock()
	defer i.mu.Unlock()
	prev := i.current
	i.current = nk
	i.previous = &prev
	return nil
}

// DropPrevious ends a rotation: only the current key verifies from now on.
func (i *Issuer) DropPrevious() {
	i.mu.Lock()
	defer i.mu.Unlock()
	i.previous = nil
}

// Keys returns copies of the current and previous keys (previous is nil when none), for
// persisting them in a Secret. Handle the result as a secret.
func (i *Issuer) Keys() (current, previous []byte) {
	i.mu.RLock()
	defer i.mu.RUnlock()
	current = append([]byte(nil), i.current.secret...)
	if i.previous != nil {
		previous = append([]byte(nil), i.previous.secret...)
	}
	return current, previous
}

// Issue returns a token for host's boot attempt, valid for ttl (rounded up to whole seconds).
func (i *Issuer) Issue(host types.NamespacedName, attempt string, ttl time.Duration) (string, error) {
	if host.Namespace == "" || host.Name == "" {
		return "", errors.New("boot token: host namespace and name are required")
	}
	if len(host.Namespace) > 255 || len(host.Name) > 255 {
		return "", errors.New("boot token: host namespace or name too long")
	}
	if attempt == "" || len(attempt) > MaxAttemptLen {
		return "", fmt.Errorf("boot token: attempt must be 1 to %d bytes", MaxAttemptLen)
	}
	if ttl <= 0 || ttl > MaxTTL {
		return "", fmt.Errorf("boot token: ttl must be in (0, %s], got %s", MaxTTL, ttl)
	}
	exp := i.now().Add(ttl + time.Second - 1).Truncate(time.Second)

	payload := make([]byte, fixedPayload, fixedPayload+3+len(host.Namespace)+len(host.Name)+len(attempt))
	payload[0] = version
	if _, err := rand.Read(payload[1+keyIDSize+8:]); err != nil {
		return "", fmt.Errorf("boot token: nonce: %w", err)
	}
	binary.BigEndian.PutUint64(payload[1+keyIDSize:], uint64(exp.Unix())) //nolint:gosec // expiry is after 1970 by construction
	for _, s := range []string{host.Namespace, host.Name, attempt} {
		payload = append(payload, byte(len(s))) //nolint:gosec // lengths checked to be <= 255 above
		payload = append(payload, s...)
	}

	i.mu.RLock()
	k := i.current
	i.mu.RUnlock()
	copy(payload[1:], k.id[:])
	mac := sign(k.secret, payload)

	enc := base64.RawURLEncoding
	return prefix + enc.EncodeToString(payload) + "." + enc.EncodeToString(mac), nil
}

func sign(secret, payload []byte) []byte {
	m := hmac.New(sha256.New, secret)
	m.Write([]byte(domain))
	m.Write(payload)
	return m.Sum(nil)
}

// Verify checks tok's signature and expiry and returns its claims. The error wraps one of
// ErrMalformed, ErrBadSignature or ErrExpired and never contains the token.
func (i *Issuer) Verify(tok string) (Claims, error) {
	if len(tok) > MaxLen {
		return Claims{}, fmt.Errorf("%w: longer than %d bytes", ErrMalformed, MaxLen)
	}
	rest, ok := strings.CutPrefix(tok, prefix)
	if !ok {
		return Claims{}, fmt.Errorf("%w: unknown version", ErrMalformed)
	}
	p64, m64, ok := strings.Cut(rest, ".")
	if !ok || strings.Contains(m64, ".") {
		return Claims{}, fmt.Errorf("%w: wrong number of parts", ErrMalformed)
	}
	enc := base64.RawURLEncoding.Strict()
	payload, err := enc.DecodeString(p64)
	if err != nil {
		return Claims{}, fmt.Errorf("%w: payload encoding", ErrMalformed)
	}
	mac, err := enc.DecodeString(m64)
	if err != nil || len(mac) != sha256.Size {
		return Claims{}, fmt.Errorf("%w: signature encoding", ErrMalformed)
	}
	if len(payload) < fixedPayload+3 || payload[0] != version {
		return Claims{}, fmt.Errorf("%w: payload too short or wrong version", ErrMalformed)
	}

	var kid [keyIDSize]byte
	copy(kid[:], payload[1:])
	i.mu.RLock()
	var secret []byte
	switch {
	case kid == i.current.id:
		secret = i.current.secret
	case i.previous != nil && kid == i.previous.id:
		secret = i.previous.secret
	}
	i.mu.RUnlock()
	if secret == nil {
		return Claims{}, fmt.Errorf("%w: signed with an unknown key", ErrBadSignature)
	}
	if !hmac.Equal(mac, sign(secret, payload)) {
		return Claims{}, ErrBadSignature
	}

	// Authentic from here on; a parse failure now means an issuer bug, still reported as
	// malformed rather than trusted.
	exp := time.Unix(int64(binary.BigEndian.Uint64(payload[1+keyIDSize:])), 0) //nolint:gosec // we wrote it from a positive int64
	c := Claims{Expiry: exp, ID: hex.EncodeToString(payload[1+keyIDSize+8 : fixedPayload])}
	fields := payload[fixedPayload:]
	var parts [3]string
	for n := range parts {
		if len(fields) < 1 || len(fields) < 1+int(fields[0]) {
			return Claims{}, fmt.Errorf("%w: truncated payload", ErrMalformed)
		}
		l := int(fields[0])
		parts[n] = string(fields[1 : 1+l])
		fields = fields[1+l:]
	}
	if len(fields) != 0 || parts[0] == "" || parts[1] == "" || parts[2] == "" {
		return Claims{}, fmt.Errorf("%w: bad payload fields", ErrMalformed)
	}
	c.Host = types.NamespacedName{Namespace: parts[0], Name: parts[1]}
	c.Attempt = parts[2]

	if !i.now().Before(exp) {
		return Claims{}, fmt.Errorf("%w (token %s for %s expired at %s)", ErrExpired, c.ID, c.Host, exp.UTC().Format(time.RFC3339))
	}
	return c, nil
}
