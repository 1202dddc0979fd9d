# shellcheck shell=bash
# Sourced by build.sh and verify.sh: paths and the two helper binaries they share.
# Both binaries are built from the hack/image module (its own go.mod, so ko's many
# dependencies never touch the project's go.mod) into bin/ at the repository root.

image_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$image_dir/../.." && pwd)"
bin_dir="$root/bin"

log() { echo "image: $*" >&2; }

# The helpers are built with the hack/image module only: a go.work at the root must not pull
# them into the project's build list, and cgo is never needed for them.
tools_go() { (cd "$image_dir" && GOWORK=off CGO_ENABLED=0 go "$@"); }

# ensure_ko prints the path of a ko binary of the version pinned in hack/image/go.mod,
# building it on first use (about a minute) and reusing it afterwards.
ensure_ko() {
  local version bin
  version="$(tools_go list -m -f '{{.Version}}' github.com/google/ko)"
  bin="$bin_dir/ko-$version"
  if [ ! -x "$bin" ]; then
    log "building ko $version into bin/ (first run only)"
    mkdir -p "$bin_dir"
    # Build to a temporary name so an interrupted build never leaves a broken cached binary.
    tools_go build -trimpath -o "$bin.tmp" github.com/google/ko
    mv "$bin.tmp" "$bin"
  fi
  echo "$bin"
}

# ensure_imagetool prints the path of bin/anvil-imagetool. `go build` runs every time but
# does not relink when nothing changed, so edits to imagetool are picked up and a warm run
# costs well under a second.
ensure_imagetool() {
  mkdir -p "$bin_dir"
  tools_go build -trimpath -o "$bin_dir/anvil-imagetool" ./imagetool
  echo "$bin_dir/anvil-imagetool"
}
