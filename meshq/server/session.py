"""ClientSession: one client connection's ops, routed across the cluster.

Each queue op goes where meshq.cluster.router says: served here, served here once this
node's takeover of the partition is done, or relayed to the partition's primary (an
Upstream per node). What failover costs is latency: an op refused UNAVAILABLE (nothing
was done) is routed again as the membership settles, for up to ROUTE_RETRY seconds; an op
whose outcome a broken relay left unknown is repeated only when that is safe (a declare,
stats, a send whose every message has a dedup id), else the client hears TIMEOUT. A
subscription follows its partition: when the partition moves (its dispatcher changes,
or the relay to it breaks) the consumer subscribes again at the new primary, under the
same tag, without the client seeing anything; only a final cancel (the queue was
deleted) reaches the client. Acks travel by receipt, so they succeed on any path while
the lease runs.

A relayed session (on the primary, serving another node's client) only serves here or
refuses; it never relays on. Its leases belong to the client's node and boot (``holder``)
and survive a broken relay stream (they end by ack, deadline, or that node's death);
a ``bye`` from the client's node releases them at once.

State here: the broker Session, the upstreams, the client's subscriptions and where
each is served. Never: a request answered twice or not at all, a subscription silently
dropped, a relay of a relayed request.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import trio

from meshq.broker import Moved, Pending, Session, parse_receipt
from meshq.broker.partitions import RECEIPT_SEP, receipt
from meshq.cluster.changes import Decl, decode_change, encode_change
from meshq.cluster.moves import annotate
from meshq.cluster.router import AwaitTakeover, Local, Refuse, Relay, Route, route
from meshq.errors import (
    BadRequest,
    MeshqError,
    NotFound,
    Timeout,
    Unavailable,
    error_from_code,
)
from meshq.mesh.wire import PeerProtocolError
from meshq.model import Message, QueueOptions
from meshq.server.fifo import Fifo
from meshq.server.relay import Upstream
from meshq.server.spread import Spread
from meshq.server.spread import named as _named
from meshq.server.steal import Steal

if TYPE_CHECKING:
    from meshq.node import Node

__all__ = ["ROUTE_RETRY", "ClientSession", "Out", "delivery"]

log = logging.getLogger("meshq.server.session")

MAX_WAITS = 4096  # relayed receives' stops remembered per session (meshq.server.spread)
ROUTE_RETRY = 8.0  # seconds an op refused UNAVAILABLE is routed again before the client hears
_tags = itertools.count(1)

Handler = Callable[["ClientSession", dict[str, Any]], Any]


class Out(Protocol):
    """Where a session's answers and pushes go (a Connection)."""

    def respond(self, rid: Any, result: dict[str, Any]) -> None: ...

    def error(self, rid: Any, exc: MeshqError) -> None: ...

    def push(self, frame: dict[str, Any]) -> None: ...

    def spawn(self, fn: Callable[..., Awaitable[Any]], *args: Any) -> None: ...


def delivery(msg: Message, now: float, relayed: bool = False) -> dict[str, Any]:
    """A message as it travels to a consumer; ``receipt`` acks it from any connection
    while its lease runs, ``lease_left`` seconds from ``now`` (the broker's clock). To
    another node (``relayed``) it also carries ``now`` as ``at``, so that the client's
    node can take the time it spent on the way off its lease (``in_time``)."""
    left = None if msg.lease_deadline is None else round(max(0.0, msg.lease_deadline - now), 3)
    d: dict[str, Any] = {
        "id": msg.id,
        "queue": msg.queue,
        "body": msg.body,
        "headers": msg.headers,
        "hlc": msg.hlc,
        "delivery_count": msg.delivery_count,
        "redelivered": msg.delivery_count > 1,
        "receipt": receipt(msg.id, msg.lease_id, msg.index),
        "lease_left": left,
    }
    if relayed:
        d["at"] = now
    return d


@dataclass
class _Sub:
    """A client's subscription: where it is served (None: here; "": nowhere, being
    re-homed; else the node relayed to); on a queue of several partitions, where each
    partition's part of it is (``homes``, by index; ``home`` unused)."""

    tag: str
    queue: str
    prefetch: int
    home: str | None
    homes: dict[int, str | None] | None = None
    steal: Steal | None = None  # local first (meshq.server.steal), on such a queue


def in_time(msgs: Any, now: float, max_offset: float) -> list[Any]:
    """Deliveries relayed from another node (``delivery(..., relayed=True)``), their
    ``lease_left`` less the time they spent on the way beyond what clock offsets explain
    (``max_offset`` s), without those whose lease ended on the way: a stream that stalled
    (a one-way partition, say) must not hand a client a lease that another consumer holds
    by now. Without ``at`` (an older node) a delivery is kept as it is."""
    if not isinstance(msgs, list):
        return msgs
    out = []
    for m in msgs:
        at = m.pop("at", None) if isinstance(m, dict) else None
        left = m.get("lease_left") if isinstance(m, dict) else None
        if isinstance(at, int | float) and isinstance(left, int | float):
            late = now - at - max_offset
            if late > 0:
                if left - late <= 0:
                    log.info("a delivery of %r arrived %.3f s late, after its lease; dropped "
                             "(it is delivered again)", m.get("id"), now - at)
                    continue
                m["lease_left"] = round(left - late, 3)
        out.append(m)
    return out


def _safe_to_repeat(op: str, req: dict[str, Any]) -> bool:
    """Whether an op whose outcome is unknown may be repeated: it is idempotent (declare,
    stats), deduplicated (a send whose every message has a dedup id), an ack by receipts
    (a receipt acks its own lease only; see _after_repeat), or a receive or consume
    (at-least-once: leases whose answer was lost end at their deadline, a subscription
    on a lost connection ends with it)."""
    if op in ("declare", "stats", "receive", "consume"):
        return True
    if op == "send":
        msgs = req.get("messages")
        return isinstance(msgs, list) and bool(msgs) and all(
            isinstance(m, dict) and isinstance(m.get("dedup_id"), str) for m in msgs)
    if op == "ack":
        ids = req.get("ids")
        return isinstance(ids, list) and bool(ids) and all(
            isinstance(i, str) and RECEIPT_SEP in i for i in ids)
    return False


def _remote_result(node: str, answer: dict[str, Any] | None, sent: bool) -> dict[str, Any]:
    """The result in an upstream's answer (None: the stream ended first), or its error."""
    if answer is None:
        if sent:
            raise Timeout(f"lost the connection to node {node!r}, which dispatches the "
                          "queue, after sending; outcome unknown")
        raise Unavailable(f"could not reach node {node!r}, which dispatches the queue")
    err = answer.get("error")
    if err is not None:
        if not isinstance(err, dict):
            raise Unavailable(f"node {node!r} sent a malformed error")
        raise error_from_code(str(err.get("code")), str(err.get("message", "")))
    result = answer.get("result")
    if not isinstance(result, dict):
        raise Unavailable(f"node {node!r} sent a malformed answer")
    return result


def _after_repeat(op: str, result: dict[str, Any]) -> dict[str, Any]:
    """An ack repeated after an unknown outcome: a receipt whose message is gone was most
    likely acked by the first attempt (its tombstone is what says "no such message")."""
    if op != "ack" or not isinstance(result.get("failed"), dict):
        return result
    acked = list(result.get("acked", []))
    failed = {}
    for item, why in result["failed"].items():
        if isinstance(why, str) and why.startswith("no such message"):
            acked.append(parse_receipt(item)[0])
        else:
            failed[item] = why
    if failed:  # the first attempt may have acked them before their lease was released
        raise Timeout(f"could not ack {len(failed)} message(s) on a repeat after an unknown "
                      "outcome; the first attempt may have: " + "; ".join(
                          f"{parse_receipt(i)[0]}: {why}" for i, why in failed.items()))
    return {**result, "acked": acked, "failed": failed}


class ClientSession:
    def __init__(self, node: Node, out: Out, *, relayed_holder: str | None = None) -> None:
        self.node = node
        self.broker = node.broker
        self.cluster = node.cluster
        self.out = out
        self.relayed = relayed_holder is not None
        self.session = Session(self._deliver, self._cancelled)
        self.session.holder = relayed_holder or self.broker.holder
        self.upstreams: dict[str, Upstream] = {}
        self.subs: dict[str, _Sub] = {}
        self.closed = False
        self.graceful = False  # relayed: the client's node said ``bye``
        self.spread = Spread(self)
        self.fifo = Fifo(self)
        # Relayed receives' stops by wait_id: the event, and how many receives share it.
        self.waits: dict[str, tuple[trio.Event, int]] = {}

    # -- entry ---------------------------------------------------------------------------
    def handle(self, rid: Any, op: str, req: dict[str, Any], handler: Handler) -> None:
        """Serve one request (access was checked by the caller)."""
        if op == "cancel" and not self.relayed:
            self._cancel(rid, req, handler)
            return
        if op != "send" and "partition" in req and not self.relayed:
            self.out.error(rid, BadRequest("'partition' names a send's partition; other "
                                           "ops name theirs with 'partitions' (a list)"))
            return
        name = req.get("queue")
        if self.cluster is not None and isinstance(name, str) and op in _QUEUE_OPS:
            if self.relayed:
                self._learn_decl(req)
            elif self.spread.handle(rid, op, name, req, handler):
                return  # a queue of several partitions
            r = self._route(op, name, req)
            if isinstance(r, Local) and (name in self.broker.queues or op == "declare"
                                         or self.cluster.catalog_ready.is_set()):
                self._run_local(rid, op, req, handler)
            elif isinstance(r, Relay) and op != "consume":
                self._relay_once(rid, op, req, handler, r.node)
            else:
                self.out.spawn(self._routed, rid, op, req, handler, r)
            return
        if self.cluster is not None and op == "stats" and name is None and not self.relayed:
            self.out.spawn(self._answer, rid, self._cluster_stats())
            return
        if self.cluster is not None and op == "status" and not self.relayed:
            self.out.spawn(self._answer, rid, self._status())
            return
        if self.cluster is not None and op == "rebalance" and not self.relayed:
            self.out.spawn(self._answer, rid, self.cluster.rebalance())
            return
        self._run_local(rid, op, req, handler)

    def new_tag(self) -> str:
        return f"{self.broker.tag_prefix}c{next(_tags)}"

    # -- routing -------------------------------------------------------------------------
    def _route(self, op: str, name: str, req: dict[str, Any]) -> Route:
        """Where ``op`` goes: the primary of the partition the request names
        (``partition``, or each of ``partitions``, which must share it), else of
        partition 0 (a declare, a delete, a queue of one partition)."""
        cluster = self.cluster
        assert cluster is not None
        me = cluster.me
        qs = self.broker.queues.get(name)
        read_only = op == "declare" and req.get("passive") is True
        if qs is None:
            options = None
            if op == "declare" and not read_only:
                try:
                    options = QueueOptions.from_dict(req.get("options") or {})
                except BadRequest:
                    return Local()  # the broker says what is wrong with them
            reps = cluster.replicas_of(name, options)
            return route(op, name, me, reps, active=True, relayed=self.relayed,
                         read_only=read_only)
        r: Route | None = None
        for q in _named(qs, req):
            r = route(op, name, me, cluster.replicas(q), active=q.active,
                      relayed=self.relayed, read_only=read_only)
            if not isinstance(r, Local):
                return r
        return r or Local()

    def _learn_decl(self, req: dict[str, Any]) -> None:
        """A relayed request carries its queue's declaration, which this node (the new
        primary, perhaps just joined) may not have heard of yet."""
        raw = req.pop("_decl", None)
        if raw is None:
            return
        try:
            decl = decode_change(raw)
        except PeerProtocolError:
            return
        if isinstance(decl, Decl) and decl.queue == req.get("queue"):
            self.broker.replica.merge([decl])

    def _relay_once(self, rid: Any, op: str, req: dict[str, Any], handler: Handler,
                    node: str) -> None:
        """The usual relayed request, with no task of its own: answered from the upstream's
        callback. A refusal or a lost stream goes on in ``_routed`` (route again, retry)."""
        up = self._upstream(node)

        def got(answer: dict[str, Any] | None, sent: bool) -> None:
            try:
                result = self._arrived(op, _remote_result(node, answer, sent))
            except (Unavailable, Timeout) as exc:
                if not self.closed:
                    self.out.spawn(self._routed, rid, op, req, handler,
                                   self._route(op, req["queue"], req), exc)
                return
            except MeshqError as exc:
                self.out.error(rid, exc)
                return
            self.out.respond(rid, result)

        up.request(self._relay_frame(up, op, req), got)

    async def _routed(self, rid: Any, op: str, req: dict[str, Any], handler: Handler,
                      first: Route, failed: MeshqError | None = None) -> None:
        try:
            result = await self._serve(op, req, handler, first, failed)
        except MeshqError as exc:
            self.out.error(rid, exc)
            return
        except Exception:
            self._internal_error(rid, op)
            return
        self.out.respond(rid, result)

    def _internal_error(self, rid: Any, what: Any) -> None:
        """A bug, not the client's fault: logged, and the client told so (this request
        only; the connection and the daemon go on)."""
        log.exception("request %.80r (%s) failed", rid, what)
        self.out.error(rid, MeshqError("internal error; see the daemon's log"))

    async def _serve(self, op: str, req: dict[str, Any], handler: Handler,
                     first: Route, failed: MeshqError | None = None, *,
                     retry_for: float = ROUTE_RETRY) -> dict[str, Any]:
        """Serve ``op`` where it must go, routing again while it is refused UNAVAILABLE
        (and, when safe, after an unknown outcome), for up to ROUTE_RETRY seconds.
        ``failed``: how a first attempt (``_relay_once``) ended; ``first`` is the route
        after it. ``retry_for``: how long to route again."""
        cluster = self.cluster
        assert cluster is not None
        name = req["queue"]
        deadline = trio.current_time() + retry_for
        r = first
        backoff = 0.02
        repeated = False
        while True:
            try:
                if failed is not None:
                    first_error: MeshqError = failed
                    failed = None
                    raise first_error
                if isinstance(r, Refuse):
                    raise Unavailable(r.reason)
                if isinstance(r, AwaitTakeover):
                    for q in _named(self.broker.queues.get(name, ()), req):
                        await cluster.until_active(q)
                    r = self._route(op, name, req)
                    if isinstance(r, AwaitTakeover):
                        raise Unavailable(f"queue {name!r} is still being taken over; retry")
                    continue
                log.debug("%s: %s %s -> %s", cluster.me, op, name, r)
                if isinstance(r, Local):
                    if name not in self.broker.queues and op != "declare":
                        await cluster.until_catalog()
                    result = await self._call_local(op, req, handler)
                else:
                    result = await self._call_remote(r.node, op, req)
            except (Unavailable, Timeout) as exc:
                log.debug("%s: %s %s: %s", cluster.me, op, name, exc)
                retry = isinstance(exc, Unavailable) or _safe_to_repeat(op, req)
                repeated = repeated or isinstance(exc, Timeout)
                if (not retry or self.relayed or self.closed
                        or trio.current_time() + backoff > deadline):
                    if repeated and isinstance(exc, Unavailable):
                        # An earlier attempt's outcome is unknown: not "nothing written".
                        raise Timeout(f"{exc.message}; an earlier attempt may have been "
                                      "applied (outcome unknown)") from None
                    raise
                with trio.move_on_after(backoff):
                    await cluster.changed.wait()
                backoff = min(0.5, backoff * 2)
                r = self._route(op, name, req)
                continue
            return _after_repeat(op, result) if repeated else result

    async def _call_local(self, op: str, req: dict[str, Any],
                          handler: Handler) -> dict[str, Any]:
        try:
            result = handler(self, req)
        finally:
            self.broker.flush_hand_overs()  # the op is done: its early deliveries go now
        if isinstance(result, Pending):
            value: dict[str, Any] = await result.wait()
            return self._served_here(op, req, value)
        if isinstance(result, dict):
            return self._served_here(op, req, result)
        return self._served_here(op, req, await result)

    def _served_here(self, op: str, req: dict[str, Any],
                     result: dict[str, Any]) -> dict[str, Any]:
        if op == "consume" and not self.relayed:
            tag = result["consumer"]
            self.subs[tag] = _Sub(tag, req["queue"], req.get("prefetch", 100), None)
        return result

    async def _call_remote(self, node: str, op: str, req: dict[str, Any], *,
                           register: bool = True) -> dict[str, Any]:
        up = self._upstream(node)
        frame = self._relay_frame(up, op, req)
        done = trio.Event()
        box: list[Any] = []

        def got(answer: dict[str, Any] | None, sent: bool) -> None:
            box.extend((answer, sent))
            done.set()

        up.request(frame, got)
        await done.wait()
        result = self._arrived(op, _remote_result(node, *box))
        if op == "consume" and register:
            tag = result.get("consumer")
            if isinstance(tag, str):
                self.subs[tag] = _Sub(tag, req["queue"], req.get("prefetch", 100), node)
        return result

    def _relay_frame(self, up: Upstream, op: str, req: dict[str, Any]) -> dict[str, Any]:
        """``req`` as it goes upstream; the first request of a queue on that stream carries
        the queue's declaration (the node there may not have heard of it yet)."""
        frame = {k: v for k, v in req.items() if k != "id" and not k.startswith("_")}
        name = req["queue"]
        entry = self.broker.catalog.get(name)
        if entry is not None and entry.live and up.declared.get(name) != entry.inc:
            frame["_decl"] = encode_change(Decl(name, entry.inc, entry.options))
            up.declared[name] = entry.inc
        if op == "consume":
            frame.setdefault("tag", self.new_tag())
        return frame

    def _upstream(self, node: str) -> Upstream:
        up = self.upstreams.get(node)
        if up is None or up.closed:
            cluster = self.cluster
            assert cluster is not None and self.node.transport is not None
            up = Upstream(node, me=cluster.me, cluster=self.node.cluster_name,
                          holder=self.session.holder, transport=self.node.transport,
                          address=self.node.address_of, on_push=self._from_upstream,
                          on_close=self._upstream_closed)
            self.upstreams[node] = up
            self.node.spawn(up.run)
        return up

    # -- local ops ---------------------------------------------------------------------
    def _run_local(self, rid: Any, op: str, req: dict[str, Any], handler: Handler) -> None:
        try:
            result = handler(self, req)
        except MeshqError as exc:
            self.out.error(rid, exc)
            return
        except Exception:
            self._internal_error(rid, op)
            return
        finally:
            self.broker.flush_hand_overs()  # the op is done: its early deliveries go now
        if isinstance(result, Pending):
            result.then(lambda value, err: self._finish(rid, op, req, value, err))
        elif isinstance(result, dict):
            self.out.respond(rid, self._served_here(op, req, result))
        else:
            self.out.spawn(self._await_local, rid, op, req, handler, result)

    def _finish(self, rid: Any, op: str, req: dict[str, Any], value: Any,
                err: BaseException | None) -> None:
        if err is None:
            self.out.respond(rid, self._served_here(op, req, value))
        elif isinstance(err, MeshqError):
            self.out.error(rid, err)
        else:  # the commit failed and was rolled back: nothing was written
            self.out.error(rid, Unavailable(f"commit failed: {err}"))

    async def _await_local(self, rid: Any, op: str, req: dict[str, Any], handler: Handler,
                           work: Awaitable[dict[str, Any]]) -> None:
        try:
            result = await work
        except Moved as exc:  # the partition moved while a receive waited: route again
            if self.cluster is None or self.relayed:
                self.out.error(rid, exc)
                return
            await self._routed(rid, op, req, handler, self._route(op, req["queue"], req))
            return
        except MeshqError as exc:
            self.out.error(rid, exc)
            return
        except Exception:
            self._internal_error(rid, op)
            return
        self.out.respond(rid, self._served_here(op, req, result))

    async def _answer(self, rid: Any, work: Awaitable[dict[str, Any]]) -> None:
        try:
            self.out.respond(rid, await work)
        except MeshqError as exc:
            self.out.error(rid, exc)

    # -- subscriptions -------------------------------------------------------------------
    def _deliver(self, tag: str, msgs: list[Message]) -> None:
        now = self.broker.clock.time()
        frame = {"push": "deliver", "consumer": tag,
                 "messages": [delivery(m, now, self.relayed) for m in msgs]}
        if msgs and self.fifo.ordered(msgs[0].queue):
            self.fifo.handed_over(tag, msgs, frame)
        if not self.relayed and msgs and len(self.broker.queues.get(msgs[0].queue, ())) > 1:
            self.spread.delivered(frame)  # (receipts by id, for acks by bare id)
            if self.fifo.take(frame):
                return  # its merge hands it over in order
        self.out.push(frame)

    def stop_of(self, req: dict[str, Any]) -> trio.Event | None:
        """The event that ends a receive's wait early, if the request has one: a receive
        over partitions here and elsewhere (meshq.server.spread) gives its part here an
        event, and its relayed parts a ``wait_id`` that ``_unwait`` ends."""
        stop = req.get("_stop")
        if isinstance(stop, trio.Event):
            return stop
        wait_id = req.get("wait_id")
        if not self.relayed or not isinstance(wait_id, str):
            return None
        event, users = self.waits.get(wait_id) or (trio.Event(), 0)
        self.waits[wait_id] = (event, users + 1)
        return event

    def forget_wait(self, req: dict[str, Any]) -> None:
        """A receive of ``stop_of`` ended."""
        wait_id = req.get("wait_id")
        if not self.relayed or not isinstance(wait_id, str) or wait_id not in self.waits:
            return
        event, users = self.waits[wait_id]
        if users <= 1:
            del self.waits[wait_id]
        else:
            self.waits[wait_id] = (event, users - 1)

    def unwait(self, wait_id: str) -> None:
        """End the receives of ``wait_id``, and those still to come (they may be routed
        yet: their stop is kept, at most MAX_WAITS of them)."""
        event, users = self.waits.get(wait_id) or (trio.Event(), 0)
        event.set()
        if users:
            return
        self.waits[wait_id] = (event, 0)
        while len(self.waits) > MAX_WAITS:
            self.waits.pop(next(iter(self.waits)))

    def _cancelled(self, tag: str, reason: str, final: bool, index: int = 0) -> None:
        """The broker ended one of our consumers here (of partition ``index``)."""
        if self.relayed:  # the client's node decides what to do
            self.out.push({"push": "cancel", "consumer": tag, "reason": reason,
                           "final": final, "partition": index})
            return
        sub = self.subs.get(tag)
        if sub is not None and sub.homes is not None:
            self.spread.ended(sub, index, None, reason, final)
            return
        if final or sub is None:
            self.subs.pop(tag, None)
            self.out.push({"push": "cancel", "consumer": tag, "reason": reason,
                           "final": True})
            return
        self._rehome(sub)

    def _from_upstream(self, up: Upstream, frame: dict[str, Any]) -> None:
        if frame.get("push") == "cancel":
            tag = frame.get("consumer")
            sub = self.subs.get(tag) if isinstance(tag, str) else None
            if sub is not None and sub.homes is not None:
                index = frame.get("partition")
                if type(index) is int:
                    self.spread.ended(sub, index, up.node,
                                      str(frame.get("reason", "cancelled")),
                                      bool(frame.get("final")))
                return
            if sub is None or sub.home != up.node:
                return  # an old home's news
            if frame.get("final"):
                del self.subs[sub.tag]
                self.out.push({"push": "cancel", "consumer": sub.tag,
                               "reason": frame.get("reason", "cancelled"), "final": True})
            else:
                self._rehome(sub)
            return
        if frame.get("push") == "deliver":
            frame["messages"] = self._in_time(frame.get("messages"))
            if not frame["messages"]:
                return
        self.spread.delivered(frame)
        if self.fifo.take(frame):
            return  # its merge hands it over in order
        self.out.push(frame)  # deliveries: leases granted there, acked by receipt

    def _in_time(self, msgs: Any) -> Any:
        return in_time(msgs, self.broker.clock.time(), self.broker.hlc.max_offset_ms / 1000)

    def _arrived(self, op: str, result: dict[str, Any]) -> dict[str, Any]:
        """A relayed op's result; a receive's deliveries as ``in_time`` leaves them."""
        if op == "receive" and "messages" in result:
            result["messages"] = self._in_time(result["messages"])
        return result

    def _upstream_closed(self, up: Upstream) -> None:
        if self.upstreams.get(up.node) is up:
            del self.upstreams[up.node]
        if self.cluster is not None:
            hint = getattr(self.node, "hint_unreachable", None)
            if hint is not None and not self.closed:
                hint(up.node)
        for sub in list(self.subs.values()):
            if sub.homes is not None:
                self.spread.lost_home(sub, up.node)
            elif sub.home == up.node:
                self._rehome(sub)

    def _rehome(self, sub: _Sub) -> None:
        if self.closed or sub.home == "":
            return
        sub.home = ""
        self.out.spawn(self._resubscribe, sub)

    async def _resubscribe(self, sub: _Sub) -> None:
        """Subscribe again where the partition is dispatched now, under the same tag."""
        cluster = self.cluster
        assert cluster is not None
        backoff = 0.02
        while self.subs.get(sub.tag) is sub and not self.closed:
            req = {"op": "consume", "queue": sub.queue, "prefetch": sub.prefetch,
                   "tag": sub.tag}
            r = self._route("consume", sub.queue, req)
            try:
                if isinstance(r, Local):
                    self.broker.consume(self.session, sub.queue, sub.prefetch, tag=sub.tag)
                    sub.home = None
                    return
                if isinstance(r, Relay):
                    await self._call_remote(r.node, "consume", req, register=False)
                    if self.subs.get(sub.tag) is not sub:  # cancelled meanwhile: undo
                        self._request_quietly(r.node, {"op": "cancel", "consumer": sub.tag})
                    sub.home = r.node
                    return
                if isinstance(r, AwaitTakeover):
                    for q in _named(self.broker.queues.get(sub.queue, ()), req):
                        await cluster.until_active(q)
                    continue
                raise Unavailable(r.reason)
            except NotFound as exc:
                if self.subs.get(sub.tag) is sub:
                    del self.subs[sub.tag]
                    self.out.push({"push": "cancel", "consumer": sub.tag,
                                   "reason": exc.message, "final": True})
                return
            except MeshqError:
                with trio.move_on_after(backoff):
                    await cluster.changed.wait()
                backoff = min(1.0, backoff * 2)

    def _request_quietly(self, node: str, frame: dict[str, Any]) -> None:
        self._upstream(node).request(frame, lambda answer, sent: None)

    def _cancel(self, rid: Any, req: dict[str, Any], handler: Handler) -> None:
        tag = req.get("consumer")
        sub = self.subs.pop(tag, None) if isinstance(tag, str) else None
        if sub is None:
            self._run_local(rid, "cancel", req, handler)  # NotFound, or a local consumer
            return
        if sub.homes is not None:
            self.spread.cancel(sub)
            self.out.respond(rid, {})
            return
        if sub.home is None:
            try:
                self.broker.cancel(self.session, sub.tag)
            except NotFound:
                pass  # it ended meanwhile (moved)
        elif sub.home:
            self._request_quietly(sub.home, {"op": "cancel", "consumer": sub.tag})
        self.out.respond(rid, {})

    # -- cluster-wide reads --------------------------------------------------------------
    async def _cluster_stats(self, by_partition: bool = False) -> dict[str, Any]:
        """Every queue's stats from the node that dispatches it (this node's own copy when
        that node cannot be reached); each partition's too if ``by_partition``."""
        out = []
        for name in sorted(self.broker.queues):
            stats = await self._queue_counts(name)
            if stats is not None:
                if not by_partition:
                    stats.pop("by_partition", None)
                out.append(stats)
        return {"queues": out}

    async def _queue_counts(self, name: str) -> dict[str, Any] | None:
        """The queue's counts, each partition's from its primary (meshq.server.spread);
        None if it is gone."""
        qs = self.broker.queues.get(name)
        if qs is None:
            return None
        try:
            return await self.spread.counts(name, qs)
        except NotFound:
            return None  # deleted meanwhile

    async def _status(self) -> dict[str, Any]:
        """The node's status with the cluster's counts (each partition's primary's) and
        moves (every live node's), asked at once."""
        cluster = self.cluster
        assert cluster is not None
        status = self.node.status()
        moves: list[dict[str, Any]] = []

        async def ask_moves() -> None:
            moves.append(await cluster.rebalance())

        async with trio.open_nursery() as nursery:
            nursery.start_soon(ask_moves)
            counts = {s["name"]: s for s in (await self._cluster_stats(True))["queues"]}
        for q in status["queues"]:
            got = counts.get(q["name"])
            if got is not None:
                for key in ("ready", "leased", "delayed", "dead_lettered", "expired",
                            "dropped", "consumers"):
                    q[key] = got[key]
                q["counted_by"] = got.get("counted_by")
                each = got["by_partition"]  # each counted by its primary
                for p, counted in zip(q["partitions"], each, strict=False):
                    for key in ("ready", "leased", "delayed", "counted_by"):
                        p[key] = counted.get(key)
        annotate(status, moves[0])
        return status

    # -- the end -------------------------------------------------------------------------
    def close(self) -> None:
        """The connection is gone. A local client's leases here are released; a relayed
        one's only if its node said ``bye`` (else they run to their deadline)."""
        self.closed = True
        self.subs.clear()
        self.broker.close_session(self.session, release=not self.relayed or self.graceful)
        for up in list(self.upstreams.values()):
            up.finish()
        self.upstreams.clear()


_QUEUE_OPS = frozenset({"declare", "delete", "purge", "send", "receive", "consume", "ack",
                        "nack", "extend", "stats"})
