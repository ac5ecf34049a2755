#!/usr/bin/env bash
# Draw the benchmark figures from artifacts/ alone (no benchmark is run):
#   plots/plot.sh [artifacts]
# Installs matplotlib (pinned in plots/requirements.txt) into target/plot-venv once.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
venv="$root/target/plot-venv"
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q -r "$root/plots/requirements.txt"
fi
exec "$venv/bin/python" "$root/plots/plot.py" "${1:-$root/artifacts}"
