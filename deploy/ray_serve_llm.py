#!/usr/bin/env python3
"""Start Ray Serve LLM on the node: 8 LLMServer replicas of Qwen3-0.6B (one H100 each)
behind Ray Serve's HAProxy ingress with direct streaming, or with --pd the study's P/D
setup (Phi-tiny-MoE, one DP4/EP4 prefill and one DP4/EP4 decode replica, NixlConnector)
built with build_pd_openai_app.

  deploy/ray_serve_llm.py [--workload random|agentic] [--pd] [--dry-run]

Ray Serve LLM runs its own engines (vLLM inside each replica), so this replaces
deploy/vllm.sh for this contender. Needs `pip install "ray[serve,llm]==$RAY_VERSION"`.

Settings, checked against Ray's sources (python/ray/llm/_internal/serve/...):
- RAY_SERVE_ENABLE_HA_PROXY=1 and RAY_SERVE_LLM_ENABLE_DIRECT_STREAMING=1: HAProxy asks
  the LLMRouter deployment for a replica (/internal/route), then streams straight from
  that replica's own HTTP server (the study's configuration).
- Routing: ray.serve.experimental.consistent_hash_router.ConsistentHashRouter (MurmurHash3,
  100 virtual nodes) on the x-correlation-id header (AIPerf's) for the agentic workload (HAProxy
  forwards the header, named by RAY_SERVE_SESSION_ID_HEADER_KEY); direct streaming's
  default RoundRobinRouter for the random ones.
- The same engine settings as deploy/env.sh (engine_kwargs).
"""

import argparse
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def env_settings():
    """MODEL, FRONT_PORT, ENGINE_KWARGS_JSON, KV_TRANSFER_CONFIG, PD_MODEL and
    PD_ENGINE_KWARGS_JSON from deploy/env.sh."""
    script = f"source {shlex.quote(str(HERE / 'env.sh'))}; " \
             "printf '%s\\n' \"$MODEL\" \"$FRONT_PORT\" \"$ENGINE_KWARGS_JSON\" \"$KV_TRANSFER_CONFIG\" " \
             "\"$PD_MODEL\" \"$PD_ENGINE_KWARGS_JSON\""
    out = subprocess.run(["bash", "-c", script], capture_output=True, text=True, check=True).stdout.splitlines()
    return out[0], int(out[1]), json.loads(out[2]), json.loads(out[3]), out[4], json.loads(out[5])


ENV = {
    "RAY_SERVE_ENABLE_HA_PROXY": "1",
    "RAY_SERVE_LLM_ENABLE_DIRECT_STREAMING": "1",
    "RAY_SERVE_HAPROXY_TCP_NODELAY": "1",
    "RAY_SERVE_SESSION_ID_HEADER_KEY": os.environ.get("SESSION_HEADER", "x-correlation-id"),
}
CONSISTENT_HASH = "ray.serve.experimental.consistent_hash_router.ConsistentHashRouter"


def llm_config(model, engine_kwargs, replicas, router=None, kv=None):
    deployment = {"num_replicas": replicas}
    if router:
        deployment["request_router_config"] = {"request_router_class": router}
    kwargs = dict(engine_kwargs)
    if kv:
        kwargs["kv_transfer_config"] = kv
    return {
        "model_loading_config": {"model_id": model, "model_source": model},
        "accelerator_type": "H100",
        "deployment_config": deployment,
        "engine_kwargs": kwargs,
    }


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workload", choices=["random", "agentic"], default="agentic")
    p.add_argument("--pd", action="store_true")
    p.add_argument("--dry-run", action="store_true")
    args = p.parse_args()
    model, port, engine_kwargs, kv, pd_model, pd_engine_kwargs = env_settings()
    router = CONSISTENT_HASH if args.workload == "agentic" or args.pd else None
    if args.pd:
        builder = "build_pd_openai_app"
        # The study's P/D: Phi-tiny-MoE, one DP4/EP4 replica per stage.
        spec = {"prefill_config": llm_config(pd_model, pd_engine_kwargs, 1, router, kv),
                "decode_config": llm_config(pd_model, pd_engine_kwargs, 1, router, kv)}
    else:
        builder = "build_openai_app"
        spec = {"llm_configs": [llm_config(model, engine_kwargs, 8, router)]}
    print(" ".join(f"{k}={v}" for k, v in ENV.items()), f"(serve on port {port})")
    print(f"ray.serve.llm.{builder}(")
    print(json.dumps(spec, indent=2))
    print(")")
    if args.dry_run:
        return
    os.environ.update(ENV)
    from ray import serve
    from ray.serve import llm

    app = getattr(llm, builder)(spec)
    serve.start(http_options={"host": "0.0.0.0", "port": port})
    serve.run(app, blocking=True)


if __name__ == "__main__":
    sys.exit(main())
