#!/usr/bin/env bash
# The streaming hop against its floor (HAProxy) and its limit (direct): installs wrk and
# HAProxy from Debian's packages if missing, then runs bench-scripts/proxy_floor.py
# (see its --help) with the arguments given.
#
#   bench-scripts/proxy_floor.sh                   # 5 runs x 10 s per contender
#   bench-scripts/proxy_floor.sh --itl --syscalls  # plus ITL and system-call passes
set -euo pipefail
cd "$(dirname "$0")/.."
missing=()
command -v wrk >/dev/null || missing+=(wrk)
command -v haproxy >/dev/null || [[ -x /usr/sbin/haproxy ]] || missing+=(haproxy)
command -v perf >/dev/null || missing+=(linux-perf)
if ((${#missing[@]})); then
  apt-get install -y -q "${missing[@]}" >/dev/null
fi
exec python3 bench-scripts/proxy_floor.py "$@"
