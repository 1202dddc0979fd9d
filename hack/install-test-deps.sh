#!/usr/bin/env bash
# Installs the Debian packages whose programs the tests use as real peers. Runs apt only when
# something is missing, so a warm machine pays nothing.
set -euo pipefail

# package:command-that-proves-it-is-installed
wanted=(
  openipmi:ipmi_sim
  ipmitool:ipmitool
  redfishtool:redfishtool
  python3-sushy:/usr/lib/python3/dist-packages/sushy
  gdisk:sgdisk
  fdisk:sfdisk
  mtools:mcopy
  dosfstools:mkfs.fat
  e2fsprogs:mkfs.ext4
  grub-common:grub-editenv
  grub-efi-amd64-bin:/usr/lib/grub/x86_64-efi
  grub-pc-bin:/usr/lib/grub/i386-pc
  grub-emu:grub-emu
  curl:curl
  zstd:zstd
  xz-utils:xz
  dnsmasq:dnsmasq
  isc-dhcp-client:dhclient
  udhcpc:udhcpc
  busybox:busybox
  tftp-hpa:tftp
  atftp:atftp
  ipxe:/usr/lib/ipxe/undionly.kpxe
  qemu-system-x86:qemu-system-x86_64
  ipxe-qemu:/usr/lib/ipxe/qemu/efi-e1000.rom
  ovmf:/usr/share/ovmf/OVMF.fd
  binutils:ld
  kea-admin:perfdhcp
  iproute2:ip
)

missing=()
for pair in "${wanted[@]}"; do
  pkg="${pair%%:*}" probe="${pair#*:}"
  if [[ "$probe" == /* ]]; then [ -e "$probe" ] && continue; else command -v "$probe" >/dev/null && continue; fi
  missing+=("$pkg")
done
[ ${#missing[@]} -eq 0 ] && exit 0

if [ "$(id -u)" -ne 0 ]; then
  echo "install-test-deps: missing ${missing[*]}; run as root or: sudo apt-get install ${missing[*]}" >&2
  exit 1
fi
echo "install-test-deps: installing ${missing[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq >/dev/null
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
