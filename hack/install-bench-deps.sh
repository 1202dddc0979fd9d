#!/usr/bin/env bash
# Installs the peers the benchmarks measure Anvil against (nginx, dnsmasq, perfdhcp, curl|zstd|dd).
set -euo pipefail
missing=()
for pair in nginx-light:nginx kea-admin:perfdhcp dnsmasq:dnsmasq curl:curl zstd:zstd openssl:openssl; do
  pkg="${pair%%:*}" probe="${pair#*:}"
  command -v "$probe" >/dev/null || [ -x "/usr/sbin/$probe" ] || missing+=("$pkg")
done
[ ${#missing[@]} -eq 0 ] && exit 0
echo "install-bench-deps: installing ${missing[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq >/dev/null
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
