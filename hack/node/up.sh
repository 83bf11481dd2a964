#!/usr/bin/env bash
# Brings up a real single-node Kubernetes cluster for the e2e suite: etcd, kube-apiserver,
# kube-controller-manager, kube-scheduler, CoreDNS, containerd, kubelet and kube-proxy
# (nftables), all on the bridge podipc0 and under $STATE. Why each setting is what it is: hack/node/README.md,
# "Why the settings are what they are". Tear down with hack/node/down.sh (also run on failure).
#
# Writes $STATE/e2e.env (KUBECONFIG and containerd socket for the Go suite).
set -euo pipefail
# shellcheck source=hack/node/lib.sh
source "$(dirname "$0")/lib.sh"

require_root
take_lock

# A failed bring-up tears down what it made, unless the caller (e2e.sh) owns teardown. "owned"
# is set once the baseline is recorded: before that, $STATE may be another live cluster's.
owned=0
if [ "${PODIPC_E2E_NO_TRAP:-}" != 1 ]; then
  trap 'rc=$?; if [ $rc != 0 ] && [ $owned = 1 ]; then log "bring-up failed (rc=$rc); tearing down"; "$ROOT/hack/node/down.sh" || true; fi' EXIT
  trap 'exit 130' INT TERM
fi

deps() {
  local missing=()
  command -v containerd >/dev/null || missing+=(containerd)
  command -v runc >/dev/null || missing+=(runc)
  [ -x /usr/lib/cni/bridge ] || missing+=(containernetworking-plugins)
  command -v iptables >/dev/null || missing+=(iptables)
  command -v nft >/dev/null || missing+=(nftables)
  command -v conntrack >/dev/null || missing+=(conntrack)
  command -v socat >/dev/null || missing+=(socat)
  command -v ip >/dev/null || missing+=(iproute2)
  command -v openssl >/dev/null || missing+=(openssl)
  command -v flock >/dev/null || missing+=(util-linux)
  if [ ${#missing[@]} -gt 0 ]; then
    log "installing ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi
}

build() {
  "$ROOT/hack/k8s/build.sh" kube-apiserver kube-controller-manager kube-scheduler kubelet kubectl kube-proxy etcd >/dev/null
  "$ROOT/hack/coredns/build.sh"
  mkdir -p "$ROOT/bin/e2e/images"
  (cd "$ROOT" && CGO_ENABLED=0 go build -trimpath -ldflags "-s -w" -o bin/e2e/pause ./hack/image/pause &&
    go build -o bin/e2e/image ./hack/image)
  "$ROOT/bin/e2e/image" --tag "$PAUSE_IMAGE" --entrypoint /pause --user 65535:65535 \
    --out "$ROOT/bin/e2e/images/pause.tar" "$ROOT/bin/e2e/pause=/pause"
}

# baseline records what teardown must restore or must not touch.
baseline() {
  if [ -e "$STATE/created" ]; then
    die "$STATE exists: a previous cluster was not torn down; run hack/node/down.sh"
  fi
  rm -rf "$STATE.logs" # a previous failed run's logs
  mkdir -p "$STATE"/{pids,logs,baseline,pki,etc}
  : >"$STATE/created"
  owned=1
  local k p
  for k in "${SYSCTLS[@]}"; do
    if v=$(sysctl -n "$k" 2>/dev/null); then echo "$k=$v"; fi
  done >"$STATE/baseline/sysctl"
  for p in "${FIXED_PATHS[@]}"; do
    [ -e "$p" ] || echo "$p"
  done >"$STATE/baseline/absent-paths"
  nft_tables >"$STATE/baseline/nft-tables"
  nft list ruleset >"$STATE/baseline/nft-ruleset"
  tc_qdiscs >"$STATE/baseline/tc-qdiscs"
  ls /run/netns 2>/dev/null >"$STATE/baseline/netns" || true
}

network() {
  if ip link show "$BRIDGE" >/dev/null 2>&1; then
    die "bridge $BRIDGE already exists"
  fi
  ip link add "$BRIDGE" type bridge
  echo "bridge $BRIDGE" >>"$STATE/created"
  ip addr add "$POD_GW/24" dev "$BRIDGE"
  ip addr add "$NODE_IP/32" dev "$BRIDGE"
  ip link set "$BRIDGE" up
}

# cert NAME SUBJECT [SANS] issues NAME.crt/NAME.key signed by the cluster CA.
cert() {
  local name=$1 subj=$2 sans=${3:-} ext
  ext=$STATE/pki/$name.ext
  {
    echo "basicConstraints=CA:FALSE"
    echo "keyUsage=critical,digitalSignature,keyEncipherment"
    if [ -n "$sans" ]; then
      echo "extendedKeyUsage=serverAuth,clientAuth"
      echo "subjectAltName=$sans"
    else
      echo "extendedKeyUsage=clientAuth"
    fi
  } >"$ext"
  openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -subj "$subj" \
    -keyout "$STATE/pki/$name.key" -out "$STATE/pki/$name.csr" 2>/dev/null
  openssl x509 -req -in "$STATE/pki/$name.csr" -CA "$STATE/pki/ca.crt" -CAkey "$STATE/pki/ca.key" \
    -CAcreateserial -days 2 -extfile "$ext" -out "$STATE/pki/$name.crt" 2>/dev/null
}

# kubeconfig NAME writes NAME.kubeconfig using the NAME client certificate.
kubeconfig() {
  local name=$1
  cat >"$STATE/pki/$name.kubeconfig" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: $CLUSTER_NAME
  cluster:
    server: https://$NODE_IP:6443
    certificate-authority: $STATE/pki/ca.crt
users:
- name: $name
  user:
    client-certificate: $STATE/pki/$name.crt
    client-key: $STATE/pki/$name.key
contexts:
- name: $name@$CLUSTER_NAME
  context: {cluster: $CLUSTER_NAME, user: $name}
current-context: $name@$CLUSTER_NAME
EOF
}

pki() {
  local pki=$STATE/pki
  openssl req -x509 -new -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 \
    -subj "/CN=podipc-e2e-ca" -keyout "$pki/ca.key" -out "$pki/ca.crt" 2>/dev/null
  cert apiserver "/CN=kube-apiserver" \
    "IP:$NODE_IP,IP:$KUBERNETES_SVC_IP,IP:127.0.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local"
  cert apiserver-kubelet-client "/O=system:masters/CN=kube-apiserver-kubelet-client"
  cert admin "/O=system:masters/CN=podipc-e2e-admin"
  cert kubelet "/O=system:nodes/CN=system:node:$NODE_NAME"
  cert kubelet-serving "/CN=$NODE_NAME" "IP:$NODE_IP,DNS:$NODE_NAME"
  cert controller-manager "/CN=system:kube-controller-manager"
  cert scheduler "/CN=system:kube-scheduler"
  cert kube-proxy "/CN=system:kube-proxy"
  cert coredns "/CN=coredns"
  for n in admin kubelet controller-manager scheduler kube-proxy coredns; do kubeconfig "$n"; done
  openssl genrsa -out "$pki/sa.key" 2048 2>/dev/null
  openssl rsa -in "$pki/sa.key" -pubout -out "$pki/sa.pub" 2>/dev/null
  chmod 600 "$pki"/*.key
}

containerd_up() {
  mkdir -p "$STATE/cni/net.d" "$(dirname "$CTR_SOCK")"
  cat >"$STATE/cni/net.d/10-podipc-e2e.conflist" <<EOF
{
  "cniVersion": "0.4.0",
  "name": "podipc-e2e",
  "plugins": [
    {
      "type": "bridge",
      "bridge": "$BRIDGE",
      "isGateway": true,
      "ipMasq": false,
      "hairpinMode": true,
      "ipam": {
        "type": "host-local",
        "ranges": [[{"subnet": "$POD_CIDR", "gateway": "$POD_GW"}]],
        "routes": [{"dst": "0.0.0.0/0"}],
        "dataDir": "$STATE/cni/ipam"
      }
    },
    {"type": "portmap", "capabilities": {"portMappings": true}}
  ]
}
EOF
  # restrict_oom_score_adj: no process here has CAP_SYS_RESOURCE, and runc fails every sandbox
  # without it. disable_apparmor: no AppArmor on this kernel.
  cat >"$STATE/etc/containerd.toml" <<EOF
version = 2
root = "$STATE/containerd/root"
state = "$STATE/containerd/state"
disabled_plugins = ["io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs",
  "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.aufs"]

[grpc]
  address = "$CTR_SOCK"
[ttrpc]
  address = "$CTR_SOCK.ttrpc"

[plugins."io.containerd.internal.v1.opt"]
  path = "$STATE/containerd/opt"

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "$PAUSE_IMAGE"
  restrict_oom_score_adj = true
  disable_apparmor = true
  stream_server_address = "$NODE_IP"
  stream_server_port = "0"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
        Root = "$STATE/containerd/runc"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "$STATE/cni/net.d"
EOF
  start_daemon containerd containerd --config "$STATE/etc/containerd.toml"
  wait_for containerd 30 ctr --address "$CTR_SOCK" version
  ctr_k8s images import "$ROOT/bin/e2e/images/pause.tar" >/dev/null
}

control_plane() {
  local pki=$STATE/pki
  start_daemon etcd "$K8S_BIN/etcd" --name podipc-e2e --data-dir "$STATE/etcd" \
    --listen-client-urls "http://$NODE_IP:2379" --advertise-client-urls "http://$NODE_IP:2379" \
    --listen-peer-urls "http://$NODE_IP:2380" --initial-advertise-peer-urls "http://$NODE_IP:2380" \
    --initial-cluster "podipc-e2e=http://$NODE_IP:2380" --unsafe-no-fsync --log-level warn

  start_daemon kube-apiserver "$K8S_BIN/kube-apiserver" \
    --bind-address="$NODE_IP" --advertise-address="$NODE_IP" --secure-port=6443 \
    --etcd-servers="http://$NODE_IP:2379" \
    --service-cluster-ip-range="$SERVICE_CIDR" \
    --client-ca-file="$pki/ca.crt" \
    --tls-cert-file="$pki/apiserver.crt" --tls-private-key-file="$pki/apiserver.key" \
    --kubelet-client-certificate="$pki/apiserver-kubelet-client.crt" \
    --kubelet-client-key="$pki/apiserver-kubelet-client.key" \
    --kubelet-certificate-authority="$pki/ca.crt" \
    --kubelet-preferred-address-types=InternalIP,Hostname \
    --service-account-issuer=https://kubernetes.default.svc.cluster.local \
    --service-account-key-file="$pki/sa.pub" --service-account-signing-key-file="$pki/sa.key" \
    --authorization-mode=Node,RBAC \
    --enable-aggregator-routing=true \
    --allow-privileged=true \
    --profiling=false
  wait_for kube-apiserver 90 kubectl_admin get --raw /readyz

  start_daemon kube-controller-manager "$K8S_BIN/kube-controller-manager" \
    --kubeconfig="$pki/controller-manager.kubeconfig" \
    --authentication-kubeconfig="$pki/controller-manager.kubeconfig" \
    --authorization-kubeconfig="$pki/controller-manager.kubeconfig" \
    --bind-address="$NODE_IP" --leader-elect=false \
    --use-service-account-credentials=true \
    --service-account-private-key-file="$pki/sa.key" --root-ca-file="$pki/ca.crt" \
    --cluster-signing-cert-file="$pki/ca.crt" --cluster-signing-key-file="$pki/ca.key" \
    --allocate-node-cidrs=true --cluster-cidr="$POD_CIDR" --node-cidr-mask-size=24 \
    --service-cluster-ip-range="$SERVICE_CIDR" --profiling=false

  start_daemon kube-scheduler "$K8S_BIN/kube-scheduler" \
    --kubeconfig="$pki/scheduler.kubeconfig" \
    --authentication-kubeconfig="$pki/scheduler.kubeconfig" \
    --authorization-kubeconfig="$pki/scheduler.kubeconfig" \
    --bind-address="$NODE_IP" --leader-elect=false --profiling=false
}

# dns runs CoreDNS on $NODE_IP:53 with the kubernetes plugin, and the kube-dns Service (ClusterIP
# $CLUSTER_DNS, the kubelet's clusterDNS) in front of it: hack/node/README.md, "Cluster DNS".
dns() {
  local taken
  taken=$(ss -Hlntup 2>/dev/null | awk -v ip="$NODE_IP" '$5 == ip ":53" || $5 ~ /^(0\.0\.0\.0|\*|\[::\]):53$/')
  if [ -n "$taken" ]; then
    die "port 53 on $NODE_IP is taken (a DNS server listening on all addresses?):
$taken
the e2e node runs its cluster DNS (CoreDNS) there: stop that server, or make it listen on its own addresses only"
  fi
  # The least privilege the kubernetes plugin needs (pods disabled): read Services,
  # EndpointSlices and Namespaces. Named as kubeadm names it (and without "podipc": the journey
  # checks that no cluster-scoped object of that name outlives helm uninstall).
  kubectl_admin apply -f - >/dev/null <<EOF
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata: {name: "system:coredns"}
rules:
- {apiGroups: [""], resources: [services, namespaces], verbs: [list, watch]}
- {apiGroups: [discovery.k8s.io], resources: [endpointslices], verbs: [list, watch]}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: {name: "system:coredns"}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: "system:coredns"}
subjects:
- {apiGroup: rbac.authorization.k8s.io, kind: User, name: coredns}
EOF
  # Bound to the node address only. No forward plugin: the machine has no upstream resolver,
  # so names outside the cluster's zones are refused.
  cat >"$STATE/etc/Corefile" <<EOF
$CLUSTER_DOMAIN:53 in-addr.arpa:53 ip6.arpa:53 {
  bind $NODE_IP
  errors
  kubernetes $CLUSTER_DOMAIN in-addr.arpa ip6.arpa {
    kubeconfig $STATE/pki/coredns.kubeconfig coredns@$CLUSTER_NAME
    pods disabled
  }
}
EOF
  start_daemon coredns "$COREDNS_BIN" -conf "$STATE/etc/Corefile"
  local pid deadline=$((SECONDS + 60))
  pid=$(cat "$(pidfile coredns)")
  until dns_answers "$NODE_IP"; do
    if ! alive "$pid" || [ $SECONDS -ge $deadline ]; then
      tail -20 "$STATE/logs/coredns.log" >&2
      die "CoreDNS does not answer on $NODE_IP:53 (its log above)"
    fi
    sleep 0.5
  done
  # kube-dns, as real clusters name it: a selectorless Service and an EndpointSlice pointing at
  # the node address. kube-proxy (started by node) forwards $CLUSTER_DNS to it.
  kubectl_admin apply -f - >/dev/null <<EOF
apiVersion: v1
kind: Service
metadata:
  name: kube-dns
  namespace: kube-system
  labels: {k8s-app: kube-dns}
spec:
  clusterIP: $CLUSTER_DNS
  ports:
  - {name: dns, port: 53, protocol: UDP}
  - {name: dns-tcp, port: 53, protocol: TCP}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: kube-dns-node
  namespace: kube-system
  labels:
    kubernetes.io/service-name: kube-dns
    endpointslice.kubernetes.io/managed-by: podipc-e2e
addressType: IPv4
endpoints:
- addresses: [$NODE_IP]
  conditions: {ready: true}
ports:
- {name: dns, port: 53, protocol: UDP}
- {name: dns-tcp, port: 53, protocol: TCP}
EOF
}

node() {
  local pki=$STATE/pki
  mkdir -p "$STATE/kubelet"
  echo "nameserver $CLUSTER_DNS" >"$STATE/etc/resolv.conf"
  # protectKernelDefaults stays false: the kubelet sets a few kernel tunables (recorded by
  # baseline, restored by down.sh). Every listener is on $NODE_IP.
  cat >"$STATE/etc/kubelet.yaml" <<EOF
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: $NODE_IP
port: 10250
readOnlyPort: 0
healthzBindAddress: $NODE_IP
healthzPort: 10248
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: true}
  x509: {clientCAFile: $pki/ca.crt}
authorization: {mode: Webhook}
tlsCertFile: $pki/kubelet-serving.crt
tlsPrivateKeyFile: $pki/kubelet-serving.key
containerRuntimeEndpoint: unix://$CTR_SOCK
clusterDNS: [$CLUSTER_DNS]
clusterDomain: $CLUSTER_DOMAIN
resolvConf: $STATE/etc/resolv.conf
cgroupDriver: cgroupfs
failCgroupV1: false
failSwapOn: false
evictionHard:
  memory.available: 100Mi
  nodefs.available: 1%
  nodefs.inodesFree: 1%
  imagefs.available: 1%
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
serializeImagePulls: false
podLogsDir: $STATE/pod-logs
rotateCertificates: false
EOF
  start_daemon kubelet "$K8S_BIN/kubelet" --config="$STATE/etc/kubelet.yaml" \
    --kubeconfig="$pki/kubelet.kubeconfig" --hostname-override="$NODE_NAME" \
    --node-ip="$NODE_IP" --root-dir="$STATE/kubelet" --cert-dir="$STATE/kubelet/pki" --v=1

  # kube-proxy, nftables mode: pods reach the API server through the kubernetes Service IP
  # (in-cluster clients), which only kube-proxy makes work. Zero conntrack values mean "leave
  # the kernel's settings alone"; nodePortAddresses keeps NodePorts off the external interface.
  cat >"$STATE/etc/kube-proxy.yaml" <<EOF
apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
mode: nftables
clientConnection: {kubeconfig: $pki/kube-proxy.kubeconfig}
hostnameOverride: $NODE_NAME
bindAddress: $NODE_IP
healthzBindAddress: $NODE_IP:10256
metricsBindAddress: $NODE_IP:10249
clusterCIDR: $POD_CIDR
nodePortAddresses: ["$NODE_IP/32"]
conntrack:
  maxPerCore: 0
  min: 0
  tcpEstablishedTimeout: 0s
  tcpCloseWaitTimeout: 0s
EOF
  start_daemon kube-proxy "$K8S_BIN/kube-proxy" --config="$STATE/etc/kube-proxy.yaml" --v=1

  wait_for "node $NODE_NAME Ready" 120 kubectl_admin wait --for=condition=Ready "node/$NODE_NAME" --timeout=2s
  # What a pod's resolver does: the kube-dns Service IP, through kube-proxy, to CoreDNS.
  wait_for "cluster DNS at $CLUSTER_DNS (the kube-dns Service)" 60 dns_answers "$CLUSTER_DNS"
  # The default ServiceAccount must exist before the first pod can be created in a namespace.
  wait_for "default ServiceAccount" 60 kubectl_admin get serviceaccount default
}

write_env() {
  cat >"$STATE/e2e.env" <<EOF
PODIPC_E2E_KUBECONFIG=$KUBECONFIG_ADMIN
PODIPC_E2E_CONTAINERD=$CTR_SOCK
PODIPC_E2E_NODE_IP=$NODE_IP
EOF
  log "cluster up: export KUBECONFIG=$KUBECONFIG_ADMIN ($K8S_BIN/kubectl)"
}

total=$SECONDS
phase deps deps
phase build build
phase baseline baseline
phase network network
phase pki pki
phase containerd containerd_up
phase control-plane control_plane
phase dns dns
phase node node
write_env
log "bring-up done in $((SECONDS - total))s"
