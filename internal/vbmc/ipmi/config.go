package ipmi

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
)

// configFiles are the files one ipmi_sim reads, all in one private directory.
type configFiles struct {
	dir, lanConf, emu, fru, hook string
}

// writeConfigFiles writes everything but lan.conf, which depends on the port.
func writeConfigFiles(dir, bash string, ctl *control, cfg Config) (configFiles, error) {
	f := configFiles{
		dir:     dir,
		lanConf: filepath.Join(dir, "lan.conf"),
		emu:     filepath.Join(dir, "bmc.emu"),
		fru:     filepath.Join(dir, "fru0.bin"),
		hook:    filepath.Join(dir, "chassis-control"),
	}
	fru := encodeFRU(cfg.FRU)
	// The FRU is given as a file rather than inline bytes: ipmi_sim's command
	// reader cuts long lines (about 600 characters) without a word.
	emu := fmt.Sprintf(`# Written by Anvil's vbmc/ipmi package.
mc_setbmc 0x20
# An MC at 0x20 answering Get Device ID as "MontaVista ipmi_sim, IPMI 2.0" with
# sensor, SDR, SEL, FRU, event receiver and chassis support (0x9f).
mc_add 0x20 0 no-device-sdrs 0x23 9 8 0x9f 0x1291 0xf02 persist_sdr
sel_enable 0x20 1000 0x0a
mc_add_fru_data 0x20 0 %d file 0 "%s"
mc_enable 0x20
# Print each decoded request on the console: the control endpoint reads boot
# flags and chassis control codes from it (see trace.go).
debug msg
`, len(fru), f.fru)
	hook := fmt.Sprintf(`#!%s
# ipmi_sim's chassis_control hook, written by Anvil's vbmc/ipmi package. It
# forwards "<mc> get|set ..." to the Go process that holds the emulated
# machine. The marker on stderr (which is ipmi_sim's console) tells that
# process where this request stands in ipmi_sim's message trace.
sync="$$.$RANDOM"
printf 'anvil-hook-sync %%s\n' "$sync" >&2
exec 3<>/dev/tcp/127.0.0.1/%d || { echo "anvil vbmc: control endpoint unreachable"; exit 1; }
printf '%%s\n' '%s' "$sync" "$#" "$@" >&3
IFS= read -r -t 10 rc <&3 || { echo "anvil vbmc: control endpoint did not answer"; exit 1; }
while IFS= read -r -t 10 line <&3; do printf '%%s\n' "$line"; done
exit "$rc"
`, bash, ctl.port(), ctl.token)

	for _, w := range []struct {
		path string
		data []byte
		mode os.FileMode
	}{
		{f.fru, fru, 0o600},
		{f.emu, []byte(emu), 0o600},
		{f.hook, []byte(hook), 0o700},
	} {
		if err := os.WriteFile(w.path, w.data, w.mode); err != nil {
			return f, fmt.Errorf("ipmi: %w", err)
		}
	}
	return f, nil
}

// writeLANConf writes ipmi_sim's network, user and hook configuration.
func writeLANConf(f configFiles, cfg Config, port int) error {
	// No "none" authentication: with it IPMI 1.5 clients get in without a
	// password, which no test of a real BMC should rely on.
	conf := fmt.Sprintf(`# Written by Anvil's vbmc/ipmi package.
name "anvil"
set_working_mc 0x20
  startlan 1
    addr %s %d
    priv_limit admin
    allowed_auths_callback md2 md5 straight
    allowed_auths_user md2 md5 straight
    allowed_auths_operator md2 md5 straight
    allowed_auths_admin md2 md5 straight
    guid %s
  endlan
  chassis_control "%s 0x20"
  user 2 true "%s" "%s" admin 10 md2 md5 straight
`, cfg.Addr, port, randomHex(16), f.hook, cfg.Username, cfg.Password)
	if err := os.WriteFile(f.lanConf, []byte(conf), 0o600); err != nil {
		return fmt.Errorf("ipmi: %w", err)
	}
	return nil
}

// FRU is the BMC's field-replaceable-unit inventory (FRU device 0). IPMI has
// no other inventory, so this is what clients read as manufacturer, model
// and serial number. Empty Manufacturer and Product get defaults ("Anvil",
// "Emulated Server"); other empty fields stay empty. Fields are cut to IPMI's
// 63 bytes; non-ASCII characters become '?'.
type FRU struct {
	Manufacturer string
	Product      string
	SerialNumber string
	PartNumber   string
	Version      string
	AssetTag     string
}

// encodeFRU builds FRU data per the IPMI Platform Management FRU Information
// Storage Definition v1.0: a common header and chassis, board and product
// info areas.
func encodeFRU(f FRU) []byte {
	if f.Manufacturer == "" {
		f.Manufacturer = "Anvil"
	}
	if f.Product == "" {
		f.Product = "Emulated Server"
	}
	const rackMountChassis = 0x17
	chassis := fruArea([]byte{rackMountChassis}, f.PartNumber, f.SerialNumber)
	// Language English (0x19), manufacturing date unspecified (0).
	board := fruArea([]byte{0x19, 0, 0, 0}, f.Manufacturer, f.Product, f.SerialNumber, f.PartNumber, "")
	product := fruArea([]byte{0x19}, f.Manufacturer, f.Product, f.PartNumber, f.Version, f.SerialNumber, f.AssetTag, "")

	// Offsets count 8-byte units from the start; the header is one unit.
	// With fields of at most 63 bytes every offset and length fits a byte.
	chassisOff := 1
	boardOff := chassisOff + len(chassis)/8
	productOff := boardOff + len(board)/8
	header := []byte{1, 0, byte(chassisOff), byte(boardOff), byte(productOff), 0, 0, 0} //nolint:gosec // below 256, see above
	header[7] = zeroChecksum(header[:7])

	out := append(header, chassis...)
	out = append(out, board...)
	return append(out, product...)
}

// fruArea encodes one info area: version, length, the fixed bytes, the text
// fields, the end marker, padding to 8 bytes and a checksum.
func fruArea(fixed []byte, fields ...string) []byte {
	a := append([]byte{1, 0}, fixed...)
	for _, s := range fields {
		a = append(a, fruField(s)...)
	}
	a = append(a, 0xc1) // end of fields
	for (len(a)+1)%8 != 0 {
		a = append(a, 0)
	}
	a[1] = byte((len(a) + 1) / 8) //nolint:gosec // at most 7 fields of 64 bytes: below 64 units
	return append(a, zeroChecksum(a))
}

// fruField encodes s as an 8-bit ASCII type/length field.
func fruField(s string) []byte {
	b := []byte(strings.Map(func(r rune) rune {
		if r < 0x20 || r > 0x7e {
			return '?'
		}
		return r
	}, s))
	if len(b) > 63 {
		b = b[:63]
	}
	// A one-byte field would encode as 0xc1, the end-of-fields marker; the
	// specification forbids it. Pad with a space.
	if len(b) == 1 {
		b = append(b, ' ')
	}
	return append([]byte{0xc0 | byte(len(b))}, b...) //nolint:gosec // at most 63
}

// zeroChecksum returns the byte that makes b sum to zero modulo 256.
func zeroChecksum(b []byte) byte {
	var sum byte
	for _, c := range b {
		sum += c
	}
	return -sum
}
