"""The op table: each client op's fields, checked, mapped onto a broker call.

A handler takes (session, request map) and returns a result map, a Pending (answered
once durable) or an awaitable (answered when it finishes). Validation errors raise the
project's errors; nothing here touches the socket or decides where an op is served
(meshq.server.session does).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from meshq.broker import Pending
from meshq.errors import BadRequest, Unavailable
from meshq.server.session import delivery

if TYPE_CHECKING:
    import trio

    from meshq.server.session import ClientSession

__all__ = ["OPS", "QUEUE_OPS", "RELAYED_OPS", "delivery"]

Result = dict[str, Any] | Pending | Awaitable[dict[str, Any]]
Handler = Callable[["ClientSession", dict[str, Any]], Result]


def _field(req: dict[str, Any], name: str, default: Any = ..., *, types: Any = None) -> Any:
    if name not in req:
        if default is ...:
            raise BadRequest(f"missing field {name!r}")
        return default
    value = req[name]
    if types is not None and not isinstance(value, types):
        raise BadRequest(f"field {name!r} has the wrong type ({type(value).__name__})")
    return value


def _ping(s: ClientSession, req: dict[str, Any]) -> Result:
    return {"version": s.node.version, "node": s.node.name}


def _declare(s: ClientSession, req: dict[str, Any]) -> Result:
    return s.broker.declare(_field(req, "queue"), _field(req, "options", None),
                            passive=bool(_field(req, "passive", False, types=bool)))


def _delete(s: ClientSession, req: dict[str, Any]) -> Result:
    return _wrap(s.broker.delete_queue(_field(req, "queue")), "deleted")


def _purge(s: ClientSession, req: dict[str, Any]) -> Result:
    return _wrap(s.broker.purge(_field(req, "queue"), _field(req, "partitions", None)),
                 "purged")


def _wrap(pending: Pending, key: str) -> Pending:
    pending.result = {key: pending.result}
    return pending


def _send(s: ClientSession, req: dict[str, Any]) -> Result:
    s.node.check_sendable()
    return _wrap(s.broker.send(_field(req, "queue"), _field(req, "messages"),
                               _field(req, "partition", None)), "ids")


async def _receive_async(s: ClientSession, req: dict[str, Any],
                         stop: trio.Event | None) -> dict[str, Any]:
    broker = s.broker
    name = _field(req, "queue")
    auto_ack = _field(req, "auto_ack", False, types=bool)
    try:
        msgs = await broker.receive(s.session, name, _field(req, "max", 1),
                                    _field(req, "wait", 0.0),
                                    _field(req, "visibility_timeout", None),
                                    _field(req, "partitions", None), stop=stop)
    finally:
        s.forget_wait(req)
    now = broker.clock.time()
    out = [delivery(m, now, s.relayed) for m in msgs]
    if auto_ack and msgs:
        await broker.ack(s.session, name, [m.id for m in msgs]).wait()
    return {"messages": out}


def _receive(s: ClientSession, req: dict[str, Any]) -> Result:
    s.broker.queue(_field(req, "queue"))  # fail fast, before spawning a task
    return _receive_async(s, req, s.stop_of(req))  # (its stop known before the next op)


def _unwait(s: ClientSession, req: dict[str, Any]) -> Result:
    """Between nodes: end the waits of the relayed receives with this ``wait_id`` (the
    client's node has its answer from another partition: meshq.server.spread)."""
    s.unwait(_field(req, "wait_id", types=str))
    return {}


def _closed(s: ClientSession, req: dict[str, Any]) -> Result:
    """Between nodes: the closed timestamps of a fifo subscription's parts here, once past
    ``after`` (meshq.server.fifo)."""
    return s.fifo.closed_op(req)


def _fifo_take(s: ClientSession, req: dict[str, Any]) -> Result:
    """Between nodes (and within one): a fifo receive's share of partitions here
    (meshq.server.fifo)."""
    return s.fifo.take_op(req)


def _consume(s: ClientSession, req: dict[str, Any]) -> Result:
    tag = _field(req, "tag", None, types=str) if s.relayed else None
    capacity = _field(req, "capacity", None) if s.relayed else None
    tag = s.broker.consume(s.session, _field(req, "queue"), _field(req, "prefetch", 100),
                           tag=tag or s.new_tag(), indexes=_field(req, "partitions", None),
                           capacity=capacity)
    return {"consumer": tag} if capacity is None else {"consumer": tag, "capacity": capacity}


def _flow(s: ClientSession, req: dict[str, Any]) -> Result:
    """A subscription's parts here get a new capacity (meshq.server.steal)."""
    return {"held": s.broker.flow(s.session, _field(req, "consumer"),
                                  _field(req, "partitions"), _field(req, "capacity"))}


def _cancel(s: ClientSession, req: dict[str, Any]) -> Result:
    s.broker.cancel(s.session, _field(req, "consumer"))
    return {}


def _ack(s: ClientSession, req: dict[str, Any]) -> Result:
    return s.broker.ack(s.session, _field(req, "queue"), _field(req, "ids"))


def _nack(s: ClientSession, req: dict[str, Any]) -> Result:
    return s.broker.nack(s.session, _field(req, "queue"), _field(req, "ids"),
                         requeue=_field(req, "requeue", True), delay=_field(req, "delay", 0.0))


def _extend(s: ClientSession, req: dict[str, Any]) -> Result:
    return s.broker.extend(s.session, _field(req, "queue"), _field(req, "ids"),
                           _field(req, "timeout"))


def _stats(s: ClientSession, req: dict[str, Any]) -> Result:
    name = _field(req, "queue", None)
    indexes = _field(req, "partitions", None)
    if name is not None and indexes is not None:
        s.broker.queue(name)
        return {"queues": [s.broker.stats_of(name, indexes)]}
    return {"queues": s.broker.stats(name)}


def _status(s: ClientSession, req: dict[str, Any]) -> Result:
    return s.node.status()


def _rebalance(s: ClientSession, req: dict[str, Any]) -> Result:
    """The moves of partitions under way (a clustered node's session asks every node)."""
    return s.node.rebalance_here()


def _keys(s: ClientSession, req: dict[str, Any]) -> Result:
    """The cluster key ring, here and on every live member (meshq/mesh/keys.py)."""
    if s.node.keys is None:
        raise Unavailable("this node has no key service")
    return s.node.keys.request(_field(req, "action"), _field(req, "key", None))


def _leave(s: ClientSession, req: dict[str, Any]) -> Result:
    """Leave the cluster gracefully and stop the daemon (like ``consul leave``)."""
    s.node.stop()
    return {"leaving": True}


# Ops on one queue ("queue" field): served by the node that dispatches the queue.
QUEUE_OPS = frozenset({"declare", "delete", "purge", "send", "receive", "consume", "ack",
                       "nack", "extend", "stats"})

# What one node relays to another for a client (meshq/server/relay.py); a relayed
# connection runs nothing else (not leave, keys or status: the peer port is not the
# socket). ``_bye``: the client's node says its client is gone (no answer); ``_unwait``:
# it needs no more from a waiting receive; ``_closed`` and ``_fifo_take``: a fifo
# subscription's merge, or a fifo receive, asks how far a partition has closed;
# ``_flow``: a subscription's parts here pause or take again (meshq.server.steal).
RELAYED_OPS = QUEUE_OPS | {"cancel", "ping", "_bye", "_unwait", "_closed",
                                  "_fifo_take", "_flow"}

OPS: dict[str, Handler] = {
    "ping": _ping,
    "declare": _declare,
    "delete": _delete,
    "purge": _purge,
    "send": _send,
    "receive": _receive,
    "consume": _consume,
    "cancel": _cancel,
    "_unwait": _unwait,
    "_closed": _closed,
    "_fifo_take": _fifo_take,
    "_flow": _flow,
    "ack": _ack,
    "nack": _nack,
    "extend": _extend,
    "stats": _stats,
    "status": _status,
    "rebalance": _rebalance,
    "leave": _leave,
    "keys": _keys,
}
