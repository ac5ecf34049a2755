#!/usr/bin/env python3
"""Bounded-load affinity: what a balance factor costs in cache hits and buys in balance.

Few sessions on few engines is where pure consistent hashing is uneven: 64 session ids
hashed onto 4 engines leave one engine with more than its share, and the busiest one
sets the pace. Here 4 `vllm-sim` engines (`--time-scale`, faster than real time) serve
wrk's 128 connections, every request a streamed completion of TOKENS tokens whose
prompt starts with its session's own text (so where a session's turns go decides the
engines' prefix-cache hits), with a random one of SESSIONS ids in `x-session-id`.

Contenders: `direct` (each wrk process on one engine: the limit, no affinity at all)
and `router --policy consistent-hash` with each `--hash-balance-factor` given. Per run:
requests/s, p50/p99 of a whole stream, the share of decisions that spilled past a
session's owner (`router_routing_decisions_total{reason="spill"}`), and the engines'
prefix-cache hit rate (`vllm:prefix_cache_hits_total / vllm:prefix_cache_queries_total`).
Contenders are rotated per run; the table quotes medians.

  python3 bench-scripts/affinity_balance.py                  # 3 runs of 10 s
  python3 bench-scripts/affinity_balance.py --factors off 1.25 --runs 1

Writes artifacts/affinity-balance/results.json and table.md.
"""

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib  # noqa: E402
from benchlib import BIN, ROOT  # noqa: E402

SIM_PORT = 18300
ROUTER_PORT = 18390
MODEL = ("qwen3-0.6b-fp8-h100", "Qwen/Qwen3-0.6B-FP8")
WRK_PROCESSES = 4

log = benchlib.logger("balance")

# Each request: a random session, whose prompt opens with text of its own (about 300
# tokens), then the shared question.
WRK_LUA = """wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
local sessions = SESSIONS
local history = {}
for s = 1, sessions do
  local words = {}
  for i = 1, 40 do words[#words + 1] = "session " .. s .. " turn " .. i .. " notes" end
  history[s] = table.concat(words, ", ")
end
math.randomseed(os.time() + tonumber(tostring({}):sub(8), 16))
request = function()
  local s = math.random(sessions)
  local body = '{"model": "MODEL", "stream": true, "ignore_eos": true, "max_tokens": TOKENS, ' ..
    '"prompt": "' .. history[s] .. '. Summarise the trade-offs of consistent hashing."}'
  return wrk.format(nil, nil, {["x-session-id"] = "s" .. s}, body)
end
function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '{"requests":%d,"duration_us":%d,"p50_us":%d,"p99_us":%d,"errors":%d}\\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99),
    e.connect + e.read + e.write + e.status + e.timeout))
end
"""


def scrape(url):
    with urllib.request.urlopen(url + "/metrics", timeout=10) as r:
        return r.read().decode()


def total(text, name, labels=""):
    """The sum of a metric's samples whose label text contains `labels`."""
    out = 0.0
    for line in text.splitlines():
        if line.startswith(name) and labels in line and not line.startswith("#"):
            rest = line[len(name):]
            if rest[:1] in ("{", " "):
                out += float(line.rsplit(" ", 1)[1])
    return out


class Balance:
    def __init__(self, args):
        self.args = args
        self.out = Path(args.out)
        self.procs = benchlib.Processes(self.out / "logs", log)
        self.sims = benchlib.Processes(self.out / "logs", log)
        self.urls = [f"http://127.0.0.1:{SIM_PORT + i}" for i in range(args.replicas)]
        self.tmp = Path(tempfile.mkdtemp(prefix="affinity-balance-"))
        lua = WRK_LUA.replace("SESSIONS", str(args.sessions)).replace("MODEL", MODEL[1])
        self.lua = self.tmp / "sessions.lua"
        self.lua.write_text(lua.replace("TOKENS", str(args.tokens)))

    def start_sims(self):
        self.sims.stop_all()
        self.procs.ensure_free([SIM_PORT + i for i in range(self.args.replicas)] + [ROUTER_PORT])
        for i in range(self.args.replicas):
            self.sims.spawn([BIN / "vllm-sim", "--port", SIM_PORT + i, "--profile", MODEL[0],
                             "--time-scale", self.args.time_scale], f"sim-{SIM_PORT + i}", {"RUST_LOG": "warn"})
        for url in self.urls:
            self.sims.wait_ready(url + "/v1/models", MODEL[1], "vllm-sim")

    def wrk(self, targets, seconds):
        per = max(1, self.args.connections // WRK_PROCESSES)
        cmds = [["wrk", "-t1", f"-c{per}", f"-d{seconds}s", "--timeout", "30s", "-s", str(self.lua),
                 url + "/v1/completions"] for url in targets]
        procs = [subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for c in cmds]
        summaries = []
        for p in procs:
            out, _ = p.communicate()
            line = next((l for l in reversed(out.splitlines()) if l.startswith("{")), None)
            if p.returncode != 0 or line is None:
                raise RuntimeError(f"wrk failed: {out[-500:]}")
            summaries.append(json.loads(line))
        return summaries

    def cache(self):
        texts = [scrape(u) for u in self.urls]
        return (sum(total(t, "vllm:prefix_cache_hits_total") for t in texts),
                sum(total(t, "vllm:prefix_cache_queries_total") for t in texts))

    def run(self, contender, run):
        log(f"--- {contender} r{run}")
        # Fresh engines: no contender inherits another's prefix cache.
        self.start_sims()
        router = None
        try:
            if contender == "direct":
                targets = [self.urls[i % len(self.urls)] for i in range(WRK_PROCESSES)]
            else:
                factor = contender.split("=", 1)[1]
                router = f"http://127.0.0.1:{ROUTER_PORT}"
                cmd = [BIN / "router", "--host", "127.0.0.1", "--port", ROUTER_PORT, "--replicas", ",".join(self.urls),
                       "--policy", "consistent-hash"]
                if factor != "default":
                    cmd += ["--hash-balance-factor", factor]
                self.procs.spawn(cmd, f"router-{factor}-r{run}", {"RUST_LOG": "warn"})
                self.procs.wait_ready(router + "/v1/models", MODEL[1], "router")
                targets = [router] * WRK_PROCESSES
            self.wrk(targets, self.args.warmup)
            hits0, queries0 = self.cache()
            metrics0 = scrape(router) if router else ""
            summaries = self.wrk(targets, self.args.seconds)
            hits1, queries1 = self.cache()
            metrics1 = scrape(router) if router else ""
        finally:
            self.procs.stop_all()
        requests = sum(s["requests"] for s in summaries)
        seconds = statistics.mean(s["duration_us"] for s in summaries) / 1e6
        decided = total(metrics1, "router_routing_decisions_total") - total(metrics0, "router_routing_decisions_total")
        spilled = (total(metrics1, "router_routing_decisions_total", 'reason="spill"')
                   - total(metrics0, "router_routing_decisions_total", 'reason="spill"'))
        return {
            "contender": contender, "run": run, "requests": requests,
            "errors": sum(s["errors"] for s in summaries),
            "requests_per_s": round(requests / seconds, 2),
            "p50_ms": round(statistics.mean(s["p50_us"] for s in summaries) / 1e3, 2),
            "p99_ms": round(statistics.mean(s["p99_us"] for s in summaries) / 1e3, 2),
            "spilled": round(spilled / decided, 4) if decided else None,
            "prefix_cache_hit_rate": round((hits1 - hits0) / (queries1 - queries0), 4) if queries1 > queries0 else None,
        }

    def main(self):
        benchlib.build(log)
        contenders = ["direct"] + [f"router={f}" for f in self.args.factors]
        runs = []
        try:
            for run in range(self.args.runs):
                order = contenders[run % len(contenders):] + contenders[:run % len(contenders)]
                for contender in order:
                    runs.append(self.run(contender, run))
                    log(json.dumps(runs[-1]))
        finally:
            self.sims.stop_all()
            self.procs.stop_all()
        medians = {}
        for c in contenders:
            rows = [r for r in runs if r["contender"] == c]
            medians[c] = {k: statistics.median(r[k] for r in rows) for k in
                          ["requests_per_s", "p50_ms", "p99_ms"]}
            for k in ["spilled", "prefix_cache_hit_rate"]:
                values = [r[k] for r in rows if r[k] is not None]
                medians[c][k] = statistics.median(values) if values else None
            medians[c]["errors"] = sum(r["errors"] for r in rows)
        direct = medians["direct"]["requests_per_s"]
        for c in contenders:
            medians[c]["vs_direct"] = round(medians[c]["requests_per_s"] / direct, 4)
        result = {"settings": vars(self.args), "machine": benchlib.machine_info(), "commit": benchlib.git_commit(),
                  "runs": runs, "medians": medians}
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "results.json").write_text(json.dumps(result, indent=2, default=str))
        lines = ["| contender | req/s | vs direct | p50 ms | p99 ms | spilled past the owner | prefix-cache hits | errors |",
                 "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        for c in contenders:
            m = medians[c]
            pct = lambda v: "-" if v is None else f"{100 * v:.1f}%"  # noqa: E731
            lines.append(f"| {c} | {m['requests_per_s']:.1f} | {m['vs_direct']:.3f} | {m['p50_ms']:.1f} | "
                         f"{m['p99_ms']:.1f} | {pct(m['spilled'])} | {pct(m['prefix_cache_hit_rate'])} | {m['errors']} |")
        (self.out / "table.md").write_text("\n".join(lines) + "\n")
        print("\n".join(lines))


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--seconds", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--connections", type=int, default=128)
    p.add_argument("--sessions", type=int, default=64)
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--time-scale", type=float, default=4.0)
    p.add_argument("--replicas", type=int, default=4)
    p.add_argument("--factors", nargs="+", default=["off", "1.5", "1.25", "1.1"],
                   help="--hash-balance-factor values (`default`: the router's own default)")
    p.add_argument("--out", default=str(ROOT / "artifacts" / "affinity-balance"))
    return p.parse_args()


if __name__ == "__main__":
    Balance(parse_args()).main()
