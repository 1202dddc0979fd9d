// Package fat is a small FAT12/16/32 implementation for the agent: it formats a partition
// and fills it with a fixed set of files in one pass (Build), finds files and their clusters
// (Open, Lookup), and rewrites a file's bytes in place (WriteFile). That is all Anvil needs
// to create the EFI system partition and the cloud-init config drive and to update the GRUB
// environment block at run time without external tools, mounts or loop devices.
//
// It is deliberately not a general filesystem: no deletion, no renames, no growing
// directories after Build. Everything it writes is checked in tests with fsck.fat, mtools
// and GRUB's own FAT reader (grub-fstest).
package fat

import (
	"encoding/binary"
	"errors"
	"fmt"
	"strings"
	"time"
	"unicode/utf16"
)

// Type is the FAT variant.
type Type int

// FAT variants. The type of an existing volume follows from its cluster count (the
// Microsoft specification's rule, which Linux and GRUB apply too), not from the label in
// the boot sector.
const (
	FAT12 Type = 12
	FAT16 Type = 16
	FAT32 Type = 32
)

func (t Type) String() string { return fmt.Sprintf("FAT%d", int(t)) }

// Cluster-count limits from the specification: fewer than 4085 clusters is FAT12, fewer
// than 65525 is FAT16, anything else FAT32.
const (
	maxFAT12Clusters = 4084
	maxFAT16Clusters = 65524
)

const (
	dirEntrySize = 32

	attrReadOnly  = 0x01
	attrHidden    = 0x02
	attrSystem    = 0x04
	attrVolumeID  = 0x08
	attrDirectory = 0x10
	attrArchive   = 0x20
	attrLFN       = attrReadOnly | attrHidden | attrSystem | attrVolumeID

	// NTRes flags that mark an all-lowercase base name or extension of a short entry
	// (Windows NT and Linux use them instead of a long name for names like "grub.cfg").
	ntLowerBase = 0x08
	ntLowerExt  = 0x10

	lfnLast      = 0x40
	lfnCharsPer  = 13
	deletedEntry = 0xE5
)

// ErrNotFound is returned when a path does not exist.
var ErrNotFound = errors.New("fat: file not found")

// fatDate and fatTime encode a timestamp the way directory entries store it (local time
// with 2-second resolution; FAT has no time zone).
func fatDate(t time.Time) uint16 {
	y := t.Year() - 1980
	if y < 0 {
		y = 0
	}
	if y > 127 {
		y = 127
	}
	return uint16(y<<9 | int(t.Month())<<5 | t.Day()) //nolint:gosec // bounded above
}

func fatTime(t time.Time) uint16 {
	return uint16(t.Hour()<<11 | t.Minute()<<5 | t.Second()/2) //nolint:gosec // bounded by clock ranges
}

// shortNameChecksum is the checksum long-name entries carry of their short entry.
func shortNameChecksum(name [11]byte) byte {
	var sum byte
	for _, c := range name {
		sum = (sum&1)<<7 + sum>>1 + c
	}
	return sum
}

// validShortChar reports whether c may appear in an 8.3 name (uppercase form).
func validShortChar(c byte) bool {
	switch {
	case c >= 'A' && c <= 'Z', c >= '0' && c <= '9':
		return true
	case c >= 0x80:
		return false
	}
	return strings.IndexByte("!#$%&'()-@^_`{}~", c) >= 0
}

// exactShortName returns the 8.3 form of name when name is already a valid 8.3 name that
// needs no long entry: all of the base and all of the extension are in one case. It also
// returns the NTRes case flags to record a lowercase base or extension.
func exactShortName(name string) ([11]byte, byte, bool) {
	var out [11]byte
	for i := range out {
		out[i] = ' '
	}
	base, ext := name, ""
	if i := strings.LastIndexByte(name, '.'); i >= 0 {
		base, ext = name[:i], name[i+1:]
	}
	if len(base) == 0 || len(base) > 8 || len(ext) > 3 || strings.Contains(base, ".") {
		return out, 0, false
	}
	var flags byte
	for part, s := range []string{base, ext} {
		upper, lower := false, false
		for i := 0; i < len(s); i++ {
			c := s[i]
			if c >= 'a' && c <= 'z' {
				lower = true
				c -= 'a' - 'A'
			} else if c >= 'A' && c <= 'Z' {
				upper = true
			}
			if !validShortChar(c) {
				return out, 0, false
			}
			if part == 0 {
				out[i] = c
			} else {
				out[8+i] = c //nolint:gosec // i < len(ext) <= 3, checked above
			}
		}
		if upper && lower {
			return out, 0, false
		}
		if lower {
			if part == 0 {
				flags |= ntLowerBase
			} else {
				flags |= ntLowerExt
			}
		}
	}
	return out, flags, true
}

// generatedShortName derives the numbered short name ("USER-D~1") that accompanies a long
// name, unique among taken.
func generatedShortName(name string, taken map[[11]byte]bool) ([11]byte, error) {
	base, ext := name, ""
	if i := strings.LastIndexByte(name, '.'); i > 0 {
		base, ext = name[:i], name[i+1:]
	}
	clean := func(s string, n int) string {
		var b strings.Builder
		for _, r := range strings.ToUpper(s) {
			if r < 0x80 && validShortChar(byte(r)) { //nolint:gosec // ASCII, checked first
				b.WriteByte(byte(r)) //nolint:gosec // ASCII, checked above
			} else if r != '.' && r != ' ' {
				b.WriteByte('_')
			}
			if b.Len() == n {
				break
			}
		}
		return b.String()
	}
	b, e := clean(base, 8), clean(ext, 3)
	for n := 1; n < 1000000; n++ {
		tail := fmt.Sprintf("~%d", n)
		stem := b
		if len(stem)+len(tail) > 8 {
			stem = stem[:8-len(tail)]
		}
		var out [11]byte
		copy(out[:], fmt.Sprintf("%-8s%-3s", stem+tail, e))
		if !taken[out] {
			return out, nil
		}
	}
	return [11]byte{}, fmt.Errorf("fat: no free short name for %q", name)
}

// lfnEntries returns the long-name entries for name, in on-disk order (last part first).
func lfnEntries(name string, sum byte) ([][dirEntrySize]byte, error) {
	u := utf16.Encode([]rune(name))
	if len(u) > 255 {
		return nil, fmt.Errorf("fat: name %q longer than 255 characters", name)
	}
	n := (len(u) + lfnCharsPer - 1) / lfnCharsPer
	padded := make([]uint16, n*lfnCharsPer)
	for i := range padded {
		switch {
		case i < len(u):
			padded[i] = u[i]
		case i == len(u):
			padded[i] = 0
		default:
			padded[i] = 0xFFFF
		}
	}
	out := make([][dirEntrySize]byte, n)
	for seq := 1; seq <= n; seq++ {
		var e [dirEntrySize]byte
		e[0] = byte(seq)
		if seq == n {
			e[0] |= lfnLast
		}
		e[11] = attrLFN
		e[13] = sum
		chars := padded[(seq-1)*lfnCharsPer : seq*lfnCharsPer]
		for i, c := range chars {
			var off int
			switch {
			case i < 5:
				off = 1 + 2*i
			case i < 11:
				off = 14 + 2*(i-5)
			default:
				off = 28 + 2*(i-11)
			}
			binary.LittleEndian.PutUint16(e[off:], c)
		}
		out[n-seq] = e
	}
	return out, nil
}

// validLongName rejects names FAT cannot hold.
func validLongName(name string) error {
	if name == "" || name == "." || name == ".." {
		return fmt.Errorf("fat: invalid name %q", name)
	}
	if strings.ContainsAny(name, "\"*/:<>?\\|") {
		return fmt.Errorf("fat: invalid character in name %q", name)
	}
	for _, r := range name {
		if r < 0x20 {
			return fmt.Errorf("fat: control character in name %q", name)
		}
	}
	if strings.HasSuffix(name, ".") || strings.HasSuffix(name, " ") {
		return fmt.Errorf("fat: name %q ends in a dot or space", name)
	}
	return nil
}
