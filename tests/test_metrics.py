"""The Prometheus endpoint (meshq/metrics.py): a real meshqd with ``metrics_bind`` set,
scraped over HTTP and parsed with prometheus_client's own parser; bad HTTP clients; and
the collector, timer and HTTP server in-process.
"""

from __future__ import annotations

import os
import socket
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pika
import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from meshq.broker import Broker, Session
from meshq.metrics import (
    HEAD_LIMIT,
    Metrics,
    MetricsServer,
    RequestTimer,
    parse_request_head,
    request_timer,
)
from meshq.node import Node
from meshq.store import MemoryStore
from meshq.testing import DaemonProcess, TrioClock

LIMIT = 10.0  # upper bound on any one wait; never the thing a test waits for
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> Samples:
    """Every sample by (sample name, labels)."""
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[s.name, frozenset(s.labels.items())] = s.value
    return out


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[name, frozenset(labels.items())]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def metrics_env(port: int) -> dict[str, str]:
    return {**os.environ, "MESHQ_METRICS_BIND": f"127.0.0.1:{port}"}


def start_with_metrics(base: Path) -> tuple[DaemonProcess, int]:
    """A meshqd serving metrics on a free port (another port if that one got taken)."""
    for attempt in range(3):
        port = free_port()
        d = DaemonProcess(base / f"data{attempt}", env=metrics_env(port))
        try:
            return d.start(), port
        except RuntimeError:
            if "metrics_bind" not in d.log_tail() or attempt == 2:
                raise
    raise AssertionError("unreachable")


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[DaemonProcess, int]]:
    d, port = start_with_metrics(tmp_path_factory.mktemp("metrics"))
    yield d, port
    d.kill()


def scrape(port: int, path: str = "/metrics") -> tuple[int, dict[str, str], bytes]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=LIMIT) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def raw_http(port: int, data: bytes, *, shut: bool = False) -> bytes:
    """Send ``data`` as is; everything the server writes until it closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=LIMIT) as s:
        s.sendall(data)
        if shut:
            s.shutdown(socket.SHUT_WR)
        got = b""
        while chunk := s.recv(65536):  # TimeoutError after LIMIT s fails the test
            got += chunk
        return got


def test_scrape_reports_what_the_client_did(node: tuple[DaemonProcess, int]) -> None:
    d, port = node
    with d.client() as c:
        c.declare("m-jobs")
        for i in range(5):
            c.send("m-jobs", f"job {i}".encode())
        got = c.receive("m-jobs", max=3)
        assert len(got) == 3
        assert c.ack("m-jobs", [got[0].id, got[1].id]) == [got[0].id, got[1].id]
        status, headers, body = scrape(port)
        assert status == 200
        assert headers["Content-Type"].startswith("text/plain; version=")
        s = parse(body.decode())
        depth = {state: value(s, "meshq_queue_messages", queue="m-jobs", state=state)
                 for state in ("ready", "leased", "delayed")}
        assert depth == {"ready": 2, "leased": 1, "delayed": 0}  # 5 sent, 3 leased, 2 acked
        assert value(s, "meshq_queue_published_total", queue="m-jobs") == 5
        assert value(s, "meshq_queue_delivered_total", queue="m-jobs") == 3
        assert value(s, "meshq_queue_redelivered_total", queue="m-jobs") == 0
        assert value(s, "meshq_queue_acked_total", queue="m-jobs") == 2
        assert value(s, "meshq_queue_dispatching", queue="m-jobs") == 1
        assert value(s, "meshq_active_leases") >= 1
        assert value(s, "meshq_members", state="alive") == 1
        assert value(s, "meshq_members", state="dead") == 0
        assert value(s, "meshq_accepting_writes") == 1
        assert value(s, "meshq_alarm", resource="disk") == 0
        assert value(s, "meshq_alarm", resource="memory") == 0
        assert value(s, "meshq_disk_free_bytes") > 0 and value(s, "meshq_memory_bytes") > 0
        assert value(s, "meshq_client_connections") >= 1
        assert value(s, "meshq_request_duration_seconds_count", op="send") >= 5
        assert value(s, "meshq_request_duration_seconds_count", op="declare") >= 1
        assert value(s, "meshq_request_duration_seconds_bucket", op="send", le="+Inf") >= 5
        assert value(s, "meshq_request_duration_seconds_sum", op="send") > 0
        assert value(s, "meshq_store_commit_seconds_count") > 0
        assert value(s, "meshq_store_size_bytes") > 0
        assert ("meshq_request_duration_seconds_count",
                frozenset({("op", "nonsense")})) not in s
        assert value(s, "meshq_cluster_keyed") == 0  # a loopback node with no key
        assert value(s, "meshq_moves", kind="copy") == 0  # a lone node moves nothing
        assert value(s, "meshq_move_messages_remaining") == 0
        assert value(s, "meshq_peer_packets_rejected_total", reason="bad_key") == 0
        assert value(s, "meshq_peer_streams_rejected_total", reason="unkeyed") == 0
        node_info = [k for k in s if k[0] == "meshq_node_info"]
        assert dict(node_info[0][1])["node"] == d.node_name
        assert d.amqp is not None  # an AMQP client, with a channel and a consumer
        host, amqp_port = d.amqp.rsplit(":", 1)
        amqp = pika.BlockingConnection(pika.ConnectionParameters(host, int(amqp_port)))
        ch = amqp.channel()
        ch.queue_declare("m-amqp", exclusive=True)  # goes with the connection
        ch.basic_consume("m-amqp", lambda *a: None)
        s = parse(scrape(port)[2].decode())
        assert (value(s, "meshq_amqp_connections"), value(s, "meshq_amqp_channels"),
                value(s, "meshq_amqp_consumers")) == (1, 1, 1)
        assert value(s, "meshq_amqp_connections_accepted_total") >= 1
        assert value(s, "meshq_amqp_logins_refused_total") == 0
        amqp.close()
    # A lease released by the disconnect comes back redelivered, and is counted as such.
    with d.client() as c:
        [again] = c.receive("m-jobs", max=1, wait=LIMIT)
        while not again.redelivered:  # the two never-leased messages come first
            [again] = c.receive("m-jobs", max=1, wait=LIMIT)
        s = parse(scrape(port)[2].decode())
        assert value(s, "meshq_queue_redelivered_total", queue="m-jobs") == 1
        assert value(s, "meshq_redeliveries_total") >= 1
        c.delete("m-jobs")
    s = parse(scrape(port)[2].decode())
    assert ("meshq_queue_published_total", frozenset({("queue", "m-jobs")})) not in s


def test_other_paths_and_methods(node: tuple[DaemonProcess, int]) -> None:
    _, port = node
    assert scrape(port, "/other")[0] == 404
    assert scrape(port, "/")[0] == 404
    assert scrape(port, "/metrics?name[]=x")[0] == 200
    post = raw_http(port, b"POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n")
    assert post.startswith(b"HTTP/1.1 405 ")
    assert b"\r\nAllow: GET, HEAD\r\n" in post
    head = raw_http(port, b"HEAD /metrics HTTP/1.0\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ") and head.endswith(b"\r\n\r\n")
    old = raw_http(port, b"GET /metrics HTTP/1.0\n\n")  # bare newlines, HTTP/1.0
    assert old.startswith(b"HTTP/1.1 200 ") and b"meshq_uptime_seconds" in old


@pytest.mark.parametrize("garbage", [
    b"\x00\xff\xfe\r\n\r\n",
    b"GET\r\n\r\n",
    b"GET /metrics HTTP/2.0\r\n\r\n",
    b"GET metrics HTTP/1.1\r\n\r\n",
    b"get /metrics HTTP/1.1\r\n\r\n",
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(range(256)) * 4 + b"\n\n",  # TLS
    b"A" * (HEAD_LIMIT + 100),  # no end of head in sight
    b"GET /metrics HTTP/1.1\r\nX: " + b"y" * HEAD_LIMIT + b"\r\n\r\n",
])
def test_garbage_gets_400_and_the_daemon_keeps_serving(node: tuple[DaemonProcess, int],
                                                        garbage: bytes) -> None:
    d, port = node
    with d.client() as c:
        c.declare("m-garbage")
        assert raw_http(port, garbage).startswith(b"HTTP/1.1 400 ")
        c.send("m-garbage", b"still here")
        assert [m.body for m in c.receive("m-garbage", max=5)] == [b"still here"]
        assert scrape(port)[0] == 200
        c.delete("m-garbage")


def test_a_request_cut_short_gets_400(node: tuple[DaemonProcess, int]) -> None:
    _, port = node
    assert raw_http(port, b"GET /metrics HTTP/1.1\r\n", shut=True).startswith(b"HTTP/1.1 400 ")
    assert raw_http(port, b"", shut=True) == b""  # said nothing: nothing to answer


def test_silent_clients_do_not_hold_up_scrapes(node: tuple[DaemonProcess, int]) -> None:
    d, port = node
    silent = [socket.create_connection(("127.0.0.1", port), timeout=LIMIT) for _ in range(5)]
    try:
        silent[0].sendall(b"GET /metr")  # half a request line, then nothing
        assert scrape(port)[0] == 200
        with d.client() as c:
            assert c.ping()["node"] == d.node_name
    finally:
        for s in silent:
            s.close()


def test_taken_address_is_a_clear_startup_error(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        d = DaemonProcess(tmp_path / "data", env=metrics_env(port))
        with pytest.raises(RuntimeError, match="exited with 1"):
            d.start()
    log = d.log_tail()
    assert f"meshqd: cannot serve metrics on 127.0.0.1:{port} (metrics_bind)" in log
    assert "Traceback" not in log


# --------------------------------------------------------------------------- in-process


@pytest.mark.parametrize(("head", "expected"), [
    (b"GET /metrics HTTP/1.1\r\nHost: x", ("GET", "/metrics")),
    (b"GET /metrics?x=1 HTTP/1.0", ("GET", "/metrics")),
    (b"HEAD / HTTP/1.1", ("HEAD", "/")),
    (b"DELETE /metrics HTTP/1.1", ("DELETE", "/metrics")),
])
def test_parse_request_head(head: bytes, expected: tuple[str, str]) -> None:
    assert parse_request_head(head) == expected


@pytest.mark.parametrize("head", [
    b"", b"GET", b"GET /metrics", b"GET /metrics HTTP/1.1 extra", b"GET  /metrics HTTP/1.1",
    b"GET /metrics HTTP/3", b"G3T /metrics HTTP/1.1", b"get /metrics HTTP/1.1",
    b"GET http://x/metrics HTTP/1.1", b"GET /m\xe9trics HTTP/1.1", b"GET /\x7f HTTP/1.1",
])
def test_parse_request_head_refuses(head: bytes) -> None:
    with pytest.raises(ValueError):
        parse_request_head(head)


def _node(broker: Broker, store: MemoryStore, clock: TrioClock) -> Node:
    return Node(name="n1", node_id="00000001", address="127.0.0.1:7946", broker=broker,
                store=store, clock=clock)


async def test_collector_reads_an_in_process_node() -> None:
    store, clock = MemoryStore(), TrioClock()
    broker = Broker(store, clock, node_id="00000001")
    node = _node(broker, store, clock)
    metrics = Metrics(node)
    assert request_timer(_node(broker, store, clock))._metrics is None  # no metrics: no-op
    async with trio.open_nursery() as nursery:
        await nursery.start(store.run)
        await nursery.start(broker.run)
        await broker.declare("q", {}).wait()
        await broker.declare("dlq", {}).wait()
        await broker.send("q", [{"body": b"a"}, {"body": b"b"}, {"body": b"c", "delay": 60}]
                          ).wait()
        session = Session()
        [first, _second] = await broker.receive(session, "q", 2)
        await broker.ack(session, "q", [first.id]).wait()
        timer = request_timer(node)
        timer.start(1, "send")
        timer.start([1], "send")  # an id that cannot be a key: not measured, no error
        timer.start(2, "no-such-op")
        timer.start(3, ["ping"])
        timer.done([1])
        timer.done(2)
        timer.done(1)
        s = parse(metrics.render().decode())
        nursery.cancel_scope.cancel()
    assert value(s, "meshq_queue_messages", queue="q", state="ready") == 0
    assert value(s, "meshq_queue_messages", queue="q", state="leased") == 1
    assert value(s, "meshq_queue_messages", queue="q", state="delayed") == 1
    assert value(s, "meshq_queue_published_total", queue="q") == 3
    assert value(s, "meshq_queue_delivered_total", queue="q") == 2
    assert value(s, "meshq_queue_acked_total", queue="q") == 1
    assert value(s, "meshq_queue_published_total", queue="dlq") == 0
    assert value(s, "meshq_active_leases") == 1
    assert value(s, "meshq_members", state="alive") == 1
    assert value(s, "meshq_request_duration_seconds_count", op="send") == 1
    assert not any(k[0].startswith("meshq_request") and ("op", "no-such-op") in k[1] for k in s)
    assert not any(k[0] == "meshq_client_connections" for k in s)  # no listener given
    assert not any(k[0] == "meshq_hinted_messages" for k in s)  # no mesh
    assert value(s, "meshq_store_commit_seconds_count") > 0


async def test_each_node_has_its_own_registry() -> None:
    store, clock = MemoryStore(), TrioClock()
    broker = Broker(store, clock, node_id="00000001")
    a, b = Metrics(_node(broker, store, clock)), Metrics(_node(broker, store, clock))
    a.request_seconds.labels("ping").observe(0.5)
    assert a.registry is not b.registry
    sa, sb = parse(a.render().decode()), parse(b.render().decode())
    assert value(sa, "meshq_request_duration_seconds_count", op="ping") == 1
    assert not any(k[0] == "meshq_request_duration_seconds_count" for k in sb)


async def _read_all(stream: trio.abc.Stream) -> bytes:
    got = b""
    while chunk := await stream.receive_some(65536):
        got += chunk
    return got


async def _server(**kw: Any) -> tuple[MetricsServer, str, int]:
    store, clock = MemoryStore(), TrioClock()
    broker = Broker(store, clock, node_id="00000001")
    server = MetricsServer(Metrics(_node(broker, store, clock)), "127.0.0.1:0", **kw)
    await server.bind()
    host, port = server.address.rsplit(":", 1)
    return server, host, int(port)


async def test_server_closes_a_client_that_sends_no_head_in_time() -> None:
    server, host, port = await _server(read_timeout=0.2)
    async with trio.open_nursery() as nursery:
        await nursery.start(server.run)
        with trio.fail_after(LIMIT):
            quiet = await trio.open_tcp_stream(host, port)
            await quiet.send_all(b"GET /metrics HTTP/1.1\r\n")  # and never the rest
            assert await _read_all(quiet) == b""  # closed unanswered after 0.2 s
            ok = await trio.open_tcp_stream(host, port)
            await ok.send_all(b"GET /metrics HTTP/1.1\r\n\r\n")
            reply = await _read_all(ok)
        assert reply.startswith(b"HTTP/1.1 200 ") and b"meshq_uptime_seconds" in reply
        for s in (quiet, ok):
            await s.aclose()
        nursery.cancel_scope.cancel()


async def test_server_refuses_clients_past_its_cap() -> None:
    server, host, port = await _server(read_timeout=10 * LIMIT, max_clients=2)
    async with trio.open_nursery() as nursery:
        await nursery.start(server.run)
        with trio.fail_after(LIMIT):
            quiet = [await trio.open_tcp_stream(host, port) for _ in range(2)]
            while server.clients < 2:  # noqa: ASYNC110 - both accepted, waiting for heads
                await trio.sleep(0.01)
            third = await trio.open_tcp_stream(host, port)
            await third.send_all(b"GET /metrics HTTP/1.1\r\n\r\n")
            assert await _read_all(third) == b""  # over the cap: closed unanswered
            for s in quiet:
                await s.aclose()
            while server.clients:  # noqa: ASYNC110 - their EOF ends them
                await trio.sleep(0.01)
            ok = await trio.open_tcp_stream(host, port)
            await ok.send_all(b"GET /metrics HTTP/1.1\r\n\r\n")
            assert (await _read_all(ok)).startswith(b"HTTP/1.1 200 ")
        for s in (third, ok):
            await s.aclose()
        nursery.cancel_scope.cancel()


def test_timer_ignores_frames_it_did_not_start() -> None:
    class Child:
        def __init__(self) -> None:
            self.seen: list[float] = []

        def observe(self, seconds: float) -> None:
            self.seen.append(seconds)

    child = Child()

    class FakeMetrics:
        def child(self, op: Any) -> Any:
            return child if op == "send" else None

    timer = RequestTimer(FakeMetrics())  # type: ignore[arg-type]
    timer.start(1, "send")
    timer.start(2, "nonsense")  # not an op: not measured
    timer.start([3], "send")  # an id that cannot be a key: answered, not measured
    timer.done(None)  # a frame for no request
    timer.done(2)
    timer.done([3])
    assert child.seen == []
    timer.done(1)
    timer.done(1)  # a second frame with the same id
    assert len(child.seen) == 1 and child.seen[0] >= 0
    idle = RequestTimer(None)  # metrics off: records nothing
    idle.start(1, "send")
    idle.done(1)
