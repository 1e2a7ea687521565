"""One AMQP connection's methods as meshq ops, through a ClientSession (router, receipts).

The connection's events (meshq.amqp.connection) come in; each becomes an op of the
socket protocol, served wherever the cluster router says, exactly as for a socket client;
the answers become AMQP replies, confirms and deliveries. A channel answers synchronous
methods in order: while one's answer is due, the channel's later frames wait. Publishes
that arrive together for one queue go as one ``send``. State here: the channels, the
requests in flight, exclusive and auto-delete queues. Never: a delivery before its
consume-ok, a delivery tag for a message whose lease we did not get, a confirm before the
send was confirmed by its write quorum, or an exception out of ``receive`` for what a
peer sent (it closes the channel or the connection with the code RabbitMQ uses).
"""

from __future__ import annotations

import itertools
import logging
import secrets
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import trio
from pamqp import commands as spec

from meshq.amqp._declaring import Declaring
from meshq.amqp._publishing import NOT_IMPLEMENTED, Publishing
from meshq.amqp.channel import Channel, Consumer, Unacked, by_queue
from meshq.amqp.connection import (
    NOT_ALLOWED,
    AmqpConnection,
    ChannelClosed,
    ChannelOpened,
    Event,
    MethodReceived,
    Opened,
    Published,
)
from meshq.amqp.mapping import (
    ACCESS_REFUSED,
    NOT_FOUND,
    PRECONDITION_FAILED,
    RESOURCE_LOCKED,
    ArgumentError,
    error_reply,
    from_meshq,
    queue_options,
)
from meshq.amqp.topology import Topology
from meshq.errors import MeshqError, NotFound, Unauthorized
from meshq.server.access import PeerCreds
from meshq.server.ops import OPS
from meshq.server.session import ClientSession

if TYPE_CHECKING:
    from meshq.node import Node

__all__ = ["Bridge"]

log = logging.getLogger("meshq.amqp")

INTERNAL_ERROR = 541
UNLIMITED_PREFETCH = 65535  # meshq's largest prefetch stands for AMQP's 0 (no limit)
NO_ACK_PREFETCH = 1000  # a no_ack consumer's deliveries not yet written to its socket
RENEW_AT = 1 / 3  # a lease is renewed when this share of it is left
LATER = object()  # a synchronous method's answer comes from a later op

Callback = Callable[[dict[str, Any] | None, MeshqError | None], None]


def _ids(m: Any) -> tuple[int, int]:
    index = getattr(m, "index", 0) or 0
    return index >> 16, index & 0xFFFF


class Bridge(Publishing, Declaring):
    """``spawn`` starts a task owned by the connection; ``kick`` says there is output;
    ``topology``: the node's exchanges and bindings."""

    def __init__(self, node: Node, conn: AmqpConnection, spawn: Callable[..., None],
                 kick: Callable[[], None], topology: Topology,
                 owners: dict[str, Bridge] | None = None) -> None:
        self.node = node
        self.broker = node.broker
        self.conn = conn
        self.topology = topology
        self._spawn = spawn
        self.kick = kick
        self.session = ClientSession(node, self)
        self.channels: dict[int, Channel] = {}
        self.capabilities: dict[str, Any] = {}
        self.user = ""
        self.creds = PeerCreds(amqp_user="")  # the login, once the connection is open
        self.sends_in_flight = 0  # send ops not yet answered (back-pressure)
        self.exclusive: set[str] = set()
        self.auto_delete: set[str] = set()
        # exclusive queue -> the connection on this node that declared it (405 for others)
        self.owners: dict[str, Bridge] = {} if owners is None else owners
        self._rids = itertools.count(1)
        self._waiting: dict[int, Callback] = {}
        # Deliveries for a meshq consumer not (or no longer) ours: held while a consume is
        # being answered (they may be its own, before its consume-ok), else given back.
        self._early: dict[str, list[list[dict[str, Any]]]] = {}
        self._consumes_pending = 0
        self._written_acks: dict[str, list[str]] = {}  # no_ack deliveries being written
        self.closed = False

    # -- Out (the ClientSession's answers and pushes) ---------------------------------------
    def respond(self, rid: Any, result: dict[str, Any]) -> None:
        self._answer(rid, result, None)

    def error(self, rid: Any, exc: MeshqError) -> None:
        self._answer(rid, None, exc)

    def _answer(self, rid: Any, result: dict[str, Any] | None,
                exc: MeshqError | None) -> None:
        cb = self._waiting.pop(rid, None)
        if cb is None:
            return
        try:
            cb(result, exc)
        except Exception:  # our bug: this connection ends, the daemon goes on
            self._crashed()
        self.kick()

    def _crashed(self) -> None:
        log.exception("AMQP connection: internal error")
        self.conn.close(INTERNAL_ERROR, "INTERNAL_ERROR - see the daemon's log")

    def push(self, frame: dict[str, Any]) -> None:
        if self.closed:
            return
        tag = frame.get("consumer")
        if not isinstance(tag, str):
            return
        try:
            if frame.get("push") == "cancel":
                self._server_cancel(tag)
            elif frame.get("push") == "deliver":
                self._deliveries(tag, frame.get("messages") or [])
        except Exception:
            self._crashed()
        self.kick()

    def spawn(self, fn: Callable[..., Awaitable[Any]], *args: Any) -> None:
        self._spawn(fn, *args)

    # -- ops ---------------------------------------------------------------------------------
    def _op(self, op: str, req: dict[str, Any], cb: Callback | None = None) -> None:
        rid = next(self._rids)
        self._waiting[rid] = cb or _ignore
        req["op"] = op
        self.node.store.seal_if_full()  # between two requests: a safe place to cut a batch
        self.session.handle(rid, op, req, OPS[op])

    # -- events in ---------------------------------------------------------------------------
    def receive(self, events: list[Event]) -> None:
        """Act on the connection's events (in order; publishes in a row for one channel
        are sent together)."""
        i = 0
        while i < len(events):
            ev = events[i]
            if isinstance(ev, Published | MethodReceived):  # a run for one channel
                j = i + 1
                while j < len(events) and isinstance(events[j], Published | MethodReceived) \
                        and events[j].channel == ev.channel:  # type: ignore[union-attr]
                    j += 1
                self._channel_input(ev.channel, events[i:j])
                i = j
                continue
            if isinstance(ev, ChannelOpened):
                self.channels[ev.channel] = Channel(ev.channel)
            elif isinstance(ev, ChannelClosed):
                self._channel_gone(ev.channel)
            elif isinstance(ev, Opened):
                self.user = ev.user
                self.creds = PeerCreds(amqp_user=ev.user)
                caps = ev.client_properties.get("capabilities")
                self.capabilities = caps if isinstance(caps, dict) else {}
            i += 1

    def _channel_input(self, number: int, evs: list[Any]) -> None:
        ch = self.channels.get(number)
        if ch is None or ch.closed:
            return
        if ch.busy:
            ch.held.extend(evs)
            return
        self._run(ch, evs)

    def _run(self, ch: Channel, evs: list[Any]) -> None:
        """A channel's frames in order: publishes in a row go as one batch per queue,
        and so do acks in a row (``basic.ack`` needs no answer)."""
        publishes: list[Published] = []
        acked: list[Unacked] = []
        try:
            for k, ev in enumerate(evs):
                if ch.closed:
                    return
                if isinstance(ev, Published):
                    if acked:
                        self._ack_now(acked)
                    if not publishes:
                        self._allow("send")
                    publishes.append(ev)
                    continue
                if publishes:
                    self._publish(ch, publishes)
                    publishes = []
                m = ev.method
                if type(m) is spec.Basic.Ack and not ch.tx:
                    if not acked:
                        self._allow("ack")
                    acked.extend(ch.take(m.delivery_tag or 0, bool(m.multiple)))
                    continue
                if acked:
                    self._ack_now(acked)
                op = _OP_OF.get(type(m))
                if op is not None:
                    self._allow(op)
                self._method(ch, m)
                if ch.busy:
                    ch.held.extendleft(reversed(evs[k + 1:]))
                    return
            if publishes and not ch.closed:
                self._publish(ch, publishes)
        except ArgumentError as exc:
            self._channel_error(ch, exc.code, exc.text)
        finally:
            if acked:
                self._ack_now(acked)

    def _allow(self, op: str) -> None:
        """The socket's access rules, for this login (``amqp:NAME`` principals)."""
        try:
            self.node.access.check(op, self.creds)
        except Unauthorized as exc:
            raise ArgumentError(ACCESS_REFUSED, f"ACCESS_REFUSED - {exc.message}") from None

    def _ack_now(self, acked: list[Unacked]) -> None:
        for queue, receipts in by_queue(acked).items():
            self._op("ack", {"queue": queue, "ids": receipts})
        acked.clear()

    def _answered(self, ch: Channel) -> None:
        """A synchronous method's answer went out: the channel's held frames go on (in a
        loop, not by recursion: an answer given at once comes back here)."""
        ch.busy = False
        if ch.draining:
            return
        ch.draining = True
        try:
            self._drain(ch)
        finally:
            ch.draining = False

    def _drain(self, ch: Channel) -> None:
        while ch.held and not ch.busy and not ch.closed:
            evs: list[Any] = []
            while ch.held and (not evs or isinstance(ch.held[0], Published)):
                evs.append(ch.held.popleft())
                if not isinstance(evs[0], Published):
                    break
            self._run(ch, evs)

    def _channel_error(self, ch: Channel, code: int, text: str, method: Any = None) -> None:
        cls, meth = _ids(method) if method is not None else (0, 0)
        self.conn.close_channel(ch.number, code, text, cls, meth)
        self._channel_gone(ch.number)

    def _connection_error(self, code: int, text: str, method: Any = None) -> None:
        cls, meth = _ids(method) if method is not None else (0, 0)
        self.conn.close(code, text, cls, meth)

    # -- methods -----------------------------------------------------------------------------
    def _method(self, ch: Channel, m: Any) -> None:
        handler = _METHODS.get(type(m))
        if handler is None:
            self._connection_error(NOT_IMPLEMENTED, f"NOT_IMPLEMENTED - {m.name} is not "
                                   "supported by meshq", m)
            return
        if ch.tx and isinstance(m, spec.Basic.Ack | spec.Basic.Nack | spec.Basic.Reject):
            ch.tx_held.append(m)
            return
        handler(self, ch, m)

    def _sync(self, ch: Channel, op: str, req: dict[str, Any], method: Any,
              done: Callable[[dict[str, Any]], Any], *, nowait: bool = False,
              on_error: Callable[[MeshqError], bool] | None = None,
              undo: Callable[[dict[str, Any]], None] | None = None) -> None:
        """Run ``op``; ``done(result)`` returns the reply method (None: none). The channel
        waits for it unless ``nowait``. ``undo(result)``: what to take back when the answer
        comes after the channel closed (a consumer, leases)."""
        ch.busy = not nowait

        def answered(result: dict[str, Any] | None, exc: MeshqError | None) -> None:
            try:
                outcome(result, exc)
            finally:
                if op == "consume":
                    self._consume_answered()

        def outcome(result: dict[str, Any] | None, exc: MeshqError | None) -> None:
            if ch.closed:
                if undo is not None and result is not None:
                    undo(result)
                return
            if exc is not None:
                if on_error is None or not on_error(exc):
                    code, text = error_reply(exc)
                    self._channel_error(ch, code, text, method)
                    return
            else:
                try:
                    reply = done(result or {})
                except ArgumentError as err:
                    self._channel_error(ch, err.code, err.text, method)
                    return
                if reply is LATER:
                    return
                if reply is not None and not nowait:
                    self.conn.send_method(ch.number, reply)
            if not nowait:
                self._answered(ch)

        if op == "consume":
            self._consumes_pending += 1
        self._op(op, req, answered)

    def _consume_answered(self) -> None:
        self._consumes_pending -= 1
        if self._consumes_pending == 0 and self._early:  # nobody's: back to their queues
            early, self._early = self._early, {}
            for batches in early.values():
                for msgs in batches:
                    self._release(msgs)

    def _reply(self, ch: Channel, reply: Any) -> None:
        self.conn.send_method(ch.number, reply)

    def _queue_name(self, ch: Channel, name: str, method: Any) -> str:
        name = name or ch.last_queue
        if not name:
            raise ArgumentError(NOT_FOUND, "NOT_FOUND - no previously declared queue")
        owner = self.owners.get(name)
        if owner is not None and owner is not self:
            raise ArgumentError(RESOURCE_LOCKED, f"RESOURCE_LOCKED - cannot obtain exclusive "
                                f"access to locked queue {name!r} in vhost '/'. It could be "
                                "originally declared on another connection or the exclusive "
                                "property value does not match that of the original "
                                "declaration.")
        return name

    # queue ---------------------------------------------------------------------------------
    def _queue_declare(self, ch: Channel, m: spec.Queue.Declare) -> None:
        name = m.queue
        if not name:
            if m.passive:
                name = self._queue_name(ch, name, m)
            else:
                name = "amq.gen-" + secrets.token_urlsafe(16)
        elif name.startswith("amq.") and not m.passive:
            raise ArgumentError(ACCESS_REFUSED, f"ACCESS_REFUSED - queue name {name!r} "
                                "contains reserved prefix 'amq.*'")
        self._queue_name(ch, name, m)  # locked by another connection's exclusive declare?
        options = queue_options(m.arguments)
        qs = self.broker.queues.get(name)
        q = qs[0] if qs else None
        req: dict[str, Any] = {"queue": name}
        if m.passive:
            req["passive"] = True
        elif q is not None:
            have = {k: q.options.partition_count if k == "partitions" else getattr(q.options, k)
                    for k in options}
            differ = [k for k, v in options.items() if have[k] != v]
            if differ:
                raise ArgumentError(PRECONDITION_FAILED, f"PRECONDITION_FAILED - inequivalent "
                                    f"arg(s) for queue {name!r}: " + ", ".join(
                                        f"{k} is {have[k]!r}, asked {options[k]!r}"
                                        for k in differ))
            req["passive"] = True
        else:
            if "partitions" not in options and self._partitions_by_default() is None:
                options["partitions"] = 1  # one ordered queue, as RabbitMQ's, unless asked
            req["options"] = options

        creating = "options" in req  # exclusive and auto-delete only for a queue made here

        def done(result: dict[str, Any]) -> Any:
            ch.last_queue = name
            if m.exclusive and creating:
                self.exclusive.add(name)
                self.owners.setdefault(name, self)
            if m.auto_delete and creating:
                self.auto_delete.add(name)
            return spec.Queue.DeclareOk(name, int(result.get("ready", 0)),
                                        int(result.get("consumers", 0)))

        self._sync(ch, "declare", req, m, done, nowait=m.nowait)

    def _partitions_by_default(self) -> int | None:
        """The config's ``default_partitions``, if the operator set one."""
        cluster = self.node.cluster
        return cluster.partitions_setting if cluster is not None else None

    def _queue_delete(self, ch: Channel, m: spec.Queue.Delete) -> None:
        name = self._queue_name(ch, m.queue, m)

        def deleted(exc: MeshqError) -> bool:
            if isinstance(exc, NotFound):  # as RabbitMQ: deleting what is gone is fine
                if not m.nowait:
                    self._reply(ch, spec.Queue.DeleteOk(0))
                return True
            return False

        def ok(result: dict[str, Any]) -> Any:
            return spec.Queue.DeleteOk(int(result.get("deleted", 0)))

        def delete() -> None:
            self._forget_queue(name)
            self._sync(ch, "delete", {"queue": name}, m, ok, nowait=m.nowait,
                       on_error=deleted)

        if not (m.if_unused or m.if_empty):
            delete()
            return

        def checked(result: dict[str, Any]) -> Any:
            stats = (result.get("queues") or [{}])[0]
            if m.if_unused and stats.get("consumers", 0):
                raise ArgumentError(PRECONDITION_FAILED, f"PRECONDITION_FAILED - queue "
                                    f"{name!r} in vhost '/' in use")
            if m.if_empty and stats.get("ready", 0) + stats.get("leased", 0) + stats.get(
                    "delayed", 0):
                raise ArgumentError(PRECONDITION_FAILED, f"PRECONDITION_FAILED - queue "
                                    f"{name!r} in vhost '/' is not empty")
            delete()
            return None if m.nowait else LATER  # (nowait: the channel goes on now)

        self._sync(ch, "stats", {"queue": name}, m, checked, on_error=deleted)

    def _queue_purge(self, ch: Channel, m: spec.Queue.Purge) -> None:
        name = self._queue_name(ch, m.queue, m)
        self._sync(ch, "purge", {"queue": name}, m,
                   lambda r: spec.Queue.PurgeOk(int(r.get("purged", 0))), nowait=m.nowait)

    # basic ---------------------------------------------------------------------------------
    def _qos(self, ch: Channel, m: spec.Basic.Qos) -> None:
        if m.prefetch_size:
            self._connection_error(NOT_IMPLEMENTED, "NOT_IMPLEMENTED - prefetch_size!=0 "
                                   f"({m.prefetch_size})", m)
            return
        ch.prefetch = m.prefetch_count
        self._reply(ch, spec.Basic.QosOk())

    def _consume(self, ch: Channel, m: spec.Basic.Consume) -> None:
        name = self._queue_name(ch, m.queue, m)
        if m.no_ack:
            self._allow("ack")  # it acks too
        tag = m.consumer_tag or "amq.ctag-" + secrets.token_urlsafe(16)
        if tag in ch.consumers:
            self._connection_error(NOT_ALLOWED, f"NOT_ALLOWED - attempt to reuse consumer "
                                   f"tag {tag!r}", m)
            return
        c = Consumer(tag, name, m.no_ack)
        ch.consumers[tag] = c
        prefetch = NO_ACK_PREFETCH if m.no_ack else UNLIMITED_PREFETCH if not ch.prefetch \
            else min(ch.prefetch, UNLIMITED_PREFETCH)

        def done(result: dict[str, Any]) -> Any:
            c.meshq_tag = str(result.get("consumer", ""))
            if ch.consumers.get(tag) is not c:  # cancelled, or the channel closed, meanwhile
                self._cancel_meshq(c.meshq_tag)
                return None
            if not m.nowait:
                self._reply(ch, spec.Basic.ConsumeOk(tag))
            for msgs in self._early.pop(c.meshq_tag, []):
                self._deliver(ch, c, msgs)
            return None

        def failed(exc: MeshqError) -> bool:
            ch.consumers.pop(tag, None)
            return False

        def undo(result: dict[str, Any]) -> None:
            self._cancel_meshq(str(result.get("consumer", "")))

        self._sync(ch, "consume", {"queue": name, "prefetch": prefetch}, m, done,
                   on_error=failed, undo=undo)

    def _cancel(self, ch: Channel, m: spec.Basic.Cancel) -> None:
        c = ch.consumers.pop(m.consumer_tag or "", None)
        if c is not None and c.meshq_tag:
            self._cancel_meshq(c.meshq_tag)
            self._maybe_auto_delete(c.queue)
        if not m.nowait:
            self._reply(ch, spec.Basic.CancelOk(m.consumer_tag))

    def _cancel_meshq(self, meshq_tag: str) -> None:
        self._op("cancel", {"consumer": meshq_tag})

    def _maybe_auto_delete(self, queue: str) -> None:
        """An auto-delete queue this connection declared goes when its last consumer here
        does (RabbitMQ counts every connection's consumers; see docs/amqp.md)."""
        if queue not in self.auto_delete:
            return
        for ch in self.channels.values():
            if any(c.queue == queue for c in ch.consumers.values()):
                return
        self._forget_queue(queue)
        self._op("delete", {"queue": queue})

    def _forget_queue(self, name: str) -> None:
        self.auto_delete.discard(name)
        self.exclusive.discard(name)
        if self.owners.get(name) is self:
            del self.owners[name]

    def _server_cancel(self, meshq_tag: str) -> None:
        """meshq ended a consumer for good (its queue was deleted)."""
        for ch in self.channels.values():
            c = ch.consumer_by_meshq(meshq_tag)
            if c is not None:
                del ch.consumers[c.tag]
                if self.capabilities.get("consumer_cancel_notify"):
                    self._reply(ch, spec.Basic.Cancel(c.tag, nowait=True))
                return

    def _deliveries(self, meshq_tag: str, msgs: list[dict[str, Any]]) -> None:
        for ch in self.channels.values():
            c = ch.consumer_by_meshq(meshq_tag)
            if c is not None:
                self._deliver(ch, c, msgs)
                return
        if self._consumes_pending:
            self._early.setdefault(meshq_tag, []).append(msgs)  # perhaps before consume-ok
        else:
            self._release(msgs)  # a consumer cancelled meanwhile: back to the queue

    def _deliver(self, ch: Channel, c: Consumer, msgs: list[dict[str, Any]]) -> None:
        now = trio.current_time()
        auto: list[str] = []
        for d in msgs:
            exchange, routing_key, props = from_meshq(d)
            left = d.get("lease_left")
            if c.no_ack:
                tag = ch.delivered(None)
                auto.append(d["receipt"])
            else:
                tag = ch.delivered(Unacked(d["queue"], d["receipt"],
                                           now + (left if isinstance(left, int | float)
                                                  else 30.0)))
            self.conn.send_delivery(ch.number, c.tag, tag, bool(d.get("redelivered")),
                                    exchange, routing_key, props, d["body"])
        if auto:  # acked once written to the socket: a slow reader holds back the queue
            self._written_acks.setdefault(c.queue, []).extend(auto)

    def written(self) -> None:
        """The driver wrote what was buffered: no_ack deliveries in it are acked now."""
        acks, self._written_acks = self._written_acks, {}
        for queue, receipts in acks.items():
            self._op("ack", {"queue": queue, "ids": receipts})

    def _release(self, msgs: list[dict[str, Any]]) -> None:
        groups: dict[str, list[str]] = {}
        for d in msgs:
            groups.setdefault(d["queue"], []).append(d["receipt"])
        for queue, receipts in groups.items():
            self._op("nack", {"queue": queue, "ids": receipts, "requeue": True})

    def _get(self, ch: Channel, m: spec.Basic.Get) -> None:
        name = self._queue_name(ch, m.queue, m)
        if m.no_ack:
            self._allow("ack")  # it acks too

        def done(result: dict[str, Any]) -> Any:
            msgs = result.get("messages") or []
            if not msgs:
                return spec.Basic.GetEmpty()
            d = msgs[0]
            exchange, routing_key, props = from_meshq(d)
            left = d.get("lease_left")
            unacked = None if m.no_ack else Unacked(
                d["queue"], d["receipt"], trio.current_time() + (
                    left if isinstance(left, int | float) else 30.0))
            tag = ch.delivered(unacked)
            self.conn.send_content(ch.number, spec.Basic.GetOk(
                tag, bool(d.get("redelivered")), exchange, routing_key, 0), props, d["body"])
            return None

        self._sync(ch, "receive", {"queue": name, "max": 1, "wait": 0.0,
                                   "auto_ack": bool(m.no_ack)}, m, done,
                   undo=lambda r: self._release(r.get("messages") or []))

    def _settle(self, ch: Channel, m: spec.Basic.Ack | spec.Basic.Nack | spec.Basic.Reject
                ) -> None:
        multiple = bool(getattr(m, "multiple", False))
        items = ch.take(m.delivery_tag or 0, multiple)
        requeue = getattr(m, "requeue", True)
        for queue, receipts in by_queue(items).items():
            if isinstance(m, spec.Basic.Ack):
                self._op("ack", {"queue": queue, "ids": receipts})
            else:
                self._op("nack", {"queue": queue, "ids": receipts, "requeue": bool(requeue)})

    def _recover(self, ch: Channel, m: Any) -> None:
        for queue, receipts in by_queue(ch.take_all()).items():
            self._op("nack", {"queue": queue, "ids": receipts, "requeue": True})
        if isinstance(m, spec.Basic.Recover):
            self._reply(ch, spec.Basic.RecoverOk())

    def _flow(self, ch: Channel, m: spec.Channel.Flow) -> None:
        if not m.active:
            self._connection_error(NOT_IMPLEMENTED, "NOT_IMPLEMENTED - active=false", m)
            return
        self._reply(ch, spec.Channel.FlowOk(True))

    def _channel_gone(self, number: int) -> None:
        """The channel closed: its consumers end, its unacked deliveries go back."""
        ch = self.channels.pop(number, None)
        if ch is None or ch.closed:
            return
        ch.closed = True
        ch.held.clear()
        for c in ch.consumers.values():
            if c.meshq_tag:
                self._cancel_meshq(c.meshq_tag)
        queues = {c.queue for c in ch.consumers.values()}
        ch.consumers.clear()
        for queue, receipts in by_queue(ch.take_all()).items():
            self._op("nack", {"queue": queue, "ids": receipts, "requeue": True})
        for queue in queues:
            self._maybe_auto_delete(queue)

    # -- leases ------------------------------------------------------------------------------
    def renew(self, now: float) -> None:
        """Extend the leases of unacked deliveries near their end: AMQP has no visibility
        timeout, a delivery is the consumer's until it settles it or its channel closes."""
        due: dict[str, list[Unacked]] = {}
        for ch in self.channels.values():
            for u in ch.unacked.values():
                qs = self.broker.queues.get(u.queue)
                vt = qs[0].options.visibility_timeout if qs else 30.0
                if u.deadline - now < vt * RENEW_AT:
                    due.setdefault(u.queue, []).append(u)
                    u.deadline = now + vt
        for queue, items in due.items():
            qs = self.broker.queues.get(queue)
            vt = qs[0].options.visibility_timeout if qs else 30.0
            self._op("extend", {"queue": queue, "ids": [u.receipt for u in items],
                                "timeout": vt})

    # -- the end -----------------------------------------------------------------------------
    def close(self) -> None:
        """The connection is gone: its leases go back (the session releases them), its
        exclusive and auto-delete queues are deleted."""
        if self.closed:
            return
        doomed = sorted(self.exclusive | self.auto_delete)
        for name in doomed:
            self._forget_queue(name)
        for number in list(self.channels):
            self._channel_gone(number)
        for name in doomed:
            self._op("delete", {"queue": name})
        self.closed = True
        self.session.close()

    @property
    def consumers(self) -> int:
        return sum(len(ch.consumers) for ch in self.channels.values())


def _ignore(result: dict[str, Any] | None, exc: MeshqError | None) -> None:
    pass


# The socket op each AMQP method is judged as by the access rules (docs/amqp.md).
_OP_OF: dict[type, str] = {
    spec.Exchange.Declare: "declare", spec.Exchange.Delete: "delete",
    spec.Queue.Declare: "declare", spec.Queue.Delete: "delete", spec.Queue.Purge: "purge",
    spec.Queue.Bind: "declare", spec.Queue.Unbind: "declare",
    spec.Basic.Consume: "consume", spec.Basic.Get: "receive", spec.Basic.Ack: "ack",
    spec.Basic.Nack: "nack", spec.Basic.Reject: "nack", spec.Basic.Recover: "nack",
    spec.Basic.RecoverAsync: "nack", spec.Basic.Cancel: "cancel",
}

_METHODS: dict[type, Callable[[Bridge, Channel, Any], None]] = {
    spec.Exchange.Declare: Bridge._exchange_declare,
    spec.Exchange.Delete: Bridge._exchange_delete,
    spec.Queue.Declare: Bridge._queue_declare,
    spec.Queue.Delete: Bridge._queue_delete,
    spec.Queue.Purge: Bridge._queue_purge,
    spec.Queue.Bind: Bridge._queue_bind,
    spec.Queue.Unbind: Bridge._queue_unbind,
    spec.Basic.Qos: Bridge._qos,
    spec.Basic.Consume: Bridge._consume,
    spec.Basic.Cancel: Bridge._cancel,
    spec.Basic.Get: Bridge._get,
    spec.Basic.Ack: Bridge._settle,
    spec.Basic.Nack: Bridge._settle,
    spec.Basic.Reject: Bridge._settle,
    spec.Basic.Recover: Bridge._recover,
    spec.Basic.RecoverAsync: Bridge._recover,
    spec.Confirm.Select: Bridge._confirm_select,
    spec.Tx.Select: Bridge._tx_select,
    spec.Tx.Commit: Bridge._tx_commit,
    spec.Tx.Rollback: Bridge._tx_rollback,
    spec.Channel.Flow: Bridge._flow,
}
