"""The broker core (SPEC section 2) in trio's virtual time: no sockets, no subprocess.

Each test runs a Broker over a MemoryStore under MockClock(autojump_threshold=0), so times,
counts and orders are exact. A fake connection is a Session whose pushes land in a channel,
each stamped with the (virtual) time it arrived.
"""

from __future__ import annotations

import contextlib
import gc
import math
from typing import Any, NamedTuple

import pytest
import trio
from trio.testing import MockClock

from meshq.broker import Broker, Session, core
from meshq.broker.backlog import HOT_READY
from meshq.broker.core import DEDUP_PRUNE_INTERVAL
from meshq.broker.replica import record_of
from meshq.cluster.changes import Put
from meshq.errors import NotFound, Timeout, Unavailable
from meshq.hlc import pack
from meshq.model import Message
from meshq.states import State
from meshq.store import Batch, MemoryStore, StoreError
from meshq.store.base import MAX_BATCH_REQUESTS
from meshq.testing import TrioClock


class Delivery(NamedTuple):
    at: float  # virtual clock time of the push
    tag: str
    id: str
    count: int
    headers: dict[str, Any]


class Conn:
    """A fake client connection: deliveries pushed to it are recorded and queued."""

    def __init__(self, env: Env) -> None:
        self.env = env
        self.got: list[Delivery] = []
        self.cancelled: list[str] = []
        self._tx, self._rx = trio.open_memory_channel[Delivery](math.inf)
        self.session = Session(
            push=self._push,
            cancelled=lambda tag, reason, final, index: self.cancelled.append(tag))

    def _push(self, tag: str, msgs: list[Message]) -> None:
        for m in msgs:
            d = Delivery(self.env.clock.time(), tag, m.id, m.delivery_count, dict(m.headers))
            self.got.append(d)
            self._tx.send_nowait(d)

    async def next(self) -> Delivery:
        with trio.fail_after(10_000):  # virtual seconds: an upper bound, not a wait
            return await self._rx.receive()

    def consume(self, queue: str = "q", prefetch: int = 100) -> str:
        return self.env.broker.consume(self.session, queue, prefetch)

    async def receive(self, queue: str = "q", n: int = 1, **kw: Any) -> list[Message]:
        return await self.env.broker.receive(self.session, queue, n, **kw)

    async def ack(self, ids: list[str], queue: str = "q") -> dict[str, Any]:
        return await self.env.broker.ack(self.session, queue, ids).wait()

    async def nack(self, ids: list[str], queue: str = "q", **kw: Any) -> dict[str, Any]:
        return await self.env.broker.nack(self.session, queue, ids, **kw).wait()


class Env:
    def __init__(self, nursery: trio.Nursery) -> None:
        self.nursery = nursery
        self.store = MemoryStore()
        self.clock = TrioClock()
        self.broker = Broker(self.store, self.clock, node_id="n1")
        self.t0 = self.clock.time()

    async def start(self, broker: Broker) -> None:
        scope = self._scope = trio.CancelScope()

        async def run(task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
            with scope:
                await broker.run(task_status=task_status)

        await self.nursery.start(run)
        self.broker = broker

    async def restart(self, hot_ready: int | None = None) -> Broker:
        """Stop the broker once its writes are durable; start a new one from the store
        (``hot_ready``: as meshqd starts, from the head of each partition only)."""
        await self.store.flush()
        self._scope.cancel()
        broker = Broker(self.store, self.clock, node_id="n1")
        broker.restore(self.store.load(hot_ready))
        await self.start(broker)
        return broker

    async def declare(self, name: str = "q", **options: Any) -> None:
        await self.broker.declare(name, options).wait()

    async def send(self, *msgs: Any, queue: str = "q") -> list[str]:
        batch = [m if isinstance(m, dict) else {"body": m} for m in msgs]
        return await self.broker.send(queue, batch).wait()

    def stats(self, name: str = "q") -> dict[str, Any]:
        return self.broker.stats(name)[0]

    def counts(self, name: str = "q") -> tuple[int, int, int]:
        return tuple(self.stats(name)[k] for k in ("ready", "leased", "delayed"))  # type: ignore

    def msg(self, mid: str, queue: str = "q") -> Message:
        return self.broker.queues[queue][0].messages[mid]


async def test_send_is_visible_only_once_committed(env: Env, autojump_clock: MockClock) -> None:
    env.broker.hand_over_early = lambda q: False  # as on a replicated partition
    await env.declare()
    conn = Conn(env)
    conn.consume(prefetch=1)
    pending = env.broker.send("q", [{"body": b"a"}, {"body": "b"}, {"body": b"c"}])
    assert env.counts() == (0, 0, 0)
    assert conn.got == [] and env.broker.queues["q"][0].messages == {}
    ids = await pending.wait()
    assert ids == pending.result and len(set(ids)) == 3
    assert [env.msg(i).hlc for i in ids] == sorted(env.msg(i).hlc for i in ids)
    assert env.counts() == (2, 1, 0)
    # The first message was leased to the waiting consumer in the same commit.
    assert [d.id for d in conn.got] == ids[:1]


async def test_failed_commit_confirms_nothing(env: Env, autojump_clock: MockClock) -> None:
    env.broker.hand_over_early = lambda q: False  # as on a replicated partition
    await env.declare()
    conn = Conn(env)
    conn.consume()
    env.store.fail_next = True
    pending = env.broker.send("q", [{"body": b"a", "dedup_id": "k"}, {"body": b"b"}])
    with pytest.raises(StoreError) as info:
        await pending.wait()
    assert isinstance(info.value, Unavailable)
    assert env.store.failed_commits == 1 and env.store.messages == {}
    assert env.counts() == (0, 0, 0) and conn.got == []
    # The dedup id was never confirmed, so a retry is a new message.
    [retry] = await env.send({"body": b"a", "dedup_id": "k"})
    assert retry not in pending.result
    assert env.counts() == (0, 1, 0)
    assert (await conn.next()).id == retry


async def test_failed_declare_loses_no_later_send(env: Env, autojump_clock: MockClock) -> None:
    env.store.fail_next = True
    with pytest.raises(StoreError):
        await env.declare()
    await env.declare()  # the retry is confirmed only once the queue is durable
    assert "q" in env.store.catalog
    env.store.fail_next = True
    with pytest.raises(StoreError):
        await env.declare("p")
    [a] = await env.send(b"confirmed", queue="p")
    await env.restart()
    assert list(env.broker.queues["p"][0].messages) == [a]


async def test_delay_holds_message_until_ready_at(env: Env, autojump_clock: MockClock) -> None:
    await env.declare()
    conn = Conn(env)
    conn.consume()
    [mid] = await env.send({"body": b"later", "delay": 5})
    assert env.msg(mid).state == State.DELAYED and env.msg(mid).ready_at == env.t0 + 5
    await trio.sleep(4.5)
    assert env.counts() == (0, 0, 1) and conn.got == []
    d = await conn.next()
    assert (d.id, d.at, d.count) == (mid, env.t0 + 5, 1)
    assert env.counts() == (0, 1, 0)


async def test_lease_deadline_and_extend(env: Env, autojump_clock: MockClock) -> None:
    await env.declare(visibility_timeout=30)
    conn, other = Conn(env), Conn(env)
    a, b = await env.send(b"a", b"b")
    got = await conn.receive(n=2)
    assert [(m.id, m.delivery_count, m.lease_deadline) for m in got] == [
        (a, 1, env.t0 + 30), (b, 1, env.t0 + 30)]
    await trio.sleep(20)
    assert env.broker.extend(conn.session, "q", [b], 30) == {"extended": [b], "failed": {}}
    assert env.broker.extend(other.session, "q", [a], 30)["failed"].keys() == {a}
    assert env.msg(b).lease_deadline == env.t0 + 50
    [again] = await other.receive(wait=100)
    assert (again.id, again.delivery_count, env.clock.time()) == (a, 2, env.t0 + 30)
    [again] = await other.receive(wait=100)
    assert (again.id, again.delivery_count, env.clock.time()) == (b, 2, env.t0 + 50)
    assert env.broker.redeliveries == 2
    assert (await conn.ack([a]))["failed"].keys() == {a}  # the old lease is gone


async def test_ttl_expires_ready_and_delayed_to_dlq(env: Env, autojump_clock: MockClock) -> None:
    await env.declare("dlq")
    await env.declare(message_ttl=10, dead_letter_queue="dlq")
    dead = Conn(env)
    dead.consume("dlq")
    a, b, c, e = await env.send({"body": b"a", "ttl": 5}, {"body": b"b", "ttl": 20},
                                b"c", {"body": b"e", "delay": 20})
    assert [env.msg(i).expires_at for i in (a, b, c, e)] == [env.t0 + 5] + [env.t0 + 10] * 3
    first = await dead.next()
    assert (first.id, first.at) == (a, env.t0 + 5)
    assert first.headers["x-death"] == {"queue": "q", "reason": "expired",
                                        "delivery_count": 0, "time": env.t0 + 5}
    rest = [await dead.next() for _ in range(3)]
    assert [(d.id, d.at) for d in rest] == [(b, env.t0 + 10), (c, env.t0 + 10), (e, env.t0 + 10)]
    s = env.stats()
    assert (s["ready"], s["delayed"], s["expired"], s["dead_lettered"], s["dropped"]) == (
        0, 0, 4, 4, 0)


async def test_ttl_waits_for_the_lease_to_end(env: Env, autojump_clock: MockClock) -> None:
    await env.declare("dlq")
    await env.declare(dead_letter_queue="dlq")
    conn, dead = Conn(env), Conn(env)
    dead.consume("dlq")
    a, b = await env.send({"body": b"a", "ttl": 5}, {"body": b"b", "ttl": 5})
    await conn.receive(n=2, visibility_timeout=20)
    await trio.sleep(10)
    assert env.counts() == (0, 2, 0) and env.stats()["expired"] == 0
    assert (await conn.ack([b]))["acked"] == [b]  # still leased, so still ackable
    d = await dead.next()
    assert (d.id, d.at, d.headers["x-death"]["reason"]) == (a, env.t0 + 20, "expired")
    assert d.headers["x-death"]["delivery_count"] == 1
    assert env.counts() == (0, 0, 0) and env.stats()["expired"] == 1


@pytest.mark.parametrize("with_dlq", [True, False])
async def test_max_deliveries(env: Env, autojump_clock: MockClock, with_dlq: bool) -> None:
    await env.declare("dlq")
    await env.declare(max_deliveries=2, dead_letter_queue="dlq" if with_dlq else None)
    conn = Conn(env)
    [a] = await env.send(b"poison")
    for count in (1, 2):
        [m] = await conn.receive()
        assert (m.id, m.delivery_count) == (a, count)
        await conn.nack([a])
    assert env.counts() == (0, 0, 0) and await conn.receive() == []
    assert env.stats()["dropped"] == (0 if with_dlq else 1)
    if with_dlq:
        assert env.stats()["dead_lettered"] == 1
        [m] = await conn.receive("dlq")
        assert m.id == a
        assert m.headers["x-death"]["reason"] == "max_deliveries"
        assert m.headers["x-death"]["delivery_count"] == 2
    else:
        assert env.counts("dlq") == (0, 0, 0)


async def test_max_length_drops_the_head(env: Env, autojump_clock: MockClock) -> None:
    await env.declare(max_length=2)
    conn = Conn(env)
    [a] = await env.send(b"a")
    _b, c, d = await env.send(b"b", b"c", b"d")
    assert env.counts() == (2, 0, 0) and env.stats()["dropped"] == 2
    assert [m.id for m in await conn.receive(n=10)] == [c, d]
    assert a not in env.broker.queues["q"][0].messages


async def test_round_robin_with_prefetch(env: Env, autojump_clock: MockClock) -> None:
    await env.declare()
    conns = [Conn(env) for _ in range(3)]
    for c in conns:
        c.consume(prefetch=2)
    ids = [(await env.send(f"m{i}"))[0] for i in range(9)]
    assert [[d.id for d in c.got] for c in conns] == [[ids[0], ids[3]], [ids[1], ids[4]],
                                                      [ids[2], ids[5]]]
    assert env.counts() == (3, 6, 0)  # every consumer is out of credit
    # conns[2] never acks; the others keep going without it.
    await conns[1].ack([ids[1], ids[4]])
    assert [d.id for d in conns[1].got[2:]] == [ids[6], ids[7]]
    await conns[0].ack([ids[0]])
    assert [d.id for d in conns[0].got[2:]] == [ids[8]]
    assert len(conns[2].got) == 2 and env.counts() == (0, 6, 0)


async def test_close_session_releases_leases(env: Env, autojump_clock: MockClock) -> None:
    await env.declare()
    gone, conn = Conn(env), Conn(env)
    gone.consume(prefetch=2)
    ids = await env.send(b"a", b"b", b"c")
    assert [(await gone.next()).id for _ in range(2)] == ids[:2]
    env.broker.close_session(gone.session)
    assert env.counts() == (3, 0, 0) and env.stats()["consumers"] == 0
    assert [(env.msg(i).state, env.msg(i).delivery_count) for i in ids[:2]] == [
        (State.READY, 1), (State.READY, 1)]
    got = await conn.receive(n=3)
    assert [(m.id, m.delivery_count) for m in got] == [(ids[0], 2), (ids[1], 2), (ids[2], 1)]
    assert len(gone.got) == 2 and env.broker.redeliveries == 2


async def test_purge_keeps_leased(env: Env, autojump_clock: MockClock) -> None:
    await env.declare()
    conn = Conn(env)
    a, _b, _c = await env.send(b"a", b"b", b"c")
    await env.send({"body": b"d", "delay": 10})
    [m] = await conn.receive()
    assert await env.broker.purge("q").wait() == 3
    assert env.counts() == (0, 1, 0) and m.id == a
    await trio.sleep(11)
    assert env.counts() == (0, 1, 0)
    assert (await conn.ack([a]))["acked"] == [a]
    await env.store.flush()
    assert env.store.messages == {}


async def test_delete_queue(env: Env, autojump_clock: MockClock) -> None:
    await env.declare()
    conn = Conn(env)
    tag = conn.consume(prefetch=1)
    a, _b = await env.send(b"a", b"b")
    await env.send({"body": b"c", "delay": 10})
    assert await env.broker.delete_queue("q").wait() == 3
    assert conn.cancelled == [tag] and env.broker.stats() == []
    inc, _, dropped, _ = env.store.catalog["q"]  # a tombstone of the queue stays
    assert dropped >= inc and env.store.messages == {}
    with pytest.raises(NotFound):
        env.broker.send("q", [{"body": b"x"}])
    with pytest.raises(NotFound):
        env.broker.ack(conn.session, "q", [a])
    await env.declare()  # a new, empty queue: nothing of the old one comes back
    await trio.sleep(11)
    assert env.counts() == (0, 0, 0) and conn.got[0].id == a and len(conn.got) == 1


async def test_dedup_window(env: Env, autojump_clock: MockClock) -> None:
    await env.declare()
    await env.declare("other")
    window = env.broker.limits.dedup_window
    p1 = env.broker.send("q", [{"body": b"a", "dedup_id": "k"}])
    p2 = env.broker.send("q", [{"body": b"a", "dedup_id": "k"}])  # before p1 committed
    [first] = await p1.wait()
    assert await p2.wait() == [first]
    await trio.sleep(window - 1)
    assert await env.send({"body": b"a", "dedup_id": "k"}) == [first]
    [elsewhere] = await env.send({"body": b"a", "dedup_id": "k"}, queue="other")
    assert elsewhere != first
    await trio.sleep(DEDUP_PRUNE_INTERVAL + 2)
    [second] = await env.send({"body": b"a", "dedup_id": "k"})
    assert second != first
    assert env.counts() == (2, 0, 0)


async def test_restart_restores_confirmed_state(env: Env, autojump_clock: MockClock) -> None:
    await env.declare("dlq")
    await env.declare("other")
    opts = {"message_ttl": 100.0, "max_deliveries": 5, "dead_letter_queue": "dlq"}
    await env.declare(**opts)
    conn = Conn(env)
    [x] = await env.send({"body": b"x", "ttl": 1})
    assert [m.id for m in await conn.receive("dlq", wait=5)] == [x]  # expired at t0 + 1
    a, b, c = await env.send(b"a", b"b", b"c")
    [d] = await env.send({"body": b"d", "delay": 50})
    [k] = await env.send({"body": b"k", "dedup_id": "k1"})
    await conn.receive(n=2)
    await conn.ack([a])
    [z] = await env.send(b"z", queue="other")  # the newest timestamp, acked and deleted
    await conn.receive("other")
    await conn.ack([z], queue="other")
    old, last, ready_at = env.broker, env.broker.hlc.last, env.msg(d).ready_at
    assert int(z.split("-")[0], 16) == last  # the id is the HLC in hex

    new = await env.restart()
    assert new is not old and new.hlc.last >= last
    assert new.queues["q"][0].options == old.queues["q"][0].options
    assert opts.items() <= env.stats()["options"].items()
    s = env.stats()
    assert (s["ready"], s["leased"], s["delayed"], s["expired"], s["dead_lettered"]) == (
        3, 0, 1, 1, 1)
    assert env.counts("dlq") == (1, 0, 0) and env.counts("other") == (0, 0, 0)  # x: was leased
    assert sorted(new.queues["q"][0].messages) == sorted([b, c, d, k])
    assert (env.msg(d).ready_at, env.msg(b).state, env.msg(b).delivery_count) == (
        ready_at, State.READY, 1)
    got = await conn.receive(n=10, visibility_timeout=1000)
    assert [(m.id, m.delivery_count) for m in got] == [(b, 2), (c, 1), (k, 1)]
    [late] = await conn.receive(wait=100)
    assert (late.id, env.clock.time()) == (d, ready_at)
    assert await env.send({"body": b"k", "dedup_id": "k1"}) == [k]
    [fresh] = await env.send(b"new")
    assert env.msg(fresh).hlc > last


async def test_restart_counts_a_lost_lease(env: Env, autojump_clock: MockClock) -> None:
    """A lease that died with the process ends like any other: at max_deliveries, to the DLQ."""
    await env.declare("dlq")
    await env.declare(max_deliveries=1, dead_letter_queue="dlq")
    conn = Conn(env)
    [a] = await env.send(b"poison")
    await conn.receive()
    await env.restart()
    conn = Conn(env)
    [m] = await conn.receive("dlq", wait=5)
    assert (m.id, m.headers["x-death"]["reason"]) == (a, "max_deliveries")
    assert env.counts() == (0, 0, 0) and await conn.receive() == []


@pytest.mark.parametrize("ordering", ["fifo", "fair"])
async def test_single_consumer_sees_hlc_order(env: Env, autojump_clock: MockClock,
                                              ordering: str) -> None:
    await env.declare(ordering=ordering)
    conn = Conn(env)
    conn.consume(prefetch=1)
    ids = await env.send(b"m0", b"m1", b"m2", b"m3")
    seen = []
    while len(seen) < 6:
        d = await conn.next()
        seen.append((ids.index(d.id), d.count))
        if d.count == 1 and d.id in (ids[0], ids[2]):
            await conn.nack([d.id])
        else:
            await conn.ack([d.id])
    assert seen == [(0, 1), (0, 2), (1, 1), (2, 1), (2, 2), (3, 1)]
    assert env.counts() == (0, 0, 0)


async def test_lease_is_durable_before_delivery(env: Env, autojump_clock: MockClock) -> None:
    env.broker.hand_over_early = lambda q: False  # as on a replicated partition
    await env.declare()
    conn = Conn(env)
    [mid] = await env.send(b"a")
    conn.consume(prefetch=1)
    msg = env.msg(mid)
    assert msg.state == State.LEASED and conn.got == []
    assert (await conn.next()).id == mid
    row = env.store.messages[msg.seq]
    assert (State(row[9]), row[10]) == (State.LEASED, 1)  # state, delivery_count on "disk"


async def test_a_partition_held_alone_hands_a_lease_over_then_commits_it(
        env: Env, autojump_clock: MockClock) -> None:
    """Held alone, a lease from the backlog goes out at once (as RabbitMQ's classic
    queues deliver before their fsync) and is committed just after."""
    await env.declare()
    conn = Conn(env)
    [mid] = await env.send(b"a")
    commits = env.store.commits
    env.store.delays = lambda: 1.0  # commits take a virtual second from now on
    conn.consume(prefetch=1)
    got = await conn.next()
    assert got.id == mid and got.at == env.clock.time() and env.store.commits == commits
    row = env.store.messages[env.msg(mid).seq]
    assert (State(row[9]), row[10]) == (State.READY, 0)  # not on "disk" yet
    await env.store.flush()
    row = env.store.messages[env.msg(mid).seq]
    assert (State(row[9]), row[10]) == (State.LEASED, 1)


async def test_a_lease_handed_over_early_whose_commit_fails_stays_with_its_consumer(
        env: Env, autojump_clock: MockClock) -> None:
    """The message is still on disk, as it was (a restart brings it back); the consumer
    that has it can ack it."""
    await env.declare()
    [mid] = await env.send(b"a")
    conn = Conn(env)
    env.store.fail_next = True
    conn.consume(prefetch=1)
    d = await conn.next()
    assert (d.id, d.count) == (mid, 1)
    await env.store.flush()
    assert env.store.failed_commits == 1 and env.msg(mid).state == State.LEASED
    assert (await conn.ack([mid]))["acked"] == [mid]
    await env.store.flush()
    assert env.store.messages == {}


async def test_lease_released_before_it_is_durable_is_not_delivered(
        env: Env, autojump_clock: MockClock) -> None:
    env.broker.hand_over_early = lambda q: False  # as on a replicated partition
    await env.declare()
    gone, other = Conn(env), Conn(env)
    [mid] = await env.send(b"a")
    gone.consume(prefetch=1)
    env.broker.close_session(gone.session)  # before the lease's batch commits
    [m] = await other.receive(wait=1)
    assert m.id == mid and m.delivery_count == 2 and gone.got == []


async def test_send_to_a_waiting_consumer_leases_in_the_same_commit(
        env: Env, autojump_clock: MockClock) -> None:
    await env.declare()
    conn = Conn(env)
    conn.consume(prefetch=1)
    commits = env.store.commits
    [a, b] = await env.send(b"a", b"b")
    assert env.store.commits == commits + 1
    assert [d.id for d in conn.got] == [a]  # b waits: the consumer has no credit left
    assert (env.msg(a).state, env.msg(b).state) == (State.LEASED, State.READY)
    row = env.store.messages[env.msg(a).seq]
    assert (State(row[9]), row[10]) == (State.LEASED, 1)


async def test_direct_lease_of_a_consumer_gone_before_commit_goes_back_to_ready(
        env: Env, autojump_clock: MockClock) -> None:
    env.broker.hand_over_early = lambda q: False  # as on a replicated partition
    await env.declare()
    gone, other = Conn(env), Conn(env)
    gone.consume(prefetch=1)
    pending = env.broker.send("q", [{"body": b"a"}])
    env.broker.close_session(gone.session)
    [mid] = await pending.wait()
    assert env.msg(mid).state == State.READY and gone.got == []
    [m] = await other.receive()
    assert (m.id, m.delivery_count) == (mid, 1)


async def test_failed_commit_refunds_a_direct_lease(env: Env, autojump_clock: MockClock) -> None:
    env.broker.hand_over_early = lambda q: False  # as on a replicated partition
    await env.declare()
    conn = Conn(env)
    conn.consume(prefetch=1)
    env.store.fail_next = True
    with pytest.raises(StoreError):
        await env.send(b"lost")
    [mid] = await env.send(b"kept")
    assert [d.id for d in conn.got] == [mid]


def stored_ids(env: Env) -> set[str]:
    return {row[1] for row in env.store.messages.values()}


async def test_a_partition_held_alone_hands_a_new_message_over_before_its_commit(
        env: Env, autojump_clock: MockClock) -> None:
    """On a partition this node alone holds (the embedded single node), a message leased
    at send time goes to its consumer at once, as RabbitMQ's classic queues do: message
    and lease commit together. The others stay invisible until their commit, and an ack
    before the commit is staged after the put, so nothing comes back."""
    await env.declare()
    conn = Conn(env)
    conn.consume(prefetch=1)
    env.store.delays = lambda: 1.0  # commits take a virtual second
    pending = env.broker.send("q", [{"body": b"a"}, {"body": b"b"}])
    assert env.counts() == (0, 1, 0)  # the other one is invisible until its commit
    d = await conn.next()
    first = d.id
    assert d.count == 1 and first not in stored_ids(env)  # not committed yet
    env.store.delays = None
    acked = env.broker.ack(conn.session, "q", [first])
    ids = await pending.wait()
    assert first == ids[0]
    assert (await acked.wait())["acked"] == [first]
    second = await conn.next()  # the credit came back; b's lease is durable first
    assert second.id == ids[1] and ids[1] in stored_ids(env)
    await env.store.flush()
    assert first not in stored_ids(env) and env.broker.totals["q"]["acked"] == 1
    await env.restart()
    assert first not in env.broker.queues["q"][0].messages


async def handed_over_then_failing(env: Env) -> tuple[Conn, Any, Delivery]:
    """A consumer with credit; a send whose commit takes a second and then fails; the
    delivery it got early, before that."""
    await env.declare()
    conn = Conn(env)
    conn.consume(prefetch=1)
    env.store.fail_next = True
    env.store.delays = lambda: 1.0
    pending = env.broker.send("q", [{"body": b"lost"}])
    return conn, pending, await conn.next()


async def test_a_failed_commit_takes_back_a_message_handed_over_early(
        env: Env, autojump_clock: MockClock) -> None:
    """The producer hears UNAVAILABLE and the message never existed: the consumer's ack
    of it fails, and its credit comes back."""
    conn, pending, lost = await handed_over_then_failing(env)
    env.store.delays = None
    with pytest.raises(StoreError):
        await pending.wait()
    assert env.counts() == (0, 0, 0) and env.store.messages == {}
    result = await conn.ack([lost.id])
    assert result["acked"] == [] and lost.id in result["failed"]
    [kept] = await env.send(b"kept")
    assert [d.id for d in conn.got] == [lost.id, kept]


async def test_a_consumer_gone_before_the_commit_of_its_early_delivery_releases_it(
        env: Env, autojump_clock: MockClock) -> None:
    """It had the message: it comes back redelivered, counted, for another consumer."""
    await env.declare()
    gone, other = Conn(env), Conn(env)
    gone.consume(prefetch=1)
    env.store.delays = lambda: 1.0
    pending = env.broker.send("q", [{"body": b"a"}])
    await gone.next()
    env.broker.close_session(gone.session)
    [mid] = await pending.wait()
    assert env.msg(mid).state == State.READY and env.msg(mid).delivery_count == 1
    [m] = await other.receive()
    assert (m.id, m.delivery_count) == (mid, 2)


async def test_fifo_queue_does_not_lease_at_send_time(env: Env, autojump_clock: MockClock) -> None:
    env.broker.hand_over_early = lambda q: False  # as on a replicated partition
    await env.declare(ordering="fifo")
    pushed_after: list[int] = []  # commits done when the delivery was pushed
    session = Session(push=lambda tag, msgs: pushed_after.append(env.store.commits))
    env.broker.consume(session, "q", 5)
    before = env.store.commits
    await env.send(b"a")
    await env.store.flush()
    assert pushed_after == [before + 2]  # the message's commit, then its lease's


async def test_many_due_timers_are_handled_in_slices(env: Env, autojump_clock: MockClock) -> None:
    await env.declare(visibility_timeout=5.0)
    conn = Conn(env)
    ids = await env.send(*[b"x"] * 10)
    got = await conn.receive(n=10)
    await conn.ack([m.id for m in got])  # their lease timers stay in the heap, stale
    assert env.broker.tick(env.clock.time() + 10, budget=4) is True
    assert env.broker.tick(env.clock.time() + 10, budget=100) is False
    assert env.counts() == (0, 0, 0) and len(ids) == 10


async def test_hlc_ceiling_is_written_ahead_not_with_every_commit(
        env: Env, autojump_clock: MockClock) -> None:
    await env.declare()
    for _ in range(20):  # 20 commits within 10 virtual ms: the first ceiling covers them
        await env.send(b"x")
    ceiling = int(env.store.meta["hlc"])
    assert env.broker.hlc.last < ceiling
    assert ceiling - env.broker.hlc.last < (300 << 16)  # about HLC_CEILING_MS ahead
    await env.store.flush()
    broker2 = await env.restart()
    [mid] = await env.send(b"after")
    assert broker2.queues["q"][0].messages[mid].hlc > ceiling


async def test_a_dedup_hit_on_a_failed_send_fails_the_send_that_relied_on_it(
        env: Env, autojump_clock: MockClock) -> None:
    await env.declare()
    env.store.fail_next = True
    first = env.broker.send("q", [{"body": b"a", "dedup_id": "x"}])
    second = env.broker.send("q", [{"body": b"a", "dedup_id": "x"}, {"body": b"b"}])
    assert first.batch is second.also  # the hit waits for the first send's batch
    with pytest.raises(StoreError):
        await first.wait()
    with pytest.raises(StoreError):
        await second.wait()


class _NoQuorum:
    """A replication gate whose write quorum confirms nothing: each batch commits here
    and then fails, outcome unknown (as when its holders were cut off)."""

    def ship(self, batch: Batch) -> None:
        pass

    def committed(self, batch: Batch, error: BaseException | None) -> None:
        batch.complete(error or Timeout("fewer replicas than the write quorum confirmed"))

    def abandon(self) -> None:
        pass


@pytest.mark.parametrize("ordering", ["fifo", "fair"])
async def test_a_fifo_send_no_write_quorum_confirmed_is_taken_back(
        env: Env, autojump_clock: MockClock, ordering: str) -> None:
    """(SPEC section 2, fifo; docs/architecture.md) A fifo send that only this node
    committed is not made visible: a later dispatcher of its partition may have closed
    above it. Its row and dedup entry go, so the client's retry (same dedup id) is
    stamped anew. A fair queue's stays visible, and the retry is answered with it."""
    env.broker.hand_over_early = lambda q: False  # as on a replicated partition
    await env.declare(ordering=ordering)
    env.store.gate = _NoQuorum()  # type: ignore[assignment]
    with pytest.raises(Timeout):
        await env.broker.send("q", [{"body": b"a", "dedup_id": "x"}]).wait()
    with contextlib.suppress(Timeout):
        await env.store.flush()  # (what the failure staged: committed here, no quorum)
    q = env.broker.queues["q"][0]
    fifo = ordering == "fifo"
    assert (q.ready, len(q.messages), len(env.store.load().messages)) == (
        (0, 0, 0) if fifo else (1, 1, 1))
    assert not q.tombs
    env.store.gate = None
    [mid] = await env.send({"body": b"a", "dedup_id": "x"})  # the client's retry
    assert q.ready == 1 and q.messages[mid].body == b"a"


async def test_no_delivery_when_the_lease_commit_fails(env: Env, autojump_clock: MockClock,
                                                       ) -> None:
    env.broker.hand_over_early = lambda q: False  # as on a replicated partition
    await env.declare()
    [mid] = await env.send(b"a")
    conn = Conn(env)
    env.store.fail_next = True
    conn.consume(prefetch=1)  # its lease goes into the batch that fails
    d = await conn.next()  # handed over only after a lease that did commit
    assert (d.id, d.count) == (mid, 1)
    assert env.store.failed_commits == 1


async def test_expired_messages_leave_no_garbage_in_the_ready_heap(
        env: Env, autojump_clock: MockClock) -> None:
    await env.declare(message_ttl=1.0)
    for _ in range(3):
        await env.send(*[b"x"] * 2000)
        await trio.sleep(2)
    q = env.broker.queues["q"][0]
    assert q.ready == 0 and env.stats()["expired"] == 6000
    assert len(q._ready) < 2048


async def test_a_holders_copy_of_a_send_not_yet_committed_is_not_a_second_message(
        env: Env, autojump_clock: MockClock) -> None:
    """Anti-entropy can read a send on a holder before the primary's own commit of it
    completes (the holder's copy already leased to a waiting consumer): merging that copy
    back must neither make a second message nor keep the lease from its consumer."""
    await env.declare()
    conn = Conn(env)
    conn.consume()
    pending = env.broker.send("q", [{"body": b"a"}, {"body": b"b"}])
    staged = list(env.broker.in_flight.values())
    assert len(staged) == 2 and all(m.owner is not None for m in staged)
    env.broker.replica.merge([Put(record_of(m)) for m in staged])
    ids = await pending.wait()
    assert env.broker.in_flight == {}
    with trio.fail_after(1):  # (virtual) handed over with the commit, not at the deadline
        got = [(await conn.next()).id for _ in ids]
    assert sorted(got) == sorted(ids)
    await trio.sleep(1)
    assert len(conn.got) == 2 and env.counts() == (0, 2, 0)


async def test_a_partition_taken_over_stamps_above_what_a_clock_too_far_ahead_stamped(
        env: Env, autojump_clock: MockClock) -> None:
    """A dispatcher whose clock ran 2 s ahead stamped a message before its clock was
    refused; the replica that takes the partition over merged it without moving its HLC
    (too far ahead to receive). Its next send must still come after it: a key's messages
    keep their order (simulation seed 26 --heavy delivered them the other way round)."""
    await env.declare()
    q = env.broker.queues["q"][0]
    env.broker.replica.deactivate(q, "dispatched elsewhere")
    hlc = pack(int(env.clock.time() * 1000) + 2000)
    early = Message(0, f"{hlc:016x}-00000002", "q", b"early", {}, hlc, "00000002",
                    inc=q.inc, epoch=1, vn=1)
    env.broker.replica.merge([Put(record_of(early))])
    assert env.broker.hlc.last < hlc  # (merged; the clock refused)
    env.broker.replica.activate(q, q.epoch + 1)
    [later] = await env.send(b"later")
    assert env.msg(later).hlc > hlc
    conn = Conn(env)
    conn.consume()
    assert [(await conn.next()).id for _ in range(2)] == [early.id, later]


async def test_a_dedup_entry_a_peer_carried_confirms_only_a_message_held_here(
        env: Env, autojump_clock: MockClock) -> None:
    """A takeover had begun: the holders refused the old dispatcher's Put (fenced) but
    merged the dedup entry it carried, so the client's retry through the new dispatcher
    hits an entry whose message only the old dispatcher holds. Confirming it from the
    entry would confirm a send no write quorum has (simulation seeds 59 and 111 --heavy):
    the retry is a new message. An entry whose message is here is replicated again before
    it confirms, and one whose message was consumed here confirms as it is."""
    env.broker.hand_over_early = lambda q: False  # as on a replicated partition
    await env.declare()
    q = env.broker.queues["q"][0]
    old = q.epoch
    env.broker.replica.activate(q, old + 1)  # this node took the partition over
    expires = env.clock.time() + 60

    def peer_put(body: bytes, dedup_id: str, epoch: int) -> str:
        hlc = pack(int(env.clock.time() * 1000))
        msg = Message(0, f"{hlc:016x}-00000002", "q", body, {}, hlc, "00000002",
                      inc=q.inc, epoch=epoch, vn=1)
        merged = env.broker.replica.merge([Put(record_of(msg), dedup_id, expires)],
                                          epochs={q.part: epoch})
        assert (q.part in merged.fenced) == (epoch < q.promised)
        return msg.id

    refused = peer_put(b"a", "d1", old)
    assert refused not in q.messages
    [mid] = await env.send({"body": b"a", "dedup_id": "d1"})
    assert mid != refused and env.msg(mid).body == b"a"
    assert await env.send({"body": b"a", "dedup_id": "d1"}) == [mid]  # its own entry now
    held = peer_put(b"b", "d2", q.promised)
    assert await env.send({"body": b"b", "dedup_id": "d2"}) == [held]
    assert env.counts() == (2, 0, 0)
    conn = Conn(env)
    conn.consume()
    got = [await conn.next() for _ in range(2)]
    await conn.ack([d.id for d in got])
    assert sorted(d.id for d in got) == sorted([mid, held])
    assert await env.send({"body": b"b", "dedup_id": "d2"}) == [held]  # consumed: as it is
    assert env.counts() == (0, 0, 0)


async def test_a_dedup_entry_does_not_keep_its_confirmed_send_alive(
        env: Env, autojump_clock: MockClock) -> None:
    """Every client send carries a dedup id, kept for the dedup window (minutes): once
    the send is confirmed, the entry must not hold on to its batch (ops, bodies,
    callbacks), or memory and garbage-collection pauses grow with the send rate."""
    await env.declare()
    ids = [await env.send({"body": b"a", "dedup_id": f"d{i}"}) for i in range(50)]
    gc.collect()
    done = [o for o in gc.get_objects() if isinstance(o, Batch) and o.done]
    assert len(done) < 5  # the last few a queue or the store names, not one per send
    # and the entries still answer a retry with the first message
    assert await env.send({"body": b"a", "dedup_id": "d7"}) == ids[7]
    assert env.counts() == (50, 0, 0)


async def test_a_lease_handed_over_late_runs_its_whole_visibility_timeout(
        env: Env, autojump_clock: MockClock) -> None:
    """A message leased at send time to a waiting consumer reaches it once its commit (and
    write quorum) completes: when that takes a while, the consumer still gets the whole
    visibility timeout from the moment it has the message."""
    env.broker.hand_over_early = lambda q: False  # as on a replicated partition
    await env.declare(visibility_timeout=5.0)
    first, second = Conn(env), Conn(env)
    first.consume(prefetch=1)
    env.store.delays = lambda: 2.0  # a slow commit (a slow write quorum looks the same)
    [mid] = await env.send(b"a")
    got = await first.next()
    assert got.id == mid and got.at >= env.t0 + 2.0
    env.store.delays = None
    assert env.msg(mid).lease_deadline == pytest.approx(got.at + 5.0)
    second.consume(prefetch=1)
    again = await second.next()  # the lease ends, and the message goes out again
    later = [d for d in first.got + second.got if d is not got]
    assert again.id == mid and again.count >= 2
    assert later and all(d.at >= got.at + 5.0 for d in later)


async def test_a_queue_unused_past_its_expires_is_deleted(env: Env,
                                                          autojump_clock: MockClock) -> None:
    await env.declare("idle", expires=10.0)
    await env.declare("busy", expires=10.0)
    await env.declare("kept")
    conn = Conn(env)
    conn.consume("busy")
    await env.send("x", queue="idle")  # a send is no use: RabbitMQ counts it neither
    await trio.sleep(6)
    await env.declare("idle", expires=10.0)  # a declare is: the ten seconds start again
    await trio.sleep(9)
    assert {"idle", "busy", "kept"} <= set(env.broker.queues)
    await trio.sleep(1.5)
    assert "idle" not in env.broker.queues  # unused for 10 s
    assert {"busy", "kept"} <= set(env.broker.queues)  # a consumer keeps it; no option
    env.broker.cancel(conn.session, next(iter(conn.session.consumers)))
    await trio.sleep(9)
    assert "busy" in env.broker.queues
    await trio.sleep(1.5)
    assert set(env.broker.queues) == {"kept"}


@pytest.mark.parametrize("restart", [False, True], ids=["", "after a restart"])
async def test_a_dead_letter_cycle_loses_nothing(env: Env, autojump_clock: MockClock,
                                                 restart: bool) -> None:
    """A -> (nack) -> B, B's TTL -> back to A (RabbitMQ's retry-with-delay): the message
    comes back to A, under a new id (its old one is a tombstone there). With a restart
    between the legs (meshqd starts from the head of the store, so a's tombstones are on
    disk only), the old id may still be a tombstone there, which a replica's copy would
    absorb the message into: a new id all the same."""
    await env.declare("a", dead_letter_queue="b")
    await env.declare("b", message_ttl=5.0, dead_letter_queue="a")
    [mid] = await env.send("job", queue="a")
    conn = Conn(env)
    [m] = await conn.receive("a")
    await conn.nack([m.id], queue="a", requeue=False)
    assert env.counts("b") == (1, 0, 0)
    if restart:
        a = (await env.restart(HOT_READY)).queues["a"][0]
        assert a.tombs_on_disk and mid not in a.tombs
        conn = Conn(env)
    await trio.sleep(6)
    [back] = await conn.receive("a")
    assert back.body == b"job" and back.id != mid
    assert back.headers["x-death"]["queue"] == "b"


async def test_an_early_message_requeued_then_lost_to_a_failed_commit_is_gone_for_good(
        env: Env, autojump_clock: MockClock) -> None:
    """Handed over early, released (its consumer left), then its commit failed: it never
    existed, so no one gets it later, and the counts and credit stay right."""
    first, pending, lost = await handed_over_then_failing(env)
    env.broker.close_session(first.session)  # back to ready, before the commit
    assert env.counts() == (1, 0, 0)
    env.store.delays = None
    with pytest.raises(StoreError):
        await pending.wait()
    assert env.counts() == (0, 0, 0)
    [kept] = await env.send(b"kept")
    second = Conn(env)
    second.consume(prefetch=1)
    got = await second.next()
    assert got.id == kept != lost.id and env.counts() == (0, 1, 0)
    assert (await second.ack([kept]))["acked"] == [kept]
    assert env.counts() == (0, 0, 0)


async def test_a_sink_that_runs_ops_sees_no_half_made_send(
        env: Env, autojump_clock: MockClock) -> None:
    """A consumer's sink may run ops of its own (the AMQP bridge releases a delivery
    whose consumer it no longer knows, which also cuts the open batch): it runs after the
    send has taken its batch, so the send is confirmed only if its put committed, and a
    sink that requeues at once does not recurse."""
    await env.declare()
    store = env.store
    pushed: list[str] = []
    settled = trio.Event()

    def push(tag: str, msgs: list[Message]) -> None:
        pushed.extend(m.id for m in msgs)
        store.current_batch().requests = MAX_BATCH_REQUESTS
        store.seal_if_full()  # cut the batch, as a request between two others does
        if len(pushed) < 50:
            env.broker.nack(session, "q", [m.id for m in msgs])  # straight back
        else:
            settled.set()

    session = Session(push=push)
    env.broker.consume(session, "q", 1)
    store.fail_next = True  # the batch holding the put fails
    pending = env.broker.send("q", [{"body": b"m"}])
    with pytest.raises(StoreError):
        await pending.wait()
    await env.store.flush()
    assert env.store.messages == {} and env.counts() == (0, 0, 0)
    [mid] = await env.send(b"again")
    await settled.wait()  # requeued and handed over again and again, without recursion
    assert pushed[-1] == mid and env.counts() == (0, 1, 0)


async def test_the_timers_of_acked_messages_do_not_pile_up(
        env: Env, autojump_clock: MockClock, monkeypatch: pytest.MonkeyPatch) -> None:
    """An acked message's lease timer stays in the heap until due; at a fast consumer's rate
    and a long visibility timeout that would be millions of entries. They are compacted
    away, and the timers of what is still leased keep working."""
    monkeypatch.setattr(core, "TIMERS_SLACK", 64)
    env.broker._timers_compact_at = 64
    await env.declare(visibility_timeout=600.0)
    conn = Conn(env)
    await env.declare("other")
    await env.send(*[b"x"] * 2005)
    await env.send(b"y", queue="other")  # (the broker holds on to its last send's batch)
    kept = await conn.receive(n=5)  # leased, never acked
    most = 0
    for _ in range(40):
        got = await conn.receive(n=50)
        await conn.ack([m.id for m in got])
        most = max(most, len(env.broker._timers))
    assert env.counts() == (0, 5, 0)
    # At most twice the live ones (5 kept, 50 leased, the last 50 acked still referenced
    # here) plus the slack, plus what came since: not one per lease granted (2,005).
    assert most <= 2 * (5 + 50 + 50) + 64 + 50
    autojump_clock.jump(601)  # the kept leases still run out: redelivered
    await trio.testing.wait_all_tasks_blocked()
    again = await conn.receive(n=5)
    assert sorted(m.id for m in again) == sorted(m.id for m in kept)
    assert all(m.delivery_count == 2 for m in again)
