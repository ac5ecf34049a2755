#!/usr/bin/env bash
# Start this router in front of the engines of deploy/vllm.sh.
#
#   deploy/router.sh [--workload random|agentic] [--pd] [--no-tokenize-once] [--dry-run]
#
# Routing as the benchmark uses it for every contender: round-robin for the random
# workloads, consistent hashing on $SESSION_HEADER (x-correlation-id, AIPerf's) for the agentic one (and for both P/D
# stages, so a session's prefill stays where its prefix is cached).
set -euo pipefail
source "$(dirname "$0")/env.sh"
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
ROUTER="${ROUTER:-$ROOT/target/release/router}"
WORKLOAD=agentic PD=0 TOKENIZE=()
while [ $# -gt 0 ]; do
  case "$1" in
    --workload) WORKLOAD=$2; shift ;;
    --pd) PD=1 ;;
    --no-tokenize-once) TOKENIZE=(--no-tokenize-once) ;;
  esac
  shift
done
[ -x "$ROUTER" ] || [ "$DRY_RUN" = 1 ] || (cd "$ROOT" && cargo build --release --bin router)
policy=$([ "$WORKLOAD" = agentic ] && echo consistent-hash || echo round-robin)
if [ "$PD" = 1 ]; then
  prefill=$(engine_urls 0 4 | tr ' ' ,) decode=$(engine_urls 4 4 | tr ' ' ,)
  launch router RUST_LOG=warn "$ROUTER" --host 0.0.0.0 --port "$FRONT_PORT" --session-header "$SESSION_HEADER" \
    --pd "prefill=$prefill" "decode=$decode" \
    --prefill-policy consistent-hash --decode-policy consistent-hash "${TOKENIZE[@]}"
else
  launch router RUST_LOG=warn "$ROUTER" --host 0.0.0.0 --port "$FRONT_PORT" --session-header "$SESSION_HEADER" \
    --replicas $(engine_urls 0 8 | tr ' ' ,) --policy "$policy"
fi
