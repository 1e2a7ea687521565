"""AMQP on a cluster of three real meshqd (N = 3, W = 2): a client on any node reaches
every queue, a confirm means W replicas have the message, and a node SIGKILLed under a
publisher with confirms loses no confirmed message. ``cluster``: tests/conftest.py."""

from __future__ import annotations

import threading

import pika
import pika.exceptions
from test_membership import all_alive, eventually
from test_replication import NAMES, copy_here, queue_with_primary, restarted, status_of

from meshq.testing import DaemonProcess


def connect(d: DaemonProcess) -> pika.BlockingConnection:
    assert d.amqp is not None
    host, port = d.amqp.rsplit(":", 1)
    return pika.BlockingConnection(pika.ConnectionParameters(host, int(port),
                                                             blocked_connection_timeout=60))


def consume_all(d: DaemonProcess, queue: str, expect: int | None = None,
                idle: float = 2.0) -> list[bytes]:
    """Every message (``expect`` of them, or until ``idle`` s pass with none)."""
    conn = connect(d)
    ch = conn.channel()
    ch.basic_qos(prefetch_count=100)
    got = []
    for method, _, body in ch.consume(queue, inactivity_timeout=idle if expect is None
                                      else 30):
        if method is None:
            break
        got.append(body)
        ch.basic_ack(method.delivery_tag)
        if len(got) == expect:
            break
    ch.cancel()
    conn.close()
    return got


def test_a_confirm_means_w_replicas_and_any_node_reaches_every_queue(cluster) -> None:
    name = queue_with_primary("b", "amqp")
    conn = connect(cluster["a"])  # the client's node is not the queue's primary
    ch = conn.channel()
    ch.queue_declare(name, durable=True)
    ch.exchange_declare("jobs.x", "direct")
    ch.queue_bind(name, "jobs.x", "go")
    ch.confirm_delivery()
    for i in range(50):
        ch.basic_publish("jobs.x", "go", f"m{i}".encode(),
                         pika.BasicProperties(delivery_mode=2))
    conn.close()
    # confirmed: W = 2 copies have every message (the primary b and one more), now
    copies = [copy_here(d, name).get("ready", 0) for d in cluster.values()]
    assert sum(c == 50 for c in copies) >= 2, copies
    assert status_of(cluster["c"], name)["primary"] == "b"
    got = consume_all(cluster["c"], name, 50)  # a consumer on the third node
    assert got == [f"m{i}".encode() for i in range(50)]
    other = connect(cluster["c"])  # the exchange and binding reached c with the catalog
    och = other.channel()
    eventually(lambda: _has_exchange(cluster["c"], "jobs.x"), 10, "exchange on c")
    och.confirm_delivery()
    och.basic_publish("jobs.x", "go", b"via c")
    other.close()
    assert consume_all(cluster["a"], name, 1) == [b"via c"]


def _has_exchange(d: DaemonProcess, name: str) -> bool:
    conn = connect(d)
    try:
        conn.channel().exchange_declare(name, passive=True)
        return True
    except pika.exceptions.ChannelClosedByBroker:
        return False
    finally:
        if conn.is_open:
            conn.close()


def test_a_primary_sigkilled_under_an_amqp_publisher_loses_no_confirmed_message(
        cluster) -> None:
    name = queue_with_primary("b", "amqpkill")
    conn = connect(cluster["a"])
    ch = conn.channel()
    ch.queue_declare(name, durable=True)
    ch.confirm_delivery()
    confirmed: list[bytes] = []
    nacked = 0
    killed = threading.Event()

    def kill_when_busy() -> None:
        eventually(lambda: len(confirmed) >= 100, 30, "publishing")
        cluster["b"].kill()
        killed.set()

    killer = threading.Thread(target=kill_when_busy)
    killer.start()
    try:
        i = 0
        while not killed.is_set() or len(confirmed) < 300:
            body = f"m{i}".encode()
            i += 1
            try:
                ch.basic_publish("", name, body, pika.BasicProperties(delivery_mode=2))
                confirmed.append(body)
            except pika.exceptions.NackError:
                nacked += 1
            assert i < 5000, "publishing stalled"
    finally:
        killer.join()
    conn.close()
    cluster["b"] = restarted(cluster["b"], cluster["a"])
    eventually(lambda: all_alive(list(cluster.values()), set(NAMES)), 30, "all alive")
    got = set(consume_all(cluster["c"], name))
    lost = [b for b in confirmed if b not in got]
    assert not lost, f"{len(lost)} confirmed messages lost (nacked: {nacked})"
