#!/usr/bin/env bash
# The router in front of two real vLLM engines (CPU build, tiny model) against going to
# the engines directly, in one run on this machine: the same llm-bench load, alternating
# direct and router, RUNS times; medians and ratios in artifacts/real-vllm/summary.json.
#
#   bash bench-scripts/real_vllm_bench.sh [RUNS]     (default 3)
#
# The engines (bench-scripts/real_vllm.sh start 2) are started when none are running. On
# 2 cores the engines, the router and the client share the CPU, so this measures what the
# router adds to a real engine's serving path here, not H100 throughput (the simulator's
# sweep does that).
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-3}
out=artifacts/real-vllm
env_file=target/real-vllm/engine.env
[[ -e "$env_file" ]] || bash bench-scripts/real_vllm.sh start 2
# shellcheck disable=SC1090
source "$env_file"
cargo build --release --quiet --bin router --bin llm-bench
mkdir -p "$out"
port=18600
target/release/router --host 127.0.0.1 --port "$port" --replicas "$REAL_VLLM_URLS" --policy round-robin \
  --health-interval 1s >"$out/router.log" 2>&1 &
router=$!
trap 'kill $router 2>/dev/null || true' EXIT
for _ in $(seq 1 100); do curl -sf "http://127.0.0.1:$port/health" >/dev/null && break; sleep 0.1; done

load=(--model tiny --isl 128 --osl 64 --max-concurrency 4 --num-prompts 120 --warmup-requests 8
  --seed 42 --no-progress)
for ((run = 1; run <= runs; run++)); do
  order=(direct router)
  ((run % 2 == 0)) && order=(router direct)
  for target in "${order[@]}"; do
    if [[ $target == direct ]]; then base=$REAL_VLLM_URLS; else base=http://127.0.0.1:$port; fi
    target/release/llm-bench run --base-url "$base" "${load[@]}" --label "$target" \
      --metadata "vllm=$REAL_VLLM_VERSION" --result-file "$out/${target}_run$run.json"
  done
done

python3 - "$out" "$runs" "$REAL_VLLM_VERSION" <<'EOF'
import json, statistics, sys
out, runs, version = sys.argv[1], int(sys.argv[2]), sys.argv[3]
keys = ["request_throughput", "output_throughput", "mean_ttft_ms", "median_ttft_ms", "mean_tpot_ms", "mean_itl_ms"]
summary = {"vllm": version, "runs": runs, "load": "random isl 128 (o200k tokens) osl 64, concurrency 4, 120 requests a run, 2 engines"}
for target in ["direct", "router"]:
    results = [json.load(open(f"{out}/{target}_run{i}.json")) for i in range(1, runs + 1)]
    summary[target] = {k: statistics.median(r[k] for r in results) for k in keys}
    summary[target]["failed"] = sum(r.get("failed", 0) for r in results)
summary["router_over_direct"] = {k: summary["router"][k] / summary["direct"][k] for k in keys}
json.dump(summary, open(f"{out}/summary.json", "w"), indent=1)
print(json.dumps(summary, indent=1))
EOF
