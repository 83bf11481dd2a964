#!/usr/bin/env bash
# make e2e: brings up the real node, runs the e2e suite against it and always tears it down
# (also on failure and Ctrl-C); the teardown checks that nothing of ours is left on the machine.
# Exit status: the suite's, or 1 if the teardown left something behind.
#
#   E2E_TEST_FLAGS='-run TestJob'   extra flags for go test
#   E2E_SUITES='journey faults'     the suites to run on the one node, in order: journey (./e2e,
#                                   tag e2e; the default) and faults (./e2e/faults, tag e2efaults)
set -euo pipefail
# shellcheck source=hack/node/lib.sh
source "$(dirname "$0")/lib.sh"

require_root
take_lock
if [ -e "$STATE" ]; then
  die "$STATE exists (a 'make node-up' cluster, or a failed teardown): run 'make node-down' first"
fi

rc=0
teardown() {
  local keep=0
  [ "$rc" = 0 ] || keep=1
  # A fault the suite could not undo (the test binary killed by its timeout) goes first.
  "$ROOT/hack/node/fault.sh" restore >/dev/null 2>&1 || true
  if ! PODIPC_E2E_KEEP_LOGS=$keep "$ROOT/hack/node/down.sh"; then
    [ "$rc" != 0 ] || rc=1
  fi
  exit "$rc"
}
trap teardown EXIT
trap 'rc=130; exit 130' INT TERM

start=$SECONDS
PODIPC_E2E_NO_TRAP=1 "$ROOT/hack/node/up.sh" || { rc=$?; exit "$rc"; }

set -a
# shellcheck disable=SC1091
source "$STATE/e2e.env"
set +a
for s in ${E2E_SUITES:-journey}; do
  case $s in
    journey) tags=e2e pkg=./e2e/... ;;
    faults) tags=e2efaults pkg=./e2e/faults/... ;;
    *) die "unknown suite $s (E2E_SUITES: journey, faults)" ;;
  esac
  log "=== e2e suite $s"
  suite=$SECONDS
  # shellcheck disable=SC2086
  (cd "$ROOT" && go test -tags "$tags" -count=1 -timeout 20m -v ${E2E_TEST_FLAGS:-} "$pkg") || rc=$?
  log "=== e2e suite $s done in $((SECONDS - suite))s (rc=$rc); whole run so far $((SECONDS - start))s"
  [ "$rc" = 0 ] || break
done
