"""The topology half of the Bridge: exchange.declare/delete, queue.bind/unbind, as RabbitMQ.

Exchanges and bindings are reserved catalog entries written on this node
(Broker.put_entry / drop_entry) and replicated to every node with the catalog
(meshq.amqp.topology). The answer goes out once the entry is durable here. Never: a
built-in exchange declared, deleted or bound to (403), or a binding to a queue or
exchange that does not exist (404).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from pamqp import commands as spec

from meshq.amqp.channel import Channel
from meshq.amqp.connection import COMMAND_INVALID, AmqpConnection
from meshq.amqp.mapping import ACCESS_REFUSED, NOT_FOUND, PRECONDITION_FAILED, ArgumentError
from meshq.amqp.topology import BUILTIN, TYPES, Binding, Exchange, Topology, binding_name
from meshq.amqp.topology import exchange_name as entry_of
from meshq.errors import MeshqError

if TYPE_CHECKING:
    from meshq.broker import Broker, Pending
    from meshq.node import Node

__all__ = ["Declaring"]


def _no_exchange(name: str) -> ArgumentError:
    return ArgumentError(NOT_FOUND, f"NOT_FOUND - no exchange {name!r} in vhost '/'")


class Declaring:
    if TYPE_CHECKING:  # the Bridge provides these
        node: Node
        broker: Broker
        conn: AmqpConnection
        topology: Topology

        def _reply(self, ch: Channel, reply: Any) -> None: ...
        def _answered(self, ch: Channel) -> None: ...
        def _channel_error(self, ch: Channel, code: int, text: str,
                           method: Any = None) -> None: ...
        def _connection_error(self, code: int, text: str, method: Any = None) -> None: ...
        def _queue_name(self, ch: Channel, name: str, method: Any) -> str: ...

        kick: Callable[[], None]

    def _durably(self, ch: Channel, method: Any, writes: list[Callable[[], Pending]],
                 reply: Any, nowait: bool) -> None:
        """Run the catalog writes; ``reply`` once all are durable (the channel waits)."""
        try:
            if writes:
                self.node.check_writable()
            pendings = [w() for w in writes]
        except MeshqError as exc:
            raise ArgumentError(PRECONDITION_FAILED, f"PRECONDITION_FAILED - {exc.code}: "
                                f"{exc.message}") from None
        left = [len(pendings)]
        failed: list[BaseException] = []
        ch.busy = not nowait

        def done(_: Any, err: BaseException | None) -> None:
            if err is not None:
                failed.append(err)
            left[0] -= 1
            if left[0] > 0 or ch.closed:
                return
            if failed:
                self._channel_error(ch, PRECONDITION_FAILED, f"PRECONDITION_FAILED - "
                                    f"UNAVAILABLE: commit failed: {failed[0]}", method)
                return
            if not nowait:
                self._reply(ch, reply)
                self._answered(ch)
            self.kick()

        if not pendings:
            left[0] = 1
            done(None, None)
            return
        for p in pendings:
            p.then(done)

    # exchange --------------------------------------------------------------------------------
    def _exchange_declare(self, ch: Channel, m: spec.Exchange.Declare) -> None:
        name, kind = m.exchange, m.exchange_type or "direct"
        current = self.topology.exchange(name)
        if m.passive:
            if current is None:
                raise _no_exchange(name)
            self._durably(ch, m, [], spec.Exchange.DeclareOk(), m.nowait)
            return
        if kind not in TYPES:
            self._connection_error(COMMAND_INVALID, f"COMMAND_INVALID - unknown exchange "
                                   f"type {kind!r}", m)
            return
        wanted = Exchange(name, kind, bool(m.durable), bool(m.auto_delete), bool(m.internal),
                          dict(m.arguments or {}))
        if current is not None:
            mine, theirs = current.options(), wanted.options()
            differ = [k for k in ("type", "durable", "auto_delete", "internal")
                      if mine[k] != theirs[k] and (name not in BUILTIN or k == "type")]
            if differ:
                k = differ[0]
                raise ArgumentError(PRECONDITION_FAILED, f"PRECONDITION_FAILED - "
                                    f"inequivalent arg {k!r} for exchange {name!r} in vhost "
                                    f"'/': received {theirs[k]!r} but current is {mine[k]!r}")
            self._durably(ch, m, [], spec.Exchange.DeclareOk(), m.nowait)
            return
        if name.startswith("amq."):
            raise ArgumentError(ACCESS_REFUSED, f"ACCESS_REFUSED - exchange name {name!r} "
                                "contains reserved prefix 'amq.*'")
        self._durably(ch, m, [lambda: self.broker.put_entry(entry_of(name), wanted.options())],
                      spec.Exchange.DeclareOk(), m.nowait)

    def _exchange_delete(self, ch: Channel, m: spec.Exchange.Delete) -> None:
        name = m.exchange
        if name in BUILTIN or name.startswith("amq."):
            raise ArgumentError(ACCESS_REFUSED, f"ACCESS_REFUSED - operation not permitted "
                                f"on exchange {name!r}")
        if self.topology.exchange(name) is None:  # as RabbitMQ: deleting what is gone
            self._durably(ch, m, [], spec.Exchange.DeleteOk(), m.nowait)
            return
        bindings = self.topology.bindings(name)
        if m.if_unused and bindings:
            raise ArgumentError(PRECONDITION_FAILED, f"PRECONDITION_FAILED - exchange "
                                f"{name!r} in vhost '/' in use")
        writes = [self._unbinder(b) for b in bindings]
        writes.append(lambda: self.broker.drop_entry(entry_of(name)))
        self._durably(ch, m, writes, spec.Exchange.DeleteOk(), m.nowait)

    # bindings --------------------------------------------------------------------------------
    def _binding(self, ch: Channel, m: spec.Queue.Bind | spec.Queue.Unbind) -> Binding:
        queue = self._queue_name(ch, m.queue, m)
        if m.exchange == "":
            raise ArgumentError(ACCESS_REFUSED, f"ACCESS_REFUSED - operation not permitted "
                                f"on the default exchange (queue {queue!r})")
        x = self.topology.exchange(m.exchange)
        if x is None:
            raise _no_exchange(m.exchange)
        entry = self.broker.catalog.get(queue)
        if entry is None or not entry.live:
            raise ArgumentError(NOT_FOUND, f"NOT_FOUND - no queue {queue!r} in vhost '/'")
        return Binding(m.exchange, queue, m.routing_key or "", dict(m.arguments or {}),
                       x.inc, entry.inc)

    def _unbinder(self, b: Binding) -> Callable[[], Pending]:
        name = binding_name(b.exchange, b.queue, b.routing_key, b.arguments)
        return lambda: self.broker.drop_entry(name)

    def _queue_bind(self, ch: Channel, m: spec.Queue.Bind) -> None:
        b = self._binding(ch, m)
        name = binding_name(b.exchange, b.queue, b.routing_key, b.arguments)
        self._durably(ch, m, [lambda: self.broker.put_entry(name, b.options())],
                      spec.Queue.BindOk(), m.nowait)

    def _queue_unbind(self, ch: Channel, m: spec.Queue.Unbind) -> None:
        b = self._binding(ch, m)
        writes = [self._unbinder(b)]
        x = self.topology.exchange(b.exchange)
        if x is not None and x.auto_delete and [
                o for o in self.topology.bindings(b.exchange)
                if (o.queue, o.routing_key) != (b.queue, b.routing_key)] == []:
            writes.append(lambda: self.broker.drop_entry(entry_of(b.exchange)))
        self._durably(ch, m, writes, spec.Queue.UnbindOk(), False)
