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

for name in "${want[@]}"; do
  if [ -x "$out/$name" ]; then
    continue
  fi
  start=$SECONDS
  echo "building $name (first time only; minutes on a cold machine)" >&2
  if [ "$name" = etcd ]; then
    (cd "$root/hack/etcd" && CGO_ENABLED=0 go build -trimpath -ldflags "-s -w" -o "$out/etcd.tmp" .)
  else
    (cd "$root/hack/k8s" && CGO_ENABLED=0 go build -trimpath -ldflags "-s -w$stamp" \
      -o "$out/$name.tmp" "k8s.io/kubernetes/cmd/$name")
  fi
  mv "$out/$name.tmp" "$out/$name"
  echo "built $name in $((SECONDS - start))s" >&2
done
echo "$out"
