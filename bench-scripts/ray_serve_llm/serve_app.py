#!/usr/bin/env python3
"""Run Ray Serve LLM, in its direct-streaming configuration, in front of vllm-sim
replicas: HAProxy ingress, the LLMRouter ingress request router, one LLMServer replica
per simulated engine (sim_engine.SimEngine), all on 127.0.0.1.

  serve_app.py --sims URL[,URL...] --port PORT [--policy consistent-hash|round-robin]
               [--session-header x-correlation-id] [--model NAME]

Blocks until SIGTERM/SIGINT. Used by bench-scripts/sweep.py (contender ray-serve-llm).
"""

import argparse
import os
import signal
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--sims", required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--policy", choices=["consistent-hash", "round-robin"], default="round-robin")
    p.add_argument("--model", default="Qwen/Qwen3-0.6B-FP8")
    p.add_argument("--session-header", default="x-correlation-id",
                   help="the header ConsistentHashRouter keys sessions on (AIPerf sends x-correlation-id)")
    args = p.parse_args()
    sims = args.sims.split(",")
    env = {
        "RAY_SERVE_ENABLE_HA_PROXY": "1",
        "RAY_SERVE_LLM_ENABLE_DIRECT_STREAMING": "1",
        "RAY_SERVE_HAPROXY_TCP_NODELAY": "1",
        "RAY_SERVE_SESSION_ID_HEADER_KEY": args.session_header,
        "RAYLLM_VLLM_ENGINE_CLS": "sim_engine.SimEngine",
        "RAY_SIM_URLS": args.sims,
        "PYTHONPATH": f"{HERE}:{os.environ.get('PYTHONPATH', '')}",
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_SERVE_HAPROXY_METRICS_ENABLED": "0",
    }
    os.environ.update(env)
    sys.path.insert(0, str(HERE))

    import ray
    from ray import serve
    from ray.serve.llm import LLMConfig, build_openai_app

    # Logical CPUs for Ray's scheduler: a tenth per replica (the engines are elsewhere);
    # Ray starts one idle worker per logical CPU, so keep the count small.
    ray.init(_node_ip_address="127.0.0.1", include_dashboard=False, num_cpus=4, num_gpus=0,
             runtime_env={"env_vars": env})
    deployment = {"num_replicas": len(sims), "max_ongoing_requests": 100_000,
                  "ray_actor_options": {"num_cpus": 0.1}}
    if args.policy == "consistent-hash":
        deployment["request_router_config"] = {
            "request_router_class": "ray.serve.experimental.consistent_hash_router.ConsistentHashRouter"}
    config = LLMConfig(
        model_loading_config={"model_id": args.model},
        accelerator_type=None,
        # No GPU: a token CPU bundle, where a vLLM engine would claim its GPU.
        placement_group_config={"bundles": [{"CPU": 0.1}]},
        deployment_config=deployment,
        runtime_env={"env_vars": env},
    )
    serve.start(http_options={"host": "127.0.0.1", "port": args.port})
    serve.run(build_openai_app({"llm_configs": [config]}), blocking=False)
    print(f"ray-serve-llm ready on port {args.port}", flush=True)
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    signal.signal(signal.SIGINT, lambda *_: stop.append(1))
    while not stop:
        time.sleep(0.5)
    serve.shutdown()
    ray.shutdown()


if __name__ == "__main__":
    main()
