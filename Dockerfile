# syntax=docker/dockerfile:1
#
# Anvil manager image, for users who build with Docker:
#
#   docker build -t ghcr.io/anvil-metal/cluster-api-provider-anvil:dev .
#   docker buildx build --platform linux/amd64,linux/arm64 -t ... .
#
# Needs BuildKit (the default builder since Docker 23) for the cache and bind mounts.
# `make image` builds the same kind of image without Docker, using ko (hack/image/build.sh).

# Go toolchain; keep the minor version in step with the `go` line of go.mod.
ARG GO_VERSION=1.26
# Debian release that supplies the iPXE binaries. bookworm's ipxe package has all three files
# we copy below (ipxe.efi as a symlink to /boot/ipxe.efi, which cp follows).
ARG DEBIAN_IMAGE=debian:bookworm-slim
# Architecture of the manager. BuildKit fills TARGETARCH from --platform, so multi-platform
# builds just work; ARCH lets `docker build --build-arg ARCH=arm64 .` work without --platform
# (set one or the other: with both, the image config would carry --platform's architecture).
ARG TARGETARCH
ARG ARCH=${TARGETARCH:-amd64}

# ---------------------------------------------------------------------------------------------
# Build the manager. The stage runs on the build machine's own platform and cross-compiles,
# which is much faster than building under emulation for another architecture.
FROM --platform=$BUILDPLATFORM golang:${GO_VERSION} AS builder
ARG ARCH
# Module proxy, overridable for mirrors or air-gapped builds (e.g. --build-arg GOPROXY=...).
ARG GOPROXY=https://proxy.golang.org,direct
WORKDIR /workspace

# Download modules first, keyed on go.mod/go.sum only, so a source edit does not refetch them.
# The module and build caches are cache mounts: they survive between builds without ending up
# in any image layer.
RUN --mount=type=cache,target=/go/pkg/mod \
    --mount=type=bind,source=go.mod,target=go.mod \
    --mount=type=bind,source=go.sum,target=go.sum \
    go mod download

# Sources are bind-mounted rather than COPY'd: nothing but the binary needs to be in a layer.
# CGO_ENABLED=0 gives a static binary (distroless/static has no libc); -trimpath and
# -ldflags="-s -w" match what ko does for `make image`.
RUN --mount=type=cache,target=/go/pkg/mod \
    --mount=type=cache,target=/root/.cache/go-build \
    --mount=type=bind,target=. \
    CGO_ENABLED=0 GOOS=linux GOARCH=${ARCH} \
    go build -trimpath -ldflags="-s -w" -o /out/manager ./cmd/manager

# ---------------------------------------------------------------------------------------------
# Collect the iPXE network boot programs the manager serves to bare-metal machines:
# undionly.kpxe for BIOS, ipxe.efi and snponly.efi for UEFI. They run on the machines being
# provisioned, not in this container, so the stage always uses the build platform.
FROM --platform=$BUILDPLATFORM ${DEBIAN_IMAGE} AS ipxe
RUN apt-get update \
 && apt-get install -y --no-install-recommends ipxe \
 && rm -rf /var/lib/apt/lists/* \
 && mkdir -p /boot-assets/ipxe /boot-assets/agent \
 && cp /usr/lib/ipxe/undionly.kpxe /usr/lib/ipxe/ipxe.efi /usr/lib/ipxe/snponly.efi /boot-assets/ipxe/ \
 && cp /usr/share/doc/ipxe/copyright /boot-assets/ipxe/copyright \
 && chmod 0644 /boot-assets/ipxe/*

# ---------------------------------------------------------------------------------------------
# The agent servers network-boot into (make agent-image): Debian's kernel, pinned in
# hack/agent-image.sh, and an initramfs with the static agent as /init, its kernel modules and
# the GRUB images it installs. Servers are x86-64 whatever the manager's architecture, so the
# stage runs on the build platform. The bookworm variant of the Go image: the pinned kernel
# package and the GRUB packages come from bookworm's archive.
FROM --platform=$BUILDPLATFORM golang:${GO_VERSION}-bookworm AS agent
ARG GOPROXY=https://proxy.golang.org,direct
WORKDIR /workspace
RUN apt-get update \
 && apt-get install -y --no-install-recommends grub-common grub-efi-amd64-bin grub-pc-bin \
 && rm -rf /var/lib/apt/lists/*
# apt-get download needs the package lists; the script only writes outside the sources (its
# output directory, the kernel cache under $HOME and temporary files).
RUN --mount=type=cache,target=/go/pkg/mod \
    --mount=type=cache,target=/root/.cache/go-build \
    --mount=type=bind,target=. \
    apt-get update \
 && hack/agent-image.sh /tmp/agent \
 && mkdir -p /boot-assets/agent \
 && cp -L /tmp/agent/vmlinuz /tmp/agent/initramfs /tmp/agent/SHA256SUMS /boot-assets/agent/ \
 && chmod 0644 /boot-assets/agent/* \
 && rm -rf /var/lib/apt/lists/*

# ---------------------------------------------------------------------------------------------
# Runtime: distroless static, as its non-root user. The platform is pinned to ARCH so the base
# always matches the binary, also when ARCH is set without --platform.
FROM --platform=linux/${ARCH} gcr.io/distroless/static:nonroot
LABEL org.opencontainers.image.source="https://github.com/anvil-metal/cluster-api-provider-anvil" \
      org.opencontainers.image.title="Anvil manager" \
      org.opencontainers.image.description="Cluster API infrastructure provider for bare metal"
# Boot assets end up at /usr/share/anvil/ipxe/ and /usr/share/anvil/agent/ (the agent kernel
# and initramfs, which the manager serves by default: --agent-artifacts-dir), the same paths
# as in the ko-built image.
COPY --from=ipxe /boot-assets/ /usr/share/anvil/
COPY --from=agent /boot-assets/agent/ /usr/share/anvil/agent/
COPY --from=builder /out/manager /manager
# Numeric, so Kubernetes can enforce runAsNonRoot without reading /etc/passwd.
USER 65532:65532
ENTRYPOINT ["/manager"]
