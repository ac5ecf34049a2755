#!/usr/bin/env python3
"""Several router instances, one fleet: do they agree where each session lives?

R router instances (each with `--explain-routing`, so every answer names its replica in
`x-router-replica`) in front of the same E `vllm-sim` engines. wrk sends streamed
completions, each from a random one of S sessions (`x-session-id`, and a prompt that
opens with the session's own text, so where a session goes decides the engines'
prefix-cache hits); one wrk process per router instance, so every instance sees every
session, as behind a Service that spreads connections. Each answer's replica is
recorded per session and instance (the session rides in the request's own
`x-request-id`, which the router returns).

Per contender and run:
- agreement: sessions whose home (the replica most of its requests went to) is the same
  on every instance that served it;
- on home: requests that went to their session's home (over all instances);
- requests/s, and throughput against round robin on the same instances;
- the engines' prefix-cache hit rate.

  python3 bench-scripts/fleet_agreement.py                          # the issue's table
  python3 bench-scripts/fleet_agreement.py --routers 1 3 --sessions 64 --runs 1

Writes artifacts/fleet-agreement/results.json and table.md.
"""

import argparse
import collections
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

SIM_PORT = 18400
ROUTER_PORT = 18460
KV_PORT = 18480
MODEL = ("qwen3-0.6b-fp8-h100", "Qwen/Qwen3-0.6B-FP8")

log = benchlib.logger("fleet")

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
-- Each wrk thread runs its own Lua state: `done` reads the threads' tables.
seen = {}
local sent = 0
local threads = {}
function setup(thread) table.insert(threads, thread) end
request = function()
  local s = math.random(sessions)
  sent = sent + 1
  local body = '{"model": "MODEL", "stream": true, "ignore_eos": true, "max_tokens": TOKENS, ' ..
    '"prompt": "' .. history[s] .. '. Summarise the trade-offs of consistent hashing."}'
  return wrk.format(nil, nil, {["x-session-id"] = "s" .. s, ["x-request-id"] = "s" .. s .. "-" .. sent}, body)
end
response = function(status, headers, body)
  local id = headers["x-request-id"] or headers["X-Request-Id"]
  local replica = headers["x-router-replica"] or headers["X-Router-Replica"] or "none"
  if id == nil then return end
  local s = id:match("^(s%d+)-")
  if s == nil then return end
  if status ~= 200 then replica = "status-" .. status end
  local k = s .. "|" .. replica
  seen[k] = (seen[k] or 0) + 1
end
function done(summary, latency, requests)
  local e = summary.errors
  local all = {}
  for _, thread in ipairs(threads) do
    for k, n in pairs(thread:get("seen")) do
      local s, r = k:match("^([^|]+)|(.*)$")
      all[s] = all[s] or {}
      all[s][r] = (all[s][r] or 0) + n
    end
  end
  local parts = {}
  for s, per in pairs(all) do
    local inner = {}
    for r, n in pairs(per) do inner[#inner + 1] = string.format('"%s":%d', r, n) end
    parts[#parts + 1] = string.format('"%s":{%s}', s, table.concat(inner, ","))
  end
  io.write(string.format(
    '{"requests":%d,"duration_us":%d,"p50_us":%d,"p99_us":%d,"errors":%d,"sessions":{%s}}\\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99),
    e.connect + e.read + e.write + e.status + e.timeout, table.concat(parts, ",")))
end
"""


def scrape(url):
    with urllib.request.urlopen(url + "/metrics", timeout=10) as r:
        return r.read().decode()


def total(text, name):
    out = 0.0
    for line in text.splitlines():
        if line.startswith(name) and line[len(name):][:1] in ("{", " "):
            out += float(line.rsplit(" ", 1)[1])
    return out


def agreement(per_router):
    """(sessions agreeing, sessions, requests on home, requests) from each router's
    {session: {replica: count}}."""
    sessions = set().union(*[set(p) for p in per_router])
    agree = on_home = requests = 0
    for s in sessions:
        homes = set()
        overall = collections.Counter()
        for p in per_router:
            if s in p:
                counts = collections.Counter(p[s])
                overall.update(counts)
                top = max(counts.values())
                # A tie names no single home: it counts as disagreement.
                tops = [r for r, n in counts.items() if n == top]
                homes.add(tops[0] if len(tops) == 1 else "tie")
        agree += len(homes) == 1 and "tie" not in homes
        on_home += max(overall.values())
        requests += sum(overall.values())
    return agree, len(sessions), on_home, requests


class Fleet:
    def __init__(self, args):
        self.args = args
        self.out = Path(args.out)
        self.procs = benchlib.Processes(self.out / "logs", log)
        self.sims = benchlib.Processes(self.out / "logs", log)
        self.urls = [f"http://127.0.0.1:{SIM_PORT + i}" for i in range(args.engines)]
        self.tmp = Path(tempfile.mkdtemp(prefix="fleet-agreement-"))

    def lua(self, sessions):
        path = self.tmp / f"sessions-{sessions}.lua"
        text = WRK_LUA.replace("SESSIONS", str(sessions)).replace("MODEL", MODEL[1])
        path.write_text(text.replace("TOKENS", str(self.args.tokens)))
        return path

    def start_sims(self):
        self.sims.stop_all()
        self.procs.ensure_free([SIM_PORT + i for i in range(self.args.engines)]
                               + [KV_PORT + i for i in range(self.args.engines)]
                               + [ROUTER_PORT + i for i in range(max(self.args.routers))])
        for i in range(self.args.engines):
            self.sims.spawn([BIN / "vllm-sim", "--port", SIM_PORT + i, "--profile", MODEL[0],
                             "--time-scale", self.args.time_scale, "--kv-events-port", KV_PORT + i],
                            f"sim-{SIM_PORT + i}", {"RUST_LOG": "warn"})
        for url in self.urls:
            self.sims.wait_ready(url + "/v1/models", MODEL[1], "vllm-sim")

    def wrk(self, routers, sessions, seconds):
        per = max(1, self.args.connections // len(routers))
        cmds = [["wrk", "-t1", f"-c{per}", f"-d{seconds}s", "--timeout", "30s", "-s", str(self.lua(sessions)),
                 url + "/v1/completions"] for url in routers]
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

    def run(self, contender, routers, sessions, run):
        log(f"--- {contender} routers={routers} sessions={sessions} r{run}")
        self.start_sims()
        try:
            urls = []
            for i in range(routers):
                url = f"http://127.0.0.1:{ROUTER_PORT + i}"
                cmd = [BIN / "router", "--host", "127.0.0.1", "--port", ROUTER_PORT + i,
                       "--replicas", ",".join(self.urls), "--explain-routing"] + contender_flags(contender)
                if contender.startswith("kv-aware"):
                    # The engines' own KV events, and the simulator's tokenizer.
                    cmd += ["--tokenizer", "builtin"]
                    for j, engine in enumerate(self.urls):
                        cmd += ["--kv-events-endpoint", f"{engine}=tcp://127.0.0.1:{KV_PORT + j}"]
                self.procs.spawn(cmd, f"router-{i}-{contender}-r{run}", {"RUST_LOG": "warn"})
                self.procs.wait_ready(url + "/v1/models", MODEL[1], "router")
                urls.append(url)
            if self.args.warmup:
                self.wrk(urls, sessions, self.args.warmup)
            hits0, queries0 = self.cache()
            summaries = self.wrk(urls, sessions, self.args.seconds)
            hits1, queries1 = self.cache()
        finally:
            self.procs.stop_all()
        requests = sum(s["requests"] for s in summaries)
        seconds = statistics.mean(s["duration_us"] for s in summaries) / 1e6
        agree, seen, on_home, counted = agreement([s["sessions"] for s in summaries])
        return {
            "contender": contender, "routers": routers, "sessions": sessions, "run": run,
            "requests": requests, "errors": sum(s["errors"] for s in summaries),
            "requests_per_s": round(requests / seconds, 2),
            "p50_ms": round(statistics.mean(s["p50_us"] for s in summaries) / 1e3, 2),
            "p99_ms": round(statistics.mean(s["p99_us"] for s in summaries) / 1e3, 2),
            "agreeing_sessions": agree, "sessions_seen": seen,
            "on_home": round(on_home / counted, 4) if counted else None,
            "prefix_cache_hit_rate": round((hits1 - hits0) / (queries1 - queries0), 4) if queries1 > queries0 else None,
        }

    def main(self):
        benchlib.build(log)
        runs = []
        try:
            for routers in self.args.routers:
                for sessions in self.args.sessions:
                    contenders = ["round-robin"] + self.args.policies
                    for run in range(self.args.runs):
                        order = contenders[run % len(contenders):] + contenders[:run % len(contenders)]
                        for contender in order:
                            runs.append(self.run(contender, routers, sessions, run))
                            log(json.dumps(runs[-1]))
        finally:
            self.sims.stop_all()
            self.procs.stop_all()
        self.report(runs)

    def report(self, runs):
        groups = collections.OrderedDict()
        for r in runs:
            groups.setdefault((r["routers"], r["sessions"], r["contender"]), []).append(r)
        medians = {}
        for key, rows in groups.items():
            m = {k: statistics.median(r[k] for r in rows) for k in ["requests_per_s", "p50_ms", "p99_ms"]}
            m["agreement"] = statistics.median(r["agreeing_sessions"] / r["sessions_seen"] for r in rows)
            m["agreeing_sessions"] = statistics.median(r["agreeing_sessions"] for r in rows)
            m["sessions_seen"] = statistics.median(r["sessions_seen"] for r in rows)
            m["on_home"] = statistics.median(r["on_home"] for r in rows)
            hits = [r["prefix_cache_hit_rate"] for r in rows if r["prefix_cache_hit_rate"] is not None]
            m["prefix_cache_hit_rate"] = statistics.median(hits) if hits else None
            m["errors"] = sum(r["errors"] for r in rows)
            medians[key] = m
        lines = ["| routers | sessions | policy | sessions with one home on every instance | requests on home | "
                 "req/s | vs round robin | p99 ms | prefix-cache hits | errors |",
                 "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for (routers, sessions, contender), m in medians.items():
            rr = medians[(routers, sessions, "round-robin")]["requests_per_s"]
            m["vs_round_robin"] = round(m["requests_per_s"] / rr, 4)
            hit = "-" if m["prefix_cache_hit_rate"] is None else f"{100 * m['prefix_cache_hit_rate']:.1f}%"
            lines.append(f"| {routers} | {sessions} | {contender} | {m['agreeing_sessions']:.0f} of "
                         f"{m['sessions_seen']:.0f} | {100 * m['on_home']:.1f}% | {m['requests_per_s']:.1f} | "
                         f"{m['vs_round_robin']:.3f} | {m['p99_ms']:.0f} | {hit} | {m['errors']} |")
        result = {"settings": vars(self.args), "machine": benchlib.machine_info(), "commit": benchlib.git_commit(),
                  "runs": runs, "medians": [dict(routers=k[0], sessions=k[1], contender=k[2], **v)
                                            for k, v in medians.items()]}
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "results.json").write_text(json.dumps(result, indent=2, default=str))
        (self.out / "table.md").write_text("\n".join(lines) + "\n")
        print("\n".join(lines))


def contender_flags(contender):
    """A contender is a policy, optionally with flags: `consistent-hash`,
    `consistent-hash:--hash-balance-factor=off`."""
    policy, _, extra = contender.partition(":")
    flags = ["--policy", policy]
    for flag in filter(None, extra.split(",")):
        flags += flag.split("=", 1)
    return flags


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--seconds", type=int, default=20)
    p.add_argument("--warmup", type=int, default=0)
    p.add_argument("--connections", type=int, default=64)
    p.add_argument("--routers", type=int, nargs="+", default=[1, 2, 3, 5])
    p.add_argument("--sessions", type=int, nargs="+", default=[16, 64, 512])
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--time-scale", type=float, default=1.0)
    p.add_argument("--engines", type=int, default=4)
    p.add_argument("--policies", nargs="+", default=["consistent-hash"],
                   help="contenders besides round robin: POLICY[:--flag=value,...]")
    p.add_argument("--out", default=str(ROOT / "artifacts" / "fleet-agreement"))
    return p.parse_args()


if __name__ == "__main__":
    Fleet(parse_args()).main()
