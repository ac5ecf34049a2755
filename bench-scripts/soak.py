#!/usr/bin/env python3
"""Soak test: the router under sustained load for N minutes while clients hang up at
random and replicas are killed and restarted, on 127.0.0.1 only, bounded in time.

  bench-scripts/soak.py [--minutes 10] [--concurrency 512] [--replicas 4]
                        [--restart-every 30] [--cancel-fraction 0.1] [--out artifacts/soak.json]

- llm-bench drives `--concurrency` streams (ISL 200, OSL 100) for the whole run; a
  `--cancel-fraction` of requests is dropped by the client mid-way.
- Every `--restart-every` seconds one simulated replica is killed (SIGKILL: its open
  streams are cut) and restarted 5 s later on the same port.
- The router's RSS is sampled every 5 s.

Reported: requests served, failed and cancelled; errors by kind (the client's and the
router's own counters: retries, upstream errors by kind, client disconnects); RSS at
the start, the end and the peak; and whether every in-flight gauge returned to zero.
"""

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = ROOT / "target" / "release"
SIM_PORT = 18300
ROUTER_PORT = 18290
MODEL = "Qwen/Qwen3-0.6B-FP8"


def rss_kb(pid, field="VmRSS"):
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def get(url, timeout=5):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.read().decode()


def wait_ready(url, timeout=60):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if MODEL in get(url):
                return
        except OSError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"not ready: {url}")


def metrics(text, name):
    """{labels: value} of one metric family."""
    out = {}
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            series, value = line.rsplit(" ", 1)
            out[series[len(name):] or "{}"] = float(value)
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=10)
    p.add_argument("--concurrency", type=int, default=512)
    p.add_argument("--replicas", type=int, default=4)
    p.add_argument("--restart-every", type=float, default=30)
    p.add_argument("--cancel-fraction", type=float, default=0.1)
    p.add_argument("--out", default=str(ROOT / "artifacts" / "soak.json"))
    p.add_argument("--no-build", action="store_true")
    args = p.parse_args()
    if not args.no_build:
        subprocess.run(["cargo", "build", "--release", "--bins"], cwd=ROOT, check=True)
    logs = Path("/tmp/llm-router-soak")
    logs.mkdir(exist_ok=True)
    procs = {}

    def start_sim(i):
        port = SIM_PORT + i
        procs[f"sim{i}"] = subprocess.Popen(
            [BIN / "vllm-sim", "--port", str(port)], stdout=open(logs / f"sim{i}.log", "ab"),
            stderr=subprocess.STDOUT)
        return f"http://127.0.0.1:{port}"

    urls = [start_sim(i) for i in range(args.replicas)]
    for url in urls:
        wait_ready(url + "/v1/models")
    router = subprocess.Popen(
        [BIN / "router", "--host", "127.0.0.1", "--port", str(ROUTER_PORT), "--replicas", ",".join(urls),
         "--health-interval", "1s", "--unhealthy-threshold", "1", "--healthy-threshold", "1"],
        stdout=open(logs / "router.log", "ab"), stderr=subprocess.STDOUT, env={**os.environ, "RUST_LOG": "warn"})
    procs["router"] = router
    base = f"http://127.0.0.1:{ROUTER_PORT}"
    wait_ready(base + "/v1/models")
    result_file = logs / "bench.json"
    duration = int(args.minutes * 60)
    bench = subprocess.Popen(
        [BIN / "llm-bench", "run", "--base-url", base, "--model", MODEL, "--isl", "200", "--osl", "100",
         "--max-concurrency", str(args.concurrency), "--duration", f"{duration}s", "--warmup-requests", "0",
         "--cancel-fraction", str(args.cancel_fraction), "--cancel-after-max", "3s", "--drain-timeout", "60s",
         "--request-timeout", "120s", "--no-progress", "--result-file", str(result_file)],
        stdout=open(logs / "bench.out", "wb"), stderr=subprocess.STDOUT)
    procs["bench"] = bench
    started = time.time()
    samples, restarts = [], []
    next_restart = started + args.restart_every
    rng = random.Random(42)
    try:
        while bench.poll() is None:
            now = time.time()
            samples.append({"t": round(now - started, 1), "rss_kb": rss_kb(router.pid)})
            if now >= next_restart and now - started < duration - 10:
                i = rng.randrange(args.replicas)
                procs[f"sim{i}"].send_signal(signal.SIGKILL)
                procs[f"sim{i}"].wait()
                time.sleep(5)
                start_sim(i)
                restarts.append({"t": round(now - started, 1), "replica": urls[i]})
                next_restart = now + args.restart_every
            time.sleep(5)
            if time.time() - started > duration + 300:
                raise RuntimeError("llm-bench did not finish within 5 minutes of the end")
        time.sleep(2)
        text = get(base + "/metrics")
        in_flight = metrics(text, "router_in_flight_requests")
        bench_result = json.loads(result_file.read_text())
        report = {
            "minutes": args.minutes,
            "concurrency": args.concurrency,
            "replicas": args.replicas,
            "cancel_fraction": args.cancel_fraction,
            "replica_restarts": len(restarts),
            "requests": {
                "completed": bench_result["completed"], "failed": bench_result["failed"],
                "cancelled": bench_result["cancelled"], "unfinished": bench_result.get("unfinished", 0),
                "request_throughput": round(bench_result["request_throughput"], 2),
            },
            "client_errors": bench_result.get("error_counts", {}),
            "router": {
                "responses_by_status": sum_by(metrics(text, "router_requests_total"), "status"),
                "upstream_errors": {k: v for k, v in sum_by(metrics(text, "router_upstream_errors_total"), "kind").items() if v},
                "retries": sum(metrics(text, "router_retries_total").values()),
                "retries_denied": sum(metrics(text, "router_retries_denied_total").values()),
                "client_disconnects": sum_by(metrics(text, "router_client_disconnects_total"), "stage"),
                "in_flight_after": sum(in_flight.values()),
            },
            "rss_mb": {
                "start": round(samples[min(2, len(samples) - 1)]["rss_kb"] / 1024, 1),
                "end": round(samples[-1]["rss_kb"] / 1024, 1),
                "peak": round(rss_kb(router.pid, "VmHWM") / 1024, 1),
            },
            "rss_samples": samples,
            "restarts": restarts,
        }
        Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
        summary = {k: v for k, v in report.items() if k not in ("rss_samples", "restarts")}
        print(json.dumps(summary, indent=1))
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                proc.wait()


def sum_by(series, label):
    out = {}
    for labels, value in series.items():
        key = next((part.split("=", 1)[1].strip('"') for part in labels.strip("{}").split(",")
                    if part.startswith(label + "=")), "")
        out[key] = out.get(key, 0) + value
    return out


if __name__ == "__main__":
    sys.exit(main())
