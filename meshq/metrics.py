"""Prometheus metrics: a registry per node, read from its live state at scrape time, and a
small trio HTTP server answering ``GET /metrics`` (config ``metrics_bind``).

State here: each node's private registry (never prometheus_client's global one: tests run
several nodes in one process), its request-latency histogram, the metrics listeners.
Never: a thread reading trio state (no ``start_http_server``), or an HTTP client that
disturbs the daemon: request heads are capped in size and time, clients in number, and
whatever goes wrong ends that one connection only.
"""

from __future__ import annotations

import logging
import time
import weakref
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

import trio
from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    InfoMetricFamily,
    Metric,
    SummaryMetricFamily,
)

from meshq.cluster.moves import KINDS
from meshq.config import parse_host_port
from meshq.errors import StartupError
from meshq.server.ops import OPS

if TYPE_CHECKING:
    from meshq.node import Node

__all__ = ["Metrics", "MetricsServer", "NodeCollector", "RequestTimer", "open_metrics_server",
           "parse_request_head", "request_timer"]

log = logging.getLogger("meshq.metrics")
HEAD_LIMIT = 8192  # bytes of request line and headers
READ_TIMEOUT = 5.0  # seconds a client has to send its request head
WRITE_TIMEOUT = 10.0  # seconds it has to take the response
MAX_CLIENTS = 32  # concurrent HTTP connections; more are closed at once
LINGER = 1.0  # seconds to drain what the client still sends after the response
# Request latency buckets, in seconds: a commit is around a millisecond; a receive that
# waits (long poll) counts its wait.
BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
           0.5, 1.0, 2.5, 5.0, 10.0, 30.0, float("inf"))
MEMBER_STATES = ("alive", "suspect", "dead", "left")
QUEUE_TOTALS = ("published", "delivered", "redelivered", "acked")
# status "server" field, metric name (without _total), help.
CLIENT_COUNTERS = (
    ("accepted", "meshq_client_connections_accepted", "Client connections accepted."),
    ("refused_over_limit", "meshq_client_connections_refused",
     "Client connections closed at once: max_connections reached."),
    ("frame_timeouts", "meshq_client_frame_timeouts",
     "Client connections closed: a frame not finished in client_frame_timeout."),
    ("oversize_frames", "meshq_client_oversize_frames",
     "Client connections closed: a frame longer than max_frame_bytes."),
)

# status "amqp" field, metric name, help: gauges, then counters (without _total).
AMQP_GAUGES = (
    ("connections", "meshq_amqp_connections", "Open AMQP connections."),
    ("channels", "meshq_amqp_channels", "Open AMQP channels."),
    ("consumers", "meshq_amqp_consumers", "AMQP consumers (basic.consume)."),
)
AMQP_COUNTERS = (
    ("accepted", "meshq_amqp_connections_accepted", "AMQP connections accepted."),
    ("refused_over_limit", "meshq_amqp_connections_refused",
     "AMQP connections closed at once: amqp_max_connections reached."),
    ("logins_refused", "meshq_amqp_logins_refused", "AMQP logins refused."),
)

_by_node: weakref.WeakKeyDictionary[Node, Metrics] = weakref.WeakKeyDictionary()


# --------------------------------------------------------------------------- collecting


def _seconds(ms: Any) -> float | None:
    return None if ms is None else float(ms) / 1000.0


def _gauge(name: str, doc: str, value: float) -> Metric:
    return GaugeMetricFamily(name, doc, value=value)


def _counter(name: str, doc: str, value: float) -> Metric:
    return CounterMetricFamily(name, doc, value=value)  # the name gains _total


class NodeCollector:
    """Turns ``node.status()`` (docs/ctl-json.md) and the broker's per-queue totals into
    metric families, each time it is collected."""

    def __init__(self, node: Node) -> None:
        self.node = node

    def describe(self) -> Iterable[Metric]:
        return []  # names are known only at scrape time; nothing is read at registration

    def collect(self) -> Iterator[Metric]:
        node = self.node
        status = node.status()
        info = status["node"]
        family = InfoMetricFamily("meshq_node", "This node.", labels=["node", "id", "version"])
        family.add_metric([node.name, node.id, node.version], {})
        yield family
        yield _gauge("meshq_uptime_seconds", "Seconds since the daemon started.",
                     info["uptime_s"])
        yield _gauge("meshq_accepting_writes", "1 while the node accepts sends, else 0.",
                     1 if info["accepting_writes"] else 0)
        resources = status.get("resources")
        if resources is not None:
            alarm = GaugeMetricFamily("meshq_alarm", "1 while this resource alarm is raised "
                                      "(sends refused), else 0.", labels=["resource"])
            for kind in ("disk", "memory"):
                alarm.add_metric([kind], 1 if kind in resources["alarms"] else 0)
            yield alarm
            if resources["disk_free_bytes"] is not None:
                yield _gauge("meshq_disk_free_bytes", "Free space for the data directory.",
                             resources["disk_free_bytes"])
                yield _gauge("meshq_memory_bytes", "Resident memory of meshqd and its writer.",
                             resources["memory_bytes"])
        yield from self._queues(status["queues"])
        yield _counter("meshq_redeliveries", "Leases ended without ack or nack (deadline "
                       "passed or connection closed).", status["broker"]["redeliveries"])
        yield from self._members(status["members"], status["mesh"])
        if status.get("replication") is not None:
            yield from self._replication(status["replication"])
            yield from self._moves(status["rebalance"])
        store = status["store"]
        yield _gauge("meshq_store_size_bytes", "Database plus -wal and -shm files.",
                     store["size_bytes"])
        yield SummaryMetricFamily("meshq_store_commit_seconds", "Store batch commits (count) "
                                  "and the time they took (sum).", count_value=store["commits"],
                                  sum_value=store["commit_seconds"])
        yield _counter("meshq_store_ops_committed", "Row operations committed.",
                       store["ops_committed"])
        yield _counter("meshq_store_failed_commits", "Batches whose commit failed.",
                       store["failed_commits"])
        server = status.get("server")  # the client listener's counts (node.server)
        if server is not None:
            yield _gauge("meshq_client_connections", "Open client connections.",
                         server["connections"])
            yield from (_counter(name, doc, server[key])
                        for key, name, doc in CLIENT_COUNTERS if key in server)
        amqp = status.get("amqp")  # the AMQP listener's counts (node.amqp)
        if amqp is not None:
            yield from (_gauge(name, doc, amqp[key]) for key, name, doc in AMQP_GAUGES)
            yield from (_counter(name, doc, amqp[key]) for key, name, doc in AMQP_COUNTERS)
        security = status.get("security")
        if security is not None:
            yield from self._security(security)
        access = status.get("access")
        if access is not None and "refused" in access:
            yield _counter("meshq_access_refused", "Requests refused by the access rules.",
                           access["refused"])

    def _queues(self, queues: list[dict[str, Any]]) -> Iterator[Metric]:
        def family(name: str, doc: str, kind: type = GaugeMetricFamily,
                   labels: tuple[str, ...] = ("queue",)) -> Any:
            return kind(f"meshq_queue_{name}", doc, labels=list(labels))

        depth = family("messages", "Messages by state (this node's copy).", labels=("queue",
                       "state"))
        consumers = family("consumers", "Active subscriptions.")
        here = family("dispatching", "1 when this node dispatches the queue.")
        totals = {kind: family(kind, f"Messages {kind} since start, on this node.",
                               CounterMetricFamily) for kind in QUEUE_TOTALS}
        stored = {kind: family(kind, doc, CounterMetricFamily) for kind, doc in (
            ("dead_lettered", "Messages dead-lettered (moved to the DLQ or dropped); kept "
             "across restarts."),
            ("expired", "Of those, by TTL."),
            ("dropped", "Of those, dropped for want of a DLQ."))}
        leases = 0
        broker_totals = self.node.broker.totals
        for q in queues:
            name = q["name"]
            for state in ("ready", "delayed", "leased"):
                depth.add_metric([name, state], q[state])
            consumers.add_metric([name], q["consumers"])
            dispatching = bool(q.get("dispatching_here", True))
            here.add_metric([name], 1 if dispatching else 0)
            if dispatching:
                leases += q["leased"]
            counts = broker_totals.get(name)
            for kind, fam in totals.items():
                fam.add_metric([name], counts[kind] if counts is not None else 0)
            for kind, fam in stored.items():
                fam.add_metric([name], q[kind])
        yield from (depth, consumers, here, *totals.values(), *stored.values())
        yield _gauge("meshq_active_leases", "Messages leased by this node, not yet acked.",
                     leases)

    def _members(self, members: list[dict[str, Any]],
                 mesh: dict[str, Any] | None) -> Iterator[Metric]:
        states = dict.fromkeys(MEMBER_STATES, 0)
        offsets = GaugeMetricFamily("meshq_member_clock_offset_seconds", "A peer's clock "
                                    "minus ours, from probe round trips.", labels=["member"])
        rtts = GaugeMetricFamily("meshq_member_rtt_seconds", "Round trip of our last direct "
                                 "probe of a peer.", labels=["member"])
        for m in members:
            states[m["state"]] = states.get(m["state"], 0) + 1
            if m.get("self"):
                continue
            if m.get("clock_offset_ms") is not None:
                offsets.add_metric([m["name"]], _seconds(m["clock_offset_ms"]) or 0.0)
            if m.get("rtt_ms") is not None:
                rtts.add_metric([m["name"]], _seconds(m["rtt_ms"]) or 0.0)
        by_state = GaugeMetricFamily("meshq_members", "Members this node knows, itself "
                                     "included, by state.", labels=["state"])
        for state, count in states.items():
            by_state.add_metric([state], count)
        yield from (by_state, offsets, rtts)
        if mesh is None:
            return
        median = _seconds(mesh.get("median_clock_offset_ms"))
        if median is not None:
            yield _gauge("meshq_clock_offset_median_seconds", "The cluster's median clock "
                         "minus ours.", median)
        yield _gauge("meshq_health_score", "Lifeguard local health (0: healthy).",
                     mesh["health_score"])
        yield _counter("meshq_bad_packets", "Malformed UDP packets dropped.",
                       mesh["bad_packets"])
        yield _counter("meshq_bad_streams", "Peer TCP streams refused.", mesh["bad_streams"])

    def _security(self, sec: dict[str, Any]) -> Iterator[Metric]:
        yield _gauge("meshq_cluster_keyed", "1 when peer traffic is encrypted and "
                     "authenticated with a cluster key, else 0.", 1 if sec["keyed"] else 0)
        yield _gauge("meshq_cluster_keys", "Keys in this node's ring.", len(sec["keys"]))
        for kind, what in (("packets", "UDP packets"), ("streams", "peer streams")):
            fam = CounterMetricFamily(f"meshq_peer_{kind}_rejected", f"{what} refused "
                                      "before reading: unkeyed, bad_key or rate_limited.",
                                      labels=["reason"])
            for reason, n in sec[f"rejected_{kind}"].items():
                fam.add_metric([reason], n)
            yield fam

    def _moves(self, rebalance: dict[str, Any]) -> Iterator[Metric]:
        """The moves this node makes (its status alone: summed over the nodes, the
        cluster's)."""
        under_way = rebalance["moves"]
        moves = GaugeMetricFamily("meshq_moves", "Partition moves this node makes, under "
                                  "way (docs/operations.md#rebalancing).", labels=["kind"])
        for kind in KINDS:
            moves.add_metric([kind], sum(1 for m in under_way if m["kind"] == kind))
        yield moves
        yield _gauge("meshq_move_messages_remaining", "Records the moves this node makes "
                     "have still to send.", sum(max(0, m["messages_total"] - m["messages_done"])
                                                for m in under_way))

    def _replication(self, repl: dict[str, Any]) -> Iterator[Metric]:
        yield _gauge("meshq_hinted_messages", "Messages held for queues this node is not a "
                     "holder of, waiting for hand-off.", repl["hinted_messages"])
        yield _gauge("meshq_takeovers_in_progress", "Queues this node is primary of but not "
                     "dispatching yet.", len(repl["taking_over"]))
        yield _gauge("meshq_replication_waiting_batches", "Local batches waiting for their "
                     "write quorum.", repl["waiting_batches"])
        yield _gauge("meshq_replication_links", "Open replication links.", len(repl["links"]))
        yield _counter("meshq_failed_quorums", "Batches answered TIMEOUT (outcome unknown) "
                       "for want of their write quorum, or fenced.", repl["failed_quorums"])
        yield _counter("meshq_fenced_batches", "Batches refused by a replica that promised "
                       "a later dispatch epoch.", repl["fenced_batches"])
        yield _counter("meshq_takeovers", "Partitions this node took over.", repl["takeovers"])
        yield _gauge("meshq_dispatching_partitions", "Queue partitions this node dispatches.",
                     repl["dispatching"])
        yield _counter("meshq_repair_rounds", "Anti-entropy rounds.", repl["repair_rounds"])
        repaired = CounterMetricFamily("meshq_repaired", "Repair work by kind (ctl-json.md: "
                                       "replication.repaired).", labels=["kind"])
        for kind, count in sorted(repl["repaired"].items()):
            repaired.add_metric([kind], count)
        yield repaired


class Metrics:
    """One node's registry: its collector and the client-request latency histogram."""

    def __init__(self, node: Node) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(NodeCollector(node))
        self.request_seconds = Histogram(
            "meshq_request_duration_seconds",
            "Client requests by op, from decoded to response ready to write.",
            ["op"], registry=self.registry, buckets=BUCKETS)
        self._children: dict[str, Any] = {}
        self._page: tuple[float, bytes] | None = None  # (when, body) of the last scrape
        self._rendering = trio.Lock()
        _by_node[node] = self  # what the node's connections time their requests with

    def child(self, op: Any) -> Any:
        """The histogram of ``op`` (a known op only: label values stay bounded)."""
        if not isinstance(op, str):
            return None
        found = self._children.get(op)
        if found is None and op in OPS:
            found = self._children[op] = self.request_seconds.labels(op)
        return found

    def render(self) -> bytes:
        return generate_latest(self.registry)

    async def render_shared(self) -> bytes:
        """The page. Scrapes that arrive while one is being made share it, so any number
        of scrapers cost one page at a time. The values are read on the event loop
        (they are its state); the text is made in a thread (at 10,000 queues that
        takes over a second)."""
        asked = trio.current_time()
        async with self._rendering:
            if self._page is not None and self._page[0] >= asked:
                return self._page[1]  # made while we waited: as fresh as we asked
            started = trio.current_time()
            frozen = _Frozen(list(self.registry.collect()))
            body = await trio.to_thread.run_sync(generate_latest, frozen)
            self._page = (started, body)
            return body


class _Frozen:
    """Metric families already collected, as generate_latest's registry."""

    def __init__(self, families: list[Metric]) -> None:
        self._families = families

    def collect(self) -> Iterable[Metric]:
        return self._families


class RequestTimer:
    """One connection's requests in flight: ``start`` once decoded, ``done`` when the
    response frame is written to the outgoing buffer. Any request id works (an id that
    cannot be a dict key, or is reused, only goes unmeasured)."""

    __slots__ = ("_metrics", "_started")

    def __init__(self, metrics: Metrics | None) -> None:
        self._metrics = metrics
        self._started: dict[Any, tuple[Any, float]] = {}

    def start(self, rid: Any, op: Any) -> None:
        if self._metrics is None:
            return
        child = self._metrics.child(op)
        if child is not None:
            try:
                self._started[rid] = (child, time.perf_counter())
            except TypeError:  # an unhashable id: answered, not measured
                pass

    def done(self, rid: Any) -> None:
        if not self._started:
            return
        try:
            entry = self._started.pop(rid, None)
        except TypeError:
            return
        if entry is not None:
            entry[0].observe(time.perf_counter() - entry[1])


def request_timer(node: Node) -> RequestTimer:
    """A timer for one connection of ``node`` (one that records nothing without metrics)."""
    return RequestTimer(_by_node.get(node))


# --------------------------------------------------------------------------- HTTP


def _head_end(buf: bytes | bytearray) -> int:
    """Where the request head ends (its blank line), or -1."""
    ends = [i for i in (buf.find(b"\r\n\r\n"), buf.find(b"\n\n")) if i >= 0]
    return min(ends) if ends else -1


def parse_request_head(head: bytes) -> tuple[str, str]:
    """``(method, path)`` of an HTTP/1.x request head, query string dropped.

    Raises ``ValueError`` when ``head`` is not one."""
    line = head.split(b"\n", 1)[0].rstrip(b"\r")
    try:
        text = line.decode("ascii")
    except UnicodeDecodeError:
        raise ValueError("request line is not ASCII") from None
    parts = text.split(" ")
    if len(parts) != 3:
        raise ValueError("expected METHOD TARGET HTTP/1.x")
    method, target, version = parts
    if version not in ("HTTP/1.0", "HTTP/1.1"):
        raise ValueError(f"unsupported version {version!r}")
    if not method.isalpha() or not method.isupper():
        raise ValueError(f"bad method {method!r}")
    if not target.startswith("/") or not target.isprintable():
        raise ValueError(f"bad target {target!r}")
    return method, target.split("?", 1)[0]


_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
            500: "Internal Server Error"}


def _response(status: int, body: bytes, *, content_type: str = "text/plain; charset=utf-8",
              head_only: bool = False) -> bytes:
    lines = [f"HTTP/1.1 {status} {_REASONS[status]}", f"Content-Type: {content_type}",
             f"Content-Length: {len(body)}", "Connection: close"]
    if status == 405:
        lines.append("Allow: GET, HEAD")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + (b"" if head_only else body)


class MetricsServer:
    """``GET /metrics`` on ``bind`` (HOST:PORT): one request per connection, then close."""

    def __init__(self, metrics: Metrics, bind: str, *, read_timeout: float = READ_TIMEOUT,
                 max_clients: int = MAX_CLIENTS) -> None:
        self.metrics = metrics
        self.bind_address = bind
        self.read_timeout = read_timeout
        self.max_clients = max_clients
        self.listeners: list[trio.SocketListener] = []
        self.clients = 0  # connections being served now

    async def bind(self) -> None:
        """Listen; StartupError (one line, naming the setting) when that fails."""
        try:
            host, port = parse_host_port(self.bind_address)
            self.listeners = await trio.open_tcp_listeners(port, host=host)
        except (OSError, ValueError) as exc:
            reason = getattr(exc, "strerror", None) or exc
            raise StartupError(f"cannot serve metrics on {self.bind_address} "
                               f"(metrics_bind): {reason}") from None

    @property
    def address(self) -> str:
        """The first bound address as HOST:PORT (the real port when bound to port 0)."""
        host, port = self.listeners[0].socket.getsockname()[:2]
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Serve until cancelled (after ``bind``, which this calls if needed)."""
        if not self.listeners:
            await self.bind()
        log.info("metrics on http://%s/metrics", self.address)
        try:
            await trio.serve_listeners(self._serve_one, self.listeners, task_status=task_status)
        finally:
            for listener in self.listeners:
                await trio.aclose_forcefully(listener)

    async def _serve_one(self, stream: trio.SocketStream) -> None:
        if self.clients >= self.max_clients:
            await trio.aclose_forcefully(stream)
            return
        self.clients += 1
        try:
            reply = None
            with trio.move_on_after(self.read_timeout):
                reply = await self._reply(stream)
            if reply is not None:
                with trio.move_on_after(WRITE_TIMEOUT):
                    await stream.send_all(reply)
                    await stream.send_eof()
                    await self._linger(stream)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
        except Exception:  # a bug here must end this connection, not the daemon
            log.exception("metrics request failed")
        finally:
            self.clients -= 1
            await trio.aclose_forcefully(stream)

    async def _reply(self, stream: trio.SocketStream) -> bytes | None:
        """The response to the request on ``stream``; None when it sent nothing."""
        buf = bytearray()
        while (end := _head_end(buf)) < 0 or end > HEAD_LIMIT:
            if len(buf) > HEAD_LIMIT:
                return _response(400, b"request head too large\n")
            data = await stream.receive_some(4096)
            if not data:
                return _response(400, b"incomplete request\n") if buf else None
            buf += data
        try:
            method, path = parse_request_head(bytes(buf[:end]))
        except ValueError as exc:
            return _response(400, f"{exc}\n".encode())
        if method not in ("GET", "HEAD"):
            return _response(405, b"only GET\n")
        if path != "/metrics":
            return _response(404, b"see /metrics\n", head_only=method == "HEAD")
        try:
            body = await self.metrics.render_shared()
        except Exception:
            log.exception("collecting metrics failed")
            return _response(500, b"collecting metrics failed; see the daemon's log\n")
        return _response(200, body, content_type=CONTENT_TYPE_LATEST, head_only=method == "HEAD")

    async def _linger(self, stream: trio.SocketStream) -> None:
        """Read what the client still sends, briefly, so that closing does not reset the
        connection before it has read the response."""
        with trio.move_on_after(LINGER):
            received = 0
            while received < 65536:
                data = await stream.receive_some(4096)
                if not data:
                    return
                received += len(data)


async def open_metrics_server(bind: str, node: Node) -> MetricsServer:
    """A bound MetricsServer for ``node``; StartupError when ``bind`` cannot be listened on."""
    metrics = MetricsServer(Metrics(node), bind)
    await metrics.bind()
    return metrics
