#!/usr/bin/env bash
# Installs what `make image` puts into the image besides the manager: Debian's ipxe package
# (undionly.kpxe, ipxe.efi, snponly.efi). Runs apt only when it is missing.
set -euo pipefail
[ -e /usr/lib/ipxe/undionly.kpxe ] && [ -e /usr/lib/ipxe/ipxe.efi ] && [ -e /usr/lib/ipxe/snponly.efi ] && exit 0
if [ "$(id -u)" -ne 0 ]; then
  echo "image: Debian's ipxe package is missing; run as root or: sudo apt-get install ipxe" >&2
  exit 1
fi
echo "image: installing ipxe" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq >/dev/null
apt-get install -y -qq --no-install-recommends ipxe >/dev/null
