"""Replication with real daemons (issue 3): three meshqd subprocesses on loopback, N = 3,
W = 2. Sends on one node are received on another; a SIGKILLed node loses nothing
confirmed and catches up after its restart; a wiped node is refilled by anti-entropy;
a join moves a queue's copy to its new holder; competing consumers on all three nodes
share a queue.

Waiting across processes polls status (``eventually``, bounded): there is no event to
await between processes.
"""

from __future__ import annotations

import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_membership import all_alive, eventually

from meshq.client import Client
from meshq.errors import MeshqError
from meshq.mesh.ring import Ring
from meshq.testing import DaemonProcess
from meshq.testing.history import History

NAMES = ("a", "b", "c")


def queue_with_primary(node: str, prefix: str) -> str:
    """A queue name whose preference list starts with ``node`` (all three alive)."""
    return queue_with_preference((node,), prefix, 3)


def queue_with_preference(first: tuple[str, ...], prefix: str, n: int) -> str:
    """A queue name whose preference list for ``n`` replicas over a, b, c starts ``first``."""
    ring = Ring.build(NAMES)
    for i in range(1000):
        name = f"{prefix}-{i}"
        if tuple(ring.preference_list(name, n)[:len(first)]) == first:
            return name
    raise AssertionError("no such name")


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[dict[str, DaemonProcess]]:
    a = DaemonProcess(tmp_path / "a", node_name="a").start()
    assert a.bind is not None
    nodes = {"a": a}
    for n in ("b", "c"):
        nodes[n] = DaemonProcess(tmp_path / n, node_name=n, args=["--join", a.bind]).start()
    eventually(lambda: all_alive(list(nodes.values()), set(NAMES)), 15, "all alive")
    yield nodes
    for d in nodes.values():
        d.kill()


def local_queue(d: DaemonProcess, name: str) -> dict:
    """The queue as this node's own copy has it (status, not relayed)."""
    with d.client(timeout=5) as c:
        st = c.status()
    return next((q for q in st["queues"] if q["name"] == name), {})


def replication(d: DaemonProcess) -> dict:
    with d.client(timeout=5) as c:
        return c.status()["replication"]


def test_send_on_a_receive_on_c_through_the_primary_b(cluster) -> None:
    name = queue_with_primary("b", "jobs")
    with cluster["a"].client() as a:
        a.declare(name, replicas=3)
        ids = [a.send(name, f"m{i}") for i in range(20)]
    with cluster["c"].client() as c:
        got = c.receive(name, max=20, wait=5)
        assert [d.id for d in got] == ids  # one dispatcher: HLC order
        assert c.ack(name, ids) == ids
    for d in cluster.values():  # every holder has applied the acks (W = 2, then repair)
        eventually(lambda d=d: local_queue(d, name).get("ready") == 0, 15, f"{d.node_name}")
        q = local_queue(d, name)
        assert q["primary"] == "b" and sorted(q["holders"]) == list(NAMES)
        assert q["dispatching_here"] == (d.node_name == "b")


def test_fewer_than_w_reachable_is_unavailable(cluster) -> None:
    name = queue_with_primary("a", "lonely")
    with cluster["a"].client() as a:
        a.declare(name, replicas=3)
        a.send(name, "before")
    cluster["b"].kill()
    cluster["c"].kill()
    with cluster["a"].client(timeout=30) as a:
        eventually(lambda: local_queue(cluster["a"], name).get("replicas_effective") == 1,
                   30, "b and c dead")
        with pytest.raises(MeshqError) as info:
            a.send(name, "after")
        assert info.value.code == "UNAVAILABLE"
        assert "needs 2" in info.value.message


def restarted(d: DaemonProcess, seed: DaemonProcess) -> DaemonProcess:
    """The same node again, on its data dir and address (as a machine restarts)."""
    assert d.bind is not None and seed.bind is not None
    return DaemonProcess(d.data_dir, node_name=d.node_name,
                         args=["--bind", d.bind, "--join", seed.bind]).start()


def _retrying(fn, *args, deadline: float = 60.0, **kwargs):
    """Call until it stops failing UNAVAILABLE (a node is down; membership is changing)."""
    end = time.monotonic() + deadline
    while True:
        try:
            return fn(*args, **kwargs)
        except (MeshqError, OSError) as exc:
            code = getattr(exc, "code", "")
            if time.monotonic() > end or code not in ("UNAVAILABLE", "TIMEOUT", ""):
                raise
            time.sleep(0.05)  # a retry pace, not a wait for an event


def test_kill_the_primary_mid_stream_loses_nothing_and_it_catches_up(cluster) -> None:
    name = queue_with_primary("a", "stream")
    history = History(lease_slack=1.0)
    with cluster["b"].client() as b:
        b.declare(name, replicas=3, visibility_timeout=30)
    stop = threading.Event()
    errors: list[BaseException] = []

    def produce() -> None:
        with Client(cluster["b"].socket, timeout=30) as b:
            for i in range(400):
                key = f"p{i}"
                history.send_invoked("p", key)
                for _ in range(600):  # retried until confirmed: a node is down for a while
                    try:
                        mid = b.send(name, key)
                    except MeshqError as exc:
                        history.send_failed("p", key, exc.code, time.monotonic())
                        time.sleep(0.05)  # a retry pace, not a wait for an event
                        continue
                    history.send_confirmed("p", key, mid, time.monotonic())
                    break

    def consume() -> None:
        c = Client(cluster["c"].socket, timeout=30)
        try:
            while not stop.is_set():
                try:
                    got = c.receive(name, max=10, wait=0.5)
                except (MeshqError, OSError):
                    c.close()
                    c = Client(cluster["c"].socket, timeout=30)
                    continue
                now = time.monotonic()
                for d in got:
                    history.delivered("c", d.id, d.delivery_count, d.redelivered, now + 30, now)
                try:
                    acked = c.ack(name, [d.id for d in got]) if got else []
                except (MeshqError, OSError):  # no answer: the outcome is unknown
                    for d in got:
                        history.ack_unknown("c", d.id, time.monotonic())
                    continue
                for d in got:
                    if d.id in acked:
                        history.ack_confirmed("c", d.id, time.monotonic())
                    else:
                        history.ack_failed("c", d.id, time.monotonic())
        except BaseException as exc:  # reported below
            errors.append(exc)
        finally:
            c.close()

    producer = threading.Thread(target=produce)
    consumer = threading.Thread(target=consume)
    producer.start()
    consumer.start()
    eventually(lambda: len(history._confirmed) >= 100, 30, "100 sends confirmed")
    t_kill = time.monotonic()
    cluster["a"].kill()
    eventually(lambda: len(history._confirmed) >= 200, 60, "sends resume on b and c")
    cluster["a"] = restarted(cluster["a"], cluster["b"])
    producer.join(120)
    eventually(lambda: all_alive(list(cluster.values()), set(NAMES)), 30, "a back")
    eventually(lambda: local_queue(cluster["a"], name).get("dispatching_here") is True, 30,
               "a dispatches again")
    history.unstable(t_kill, time.monotonic())
    # Drain what is left (through c, relayed to a), then stop the consumer.
    eventually(lambda: local_queue(cluster["a"], name).get("ready", 1) == 0
               and local_queue(cluster["a"], name).get("leased", 1) == 0, 90, "drained")
    stop.set()
    consumer.join(30)
    assert not errors
    final: list[str] = []
    with cluster["b"].client(timeout=30) as b:
        final = [d.id for d in _retrying(b.receive, name, max=1000, wait=0.5)]
    history.final_contents(final)
    report = history.check()
    report.assert_ok()
    assert report.confirmed_sends >= 200
    # The restarted node caught up: every copy agrees, no hint is left anywhere.
    for d in cluster.values():
        eventually(lambda d=d: replication(d)["hinted_messages"] == 0, 30, "hints drained")
        eventually(lambda d=d: local_queue(d, name).get("ready") == len(final)
                   and local_queue(d, name).get("leased") == 0, 30, f"{d.node_name} equal")


def test_a_wiped_node_is_refilled_by_anti_entropy(cluster) -> None:
    name = queue_with_primary("a", "wiped")
    with cluster["b"].client() as b:
        b.declare(name, replicas=3)
        ids = b.send_batch(name, [f"m{i}" for i in range(50)])
    c = cluster["c"]
    eventually(lambda: local_queue(c, name).get("ready") == 50, 15, "c holds all 50")
    c.kill()
    shutil.rmtree(c.data_dir)
    cluster["c"] = c = restarted(c, cluster["a"])
    eventually(lambda: local_queue(c, name).get("ready") == 50, 30, "c refilled")
    with c.client() as cc:
        got = cc.receive(name, max=50, wait=5)
    assert sorted(d.id for d in got) == sorted(ids)
    assert replication(cluster["a"])["repaired"]["sent"] >= 50


def test_competing_consumers_on_all_three_nodes_share_a_queue(cluster) -> None:
    name = queue_with_primary("b", "shared")
    total = 300
    with cluster["a"].client() as a:
        a.declare(name, replicas=3)
    counts = dict.fromkeys(NAMES, 0)
    done = threading.Event()
    lock = threading.Lock()
    subscribed = threading.Barrier(4)

    def consume(node: str) -> None:
        with Client(cluster[node].socket, timeout=30) as c:
            sub = c.consume(name, prefetch=5)
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
        c.send_batch(name, [f"m{i}" for i in range(total)])
    assert done.wait(60), counts
    for t in threads:
        t.join(10)
    assert sum(counts.values()) == total
    for node, n in counts.items():  # round-robin: about a third each
        assert total / 3 * 0.6 <= n <= total / 3 * 1.4, (node, counts)


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
            ca.declare(name, replicas=2)
            ids = ca.send_batch(name, [f"m{i}" for i in range(20)])
        eventually(lambda: local_queue(b, name).get("ready") == 20, 15, "b holds a copy")
        c = DaemonProcess(tmp_path / "c", node_name="c", args=["--join", a.bind]).start()
        nodes.append(c)
        eventually(lambda: local_queue(c, name).get("ready") == 20, 30, "c filled")
        eventually(lambda: local_queue(b, name).get("ready") == 0, 30, "b forgot its copy")
        assert local_queue(c, name)["holders"] == ["a", "c"]
        assert replication(b)["hinted_messages"] == 0
        assert replication(b)["repaired"]["handed_off"] >= 1
        with b.client() as cb:  # still served from b, relayed to the primary a
            got = cb.receive(name, max=20, wait=5)
        assert sorted(d.id for d in got) == sorted(ids)
    finally:
        for d in nodes:
            d.kill()
