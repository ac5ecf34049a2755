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
  h2_stalled   opens an HTTP/2 stream (h2c) with a stream window of 0, answers pings and
               never opens the window: the router should reset the stream (`reset`)

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
outcomes = {"non_reader": Counter(), "slow_reader": Counter(), "slow_upload": Counter(), "h2_stalled": Counter()}
# `authorization: Bearer KEY` when the router wants a key (--api-key).
AUTH = b""


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
    s.sendall(b"POST /v1/completions HTTP/1.1\r\nhost: r\r\ncontent-type: application/json\r\n" + AUTH +
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
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nhost: r\r\ncontent-type: application/json\r\n" + AUTH +
                  b"content-length: 10000\r\n\r\n" + b'{"model": "' + model.encode() + b'", "prompt": "' + b"x" * 80)
        s.settimeout(30)
        answer = s.recv(64)
        record("slow_upload", answer.split(b" ")[1].decode() if answer.startswith(b"HTTP/1.1 ") else "no answer")
        s.close()
    except OSError as e:
        record("slow_upload", f"error: {e.__class__.__name__}")


def hpack_int(value, prefix_bits, first=0):
    """An HPACK integer with an N-bit prefix (RFC 7541 5.1)."""
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes([first | value])
    out, value = [first | limit], value - limit
    while value >= 128:
        out.append(value % 128 + 128)
        value //= 128
    return bytes(out + [value])


def hpack_literal(name, value):
    """A header field as a literal without indexing, new name, no Huffman coding."""
    return b"\x00" + hpack_int(len(name), 7) + name + hpack_int(len(value), 7) + value


def frame(kind, flags, stream, payload=b""):
    return len(payload).to_bytes(3, "big") + bytes([kind, flags]) + stream.to_bytes(4, "big") + payload


def h2_stalled(host, port, model):
    """An h2c stream whose window stays 0: the router must reset it (RST_STREAM)."""
    try:
        s = socket.create_connection((host, port), timeout=30)
        body = json.dumps({"model": model, "prompt": "tell me a story", "max_tokens": 2000,
                           "ignore_eos": True, "stream": True}).encode()
        fields = [(b":method", b"POST"), (b":scheme", b"http"), (b":path", b"/v1/completions"),
                  (b":authority", b"r"), (b"content-type", b"application/json")]
        if AUTH:
            fields.append((b"authorization", AUTH.split(b": ", 1)[1].strip()))
        block = b"".join(hpack_literal(n, v) for n, v in fields)
        settings = (4).to_bytes(2, "big") + (0).to_bytes(4, "big")  # INITIAL_WINDOW_SIZE = 0
        s.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + frame(4, 0, 0, settings) +
                  frame(1, 0x4, 1, block) + frame(0, 0x1, 1, body))
        buffer, outcome, deadline = b"", "not reset", time.time() + 120
        s.settimeout(2)
        while time.time() < deadline:
            try:
                chunk = s.recv(65536)
            except socket.timeout:
                continue
            if not chunk:
                outcome = "connection closed"
                break
            buffer += chunk
            while len(buffer) >= 9:
                length = int.from_bytes(buffer[:3], "big")
                if len(buffer) < 9 + length:
                    break
                kind, flags, stream = buffer[3], buffer[4], int.from_bytes(buffer[5:9], "big") & 0x7FFFFFFF
                payload, buffer = buffer[9:9 + length], buffer[9 + length:]
                if kind == 4 and not flags & 1:
                    s.sendall(frame(4, 1, 0))  # SETTINGS ACK
                elif kind == 6 and not flags & 1:
                    s.sendall(frame(6, 1, 0, payload))  # PING ACK
                elif kind == 3 and stream == 1:
                    outcome = "reset"
                elif kind == 7:
                    outcome = "goaway"
            if outcome in ("reset", "goaway"):
                break
        record("h2_stalled", outcome)
        s.close()
    except OSError as e:
        record("h2_stalled", f"error: {e.__class__.__name__}")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--router", required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--minutes", type=float, required=True)
    p.add_argument("--api-key", help="sent as Authorization: Bearer KEY")
    args = p.parse_args()
    global AUTH
    if args.api_key:
        AUTH = b"authorization: Bearer " + args.api_key.encode() + b"\r\n"
    url = urlparse(args.router)
    host, port = url.hostname, url.port
    end = time.time() + args.minutes * 60
    threads = []
    pace = {non_reader: 3.0, slow_reader: 5.0, slow_upload: 5.0, h2_stalled: 5.0}
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
