package fat

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"path"
	"strings"
	"unicode/utf16"
)

// FS is an existing FAT volume at an offset of a disk or image.
type FS struct {
	r    io.ReaderAt
	base int64

	Type           Type
	bytesPerSector int64
	clusterSize    int64
	reserved       int64
	numFATs        int64
	fatSectors     int64
	rootEntries    int64 // FAT12/16 fixed root directory
	rootCluster    uint32
	clusterCount   uint32
	firstData      int64 // byte offset of cluster 2, relative to base
	// Label is the volume label from the root directory (or the boot sector when the
	// root directory has none), with trailing spaces removed.
	Label string
}

// Entry is a file or directory found by Lookup.
type Entry struct {
	Name         string
	Dir          bool
	Size         uint32
	FirstCluster uint32
	// entryOff is the absolute byte offset of the short directory entry, for in-place updates.
	entryOff int64
}

// Extent is a run of bytes on the underlying disk.
type Extent struct {
	Offset int64
	Length int64
}

// Open reads the boot sector of the volume at off in r.
func Open(r io.ReaderAt, off int64) (*FS, error) {
	b := make([]byte, 512)
	if _, err := r.ReadAt(b, off); err != nil {
		return nil, fmt.Errorf("fat: reading boot sector: %w", err)
	}
	if b[510] != 0x55 || b[511] != 0xAA {
		return nil, errors.New("fat: no boot sector signature")
	}
	fs := &FS{r: r, base: off}
	fs.bytesPerSector = int64(binary.LittleEndian.Uint16(b[11:]))
	spc := int64(b[13])
	fs.reserved = int64(binary.LittleEndian.Uint16(b[14:]))
	fs.numFATs = int64(b[16])
	fs.rootEntries = int64(binary.LittleEndian.Uint16(b[17:]))
	total := int64(binary.LittleEndian.Uint16(b[19:]))
	if total == 0 {
		total = int64(binary.LittleEndian.Uint32(b[32:]))
	}
	fs.fatSectors = int64(binary.LittleEndian.Uint16(b[22:]))
	if fs.fatSectors == 0 {
		fs.fatSectors = int64(binary.LittleEndian.Uint32(b[36:]))
		fs.rootCluster = binary.LittleEndian.Uint32(b[44:])
	}
	switch fs.bytesPerSector {
	case 512, 1024, 2048, 4096:
	default:
		return nil, fmt.Errorf("fat: invalid sector size %d", fs.bytesPerSector)
	}
	if spc == 0 || spc&(spc-1) != 0 || fs.reserved == 0 || fs.numFATs == 0 || fs.fatSectors == 0 {
		return nil, errors.New("fat: invalid BIOS parameter block")
	}
	fs.clusterSize = spc * fs.bytesPerSector
	rootSectors := (fs.rootEntries*dirEntrySize + fs.bytesPerSector - 1) / fs.bytesPerSector
	firstDataSector := fs.reserved + fs.numFATs*fs.fatSectors + rootSectors
	if total <= firstDataSector {
		return nil, errors.New("fat: volume smaller than its metadata")
	}
	fs.firstData = firstDataSector * fs.bytesPerSector
	fs.clusterCount = uint32((total - firstDataSector) / spc) //nolint:gosec // total is at most 32 bits
	switch {
	case fs.clusterCount <= maxFAT12Clusters:
		fs.Type = FAT12
	case fs.clusterCount <= maxFAT16Clusters:
		fs.Type = FAT16
	default:
		fs.Type = FAT32
	}
	if (fs.Type == FAT32) != (fs.rootEntries == 0) {
		return nil, fmt.Errorf("fat: %v with %d root entries", fs.Type, fs.rootEntries)
	}
	labelOff := 43
	if fs.Type == FAT32 {
		labelOff = 71
	}
	fs.Label = strings.TrimRight(string(b[labelOff:labelOff+11]), " ")
	if fs.Label == "NO NAME" {
		fs.Label = ""
	}
	// The root directory's volume-label entry is what blkid and Windows report.
	if ents, err := fs.readDir(0, true); err == nil {
		for _, e := range ents {
			if e.label {
				fs.Label = strings.TrimRight(e.Name, " ")
			}
		}
	}
	return fs, nil
}

// ClusterSize is the allocation unit in bytes.
func (fs *FS) ClusterSize() int64 { return fs.clusterSize }

func (fs *FS) fatEntryOffset(c uint32) (int64, int) {
	switch fs.Type {
	case FAT12:
		return int64(c) + int64(c)/2, 2
	case FAT16:
		return int64(c) * 2, 2
	default:
		return int64(c) * 4, 4
	}
}

// next returns the FAT entry of cluster c (from the first FAT).
func (fs *FS) next(c uint32) (uint32, error) {
	off, n := fs.fatEntryOffset(c)
	var b [4]byte
	if _, err := fs.r.ReadAt(b[:n], fs.base+fs.reserved*fs.bytesPerSector+off); err != nil {
		return 0, err
	}
	switch fs.Type {
	case FAT12:
		v := uint32(binary.LittleEndian.Uint16(b[:]))
		if c&1 == 1 {
			return v >> 4, nil
		}
		return v & 0xFFF, nil
	case FAT16:
		return uint32(binary.LittleEndian.Uint16(b[:])), nil
	default:
		return binary.LittleEndian.Uint32(b[:]) & 0x0FFFFFFF, nil
	}
}

func (fs *FS) isEOC(v uint32) bool {
	switch fs.Type {
	case FAT12:
		return v >= 0xFF8
	case FAT16:
		return v >= 0xFFF8
	default:
		return v >= 0x0FFFFFF8
	}
}

// chain returns the clusters of the chain starting at first.
func (fs *FS) chain(first uint32) ([]uint32, error) {
	if first == 0 {
		return nil, nil
	}
	var out []uint32
	for c := first; ; {
		if c < 2 || c >= fs.clusterCount+2 {
			return nil, fmt.Errorf("fat: cluster %d out of range", c)
		}
		out = append(out, c)
		if uint32(len(out)) > fs.clusterCount { //nolint:gosec // len is small
			return nil, errors.New("fat: cluster chain loops")
		}
		n, err := fs.next(c)
		if err != nil {
			return nil, err
		}
		if fs.isEOC(n) {
			return out, nil
		}
		c = n
	}
}

func (fs *FS) clusterOffset(c uint32) int64 {
	return fs.base + fs.firstData + int64(c-2)*fs.clusterSize
}

// extents maps clusters onto merged byte ranges.
func (fs *FS) extents(clusters []uint32) []Extent {
	var out []Extent
	for _, c := range clusters {
		off := fs.clusterOffset(c)
		if n := len(out); n > 0 && out[n-1].Offset+out[n-1].Length == off {
			out[n-1].Length += fs.clusterSize
			continue
		}
		out = append(out, Extent{Offset: off, Length: fs.clusterSize})
	}
	return out
}

type dirent struct {
	Entry
	label bool
}

// readDir lists the directory starting at cluster (0 = root).
func (fs *FS) readDir(cluster uint32, root bool) ([]dirent, error) {
	var regions []Extent
	if root && fs.Type != FAT32 {
		regions = []Extent{{
			Offset: fs.base + (fs.reserved+fs.numFATs*fs.fatSectors)*fs.bytesPerSector,
			Length: fs.rootEntries * dirEntrySize,
		}}
	} else {
		if root {
			cluster = fs.rootCluster
		}
		cl, err := fs.chain(cluster)
		if err != nil {
			return nil, err
		}
		regions = fs.extents(cl)
	}
	var out []dirent
	var lfn []uint16
	var lfnSum byte
	lfnValid := false
	for _, reg := range regions {
		buf := make([]byte, reg.Length)
		if _, err := fs.r.ReadAt(buf, reg.Offset); err != nil {
			return nil, err
		}
		for i := 0; i+dirEntrySize <= len(buf); i += dirEntrySize {
			e := buf[i : i+dirEntrySize]
			switch {
			case e[0] == 0:
				return out, nil
			case e[0] == deletedEntry:
				lfnValid = false
				continue
			case e[11]&0x3F == attrLFN:
				seq := int(e[0] & 0x1F)
				if e[0]&lfnLast != 0 {
					lfn = make([]uint16, seq*lfnCharsPer)
					lfnSum, lfnValid = e[13], seq > 0
				}
				if !lfnValid || e[13] != lfnSum || seq == 0 || seq*lfnCharsPer > len(lfn) {
					lfnValid = false
					continue
				}
				base := (seq - 1) * lfnCharsPer
				for k := 0; k < lfnCharsPer; k++ {
					var o int
					switch {
					case k < 5:
						o = 1 + 2*k
					case k < 11:
						o = 14 + 2*(k-5)
					default:
						o = 28 + 2*(k-11)
					}
					lfn[base+k] = binary.LittleEndian.Uint16(e[o:])
				}
				continue
			}
			var sn [11]byte
			copy(sn[:], e[:11])
			d := dirent{}
			d.entryOff = reg.Offset + int64(i)
			d.Dir = e[11]&attrDirectory != 0
			d.label = e[11]&attrVolumeID != 0 && !d.Dir
			d.Size = binary.LittleEndian.Uint32(e[28:])
			d.FirstCluster = uint32(binary.LittleEndian.Uint16(e[20:]))<<16 | uint32(binary.LittleEndian.Uint16(e[26:]))
			if fs.Type != FAT32 {
				d.FirstCluster &= 0xFFFF
			}
			if lfnValid && shortNameChecksum(sn) == lfnSum {
				end := len(lfn)
				for k, c := range lfn {
					if c == 0 {
						end = k
						break
					}
				}
				d.Name = string(utf16.Decode(lfn[:end]))
			} else {
				d.Name = shortToName(sn, e[12])
				if d.label {
					d.Name = string(sn[:])
				}
			}
			lfnValid = false
			if sn[0] == '.' && (d.Name == "." || d.Name == "..") {
				continue
			}
			out = append(out, d)
		}
	}
	return out, nil
}

func shortToName(sn [11]byte, nt byte) string {
	if sn[0] == 0x05 {
		sn[0] = deletedEntry
	}
	base := strings.TrimRight(string(sn[:8]), " ")
	ext := strings.TrimRight(string(sn[8:]), " ")
	if nt&ntLowerBase != 0 {
		base = strings.ToLower(base)
	}
	if nt&ntLowerExt != 0 {
		ext = strings.ToLower(ext)
	}
	if ext == "" {
		return base
	}
	return base + "." + ext
}

// Lookup finds a path (slash-separated, case-insensitive as FAT is).
func (fs *FS) Lookup(p string) (Entry, error) {
	p = strings.Trim(path.Clean("/"+p), "/")
	cur := Entry{Dir: true}
	root := true
	if p == "" {
		return cur, nil
	}
	for _, part := range strings.Split(p, "/") {
		if !cur.Dir {
			return Entry{}, fmt.Errorf("%w: %s", ErrNotFound, p)
		}
		ents, err := fs.readDir(cur.FirstCluster, root)
		if err != nil {
			return Entry{}, err
		}
		found := false
		for _, e := range ents {
			if !e.label && strings.EqualFold(e.Name, part) {
				cur, found = e.Entry, true
				break
			}
		}
		if !found {
			return Entry{}, fmt.Errorf("%w: %s", ErrNotFound, p)
		}
		root = false
	}
	return cur, nil
}

// ReadDir lists the names in a directory.
func (fs *FS) ReadDir(p string) ([]Entry, error) {
	e, err := fs.Lookup(p)
	if err != nil {
		return nil, err
	}
	if !e.Dir {
		return nil, fmt.Errorf("fat: %s is not a directory", p)
	}
	ents, err := fs.readDir(e.FirstCluster, e.FirstCluster == 0)
	if err != nil {
		return nil, err
	}
	out := make([]Entry, 0, len(ents))
	for _, d := range ents {
		if !d.label {
			out = append(out, d.Entry)
		}
	}
	return out, nil
}

// Extents returns where a file's bytes (its first Size bytes) lie on the disk.
func (fs *FS) Extents(e Entry) ([]Extent, error) {
	cl, err := fs.chain(e.FirstCluster)
	if err != nil {
		return nil, err
	}
	if int64(len(cl))*fs.clusterSize < int64(e.Size) {
		return nil, fmt.Errorf("fat: %s: %d bytes in %d clusters", e.Name, e.Size, len(cl))
	}
	exts := fs.extents(cl)
	// Trim to the file size.
	remain := int64(e.Size)
	for i := range exts {
		if exts[i].Length >= remain {
			exts[i].Length = remain
			return exts[:i+1], nil
		}
		remain -= exts[i].Length
	}
	return exts, nil
}

// ReadFile returns a file's content.
func (fs *FS) ReadFile(p string) ([]byte, error) {
	e, err := fs.Lookup(p)
	if err != nil {
		return nil, err
	}
	if e.Dir {
		return nil, fmt.Errorf("fat: %s is a directory", p)
	}
	if e.Size == 0 {
		return []byte{}, nil
	}
	exts, err := fs.Extents(e)
	if err != nil {
		return nil, err
	}
	out := make([]byte, 0, e.Size)
	for _, x := range exts {
		b := make([]byte, x.Length)
		if _, err := fs.r.ReadAt(b, x.Offset); err != nil {
			return nil, err
		}
		out = append(out, b...)
	}
	return out, nil
}
