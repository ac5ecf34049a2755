#!/usr/bin/env python3
"""What TLS and HTTP/2 towards clients cost the streaming hop: this router and HAProxy in
front of the same simulated engines, over plain HTTP/1.1, HTTP/1.1 with TLS, h2c (HTTP/2
with prior knowledge) and h2 over TLS, all on 127.0.0.1.

One load generator for every protocol, h2load (nghttp2's, C): HTTP/1.1 as CONNECTIONS
connections of one request at a time, HTTP/2 as CONNECTIONS/8 connections of 8 streams
each (the same concurrency, multiplexed as HTTP/2 clients do). Every request is a
streamed completion of TOKENS tokens with `ignore_eos`. TLS is ECDSA P-256 (a
certificate made here with openssl); connections are reused, so the figures are the
steady-state cost per request, not handshakes. HAProxy (Debian's, HTTP mode, keep-alive
to the engines) terminates the same TLS with ALPN h2,http/1.1 and takes h2c on a
`proto h2` bind. Upstream is HTTP/1.1 for both. `direct` (h2load --h1 to the engines)
is the limit.

Per contender and run: requests per second, mean latency of a whole streamed response
(h2load reports mean and sd, not percentiles), the proxy's CPU seconds per 1000 requests
(/proc), how busy the machine was. Contenders run in a rotated order each run; the
table quotes medians and, per protocol, the router's CPU per request against HAProxy's
and against its own plain HTTP/1.1.

  bench-scripts/ingress_floor.sh                 # 3 runs x 10 s per contender
  bench-scripts/ingress_floor.sh --runs 1 --seconds 5
  bench-scripts/ingress_floor.sh --baseline-router /tmp/router-old   # + baseline/h1, baseline/h2c

Writes artifacts/ingress-floor/results.json and table.md.
"""

import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib  # noqa: E402
from benchlib import BIN, ROOT, cpu_times  # noqa: E402

SIM_PORT = 18100
PROXY_PORT = 18000
MODEL = ("qwen3-0.6b-fp8-h100", "Qwen/Qwen3-0.6B-FP8")
PROTOCOLS = ["h1", "tls-h1", "h2c", "tls-h2"]
CONTENDERS = ["direct"] + [f"{p}/{proto}" for p in ("router", "haproxy") for proto in PROTOCOLS]
BASELINES = [f"baseline/{proto}" for proto in PROTOCOLS]
STREAMS_PER_H2_CONNECTION = 8
PROMPT = "Summarise the trade-offs of consistent hashing for a fleet of language model replicas. " * 4

log = benchlib.logger("ingress")


class IngressFloor:
    def __init__(self, args):
        self.args = args
        self.out = Path(args.out)
        self.procs = benchlib.Processes(self.out / "logs", log, False)
        self.sims = benchlib.Processes(self.out / "logs", log, False)
        self.urls = [f"http://127.0.0.1:{SIM_PORT + i}" for i in range(args.replicas)]
        self.tmp = Path(tempfile.mkdtemp(prefix="ingress-floor-"))
        self.body = self.tmp / "body.json"
        self.body.write_text(json.dumps({"model": MODEL[1], "prompt": PROMPT, "max_tokens": args.tokens,
                                         "stream": True, "ignore_eos": True}))
        self.cert, self.key = self.tmp / "cert.pem", self.tmp / "key.pem"
        subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                        "-nodes", "-days", "2", "-subj", "/CN=localhost",
                        "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
                        "-keyout", str(self.key), "-out", str(self.cert)], check=True, capture_output=True)
        self.combined = self.tmp / "combined.pem"
        self.combined.write_text(self.cert.read_text() + self.key.read_text())

    def start_sims(self):
        self.procs.ensure_free([SIM_PORT + i for i in range(self.args.replicas)] + [PROXY_PORT, PROXY_PORT + 1])
        for i in range(self.args.replicas):
            self.sims.spawn([BIN / "vllm-sim", "--port", SIM_PORT + i, "--profile", MODEL[0],
                             "--time-scale", self.args.time_scale], f"sim-{SIM_PORT + i}", {"RUST_LOG": "warn"})
        for url in self.urls:
            self.sims.wait_ready(url + "/v1/models", MODEL[1], "vllm-sim")

    def haproxy_cmd(self):
        """HAProxy with three frontends: plain HTTP/1.1, h2c (`proto h2`), TLS with ALPN."""
        binds = [f"127.0.0.1:{PROXY_PORT + 1} proto h2",
                 f"127.0.0.1:{PROXY_PORT + 2} ssl crt {self.combined} alpn h2,http/1.1"]
        config = benchlib.haproxy_config(self.tmp / "haproxy.cfg", PROXY_PORT, self.urls, extra_binds=binds)
        return [benchlib.haproxy_bin(log), *config]

    def start(self, contender):
        """Start a contender; returns (process, URL, protocol)."""
        if contender == "direct":
            return None, None, "h1"
        proxy, proto = contender.split("/")
        self.procs.ensure_free([PROXY_PORT, PROXY_PORT + 1, PROXY_PORT + 2])
        tls = proto.startswith("tls")
        if proxy in ("router", "baseline"):
            binary = BIN / "router" if proxy == "router" else self.args.baseline_router
            cmd = [binary, "--host", "127.0.0.1", "--port", PROXY_PORT, "--replicas", ",".join(self.urls),
                   "--policy", "round-robin"]
            if tls:
                cmd += ["--tls-cert", self.cert, "--tls-key", self.key]
            port = PROXY_PORT
            proc = self.procs.spawn(cmd, contender.replace("/", "-"), {"RUST_LOG": "warn"})
        else:
            port = PROXY_PORT + 2 if tls else PROXY_PORT + 1 if proto == "h2c" else PROXY_PORT
            proc = self.procs.spawn(self.haproxy_cmd(), contender.replace("/", "-"))
        scheme = "https" if tls else "http"
        url = f"{scheme}://127.0.0.1:{port}"
        self.wait_ready(url, proto)
        return proc, url, proto

    def wait_ready(self, url, proto):
        version = ["--http2-prior-knowledge"] if proto == "h2c" else []
        for _ in range(100):
            done = subprocess.run(["curl", "-sf", "-k", *version, "--max-time", "2", url + "/v1/models"],
                                  capture_output=True)
            if done.returncode == 0 and MODEL[1] in done.stdout.decode():
                return
            subprocess.run(["sleep", "0.1"])
        raise RuntimeError(f"{url} never became ready")

    def h2load(self, urls, proto, seconds):
        """One h2load per URL at once (CONNECTIONS split between them); their summaries."""
        per = max(1, self.args.connections // len(urls))
        if proto.endswith("h1"):
            shape = ["--h1", "-c", str(per), "-m", "1"]
        else:
            conns = max(1, per // STREAMS_PER_H2_CONNECTION)
            shape = ["-c", str(conns), "-m", str(STREAMS_PER_H2_CONNECTION)]
        cmds = [["h2load", *shape, "-D", str(seconds), "-d", str(self.body), "-H", "content-type: application/json",
                 url + "/v1/completions"] for url in urls]
        procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for cmd in cmds]
        return [parse_h2load(p.communicate()[0], p.returncode) for p in procs]

    def run(self, contender, run):
        log(f"--- {contender} run {run}")
        proc, url, proto = self.start(contender)
        urls = self.urls if url is None else [url]
        try:
            self.h2load(urls, proto, self.args.warmup)
            before = cpu_times(proc.pid) if proc else (0.0, 0.0)
            machine0 = benchlib.machine_ticks()
            summaries = self.h2load(urls, proto, self.args.seconds)
            machine1 = benchlib.machine_ticks()
            after = cpu_times(proc.pid) if proc else (0.0, 0.0)
        finally:
            self.procs.stop_all()
        done = sum(s["succeeded"] for s in summaries)
        failed = sum(s["failed"] + s["errored"] + s["timeout"] for s in summaries)
        seconds = max(s["seconds"] for s in summaries)
        cpu = after[0] + after[1] - before[0] - before[1]
        mean_ms = sum(s["mean_ms"] * s["succeeded"] for s in summaries) / max(done, 1)
        return {"contender": contender, "run": run, "requests": done, "failed": failed,
                "requests_per_s": round(done / seconds, 2), "mean_ms": round(mean_ms, 2),
                "cpu_s_per_1000": round(1000 * cpu / max(done, 1), 4) if proc else None,
                "machine_busy": round(benchlib.busy_fraction(machine0, machine1), 3)}

    def main(self):
        if not self.args.no_build:
            benchlib.build(log)
        (self.out / "logs").mkdir(parents=True, exist_ok=True)
        contenders, runs = self.args.contenders, []
        try:
            self.start_sims()
            for run in range(self.args.runs):
                shift = run % len(contenders)
                for contender in contenders[shift:] + contenders[:shift]:
                    r = self.run(contender, run)
                    runs.append(r)
                    log(f"{contender}: {r['requests_per_s']} req/s, mean {r['mean_ms']} ms, "
                        f"CPU {r['cpu_s_per_1000']} s/1000, failed {r['failed']}")
        finally:
            self.procs.stop_all()
            self.sims.stop_all()
        medians = {}
        for c in contenders:
            rs = [r for r in runs if r["contender"] == c]
            medians[c] = {k: statistics.median(r[k] for r in rs) for k in ("requests_per_s", "mean_ms")}
            cpus = [r["cpu_s_per_1000"] for r in rs if r["cpu_s_per_1000"] is not None]
            medians[c]["cpu_s_per_1000"] = statistics.median(cpus) if cpus else None
            medians[c]["failed"] = sum(r["failed"] for r in rs)
        result = {"args": vars(self.args), "runs": runs, "medians": medians, "machine": benchlib.machine_info(),
                  "versions": benchlib.versions(), "commit": benchlib.git_commit()}
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "results.json").write_text(json.dumps(result, indent=2, default=str))
        text = table(result)
        (self.out / "table.md").write_text(text)
        print(text)


def parse_h2load(out, code):
    finished = re.search(r"finished in ([\d.]+)s", out)
    requests = re.search(r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed, "
                         r"(\d+) errored, (\d+) timeout", out)
    timing = re.search(r"time for request:\s+([\d.]+)(us|ms|s)\s+([\d.]+)(us|ms|s)\s+([\d.]+)(us|ms|s)", out)
    if code != 0 or not (finished and requests and timing):
        raise RuntimeError(f"h2load failed: {out[-800:]}")
    scale = {"us": 1e-3, "ms": 1.0, "s": 1e3}
    return {"seconds": float(finished.group(1)), "succeeded": int(requests.group(4)),
            "failed": int(requests.group(5)), "errored": int(requests.group(6)), "timeout": int(requests.group(7)),
            "mean_ms": float(timing.group(5)) * scale[timing.group(6)]}


def table(result):
    m = result["medians"]
    a = result["args"]
    lines = [f"Ingress floor: {a['runs']} runs x {a['seconds']} s, {a['connections']} concurrent streams of "
             f"{a['tokens']} tokens, {a['replicas']} vllm-sim engines at {a['time_scale']}x; medians.", "",
             "| contender | req/s | mean latency ms | proxy CPU s / 1000 req | failed |", "| --- | ---: | ---: | ---: | ---: |"]
    for c, v in m.items():
        cpu = "-" if v["cpu_s_per_1000"] is None else f"{v['cpu_s_per_1000']:.3f}"
        lines.append(f"| {c} | {v['requests_per_s']:.0f} | {v['mean_ms']:.1f} | {cpu} | {v['failed']} |")
    lines += ["", "| protocol | router CPU / HAProxy CPU | router CPU / router plain h1 | router req/s / HAProxy |",
              "| --- | ---: | ---: | ---: |"]
    base = m.get("router/h1", {}).get("cpu_s_per_1000")
    for proto in PROTOCOLS:
        r, h = m.get(f"router/{proto}"), m.get(f"haproxy/{proto}")
        if not r:
            continue
        vs_h = f"{r['cpu_s_per_1000'] / h['cpu_s_per_1000']:.2f}x" if h and h["cpu_s_per_1000"] else "-"
        vs_b = f"{r['cpu_s_per_1000'] / base:.2f}x" if base else "-"
        tput = f"{r['requests_per_s'] / h['requests_per_s']:.3f}x" if h else "-"
        lines.append(f"| {proto} | {vs_h} | {vs_b} | {tput} |")
    compared = [p for p in PROTOCOLS if m.get(f"baseline/{p}") and m.get(f"router/{p}")]
    if compared:
        lines += ["", "| protocol | router CPU / baseline CPU (medians) |", "| --- | ---: |"]
        for proto in compared:
            ratio = m[f"router/{proto}"]["cpu_s_per_1000"] / m[f"baseline/{proto}"]["cpu_s_per_1000"]
            lines.append(f"| {proto} | {ratio:.3f}x |")
    return "\n".join(lines) + "\n"


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--seconds", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--connections", type=int, default=128, help="concurrent streams in all")
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--time-scale", type=float, default=4.0)
    p.add_argument("--replicas", type=int, default=4)
    p.add_argument("--contenders", nargs="+", choices=CONTENDERS + BASELINES, default=CONTENDERS)
    p.add_argument("--baseline-router", metavar="PATH",
                   help="another router binary (e.g. an earlier commit's), measured as baseline/h1 and baseline/h2c")
    p.add_argument("--out", default=str(ROOT / "artifacts" / "ingress-floor"))
    p.add_argument("--no-build", action="store_true")
    args = p.parse_args()
    if args.baseline_router and not any(c.startswith("baseline/") for c in args.contenders):
        args.contenders = [*args.contenders, "baseline/h1", "baseline/h2c"]
    if any(c.startswith("baseline/") for c in args.contenders) and not args.baseline_router:
        p.error("baseline contenders need --baseline-router")
    return args


if __name__ == "__main__":
    IngressFloor(parse_args()).main()
