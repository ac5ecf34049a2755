#!/usr/bin/env python3
"""Fit a vllm-sim profile's constants to the study's published points.

Runs the virtual-time harness (`benches/sim_calibration.rs`: the simulator's own engine and
API-server code under a paused clock, one replica standing for the fleet) for a set of
constants, compares mean TTFT, mean TPOT and request throughput with the study's
vllm-router rows (bench-scripts/study_points.json), and minimises the sum of squared log
ratios with Nelder-Mead over the constants named on the command line, each in log space
within the bounds given. It prints the best constants as `--set` arguments; the profile in
crates/vllm-sim/src/profile.rs is then edited by hand, with the evidence for each constant.

  python3 bench-scripts/calibrate.py --points prefill-heavy,decode-heavy \\
      --fit base=1.7ms:1.2ms:2.5ms --fit prefill_per_token=1.5us:0.5us:5us ...
  python3 bench-scripts/calibrate.py --points agentic --set ... --fit ...

Constants not fitted keep the profile's values (or --set ones). --weights can weigh the
metrics (default ttft=1,tpot=1,throughput=1).
"""

import argparse
import json
import math
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
UNITS = {"s": 1.0, "ms": 1e-3, "us": 1e-6, "ns": 1e-9}


def parse_value(text):
    """'1.7ms' -> (1.7e-3, 'ms'); '3e12' -> (3e12, '')."""
    for unit in ("ms", "us", "ns", "s"):
        if text.endswith(unit) and text[: -len(unit)].replace(".", "", 1).replace("e-", "", 1).isdigit():
            return float(text[: -len(unit)]) * UNITS[unit], unit
    return float(text), ""


def render(name, value, unit):
    if name.endswith("_hops") or name == "num_gpu_blocks":
        return str(max(1, round(value)))
    return f"{value / UNITS[unit]:.4g}{unit}" if unit else f"{value:.4g}"


def harness_binary():
    subprocess.run(["cargo", "build", "--release", "--bench", "sim_calibration"], cwd=ROOT, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    out = subprocess.run(["cargo", "bench", "--bench", "sim_calibration", "--no-run", "--message-format", "json"],
                         cwd=ROOT, check=True, capture_output=True, text=True).stdout
    for line in out.splitlines():
        msg = json.loads(line)
        if msg.get("reason") == "compiler-artifact" and msg["target"]["name"] == "sim_calibration" and msg.get("executable"):
            return msg["executable"]
    sys.exit("could not find the sim_calibration binary")


def evaluate(binary, args, sets, weights):
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        cmd = [binary, "--bench", "--points", args.points, "--concurrency", args.concurrency, "--json", out.name]
        for s in sets:
            cmd += ["--pd-set" if args.pd else "--set", s]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        rows = json.loads(Path(out.name).read_text())["rows"]
    loss = 0.0
    for row in rows:
        for key, weight in weights.items():
            metric = {"ttft": "mean_ttft_ms", "tpot": "mean_tpot_ms", "throughput": "request_throughput"}[key]
            loss += weight * math.log(row[metric] / row["study"][metric]) ** 2
    return loss, rows


def nelder_mead(f, x0, step=0.15, iterations=120):
    n = len(x0)
    simplex = [list(x0)] + [[x + (step if i == j else 0.0) for j, x in enumerate(x0)] for i in range(n)]
    values = [f(x) for x in simplex]
    for _ in range(iterations):
        order = sorted(range(n + 1), key=lambda i: values[i])
        simplex = [simplex[i] for i in order]
        values = [values[i] for i in order]
        centroid = [sum(p[j] for p in simplex[:-1]) / n for j in range(n)]
        worst = simplex[-1]
        reflected = [c + (c - w) for c, w in zip(centroid, worst)]
        fr = f(reflected)
        if fr < values[0]:
            expanded = [c + 2 * (c - w) for c, w in zip(centroid, worst)]
            fe = f(expanded)
            simplex[-1], values[-1] = (expanded, fe) if fe < fr else (reflected, fr)
        elif fr < values[-2]:
            simplex[-1], values[-1] = reflected, fr
        else:
            contracted = [c + 0.5 * (w - c) for c, w in zip(centroid, worst)]
            fc = f(contracted)
            if fc < values[-1]:
                simplex[-1], values[-1] = contracted, fc
            else:
                best = simplex[0]
                simplex = [best] + [[b + 0.5 * (p - b) for b, p in zip(best, q)] for q in simplex[1:]]
                values = [values[0]] + [f(p) for p in simplex[1:]]
    i = min(range(n + 1), key=lambda i: values[i])
    return simplex[i], values[i]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--points", default="prefill-heavy,decode-heavy")
    p.add_argument("--concurrency", default="64,128,256")
    p.add_argument("--fit", action="append", default=[], metavar="NAME=START:LOW:HIGH")
    p.add_argument("--set", action="append", default=[], metavar="NAME=VALUE")
    p.add_argument("--pd", action="store_true", help="fit the P/D profile (--pd-set)")
    p.add_argument("--weights", default="ttft=1,tpot=1,throughput=1")
    p.add_argument("--iterations", type=int, default=120)
    args = p.parse_args()
    weights = {k: float(v) for k, v in (w.split("=") for w in args.weights.split(","))}
    fits = []
    for spec in args.fit:
        name, bounds = spec.split("=", 1)
        start, low, high = bounds.split(":")
        (s, unit), (lo, _), (hi, _) = parse_value(start), parse_value(low), parse_value(high)
        fits.append((name, unit, math.log(lo), math.log(hi), math.log(s)))
    binary = harness_binary()
    best = {"loss": float("inf")}

    def sets_of(x):
        out = list(args.set)
        for (name, unit, lo, hi, _), v in zip(fits, x):
            out.append(f"{name}={render(name, math.exp(min(max(v, lo), hi)), unit)}")
        return out

    def loss(x):
        sets = sets_of(x)
        value, rows = evaluate(binary, args, sets, weights)
        if value < best["loss"]:
            best.update(loss=value, sets=sets, rows=rows)
            print(f"loss {value:.4f}  " + " ".join(sets), file=sys.stderr, flush=True)
        return value

    if fits:
        nelder_mead(loss, [f[4] for f in fits], iterations=args.iterations)
    else:
        loss([])
    print("\nbest:", " ".join(f"--set {s}" for s in best["sets"]))
    for row in best["rows"]:
        s = row["study"]
        print(f"  {row['point']:<16} c={row['concurrency']:<4} TTFT {row['mean_ttft_ms']:8.1f} / {s['mean_ttft_ms']:8.1f}"
              f"  TPOT {row['mean_tpot_ms']:6.2f} / {s['mean_tpot_ms']:6.2f}"
              f"  req/s {row['request_throughput']:7.1f} / {s['request_throughput']:7.1f}")


if __name__ == "__main__":
    main()
