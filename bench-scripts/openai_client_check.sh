#!/usr/bin/env bash
# The official openai Python client (pinned, in a venv under target/) against vllm-sim
# directly and through `router --sim 2`: HTTP/1.1, HTTP/2 with prior knowledge (h2c), and
# over TLS (a self-signed certificate made here with openssl) with ALPN h2. Loopback only;
# every process is stopped on exit.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=target/openai-venv
if [[ ! -x "$venv/bin/python" ]]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet openai==3.54.0
fi
# HTTP/2 in the client's transport.
"$venv/bin/python" -c "import h2" 2>/dev/null || "$venv/bin/pip" install --quiet h2==4.3.0
tls=target/openai-tls
mkdir -p "$tls"
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 -subj /CN=localhost \
  -addext "subjectAltName=DNS:localhost,IP:127.0.0.1" -keyout "$tls/key.pem" -out "$tls/cert.pem" 2>/dev/null
cargo build --quiet --bin vllm-sim --bin router
pids=()
trap 'kill "${pids[@]}" 2>/dev/null || true' EXIT
target/debug/vllm-sim --port 18190 --time-scale 20 >/dev/null 2>&1 & pids+=($!)
target/debug/router --sim 2 --sim-time-scale 20 --host 127.0.0.1 --port 18191 >/dev/null 2>&1 & pids+=($!)
target/debug/router --sim 2 --sim-time-scale 20 --host 127.0.0.1 --port 18192 \
  --tls-cert "$tls/cert.pem" --tls-key "$tls/key.pem" >/dev/null 2>&1 & pids+=($!)
for port in 18190 18191; do
  for _ in $(seq 100); do curl -sf "http://127.0.0.1:$port/health" >/dev/null && break; sleep 0.1; done
done
for _ in $(seq 100); do curl -sf --cacert "$tls/cert.pem" https://127.0.0.1:18192/health >/dev/null && break; sleep 0.1; done
status=0
model=Qwen/Qwen3-0.6B-FP8
check() { "$venv/bin/python" bench-scripts/openai_client_check.py "$@" || status=1; }
check http://127.0.0.1:18190 "$model"
check http://127.0.0.1:18191 "$model"
check http://127.0.0.1:18191 "$model" --h2c
check https://127.0.0.1:18192 "$model" --ca "$tls/cert.pem"
check https://127.0.0.1:18192 "$model" --ca "$tls/cert.pem" --http2
exit $status
