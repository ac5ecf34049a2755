"""The benchmark figures, drawn from artifacts/ alone.

  plots/plot.py [ARTIFACTS]     (default artifacts/; plots/plot.sh installs matplotlib)

Each figure is written beside its data and copied to plots/.

grid.png (from benchmark/results.json, bench-scripts/sweep.py): the study's grid. Rows: prefill-heavy, decode-heavy, agentic; columns: mean
TTFT, mean TPOT, request throughput; x: concurrency; one line per contender (the median
of the repeats, the band spanning their minimum and maximum). The throughput is the
steady-state rate (requests finished per second within the recorded window).
Figures the study published (8x H100, not measured here) are hollow markers.

pd.png: prefill/decode disaggregation on the agentic workload (4 prefill + 4 decode
simulated replicas) against 8 collocated replicas behind the same routers.

fidelity.png (from fidelity.csv, bench-scripts/fidelity.py): the study's vllm-router
points against the same points re-measured on simulated engines behind vllm-router.
"""

import csv
import shutil

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
    "haproxy": dict(color="#000000", linestyle=":", marker="x", label="HAProxy 2.6 (floor for one hop)"),
    "vllm-router": dict(color="#1f77b4", marker="^", label="vllm-router"),
    "ray-serve-llm": dict(color="#2ca02c", marker="D", label="Ray Serve LLM"),
    "router-prefix-aware": dict(color="#9467bd", marker="o", linestyle="-.", label="this router, prefix-aware"),
    "router-kv-aware": dict(color="#ff7f0e", marker="o", linestyle="-", label="this router, kv-aware"),
    "router-kv-aware-sessions": dict(color="#8c564b", marker="o", linestyle=":",
                                     label="this router, kv-aware + session ids"),
    "vllm-router-cache-aware": dict(color="#17becf", marker="^", linestyle="-.", label="vllm-router, cache_aware"),
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
    order = ["direct", "haproxy", "router", "router-kv-aware", "router-kv-aware-sessions", "router-prefix-aware", "vllm-router",
             "vllm-router-cache-aware", "ray-serve-llm"]
    for row, workload in enumerate(present):
        wr = [r for r in runs if r["workload"] == workload]
        for col, (key, title) in enumerate(COLUMNS):
            ax = axes[row][col]
            draw(ax, wr, key, order)
            published(ax, results, workload, key)
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
    fig.suptitle(f"8 simulated Qwen3-0.6B-FP8/H100 replicas (vllm-sim, calibrated to the study), {repeats} runs "
                 f"per point: median, band = min..max; hollow: the study's 8x H100; machine: "
                 f"{results['machine']['cores']} cores")
    fig.tight_layout(rect=(0, 0.07, 1, 0.97))
    path = out / "grid.png"
    fig.savefig(path, dpi=90)
    return path


def published(ax, results, workload, key, stacks=None):
    """The study's own figures for a panel, as hollow markers."""
    study_key = "request_throughput" if key == "steady_request_throughput" else key
    stacks = stacks or {"vllm-router": "vllm-router", "ray-serve-llm": "ray-serve-llm"}
    points = [p for p in results.get("published", {}).get("points", [])
              if p["workload"] == workload and p.get("stack") in stacks and study_key in p]
    for stack, label in stacks.items():
        mine = sorted((p["concurrency"], p[study_key]) for p in points if p["stack"] == stack)
        if mine:
            style = STYLE.get(label, {})
            ax.plot([c for c, _ in mine], [v for _, v in mine], linestyle=":", linewidth=0.8,
                    marker=style.get("marker", "o"), markerfacecolor="none",
                    color=style.get("color", "#000000"), markersize=9,
                    label=f"{STYLE.get(stack, {}).get('label', stack)} (the study, 8x H100)")


def fidelity(path, out):
    """Published against re-measured, per workload and metric."""
    with open(path) as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return None
    workloads = [w for w in ["prefill-heavy", "decode-heavy", "agentic", "agentic-pd-4p4d"]
                 if any(r["point"] == w for r in rows)]
    metrics = [("TTFT", "mean TTFT (ms)"), ("TPOT", "mean TPOT / ITL (ms)"), ("throughput", "requests / s")]
    fig, axes = plt.subplots(len(workloads), 3, figsize=(14, 3.2 * len(workloads)), squeeze=False)
    for i, workload in enumerate(workloads):
        for j, (metric, title) in enumerate(metrics):
            ax = axes[i][j]
            mine = sorted((int(r["concurrency"]), float(r["published"]), float(r["simulated"]), float(r["ratio"]),
                           float(r["time_scale"])) for r in rows
                          if r["point"] == workload and r["metric"] == metric and r["simulated"] not in ("", "None"))
            xs = [m[0] for m in mine]
            ax.plot(xs, [m[1] for m in mine], color="#1f77b4", marker="^", markerfacecolor="none", markersize=9,
                    linestyle=":", label="the study (vllm-router, 8x H100)")
            ax.plot(xs, [m[2] for m in mine], color="#d62728", marker="o",
                    label="vllm-sim behind vllm-router, on this machine")
            for c, _, sim, ratio, scale in mine:
                note = f"{ratio:.2f}" + (f"\n(x{scale:g} time)" if scale != 1.0 else "")
                ax.annotate(note, (c, sim), textcoords="offset points", xytext=(0, 7), ha="center", fontsize=8,
                            color="#000000" if 0.85 <= ratio <= 1.15 else "#d62728")
            ax.set_xscale("log", base=2)
            ax.set_xticks(xs)
            ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
            ax.set_ylim(bottom=0, top=max([m[1] for m in mine] + [m[2] for m in mine] + [1]) * 1.3)
            ax.grid(alpha=0.3)
            ax.set_title(f"{workload}: {title}")
    handles = {}
    for h, l in zip(*axes[0][0].get_legend_handles_labels()):
        handles.setdefault(l, h)
    fig.legend(handles.values(), handles.keys(), loc="lower center", ncol=2, frameon=False)
    fig.suptitle("Fidelity: the study's published points and the same points on simulated engines "
                 "(labels: simulated / published; red outside 0.85-1.15)")
    fig.tight_layout(rect=(0, 0.04, 1, 0.97))
    target = out / "fidelity.png"
    target.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(target, dpi=90)
    return target


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
        published(ax, results, "agentic-pd-4p4d", key, stacks={"vllm-router": "vllm-router-pd-text"})
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
    artifacts = Path(sys.argv[1] if len(sys.argv) > 1 else "artifacts")
    plots = Path(__file__).resolve().parent
    made = []
    results_path = artifacts / "benchmark" / "results.json"
    if results_path.exists():
        results = json.loads(results_path.read_text())
        made += [grid(results, results_path.parent), pd(results, results_path.parent)]
    if (artifacts / "fidelity.csv").exists():
        made.append(fidelity(artifacts / "fidelity.csv", artifacts / "fidelity"))
    for path in filter(None, made):
        shutil.copy(path, plots / path.name)
        print(path, "and", plots / path.name)


if __name__ == "__main__":
    main()
