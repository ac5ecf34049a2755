"""Drive a vLLM-compatible server with the official `openai` Python client.

Used by openai_client_check.sh against vllm-sim directly and through the router: an
independent OpenAI client must parse every response and stream we produce. Prints
'N passed, N failed' and exits non-zero on any failure.

Usage: openai_client_check.py BASE_URL MODEL [--ca PEM] [--http2] [--h2c]
  --ca PEM  trust this certificate (the router's TLS listener, self-signed)
  --http2   offer HTTP/2 by ALPN over TLS and check every response came over it
  --h2c     HTTP/2 with prior knowledge on a plain connection (no HTTP/1.1)
"""
import sys

import openai

base_url, model, flags = sys.argv[1], sys.argv[2], sys.argv[3:]
ca = flags[flags.index("--ca") + 1] if "--ca" in flags else True
h2c = "--h2c" in flags
http2 = "--http2" in flags or h2c
versions = set()
http_client = openai.DefaultHttpx2Client(
    http2=http2, http1=not h2c, verify=ca,
    event_hooks={"response": [lambda response: versions.add(response.http_version)]})
client = openai.OpenAI(base_url=base_url + "/v1", api_key="unused", max_retries=0, timeout=30,
                       http_client=http_client)
passed = failed = 0


def check(name, fn):
    global passed, failed
    try:
        fn()
        passed += 1
        print(f"ok   {name}")
    except Exception as e:  # noqa: BLE001 - report every failure, keep going
        failed += 1
        print(f"FAIL {name}: {type(e).__name__}: {e}")


def models():
    ids = [m.id for m in client.models.list().data]
    assert model in ids, ids


def completion_matches_stream():
    args = dict(model=model, prompt="The router decides", max_tokens=12, extra_body={"ignore_eos": True})
    full = client.completions.create(**args)
    assert full.usage.completion_tokens == 12, full.usage
    assert full.choices[0].finish_reason == "length"
    chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **args))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == full.choices[0].text, (text, full.choices[0].text)
    assert chunks[-1].usage.completion_tokens == 12 and not chunks[-1].choices


def chat_stream():
    msgs = [{"role": "user", "content": "hello"}]
    full = client.chat.completions.create(model=model, messages=msgs, max_tokens=8)
    assert full.choices[0].message.role == "assistant"
    stream = client.chat.completions.create(model=model, messages=msgs, max_tokens=8, stream=True)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text == full.choices[0].message.content, (text, full.choices[0].message.content)
    assert chunks[-1].choices[0].finish_reason in ("length", "stop")


def unknown_model_is_404():
    try:
        client.completions.create(model="no-such-model", prompt="x", max_tokens=1)
    except openai.NotFoundError:
        return
    raise AssertionError("expected NotFoundError")


def protocol():
    want = {"HTTP/2"} if http2 else {"HTTP/1.1"}
    assert versions == want, versions


for name, fn in [("models", models), ("completion == stream", completion_matches_stream),
                 ("chat stream", chat_stream), ("unknown model 404", unknown_model_is_404),
                 ("protocol", protocol)]:
    check(f"{base_url} {' '.join(flags)} {name}", fn)
print(f"{passed} passed, {failed} failed")
sys.exit(1 if failed else 0)
