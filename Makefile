# podipc — `make help` lists the targets.
SHELL := /usr/bin/env bash -o pipefail
.DEFAULT_GOAL := help

ROOT         := $(abspath .)
BIN          := $(ROOT)/bin
KUBE_VERSION := v1.37.2
K8S_BIN      := $(BIN)/k8s/$(KUBE_VERSION)
TOOLS_MOD    := $(ROOT)/hack/tools/go.mod
GOTEST_FLAGS ?= -race -count=1
export PATH := $(BIN):$(PATH)

##@ General

.PHONY: help
help: ## List the targets.
	@awk 'BEGIN {FS = ":.*##"; printf "Usage: make <target>\n"} \
	  /^[a-zA-Z0-9_-]+:.*?##/ { printf "  \033[36m%-14s\033[0m %s\n", $$1, $$2 } \
	  /^##@/ { printf "\n\033[1m%s\033[0m\n", substr($$0, 5) }' $(MAKEFILE_LIST)

##@ Development

.PHONY: test
test: control-plane ## Run unit, integration (real API server) and node-ipc compatibility tests.
	KUBEBUILDER_ASSETS=$(K8S_BIN) go test $(GOTEST_FLAGS) ./...

.PHONY: bench
bench: ## Run the Go benchmarks (figures go to docs/performance.md).
	go test -run '^$$' -bench . -benchmem ./pkg/...

.PHONY: lint
lint: $(BIN)/golangci-lint ## Run gofmt, go vet and golangci-lint.
	@test -z "$$(gofmt -l $$(git ls-files '*.go'))" || { gofmt -l $$(git ls-files '*.go'); echo "gofmt: files above need formatting"; exit 1; }
	go vet ./...
	$(BIN)/golangci-lint run ./...

.PHONY: generate
generate: ## Regenerate code and manifests.
	@true

.PHONY: verify
verify: generate ## Regenerate and fail if the tree changed (generated code is never hand-edited).
	@git diff --exit-code -- . || { echo "generated files are out of date: run 'make generate' and commit"; exit 1; }

##@ Build dependencies (built from source, cached under bin/)

.PHONY: control-plane
control-plane: ## Build kube-apiserver, kubectl and etcd from source into bin/k8s/.
	hack/k8s/build.sh kube-apiserver kubectl etcd >/dev/null

.PHONY: tools
tools: $(BIN)/golangci-lint $(BIN)/controller-gen $(BIN)/helm ## Build the pinned tools into bin/.

$(BIN)/%: $(TOOLS_MOD)
	@mkdir -p $(BIN)
	cd hack/tools && go build -o $@ $$(go list tool | grep -E '/$*$$|/$*/v[0-9]+$$' | head -n1)

##@ End to end (root, Linux: a real kubelet + containerd node, see hack/node/)

.PHONY: e2e
e2e: ## Bring up a real single-node cluster, run the e2e suite, tear it down (needs root).
	hack/node/e2e.sh

.PHONY: node-up
node-up: ## Bring up the e2e node and leave it running (KUBECONFIG in /var/tmp/podipc-e2e/e2e.env).
	hack/node/up.sh

.PHONY: node-down
node-down: ## Tear down the e2e node and check that nothing is left.
	hack/node/down.sh
