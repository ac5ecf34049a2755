#!/usr/bin/env bash
# The official openai Python client (pinned, in a venv under target/) against vllm-sim
# directly and through `router --sim 2`. Loopback only; every process is stopped on exit.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=target/openai-venv
if [[ ! -x "$venv/bin/python" ]]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet openai==3.54.0
fi
cargo build --quiet --bin vllm-sim --bin router
pids=()
trap 'kill "${pids[@]}" 2>/dev/null || true' EXIT
target/debug/vllm-sim --port 18190 --time-scale 20 >/dev/null 2>&1 & pids+=($!)
target/debug/router --sim 2 --sim-time-scale 20 --host 127.0.0.1 --port 18191 >/dev/null 2>&1 & pids+=($!)
for port in 18190 18191; do
  for _ in $(seq 100); do curl -sf "http://127.0.0.1:$port/health" >/dev/null && break; sleep 0.1; done
done
status=0
for url in http://127.0.0.1:18190 http://127.0.0.1:18191; do
  "$venv/bin/python" bench-scripts/openai_client_check.py "$url" Qwen/Qwen3-0.6B-FP8 || status=1
done
exit $status
