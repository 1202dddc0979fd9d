#!/usr/bin/env bash
# Checks an image tarball made by hack/image/build.sh (or `docker save` of the Dockerfile's
# image): exactly one image, running as uid 65532, whose entrypoint is the manager binary,
# present in the image and statically linked. Exits non-zero with one line per failed check.
#
# Usage: hack/image/verify.sh [TARBALL]   (default out/anvil-manager-image.tar, relative to
#                                           the repository root like build.sh's argument)
# Environment:
#   ARCH                 expected architecture (default amd64)
#   BINARY_NAME          expected entrypoint file name (default manager)
#   REQUIRE_BOOT_ASSETS  set to 1 to also require the iPXE binaries in the image
#   REQUIRE_AGENT        set to 1 to also require the agent kernel and initramfs (make agent-image)
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

cd "$root"
tarball="${1:-out/anvil-manager-image.tar}"
if [ ! -f "$tarball" ]; then
  echo "verify-image: FAIL: no image tarball at $tarball (run \`make image\` first)" >&2
  exit 1
fi

imagetool="$(ensure_imagetool)"
args=(--platform "linux/${ARCH:-amd64}" --binary-name "${BINARY_NAME-manager}" --uid 65532)
if [ "${REQUIRE_BOOT_ASSETS:-0}" = 1 ]; then args+=(--require-boot-assets); fi
if [ "${REQUIRE_AGENT:-0}" = 1 ]; then args+=(--require-agent); fi
exec "$imagetool" verify "${args[@]}" "$tarball"
