"""AMQP 0-9-1 against a real meshqd, with RabbitMQ's own clients (pika here; amqplib on
Node in test_amqp_node.py): what a program written for RabbitMQ relies on."""

from __future__ import annotations

import datetime
import decimal
import ipaddress
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pika
import pika.exceptions
import pytest
from pamqp import commands as spec
from pamqp import frame as pframe
from pamqp import heartbeat as pheartbeat

from meshq.amqp.frames import PROTOCOL_HEADER, FrameReader
from meshq.testing import DaemonProcess


def params(d: DaemonProcess, **kw: object) -> pika.ConnectionParameters:
    assert d.amqp is not None
    host, port = d.amqp.rsplit(":", 1)
    return pika.ConnectionParameters(host, int(port), **kw)


@pytest.fixture
def amqp(shared_daemon: DaemonProcess) -> Iterator[pika.BlockingConnection]:
    conn = pika.BlockingConnection(params(shared_daemon))
    yield conn
    if conn.is_open:
        conn.close()


def drain(ch: pika.adapters.blocking_connection.BlockingChannel, queue: str, n: int,
          *, ack: bool = True) -> list[tuple[object, object, bytes]]:
    """``n`` deliveries from a consumer on ``queue`` (acked unless ``ack`` is False)."""
    got: list[tuple[object, object, bytes]] = []
    for method, props, body in ch.consume(queue, inactivity_timeout=10):
        assert method is not None, f"only {len(got)} of {n} messages came"
        got.append((method, props, body))
        if ack:
            ch.basic_ack(method.delivery_tag)
        if len(got) == n:
            break
    ch.cancel()
    return got


def until(conn: pika.BlockingConnection, cond: Callable[[], bool], timeout: float = 10.0
          ) -> None:
    """Let ``conn`` dispatch deliveries until ``cond()`` holds."""
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        conn.process_data_events(time_limit=0.1)


def test_publish_consume_ack_round_trip(amqp: pika.BlockingConnection) -> None:
    ch = amqp.channel()
    ok = ch.queue_declare("rt")
    assert (ok.method.queue, ok.method.message_count, ok.method.consumer_count) == ("rt", 0, 0)
    ch.confirm_delivery()
    for i in range(20):
        ch.basic_publish("", "rt", f"m{i}".encode())
    assert ch.queue_declare("rt", passive=True).method.message_count == 20
    got = drain(ch, "rt", 20)
    assert [b for _, _, b in got] == [f"m{i}".encode() for i in range(20)]
    assert all(not m.redelivered for m, _, _ in got)
    assert ch.queue_declare("rt", passive=True).method.message_count == 0


def test_every_basic_property_round_trips(amqp: pika.BlockingConnection) -> None:
    ch = amqp.channel()
    ch.queue_declare("props")
    stamp = datetime.datetime(2026, 12, 7, 1, 2, 3, tzinfo=datetime.UTC)
    headers = {"str": "s", "int": 7, "neg": -(2 ** 40), "bool": True,
               "bytes": b"\x00\xff", "none": None, "list": [1, "two", [3]],
               "table": {"k": "v", "n": {"deep": 1}}, "decimal": decimal.Decimal("3.14"),
               "ts": stamp}
    props = pika.BasicProperties(
        content_type="application/json", content_encoding="gzip", headers=headers,
        delivery_mode=2, priority=5, correlation_id="corr", reply_to="replies",
        expiration="60000", message_id="mid-1", timestamp=1765000000, type="kind",
        user_id="guest", app_id="app", cluster_id="")
    ch.confirm_delivery()
    ch.basic_publish("", "props", b"body", props)
    method, got, body = ch.basic_get("props", auto_ack=True)
    assert body == b"body" and method.routing_key == "props" and method.exchange == ""
    for name in ("content_type", "content_encoding", "delivery_mode", "priority",
                 "correlation_id", "reply_to", "expiration", "message_id", "timestamp",
                 "type", "user_id", "app_id"):
        assert getattr(got, name) == getattr(props, name), name
    assert got.headers == headers


def test_socket_and_amqp_share_queues(shared_daemon: DaemonProcess,
                                      amqp: pika.BlockingConnection) -> None:
    ch = amqp.channel()
    ch.queue_declare("both")
    with shared_daemon.client() as c:
        c.send("both", b"from the socket", headers={"h": "v"})
        _, props, body = ch.basic_get("both", auto_ack=True)
        assert body == b"from the socket" and props.headers == {"h": "v"}
        ch.confirm_delivery()
        ch.basic_publish("", "both", b"from amqp",
                         pika.BasicProperties(headers={"k": 1}, content_type="text/plain"))
        [m] = c.receive("both", max=1, wait=5)
        assert m.body == b"from amqp" and m.headers["k"] == 1


def test_competing_consumers_share_round_robin_and_prefetch_holds(
        amqp: pika.BlockingConnection) -> None:
    ch = amqp.channel()
    ch.queue_declare("work")
    ch.confirm_delivery()
    for i in range(40):
        ch.basic_publish("", "work", str(i).encode())
    a, b = amqp.channel(), amqp.channel()
    seen: dict[str, list[int]] = {"a": [], "b": []}
    for name, c in (("a", a), ("b", b)):
        c.basic_qos(prefetch_count=1)
        c.basic_consume("work", lambda c_, m, p, body, name=name: seen[name].append(
            m.delivery_tag))
    until(amqp, lambda: len(seen["a"]) + len(seen["b"]) >= 2)
    for _ in range(5):  # prefetch 1 and nothing acked: no third delivery comes
        amqp.process_data_events(time_limit=0.05)
    assert (len(seen["a"]), len(seen["b"])) == (1, 1)
    done = threading.Event()
    order: list[str] = []  # who got each delivery, in turn

    def settle(c_: object, m: object, p: object, body: bytes, name: str) -> None:
        seen[name].append(int(body))
        order.append(name)
        c_.basic_ack(m.delivery_tag)  # type: ignore[attr-defined]
        if len(seen["a"]) + len(seen["b"]) >= 40:
            done.set()

    for name, c in (("a", a), ("b", b)):
        c.basic_cancel(c.consumer_tags[0])
        c.basic_recover(requeue=True)
        seen[name] = []
        c.basic_consume("work", lambda c_, m, p, body, name=name: settle(c_, m, p, body,
                                                                          name))
    until(amqp, done.is_set)
    assert sorted(seen["a"] + seen["b"]) == list(range(40))
    # Round-robin once both consume: a takes alone until b's basic_consume is through
    # (pika runs a's callbacks, which ack, while it waits for b's consume-ok).
    both = max(order.index("a"), order.index("b"))
    shared = order[both:]
    assert len(shared) >= 20 and abs(shared.count("a") - shared.count("b")) <= 4, order


def test_unacked_messages_come_back_redelivered_when_the_connection_drops(
        shared_daemon: DaemonProcess, amqp: pika.BlockingConnection) -> None:
    ch = amqp.channel()
    ch.queue_declare("redeliver")
    ch.confirm_delivery()
    ch.basic_publish("", "redeliver", b"once")
    other = pika.BlockingConnection(params(shared_daemon))
    first = drain(other.channel(), "redeliver", 1, ack=False)
    assert not first[0][0].redelivered
    other._impl._transport._sock.shutdown(socket.SHUT_RDWR)  # the client's link dies
    deadline = time.monotonic() + 10
    while other.is_open and time.monotonic() < deadline:
        try:
            other.process_data_events(time_limit=0.1)
        except pika.exceptions.AMQPConnectionError:
            break
    [(method, props, body)] = drain(ch, "redeliver", 1)
    assert body == b"once" and method.redelivered
    assert props.headers == {"x-delivery-count": 1}


def test_nack_requeue_and_reject_to_a_dead_letter_queue(amqp: pika.BlockingConnection) -> None:
    ch = amqp.channel()
    ch.queue_declare("dlq")
    ch.queue_declare("jobs", arguments={"x-dead-letter-exchange": "",
                                        "x-dead-letter-routing-key": "dlq"})
    ch.confirm_delivery()
    ch.basic_publish("", "jobs", b"a")
    ch.basic_publish("", "jobs", b"b")
    [(m1, _, b1), (m2, _, b2)] = drain(ch, "jobs", 2, ack=False)
    ch.basic_nack(m1.delivery_tag, requeue=True)
    ch.basic_reject(m2.delivery_tag, requeue=False)
    [(again, props, body)] = drain(ch, "jobs", 1)
    assert (body, again.redelivered, props.headers["x-delivery-count"]) == (b1, True, 1)
    [(_, dprops, dbody)] = drain(ch, "dlq", 1)
    assert dbody == b2
    [death] = dprops.headers["x-death"]
    assert (death["reason"], death["queue"]) == ("rejected", "jobs")


def test_message_ttl_and_expiration_dead_letter(amqp: pika.BlockingConnection) -> None:
    ch = amqp.channel()
    ch.queue_declare("expired")
    ch.queue_declare("short", arguments={"x-message-ttl": 50, "x-dead-letter-exchange": "",
                                         "x-dead-letter-routing-key": "expired"})
    ch.queue_declare("long", arguments={"x-dead-letter-exchange": "",
                                        "x-dead-letter-routing-key": "expired"})
    ch.confirm_delivery()
    ch.basic_publish("", "short", b"queue ttl")
    ch.basic_publish("", "long", b"message ttl", pika.BasicProperties(expiration="50"))
    got = drain(ch, "expired", 2)
    assert sorted(b for _, _, b in got) == [b"message ttl", b"queue ttl"]
    assert {p.headers["x-death"][0]["reason"] for _, p, _ in got} == {"expired"}


def test_delivery_limit_dead_letters_after_that_many_returns(
        amqp: pika.BlockingConnection) -> None:
    ch = amqp.channel()
    ch.queue_declare("poison.dlq")
    ch.queue_declare("poison", arguments={"x-delivery-limit": 1, "x-queue-type": "quorum",
                                          "x-dead-letter-exchange": "",
                                          "x-dead-letter-routing-key": "poison.dlq"})
    ch.confirm_delivery()
    ch.basic_publish("", "poison", b"p")
    for _ in range(2):  # delivered, returned once (allowed), delivered, returned again
        [(m, _, _)] = drain(ch, "poison", 1, ack=False)
        ch.basic_nack(m.delivery_tag, requeue=True)
    [(_, props, body)] = drain(ch, "poison.dlq", 1)
    assert body == b"p" and props.headers["x-death"][0]["reason"] == "delivery_limit"


def test_get_empty_purge_and_delete(amqp: pika.BlockingConnection) -> None:
    ch = amqp.channel()
    ch.queue_declare("pd")
    assert ch.basic_get("pd") == (None, None, None)
    ch.confirm_delivery()
    for _ in range(3):
        ch.basic_publish("", "pd", b"x")
    assert ch.queue_purge("pd").method.message_count == 3
    ch.basic_publish("", "pd", b"y")
    with pytest.raises(pika.exceptions.ChannelClosedByBroker) as err:
        ch.queue_delete("pd", if_empty=True)
    assert err.value.reply_code == 406
    ch = amqp.channel()
    assert ch.queue_delete("pd").method.message_count == 1
    assert ch.queue_delete("pd").method.message_count == 0  # gone already: fine


def test_channel_exceptions_as_rabbitmq_sends_them(amqp: pika.BlockingConnection) -> None:
    cases = [
        (lambda ch: ch.queue_declare("nope", passive=True), 404),
        (lambda ch: ch.basic_consume("nope", lambda *a: None), 404),
        (lambda ch: ch.queue_declare("amq.mine"), 403),
        (lambda ch: ch.queue_declare("q406", arguments={"x-overflow": "reject-publish"}),
         406),
        (lambda ch: ch.basic_ack(99), 406),
    ]
    for call, code in cases:
        ch = amqp.channel()
        with pytest.raises(pika.exceptions.ChannelClosedByBroker) as err:
            call(ch)
            ch.basic_get("nope-either")  # the ack has no answer: this one sees the close
        assert err.value.reply_code == code, err.value
    ch = amqp.channel()
    ch.queue_declare("ttl1", arguments={"x-message-ttl": 1000})
    with pytest.raises(pika.exceptions.ChannelClosedByBroker) as err:
        ch.queue_declare("ttl1", arguments={"x-message-ttl": 2000})
    assert err.value.reply_code == 406 and "inequivalent" in err.value.reply_text
    ch = amqp.channel()
    assert ch.queue_declare("ttl1").method.queue == "ttl1"  # no arguments: no conflict


def test_mandatory_unroutable_publish_is_returned(amqp: pika.BlockingConnection) -> None:
    ch = amqp.channel()
    ch.confirm_delivery()
    with pytest.raises(pika.exceptions.UnroutableError):
        ch.basic_publish("", "no-such-queue", b"lost", mandatory=True)
    ch.basic_publish("", "no-such-queue", b"dropped")  # not mandatory: confirmed, dropped


def test_server_named_exclusive_reply_queue_goes_with_its_connection(
        shared_daemon: DaemonProcess, amqp: pika.BlockingConnection) -> None:
    other = pika.BlockingConnection(params(shared_daemon))
    och = other.channel()
    reply = och.queue_declare("", exclusive=True, auto_delete=True).method.queue
    assert reply.startswith("amq.gen-")
    ch = amqp.channel()
    ch.queue_declare("rpc")
    ch.confirm_delivery()
    ch.basic_publish("", "rpc", b"2+2", pika.BasicProperties(reply_to=reply,
                                                             correlation_id="c1"))
    [(_, props, body)] = drain(ch, "rpc", 1)
    assert body == b"2+2"
    ch.basic_publish("", props.reply_to, b"4", pika.BasicProperties(
        correlation_id=props.correlation_id))
    [(_, rprops, rbody)] = drain(och, reply, 1)
    assert (rbody, rprops.correlation_id) == (b"4", "c1")
    other.close()
    with shared_daemon.client() as c:  # deleted as the connection closed (not at once)
        deadline = time.monotonic() + 10
        while reply in {s["name"] for s in c.stats()}:
            assert time.monotonic() < deadline, "the exclusive queue outlived its connection"
            time.sleep(0.01)


def test_tx_publishes_on_commit_only(amqp: pika.BlockingConnection) -> None:
    ch = amqp.channel()
    ch.queue_declare("txq")
    ch.tx_select()
    ch.basic_publish("", "txq", b"rolled back")
    ch.tx_rollback()
    ch.basic_publish("", "txq", b"committed")
    assert ch.queue_declare("txq", passive=True).method.message_count == 0
    ch.tx_commit()
    assert ch.queue_declare("txq", passive=True).method.message_count == 1


def test_garbage_closes_that_connection_and_the_daemon_serves_on(
        shared_daemon: DaemonProcess) -> None:
    assert shared_daemon.amqp is not None
    host, port = shared_daemon.amqp.rsplit(":", 1)
    for junk in (b"GET / HTTP/1.1\r\n\r\n", b"AMQP\x00\x00\x09\x01" + b"\x01\x00\x00"
                 + b"\xff" * 64, b"AMQP\x01\x01\x00\x09"):
        with socket.create_connection((host, int(port)), timeout=5) as s:
            s.sendall(junk)
            got = b""
            while chunk := s.recv(4096):
                got += chunk
        # a wrong header: ours, as the spec says; garbage after a right one:
        # connection.start, then connection.close with 501 (FRAME_ERROR)
        assert got == b"AMQP\x00\x00\x09\x01" or (
            got.startswith(b"\x01\x00\x00") and b"\x00\x0a\x00\x32\x01\xf5" in got), got
    conn = pika.BlockingConnection(params(shared_daemon))
    conn.channel().queue_declare("still-here")
    conn.close()


def test_wrong_password_is_refused(shared_daemon: DaemonProcess) -> None:
    with pytest.raises(pika.exceptions.ProbableAuthenticationError):
        pika.BlockingConnection(params(shared_daemon, credentials=pika.PlainCredentials(
            "guest", "wrong")))


def test_users_from_the_config_log_in_with_their_hashed_password(tmp_path: Path) -> None:
    hashed = subprocess.run([sys.executable, "-m", "meshq.cli.ctl", "hash-password"],
                            input="app-secret\n", capture_output=True, text=True,
                            check=True).stdout.strip()
    config = tmp_path / "meshq.toml"
    config.write_text(f'[amqp_users]\napp = "{hashed}"\n'
                      '[access]\npurge = ["amqp:app"]\ndelete = ["uid:0", "amqp:app"]\n')
    with DaemonProcess(tmp_path / "data", args=["--config", str(config)]).start() as d:
        app = pika.PlainCredentials("app", "app-secret")
        conn = pika.BlockingConnection(params(d, credentials=app))
        conn.channel().queue_declare("users")
        conn.close()
        for user, password in (("app", "wrong"), ("nobody", "app-secret")):
            with pytest.raises(pika.exceptions.ProbableAuthenticationError):
                pika.BlockingConnection(params(d, credentials=pika.PlainCredentials(
                    user, password)))
        guest = pika.BlockingConnection(params(d))  # guest/guest: loopback only
        with pytest.raises(pika.exceptions.ChannelClosedByBroker) as err:
            guest.channel().queue_purge("users")  # the socket's access rules apply
        assert err.value.reply_code == 403 and "AMQP user 'guest'" in err.value.reply_text
        guest.close()
        conn = pika.BlockingConnection(params(d, credentials=app))
        assert conn.channel().queue_purge("users").method.message_count == 0
        conn.close()
        with d.client() as c:
            st = c.status()
            assert st["amqp"]["logins_refused"] == 2 and st["access"]["refused"] == 1


def counts(ch: pika.adapters.blocking_connection.BlockingChannel, *queues: str) -> list[int]:
    return [ch.queue_declare(q, passive=True).method.message_count for q in queues]


def test_exchanges_route_direct_fanout_topic_and_headers(
        amqp: pika.BlockingConnection) -> None:
    ch = amqp.channel()
    for q in ("r.a", "r.b", "r.c"):
        ch.queue_declare(q)
    ch.exchange_declare("logs", "fanout")
    ch.exchange_declare("orders", "direct", durable=True)
    ch.exchange_declare("events", "topic")
    ch.exchange_declare("hdrs", "headers")
    ch.queue_bind("r.a", "logs")
    ch.queue_bind("r.b", "logs")
    ch.queue_bind("r.a", "orders", "eu")
    ch.queue_bind("r.b", "orders", "us")
    ch.queue_bind("r.c", "orders", "us")
    ch.queue_bind("r.a", "events", "order.*.created")
    ch.queue_bind("r.b", "events", "order.#")
    ch.queue_bind("r.c", "events", "#")
    ch.queue_bind("r.a", "hdrs", arguments={"x-match": "all", "kind": "pdf", "size": 1})
    ch.queue_bind("r.b", "hdrs", arguments={"x-match": "any", "kind": "pdf", "lang": "de"})
    ch.queue_bind("r.c", "amq.topic", "audit.#")
    ch.confirm_delivery()
    cases = [
        ("logs", "ignored", None, [1, 1, 0]),
        ("orders", "us", None, [0, 1, 1]),
        ("orders", "eu", None, [1, 0, 0]),
        ("events", "order.eu.created", None, [1, 1, 1]),
        ("events", "order", None, [0, 1, 1]),
        ("events", "invoice.paid", None, [0, 0, 1]),
        ("hdrs", "", {"kind": "pdf", "size": 1}, [1, 1, 0]),
        ("hdrs", "", {"lang": "de"}, [0, 1, 0]),
        ("amq.topic", "audit.login", None, [0, 0, 1]),
    ]
    for exchange, key, headers, want in cases:
        before = counts(ch, "r.a", "r.b", "r.c")
        ch.basic_publish(exchange, key, b"x", pika.BasicProperties(headers=headers))
        after = counts(ch, "r.a", "r.b", "r.c")
        assert [a - b for a, b in zip(after, before, strict=True)] == want, (exchange, key)
    [(m, _, _)] = drain(ch, "r.c", 1)  # delivered with the exchange and key it came by
    assert (m.exchange, m.routing_key) == ("orders", "us")
    ch.queue_unbind("r.a", "logs")
    ch.basic_publish("logs", "", b"y")
    assert counts(ch, "r.a", "r.b") == [4, 7]  # r.a no longer gets what logs fans out
    ch.queue_purge("r.a")


def test_a_deleted_queue_takes_its_bindings_with_it(amqp: pika.BlockingConnection) -> None:
    ch = amqp.channel()
    ch.exchange_declare("fan", "fanout")
    ch.queue_declare("bound")
    ch.queue_bind("bound", "fan")
    ch.queue_delete("bound")
    ch.queue_declare("bound")  # a new queue of the same name: not bound
    ch.confirm_delivery()
    with pytest.raises(pika.exceptions.UnroutableError):
        ch.basic_publish("fan", "", b"nobody", mandatory=True)
    assert counts(ch, "bound") == [0]
    ch.exchange_delete("fan")
    ch.exchange_delete("fan")  # deleting what is gone is fine, as in RabbitMQ


def test_exchange_errors_as_rabbitmq_sends_them(amqp: pika.BlockingConnection) -> None:
    ch = amqp.channel()
    ch.exchange_declare("typed", "direct")
    ch.queue_declare("eq")
    cases = [
        (lambda c: c.exchange_declare("typed", "fanout"), 406),
        (lambda c: c.exchange_declare("missing", passive=True), 404),
        (lambda c: c.exchange_declare("amq.mine", "direct"), 403),
        (lambda c: c.exchange_delete("amq.direct"), 403),
        (lambda c: c.queue_bind("eq", "missing"), 404),
        (lambda c: c.queue_bind("missing", "typed"), 404),
        (lambda c: c.queue_bind("eq", ""), 403),
        (lambda c: c.basic_publish("missing", "k", b"x"), 404),
    ]
    for call, code in cases:
        c = amqp.channel()
        c.confirm_delivery()
        with pytest.raises(pika.exceptions.ChannelClosedByBroker) as err:
            call(c)
        assert err.value.reply_code == code, (err.value, code)
    ch.exchange_declare("amq.direct", "direct", passive=True)
    ch.exchange_declare("amq.fanout", "fanout", durable=True)  # re-declaring a built-in
    ch.queue_bind("eq", "typed", "k")
    with pytest.raises(pika.exceptions.ChannelClosedByBroker) as err:
        ch.exchange_delete("typed", if_unused=True)
    assert err.value.reply_code == 406
    with pytest.raises(pika.exceptions.ConnectionClosedByBroker) as cerr:
        amqp.channel().exchange_declare("odd", "no-such-type")
    assert cerr.value.reply_code == 503


def test_a_publish_routed_to_several_queues_is_confirmed_once_all_have_it(
        amqp: pika.BlockingConnection) -> None:
    ch = amqp.channel()
    ch.exchange_declare("wide", "fanout")
    names = [f"wide.{i}" for i in range(5)]
    for q in names:
        ch.queue_declare(q)
        ch.queue_bind(q, "wide")
    ch.confirm_delivery()
    for _ in range(10):
        ch.basic_publish("wide", "", b"z")
    assert counts(ch, *names) == [10] * 5


class RawClient:
    """An AMQP client written frame by frame (pamqp), logged in and open, with channel 1
    open: for what the usual clients cannot send (pipelined synchronous methods)."""

    def __init__(self, d: DaemonProcess, heartbeat: int = 0) -> None:
        assert d.amqp is not None
        host, port = d.amqp.rsplit(":", 1)
        self.sock = socket.create_connection((host, int(port)), timeout=20)
        self.reader = FrameReader(1 << 20)
        self.reader.header_ok = True
        self.got: list[tuple[int, object]] = []
        self.sock.sendall(PROTOCOL_HEADER)
        self.until(spec.Connection.Start)
        self.send(0, spec.Connection.StartOk({}, "PLAIN", "\0guest\0guest"))
        self.tune = self.until(spec.Connection.Tune)
        self.send(0, spec.Connection.TuneOk(2047, 131072, heartbeat), spec.Connection.Open("/"))
        self.until(spec.Connection.OpenOk)
        self.send(1, spec.Channel.Open())
        self.until(spec.Channel.OpenOk)

    def send(self, channel: int, *methods: object) -> None:
        self.sock.sendall(b"".join(pframe.marshal(m, channel) for m in methods))

    def until(self, kind: type, count: int = 1) -> Any:
        """Read until ``count`` frames of ``kind`` came; the last of them."""
        while sum(isinstance(v, kind) for _, v in self.got) < count:
            data = self.sock.recv(65536)
            assert data, f"closed before {kind.__name__}: {self.got[-3:]}"
            self.reader.feed(data)
            self.got.extend((r.channel, r.value) for r in self.reader.frames())
        return [v for _, v in self.got if isinstance(v, kind)][-1]

    def __enter__(self) -> RawClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.sock.close()


def test_pipelined_synchronous_methods_are_answered_in_order(
        shared_daemon: DaemonProcess) -> None:
    """Frames behind a synchronous method wait for its answer, and run in order after
    it: hundreds answered at once (no recursion), a nowait delete with if_unused (the
    channel goes on)."""
    with RawClient(shared_daemon) as raw:
        raw.send(1, spec.Queue.Declare(queue="pipe.q"),
                 *[spec.Exchange.Declare(exchange="amq.direct", passive=True)] * 400,
                 spec.Queue.Delete(queue="pipe.q", if_unused=True, nowait=True),
                 spec.Queue.Declare(queue="pipe.q2"))
        raw.until(spec.Exchange.DeclareOk, 400)
        last = raw.until(spec.Queue.DeclareOk, 2)
        assert last.queue == "pipe.q2"
        kinds = [type(v) for c, v in raw.got
                 if c == 1 and not isinstance(v, spec.Channel.OpenOk)]
        assert kinds == [spec.Queue.DeclareOk] + [spec.Exchange.DeclareOk] * 400 + [
            spec.Queue.DeclareOk]
    with shared_daemon.client() as c:
        assert "pipe.q" not in {s["name"] for s in c.stats()}


def test_heartbeats_the_handshake_timeout_and_the_connection_limit(tmp_path: Path) -> None:
    """A client silent for two heartbeat intervals is dropped (after the server's own
    heartbeats), and so is one that does not finish its handshake in
    amqp_handshake_timeout; past amqp_max_connections a connection is closed at once;
    with amqp_max_unconfirmed 1 publishing goes on, one send at a time."""
    config = tmp_path / "meshq.toml"
    config.write_text("amqp_heartbeat = 1\namqp_max_connections = 1\n"
                      "amqp_max_unconfirmed = 1\namqp_handshake_timeout = 0.5\n")
    with DaemonProcess(tmp_path / "data", args=["--config", str(config)]).start() as d:
        host, port = d.amqp.rsplit(":", 1)
        for opening in (b"", PROTOCOL_HEADER):  # nothing at all; or no start-ok
            with socket.create_connection((host, int(port)), timeout=30) as stalled:
                stalled.sendall(opening)
                started = time.monotonic()
                while stalled.recv(65536):  # connection.start, if anything; then EOF
                    pass
                assert time.monotonic() - started < 5  # the setting, not the default 10 s
        with RawClient(d, heartbeat=1) as raw:
            assert raw.tune.heartbeat == 1
            with pytest.raises(pika.exceptions.AMQPConnectionError):
                pika.BlockingConnection(params(d))  # the second: over the limit
            raw.until(pheartbeat.Heartbeat)  # the server's; ours never come
            while raw.sock.recv(65536):  # then it hangs up on us
                pass
        conn = pika.BlockingConnection(params(d))  # room again
        ch = conn.channel()
        ch.queue_declare("limited")
        ch.confirm_delivery()
        for i in range(20):  # one send in flight at a time: slower, never stuck
            ch.basic_publish("", "limited", str(i).encode())
        assert ch.queue_declare("limited", passive=True).method.message_count == 20
        conn.close()
        with d.client() as c:
            assert c.status()["amqp"]["refused_over_limit"] == 1


def self_signed(tmp_path: Path) -> tuple[Path, Path]:
    """A throwaway certificate for 127.0.0.1 and its key (PEM files)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "meshq-test")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


def test_amqps_with_the_configured_certificate(tmp_path: Path) -> None:
    cert, key = self_signed(tmp_path)
    config = tmp_path / "meshq.toml"
    config.write_text(f'amqp_tls_cert = "{cert}"\namqp_tls_key = "{key}"\n')
    with DaemonProcess(tmp_path / "data", args=["--config", str(config)]).start() as d:
        context = ssl.create_default_context(cafile=str(cert))
        conn = pika.BlockingConnection(params(d, ssl_options=pika.SSLOptions(context)))
        ch = conn.channel()
        ch.queue_declare("tls")
        ch.confirm_delivery()
        ch.basic_publish("", "tls", b"over TLS")
        assert ch.basic_get("tls", auto_ack=True)[2] == b"over TLS"
        conn.close()
        with pytest.raises(pika.exceptions.AMQPConnectionError):
            pika.BlockingConnection(params(d))  # plain AMQP on the TLS port: refused
        with d.client() as c:
            assert c.status()["amqp"]["tls"] is True


def test_x_expires_deletes_a_queue_once_unused(shared_daemon: DaemonProcess,
                                               amqp: pika.BlockingConnection) -> None:
    ch = amqp.channel()
    ch.queue_declare("exp.used", arguments={"x-expires": 200})
    ch.queue_declare("exp.idle", arguments={"x-expires": 200})
    ch.basic_consume("exp.used", lambda *a: None)  # in use while it has a consumer
    deadline = time.monotonic() + 10
    with shared_daemon.client() as c:  # (stats through the socket are no use of it)
        while "exp.idle" in {s["name"] for s in c.stats()}:
            assert time.monotonic() < deadline, "an unused queue outlived its x-expires"
            amqp.process_data_events(time_limit=0.05)
        assert "exp.used" in {s["name"] for s in c.stats()}


def test_an_exclusive_queue_is_locked_to_its_connection(
        shared_daemon: DaemonProcess, amqp: pika.BlockingConnection) -> None:
    owner = pika.BlockingConnection(params(shared_daemon))
    owner.channel().queue_declare("excl", exclusive=True)
    for call in (lambda c: c.queue_declare("excl"), lambda c: c.basic_consume(
            "excl", lambda *a: None), lambda c: c.queue_purge("excl")):
        with pytest.raises(pika.exceptions.ChannelClosedByBroker) as err:
            call(amqp.channel())
        assert err.value.reply_code == 405, err.value
    owner.channel().queue_purge("excl")  # its own connection may
    owner.close()  # and with it the queue goes; then it is anyone's to declare
    deadline = time.monotonic() + 10
    while True:
        try:
            amqp.channel().queue_declare("excl", exclusive=True)
            break
        except pika.exceptions.ChannelClosedByBroker:
            assert time.monotonic() < deadline, "still locked after its connection closed"


def test_dead_lettering_through_an_exchange(amqp: pika.BlockingConnection) -> None:
    ch = amqp.channel()
    ch.exchange_declare("dlx", "topic")
    ch.queue_declare("dl.all")
    ch.queue_declare("dl.orders")
    ch.queue_bind("dl.all", "dlx", "#")
    ch.queue_bind("dl.orders", "dlx", "orders.*")
    ch.queue_declare("work.a", arguments={"x-dead-letter-exchange": "dlx"})  # own key
    ch.queue_declare("work.b", arguments={"x-dead-letter-exchange": "dlx",
                                          "x-dead-letter-routing-key": "orders.late",
                                          "x-message-ttl": 50})
    ch.exchange_declare("in", "direct")
    ch.queue_bind("work.a", "in", "jobs.x")
    ch.confirm_delivery()
    ch.basic_publish("in", "jobs.x", b"rejected")
    ch.basic_publish("", "work.b", b"expired")
    [(m, _, _)] = drain(ch, "work.a", 1, ack=False)
    ch.basic_reject(m.delivery_tag, requeue=False)
    got_all = drain(ch, "dl.all", 2)
    [(m2, p2, b2)] = drain(ch, "dl.orders", 1)
    assert sorted(b for _, _, b in got_all) == [b"expired", b"rejected"]
    assert (b2, m2.exchange, m2.routing_key) == (b"expired", "dlx", "orders.late")
    [death] = p2.headers["x-death"]
    assert (death["reason"], death["queue"], death["exchange"]) == ("expired", "work.b", "")
    rejected = next((m, p) for m, p, b in got_all if b == b"rejected")
    assert (rejected[0].exchange, rejected[0].routing_key) == ("dlx", "jobs.x")
    assert rejected[1].headers["x-death"][0]["exchange"] == "in"


def test_channel_flow(shared_daemon: DaemonProcess) -> None:
    """active=true is acknowledged; active=false is refused (540), as RabbitMQ does."""
    with RawClient(shared_daemon) as raw:
        raw.send(1, spec.Channel.Flow(active=True))
        assert raw.until(spec.Channel.FlowOk).active is True
        raw.send(1, spec.Channel.Flow(active=False))
        close = raw.until(spec.Connection.Close)
        assert close.reply_code == 540 and (close.class_id, close.method_id) == (20, 20)
