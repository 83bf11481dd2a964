#!/usr/bin/env bash
# Builds Kubernetes and etcd binaries from source (Go module proxy only) into
# bin/k8s/<version>/, once: a binary already there is kept, so a second run costs nothing.
#
#   hack/k8s/build.sh                      # kube-apiserver, kubectl, etcd (the test control plane)
#   hack/k8s/build.sh kubelet kube-proxy   # more, for the real-node e2e suite
set -euo pipefail

KUBE_VERSION=v1.37.2
ETCD_VERSION=v3.7.3
root=$(cd "$(dirname "$0")/../.." && pwd)
out="$root/bin/k8s/$KUBE_VERSION"
mkdir -p "$out"

want=("$@")
[ ${#want[@]} -gt 0 ] || want=(kube-apiserver kubectl etcd)

# Without version stamping the server reports v0.0.0-master and kubeVersion checks (helm) fail.
minor=${KUBE_VERSION#v1.}; minor=${minor%%.*}
stamp=""
for p in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
  stamp+=" -X $p.gitVersion=$KUBE_VERSION -X $p.gitMajor=1 -X $p.gitMinor=$minor"
  stamp+=" -X $p.gitTreeState=clean -X $p.buildDate=2026-01-01T00:00:00Z"
done

# What is missing, so the progress lines can say how far along the build is.
missing=()
for name in "${want[@]}"; do
  [ -x "$out/$name" ] || missing+=("$name")
done

# build_one runs the go build of one binary in the background and says every 30s that it
# is still going: a cold build of kube-apiserver is minutes of silence otherwise.
build_one() {
  local name=$1 step=$2 start=$SECONDS pid
  echo "building $name ($step of ${#missing[@]}; first time only, minutes on a cold machine)" >&2
  if [ "$name" = etcd ]; then
    (cd "$root/hack/etcd" && CGO_ENABLED=0 go build -trimpath -ldflags "-s -w" -o "$out/etcd.tmp" .) &
  else
    (cd "$root/hack/k8s" && CGO_ENABLED=0 go build -trimpath -ldflags "-s -w$stamp" \
      -o "$out/$name.tmp" "k8s.io/kubernetes/cmd/$name") &
  fi
  pid=$!
  while ! wait_for "$pid" 30; do
    echo "  still building $name ($step of ${#missing[@]}): $((SECONDS - start))s so far" >&2
  done
  wait "$pid"
  mv "$out/$name.tmp" "$out/$name"
  echo "built $name in $((SECONDS - start))s ($step of ${#missing[@]} done)" >&2
}

# wait_for returns 0 once process pid has ended, or 1 after secs seconds.
wait_for() {
  local i
  for ((i = 0; i < $2; i++)); do
    kill -0 "$1" 2>/dev/null || return 0
    sleep 1
  done
  ! kill -0 "$1" 2>/dev/null
}

step=0
for name in "${missing[@]}"; do
  step=$((step + 1))
  build_one "$name" "$step"
done
echo "$out"
