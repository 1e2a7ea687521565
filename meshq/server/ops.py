"""The op table: each client op's fields, checked, mapped onto a broker call.

A handler takes (connection, request map) and returns a result map, a Pending (answered
once durable) or an awaitable (answered when it finishes). Validation errors raise the
project's errors; nothing here touches the socket.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from meshq.broker import Pending
from meshq.errors import BadRequest, Unavailable
from meshq.model import Message

if TYPE_CHECKING:
    from meshq.server.connection import Connection

__all__ = ["OPS", "QUEUE_OPS", "RELAYED_OPS", "delivery"]

Result = dict[str, Any] | Pending | Awaitable[dict[str, Any]]
Handler = Callable[["Connection", dict[str, Any]], Result]


def delivery(msg: Message) -> dict[str, Any]:
    """A message as it travels to a consumer."""
    return {
        "id": msg.id,
        "queue": msg.queue,
        "body": msg.body,
        "headers": msg.headers,
        "hlc": msg.hlc,
        "delivery_count": msg.delivery_count,
        "redelivered": msg.delivery_count > 1,
    }


def _field(req: dict[str, Any], name: str, default: Any = ..., *, types: Any = None) -> Any:
    if name not in req:
        if default is ...:
            raise BadRequest(f"missing field {name!r}")
        return default
    value = req[name]
    if types is not None and not isinstance(value, types):
        raise BadRequest(f"field {name!r} has the wrong type ({type(value).__name__})")
    return value


def _ping(conn: Connection, req: dict[str, Any]) -> Result:
    return {"version": conn.node.version, "node": conn.node.name}


def _declare(conn: Connection, req: dict[str, Any]) -> Result:
    return conn.broker.declare(_field(req, "queue"), _field(req, "options", None),
                               passive=bool(_field(req, "passive", False, types=bool)))


def _delete(conn: Connection, req: dict[str, Any]) -> Result:
    return _wrap(conn.broker.delete_queue(_field(req, "queue")), "deleted")


def _purge(conn: Connection, req: dict[str, Any]) -> Result:
    return _wrap(conn.broker.purge(_field(req, "queue")), "purged")


def _wrap(pending: Pending, key: str) -> Pending:
    pending.result = {key: pending.result}
    return pending


def _send(conn: Connection, req: dict[str, Any]) -> Result:
    conn.node.check_writable()
    if conn.node.replicator is not None:
        conn.node.replicator.check_writable(conn.broker.queue(_field(req, "queue")))
    return _wrap(conn.broker.send(_field(req, "queue"), _field(req, "messages")), "ids")


async def _receive_async(conn: Connection, req: dict[str, Any]) -> dict[str, Any]:
    broker = conn.broker
    name = _field(req, "queue")
    auto_ack = _field(req, "auto_ack", False, types=bool)
    msgs = await broker.receive(conn.session, name, _field(req, "max", 1),
                                _field(req, "wait", 0.0), _field(req, "visibility_timeout", None))
    out = [delivery(m) for m in msgs]
    if auto_ack and msgs:
        await broker.ack(conn.session, name, [m.id for m in msgs]).wait()
    return {"messages": out}


def _receive(conn: Connection, req: dict[str, Any]) -> Result:
    conn.broker.queue(_field(req, "queue"))  # fail fast, before spawning a task
    return _receive_async(conn, req)


def _consume(conn: Connection, req: dict[str, Any]) -> Result:
    tag = conn.broker.consume(conn.session, _field(req, "queue"), _field(req, "prefetch", 100))
    return {"consumer": tag}


def _cancel(conn: Connection, req: dict[str, Any]) -> Result:
    conn.broker.cancel(conn.session, _field(req, "consumer"))
    return {}


def _ack(conn: Connection, req: dict[str, Any]) -> Result:
    return conn.broker.ack(conn.session, _field(req, "queue"), _field(req, "ids"))


def _nack(conn: Connection, req: dict[str, Any]) -> Result:
    return conn.broker.nack(conn.session, _field(req, "queue"), _field(req, "ids"),
                            requeue=_field(req, "requeue", True), delay=_field(req, "delay", 0.0))


def _extend(conn: Connection, req: dict[str, Any]) -> Result:
    return conn.broker.extend(conn.session, _field(req, "queue"), _field(req, "ids"),
                              _field(req, "timeout"))


def _stats(conn: Connection, req: dict[str, Any]) -> Result:
    return {"queues": conn.broker.stats(_field(req, "queue", None))}


def _status(conn: Connection, req: dict[str, Any]) -> Result:
    return conn.node.status()


def _keys(conn: Connection, req: dict[str, Any]) -> Result:
    """The cluster key ring, here and on every live member (meshq/mesh/keys.py)."""
    if conn.node.keys is None:
        raise Unavailable("this node has no key service")
    return conn.node.keys.request(_field(req, "action"), _field(req, "key", None))


def _leave(conn: Connection, req: dict[str, Any]) -> Result:
    """Leave the cluster gracefully and stop the daemon (like ``consul leave``)."""
    conn.node.stop()
    return {"leaving": True}


# Ops on one queue ("queue" field): served by the node that dispatches the queue.
QUEUE_OPS = frozenset({"declare", "delete", "purge", "send", "receive", "consume", "ack",
                       "nack", "extend", "stats"})

# What one node relays to another for a client (server/relay.py); a relayed connection
# runs nothing else (not leave, keys or status: the peer port is not the socket).
RELAYED_OPS = QUEUE_OPS | {"cancel", "ping"}

OPS: dict[str, Handler] = {
    "ping": _ping,
    "declare": _declare,
    "delete": _delete,
    "purge": _purge,
    "send": _send,
    "receive": _receive,
    "consume": _consume,
    "cancel": _cancel,
    "ack": _ack,
    "nack": _nack,
    "extend": _extend,
    "stats": _stats,
    "status": _status,
    "leave": _leave,
    "keys": _keys,
}
