#!/usr/bin/env bash
# Start vllm-router (PyPI, pinned) in front of the engines of deploy/vllm.sh.
#
#   deploy/vllm_router.sh [--workload random|agentic] [--pd] [--dry-run]
#
# Flags as vllm-router 0.1.17's --help defines them: --worker-urls, --policy
# (round_robin | consistent_hash, keyed on $SESSION_HEADER with --request-id-headers, as the
# study ran it), P/D with
# --vllm-pd-disaggregation and repeated --prefill / --decode. Its own metrics go to
# --prometheus-port (default 29000).
set -euo pipefail
source "$(dirname "$0")/env.sh"
VENV="${VENV:-$LOG_DIR/vllm-router-venv}"
WORKLOAD=agentic PD=0
while [ $# -gt 0 ]; do
  case "$1" in
    --workload) WORKLOAD=$2; shift ;;
    --pd) PD=1 ;;
  esac
  shift
done
if [ "$DRY_RUN" = 0 ] && [ ! -x "$VENV/bin/vllm-router" ]; then
  python3 -m venv "$VENV" && "$VENV/bin/pip" install -q "vllm-router==$VLLM_ROUTER_VERSION"
fi
policy=$([ "$WORKLOAD" = agentic ] && echo consistent_hash || echo round_robin)
if [ "$PD" = 1 ]; then
  args=(--vllm-pd-disaggregation --kv-connector nixl --policy consistent_hash --request-id-headers "$SESSION_HEADER")
  for url in $(engine_urls 0 4); do args+=(--prefill "$url"); done
  for url in $(engine_urls 4 4); do args+=(--decode "$url"); done
else
  args=(--worker-urls $(engine_urls 0 8) --policy "$policy")
  [ "$WORKLOAD" = agentic ] && args+=(--request-id-headers "$SESSION_HEADER")
fi
launch vllm-router "$VENV/bin/vllm-router" --host 0.0.0.0 --port "$FRONT_PORT" "${args[@]}"
