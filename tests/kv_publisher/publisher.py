"""An independent KV events publisher for the router's tests, written apart from the
simulator: Python, pyzmq and msgspec, with the struct shapes of vLLM's
vllm/distributed/kv_events.py, publishing as a vLLM engine does.

    python publisher.py --encoding array|map --hashes int|bytes

Binds a PUB socket and a ROUTER replay socket on free loopback ports and prints
{"endpoint": ..., "replay": ...}. Then reads one JSON command per line on stdin:

    {"op": "stored", "hashes": [..], "parent": h|null, "tokens": [..], "skip": false}
    {"op": "removed", "hashes": [..]}
    {"op": "cleared"}

Each command is one EventBatch with the next sequence number, kept in the replay buffer;
with "skip": true it is buffered but not published (a message lost on the way, which the
subscriber sees as a gap). Answers {"seq": n} per command. Replay requests
[identity, b"", start_seq] are answered as vLLM answers them:
[identity, b"", topic, seq, payload] per buffered batch from start_seq on, then
[identity, b"", b"", -1 as 8 signed big-endian bytes, b""].
"""

import argparse
import json
import sys
import time
from typing import Any, Optional, Union

import msgspec
import zmq


def structs(array_like: bool):
    """vLLM's event structs; array_like=True is the tagged-array encoding of vLLM
    0.10/0.11, False the map encoding (tag in "type") of later versions."""

    class EventBatch(msgspec.Struct, array_like=array_like, omit_defaults=True, gc=False):
        ts: float
        events: list[Any]
        data_parallel_rank: Optional[int] = None

    class KVCacheEvent(msgspec.Struct, array_like=array_like, omit_defaults=True, gc=False, tag=True):
        pass

    class BlockStored(KVCacheEvent):
        block_hashes: list[Union[int, bytes]]
        parent_block_hash: Optional[Union[int, bytes]]
        token_ids: list[int]
        block_size: int
        lora_id: Optional[int]
        medium: Optional[str]

    class BlockRemoved(KVCacheEvent):
        block_hashes: list[Union[int, bytes]]
        medium: Optional[str]

    class AllBlocksCleared(KVCacheEvent):
        pass

    class KVEventBatch(EventBatch):
        events: list[Union[BlockStored, BlockRemoved, AllBlocksCleared]]

    return KVEventBatch, BlockStored, BlockRemoved, AllBlocksCleared


END_SEQ = (-1).to_bytes(8, "big", signed=True)
TOPIC = b""


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--encoding", choices=["array", "map"], default="array")
    p.add_argument("--hashes", choices=["int", "bytes"], default="int")
    p.add_argument("--block-size", type=int, default=16)
    args = p.parse_args()
    KVEventBatch, BlockStored, BlockRemoved, AllBlocksCleared = structs(args.encoding == "array")

    def engine_hash(h):
        if h is None:
            return None
        return h.to_bytes(32, "big") if args.hashes == "bytes" else h

    ctx = zmq.Context.instance()
    pub = ctx.socket(zmq.PUB)
    pub_port = pub.bind_to_random_port("tcp://127.0.0.1")
    replay = ctx.socket(zmq.ROUTER)
    replay_port = replay.bind_to_random_port("tcp://127.0.0.1")
    encoder = msgspec.msgpack.Encoder()
    buffer = []
    seq = 0
    print(json.dumps({"endpoint": f"tcp://127.0.0.1:{pub_port}", "replay": f"tcp://127.0.0.1:{replay_port}"}),
          flush=True)

    poller = zmq.Poller()
    poller.register(replay, zmq.POLLIN)
    poller.register(sys.stdin, zmq.POLLIN)
    while True:
        for sock, _ in poller.poll():
            if sock is replay:
                frame = replay.recv_multipart()
                if len(frame) != 3:
                    continue
                client, _, start = frame
                start = int.from_bytes(start, "big")
                for s, payload in buffer:
                    if s >= start:
                        replay.send_multipart((client, b"", TOPIC, s.to_bytes(8, "big"), payload))
                replay.send_multipart((client, b"", b"", END_SEQ, b""))
                continue
            line = sys.stdin.readline()
            if not line:
                return
            command = json.loads(line)
            op = command["op"]
            if op == "stored":
                event = BlockStored(
                    block_hashes=[engine_hash(h) for h in command["hashes"]],
                    parent_block_hash=engine_hash(command.get("parent")),
                    token_ids=command["tokens"],
                    block_size=args.block_size,
                    lora_id=None,
                    medium="GPU",
                )
            elif op == "removed":
                event = BlockRemoved(block_hashes=[engine_hash(h) for h in command["hashes"]], medium="GPU")
            else:
                event = AllBlocksCleared()
            payload = encoder.encode(KVEventBatch(ts=time.time(), events=[event], data_parallel_rank=0))
            if not command.get("skip"):
                pub.send_multipart((TOPIC, seq.to_bytes(8, "big"), payload))
            buffer.append((seq, payload))
            print(json.dumps({"seq": seq}), flush=True)
            seq += 1


if __name__ == "__main__":
    main()
