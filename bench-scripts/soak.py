#!/usr/bin/env python3
"""Soak test: the router under mixed load for an hour while replicas are killed, a KV
events publisher misbehaves and slow clients hold on, with its RSS sampled throughout.
Every client has an API key with limits; some speak HTTP/2. On 127.0.0.1 only, bounded
in time.

  bench-scripts/soak.py [--minutes 60] [--replicas 4] [--kill-every 60]
                        [--out artifacts/soak.json] [--no-build]

- Replicas: `--replicas` vllm-sim engines (time scale 4, 8192 KV blocks each), each
  publishing KV events. The router runs `--policy kv-aware` and subscribes to all of
  them but the last, whose events come instead from bench-scripts/hostile_kv_publisher.py
  (huge frames, garbage, absurd block sizes, too many frames, slow drips, silence).
- Keys (an API keys file): `bulk` and `agents` with limits they stay under, `limited`
  with a tokens-per-minute limit its load exceeds (its 429s are refusals, not losses),
  `slow` for the slow clients. Metrics are read on the admin listener.
- Load: llm-bench streaming completions over HTTP/1.1 (`bulk`, concurrency 96, 5% hung
  up mid-way), streaming chat completions over HTTP/2 (`agents`, h2c, concurrency 32)
  and completions of the `limited` key (5 requests/s), all for the whole run, with
  every failure's timing saved; bench-scripts/slow_clients.py adds clients that never
  read, read slowly, upload slowly, or open an HTTP/2 stream and never its window.
  Continuation is on (the default): a stream cut by a kill is finished elsewhere.
- Faults: every `--kill-every` seconds one engine is killed (SIGKILL: its streams are
  cut) and restarted 5 s later on the same ports.
- The router's RSS is sampled every 10 s and reported per minute.

Reported (artifact JSON): requests completed, failed, cancelled; every failure matched
against the kills (a request is cut by a fault when it was in flight when an engine
died: `lost` counts the failures no kill explains); the slow clients' outcomes; the
router's own counters (KV feed errors by kind, index resets, ejections, panic routing,
upstream errors, client disconnects, in-flight and idle connections at the end); RSS
per minute, and its growth after the warm-up (the first 10 minutes, while the bounded
caches fill).
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
SIM_PORT, KV_PORT, HOSTILE_PORT, ROUTER_PORT, ADMIN_PORT = 18300, 18400, 18450, 18290, 18291
KEYS = {"bulk": "sk-soak-bulk", "agents": "sk-soak-agents", "limited": "sk-soak-limited", "slow": "sk-soak-slow"}
KEYS_FILE = """
[[keys]]
name = "bulk"
key = "sk-soak-bulk"
requests_per_minute = 1000000
tokens_per_minute = 1000000000

[[keys]]
name = "agents"
key = "sk-soak-agents"
tokens_per_minute = 1000000000
priority = "high"
cache_isolation = true

[[keys]]
name = "limited"
key = "sk-soak-limited"
tokens_per_minute = 20000
priority = "low"

[[keys]]
name = "slow"
key = "sk-soak-slow"
"""
MODEL = "Qwen/Qwen3-0.6B-FP8"
WARMUP_MINUTES = 10


def rss_kb(pid, field="VmRSS"):
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def get(url, timeout=5, key=None):
    request = urllib.request.Request(url, headers={"authorization": f"Bearer {key}"} if key else {})
    with urllib.request.urlopen(request, timeout=timeout) as r:
        return r.read().decode()


def wait_ready(url, timeout=60, key=None):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if MODEL in get(url, key=key):
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


def sum_by(series, label):
    out = {}
    for labels, value in series.items():
        key = next((part.split("=", 1)[1].strip('"') for part in labels.strip("{}").split(",")
                    if part.startswith(label + "=")), "")
        out[key] = out.get(key, 0) + value
    return {k: v for k, v in out.items() if v}


def attribute(result, started_at, kills, tolerance=2.0):
    """Split a bench run's failures (llm-bench --save-failures) into those a kill
    explains (the request was in flight when an engine died) and the rest."""
    cut, lost, refused, lost_examples = 0, 0, 0, []
    for failure in result["failures"]:
        error = failure["error"]
        if error.startswith("cancelled"):
            continue
        if error.startswith("HTTP 429"):
            refused += 1  # a key over its limit: refused, with Retry-After
            continue
        begin, end = started_at + failure["start"], started_at + failure["start"] + failure["latency"]
        if any(begin - tolerance <= k <= end + tolerance for k in kills):
            cut += 1
        else:
            lost += 1
            if len(lost_examples) < 10:
                lost_examples.append({"t": round(begin - started_at, 1), "error": error[:160]})
    return cut, lost, refused, lost_examples


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=60)
    p.add_argument("--replicas", type=int, default=4)
    p.add_argument("--kill-every", type=float, default=60)
    p.add_argument("--out", default=str(ROOT / "artifacts" / "soak.json"))
    p.add_argument("--no-build", action="store_true")
    args = p.parse_args()
    if not args.no_build:
        subprocess.run(["cargo", "build", "--release", "--bins"], cwd=ROOT, check=True)
    logs = Path("/tmp/llm-router-soak")
    logs.mkdir(exist_ok=True)
    procs = {}

    def start_sim(i):
        procs[f"sim{i}"] = subprocess.Popen(
            [BIN / "vllm-sim", "--port", str(SIM_PORT + i), "--kv-events-port", str(KV_PORT + i),
             "--time-scale", "4", "--num-gpu-blocks", "8192"],
            stdout=open(logs / f"sim{i}.log", "ab"), stderr=subprocess.STDOUT)
        return f"http://127.0.0.1:{SIM_PORT + i}"

    urls = [start_sim(i) for i in range(args.replicas)]
    for url in urls:
        wait_ready(url + "/v1/models")
    procs["hostile"] = subprocess.Popen(
        [sys.executable, ROOT / "bench-scripts" / "hostile_kv_publisher.py", "--port", str(HOSTILE_PORT)],
        stdout=open(logs / "hostile.jsonl", "w"), stderr=subprocess.STDOUT)
    endpoints = [f"{url}=tcp://127.0.0.1:{KV_PORT + i}" for i, url in enumerate(urls[:-1])]
    endpoints.append(f"{urls[-1]}=tcp://127.0.0.1:{HOSTILE_PORT}")
    keys_file = logs / "keys.toml"
    keys_file.write_text(KEYS_FILE)
    router_args = [
        BIN / "router", "--host", "127.0.0.1", "--port", str(ROUTER_PORT), "--replicas", ",".join(urls),
        "--api-keys-file", str(keys_file), "--admin-listen", f"127.0.0.1:{ADMIN_PORT}", "--admin-token",
        "soak-admin", "--metrics-on", "admin",
        "--policy", "kv-aware", "--tokenizer", "builtin", "--kv-index-blocks", "65536",
        "--health-interval", "1s", "--unhealthy-threshold", "1", "--healthy-threshold", "1",
        "--client-idle-timeout", "10s", "--body-read-timeout", "10s", "--max-concurrent-requests", "512",
    ]
    for endpoint in endpoints:
        router_args += ["--kv-events-endpoint", endpoint]
    router = subprocess.Popen(router_args, stdout=open(logs / "router.log", "ab"), stderr=subprocess.STDOUT,
                              env={**os.environ, "RUST_LOG": "warn"})
    procs["router"] = router
    base, admin = f"http://127.0.0.1:{ROUTER_PORT}", f"http://127.0.0.1:{ADMIN_PORT}"
    wait_ready(base + "/v1/models", key=KEYS["bulk"])
    duration = int(args.minutes * 60)

    def bench(name, endpoint, concurrency, cancel, key, http2=False, rate=None):
        return subprocess.Popen(
            [BIN / "llm-bench", "run", "--base-url", base, "--model", MODEL, "--endpoint", endpoint,
             "--isl", "200", "--osl", "100", "--max-concurrency", str(concurrency), "--duration", f"{duration}s",
             "--warmup-requests", "0", "--cancel-fraction", str(cancel), "--cancel-after-max", "3s",
             "--drain-timeout", "60s", "--request-timeout", "120s", "--no-progress", "--save-failures",
             "--api-key", KEYS[key], "--result-file", str(logs / f"{name}.json")] + (["--http2"] if http2 else [])
            + (["--request-rate", str(rate)] if rate else []),
            stdout=open(logs / f"{name}.out", "wb"), stderr=subprocess.STDOUT)

    started = time.time()
    procs["completions"] = bench("completions", "completions", 96, 0.05, "bulk")
    procs["chat"] = bench("chat", "chat", 32, 0.0, "agents", http2=True)
    procs["limited"] = bench("limited", "completions", 8, 0.0, "limited", rate=5)
    procs["slow"] = subprocess.Popen(
        [sys.executable, ROOT / "bench-scripts" / "slow_clients.py", "--router", base, "--model", MODEL,
         "--minutes", str(max(args.minutes - 1.5, 0.5)), "--api-key", KEYS["slow"]],
        stdout=subprocess.PIPE, stderr=open(logs / "slow.err", "wb"))
    samples, kills = [], []
    next_kill = started + args.kill_every
    rng = random.Random(42)
    try:
        while any(procs[name].poll() is None for name in ("completions", "chat", "limited")):
            now = time.time()
            samples.append({"t": round(now - started, 1), "rss_kb": rss_kb(router.pid)})
            if now >= next_kill and now - started < duration - 15:
                i = rng.randrange(args.replicas)
                procs[f"sim{i}"].send_signal(signal.SIGKILL)
                procs[f"sim{i}"].wait()
                kills.append(time.time())
                time.sleep(5)
                start_sim(i)
                next_kill = now + args.kill_every
            time.sleep(max(0.0, 10 - (time.time() - now)))
            if time.time() - started > duration + 300:
                raise RuntimeError("llm-bench did not finish within 5 minutes of the end")
        slow = json.loads(procs["slow"].communicate(timeout=300)[0] or b"{}")
        time.sleep(2)
        text = get(admin + "/metrics")
        runs = {}
        for name in ["completions", "chat", "limited"]:
            result = json.loads((logs / f"{name}.json").read_text())
            cut, lost, refused, examples = attribute(result, started, kills)
            runs[name] = {
                "completed": result["completed"], "failed": result["failed"],
                "cancelled": result.get("cancelled", 0), "unfinished": result.get("unfinished", 0),
                "refused_429": refused, "failed_cut_by_kills": cut, "lost": lost + result.get("unfinished", 0),
                "lost_examples": examples,
                "request_throughput": round(result["request_throughput"], 2),
                "errors": result.get("error_counts", {}),
            }
        hostile = [json.loads(line) for line in (logs / "hostile.jsonl").read_text().splitlines() if line.startswith("{")]
        per_minute = []
        for minute in range(int(args.minutes) + 1):
            near = [s for s in samples if minute * 60 - 5 <= s["t"] <= minute * 60 + 5]
            if near:
                per_minute.append({"minute": minute, "rss_mb": round(near[0]["rss_kb"] / 1024, 1)})
        after = [m["rss_mb"] for m in per_minute if m["minute"] >= WARMUP_MINUTES]
        report = {
            "minutes": args.minutes,
            "replicas": args.replicas,
            "engine_kills": len(kills),
            "requests": runs,
            "lost_total": sum(r["lost"] for r in runs.values()),
            "slow_clients": slow,
            "hostile_publisher": {k: sum(1 for h in hostile if h["kind"] == k) for k in sorted({h["kind"] for h in hostile})},
            "hostile_outcomes": sorted({(h["kind"], h["outcome"]) for h in hostile}),
            "router": {
                "responses_by_status": sum_by(metrics(text, "router_requests_total"), "status"),
                "upstream_errors": sum_by(metrics(text, "router_upstream_errors_total"), "kind"),
                "retries": sum(metrics(text, "router_retries_total").values()),
                "retries_denied": sum(metrics(text, "router_retries_denied_total").values()),
                "ejections": sum_by(metrics(text, "router_ejections_total"), "result"),
                "panic_routing": sum(metrics(text, "router_panic_routing_total").values()),
                "client_disconnects": sum_by(metrics(text, "router_client_disconnects_total"), "stage"),
                "client_stalls": sum_by(metrics(text, "router_client_stalls_total"), "kind"),
                "premature_resets": sum(metrics(text, "router_client_premature_resets_total").values()),
                "client_goaways": sum(metrics(text, "router_client_goaways_total").values()),
                "continuations": sum_by(metrics(text, "router_continuations_total"), "outcome"),
                "key_rate_limited": sum_by(metrics(text, "router_key_rate_limited_total"), "key"),
                "key_tokens": sum_by(metrics(text, "router_key_tokens_total"), "key"),
                "request_bytes_held_after": sum(metrics(text, "router_request_bytes_held").values()),
                "client_connections_after": sum(metrics(text, "router_client_connections").values()),
                "kv_feed_errors": sum_by(metrics(text, "router_kv_feed_errors_total"), "kind"),
                "kv_index_resets": sum_by(metrics(text, "router_kv_index_resets_total"), "reason"),
                "kv_event_batches": sum_by(metrics(text, "router_kv_event_batches_total"), "outcome"),
                "in_flight_after": sum(metrics(text, "router_in_flight_requests").values()),
                "idle_upstream_connections_after": sum(metrics(text, "router_upstream_idle_connections").values()),
            },
            "rss_mb": {
                "per_minute": per_minute,
                "at_warmup_end": after[0] if after else None,
                "max_after_warmup": max(after) if after else None,
                "growth_after_warmup_pct": round(100 * (max(after) / after[0] - 1), 1) if after else None,
                "peak": round(rss_kb(router.pid, "VmHWM") / 1024, 1),
            },
            "rss_samples_10s": samples,
        }
        Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
        summary = {k: v for k, v in report.items() if k != "rss_samples_10s"}
        summary["rss_mb"] = {k: v for k, v in report["rss_mb"].items() if k != "per_minute"}
        print(json.dumps(summary, indent=1))
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                proc.wait()


if __name__ == "__main__":
    sys.exit(main())
