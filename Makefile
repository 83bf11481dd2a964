# podipc — `make help` lists the targets.
SHELL := /usr/bin/env bash -o pipefail
.DEFAULT_GOAL := help

ROOT         := $(abspath .)
BIN          := $(ROOT)/bin
KUBE_VERSION := v1.37.2
K8S_BIN      := $(BIN)/k8s/$(KUBE_VERSION)
TOOLS_MOD    := $(ROOT)/hack/tools/go.mod
GOTEST_FLAGS ?= -race -count=1
FUZZTIME     ?= 20s
export PATH := $(BIN):$(PATH)

##@ General

.PHONY: help
help: ## List the targets.
	@awk 'BEGIN {FS = ":.*##"; printf "Usage: make <target>\n"} \
	  /^[a-zA-Z0-9_-]+:.*?##/ { printf "  \033[36m%-14s\033[0m %s\n", $$1, $$2 } \
	  /^##@/ { printf "\n\033[1m%s\033[0m\n", substr($$0, 5) }' $(MAKEFILE_LIST)

##@ Development

# The demo's own binaries (podipc-controller, podipc-sidecar, podipc-demo) go to DEMO_BIN.
DEMO_BIN   ?= $(BIN)
DEMO_FLAGS ?=

.PHONY: demo
demo: ## Run the whole journey locally: API server, controller, webhook, three injected pods exchanging lines. Linux, no root.
	@test -x $(K8S_BIN)/kube-apiserver -a -x $(K8S_BIN)/etcd -a -x $(K8S_BIN)/kubectl || \
	  echo "make demo: first run: building kube-apiserver, etcd and kubectl $(KUBE_VERSION) from source into bin/k8s/ (about 7 minutes on 2 cores; later runs start in seconds)"
	@echo "make demo: step 1 of 3: the test control plane (kube-apiserver, etcd, kubectl)"
	@$(MAKE) --no-print-directory control-plane
	@echo "make demo: step 2 of 3: building podipc-controller, podipc-sidecar and the demo driver"
	@$(MAKE) --no-print-directory demo-binaries
	@echo "make demo: step 3 of 3: starting the API server, the controller and three pods"
	@$(DEMO_BIN)/podipc-demo --bin=$(DEMO_BIN) --assets=$(K8S_BIN) $(DEMO_FLAGS)

.PHONY: demo-check
demo-check: ## Run the demo without a terminal: it checks every line arrived and cleans up (CI).
	@$(MAKE) --no-print-directory control-plane demo-binaries
	$(DEMO_BIN)/podipc-demo --bin=$(DEMO_BIN) --assets=$(K8S_BIN) --interactive=false $(DEMO_FLAGS) </dev/null

.PHONY: demo-binaries
demo-binaries:
	@mkdir -p $(DEMO_BIN)
	go build -o $(DEMO_BIN)/ ./cmd/podipc-controller ./cmd/podipc-sidecar
	go build -o $(DEMO_BIN)/podipc-demo ./hack/demo

.PHONY: test
test: ## Run unit, integration (real API server) and node-ipc compatibility tests.
	@test -x $(K8S_BIN)/kube-apiserver -a -x $(K8S_BIN)/etcd -a -x $(K8S_BIN)/kubectl || \
	  echo "make test: first run: building kube-apiserver, etcd and kubectl $(KUBE_VERSION) from source into bin/k8s/ (about 7 minutes on 2 cores; later runs skip this)"
	@echo "make test: step 1 of 3: the test control plane (kube-apiserver, etcd, kubectl)"
	@$(MAKE) --no-print-directory control-plane
	@echo "make test: step 2 of 3: helm (for the chart tests)"
	@$(MAKE) --no-print-directory -s $(BIN)/helm
	@echo "make test: step 3 of 3: go test $(GOTEST_FLAGS) of $$(go list ./... | wc -l) packages; each prints ok or FAIL as it finishes"
	KUBEBUILDER_ASSETS=$(K8S_BIN) go test $(GOTEST_FLAGS) ./...
	@echo "make test: and the load tool (hack/loadtest, a module of its own), against real sidecars"
	cd hack/loadtest && go test $(GOTEST_FLAGS) ./...

.PHONY: bench
bench: ## Run the Go benchmarks (figures go to docs/performance.md).
	go test -run '^$$' -bench . -benchmem ./pkg/...

.PHONY: bench-nodeipc
bench-nodeipc: ## Compare node-ipc events/s: Go<->Go (pkg/ipc) against Node<->Node (node-ipc 9.2.1).
	hack/nodeipc/bench.sh

.PHONY: fuzz
fuzz: ## Run each fuzz target for FUZZTIME (default 20s).
	@for pkg in $$(go list ./pkg/...); do \
	  for target in $$(go test -list '^Fuzz' $$pkg | grep '^Fuzz'); do \
	    echo "== $$pkg $$target"; \
	    go test -run '^$$' -fuzz "^$$target\$$" -fuzztime $(FUZZTIME) $$pkg || exit 1; \
	  done; \
	done

# The load tool is a module of its own (hack/loadtest), so the NATS client stays out of
# go.mod. LOADTEST_FLAGS passes flags through, e.g. LOADTEST_FLAGS='-runs 3 -duration 5s'.
SIDECAR_BIN    ?= $(BIN)/podipc-sidecar
LOADTEST_FLAGS ?=

.PHONY: bench-dataplane
bench-dataplane: sidecar $(BIN)/nats-server ## Measure the sidecar against a plain TCP relay and NATS on loopback (hack/loadtest).
	cd hack/loadtest && go run . -sidecar=$(SIDECAR_BIN) -nats-server=$(BIN)/nats-server $(LOADTEST_FLAGS)

# SCALE_FLAGS passes flags through, e.g. SCALE_FLAGS='-members 2,4 -duration 1s'; the plots go
# to docs/scale/ and the Markdown report to stdout.
SCALE_FLAGS ?=

.PHONY: bench-scale
bench-scale: sidecar $(BIN)/nats-server ## Measure how podipc's cost grows with N members (2..64), next to NATS with N-1 subscribers (hack/loadtest).
	cd hack/loadtest && go run . scale -sidecar=$(SIDECAR_BIN) -nats-server=$(BIN)/nats-server -svg-dir=$(ROOT)/docs/scale $(SCALE_FLAGS)

# Built without cgo, as the image's binary is (`make binaries`, Dockerfile): with cgo (the
# default wherever a C compiler is installed) the sidecar links libc dynamically for net's
# and os/user's lookups, which adds about 1.9 MB to its idle RSS that no pod ever pays.
.PHONY: sidecar
sidecar: ## Build the sidecar binary into bin/ (or SIDECAR_BIN), without cgo like the image.
	CGO_ENABLED=0 go build -o $(SIDECAR_BIN) ./cmd/podipc-sidecar

.PHONY: lint
lint: $(BIN)/golangci-lint ## Run gofmt, go vet and golangci-lint.
	@test -z "$$(gofmt -l $$(git ls-files '*.go'))" || { gofmt -l $$(git ls-files '*.go'); echo "gofmt: files above need formatting"; exit 1; }
	go vet ./...
	$(BIN)/golangci-lint run ./...
	cd hack/loadtest && go vet ./... && $(BIN)/golangci-lint run --config $(ROOT)/.golangci.yml ./...

.PHONY: generate
generate: $(BIN)/controller-gen ## Regenerate code and manifests (deepcopy, CRD, RBAC) with controller-gen.
	$(BIN)/controller-gen object paths=./api/...
	$(BIN)/controller-gen crd paths=./api/... output:crd:artifacts:config=config/crd/bases
	$(BIN)/controller-gen rbac:roleName=podipc-controller paths=./pkg/... output:rbac:artifacts:config=config/rbac
	@$(MAKE) --no-print-directory chart-crds

.PHONY: chart-crds
chart-crds: ## Copy the generated CRDs into charts/podipc/crds/ (never edit them there).
	rm -f charts/podipc/crds/*.yaml
	cp config/crd/bases/*.yaml charts/podipc/crds/

.PHONY: verify
verify: generate ## Regenerate and fail if the tree changed (generated code is never hand-edited), or cites a document outside the repo.
	@git diff --exit-code -- . && test -z "$$(git status --porcelain --untracked-files=all -- api config charts)" || \
	  { git status --short -- api config charts; echo "generated files are out of date: run 'make generate' and commit"; exit 1; }
	@hack/verify-refs.sh
	@# The chart's RBAC and the generated config/rbac agree (the chart covers every marker,
	@# grants the fixed roles exactly, and no cluster-wide write the markers do not ask for).
	@# test/chart's TestMain starts the real API server and renders with the pinned helm, so
	@# verify builds both first: on a fresh machine it runs before make test has built them.
	@$(MAKE) --no-print-directory control-plane
	@$(MAKE) --no-print-directory -s $(BIN)/helm
	@KUBEBUILDER_ASSETS=$(K8S_BIN) go test -count=1 -run 'TestRBACCoversGeneratedRole|TestRBACLeastPrivilege|TestMemberRole|TestSliceWriterRole' ./test/chart/

##@ Image

VERSION ?= $(shell git describe --tags --always --dirty 2>/dev/null || echo dev)
IMAGE_ARCHES ?= amd64 arm64
IMAGE_BINS := podipc-controller podipc-sidecar podipc

.PHONY: binaries
binaries: ## Build the image's static binaries for each of IMAGE_ARCHES into bin/images/<arch>/.
	@for arch in $(IMAGE_ARCHES); do \
	  CGO_ENABLED=0 GOOS=linux GOARCH=$$arch go build -trimpath \
	    -ldflags "-s -w -X github.com/podipc/podipc/pkg/sidecar.Version=$(VERSION)" \
	    -o $(BIN)/images/$$arch/ $(addprefix ./cmd/,$(IMAGE_BINS)) || exit 1; \
	done

# The same image the Dockerfile describes (test/image checks they agree), as a docker-archive
# tarball per architecture, without a Docker engine.
.PHONY: image
image: binaries ## Build bin/images/podipc-$(VERSION)-<arch>.tar with hack/image (no Docker needed).
	@test -d hack/image || { echo "hack/image (the tarball builder) is not on this branch yet"; exit 1; }
	@for arch in $(IMAGE_ARCHES); do \
	  go run ./hack/image --arch $$arch --user 65532:65532 --entrypoint /podipc-controller \
	    --tag podipc:$(VERSION) --out $(BIN)/images/podipc-$(VERSION)-$$arch.tar \
	    $(foreach b,$(IMAGE_BINS),$(BIN)/images/$$arch/$(b)=/$(b)) || exit 1; \
	  ls -l $(BIN)/images/podipc-$(VERSION)-$$arch.tar; \
	done

##@ Build dependencies (built from source, cached under bin/)

.PHONY: control-plane
control-plane: ## Build kube-apiserver, kubectl and etcd from source into bin/k8s/.
	hack/k8s/build.sh kube-apiserver kubectl etcd >/dev/null

.PHONY: promtool
promtool: ## Build promtool into bin/, for test/chart's `promtool check rules` of the chart's alerts.
	hack/promtool/build.sh

.PHONY: coredns
coredns: ## Build CoreDNS into bin/, the e2e node's cluster DNS (hack/node/up.sh builds it when missing).
	hack/coredns/build.sh

.PHONY: tools
tools: $(BIN)/golangci-lint $(BIN)/controller-gen $(BIN)/helm ## Build the pinned tools into bin/.

$(BIN)/%: $(TOOLS_MOD)
	@mkdir -p $(BIN)
	cd hack/tools && go build -o $@ $$(go list tool | grep -E '/$*$$|/$*/v[0-9]+$$' | head -n1)

##@ End to end (root, Linux: a real kubelet + containerd node, see hack/node/)

.PHONY: e2e
e2e: ## Bring up a real single-node cluster, run the e2e suite, tear it down (needs root).
	hack/node/e2e.sh

.PHONY: e2e-faults
e2e-faults: ## Bring up the e2e node, run the fault-injection suite (e2e/faults), tear it down (needs root).
	E2E_SUITES=faults hack/node/e2e.sh

.PHONY: e2e-all
e2e-all: ## The journey and the fault suite on one bring-up of the e2e node, as CI runs them.
	E2E_SUITES="journey faults" hack/node/e2e.sh

.PHONY: node-up
node-up: ## Bring up the e2e node and leave it running (KUBECONFIG in /var/tmp/podipc-e2e/e2e.env).
	hack/node/up.sh

.PHONY: node-down
node-down: ## Tear down the e2e node and check that nothing is left.
	hack/node/down.sh
