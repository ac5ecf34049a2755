#!/usr/bin/env bash
# The study's agentic dataset, regenerated offline and checked byte for byte.
#
# The study (anyscale/llm-direct-streaming-benchmarks) replayed a Mooncake-trace dataset
# that AIPerf 0.8.0 synthesizes deterministically: `aiperf synthesize agentic-code` with its
# `configs/agentic_loop.json`, 2200 sessions, seed 42. This script installs that AIPerf
# (PyPI, pinned) into a venv under target/, writes the same configuration values, runs the
# synthesis and checks the dataset's sha256 against the one the study published
# (datasets/agentic_loop_2200s_seed42/repro_manifest.json). It is idempotent: a dataset
# already in place with the right checksum is kept.
#
#   bash bench-scripts/agentic_dataset.sh            # prints the dataset's path
#   AGENTIC_DATASET_DIR=/some/dir bash bench-scripts/agentic_dataset.sh
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
AIPERF_VERSION="0.8.0"
SESSIONS=2200
SEED=42
SHA256="81147c2fcb71288abd4a329c6a074e4839a209404a483161d8da521752a9e045"
VENV="${AIPERF_VENV:-$ROOT/target/aiperf-venv}"
OUT="${AGENTIC_DATASET_DIR:-$ROOT/target/bench-data/agentic_loop_${SESSIONS}s_seed${SEED}}"
DATASET="$OUT/dataset.jsonl"

say() { echo "[agentic-dataset] $*" >&2; }

if [[ -f "$DATASET" ]] && echo "$SHA256  $DATASET" | sha256sum --check --status; then
  echo "$DATASET"
  exit 0
fi

if [[ ! -x "$VENV/bin/aiperf" ]] || [[ "$("$VENV/bin/aiperf" --version 2>/dev/null | tail -1)" != "$AIPERF_VERSION" ]]; then
  say "installing aiperf==$AIPERF_VERSION into $VENV"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q --disable-pip-version-check "aiperf==$AIPERF_VERSION"
fi

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
# The study's configs/agentic_loop.json, value for value (its free-text comment left out:
# it does not enter the dataset). A coding agent's loop: 20 turns; a 12k-token prefix
# shared by every session, 8k shared within 20 Zipf-distributed groups, a per-session
# context (lognormal, mean 6000, median 4000); new tokens per turn mean 1500, median 400;
# generation mean 320, median 80; 1-2 s between turns.
cat > "$work/agentic_loop.json" <<'JSON'
{
  "max_prompt_tokens": 200000,
  "block_size": 64,
  "cache": {
    "layer1_tokens": 12000,
    "layer1_5_tokens": 8000,
    "layer1_5_groups": {"num_groups": 20, "zipf_alpha": 1.0},
    "layer2": {"mean": 6000, "median": 4000, "max": 20000}
  },
  "new_tokens_per_turn": {"mean": 1500, "median": 400, "max": 10000, "bias": 1.1},
  "generation_length": {"mean": 320, "median": 80, "max": 3000},
  "inter_turn_delay": {
    "agentic_fraction": 1.0,
    "agentic_delay": {"mean": 1500, "median": 1500, "min": 1000, "max": 2000},
    "human_delay": {"mean": 1500, "median": 1500, "max": 2000},
    "max": 2000
  },
  "turns": {"mean": 20, "median": 20, "min": 15, "max": 30, "allow_truncation": true},
  "reset": null,
  "restart_initial_probability": 0.0
}
JSON

say "synthesizing $SESSIONS sessions, seed $SEED (about a minute)"
(cd "$work" && "$VENV/bin/aiperf" synthesize agentic-code --config agentic_loop.json \
  --num-sessions "$SESSIONS" --seed "$SEED" --output out > synthesize.log 2>&1) || {
  tail -20 "$work/synthesize.log" >&2
  exit 1
}
generated="$(find "$work/out" -name dataset.jsonl | head -1)"
actual="$(sha256sum "$generated" | cut -d' ' -f1)"
if [[ "$actual" != "$SHA256" ]]; then
  say "checksum mismatch: got $actual, the study's is $SHA256"
  exit 1
fi
mkdir -p "$OUT"
cp "$(dirname "$generated")"/{dataset.jsonl,quality.json,manifest.json} "$OUT"/
printf '{"generator": "aiperf synthesize agentic-code", "aiperf_version": "%s", "sessions": %d, "seed": %d, "sha256": "%s"}\n' \
  "$AIPERF_VERSION" "$SESSIONS" "$SEED" "$SHA256" > "$OUT/checksum.json"
say "sha256 $SHA256 matches the study's"
echo "$DATASET"
