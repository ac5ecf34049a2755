#!/usr/bin/env python3
"""Clients that misbehave slowly, for the soak test (bench-scripts/soak.py).

    slow_clients.py --router http://127.0.0.1:PORT --model M --minutes N

Three kinds, started at a steady pace for N minutes, each on 127.0.0.1 only and each
bounded in time (standard library only):

  non_reader   opens a long stream with a 4 kB receive buffer and never reads it; after
               40 s it reads what is there: the router should have hung up (`cut`)
  slow_reader  reads a stream 2 kB every half second: slow but steady, it must finish
               (`complete`), never be cut
  slow_upload  announces a 10 kB body, sends 100 bytes and stops: the router should
               answer 408 (`408`) and hold no slot meanwhile

Prints one JSON object with the outcomes by kind at the end.
"""

import argparse
import json
import socket
import sys
import threading
import time
from collections import Counter
from urllib.parse import urlparse

lock = threading.Lock()
outcomes = {"non_reader": Counter(), "slow_reader": Counter(), "slow_upload": Counter()}


def record(kind, outcome):
    with lock:
        outcomes[kind][outcome] += 1


def request(host, port, model, max_tokens, rcvbuf=None):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    s.settimeout(30)
    s.connect((host, port))
    body = json.dumps({"model": model, "prompt": "tell me a long story", "max_tokens": max_tokens,
                       "ignore_eos": True, "stream": True}).encode()
    s.sendall(b"POST /v1/completions HTTP/1.1\r\nhost: r\r\ncontent-type: application/json\r\n"
              b"content-length: %d\r\n\r\n" % len(body) + body)
    return s


def drain(s, seconds, limit=64 << 20):
    """Read until EOF or `seconds`; (bytes read, whether the peer closed)."""
    deadline, total = time.time() + seconds, 0
    s.settimeout(1)
    while time.time() < deadline and total < limit:
        try:
            chunk = s.recv(65536)
        except socket.timeout:
            continue
        except OSError:
            return total, True
        if not chunk:
            return total, True
        total += len(chunk)
    return total, False


def non_reader(host, port, model):
    """Cut: the router hung up. A complete response (the stream fit the buffers) or an
    error answer would leave the connection open or end it differently: `not cut`."""
    try:
        # 60,000 tokens (~12 MB of events): more than the socket buffers between the
        # router and this client can hold, within the model's 81,920-token context.
        s = request(host, port, model, 60000, rcvbuf=4096)
        time.sleep(40)
        head = b""
        try:
            s.settimeout(5)
            head = s.recv(64)
        except OSError:
            pass
        if not head.startswith(b"HTTP/1.1 200"):
            record("non_reader", f"answered {head[:12]!r}")
            s.close()
            return
        total, closed = drain(s, 15)
        record("non_reader", "cut" if closed and total < 12 << 20 else "not cut")
        s.close()
    except OSError as e:
        record("non_reader", f"error: {e.__class__.__name__}")


def slow_reader(host, port, model):
    try:
        s = request(host, port, model, 300)
        s.settimeout(10)
        data = b""
        deadline = time.time() + 120
        while time.time() < deadline:
            chunk = s.recv(2048)
            if not chunk:
                break
            data += chunk
            if b"data: [DONE]" in data:
                break
            time.sleep(0.5)
        if b'"error"' in data:
            record("slow_reader", "error event")
        elif b"data: [DONE]" in data:
            record("slow_reader", "complete")
        else:
            record("slow_reader", "cut")
        s.close()
    except OSError as e:
        record("slow_reader", f"error: {e.__class__.__name__}")


def slow_upload(host, port, model):
    try:
        s = socket.create_connection((host, port), timeout=30)
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nhost: r\r\ncontent-type: application/json\r\n"
                  b"content-length: 10000\r\n\r\n" + b'{"model": "' + model.encode() + b'", "prompt": "' + b"x" * 80)
        s.settimeout(30)
        answer = s.recv(64)
        record("slow_upload", answer.split(b" ")[1].decode() if answer.startswith(b"HTTP/1.1 ") else "no answer")
        s.close()
    except OSError as e:
        record("slow_upload", f"error: {e.__class__.__name__}")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--router", required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--minutes", type=float, required=True)
    args = p.parse_args()
    url = urlparse(args.router)
    host, port = url.hostname, url.port
    end = time.time() + args.minutes * 60
    threads = []
    pace = {non_reader: 3.0, slow_reader: 5.0, slow_upload: 5.0}
    next_start = {f: time.time() for f in pace}
    while time.time() < end:
        now = time.time()
        for f, every in pace.items():
            if now >= next_start[f]:
                t = threading.Thread(target=f, args=(host, port, args.model), daemon=True)
                t.start()
                threads.append(t)
                next_start[f] = now + every
        threads = [t for t in threads if t.is_alive()]
        time.sleep(0.2)
    for t in threads:
        t.join(timeout=180)
    print(json.dumps({kind: dict(c) for kind, c in outcomes.items()}))


if __name__ == "__main__":
    sys.exit(main())
