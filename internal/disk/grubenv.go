package disk

import (
	"bytes"
	"errors"
	"fmt"
	"strings"
)

// GRUB environment block, as GRUB's lib/envblk.c reads and writes it: exactly EnvBlockSize
// bytes, a fixed header line, "key=value\n" lines with '\' and newline escaped by a
// backslash, and '#' padding to the end. GRUB's save_env rewrites the file through its
// block list, in place and never changing its size, which is why the file must exist with
// exactly this size before GRUB can save into it.
const (
	EnvBlockSize   = 1024
	envBlockHeader = "# GRUB Environment Block\n"
)

// Env is the content of a GRUB environment block, in file order.
type Env struct {
	keys   []string
	values map[string]string
}

// NewEnv returns an empty environment.
func NewEnv() *Env { return &Env{values: map[string]string{}} }

// Get returns a variable's value ("" when unset).
func (e *Env) Get(k string) string { return e.values[k] }

// Lookup returns a variable's value and whether it is set.
func (e *Env) Lookup(k string) (string, bool) {
	v, ok := e.values[k]
	return v, ok
}

// Set sets a variable, keeping its position when it exists (new ones go last, as
// grub-editenv does).
func (e *Env) Set(k, v string) {
	if _, ok := e.values[k]; !ok {
		e.keys = append(e.keys, k)
	}
	e.values[k] = v
}

// Unset removes a variable.
func (e *Env) Unset(k string) {
	if _, ok := e.values[k]; !ok {
		return
	}
	delete(e.values, k)
	for i, x := range e.keys {
		if x == k {
			e.keys = append(e.keys[:i], e.keys[i+1:]...)
			break
		}
	}
}

// Keys returns the variable names in file order.
func (e *Env) Keys() []string { return append([]string{}, e.keys...) }

// Clone copies the environment.
func (e *Env) Clone() *Env {
	c := NewEnv()
	for _, k := range e.keys {
		c.Set(k, e.values[k])
	}
	return c
}

// Equal reports whether two environments hold the same variables in the same order.
func (e *Env) Equal(o *Env) bool {
	if len(e.keys) != len(o.keys) {
		return false
	}
	for i, k := range e.keys {
		if o.keys[i] != k || o.values[k] != e.values[k] {
			return false
		}
	}
	return true
}

// ErrEnvTooLarge means the variables do not fit in one block.
var ErrEnvTooLarge = errors.New("grubenv: variables do not fit in 1024 bytes")

// MarshalBlock encodes the environment as a 1024-byte block.
func (e *Env) MarshalBlock() ([]byte, error) {
	var b bytes.Buffer
	b.WriteString(envBlockHeader)
	for _, k := range e.keys {
		if k == "" || strings.ContainsAny(k, "=\n\\#") {
			return nil, fmt.Errorf("grubenv: invalid variable name %q", k)
		}
		b.WriteString(k)
		b.WriteByte('=')
		for _, c := range []byte(e.values[k]) {
			if c == '\\' || c == '\n' {
				b.WriteByte('\\')
			}
			b.WriteByte(c)
		}
		b.WriteByte('\n')
	}
	if b.Len() > EnvBlockSize {
		return nil, ErrEnvTooLarge
	}
	out := b.Bytes()
	return append(out, bytes.Repeat([]byte{'#'}, EnvBlockSize-len(out))...), nil
}

// ParseEnvBlock decodes a block. It insists on the header and the exact size, as GRUB does:
// anything else is not an environment block GRUB would load or save.
func ParseEnvBlock(b []byte) (*Env, error) {
	if len(b) != EnvBlockSize {
		return nil, fmt.Errorf("grubenv: block is %d bytes, want %d", len(b), EnvBlockSize)
	}
	if !bytes.HasPrefix(b, []byte(envBlockHeader)) {
		return nil, errors.New("grubenv: missing header")
	}
	e := NewEnv()
	rest := b[len(envBlockHeader):]
	for len(rest) > 0 {
		// Find the end of the logical line: an unescaped newline.
		end := -1
		for i := 0; i < len(rest); i++ {
			if rest[i] == '\\' {
				i++
				continue
			}
			if rest[i] == '\n' {
				end = i
				break
			}
		}
		if end < 0 {
			// Only padding may follow the last line.
			if len(bytes.Trim(rest, "#")) > 0 {
				return nil, errors.New("grubenv: unterminated line")
			}
			break
		}
		line := rest[:end]
		rest = rest[end+1:]
		if len(line) == 0 || line[0] == '#' {
			continue
		}
		eq := bytes.IndexByte(line, '=')
		if eq <= 0 {
			continue // GRUB skips lines without a name
		}
		var v []byte
		raw := line[eq+1:]
		for i := 0; i < len(raw); i++ {
			if raw[i] == '\\' && i+1 < len(raw) {
				i++
			}
			v = append(v, raw[i])
		}
		e.Set(string(line[:eq]), string(v))
	}
	return e, nil
}
