# shellcheck shell=bash
# Shared settings and helpers for the real single-node cluster of the e2e suite
# (hack/node/up.sh, down.sh, e2e.sh). Sourced, never run.
#
# Everything the cluster creates lives under $STATE or on the bridge $BRIDGE, which holds the
# only addresses any daemon listens on: the pod gateway and a /32 node address. Nothing listens
# on loopback (other engineers' tests use it) or on the machine's external interface.

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
STATE=${PODIPC_E2E_STATE:-/var/tmp/podipc-e2e}
# The lock is a flock on an existing directory, not a lock file: a lock file would be left on the
# machine after teardown. Machine-wide on purpose, since all runs share the bridge and addresses.
LOCK=${PODIPC_E2E_LOCK:-/var/tmp}
KUBE_VERSION=v1.37.2
K8S_BIN=$ROOT/bin/k8s/$KUBE_VERSION

BRIDGE=podipc0
NODE_IP=10.10.0.1
POD_CIDR=10.244.0.0/24
POD_GW=10.244.0.1
SERVICE_CIDR=10.97.0.0/24
KUBERNETES_SVC_IP=10.97.0.1
# The kube-dns Service's ClusterIP: the kubelet gives it to pods as their nameserver, kube-proxy
# forwards it to CoreDNS on $NODE_IP:53 (hack/node/README.md, "Cluster DNS").
CLUSTER_DNS=10.97.0.10
CLUSTER_DOMAIN=cluster.local
COREDNS_BIN=$ROOT/bin/coredns
NODE_NAME=podipc-e2e
CLUSTER_NAME=podipc-e2e
PAUSE_IMAGE=podipc-e2e/pause:3.10

CTR_SOCK=$STATE/run/containerd/containerd.sock
KUBECONFIG_ADMIN=$STATE/pki/admin.kubeconfig

# Daemons in start order; teardown stops them in reverse.
DAEMONS=(containerd etcd kube-apiserver kube-controller-manager kube-scheduler coredns kubelet kube-proxy)

# Machine paths that containerd 1.6, the CNI plugins or the kubelet create at fixed places
# whatever we configure. Whichever did not exist before up.sh is removed by down.sh.
# (/var/lib/kubelet: the device-plugin socket dir is fixed there whatever --root-dir says.)
FIXED_PATHS=(/run/containerd /var/lib/cni /run/netns /var/log/containers /var/log/pods /opt/containerd /run/runc
  /var/lib/kubelet /etc/kubernetes /var/run/kubernetes)

# Kernel settings that the bridge plugin, the kubelet (kernel tunables) or kube-proxy may change;
# recorded by up.sh and restored by down.sh.
SYSCTLS=(
  net.ipv4.ip_forward net.ipv4.conf.all.forwarding net.ipv4.conf.default.forwarding
  net.ipv4.conf.all.route_localnet net.bridge.bridge-nf-call-iptables
  net.bridge.bridge-nf-call-ip6tables net.netfilter.nf_conntrack_max
  net.netfilter.nf_conntrack_tcp_timeout_established net.netfilter.nf_conntrack_tcp_timeout_close_wait
  vm.overcommit_memory vm.panic_on_oom kernel.panic kernel.panic_on_oops
  kernel.keys.root_maxkeys kernel.keys.root_maxbytes
)

log() { printf '%s [node] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

# phase NAME CMD… runs one phase and prints how long it took.
phase() {
  local name=$1 start=$SECONDS
  shift
  log "=== $name"
  "$@"
  log "=== $name done in $((SECONDS - start))s"
}

require_root() {
  if [ "$(uname -s)" != Linux ] || [ "$(id -u)" != 0 ]; then
    echo "the e2e node needs root on Linux (it runs containerd, a kubelet and a CNI bridge):" \
      "run 'sudo make e2e' on a Linux machine" >&2
    exit 2
  fi
}

# take_lock makes sure two runs never overlap. A parent (e2e.sh) that already holds the lock
# exports PODIPC_E2E_LOCKED=1 so that up.sh and down.sh do not wait on their own parent.
take_lock() {
  [ "${PODIPC_E2E_LOCKED:-}" = 1 ] && return 0
  exec 9<"$LOCK"
  if ! flock -n 9; then
    log "waiting for another e2e run to release $LOCK"
  fi
  if ! flock -w "${PODIPC_E2E_LOCK_WAIT:-600}" 9; then
    die "another e2e run holds $LOCK"
  fi
  export PODIPC_E2E_LOCKED=1
}

pidfile() { echo "$STATE/pids/$1.pid"; }

# alive PID: the process exists and is not a zombie.
alive() {
  [ -d "/proc/$1" ] && [ "$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null)" != Z ]
}

# start_daemon NAME BINARY ARGS… starts a daemon in its own session, logging to logs/NAME.log.
start_daemon() {
  local name=$1
  shift
  # 9>&-: the daemon must not inherit the lock, or it would hold it until teardown kills it.
  setsid "$@" >"$STATE/logs/$name.log" 2>&1 </dev/null 9>&- &
  echo $! >"$(pidfile "$name")"
  echo "daemon $name $!" >>"$STATE/created"
}

# wait_for WHAT SECONDS CMD… retries CMD every 0.5 s until it succeeds.
wait_for() {
  local what=$1 timeout=$2 deadline
  shift 2
  deadline=$((SECONDS + timeout))
  until "$@" >/dev/null 2>&1; do
    if [ $SECONDS -ge $deadline ]; then
      log "timed out after ${timeout}s waiting for $what"
      return 1
    fi
    sleep 0.5
  done
}

kubectl_admin() { "$K8S_BIN/kubectl" --kubeconfig "$KUBECONFIG_ADMIN" "$@"; }
ctr_k8s() { ctr --address "$CTR_SOCK" -n k8s.io "$@"; }

# shim_pids lists containerd shims started for our containerd: shims outlive containerd and
# are re-parented to init, so they are found by our own socket path in their command line.
shim_pids() {
  local p cmd
  for p in /proc/[0-9]*; do
    cmd=$(tr '\0' ' ' 2>/dev/null <"$p/cmdline") || continue
    case $cmd in
      *containerd-shim*"-address $CTR_SOCK "*) echo "${p#/proc/}" ;;
    esac
  done
}

# container_pids lists whatever runs in the kubepods cgroups: container processes.
container_pids() {
  local cg
  for cg in $(our_cgroups); do
    find "$cg" -name cgroup.procs -exec cat {} + 2>/dev/null
  done | sort -un
}

# our_pids lists every live process of ours: recorded daemons, shims and containers.
our_pids() {
  local f p
  for f in "$STATE"/pids/*.pid; do
    [ -f "$f" ] || continue
    p=$(cat "$f")
    if alive "$p"; then echo "$p"; fi
  done
  shim_pids
  container_pids
}

our_mounts() {
  awk -v s="$STATE/" '$2 ~ "^"s || $2 ~ "^/run/netns/cni-" {print $2}' /proc/self/mounts
}

our_cgroups() {
  local c
  for c in /sys/fs/cgroup/*/; do
    [ -d "$c/kubepods" ] && echo "$c"kubepods
  done
  return 0
}

nft_tables() { nft list tables 2>/dev/null | sort; }

# tc_qdiscs lists the machine's queueing disciplines (fault injection may add some on veths).
tc_qdiscs() { tc qdisc show 2>/dev/null | sort; }

# node_listeners lists the TCP and UDP sockets listening on $NODE_IP: only our daemons bind it,
# and a socket outlives the address (after teardown there must be none).
node_listeners() {
  ss -Hlntu 2>/dev/null | awk -v ip="$NODE_IP" 'index($5, ip ":") == 1'
}

# dns_answers SERVER asks SERVER (DNS over TCP, port 53) for the A record of the kubernetes
# Service, kubernetes.default.svc.$CLUSTER_DOMAIN, and succeeds if the one answer is
# $KUBERNETES_SVC_IP. Bash only (/dev/tcp): the node has no dig.
dns_answers() {
  local server=$1 qname='' label n=1 want got
  for label in kubernetes default svc ${CLUSTER_DOMAIN//./ }; do
    qname+=$(printf '\\x%02x' "${#label}")$label
    n=$((n + 1 + ${#label}))
  done
  want=$(printf '%02x' ${KUBERNETES_SVC_IP//./ })
  # The query: a 2-byte length prefix, a header (ID 0x5044, recursion desired, one question),
  # the name, type A, class IN. The reply: a length prefix, then that many bytes (GNU head -c
  # reads no more than it is asked for).
  got=$(timeout 3 bash -c 'exec 3<>"/dev/tcp/$1/53" && printf "$2" >&3 &&
    set -- $(head -c 2 <&3 | od -An -tu1) && head -c $(($1 * 256 + $2)) <&3' _ "$server" \
    "$(printf '\\x00\\x%02x' $((12 + n + 4)))\\x50\\x44\\x01\\x00\\x00\\x01\\x00\\x00\\x00\\x00\\x00\\x00$qname\\x00\\x00\\x01\\x00\\x01" \
    2>/dev/null | od -An -tx1 -v | tr -d ' \n')
  # A response (QR) to our ID, RCODE 0, one answer, whose address (the last 4 bytes: no
  # additional section without EDNS) is the Service IP.
  [ ${#got} -gt 24 ] && [ "${got:0:4}" = 5044 ] && [ $((0x${got:4:1} & 8)) = 8 ] &&
    [ "${got:7:1}" = 0 ] && [ "${got:12:4}" = 0001 ] && [ "${got: -8}" = "$want" ]
}
