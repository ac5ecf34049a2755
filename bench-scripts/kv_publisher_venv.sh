#!/usr/bin/env bash
# The Python environment of tests/kv_publisher/publisher.py (an independent vLLM-format KV
# events publisher used by tests/kv_aware.rs): pyzmq and msgspec, pinned, in target/kv-venv.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=target/kv-venv
if [[ ! -x "$venv/bin/python" ]] || ! "$venv/bin/python" -c "import zmq, msgspec" 2>/dev/null; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet pyzmq==27.1.0 msgspec==0.19.0
fi
"$venv/bin/python" -c "import zmq, msgspec; print('kv-venv: pyzmq', zmq.__version__, 'msgspec', msgspec.__version__)"
