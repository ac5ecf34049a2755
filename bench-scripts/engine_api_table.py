#!/usr/bin/env python3
"""The `--engine-api openai` against `--engine-api generate` comparison from a sweep's
results (bench-scripts/sweep.py with `--contenders router router-generate`): per workload
and concurrency, the median over repeats of each contender's TTFT, TPOT, requests/s and
router CPU per 1000 requests, and generate / openai ratios. Writes engine_api.csv and
engine_api.md beside results.json.

  python3 bench-scripts/engine_api_table.py artifacts/engine-api
"""

import csv
import json
import statistics
import sys
from pathlib import Path

METRICS = [
    ("mean_ttft_ms", "mean TTFT ms"),
    ("p99_ttft_ms", "p99 TTFT ms"),
    ("mean_tpot_ms", "mean TPOT ms"),
    ("request_throughput", "req/s"),
    ("contender_cpu_s_per_1000_requests", "router CPU s / 1000 req"),
]


def main():
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "artifacts/engine-api")
    runs = json.loads((out / "results.json").read_text())["runs"]
    points = sorted({(r["workload"], r["concurrency"]) for r in runs})
    rows = []
    for workload, c in points:
        row = {"workload": workload, "concurrency": c}
        for contender in ("router", "router-generate"):
            rs = [r for r in runs if (r["workload"], r["concurrency"], r["contender"]) == (workload, c, contender)]
            row[f"{contender} runs"] = len(rs)
            row[f"{contender} failed"] = sum(r["failed"] for r in rs)
            for key, _ in METRICS:
                values = [r[key] for r in rs if r.get(key) is not None]
                row[f"{contender} {key}"] = statistics.median(values) if values else None
        for key, _ in METRICS:
            a, b = row.get(f"router {key}"), row.get(f"router-generate {key}")
            row[f"ratio {key}"] = round(b / a, 3) if a and b is not None else None
        rows.append(row)
    with open(out / "engine_api.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    lines = ["| workload | c | " + " | ".join(f"{label} openai / generate (ratio)" for _, label in METRICS)
             + " | failed |", "| --- | ---: |" + " ---: |" * len(METRICS) + " ---: |"]
    for row in rows:
        cells = []
        for key, _ in METRICS:
            a, b, ratio = row[f"router {key}"], row[f"router-generate {key}"], row[f"ratio {key}"]
            cells.append(f"{a:.2f} / {b:.2f} ({ratio:.3f}x)" if a is not None and b is not None else "-")
        failed = row["router failed"] + row["router-generate failed"]
        lines.append(f"| {row['workload']} | {row['concurrency']} | " + " | ".join(cells) + f" | {failed} |")
    runs_per = max(row["router runs"] for row in rows)
    lines += ["", f"Medians of {runs_per} runs per cell (contenders alternating within each repeat)."]
    (out / "engine_api.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
