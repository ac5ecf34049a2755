#!/usr/bin/env python3
"""The simulator against the study's published points, re-measured for real.

The study (anyscale/llm-direct-streaming-benchmarks) published its vllm-router rows from
real runs on 8x H100 (bench-scripts/study_points.json). This script re-runs each of those
points as the study ran it, with simulated engines in place of the GPUs: 8 `vllm-sim`
replicas on the calibrated profile (4 prefill + 4 decode ranks of the Phi-tiny-MoE
profile for P/D) behind vllm-router (PyPI, pinned) with the study's flags, driven by
`llm-bench` the way the study's clients drove it:

  prefill-heavy, decode-heavy   vllm bench serve: 4096 random prompts of ISL 8000 / OSL 50
                                or 50 / 500, max concurrency c, no rate limit, round robin;
                                the recorded pass starts with every stream at once.
  agentic                       AIPerf: the study's trace (8c sessions), concurrency c
                                opened over a ramp of clamp(c/4, 5, 60) s, 2c warm-up
                                requests, consistent hashing on x-correlation-id, the
                                engines tokenising with fastokens (VLLM_USE_FASTOKENS=1).
  agentic-pd-4p4d               the same against vllm-router --vllm-pd-disaggregation.

Two cores cannot carry every point's token rate in real time (decode-heavy c=256 streams
~88k tokens a second), so points may run slower than real time: the engines run at
`--time-scale` below 1, llm-bench stretches its delays to match and reports every time
converted back to the engines' clock. Which points ran scaled is in the output. A scaled
run also shrinks the router's own wall-clock latency by that factor.

Writes artifacts/fidelity/runs/<point>.json (llm-bench's result), artifacts/fidelity.csv
(point, concurrency, metric, published, simulated, ratio, time scale, within 0.85-1.15)
and artifacts/fidelity/fidelity.png (plots/plot.py).

  bench-scripts/fidelity.py                      # every point (about three hours)
  bench-scripts/fidelity.py --sessions-per-c 2   # agentic points on 2c whole sessions (about an hour)
  bench-scripts/fidelity.py --points decode-heavy --concurrency 64
  bench-scripts/fidelity.py --single-replica     # one replica at c/8 streams, real time
  bench-scripts/fidelity.py --dry-run
"""

import argparse
import csv
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib  # noqa: E402
from benchlib import BIN, ROOT  # noqa: E402

log = benchlib.logger("fidelity")
SIM_PORT = 18100
ROUTER_PORT = 18000
QWEN = ("qwen3-0.6b-fp8-h100", "Qwen/Qwen3-0.6B-FP8")
PHI = ("phi-tiny-moe-dp4ep4-h100", "microsoft/Phi-tiny-MoE-instruct")
POINTS = ["prefill-heavy", "decode-heavy", "agentic", "agentic-pd-4p4d"]
RANDOM = {"prefill-heavy": (8000, 50), "decode-heavy": (50, 500)}
# Time scale per point: the engines' clock runs this fast relative to the wall clock.
TIME_SCALE = {"prefill-heavy": 0.25, "decode-heavy": 0.25, "agentic": 1.0, "agentic-pd-4p4d": 1.0}
METRICS = [("mean_ttft_ms", "TTFT"), ("mean_tpot_ms", "TPOT"), ("request_throughput", "throughput")]
BAND = (0.85, 1.15)


class Fidelity:
    def __init__(self, args):
        self.args = args
        self.out = Path(args.out)
        self.procs = benchlib.Processes(self.out / "logs", log, args.dry_run)
        self.study = benchlib.study_points()

    def start_sims(self, roles, profile, extra):
        ports = [SIM_PORT + i for i in range(len(roles))]
        self.procs.ensure_free(ports + [ROUTER_PORT])
        urls = {}
        for port, role in zip(ports, roles):
            cmd = [BIN / "vllm-sim", "--port", port, "--profile", profile[0], "--role", role, *extra]
            self.procs.spawn(cmd, f"sim-{port}", {"RUST_LOG": "warn"})
            urls.setdefault(role, []).append(f"http://127.0.0.1:{port}")
        for url in sum(urls.values(), []):
            self.procs.wait_ready(url + "/v1/models", profile[1], "vllm-sim")
        return urls

    def vllm_router(self, urls, point):
        cmd = [benchlib.vllm_router_bin(log, self.args.dry_run), "--host", "127.0.0.1", "--port", ROUTER_PORT,
               "--prometheus-host", "127.0.0.1", "--prometheus-port", ROUTER_PORT + 90]
        if point == "agentic-pd-4p4d":
            cmd += ["--vllm-pd-disaggregation", "--kv-connector", "nixl", "--policy", "consistent_hash",
                    "--request-id-headers", "x-correlation-id"]
            for url in urls["prefill"]:
                cmd += ["--prefill", url]
            for url in urls["decode"]:
                cmd += ["--decode", url]
        elif point == "agentic":
            cmd += ["--worker-urls", *urls["both"], "--policy", "consistent_hash",
                    "--request-id-headers", "x-correlation-id"]
        else:
            cmd += ["--worker-urls", *urls["both"], "--policy", "round_robin"]
        return cmd

    def run_point(self, point, c, scale):
        name = f"{point}_c{c}"
        result_file = self.out / "runs" / f"{name}.json"
        log(f"--- {name} (time scale {scale})")
        agentic = point.startswith("agentic")
        profile = PHI if point == "agentic-pd-4p4d" else QWEN
        sim_extra = ["--time-scale", scale]
        if point == "agentic":
            sim_extra.append("--fastokens")
        roles = ["prefill"] * 4 + ["decode"] * 4 if point == "agentic-pd-4p4d" else ["both"] * 8
        urls = self.start_sims(roles, profile, sim_extra)
        router = self.procs.spawn(self.vllm_router(urls, point), name + "-vllm-router")
        self.procs.wait_ready(f"http://127.0.0.1:{ROUTER_PORT}/v1/models", profile[1], "vllm-router")
        bench = [BIN / "llm-bench", "run", "--base-url", f"http://127.0.0.1:{ROUTER_PORT}", "--model", profile[1],
                 "--max-concurrency", c, "--time-scale", scale, "--no-progress", "--label", "vllm-router",
                 "--result-file", result_file, "--metadata", f"point={point}"]
        if agentic:
            sessions = self.args.sessions_per_c * c if not self.args.quick else c
            ramp = min(60.0, max(5.0, 0.25 * c))
            bench += ["--workload", "agentic", "--dataset", self.dataset, "--num-sessions", sessions,
                      "--ramp-up", f"{ramp}s", "--warmup-requests", 2 * c if not self.args.quick else c // 4,
                      "--session-header", "x-correlation-id"]
        else:
            isl, osl = RANDOM[point]
            prompts = 4096 if not self.args.quick else 4 * c
            bench += ["--isl", isl, "--osl", osl, "--num-prompts", prompts, "--warmup-requests", 0]
        log("$", " ".join(shlex.quote(str(x)) for x in bench))
        if self.args.dry_run:
            self.procs.stop_all()
            return None
        started = time.time()
        status = subprocess.run([str(x) for x in bench], stdout=subprocess.DEVNULL,
                                stderr=open(self.out / "logs" / f"{name}-bench.log", "wb")).returncode
        wall = time.time() - started
        alive = router.poll() is None
        self.procs.stop_all()
        if status != 0 or not result_file.exists():
            log(f"llm-bench failed for {name} (exit {status}); see logs/{name}-bench.log")
            return None
        if not alive:
            log(f"vllm-router exited during {name}; see logs/{name}-vllm-router.log")
        result = json.loads(result_file.read_text())
        result["fidelity"] = {"point": point, "concurrency": c, "time_scale": scale, "wall_s": round(wall, 1),
                              "profile": profile[0], "sims": len(roles)}
        if agentic:
            result["fidelity"]["sessions_per_c"] = self.args.sessions_per_c
        result_file.write_text(json.dumps(result, indent=1) + "\n")
        return result

    def single_replica(self, point, c, scale):
        """One replica, c/8 streams straight at it, real time: the engine model alone."""
        name = f"single_{point}_c{c}"
        result_file = self.out / "runs" / f"{name}.json"
        log(f"--- {name}")
        urls = self.start_sims(["both"], QWEN, ["--time-scale", scale])
        isl, osl = RANDOM[point]
        bench = [BIN / "llm-bench", "run", "--base-url", urls["both"][0], "--model", QWEN[1],
                 "--max-concurrency", c // 8, "--isl", isl, "--osl", osl, "--num-prompts", 512,
                 "--warmup-requests", 0, "--time-scale", scale, "--no-progress", "--result-file", result_file]
        log("$", " ".join(shlex.quote(str(x)) for x in bench))
        if self.args.dry_run:
            self.procs.stop_all()
            return None
        subprocess.run([str(x) for x in bench], stdout=subprocess.DEVNULL, check=True)
        self.procs.stop_all()
        result = json.loads(result_file.read_text())
        # One replica of eight: its throughput times 8 is the fleet's.
        result["request_throughput"] *= 8
        result["fidelity"] = {"point": point, "concurrency": c, "time_scale": scale, "single_replica": True}
        result_file.write_text(json.dumps(result, indent=1) + "\n")
        return result

    def rows(self, point, c, result, scale):
        published = self.study[(point, c, "vllm-router")]
        out = []
        for key, label in METRICS:
            sim = result.get(key)
            ratio = sim / published[key] if sim else None
            out.append({"point": point, "concurrency": c, "metric": label, "published": published[key],
                        "simulated": round(sim, 4) if sim is not None else None,
                        "ratio": round(ratio, 4) if ratio is not None else None, "time_scale": scale,
                        "within": ratio is not None and BAND[0] <= ratio <= BAND[1]})
        return out

    def main(self):
        args = self.args
        if not args.dry_run:
            (self.out / "runs").mkdir(parents=True, exist_ok=True)
        if not args.no_build:
            benchlib.build(log, args.dry_run)
        if any(p.startswith("agentic") for p in args.points) and not args.single_replica:
            self.dataset = benchlib.agentic_dataset(log, args.dry_run)
        csv_path = ROOT / "artifacts" / ("fidelity_single.csv" if args.single_replica else "fidelity.csv")
        rows = []
        if csv_path.exists() and args.resume:
            with open(csv_path) as f:
                rows = [r for r in csv.DictReader(f)]
        done = {(r["point"], int(r["concurrency"])) for r in rows}
        try:
            for point in args.points:
                for c in args.concurrency:
                    if (point, c) in done:
                        continue
                    if args.single_replica:
                        if point not in RANDOM:
                            continue
                        result = self.single_replica(point, c, 1.0)
                        scale = 1.0
                    else:
                        scale = args.time_scale or TIME_SCALE[point]
                        result = self.run_point(point, c, scale)
                    if result is not None:
                        rows += self.rows(point, c, result, scale)
                        if not args.quick:
                            write_csv(csv_path, rows)
        finally:
            self.procs.stop_all()
        if args.dry_run or not rows:
            return
        if args.quick:
            csv_path = self.out / "fidelity-quick.csv"
            write_csv(csv_path, rows)
        outside = [r for r in rows if str(r["within"]) not in ("True", "true")]
        log(f"{len(rows) - len(outside)} of {len(rows)} ratios within {BAND[0]}-{BAND[1]}; results in {csv_path}")
        for r in outside:
            log(f"  outside: {r['point']} c={r['concurrency']} {r['metric']}: ratio {r['ratio']}")


def write_csv(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["point", "concurrency", "metric", "published", "simulated", "ratio",
                                          "time_scale", "within"])
        w.writeheader()
        w.writerows(rows)


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--points", nargs="+", choices=POINTS, default=POINTS)
    p.add_argument("--concurrency", nargs="+", type=int, default=[64, 128, 256])
    p.add_argument("--time-scale", type=float, help="one time scale for every point (default: per point)")
    p.add_argument("--single-replica", action="store_true",
                   help="one replica at c/8 streams, real time, no router (the random workloads)")
    p.add_argument("--quick", action="store_true", help="short runs (4c prompts, c sessions), not written to artifacts/")
    p.add_argument("--sessions-per-c", type=int, default=8,
                   help="agentic sessions per unit of concurrency (the study's 8: 10-25 minutes a point; "
                        "fewer replay fewer whole sessions)")
    p.add_argument("--resume", action="store_true", help="keep the points already in the CSV")
    p.add_argument("--out", default=str(ROOT / "artifacts" / "fidelity"))
    p.add_argument("--no-build", action="store_true")
    p.add_argument("--dry-run", action="store_true")
    return p.parse_args()


if __name__ == "__main__":
    Fidelity(parse_args()).main()
