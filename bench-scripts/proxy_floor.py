#!/usr/bin/env python3
"""The streaming hop against its floor: this router, HAProxy and vllm-router in front of
the same simulated engines, with going direct as the limit, all on 127.0.0.1.

HAProxy (Debian's 2.6, HTTP mode, keep-alive to the engines, round robin) is what one
proxy hop that passes bytes through costs when done by a mature C proxy; Ray Serve LLM
uses it as its ingress. The load is wrk (C, cheap): 4 processes of CONNECTIONS/4
connections each, every request a streamed completion of TOKENS tokens with
`ignore_eos`, so every response is the same size. For `direct` each wrk process talks
to one engine; otherwise all four talk to the proxy. The engines are `vllm-sim` at
`--time-scale` (faster than real time) so the two cores are saturated and the proxy's
cost shows in throughput.

Per contender and run: requests per second (the four wrk processes summed), p50/p99
latency of a whole streamed response (the mean of the four processes' percentiles),
the proxy's CPU seconds per 1000 requests (user and system, from /proc), how busy the
machine was. Contenders run in a rotated order each run; the table quotes medians.

`--itl` adds a pass with llm-bench (one run per contender) for the inter-token latency
distribution (p50/p99) side by side; `--syscalls` adds a pass per proxy counting, with
`perf stat` on the kernel's syscall tracepoints, the system calls, context switches and
CPU time each request costs.

  bench-scripts/proxy_floor.sh                       # 5 runs of 10 s, all contenders
  bench-scripts/proxy_floor.sh --runs 1 --itl --syscalls
  bench-scripts/proxy_floor.sh --dry-run

Writes artifacts/proxy-floor/results.json (every run, medians, ratios, machine,
versions, commit) and table.md.
"""

import argparse
import json
import os
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib  # noqa: E402
from benchlib import BIN, ROOT, cpu_times  # noqa: E402

SIM_PORT = 18100
PROXY_PORT = 18000
MODEL = ("qwen3-0.6b-fp8-h100", "Qwen/Qwen3-0.6B-FP8")
CONTENDERS = ["direct", "haproxy", "router", "vllm-router"]
WRK_PROCESSES = 4
SYSCALLS = ["recvfrom", "sendto", "writev", "read", "write", "epoll_wait", "futex"]
PROMPT = "Summarise the trade-offs of consistent hashing for a fleet of language model replicas. " * 4

log = benchlib.logger("floor")

WRK_LUA = """wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = [[BODY]]
function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '{"requests":%d,"duration_us":%d,"bytes":%d,"p50_us":%d,"p90_us":%d,"p99_us":%d,"mean_us":%.1f,' ..
    '"errors":{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d}}\\n',
    summary.requests, summary.duration, summary.bytes, latency:percentile(50), latency:percentile(90),
    latency:percentile(99), latency.mean, e.connect, e.read, e.write, e.status, e.timeout))
end
"""


class Floor:
    def __init__(self, args):
        self.args = args
        self.dry = args.dry_run
        self.out = Path(args.out)
        self.procs = benchlib.Processes(self.out / "logs", log, self.dry)
        self.sims = benchlib.Processes(self.out / "logs", log, self.dry)
        self.urls = [f"http://127.0.0.1:{SIM_PORT + i}" for i in range(args.replicas)]
        self.tmp = Path(tempfile.mkdtemp(prefix="proxy-floor-"))
        body = json.dumps({"model": MODEL[1], "prompt": PROMPT, "max_tokens": args.tokens, "stream": True,
                           "ignore_eos": True})
        self.lua = self.tmp / "stream.lua"
        self.lua.write_text(WRK_LUA.replace("BODY", body))

    # ---- processes -------------------------------------------------------------

    def start_sims(self):
        self.procs.ensure_free([SIM_PORT + i for i in range(self.args.replicas)] + [PROXY_PORT])
        for i, url in enumerate(self.urls):
            self.sims.spawn([BIN / "vllm-sim", "--port", SIM_PORT + i, "--profile", MODEL[0],
                             "--time-scale", self.args.time_scale], f"sim-{SIM_PORT + i}", {"RUST_LOG": "warn"})
        for url in self.urls:
            self.sims.wait_ready(url + "/v1/models", MODEL[1], "vllm-sim")

    def contender_cmd(self, contender):
        port = PROXY_PORT
        if contender in ("router", "router-baseline"):
            binary = BIN / "router" if contender == "router" else self.args.baseline_router
            return [binary, "--host", "127.0.0.1", "--port", port, "--replicas", ",".join(self.urls),
                    "--policy", "round-robin"]
        if contender == "haproxy":
            config = benchlib.haproxy_config(self.tmp / "haproxy.cfg", port, self.urls)
            return [benchlib.haproxy_bin(log, self.dry), *config]
        if contender == "vllm-router":
            return [benchlib.vllm_router_bin(log, self.dry), "--host", "127.0.0.1", "--port", port,
                    "--prometheus-host", "127.0.0.1", "--prometheus-port", port + 90,
                    "--worker-urls", *self.urls, "--policy", "round_robin"]
        return None

    def start(self, contender, label):
        """Start a contender; returns (process, the URLs each wrk process targets)."""
        cmd = self.contender_cmd(contender)
        if cmd is None:
            return None, [self.urls[i % len(self.urls)] for i in range(WRK_PROCESSES)]
        self.procs.ensure_free([PROXY_PORT])
        env = {"RUST_LOG": "warn"} if contender.startswith("router") else None
        proc = self.procs.spawn(cmd, label, env)
        self.procs.wait_ready(f"http://127.0.0.1:{PROXY_PORT}/v1/models", MODEL[1], contender)
        return proc, [f"http://127.0.0.1:{PROXY_PORT}"] * WRK_PROCESSES

    def wrk(self, targets, seconds):
        """Run the wrk processes at once; returns their summaries."""
        per = max(1, self.args.connections // WRK_PROCESSES)
        cmds = [["wrk", "-t1", f"-c{per}", f"-d{seconds}s", "--timeout", "30s", "-s", str(self.lua),
                 url + "/v1/completions"] for url in targets]
        for cmd in cmds:
            log("$", " ".join(shlex.quote(c) for c in cmd))
        if self.dry:
            return []
        procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for cmd in cmds]
        summaries = []
        for p in procs:
            out, _ = p.communicate()
            line = next((l for l in reversed(out.splitlines()) if l.startswith("{")), None)
            if p.returncode != 0 or line is None:
                raise RuntimeError(f"wrk failed: {out[-500:]}")
            summaries.append(json.loads(line))
        return summaries

    # ---- one measured run ------------------------------------------------------

    def run(self, contender, run):
        label = f"{contender}_r{run}"
        log(f"--- {label}")
        proc, targets = self.start(contender, label)
        try:
            self.wrk(targets, self.args.warmup)
            if self.dry:
                return None
            before = cpu_times(proc.pid) if proc else (0.0, 0.0)
            sims_before = [cpu_times(p) for p in self.sims.pids()]
            machine0 = benchlib.machine_ticks()
            summaries = self.wrk(targets, self.args.seconds)
            machine1 = benchlib.machine_ticks()
            after = cpu_times(proc.pid) if proc else (0.0, 0.0)
            sims_after = [cpu_times(p) for p in self.sims.pids()]
        finally:
            self.procs.stop_all()
        requests = sum(s["requests"] for s in summaries)
        seconds = statistics.mean(s["duration_us"] for s in summaries) / 1e6
        errors = sum(sum(s["errors"].values()) for s in summaries)
        user, system = after[0] - before[0], after[1] - before[1]
        sims_cpu = sum(a[0] + a[1] - b[0] - b[1] for a, b in zip(sims_after, sims_before))
        return {
            "contender": contender, "run": run,
            "requests": requests, "errors": errors, "seconds": round(seconds, 3),
            "requests_per_s": round(requests / seconds, 2),
            "p50_ms": round(statistics.mean(s["p50_us"] for s in summaries) / 1e3, 2),
            "p90_ms": round(statistics.mean(s["p90_us"] for s in summaries) / 1e3, 2),
            "p99_ms": round(statistics.mean(s["p99_us"] for s in summaries) / 1e3, 2),
            "cpu_s_per_1000": round(1000 * (user + system) / max(requests, 1), 4) if proc else None,
            "user_cpu_s_per_1000": round(1000 * user / max(requests, 1), 4) if proc else None,
            "sys_cpu_s_per_1000": round(1000 * system / max(requests, 1), 4) if proc else None,
            "sims_cpu_s_per_1000": round(1000 * sims_cpu / max(requests, 1), 4),
            "machine_busy": round(benchlib.busy_fraction(machine0, machine1), 3),
            "wrk": summaries,
        }

    # ---- extra passes ----------------------------------------------------------

    def itl(self, contender):
        """Inter-token latency through the contender, from llm-bench (wall clock)."""
        label = f"{contender}_itl"
        proc, targets = self.start(contender, label)
        result_file = self.tmp / f"{label}.json"
        base = self.urls if proc is None else targets[:1]
        cmd = [BIN / "llm-bench", "run", "--base-url", ",".join(base), "--model", MODEL[1], "--isl", "50",
               "--osl", self.args.tokens, "--spread", "round-robin", "--max-concurrency", self.args.connections,
               "--warmup-duration", f"{self.args.warmup}s", "--duration", f"{self.args.seconds}s",
               "--no-progress", "--result-file", result_file]
        log("$", " ".join(shlex.quote(str(c)) for c in cmd))
        try:
            if self.dry:
                return None
            subprocess.run([str(c) for c in cmd], check=True, stdout=subprocess.DEVNULL,
                           stderr=open(self.out / "logs" / f"{label}-bench.log", "wb"))
        finally:
            self.procs.stop_all()
        r = json.loads(result_file.read_text())
        keep = ["request_throughput", "median_itl_ms", "p90_itl_ms", "p99_itl_ms", "mean_itl_ms", "median_ttft_ms",
                "p99_ttft_ms", "median_tpot_ms", "completed", "failed"]
        return {"contender": contender, **{k: r.get(k) for k in keep}}

    def syscalls(self, contender):
        """System calls, context switches and CPU per request, counted by `perf stat` on
        the kernel's syscall tracepoints while the load runs (no slow-down, unlike strace)."""
        label = f"{contender}_perf"
        proc, targets = self.start(contender, label)
        counts = self.tmp / f"{label}.perf"
        events = ["task-clock", "context-switches"] + [f"syscalls:sys_enter_{c}" for c in SYSCALLS]
        seconds = self.args.perf_seconds
        trace = ["perf", "stat", "-x", ",", "-o", str(counts), "-e", ",".join(events), "-p", str(proc.pid) if proc
                 else "0", "--", "sleep", str(seconds)]
        log("$", " ".join(trace))
        try:
            if self.dry:
                return None
            self.wrk(targets, self.args.warmup)
            # perf starts 1 s into the load and counts `seconds` of it.
            tracer = []
            timer = threading.Timer(1.0, lambda: tracer.append(subprocess.Popen(trace, stderr=subprocess.DEVNULL)))
            timer.start()
            summaries = self.wrk(targets, seconds + 2)
            timer.join()
            tracer[0].wait(timeout=30)
        finally:
            self.procs.stop_all()
        # wrk ran `seconds + 2` s; perf counted `seconds` of it: scale requests to perf's window.
        requests = sum(s["requests"] for s in summaries) * seconds / (seconds + 2)
        calls = parse_perf(counts.read_text())
        per = {k.removeprefix("syscalls:sys_enter_"): round(v / max(requests, 1), 3) for k, v in calls.items()}
        return {"contender": contender, "requests_in_window": round(requests), "per_request": per,
                "task_clock_ms_per_request": per.pop("task-clock", None)}

    # ---- all of it -------------------------------------------------------------

    def main(self):
        args = self.args
        if not args.no_build:
            benchlib.build(log, self.dry)
        if not self.dry:
            (self.out / "logs").mkdir(parents=True, exist_ok=True)
        contenders = args.contenders
        runs, itl, syscalls = [], [], []
        try:
            self.start_sims()
            for run in range(args.runs):
                order = contenders[run % len(contenders):] + contenders[:run % len(contenders)]
                for contender in order:
                    result = self.run(contender, run)
                    if result:
                        runs.append(result)
                        log(f"{contender}: {result['requests_per_s']} req/s, p50 {result['p50_ms']} ms, "
                            f"CPU {result['cpu_s_per_1000']} s/1000, busy {result['machine_busy']}")
            if args.itl:
                itl = [r for r in (self.itl(c) for c in contenders) if r]
            if args.syscalls:
                syscalls = [r for r in (self.syscalls(c) for c in contenders if c != "direct") if r]
        finally:
            self.procs.stop_all()
            self.sims.stop_all()
        if self.dry:
            return
        self.write(runs, itl, syscalls)

    def write(self, runs, itl, syscalls):
        keys = ["requests_per_s", "p50_ms", "p99_ms", "cpu_s_per_1000", "user_cpu_s_per_1000", "sys_cpu_s_per_1000",
                "machine_busy", "errors"]
        medians = {}
        for c in self.args.contenders:
            rs = [r for r in runs if r["contender"] == c]
            medians[c] = {k: statistics.median(r[k] for r in rs) if rs and rs[0][k] is not None else None
                          for k in keys}
            medians[c]["runs"] = len(rs)
            medians[c]["range_requests_per_s"] = [min(r["requests_per_s"] for r in rs),
                                                  max(r["requests_per_s"] for r in rs)] if rs else None
        ratios = {}
        for c in self.args.contenders:
            ratios[c] = {
                # Per run, against the same run's direct and HAProxy, then the median.
                "throughput_vs_direct": per_run_ratio(runs, c, "direct", "requests_per_s"),
                "throughput_vs_haproxy": per_run_ratio(runs, c, "haproxy", "requests_per_s"),
                "cpu_vs_haproxy": per_run_ratio(runs, c, "haproxy", "cpu_s_per_1000"),
                "p50_vs_haproxy": per_run_ratio(runs, c, "haproxy", "p50_ms"),
            }
        result = {
            "benchmark": "proxy_floor",
            "config": {k: v for k, v in vars(self.args).items() if k not in ("dry_run", "no_build")},
            "argv": sys.argv[1:],
            "medians": medians, "ratios": ratios, "itl": itl, "syscalls": syscalls, "runs": runs,
            "machine": benchlib.machine_info(), "versions": {**benchlib.versions(), "haproxy": haproxy_version()},
            "commit": benchlib.git_commit(),
        }
        (self.out / "results.json").write_text(json.dumps(result, indent=1) + "\n")
        (self.out / "table.md").write_text(table(result))
        print(table(result))
        log(f"results in {self.out}")


def per_run_ratio(runs, contender, base, key):
    values = []
    for run in {r["run"] for r in runs}:
        a = next((r[key] for r in runs if r["run"] == run and r["contender"] == contender), None)
        b = next((r[key] for r in runs if r["run"] == run and r["contender"] == base), None)
        if a is not None and b:
            values.append(a / b)
    return {"median": round(statistics.median(values), 4), "min": round(min(values), 4),
            "max": round(max(values), 4)} if values else None


def parse_perf(text):
    """`perf stat -x ,` output -> {event: count} (task-clock in milliseconds)."""
    counts = {}
    for line in text.splitlines():
        parts = line.split(",")
        if len(parts) >= 3 and not line.startswith("#"):
            try:
                counts[parts[2]] = float(parts[0])
            except ValueError:
                continue
    return counts


def haproxy_version():
    try:
        out = subprocess.run(["haproxy", "-v"], capture_output=True, text=True).stdout
        return out.splitlines()[0] if out else None
    except OSError:
        return None


def table(result):
    m, r = result["medians"], result["ratios"]
    lines = ["| contender | req/s (median, range) | vs direct | vs HAProxy | p50 ms | p99 ms | CPU s / 1000 req "
             "(user + sys) | CPU vs HAProxy | errors |", "|---|---|---|---|---|---|---|---|---|"]

    def f(ratio):
        return f"{ratio['median']:.3f} ({ratio['min']:.3f}-{ratio['max']:.3f})" if ratio else "-"

    for c, v in m.items():
        if not v["runs"]:
            continue
        cpu = (f"{v['cpu_s_per_1000']:.3f} ({v['user_cpu_s_per_1000']:.3f} + {v['sys_cpu_s_per_1000']:.3f})"
               if v["cpu_s_per_1000"] is not None else "-")
        rng = v["range_requests_per_s"]
        lines.append(f"| {c} | {v['requests_per_s']:.1f} ({rng[0]:.1f}-{rng[1]:.1f}) | "
                     f"{f(r[c]['throughput_vs_direct'])} | {f(r[c]['throughput_vs_haproxy'])} | {v['p50_ms']:.1f} | "
                     f"{v['p99_ms']:.1f} | {cpu} | {f(r[c]['cpu_vs_haproxy'])} | {v['errors']} |")
    if result["itl"]:
        lines += ["", "| contender | ITL p50 ms | ITL p90 ms | ITL p99 ms | TTFT p50 ms | req/s (llm-bench) |",
                  "|---|---|---|---|---|---|"]
        for i in result["itl"]:
            lines.append(f"| {i['contender']} | {i['median_itl_ms']:.3f} | {i['p90_itl_ms']:.3f} | "
                         f"{i['p99_itl_ms']:.3f} | {i['median_ttft_ms']:.2f} | {i['request_throughput']:.1f} |")
    if result["syscalls"]:
        cols = ["context-switches"] + SYSCALLS
        lines += ["", "Per request, counted by `perf stat` over the load (one run):", "",
                  "| contender | CPU ms | " + " | ".join(cols) + " |", "|---|---|" + "---|" * len(cols)]
        for s in result["syscalls"]:
            per = s["per_request"]
            lines.append(f"| {s['contender']} | {s['task_clock_ms_per_request']:.3f} | "
                         + " | ".join(f"{per.get(c, 0):.2f}" for c in cols) + " |")
    return "\n".join(lines) + "\n"


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--seconds", type=int, default=10, help="recorded seconds per contender and run")
    p.add_argument("--warmup", type=int, default=2, help="seconds of load before each recorded run, discarded")
    p.add_argument("--connections", type=int, default=128)
    p.add_argument("--tokens", type=int, default=128, help="tokens per streamed completion")
    p.add_argument("--time-scale", type=float, default=4.0, help="engines' clock / wall clock")
    p.add_argument("--replicas", type=int, default=4)
    p.add_argument("--contenders", nargs="+", choices=CONTENDERS + ["router-baseline"], default=CONTENDERS)
    p.add_argument("--itl", action="store_true", help="add the llm-bench pass (ITL p50/p99 per contender)")
    p.add_argument("--syscalls", action="store_true",
                   help="add the perf pass (system calls, context switches and CPU per request)")
    p.add_argument("--perf-seconds", type=int, default=5)
    p.add_argument("--baseline-router", metavar="PATH",
                   help="another router binary (e.g. an earlier commit's) measured as contender router-baseline")
    p.add_argument("--out", default=str(ROOT / "artifacts" / "proxy-floor"))
    p.add_argument("--no-build", action="store_true")
    p.add_argument("--dry-run", action="store_true")
    args = p.parse_args()
    if args.baseline_router and "router-baseline" not in args.contenders:
        args.contenders = [*args.contenders, "router-baseline"]
    return args


if __name__ == "__main__":
    if not Path("/usr/bin/wrk").exists() and not any(
            Path(d, "wrk").exists() for d in os.environ.get("PATH", "").split(":")):
        sys.exit("wrk is needed: apt-get install wrk")
    Floor(parse_args()).main()
