package disk

import (
	"bytes"
	"fmt"
	"regexp"
	"text/template"
)

// GRUBConfigTemplate is the grub.cfg Anvil puts on the ESP (EFI/BOOT/grub.cfg, read by both
// the UEFI and the BIOS GRUB images). It implements A/B boot with boot counting, entirely
// inside GRUB so a failed slot falls back with no network and no management plane:
//
//   - The environment block beside it holds active (the slot known good), next (a slot
//     being tried), tries (attempts left for next) and failed (the last slot whose attempts
//     ran out). Only those four variables are loaded, so the file cannot set anything else.
//   - When next is set and tries is above zero, tries is decremented and SAVED before any
//     kernel is loaded; the boot then goes to next. A kernel panic, a hang reset by a
//     watchdog, or an unreadable slot therefore all use up an attempt.
//   - When tries is spent, failed=next is recorded, next is cleared, and active boots.
//   - If saving fails, the pending slot is not tried at all (a counter that cannot count
//     must not boot an unproven slot) and active boots.
//   - The first menu entry boots the chosen slot; GRUB's fallback runs the second entry,
//     which boots active, when the first cannot load its kernel.
//   - GRUB has no arithmetic, hence the if-chain that decrements tries; a tries value
//     outside 1..MaxTries counts as spent.
//
// Slots are addressed by partition number on the disk GRUB itself was loaded from (this
// GRUB has no search by partition label), and the kernel gets root=PARTUUID=… of the
// chosen slot, so two slots holding the same filesystem (same UUID and label) never get
// confused. The running slot is passed as anvil.slot=A|B for the health gate.
const GRUBConfigTemplate = `# Anvil A/B boot with boot counting. Written by the Anvil agent: edits are lost.
# State: the GRUB environment block beside this file (active, next, tries, failed).
set default=0
set fallback=1
set timeout={{.TimeoutSeconds}}
{{- if .SerialConsole}}
serial --unit=0 --speed=115200
terminal_input console serial
terminal_output console serial
{{- end}}

set anvil_env="${prefix}/grubenv"
set active=""
set next=""
set tries=""
set failed=""
load_env --file "${anvil_env}" active next tries failed

if [ "${active}" != "A" ]; then
  if [ "${active}" != "B" ]; then
    set active=""
  fi
fi
set anvil_slot="${active}"
set anvil_pending=""
if [ "${next}" = "A" ]; then set anvil_pending=A; fi
if [ "${next}" = "B" ]; then set anvil_pending=B; fi

if [ -n "${anvil_pending}" ]; then
  set anvil_try=""
{{- range .Decrements}}
  {{if .First}}if{{else}}elif{{end}} [ "${tries}" = "{{.From}}" ]; then
    set tries={{.To}}
    set anvil_try=yes
{{- end}}
  else
    set anvil_try=""
  fi
  if [ -z "${anvil_try}" ]; then
    # Attempts used up: give up on the pending slot and go back to the good one.
    set failed="${anvil_pending}"
    set next=""
    set tries=0
  fi
  if save_env --file "${anvil_env}" next tries failed; then
    if [ -n "${anvil_try}" ]; then
      set anvil_slot="${anvil_pending}"
    fi
  else
    echo "Anvil: cannot save the boot counter; not trying slot ${anvil_pending}"
  fi
fi

regexp --set=1:anvil_disk '^([^,]+)' "${root}"
set anvil_part_A="${anvil_disk},gpt{{.PartitionA}}"
set anvil_part_B="${anvil_disk},gpt{{.PartitionB}}"
set anvil_uuid_A="{{.PartUUIDA}}"
set anvil_uuid_B="{{.PartUUIDB}}"
export anvil_part_A anvil_part_B anvil_uuid_A anvil_uuid_B anvil_slot active

function anvil_boot {
  if [ "$1" = "A" ]; then
    set root="${anvil_part_A}"
    set anvil_uuid="${anvil_uuid_A}"
  elif [ "$1" = "B" ]; then
    set root="${anvil_part_B}"
    set anvil_uuid="${anvil_uuid_B}"
  else
    echo "Anvil: no slot to boot"
    return 1
  fi
  echo "Anvil: booting slot $1 from (${root})"
  linux /boot/vmlinuz root=PARTUUID=${anvil_uuid} ro {{.KernelArgs}} anvil.slot=$1
  initrd /boot/initrd.img
}

if [ -z "${anvil_slot}" ]; then
  echo "Anvil: no bootable slot (active is unset; last failed: ${failed}); returning to firmware"
  sleep 5
  exit
  halt
fi

menuentry "Anvil slot ${anvil_slot}" --id anvil-slot {
  anvil_boot "${anvil_slot}"
}
menuentry "Anvil fallback slot ${active}" --id anvil-fallback {
  anvil_boot "${active}"
}
`

// GRUBConfig parameterises GRUBConfigTemplate.
type GRUBConfig struct {
	// PartitionA and PartitionB are the GPT partition numbers of the slots.
	PartitionA, PartitionB int
	// PartUUIDA and PartUUIDB are the slots' GPT partition GUIDs.
	PartUUIDA, PartUUIDB GUID
	// KernelArgs are added to every kernel command line (e.g. console=ttyS0,115200n8).
	KernelArgs string
	// TimeoutSeconds before the default entry boots.
	TimeoutSeconds int
	// SerialConsole mirrors GRUB's console on the first serial port.
	SerialConsole bool
	// MaxTries is the largest tries value the decrement chain understands (default 9).
	MaxTries int
}

type decrement struct {
	From, To int
	First    bool
}

// kernelArgsPattern keeps the command line to characters that cannot break out of the GRUB
// script line they are pasted into.
const kernelArgsPattern = `^[A-Za-z0-9_.,:=/+@%-]*( [A-Za-z0-9_.,:=/+@%-]+)*$`

// RenderGRUBConfig renders the template.
func RenderGRUBConfig(c GRUBConfig) ([]byte, error) {
	if c.MaxTries == 0 {
		c.MaxTries = 9
	}
	if c.MaxTries < 1 || c.MaxTries > 99 {
		return nil, fmt.Errorf("grub.cfg: MaxTries %d out of range 1-99", c.MaxTries)
	}
	if !regexp.MustCompile(kernelArgsPattern).MatchString(c.KernelArgs) {
		return nil, fmt.Errorf("grub.cfg: kernel arguments %q contain characters that are not allowed", c.KernelArgs)
	}
	if c.PartitionA < 1 || c.PartitionB < 1 || c.PartitionA == c.PartitionB {
		return nil, fmt.Errorf("grub.cfg: invalid slot partitions %d and %d", c.PartitionA, c.PartitionB)
	}
	var decs []decrement
	for from := c.MaxTries; from >= 1; from-- {
		decs = append(decs, decrement{From: from, To: from - 1, First: from == c.MaxTries})
	}
	tmpl := template.Must(template.New("grub.cfg").Parse(GRUBConfigTemplate))
	var b bytes.Buffer
	err := tmpl.Execute(&b, map[string]any{
		"PartitionA": c.PartitionA, "PartitionB": c.PartitionB,
		"PartUUIDA": c.PartUUIDA.String(), "PartUUIDB": c.PartUUIDB.String(),
		"KernelArgs": c.KernelArgs, "TimeoutSeconds": c.TimeoutSeconds,
		"SerialConsole": c.SerialConsole, "Decrements": decs,
	})
	return b.Bytes(), err
}
