package disk

import (
	"bytes"
	"crypto/rand"
	"encoding/binary"
	"errors"
	"fmt"

	infrav1 "github.com/anvil-metal/cluster-api-provider-anvil/api/v1alpha1"
	"github.com/anvil-metal/cluster-api-provider-anvil/internal/disk/fat"
)

// The A/B layout. Partition numbers are fixed because GRUB addresses the slots by number
// (gpt3, gpt4) on the disk it was loaded from.
const (
	PartBIOSBoot = 1
	PartESP      = 2
	PartRootA    = 3
	PartRootB    = 4
	PartConfig   = 5
	PartData     = 6
)

// Partition names (GPT partition labels, visible as /dev/disk/by-partlabel/<name>).
const (
	NameBIOSBoot = "BIOS-BOOT"
	NameESP      = "ESP"
	NameRootA    = "ROOT-A"
	NameRootB    = "ROOT-B"
	NameConfig   = "CONFIG"
	NameData     = "DATA"
)

// Paths on the ESP.
const (
	ESPBootDir    = "EFI/BOOT"
	ESPEFIBinary  = ESPBootDir + "/BOOTX64.EFI"
	ESPGRUBConfig = ESPBootDir + "/grub.cfg"
	ESPGRUBEnv    = ESPBootDir + "/grubenv"
)

// Defaults for LayoutOptions.
const (
	MiB               = int64(1) << 20
	GiB               = int64(1) << 30
	DefaultESPSize    = 256 * MiB
	DefaultConfigSize = 64 * MiB
	DefaultRootSize   = 8 * GiB
	DefaultMinData    = 64 * MiB
	align             = MiB
)

type layoutPart struct {
	index int
	name  string
	typ   GUID
}

// abPartitions lists the layout's partitions in order (a function, not a package variable,
// so nothing can change it).
func abPartitions() []layoutPart {
	return []layoutPart{
		{PartBIOSBoot, NameBIOSBoot, MustParseGUID(TypeBIOSBoot)},
		{PartESP, NameESP, MustParseGUID(TypeESP)},
		{PartRootA, NameRootA, MustParseGUID(TypeLinuxData)},
		{PartRootB, NameRootB, MustParseGUID(TypeLinuxData)},
		{PartConfig, NameConfig, MustParseGUID(TypeLinuxData)},
		{PartData, NameData, MustParseGUID(TypeLinuxData)},
	}
}

// BootFiles are the GRUB images the layout installs. Build them with grub-mkimage (see
// MakeBootFiles); the agent carries them, it does not build them.
type BootFiles struct {
	// EFI is the x86_64-efi GRUB image, installed as EFI/BOOT/BOOTX64.EFI (the removable-media
	// path every UEFI firmware tries, so no NVRAM entry is needed). Its prefix must be
	// /EFI/BOOT.
	EFI []byte
	// BIOSBoot is GRUB's i386-pc boot.img (512 bytes); its first 440 bytes go in sector 0.
	BIOSBoot []byte
	// BIOSCore is an i386-pc core.img with prefix (,gpt2)/EFI/BOOT, written to the BIOS boot
	// partition.
	BIOSCore []byte
}

// LayoutOptions size the layout and configure its bootloader. Only used when the layout is
// created; an existing layout is kept as it is.
type LayoutOptions struct {
	// RootSize of each slot (default 8 GiB), rounded up to whole MiB.
	RootSize int64
	// ESPSize (default 256 MiB) and ConfigSize (default 64 MiB).
	ESPSize, ConfigSize int64
	// MinDataSize is the smallest acceptable DATA partition (default 64 MiB).
	MinDataSize int64
	// Boot are the GRUB images to install.
	Boot BootFiles
	// KernelArgs, GRUBTimeoutSeconds and SerialConsole go into grub.cfg.
	KernelArgs         string
	GRUBTimeoutSeconds int
	SerialConsole      bool
	// AssumeActive repairs a damaged GRUB environment block with active=<slot>. Without
	// it a damaged block is an error: guessing could overwrite the only good slot.
	AssumeActive infrav1.Slot
}

func (o *LayoutOptions) defaults() {
	if o.RootSize <= 0 {
		o.RootSize = DefaultRootSize
	}
	if o.ESPSize <= 0 {
		o.ESPSize = DefaultESPSize
	}
	if o.ConfigSize <= 0 {
		o.ConfigSize = DefaultConfigSize
	}
	if o.MinDataSize <= 0 {
		o.MinDataSize = DefaultMinData
	}
}

func roundUpMiB(n int64) int64 { return (n + align - 1) / align * align }

// PlanLayout returns the A/B partition table for a disk of size bytes: BIOS boot from the
// first usable sector to 1 MiB, then ESP, ROOT-A, ROOT-B, CONFIG (each 1 MiB aligned) and
// DATA on the rest.
func PlanLayout(size int64, sectorSize int, o LayoutOptions) (*Table, error) {
	o.defaults()
	t, err := NewTable(size, sectorSize)
	if err != nil {
		return nil, err
	}
	abParts := abPartitions()
	ss := int64(sectorSize)
	lba := func(b int64) uint64 { return uint64(b / ss) } //nolint:gosec // positive byte offsets
	sizes := []int64{roundUpMiB(o.ESPSize), roundUpMiB(o.RootSize), roundUpMiB(o.RootSize), roundUpMiB(o.ConfigSize)}
	t.Partitions = append(t.Partitions, Partition{Index: PartBIOSBoot, FirstLBA: t.FirstUsable, LastLBA: lba(align) - 1})
	off := align
	for i, s := range sizes {
		t.Partitions = append(t.Partitions, Partition{Index: abParts[i+1].index, FirstLBA: lba(off), LastLBA: lba(off+s) - 1})
		off += s
	}
	if int64(t.LastUsable+1)*ss-off < o.MinDataSize { //nolint:gosec // LBAs of a real disk fit in int64
		return nil, fmt.Errorf("disk of %d bytes is too small for the A/B layout with %d-byte slots (DATA needs at least %d bytes)",
			size, sizes[1], o.MinDataSize)
	}
	t.Partitions = append(t.Partitions, Partition{Index: PartData, FirstLBA: lba(off), LastLBA: t.LastUsable})
	for i := range t.Partitions {
		t.Partitions[i].Name = abParts[i].name
		t.Partitions[i].Type = abParts[i].typ
		t.Partitions[i].ID = NewGUID()
	}
	return t, t.Validate()
}

// AB is a disk with the A/B layout.
type AB struct {
	Disk                            *Disk
	Table                           *Table
	ESP, RootA, RootB, Config, Data Partition
	// Created is true when EnsureABLayout partitioned the disk.
	Created bool
	// Repaired lists what EnsureABLayout fixed on an existing layout.
	Repaired []string

	esp *fat.FS
}

// ErrForeignLayout means the disk carries Anvil partitions (DATA in particular) that do not
// form a valid A/B layout: Anvil will not re-partition it and lose DATA by itself.
var ErrForeignLayout = errors.New("disk has Anvil partitions that do not form the A/B layout; wipe it to start over")

// ErrBootEnvDamaged means the GRUB environment block on the ESP is missing or unreadable.
var ErrBootEnvDamaged = errors.New("GRUB environment block on the ESP is damaged")

// EnsureABLayout returns the disk's A/B layout, creating it when the disk has none. An
// existing layout is verified and kept: DATA is never written, the slots and CONFIG are
// left alone, and only metadata damage with one good copy is repaired (a damaged primary or
// misplaced backup GPT). A disk with another partition table (or none) is re-partitioned;
// a disk with a broken Anvil layout is refused (ErrForeignLayout).
func EnsureABLayout(d *Disk, o LayoutOptions) (*AB, error) {
	o.defaults()
	if d.SectorSize != 512 {
		return nil, fmt.Errorf("%s: %d-byte sectors are not supported yet (the FAT code writes 512-byte sectors)", d.Path, d.SectorSize)
	}
	t, info, err := ReadGPT(d, d.Size, d.SectorSize)
	if err == nil {
		ab, verr := verifyAB(d, t)
		if verr == nil {
			if !info.PrimaryOK || !info.BackupOK || !info.BackupAtEnd {
				if err := repairTable(d, t, info, ab); err != nil {
					return nil, err
				}
			}
			if err := ab.openESP(o.AssumeActive); err != nil {
				return nil, err
			}
			return ab, nil
		}
		for _, p := range t.Partitions {
			switch p.Name {
			case NameData, NameRootA, NameRootB:
				return nil, fmt.Errorf("%s: %w: %w", d.Path, ErrForeignLayout, verr)
			}
		}
	}
	return createAB(d, o)
}

// OpenAB opens an existing A/B layout without changing anything.
func OpenAB(d *Disk) (*AB, error) {
	t, _, err := ReadGPT(d, d.Size, d.SectorSize)
	if err != nil {
		return nil, err
	}
	ab, err := verifyAB(d, t)
	if err != nil {
		return nil, err
	}
	if err := ab.openESP(""); err != nil {
		return nil, err
	}
	return ab, nil
}

func verifyAB(d *Disk, t *Table) (*AB, error) {
	ab := &AB{Disk: d, Table: t}
	byIndex := map[int]Partition{}
	for _, p := range t.Partitions {
		byIndex[p.Index] = p
	}
	for _, want := range abPartitions() {
		p, ok := byIndex[want.index]
		if !ok {
			return nil, fmt.Errorf("partition %d (%s) missing", want.index, want.name)
		}
		if p.Name != want.name || p.Type != want.typ {
			return nil, fmt.Errorf("partition %d is %q type %v, want %q type %v", want.index, p.Name, p.Type, want.name, want.typ)
		}
	}
	ab.ESP, ab.RootA, ab.RootB = byIndex[PartESP], byIndex[PartRootA], byIndex[PartRootB]
	ab.Config, ab.Data = byIndex[PartConfig], byIndex[PartData]
	if ab.RootA.Sectors() != ab.RootB.Sectors() {
		return nil, fmt.Errorf("slots differ in size (%d and %d sectors)", ab.RootA.Sectors(), ab.RootB.Sectors())
	}
	return ab, nil
}

func repairTable(d *Disk, t *Table, info ReadInfo, ab *AB) error {
	lastLBA := uint64(d.Size/int64(d.SectorSize)) - 1 //nolint:gosec // positive
	if lastLBA < t.LastLBA {
		return fmt.Errorf("%s: the disk is smaller than its partition table says", d.Path)
	}
	es := entrySectors(d.SectorSize)
	t.LastLBA = lastLBA
	if nl := lastLBA - 1 - es; nl > t.LastUsable {
		t.LastUsable = nl // DATA keeps its size; the space after it becomes usable
	}
	mbr := make([]byte, 440)
	if _, err := d.ReadAt(mbr, 0); err != nil {
		return err
	}
	if err := t.Write(d, mbr); err != nil {
		return err
	}
	what := "backup GPT moved to the end of the disk"
	switch {
	case !info.PrimaryOK:
		what = "primary GPT restored from the backup"
	case !info.BackupOK:
		what = "backup GPT rewritten"
	}
	ab.Repaired = append(ab.Repaired, what)
	return d.Sync()
}

func (a *AB) openESP(assume infrav1.Slot) error {
	off, _ := a.Range(a.ESP)
	fs, err := fat.Open(a.Disk, off)
	if err != nil {
		return fmt.Errorf("%s: ESP: %w", a.Disk.Path, err)
	}
	a.esp = fs
	if _, err := a.ReadEnv(); err != nil {
		if assume != infrav1.SlotA && assume != infrav1.SlotB {
			return fmt.Errorf("%s: %w: %w", a.Disk.Path, ErrBootEnvDamaged, err)
		}
		env := NewEnv()
		env.Set("active", string(assume))
		if werr := a.WriteEnv(env); werr != nil {
			return fmt.Errorf("%s: repairing the GRUB environment block: %w (it was: %w)", a.Disk.Path, werr, err)
		}
		a.Repaired = append(a.Repaired, fmt.Sprintf("GRUB environment block rewritten with active=%s (%v)", assume, err))
	}
	return nil
}

// Range returns a partition's byte offset and length.
func (a *AB) Range(p Partition) (off, size int64) {
	ss := int64(a.Table.SectorSize)
	return int64(p.FirstLBA) * ss, int64(p.Sectors()) * ss //nolint:gosec // LBAs of a real disk fit in int64
}

// Slot returns the partition of a slot.
func (a *AB) Slot(s infrav1.Slot) (Partition, error) {
	switch s {
	case infrav1.SlotA:
		return a.RootA, nil
	case infrav1.SlotB:
		return a.RootB, nil
	}
	return Partition{}, fmt.Errorf("invalid slot %q", s)
}

// ESPFS returns the ESP's filesystem.
func (a *AB) ESPFS() *fat.FS { return a.esp }

// ReadEnv reads the GRUB environment block from the ESP.
func (a *AB) ReadEnv() (*Env, error) {
	b, err := a.esp.ReadFile(ESPGRUBEnv)
	if err != nil {
		return nil, err
	}
	return ParseEnvBlock(b)
}

// WriteEnv rewrites the GRUB environment block in place (same clusters, exactly 1024
// bytes, never truncated) and flushes it to the disk.
func (a *AB) WriteEnv(e *Env) error {
	b, err := e.MarshalBlock()
	if err != nil {
		return err
	}
	if err := a.esp.WriteFile(a.Disk, ESPGRUBEnv, b); err != nil {
		return err
	}
	return a.Disk.Sync()
}

// BootState is the A/B state kept in the GRUB environment block.
type BootState struct {
	Active, Next, Failed infrav1.Slot
	Tries                int
}

func slotOf(s string) infrav1.Slot {
	switch s {
	case string(infrav1.SlotA), string(infrav1.SlotB):
		return infrav1.Slot(s)
	}
	return ""
}

// BootState reads the state.
func (a *AB) BootState() (BootState, error) {
	e, err := a.ReadEnv()
	if err != nil {
		return BootState{}, err
	}
	st := BootState{Active: slotOf(e.Get("active")), Next: slotOf(e.Get("next")), Failed: slotOf(e.Get("failed"))}
	_, _ = fmt.Sscanf(e.Get("tries"), "%d", &st.Tries)
	return st, nil
}

// Other returns the other slot.
func Other(s infrav1.Slot) infrav1.Slot {
	if s == infrav1.SlotA {
		return infrav1.SlotB
	}
	return infrav1.SlotA
}

// InstallTarget is the slot a new image goes into: never the active one. With no active
// slot (first installs), the slot that is not pending, else A.
func (s BootState) InstallTarget() infrav1.Slot {
	if s.Active != "" {
		return Other(s.Active)
	}
	if s.Next != "" {
		return Other(s.Next)
	}
	return infrav1.SlotA
}

// Arm makes GRUB try slot on the next boots, at most tries times, before falling back to
// the active slot.
func (a *AB) Arm(slot infrav1.Slot, tries int) error {
	if _, err := a.Slot(slot); err != nil {
		return err
	}
	if tries < 1 || tries > 9 {
		return fmt.Errorf("tries %d out of range 1-9", tries)
	}
	e, err := a.ReadEnv()
	if err != nil {
		return err
	}
	e.Set("next", string(slot))
	e.Set("tries", fmt.Sprint(tries))
	if e.Get("failed") == string(slot) {
		e.Set("failed", "")
	}
	return a.WriteEnv(e)
}

// Disarm stops GRUB from trying slot (before the slot is overwritten).
func (a *AB) Disarm(slot infrav1.Slot) error {
	e, err := a.ReadEnv()
	if err != nil {
		return err
	}
	if e.Get("next") != string(slot) {
		return nil
	}
	e.Set("next", "")
	e.Set("tries", "0")
	return a.WriteEnv(e)
}

// MarkGood records slot as the known-good one, as the OS's health gate does.
func (a *AB) MarkGood(slot infrav1.Slot) error {
	e, err := a.ReadEnv()
	if err != nil {
		return err
	}
	e.Set("active", string(slot))
	if e.Get("next") == string(slot) {
		e.Set("next", "")
		e.Set("tries", "0")
	}
	return a.WriteEnv(e)
}

// WriteConfigDrive formats CONFIG afresh with the drive's files and flushes it.
func (a *AB) WriteConfigDrive(c *ConfigDrive) error {
	files, err := c.Render(a.ESP.ID, a.Config.ID)
	if err != nil {
		return err
	}
	off, size := a.Range(a.Config)
	var vid [4]byte
	_, _ = rand.Read(vid[:])
	err = fat.Build(a.Disk, off, size, fat.Options{
		Type: fat.FAT16, Label: ConfigDriveLabel, VolumeID: binary.LittleEndian.Uint32(vid[:]),
		HiddenSectors: uint32(a.Config.FirstLBA), //nolint:gosec // CONFIG lies in the first 2 TiB in practice; firmware only
	}, files)
	if err != nil {
		return fmt.Errorf("config drive: %w", err)
	}
	return a.Disk.Sync()
}

// ReadConfigDrive reads a file from CONFIG.
func (a *AB) ReadConfigDrive(name string) ([]byte, error) {
	off, _ := a.Range(a.Config)
	fs, err := fat.Open(a.Disk, off)
	if err != nil {
		return nil, err
	}
	return fs.ReadFile(name)
}

func createAB(d *Disk, o LayoutOptions) (*AB, error) {
	t, err := PlanLayout(d.Size, d.SectorSize, o)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", d.Path, err)
	}
	ab, err := verifyAB(d, t)
	if err != nil {
		return nil, err
	}
	ab.Created = true
	// Old partition tables and signatures at both ends of the disk and of every new
	// partition go first, so no stale filesystem (or RAID member) shows up in a new slot
	// or in DATA, and an interrupted creation leaves no table at all.
	if err := d.ZeroRange(0, align); err != nil {
		return nil, err
	}
	if err := d.ZeroRange(d.Size-align, align); err != nil {
		return nil, err
	}
	for _, p := range t.Partitions[1:] {
		off, size := ab.Range(p)
		z := min(size, align)
		if err := d.ZeroRange(off, z); err != nil {
			return nil, err
		}
		if err := d.ZeroRange(off+size-z, z); err != nil {
			return nil, err
		}
	}
	cfg, err := RenderGRUBConfig(GRUBConfig{
		PartitionA: PartRootA, PartitionB: PartRootB, PartUUIDA: ab.RootA.ID, PartUUIDB: ab.RootB.ID,
		KernelArgs: o.KernelArgs, TimeoutSeconds: o.GRUBTimeoutSeconds, SerialConsole: o.SerialConsole,
	})
	if err != nil {
		return nil, err
	}
	env, err := NewEnv().MarshalBlock()
	if err != nil {
		return nil, err
	}
	files := []fat.File{{Path: ESPGRUBConfig, Data: cfg}, {Path: ESPGRUBEnv, Data: env}}
	if len(o.Boot.EFI) > 0 {
		files = append(files, fat.File{Path: ESPEFIBinary, Data: o.Boot.EFI})
	}
	espOff, espSize := ab.Range(ab.ESP)
	var vid [4]byte
	_, _ = rand.Read(vid[:])
	if err := fat.Build(d, espOff, espSize, fat.Options{
		Type: fat.FAT32, Label: "ESP", VolumeID: binary.LittleEndian.Uint32(vid[:]),
		HiddenSectors: uint32(ab.ESP.FirstLBA), //nolint:gosec // the ESP starts at 1 MiB
	}, files); err != nil {
		return nil, fmt.Errorf("ESP: %w", err)
	}
	// An empty config drive until the first install writes one.
	cfgOff, cfgSize := ab.Range(ab.Config)
	if err := fat.Build(d, cfgOff, cfgSize, fat.Options{Type: fat.FAT16, Label: ConfigDriveLabel}, nil); err != nil {
		return nil, fmt.Errorf("CONFIG: %w", err)
	}
	var mbrCode []byte
	if len(o.Boot.BIOSBoot) > 0 || len(o.Boot.BIOSCore) > 0 {
		bios, _ := t.ByName(NameBIOSBoot)
		if mbrCode, err = installBIOS(d, bios, o.Boot.BIOSBoot, o.Boot.BIOSCore); err != nil {
			return nil, err
		}
	}
	if err := t.Write(d, mbrCode); err != nil {
		return nil, err
	}
	if err := d.Sync(); err != nil {
		return nil, err
	}
	if err := ab.openESP(""); err != nil {
		return nil, err
	}
	return ab, nil
}

// GRUB i386-pc offsets (grub-core/boot/i386/pc/boot.S, diskboot.S; util/setup.c).
const (
	grubBootKernelSector = 0x5C // boot.img: LBA of core.img's first sector
	grubBootDriveCheck   = 0x66 // boot.img: jump that grub-bios-setup turns into NOPs for hard disks
	grubCoreBlocklist    = 512 - 12
)

// installBIOS writes core.img into the BIOS boot partition, patched as grub-bios-setup
// would (its first block list points at the sectors after its own), and returns the MBR
// boot code pointing at it.
func installBIOS(d *Disk, bios Partition, bootImg, coreImg []byte) ([]byte, error) {
	if len(bootImg) != 512 || bootImg[510] != 0x55 || bootImg[511] != 0xAA {
		return nil, errors.New("BIOS: boot.img must be GRUB's 512-byte i386-pc boot.img")
	}
	sectors := (len(coreImg) + 511) / 512
	if sectors < 2 || uint64(sectors) > bios.Sectors() {
		return nil, fmt.Errorf("BIOS: core.img of %d bytes does not fit the %d-sector BIOS boot partition", len(coreImg), bios.Sectors())
	}
	core := make([]byte, sectors*512)
	copy(core, coreImg)
	if got := binary.LittleEndian.Uint16(core[grubCoreBlocklist+8:]); int(got) != sectors-1 {
		return nil, fmt.Errorf("BIOS: core.img block list says %d sectors, the image has %d: not an i386-pc core.img from grub-mkimage", got, sectors-1)
	}
	binary.LittleEndian.PutUint64(core[grubCoreBlocklist:], bios.FirstLBA+1)
	if _, err := d.WriteAt(core, int64(bios.FirstLBA)*512); err != nil { //nolint:gosec // small LBA
		return nil, err
	}
	code := bytes.Clone(bootImg[:440])
	binary.LittleEndian.PutUint64(code[grubBootKernelSector:], bios.FirstLBA)
	code[grubBootDriveCheck], code[grubBootDriveCheck+1] = 0x90, 0x90
	return code, nil
}
