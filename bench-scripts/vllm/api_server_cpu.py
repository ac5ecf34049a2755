#!/usr/bin/env python3
"""What vLLM's API server spends per request when the router passes chat requests through
to its chat endpoint (`router --engine-api openai`), against when the router renders,
tokenizes and detokenizes itself and sends token ids to `/inference/v1/generate`
(`router --engine-api generate`, vLLM 0.32 with `--enable-scale-out`); and what the
router spends for it.

One real CPU engine (bench-scripts/real_vllm.sh, the tiny Qwen3 made locally, started
here as the set `scale` on PORT; real_vllm.sh starts engines with `--enable-scale-out`) behind two routers (release
build), one per mode, both in front of the same engine. The same chat request (streamed,
temperature 0, `ignore_eos`) goes through each; cells: a short and a long prompt, 32 and
256 output tokens (the long prompt with 32 only: the context is 2,048 tokens). Passes
alternate (openai, generate, openai, ...) REPEATS times, CONCURRENCY requests in flight.
Measured from /proc: CPU seconds of the engine's API server process (the one listening on
PORT), of its engine core (apart), and of the router, per 1000 requests; medians.

From the short prompt's two output lengths, each mode's API-server CPU is fitted as
`per request + per output token x tokens`; the generate/openai ratios of the two parts are
what vllm-sim's profile charges a generate request (`ApiCosts::generate_request`,
`generate_token`).

Caveat: the tiny model's tokenizer has a 2,048-token vocabulary and the engine's context
is 2,048 tokens (real_vllm.sh), so the long prompt here is about 1,800 tokens, not the
study's 37k, and tokenizing costs less than with Qwen3's 151k vocabulary.

  python3 bench-scripts/vllm/api_server_cpu.py            # writes artifacts/api-server-cpu/
"""

import argparse
import http.client
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import benchlib  # noqa: E402
from benchlib import ROOT  # noqa: E402

log = benchlib.logger("api-cpu")
WORDS = "the router keeps sessions on the replica that holds their cache and streams tokens back ".split()


def request(port, path, body):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    conn.request("POST", path, json.dumps(body), {"content-type": "application/json"})
    response = conn.getresponse()
    data = response.read()
    conn.close()
    if response.status != 200:
        raise RuntimeError(f"{path}: {response.status} {data[:300]!r}")
    return data


def http_get(port, path):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request("GET", path)
    data = conn.getresponse().read()
    conn.close()
    return data


def drive(port, path, body, n, concurrency):
    """Send `n` requests, `concurrency` at a time; returns the wall time."""
    left = [n]
    lock = threading.Lock()
    failures = []

    def worker():
        while True:
            with lock:
                if left[0] == 0 or failures:
                    return
                left[0] -= 1
            try:
                text = request(port, path, body).decode()
                if "[DONE]" not in text:
                    raise RuntimeError(f"{path}: stream did not end: {text[-200:]}")
            except Exception as error:  # noqa: BLE001 - reported below, the run is void
                failures.append(error)
                return

    started = time.monotonic()
    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if failures:
        raise RuntimeError(f"{len(failures)} requests failed, the first: {failures[0]}")
    return time.monotonic() - started


def engine_core_pids(api_pid):
    out = subprocess.run(["pgrep", "-P", str(api_pid)], capture_output=True, text=True).stdout.split()
    return [int(p) for p in out]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--port", type=int, default=18150)
    p.add_argument("--router-port", type=int, default=18160, help="openai mode; generate mode on the next")
    p.add_argument("--requests", type=int, default=100, help="per pass with 32 output tokens (a quarter with 256)")
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--keep-engine", action="store_true", help="leave the engine running")
    p.add_argument("--out", default=str(ROOT / "artifacts" / "api-server-cpu"))
    args = p.parse_args()
    env = {**os.environ, "REAL_VLLM_SET": "scale"}
    script = str(ROOT / "bench-scripts" / "real_vllm.sh")
    benchlib.build(log)
    subprocess.run(["bash", script, "start", "1", str(args.port)], env=env, check=True)
    procs = benchlib.Processes(Path(args.out) / "logs", log)
    router = str(ROOT / "target" / "release" / "router")
    model_dir = str(ROOT / "target" / "tiny-model")
    modes = {"openai": args.router_port, "generate": args.router_port + 1}
    try:
        api = benchlib.listener_pid(args.port)
        cores = engine_core_pids(api)
        log(f"API server pid {api}, engine core pids {cores}")
        routers = {}
        for mode, port in modes.items():
            proc = procs.spawn([router, "--host", "127.0.0.1", "--port", port, "--replicas",
                                f"http://127.0.0.1:{args.port}", "--engine-api", mode, "--tokenizer", model_dir,
                                "--worker-threads", "1"], f"router-{mode}")
            procs.wait_ready(f"http://127.0.0.1:{port}/v1/models", "tiny", f"router {mode}")
            routers[mode] = proc.pid
        # Words, not tokens: the tiny tokenizer makes about 3.7 tokens of a word here.
        cells = [("short", 12, 32), ("short", 12, 256), ("long", 480, 32)]
        runs = []
        for size, words, max_tokens in cells:
            text = " ".join(WORDS[i % len(WORDS)] for i in range(words))
            messages = [{"role": "user", "content": text}]
            ids = json.loads(request(args.port, "/tokenize", {"model": "tiny", "messages": messages,
                                                                 "add_generation_prompt": True}))["tokens"]
            body = {"model": "tiny", "messages": messages, "max_tokens": max_tokens, "temperature": 0,
                    "ignore_eos": True, "stream": True}
            n = args.requests if max_tokens <= 32 else max(8, args.requests // 4)
            for port in modes.values():
                drive(port, "/v1/chat/completions", body, 8, args.concurrency)  # warm-up
            for repeat in range(args.repeats):
                for mode, port in modes.items():
                    pids = [api, *cores, routers[mode]]
                    before = [benchlib.cpu_seconds(pid) for pid in pids]
                    wall = drive(port, "/v1/chat/completions", body, n, args.concurrency)
                    after = [benchlib.cpu_seconds(pid) for pid in pids]
                    used = [b - a for a, b in zip(before, after)]
                    run = {"size": size, "prompt_tokens": len(ids), "max_tokens": max_tokens, "mode": mode,
                           "repeat": repeat, "requests": n, "wall_s": round(wall, 3),
                           "api_cpu_s_per_1000": round(1000 * used[0] / n, 2),
                           "core_cpu_s_per_1000": round(1000 * sum(used[1:-1]) / n, 2),
                           "router_cpu_s_per_1000": round(1000 * used[-1] / n, 2)}
                    runs.append(run)
                    log(json.dumps(run))
    finally:
        procs.stop_all()
        if not args.keep_engine:
            subprocess.run(["bash", script, "stop"], env=env)
    keys = ("api_cpu_s_per_1000", "core_cpu_s_per_1000", "router_cpu_s_per_1000", "wall_s")
    medians = {}
    for size, _, max_tokens in cells:
        for mode in modes:
            rs = [r for r in runs if (r["size"], r["max_tokens"], r["mode"]) == (size, max_tokens, mode)]
            m = {k: statistics.median(r[k] for r in rs) for k in keys}
            m["prompt_tokens"] = rs[0]["prompt_tokens"]
            medians[f"{size}/{max_tokens}/{mode}"] = m
    # API server CPU per request = fixed + per token x output tokens (short prompt).
    fit = {}
    for mode in modes:
        c32 = medians[f"short/32/{mode}"]["api_cpu_s_per_1000"]
        c256 = medians[f"short/256/{mode}"]["api_cpu_s_per_1000"]
        per_token_us = 1000 * (c256 - c32) / 224  # s/1000 req = ms/req; per token in us
        fit[mode] = {"per_request_ms": round(c32 - 32 * per_token_us / 1000, 3), "per_token_us": round(per_token_us, 2)}
    ratios = {"generate_request": round(fit["generate"]["per_request_ms"] / fit["openai"]["per_request_ms"], 3),
              "generate_token": round(fit["generate"]["per_token_us"] / fit["openai"]["per_token_us"], 3)}
    result = {"args": vars(args), "runs": runs, "medians": medians, "fit": fit, "ratios": ratios,
              "machine": benchlib.machine_info(), "commit": benchlib.git_commit()}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(result, indent=2))
    lines = [f"vLLM API server CPU per streamed chat request through the router, `--engine-api openai` vs "
             f"`--engine-api generate` ({args.repeats} alternating passes, {args.concurrency} in flight; medians; "
             f"CPU seconds per 1000 requests)", "",
             "| prompt tokens | output tokens | mode | engine API server | engine core | router | wall s |",
             "| ---: | ---: | --- | ---: | ---: | ---: | ---: |"]
    for key, m in medians.items():
        size, max_tokens, mode = key.split("/")
        lines.append(f"| {m['prompt_tokens']} | {max_tokens} | {mode} | {m['api_cpu_s_per_1000']:.1f} | "
                     f"{m['core_cpu_s_per_1000']:.1f} | {m['router_cpu_s_per_1000']:.2f} | {m['wall_s']:.2f} |")
    lines += ["", "API server CPU fitted per request + per output token (short prompt): " +
              "; ".join(f"{mode} {f['per_request_ms']} ms + {f['per_token_us']} us/token" for mode, f in fit.items()),
              f"generate/openai: per request {ratios['generate_request']}x, per token {ratios['generate_token']}x"]
    (out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
