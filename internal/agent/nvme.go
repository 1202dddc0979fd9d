package agent

import (
	"context"
	"encoding/binary"
	"fmt"
	"os"
	"strings"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/anvil-metal/cluster-api-provider-anvil/internal/disk"
)

// ioctlPtr issues an ioctl whose argument points at v.
func ioctlPtr[T any](f *os.File, req uint, v *T) error {
	_, _, errno := unix.Syscall(unix.SYS_IOCTL, f.Fd(), uintptr(req), uintptr(unsafe.Pointer(v))) //nolint:gosec // the ioctl ABI takes a pointer; v outlives the call
	if errno != 0 {
		return errno
	}
	return nil
}

// nvmeAdminCmd is struct nvme_admin_cmd (= nvme_passthru_cmd) from linux/nvme_ioctl.h.
type nvmeAdminCmd struct {
	Opcode      uint8
	Flags       uint8
	Rsvd1       uint16
	NSID        uint32
	Cdw2, Cdw3  uint32
	Metadata    uint64
	Addr        uint64
	MetadataLen uint32
	DataLen     uint32
	Cdw10       uint32
	Cdw11       uint32
	Cdw12       uint32
	Cdw13       uint32
	Cdw14       uint32
	Cdw15       uint32
	TimeoutMs   uint32
	Result      uint32
}

// ioctl numbers: _IO('N', 0x40) and _IOWR('N', 0x41, struct nvme_admin_cmd).
const (
	nvmeIoctlID       = 0x4E40
	nvmeIoctlAdminCmd = 0xC0484E41

	nvmeOpIdentify  = 0x06
	nvmeOpFormatNVM = 0x80

	// Format NVM secure erase settings (CDW10 bits 11:9).
	nvmeSESUserData = 1
	nvmeSESCrypto   = 2
)

// nvmeEraser erases NVMe namespaces with Format NVM and a secure erase setting: a
// cryptographic erase when the controller supports it (instant: the media key is
// replaced), else a user-data erase. Sanitize is not used: it acts on every namespace of
// the controller at once and runs in the background.
type nvmeEraser struct {
	// ioctl is replaced in tests.
	ioctl func(f *os.File, req uint, cmd *nvmeAdminCmd) error
}

func (e nvmeEraser) admin(f *os.File, cmd *nvmeAdminCmd) error {
	if e.ioctl != nil {
		return e.ioctl(f, nvmeIoctlAdminCmd, cmd)
	}
	return ioctlPtr(f, nvmeIoctlAdminCmd, cmd)
}

// Erase implements SecureEraser.
func (e nvmeEraser) Erase(ctx context.Context, d *disk.Disk) (string, error) {
	if !d.Block || !strings.HasPrefix(baseName(d.Path), "nvme") {
		return "", fmt.Errorf("%w: %s is not an NVMe namespace", ErrSecureEraseUnsupported, d.Path)
	}
	if err := ctx.Err(); err != nil {
		return "", err
	}
	f := d.File()
	nsid, err := unix.IoctlRetInt(int(f.Fd()), nvmeIoctlID)
	if err != nil || nsid <= 0 {
		return "", fmt.Errorf("%w: NVME_IOCTL_ID: %w", ErrSecureEraseUnsupported, err)
	}
	idCtrl := make([]byte, 4096)
	if err := e.admin(f, identifyCmd(idCtrl, 0, 1)); err != nil {
		return "", fmt.Errorf("%w: identify controller: %w", ErrSecureEraseUnsupported, err)
	}
	oacs := binary.LittleEndian.Uint16(idCtrl[256:])
	if oacs&0x2 == 0 {
		return "", fmt.Errorf("%w: controller does not support Format NVM", ErrSecureEraseUnsupported)
	}
	fna := idCtrl[524]
	idNS := make([]byte, 4096)
	if err := e.admin(f, identifyCmd(idNS, uint32(nsid), 0)); err != nil { //nolint:gosec // positive
		return "", fmt.Errorf("%w: identify namespace: %w", ErrSecureEraseUnsupported, err)
	}
	cmd, method := formatCmd(uint32(nsid), idNS[26], fna) //nolint:gosec // positive
	if err := e.admin(f, cmd); err != nil {
		return "", fmt.Errorf("NVMe Format NVM (%s): %w", method, err)
	}
	return method, nil
}

func identifyCmd(buf []byte, nsid, cns uint32) *nvmeAdminCmd {
	return &nvmeAdminCmd{Opcode: nvmeOpIdentify, NSID: nsid, Addr: uint64(uintptr(unsafe.Pointer(&buf[0]))), //nolint:gosec // the NVMe ioctl ABI takes the buffer address; buf outlives the call
		DataLen: uint32(len(buf)), Cdw10: cns} //nolint:gosec // 4096
}

// formatCmd builds Format NVM for the namespace, keeping its current LBA format (FLBAS bits
// 3:0, with bits 6:5 as the upper bits of the index in NVMe 2.0) and choosing a crypto erase
// when FNA bit 2 says the controller has one.
func formatCmd(nsid uint32, flbas, fna uint8) (*nvmeAdminCmd, string) {
	lbaf := uint32(flbas&0x0F) | uint32(flbas>>5&0x3)<<12
	ses, method := uint32(nvmeSESUserData), "nvme-format-user-data-erase"
	if fna&0x4 != 0 {
		ses, method = nvmeSESCrypto, "nvme-format-crypto-erase"
	}
	return &nvmeAdminCmd{Opcode: nvmeOpFormatNVM, NSID: nsid, Cdw10: lbaf | ses<<9,
		TimeoutMs: 4 * 3600 * 1000}, method // user-data erase of a large drive takes hours
}

func baseName(p string) string {
	if i := strings.LastIndexByte(p, '/'); i >= 0 {
		return p[i+1:]
	}
	return p
}
