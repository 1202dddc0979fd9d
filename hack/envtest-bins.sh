#!/usr/bin/env bash
# Builds the envtest binaries (kube-apiserver, etcd) from the Go module proxy, because no
# prebuilt envtest download is reachable from our machines. Results are cached by version in
# the user's cache directory (shared by every clone on the machine) and linked into bin/.
#
# Usage: hack/envtest-bins.sh [DEST_DIR]   (prints the directory to use as KUBEBUILDER_ASSETS)
set -euo pipefail

KUBE_VERSION="${KUBE_VERSION:-v1.36.3}"
ETCD_VERSION="${ETCD_VERSION:-v3.6.16}"
root="$(cd "$(dirname "$0")/.." && pwd)"
dest="${1:-$root/bin/envtest/$KUBE_VERSION}"
cache="${ANVIL_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/anvil}/envtest/kube-$KUBE_VERSION-etcd-$ETCD_VERSION"

log() { echo "envtest-bins: $*" >&2; }

build_etcd() {
  local work; work="$(mktemp -d)"
  log "building etcd $ETCD_VERSION (first run only)"
  (
    cd "$work"
    go mod init anvil.local/etcd-build >/dev/null 2>&1
    go get "go.etcd.io/etcd/server/v3@$ETCD_VERSION" >/dev/null 2>&1
    CGO_ENABLED=0 go build -trimpath -o "$cache/etcd" go.etcd.io/etcd/server/v3
  )
  rm -rf "$work"
}

build_kube_apiserver() {
  local work; work="$(mktemp -d)"
  local minor="${KUBE_VERSION#v1.}"; minor="${minor%%.*}"
  local staging="v0.${KUBE_VERSION#v1.}"
  log "building kube-apiserver $KUBE_VERSION (first run only, several minutes)"
  (
    cd "$work"
    go mod init anvil.local/apiserver-build >/dev/null 2>&1
    gomod="$(go mod download -json "k8s.io/kubernetes@$KUBE_VERSION" | sed -n 's/.*"GoMod": "\(.*\)".*/\1/p')"
    # kubernetes' go.mod points every staging module at ./staging; dependents must use the
    # published v0.x release of each instead.
    awk '$2 == "=>" && $3 ~ /^\.\/staging\// {print $1}' "$gomod" | while read -r mod; do
      go mod edit -replace "$mod=$mod@$staging"
    done
    go mod edit -require "k8s.io/kubernetes@$KUBE_VERSION"
    cat > main.go <<'GO'
package main

import _ "k8s.io/kubernetes/cmd/kube-apiserver/app"

func main() {}
GO
    go mod tidy >/dev/null 2>&1
    pkg=k8s.io/component-base/version
    CGO_ENABLED=0 go build -trimpath -o "$cache/kube-apiserver" \
      -ldflags "-X $pkg.gitVersion=$KUBE_VERSION -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor" \
      k8s.io/kubernetes/cmd/kube-apiserver
  )
  rm -rf "$work"
}

mkdir -p "$cache"
[ -x "$cache/etcd" ] || build_etcd
[ -x "$cache/kube-apiserver" ] || build_kube_apiserver
mkdir -p "$dest"
for b in etcd kube-apiserver; do
  ln -sf "$cache/$b" "$dest/$b"
done
echo "$dest"
