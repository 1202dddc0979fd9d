#!/usr/bin/env bash
# Builds the Anvil manager container image as a tarball with ko, without a registry or a Docker
# daemon: only the Go module proxy has to be reachable (and only until the module cache is warm).
#
# Usage: hack/image/build.sh [IMPORT_PATH] [OUT_TARBALL]
#   IMPORT_PATH  main package: a directory such as ./cmd/manager (the default) or a Go import
#                path. Directories and OUT_TARBALL are relative to the repository root.
#   OUT_TARBALL  where to write the image (default out/anvil-manager-image.tar); load it with
#                `docker load -i`, `kind load image-archive`, or push it with `crane push`.
# Prints the image reference (IMAGE:TAG@sha256:...) on stdout; progress goes to stderr.
#
# Environment:
#   IMAGE     repository name (default ghcr.io/anvil-metal/cluster-api-provider-anvil)
#   TAG       tag (default dev)
#   ARCH      target architecture (default amd64)
#   IPXE_DIR  where Debian's ipxe package put its binaries (default /usr/lib/ipxe); they are
#             added at /usr/share/anvil/ipxe when present, skipped otherwise. "" to never add.
#   AGENT_DIR directory with the agent's vmlinuz and initramfs (default out/agent), added at
#             /usr/share/anvil/agent when both are there; the directory is created either way.
#   KOCACHE   ko's cache (default ~/.cache/anvil/ko, shared by all clones on the machine)
#
# How it works offline: ko can only take a base image from a registry, the Docker daemon, or
# its on-disk cache ($KOCACHE/img, an OCI layout consulted first for digest references). So
# imagetool writes a minimal base (non-root user 65532, CA certificates, optional iPXE
# binaries) into that cache, and ko is pointed at it by digest and never goes to the network.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

IMAGE="${IMAGE:-ghcr.io/anvil-metal/cluster-api-provider-anvil}"
TAG="${TAG:-dev}"
ARCH="${ARCH:-amd64}"
IPXE_DIR="${IPXE_DIR-/usr/lib/ipxe}"
AGENT_DIR="${AGENT_DIR-out/agent}"
export KOCACHE="${KOCACHE:-${ANVIL_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/anvil}/ko}"

cd "$root"
import_path="${1:-./cmd/manager}"
out="${2:-out/anvil-manager-image.tar}"
mkdir -p "$(dirname "$out")"
out="$(cd "$(dirname "$out")" && pwd)/$(basename "$out")"

# ko resolves a relative import path inside the module of its working directory, so for a
# directory we run ko from the module that contains it. That is the repository root for
# ./cmd/manager, and hack/image for the stand-in under hack/image/testdata.
if [[ "$import_path" == .* || "$import_path" == /* ]]; then
  if [ ! -d "$import_path" ]; then
    log "no directory $import_path in $root (has the main package been written yet?)"
    exit 1
  fi
  pkg_dir="$(cd "$import_path" && pwd)"
  mod_dir="$pkg_dir"
  until [ -f "$mod_dir/go.mod" ]; do
    if [ "$mod_dir" = / ]; then log "$import_path is not inside a Go module"; exit 1; fi
    mod_dir="$(dirname "$mod_dir")"
  done
  if [ "$pkg_dir" = "$mod_dir" ]; then ko_path=.; else ko_path="./${pkg_dir#"$mod_dir"/}"; fi
else
  mod_dir="$root"
  ko_path="$import_path"
fi

ko="$(ensure_ko)"
imagetool="$(ensure_imagetool)"
base="$("$imagetool" base --layout "$KOCACHE/img" --arch "$ARCH" --ipxe-dir "$IPXE_DIR" --agent-dir "$AGENT_DIR")"
log "base image $base (from ko's cache at $KOCACHE/img)"

# Write next to the target and rename, so a failed build never leaves a truncated tarball
# that a later verify or `docker load` would trip over.
tmp="$out.tmp.$$"
trap 'rm -f "$tmp"' EXIT

# - .ko.yaml (at the root, even when ko runs in another module) sets CGO_ENABLED=0 and
#   -ldflags="-s -w"; ko adds -trimpath itself. CGO_ENABLED=0 is also exported because ko
#   lets the caller's environment override its own default, and GOOS/GOARCH are dropped for
#   the same reason: ko derives them from the base image's platform.
# - --bare names the image exactly $IMAGE:$TAG instead of appending a hash of the import path.
# - --sbom=none: ko's SBOM is a registry attachment; a tarball would not carry it anyway.
ref="$(cd "$mod_dir" && env -u GOOS -u GOARCH -u GOARM \
  CGO_ENABLED=0 \
  KO_CONFIG_PATH="$root/.ko.yaml" \
  KO_DEFAULTBASEIMAGE="$base" \
  KO_DOCKER_REPO="$IMAGE" \
  "$ko" build "$ko_path" \
    --bare --tags "$TAG" --platform "linux/$ARCH" \
    --push=false --tarball "$tmp" --sbom=none \
    --image-label "org.opencontainers.image.source=https://github.com/anvil-metal/cluster-api-provider-anvil")"
mv "$tmp" "$out"

log "wrote $ref"
log "   to ${out#"$root"/} ($(du -h "$out" | cut -f1)); check it with hack/image/verify.sh ${out#"$root"/}"
echo "$ref"
