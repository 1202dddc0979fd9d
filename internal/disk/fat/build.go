package fat

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"path"
	"sort"
	"strings"
	"time"
)

// File is one file to place in a new volume.
type File struct {
	// Path inside the volume, slash-separated, e.g. "EFI/BOOT/grub.cfg". Parent directories
	// are created as needed.
	Path string
	// Data is the file's content.
	Data []byte
	// MinClusters reserves at least this many clusters for the file, so that a later
	// WriteFile of a larger content needs no allocation. Zero means "as many as Data needs".
	MinClusters int
}

// Options describe the volume Build creates.
type Options struct {
	// Type is FAT16 or FAT32. Zero picks FAT32 for volumes of 256 MiB and more and FAT16
	// below that.
	Type Type
	// Label is the volume label (up to 11 bytes, stored as given: cloud-init looks for
	// "cidata" or "CIDATA").
	Label string
	// VolumeID is the serial number blkid reports as the filesystem UUID.
	VolumeID uint32
	// ClusterSize in bytes; zero picks one.
	ClusterSize int
	// HiddenSectors is the partition's first sector on its disk, recorded in the boot sector
	// for firmware that checks it.
	HiddenSectors uint32
	// Time stamps every entry; zero means time.Now().
	Time time.Time
}

const sectorSize = 512

// node is a file or directory in the tree Build lays out.
type node struct {
	name     string
	dir      bool
	data     []byte
	minClus  int
	children []*node

	firstCluster uint32
	clusters     uint32
}

func (n *node) child(name string) *node {
	for _, c := range n.children {
		if strings.EqualFold(c.name, name) {
			return c
		}
	}
	return nil
}

// geometry is the computed layout of a new volume.
type geometry struct {
	typ             Type
	totalSectors    uint32
	reserved        uint32
	fatSectors      uint32
	rootDirSectors  uint32 // FAT16 only
	sectorsPerClus  uint32
	clusterCount    uint32
	firstDataSector uint32
}

func (g geometry) clusterBytes() int64 { return int64(g.sectorsPerClus) * sectorSize }

func (g geometry) clusterOffset(c uint32) int64 {
	return int64(g.firstDataSector)*sectorSize + int64(c-2)*g.clusterBytes()
}

func computeGeometry(size int64, opts Options) (geometry, error) {
	if size/sectorSize > 0xFFFFFFFF {
		return geometry{}, fmt.Errorf("fat: volume of %d bytes is too large", size)
	}
	g := geometry{totalSectors: uint32(size / sectorSize)} //nolint:gosec // checked above
	g.typ = opts.Type
	if g.typ == 0 {
		g.typ = FAT16
		if size >= 256<<20 {
			g.typ = FAT32
		}
	}
	var entryBytes uint32
	switch g.typ {
	case FAT16:
		g.reserved, g.rootDirSectors, entryBytes = 4, 512*dirEntrySize/sectorSize, 2
	case FAT32:
		g.reserved, g.rootDirSectors, entryBytes = 32, 0, 4
	default:
		return geometry{}, fmt.Errorf("fat: cannot build %v", g.typ)
	}
	try := func(spc uint32) bool {
		avail := int64(g.totalSectors) - int64(g.reserved) - int64(g.rootDirSectors)
		if avail <= 0 {
			return false
		}
		// The FAT is sized for every cluster the remaining space could hold, a slight
		// over-allocation that needs no iteration.
		upper := uint32(avail)/spc + 2 //nolint:gosec // avail fits in uint32: totalSectors does
		fatSec := (upper*entryBytes + sectorSize - 1) / sectorSize
		data := avail - 2*int64(fatSec)
		if data <= 0 {
			return false
		}
		clusters := uint32(data) / spc //nolint:gosec // data < totalSectors
		g.sectorsPerClus, g.fatSectors, g.clusterCount = spc, fatSec, clusters
		g.firstDataSector = g.reserved + 2*fatSec + g.rootDirSectors
		switch g.typ {
		case FAT16:
			return clusters > maxFAT12Clusters+16 && clusters < maxFAT16Clusters-16
		default:
			return clusters > maxFAT16Clusters+16 && clusters < 0x0FFFFFF0
		}
	}
	if opts.ClusterSize != 0 {
		if opts.ClusterSize < sectorSize || opts.ClusterSize > 64<<10 || opts.ClusterSize&(opts.ClusterSize-1) != 0 {
			return geometry{}, fmt.Errorf("fat: invalid cluster size %d", opts.ClusterSize)
		}
		if !try(uint32(opts.ClusterSize / sectorSize)) {
			return geometry{}, fmt.Errorf("fat: %d bytes with %d-byte clusters does not make a valid %v", size, opts.ClusterSize, g.typ)
		}
		return g, nil
	}
	// FAT32: the largest cluster up to 4 KiB that still leaves enough clusters to be FAT32.
	// FAT16: the smallest cluster that keeps the count below the FAT16 limit.
	order := []uint32{1, 2, 4, 8, 16, 32, 64}
	if g.typ == FAT32 {
		order = []uint32{8, 4, 2, 1}
	}
	for _, spc := range order {
		if try(spc) {
			return g, nil
		}
	}
	return geometry{}, fmt.Errorf("fat: %d bytes cannot hold a valid %v volume", size, g.typ)
}

// Build formats the size bytes at off in w as a fresh FAT volume holding files. Everything
// the volume needs is written (boot sector, FATs, directories, file data); clusters no file
// uses keep whatever they held, which FAT never reads.
func Build(w io.WriterAt, off, size int64, opts Options, files []File) error {
	g, err := computeGeometry(size, opts)
	if err != nil {
		return err
	}
	now := opts.Time
	if now.IsZero() {
		now = time.Now()
	}
	root := &node{dir: true}
	for _, f := range files {
		if err := addFile(root, f); err != nil {
			return err
		}
	}
	// Allocate clusters: directories first (in tree order), then files, each contiguously.
	next := uint32(2)
	csize := g.clusterBytes()
	var allocErr error
	var alloc func(n *node)
	alloc = func(n *node) {
		if n.dir {
			sortChildren(n)
			if n != root || g.typ == FAT32 {
				entries := int64(dirEntriesNeeded(n, n == root))
				n.clusters = uint32((entries*dirEntrySize + csize - 1) / csize) //nolint:gosec // small
				n.firstCluster = next
				next += n.clusters
			}
			for _, c := range n.children {
				alloc(c)
			}
			return
		}
		need := (int64(len(n.data)) + csize - 1) / csize
		if int64(n.minClus) > need {
			need = int64(n.minClus)
		}
		if need > int64(g.clusterCount) {
			allocErr = fmt.Errorf("fat: %q does not fit", n.name)
			return
		}
		n.clusters = uint32(need) //nolint:gosec // checked above
		if n.clusters > 0 {
			n.firstCluster = next
			next += n.clusters
		}
	}
	alloc(root)
	if allocErr != nil {
		return allocErr
	}
	if next-2 > g.clusterCount {
		return fmt.Errorf("fat: files need %d clusters, the volume has %d", next-2, g.clusterCount)
	}
	if g.typ == FAT16 && !fitsRootDir(root) {
		return errors.New("fat: too many entries in the FAT16 root directory")
	}

	bw := &offsetWriter{w: w, base: off}
	// Boot sector(s) first, so a half-built volume at least has no stale valid boot sector
	// pointing at new FATs.
	boot := bootSector(g, opts)
	if err := bw.at(0, boot); err != nil {
		return err
	}
	if g.typ == FAT32 {
		fsinfo := fsInfoSector(g.clusterCount-(next-2), next)
		for _, s := range []struct {
			sec  int64
			data []byte
		}{{1, fsinfo}, {6, boot}, {7, fsinfo}} {
			if err := bw.at(s.sec*sectorSize, s.data); err != nil {
				return err
			}
		}
		// Sectors 2 and 8 carry only the boot signature in mkfs.fat's layout; zero the rest
		// of the reserved area so stale data cannot be mistaken for anything.
		zero := make([]byte, sectorSize)
		for _, s := range []int64{2, 3, 4, 5, 8, 9, 10, 11} {
			if s < int64(g.reserved) {
				if err := bw.at(s*sectorSize, zero); err != nil {
					return err
				}
			}
		}
	}
	// FATs.
	fat := make([]byte, int64(g.fatSectors)*sectorSize)
	put := func(c, v uint32) {
		if g.typ == FAT16 {
			binary.LittleEndian.PutUint16(fat[2*c:], uint16(v)) //nolint:gosec // FAT16 values are 16-bit
		} else {
			binary.LittleEndian.PutUint32(fat[4*c:], v)
		}
	}
	eoc := uint32(0x0FFFFFFF)
	if g.typ == FAT16 {
		eoc = 0xFFFF
	}
	put(0, 0x0FFFFF00|0xF8)
	put(1, eoc)
	var chain func(n *node)
	chain = func(n *node) {
		for i := uint32(0); i < n.clusters; i++ {
			c := n.firstCluster + i
			if i+1 == n.clusters {
				put(c, eoc)
			} else {
				put(c, c+1)
			}
		}
		for _, ch := range n.children {
			chain(ch)
		}
	}
	chain(root)
	for i := int64(0); i < 2; i++ {
		if err := bw.at((int64(g.reserved)+i*int64(g.fatSectors))*sectorSize, fat); err != nil {
			return err
		}
	}
	// Directories and files.
	var write func(n, parent *node) error
	write = func(n, parent *node) error {
		if n.dir {
			data, err := dirBytes(n, parent, n == root, g, opts, now)
			if err != nil {
				return err
			}
			if n == root && g.typ == FAT16 {
				rootOff := int64(g.reserved+2*g.fatSectors) * sectorSize
				if err := bw.at(rootOff, data); err != nil {
					return err
				}
			} else if err := bw.at(g.clusterOffset(n.firstCluster), data); err != nil {
				return err
			}
			for _, c := range n.children {
				if err := write(c, n); err != nil {
					return err
				}
			}
			return nil
		}
		if n.clusters == 0 {
			return nil
		}
		buf := make([]byte, int64(n.clusters)*csize)
		copy(buf, n.data)
		return bw.at(g.clusterOffset(n.firstCluster), buf)
	}
	return write(root, nil)
}

func addFile(root *node, f File) error {
	p := strings.Trim(path.Clean("/"+f.Path), "/")
	if p == "" {
		return fmt.Errorf("fat: empty path %q", f.Path)
	}
	parts := strings.Split(p, "/")
	cur := root
	for i, part := range parts {
		if err := validLongName(part); err != nil {
			return err
		}
		c := cur.child(part)
		last := i == len(parts)-1
		switch {
		case c == nil && last:
			cur.children = append(cur.children, &node{name: part, data: f.Data, minClus: f.MinClusters})
		case c == nil:
			c = &node{name: part, dir: true}
			cur.children = append(cur.children, c)
			cur = c
		case last || !c.dir:
			return fmt.Errorf("fat: %q given twice or used as both file and directory", f.Path)
		default:
			cur = c
		}
	}
	return nil
}

func sortChildren(n *node) {
	sort.SliceStable(n.children, func(i, j int) bool {
		if n.children[i].dir != n.children[j].dir {
			return n.children[i].dir
		}
		return n.children[i].name < n.children[j].name
	})
}

// entriesFor is the number of 32-byte entries a name takes (long entries plus the short one).
func entriesFor(name string) int {
	if _, _, ok := exactShortName(name); ok {
		return 1
	}
	return (len([]rune(name))+lfnCharsPer-1)/lfnCharsPer + 1
}

func dirEntriesNeeded(n *node, isRoot bool) int {
	count := 0
	if !isRoot {
		count += 2 // "." and ".."
	} else {
		count++ // volume label
	}
	for _, c := range n.children {
		count += entriesFor(c.name)
	}
	return count + 1 // room for the end marker keeps readers that scan past the end honest
}

func fitsRootDir(root *node) bool { return dirEntriesNeeded(root, true) <= 512 }

// dirBytes renders a directory's entries, padded to its allocation.
func dirBytes(n, parent *node, isRoot bool, g geometry, opts Options, now time.Time) ([]byte, error) {
	var out []byte
	short := func(name [11]byte, attr, nt byte, cluster, size uint32) {
		var e [dirEntrySize]byte
		copy(e[:11], name[:])
		e[11] = attr
		e[12] = nt
		d, t := fatDate(now), fatTime(now)
		binary.LittleEndian.PutUint16(e[14:], t)
		binary.LittleEndian.PutUint16(e[16:], d)
		binary.LittleEndian.PutUint16(e[18:], d)
		binary.LittleEndian.PutUint16(e[20:], uint16(cluster>>16))
		binary.LittleEndian.PutUint16(e[22:], t)
		binary.LittleEndian.PutUint16(e[24:], d)
		binary.LittleEndian.PutUint16(e[26:], uint16(cluster)) //nolint:gosec // low half
		binary.LittleEndian.PutUint32(e[28:], size)
		out = append(out, e[:]...)
	}
	if isRoot {
		if opts.Label != "" {
			short(labelBytes(opts.Label), attrVolumeID, 0, 0, 0)
		}
	} else {
		dot := [11]byte{'.', ' ', ' ', ' ', ' ', ' ', ' ', ' ', ' ', ' ', ' '}
		short(dot, attrDirectory, 0, n.firstCluster, 0)
		dotdot := dot
		dotdot[1] = '.'
		// ".." of a first-level directory points at cluster 0, even on FAT32.
		pc := uint32(0)
		if parent != nil && parent.firstCluster != 0 && parent.name != "" {
			pc = parent.firstCluster
		}
		short(dotdot, attrDirectory, 0, pc, 0)
	}
	taken := map[[11]byte]bool{}
	for _, c := range n.children {
		if sn, _, ok := exactShortName(c.name); ok {
			taken[sn] = true
		}
	}
	for _, c := range n.children {
		attr := byte(attrArchive)
		size := uint32(len(c.data)) //nolint:gosec // files are small; checked by fit
		if c.dir {
			attr, size = attrDirectory, 0
		}
		sn, nt, ok := exactShortName(c.name)
		if !ok {
			var err error
			if sn, err = generatedShortName(c.name, taken); err != nil {
				return nil, err
			}
			taken[sn] = true
			lfns, err := lfnEntries(c.name, shortNameChecksum(sn))
			if err != nil {
				return nil, err
			}
			for _, e := range lfns {
				out = append(out, e[:]...)
			}
			nt = 0
		}
		short(sn, attr, nt, c.firstCluster, size)
	}
	alloc := int64(n.clusters) * g.clusterBytes()
	if isRoot && g.typ == FAT16 {
		alloc = int64(g.rootDirSectors) * sectorSize
	}
	if int64(len(out)) > alloc {
		return nil, fmt.Errorf("fat: directory %q overflows its allocation", n.name)
	}
	return append(out, make([]byte, alloc-int64(len(out)))...), nil
}

func labelBytes(label string) [11]byte {
	var b [11]byte
	for i := range b {
		b[i] = ' '
	}
	copy(b[:], label)
	return b
}

func bootSector(g geometry, opts Options) []byte {
	b := make([]byte, sectorSize)
	b[0], b[2] = 0xEB, 0x90
	copy(b[3:11], "MSWIN4.1")
	binary.LittleEndian.PutUint16(b[11:], sectorSize)
	b[13] = byte(g.sectorsPerClus)                            //nolint:gosec // at most 128
	binary.LittleEndian.PutUint16(b[14:], uint16(g.reserved)) //nolint:gosec // 4 or 32
	b[16] = 2
	b[21] = 0xF8
	binary.LittleEndian.PutUint16(b[24:], 63)
	binary.LittleEndian.PutUint16(b[26:], 255)
	binary.LittleEndian.PutUint32(b[28:], opts.HiddenSectors)
	if g.totalSectors < 0x10000 && g.typ == FAT16 {
		binary.LittleEndian.PutUint16(b[19:], uint16(g.totalSectors))
	} else {
		binary.LittleEndian.PutUint32(b[32:], g.totalSectors)
	}
	label := labelBytes(opts.Label)
	if opts.Label == "" {
		copy(label[:], "NO NAME    ")
	}
	var ext int
	if g.typ == FAT16 {
		b[1] = 0x3C
		binary.LittleEndian.PutUint16(b[17:], 512)
		binary.LittleEndian.PutUint16(b[22:], uint16(g.fatSectors)) //nolint:gosec // FAT16 FATs are < 64 Ki sectors
		ext = 36
		copy(b[ext+18:ext+26], "FAT16   ")
	} else {
		b[1] = 0x58
		binary.LittleEndian.PutUint32(b[36:], g.fatSectors)
		binary.LittleEndian.PutUint32(b[44:], 2) // root directory cluster
		binary.LittleEndian.PutUint16(b[48:], 1) // FSInfo sector
		binary.LittleEndian.PutUint16(b[50:], 6) // backup boot sector
		ext = 64
		copy(b[ext+18:ext+26], "FAT32   ")
	}
	b[ext] = 0x80
	b[ext+2] = 0x29
	binary.LittleEndian.PutUint32(b[ext+3:], opts.VolumeID)
	copy(b[ext+7:ext+18], label[:])
	// Boot code: halt forever if anyone tries to boot this volume.
	code := ext + 26
	b[1] = byte(code - 2)
	copy(b[code:], []byte{0xFA, 0xF4, 0xEB, 0xFD})
	b[510], b[511] = 0x55, 0xAA
	return b
}

func fsInfoSector(free, nextFree uint32) []byte {
	b := make([]byte, sectorSize)
	binary.LittleEndian.PutUint32(b[0:], 0x41615252)
	binary.LittleEndian.PutUint32(b[484:], 0x61417272)
	binary.LittleEndian.PutUint32(b[488:], free)
	binary.LittleEndian.PutUint32(b[492:], nextFree)
	binary.LittleEndian.PutUint32(b[508:], 0xAA550000)
	return b
}

type offsetWriter struct {
	w    io.WriterAt
	base int64
}

func (o *offsetWriter) at(off int64, b []byte) error {
	_, err := o.w.WriteAt(b, o.base+off)
	return err
}
