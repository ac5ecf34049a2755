#!/usr/bin/env python3
"""What vLLM's API server spends per request through its chat endpoint, against through
its token-in, token-out endpoint (`/inference/v1/generate`, vLLM 0.32 with
`--enable-scale-out`): the work a router that renders, tokenizes and detokenizes itself
would take off the engine's Python process.

One real CPU engine (bench-scripts/real_vllm.sh, the tiny Qwen3 made locally, started
here with `--enable-scale-out` as the set `scale` on PORT) serves both paths. For each
prompt size the same prompt goes both ways: the chat endpoint gets the messages; generate
gets the token ids the engine's own `/tokenize` renders from the same messages (chat
template, generation prompt), so both compute the same thing. Streamed, temperature 0,
`ignore_eos`, MAX_TOKENS tokens, CONCURRENCY requests in flight, N requests per pass;
passes alternate (chat, generate, chat, ...) REPEATS times. Measured from /proc: CPU
seconds of the API server process (the one listening on PORT; the engine core is its
own process, measured apart) per 1000 requests.

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
    p.add_argument("--requests", type=int, default=100)
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--keep-engine", action="store_true", help="leave the engine running")
    p.add_argument("--out", default=str(ROOT / "artifacts" / "api-server-cpu"))
    args = p.parse_args()
    env = {**os.environ, "REAL_VLLM_SET": "scale", "REAL_VLLM_FLAGS": "--enable-scale-out"}
    script = str(ROOT / "bench-scripts" / "real_vllm.sh")
    subprocess.run(["bash", script, "start", "1", str(args.port)], env=env, check=True)
    try:
        api = benchlib.listener_pid(args.port)
        cores = engine_core_pids(api)
        log(f"API server pid {api}, engine core pids {cores}")
        # Words, not tokens: the tiny tokenizer makes about 3.7 tokens of a word here.
        sizes = {"short": 12, "long": 480}
        models = json.loads(http_get(args.port, "/v1/models"))
        max_model_len = models["data"][0]["max_model_len"]
        runs = []
        for size, words in sizes.items():
            text = " ".join(WORDS[i % len(WORDS)] for i in range(words))
            messages = [{"role": "user", "content": text}]
            ids = json.loads(request(args.port, "/tokenize", {"model": "tiny", "messages": messages,
                                                                 "add_generation_prompt": True}))["tokens"]
            if len(ids) + args.max_tokens > max_model_len:
                raise RuntimeError(f"{size}: {len(ids)} prompt tokens do not fit {max_model_len}")
            chat = {"model": "tiny", "messages": messages, "max_tokens": args.max_tokens, "temperature": 0,
                    "ignore_eos": True, "stream": True}
            generate = {"model": "tiny", "token_ids": ids, "stream": True,
                        "sampling_params": {"max_tokens": args.max_tokens, "temperature": 0, "ignore_eos": True}}
            paths = [("chat", "/v1/chat/completions", chat), ("generate", "/inference/v1/generate", generate)]
            for name, path, body in paths:
                drive(args.port, path, body, 8, args.concurrency)  # warm-up
            for repeat in range(args.repeats):
                for name, path, body in paths:
                    api0, core0 = benchlib.cpu_seconds(api), sum(benchlib.cpu_seconds(c) for c in cores)
                    wall = drive(args.port, path, body, args.requests, args.concurrency)
                    api1, core1 = benchlib.cpu_seconds(api), sum(benchlib.cpu_seconds(c) for c in cores)
                    run = {"size": size, "prompt_tokens": len(ids), "path": name, "repeat": repeat,
                           "requests": args.requests, "wall_s": round(wall, 3),
                           "api_cpu_s_per_1000": round(1000 * (api1 - api0) / args.requests, 2),
                           "core_cpu_s_per_1000": round(1000 * (core1 - core0) / args.requests, 2)}
                    runs.append(run)
                    log(json.dumps(run))
    finally:
        if not args.keep_engine:
            subprocess.run(["bash", script, "stop"], env=env)
    medians = {}
    for size in sizes:
        for name in ("chat", "generate"):
            rs = [r for r in runs if r["size"] == size and r["path"] == name]
            medians[f"{size}/{name}"] = {k: statistics.median(r[k] for r in rs)
                                         for k in ("api_cpu_s_per_1000", "core_cpu_s_per_1000", "wall_s")}
            medians[f"{size}/{name}"]["prompt_tokens"] = rs[0]["prompt_tokens"]
    ratios = {size: round(medians[f"{size}/generate"]["api_cpu_s_per_1000"]
                          / medians[f"{size}/chat"]["api_cpu_s_per_1000"], 3) for size in sizes}
    result = {"args": vars(args), "runs": runs, "medians": medians, "generate_over_chat_api_cpu": ratios,
              "machine": benchlib.machine_info(), "commit": benchlib.git_commit()}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(result, indent=2))
    lines = [f"vLLM API server CPU per request, chat endpoint vs /inference/v1/generate ({args.repeats} "
             f"alternating passes of {args.requests} streamed requests, {args.max_tokens} tokens each, "
             f"{args.concurrency} in flight; medians)", "",
             "| prompt | tokens | path | API server CPU s / 1000 req | engine core CPU s / 1000 req | wall s |",
             "| --- | ---: | --- | ---: | ---: | ---: |"]
    for key, m in medians.items():
        size, name = key.split("/")
        lines.append(f"| {size} | {m['prompt_tokens']} | {name} | {m['api_cpu_s_per_1000']:.1f} | "
                     f"{m['core_cpu_s_per_1000']:.1f} | {m['wall_s']:.2f} |")
    lines += ["", "generate / chat, API server CPU: " + ", ".join(f"{s} {r}x" for s, r in ratios.items())]
    (out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
