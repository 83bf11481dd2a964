#!/usr/bin/env bash
# Fault injection on the e2e node, for the e2e/faults suite (root). Every fault touches only
# what hack/node/up.sh created: the host ends of pod veths enslaved to the bridge $BRIDGE, the
# node's own daemons (by recorded PID) and containers of its containerd. `restore` undoes every
# fault this script can make; the suite calls it after each fault and e2e.sh before teardown.
#
#   fault.sh impair POD_IP [loss=PCT] [dup=PCT]   lose/duplicate packets on the pod's veth
#   fault.sh delay POD_IP DELAY JITTER [REORDER%]  delay (and reorder) the packets through it
#   fault.sh link POD_IP down|up                  the pod's veth down or up
#   fault.sh kill CONTAINER_ID                    SIGKILL a container's process (containerd)
#   fault.sh stop DAEMON | start DAEMON           stop a node daemon / start it again as it ran
#   fault.sh restore                              undo all of the above
#
# There is no `tc netem` here when the kernel lacks sch_netem (no module support on the CI VM):
# loss and duplication are made with an nftables netdev table instead (numgen random; dup to),
# delay and reordering by hack/netdelay behind an iptables NFQUEUE rule on the veth's bridge
# port (physdev), with --queue-bypass so that packets pass if netdelay is not running.
set -euo pipefail
# shellcheck source=hack/node/lib.sh
source "$(dirname "$0")/lib.sh"

# FAULT_TABLE is the one nftables table faults live in (netdev family: chains bound to veths).
FAULT_TABLE=podipc_fault
# DELAY_QUEUE is the NFQUEUE number netdelay serves.
DELAY_QUEUE=100

require_root
[ -d "$STATE" ] || die "no e2e node ($STATE does not exist)"
mkdir -p "$STATE/fault"

# veth_of POD_IP prints the host end of the pod's veth, and refuses any interface that is not
# enslaved to our bridge: faults never touch another interface.
veth_of() {
  local ip=$1 ns idx dev
  for ns in /run/netns/cni-*; do
    [ -e "$ns" ] || continue
    if ip -n "$(basename "$ns")" -o -4 addr show dev eth0 2>/dev/null | grep -q " inet $ip/"; then
      idx=$(ip -n "$(basename "$ns")" -o link show dev eth0 | sed -n 's/.*eth0@if\([0-9]*\).*/\1/p')
      dev=$(ip -o link show | awk -F': ' -v i="$idx" '$1 == i {print $2}' | cut -d@ -f1)
      [ -n "$dev" ] || die "no host veth with index $idx for $ip"
      [ "$(basename "$(readlink -f "/sys/class/net/$dev/master")")" = "$BRIDGE" ] ||
        die "$dev is not on $BRIDGE: refusing to touch it"
      echo "$dev"
      return 0
    fi
  done
  die "no pod network namespace holds $ip"
}

impair() {
  local dev loss=0 dup=0 kv
  dev=$(veth_of "$1")
  shift
  for kv in "$@"; do
    case $kv in
      loss=*) loss=${kv#loss=} ;;
      dup=*) dup=${kv#dup=} ;;
      *) die "impair: unknown $kv" ;;
    esac
  done
  nft add table netdev "$FAULT_TABLE"
  # ingress of the host end: packets the pod sends; egress: packets sent to the pod.
  nft add chain netdev "$FAULT_TABLE" "in_$dev" "{ type filter hook ingress device \"$dev\" priority 0; }"
  nft add chain netdev "$FAULT_TABLE" "out_$dev" "{ type filter hook egress device \"$dev\" priority 0; }"
  if [ "$loss" != 0 ]; then
    nft add rule netdev "$FAULT_TABLE" "in_$dev" numgen random mod 100 "<" "$loss" drop
    nft add rule netdev "$FAULT_TABLE" "out_$dev" numgen random mod 100 "<" "$loss" drop
  fi
  if [ "$dup" != 0 ]; then
    nft add rule netdev "$FAULT_TABLE" "out_$dev" numgen random mod 100 "<" "$dup" dup to "\"$dev\""
  fi
  log "fault: $dev ($1) loss=$loss% dup=$dup%"
}

delay() {
  local dev bin=$STATE/fault/netdelay dir
  dev=$(veth_of "$1")
  [ -x "$bin" ] || (cd "$ROOT" && CGO_ENABLED=0 go build -o "$bin" ./hack/netdelay)
  # Bridged packets reach iptables only with this on (down.sh restores it).
  sysctl -q -w net.bridge.bridge-nf-call-iptables=1
  if ! { [ -f "$(pidfile netdelay)" ] && alive "$(cat "$(pidfile netdelay)")"; }; then
    setsid "$bin" -queue "$DELAY_QUEUE" -delay "$2" -jitter "$3" -reorder "${4:-0}" \
      >>"$STATE/logs/netdelay.log" 2>&1 </dev/null 9>&- &
    echo $! >"$(pidfile netdelay)"
  fi
  for dir in in out; do
    iptables -t mangle -I FORWARD -m physdev "--physdev-$dir" "$dev" -j NFQUEUE --queue-num "$DELAY_QUEUE" --queue-bypass
    echo "$dir $dev" >>"$STATE/fault/queued"
  done
  log "fault: $dev ($1) delay $2 ± $3, reorder ${4:-0}%"
}

link() {
  local dev
  dev=$(veth_of "$1")
  echo "$dev" >>"$STATE/fault/links"
  ip link set dev "$dev" "$2"
  log "fault: $dev link $2"
}

kill_container() {
  ctr_k8s tasks kill -s SIGKILL "$1" >/dev/null
  log "fault: container $1 killed"
}

# stop_daemon records the daemon's command line, so start_again runs it exactly as before.
stop_daemon() {
  local name=$1 pid
  pid=$(cat "$(pidfile "$name")")
  alive "$pid" || die "$name is not running"
  cp "/proc/$pid/cmdline" "$STATE/fault/$name.cmdline"
  kill -TERM "$pid"
  for _ in $(seq 150); do alive "$pid" || break; sleep 0.1; done
  alive "$pid" && kill -KILL "$pid"
  log "fault: $name (pid $pid) stopped"
}

start_again() {
  local name=$1 f=$STATE/fault/$1.cmdline argv
  [ -f "$f" ] || die "$name was not stopped by fault.sh"
  mapfile -d '' argv <"$f"
  setsid "${argv[@]}" >>"$STATE/logs/$name.log" 2>&1 </dev/null 9>&- &
  echo $! >"$(pidfile "$name")"
  echo "daemon $name $!" >>"$STATE/created"
  rm -f "$f"
  log "fault: $name started again (pid $!)"
}

restore() {
  local f dev dir
  nft delete table netdev "$FAULT_TABLE" 2>/dev/null || true
  if [ -f "$STATE/fault/queued" ]; then
    sort -u "$STATE/fault/queued" | while read -r dir dev; do
      iptables -t mangle -D FORWARD -m physdev "--physdev-$dir" "$dev" -j NFQUEUE --queue-num "$DELAY_QUEUE" --queue-bypass 2>/dev/null || true
    done
    rm -f "$STATE/fault/queued"
  fi
  if [ -f "$(pidfile netdelay)" ]; then
    kill -TERM "$(cat "$(pidfile netdelay)")" 2>/dev/null || true
    rm -f "$(pidfile netdelay)"
  fi
  if [ -f "$STATE/fault/links" ]; then
    sort -u "$STATE/fault/links" | while read -r dev; do
      [ "$(basename "$(readlink -f "/sys/class/net/$dev/master" 2>/dev/null)")" = "$BRIDGE" ] &&
        ip link set dev "$dev" up
    done
    rm -f "$STATE/fault/links"
  fi
  # etcd before the API server: daemons start again in their start order.
  for name in "${DAEMONS[@]}"; do
    f=$STATE/fault/$name.cmdline
    [ -f "$f" ] && start_again "$name"
  done
  return 0
}

case ${1:-} in
  impair) shift; impair "$@" ;;
  delay) [ $# -ge 4 ] || die "usage: delay POD_IP DELAY JITTER [REORDER]"; shift; delay "$@" ;;
  link) [ $# = 3 ] || die "usage: link POD_IP down|up"; link "$2" "$3" ;;
  kill) [ $# = 2 ] || die "usage: kill CONTAINER_ID"; kill_container "$2" ;;
  stop) [ $# = 2 ] || die "usage: stop DAEMON"; stop_daemon "$2" ;;
  start) [ $# = 2 ] || die "usage: start DAEMON"; start_again "$2" ;;
  restore) restore ;;
  *) die "usage: fault.sh impair|delay|link|kill|stop|start|restore …" ;;
esac
