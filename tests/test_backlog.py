"""The backlog on disk (meshq.broker.backlog), on a Broker over a MemoryStore in virtual
time: past ``hot_ready`` READY messages a partition leaves the newer ones in the store,
pages them in order as consumers take the head, and a restart reads only the head."""

from __future__ import annotations

from typing import Any

import trio
from trio.testing import MockClock, wait_all_tasks_blocked

from meshq.broker import Broker
from meshq.broker.digests import walk
from meshq.broker.queue import Queue
from meshq.broker.replica import record_of
from meshq.cluster import repair
from meshq.cluster.changes import Decl, Drop, Progress, Put, Step, Tomb
from meshq.cluster.lattice import BUCKETS
from meshq.model import Message
from meshq.states import State
from tests.test_broker import Conn, Env

HOT = 8


def small(broker: Broker) -> Broker:
    broker.backlog.hot_ready, broker.backlog.refill_below = HOT, 3
    broker.backlog.hot_delayed = HOT
    return broker


def part(env: Env, name: str = "q") -> Queue:
    return env.broker.queues[name][0]


async def fill(env: Env, n: int, queue: str = "q", **extra: Any) -> list[str]:
    ids: list[str] = []
    for start in range(0, n, 10):  # several commits, as producers would
        ids += await env.send(*({"body": f"m{i}".encode(), **extra}
                                for i in range(start, min(n, start + 10))), queue=queue)
    return ids


async def filled(env: Env, n: int, **options: Any) -> list[str]:
    """A queue "q" with ``options`` on a broker that keeps HOT READY messages in memory,
    with ``n`` messages sent to it."""
    small(env.broker)
    await env.declare(**options)
    return await fill(env, n)


async def drain(env: Env, conn: Conn, n: int, queue: str = "q") -> list[str]:
    """Receive ``n`` deliveries, acking each; their ids in delivery order."""
    got = []
    for _ in range(n):
        d = await conn.next()
        got.append(d.id)
        await conn.ack([d.id], queue)
    return got


async def restart(env: Env, hot_ready: int = HOT) -> Broker:
    await env.store.flush()
    env._scope.cancel()
    broker = small(Broker(env.store, env.clock, node_id="n1"))
    broker.restore(env.store.load(hot_ready))
    await env.start(broker)
    return broker


async def test_past_hot_ready_messages_stay_on_disk_and_come_in_order(
        env: Env, autojump_clock: MockClock) -> None:
    ids = await filled(env, 50)
    q = part(env)
    assert env.counts() == (50, 0, 0)  # counted, wherever they are
    assert len(q.messages) == HOT and q.cold == 50 - HOT  # only the head in memory
    assert len(env.store.messages) == 50  # every one durable
    conn = Conn(env)
    conn.consume(prefetch=5)
    assert await drain(env, conn, 50) == ids  # each once, in send order
    await env.store.flush()
    assert env.counts() == (0, 0, 0) and q.cold == 0 and not q.messages
    assert env.store.messages == {}
    assert env.broker.backlog.paged_in == 50 - HOT


async def test_sends_while_paging_keep_their_order(env: Env, autojump_clock: MockClock) -> None:
    ids = await filled(env, 30)
    conn = Conn(env)
    conn.consume(prefetch=2)
    got = await drain(env, conn, 10)
    ids += await fill(env, 30)  # behind the cold ones: on disk too
    got += await drain(env, conn, 50)
    assert got == ids
    assert part(env).cold == 0 and env.counts() == (0, 0, 0)


async def test_a_restart_reads_only_the_head(env: Env, autojump_clock: MockClock) -> None:
    ids = await filled(env, 40)
    broker = await restart(env)
    q = broker.queues["q"][0]
    assert len(q.messages) == HOT and q.cold == 40 - HOT
    assert env.counts() == (40, 0, 0)
    ids += await fill(env, 5)  # new seqs: above the cold ones', which they must not replace
    assert len(env.store.messages) == 45
    conn = Conn(env)
    conn.consume(prefetch=3)
    assert await drain(env, conn, 45) == ids


async def test_leases_and_delays_stay_in_memory_across_a_restart(
        env: Env, autojump_clock: MockClock) -> None:
    ids = await filled(env, 20, visibility_timeout=5)
    late = (await env.send({"body": b"later", "delay": 30}))[0]
    conn = Conn(env)
    conn.consume(prefetch=2)
    first = [(await conn.next()).id, (await conn.next()).id]  # leased, never acked
    assert first == ids[:2]
    broker = await restart(env)
    q = broker.queues["q"][0]
    assert q.messages[late].state == State.DELAYED
    # Read back though past the head's size (leased): the leases of the process gone
    # ended at the start, so they are ready again, counted once delivered.
    assert all(q.messages[i].delivery_count == 1 for i in first)
    conn2 = Conn(env)
    conn2.consume(prefetch=50)
    got = []
    for _ in range(21):
        got.append(await conn2.next())
        await conn2.ack([got[-1].id])
    assert [d.id for d in got] == [*ids, late]
    assert [d.count for d in got[:3]] == [2, 2, 1]


async def test_purge_drops_what_is_on_disk(env: Env, autojump_clock: MockClock) -> None:
    await filled(env, 50)
    assert await env.broker.purge("q").wait() == 50
    await env.store.flush()
    assert env.counts() == (0, 0, 0) and env.store.messages == {}
    q = part(env)
    assert q.cold == 0 and not q.messages
    fresh = await fill(env, 12)
    conn = Conn(env)
    conn.consume()
    assert await drain(env, conn, 12) == fresh
    broker = await restart(env)  # nothing purged comes back
    assert broker.stats("q")[0]["ready"] == 0


async def test_deleting_the_queue_deletes_what_is_on_disk(
        env: Env, autojump_clock: MockClock) -> None:
    await filled(env, 30)
    assert await env.broker.delete_queue("q").wait() == 30
    await env.store.flush()
    assert env.store.messages == {}
    await env.declare()
    assert env.counts() == (0, 0, 0)


async def test_a_cold_message_past_its_ttl_expires_when_paged_in(
        env: Env, autojump_clock: MockClock) -> None:
    small(env.broker)
    await env.declare(message_ttl=10, dead_letter_queue="dlq")
    await env.declare("dlq")
    await fill(env, 20)
    await trio.sleep(11)
    conn = Conn(env)
    conn.consume()
    await wait_all_tasks_blocked()  # (the pages the consumer causes read)
    await env.store.flush()
    assert conn.got == []
    assert env.counts() == (0, 0, 0)
    assert env.stats()["expired"] == 20 and env.stats("dlq")["ready"] == 20


async def test_max_length_drops_the_oldest_even_on_disk(
        env: Env, autojump_clock: MockClock) -> None:
    ids = await filled(env, 40, max_length=12)
    await wait_all_tasks_blocked()  # (pages read and dropped, down to the bound)
    assert env.counts()[0] == 12
    conn = Conn(env)
    conn.consume()
    assert await drain(env, conn, 12) == ids[-12:]


async def test_a_merge_into_a_cold_message_pages_that_one_in_and_order_holds(
        env: Env, autojump_clock: MockClock) -> None:
    ids = await filled(env, 30)
    q = part(env)
    assert q.cold
    # A copy pushed by another node (a hand-off): its record and ours must meet in memory.
    known = Message(0, ids[-1], "q", b"m29", {}, int(ids[-1].split("-")[0], 16), "n1",
                    index=0, inc=q.inc, epoch=q.epoch, vn=1)
    env.broker.replica.merge([Put(record_of(known))])
    # That one message is paged in (no second copy of it), not the whole backlog.
    assert q.cold == 30 - HOT - 1 and len(q.messages) == HOT + 1
    await env.store.flush()
    assert len(env.store.messages) == 30
    conn = Conn(env)
    conn.consume()
    assert await drain(env, conn, 30) == ids


async def test_tombstones_past_the_newest_stay_on_disk_and_still_refuse_a_stale_copy(
        env: Env, autojump_clock: MockClock) -> None:
    env.broker.backlog.tombs_kept = 8
    ids = await filled(env, 30)
    conn = Conn(env)
    conn.consume()
    await drain(env, conn, 30)
    q = part(env)
    assert len(q.tombs) <= 8 and q.tombs_on_disk
    await env.store.flush()
    # A stale copy of the first (acked) message, pushed by another node: its tombstone,
    # read back from the store, wins; the message does not come back.
    stale = Message(0, ids[0], "q", b"m0", {}, int(ids[0].split("-")[0], 16), "n1",
                    index=0, inc=q.inc, epoch=q.epoch, vn=1)
    merged = env.broker.replica.merge([Put(record_of(stale))])
    assert [t.id for t in merged.tombs] == [ids[0]]
    assert env.counts() == (0, 0, 0) and not q.tombs_on_disk and len(q.tombs) == 30


async def test_a_purge_leaves_a_send_staged_before_it_and_committed_after(
        env: Env, autojump_clock: MockClock) -> None:
    await filled(env, 30)
    late = env.broker.send("q", [{"body": b"late"}])  # staged, not yet committed
    assert await env.broker.purge("q").wait() == 30
    kept = await late.wait()
    await env.store.flush()
    assert env.counts() == (1, 0, 0) and len(env.store.messages) == 1
    conn = Conn(env)
    conn.consume()
    assert await drain(env, conn, 1) == kept


async def test_a_closed_timestamp_stays_below_what_is_on_disk_only(
        env: Env, autojump_clock: MockClock) -> None:
    """(meshq.broker.closed) A fifo merge must not pass a partition's READY messages that
    are in the store only: the closed timestamp stays at or below the first of them."""
    await filled(env, 30, ordering="fifo")
    q = part(env)
    head = q.head_ready()
    assert q.cold > 0 and head is not None
    assert env.broker.ready_floor(q) == head.hlc <= q.cold_after[0]
    q._ready.clear()  # as if those in memory were leased: only the cold ones are READY
    assert env.broker.ready_floor(q) == q.cold_after[0]
    assert env.broker.closed_of(q, []) <= q.cold_after[0]
    assert env.broker.closed_of(q, [], ready=False) > q.cold_after[0]


async def test_a_replicated_partitions_digest_counts_what_is_on_disk_only(
        env: Env, autojump_clock: MockClock) -> None:
    """The digest sums of a partition whose dispatcher pages (meshq.broker.digests) cover
    its cold messages: kept as they stay cold and are paged in, unknown after a restart
    until a digest counts them from the store, and always what a walk of memory and store
    makes (the digest checks it: check_digests)."""
    def replicated(broker: Broker) -> Broker:
        broker.hand_over_early = lambda q: False  # (as a dispatcher of several copies)
        broker.check_digests = True
        return small(broker)

    replicated(env.broker)
    await env.declare()
    await fill(env, 50)
    q = part(env)

    def whole(broker: Broker, q: Queue) -> list[int]:
        return walk([*q.messages.values(), *broker.backlog.cold_messages(q)])

    assert q.cold == 50 - HOT and q.sums.cold is not None
    assert await repair.digest(env.broker, q) == whole(env.broker, q)
    broker = replicated(await restart(env))
    q = part(env)
    assert q.cold == 50 - HOT and q.sums.cold is None
    assert await repair.digest(broker, q) == whole(broker, q)
    assert broker.backlog.counts == 1 and q.cold == 50 - HOT  # (counted, not read back)
    conn = Conn(env)
    conn.consume(prefetch=3)
    await drain(env, conn, 20)  # (pages move their shares from the cold sums)
    await fill(env, 30)  # (and those that stay cold add theirs)
    assert q.cold and broker.backlog.paged_in >= 12
    assert await repair.digest(broker, q) == whole(broker, q)


def follower(env: Env) -> tuple[Broker, Queue, int]:
    """``env``'s broker as a holder of "q" that another node dispatches, at that epoch."""
    broker = small(env.broker)
    broker.hand_over_early = lambda q: False  # (a partition of several copies)
    broker.check_digests = True
    q = part(env)
    q.active = False
    return broker, q, 1 << 32 | 2


def dispatched(env: Env, q: Queue, n: int, epoch: int) -> list[Message]:
    """``n`` READY messages as the dispatcher (node n2) sent them."""
    base = int(env.clock.time() * 1000) << 16
    return [Message(0, f"{base + i:x}-n2", "q", f"m{i}".encode(), {}, base + i, "n2",
                    index=0, inc=q.inc, epoch=epoch, vn=1) for i in range(n)]


async def test_members_read_while_messages_leave_memory_still_find_them(
        env: Env, autojump_clock: MockClock) -> None:
    """What leaves memory for the disk waits while a partition is pinned (a read of its
    store and its memory in turn), and the members read before then are found on disk."""
    await env.declare()
    broker, q, epoch = follower(env)
    sent = dispatched(env, q, 12, epoch)
    with broker.backlog.pinned(q):
        merged = await broker.replica.merge_async([Put(record_of(m)) for m in sent],
                                                  {q.part: epoch})
        await merged.batch.wait()
        assert len(q.messages) == 12 and not q.cold  # (waiting)
        found = await repair.members(broker, q, range(BUCKETS))
    assert len(q.messages) == HOT and q.cold == 12 - HOT
    hot: list[Message] = []
    cold: list[Message] = []
    for b in range(BUCKETS):
        h, c = found.now(broker, q, b)
        hot += h
        cold += c
    assert sorted(m.id for m in hot) == sorted(q.messages)
    assert sorted(m.id for m in cold) == sorted(m.id for m in broker.backlog.cold_messages(q))
    assert len(hot) + len(cold) == 12


async def test_a_holder_that_does_not_dispatch_keeps_only_the_head_in_memory(
        env: Env, autojump_clock: MockClock) -> None:
    """A copy given by replication to a node that does not dispatch it: past ``hot_ready``
    READY messages in memory, those merged leave memory once committed (on disk only,
    counted, in the digest); a lease or an ack of one of them from the dispatcher pages
    that one in; once this node takes over, every message is delivered, in order."""
    await env.declare()
    broker, q, epoch = follower(env)
    sent = dispatched(env, q, 30, epoch)
    for start in range(0, 30, 10):  # (batches, as the dispatcher ships them)
        merged = await broker.replica.merge_async(
            [Put(record_of(m)) for m in sent[start:start + 10]], {q.part: epoch})
        await merged.batch.wait()
    assert q.cold == 30 - HOT and len(q.messages) == HOT and env.counts() == (30, 0, 0)

    def whole() -> list[int]:
        return walk([*q.messages.values(), *broker.backlog.cold_messages(q)])

    assert await repair.digest(broker, q) == whole()
    # The dispatcher leases the 20th and the 21st, then acks the 21st.
    leased = [Step("q", 0, m.id, Progress(int(State.LEASED), 1, 0.0, env.clock.time() + 30,
                                          7 + i, epoch, 2, "n2/1"))
              for i, m in enumerate(sent[20:22])]
    merged = await broker.replica.merge_async(leased, {q.part: epoch})
    await merged.batch.wait()
    merged = await broker.replica.merge_async(
        [Tomb("q", 0, sent[21].id, env.clock.time())], {q.part: epoch})
    await merged.batch.wait()
    assert env.counts() == (28, 1, 0) and q.cold == 30 - HOT - 2
    assert q.messages[sent[20].id].state == State.LEASED and sent[21].id not in q.messages
    assert await repair.digest(broker, q) == whole()
    # This node takes over (the lease's holder is gone: it is released).
    broker.replica.activate(q, epoch + (1 << 32))
    conn = Conn(env)
    conn.consume(prefetch=5)
    got = await drain(env, conn, 29)
    assert got == [m.id for m in sent if m is not sent[21]]
    assert env.counts() == (0, 0, 0) and not q.cold


async def two_merging(env: Env) -> tuple[Broker, Queue, list[Message], Any]:
    """A holder of "q" with 12 messages merged and committed (some on disk only), and
    2 more merged whose batch has not committed yet (its Merged)."""
    await env.declare()
    broker, q, epoch = follower(env)
    sent = dispatched(env, q, 14, epoch)
    merged = await broker.replica.merge_async([Put(record_of(m)) for m in sent[:12]],
                                              {q.part: epoch})
    await merged.batch.wait()
    return broker, q, sent, broker.replica.merge([Put(record_of(m)) for m in sent[12:]],
                                                 {q.part: epoch})


async def test_what_leaves_memory_as_a_count_of_the_cold_shares_ends_is_counted(
        env: Env, autojump_clock: MockClock) -> None:
    """A merge that commits while a count of the cold shares reads the store (its
    messages were in memory, so the read leaves them out) pages them out as the count's
    pin ends: their shares go with the count, and the digest is what a walk makes."""
    broker, q, _, merged = await two_merging(env)
    q.sums.cold = None  # (unknown, as after a restart)

    async def slow_scan(*args: Any, **kw: Any) -> Any:  # (the batch commits meanwhile)
        found = env.store.scan_ready(*args, **kw)
        await trio.sleep(0.1)
        return found

    env.store.scan_ready_async = slow_scan  # type: ignore[method-assign]
    await broker.backlog.count_cold(q)
    await merged.batch.wait()
    assert q.cold == 14 - HOT and q.sums.cold is not None
    assert await repair.digest(broker, q) == walk([*q.messages.values(),
                                                  *broker.backlog.cold_messages(q)])


async def test_records_read_while_messages_leave_memory_hold_every_one(
        env: Env, autojump_clock: MockClock) -> None:
    """``records`` (what a fetch answers) finds a message that leaves memory for the disk
    while it reads the store: it waits until the answer is made."""
    broker, q, sent, merged = await two_merging(env)

    async def slow_read(*args: Any, **kw: Any) -> Any:  # (the batch commits meanwhile)
        found = env.store.read_ids(*args, **kw)
        await trio.sleep(0.1)
        return found

    env.store.read_ids_async = slow_read  # type: ignore[method-assign]
    recs, _ = await broker.replica.records(q, [m.id for m in sent])
    assert sorted(r.id for r in recs) == sorted(m.id for m in sent)
    await merged.batch.wait()
    assert q.cold == 14 - HOT


async def test_a_drop_of_an_earlier_incarnation_takes_its_messages_on_disk_too(
        env: Env, autojump_clock: MockClock) -> None:
    """A holder learns of the queue's next incarnation before the drop of the one whose
    messages it holds, some on disk only: the drop takes those too, counts and digest
    included, and messages of the next incarnation stay."""
    await env.declare()
    broker, q, epoch = follower(env)
    sent = dispatched(env, q, 30, epoch)
    merged = await broker.replica.merge_async([Put(record_of(m)) for m in sent],
                                              {q.part: epoch})
    await merged.batch.wait()
    assert q.cold == 30 - HOT
    entry = broker.catalog["q"]
    later = entry.inc + 1000
    broker.replica.merge([Decl("q", later, dict(entry.options))])
    assert q.inc == later
    newer = dispatched(env, q, 3, epoch)  # (of the later incarnation)
    for m in newer:
        m.id, m.hlc = f"{m.hlc + 100:x}-n2", m.hlc + 100
    merged = await broker.replica.merge_async([Put(record_of(m)) for m in newer],
                                              {q.part: epoch})
    await merged.batch.wait()
    merged = broker.replica.merge([Drop("q", entry.inc, env.clock.time())])
    await env.store.flush()
    assert env.counts() == (3, 0, 0) and not q.cold
    assert sorted(q.messages) == sorted(m.id for m in newer)
    assert await repair.digest(broker, q) == walk(q.messages.values())


def delayed_in_memory(q: Queue) -> int:
    return sum(1 for m in q.messages.values() if m.state == State.DELAYED)


async def send_delayed(env: Env, n: int, delay: Any) -> dict[str, float]:
    """``n`` messages, the ``i``th delayed ``delay(i)`` s, in commits of 10: each id with
    when it is due."""
    due: dict[str, float] = {}
    for start in range(0, n, 10):
        batch = [{"body": f"d{i}".encode(), "delay": delay(i)}
                 for i in range(start, min(n, start + 10))]
        now = env.clock.time()
        for mid, m in zip(await env.send(*batch), batch, strict=True):
            due[mid] = now + m["delay"]
    return due


async def take_all(env: Env, n: int) -> list[tuple[str, float]]:
    """Consume and ack ``n`` deliveries: (id, when it came)."""
    conn = Conn(env)
    conn.consume(prefetch=5)
    got = []
    for _ in range(n):
        d = await conn.next()
        got.append((d.id, env.clock.time()))
        await conn.ack([d.id])
    return got


def spread(i: int) -> float:
    return 100.0 + (i * 37) % 60  # (due in another order than sent)


async def test_past_hot_delayed_delays_stay_on_disk_and_come_when_due(
        env: Env, autojump_clock: MockClock) -> None:
    """A partition held alone keeps at most twice HOT delays in memory (those due
    first); the others stay on disk only, counted, and each is read back before it is
    due: every one is delivered when due, in the order they come due."""
    small(env.broker)
    await env.declare()
    due = await send_delayed(env, 60, spread)
    q = part(env)
    assert env.counts() == (0, 0, 60)
    assert delayed_in_memory(q) <= 2 * HOT and q.late == 60 - delayed_in_memory(q)
    got = await take_all(env, 60)
    assert [mid for mid, _ in got] == sorted(due, key=lambda mid: due[mid])
    assert all(due[mid] <= at < due[mid] + 0.5 for mid, at in got)
    assert env.counts() == (0, 0, 0) and not q.late
    assert env.broker.backlog.late_out > 0 and env.broker.backlog.late_in > 0


async def test_a_restart_reads_only_the_first_delays(
        env: Env, autojump_clock: MockClock) -> None:
    small(env.broker)
    await env.declare()
    due = await send_delayed(env, 40, spread)
    broker = await restart(env)
    q = broker.queues["q"][0]
    assert delayed_in_memory(q) == HOT and q.late == 40 - HOT
    assert env.counts() == (0, 0, 40)
    got = await take_all(env, 40)
    assert [mid for mid, _ in got] == sorted(due, key=lambda mid: due[mid])
    assert all(due[mid] <= at < due[mid] + 0.5 for mid, at in got)


async def test_purge_drops_the_delays_on_disk(env: Env, autojump_clock: MockClock) -> None:
    small(env.broker)
    await env.declare()
    await send_delayed(env, 40, spread)
    assert part(env).late > 0
    assert await env.broker.purge("q").wait() == 40
    await env.store.flush()
    assert env.counts() == (0, 0, 0) and env.store.messages == {}
    await trio.sleep(200)  # (nothing comes due)
    broker = await restart(env)
    assert broker.stats("q")[0]["delayed"] == 0 and broker.stats("q")[0]["ready"] == 0


async def test_delays_coming_due_at_once_wait_on_disk_for_room(
        env: Env, autojump_clock: MockClock) -> None:
    """A flood of delays due at the same moment: memory takes them a page at a time,
    while few READY messages are in memory; the rest wait on disk (still counted
    delayed) until a consumer makes room, then all come."""
    small(env.broker)
    await env.declare()
    due = await send_delayed(env, 80, lambda i: 10.0)
    await trio.sleep(30)
    q = part(env)
    assert len(q.messages) <= 2 * HOT + HOT and q.late > 0
    assert sum(env.counts()) == 80
    got = await take_all(env, 80)
    assert sorted(mid for mid, _ in got) == sorted(due)
    assert env.counts() == (0, 0, 0) and not q.late


async def test_replication_reads_the_delays_on_disk_back_first(
        env: Env, autojump_clock: MockClock) -> None:
    """A partition held alone with delays on disk gains a holder: before its digest is
    compared (or anything merged or copied), the delays come back into memory."""
    small(env.broker)
    await env.declare()
    due = await send_delayed(env, 40, spread)
    broker, q = env.broker, part(env)
    assert q.late > 0
    broker.hand_over_early = lambda q: False  # (another node holds it now)
    digest = await repair.digest(broker, q)
    assert not q.late and delayed_in_memory(q) == 40 and sorted(q.messages) == sorted(due)
    assert digest == walk(q.messages.values())
