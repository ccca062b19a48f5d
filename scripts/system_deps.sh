#!/usr/bin/env bash
# System packages the tests and walk-throughs need that pip cannot bring: redis-server and
# redis-cli (the shared-store tier's tests start their own servers and a 3-node cluster).
# Installs them with apt-get where they are missing: as root, or through sudo when available.
set -euo pipefail

missing=()
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
command -v redis-cli >/dev/null 2>&1 || missing+=(redis-tools)
[ ${#missing[@]} -eq 0 ] && exit 0

if [ "$(id -u)" -eq 0 ]; then
    as_root=()
elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    as_root=(sudo -n)
else
    echo "system_deps: ${missing[*]} missing and this user cannot install packages." >&2
    echo "  Install them yourself (Debian/Ubuntu: sudo apt-get install -y redis-server;" >&2
    echo "  macOS: brew install redis), or put a redis-server/redis-cli (>= 6.2, or Valkey's)" >&2
    echo "  on PATH, then rerun." >&2
    exit 1
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "system_deps: ${missing[*]} missing and apt-get is not available: install" >&2
    echo "  redis-server and redis-cli (>= 6.2) with this system's package manager, then rerun." >&2
    exit 1
fi
echo "installing ${missing[*]} with apt-get (the shared-store tests start real Redis servers)"
export DEBIAN_FRONTEND=noninteractive
"${as_root[@]}" apt-get update -qq
"${as_root[@]}" apt-get install -y -qq --no-install-recommends redis-server redis-tools >/dev/null
# Debian's package starts a system-wide server on 6379; the tests start their own on free ports.
command -v redis-server >/dev/null && command -v redis-cli >/dev/null
