#!/usr/bin/env bash
# make bench-nodeipc: node-ipc events/s, Go<->Go (pkg/ipc, BenchmarkNodeIPCEvents) against
# Node<->Node (node-ipc 9.2.1, hack/nodeipc/bench.cjs), same event shape and payload size,
# same transport. The Go and Node runs alternate per transport and round, so a busy shared
# machine weighs on both alike; the per-round ratio is what to compare, not the absolutes.
set -euo pipefail
cd "$(dirname "$0")/../.."

EVENTS=${EVENTS:-200000}   # events per run, both sides
PAYLOAD=64                 # bytes; BenchmarkNodeIPCEvents uses the same (nodeIPCBenchPayloadBytes)
ROUNDS=${ROUNDS:-3}

command -v node >/dev/null || { echo "bench-nodeipc: node is required (hack/ci-deps.sh installs it)" >&2; exit 1; }
# The compatibility test installs the pinned node-ipc into bin/npm (cached); one case is enough.
go test -count=1 -run '^TestNodeIPCCompat$/^node-ipc-9.2.1$/^unix$/^go-server$/^events$' ./pkg/ipc >/dev/null
module=$PWD/bin/npm/node-ipc-9.2.1/node_modules/node-ipc
go test -c -o "${TMPDIR:-/tmp}/podipc-ipc-bench.test" ./pkg/ipc
trap 'rm -f "${TMPDIR:-/tmp}/podipc-ipc-bench.test"' EXIT

echo "node-ipc events/s, $EVENTS events of {\"type\":\"bench\",\"data\":{\"seq\":i,\"payload\":<$PAYLOAD bytes>}} per run"
echo "$(go version | cut -d' ' -f3), node $(node --version), node-ipc 9.2.1, $(nproc) CPUs, load $(cut -d' ' -f1-3 /proc/loadavg)"
echo "ratio = Go<->Go / Node<->Node, by events/s and by CPU time per event (both ends)"
for round in $(seq "$ROUNDS"); do
  for transport in unix tcp; do
    node_out=$(node hack/nodeipc/bench.cjs "$module" "$transport" "$EVENTS" "$PAYLOAD")
    node_eps=$(sed -E 's/.*"eventsPerSec":([0-9.]+).*/\1/' <<<"$node_out")
    node_cpu=$(sed -E 's/.*"cpuMicrosPerEvent":([0-9.]+).*/\1/' <<<"$node_out")
    printf 'round %d  %-4s  Node<->Node node-ipc     %9.0f events/s  %6.2f cpu-µs/event\n' \
      "$round" "$transport" "$node_eps" "$node_cpu"
    (cd pkg/ipc && "${TMPDIR:-/tmp}/podipc-ipc-bench.test" -test.run '^$' \
      -test.bench "^BenchmarkNodeIPCEvents\$/^$transport\$" -test.benchtime "${EVENTS}x") |
      awk -v r="$round" -v t="$transport" -v ne="$node_eps" -v nc="$node_cpu" '
        /^BenchmarkNodeIPCEvents/ {
          split($1, name, "/"); sub(/-[0-9]+$/, "", name[3])
          for (i = 2; i < NF; i++) {
            if ($(i+1) == "events/s") eps = $i
            if ($(i+1) == "cpu-µs/event") cpu = $i
          }
          printf "round %d  %-4s  Go<->Go pkg/ipc %-8s %9.0f events/s  %6.2f cpu-µs/event  ratio %5.1fx events/s, %5.1fx cpu\n",
            r, t, name[3], eps, cpu, eps / ne, nc / cpu
        }'
  done
done
