#!/bin/sh
# Installs the independent Redfish clients the emulator's tests run against:
# DMTF's redfishtool and OpenStack's sushy, both from Debian. Idempotent and
# quiet when they are already there. Needs root (or sudo) and Debian's apt.
set -eu

missing=""
for pkg in redfishtool python3-sushy; do
	if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed"; then
		missing="$missing $pkg"
	fi
done
[ -z "$missing" ] && exit 0

SUDO=""
[ "$(id -u)" -ne 0 ] && SUDO="sudo"
echo "installing Redfish test peers:$missing" >&2
$SUDO apt-get update -qq
# shellcheck disable=SC2086 # word splitting of the package list is intended
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends $missing >/dev/null
# sushy must import with Debian's interpreter (a pyenv python3 on PATH would not see it).
/usr/bin/python3 -c 'import sushy' 
