#!/usr/bin/env bash
# Builds the agent's network-boot artifacts (make agent-image): Debian's kernel and an
# initramfs with the static agent as /init, its kernel modules and the GRUB images.
#
#   hack/agent-image.sh [OUT]        (default out/agent)
#   hack/agent-image.sh --kernel     prints "KERNEL_VERSION KERNEL_ROOT" of the cached,
#                                    extracted kernel package (tests build OS images from it)
#
# The kernel package is pinned (exact package and version); it is fetched once with
# `apt-get download` and kept extracted under ~/.cache/anvil/kernel/. To move to a newer
# kernel, pick one from `apt-cache policy linux-image-amd64` / `apt-cache show
# linux-image-amd64=VERSION | grep Depends` and change both values.
set -euo pipefail

KERNEL_PACKAGE="${KERNEL_PACKAGE:-linux-image-6.1.0-56-amd64}"
KERNEL_PACKAGE_VERSION="${KERNEL_PACKAGE_VERSION:-6.1.192-2}"
KERNEL_VERSION="${KERNEL_PACKAGE#linux-image-}"

root="$(cd "$(dirname "$0")/.." && pwd)"
mode=build
if [ "${1:-}" = "--kernel" ]; then mode=kernel; shift; fi
out="${1:-$root/out/agent}"
cache="${XDG_CACHE_HOME:-$HOME/.cache}/anvil/kernel/${KERNEL_PACKAGE}_${KERNEL_PACKAGE_VERSION}"

for tool in apt-get dpkg-deb grub-mkimage; do
  if ! command -v "$tool" >/dev/null; then
    echo "agent-image: $tool not found (Debian: apt, dpkg, grub-common grub-efi-amd64-bin grub-pc-bin; make test-deps installs them)" >&2
    exit 1
  fi
done

if [ ! -e "$cache/.complete" ]; then
  work="$(mktemp -d)"
  trap 'rm -rf "$work"' EXIT
  echo "agent-image: fetching $KERNEL_PACKAGE=$KERNEL_PACKAGE_VERSION" >&2
  if ! (cd "$work" && apt-get download -q "$KERNEL_PACKAGE=$KERNEL_PACKAGE_VERSION" >/dev/null 2>&1); then
    # The package lists may be old or missing (fresh containers): refresh them once.
    if [ "$(id -u)" -eq 0 ]; then apt-get update -qq >/dev/null || true; fi
    if ! (cd "$work" && apt-get download -q "$KERNEL_PACKAGE=$KERNEL_PACKAGE_VERSION" >/dev/null); then
      echo "agent-image: cannot download $KERNEL_PACKAGE=$KERNEL_PACKAGE_VERSION; if the archive dropped it, pin a current one in $0 (see apt-cache policy linux-image-amd64)" >&2
      exit 1
    fi
  fi
  # Extract beside the cache and rename into place, so that concurrent builds (parallel
  # test packages) never see a half-extracted tree; the first rename wins.
  mkdir -p "$(dirname "$cache")"
  extracted="$(mktemp -d "$cache.tmp.XXXXXX")"
  dpkg-deb -x "$work"/"${KERNEL_PACKAGE}"_*.deb "$extracted"
  touch "$extracted/.complete"
  [ -e "$cache/.complete" ] || rm -rf "$cache"
  mv -T "$extracted" "$cache" 2>/dev/null || rm -rf "$extracted"
fi

if [ "$mode" = kernel ]; then
  echo "$KERNEL_VERSION $cache"
  exit 0
fi

bin="$(mktemp -d)"
trap 'rm -rf "$bin" ${work:+"$work"}' EXIT
cd "$root"
CGO_ENABLED=0 go build -trimpath -ldflags "-s -w" -o "$bin/agent" ./cmd/agent
# AGENT_MODULES replaces the default driver list (hack/agentimage), comma-separated.
go run ./hack/agentimage -kernel-root "$cache" -kernel-version "$KERNEL_VERSION" -agent "$bin/agent" -out "$out" \
  ${AGENT_MODULES:+-modules "$AGENT_MODULES"}
