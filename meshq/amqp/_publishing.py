"""The publishing half of the Bridge: routing through exchanges, sends, confirms and tx.

A publish is routed (meshq.amqp.topology) to its queues; publishes that arrive together
for one queue go as one ``send``. With confirms, a publish routed to several queues is
acked once every one of them has it, nacked if any could not; an unroutable one is
returned (``mandatory``) and then acked, as RabbitMQ does. In a transaction, publishes
and settlements wait for commit. Never: a confirm before the write quorum has the
message, or an exception for what a peer sent but ArgumentError.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from pamqp import commands as spec

from meshq.amqp.channel import Channel, Confirms
from meshq.amqp.connection import AmqpConnection, Published
from meshq.amqp.mapping import (
    ACCESS_REFUSED,
    NOT_FOUND,
    PRECONDITION_FAILED,
    ArgumentError,
    check_expiration,
    to_meshq,
)
from meshq.amqp.topology import Topology
from meshq.errors import MeshqError

if TYPE_CHECKING:
    from meshq.broker import Broker

__all__ = ["NOT_IMPLEMENTED", "NO_ROUTE", "Publishing"]

log = logging.getLogger("meshq.amqp")

NOT_IMPLEMENTED = 540
NO_ROUTE = 312

Callback = Callable[[dict[str, Any] | None, MeshqError | None], None]
Groups = dict[str, tuple[list[dict[str, Any]], list[int]]]


class _Immediate(Exception):
    def __init__(self, method: Any) -> None:
        super().__init__("immediate")
        self.method = method


class Publishing:
    if TYPE_CHECKING:  # the Bridge provides these
        broker: Broker
        conn: AmqpConnection
        topology: Topology
        sends_in_flight: int

        def _op(self, op: str, req: dict[str, Any], cb: Callback | None = None) -> None: ...
        def _reply(self, ch: Channel, reply: Any) -> None: ...
        def _answered(self, ch: Channel) -> None: ...
        def _connection_error(self, code: int, text: str, method: Any = None) -> None: ...
        def _settle(self, ch: Channel, m: Any) -> None: ...
        def _channel_error(self, ch: Channel, code: int, text: str,
                           method: Any = None) -> None: ...

    def _publish(self, ch: Channel, evs: list[Published]) -> None:
        """Publishes in a row; those before a bad one are sent, then its error raised."""
        bad: Exception | None = None
        for i, ev in enumerate(evs):
            try:
                self._check_publish(ev)
            except (ArgumentError, _Immediate) as exc:
                bad, evs = exc, evs[:i]
                break
        if ch.tx:
            ch.tx_held.extend(evs)
        else:
            for queue, (msgs, seqs) in self._route(ch, evs).items():
                self._send(ch, queue, msgs, seqs)
        if isinstance(bad, _Immediate):
            self._connection_error(NOT_IMPLEMENTED, "NOT_IMPLEMENTED - immediate=true",
                                   bad.method)
        elif bad is not None:
            raise bad

    def _check_publish(self, ev: Published) -> None:
        m = ev.method
        if m.immediate:
            raise _Immediate(m)
        limit = self.broker.limits.max_message_bytes
        if len(ev.body) > limit:
            raise ArgumentError(PRECONDITION_FAILED, f"PRECONDITION_FAILED - message size "
                                f"{len(ev.body)} is larger than configured max size {limit}")
        x = self.topology.exchange(m.exchange)
        if x is None:
            raise ArgumentError(NOT_FOUND, f"NOT_FOUND - no exchange {m.exchange!r} in "
                                "vhost '/'")
        if x.internal:
            raise ArgumentError(ACCESS_REFUSED, f"ACCESS_REFUSED - cannot publish to "
                                f"internal exchange {m.exchange!r} in vhost '/'")
        if ev.expiration is not None:
            check_expiration(ev.expiration)

    def _route(self, ch: Channel, evs: list[Published]) -> Groups:
        """The messages (and confirm numbers) for each queue; unroutable ones returned
        (``mandatory``) and confirmed at once."""
        groups: Groups = {}
        for ev in evs:
            m = ev.method
            seq = ch.confirms.publish() if ch.confirms is not None else 0
            x = self.topology.exchange(m.exchange)
            queues = [] if x is None else self.topology.route(x, m.routing_key, ev.headers)
            if not queues:  # dropped, as RabbitMQ drops it
                if m.mandatory:
                    self.conn.send_content(ch.number, spec.Basic.Return(
                        NO_ROUTE, "NO_ROUTE", m.exchange, m.routing_key), ev.raw_properties,
                        ev.body)
                if seq:
                    self._confirm(ch, seq, True)
                continue
            if seq and len(queues) > 1:
                ch.split[seq] = [len(queues), True]
            for queue in queues:
                msgs, seqs = groups.setdefault(queue, ([], []))
                msgs.append(to_meshq(m.exchange, m.routing_key, queue, ev.body,
                                     ev.raw_properties, ev.headers, ev.expiration))
                seqs.append(seq)
        return groups

    def _send(self, ch: Channel, queue: str, msgs: list[dict[str, Any]], seqs: list[int],
              then: Callable[[bool], None] | None = None) -> None:
        self.sends_in_flight += 1

        def sent(result: dict[str, Any] | None, exc: MeshqError | None) -> None:
            self.sends_in_flight -= 1
            if exc is not None:
                log.debug("AMQP publish to %r failed: %s", queue, exc)
            for seq in seqs:
                if seq:
                    self._part_confirmed(ch, seq, exc is None)
            if then is not None:
                then(exc is None)

        self._op("send", {"queue": queue, "messages": msgs}, sent)

    def _part_confirmed(self, ch: Channel, seq: int, ok: bool) -> None:
        """One queue of publish ``seq`` has it (or could not take it)."""
        split = ch.split.get(seq)
        if split is not None:
            split[0] -= 1
            split[1] = split[1] and ok
            if split[0] > 0:
                return
            del ch.split[seq]
            ok = bool(split[1])
        self._confirm(ch, seq, ok)

    def _confirm(self, ch: Channel, seq: int, ok: bool) -> None:
        if ch.closed or ch.confirms is None:
            return
        for kind, tag, multiple in ch.confirms.settle(seq, ok):
            if kind == "ack":
                self.conn.send_confirm(ch.number, tag, multiple)
            else:
                self._reply(ch, spec.Basic.Nack(tag, multiple, False))

    # confirm and tx --------------------------------------------------------------------------
    def _confirm_select(self, ch: Channel, m: spec.Confirm.Select) -> None:
        if ch.tx:
            raise ArgumentError(PRECONDITION_FAILED, "PRECONDITION_FAILED - cannot switch "
                                "from tx to confirm mode")
        if ch.confirms is None:
            ch.confirms = Confirms()
        if not m.nowait:
            self._reply(ch, spec.Confirm.SelectOk())

    def _tx_select(self, ch: Channel, m: spec.Tx.Select) -> None:
        if ch.confirms is not None:
            raise ArgumentError(PRECONDITION_FAILED, "PRECONDITION_FAILED - cannot switch "
                                "from confirm to tx mode")
        ch.tx = True
        self._reply(ch, spec.Tx.SelectOk())

    def _tx_commit(self, ch: Channel, m: spec.Tx.Commit) -> None:
        """Apply what the transaction held; commit-ok once its publishes are confirmed."""
        if not ch.tx:
            raise ArgumentError(PRECONDITION_FAILED, "PRECONDITION_FAILED - channel is not "
                                "transactional")
        held, ch.tx_held = ch.tx_held, []
        for item in held:
            if not isinstance(item, Published):
                self._settle(ch, item)
        groups = self._route(ch, [e for e in held if isinstance(e, Published)])
        if not groups:
            self._reply(ch, spec.Tx.CommitOk())
            return
        left, failed = [len(groups)], [False]

        def one_done(success: bool) -> None:
            left[0] -= 1
            failed[0] = failed[0] or not success
            if left[0] > 0 or ch.closed:
                return
            if failed[0]:  # (RabbitMQ's tx has no partial outcome to report either)
                self._channel_error(ch, PRECONDITION_FAILED, "PRECONDITION_FAILED - "
                                    "UNAVAILABLE: a publish of the transaction could not be "
                                    "written; what the others wrote stays", m)
                return
            self._reply(ch, spec.Tx.CommitOk())
            self._answered(ch)

        ch.busy = True
        for queue, (msgs, _) in groups.items():
            self._send(ch, queue, msgs, [], then=one_done)

    def _tx_rollback(self, ch: Channel, m: spec.Tx.Rollback) -> None:
        if not ch.tx:
            raise ArgumentError(PRECONDITION_FAILED, "PRECONDITION_FAILED - channel is not "
                                "transactional")
        ch.tx_held.clear()
        self._reply(ch, spec.Tx.RollbackOk())
