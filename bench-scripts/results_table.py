#!/usr/bin/env python3
"""Print a sweep's results as the Markdown tables docs/benchmark.md shows, from its CSVs alone.

  bench-scripts/results_table.py [artifacts/benchmark]

Tables: every contender at every point (medians of the repeats, from grid.csv), the
targets' ratios with whether each is met (ratios.csv), and P/D (pd.csv).
"""

import csv
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# (column in ratios.csv, heading, test of the target or None)
TARGETS = [
    ("throughput_router_vs_direct", "req/s router / direct (>= 0.98)", lambda v: v >= 0.98),
    ("throughput_router_vs_vllm_router", "req/s router / vllm-router (>= 1.0)", lambda v: v >= 1.0),
    ("ttft_router_minus_direct_ms", "TTFT router - direct, ms (<= 2)", lambda v: v <= 2.0),
    ("tpot_router_vs_direct", "TPOT router / direct (<= 1.03)", lambda v: abs(v - 1) <= 0.03),
    ("cpu_router_vs_vllm_router", "CPU s/1000 req router / vllm-router (<= 0.5)", lambda v: v <= 0.5),
    ("user_cpu_router_vs_vllm_router", "user CPU router / vllm-router", None),
    ("throughput_router_vs_ray", "req/s router / Ray Serve LLM", None),
    ("ttft_router_vs_ray", "TTFT router / Ray Serve LLM", None),
]
ORDER = {"prefill-heavy": 0, "decode-heavy": 1, "agentic": 2}
CONTENDERS = {"direct": 0, "haproxy": 1, "router": 2, "router-kv-aware": 3, "router-kv-aware-sessions": 4,
              "router-prefix-aware": 5, "vllm-router": 6, "vllm-router-cache-aware": 7, "ray-serve-llm": 8}


def rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def num(value, digits):
    if value in (None, ""):
        return "-"
    return f"{float(value):.{digits}f}"


def grid_table(out):
    lines = ["| workload | c | contender | runs | mean TTFT ms | p99 TTFT ms | mean TPOT ms | req/s | "
             "CPU s / 1000 req (user) | peak RSS MB | busiest replica / mean | prefix-cache hits | failed |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    data = sorted(rows(out / "grid.csv"), key=lambda r: (ORDER.get(r["workload"], 9), int(r["concurrency"]),
                                                         CONTENDERS.get(r["contender"], 9)))
    for r in data:
        cpu = "-" if r["contender"] == "direct" else (
            f"{num(r['contender_cpu_s_per_1000_requests'], 1)} ({num(r['contender_user_cpu_s_per_1000_requests'], 1)})")
        rss = "-" if r["contender"] == "direct" else num(r["contender_peak_rss_mb"], 0)
        lines.append(f"| {r['workload']} | {r['concurrency']} | {r['contender']} | {r['runs']} | "
                     f"{num(r['mean_ttft_ms'], 1)} | {num(r['p99_ttft_ms'], 1)} | {num(r['mean_tpot_ms'], 2)} | "
                     f"{num(r['steady_request_throughput'], 2)} | {cpu} | {rss} | "
                     f"{num(r.get('replica_imbalance'), 2)} | {num(r.get('prefix_cache_hit_rate'), 3)} | "
                     f"{num(r['failed'], 0)} |")
    return "\n".join(lines)


def ratio_table(out):
    data = sorted(rows(out / "ratios.csv"), key=lambda r: (ORDER.get(r["workload"], 9), int(r["concurrency"])))
    present = [t for t in TARGETS if any(r.get(t[0]) not in (None, "") for r in data)]
    lines = ["| workload | c | " + " | ".join(h for _, h, _ in present) + " |",
             "| --- | --- | " + " | ".join("---" for _ in present) + " |"]
    met = {key: [0, 0] for key, _, _ in present}
    for r in data:
        cells = []
        for key, _, test in present:
            value = r.get(key)
            if value in (None, ""):
                cells.append("-")
                continue
            v = float(value)
            text = f"{v:+.1f}" if key.endswith("_ms") else f"{v:.3f}"
            if test is not None:
                ok = test(v)
                met[key][0] += ok
                met[key][1] += 1
                text += "" if ok else " (missed)"
            cells.append(text)
        lines.append(f"| {r['workload']} | {r['concurrency']} | " + " | ".join(cells) + " |")
    summary = [f"{h}: met at {met[k][0]} of {met[k][1]} points" for k, h, t in present if t is not None]
    return "\n".join(lines), summary


def pd_table(out):
    path = out / "pd.csv"
    if not path.exists():
        return ""
    data = rows(path)
    if not any("pd" in r["contender"] for r in data):
        return ""
    lines = ["| c | setup | runs | mean TTFT ms | mean TPOT ms | req/s | CPU s / 1000 req |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in sorted(data, key=lambda r: (int(r["concurrency"]), r["contender"])):
        lines.append(f"| {r['concurrency']} | {r['contender']} | {r['runs']} | {num(r['mean_ttft_ms'], 1)} | "
                     f"{num(r['mean_tpot_ms'], 2)} | {num(r['steady_request_throughput'], 2)} | "
                     f"{num(r['contender_cpu_s_per_1000_requests'], 1)} |")
    return "\n".join(lines)


def main():
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "artifacts" / "benchmark"
    print(grid_table(out))
    print()
    table, summary = ratio_table(out)
    print(table)
    print()
    for line in summary:
        print("-", line)
    pd = pd_table(out)
    if pd:
        print()
        print(pd)


if __name__ == "__main__":
    main()
