#!/usr/bin/env python3
"""One router instance killed mid-run: what it costs the clients and the sessions.

Three router instances (`--policy consistent-hash`, defaults, `--explain-routing`)
behind HAProxy in TCP mode (health-checked every 500 ms, as a Service's kube-proxy in
front of pods would be, with connections spread round robin), in front of four
`vllm-sim` engines in real time. wrk sends streamed completions through HAProxy, each
from a random one of SESSIONS sessions. At KILL_AT seconds one instance is killed
(SIGKILL: no drain). Per run:

- errors the clients saw (wrk's socket errors and non-200 answers), and per second the
  answers that succeeded, so the recovery time: from the kill to the first second whose
  successes are back at 90% of the seconds before it;
- which sessions moved: each session's home (where most of its requests went) before
  the kill against after it.

  python3 bench-scripts/fleet_failover.py                 # 3 runs
  python3 bench-scripts/fleet_failover.py --runs 1

Writes artifacts/fleet-failover/results.json and table.md.
"""

import argparse
import collections
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib  # noqa: E402
from benchlib import BIN, ROOT  # noqa: E402

SIM_PORT = 18500
ROUTER_PORT = 18560
HAPROXY_PORT = 18590
MODEL = ("qwen3-0.6b-fp8-h100", "Qwen/Qwen3-0.6B-FP8")

log = benchlib.logger("failover")

WRK_LUA = """wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
local sessions = SESSIONS
local kill_at = KILL_AT
local history = {}
for s = 1, sessions do
  local words = {}
  for i = 1, 40 do words[#words + 1] = "session " .. s .. " turn " .. i .. " notes" end
  history[s] = table.concat(words, ", ")
end
math.randomseed(os.time() + tonumber(tostring({}):sub(8), 16))
seen = {}
ok = {}
bad = {}
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
  local now = os.time()
  local second = tostring(now)
  if status ~= 200 then bad[second] = (bad[second] or 0) + 1; return end
  ok[second] = (ok[second] or 0) + 1
  local id = headers["x-request-id"]
  local replica = headers["x-router-replica"]
  if id == nil or replica == nil then return end
  local s = id:match("^(s%d+)-")
  if s == nil then return end
  local phase = "before"
  if now >= kill_at then phase = "after" end
  local k = s .. "|" .. replica .. "|" .. phase
  seen[k] = (seen[k] or 0) + 1
end
local function merge(name)
  local all = {}
  for _, thread in ipairs(threads) do
    for k, n in pairs(thread:get(name)) do all[k] = (all[k] or 0) + n end
  end
  local parts = {}
  for k, n in pairs(all) do parts[#parts + 1] = string.format('"%s":%d', k, n) end
  return "{" .. table.concat(parts, ",") .. "}"
end
function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '{"requests":%d,"duration_us":%d,"socket_errors":%d,"status_errors":%d,"seen":%s,"ok":%s,"bad":%s}\\n',
    summary.requests, summary.duration, e.connect + e.read + e.write + e.timeout, e.status,
    merge("seen"), merge("ok"), merge("bad")))
end
"""


def haproxy_tcp(path, routers):
    servers = "\n".join(f"    server r{i} 127.0.0.1:{p} check inter 500ms fall 1 rise 2"
                        for i, p in enumerate(routers))
    Path(path).write_text(f"""global
    maxconn 8000
defaults
    mode tcp
    timeout connect 2s
    timeout client 600s
    timeout server 600s
    option redispatch
    retries 2
frontend ingress
    bind 127.0.0.1:{HAPROXY_PORT}
    default_backend routers
backend routers
    balance roundrobin
{servers}
""")
    return ["-f", str(path), "-db"]


def homes(seen, phase):
    per = collections.defaultdict(collections.Counter)
    for key, n in seen.items():
        s, replica, p = key.split("|")
        if p == phase:
            per[s][replica] += n
    return {s: c.most_common(1)[0][0] for s, c in per.items()}


class Failover:
    def __init__(self, args):
        self.args = args
        self.out = Path(args.out)
        self.procs = benchlib.Processes(self.out / "logs", log)
        self.tmp = Path(tempfile.mkdtemp(prefix="fleet-failover-"))
        self.urls = [f"http://127.0.0.1:{SIM_PORT + i}" for i in range(args.engines)]

    def run(self, run):
        a = self.args
        log(f"--- run {run}")
        self.procs.ensure_free([SIM_PORT + i for i in range(a.engines)] + [ROUTER_PORT + i for i in range(3)]
                               + [HAPROXY_PORT])
        routers = {}
        try:
            for i in range(a.engines):
                self.procs.spawn([BIN / "vllm-sim", "--port", SIM_PORT + i, "--profile", MODEL[0]],
                                 f"sim-{i}-r{run}", {"RUST_LOG": "warn"})
            for url in self.urls:
                self.procs.wait_ready(url + "/v1/models", MODEL[1], "vllm-sim")
            for i in range(3):
                port = ROUTER_PORT + i
                routers[i] = self.procs.spawn(
                    [BIN / "router", "--host", "127.0.0.1", "--port", port, "--replicas", ",".join(self.urls),
                     "--policy", "consistent-hash", "--explain-routing"], f"router-{i}-r{run}", {"RUST_LOG": "warn"})
                self.procs.wait_ready(f"http://127.0.0.1:{port}/v1/models", MODEL[1], "router")
            self.procs.spawn([benchlib.haproxy_bin(log)] + haproxy_tcp(self.tmp / "haproxy.cfg",
                             [ROUTER_PORT + i for i in range(3)]), f"haproxy-r{run}")
            self.procs.wait_ready(f"http://127.0.0.1:{HAPROXY_PORT}/v1/models", MODEL[1], "haproxy")
            start = time.time()
            kill_at = int(start) + a.kill_at
            lua = self.tmp / "failover.lua"
            lua.write_text(WRK_LUA.replace("SESSIONS", str(a.sessions)).replace("KILL_AT", str(kill_at))
                           .replace("MODEL", MODEL[1]).replace("TOKENS", str(a.tokens)))
            wrk = subprocess.Popen(["wrk", "-t2", f"-c{a.connections}", f"-d{a.seconds}s", "--timeout", "30s",
                                    "-s", str(lua), f"http://127.0.0.1:{HAPROXY_PORT}/v1/completions"],
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            victim = routers[2]

            def kill():
                time.sleep(max(0.0, kill_at - time.time()))
                os.killpg(victim.pid, signal.SIGKILL)
                log(f"killed router 2 at {time.time() - start:.2f} s")
            threading.Thread(target=kill, daemon=True).start()
            out, _ = wrk.communicate()
        finally:
            self.procs.stop_all()
        line = next((l for l in reversed(out.splitlines()) if l.startswith("{")), None)
        if line is None:
            raise RuntimeError(f"wrk failed: {out[-500:]}")
        summary = json.loads(line)
        before, after = homes(summary["seen"], "before"), homes(summary["seen"], "after")
        common = set(before) & set(after)
        moved = sorted(s for s in common if before[s] != after[s])
        seconds = sorted(int(s) for s in set(summary["ok"]) | set(summary["bad"]))
        per_second = [(s - kill_at, summary["ok"].get(str(s), 0), summary["bad"].get(str(s), 0)) for s in seconds]
        steady = [ok for rel, ok, _ in per_second if -a.kill_at + 1 <= rel < 0]
        baseline = statistics.median(steady) if steady else 0
        recovered = next((rel for rel, ok, _ in per_second if rel >= 0 and ok >= 0.9 * baseline), None)
        return {
            "run": run, "requests": summary["requests"], "socket_errors": summary["socket_errors"],
            "status_errors": summary["status_errors"], "sessions_before": len(before), "sessions_after": len(after),
            "sessions_moved": len(moved), "moved": moved, "recovery_s": recovered,
            "ok_per_second_before": baseline, "per_second": per_second,
        }

    def main(self):
        benchlib.build(log)
        runs = []
        for run in range(self.args.runs):
            runs.append(self.run(run))
            log(json.dumps({k: v for k, v in runs[-1].items() if k != "per_second"}))
        lines = ["| run | requests | client-visible errors (socket / status) | sessions that moved (of those seen before and after) | "
                 "recovery (s from the kill to 90% of the successes per second before) |",
                 "| --- | --- | --- | --- | --- |"]
        for r in runs:
            lines.append(f"| {r['run']} | {r['requests']} | {r['socket_errors']} / {r['status_errors']} | "
                         f"{r['sessions_moved']} of {min(r['sessions_before'], r['sessions_after'])} | {r['recovery_s']} |")
        result = {"settings": vars(self.args), "machine": benchlib.machine_info(), "commit": benchlib.git_commit(),
                  "runs": runs}
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "results.json").write_text(json.dumps(result, indent=2, default=str))
        (self.out / "table.md").write_text("\n".join(lines) + "\n")
        print("\n".join(lines))


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--seconds", type=int, default=20)
    p.add_argument("--kill-at", type=int, default=8)
    p.add_argument("--connections", type=int, default=64)
    p.add_argument("--sessions", type=int, default=64)
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--engines", type=int, default=4)
    p.add_argument("--out", default=str(ROOT / "artifacts" / "fleet-failover"))
    return p.parse_args()


if __name__ == "__main__":
    Failover(parse_args()).main()
