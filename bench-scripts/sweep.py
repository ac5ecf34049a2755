#!/usr/bin/env python3
"""Side-by-side benchmark sweep: workloads x concurrency x contenders, on simulated vLLM
replicas calibrated to the study's engines, everything on 127.0.0.1.

For every point (workload, concurrency, contender, repeat) the sweep starts fresh
simulated replicas (`vllm-sim`, one process each, so no contender inherits another's
prefix cache), starts the contender in front of them, runs `llm-bench` (a warm-up phase,
discarded, then the recorded phase), and records the load generator's results with the
contender's CPU seconds and peak RSS, the simulators' and the client's CPU, how busy the
machine was, and how many requests each replica served. Contenders:

  direct         the client spreads requests over the replicas itself (round-robin, or
                 by session for the agentic workload): no router at all, the limit
  haproxy        HAProxy 2.6 from Debian's packages, HTTP mode, keep-alive to the engines,
                 round robin, or consistent hashing on the session header (`balance
                 hdr()`, `hash-type consistent`) for the agentic workload: the floor
                 for one proxy hop (not in P/D mode)
  router         this project (release build)
  vllm-router    the PyPI package, pinned, installed into a venv by this script
  ray-serve-llm  Ray Serve LLM (PyPI ray[serve,llm], pinned, ~9 GB with vLLM and torch,
                 installed into a venv by this script) in its direct-streaming setup:
                 HAProxy, the LLMRouter, one LLMServer replica per simulated engine whose
                 engine relays to it (bench-scripts/ray_serve_llm/); not in P/D mode

The engines are `vllm-sim --profile qwen3-0.6b-fp8-h100` (the study's Qwen3-0.6B-FP8 on
H100, calibrated: bench-scripts/fidelity.py), with fastokens for the agentic workload as
the study ran it. Workloads are the study's: random ISL 8000 / OSL 50 and 50 / 500, and its
agentic trace (bench-scripts/agentic_dataset.sh, 8 sessions per unit of concurrency,
AIPerf's replay). Routing is the same for every contender: round-robin for the random
workloads, consistent hashing on the `x-correlation-id` header (AIPerf's session header)
for the agentic one. `--pd` also runs prefill/decode disaggregation: 4 prefill + 4 decode
ranks of the study's Phi-tiny-MoE DP4EP4 profile, agentic workload.

Two cores cannot carry the study's decode-heavy token rates in real time, so workloads run
at a time scale (engines slower than real time, llm-bench converting times back to the
engines' clock; see --time-scale). Phase lengths are in the engines' clock.

Results go to artifacts/benchmark/ (or --out): one JSON per run under runs/,
results.json with every run and the machine, versions and commit, and one CSV per
figure. plots/plot.py draws the figures from them.

  bench-scripts/sweep.py --quick            # a few minutes: one concurrency, short phases
  bench-scripts/sweep.py                    # the full sweep (hours; 3 repeats)
  bench-scripts/sweep.py --dry-run          # print every command, run nothing
"""

import argparse
import csv
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib  # noqa: E402
from benchlib import BIN, ROOT, cpu_times, listener_pid, peak_rss_kb, session_members  # noqa: E402

SIM_PORT = 18100
KV_EVENTS_PORT = 18300  # + replica index, when the sims publish KV events
ROUTER_PORT = 18000
QWEN = ("qwen3-0.6b-fp8-h100", "Qwen/Qwen3-0.6B-FP8")
PHI = ("phi-tiny-moe-dp4ep4-h100", "microsoft/Phi-tiny-MoE-instruct")
SESSION_HEADER = "x-correlation-id"

WORKLOADS = {
    "prefill-heavy": {"kind": "random", "isl": 8000, "osl": 50},
    "decode-heavy": {"kind": "random", "isl": 50, "osl": 500},
    "agentic": {"kind": "agentic"},
}
CONTENDERS = ["direct", "haproxy", "router", "vllm-router", "ray-serve-llm"]
# Cache-aware routing, on request (--contenders): this router's prefix-aware and kv-aware
# policies without session ids (the router's session header is left at its default,
# x-session-id, which the load generator does not send), kv-aware with them, and
# vllm-router's cache_aware (its default policy). When a kv-aware contender is in the
# sweep, every run's simulated replicas publish KV events (same engine cost for all).
CACHE_CONTENDERS = ["router-prefix-aware", "router-kv-aware", "router-kv-aware-sessions", "vllm-router-cache-aware"]
# This router's consistent hashing without its load bound (`--hash-balance-factor off`),
# against `router` (the default bound), on request.
AFFINITY_CONTENDERS = ["router-hash-pure"]
# This router as the engines' frontend (`--engine-api generate`: it renders, tokenises and
# detokenises, the engines take and give token ids), against `router` (pass-through), on
# request. When it is in the sweep every run's replicas serve vLLM's generate endpoint
# (`--enable-scale-out`; nothing else changes for the other contenders).
ENGINE_API_CONTENDERS = ["router-generate"]
# Three instances of this router (each `router`'s command, on three ports), the client
# sending each request to the next instance in turn, so a session's turns reach every
# instance (as behind a Service that spreads connections), against `router` (one), on
# request: what several instances cost a session's home and the engines' cache.
FLEET_CONTENDERS = ["router-fleet3"]
FLEET_INSTANCES = 3
# Engines' clock / wall clock per workload: decode-heavy at c=256 streams ~88k tokens a
# second at the study's speed, which 2 cores cannot carry through a proxy and a client.
TIME_SCALE = {"prefill-heavy": 0.5, "decode-heavy": 0.25, "agentic": 1.0}

# Phase lengths in the engines' clock, seconds: (warm-up, recorded, drain limit).
FULL = {"random": (15, 45, 60), "agentic": (60, 120, 30)}
QUICK = {"random": (5, 10, 30), "agentic": (10, 20, 10)}

log = benchlib.logger("sweep")


class Sweep:
    def __init__(self, args):
        self.args = args
        self.dry = args.dry_run
        self.kv_events = any(c.startswith("router-kv-aware") for c in args.contenders)
        self.scale_out = "router-generate" in args.contenders
        self.out = Path(args.out)
        self.phases = QUICK if args.quick else FULL
        if args.phases:
            random_s, agentic_s = args.phases
            self.phases = {
                "random": (*random_s, self.phases["random"][2]),
                "agentic": (*agentic_s, self.phases["agentic"][2]),
            }
        self.time_scale = dict(TIME_SCALE, **dict(args.time_scale or []))
        self.procs = benchlib.Processes(self.out / "logs", log, self.dry)

    def start_sims(self, roles, profile, extra):
        """Fresh simulated replicas, one process each; returns their URLs by role."""
        self.procs.ensure_free([SIM_PORT + i for i in range(len(roles))]
                               + [ROUTER_PORT + i for i in range(FLEET_INSTANCES)])
        urls = {}
        for i, role in enumerate(roles):
            port = SIM_PORT + i
            cmd = [BIN / "vllm-sim", "--port", port, "--profile", profile[0], "--role", role, *extra]
            if self.kv_events:
                cmd += ["--kv-events-port", KV_EVENTS_PORT + i]
            if self.scale_out:
                cmd.append("--enable-scale-out")
            self.procs.spawn(cmd, f"sim-{port}", {"RUST_LOG": "warn"})
            urls.setdefault(role, []).append(f"http://127.0.0.1:{port}")
        for url in sum(urls.values(), []):
            self.procs.wait_ready(url + "/v1/models", profile[1], "vllm-sim")
        return urls

    # ---- contenders ------------------------------------------------------------

    def contender_cmd(self, contender, urls, affinity, pd=None, port=ROUTER_PORT):
        """The command that starts a contender, or None for `direct`."""
        if contender == "router-fleet3":
            contender = "router"
        if contender.startswith("router-kv-aware"):
            cmd = [BIN / "router", "--host", "127.0.0.1", "--port", port, "--replicas", ",".join(urls["both"]),
                   "--policy", "kv-aware", "--tokenizer", "builtin"]
            for i, url in enumerate(urls["both"]):
                cmd += ["--kv-events-endpoint", f"{url}=tcp://127.0.0.1:{KV_EVENTS_PORT + i}"]
            if contender.endswith("-sessions"):
                cmd += ["--session-header", SESSION_HEADER]
            return cmd + list(self.args.kv_args)
        if contender == "router-hash-pure":
            return [BIN / "router", "--host", "127.0.0.1", "--port", port, "--session-header", SESSION_HEADER,
                    "--replicas", ",".join(urls["both"]),
                    "--policy", "consistent-hash" if affinity else "round-robin", "--hash-balance-factor", "off"]
        if contender == "router-prefix-aware":
            return [BIN / "router", "--host", "127.0.0.1", "--port", port, "--replicas", ",".join(urls["both"]),
                    "--policy", "prefix-aware"]
        if contender == "vllm-router-cache-aware":
            return [benchlib.vllm_router_bin(log, self.dry), "--host", "127.0.0.1", "--port", port,
                    "--prometheus-host", "127.0.0.1", "--prometheus-port", port + 90,
                    "--worker-urls", *urls["both"], "--policy", "cache_aware"]
        if contender == "router-generate":
            return [BIN / "router", "--host", "127.0.0.1", "--port", port, "--session-header", SESSION_HEADER,
                    "--replicas", ",".join(urls["both"]), "--engine-api", "generate", "--tokenizer", "builtin",
                    "--policy", "consistent-hash" if affinity else "round-robin"]
        if contender == "router":
            cmd = [BIN / "router", "--host", "127.0.0.1", "--port", port, "--session-header", SESSION_HEADER]
            if pd:
                cmd += ["--pd", "prefill=" + ",".join(urls["prefill"]), "decode=" + ",".join(urls["decode"]),
                        "--prefill-policy", "consistent-hash", "--decode-policy", "consistent-hash"]
                if pd == "text":
                    cmd.append("--no-tokenize-once")
            else:
                cmd += ["--replicas", ",".join(urls["both"]),
                        "--policy", "consistent-hash" if affinity else "round-robin"]
            return cmd
        if contender == "vllm-router":
            cmd = [benchlib.vllm_router_bin(log, self.dry), "--host", "127.0.0.1", "--port", port,
                   "--prometheus-host", "127.0.0.1", "--prometheus-port", port + 90]
            if pd:
                cmd += ["--vllm-pd-disaggregation", "--kv-connector", "nixl", "--policy", "consistent_hash"]
                for url in urls["prefill"]:
                    cmd += ["--prefill", url]
                for url in urls["decode"]:
                    cmd += ["--decode", url]
            else:
                cmd += ["--worker-urls", *urls["both"], "--policy", "consistent_hash" if affinity else "round_robin"]
            if affinity or pd:
                cmd += ["--request-id-headers", SESSION_HEADER]  # as the study ran it
            return cmd
        if contender == "haproxy":
            config = benchlib.haproxy_config(self.out / "logs" / "haproxy.cfg", port, urls["both"],
                                             SESSION_HEADER if affinity else None)
            return [benchlib.haproxy_bin(log, self.dry), *config]
        if contender == "ray-serve-llm":
            return [benchlib.ray_python(log, self.dry), ROOT / "bench-scripts" / "ray_serve_llm" / "serve_app.py",
                    "--sims", ",".join(urls["both"]), "--port", port, "--model", QWEN[1],
                    "--policy", "consistent-hash" if affinity else "round-robin", "--session-header", SESSION_HEADER]
        return None

    def owned_port(self, proc, contender, timeout=30):
        """Wait until the process serving the port belongs to the contender's session
        (Ray's HAProxy may take a moment to be the listener after the app is ready)."""
        deadline = time.time() + timeout
        while True:
            owner = listener_pid(ROUTER_PORT)
            if proc.poll() is None and owner is not None and owner in session_members(proc.pid):
                return
            if time.time() > deadline or proc.poll() is not None:
                raise RuntimeError(f"{contender} is not the process serving port {ROUTER_PORT} (pid {owner})")
            time.sleep(0.5)

    # ---- one run ---------------------------------------------------------------

    def run_point(self, workload, concurrency, contender, repeat, pd=None):
        spec = WORKLOADS[workload]
        agentic = spec["kind"] == "agentic"
        name = f"{workload}_c{concurrency}_{contender}{'-' + pd if pd else ''}_r{repeat}"
        result_file = self.out / "runs" / f"{name}.json"
        log(f"--- {name}")
        scale = self.time_scale[workload]
        profile = PHI if pd else QWEN
        roles = ["prefill"] * 4 + ["decode"] * 4 if pd else ["both"] * self.args.replicas
        extra = ["--time-scale", scale] + (["--fastokens"] if agentic and not pd else [])
        urls = self.start_sims(roles, profile, extra)
        sim_pids = self.procs.pids()
        cmd = self.contender_cmd(contender, urls, agentic, pd)
        proc = None
        fleet = []  # router-fleet3's other instances
        if cmd is not None:
            env = {"RUST_LOG": "warn"} if contender.startswith("router") else None
            proc = self.procs.spawn(cmd, name + "-contender", env)
            self.procs.wait_ready(f"http://127.0.0.1:{ROUTER_PORT}/v1/models", profile[1], contender,
                                  timeout=600 if contender == "ray-serve-llm" else 120)
            if not self.dry:
                self.owned_port(proc, contender)
            base = [f"http://127.0.0.1:{ROUTER_PORT}"]
            if contender in FLEET_CONTENDERS:
                for i in range(1, FLEET_INSTANCES):
                    others = self.contender_cmd(contender, urls, agentic, pd, port=ROUTER_PORT + i)
                    fleet.append(self.procs.spawn(others, f"{name}-contender-{i}", env))
                    self.procs.wait_ready(f"http://127.0.0.1:{ROUTER_PORT + i}/v1/models", profile[1], contender)
                    base.append(f"http://127.0.0.1:{ROUTER_PORT + i}")
        else:
            base = urls["both"]
        warm, record, drain = self.phases["agentic" if agentic else "random"]
        bench = [BIN / "llm-bench", "run", "--base-url", ",".join(base), "--model", profile[1],
                 "--max-concurrency", concurrency, "--warmup-duration", f"{warm}s", "--duration", f"{record}s",
                 "--drain-timeout", f"{drain}s", "--seed", self.args.seed, "--no-progress",
                 "--time-scale", scale, "--label", contender, "--result-file", result_file,
                 "--metadata", f"workload={workload}", "--metadata", f"repeat={repeat}"]
        if agentic:
            ramp = min(60.0, max(5.0, 0.25 * concurrency))
            spread = "round-robin" if contender in FLEET_CONTENDERS else "session"
            bench += ["--workload", "agentic", "--dataset", self.agentic_dataset, "--spread", spread,
                      "--num-sessions", 8 * concurrency, "--session-header", SESSION_HEADER,
                      "--ramp-up", f"{ramp}s"]
        else:
            bench += ["--isl", spec["isl"], "--osl", spec["osl"], "--spread", "round-robin"]
        log("$", " ".join(shlex.quote(str(c)) for c in bench))
        if self.dry:
            self.procs.stop_all()
            return None
        tree = (session_members(proc.pid) if proc else []) + sum((session_members(f.pid) for f in fleet), [])
        before = {pid: cpu_times(pid) for pid in tree + sim_pids}
        machine0 = benchlib.machine_ticks()
        started = time.time()
        client = subprocess.Popen([str(c) for c in bench], stdout=subprocess.DEVNULL,
                                  stderr=open(self.out / "logs" / f"{name}-bench.log", "wb"))
        _, status, usage = os.wait4(client.pid, 0)
        client.returncode = os.waitstatus_to_exitcode(status)
        machine1 = benchlib.machine_ticks()
        tree = (session_members(proc.pid) if proc else []) + sum((session_members(f.pid) for f in fleet), [])

        def spent(pids, part):
            return sum(cpu_times(pid)[part] - before.get(pid, (0.0, 0.0))[part] for pid in pids)

        contender_user, contender_sys = spent(tree, 0), spent(tree, 1)
        contender_cpu = contender_user + contender_sys
        contender_rss = sum(peak_rss_kb(pid) for pid in tree)
        sims_cpu = spent(sim_pids, 0) + spent(sim_pids, 1)
        per_replica, cache = replica_load(sum(urls.values(), []))
        self.procs.stop_all()
        if client.returncode != 0 or not result_file.exists():
            log(f"llm-bench failed for {name} (exit {client.returncode}); see logs/{name}-bench.log")
            return None
        result = json.loads(result_file.read_text())
        handled = result["completed"] + result["failed"] + result["warmup"]["completed"] + result["warmup"]["failed"]
        run = {
            "name": name, "workload": workload, "concurrency": concurrency, "contender": contender,
            "pd": pd, "repeat": repeat, "started": started, "time_scale": scale,
            "wall_s": round(time.time() - started, 1),
            "contender_cpu_s": round(contender_cpu, 3) if proc else None,
            "contender_user_cpu_s": round(contender_user, 3) if proc else None,
            "contender_sys_cpu_s": round(contender_sys, 3) if proc else None,
            "contender_user_cpu_s_per_1000_requests": round(1000 * contender_user / max(handled, 1), 3)
            if proc else None,
            "contender_peak_rss_mb": round(contender_rss / 1024, 1) if proc else None,
            "contender_cpu_s_per_1000_requests": round(1000 * contender_cpu / max(handled, 1), 3) if proc else None,
            "requests_handled": handled,
            "sims_cpu_s": round(sims_cpu, 3),
            "client_cpu_s": round(usage.ru_utime + usage.ru_stime, 3),
            "machine_busy": round(benchlib.busy_fraction(machine0, machine1), 3),
            "replica_requests": per_replica,
            "replica_imbalance": imbalance(per_replica),
            # The engines' prefix cache over the whole run (warm-up included), as vLLM counts it.
            "prefix_cache_hit_rate": round(cache[1] / cache[0], 4) if cache[0] else None,
            "dataset_sha256": result.get("dataset_sha256"),
        }
        for key in METRICS:
            run[key] = result.get(key)
        return run

    # ---- the sweep -------------------------------------------------------------

    def main(self):
        args = self.args
        if not self.dry:
            (self.out / "runs").mkdir(parents=True, exist_ok=True)
        if not args.no_build:
            benchlib.build(log, self.dry)
        contenders = list(args.contenders)
        if "agentic" in args.workloads or args.pd:
            self.agentic_dataset = benchlib.agentic_dataset(log, self.dry)
        results_path = self.out / "results.json"
        runs = []
        self.passes = []
        if results_path.exists() and args.resume:
            previous = json.loads(results_path.read_text())
            runs = previous["runs"]
            self.passes = previous.get("passes", [{"config": previous.get("config")}])
        # Each invocation that adds runs to --out is recorded as a pass, with its settings.
        self.passes.append({"argv": sys.argv[1:], "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
        done = {r["name"] for r in runs}
        points = []
        for repeat in range(args.repeats):
            for workload in args.workloads:
                for concurrency in args.concurrency:
                    # Rotate the order each repeat so drift on a shared machine spreads evenly.
                    order = contenders[repeat % len(contenders):] + contenders[:repeat % len(contenders)]
                    points += [(workload, concurrency, c, repeat, None) for c in order]
            if args.pd:
                for concurrency in args.concurrency:
                    # Ray Serve LLM's P/D needs real engines on both stages: not run here.
                    for c, pd in [("router", "ids"), ("router", "text"), ("vllm-router", "text")]:
                        if c in contenders:
                            points.append(("agentic", concurrency, c, repeat, pd))
        try:
            for point in points:
                workload, concurrency, contender, repeat, pd = point
                name = f"{workload}_c{concurrency}_{contender}{'-' + pd if pd else ''}_r{repeat}"
                if name in done:
                    continue
                try:
                    run = self.run_point(*point)
                except RuntimeError as e:
                    log(f"{name} failed: {e}")
                    self.procs.stop_all()
                    run = None
                if run is not None:
                    runs.append(run)
                    self.write(runs)
        finally:
            self.procs.stop_all()
        if not self.dry:
            self.write(runs)
            log(f"results in {self.out}")

    def write(self, runs):
        meta = {
            "machine": benchlib.machine_info(),
            "versions": benchlib.versions(),
            "commit": benchlib.git_commit(),
            "config": {
                "quick": self.args.quick, "replicas": self.args.replicas, "repeats": self.args.repeats,
                "concurrency": self.args.concurrency, "seed": self.args.seed, "phases_s": self.phases,
                "time_scale": self.time_scale,
                "sim": f"vllm-sim --profile {QWEN[0]} (P/D: {PHI[0]}); --fastokens for the agentic workload",
                "routing": f"round-robin (random workloads), consistent hash on {SESSION_HEADER} (agentic)",
            },
            "passes": self.passes,
            "published": json.loads(benchlib.STUDY_POINTS.read_text()),
            "runs": runs,
        }
        (self.out / "results.json").write_text(json.dumps(meta, indent=1) + "\n")
        write_tables(self.out, runs)


def replica_load(urls):
    """Requests each replica finished (vllm:request_success_total), read before it stops,
    and the prefix-cache tokens queried and hit summed over the replicas."""
    load = {}
    cache = [0.0, 0.0]

    def total(text, name):
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))

    for url in urls:
        try:
            with urllib.request.urlopen(url + "/metrics", timeout=5) as r:
                text = r.read().decode()
            load[url] = int(total(text, "vllm:request_success_total"))
            cache[0] += total(text, "vllm:prefix_cache_queries_total")
            cache[1] += total(text, "vllm:prefix_cache_hits_total")
        except (OSError, ValueError, IndexError):
            load[url] = None
    return load, cache


def imbalance(load):
    """The busiest replica's requests over the mean (1.0 is perfectly even)."""
    values = [v for v in load.values() if v]
    return round(max(values) / statistics.mean(values), 3) if values else None


# The metrics kept from each llm-bench result.
METRICS = [
    "completed", "failed", "unfinished", "duration", "window", "request_throughput", "steady_request_throughput",
    "output_throughput", "total_token_throughput", "mean_ttft_ms", "median_ttft_ms", "p90_ttft_ms", "p99_ttft_ms",
    "mean_tpot_ms", "median_tpot_ms", "p99_tpot_ms", "mean_itl_ms", "p99_itl_ms", "mean_e2el_ms", "p99_e2el_ms",
]

# ---- tables ---------------------------------------------------------------------

GRID_COLUMNS = ["mean_ttft_ms", "median_ttft_ms", "mean_tpot_ms", "steady_request_throughput",
                "request_throughput", "output_throughput", "p99_ttft_ms", "contender_cpu_s_per_1000_requests",
                "contender_user_cpu_s_per_1000_requests", "contender_peak_rss_mb", "machine_busy", "failed",
                "replica_imbalance", "prefix_cache_hit_rate"]


def medians(runs, keys):
    out = {}
    for key in keys:
        values = [r[key] for r in runs if r.get(key) is not None]
        out[key] = round(statistics.median(values), 4) if values else None
    return out


def grouped(runs):
    groups = {}
    for r in runs:
        contender = r["contender"] + (f"-pd-{r['pd']}" if r.get("pd") else "")
        groups.setdefault((r["workload"] if not r.get("pd") else "agentic-pd", r["concurrency"], contender), []).append(r)
    return groups


def write_tables(out, runs):
    groups = grouped(runs)
    with open(out / "grid.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["workload", "concurrency", "contender", "runs"] + GRID_COLUMNS)
        for (workload, c, contender), rs in sorted(groups.items()):
            if workload == "agentic-pd":
                continue
            m = medians(rs, GRID_COLUMNS)
            w.writerow([workload, c, contender, len(rs)] + [m[k] for k in GRID_COLUMNS])
    with open(out / "pd.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["concurrency", "contender", "runs"] + GRID_COLUMNS)
        for (workload, c, contender), rs in sorted(groups.items()):
            if workload == "agentic-pd" or (workload == "agentic" and contender in ("router", "vllm-router")):
                m = medians(rs, GRID_COLUMNS)
                label = contender if workload == "agentic-pd" else f"{contender}-collocated-8"
                w.writerow([c, label, len(rs)] + [m[k] for k in GRID_COLUMNS])
    with open(out / "ratios.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["workload", "concurrency", "throughput_router_vs_direct", "throughput_router_vs_vllm_router",
                    "ttft_router_minus_direct_ms", "tpot_router_vs_direct", "cpu_router_vs_vllm_router",
                    "user_cpu_router_vs_vllm_router", "ttft_router_vs_vllm_router",
                    "throughput_router_vs_ray", "ttft_router_vs_ray", "cpu_router_vs_ray"])
        keys = sorted({(wl, c) for (wl, c, _) in groups if wl != "agentic-pd"})
        for wl, c in keys:
            def m(contender, key):
                rs = groups.get((wl, c, contender))
                return medians(rs, [key])[key] if rs else None

            def ratio(a, b):
                return round(a / b, 4) if a is not None and b not in (None, 0) else None

            thr = "steady_request_throughput"
            w.writerow([
                wl, c,
                ratio(m("router", thr), m("direct", thr)),
                ratio(m("router", thr), m("vllm-router", thr)),
                round(m("router", "mean_ttft_ms") - m("direct", "mean_ttft_ms"), 3)
                if m("router", "mean_ttft_ms") is not None and m("direct", "mean_ttft_ms") is not None else None,
                ratio(m("router", "mean_tpot_ms"), m("direct", "mean_tpot_ms")),
                ratio(m("router", "contender_cpu_s_per_1000_requests"),
                      m("vllm-router", "contender_cpu_s_per_1000_requests")),
                ratio(m("router", "contender_user_cpu_s_per_1000_requests"),
                      m("vllm-router", "contender_user_cpu_s_per_1000_requests")),
                ratio(m("router", "mean_ttft_ms"), m("vllm-router", "mean_ttft_ms")),
                ratio(m("router", thr), m("ray-serve-llm", thr)),
                ratio(m("router", "mean_ttft_ms"), m("ray-serve-llm", "mean_ttft_ms")),
                ratio(m("router", "contender_cpu_s_per_1000_requests"),
                      m("ray-serve-llm", "contender_cpu_s_per_1000_requests")),
            ])



def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="one concurrency (64), one repeat, short phases")
    p.add_argument("--dry-run", action="store_true", help="print every command without running anything")
    p.add_argument("--workloads", nargs="+", choices=list(WORKLOADS), default=list(WORKLOADS))
    p.add_argument("--concurrency", nargs="+", type=int)
    p.add_argument("--contenders", nargs="+", choices=CONTENDERS + CACHE_CONTENDERS + AFFINITY_CONTENDERS + ENGINE_API_CONTENDERS
                   + FLEET_CONTENDERS,
                   default=CONTENDERS)
    p.add_argument("--replicas", type=int, default=8)
    p.add_argument("--repeats", type=int)
    p.add_argument("--pd", action="store_true", help="also run the P/D comparison (4 prefill + 4 decode)")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--out", default=str(ROOT / "artifacts" / "benchmark"))
    p.add_argument("--resume", action="store_true", help="keep the runs already in --out and skip them")
    p.add_argument("--no-build", action="store_true")
    p.add_argument("--kv-args", nargs="+", default=[], metavar="ARG",
                   help="extra router flags for the kv-aware contenders (e.g. --kv-load-weight=0.5)")
    p.add_argument(
        "--phases",
        nargs=2,
        metavar="WARM:REC",
        type=lambda v: tuple(int(x) for x in v.split(":")),
        help="warm-up and recorded seconds (engines' clock) for the random and the agentic workloads "
        "(default 15:45 60:120; --quick 5:10 10:20)",
    )
    p.add_argument(
        "--time-scale",
        nargs="+",
        metavar="WORKLOAD=X",
        type=lambda v: (v.split("=")[0], float(v.split("=")[1])),
        help=f"engines' clock / wall clock per workload (default {TIME_SCALE})",
    )
    args = p.parse_args()
    if args.concurrency is None:
        args.concurrency = [64] if args.quick else [64, 128, 256]
    if args.repeats is None:
        args.repeats = 1 if args.quick else 3
    if args.quick and args.out == str(ROOT / "artifacts" / "benchmark"):
        args.out = str(ROOT / "artifacts" / "benchmark-quick")
    return args


if __name__ == "__main__":
    if shutil.which("cargo") is None:
        sys.exit("cargo is needed to build the binaries")
    Sweep(parse_args()).main()
