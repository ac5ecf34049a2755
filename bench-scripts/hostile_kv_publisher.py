#!/usr/bin/env python3
"""A KV events publisher that misbehaves, for the soak test (bench-scripts/soak.py).

    hostile_kv_publisher.py --port N [--seed 7]

Speaks ZMTP 3.0 as a PUB socket at the byte level (standard library only, no libzmq, so
it can send what libzmq never would). Each connection the router makes is handshaken,
then given the next misbehaviour of a fixed cycle, mixed with stretches of good batches:

  good              twenty well-formed batches (BlockStored, block_size 16), 10 per second
  huge_frame        a frame header announcing 2^62 bytes
  garbage           well-framed messages whose payload is random bytes
  absurd_block_size a BlockStored with block_size 2^60 and no tokens
  many_frames       one message of 100 frames
  reserved_bits     a frame with reserved flag bits set
  slow_drip         a frame announced at 1000 bytes, then one byte a second
  silence           connected, sending nothing for 20 s
  disconnect        closed at once

Counts what it did on stdout, one JSON line per connection. Runs until killed.
"""

import argparse
import json
import os
import random
import socket
import struct
import sys
import time

CYCLE = ["good", "huge_frame", "good", "garbage", "absurd_block_size", "good", "many_frames",
         "reserved_bits", "good", "slow_drip", "silence", "disconnect"]


def frame(body, more=False, flags_extra=0):
    flags = (1 if more else 0) | flags_extra
    if len(body) > 255:
        return bytes([flags | 2]) + struct.pack(">Q", len(body)) + body
    return bytes([flags, len(body)]) + body


def message(frames):
    return b"".join(frame(f, i + 1 < len(frames)) for i, f in enumerate(frames))


def mp_array(items):
    n = len(items)
    head = bytes([0x90 | n]) if n < 16 else b"\xdc" + struct.pack(">H", n) if n < 65536 else \
        b"\xdd" + struct.pack(">I", n)
    return head + b"".join(items)


def mp_str(text):
    data = text.encode()
    return bytes([0xa0 | len(data)]) + data if len(data) < 32 else b"\xd9" + bytes([len(data)]) + data


def mp_uint(n):
    return bytes([n]) if n < 128 else b"\xcf" + struct.pack(">Q", n)


def batch(events):
    return mp_array([b"\xcb" + struct.pack(">d", time.time()), mp_array(events), mp_uint(0)])


def stored(rng, block_size=16, blocks=4):
    hashes = [mp_uint(rng.getrandbits(63)) for _ in range(blocks)]
    tokens = [mp_uint(rng.randrange(100000)) for _ in range(blocks * block_size)]
    return mp_array([mp_str("BlockStored"), mp_array(hashes), b"\xc0", mp_array(tokens), mp_uint(block_size),
                     b"\xc0", mp_str("GPU")])


def handshake(conn):
    greeting = bytearray(64)
    greeting[0], greeting[9], greeting[10], greeting[11] = 0xff, 0x7f, 3, 0
    greeting[12:16] = b"NULL"
    greeting[32] = 1
    conn.sendall(bytes(greeting))
    theirs = b""
    while len(theirs) < 64:
        chunk = conn.recv(64 - len(theirs))
        if not chunk:
            return False
        theirs += chunk
    ready = b"\x05READY" + b"\x0bSocket-Type" + struct.pack(">I", 3) + b"PUB"
    conn.sendall(bytes([0x04, len(ready)]) + ready)
    # Their READY and subscription: two frames, read loosely.
    conn.settimeout(5)
    for _ in range(2):
        head = conn.recv(2)
        if len(head) < 2:
            return False
        size = head[1]
        if head[0] & 2:
            size = struct.unpack(">Q", head[1:] + conn.recv(7))[0]
        while size > 0:
            got = conn.recv(min(size, 4096))
            if not got:
                return False
            size -= len(got)
    return True


def misbehave(conn, kind, rng, seq):
    """Do `kind` on the connection; the next sequence number."""
    if kind == "good":
        for _ in range(20):
            conn.sendall(message([b"", struct.pack(">Q", seq), batch([stored(rng)])]))
            seq += 1
            time.sleep(0.1)
    elif kind == "huge_frame":
        conn.sendall(bytes([0x02]) + struct.pack(">Q", 1 << 62))
    elif kind == "garbage":
        for _ in range(10):
            conn.sendall(message([b"", struct.pack(">Q", seq), os.urandom(rng.randrange(1, 2000))]))
            seq += 1
    elif kind == "absurd_block_size":
        event = mp_array([mp_str("BlockStored"), mp_array([mp_uint(1), mp_uint(2), mp_uint(3), mp_uint(4)]),
                          b"\xc0", mp_array([]), mp_uint(1 << 60)])
        conn.sendall(message([b"", struct.pack(">Q", seq), batch([event])]))
        seq += 1
    elif kind == "many_frames":
        conn.sendall(message([b"x"] * 100))
    elif kind == "reserved_bits":
        conn.sendall(bytes([0xf0, 1, 0]))
    elif kind == "slow_drip":
        conn.sendall(bytes([0x00]) + b"\xff")  # a short frame of 255 bytes
        for _ in range(20):
            conn.sendall(b"x")
            time.sleep(1)
    elif kind == "silence":
        time.sleep(20)
    return seq


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--seed", type=int, default=7)
    args = p.parse_args()
    rng = random.Random(args.seed)
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(("127.0.0.1", args.port))
    server.listen(16)
    turn, seq = 0, 0
    while True:
        conn, _ = server.accept()
        kind = CYCLE[turn % len(CYCLE)]
        turn += 1
        outcome = "done"
        try:
            if not handshake(conn):
                outcome = "no handshake"
            elif kind == "disconnect":
                outcome = "closed by the publisher"
            else:
                conn.settimeout(30)
                seq = misbehave(conn, kind, rng, seq)
                # See whether the router hangs up (it should, for the protocol breaches).
                conn.settimeout(3)
                try:
                    outcome = "closed by router" if conn.recv(1) == b"" else "still open"
                except socket.timeout:
                    outcome = "still open"
        except OSError as e:
            outcome = f"closed by router ({e.__class__.__name__})"
        finally:
            conn.close()
        print(json.dumps({"turn": turn, "kind": kind, "outcome": outcome}), flush=True)


if __name__ == "__main__":
    sys.exit(main())
