"""The benchmark figures, drawn from a sweep's results.json (bench-scripts/sweep.py).

grid.png: the study's grid. Rows: prefill-heavy, decode-heavy, agentic; columns: mean
TTFT, mean TPOT, request throughput; x: concurrency; one line per contender (the median
of the repeats, the band spanning their minimum and maximum). The throughput is the
steady-state rate (requests finished per second within the recorded window).
Figures the study published (8x H100, not measured here) are hollow markers.

pd.png: prefill/decode disaggregation on the agentic workload (4 prefill + 4 decode
simulated replicas) against 8 collocated replicas behind the same routers.
"""

import json
import statistics
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

COLUMNS = [
    ("mean_ttft_ms", "mean TTFT (ms)"),
    ("mean_tpot_ms", "mean TPOT (ms)"),
    ("steady_request_throughput", "request throughput (req/s)"),
]
STYLE = {
    "direct": dict(color="#555555", linestyle="--", marker="s", label="direct to engines (limit)"),
    "router": dict(color="#d62728", marker="o", label="this router"),
    "vllm-router": dict(color="#1f77b4", marker="^", label="vllm-router"),
    "ray-serve-llm": dict(color="#2ca02c", marker="D", label="Ray Serve LLM"),
    "router-pd-ids": dict(color="#d62728", marker="o", label="this router, P/D, token ids (tokenize once)"),
    "router-pd-text": dict(color="#ff9896", marker="o", linestyle=":", label="this router, P/D, text to decode"),
    "vllm-router-pd-text": dict(color="#1f77b4", marker="^", label="vllm-router, P/D"),
    "router-collocated": dict(color="#555555", marker="s", linestyle="--", label="this router, 8 collocated"),
}


def series(runs, key):
    """{contender: [(concurrency, median, min, max)]}"""
    groups = {}
    for r in runs:
        value = r.get(key)
        if value is None:
            continue
        groups.setdefault(r["label"], {}).setdefault(r["concurrency"], []).append(value)
    return {
        label: [(c, statistics.median(v), min(v), max(v)) for c, v in sorted(by_c.items())]
        for label, by_c in groups.items()
    }


def draw(ax, runs, key, order):
    for label, points in sorted(series(runs, key).items(), key=lambda kv: order.index(kv[0]) if kv[0] in order else 99):
        xs = [p[0] for p in points]
        ax.plot(xs, [p[1] for p in points], **STYLE.get(label, dict(label=label)))
        ax.fill_between(xs, [p[2] for p in points], [p[3] for p in points],
                        color=STYLE.get(label, {}).get("color"), alpha=0.15, linewidth=0)
    ax.set_xscale("log", base=2)
    ax.set_xticks(sorted({r["concurrency"] for r in runs}))
    ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)


def grid(results, out):
    workloads = ["prefill-heavy", "decode-heavy", "agentic"]
    runs = [dict(r, label=r["contender"]) for r in results["runs"] if not r.get("pd")]
    present = [w for w in workloads if any(r["workload"] == w for r in runs)]
    if not present:
        return None
    fig, axes = plt.subplots(len(present), 3, figsize=(15, 3.6 * len(present)), squeeze=False)
    order = ["direct", "router", "vllm-router", "ray-serve-llm"]
    for row, workload in enumerate(present):
        wr = [r for r in runs if r["workload"] == workload]
        for col, (key, title) in enumerate(COLUMNS):
            ax = axes[row][col]
            draw(ax, wr, key, order)
            for p in results.get("published", {}).get("points", []):
                if p["workload"] == workload and key in p:
                    style = STYLE[p["contender"]]
                    ax.plot([p["concurrency"]], [p[key]], linestyle="none", marker=style["marker"],
                            markerfacecolor="none", markeredgecolor=style["color"], markersize=9,
                            label=f"{style['label']} (published, 8x H100)")
            ax.set_title(f"{workload}: {title}")
            if row == len(present) - 1:
                ax.set_xlabel("concurrency")
    handles = {}
    for ax in axes.flat:
        for h, l in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(l, h)
    fig.legend(handles.values(), handles.keys(), loc="lower center", ncol=3, frameon=False)
    counts = {}
    for r in results["runs"]:
        key = (r["workload"], r["concurrency"], r["contender"], r.get("pd"))
        counts[key] = counts.get(key, 0) + 1
    repeats = "-".join(str(n) for n in sorted({min(counts.values()), max(counts.values())})) if counts else "?"
    fig.suptitle(f"8 simulated Qwen3-0.6B/H100 replicas (vllm-sim), {repeats} runs per point: "
                 f"median, band = min..max; machine: {results['machine']['cores']} cores")
    fig.tight_layout(rect=(0, 0.07, 1, 0.97))
    path = out / "grid.png"
    fig.savefig(path, dpi=90)
    return path


def pd(results, out):
    runs = []
    for r in results["runs"]:
        if r.get("pd"):
            runs.append(dict(r, label=f"{r['contender']}-pd-{r['pd']}"))
        elif r["workload"] == "agentic" and r["contender"] == "router":
            runs.append(dict(r, label="router-collocated"))
    if not any(r.get("pd") for r in runs):
        return None
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    order = ["router-collocated", "router-pd-ids", "router-pd-text", "vllm-router-pd-text"]
    for ax, (key, title) in zip(axes, COLUMNS):
        draw(ax, runs, key, order)
        ax.set_title(f"agentic, P/D 4 prefill + 4 decode: {title}")
        ax.set_xlabel("concurrency")
    handles = {}
    for h, l in zip(*axes[0].get_legend_handles_labels()):
        handles.setdefault(l, h)
    fig.legend(handles.values(), handles.keys(), loc="lower center", ncol=4, frameon=False)
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    path = out / "pd.png"
    fig.savefig(path, dpi=90)
    return path


def main():
    directory = Path(sys.argv[1] if len(sys.argv) > 1 else "artifacts/benchmark")
    results = json.loads((directory / "results.json").read_text())
    for path in (grid(results, directory), pd(results, directory)):
        if path:
            print(path)


if __name__ == "__main__":
    main()
