"""MemoryStore: the fake Store for deterministic tests. Same contract, nothing on disk.

It applies ops to dicts, so a test can "restart" a broker from ``load()`` and check that
what was confirmed survived. ``fail_next`` makes the next commit fail, as a full disk would.
"""

from __future__ import annotations

import copy
import time

import msgpack
import trio

from meshq.model import Message
from meshq.states import State
from meshq.store.base import (
    OP_DEDUP,
    OP_DEDUP_PRUNE,
    OP_DELETE,
    OP_DROP_QUEUE,
    OP_FORGET,
    OP_META,
    OP_PUT,
    OP_QUEUE,
    OP_TOMBSTONE,
    OP_TOMBSTONE_PRUNE,
    OP_UPDATE,
    Op,
    Snapshot,
    Store,
    StoreStatistics,
)

__all__ = ["MemoryStore"]


class MemoryStore(Store):
    def __init__(self) -> None:
        super().__init__()
        self.meta: dict[str, str] = {}
        self.queues: dict[str, tuple[bytes, int, int, int]] = {}
        self.messages: dict[int, tuple] = {}
        self.dedup: dict[tuple[str, str], tuple[str, float]] = {}
        self.tombstones: dict[tuple[str, str], float] = {}
        self.fail_next = False

    def load(self) -> Snapshot:
        snap = Snapshot(meta=dict(self.meta))
        for name, (options, dl, exp, dropped) in self.queues.items():
            counters = {"dead_lettered": dl, "expired": exp, "dropped": dropped}
            snap.queues.append((name, msgpack.unpackb(options), counters))
        for seq in sorted(self.messages):
            (_, mid, queue, hlc, node, body, headers, state, count, ready_at, expires_at,
             lease) = self.messages[seq]
            snap.messages.append(Message(seq, mid, queue, body,
                                         msgpack.unpackb(headers) if headers else {}, hlc, node,
                                         State(state), count, ready_at, expires_at, lease))
        snap.dedup = [(q, d, mid, exp) for (q, d), (mid, exp) in self.dedup.items()]
        return snap

    async def _commit(self, ops: list[Op]) -> None:
        await trio.lowlevel.checkpoint()
        if self.fail_next:
            self.fail_next = False
            raise OSError("simulated disk failure")
        # Apply to copies so that a failure part-way leaves nothing applied.
        meta, queues = dict(self.meta), dict(self.queues)
        messages, dedup = dict(self.messages), dict(self.dedup)
        tombs = dict(self.tombstones)
        for kind, p in ops:
            if kind == OP_PUT:
                messages[p[0]] = copy.copy(p)
            elif kind == OP_UPDATE:
                if p[4] in messages:
                    row = list(messages[p[4]])
                    row[7:10], row[11] = p[0:3], p[3]
                    messages[p[4]] = tuple(row)
            elif kind == OP_DELETE:
                gone = messages.pop(p[0], None)
                if gone is not None:
                    tombs[gone[2], gone[1]] = time.time()
            elif kind == OP_QUEUE:
                queues[p[0]] = p[1:]
            elif kind == OP_DROP_QUEUE:
                queues.pop(p[0], None)
                messages = {s: r for s, r in messages.items() if r[2] != p[0]}
                tombs = {k: at for k, at in tombs.items() if k[0] != p[0]}
                dedup = {k: v for k, v in dedup.items() if k[0] != p[0]}
            elif kind == OP_DEDUP:
                dedup[p[0], p[1]] = (p[2], p[3])
            elif kind == OP_DEDUP_PRUNE:
                dedup = {k: v for k, v in dedup.items() if v[1] >= p[0]}
            elif kind == OP_META:
                meta[p[0]] = p[1]
            elif kind == OP_FORGET:
                messages.pop(p[0], None)
            elif kind == OP_TOMBSTONE:
                tombs[p[0], p[1]] = time.time()
            elif kind == OP_TOMBSTONE_PRUNE:
                tombs = {k: at for k, at in tombs.items() if at >= p[0]}
            else:
                raise ValueError(f"unknown op kind {kind}")
        self.meta, self.queues, self.messages, self.dedup = meta, queues, messages, dedup
        self.tombstones = tombs

    async def tombstoned(self, queue: str, ids: list[str]) -> set[str]:
        return {i for i in ids if (queue, i) in self.tombstones}

    def statistics(self) -> StoreStatistics:
        return StoreStatistics(None, 0, self.commits, self.ops_committed, self.failed_commits,
                               self.commit_seconds)
