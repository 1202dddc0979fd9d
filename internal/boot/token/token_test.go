package token

import (
	"encoding/base64"
	"errors"
	"strings"
	"sync"
	"testing"
	"time"

	"k8s.io/apimachinery/pkg/types"
)

var hostA = types.NamespacedName{Namespace: "lab", Name: "server-a"}

type clock struct {
	mu sync.Mutex
	t  time.Time
}

func (c *clock) now() time.Time      { c.mu.Lock(); defer c.mu.Unlock(); return c.t }
func (c *clock) add(d time.Duration) { c.mu.Lock(); defer c.mu.Unlock(); c.t = c.t.Add(d) }

func newIssuer(t *testing.T) (*Issuer, *clock) {
	t.Helper()
	c := &clock{t: time.Date(2026, 3, 1, 12, 0, 0, 0, time.UTC)}
	i, err := NewIssuer(Options{Now: c.now})
	if err != nil {
		t.Fatal(err)
	}
	return i, c
}

func TestIssueVerifyRoundTrip(t *testing.T) {
	i, c := newIssuer(t)
	tok, err := i.Issue(hostA, "attempt-7", 10*time.Minute)
	if err != nil {
		t.Fatal(err)
	}
	for _, r := range tok {
		if !strings.ContainsRune("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.", r) {
			t.Fatalf("token has character %q outside the URL/cmdline-safe set", r)
		}
	}
	cl, err := i.Verify(tok)
	if err != nil {
		t.Fatal(err)
	}
	if cl.Host != hostA || cl.Attempt != "attempt-7" || !cl.Expiry.Equal(c.now().Add(10*time.Minute)) || len(cl.ID) != 24 {
		t.Fatalf("claims = %+v", cl)
	}
	// Two tokens for the same attempt differ (nonce), so one leaking says nothing of another.
	tok2, _ := i.Issue(hostA, "attempt-7", 10*time.Minute)
	if tok2 == tok {
		t.Fatal("two tokens for the same host and attempt are identical")
	}
}

func TestExpiry(t *testing.T) {
	i, c := newIssuer(t)
	tok, _ := i.Issue(hostA, "a1", time.Minute)
	c.add(59 * time.Second)
	if _, err := i.Verify(tok); err != nil {
		t.Fatalf("before expiry: %v", err)
	}
	c.add(time.Second)
	_, err := i.Verify(tok)
	if !errors.Is(err, ErrExpired) {
		t.Fatalf("at expiry: err = %v, want ErrExpired", err)
	}
	assertNoLeak(t, err, tok)
}

func TestTamper(t *testing.T) {
	i, _ := newIssuer(t)
	tok, _ := i.Issue(hostA, "a1", time.Hour)
	enc := base64.RawURLEncoding
	parts := strings.Split(tok, ".")
	payload, _ := enc.DecodeString(parts[1])

	// Flip every byte of the payload in turn: each must fail the signature (or, for the
	// key-id bytes, name an unknown key).
	for n := range payload {
		p := append([]byte(nil), payload...)
		p[n] ^= 0x01
		bad := parts[0] + "." + enc.EncodeToString(p) + "." + parts[2]
		_, err := i.Verify(bad)
		if err == nil {
			t.Fatalf("payload byte %d flipped: token accepted", n)
		}
		if !errors.Is(err, ErrBadSignature) && !errors.Is(err, ErrMalformed) {
			t.Fatalf("payload byte %d flipped: err = %v", n, err)
		}
		assertNoLeak(t, err, bad)
	}
	// Replace the host with another one, keeping the signature.
	forged := strings.Replace(string(payload), "server-a", "server-b", 1)
	_, err := i.Verify(parts[0] + "." + enc.EncodeToString([]byte(forged)) + "." + parts[2])
	if !errors.Is(err, ErrBadSignature) {
		t.Fatalf("forged host: err = %v", err)
	}
	// Truncated signature, padding, extra parts, other versions, garbage, huge input.
	for name, bad := range map[string]string{
		"short mac":    parts[0] + "." + parts[1] + "." + parts[2][:10],
		"padded":       parts[0] + "." + parts[1] + "=." + parts[2],
		"extra part":   tok + ".x",
		"no mac":       parts[0] + "." + parts[1],
		"v2":           "v2." + parts[1] + "." + parts[2],
		"empty":        "",
		"garbage":      "not a token",
		"huge":         "v1." + strings.Repeat("A", 5000) + "." + parts[2],
		"std base64":   parts[0] + "." + strings.ReplaceAll(parts[1], "-", "+") + "+/." + parts[2],
		"empty fields": parts[0] + ".." + parts[2],
	} {
		_, err := i.Verify(bad)
		if err == nil {
			t.Fatalf("%s: accepted", name)
		}
		if !errors.Is(err, ErrMalformed) && !errors.Is(err, ErrBadSignature) {
			t.Fatalf("%s: err = %v", name, err)
		}
		assertNoLeak(t, err, bad)
	}
}

func TestOtherIssuerRejected(t *testing.T) {
	a, _ := newIssuer(t)
	b, _ := newIssuer(t)
	tok, _ := a.Issue(hostA, "a1", time.Hour)
	if _, err := b.Verify(tok); !errors.Is(err, ErrBadSignature) {
		t.Fatalf("token of another issuer: err = %v", err)
	}
}

func TestRotation(t *testing.T) {
	i, c := newIssuer(t)
	old, _ := i.Issue(hostA, "a1", time.Hour)
	if err := i.Rotate(); err != nil {
		t.Fatal(err)
	}
	if _, err := i.Verify(old); err != nil {
		t.Fatalf("token signed with the previous key must verify during rotation: %v", err)
	}
	fresh, _ := i.Issue(hostA, "a2", time.Hour)
	if _, err := i.Verify(fresh); err != nil {
		t.Fatal(err)
	}
	if err := i.Rotate(); err != nil {
		t.Fatal(err)
	}
	if _, err := i.Verify(old); !errors.Is(err, ErrBadSignature) {
		t.Fatalf("token two rotations old: err = %v, want ErrBadSignature", err)
	}
	if _, err := i.Verify(fresh); err != nil {
		t.Fatalf("previous key still verifies: %v", err)
	}
	i.DropPrevious()
	if _, err := i.Verify(fresh); !errors.Is(err, ErrBadSignature) {
		t.Fatalf("after DropPrevious: err = %v", err)
	}

	// Persisted keys: a second issuer built from Keys() accepts the first one's tokens.
	cur, prev := i.Keys()
	if prev != nil {
		t.Fatal("previous key survived DropPrevious")
	}
	j, err := NewIssuer(Options{Key: cur, Now: c.now})
	if err != nil {
		t.Fatal(err)
	}
	tok, _ := i.Issue(hostA, "a3", time.Hour)
	if _, err := j.Verify(tok); err != nil {
		t.Fatalf("replica with the same key: %v", err)
	}
}

func TestIssueValidation(t *testing.T) {
	i, _ := newIssuer(t)
	for name, f := range map[string]func() error{
		"no namespace": func() error { _, err := i.Issue(types.NamespacedName{Name: "x"}, "a", time.Minute); return err },
		"no attempt":   func() error { _, err := i.Issue(hostA, "", time.Minute); return err },
		"long attempt": func() error { _, err := i.Issue(hostA, strings.Repeat("a", 129), time.Minute); return err },
		"zero ttl":     func() error { _, err := i.Issue(hostA, "a", 0); return err },
		"huge ttl":     func() error { _, err := i.Issue(hostA, "a", 48*time.Hour); return err },
	} {
		if f() == nil {
			t.Errorf("%s: accepted", name)
		}
	}
	if _, err := NewIssuer(Options{Key: []byte("short")}); err == nil {
		t.Error("short key accepted")
	}
}

func assertNoLeak(t *testing.T, err error, tok string) {
	t.Helper()
	if err == nil || tok == "" {
		return
	}
	msg := err.Error()
	for _, part := range strings.Split(tok, ".") {
		if len(part) >= 8 && strings.Contains(msg, part) {
			t.Fatalf("error %q echoes part of the token", msg)
		}
	}
}

func FuzzVerify(f *testing.F) {
	i, err := NewIssuer(Options{Key: make([]byte, KeySize)})
	if err != nil {
		f.Fatal(err)
	}
	tok, _ := i.Issue(hostA, "a1", time.Hour)
	f.Add(tok)
	f.Add("v1..")
	f.Add("v1.AQ.AA")
	f.Fuzz(func(t *testing.T, s string) {
		c, err := i.Verify(s)
		if err == nil && s != tok {
			// Only a token this issuer signed can verify; the fuzzer cannot forge HMAC.
			if c.Host != hostA {
				t.Fatalf("forged claims accepted: %+v", c)
			}
		}
		assertNoLeak(t, err, s)
	})
}
