#!/usr/bin/env bash
# Start the engines: 8 vLLM replicas of Qwen3-0.6B, one per H100 (GPU i on port
# ENGINE_BASE_PORT+i), or with --pd the study's P/D setup: Phi-tiny-MoE as one DP4/EP4
# prefill replica (GPUs 0-3) and one DP4/EP4 decode replica (GPUs 4-7), each rank its own
# API server on ENGINE_BASE_PORT+i with its own NIXL side-channel port (see env.sh).
#
#   deploy/vllm.sh [--pd] [--dry-run]
#
# Needs vLLM (pip install "vllm==$VLLM_VERSION"; with --pd also NIXL, which vLLM's
# kv_connectors extra brings).
set -euo pipefail
source "$(dirname "$0")/env.sh"
PD=0
for arg in "$@"; do [ "$arg" = "--pd" ] && PD=1; done

for i in 0 1 2 3 4 5 6 7; do
  port=$((ENGINE_BASE_PORT + i))
  if [ "$PD" = 1 ]; then
    group=$((i / 4)) rank=$((i % 4))
    role=$([ "$group" = 0 ] && echo prefill || echo decode)
    launch "vllm-$role-$i" CUDA_VISIBLE_DEVICES=$i UCX_NET_DEVICES=all \
      VLLM_NIXL_SIDE_CHANNEL_HOST="$HOST_IP" VLLM_NIXL_SIDE_CHANNEL_PORT=$((NIXL_BASE_PORT + i)) \
      VLLM_DP_MASTER_PORT=$((DP_MASTER_BASE_PORT + 10 * group)) VLLM_USE_FASTOKENS=0 \
      vllm serve "$PD_MODEL" --host 0.0.0.0 --port "$port" "${PD_ENGINE_ARGS[@]}" \
      --data-parallel-rank "$rank" --data-parallel-address "$HOST_IP" \
      --data-parallel-rpc-port $((DP_RPC_BASE_PORT + group)) \
      --kv-transfer-config "$KV_TRANSFER_CONFIG"
  else
    launch "vllm-$i" CUDA_VISIBLE_DEVICES=$i vllm serve "$MODEL" --host 0.0.0.0 --port "$port" "${ENGINE_ARGS[@]}"
  fi
done
echo "engines: $(engine_urls 0 8)"
