# Settings shared by the deploy/ scripts: one 8x H100 node, the study's models and
# engine configuration (anyscale/llm-direct-streaming-benchmarks, serve/vllm_8x/start.sh).
# Override any of them in the environment.
#
# The engine settings are the same for every contender, so the only variable is the
# serving layer: Qwen3-0.6B-FP8 with an fp8 KV cache, prefix caching on, 128 sequences and
# 16384 batched tokens per step, 95% of GPU memory, one API server per engine, and an
# 81920-token context (the agentic conversations reach ~60k tokens), which Qwen3-0.6B
# reaches with YaRN (factor 2 over its 40960 positions), as the study configured it.
# The agentic runs tokenise with vLLM 0.22's fastokens (VLLM_USE_FASTOKENS=1).

MODEL="${MODEL:-Qwen/Qwen3-0.6B-FP8}"
HOST_IP="${HOST_IP:-127.0.0.1}"           # address the routers use to reach the engines
ENGINE_BASE_PORT="${ENGINE_BASE_PORT:-8100}" # engine i listens on ENGINE_BASE_PORT + i
FRONT_PORT="${FRONT_PORT:-8000}"             # the router / Ray Serve port clients use
NIXL_BASE_PORT="${NIXL_BASE_PORT:-5600}"     # NIXL side channel, one per engine
VLLM_VERSION="${VLLM_VERSION:-0.22.0}"       # the study's vLLM
VLLM_ROUTER_VERSION="${VLLM_ROUTER_VERSION:-0.1.17}"
RAY_VERSION="${RAY_VERSION:-2.60.0}"
LOG_DIR="${LOG_DIR:-/tmp/llm-router-deploy}"

ENGINE_ARGS=(
  --max-model-len 81920
  --hf-overrides '{"rope_scaling": {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 40960}, "max_position_embeddings": 81920}'
  --max-num-seqs 128
  --max-num-batched-tokens 16384
  --gpu-memory-utilization 0.95
  --kv-cache-dtype fp8
  --api-server-count 1
  --enable-prefix-caching
)
export VLLM_ALLOW_LONG_MAX_MODEL_LEN=1 VLLM_USE_FASTOKENS="${VLLM_USE_FASTOKENS:-1}"

# The same settings as Ray Serve LLM engine_kwargs (JSON).
ENGINE_KWARGS_JSON='{"max_model_len": 81920, "hf_overrides": {"rope_scaling": {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 40960}, "max_position_embeddings": 81920}, "max_num_seqs": 128, "max_num_batched_tokens": 16384, "gpu_memory_utilization": 0.95, "kv_cache_dtype": "fp8", "enable_prefix_caching": true}'

# The agentic trace's session header (AIPerf's X-Correlation-ID).
SESSION_HEADER="${SESSION_HEADER:-x-correlation-id}"

# NixlConnector for P/D, as vLLM's NixlConnector guide configures it.
KV_TRANSFER_CONFIG='{"kv_connector": "NixlConnector", "kv_role": "kv_both"}'

# The study's P/D setup (serve/vllm_pd4p4d/start.sh): microsoft/Phi-tiny-MoE-instruct, one
# DP4/EP4 replica prefilling on GPUs 0-3 and one decoding on GPUs 4-7, NixlConnector
# between them; bf16 KV cache, 90% of GPU memory, no fastokens. Each data-parallel rank
# runs its own API server (vLLM's external load-balancing mode, `--data-parallel-rank`),
# so the routers see four prefill and four decode endpoints, as the simulator's
# phi-tiny-moe-dp4ep4-h100 profile models them.
PD_MODEL="${PD_MODEL:-microsoft/Phi-tiny-MoE-instruct}"
PD_ENGINE_ARGS=(
  --max-model-len 81920
  --max-num-seqs 128
  --max-num-batched-tokens 16384
  --gpu-memory-utilization 0.90
  --api-server-count 1
  --enable-prefix-caching
  --data-parallel-size 4
  --enable-expert-parallel
)
# The same for Ray Serve LLM (one replica per stage, its engine DP4/EP4).
PD_ENGINE_KWARGS_JSON='{"max_model_len": 81920, "max_num_seqs": 128, "max_num_batched_tokens": 16384, "gpu_memory_utilization": 0.90, "enable_prefix_caching": true, "data_parallel_size": 4, "enable_expert_parallel": true}'
DP_RPC_BASE_PORT="${DP_RPC_BASE_PORT:-13345}"   # one per DP group (prefill, decode)
DP_MASTER_BASE_PORT="${DP_MASTER_BASE_PORT:-29500}"

DRY_RUN=0
for arg in "$@"; do
  [ "$arg" = "--dry-run" ] && DRY_RUN=1
done

# Print a command (and its environment) and, unless --dry-run, start it in the
# background with its output in $LOG_DIR/<name>.log.
launch() {
  local name=$1; shift
  printf '%q ' "$@"; echo
  if [ "$DRY_RUN" = 0 ]; then
    mkdir -p "$LOG_DIR"
    nohup env "$@" > "$LOG_DIR/$name.log" 2>&1 &
    echo "  -> pid $!, log $LOG_DIR/$name.log"
  fi
}

engine_urls() { # first count
  local first=$1 count=$2 out=()
  for ((i = first; i < first + count; i++)); do out+=("http://$HOST_IP:$((ENGINE_BASE_PORT + i))"); done
  echo "${out[@]}"
}
