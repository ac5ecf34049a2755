#!/usr/bin/env bash
# What the router adds per request, against going direct to the upstream, measured in
# one process on loopback (benches/proxy_overhead.rs), repeated RUNS times because the
# machine is shared and noisy. Writes artifacts/proxy_overhead.json: every run's
# figures, their medians, the router/direct ratios, and the machine, versions and
# commit they were measured on.
#
#   bench-scripts/proxy_overhead.sh            # 3 runs
#   RUNS=5 bench-scripts/proxy_overhead.sh
#   bench-scripts/proxy_overhead.sh --dry-run  # print the commands only
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${RUNS:-3}
out=artifacts/proxy_overhead.json
if [[ "${1:-}" == "--dry-run" ]]; then
  for i in $(seq "$runs"); do echo "cargo bench --bench proxy_overhead  # run $i"; done
  echo "collect target/criterion/proxy_overhead/*/new/estimates.json -> $out"
  exit 0
fi
mkdir -p artifacts
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
for i in $(seq "$runs"); do
  echo "run $i/$runs" >&2
  cargo bench --bench proxy_overhead >"$tmp/log.$i" 2>&1 || { cat "$tmp/log.$i" >&2; exit 1; }
  mkdir -p "$tmp/run.$i"
  for d in target/criterion/proxy_overhead/*/; do
    cp "$d/new/estimates.json" "$tmp/run.$i/$(basename "$d").json"
  done
done
python3 - "$tmp" "$runs" "$out" <<'PY'
import json, os, platform, statistics, subprocess, sys
tmp, runs, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
def sh(*cmd):
    try:
        return subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip()
    except Exception:
        return None
per_run = []
for i in range(1, runs + 1):
    d = os.path.join(tmp, f"run.{i}")
    per_run.append({f[:-5]: json.load(open(os.path.join(d, f)))["median"]["point_estimate"] / 1000.0
                    for f in sorted(os.listdir(d))})
names = sorted(per_run[0])
medians = {n: statistics.median(r[n] for r in per_run) for n in names}
pairs = {}
for n in names:
    if n.endswith("_router"):
        base = n[: -len("_router")]
        direct = [r[base + "_direct"] for r in per_run]
        routed = [r[n] for r in per_run]
        pairs[base] = {
            "direct_us": statistics.median(direct),
            "router_us": statistics.median(routed),
            "added_us_median_of_runs": statistics.median(b - a for a, b in zip(direct, routed)),
            "router_over_direct": statistics.median(b / a for a, b in zip(direct, routed)),
        }
cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), None)
result = {
    "benchmark": "proxy_overhead",
    "what": "one request at a time on loopback to an instant upstream; criterion median per run, in microseconds",
    "runs": runs,
    "per_run_us": per_run,
    "median_us": medians,
    "comparison": pairs,
    "machine": {"cpus": os.cpu_count(), "cpu": cpu, "kernel": platform.release()},
    "versions": {"rustc": sh("rustc", "--version")},
    "commit": sh("git", "rev-parse", "HEAD"),
    "dirty": bool(sh("git", "status", "--porcelain")),
}
json.dump(result, open(out, "w"), indent=2)
print(json.dumps(pairs, indent=2))
PY
echo "wrote $out" >&2
