package disk

import (
	"bytes"
	"crypto/rand"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	"strings"
	"unicode/utf16"
)

// GUID is a GPT GUID in its on-disk byte order (the first three fields little-endian).
type GUID [16]byte

// Well-known partition type GUIDs, as text constants (a GUID is an array, and package-level
// arrays would be mutable); parse them with MustParseGUID.
const (
	// TypeBIOSBoot holds GRUB's core.img on BIOS systems booting from GPT.
	TypeBIOSBoot = "21686148-6449-6E6F-744E-656564454649"
	// TypeESP is the EFI system partition.
	TypeESP = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B"
	// TypeLinuxData is a generic Linux filesystem. The A/B root slots use it rather than the
	// discoverable "root" type so that systemd-gpt-auto never picks one of two identical
	// roots on its own.
	TypeLinuxData = "0FC63DAF-8483-4772-8E79-3D69D8477DE4"
)

// ParseGUID parses the textual form (any case, with dashes).
func ParseGUID(s string) (GUID, error) {
	var g GUID
	h := strings.ReplaceAll(s, "-", "")
	if len(h) != 32 || len(s) != 36 {
		return g, fmt.Errorf("invalid GUID %q", s)
	}
	b, err := hex.DecodeString(h)
	if err != nil {
		return g, fmt.Errorf("invalid GUID %q: %w", s, err)
	}
	// Mixed endian: time_low, time_mid and time_hi are stored little-endian.
	g[0], g[1], g[2], g[3] = b[3], b[2], b[1], b[0]
	g[4], g[5] = b[5], b[4]
	g[6], g[7] = b[7], b[6]
	copy(g[8:], b[8:])
	return g, nil
}

// MustParseGUID is ParseGUID for constants.
func MustParseGUID(s string) GUID {
	g, err := ParseGUID(s)
	if err != nil {
		panic(err)
	}
	return g
}

// NewGUID returns a random (version 4) GUID.
func NewGUID() GUID {
	var g GUID
	_, _ = rand.Read(g[:]) // crypto/rand.Read never fails (Go 1.24+)
	// Version 4 in the high nibble of time_hi (stored little-endian: byte 7), variant 10xx.
	g[7] = g[7]&0x0F | 0x40
	g[8] = g[8]&0x3F | 0x80
	return g
}

// String returns the canonical uppercase text form, as sgdisk prints it.
func (g GUID) String() string {
	return fmt.Sprintf("%02X%02X%02X%02X-%02X%02X-%02X%02X-%X-%X",
		g[3], g[2], g[1], g[0], g[5], g[4], g[7], g[6], g[8:10], g[10:16])
}

// IsZero reports an unused entry.
func (g GUID) IsZero() bool { return g == GUID{} }

// Partition is one GPT entry. LBAs are in logical sectors, inclusive.
type Partition struct {
	Index      int // 1-based position in the entry array (the kernel's partition number)
	Type       GUID
	ID         GUID
	FirstLBA   uint64
	LastLBA    uint64
	Attributes uint64
	Name       string
}

// Sectors is the partition's length in sectors.
func (p Partition) Sectors() uint64 { return p.LastLBA - p.FirstLBA + 1 }

// Table is a GUID partition table.
type Table struct {
	SectorSize  int
	DiskGUID    GUID
	FirstUsable uint64
	LastUsable  uint64
	// LastLBA is the disk's last sector, where the backup header lives.
	LastLBA    uint64
	Partitions []Partition
}

const (
	gptSignature   = "EFI PART"
	gptRevision    = 0x00010000
	gptHeaderSize  = 92
	gptEntrySize   = 128
	gptEntries     = 128
	gptEntryBytes  = gptEntrySize * gptEntries
	gptNameChars   = 36
	mbrTypeGPTProt = 0xEE
)

// entrySectors is how many sectors the 128-entry array takes.
func entrySectors(sectorSize int) uint64 {
	return uint64((gptEntryBytes + sectorSize - 1) / sectorSize) //nolint:gosec // small positive
}

// NewTable returns an empty table for a disk of size bytes.
func NewTable(size int64, sectorSize int) (*Table, error) {
	if sectorSize < 512 || sectorSize&(sectorSize-1) != 0 {
		return nil, fmt.Errorf("gpt: invalid sector size %d", sectorSize)
	}
	sectors := uint64(size) / uint64(sectorSize) //nolint:gosec // sizes are positive
	es := entrySectors(sectorSize)
	if sectors < 2*es+3+1 {
		return nil, fmt.Errorf("gpt: disk of %d bytes is too small", size)
	}
	return &Table{
		SectorSize:  sectorSize,
		DiskGUID:    NewGUID(),
		FirstUsable: 2 + es,
		LastUsable:  sectors - 2 - es,
		LastLBA:     sectors - 1,
	}, nil
}

// ErrNoGPT means neither GPT header is valid.
var ErrNoGPT = errors.New("gpt: no valid GUID partition table")

// ReadInfo says which copies of the table were valid.
type ReadInfo struct {
	PrimaryOK bool
	BackupOK  bool
	// BackupAtEnd is false when the backup header is not on the disk's last sector (the disk
	// grew, or a whole-disk image was written to a larger disk).
	BackupAtEnd bool
}

// ReadGPT reads the table from a disk of size bytes. It prefers the primary header and
// falls back to the backup when the primary is damaged.
func ReadGPT(r io.ReaderAt, size int64, sectorSize int) (*Table, ReadInfo, error) {
	var info ReadInfo
	lastLBA := uint64(size)/uint64(sectorSize) - 1 //nolint:gosec // sizes are positive
	primary, perr := readHeaderAt(r, 1, sectorSize)
	var t *header
	if perr == nil {
		info.PrimaryOK = true
		t = primary
		if bk, err := readHeaderAt(r, int64(primary.backupLBA), sectorSize); err == nil && bk.backupLBA == 1 { //nolint:gosec // LBA within the disk
			info.BackupOK = true
		}
		info.BackupAtEnd = info.BackupOK && primary.backupLBA == lastLBA
	} else {
		bk, err := readHeaderAt(r, int64(lastLBA), sectorSize) //nolint:gosec // LBA within the disk
		if err != nil {
			return nil, info, fmt.Errorf("%w (primary: %w; backup: %w)", ErrNoGPT, perr, err)
		}
		info.BackupOK, info.BackupAtEnd = true, true
		t = bk
	}
	return &t.Table, info, nil
}

type header struct {
	Table
	myLBA, backupLBA uint64
}

func readHeaderAt(r io.ReaderAt, lba int64, sectorSize int) (*header, error) {
	sec := make([]byte, sectorSize)
	if _, err := r.ReadAt(sec, lba*int64(sectorSize)); err != nil {
		return nil, err
	}
	if string(sec[:8]) != gptSignature {
		return nil, errors.New("no signature")
	}
	hsize := binary.LittleEndian.Uint32(sec[12:])
	if hsize < gptHeaderSize || int(hsize) > sectorSize {
		return nil, fmt.Errorf("header size %d", hsize)
	}
	want := binary.LittleEndian.Uint32(sec[16:])
	hb := append([]byte{}, sec[:hsize]...)
	binary.LittleEndian.PutUint32(hb[16:], 0)
	if crc32.ChecksumIEEE(hb) != want {
		return nil, errors.New("header CRC mismatch")
	}
	h := &header{}
	h.SectorSize = sectorSize
	h.myLBA = binary.LittleEndian.Uint64(sec[24:])
	if h.myLBA != uint64(lba) { //nolint:gosec // lba is non-negative
		return nil, fmt.Errorf("header at LBA %d says it is at %d", lba, h.myLBA)
	}
	h.backupLBA = binary.LittleEndian.Uint64(sec[32:])
	h.FirstUsable = binary.LittleEndian.Uint64(sec[40:])
	h.LastUsable = binary.LittleEndian.Uint64(sec[48:])
	copy(h.DiskGUID[:], sec[56:72])
	entLBA := binary.LittleEndian.Uint64(sec[72:])
	n := binary.LittleEndian.Uint32(sec[80:])
	esz := binary.LittleEndian.Uint32(sec[84:])
	entCRC := binary.LittleEndian.Uint32(sec[88:])
	if esz < gptEntrySize || esz%8 != 0 || n == 0 || uint64(n)*uint64(esz) > 1<<20 {
		return nil, fmt.Errorf("entry array %d x %d", n, esz)
	}
	ents := make([]byte, int(n)*int(esz))
	if _, err := r.ReadAt(ents, int64(entLBA)*int64(sectorSize)); err != nil { //nolint:gosec // LBA within the disk
		return nil, err
	}
	if crc32.ChecksumIEEE(ents) != entCRC {
		return nil, errors.New("partition entry CRC mismatch")
	}
	if h.myLBA == 1 {
		h.LastLBA = h.backupLBA
	} else {
		h.LastLBA = h.myLBA
	}
	for i := 0; i < int(n); i++ {
		e := ents[i*int(esz) : (i+1)*int(esz)]
		var p Partition
		copy(p.Type[:], e[0:16])
		if p.Type.IsZero() {
			continue
		}
		p.Index = i + 1
		copy(p.ID[:], e[16:32])
		p.FirstLBA = binary.LittleEndian.Uint64(e[32:])
		p.LastLBA = binary.LittleEndian.Uint64(e[40:])
		p.Attributes = binary.LittleEndian.Uint64(e[48:])
		u := make([]uint16, gptNameChars)
		for k := range u {
			u[k] = binary.LittleEndian.Uint16(e[56+2*k:])
		}
		end := len(u)
		for k, c := range u {
			if c == 0 {
				end = k
				break
			}
		}
		p.Name = string(utf16.Decode(u[:end]))
		h.Partitions = append(h.Partitions, p)
	}
	return h, nil
}

// Validate checks that partitions lie within the usable area and do not overlap.
func (t *Table) Validate() error {
	if len(t.Partitions) > gptEntries {
		return fmt.Errorf("gpt: %d partitions, at most %d", len(t.Partitions), gptEntries)
	}
	seen := map[int]bool{}
	for i, p := range t.Partitions {
		if p.Index < 1 || p.Index > gptEntries || seen[p.Index] {
			return fmt.Errorf("gpt: partition %q has invalid or duplicate index %d", p.Name, p.Index)
		}
		seen[p.Index] = true
		if p.FirstLBA < t.FirstUsable || p.LastLBA > t.LastUsable || p.FirstLBA > p.LastLBA {
			return fmt.Errorf("gpt: partition %d (%q) at %d-%d outside %d-%d", p.Index, p.Name, p.FirstLBA, p.LastLBA, t.FirstUsable, t.LastUsable)
		}
		if len(utf16.Encode([]rune(p.Name))) > gptNameChars {
			return fmt.Errorf("gpt: partition name %q is longer than %d UTF-16 units", p.Name, gptNameChars)
		}
		for _, q := range t.Partitions[i+1:] {
			if p.FirstLBA <= q.LastLBA && q.FirstLBA <= p.LastLBA {
				return fmt.Errorf("gpt: partitions %d and %d overlap", p.Index, q.Index)
			}
		}
	}
	return nil
}

// entryArray encodes the 128 entries.
func (t *Table) entryArray() []byte {
	b := make([]byte, gptEntryBytes)
	for _, p := range t.Partitions {
		e := b[(p.Index-1)*gptEntrySize : p.Index*gptEntrySize]
		copy(e[0:16], p.Type[:])
		copy(e[16:32], p.ID[:])
		binary.LittleEndian.PutUint64(e[32:], p.FirstLBA)
		binary.LittleEndian.PutUint64(e[40:], p.LastLBA)
		binary.LittleEndian.PutUint64(e[48:], p.Attributes)
		for k, c := range utf16.Encode([]rune(p.Name)) {
			binary.LittleEndian.PutUint16(e[56+2*k:], c)
		}
	}
	return b
}

func (t *Table) headerBytes(myLBA, altLBA, entLBA uint64, entCRC uint32) []byte {
	h := make([]byte, t.SectorSize)
	copy(h, gptSignature)
	binary.LittleEndian.PutUint32(h[8:], gptRevision)
	binary.LittleEndian.PutUint32(h[12:], gptHeaderSize)
	binary.LittleEndian.PutUint64(h[24:], myLBA)
	binary.LittleEndian.PutUint64(h[32:], altLBA)
	binary.LittleEndian.PutUint64(h[40:], t.FirstUsable)
	binary.LittleEndian.PutUint64(h[48:], t.LastUsable)
	copy(h[56:72], t.DiskGUID[:])
	binary.LittleEndian.PutUint64(h[72:], entLBA)
	binary.LittleEndian.PutUint32(h[80:], gptEntries)
	binary.LittleEndian.PutUint32(h[84:], gptEntrySize)
	binary.LittleEndian.PutUint32(h[88:], entCRC)
	binary.LittleEndian.PutUint32(h[16:], crc32.ChecksumIEEE(h[:gptHeaderSize]))
	return h
}

// ProtectiveMBR returns sector 0 for the table: one partition of type 0xEE covering the
// disk. bootCode, when given, fills the first 440 bytes (GRUB's boot.img on BIOS systems).
func (t *Table) ProtectiveMBR(bootCode []byte) []byte {
	mbr := make([]byte, t.SectorSize)
	copy(mbr[:440], bootCode)
	p := mbr[446:462]
	p[1], p[2], p[3] = 0x00, 0x02, 0x00 // CHS of LBA 1
	p[4] = mbrTypeGPTProt
	p[5], p[6], p[7] = 0xFF, 0xFF, 0xFF
	binary.LittleEndian.PutUint32(p[8:], 1)
	n := t.LastLBA
	if n > 0xFFFFFFFF {
		n = 0xFFFFFFFF
	}
	binary.LittleEndian.PutUint32(p[12:], uint32(n))
	mbr[510], mbr[511] = 0x55, 0xAA
	return mbr
}

// Write writes the protective MBR (with bootCode, see ProtectiveMBR), the primary header
// and entries and the backup entries and header. The backup goes first and the primary
// header last, so an interrupted write leaves the old primary or a complete new table.
func (t *Table) Write(w io.WriterAt, bootCode []byte) error {
	if err := t.Validate(); err != nil {
		return err
	}
	ss := int64(t.SectorSize)
	ents := t.entryArray()
	crc := crc32.ChecksumIEEE(ents)
	es := entrySectors(t.SectorSize)
	backupEnt := t.LastLBA - es
	writes := []struct {
		lba  uint64
		data []byte
	}{
		{backupEnt, ents},
		{t.LastLBA, t.headerBytes(t.LastLBA, 1, backupEnt, crc)},
		{2, ents},
		{0, t.ProtectiveMBR(bootCode)},
		{1, t.headerBytes(1, t.LastLBA, 2, crc)},
	}
	for _, x := range writes {
		if _, err := w.WriteAt(x.data, int64(x.lba)*ss); err != nil { //nolint:gosec // LBAs within the disk
			return fmt.Errorf("gpt: writing LBA %d: %w", x.lba, err)
		}
	}
	return nil
}

// HasProtectiveMBR reports whether sector 0 carries a GPT protective entry.
func HasProtectiveMBR(r io.ReaderAt) bool {
	b := make([]byte, 512)
	if _, err := r.ReadAt(b, 0); err != nil {
		return false
	}
	return b[510] == 0x55 && b[511] == 0xAA && bytes.IndexByte(b[446+4:446+5], mbrTypeGPTProt) == 0
}

// ByName returns the partition with the given name.
func (t *Table) ByName(name string) (Partition, bool) {
	for _, p := range t.Partitions {
		if p.Name == name {
			return p, true
		}
	}
	return Partition{}, false
}
