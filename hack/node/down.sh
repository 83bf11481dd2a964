#!/usr/bin/env bash
# Tears down the cluster of hack/node/up.sh and leaves the machine as it was found: stops every
# recorded daemon (CoreDNS among them), kills containerd's tasks and shims, unmounts everything
# under $STATE, removes the CNI network namespaces, the bridge, the kubepods cgroups and the
# netfilter tables the kubelet and kube-proxy created, restores the kernel settings, deletes
# $STATE, and finally checks that nothing of ours is left — no process, no socket listening on
# the node address, … (exit 1 and a list if something is).
#
# Safe to run twice and after a half-finished bring-up. PODIPC_E2E_KEEP_LOGS=1 keeps
# $STATE/logs (moved to $STATE.logs) for a failed run.
set -uo pipefail
# shellcheck source=hack/node/lib.sh
source "$(dirname "$0")/lib.sh"

require_root
# A second Ctrl-C must not leave a half-torn-down machine: the teardown ignores SIGINT (and its
# commands inherit that); every step is bounded, so it ends on its own.
trap '' INT
take_lock

if [ ! -d "$STATE" ]; then
  log "nothing to tear down ($STATE does not exist)"
  exit 0
fi

# stop NAME… stops the recorded daemons one after the other, in the order given (the API
# server shuts down cleanly only while etcd still runs): SIGTERM, up to 15 s, then SIGKILL.
stop() {
  local name pid deadline
  for name in "$@"; do
    [ -f "$(pidfile "$name")" ] || continue
    pid=$(cat "$(pidfile "$name")")
    alive "$pid" || continue
    kill -TERM "$pid" 2>/dev/null
    deadline=$((SECONDS + 15))
    while alive "$pid" && [ $SECONDS -lt $deadline ]; do sleep 0.1; done
    if alive "$pid"; then
      log "$name (pid $pid) ignored SIGTERM for 15s; killing"
      kill -KILL "$pid" 2>/dev/null
    fi
  done
}

# containers kills every task of our containerd and deletes tasks and containers, so that the
# shims exit and unmount the rootfs (shims outlive containerd otherwise).
containers() {
  [ -S "$CTR_SOCK" ] || return 0
  local id
  for id in $(ctr_k8s tasks list -q 2>/dev/null); do
    ctr_k8s tasks kill -a -s SIGKILL "$id" >/dev/null 2>&1
  done
  sleep 0.5
  for id in $(ctr_k8s tasks list -q 2>/dev/null); do
    ctr_k8s tasks delete -f "$id" >/dev/null 2>&1
  done
  for id in $(ctr_k8s containers list -q 2>/dev/null); do
    ctr_k8s containers delete "$id" >/dev/null 2>&1
  done
}

shims() {
  local pid
  for pid in $(shim_pids); do kill -KILL "$pid" 2>/dev/null; done
  # Whatever is still in the pod cgroups (a container whose shim was killed) goes too.
  for pid in $(container_pids); do kill -KILL "$pid" 2>/dev/null; done
  sleep 0.3
}

mounts() {
  local m
  # Deepest first; lazy unmount as the last resort for a busy mount.
  for m in $(our_mounts | awk '{print length($0) " " $0}' | sort -rn | cut -d' ' -f2-); do
    umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null || log "cannot unmount $m"
  done
  local ns
  for ns in /run/netns/cni-*; do
    [ -e "$ns" ] || continue
    grep -qx "$(basename "$ns")" "$STATE/baseline/netns" 2>/dev/null && continue
    rm -f "$ns"
  done
}

network() {
  # The e2e/faults suite's impairments (hack/node/fault.sh), if a run was cut short.
  nft delete table netdev podipc_fault 2>/dev/null || true
  if ip link show "$BRIDGE" >/dev/null 2>&1; then
    ip link delete "$BRIDGE"
  fi
}

# netfilter removes what kube-proxy, the kubelet and the portmap plugin add: kube-proxy's own
# "kube-proxy" tables, and the KUBE-*/CNI-* chains in the iptables-nft tables. An iptables table
# that did not exist before up.sh and holds nothing else now is deleted too. Anything else, even
# if new, is not ours: it is left alone (and the final check reports the difference).
netfilter() {
  [ -f "$STATE/baseline/nft-tables" ] || return 0
  local family ipt table chain
  for family in ip ip6; do
    if nft list table "$family" kube-proxy >/dev/null 2>&1 &&
      ! grep -qxF "table $family kube-proxy" "$STATE/baseline/nft-tables"; then
      nft delete table "$family" kube-proxy || log "cannot delete nft table $family kube-proxy"
    fi
  done
  for ipt in iptables ip6tables; do
    family=ip
    [ "$ipt" = ip6tables ] && family=ip6
    for table in filter nat mangle raw security; do
      nft list table "$family" "$table" >/dev/null 2>&1 || continue
      # The fault suite's NFQUEUE rules (hack/node/fault.sh delay), if a run was cut short.
      $ipt -t "$table" -S 2>/dev/null | grep -E '^-A FORWARD .*-j NFQUEUE --queue-num 100 ' | while read -r _ rule; do
        # shellcheck disable=SC2086
        $ipt -t "$table" -D $rule 2>/dev/null
      done
      # Rules jumping to our chains first, then the chains themselves.
      $ipt -t "$table" -S 2>/dev/null | grep -E '^-A .* -j (KUBE|CNI)-' | while read -r _ rule; do
        # shellcheck disable=SC2086
        $ipt -t "$table" -D $rule 2>/dev/null
      done
      for chain in $($ipt -t "$table" -S 2>/dev/null | awk '$1=="-N" && $2 ~ /^(KUBE|CNI)-/ {print $2}'); do
        $ipt -t "$table" -F "$chain" 2>/dev/null
      done
      for chain in $($ipt -t "$table" -S 2>/dev/null | awk '$1=="-N" && $2 ~ /^(KUBE|CNI)-/ {print $2}'); do
        $ipt -t "$table" -X "$chain" 2>/dev/null
      done
      if ! grep -qxF "table $family $table" "$STATE/baseline/nft-tables" &&
        [ -z "$($ipt -t "$table" -S 2>/dev/null | grep -vE '^-P [A-Z]+ ACCEPT$')" ]; then
        nft delete table "$family" "$table" || log "cannot delete nft table $family $table"
      fi
    done
  done
}

cgroups() {
  local cg
  for cg in $(our_cgroups); do
    find "$cg" -depth -type d -exec rmdir {} \; 2>/dev/null
    [ -d "$cg" ] && log "cannot remove cgroup $cg"
  done
  return 0
}

restore() {
  local kv p
  if [ -f "$STATE/baseline/sysctl" ]; then
    while read -r kv; do
      [ "$(sysctl -n "${kv%%=*}" 2>/dev/null)" = "${kv#*=}" ] || sysctl -q -w "$kv" >/dev/null
    done <"$STATE/baseline/sysctl"
  fi
  if [ -f "$STATE/baseline/absent-paths" ]; then
    while read -r p; do
      [ -n "$p" ] && [ -e "$p" ] && rm -rf "$p"
    done <"$STATE/baseline/absent-paths"
  fi
}

# check lists what is still ours; it runs before $STATE is deleted because the baseline is there.
check() {
  local bad=0 x
  for x in $(our_pids); do log "LEFT: process $x ($(tr '\0' ' ' <"/proc/$x/cmdline" 2>/dev/null))"; bad=1; done
  for x in $(our_mounts); do log "LEFT: mount $x"; bad=1; done
  # A socket bound to the node address outlives the address (CoreDNS's port 53 among them).
  while read -r x; do [ -n "$x" ] && { log "LEFT: listening socket $x"; bad=1; }; done < <(node_listeners)
  ip link show "$BRIDGE" >/dev/null 2>&1 && { log "LEFT: bridge $BRIDGE"; bad=1; }
  for x in /run/netns/cni-*; do
    [ -e "$x" ] && ! grep -qx "$(basename "$x")" "$STATE/baseline/netns" 2>/dev/null && { log "LEFT: netns $x"; bad=1; }
  done
  for x in $(our_cgroups); do log "LEFT: cgroup $x"; bad=1; done
  if [ -f "$STATE/baseline/nft-ruleset" ] && ! diff -q <(nft list ruleset) "$STATE/baseline/nft-ruleset" >/dev/null; then
    log "LEFT: netfilter ruleset differs from before up.sh:"
    diff <(nft list ruleset) "$STATE/baseline/nft-ruleset" | head -40 >&2
    bad=1
  fi
  # Queueing disciplines (tc): the pods' veths are gone with theirs; any other must be as before.
  if [ -f "$STATE/baseline/tc-qdiscs" ] && ! diff -q <(tc_qdiscs) "$STATE/baseline/tc-qdiscs" >/dev/null; then
    log "LEFT: tc qdiscs differ from before up.sh:"
    diff <(tc_qdiscs) "$STATE/baseline/tc-qdiscs" | head -20 >&2
    bad=1
  fi
  if [ -f "$STATE/baseline/sysctl" ]; then
    while read -r x; do
      [ "$(sysctl -n "${x%%=*}" 2>/dev/null)" = "${x#*=}" ] || { log "LEFT: sysctl ${x%%=*}=$(sysctl -n "${x%%=*}") (was ${x#*=})"; bad=1; }
    done <"$STATE/baseline/sysctl"
  fi
  if [ -f "$STATE/baseline/absent-paths" ]; then
    while read -r x; do [ -n "$x" ] && [ -e "$x" ] && { log "LEFT: path $x"; bad=1; }; done <"$STATE/baseline/absent-paths"
  fi
  return $bad
}

start=$SECONDS
log "=== teardown"
# Stop the kubelet and kube-proxy first so nothing restarts containers or rewrites rules.
# netdelay: the fault suite's packet delayer (hack/node/fault.sh), if a run was cut short.
stop netdelay kube-proxy kubelet
containers
stop containerd
shims
stop coredns kube-scheduler kube-controller-manager kube-apiserver etcd
mounts
network
netfilter
cgroups
restore

rc=0
if ! check; then
  log "TEARDOWN INCOMPLETE: the items above are still on the machine ($STATE kept for inspection)"
  exit 1
fi
if [ "${PODIPC_E2E_KEEP_LOGS:-}" = 1 ]; then
  rm -rf "$STATE.logs" && mv "$STATE/logs" "$STATE.logs" && log "logs kept in $STATE.logs"
fi
rm -rf "$STATE"
[ -e "$STATE" ] && { log "LEFT: $STATE"; rc=1; }
log "=== teardown done in $((SECONDS - start))s; nothing of ours is left"
exit $rc
