"""MemoryStore: the fake Store for deterministic tests. Same contract, nothing on disk.

It applies ops to dicts, so a test can "restart" a broker from ``load()`` (or, as meshqd
does, from ``load(hot_ready)``) and check that what was confirmed survived (the simulation
keeps a killed node's MemoryStore and restarts from it as meshqd does). ``fail_next``
makes the next commit fail, as a full disk would; ``delays`` (seconds of trio time, drawn
for each commit and each ``*_async`` read) makes commits take time, so that a simulated
crash can fall between staging and durability, and reads too, as SQLiteStore's do in a
worker thread: a read sees the store as it was when it began, and what commits meanwhile
comes later.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

import msgpack
import trio

from meshq.model import Message
from meshq.states import State
from meshq.store import _ops as op
from meshq.store.base import Op, Snapshot, Store, StoreStatistics

__all__ = ["MemoryStore"]

_T = TypeVar("_T")


def _message(row: tuple) -> Message:
    (seq, mid, queue, idx, inc, hlc, node, body, headers, state, count, ready_at,
     expires_at, lease, lease_id, holder, epoch, vn) = row
    return Message(seq, mid, queue, body, msgpack.unpackb(headers) if headers else {}, hlc,
                   node, State(state), count, ready_at, expires_at, lease, idx, inc, lease_id,
                   holder, epoch, vn)


def _keys(row: tuple) -> Message:
    """A row as a keys-only message (no body, no headers)."""
    (seq, mid, queue, idx, inc, hlc, node, _body, _headers, state, count, ready_at,
     expires_at, lease, lease_id, holder, epoch, vn) = row
    return Message(seq, mid, queue, b"", {}, hlc, node, State(state), count, ready_at,
                   expires_at, lease, idx, inc, lease_id, holder, epoch, vn)


class MemoryStore(Store):
    pages = True

    def __init__(self, delays: Callable[[], float] | None = None) -> None:
        super().__init__()
        self.meta: dict[str, str] = {}
        self.catalog: dict[str, tuple] = {}
        self.partitions: dict[tuple[str, int], tuple] = {}
        self.messages: dict[int, tuple] = {}
        self.dedup: dict[tuple[str, str], tuple[str, float]] = {}
        self.tombstones: dict[tuple[str, int, str], float] = {}
        self.fail_next = False
        self.delays = delays

    def reset(self) -> None:
        """Forget the batches of a process that was killed (what committed stays)."""
        Store.__init__(self)

    def load(self, hot_ready: int | None = None) -> Snapshot:
        snap = Snapshot(meta=dict(self.meta))
        for name, (inc, options, dropped, dropped_at) in self.catalog.items():
            snap.catalog.append((name, inc, msgpack.unpackb(options) if options else None,
                                 dropped, dropped_at))
        for (queue, idx), (promised, tally) in self.partitions.items():
            snap.partitions.append((queue, idx, promised,
                                    msgpack.unpackb(tally) if tally else {}))
        ready: dict[tuple[str, int], list[tuple]] = {}
        delayed: dict[tuple[str, int], list[tuple]] = {}
        rows = []
        for seq in sorted(self.messages):
            row = self.messages[seq]
            if hot_ready is not None and row[9] == State.READY:
                ready.setdefault((row[2], row[3]), []).append(row)
            elif hot_ready is not None and row[9] == State.DELAYED:
                delayed.setdefault((row[2], row[3]), []).append(row)
            else:
                rows.append(row)
        for part, delayed_rows in delayed.items():
            delayed_rows.sort(key=lambda r: (r[11] or 0.0, r[0]))
            assert hot_ready is not None
            rows += delayed_rows[:hot_ready]
            if len(delayed_rows) > hot_ready:
                last = delayed_rows[hot_ready - 1]
                snap.late[part] = (len(delayed_rows) - hot_ready, (last[11] or 0.0, last[0]))
        for part, ready_rows in ready.items():
            ready_rows.sort(key=lambda r: (r[5], r[0]))
            assert hot_ready is not None
            rows += ready_rows[:hot_ready]
            if len(ready_rows) > hot_ready:
                last = ready_rows[hot_ready - 1]
                snap.cold[part] = (len(ready_rows) - hot_ready, (last[5], last[0]))
                snap.max_hlc = max([snap.max_hlc] + [r[5] for r in ready_rows])
        snap.max_seq = max(self.messages, default=0)
        snap.messages = sorted((_message(r) for r in rows), key=lambda m: m.seq)
        if hot_ready is None:
            snap.dedup = [(q, d, mid, exp) for (q, d), (mid, exp) in self.dedup.items()]
            snap.tombstones = [(q, i, mid, at) for (q, i, mid), at in self.tombstones.items()]
        else:
            snap.dedup_on_disk = snap.tombs_on_disk = True
        return snap

    def read_delayed(self, queue: str, index: int, after: tuple[float, int],
                     limit: int) -> list[Message]:
        rows = sorted((r for r in self.messages.values()
                       if r[9] == State.DELAYED and r[2] == queue and r[3] == index
                       and (r[11] or 0.0, r[0]) > after), key=lambda r: (r[11] or 0.0, r[0]))
        return [_message(r) for r in rows[:limit]]

    async def read_delayed_async(self, queue: str, index: int, after: tuple[float, int],
                                 limit: int) -> list[Message]:
        return await self._read(self.read_delayed, queue, index, after, limit)

    def read_tombs(self, queue: str, index: int) -> list[tuple[str, float]]:
        return [(mid, at) for (q, i, mid), at in self.tombstones.items()
                if (q, i) == (queue, index)]

    def read_dedup(self, queue: str, dedup_id: str) -> tuple[str, float] | None:
        return self.dedup.get((queue, dedup_id))

    def dedup_keys(self, after: int, limit: int) -> list[tuple[int, str, str, float]]:
        if after:  # (one page of all of them: a dict has no stable positions)
            return []
        return [(1, q, d, exp) for (q, d), (_, exp) in self.dedup.items()]

    def read_ready(self, queue: str, index: int, after: tuple[int, int],
                   limit: int) -> list[Message]:
        rows = sorted((r for r in self.messages.values()
                       if r[9] == State.READY and r[2] == queue and r[3] == index
                       and (r[5], r[0]) > after), key=lambda r: (r[5], r[0]))
        return [_message(r) for r in rows[:limit]]

    def scan_ready(self, queue: str, index: int, after: tuple[int, int],
                   fold: Callable[[Iterator[Message]], _T], max_seq: int | None = None) -> _T:
        rows = sorted((r for r in self.messages.values()
                       if r[9] == State.READY and r[2] == queue and r[3] == index
                       and (r[5], r[0]) > after and (max_seq is None or r[0] <= max_seq)),
                      key=lambda r: (r[5], r[0]))
        return fold(_keys(r) for r in rows)

    def read_ids(self, queue: str, index: int, ids: Iterable[str]) -> list[Message]:
        wanted = set(ids)
        return [_message(r) for r in sorted((r for r in self.messages.values()
                                             if r[1] in wanted and r[2] == queue
                                             and r[3] == index), key=lambda r: r[0])]

    def read_seqs(self, seqs: Iterable[int]) -> list[Message]:
        return [_message(self.messages[s]) for s in sorted(set(seqs)) if s in self.messages]

    async def scan_ready_async(self, queue: str, index: int, after: tuple[int, int],
                               fold: Callable[[Iterator[Message]], _T],
                               max_seq: int | None = None) -> _T:
        return await self._read(self.scan_ready, queue, index, after, fold, max_seq)

    async def read_ids_async(self, queue: str, index: int, ids: Iterable[str]) -> list[Message]:
        return await self._read(self.read_ids, queue, index, list(ids))

    async def read_seqs_async(self, seqs: Iterable[int]) -> list[Message]:
        return await self._read(self.read_seqs, list(seqs))

    async def _taking_time(self) -> None:
        if self.delays is not None:
            await trio.sleep(self.delays())
        else:
            await trio.lowlevel.checkpoint()

    async def _read(self, read: Callable[..., _T], *args: Any) -> _T:
        """``read(*args)``, as of now, returned after a delay (a checkpoint without)."""
        if self.delays is None:
            await trio.lowlevel.checkpoint()
            return read(*args)
        got = read(*args)
        await trio.sleep(self.delays())
        return got

    async def read_tombs_async(self, queue: str, index: int) -> list[tuple[str, float]]:
        return await self._read(self.read_tombs, queue, index)

    async def dedup_keys_async(self, after: int,
                               limit: int) -> list[tuple[int, str, str, float]]:
        return await self._read(self.dedup_keys, after, limit)

    async def read_ready_async(self, queue: str, index: int, after: tuple[int, int],
                               limit: int) -> list[Message]:
        return await self._read(self.read_ready, queue, index, after, limit)

    async def _commit(self, ops: list[Op]) -> None:
        await self._taking_time()
        if self.fail_next:
            self.fail_next = False
            raise OSError("simulated disk failure")
        # Apply to copies so that a failure part-way leaves nothing applied.
        meta, catalog, partitions = dict(self.meta), dict(self.catalog), dict(self.partitions)
        messages, dedup, tombs = dict(self.messages), dict(self.dedup), dict(self.tombstones)
        for kind, p in ops:
            if kind == op.OP_PUT:
                messages[p[0]] = copy.copy(p)
            elif kind == op.OP_UPDATE:
                if p[8] in messages:
                    row = list(messages[p[8]])
                    row[9:12], row[13:18] = p[0:3], p[3:8]
                    messages[p[8]] = tuple(row)
            elif kind == op.OP_DELETE:
                messages.pop(p[0], None)
                tombs[p[1], p[2], p[3]] = p[4]
            elif kind == op.OP_DISCARD:
                messages.pop(p[0], None)
            elif kind == op.OP_TOMBSTONE:
                tombs[p[0], p[1], p[2]] = p[3]
            elif kind == op.OP_TOMBSTONE_PRUNE:
                tombs = {k: at for k, at in tombs.items() if at >= p[0]}
            elif kind == op.OP_FORGET:
                messages = {s: r for s, r in messages.items() if (r[2], r[3]) != (p[0], p[1])}
                tombs = {k: at for k, at in tombs.items() if (k[0], k[1]) != (p[0], p[1])}
            elif kind == op.OP_QUEUE:
                catalog[p[0]] = p[1:]
            elif kind == op.OP_DROP_QUEUE:
                name, upto, at = p
                messages = {s: r for s, r in messages.items()
                            if not (r[2] == name and r[4] <= upto)}
                tombs = {k: t for k, t in tombs.items() if k[0] != name}
                dedup = {k: v for k, v in dedup.items() if k[0] != name}
                inc, options, dropped, _ = catalog.get(name, (0, None, 0, 0.0))
                catalog[name] = (inc, options, max(dropped, upto), at)
            elif kind == op.OP_PARTITION:
                partitions[p[0], p[1]] = p[2:]
            elif kind == op.OP_CATALOG_PRUNE:
                catalog = {n: r for n, r in catalog.items() if not (r[2] >= r[0] and r[3] < p[0])}
                partitions = {k: v for k, v in partitions.items() if k[0] in catalog}
                meta = {k: v for k, v in meta.items() if not k.startswith(op.BOUND_PREFIX)
                        or k[len(op.BOUND_PREFIX):].partition(" ")[2] in catalog}
            elif kind == op.OP_PURGE_DELAYED:
                queue, idx, ready_at, seq, below, at = p
                for s_, r in list(messages.items()):
                    if (r[9] == State.DELAYED and r[2] == queue and r[3] == idx
                            and (r[11] or 0.0, r[0]) > (ready_at, seq) and r[0] < below):
                        del messages[s_]
                        tombs[queue, idx, r[1]] = at
            elif kind == op.OP_PURGE_READY:
                queue, idx, hlc, seq, below, at = p
                for s_, r in list(messages.items()):
                    if (r[9] == State.READY and r[2] == queue and r[3] == idx
                            and (r[5], r[0]) > (hlc, seq) and r[0] < below):
                        del messages[s_]
                        tombs[queue, idx, r[1]] = at
            elif kind == op.OP_DEDUP:
                dedup[p[0], p[1]] = (p[2], p[3])
            elif kind == op.OP_DEDUP_PRUNE:
                dedup = {k: v for k, v in dedup.items() if v[1] >= p[0]}
            elif kind == op.OP_META:
                meta[p[0]] = p[1]
            else:
                raise ValueError(f"unknown op kind {kind}")
        self.meta, self.catalog, self.partitions = meta, catalog, partitions
        self.messages, self.dedup, self.tombstones = messages, dedup, tombs

    def statistics(self) -> StoreStatistics:
        return StoreStatistics(None, 0, self.commits, self.ops_committed, self.failed_commits,
                               self.commit_seconds)
