package fat

import (
	"encoding/binary"
	"fmt"
	"io"
)

// WriteFile replaces the content of an existing file, in place. When the file's current
// clusters can hold data they are reused as they are (the common case for the GRUB
// environment block, which never changes size); otherwise the chain is trimmed or extended
// with free clusters. Data is written first, then the FATs, then the directory entry, so an
// interrupted update leaves either the old size or the new one pointing at valid clusters.
//
// w must write to the same disk fs reads from.
func (fs *FS) WriteFile(w io.WriterAt, p string, data []byte) error {
	if fs.Type == FAT12 {
		return fmt.Errorf("fat: writing FAT12 is not supported")
	}
	e, err := fs.Lookup(p)
	if err != nil {
		return err
	}
	if e.Dir {
		return fmt.Errorf("fat: %s is a directory", p)
	}
	if int64(len(data)) > 0xFFFFFFFF {
		return fmt.Errorf("fat: %d bytes is too large for a FAT file", len(data))
	}
	cl, err := fs.chain(e.FirstCluster)
	if err != nil {
		return err
	}
	need := int((int64(len(data)) + fs.clusterSize - 1) / fs.clusterSize)
	type fatWrite struct{ c, v uint32 }
	var fatWrites []fatWrite
	eoc := uint32(0x0FFFFFFF)
	if fs.Type == FAT16 {
		eoc = 0xFFFF
	}
	switch {
	case need > len(cl):
		free, err := fs.freeClusters(need-len(cl), cl)
		if err != nil {
			return err
		}
		all := append(append([]uint32{}, cl...), free...)
		for i, c := range all {
			if i < len(cl)-1 {
				continue // existing links stay
			}
			v := eoc
			if i+1 < len(all) {
				v = all[i+1]
			}
			fatWrites = append(fatWrites, fatWrite{c, v})
		}
		cl = all
	case need < len(cl):
		for i := need; i < len(cl); i++ {
			fatWrites = append(fatWrites, fatWrite{cl[i], 0})
		}
		if need > 0 {
			fatWrites = append(fatWrites, fatWrite{cl[need-1], eoc})
		}
		cl = cl[:need]
	}
	// Data.
	rest := data
	for _, x := range fs.extents(cl) {
		n := int64(len(rest))
		if n > x.Length {
			n = x.Length
		}
		if n == 0 {
			break
		}
		if _, err := w.WriteAt(rest[:n], x.Offset); err != nil {
			return err
		}
		rest = rest[n:]
	}
	// FATs, every copy.
	for _, fw := range fatWrites {
		off, n := fs.fatEntryOffset(fw.c)
		var b [4]byte
		if n == 2 {
			binary.LittleEndian.PutUint16(b[:], uint16(fw.v)) //nolint:gosec // FAT16 values are 16-bit
		} else {
			// The top four bits of a FAT32 entry are reserved and must be preserved.
			var old [4]byte
			if _, err := fs.r.ReadAt(old[:], fs.base+fs.reserved*fs.bytesPerSector+off); err != nil {
				return err
			}
			binary.LittleEndian.PutUint32(b[:], binary.LittleEndian.Uint32(old[:])&0xF0000000|fw.v)
		}
		for i := int64(0); i < fs.numFATs; i++ {
			if _, err := w.WriteAt(b[:n], fs.base+(fs.reserved+i*fs.fatSectors)*fs.bytesPerSector+off); err != nil {
				return err
			}
		}
	}
	if len(fatWrites) > 0 && fs.Type == FAT32 {
		// The free-cluster count in FSInfo is only a hint; mark it unknown rather than
		// keep a wrong one.
		var unknown [8]byte
		binary.LittleEndian.PutUint32(unknown[:], 0xFFFFFFFF)
		binary.LittleEndian.PutUint32(unknown[4:], 0xFFFFFFFF)
		if _, err := w.WriteAt(unknown[:], fs.base+fs.bytesPerSector+488); err != nil {
			return err
		}
	}
	// Directory entry: first cluster and size.
	first := uint32(0)
	if len(cl) > 0 {
		first = cl[0]
	}
	var ent [8]byte
	binary.LittleEndian.PutUint32(ent[4:], uint32(len(data))) //nolint:gosec // checked above
	if _, err := w.WriteAt(ent[4:], e.entryOff+28); err != nil {
		return err
	}
	if first != e.FirstCluster {
		binary.LittleEndian.PutUint16(ent[0:], uint16(first>>16))
		if _, err := w.WriteAt(ent[0:2], e.entryOff+20); err != nil {
			return err
		}
		binary.LittleEndian.PutUint16(ent[0:], uint16(first))
		if _, err := w.WriteAt(ent[0:2], e.entryOff+26); err != nil {
			return err
		}
	}
	return nil
}

// freeClusters finds n free clusters, preferring ones right after the existing chain.
func (fs *FS) freeClusters(n int, existing []uint32) ([]uint32, error) {
	start := uint32(2)
	if len(existing) > 0 {
		start = existing[len(existing)-1] + 1
	}
	var out []uint32
	for pass := 0; pass < 2 && len(out) < n; pass++ {
		from, to := start, fs.clusterCount+2
		if pass == 1 {
			from, to = 2, start
		}
		for c := from; c < to && len(out) < n; c++ {
			v, err := fs.next(c)
			if err != nil {
				return nil, err
			}
			if v == 0 {
				out = append(out, c)
			}
		}
	}
	if len(out) < n {
		return nil, fmt.Errorf("fat: volume full: %d free clusters, %d needed", len(out), n)
	}
	return out, nil
}
