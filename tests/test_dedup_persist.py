"""The dedup filters outlive a clean stop (meshq.broker.dedup, meshq.store.sqlite): saved
when nothing more is written, loaded at the next start instead of listing the dedup table,
so that a new id costs no store read at once; a file that may be stale (a crash since, a
token that does not match) or corrupt is not trusted, and the filters are rebuilt."""

from __future__ import annotations

import logging
import shutil
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import trio

from meshq.broker import Broker, dedup
from meshq.broker.backlog import HOT_READY
from meshq.broker.dedup import DedupIndex
from meshq.clock import SystemClock
from meshq.store import SQLiteStore
from meshq.testing import DaemonProcess
from tests.test_dedup import Table, put

KEEP = 4  # dedup entries kept in memory by the brokers here


class Spy:
    """The store's dedup lookup, counting the reads."""

    def __init__(self, store: SQLiteStore) -> None:
        self.read = store.read_dedup
        self.reads = 0

    def __call__(self, queue: str, dedup_id: str) -> tuple[str, float] | None:
        self.reads += 1
        return self.read(queue, dedup_id)


Work = Callable[[Broker, Spy], Awaitable[Any]]


async def run_once(path: Path, work: Work, *, clean: bool = True) -> Any:
    """One life of a node over the store at ``path``, as meshqd's: load, restore, run,
    ``work``, commit what is staged and stop; then, if ``clean``, save the filters as
    meshqd does after a clean stop (else as after a SIGKILL once the commits are in)."""
    store = SQLiteStore(path)
    spy = Spy(store)
    store.read_dedup = spy  # type: ignore[method-assign]
    broker = Broker(store, SystemClock(), node_id="n1")
    broker._dedup.keep = KEEP
    broker.restore(store.load(HOT_READY))
    async with trio.open_nursery() as nursery:
        await nursery.start(store.run)
        await nursery.start(broker.run)
        result = await work(broker, spy)
        await store.flush()
        nursery.cancel_scope.cancel()
    if clean:
        filters = broker.dedup_filters()
        assert filters is not None
        store.save_dedup_filters(filters)
    store.close()
    return result


async def send(broker: Broker, *dedup_ids: str) -> list[str]:
    return await broker.send("q", [{"body": b"x", "dedup_id": d} for d in dedup_ids]).wait()


async def test_a_clean_restart_loads_the_filters_and_a_new_id_costs_no_read(
        tmp_path: Path) -> None:
    path = tmp_path / "meshq.db"

    async def first(broker: Broker, spy: Spy) -> list[str]:
        await broker.declare("q", {}).wait()
        return await send(broker, *(f"d{i}" for i in range(30)))

    ids = await run_once(path, first)

    async def second(broker: Broker, spy: Spy) -> None:
        assert not broker._dedup._unloaded  # (nothing to list from the table)
        (fresh,) = await send(broker, "new")
        assert fresh not in ids and spy.reads == 0
        # (d29 was in memory at the stop: in the saved filters too)
        assert await send(broker, "d0", "d29") == [ids[0], ids[29]] and spy.reads == 2
        assert broker.stats("q")[0]["ready"] == 31

    await run_once(path, second)


async def test_a_crash_after_a_clean_restart_rebuilds_the_filters(tmp_path: Path) -> None:
    """The filters loaded at a start do not know what is written after it: a crash then
    must not leave them to the next start."""
    path = tmp_path / "meshq.db"

    async def first(broker: Broker, spy: Spy) -> list[str]:
        await broker.declare("q", {}).wait()
        return await send(broker, *(f"d{i}" for i in range(30)))

    await run_once(path, first)

    async def second(broker: Broker, spy: Spy) -> list[str]:
        assert not broker._dedup._unloaded
        return await send(broker, *(f"e{i}" for i in range(30)))

    ids = await run_once(path, second, clean=False)  # (no save: a crash)
    assert not await trio.Path(f"{path}.dedup-filters").exists()

    async def third(broker: Broker, spy: Spy) -> None:
        assert broker._dedup._unloaded  # listing the table again
        assert await send(broker, "e0") == ids[:1]
        assert broker.stats("q")[0]["ready"] == 60

    await run_once(path, third)


async def test_no_saved_filters_rebuilds_them(tmp_path: Path) -> None:
    path = tmp_path / "meshq.db"

    async def first(broker: Broker, spy: Spy) -> list[str]:
        await broker.declare("q", {}).wait()
        return await send(broker, *(f"d{i}" for i in range(30)))

    ids = await run_once(path, first, clean=False)

    async def second(broker: Broker, spy: Spy) -> None:
        assert broker._dedup._unloaded
        assert await send(broker, "d0") == ids[:1]

    await run_once(path, second)


def saved(path: Path, filters: bytes) -> None:
    store = SQLiteStore(path)
    store.save_dedup_filters(filters)
    store.close()


def loaded(path: Path) -> bytes | None:
    store = SQLiteStore(path)
    try:
        return store.load(HOT_READY).dedup_filters
    finally:
        store.close()


def test_saved_filters_are_given_back_once(tmp_path: Path) -> None:
    path = tmp_path / "meshq.db"
    saved(path, b"filters")
    assert loaded(path) == b"filters"
    assert not Path(f"{path}.dedup-filters").exists()
    assert loaded(path) is None


def test_filters_saved_before_the_last_stop_are_not_trusted(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A file whose token is not the store's (a crash between writing it and the token,
    or a file from an earlier stop) is ignored, with one log line."""
    path = tmp_path / "meshq.db"
    file = Path(f"{path}.dedup-filters")
    saved(path, b"old")
    shutil.copy(file, tmp_path / "old")
    assert loaded(path) == b"old"
    saved(path, b"new")
    shutil.copy(tmp_path / "old", file)
    with caplog.at_level(logging.WARNING, logger="meshq"):
        assert loaded(path) is None
    assert [r.message.count("not saved at the last stop") for r in caplog.records] == [1]
    assert not file.exists()


def test_a_corrupt_filters_file_is_ignored(tmp_path: Path,
                                           caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "meshq.db"
    file = Path(f"{path}.dedup-filters")
    saved(path, bytes(1000))
    data = bytearray(file.read_bytes())
    data[500] ^= 1
    file.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="meshq"):
        assert loaded(path) is None
    assert [r.message.count("(truncated or corrupt)") for r in caplog.records] == [1]
    assert not file.exists()


def test_filters_that_cannot_be_saved_are_logged_not_raised(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "meshq.db"
    Path(f"{path}.dedup-filters.tmp").mkdir()  # (the file cannot be written)
    with caplog.at_level(logging.WARNING, logger="meshq"):
        saved(path, b"filters")
    assert "could not save the dedup filters" in caplog.text
    assert loaded(path) is None


async def test_a_store_run_without_a_load_deletes_the_saved_filters(tmp_path: Path) -> None:
    path = tmp_path / "meshq.db"
    saved(path, b"filters")
    store = SQLiteStore(path)
    async with trio.open_nursery() as nursery:
        await nursery.start(store.run)
        assert not await trio.Path(f"{path}.dedup-filters").exists()
        nursery.cancel_scope.cancel()
    store.close()
    assert loaded(path) is None


def test_saved_filters_keep_their_times_and_counts_and_what_memory_held(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dedup, "FILTER_KEYS", 2)
    now = [0.0]
    table = Table()
    index = DedupIndex(table.read, window=300.0, clock=lambda: now[0], keep=1)
    for i, key in enumerate("abcd"):  # a, b in the first filter (closed at t=3), c next
        now[0] = float(i)
        put(index, table, ("q", key), f"m{key}", 300.0 + i)
    data = index.dump(10.0)  # d, in memory, goes in the open filter
    assert data is not None
    again = DedupIndex(table.read, window=300.0, clock=lambda: now[0], keep=1)
    again.restore([], 10.0, on_disk=True, filters=data)
    assert not again._unloaded
    assert [(f.opened_at, f.closed_at, f.count) for f in again._filters] == [
        (1.0, 3.0, 2), (3.0, None, 2)]
    assert [f.bits for f in again._filters[:1]] == [index._filters[0].bits]
    for key in "abcd":
        assert again.get(("q", key), 10.0) == (f"m{key}", 300.0 + "abcd".index(key), None)
    assert again.get(("q", "new"), 10.0) is None and table.reads == 4  # (no read for it)
    again.prune(304.0)  # as the first index would: the first filter gone, the second closed
    assert [(f.opened_at, f.closed_at) for f in again._filters] == [(3.0, 304.0)]
    assert index._filters[-1].count == 1  # (dump left the running index as it was)


def test_filters_written_for_another_window_are_rebuilt(
        caplog: pytest.LogCaptureFixture) -> None:
    table = Table()
    index = DedupIndex(table.read, window=300.0, clock=lambda: 0.0, keep=1)
    for key in "abc":
        put(index, table, ("q", key), "m", 300.0)
    data = index.dump(0.0)
    assert data is not None
    other = DedupIndex(table.read, window=60.0, clock=lambda: 0.0, keep=1)
    with caplog.at_level(logging.WARNING, logger="meshq"):
        other.restore([], 0.0, on_disk=True, filters=data)
    assert other._unloaded and "300 s window, not 60 s" in caplog.text
    broken = DedupIndex(table.read, window=300.0, clock=lambda: 0.0, keep=1)
    broken.restore([], 0.0, on_disk=True, filters=data[:-1])
    assert broken._unloaded


def test_meshqd_saves_its_filters_at_a_clean_stop_and_trusts_them_once(
        tmp_path: Path) -> None:
    """Against a real meshqd: a retry of an old id is found after a clean restart (the
    saved filters hash the same in a new process), after a SIGKILL that follows it, and
    after a restart whose saved file is corrupt."""
    d = DaemonProcess(tmp_path / "d")
    file = tmp_path / "d" / "meshq.db.dedup-filters"
    n = dedup.KEEP + dedup.KEEP // 8 + 500  # past what memory keeps: spilled to the filter

    def send_all(c: Any, prefix: str) -> list[str]:
        ids: list[str] = []
        for start in range(0, n, 500):
            ids += c.send_batch("q", [{"body": b"x", "dedup_id": f"{prefix}{i}"}
                                      for i in range(start, min(n, start + 500))])
        return ids

    d.start()
    try:
        with d.client() as c:
            c.declare("q")
            old = send_all(c, "d")
        assert d.stop() == 0 and file.exists()
        d.start()
        assert not file.exists()  # (taken at the start: a crash now leaves none)
        with d.client() as c:
            assert c.send("q", b"x", dedup_id="d0") == old[0]
            new = send_all(c, "e")
        d.kill()
        d.start()
        with d.client() as c:
            assert c.send("q", b"x", dedup_id="e0") == new[0]
            assert c.send("q", b"x", dedup_id="d1") == old[1]
        assert d.stop() == 0 and file.exists()
        data = bytearray(file.read_bytes())
        data[len(data) // 2] ^= 0xFF
        file.write_bytes(bytes(data))
        d.start()
        with d.client() as c:
            assert c.send("q", b"x", dedup_id="d2") == old[2]
            assert c.stats("q")[0]["ready"] == 2 * n
        assert d.log_tail(100_000).count("ignoring the saved dedup filters") == 1
    finally:
        d.kill()
