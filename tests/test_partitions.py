"""A queue of several partitions on one broker (meshq.broker.partitions): placement of
sends, consumers and pull receives over every partition, acks by receipt, counts, purge,
delete and restart. In trio's virtual time over a MemoryStore, as tests/test_broker.py."""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest
from test_broker import Conn, Env
from trio.testing import MockClock

from meshq.broker.partitions import key_partition, parse_receipt, receipt, spread
from meshq.errors import BadRequest, PreconditionFailed
from meshq.server.session import delivery, in_time
from meshq.server.spread import _held

P = 4


def parts(env: Env, name: str = "q") -> list[int]:
    """How many messages each partition holds."""
    return [len(q.messages) for q in env.broker.queues[name]]


def test_keys_and_receipts() -> None:
    assert {key_partition(f"k{i}", 6) for i in range(200)} == set(range(6))
    assert key_partition("anything", 1) == 0
    assert all(key_partition("same", 6) == key_partition("same", 6) for _ in range(3))
    assert spread(100, 6) == [17, 17, 17, 17, 16, 16] and sum(spread(100, 6)) == 100
    assert spread(1, 4) == [1, 1, 1, 1]  # each partition's consumer needs some credit
    assert receipt("m", 0xAB, 0) == "m~ab" and parse_receipt("m~ab") == ("m", 0xAB, 0)
    assert parse_receipt(receipt("m", 0xAB, 3)) == ("m", 0xAB, 3)
    assert parse_receipt("m") == ("m", None, None)
    assert parse_receipt("m~zz~1") == ("m", -1, 1) and parse_receipt("m~1~x")[2] == -1


async def test_a_declare_makes_every_partition_and_its_options_hold(
        env: Env, autojump_clock: MockClock) -> None:
    await env.declare(partitions=P)
    assert [q.index for q in env.broker.queues["q"]] == list(range(P))
    assert all(env.broker.parts["q", i] is env.broker.queues["q"][i] for i in range(P))
    assert env.stats()["options"]["partitions"] == P
    await env.declare()  # no number asked: any matches
    await env.declare(partitions=P)
    with pytest.raises(PreconditionFailed, match="partitions"):
        env.broker.declare("q", {"partitions": 2})
    with pytest.raises(BadRequest, match="partitions"):
        env.broker.declare("big", {"partitions": 257})
    with pytest.raises(BadRequest, match="expires"):
        env.broker.declare("temp", {"partitions": 2, "expires": 5})
    env.broker.default_partitions = lambda options: 3
    await env.declare("dflt")
    assert len(env.broker.queues["dflt"]) == 3


async def test_unkeyed_sends_take_turns_and_keys_pin_their_partition(
        env: Env, autojump_clock: MockClock) -> None:
    await env.declare(partitions=P)
    await env.send(*[b"x"] * 40)  # one send: one partition
    assert sorted(parts(env)) == [0, 0, 0, 40]
    for _ in range(P - 1):
        await env.send(b"y")
    assert sorted(parts(env)) == [1, 1, 1, 40]  # each later send goes to the next one
    await env.broker.purge("q").wait()
    keyed = [{"body": f"{k}:{n}", "partition_key": k} for n in range(5) for k in "abcdef"]
    ids = await env.send(*keyed)
    assert sum(parts(env)) == len(ids) == 30
    for k in "abcdef":  # every message of a key in its key's partition, in order
        q = env.broker.parts["q", key_partition(k, P)]
        bodies = [m.body.decode() for m in sorted(q.messages.values(), key=lambda m: m.hlc)
                  if m.body.decode().startswith(k)]
        assert bodies == [f"{k}:{n}" for n in range(5)]
    with pytest.raises(BadRequest, match="partition_key"):
        env.broker.send("q", [{"body": b"z", "partition_key": 5}])
    wrong = (key_partition("a", P) + 1) % P
    with pytest.raises(BadRequest, match="belongs to partition"):
        env.broker.send("q", [{"body": b"z", "partition_key": "a"}], wrong)


async def test_a_dedup_id_lands_where_its_first_copy_did(
        env: Env, autojump_clock: MockClock) -> None:
    await env.declare(partitions=P)
    first = await env.send(*[{"body": f"m{i}", "dedup_id": f"d{i}"} for i in range(20)])
    again = await env.send(*[{"body": f"m{i}", "dedup_id": f"d{i}"} for i in range(20)])
    assert again == first and sum(parts(env)) == 20
    assert len([n for n in parts(env) if n]) > 1  # spread by dedup id over partitions


async def test_one_consumer_gets_every_partition_with_its_prefetch_spread(
        env: Env, autojump_clock: MockClock) -> None:
    await env.declare(partitions=P)
    for _ in range(P):
        await env.send(*[b"m"] * 10)  # ten in each partition
    conn = Conn(env)
    tag = conn.consume(prefetch=8)
    assert [c.queue.index for c in conn.session.consumers[tag]] == list(range(P))
    got = [await conn.next() for _ in range(8)]
    assert {d.tag for d in got} == {tag}
    assert env.counts() == (32, 8, 0)  # 2 of credit per partition, held by nobody else
    by_part = Counter(next(i for i in range(P) if d.id in env.broker.parts["q", i].messages)
                      for d in got)
    assert sorted(by_part.values()) == [2] * P
    msgs = {m.id: m for q in env.broker.queues["q"] for m in q.messages.values()}
    receipts = [delivery(msgs[d.id], 0.0)["receipt"] for d in got]
    assert all(parse_receipt(r)[2] == msgs[d.id].index for r, d in zip(receipts, got, strict=True))
    result = await env.broker.ack(conn.session, "q", [*receipts[:4], got[4].id]).wait()
    assert len(result["acked"]) == 5 and not result["failed"]
    assert env.stats()["consumers"] == 1
    env.broker.cancel(conn.session, tag)
    assert tag not in conn.session.consumers and env.stats()["consumers"] == 0
    with pytest.raises(BadRequest, match="in use"):
        env.broker.consume(conn.session, "q", 5, tag="t", indexes=[0])
        env.broker.consume(conn.session, "q", 5, tag="t", indexes=[0])


async def test_flow_sets_a_parts_capacity_and_a_watch_sees_its_partition_run_dry(
        env: Env, autojump_clock: MockClock) -> None:
    """Broker.flow (meshq.server.steal): a part's most unsettled leases; 0 pauses it,
    what it holds stays; a part's watch hears of its partition after each dispatch."""
    await env.declare(partitions=P)
    for _ in range(P):
        await env.send(*[b"m"] * 10)
    conn = Conn(env)
    seen: list[tuple[int, int]] = []
    tag = env.broker.consume(conn.session, "q", 8, indexes=[0, 1], capacity=0,
                             watch=lambda q: seen.append((q.index, q.ready)))
    assert env.counts() == (40, 0, 0)  # capacity 0: nothing
    assert (0, 10) in seen and (1, 10) in seen
    assert env.broker.flow(conn.session, tag, [0], 6) == [0]
    got = [await conn.next() for _ in range(6)]
    assert env.counts() == (34, 6, 0)
    assert env.broker.flow(conn.session, tag, [0, 1, 3], 0) == [6, 0, 0]  # (none on 3)
    await conn.ack([d.id for d in got[:2]])
    assert env.counts() == (34, 4, 0)  # paused: acks give it nothing new
    assert env.broker.flow(conn.session, tag, [0], 9) == [4]
    got += [await conn.next() for _ in range(4)]  # the four left in partition 0
    assert env.counts() == (30, 8, 0)
    seen.clear()
    await conn.ack([d.id for d in got[2:]])
    assert env.counts() == (30, 0, 0) and seen[-1] == (0, 0)  # (nothing ready there)
    with pytest.raises(BadRequest, match="capacity"):
        env.broker.flow(conn.session, tag, [0], -1)


async def test_a_pull_receive_draws_from_every_partition_up_to_its_max(
        env: Env, autojump_clock: MockClock) -> None:
    await env.declare(partitions=P)
    for _ in range(P):
        await env.send(b"a", b"b")
    conn = Conn(env)
    got = await conn.receive(n=5)
    assert len(got) == 5 and env.counts() == (3, 5, 0)  # one credit shared by them all
    assert len({m.index for m in got}) >= 3
    got = await conn.receive(n=100)
    assert len(got) == 3
    assert await conn.receive(n=1, wait=2.0) == []  # waited on all four, nothing came
    await env.broker.nack(conn.session, "q", [m.id for m in got]).wait()
    assert env.counts() == (3, 5, 0)


async def test_a_waiting_receive_takes_what_arrives_on_any_partition(
        env: Env, autojump_clock: MockClock) -> None:
    await env.declare(partitions=P)
    conn = Conn(env)
    got: list[Any] = []

    async def wait() -> None:
        got.extend(await conn.receive(n=10, wait=60.0))

    env.nursery.start_soon(wait)
    await env.send(b"late")  # whichever partition it lands in
    await env.send(b"later")
    await env.store.flush()
    while not got:
        await env.store.flush()
    assert [m.body for m in got][:1] == [b"late"]


async def test_counts_purge_delete_and_restart_cover_every_partition(
        env: Env, autojump_clock: MockClock) -> None:
    await env.declare(partitions=P)
    for _ in range(P):
        await env.send(b"m", {"body": b"d", "delay": 60})
    assert env.counts() == (P, 0, P)
    broker = await env.restart()
    assert [len(q.messages) for q in broker.queues["q"]] == [2] * P
    assert env.counts() == (P, 0, P)
    assert await broker.purge("q").wait() == 2 * P
    await env.send(b"left")
    assert await broker.delete_queue("q").wait() == 1
    assert "q" not in broker.queues and not [k for k in broker.parts if k[0] == "q"]


async def test_max_length_bounds_each_partition_by_its_share(
        env: Env, autojump_clock: MockClock) -> None:
    await env.declare(partitions=P, max_length=10)  # 3 each: ceil(10 / 4)
    await env.send(*[f"m{i}".encode() for i in range(5)])  # one send: one partition
    assert sorted(parts(env)) == [0, 0, 0, 3]
    q = next(q for q in env.broker.queues["q"] if q.messages)
    assert sorted(m.body for m in q.messages.values()) == [b"m2", b"m3", b"m4"]  # drop-head
    assert env.stats()["dropped"] == 2
    for _ in range(2 * P):
        await env.send(b"x", b"y")
    assert sorted(parts(env)) == [3] * P and env.stats()["ready"] == 12


def test_a_delivery_late_on_its_way_loses_that_time_from_its_lease() -> None:
    def msgs() -> list[dict[str, Any]]:
        return [{"id": "a", "lease_left": 3.0, "at": 100.0}, {"id": "old", "lease_left": 3.0}]
    # Within the clock offset: as it was (the nodes' clocks may differ that much).
    assert in_time(msgs(), 100.4, 0.5) == [{"id": "a", "lease_left": 3.0},
                                           {"id": "old", "lease_left": 3.0}]
    assert in_time(msgs(), 102.0, 0.5)[0] == {"id": "a", "lease_left": 1.5}
    assert in_time(msgs(), 104.0, 0.5) == [{"id": "old", "lease_left": 3.0}]  # ran out
    # Held on the client's node while a receive asked other partitions: the same.
    held = [{"id": "a", "lease_left": 3.0}, {"id": "b", "lease_left": 3.0}]
    assert _held(held, [10.0, 12.5], 13.0) == [{"id": "b", "lease_left": 2.5}]
