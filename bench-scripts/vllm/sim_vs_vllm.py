"""vllm-sim against a real vLLM engine: the shapes of what a client or a router can see.

For each probe (chat and completions, streamed or not, with usage; errors; /v1/models;
/tokenize; /metrics names; and with --scale-out, an engine started with
`--enable-scale-out` (REAL_VLLM_FLAGS=--enable-scale-out bench-scripts/real_vllm.sh start 1)
and a simulator with it, `/inference/v1/generate` streamed or not, with usage and prompt
ids, and its errors) it takes the JSON shape of the engine's answer (member names
and value types, not values) and, with --sim, the simulator's, and prints where they part.
With --write-golden DIR it writes the engine's shapes there, as crates/vllm-sim/tests/sim.rs reads them
(crates/vllm-sim/tests/golden/vllm-<version>/), with the version they were taken from.

    python bench-scripts/vllm/sim_vs_vllm.py --engine http://127.0.0.1:18100 --model tiny \
        --sim http://127.0.0.1:18500 --sim-model sim [--write-golden crates/vllm-sim/tests/golden/vllm-0.32.0]
"""

import argparse
import json
import sys
import urllib.error
import urllib.request
from pathlib import Path


def shape(value):
    """Member names and value types; a list is the shape of its first item."""
    if isinstance(value, dict):
        return {k: shape(v) for k, v in sorted(value.items())}
    if isinstance(value, list):
        return [shape(value[0])] if value else []
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int"
    if isinstance(value, float):
        return "float"
    if value is None:
        return "null"
    return "str"


def call(base, path, body=None):
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(base + path, data=data, headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def sse_shapes(text):
    """The shapes of a stream's kinds of event: first, content, last content, usage."""
    events = [json.loads(e[6:]) for e in text.split("\n\n") if e.startswith("data: {")]
    content = [e for e in events if e.get("choices")]
    out = {"first": shape(events[0]), "done": text.rstrip().endswith("data: [DONE]")}
    if len(content) > 2:
        out["middle"] = shape(content[1])
    finished = [e for e in content if any(c.get("finish_reason") for c in e["choices"])]
    if finished:
        out["finish"] = shape(finished[-1])
    usage = [e for e in events if not e.get("choices") and e.get("usage")]
    if usage:
        out["usage"] = shape(usage[-1])
    return out


def generate_probes(model):
    generate = {"model": model, "token_ids": [1, 2, 3, 4], "sampling_params": {"max_tokens": 8, "temperature": 0}}
    path = "/inference/v1/generate"
    return [
        ("generate", "POST", path, generate, False),
        ("generate_stream", "POST", path, {**generate, "stream": True}, True),
        ("generate_stream_usage", "POST", path,
         {**generate, "stream": True, "stream_options": {"include_usage": True}}, True),
        ("generate_stream_prompt_ids", "POST", path, {**generate, "stream": True, "return_token_ids": True}, True),
        ("generate_prompt_ids", "POST", path, {**generate, "return_token_ids": True}, False),
        ("error_generate_bad_parameter", "POST", path,
         {**generate, "sampling_params": {"max_tokens": 8, "temperature": -1}}, False),
        ("error_generate_unknown_model", "POST", path, {**generate, "model": "no-such-model"}, False),
    ]


def probes(model):
    chat = {"model": model, "messages": [{"role": "user", "content": "say something"}], "max_tokens": 8,
            "temperature": 0}
    completion = {"model": model, "prompt": "say something", "max_tokens": 8, "temperature": 0}
    usage = {"stream": True, "stream_options": {"include_usage": True}}
    long_prompt = "word " * 5000
    return [
        ("chat", "POST", "/v1/chat/completions", chat, False),
        ("chat_stream", "POST", "/v1/chat/completions", {**chat, "stream": True}, True),
        ("chat_stream_usage", "POST", "/v1/chat/completions", {**chat, **usage}, True),
        ("completion", "POST", "/v1/completions", completion, False),
        ("completion_stream", "POST", "/v1/completions", {**completion, "stream": True}, True),
        ("completion_stream_usage", "POST", "/v1/completions", {**completion, **usage}, True),
        ("completion_token_ids", "POST", "/v1/completions", {**completion, "prompt": [1, 2, 3, 4]}, False),
        ("error_unknown_model", "POST", "/v1/chat/completions", {**chat, "model": "no-such-model"}, False),
        ("error_bad_parameter", "POST", "/v1/completions", {**completion, "temperature": -1}, False),
        ("error_too_long", "POST", "/v1/completions", {**completion, "prompt": long_prompt}, False),
        ("models", "GET", "/v1/models", None, False),
        ("tokenize", "POST", "/tokenize", {"model": model, "prompt": "say something"}, False),
    ]


def take(base, model, scale_out=False):
    out = {}
    for name, _method, path, body, stream in probes(model) + (generate_probes(model) if scale_out else []):
        status, text = call(base, path, body)
        try:
            value = sse_shapes(text) if stream and status == 200 else shape(json.loads(text))
        except (json.JSONDecodeError, IndexError):
            value = {"unparsed": text[:200]}
        out[name] = {"status": status, "shape": value}
    status, text = call(base, "/metrics")
    names = sorted({line.split("{")[0].split(" ")[0] for line in text.splitlines()
                    if line.startswith("vllm:")})
    out["metrics"] = {"status": status, "names": names}
    return out


def differences(path, engine, sim):
    if isinstance(engine, dict) and isinstance(sim, dict):
        for key in sorted(set(engine) | set(sim)):
            where = f"{path}.{key}"
            if key not in sim:
                yield f"{where}: only the engine has it ({json.dumps(engine[key])[:80]})"
            elif key not in engine:
                yield f"{where}: only the simulator has it ({json.dumps(sim[key])[:80]})"
            else:
                yield from differences(where, engine[key], sim[key])
    elif isinstance(engine, list) and isinstance(sim, list) and engine and sim:
        yield from differences(path + "[]", engine[0], sim[0])
    elif engine != sim and not (path.endswith(".names")):
        yield f"{path}: engine {json.dumps(engine)[:80]}, simulator {json.dumps(sim)[:80]}"


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--engine", required=True)
    p.add_argument("--model", default="tiny")
    p.add_argument("--sim")
    p.add_argument("--sim-model")
    p.add_argument("--write-golden")
    p.add_argument("--scale-out", action="store_true", help="probe /inference/v1/generate too")
    args = p.parse_args()
    engine = take(args.engine, args.model, args.scale_out)
    _, version = call(args.engine, "/version")
    engine["vllm_version"] = json.loads(version)["version"]
    if args.write_golden:
        out = Path(args.write_golden)
        out.mkdir(parents=True, exist_ok=True)
        (out / "shapes.json").write_text(json.dumps(engine, indent=1, sort_keys=True) + "\n")
        print(f"wrote {out / 'shapes.json'} (vLLM {engine['vllm_version']})")
    if args.sim:
        sim = take(args.sim, args.sim_model or args.model, args.scale_out)
        found = 0
        for probe in engine:
            if probe in ("vllm_version", "metrics"):
                continue
            for line in differences(probe, engine[probe], sim[probe]):
                print(line)
                found += 1
        missing = sorted(set(engine["metrics"]["names"]) - set(sim["metrics"]["names"]))
        extra = sorted(set(sim["metrics"]["names"]) - set(engine["metrics"]["names"]))
        print(f"metrics only the engine exports ({len(missing)}): {' '.join(missing)}")
        print(f"metrics only the simulator exports ({len(extra)}): {' '.join(extra)}")
        print(f"{found} differences")


if __name__ == "__main__":
    sys.exit(main())
