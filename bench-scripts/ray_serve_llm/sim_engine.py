"""A Ray Serve LLM engine whose "GPU" is a vllm-sim replica.

Ray Serve LLM's direct streaming serves each request from the LLMServer replica's own
ASGI app, which the engine builds (`LLMEngine.build_asgi_app`; vLLM's engine returns
vLLM's OpenAI FastAPI app, Ray's own tests a mock one). This engine returns a small ASGI
app that relays every request, byte for byte, to the vllm-sim replica assigned to this
Serve replica (by replica rank, from RAY_SIM_URLS), so Ray's real serving layer
(HAProxy, LLMRouter, the request router, the replica's HTTP server) runs in front of the
same simulated engines as the other contenders.

The relay stands where vLLM's own Python frontend stands in a real deployment; the other
contenders reach the simulator's Rust frontend directly, so this costs Ray one Python
hop per request and per streamed event that they do not pay.
"""

import os
from typing import Any, AsyncGenerator, Optional

import httpx
from fastapi import FastAPI
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from ray import serve
from ray.llm._internal.serve.core.engine.protocol import LLMEngine

_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "host", "te", "upgrade"}


class SimEngine(LLMEngine):
    def __init__(self, llm_config):
        self.llm_config = llm_config
        self.url = None
        self.client = None

    async def start(self):
        urls = os.environ["RAY_SIM_URLS"].split(",")
        rank = serve.get_replica_context().rank.rank
        self.url = urls[rank % len(urls)]
        self.client = httpx.AsyncClient(
            base_url=self.url,
            timeout=httpx.Timeout(600.0, connect=5.0),
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=1024),
        )

    def routing_stats(self) -> dict:
        return {}

    async def resolve_lora(self, lora_model):
        raise NotImplementedError("no LoRA on the simulator")

    async def check_health(self) -> None:
        response = await self.client.get("/health")
        response.raise_for_status()

    async def reset_prefix_cache(self) -> None:
        return None

    async def _unsupported(self, *args: Any, **kwargs: Any) -> AsyncGenerator[Any, None]:
        raise NotImplementedError("direct streaming serves requests from build_asgi_app")
        yield  # pragma: no cover

    chat = completions = embeddings = transcriptions = _unsupported

    async def build_asgi_app(self):
        client = self.client

        async def relay(request: Request) -> Response:
            headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP_BY_HOP}
            upstream = client.build_request(
                request.method, request.url.path, params=request.query_params, headers=headers,
                content=await request.body())
            response = await client.send(upstream, stream=True)
            out_headers = {k: v for k, v in response.headers.items() if k.lower() not in _HOP_BY_HOP}

            async def body():
                try:
                    async for chunk in response.aiter_raw():
                        yield chunk
                finally:
                    await response.aclose()

            return StreamingResponse(body(), status_code=response.status_code, headers=out_headers)

        # FastAPI, as vLLM's own app is: Ray adds its routes and middleware to it.
        app = FastAPI()
        for path in ("/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/tokenize", "/detokenize"):
            app.add_api_route(path, relay, methods=["GET", "POST"])
        return app
