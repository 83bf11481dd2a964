#!/usr/bin/env bash
# Installs the machine packages the tests need when they are missing: Node.js and npm for
# the node-ipc compatibility tests. Needs root only when something is missing.
set -euo pipefail
if command -v node >/dev/null && command -v npm >/dev/null; then
  exit 0
fi
if [ "$(id -u)" != 0 ]; then
  echo "node and npm are missing; install them (Debian: apt-get install nodejs npm)" >&2
  exit 1
fi
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nodejs npm >/dev/null
