#!/usr/bin/env python3
"""Benchmark anti-entropy's digest of one big partition (meshq.cluster.repair.digest).

Usage: .venv/bin/python tools/bench_digest.py [--messages 1000000] [--changed 1000]
       [--rounds 3] [--hot-path 40000]

In one process, no daemon: a Broker over a MemoryStore holds one partition of
--messages READY messages (indexed directly, as a holder's copy is). It times

1. the first digest of the partition (every message is new to it);
2. --rounds digests, each after --changed messages moved (a lease: a new progress
   version) and as many were acked and replaced by new ones: what a busy queue does
   between two repair rounds;
3. finding the members of one differing bucket (what a sync lists when buckets differ);
4. with --hot-path N: N messages sent (batches of 100), leased to a subscription and
   acked, through the same kind of Broker running (CPU microseconds per message): what
   keeping the sums adds to every lease and ack.

and prints CPU seconds for each. To time another build, run a copy of this script from
outside the checkout with PYTHONPATH set to that build (it puts its own checkout first on
the path; a build whose digest returns the sums and members together works too).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import trio
from trio.testing import MockClock

from meshq.broker import Broker, Session
from meshq.broker.queue import Queue
from meshq.cluster import repair
from meshq.model import Message
from meshq.states import State
from meshq.store import MemoryStore
from meshq.testing import TrioClock


def _message(q: Queue, n: int) -> Message:
    return Message(n, f"{n:016x}-n1", q.name, b"x" * 16, {}, n, "n1", index=q.index,
                   inc=q.inc, epoch=1 << 32, vn=1)


async def _timed(fn: Any) -> tuple[float, Any]:
    t0 = time.process_time()
    out = await fn()
    return time.process_time() - t0, out


async def bench(messages: int, changed: int, rounds: int) -> dict[str, Any]:
    broker = Broker(MemoryStore(), TrioClock(), node_id="n1")
    broker.declare("big", {})  # (indexed at once; nothing commits here: no writer runs)
    q = broker.queues["big"][0]
    for n in range(messages):
        q.add(_message(q, n))
    out: dict[str, Any] = {"messages": messages, "changed": changed}
    out["first_s"], _ = await _timed(lambda: repair.digest(broker, q))
    nxt = messages
    times = []
    for r in range(rounds):
        ids = list(q.messages)
        for mid in ids[r * 2 * changed:(r * 2 + 1) * changed]:  # leased: progress moved
            msg = q.messages[mid]
            msg.state, msg.delivery_count, msg.vn = State.LEASED, 1, msg.vn + 1
            if hasattr(q, "changed"):
                q.changed(msg)
        for mid in ids[(r * 2 + 1) * changed:(r * 2 + 2) * changed]:  # acked, and sent anew
            q.remove(q.messages[mid])
            q.add(_message(q, nxt))
            nxt += 1
        took, _ = await _timed(lambda: repair.digest(broker, q))
        times.append(took)
    out["after_changes_s"] = times
    if hasattr(repair, "members"):
        try:  # (a build whose members take the broker, for the cold ones, or not)
            out["members_of_one_bucket_s"], _ = await _timed(
                lambda: repair.members(broker, q, [0]))
        except TypeError:
            out["members_of_one_bucket_s"], _ = await _timed(lambda: repair.members(q, [0]))
    return out


async def hot_path(n: int) -> float:
    store = MemoryStore()
    broker = Broker(store, TrioClock(), node_id="n1")
    async with trio.open_nursery() as nursery:
        await nursery.start(store.run)
        await nursery.start(broker.run)
        await broker.declare("q", {}).wait()
        tx, rx = trio.open_memory_channel[list[Message]](math.inf)
        session = Session(push=lambda tag, msgs: tx.send_nowait(msgs))
        broker.consume(session, "q", 1000)
        got = 0

        async def ack(msgs: list[Message]) -> None:
            nonlocal got
            got += len(msgs)
            await broker.ack(session, "q", [m.id for m in msgs]).wait()

        t0 = time.process_time()
        for _ in range(0, n, 100):
            await broker.send("q", [{"body": b"x"}] * 100).wait()
            while True:
                try:
                    msgs = rx.receive_nowait()
                except trio.WouldBlock:
                    break
                await ack(msgs)
        while got < n:
            await ack(await rx.receive())
        took = time.process_time() - t0
        nursery.cancel_scope.cancel()
    return took / n * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=1_000_000)
    parser.add_argument("--changed", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--hot-path", type=int, default=0, metavar="N")
    args = parser.parse_args()
    result = trio.run(bench, args.messages, args.changed, args.rounds)
    if args.hot_path:
        result["hot_path_us_per_message"] = trio.run(
            hot_path, args.hot_path, clock=MockClock(autojump_threshold=0))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
