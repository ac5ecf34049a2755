#!/usr/bin/env bash
# Fuzz request parsing, session-key extraction, SSE framing, the KV event feed, the relay's response head parser and chunked decoder, multipart forms, stop strings, usage shapes and HTTP/2 connections with cargo fuzz
# (libFuzzer), for a bounded time per target. Not part of CI.
#
#   bench-scripts/fuzz.sh [SECONDS_PER_TARGET]   (default 120)
#
# Installs cargo-fuzz into target/tools once. cargo fuzz needs nightly features;
# RUSTC_BOOTSTRAP=1 enables them on the stable toolchain this machine has. Every crash
# found is copied into fuzz/regressions/<target>/, which `cargo test` replays
# (tests/fuzz_regressions.rs): fix the bug, keep the input.
set -euo pipefail
cd "$(dirname "$0")/.."
seconds="${1:-120}"
tools="$PWD/target/tools"
if [ ! -x "$tools/bin/cargo-fuzz" ]; then
  cargo install --locked --root "$tools" cargo-fuzz
fi
export PATH="$tools/bin:$PATH" RUSTC_BOOTSTRAP=1
found=0
for target in request_parsing sse_framing kv_feed response_head chunked_body multipart_form stop_strings usage_shapes h2_connection; do
  mkdir -p "fuzz/corpus/$target"
  # Start from the recorded regressions and edge cases.
  cp -n fuzz/regressions/"$target"/* "fuzz/corpus/$target/" 2>/dev/null || true
  echo "== $target: ${seconds}s"
  set +e
  cargo fuzz run "$target" "fuzz/corpus/$target" -- -max_total_time="$seconds" -rss_limit_mb=2048 \
    2>&1 | tail -n 25
  set -e
  for crash in fuzz/artifacts/"$target"/crash-* fuzz/artifacts/"$target"/oom-* fuzz/artifacts/"$target"/timeout-*; do
    [ -e "$crash" ] || continue
    cp "$crash" "fuzz/regressions/$target/"
    echo "FOUND: $crash (copied to fuzz/regressions/$target/)"
    found=$((found + 1))
  done
done
echo "crashes found: $found"
[ "$found" = 0 ]
