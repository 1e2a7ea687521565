"""Replication with real daemons: three meshqd subprocesses on loopback, N = 3, W = 2.

The guarantees are proven in the simulation of whole nodes (tests/test_sim.py and
tests/test_sim_scenarios.py); these tests show the same paths end to end on real
processes, SIGKILL and SIGSTOP included: issue 9's cases (acks that came back after a
failover, a deleted queue that came back, sends confirmed while the primary was cut off,
consumers broken by a failover, a skewed primary), sends on
one node received on another, a wiped node refilled, a join moving a queue, competing
consumers on three nodes.

Waiting across processes polls status (``eventually``, bounded): there is no event to
await between processes.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
import threading
import time
from pathlib import Path

import pika
import pytest
from test_membership import all_alive, eventually

from meshq.client import Client
from meshq.cluster.placement import ring_key
from meshq.errors import ConsumerCancelled, MeshqError, NotFound
from meshq.mesh.ring import Ring
from meshq.testing import DaemonProcess

NAMES = ("a", "b", "c")


def queue_with_primary(node: str, prefix: str) -> str:
    """A queue name whose preference list starts with ``node`` (all three alive)."""
    return queue_with_preference((node,), prefix, 3)


def queue_with_preference(first: tuple[str, ...], prefix: str, n: int) -> str:
    """A queue name whose preference list for ``n`` replicas over a, b, c starts ``first``."""
    ring = Ring.build(NAMES)
    for i in range(1000):
        name = f"{prefix}-{i}"
        if tuple(ring.preference_list(ring_key(name, 0), n)[:len(first)]) == first:
            return name
    raise AssertionError("no such name")


def status_of(d: DaemonProcess, name: str) -> dict:
    """The queue's entry in this node's status (counts: the cluster's; ``copy_here``:
    this node's own copy)."""
    with d.client(timeout=5, retry_for=0) as c:
        st = c.status()
    return next((q for q in st["queues"] if q["name"] == name), {})


def copy_here(d: DaemonProcess, name: str) -> dict:
    return status_of(d, name).get("copy_here", {})


def replication(d: DaemonProcess) -> dict:
    with d.client(timeout=5, retry_for=0) as c:
        return c.status()["replication"]


def restarted(d: DaemonProcess, seed: DaemonProcess) -> DaemonProcess:
    """The same node again, on its data dir and address (as a machine restarts)."""
    assert d.bind is not None and seed.bind is not None
    return DaemonProcess(d.data_dir, node_name=d.node_name,
                         args=["--bind", d.bind, "--join", seed.bind]).start()


def drain(d: DaemonProcess, name: str, *, wait: float = 1.0) -> list[str]:
    got: list[str] = []
    with d.client(timeout=30) as c:
        while batch := c.receive(name, max=100, wait=wait):
            assert sorted(c.ack(name, batch)) == sorted(m.id for m in batch)
            got += [m.id for m in batch]
    return got


def test_send_on_a_receive_on_c_through_the_primary_b(cluster) -> None:
    name = queue_with_primary("b", "jobs")
    with cluster["a"].client() as a:
        a.declare(name, partitions=1, replicas=3)
        ids = [a.send(name, f"m{i}") for i in range(20)]
    with cluster["c"].client() as c:
        got = c.receive(name, max=20, wait=5)
        assert [d.id for d in got] == ids  # one dispatcher: HLC order
        assert c.ack(name, got) == ids
    for d in cluster.values():  # every copy has the acks (W = 2, then repair)
        eventually(lambda d=d: copy_here(d, name).get("ready") == 0, 15, d.node_name)
        q = status_of(d, name)
        assert q["primary"] == "b" and sorted(q["holders"]) == list(NAMES)
        assert q["dispatching_here"] == (d.node_name == "b")
        assert (q["ready"], q["counted_by"]) == (0, "b")  # the cluster's count, from b


def test_fewer_than_w_reachable_is_unavailable(cluster) -> None:
    name = queue_with_primary("a", "lonely")
    with cluster["a"].client() as a:
        a.declare(name, partitions=1, replicas=3)
        a.send(name, "before")
    cluster["b"].kill()
    cluster["c"].kill()
    eventually(lambda: status_of(cluster["a"], name).get("replicas_effective") == 1,
               30, "b and c dead")
    with cluster["a"].client(timeout=30, retry_for=0) as a:
        for op in (lambda: a.send(name, "after"), lambda: a.receive(name, wait=1)):
            with pytest.raises(MeshqError) as info:
                op()
            assert info.value.code == "UNAVAILABLE"
            assert "needs 2" in info.value.message


def test_confirmed_acks_do_not_come_back_after_the_primary_restarts(cluster) -> None:
    """Issue 9, case 1: 50 sent; the primary SIGKILLed; all 50 received and acked through
    another node; the old primary restarted: nothing is ready again."""
    name = queue_with_primary("a", "acked")
    with cluster["b"].client() as b:
        b.declare(name, partitions=1, replicas=3)
        ids = b.send_batch(name, [f"m{i}" for i in range(50)])
    eventually(lambda: copy_here(cluster["c"], name).get("ready") == 50, 15, "c holds 50")
    cluster["a"].kill()
    assert sorted(drain(cluster["c"], name, wait=10)) == sorted(ids)
    cluster["a"] = restarted(cluster["a"], cluster["b"])
    eventually(lambda: status_of(cluster["a"], name).get("dispatching_here") is True, 30,
               "a dispatches again")
    for d in cluster.values():
        eventually(lambda d=d: copy_here(d, name).get("ready") == 0
                   and copy_here(d, name).get("leased") == 0, 15, f"{d.node_name} empty")
        assert drain(d, name, wait=0.5) == []


def test_a_deleted_queue_does_not_come_back_with_a_replica(cluster) -> None:
    """Issue 9, case 2: one replica SIGKILLed, the queue deleted, the replica restarted:
    the queue stays deleted everywhere and a send to it is NOT_FOUND."""
    name = queue_with_primary("a", "doomed")
    with cluster["a"].client() as a:
        a.declare(name, partitions=1, replicas=3)
        a.send_batch(name, [f"m{i}" for i in range(10)])
    eventually(lambda: copy_here(cluster["c"], name).get("ready") == 10, 15, "c holds 10")
    cluster["c"].kill()
    with cluster["b"].client() as b:
        assert b.delete(name) == 10
    cluster["c"] = restarted(cluster["c"], cluster["a"])
    eventually(lambda: all_alive(list(cluster.values()), set(NAMES)), 30, "c back")
    # Two rounds of catalog exchange and repair on every node (each round compares the
    # catalog with every live node): whatever could bring the queue back, has had its go.
    rounds = {n: replication(d)["repair_rounds"] for n, d in cluster.items()}
    for n, d in cluster.items():
        eventually(lambda d=d, n=n: replication(d)["repair_rounds"] >= rounds[n] + 2, 30,
                   f"two repair rounds on {n}")
    for d in cluster.values():
        assert status_of(d, name) == {}, d.node_name
        with d.client(retry_for=0) as c, pytest.raises(NotFound):
            c.send(name, "after")


def test_a_consumer_survives_the_primarys_death(cluster) -> None:
    """Issue 9, case 4: a consumer on c holds leases from the primary a when a is
    SIGKILLed; its acks succeed afterwards (receipts), its subscription goes on by
    itself, and a producer on b sees no error."""
    name = queue_with_primary("a", "failover")
    with cluster["b"].client() as b:
        b.declare(name, partitions=1, replicas=3, visibility_timeout=60)
        b.send_batch(name, [f"m{i}" for i in range(10)])
    with Client(cluster["c"].socket, timeout=60) as c, \
            Client(cluster["b"].socket, timeout=60) as b, c.consume(name, prefetch=5) as sub:
        held = [sub.get(timeout=10) for _ in range(5)]
        assert all(held)
        t_kill = time.monotonic()
        cluster["a"].kill()
        mid = b.send(name, "after the kill")  # retried and deduplicated by the client
        t_send = time.monotonic() - t_kill
        assert sorted(c.ack(name, held)) == sorted(d.id for d in held)
        seen = []
        while mid not in seen:
            d = sub.get(timeout=30)
            assert d is not None, f"nothing after the failover; seen {seen}"
            seen.append(d.id)
            c.ack(name, [d])
        t_delivery = time.monotonic() - t_kill
    assert t_send < 10 and t_delivery < 15, (t_send, t_delivery)


def test_a_deleted_queue_ends_subscriptions_with_an_exception(cluster) -> None:
    name = queue_with_primary("b", "gone")
    with cluster["a"].client() as a:
        a.declare(name, partitions=1, replicas=3)
    with Client(cluster["c"].socket, timeout=30) as c, c.consume(name, prefetch=5) as sub:
        with cluster["a"].client() as a:
            a.delete(name)
        with pytest.raises(ConsumerCancelled):
            sub.get(timeout=10)


SHIFT_CLOCK = """\
import os, time
_shift = float(os.environ.get("MESHQ_TEST_CLOCK_SHIFT") or 0)
if _shift:
    _real_time = time.time
    time.time = lambda: _real_time() + _shift
"""


def test_a_primary_with_a_skewed_clock_hands_over(tmp_path: Path) -> None:
    """Issue 9, case 5: a node 3 s ahead of the others refuses writes, stops being any
    queue's primary, and its queues stay writable through the others."""
    shim = tmp_path / "shim"
    shim.mkdir()
    (shim / "sitecustomize.py").write_text(SHIFT_CLOCK)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(shim), *sys.path]),
           "MESHQ_TEST_CLOCK_SHIFT": "3"}
    a = DaemonProcess(tmp_path / "a", node_name="a").start()
    assert a.bind is not None
    b = DaemonProcess(tmp_path / "b", node_name="b", args=["--join", a.bind]).start()
    c = DaemonProcess(tmp_path / "c", node_name="c", args=["--join", a.bind], env=env).start()
    nodes = [a, b, c]
    try:
        name = queue_with_primary("c", "skewed")
        eventually(lambda: all_alive(nodes, set(NAMES)), 15, "all alive")
        with a.client() as ca:
            ca.declare(name, partitions=1, replicas=3)
        eventually(lambda: status_of(a, name).get("primary") in ("a", "b"), 30,
                   "c is not primary (its clock is refused)")
        with c.client() as cc:
            status = cc.status()
            assert status["node"]["accepting_writes"] is False
            mid = cc.send(name, "through the skewed node")  # relayed to the primary
        with b.client() as cb:
            [got] = cb.receive(name, wait=5)
            assert got.id == mid
            cb.ack(name, [got])
        assert c.amqp is not None  # an AMQP publisher there is told: connection.blocked
        host, port = c.amqp.rsplit(":", 1)
        amqp = pika.BlockingConnection(pika.ConnectionParameters(host, int(port)))
        blocked: list[str] = []
        amqp.add_on_connection_blocked_callback(
            lambda _, frame: blocked.append(frame.method.reason))
        deadline = time.monotonic() + 10
        while not blocked and time.monotonic() < deadline:
            amqp.process_data_events(time_limit=0.2)
        amqp.close()
        assert blocked and "accepts no writes" in blocked[0], blocked
    finally:
        for d in nodes:
            d.kill()


def test_kill_the_primary_mid_stream_loses_nothing_and_it_catches_up(cluster) -> None:
    """A receive in flight when the primary dies may have leased messages whose answer
    was lost: those come back after the visibility timeout (at-least-once, as SQS), so it
    is short here."""
    name = queue_with_primary("a", "stream")
    with cluster["b"].client() as b:
        b.declare(name, partitions=1, replicas=3, visibility_timeout=5)
    confirmed: list[str] = []
    errors: list[BaseException] = []
    received: set[str] = set()
    stop = threading.Event()

    def produce() -> None:
        try:
            with Client(cluster["b"].socket, timeout=30) as b:
                for i in range(300):
                    confirmed.append(b.send(name, f"p{i}"))  # retried through the failover
        except BaseException as exc:  # reported below
            errors.append(exc)

    def consume() -> None:
        try:
            with Client(cluster["c"].socket, timeout=30) as c:
                while not stop.is_set():
                    got = c.receive(name, max=10, wait=0.5)
                    if got:
                        c.ack(name, got)
                        received.update(d.id for d in got)
        except BaseException as exc:  # reported below
            errors.append(exc)

    producer = threading.Thread(target=produce)
    consumer = threading.Thread(target=consume)
    producer.start()
    consumer.start()
    eventually(lambda: len(confirmed) >= 100, 30, "100 sends confirmed")
    cluster["a"].kill()
    eventually(lambda: len(confirmed) >= 200, 60, "sends go on through b and c")
    cluster["a"] = restarted(cluster["a"], cluster["b"])
    producer.join(120)
    eventually(lambda: all_alive(list(cluster.values()), set(NAMES)), 30, "a back")
    eventually(lambda: set(confirmed) <= received, 60, "every confirmed send received")
    stop.set()
    consumer.join(30)
    assert not errors, errors
    for d in cluster.values():  # the restarted node caught up: every copy is empty
        eventually(lambda d=d: replication(d)["hinted_messages"] == 0, 30, "hints drained")
        eventually(lambda d=d: copy_here(d, name).get("ready") == 0
                   and copy_here(d, name).get("leased") == 0, 30, f"{d.node_name} equal")


def test_a_wiped_node_is_refilled_by_anti_entropy(cluster) -> None:
    name = queue_with_primary("a", "wiped")
    with cluster["b"].client() as b:
        b.declare(name, partitions=1, replicas=3)
        ids = b.send_batch(name, [f"m{i}" for i in range(50)])
    c = cluster["c"]
    eventually(lambda: copy_here(c, name).get("ready") == 50, 15, "c holds all 50")
    c.kill()
    shutil.rmtree(c.data_dir)
    cluster["c"] = c = restarted(c, cluster["a"])
    eventually(lambda: copy_here(c, name).get("ready") == 50, 30, "c refilled")
    with c.client() as cc:
        got = cc.receive(name, max=50, wait=5)
    assert sorted(d.id for d in got) == sorted(ids)
    assert replication(cluster["a"])["repaired"]["sent"] >= 50


def test_competing_consumers_on_all_three_nodes_share_a_queue(cluster) -> None:
    name = queue_with_primary("b", "shared")
    total = 300
    with cluster["a"].client() as a:
        a.declare(name, partitions=1, replicas=3)
    counts = consumers_on_every_node(cluster, name, total, prefetch=5, batch=total)
    for node, n in counts.items():  # round-robin: about a third each
        assert total / 3 * 0.6 <= n <= total / 3 * 1.4, (node, counts)


def consumers_on_every_node(cluster, name: str, total: int, *, prefetch: int,
                            batch: int) -> dict[str, int]:
    """A subscription on each node, then ``total`` messages sent on c in batches: how
    many each node's consumer acked."""
    counts = dict.fromkeys(NAMES, 0)
    done = threading.Event()
    lock = threading.Lock()
    subscribed = threading.Barrier(4)

    def consume(node: str) -> None:
        with Client(cluster[node].socket, timeout=30) as c:
            sub = c.consume(name, prefetch=prefetch)
            subscribed.wait(15)
            while not done.is_set():
                d = sub.get(timeout=0.5)
                if d is None:
                    continue
                sub.ack(d)
                with lock:
                    counts[node] += 1
                    if sum(counts.values()) == total:
                        done.set()

    threads = [threading.Thread(target=consume, args=(n,)) for n in NAMES]
    for t in threads:
        t.start()
    subscribed.wait(15)
    with cluster["c"].client() as c:
        for start in range(0, total, batch):
            c.send_batch(name, [f"m{i}" for i in range(start, min(total, start + batch))])
    assert done.wait(60), counts
    for t in threads:
        t.join(10)
    assert sum(counts.values()) == total
    return counts


def test_a_join_moves_a_queue_to_its_new_holder(tmp_path: Path) -> None:
    """replicas = 2: on a and b the queue lives on both; once c joins, its holders are
    a and c, so b hands its copy over and forgets it, and c is filled."""
    name = queue_with_preference(("a", "c"), "moved", 2)
    a = DaemonProcess(tmp_path / "a", node_name="a").start()
    assert a.bind is not None
    b = DaemonProcess(tmp_path / "b", node_name="b", args=["--join", a.bind]).start()
    nodes = [a, b]
    try:
        eventually(lambda: all_alive(nodes, {"a", "b"}), 15, "a and b alive")
        with a.client() as ca:
            ca.declare(name, partitions=1, replicas=2)
            ids = ca.send_batch(name, [f"m{i}" for i in range(20)])
        eventually(lambda: copy_here(b, name).get("ready") == 20, 15, "b holds a copy")
        c = DaemonProcess(tmp_path / "c", node_name="c", args=["--join", a.bind]).start()
        nodes.append(c)
        eventually(lambda: copy_here(c, name).get("ready") == 20, 30, "c filled")
        eventually(lambda: copy_here(b, name).get("ready") == 0, 30, "b forgot its copy")
        assert sorted(status_of(c, name)["holders"]) == ["a", "c"]
        assert replication(b)["hinted_messages"] == 0
        assert replication(b)["repaired"]["handed_off"] >= 1
        with b.client() as cb:  # still served from b, relayed to the primary
            got = cb.receive(name, max=20, wait=5)
        assert sorted(d.id for d in got) == sorted(ids)
    finally:
        for d in nodes:
            d.kill()


def test_a_node_away_longer_than_the_tombstone_window_must_be_wiped(tmp_path: Path) -> None:
    """What was deleted while it was away could come back through its copy: it refuses
    to start, and says what to do; wiped, it starts and is refilled."""
    import sqlite3

    a = DaemonProcess(tmp_path / "a", node_name="a").start()
    assert a.bind is not None
    b = DaemonProcess(tmp_path / "b", node_name="b", args=["--join", a.bind]).start()
    try:
        eventually(lambda: all_alive([a, b], {"a", "b"}), 15, "a and b alive")
        with a.client() as ca:
            ca.declare("kept", partitions=1, replicas=2)
            ca.send("kept", "m")
        eventually(lambda: copy_here(b, "kept").get("ready") == 1, 15, "b holds a copy")
        assert b.stop() == 0
        db = sqlite3.connect(b.data_dir / "meshq.db")
        with db:
            db.execute("UPDATE meta SET value=? WHERE key='last_alive'",
                       (repr(time.time() - 2 * 3600),))
        db.close()
        with pytest.raises(RuntimeError) as info:
            b.start()
        assert "longer than the 1 h tombstone window" in str(info.value)
        assert "Remove its data directory" in str(info.value)
        shutil.rmtree(b.data_dir)
        b.start()
        eventually(lambda: copy_here(b, "kept").get("ready") == 1, 30, "b refilled")
    finally:
        a.kill()
        b.kill()


def test_sends_confirmed_while_the_primary_was_frozen_are_delivered_after_it_returns(
        cluster) -> None:
    """Issue 9, case 3 on real processes: the primary a is frozen (SIGSTOP: cut off, as in
    a partition, from the others' view) while a producer on b goes on; b and c take over
    and confirm its sends. After SIGCONT, a comes back believing it dispatches; it is
    fenced, the copies merge, and every confirmed send (before and during the freeze) is
    received, and no copy keeps a message."""
    name = queue_with_primary("a", "frozen")
    with cluster["b"].client() as b:
        b.declare(name, partitions=1, replicas=3, visibility_timeout=30)
        before = b.send_batch(name, [f"before-{i}" for i in range(20)])
    a = cluster["a"]
    assert a.proc is not None
    os.kill(a.proc.pid, signal.SIGSTOP)
    try:
        with Client(cluster["b"].socket, timeout=30) as b:
            during = [b.send(name, f"during-{i}") for i in range(30)]  # through the takeover
    finally:
        os.kill(a.proc.pid, signal.SIGCONT)
    eventually(lambda: all_alive(list(cluster.values()), set(NAMES)), 30, "a back")
    received: set[str] = set()
    eventually(lambda: received.update(drain(cluster["c"], name, wait=0.2))
               or set(before + during) <= received, 60, "every confirmed send received")
    for d in cluster.values():
        eventually(lambda d=d: copy_here(d, name).get("ready") == 0
                   and copy_here(d, name).get("leased") == 0, 30, f"{d.node_name} empty")
