"""Dedup entries past the newest few live in the store only (meshq.broker.dedup): a retry
of an old one still finds its message, and a new id costs no store read."""

from __future__ import annotations

from typing import Any

import pytest
import trio
from trio.testing import MockClock, wait_all_tasks_blocked

from meshq.broker import Broker, dedup
from meshq.broker.dedup import DedupIndex
from meshq.store import Batch
from tests.test_broker import Env


class Table:
    """The store's dedup table, as DedupIndex reads it: counting the reads."""

    def __init__(self) -> None:
        self.rows: dict[tuple[str, str], tuple[str, float]] = {}
        self.reads = 0

    def read(self, queue: str, dedup_id: str) -> tuple[str, float] | None:
        self.reads += 1
        return self.rows.get((queue, dedup_id))


def committed() -> Batch:
    b = Batch()
    b.complete(None)
    return b


def put(index: DedupIndex, table: Table, key: tuple[str, str], mid: str, expires: float,
        batch: Any = None) -> None:
    table.rows[key] = (mid, expires)
    index[key] = (mid, expires, batch)


def test_old_entries_are_read_from_the_store_and_new_ids_are_not() -> None:
    table = Table()
    index = DedupIndex(table.read, window=300.0, clock=lambda: 0.0, keep=4)
    for i in range(20):
        put(index, table, ("q", f"d{i}"), f"m{i}", 300.0 + i)
    assert len(index.recent) == 4 and len(index) == 20
    assert index.get(("q", "d19"), 1.0) == ("m19", 319.0, None) and table.reads == 0
    assert index.get(("q", "d0"), 1.0) == ("m0", 300.0, None) and table.reads == 1
    assert index.get(("q", "new"), 1.0) is None and table.reads == 1  # no read for it
    assert index.get(("q", "d0"), 301.0) is None  # expired


def test_an_entry_not_yet_durable_stays_in_memory() -> None:
    table = Table()
    index = DedupIndex(table.read, window=300.0, clock=lambda: 0.0, keep=2)
    open_batch = Batch()
    put(index, table, ("q", "first"), "m0", 300.0, open_batch)
    for i in range(5):
        put(index, table, ("q", f"d{i}"), f"m{i}", 300.0, committed())
    assert ("q", "first") in index.recent and len(index.recent) == 6
    open_batch.complete(None)
    index.settle(("q", "first"), open_batch)
    put(index, table, ("q", "last"), "m9", 300.0)
    assert len(index.recent) == 2 and ("q", "first") not in index.recent
    assert index.get(("q", "first"), 1.0) == ("m0", 300.0, None)


def test_a_filter_forgets_keys_only_after_their_window(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A filter takes keys until it is full (a new one opens) or a window old; it is
    dropped a window after it stopped taking keys, when each of them has expired."""
    monkeypatch.setattr(dedup, "FILTER_KEYS", 2)
    now = [0.0]
    table = Table()
    index = DedupIndex(table.read, window=300.0, clock=lambda: now[0], keep=1)
    for i, key in enumerate("abcd"):  # a, b, c spilled: two in the first filter, one next
        put(index, table, ("q", key), f"m{key}", 300.0 + i)
    assert [f.count for f in index._filters] == [2, 1]
    now[0] = 250.0
    index.prune(now[0])  # the first filter closed at the third key (t=0): kept till 300
    assert index.get(("q", "a"), now[0]) == ("ma", 300.0, None) and table.reads == 1
    now[0] = 301.0
    index.prune(now[0])  # gone; the second, a window old, is closed now (kept till 601)
    assert [f.count for f in index._filters] == [1]
    assert index.get(("q", "a"), now[0]) is None and table.reads == 1  # (no read)
    assert index.get(("q", "c"), now[0]) == ("mc", 302.0, None)
    index.prune(601.0)
    assert index._filters == []


async def test_a_retry_finds_its_message_after_many_sends_and_a_restart(
        env: Env, autojump_clock: MockClock) -> None:
    env.broker._dedup.keep = 4
    await env.declare()
    ids = [(await env.send({"body": b"x", "dedup_id": f"d{i}"}))[0] for i in range(30)]
    assert len(env.broker._dedup.recent) == 4
    assert (await env.send({"body": b"x", "dedup_id": "d0"}))[0] == ids[0]
    assert env.counts()[0] == 30  # no second copy
    await env.store.flush()
    env._scope.cancel()
    broker = Broker(env.store, env.clock, node_id="n1")
    broker.restore(env.store.load(8))  # the daemon's start: dedup entries left on disk
    await env.start(broker)
    assert (await env.send({"body": b"x", "dedup_id": "d1"}))[0] == ids[1]
    await wait_all_tasks_blocked()  # the keys are in the filter now
    assert not broker._dedup._unloaded
    reads = broker._dedup.reads
    assert (await env.send({"body": b"x", "dedup_id": "d2"}))[0] == ids[2]
    fresh = await env.send({"body": b"x", "dedup_id": "new"})
    assert fresh[0] not in ids and broker._dedup.reads == reads + 1  # (d2's read only)
    assert env.counts()[0] == 31
    await trio.sleep(env.broker.limits.dedup_window + 61)  # pruned, here and in the store
    await env.store.flush()
    assert list(env.store.dedup) == []
