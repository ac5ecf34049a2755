#!/usr/bin/env python3
"""Per-key limits across three router instances, with and without the state store.

Three router instances in front of four fast `vllm-sim` engines (`--time-scale 50`),
one API key, wrk on every instance (with the key) for SECONDS:

- **held**: the key allows REQUESTS_PER_MINUTE requests a minute. Granted requests (200)
  in all against what the limit allows in that time (a full minute's allowance at the
  start, plus what refilled), with `--state-store` (a local `redis-server`) and without
  (each instance holds the key to its whole limit).
- **cost**: the key's limit is out of reach; requests/s, latency and CPU per request of
  the routers (and of redis-server) with the store against without, and the store's
  round trip as the routers measured it (`router_state_store_seconds`).

Contenders rotated per run; the table quotes medians.

  python3 bench-scripts/shared_limits.py               # 3 runs
  python3 bench-scripts/shared_limits.py --runs 1

Writes artifacts/shared-limits/results.json and table.md.
"""

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib  # noqa: E402
from benchlib import BIN, ROOT  # noqa: E402

SIM_PORT = 18600
ROUTER_PORT = 18660
REDIS_PORT = 18690
MODEL = ("qwen3-0.6b-fp8-h100", "Qwen/Qwen3-0.6B-FP8")
KEY = "sk-bench-shared"

log = benchlib.logger("limits")

WRK_LUA = """wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer KEY"
wrk.body = '{"model": "MODEL", "prompt": "hello there", "max_tokens": 8}'
function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format('{"requests":%d,"duration_us":%d,"p50_us":%d,"p99_us":%d,"non2xx":%d,"socket":%d}\\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99), e.status,
    e.connect + e.read + e.write + e.timeout))
end
"""


def scrape(port):
    with urllib.request.urlopen(urllib.request.Request(f"http://127.0.0.1:{port}/metrics",
                                headers={"Authorization": f"Bearer {KEY}"}), timeout=10) as r:
        return r.read().decode()


def total(text, name):
    out = 0.0
    for line in text.splitlines():
        if line.startswith(name) and line[len(name):][:1] in ("{", " "):
            out += float(line.rsplit(" ", 1)[1])
    return out


class Limits:
    def __init__(self, args):
        self.args = args
        self.out = Path(args.out)
        self.procs = benchlib.Processes(self.out / "logs", log)
        self.tmp = Path(tempfile.mkdtemp(prefix="shared-limits-"))
        self.urls = [f"http://127.0.0.1:{SIM_PORT + i}" for i in range(4)]
        self.redis = shutil.which("redis-server") or "/usr/bin/redis-server"

    def wrk(self, seconds, connections):
        lua = self.tmp / "limits.lua"
        lua.write_text(WRK_LUA.replace("KEY", KEY).replace("MODEL", MODEL[1]))
        cmds = [["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--timeout", "30s", "-s", str(lua),
                 f"http://127.0.0.1:{ROUTER_PORT + i}/v1/completions"] for i in range(3)]
        procs = [subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for c in cmds]
        out = []
        for p in procs:
            text, _ = p.communicate()
            line = next((l for l in reversed(text.splitlines()) if l.startswith("{")), None)
            if line is None:
                raise RuntimeError(f"wrk failed: {text[-400:]}")
            out.append(json.loads(line))
        return out

    def run(self, mode, store, run):
        a = self.args
        log(f"--- {mode} store={store} r{run}")
        self.procs.ensure_free([SIM_PORT + i for i in range(4)] + [ROUTER_PORT + i for i in range(3)] + [REDIS_PORT])
        rpm = a.requests_per_minute if mode == "held" else 1_000_000_000
        keys = self.tmp / "keys.toml"
        keys.write_text(f'[[keys]]\nname = "bench"\nkey = "{KEY}"\nrequests_per_minute = {rpm}\n')
        try:
            for i in range(4):
                self.procs.spawn([BIN / "vllm-sim", "--port", SIM_PORT + i, "--profile", MODEL[0], "--time-scale", 50],
                                 f"sim-{i}", {"RUST_LOG": "warn"})
            for url in self.urls:
                self.procs.wait_ready(url + "/v1/models", MODEL[1], "vllm-sim")
            redis = None
            if store:
                redis = self.procs.spawn([self.redis, "--port", REDIS_PORT, "--bind", "127.0.0.1", "--save", "",
                                          "--appendonly", "no"], f"redis-r{run}")
            routers = []
            for i in range(3):
                cmd = [BIN / "router", "--host", "127.0.0.1", "--port", ROUTER_PORT + i, "--replicas",
                       ",".join(self.urls), "--api-keys-file", keys]
                if store:
                    cmd += ["--state-store", f"redis://127.0.0.1:{REDIS_PORT}", "--router-instances", "3"]
                routers.append(self.procs.spawn(cmd, f"router-{i}-{mode}-{store}-r{run}", {"RUST_LOG": "warn"}))
            for i in range(3):
                req = urllib.request.Request(f"http://127.0.0.1:{ROUTER_PORT + i}/v1/models",
                                             headers={"Authorization": f"Bearer {KEY}"})
                for _ in range(200):
                    try:
                        with urllib.request.urlopen(req, timeout=2):
                            break
                    except OSError:
                        __import__("time").sleep(0.1)
            cpu0 = [benchlib.cpu_seconds(p.pid) for p in routers]
            redis0 = benchlib.cpu_seconds(redis.pid) if redis else 0.0
            summaries = self.wrk(a.seconds, a.connections)
            cpu1 = [benchlib.cpu_seconds(p.pid) for p in routers]
            redis1 = benchlib.cpu_seconds(redis.pid) if redis else 0.0
            texts = [scrape(ROUTER_PORT + i) for i in range(3)]
        finally:
            self.procs.stop_all()
        requests = sum(s["requests"] for s in summaries)
        granted = requests - sum(s["non2xx"] for s in summaries)
        seconds = statistics.mean(s["duration_us"] for s in summaries) / 1e6
        store_count = sum(total(t, "router_state_store_seconds_count") for t in texts)
        store_sum = sum(total(t, "router_state_store_seconds_sum") for t in texts)
        return {
            "mode": mode, "store": store, "run": run, "requests": requests, "granted": granted,
            "allowed": round(rpm + rpm * seconds / 60.0, 1) if mode == "held" else None,
            "requests_per_s": round(requests / seconds, 1),
            "p50_ms": round(statistics.mean(s["p50_us"] for s in summaries) / 1e3, 3),
            "p99_ms": round(statistics.mean(s["p99_us"] for s in summaries) / 1e3, 3),
            "router_cpu_ms_per_request": round(1e3 * sum(b - a for a, b in zip(cpu0, cpu1)) / max(requests, 1), 4),
            "redis_cpu_ms_per_request": round(1e3 * (redis1 - redis0) / max(requests, 1), 4),
            "store_round_trip_ms": round(1e3 * store_sum / store_count, 4) if store_count else None,
            "fallbacks": sum(total(t, "router_state_store_fallbacks_total") for t in texts),
            "socket_errors": sum(s["socket"] for s in summaries),
        }

    def main(self):
        benchlib.build(log)
        runs = []
        contenders = [("held", True), ("held", False), ("cost", True), ("cost", False)]
        for run in range(self.args.runs):
            order = contenders[run % 2:] + contenders[:run % 2]
            for mode, store in order:
                runs.append(self.run(mode, store, run))
                log(json.dumps(runs[-1]))
        med = {}
        for mode, store in contenders:
            rows = [r for r in runs if r["mode"] == mode and r["store"] == store]
            med[(mode, store)] = {k: statistics.median(r[k] for r in rows) for k in rows[0]
                                  if isinstance(rows[0][k], (int, float)) and not isinstance(rows[0][k], bool)
                                  and all(r[k] is not None for r in rows)}
        lines = ["| limit held by | granted in all | the limit allows | requests/s | p50 ms | p99 ms | router CPU ms/request | "
                 "redis CPU ms/request | store round trip ms |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for (mode, store), m in med.items():
            who = ("the store" if store else "each instance alone") + (" (limit out of reach)" if mode == "cost" else "")
            lines.append(f"| {who} | {m['granted']:.0f} | {m.get('allowed', '-') if mode == 'held' else '-'} | "
                         f"{m['requests_per_s']:.0f} | {m['p50_ms']:.2f} | {m['p99_ms']:.2f} | "
                         f"{m['router_cpu_ms_per_request']:.3f} | {m['redis_cpu_ms_per_request']:.3f} | "
                         f"{m.get('store_round_trip_ms', '-')} |")
        result = {"settings": vars(self.args), "machine": benchlib.machine_info(), "commit": benchlib.git_commit(),
                  "runs": runs, "medians": [dict(mode=k[0], store=k[1], **v) for k, v in med.items()]}
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "results.json").write_text(json.dumps(result, indent=2, default=str))
        (self.out / "table.md").write_text("\n".join(lines) + "\n")
        print("\n".join(lines))


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--seconds", type=int, default=10)
    p.add_argument("--connections", type=int, default=16, help="per instance")
    p.add_argument("--requests-per-minute", type=int, default=600)
    p.add_argument("--out", default=str(ROOT / "artifacts" / "shared-limits"))
    return p.parse_args()


if __name__ == "__main__":
    Limits(parse_args()).main()
