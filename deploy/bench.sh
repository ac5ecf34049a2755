#!/usr/bin/env bash
# Run the study's workloads with llm-bench against whatever serves on FRONT_PORT (this
# router, vllm-router or Ray Serve LLM), or straight at the 8 engines with --direct.
#
#   deploy/bench.sh --label NAME [--direct] [--pd] [--workloads "prefill-heavy decode-heavy agentic"]
#                   [--concurrency "64 128 256"] [--dry-run]
#
# --pd: the P/D setup (deploy/vllm.sh --pd) serves PD_MODEL, so requests name it.
#
# Each point: a warm-up phase (discarded), then the recorded phase; llm-bench's JSON
# (vllm bench serve's keys) in $RESULTS/<workload>_c<concurrency>_<label>.json. Restart
# the front door (and, for the agentic workload, the engines, to empty their prefix
# caches) between contenders. Prompts are built from words that are single tokens in
# o200k; Qwen3's tokenizer splits a few of them, so the engines' `usage` (which
# llm-bench reports) is the true prompt length.
set -euo pipefail
source "$(dirname "$0")/env.sh"
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
BENCH="${BENCH:-$ROOT/target/release/llm-bench}"
RESULTS="${RESULTS:-$ROOT/artifacts/h100}"
LABEL="" DIRECT=0 WORKLOADS="prefill-heavy decode-heavy agentic" CONCURRENCY="64 128 256"
while [ $# -gt 0 ]; do
  case "$1" in
    --label) LABEL=$2; shift ;;
    --direct) DIRECT=1 ;;
    --pd) MODEL=$PD_MODEL ;;
    --workloads) WORKLOADS=$2; shift ;;
    --concurrency) CONCURRENCY=$2; shift ;;
  esac
  shift
done
[ -n "$LABEL" ] || { echo "--label NAME is required" >&2; exit 2; }
[ -x "$BENCH" ] || [ "$DRY_RUN" = 1 ] || (cd "$ROOT" && cargo build --release --bin llm-bench)
DATASET="${DATASET:-$ROOT/target/bench-data/agentic_loop_2200s_seed42/dataset.jsonl}"
if [[ " $WORKLOADS " == *" agentic "* ]] && [ ! -f "$DATASET" ] && [ "$DRY_RUN" = 0 ]; then
  mkdir -p "$(dirname "$DATASET")"
  DATASET="$(bash "$ROOT/bench-scripts/agentic_dataset.sh")"
fi
if [ "$DIRECT" = 1 ]; then base=$(engine_urls 0 8 | tr ' ' ,); else base="http://$HOST_IP:$FRONT_PORT"; fi
[ "$DRY_RUN" = 1 ] || mkdir -p "$RESULTS"
for workload in $WORKLOADS; do
  for c in $CONCURRENCY; do
    args=(run --base-url "$base" --model "$MODEL" --max-concurrency "$c" --seed 42 --no-progress
          --label "$LABEL" --metadata "workload=$workload" --result-file "$RESULTS/${workload}_c${c}_${LABEL}.json")
    case "$workload" in
      prefill-heavy) args+=(--isl 8000 --osl 50 --spread round-robin --warmup-duration 30s --duration 120s) ;;
      decode-heavy) args+=(--isl 50 --osl 500 --spread round-robin --warmup-duration 30s --duration 120s) ;;
      agentic) args+=(--workload agentic --dataset "$DATASET" --num-sessions $((8 * c)) --spread session --warmup-duration 60s
                      --duration 180s --drain-timeout 30s) ;;
      *) echo "unknown workload $workload" >&2; exit 2 ;;
    esac
    printf '%q ' "$BENCH" "${args[@]}"; echo
    [ "$DRY_RUN" = 1 ] || "$BENCH" "${args[@]}"
  done
done
