#!/usr/bin/env bash
# Builds CoreDNS from the Go module proxy into bin/coredns, once. The e2e node (hack/node/up.sh)
# runs it as a host process so that pods resolve Service names the way real clusters do
# (hack/node/README.md, "Cluster DNS").
#
# `go install module@version` builds CoreDNS in its own module graph, apart from podipc's and
# hack/tools', with the plugins of its release (kubernetes among them). A few minutes cold.
set -euo pipefail

COREDNS_VERSION=v1.15.0
root=$(cd "$(dirname "$0")/../.." && pwd)
out="$root/bin/coredns"
[ -x "$out" ] && exit 0

gobin=$(mktemp -d)
trap 'rm -rf "$gobin"' EXIT
echo "building coredns $COREDNS_VERSION (first time only; minutes on a cold machine)" >&2
start=$SECONDS
mkdir -p "$root/bin"
CGO_ENABLED=0 GOBIN="$gobin" go install -trimpath -ldflags "-s -w" "github.com/coredns/coredns@$COREDNS_VERSION"
mv "$gobin/coredns" "$out"
echo "built $out in $((SECONDS - start))s" >&2
