#!/usr/bin/env python3
"""The router's memory under 10,000 concurrent slow streams, on 127.0.0.1.

  bench-scripts/memory_10k.py [--streams 10000] [--out artifacts/memory_10k.json]

Four simulated replicas (each batching up to 3000 sequences, slowed so a token takes
about a second) serve `--streams` streams of 40 tokens at once through the router, so
every stream stays open for most of a minute. The router's RSS is sampled every 2 s
with its in-flight count; reported: RSS before the load, at the most streams in flight,
the peak (VmHWM), and the bytes per open stream.
"""

import argparse
import json
import resource
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = ROOT / "target" / "release"
MODEL = "Qwen/Qwen3-0.6B-FP8"
SIM_PORT = 18400
ROUTER_PORT = 18390


def status_kb(pid, field):
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def get(url):
    with urllib.request.urlopen(url, timeout=10) as r:
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


def in_flight(base):
    total = 0.0
    for line in get(base + "/metrics").splitlines():
        if line.startswith("router_in_flight_requests{"):
            total += float(line.rsplit(" ", 1)[1])
    return int(total)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--streams", type=int, default=10_000)
    p.add_argument("--out", default=str(ROOT / "artifacts" / "memory_10k.json"))
    p.add_argument("--no-build", action="store_true")
    args = p.parse_args()
    # Each stream is a client socket and an upstream socket in the router: it needs two
    # descriptors per stream. Raise the soft limit as far as the hard one allows; where
    # the hard limit is too low for --streams, run as many streams as fit and say so.
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 65536:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        fit = (hard - 200) // 2
        if args.streams > fit:
            print(f"open-file limit {hard} fits {fit} streams through the router, not {args.streams}: "
                  f"running {fit}", file=sys.stderr)
            args.requested_streams, args.streams = args.streams, fit
    else:
        resource.setrlimit(resource.RLIMIT_NOFILE, (65536, 65536))
    if not args.no_build:
        subprocess.run(["cargo", "build", "--release", "--bins"], cwd=ROOT, check=True)
    logs = Path("/tmp/llm-router-memory")
    logs.mkdir(exist_ok=True)
    procs = []
    try:
        urls = []
        for i in range(4):
            port = SIM_PORT + i
            procs.append(subprocess.Popen(
                [BIN / "vllm-sim", "--port", str(port), "--max-num-seqs", "3000", "--num-gpu-blocks", "100000",
                 "--fault", "slowdown=4"], stdout=open(logs / f"sim{i}.log", "wb"), stderr=subprocess.STDOUT))
            urls.append(f"http://127.0.0.1:{port}")
        for url in urls:
            wait_ready(url + "/v1/models")
        router = subprocess.Popen(
            [BIN / "router", "--host", "127.0.0.1", "--port", str(ROUTER_PORT), "--replicas", ",".join(urls)],
            stdout=open(logs / "router.log", "wb"), stderr=subprocess.STDOUT)
        procs.append(router)
        base = f"http://127.0.0.1:{ROUTER_PORT}"
        wait_ready(base + "/v1/models")
        time.sleep(1)
        baseline = status_kb(router.pid, "VmRSS")
        result_file = logs / "bench.json"
        bench = subprocess.Popen(
            [BIN / "llm-bench", "run", "--base-url", base, "--model", MODEL, "--isl", "20", "--osl", "40",
             "--max-concurrency", str(args.streams), "--num-prompts", str(args.streams), "--warmup-requests", "0",
             "--request-timeout", "600s", "--no-progress", "--result-file", str(result_file)],
            stdout=open(logs / "bench.out", "wb"), stderr=subprocess.STDOUT)
        procs.append(bench)
        samples = []
        started = time.time()
        while bench.poll() is None:
            try:
                samples.append({"t": round(time.time() - started, 1), "in_flight": in_flight(base),
                                "rss_kb": status_kb(router.pid, "VmRSS")})
            except OSError:
                pass
            time.sleep(2)
            if time.time() - started > 900:
                raise RuntimeError("the streams did not finish in 15 minutes")
        result = json.loads(result_file.read_text())
        top = max(samples, key=lambda s: (s["in_flight"], s["rss_kb"]))
        peak = status_kb(router.pid, "VmHWM")
        report = {
            "streams": args.streams,
            "streams_requested": getattr(args, "requested_streams", args.streams),
            "open_file_limit": resource.getrlimit(resource.RLIMIT_NOFILE)[1],
            "completed": result["completed"],
            "failed": result["failed"],
            "max_in_flight_seen": top["in_flight"],
            "rss_mb_before": round(baseline / 1024, 1),
            "rss_mb_at_max_in_flight": round(top["rss_kb"] / 1024, 1),
            "peak_rss_mb": round(peak / 1024, 1),
            "rss_kb_per_stream": round((top["rss_kb"] - baseline) / max(top["in_flight"], 1), 2),
            "rss_mb_after": round(status_kb(router.pid, "VmRSS") / 1024, 1),
            "mean_ttft_ms": round(result["mean_ttft_ms"], 1),
            "samples": samples,
        }
        Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
        print(json.dumps({k: v for k, v in report.items() if k != "samples"}, indent=1))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                proc.wait()


if __name__ == "__main__":
    sys.exit(main())
