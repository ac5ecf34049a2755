#!/usr/bin/env python3
"""Fair queueing against FIFO: one API key floods the router at 8x the fleet's capacity
while another sends a steady trickle; the trickle's time to first token, against its
time to first token alone.

The fleet: REPLICAS vllm-sim engines (H100 profile, real time) behind this router with
`--max-concurrent-requests CAPACITY` and a keys file of two keys of the same priority.
The flood is llm-bench with 8 x CAPACITY requests in flight (so 7 x CAPACITY always
wait in the router's queue); the trickle is llm-bench at TRICKLE_RATE requests per
second (Poisson). Three phases per run, each on a fresh router: the trickle alone, the
trickle under the flood with `--queue-order fifo`, and with `--queue-order fair`.
Medians of the per-run medians are quoted.

  bench-scripts/fairness.py                 # 3 runs
  bench-scripts/fairness.py --runs 1 --seconds 10

Writes artifacts/fairness/results.json and table.md.
"""

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib  # noqa: E402
from benchlib import BIN, ROOT  # noqa: E402

SIM_PORT = 18100
ROUTER_PORT = 18000
MODEL = ("qwen3-0.6b-fp8-h100", "Qwen/Qwen3-0.6B-FP8")
KEYS = """[[keys]]
name = "flood"
key = "sk-flood"

[[keys]]
name = "trickle"
key = "sk-trickle"
"""
KEEP = ["completed", "failed", "request_throughput", "median_ttft_ms", "p90_ttft_ms", "p99_ttft_ms",
        "mean_ttft_ms", "median_e2el_ms"]

log = benchlib.logger("fairness")


class Fairness:
    def __init__(self, args):
        self.args = args
        self.out = Path(args.out)
        self.procs = benchlib.Processes(self.out / "logs", log)
        self.sims = benchlib.Processes(self.out / "logs", log)
        self.tmp = Path(tempfile.mkdtemp(prefix="fairness-"))
        self.keys = self.tmp / "keys.toml"
        self.keys.write_text(KEYS)
        self.urls = [f"http://127.0.0.1:{SIM_PORT + i}" for i in range(args.replicas)]

    def start_sims(self):
        self.procs.ensure_free([SIM_PORT + i for i in range(self.args.replicas)] + [ROUTER_PORT])
        for i in range(self.args.replicas):
            self.sims.spawn([BIN / "vllm-sim", "--port", SIM_PORT + i, "--profile", MODEL[0]],
                            f"sim-{SIM_PORT + i}", {"RUST_LOG": "warn"})
        for url in self.urls:
            self.sims.wait_ready(url + "/v1/models", MODEL[1], "vllm-sim")

    def start_router(self, order, label):
        self.procs.ensure_free([ROUTER_PORT])
        cmd = [BIN / "router", "--host", "127.0.0.1", "--port", ROUTER_PORT, "--replicas", ",".join(self.urls),
               "--policy", "least-loaded", "--api-keys-file", self.keys,
               "--max-concurrent-requests", self.args.capacity, "--max-queued-requests", 100000,
               "--queue-timeout", "600s", "--queue-order", order]
        proc = self.procs.spawn(cmd, label, {"RUST_LOG": "warn"})
        for _ in range(100):
            done = subprocess.run(["curl", "-sf", "-H", "authorization: Bearer sk-trickle",
                                   f"http://127.0.0.1:{ROUTER_PORT}/v1/models"], capture_output=True)
            if done.returncode == 0 and MODEL[1] in done.stdout.decode():
                return proc
            time.sleep(0.1)
        raise RuntimeError("router never became ready")

    def bench(self, key, label, extra):
        result = self.tmp / f"{label}.json"
        cmd = [BIN / "llm-bench", "run", "--base-url", f"http://127.0.0.1:{ROUTER_PORT}", "--model", MODEL[1],
               "--api-key", key, "--isl", self.args.isl, "--no-progress", "--result-file", result,
               "--request-timeout", "600s", *extra]
        log("$", " ".join(str(c) for c in cmd))
        proc = subprocess.Popen([str(c) for c in cmd], stdout=subprocess.DEVNULL,
                                stderr=open(self.out / "logs" / f"{label}.log", "wb"))
        return proc, result

    def trickle(self, label):
        return self.bench("sk-trickle", label, [
            "--osl", self.args.osl, "--request-rate", self.args.trickle_rate, "--max-concurrency", 64,
            "--duration", f"{self.args.seconds}s", "--warmup-requests", 0, "--seed", 7])

    def phase(self, name, run):
        label = f"{name}_r{run}"
        order = "fifo" if name == "fifo" else "fair"
        self.start_router(order, label)
        flood = None
        try:
            if name != "alone":
                flood, _ = self.bench("sk-flood", f"{label}-flood", [
                    "--osl", self.args.osl, "--max-concurrency", 8 * self.args.capacity, "--request-rate", "inf",
                    "--duration", f"{self.args.seconds + 2 * self.args.settle}s", "--warmup-requests", 0])
                time.sleep(self.args.settle)
            trickle, result = self.trickle(f"{label}-trickle")
            trickle.wait(timeout=self.args.seconds + 600)
        finally:
            if flood:
                flood.kill()
                flood.wait()
            self.procs.stop_all()
        r = json.loads(result.read_text())
        out = {"phase": name, "run": run, **{k: r.get(k) for k in KEEP}}
        log(f"{label}: trickle median TTFT {out['median_ttft_ms']:.0f} ms, p90 {out['p90_ttft_ms']:.0f} ms, "
            f"{out['completed']} completed, {out['failed']} failed")
        return out

    def main(self):
        if not self.args.no_build:
            benchlib.build(log)
        (self.out / "logs").mkdir(parents=True, exist_ok=True)
        runs = []
        try:
            self.start_sims()
            for run in range(self.args.runs):
                phases = ["alone", "fifo", "fair"]
                shift = run % 3
                for name in phases[shift:] + phases[:shift]:
                    runs.append(self.phase(name, run))
        finally:
            self.procs.stop_all()
            self.sims.stop_all()
        medians = {}
        for name in ["alone", "fifo", "fair"]:
            rs = [r for r in runs if r["phase"] == name]
            medians[name] = {k: statistics.median(r[k] for r in rs) for k in
                             ["median_ttft_ms", "p90_ttft_ms", "p99_ttft_ms", "mean_ttft_ms", "completed"]}
            medians[name]["failed"] = sum(r["failed"] for r in rs)
        result = {"args": vars(self.args), "runs": runs, "medians": medians, "machine": benchlib.machine_info(),
                  "versions": benchlib.versions(), "commit": benchlib.git_commit()}
        (self.out / "results.json").write_text(json.dumps(result, indent=2, default=str))
        text = table(result)
        (self.out / "table.md").write_text(text)
        print(text)


def table(result):
    a, m = result["args"], result["medians"]
    alone = m["alone"]["median_ttft_ms"]
    lines = [f"Fairness: {a['runs']} runs; {a['replicas']} vllm-sim engines (H100 profile, real time), "
             f"--max-concurrent-requests {a['capacity']}; flood {8 * a['capacity']} in flight, trickle "
             f"{a['trickle_rate']} req/s for {a['seconds']} s; {a['isl']} prompt / {a['osl']} output tokens. "
             "Trickle TTFT, medians of the runs.", "",
             "| trickle | median TTFT ms | p90 ms | p99 ms | mean ms | vs alone (median) | completed | failed |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name, v in m.items():
        lines.append(f"| {name} | {v['median_ttft_ms']:.0f} | {v['p90_ttft_ms']:.0f} | {v['p99_ttft_ms']:.0f} | "
                     f"{v['mean_ttft_ms']:.0f} | {v['median_ttft_ms'] / alone:.1f}x | {v['completed']:.0f} | "
                     f"{v['failed']} |")
    return "\n".join(lines) + "\n"


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--seconds", type=int, default=20, help="recorded seconds of trickle per phase")
    p.add_argument("--settle", type=int, default=5, help="seconds of flood before the trickle starts")
    p.add_argument("--capacity", type=int, default=16, help="--max-concurrent-requests")
    p.add_argument("--replicas", type=int, default=2)
    p.add_argument("--trickle-rate", type=float, default=1.0)
    p.add_argument("--isl", type=int, default=512)
    p.add_argument("--osl", type=int, default=64)
    p.add_argument("--out", default=str(ROOT / "artifacts" / "fairness"))
    p.add_argument("--no-build", action="store_true")
    return p.parse_args()


if __name__ == "__main__":
    Fairness(parse_args()).main()
