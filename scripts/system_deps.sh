#!/usr/bin/env bash
# System packages the tests and walk-throughs need that pip cannot bring, installed with
# apt-get where missing (as root, or through sudo when available):
#   redis-server, redis-tools   the shared-store tier's tests start their own servers and a
#                               3-node cluster
#   chromium                    the controller's dashboard and /docs are tested in a real
#                               headless browser
set -euo pipefail

missing=()
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
command -v redis-cli >/dev/null 2>&1 || missing+=(redis-tools)
command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 \
    || missing+=(chromium)
[ ${#missing[@]} -eq 0 ] && exit 0

if [ "$(id -u)" -eq 0 ]; then
    as_root=()
elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    as_root=(sudo -n)
else
    echo "system_deps: ${missing[*]} missing and this user cannot install packages." >&2
    echo "  Install them yourself (Debian/Ubuntu: sudo apt-get install -y ${missing[*]};" >&2
    echo "  macOS: brew install redis chromium), then rerun." >&2
    exit 1
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "system_deps: ${missing[*]} missing and apt-get is not available: install them" >&2
    echo "  (redis-server and redis-cli >= 6.2, Chromium) with this system's package manager," >&2
    echo "  then rerun." >&2
    exit 1
fi
echo "installing ${missing[*]} with apt-get (needed by the tests)"
export DEBIAN_FRONTEND=noninteractive
"${as_root[@]}" apt-get update -qq
"${as_root[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
# Debian's redis package starts a system-wide server on 6379; the tests start their own.
command -v redis-server >/dev/null && command -v redis-cli >/dev/null
