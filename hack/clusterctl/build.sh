#!/usr/bin/env bash
# Builds clusterctl from its Go module, at the version hack/clusterctl/go.mod pins, into
# bin/clusterctl-<version> (once: later runs reuse it), and prints the binary's path.
# clusterctl reads its own version from ldflags (sigs.k8s.io/cluster-api/version) and checks
# provider contracts against it, so they are set as CAPI's release build sets them.
set -euo pipefail
dir="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$dir/../.." && pwd)"
go_mod() { (cd "$dir" && GOWORK=off GOFLAGS=-mod=readonly CGO_ENABLED=0 go "$@"); }

version="$(go_mod list -m -f '{{.Version}}' sigs.k8s.io/cluster-api)"
bin="$root/bin/clusterctl-$version"
if [ ! -x "$bin" ]; then
  major="${version#v}"; major="${major%%.*}"
  minor="${version#v*.}"; minor="${minor%%.*}"
  pkg=sigs.k8s.io/cluster-api/version
  ldflags="-s -w -X $pkg.gitVersion=$version -X $pkg.gitMajor=$major -X $pkg.gitMinor=$minor -X $pkg.gitTreeState=clean"
  ldflags+=" -X $pkg.buildDate=1970-01-01T00:00:00Z"
  echo "clusterctl: building $version into bin/ (first run only, about a minute)" >&2
  mkdir -p "$root/bin"
  # A temporary name, so an interrupted build never leaves a broken cached binary.
  go_mod build -trimpath -ldflags "$ldflags" -o "$bin.tmp.$$" sigs.k8s.io/cluster-api/cmd/clusterctl
  mv "$bin.tmp.$$" "$bin"
fi
echo "$bin"
