# Settings shared by the deploy/ scripts: one 8x H100 node, Qwen3-0.6B, the study's
# engine configuration. Override any of them in the environment.
#
# The engine settings are the same for every contender, so the only variable is the
# serving layer: prefix caching on (vLLM's default), 256 sequences and 8192 batched
# tokens per step, 90% of GPU memory, and a 64k context (the agentic sessions grow to
# ~48k tokens on average), which Qwen3-0.6B reaches with YaRN (factor 2 over its 32k
# pre-training context, as Qwen recommends for 64k). vLLM takes RoPE scaling through
# --hf-overrides/rope_parameters; the old --rope-scaling flag is gone.

MODEL="${MODEL:-Qwen/Qwen3-0.6B}"
HOST_IP="${HOST_IP:-127.0.0.1}"           # address the routers use to reach the engines
ENGINE_BASE_PORT="${ENGINE_BASE_PORT:-8100}" # engine i listens on ENGINE_BASE_PORT + i
FRONT_PORT="${FRONT_PORT:-8000}"             # the router / Ray Serve port clients use
NIXL_BASE_PORT="${NIXL_BASE_PORT:-5600}"     # NIXL side channel, one per engine
VLLM_VERSION="${VLLM_VERSION:-0.22.0}"       # the study's vLLM
VLLM_ROUTER_VERSION="${VLLM_ROUTER_VERSION:-0.1.17}"
RAY_VERSION="${RAY_VERSION:-2.60.0}"
LOG_DIR="${LOG_DIR:-/tmp/llm-router-deploy}"

ENGINE_ARGS=(
  --max-model-len 65536
  --hf-overrides '{"rope_parameters": {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 32768, "rope_theta": 1000000}}'
  --max-num-seqs 256
  --max-num-batched-tokens 8192
  --gpu-memory-utilization 0.9
  --enable-prefix-caching
)

# The same settings as Ray Serve LLM engine_kwargs (JSON).
ENGINE_KWARGS_JSON='{"max_model_len": 65536, "hf_overrides": {"rope_parameters": {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 32768, "rope_theta": 1000000}}, "max_num_seqs": 256, "max_num_batched_tokens": 8192, "gpu_memory_utilization": 0.9, "enable_prefix_caching": true}'

# NixlConnector for P/D, as vLLM's NixlConnector guide configures it.
KV_TRANSFER_CONFIG='{"kv_connector": "NixlConnector", "kv_role": "kv_both"}'

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
