#!/usr/bin/env python3
"""Side-by-side benchmark sweep: workloads x concurrency x contenders, on simulated vLLM
replicas, everything on 127.0.0.1.

For every point (workload, concurrency, contender, repeat) the sweep starts fresh
simulated replicas (`vllm-sim`, one process each, so no contender inherits another's
prefix cache), starts the contender in front of them, runs `llm-bench` (a warm-up phase,
discarded, then the recorded phase), and records the load generator's results with the
contender's CPU seconds and peak RSS, the simulators' and the client's CPU, and how busy
the machine was. Contenders:

  direct         the client spreads requests over the replicas itself (round-robin, or
                 by session for the agentic workload): no router at all, the limit
  router         this project (release build)
  vllm-router    the PyPI package, pinned, installed into a venv by this script
  ray-serve-llm  Ray Serve LLM (PyPI ray[serve,llm], pinned, ~9 GB with vLLM and torch,
                 installed into a venv by this script) in its direct-streaming setup:
                 HAProxy, the LLMRouter, one LLMServer replica per simulated engine whose
                 engine relays to it (bench-scripts/ray_serve_llm/); not in P/D mode

Routing is the same for every contender: round-robin for the random workloads,
consistent hashing on the `x-session-id` header for the agentic one. `--pd` also runs the
prefill/decode comparison (4 prefill + 4 decode replicas, agentic workload).

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
import platform
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = ROOT / "target" / "release"
VENV = ROOT / "target" / "bench-venv"
DATA = ROOT / "target" / "bench-data"
VLLM_ROUTER_VERSION = "0.1.17"
RAY_VERSION = "2.60.0"
RAY_VENV = ROOT / "target" / "ray-venv"
MODEL = "Qwen/Qwen3-0.6B"
SIM_PORT = 18100
ROUTER_PORT = 18000
MAX_MODEL_LEN = 65536

WORKLOADS = {
    "prefill-heavy": {"kind": "random", "isl": 8000, "osl": 50},
    "decode-heavy": {"kind": "random", "isl": 50, "osl": 500},
    "agentic": {"kind": "agentic"},
}
CONTENDERS = ["direct", "router", "vllm-router", "ray-serve-llm"]

# Phase lengths in seconds: (warm-up, recorded, drain limit).
FULL = {"random": (30, 60, 60), "agentic": (60, 90, 20)}
QUICK = {"random": (5, 10, 30), "agentic": (10, 15, 10)}


def log(*parts):
    print("[sweep]", *parts, file=sys.stderr, flush=True)


class Sweep:
    def __init__(self, args):
        self.args = args
        self.dry = args.dry_run
        self.out = Path(args.out)
        self.phases = QUICK if args.quick else FULL
        if args.phases:
            random_s, agentic_s = args.phases
            self.phases = {
                "random": (*random_s, self.phases["random"][2]),
                "agentic": (*agentic_s, self.phases["agentic"][2]),
            }
        self.procs = []

    # ---- processes -------------------------------------------------------------

    def spawn(self, cmd, name, env=None):
        log("$", " ".join(shlex.quote(str(c)) for c in cmd))
        if self.dry:
            return None
        logfile = open(self.out / "logs" / f"{name}.log", "ab")
        proc = subprocess.Popen(
            [str(c) for c in cmd],
            stdout=logfile,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
            start_new_session=True,
        )
        self.procs.append(proc)
        return proc

    def stop(self, proc):
        if proc is None or proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=15)
        except (subprocess.TimeoutExpired, ProcessLookupError):
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()

    def stop_all(self):
        sessions = [p.pid for p in self.procs]
        for proc in self.procs:
            self.stop(proc)
        # Each process was started in its own session; some of their children outlive
        # their parents (Ray's GCS and raylet, HAProxy after a reload): kill the rest of
        # each session.
        for pid in sum((session_members(s) for s in sessions), []):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.procs = []

    def wait_ready(self, url, what, timeout=120):
        if self.dry:
            return
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                with urllib.request.urlopen(url, timeout=2) as r:
                    if r.status == 200 and MODEL.encode() in r.read():
                        return
            except OSError:
                pass
            time.sleep(0.25)
        raise RuntimeError(f"{what} not ready at {url} after {timeout}s")

    # ---- set-up ----------------------------------------------------------------

    def build(self):
        cmd = ["cargo", "build", "--release", "--bin", "router", "--bin", "vllm-sim", "--bin", "llm-bench"]
        log("$", " ".join(cmd))
        if not self.dry:
            subprocess.run(cmd, cwd=ROOT, check=True)

    def vllm_router_bin(self):
        binary = VENV / "bin" / "vllm-router"
        if self.dry or binary.exists():
            return binary
        log(f"installing vllm-router=={VLLM_ROUTER_VERSION} into {VENV}")
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
        subprocess.run([str(VENV / "bin" / "pip"), "install", "-q", f"vllm-router=={VLLM_ROUTER_VERSION}"], check=True)
        return binary

    def ray_python(self):
        python = RAY_VENV / "bin" / "python"
        if self.dry or (RAY_VENV / "bin" / "serve").exists():
            return python
        log(f"installing ray[serve,llm]=={RAY_VERSION} into {RAY_VENV} (about 9 GB)")
        subprocess.run([sys.executable, "-m", "venv", str(RAY_VENV)], check=True)
        subprocess.run([str(RAY_VENV / "bin" / "pip"), "install", "-q", f"ray[serve,llm]=={RAY_VERSION}"], check=True)
        return python

    def dataset(self):
        """The study's agentic dataset (AIPerf 0.8.0, checked against its sha256)."""
        cmd = ["bash", ROOT / "bench-scripts" / "agentic_dataset.sh"]
        log("$", " ".join(map(str, cmd)))
        if self.dry:
            return DATA / "agentic_loop_2200s_seed42" / "dataset.jsonl"
        return Path(subprocess.run([str(c) for c in cmd], check=True, capture_output=True, text=True).stdout.strip())

    def ensure_free(self, ports, timeout=60):
        """Wait for our ports to be free: a listener left over would answer in the
        contender's place. Leftovers of our own binaries (under target/, e.g. an HAProxy
        of Ray's still draining) are killed; anything else is an error."""
        if self.dry:
            return
        deadline = time.time() + timeout
        while True:
            busy = [p for p in ports if port_in_use(p)]
            if not busy:
                return
            for port in busy:
                pid = listener_pid(port)
                try:
                    ours = pid is not None and os.readlink(f"/proc/{pid}/exe").startswith(str(ROOT / "target"))
                except OSError:
                    ours = False
                if ours:
                    os.kill(pid, signal.SIGKILL)
            if time.time() > deadline:
                raise RuntimeError(f"ports {busy} are in use by another process; stop it first")
            time.sleep(1)

    def start_sims(self, roles):
        """Fresh simulated replicas, one process each; returns their URLs by role."""
        self.ensure_free([SIM_PORT + i for i in range(len(roles))] + [ROUTER_PORT])
        urls = {}
        for i, role in enumerate(roles):
            port = SIM_PORT + i
            cmd = [BIN / "vllm-sim", "--port", port, "--max-model-len", MAX_MODEL_LEN, "--role", role]
            self.spawn(cmd, f"sim-{port}")
            urls.setdefault(role, []).append(f"http://127.0.0.1:{port}")
        for url in sum(urls.values(), []):
            self.wait_ready(url + "/v1/models", "vllm-sim")
        return urls

    # ---- contenders ------------------------------------------------------------

    def contender_cmd(self, contender, urls, affinity, pd=None):
        """The command that starts a contender, or None for `direct`."""
        port = ROUTER_PORT
        if contender == "router":
            cmd = [BIN / "router", "--host", "127.0.0.1", "--port", port, "--session-header", "x-correlation-id"]
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
            cmd = [self.vllm_router_bin(), "--host", "127.0.0.1", "--port", port,
                   "--prometheus-host", "127.0.0.1", "--prometheus-port", port + 90]
            if pd:
                cmd += ["--vllm-pd-disaggregation", "--policy", "consistent_hash"]
                for url in urls["prefill"]:
                    cmd += ["--prefill", url]
                for url in urls["decode"]:
                    cmd += ["--decode", url]
            else:
                cmd += ["--worker-urls", *urls["both"], "--policy", "consistent_hash" if affinity else "round_robin"]
            return cmd
        if contender == "ray-serve-llm":
            return [self.ray_python(), ROOT / "bench-scripts" / "ray_serve_llm" / "serve_app.py",
                    "--sims", ",".join(urls["both"]), "--port", port,
                    "--policy", "consistent-hash" if affinity else "round-robin"]
        return None

    # ---- one run ---------------------------------------------------------------

    def run_point(self, workload, concurrency, contender, repeat, pd=None):
        spec = WORKLOADS[workload]
        agentic = spec["kind"] == "agentic"
        name = f"{workload}_c{concurrency}_{contender}{'-' + pd if pd else ''}_r{repeat}"
        result_file = self.out / "runs" / f"{name}.json"
        log(f"--- {name}")
        roles = ["prefill"] * 4 + ["decode"] * 4 if pd else ["both"] * self.args.replicas
        urls = self.start_sims(roles)
        sim_pids = [p.pid for p in self.procs] if not self.dry else []
        cmd = self.contender_cmd(contender, urls, agentic, pd)
        proc = None
        if cmd is not None:
            env = {"RUST_LOG": "warn"} if contender == "router" else None
            proc = self.spawn(cmd, name + "-contender", env)
            self.wait_ready(f"http://127.0.0.1:{ROUTER_PORT}/v1/models", contender,
                            timeout=600 if contender == "ray-serve-llm" else 120)
            if not self.dry:
                owner = listener_pid(ROUTER_PORT)
                if proc.poll() is not None or owner not in session_members(proc.pid):
                    raise RuntimeError(f"{contender} is not the process serving port {ROUTER_PORT} (pid {owner})")
            base = [f"http://127.0.0.1:{ROUTER_PORT}"]
        else:
            base = urls["both"]
        warm, record, drain = self.phases["agentic" if agentic else "random"]
        bench = [BIN / "llm-bench", "run", "--base-url", ",".join(base), "--model", MODEL,
                 "--max-concurrency", concurrency, "--warmup-duration", f"{warm}s", "--duration", f"{record}s",
                 "--drain-timeout", f"{drain}s", "--seed", self.args.seed, "--no-progress",
                 "--label", contender, "--result-file", result_file,
                 "--metadata", f"workload={workload}", "--metadata", f"repeat={repeat}"]
        if agentic:
            bench += ["--workload", "agentic", "--dataset", self.agentic_dataset, "--spread", "session",
                      "--num-sessions", 8 * concurrency]
        else:
            bench += ["--isl", spec["isl"], "--osl", spec["osl"], "--spread", "round-robin"]
        log("$", " ".join(shlex.quote(str(c)) for c in bench))
        if self.dry:
            self.stop_all()
            return None
        tree = session_members(proc.pid) if proc else []
        before = {pid: cpu_times(pid) for pid in tree + sim_pids}
        machine0 = machine_ticks()
        started = time.time()
        client = subprocess.Popen([str(c) for c in bench], stdout=subprocess.DEVNULL,
                                  stderr=open(self.out / "logs" / f"{name}-bench.log", "wb"))
        _, status, usage = os.wait4(client.pid, 0)
        client.returncode = os.waitstatus_to_exitcode(status)
        machine1 = machine_ticks()
        tree = session_members(proc.pid) if proc else []

        def spent(pids, part):
            return sum(cpu_times(pid)[part] - before.get(pid, (0.0, 0.0))[part] for pid in pids)

        contender_user, contender_sys = spent(tree, 0), spent(tree, 1)
        contender_cpu = contender_user + contender_sys
        contender_rss = sum(peak_rss_kb(pid) for pid in tree)
        sims_cpu = spent(sim_pids, 0) + spent(sim_pids, 1)
        self.stop_all()
        if client.returncode != 0 or not result_file.exists():
            log(f"llm-bench failed for {name} (exit {client.returncode}); see logs/{name}-bench.log")
            return None
        result = json.loads(result_file.read_text())
        handled = result["completed"] + result["failed"] + result["warmup"]["completed"] + result["warmup"]["failed"]
        run = {
            "name": name, "workload": workload, "concurrency": concurrency, "contender": contender,
            "pd": pd, "repeat": repeat, "started": started,
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
            "machine_busy": round(busy_fraction(machine0, machine1), 3),
        }
        for key in METRICS:
            run[key] = result.get(key)
        return run

    # ---- the sweep -------------------------------------------------------------

    def main(self):
        args = self.args
        if not self.dry:
            (self.out / "runs").mkdir(parents=True, exist_ok=True)
            (self.out / "logs").mkdir(parents=True, exist_ok=True)
        if not args.no_build:
            self.build()
        contenders = list(args.contenders)
        if "agentic" in args.workloads or args.pd:
            self.agentic_dataset = self.dataset()
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
                run = self.run_point(*point)
                if run is not None:
                    runs.append(run)
                    self.write(runs)
        finally:
            self.stop_all()
        if not self.dry:
            self.write(runs)
            log(f"results in {self.out}")

    def write(self, runs):
        meta = {
            "machine": machine_info(),
            "versions": versions(),
            "commit": git_commit(),
            "config": {
                "quick": self.args.quick, "replicas": self.args.replicas, "repeats": self.args.repeats,
                "concurrency": self.args.concurrency, "seed": self.args.seed, "phases_s": self.phases,
                "sim": f"vllm-sim --profile qwen3-0.6b-h100 --max-model-len {MAX_MODEL_LEN} (real time)",
                "routing": "round-robin (random workloads), consistent hash on x-session-id (agentic)",
            },
            "passes": self.passes,
            "published": PUBLISHED,
            "runs": runs,
        }
        (self.out / "results.json").write_text(json.dumps(meta, indent=1) + "\n")
        write_tables(self.out, runs)


# The metrics kept from each llm-bench result.
METRICS = [
    "completed", "failed", "unfinished", "duration", "window", "request_throughput", "steady_request_throughput",
    "output_throughput", "total_token_throughput", "mean_ttft_ms", "median_ttft_ms", "p90_ttft_ms", "p99_ttft_ms",
    "mean_tpot_ms", "median_tpot_ms", "p99_tpot_ms", "mean_itl_ms", "p99_itl_ms", "mean_e2el_ms", "p99_e2el_ms",
]

# What the study published in its text (Anyscale blog, 8x H100, Qwen3-0.6B, concurrency
# 256); its figures are images, so only the numbers it states are recorded. Labelled
# published: they were not measured here.
PUBLISHED = {
    "source": "Anyscale, 'High Performance Distributed Inference with Ray Serve LLM' (vLLM 0.22, Ray 2.56 "
              "nightly, vllm-router 0.1.14, 8x H100)",
    "points": [
        {"workload": "prefill-heavy", "concurrency": 256, "contender": "ray-serve-llm", "mean_ttft_ms": 355},
        {"workload": "prefill-heavy", "concurrency": 256, "contender": "vllm-router", "mean_ttft_ms": 389},
        {"workload": "decode-heavy", "concurrency": 256, "contender": "ray-serve-llm", "mean_ttft_ms": 165},
        {"workload": "decode-heavy", "concurrency": 256, "contender": "vllm-router", "mean_ttft_ms": 190},
        {"workload": "agentic-pd-4p4d", "concurrency": 256, "contender": "ray-serve-llm", "mean_tpot_ms": 13.6},
        {"workload": "agentic-pd-4p4d", "concurrency": 256, "contender": "vllm-router", "mean_tpot_ms": 14.8},
    ],
}

# ---- tables ---------------------------------------------------------------------

GRID_COLUMNS = ["mean_ttft_ms", "median_ttft_ms", "mean_tpot_ms", "steady_request_throughput",
                "request_throughput", "output_throughput", "p99_ttft_ms", "contender_cpu_s_per_1000_requests",
                "contender_user_cpu_s_per_1000_requests", "contender_peak_rss_mb", "machine_busy", "failed"]


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


# ---- /proc ----------------------------------------------------------------------

TICK = os.sysconf("SC_CLK_TCK")


def cpu_times(pid):
    """(user, system) CPU seconds of a process."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return int(fields[11]) / TICK, int(fields[12]) / TICK
    except (OSError, IndexError, ValueError):
        return 0.0, 0.0


def cpu_seconds(pid):
    return sum(cpu_times(pid))


def peak_rss_kb(pid):
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def session_members(sid):
    """Every process of the session `sid` (the contender and all it started, including
    children whose parents have exited)."""
    members = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[3]) == sid:
                    members.append(int(entry.name))
            except (OSError, IndexError, ValueError):
                pass
    return members


def port_in_use(port):
    import socket
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def listener_pid(port):
    """The pid listening on 127.0.0.1:port, from /proc (socket inode to process)."""
    inode = None
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                inode = fields[9]
    if inode is None:
        return None
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            for fd in (entry / "fd").iterdir():
                if os.readlink(fd) == f"socket:[{inode}]":
                    return int(entry.name)
        except OSError:
            continue
    return None


def machine_ticks():
    fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    return fields


def busy_fraction(a, b):
    d = [y - x for x, y in zip(a, b)]
    total = sum(d)
    idle = d[3] + d[4]
    return 1 - idle / total if total else 0.0


def machine_info():
    cpu = next((l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines()
                if l.startswith("model name")), platform.processor())
    mem = next((int(l.split()[1]) for l in Path("/proc/meminfo").read_text().splitlines()
                if l.startswith("MemTotal")), 0)
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gib": round(mem / 2**20, 1),
            "kernel": platform.release(), "python": platform.python_version()}


def versions():
    def out(cmd):
        try:
            return subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return None
    return {"rustc": out(["rustc", "--version"]), "router": out([str(BIN / "router"), "--version"]),
            "vllm-router": VLLM_ROUTER_VERSION, "llm-bench": out([str(BIN / "llm-bench"), "--version"])}


def git_commit():
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True).stdout.strip()
        return commit + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return None


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="one concurrency (64), one repeat, short phases")
    p.add_argument("--dry-run", action="store_true", help="print every command without running anything")
    p.add_argument("--workloads", nargs="+", choices=list(WORKLOADS), default=list(WORKLOADS))
    p.add_argument("--concurrency", nargs="+", type=int)
    p.add_argument("--contenders", nargs="+", choices=CONTENDERS, default=CONTENDERS)
    p.add_argument("--replicas", type=int, default=8)
    p.add_argument("--repeats", type=int)
    p.add_argument("--pd", action="store_true", help="also run the P/D comparison (4 prefill + 4 decode)")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--out", default=str(ROOT / "artifacts" / "benchmark"))
    p.add_argument("--resume", action="store_true", help="keep the runs already in --out and skip them")
    p.add_argument("--no-build", action="store_true")
    p.add_argument(
        "--phases",
        nargs=2,
        metavar="WARM:REC",
        type=lambda v: tuple(int(x) for x in v.split(":")),
        help="warm-up and recorded seconds for the random and the agentic workloads "
        "(default 30:60 60:90; --quick 5:10 10:15)",
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
