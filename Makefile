# Anvil — Cluster API infrastructure provider for bare metal.
# `make help` lists the targets. Every target installs or builds what it needs.

SHELL := /usr/bin/env bash -o pipefail
.SHELLFLAGS := -ec
.DEFAULT_GOAL := help

ROOT := $(abspath .)
BIN := $(ROOT)/bin
export GOFLAGS ?= -mod=readonly

KUBE_VERSION ?= v1.36.3
ETCD_VERSION ?= v3.6.16
ENVTEST_DIR := $(BIN)/envtest/$(KUBE_VERSION)
GOLANGCI_LINT := $(BIN)/golangci-lint
CONTROLLER_GEN := go tool controller-gen
GO_TEST_FLAGS ?= -count=1 -timeout=25m
# envtest's default of 20 s for kube-apiserver to start is too short when several suites start
# at once on two loaded cores.
ENVTEST_START_TIMEOUT ?= 120s

IMAGE ?= ghcr.io/anvil-metal/cluster-api-provider-anvil
TAG ?= dev
IMAGE_TARBALL ?= out/anvil-manager-image.tar
RELEASE_VERSION ?= v0.1.0
RELEASE_DIR ?= out/release

##@ General

.PHONY: help
help: ## Show this help.
	@awk 'BEGIN {FS = ":.*##"} /^[a-zA-Z_0-9-]+:.*?##/ { printf "  \033[36m%-18s\033[0m %s\n", $$1, $$2 } /^##@/ { printf "\n\033[1m%s\033[0m\n", substr($$0, 5) }' $(MAKEFILE_LIST)

##@ The two commands

.PHONY: demo
demo: envtest test-deps ## The lab: management plane, Cluster API, Anvil and 6 emulated servers through the whole lifecycle (DEMO_ARGS="--keep").
	go run ./cmd/anvil demo $(DEMO_ARGS)

.PHONY: test
test: envtest test-deps ## Run every test (unit and envtest suites), building what they need.
	KUBEBUILDER_ASSETS=$(ENVTEST_DIR) KUBEBUILDER_CONTROLPLANE_START_TIMEOUT=$(ENVTEST_START_TIMEOUT) go test $(GO_TEST_FLAGS) ./...

.PHONY: test-e2e
test-e2e: envtest test-deps ## Only the Cluster API end-to-end suite (KCP, MachineDeployment, races, restarts, clusterctl move, repair, in-place upgrades; part of make test, ~4.5 min).
	KUBEBUILDER_ASSETS=$(ENVTEST_DIR) go test $(GO_TEST_FLAGS) -v ./test/e2e/...

.PHONY: bench-hosts
bench-hosts: envtest ## 1,000 emulated Redfish BMCs to Available, then steady state (BENCH_ARGS="-hosts 100").
	KUBEBUILDER_ASSETS=$(ENVTEST_DIR) go run ./test/bench/hosts $(BENCH_ARGS)

.PHONY: bench-machines
bench-machines: envtest ## 5,000 AnvilHosts and 5,000 AnvilMachines, simulated provisioning: time, peak RSS, writes per host (BENCH_MACHINES_ARGS="-hosts 1000").
	KUBEBUILDER_ASSETS=$(ENVTEST_DIR) go run ./test/bench/machines $(BENCH_MACHINES_ARGS)

.PHONY: bench
bench: bench-hosts bench-machines envtest test-deps ## Benchmarks, each printing the peer measured in the same run (dnsmasq, nginx, curl|zstd|dd).
	@hack/install-bench-deps.sh
	go test -run '^$$' -bench ThousandBMCs -benchtime 1x ./internal/vbmc/redfish/
	go test -run '^$$' -bench DHCPLoadgen -benchtime 1x -timeout 30m ./internal/boot/dhcp/
	go test -run '^$$' -bench DHCPvsDnsmasq -benchtime 1x -timeout 30m ./internal/boot/dhcp/
	go test -run '^$$' -bench BootStorm -benchtime 1x -timeout 30m ./internal/bootservices/
	go test -run '^$$' -bench FanOutVsNginx -benchtime 5x ./internal/imagecache/
	ANVIL_BENCH=1 ANVIL_BENCH_SIZE=4GiB go test -run TestInstallBenchmark -v -timeout 60m ./internal/agent/

##@ Development

.PHONY: generate
generate: ## Generate deepcopy code and docs/api-reference.md.
	$(CONTROLLER_GEN) object:headerFile=hack/boilerplate.go.txt paths=./api/...
	go run ./hack/apiref -dir api/v1alpha1 -out docs/api-reference.md

.PHONY: manifests
manifests: ## Generate CRDs and RBAC from the Go types and markers.
	$(CONTROLLER_GEN) crd paths=./api/... output:crd:artifacts:config=config/crd/bases
	$(CONTROLLER_GEN) rbac:roleName=manager-role paths=./... output:rbac:artifacts:config=config/rbac
	$(CONTROLLER_GEN) webhook paths=./internal/webhooks/... output:webhook:artifacts:config=config/webhook

.PHONY: verify-gen
verify-gen: generate manifests ## Fail if generated files are stale.
	@if [ -n "$$(git status --porcelain -- api config docs/api-reference.md)" ]; then \
		echo "generated files are stale; run 'make generate manifests' and commit:"; \
		git status --porcelain -- api config docs/api-reference.md; git --no-pager diff --stat -- api config docs/api-reference.md; exit 1; fi

.PHONY: build
build: ## Build the manager binary into bin/.
	CGO_ENABLED=0 go build -trimpath -o $(BIN)/manager ./cmd/manager
	CGO_ENABLED=0 go build -trimpath -o $(BIN)/anvil ./cmd/anvil

.PHONY: lint
lint: $(GOLANGCI_LINT) ## Run gofmt, go vet and golangci-lint (pinned in hack/tools/go.mod).
	@unformatted=$$(gofmt -l $$(git ls-files '*.go')); if [ -n "$$unformatted" ]; then echo "gofmt needed:"; echo "$$unformatted"; exit 1; fi
	go vet ./...
	$(GOLANGCI_LINT) run --allow-parallel-runners ./...

$(GOLANGCI_LINT): hack/tools/go.mod
	cd hack/tools && go build -o $(GOLANGCI_LINT) github.com/golangci/golangci-lint/v2/cmd/golangci-lint

.PHONY: envtest
envtest: ## Build (once, cached by version) the kube-apiserver and etcd that tests run.
	@KUBE_VERSION=$(KUBE_VERSION) ETCD_VERSION=$(ETCD_VERSION) hack/envtest-bins.sh $(ENVTEST_DIR) >/dev/null

.PHONY: test-deps
test-deps: ## Install the Debian packages the real-peer tests use.
	@hack/install-test-deps.sh

.PHONY: agent-image
agent-image: ## Build the agent's kernel and initramfs into out/agent (Debian kernel, pinned in hack/agent-image.sh, cached in ~/.cache/anvil).
	hack/agent-image.sh out/agent

.PHONY: image
image: agent-image ## Build the manager image as an OCI tarball, offline, with ko (no Docker needed), with the iPXE boot assets and the agent.
	@hack/image/install-deps.sh
	IMAGE=$(IMAGE) TAG=$(TAG) hack/image/build.sh ./cmd/manager $(IMAGE_TARBALL)

.PHONY: verify-image
verify-image: ## Check the image tarball: one image, uid 65532, static manager entrypoint, iPXE boot assets, agent kernel and initramfs.
	REQUIRE_BOOT_ASSETS=1 REQUIRE_AGENT=1 hack/image/verify.sh $(IMAGE_TARBALL)

##@ Release

.PHONY: release-manifests
release-manifests: ## Render infrastructure-components.yaml, metadata.yaml and the templates into out/release (RELEASE_VERSION, IMAGE).
	go run ./hack/release -root . -out $(RELEASE_DIR) -version $(RELEASE_VERSION) -image $(IMAGE):$(RELEASE_VERSION)

.PHONY: clusterctl
clusterctl: ## Build clusterctl (version pinned in hack/clusterctl/go.mod) once per machine, linked into bin/.
	@hack/clusterctl/build.sh

.PHONY: clean
clean: ## Remove build outputs (the envtest cache in ~/.cache/anvil stays).
	rm -rf bin out
