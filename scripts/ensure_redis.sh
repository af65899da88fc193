#!/usr/bin/env bash
# Installs redis-server from Debian's packages when it is missing; tests start their own on a free port.
set -euo pipefail
if command -v redis-server >/dev/null 2>&1; then
    exit 0
fi
SUDO=""
if [ "$(id -u)" != "0" ]; then SUDO="sudo"; fi
$SUDO apt-get update -q
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q redis-server
# The package may start a service on 6379; tests never rely on it.
