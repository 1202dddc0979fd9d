#!/usr/bin/env bash
# Builds clusterctl from its Go module, at the version hack/clusterctl/go.mod pins, once per
# machine into the user's cache directory (shared by every clone, like the envtest binaries),
# links it as bin/clusterctl-<version>, and prints that path.
# clusterctl reads its own version from ldflags (sigs.k8s.io/cluster-api/version) and checks
# provider contracts against it, so they are set as CAPI's release build sets them.
set -euo pipefail
dir="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$dir/../.." && pwd)"
go_mod() { (cd "$dir" && GOWORK=off GOFLAGS=-mod=readonly CGO_ENABLED=0 go "$@"); }

version="$(go_mod list -m -f '{{.Version}}' sigs.k8s.io/cluster-api)"
cache="${ANVIL_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/anvil}/clusterctl"
bin="$cache/clusterctl-$version"
if [ ! -x "$bin" ]; then
  major="${version#v}"; major="${major%%.*}"
  minor="${version#v*.}"; minor="${minor%%.*}"
  pkg=sigs.k8s.io/cluster-api/version
  ldflags="-s -w -X $pkg.gitVersion=$version -X $pkg.gitMajor=$major -X $pkg.gitMinor=$minor -X $pkg.gitTreeState=clean"
  ldflags+=" -X $pkg.buildDate=1970-01-01T00:00:00Z"
  echo "clusterctl: building $version into $cache (once per machine: 1-4 minutes)" >&2
  mkdir -p "$cache"
  # A temporary name, so an interrupted build never leaves a broken cached binary.
  go_mod build -trimpath -ldflags "$ldflags" -o "$bin.tmp.$$" sigs.k8s.io/cluster-api/cmd/clusterctl
  mv "$bin.tmp.$$" "$bin"
fi
mkdir -p "$root/bin"
ln -sf "$bin" "$root/bin/clusterctl-$version"
echo "$root/bin/clusterctl-$version"
