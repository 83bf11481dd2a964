#!/usr/bin/env bash
# Builds promtool (Prometheus's rule checker) from the Go module proxy into bin/promtool,
# once. test/chart runs `promtool check rules` on the chart's PrometheusRule with it.
#
# promtool is not a pinned tool of hack/tools: it pulls in most of Prometheus, and its
# module's go.mod has exclude directives, so `go install …@version` refuses it. It is
# built in a throw-away module instead (several minutes cold).
set -euo pipefail

PROMETHEUS_VERSION=v0.308.0 # Prometheus v3.8.0
root=$(cd "$(dirname "$0")/../.." && pwd)
out="$root/bin/promtool"
[ -x "$out" ] && exit 0

mod=$(mktemp -d)
trap 'rm -rf "$mod"' EXIT
cd "$mod"
printf 'module promtool\n\ngo 1.26.0\n' >go.mod
echo "building promtool $PROMETHEUS_VERSION (first time only; minutes on a cold machine)" >&2
go get "github.com/prometheus/prometheus/cmd/promtool@$PROMETHEUS_VERSION"
CGO_ENABLED=0 go build -trimpath -ldflags "-s -w" -o "$out.tmp" github.com/prometheus/prometheus/cmd/promtool
mv "$out.tmp" "$out"
echo "built $out" >&2
