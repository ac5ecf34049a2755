#!/usr/bin/env bash
# What TLS and HTTP/2 towards clients cost: installs h2load (nghttp2-client), HAProxy and
# openssl from Debian's packages if missing, then runs bench-scripts/ingress_floor.py (see
# its --help) with the arguments given.
#
#   bench-scripts/ingress_floor.sh                 # 3 runs x 10 s per contender
set -euo pipefail
cd "$(dirname "$0")/.."
missing=()
command -v h2load >/dev/null || missing+=(nghttp2-client)
command -v haproxy >/dev/null || [[ -x /usr/sbin/haproxy ]] || missing+=(haproxy)
command -v openssl >/dev/null || missing+=(openssl)
if ((${#missing[@]})); then
  apt-get install -y -q "${missing[@]}" >/dev/null
fi
exec python3 bench-scripts/ingress_floor.py "$@"
