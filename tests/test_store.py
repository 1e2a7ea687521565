"""SQLiteStore against a real file and a real writer process."""

from __future__ import annotations

import os
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio
from trio.testing import MockClock

from meshq.errors import Timeout
from meshq.model import Message
from meshq.states import State
from meshq.store import OP_META, OP_PUT, SQLiteStore, StoreError, bound_key
from meshq.store._ops import (
    OP_CATALOG_PRUNE,
    OP_DEDUP,
    OP_DEDUP_PRUNE,
    OP_DISCARD,
    OP_DROP_QUEUE,
    OP_PURGE_DELAYED,
    OP_PURGE_READY,
    OP_QUEUE,
)
from meshq.store.base import delete_op, put_op, update_op
from meshq.store.memory import MemoryStore
from meshq.store.sqlite import WriterDied


def message(seq: int, body: bytes = b"b") -> Message:
    return Message(seq, f"{seq:016x}-n1", "q", body, {"h": seq}, seq, "n1")


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SQLiteStore]:
    s = SQLiteStore(tmp_path / "meshq.db")
    async with trio.open_nursery() as nursery:
        await nursery.start(s.run)
        yield s
        nursery.cancel_scope.cancel()


async def test_committed_ops_are_loaded_back(store: SQLiteStore) -> None:
    msgs = [message(i) for i in range(1, 201)]
    for m in msgs:
        store.stage(put_op(m))
    msgs[0].state, msgs[0].delivery_count = State.LEASED, 1
    store.stage(update_op(msgs[0]))
    msgs[0].delivery_count = 2  # two updates of one row in one batch: the last wins
    store.stage(update_op(msgs[0]))
    for m in msgs[100:]:
        store.stage(delete_op(m, 5.0))
    await store.stage((OP_META, ("hlc", 42))).wait()
    snap = store.load()
    assert [m.seq for m in snap.messages] == list(range(1, 101))
    first = snap.messages[0]
    assert (first.state, first.delivery_count, first.headers) == (State.LEASED, 2, {"h": 1})
    assert snap.meta["hlc"] == "42"
    assert len(snap.tombstones) == 100 and snap.tombstones[0][1:] == (0, msgs[100].id, 5.0)


async def test_a_discarded_message_goes_without_a_tombstone(store: SQLiteStore) -> None:
    """OP_DISCARD (a fifo send its write quorum did not confirm, taken back): the row goes
    and nothing says it was there; in the simulation's store too."""

    memory = MemoryStore()
    async with trio.open_nursery() as nursery:
        await nursery.start(memory.run)
        for s in (store, memory):
            for seq in (1, 2):
                s.stage(put_op(message(seq)))
            await s.stage((OP_DISCARD, (1,))).wait()
            snap = s.load()
            assert [m.seq for m in snap.messages] == [2]
            assert not snap.tombstones
        nursery.cancel_scope.cancel()


async def test_dedup_entries_keep_their_order_with_what_else_touches_their_table(
        store: SQLiteStore) -> None:
    """A send stages a message and its dedup entry in turn; the writer groups the entries
    into multi-row statements, but never across a prune (or a queue drop)."""
    for i in range(1, 61):
        store.stage(put_op(message(i)))
        store.stage((OP_DEDUP, ("q", f"d{i}", f"m{i}", 5.0 if i % 2 else 100.0)))
    store.stage((OP_DEDUP, ("q", "d2", "m2-again", 100.0)))  # the same key: the last wins
    store.stage((OP_DEDUP_PRUNE, (10.0,)))  # the odd ones expired
    store.stage((OP_DEDUP, ("q", "d1", "m1-after-prune", 8.0)))  # staged after: stays
    store.stage((OP_DEDUP, ("gone", "x", "m", 100.0)))
    await store.stage((OP_DROP_QUEUE, ("gone", 1, 1.0))).wait()
    snap = store.load()
    assert len(snap.messages) == 60
    dedup = {(q, d): (mid, exp) for q, d, mid, exp in snap.dedup}
    assert dedup[("q", "d1")] == ("m1-after-prune", 8.0)
    assert dedup[("q", "d2")] == ("m2-again", 100.0)
    assert set(dedup) == {("q", "d1")} | {("q", f"d{i}") for i in range(2, 61, 2)}


async def test_a_failed_batch_writes_nothing_and_the_store_goes_on(store: SQLiteStore) -> None:
    bad = store.stage((OP_PUT, (1, "x", None, 1, "n1", b"", None, 0, 0, 0.0, None, None)))
    store.stage(put_op(message(2)))  # same batch as the bad op: rolled back with it
    with pytest.raises(StoreError):
        await bad.wait()
    later = store.stage(put_op(message(3)))
    try:  # sent before the daemon saw the failure, it may be refused too, never half-done
        await later.wait()
    except StoreError as exc:
        assert "earlier batch failed" in str(exc)
        await store.stage(put_op(message(3))).wait()
    assert [m.seq for m in store.load().messages] == [3]
    assert store.statistics().failed_commits >= 1


async def test_ship_now_hands_a_small_batch_to_the_idle_writer_at_once(
        store: SQLiteStore) -> None:
    """After a request, a small batch goes to the idle writer from the caller, without a
    turn of the store's task; a big one, or one while another commits, waits for it."""
    first = store.stage(put_op(message(1)))
    store.ship_now()
    assert list(store._inflight) == [first]  # taken, with no checkpoint in between
    second = store.stage(put_op(message(2)))
    store.ship_now()  # the writer is busy with the first: this one waits its turn
    assert list(store._inflight) == [first] and store.current_batch() is second
    await second.wait()
    assert first.done and first.error is None
    big = store.stage(put_op(message(3, b"x" * 8192)))
    store.ship_now()  # over PIPE_BUF: left to the store's task
    assert not store._inflight and store.current_batch() is big
    await big.wait()
    assert [m.seq for m in store.load().messages] == [1, 2, 3]


async def test_a_dead_writer_stops_the_store(tmp_path: Path) -> None:
    s = SQLiteStore(tmp_path / "meshq.db")
    outcome: list[BaseException] = []
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(s.run)
            await s.stage(put_op(message(1))).wait()
            assert s._proc is not None
            os.kill(s._proc.pid, signal.SIGKILL)
            pending = s.stage(put_op(message(2)))
            with pytest.raises((Timeout, StoreError)):
                await pending.wait()
            await trio.sleep_forever()
    except* WriterDied as group:
        outcome.extend(group.exceptions)
    assert len(outcome) == 1


async def test_batches_are_cut_between_requests_not_inside_one() -> None:
    from meshq.store import MemoryStore
    from meshq.store.base import MAX_BATCH_REQUESTS

    s = MemoryStore()
    batches = []
    for i in range(MAX_BATCH_REQUESTS * 2 + 1):
        s.seal_if_full()  # as the server does before each request
        first = s.stage(put_op(message(2 * i + 1)))
        second = s.stage(put_op(message(2 * i + 2)))  # one request's ops share a batch
        assert first is second
        if not batches or batches[-1] is not first:
            batches.append(first)
    assert len(batches) == 3
    async with trio.open_nursery() as nursery:
        await nursery.start(s.run)
        await s.flush()
        nursery.cancel_scope.cancel()
    assert all(b.done and b.error is None for b in batches)
    assert sorted(s.messages) == list(range(1, 2 * (MAX_BATCH_REQUESTS * 2 + 1) + 1))


async def test_batches_commit_in_the_order_they_were_cut() -> None:
    from meshq.store import MemoryStore
    from meshq.store.base import MAX_BATCH_REQUESTS

    s = MemoryStore()
    done: list[int] = []
    async with trio.open_nursery() as nursery:
        await nursery.start(s.run)  # the writer waits, idle
        for i in range(MAX_BATCH_REQUESTS + 50):  # one burst: a batch is sealed meanwhile
            s.seal_if_full()
            s.stage(put_op(message(i + 1))).add_callback(
                lambda err, i=i: done.append(i) if err is None else None)
        await s.flush()
        nursery.cancel_scope.cancel()
    assert done == sorted(done) and len(done) == MAX_BATCH_REQUESTS + 50


async def test_a_memory_store_with_delays_reads_as_of_its_start_and_takes_time(
        autojump_clock: MockClock) -> None:
    """The simulation's store: as SQLiteStore's reads in a worker thread, a read takes
    time, and a commit that lands meanwhile is not in what it returns."""
    from meshq.store import MemoryStore

    delays = iter([0.001, 0.05, 0.001])  # the first commit, the read, the second commit
    s = MemoryStore(delays=lambda: next(delays))
    committed: list[float] = []

    async def commit_meanwhile() -> None:
        s.stage(delete_op(message(2), 6.0))
        await s.flush()
        committed.append(trio.current_time())

    async with trio.open_nursery() as nursery:
        await nursery.start(s.run)
        s.stage(delete_op(message(1), 5.0))
        await s.flush()
        began = trio.current_time()
        nursery.start_soon(commit_meanwhile)
        got = await s.read_tombs_async("q", 0)
        took = trio.current_time() - began
        nursery.cancel_scope.cancel()
    assert committed and committed[0] - began < took  # it landed during the read ...
    assert got == [(message(1).id, 5.0)]  # ... and is not in it
    assert took >= 0.05
    assert s.read_tombs("q", 0) == [(message(1).id, 5.0), (message(2).id, 6.0)]


async def _forget_a_dropped_queue(s: SQLiteStore | MemoryStore) -> dict[str, str]:
    """Two fifo queues with closed bounds; one dropped, then the catalog pruned past it."""
    for name in ("gone q", "kept"):
        s.stage((OP_QUEUE, (name, 1, None, 0, 0.0)))
        for index in (0, 1):
            s.stage((OP_META, (bound_key(name, index), 77)))
    s.stage((OP_META, ("hlc", 42)))
    s.stage((OP_DROP_QUEUE, ("gone q", 1, 5.0)))
    s.stage((OP_CATALOG_PRUNE, (6.0,)))
    await s.flush()
    return {k: str(v) for k, v in s.load().meta.items() if k != "schema_version"}


@pytest.mark.parametrize("kind", ["sqlite", "memory"])
async def test_a_pruned_queue_takes_its_closed_bounds_with_it(tmp_path: Path,
                                                               kind: str) -> None:
    """The fifo closed bounds in meta go with their queue's catalog entry (a queue of the
    same name declared again later starts with none), in the file and in the fake."""
    s = SQLiteStore(tmp_path / "meshq.db") if kind == "sqlite" else MemoryStore()
    async with trio.open_nursery() as nursery:
        await nursery.start(s.run)
        meta = await _forget_a_dropped_queue(s)
        nursery.cancel_scope.cancel()
    assert meta == {"hlc": "42", bound_key("kept", 0): "77", bound_key("kept", 1): "77"}


def test_a_version_1_file_is_migrated(tmp_path: Path) -> None:
    """0.1.0's schema: queues with counters, unpartitioned tombstones."""
    import sqlite3

    import msgpack

    path = tmp_path / "old.db"
    conn = sqlite3.connect(path, isolation_level=None)
    conn.executescript("""
        CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT);
        CREATE TABLE queues (name TEXT PRIMARY KEY, options BLOB, dead_lettered INTEGER,
                             expired INTEGER, dropped INTEGER);
        CREATE TABLE messages (seq INTEGER PRIMARY KEY, id TEXT NOT NULL, queue TEXT NOT NULL,
            hlc INTEGER NOT NULL, node TEXT NOT NULL, body BLOB, headers BLOB,
            state INTEGER NOT NULL, delivery_count INTEGER, ready_at FLOAT, expires_at FLOAT,
            lease_deadline FLOAT);
        CREATE TABLE dedup (queue TEXT, dedup_id TEXT, message_id TEXT, expires_at FLOAT,
                            PRIMARY KEY (queue, dedup_id));
        CREATE TABLE tombstones (queue TEXT, id TEXT, at FLOAT, PRIMARY KEY (queue, id));
        INSERT INTO meta VALUES ('schema_version', '1'), ('hlc', '77');
        INSERT INTO tombstones VALUES ('jobs', 'gone-1', 5.0);
    """)
    conn.execute("INSERT INTO queues VALUES ('jobs', ?, 2, 1, 0)",
                 (msgpack.packb({"replicas": 3}),))
    conn.execute("INSERT INTO messages VALUES (1, 'm-1', 'jobs', 9, 'n1', x'6869', NULL, 0, 0,"
                 " 0.0, NULL, NULL)")
    conn.close()
    snap = SQLiteStore(path).load()
    assert snap.catalog == [("jobs", 1, {"replicas": 3}, 0, 0.0)]
    assert snap.partitions == [("jobs", 0, 0, {"v1": [2, 1, 0]})]
    [m] = snap.messages
    assert (m.id, m.body, m.index, m.inc, m.epoch, m.vn) == ("m-1", b"hi", 0, 1, 0, 0)
    assert snap.tombstones == [("jobs", 0, "gone-1", 5.0)]
    assert snap.meta["schema_version"] == "2" and snap.meta["hlc"] == "77"


def test_a_file_with_the_index_over_every_state_gets_the_partial_ones(tmp_path: Path) -> None:
    """The build before kept one index on (state, queue, idx, hlc, seq): a start replaces
    it with the two partial ones, and the head of the backlog and the leased messages are
    read through them."""
    import sqlite3

    path = tmp_path / "meshq.db"
    SQLiteStore(path)  # (the schema)
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("DROP INDEX messages_ready0")
    conn.execute("DROP INDEX messages_held")
    conn.execute("CREATE INDEX messages_ready ON messages (state, queue, idx, hlc, seq)")
    for seq, state in ((1, State.READY), (2, State.LEASED), (3, State.READY)):
        conn.execute("INSERT INTO messages (seq, id, queue, idx, inc, hlc, node, body, state)"
                     " VALUES (?, ?, 'q', 0, 1, ?, 'n1', x'00', ?)",
                     (seq, f"m{seq}", 10 - seq, int(state)))
    conn.close()
    snap = SQLiteStore(path).load(hot_ready=1)
    conn = sqlite3.connect(path)
    names = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='index'")}
    conn.close()
    assert {"messages_ready0", "messages_held"} <= names and "messages_ready" not in names
    assert sorted(m.id for m in snap.messages) == ["m2", "m3"]  # leased, and the head
    assert snap.cold == {("q", 0): (1, (7, 3))}


async def test_the_backlog_is_read_from_disk_in_order(store: SQLiteStore) -> None:
    """load(hot_ready) keeps only the head of each partition's READY messages; read_ready
    pages in the rest in (hlc, seq) order; OP_PURGE_READY drops what is past a point."""
    msgs = [message(i) for i in range(1, 101)]
    for m in reversed(msgs):  # (stored out of order: the order is theirs, not the rows')
        store.stage(put_op(m))
    msgs[0].state = State.LEASED
    store.stage(update_op(msgs[0]))
    other = Message(500, "other-n1", "q", b"o", {}, 3, "n1", index=1)
    await store.stage(put_op(other)).wait()
    snap = store.load(10)
    assert [m.seq for m in snap.messages] == [1, *range(2, 12), 500]
    assert snap.cold == {("q", 0): (89, (11, 11))}
    assert snap.max_seq == 500 and snap.max_hlc == 100
    page = await store.read_ready_async("q", 0, (11, 11), 50)
    assert [m.seq for m in page] == list(range(12, 62))
    assert page[0].body == b"b" and page[0].headers == {"h": 12}
    await store.stage((OP_PURGE_READY, ("q", 0, 61, 61, 100, 7.0))).wait()
    assert [m.seq for m in store.read_ready("q", 0, (61, 61), 50)] == [100]  # (not below)
    snap = store.load()
    assert len(snap.messages) == 63  # the leased one, 2..61, 100 and the other partition's
    assert len(snap.tombstones) == 38 and {t[3] for t in snap.tombstones} == {7.0}


@pytest.mark.parametrize("kind", ["sqlite", "memory"])
async def test_delays_are_read_from_disk_by_when_they_are_due(tmp_path: Path,
                                                              kind: str) -> None:
    """load(hot_ready) keeps only the first DELAYED messages of each partition by due
    time, ``late`` counts the rest; read_delayed pages them in (ready_at, seq) order;
    OP_PURGE_DELAYED drops (tombstoned) those past a point. In the file and the fake."""
    s = SQLiteStore(tmp_path / "meshq.db") if kind == "sqlite" else MemoryStore()
    async with trio.open_nursery() as nursery:
        await nursery.start(s.run)
        msgs = [message(i) for i in range(1, 41)]
        for m in msgs:
            m.state, m.ready_at = State.DELAYED, 1000.0 - m.seq // 2  # (due in reverse)
            s.stage(put_op(m))
        s.stage(put_op(message(50)))  # (READY: not among them)
        await s.flush()
        snap = s.load(10)
        due = sorted(msgs, key=lambda m: (m.ready_at, m.seq))
        assert sorted(m.seq for m in snap.messages) == sorted([m.seq for m in due[:10]] + [50])
        assert snap.late == {("q", 0): (30, (due[9].ready_at, due[9].seq))}
        page = await s.read_delayed_async("q", 0, (due[9].ready_at, due[9].seq), 12)
        assert [m.seq for m in page] == [m.seq for m in due[10:22]]
        assert page[0].state == State.DELAYED and page[0].headers == {"h": page[0].seq}
        key = (due[21].ready_at, due[21].seq)
        s.stage((OP_PURGE_DELAYED, ("q", 0, *key, 5, 7.0)))  # (not seq 5 and up)
        await s.flush()
        left = s.read_delayed("q", 0, key, 100)
        nursery.cancel_scope.cancel()
    assert [m.seq for m in left] == [m.seq for m in due[22:] if m.seq >= 5]
    assert sorted(t[2] for t in s.load().tombstones) == sorted(
        m.id for m in due[22:] if m.seq < 5)


async def test_a_replicated_backlog_is_read_by_keys_id_and_seq_as_the_fake_reads_it(
        store: SQLiteStore) -> None:
    """What replication reads of a partition's cold messages (meshq.broker.backlog):
    scan_ready folds the READY rows after a key, keys only (no body, no headers), up to a
    seq if asked, in (hlc, seq) order; read_ids and read_seqs read whole messages. The
    MemoryStore answers the same."""
    fake = MemoryStore()
    msgs = [message(i, body=b"x" * i) for i in range(1, 1201)]  # (past one IN chunk)
    msgs[4].state = State.LEASED
    for s in (store, fake):
        for m in msgs:
            s.stage(put_op(m))
        batch = s.stage(put_op(Message(5000, "other-n1", "q", b"o", {}, 3, "n1", index=1)))
        if s is fake:
            async with trio.open_nursery() as nursery:
                await nursery.start(fake.run)
                await batch.wait()
                nursery.cancel_scope.cancel()
        else:
            await batch.wait()
    for s in (store, fake):
        keys = await s.scan_ready_async("q", 0, (10, 10), list)
        assert [m.seq for m in keys] == list(range(11, 1201))
        assert {m.body for m in keys} == {b""} and {str(m.headers) for m in keys} == {"{}"}
        assert keys[0].id == msgs[10].id and keys[0].queue == "q" and keys[0].index == 0
        count = await s.scan_ready_async("q", 0, (0, 0), lambda rows: sum(1 for _ in rows), 7)
        assert count == 6  # (up to seq 7; seq 5 is leased)
        wanted = [msgs[4].id, msgs[600].id, "nope", msgs[1100].id]
        got = sorted(await s.read_ids_async("q", 0, wanted), key=lambda m: m.seq)
        assert [(m.seq, m.body, m.headers, m.state) for m in got] == [
            (5, b"x" * 5, {"h": 5}, State.LEASED), (601, b"x" * 601, {"h": 601}, State.READY),
            (1101, b"x" * 1101, {"h": 1101}, State.READY)]
        assert await s.read_ids_async("q", 1, [msgs[0].id]) == []
        got = await s.read_seqs_async([*range(1, 1201, 2), 5000, 9999])
        assert sorted(m.seq for m in got) == [*range(1, 1201, 2), 5000]
