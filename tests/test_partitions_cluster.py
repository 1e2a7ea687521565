"""Partitioned queues on real daemons: three meshqd subprocesses on loopback.

The simulation of whole nodes (tests/test_sim.py, tools/simulate.py) runs partitioned
queues under faults; these tests show the same end to end: one queue of six partitions
spread over three nodes, producers on every node and one consumer that gets every
message exactly once, a partition key keeping its messages' order, a fifo queue keeping
HLC order across producers on every node, consumers on every node sharing the queue, and
a SIGKILLed node losing no confirmed message.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import Counter

import pytest
from test_membership import eventually
from test_replication import NAMES, consumers_on_every_node, status_of

from meshq.broker.partitions import parse_receipt
from meshq.client import Client
from meshq.testing.history import fifo_breaks

P = 6


def spread_name(prefix: str) -> str:
    """A queue name (any: its six partitions' primaries are spread 2/2/2 over a, b, c,
    meshq.cluster.placement.partition_keys, which the tests check in status)."""
    return f"{prefix}-q"


def produce(cluster, name: str, node: str, count: int, errors: list[BaseException]) -> None:
    try:
        with Client(cluster[node].socket, timeout=60) as c:
            for start in range(0, count, 20):
                c.send_batch(name, [f"{node}-{i}" for i in range(start, start + 20)])
    except BaseException as e:  # (reported by the test, not lost in the thread)
        errors.append(e)


def test_six_partitions_on_three_nodes_one_consumer_gets_every_message_once(cluster) -> None:
    name = spread_name("wide")
    per_node = 200
    with cluster["a"].client() as a:
        a.declare(name, partitions=P, replicas=3)
    entry = status_of(cluster["b"], name)
    assert [p["index"] for p in entry["partitions"]] == list(range(P))
    assert Counter(p["primary"] for p in entry["partitions"]) == dict.fromkeys(NAMES, 2)
    assert all(sorted(p["holders"]) == list(NAMES) for p in entry["partitions"])
    errors: list[BaseException] = []
    producers = [threading.Thread(target=produce, args=(cluster, name, n, per_node, errors))
                 for n in NAMES]
    for t in producers:
        t.start()
    got: Counter[str] = Counter()
    indexes: set[int] = set()
    with Client(cluster["a"].socket, timeout=60) as c, c.consume(name, prefetch=30) as sub:
        while sum(got.values()) < per_node * len(NAMES):
            d = sub.get(timeout=30)
            assert d is not None, f"nothing more after {sum(got.values())}: {errors}"
            got[d.text()] += 1
            indexes.add(parse_receipt(d.receipt)[2] or 0)
            sub.ack(d)
    for t in producers:
        t.join(30)
    assert not errors
    expected = {f"{n}-{i}" for n in NAMES for i in range(per_node)}
    assert set(got) == expected and set(got.values()) == {1}
    assert indexes == set(range(P))  # every partition took sends and was drawn from
    with cluster["c"].client() as c:
        assert c.receive(name, max=10, wait=1) == []  # nothing left, nothing twice
    for d in cluster.values():
        eventually(lambda d=d: status_of(d, name)["ready"] == 0
                   and status_of(d, name)["leased"] == 0, 15, d.node_name)


def test_a_partition_key_keeps_its_messages_in_order(cluster) -> None:
    name = spread_name("keyed")
    with cluster["a"].client() as a:
        a.declare(name, partitions=P, replicas=3)
    keys = [f"user{k}" for k in range(8)]
    with cluster["b"].client() as b:
        for n in range(25):
            b.send_batch(name, [{"body": f"{k}:{n}", "partition_key": k} for k in keys])
    with cluster["c"].client() as c:
        seen: dict[str, list[int]] = {k: [] for k in keys}
        where: dict[str, set[int]] = {k: set() for k in keys}
        while sum(map(len, seen.values())) < 25 * len(keys):
            batch = c.receive(name, max=50, wait=10)
            assert batch, seen
            for d in batch:
                k, n = d.text().split(":")
                seen[k].append(int(n))
                where[k].add(parse_receipt(d.receipt)[2] or 0)
            c.ack(name, batch)
    assert all(ns == list(range(25)) for ns in seen.values()), seen
    assert all(len(w) == 1 for w in where.values())  # one partition per key
    assert len(set().union(*where.values())) > 1  # and keys spread over partitions


def test_consumers_on_every_node_share_a_partitioned_queue(cluster) -> None:
    name = spread_name("shared")
    total = 600
    with cluster["a"].client() as a:
        a.declare(name, partitions=P, replicas=3)
    counts = consumers_on_every_node(cluster, name, total, prefetch=6, batch=10)
    for node, n in counts.items():  # round-robin over the queue: about a third each
        assert total / 3 * 0.6 <= n <= total / 3 * 1.4, (node, counts)


def test_a_killed_node_loses_no_confirmed_message_of_a_partitioned_queue(cluster) -> None:
    """Producers on b and c and a consumer on c; a, primary of two partitions, is
    SIGKILLed mid-stream. Every confirmed send is delivered, none twice once acked."""
    name = spread_name("crash")
    with cluster["b"].client() as b:
        b.declare(name, partitions=P, replicas=3, visibility_timeout=30)
    confirmed: list[str] = []
    stop = threading.Event()
    errors: list[BaseException] = []

    def produce_until_stopped(node: str) -> None:
        try:
            with Client(cluster[node].socket, timeout=60) as c:
                i = 0
                while not stop.is_set():
                    c.send_batch(name, [f"{node}-{i + j}" for j in range(5)])
                    confirmed.extend(f"{node}-{i + j}" for j in range(5))
                    i += 5
        except BaseException as e:
            errors.append(e)

    producers = [threading.Thread(target=produce_until_stopped, args=(n,)) for n in "bc"]
    for t in producers:
        t.start()
    eventually(lambda: len(confirmed) >= 200, 30, "sends before the kill")
    cluster["a"].kill()
    at_kill = len(confirmed)
    eventually(lambda: len(confirmed) >= at_kill + 200, 60, "sends after the kill")
    stop.set()
    for t in producers:
        t.join(60)
    assert not errors, errors
    got: Counter[str] = Counter()
    deadline = time.monotonic() + 60
    with Client(cluster["c"].socket, timeout=60) as c:
        while set(confirmed) - set(got) and time.monotonic() < deadline:
            batch = c.receive(name, max=100, wait=5)
            got.update(d.text() for d in batch)
            c.ack(name, batch)
    assert not set(confirmed) - set(got), f"lost: {sorted(set(confirmed) - set(got))[:10]}"
    assert len(confirmed) == len(set(confirmed))


@pytest.mark.parametrize("pull", [False, True])
def test_a_fifo_queue_keeps_hlc_order_across_producers_on_three_nodes(cluster,
                                                                     pull: bool) -> None:
    """Six partitions, two on each node, producers on every node at once, one consumer
    (a subscription, or receives): it gets every message once, in (HLC, node) order
    cluster-wide (closed timestamps, meshq.server.fifo); tests/test_fifo_sim.py shows a
    fair queue does not."""
    name = spread_name("fifo")
    per_node = 200
    with cluster["a"].client() as a:
        a.declare(name, partitions=P, replicas=3, ordering="fifo")
    errors: list[BaseException] = []
    producers = [threading.Thread(target=produce, args=(cluster, name, n, per_node, errors))
                 for n in NAMES]
    seen: list[tuple[str, tuple[int, str], bool, float]] = []
    indexes: set[int] = set()
    with Client(cluster["a"].socket, timeout=60) as c, (
            contextlib.nullcontext() if pull else c.consume(name, prefetch=30)) as sub:
        for t in producers:
            t.start()
        while len(seen) < per_node * len(NAMES):
            got = c.receive(name, max=30, wait=30) if sub is None else [sub.get(timeout=30)]
            assert got and got[0] is not None, f"nothing more after {len(seen)}: {errors}"
            for d in got:
                seen.append((d.text(), (d.hlc, d.id.split("-", 1)[1]), d.redelivered,
                             time.monotonic()))
                indexes.add(parse_receipt(d.receipt)[2] or 0)
            c.ack(name, got)
    for t in producers:
        t.join(30)
    assert not errors
    assert sorted(body for body, _, _, _ in seen) == sorted(
        f"{n}-{i}" for n in NAMES for i in range(per_node))  # each once
    assert indexes == set(range(P))  # drawn from every partition
    assert fifo_breaks("a", seen) == []
    assert [key for _, key, _, _ in seen] == sorted(key for _, key, _, _ in seen)
