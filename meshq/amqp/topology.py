"""AMQP exchanges and bindings, kept as reserved entries of meshq's replicated catalog, and
the routing they define.

An exchange is the catalog entry ``\\x00x`` + name, a binding ``\\x00b`` + JSON of
[exchange, queue, routing key, arguments digest]; both are declared and dropped like
queues (replicated to every node, repaired, never resurrected by a late copy). A binding
remembers the incarnations of its queue and exchange it was made for: once either is
deleted (and perhaps declared again) the binding no longer routes, as RabbitMQ deletes a
queue's bindings with it; a second declaration of a live one (on another node, say) is
no deletion and leaves its bindings be. The built-in exchanges (``""`` and ``amq.*``)
have no entry. Plain state derived from the catalog and rebuilt when its version moves;
no I/O. Never: a message routed through a binding whose queue or exchange is gone.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import mmh3
import msgpack

from meshq.cluster.lattice import Catalog

__all__ = [
    "BUILTIN",
    "TYPES",
    "Binding",
    "Exchange",
    "Topology",
    "binding_name",
    "exchange_name",
    "headers_match",
    "topic_match",
]

TYPES = ("direct", "fanout", "topic", "headers")
BUILTIN = {"": "direct", "amq.direct": "direct", "amq.fanout": "fanout",
           "amq.topic": "topic", "amq.headers": "headers", "amq.match": "headers"}
_EXCHANGE = "\x00x"
_BINDING = "\x00b"


@dataclass(frozen=True)
class Exchange:
    name: str
    type: str
    durable: bool = True
    auto_delete: bool = False
    internal: bool = False
    arguments: dict[str, Any] = field(default_factory=dict)
    inc: int = 0  # its catalog incarnation (0: built in)

    def options(self) -> dict[str, Any]:
        return {"type": self.type, "durable": self.durable, "auto_delete": self.auto_delete,
                "internal": self.internal, "arguments": _plain(self.arguments)}


@dataclass(frozen=True)
class Binding:
    exchange: str
    queue: str
    routing_key: str
    arguments: dict[str, Any]
    exchange_inc: int
    queue_inc: int

    def options(self) -> dict[str, Any]:
        return {"exchange": self.exchange, "queue": self.queue, "key": self.routing_key,
                "arguments": _plain(self.arguments), "xinc": self.exchange_inc,
                "qinc": self.queue_inc}


_BUILTIN_EXCHANGES = {name: Exchange(name, kind) for name, kind in BUILTIN.items()}


def _plain(args: dict[str, Any]) -> dict[str, Any]:
    """Arguments as msgpack keeps them (field-table types it lacks become strings)."""
    out: dict[str, Any] = {}
    for k, v in (args or {}).items():
        out[str(k)] = v if isinstance(v, str | int | float | bool | bytes | type(None)) \
            else str(v)
    return out


def exchange_name(name: str) -> str:
    return _EXCHANGE + name


def binding_name(exchange: str, queue: str, routing_key: str,
                 arguments: dict[str, Any] | None) -> str:
    digest = mmh3.hash64(msgpack.packb(sorted(_plain(arguments or {}).items()),
                                       use_bin_type=True), signed=False)[0]
    return _BINDING + json.dumps([exchange, queue, routing_key, f"{digest:016x}"])


def topic_match(pattern: str, key: str) -> bool:
    """AMQP topic matching: words split on '.', '*' one word, '#' zero or more."""
    p = pattern.split(".") if pattern else []  # "" is no words (as RabbitMQ reads it)
    k = key.split(".") if key else []
    # reachable[j]: pattern words so far can match the first j key words
    reachable = [True] + [False] * len(k)
    for word in p:
        if word == "#":
            for j in range(1, len(k) + 1):
                reachable[j] = reachable[j] or reachable[j - 1]
        else:
            reachable = [False] + [reachable[j - 1] and (word == "*" or word == k[j - 1])
                                   for j in range(1, len(k) + 1)]
    return reachable[len(k)]


def headers_match(arguments: dict[str, Any], headers: dict[str, Any] | None) -> bool:
    """A headers-exchange binding: x-match all (default) or any, over the arguments that
    do not begin with 'x-'."""
    headers = headers or {}
    wanted = {k: v for k, v in arguments.items() if not k.startswith("x-")}
    mode = str(arguments.get("x-match", "all"))
    hits = [k in headers and (v is None or headers[k] == v) for k, v in wanted.items()]
    if mode.startswith("any"):
        return any(hits)
    return all(hits)


class Topology:
    """The exchanges and bindings in ``catalog`` (rebuilt when it changes)."""

    def __init__(self, catalog: Catalog) -> None:
        self.catalog = catalog
        self._version = -1
        self._exchanges: dict[str, Exchange] = {}
        self._bindings: dict[str, list[Binding]] = {}  # by exchange
        self._direct: dict[str, dict[str, list[str]]] = {}  # exchange -> key -> queues

    def _refresh(self) -> None:
        if self._version == self.catalog.version:
            return
        self._version = self.catalog.version
        exchanges: dict[str, Exchange] = {}
        bindings: dict[str, list[Binding]] = {}
        for name, entry in self.catalog.items():
            if not entry.live:
                continue
            o = entry.options
            try:
                if name.startswith(_EXCHANGE):
                    x = name[len(_EXCHANGE):]
                    exchanges[x] = Exchange(x, str(o["type"]), bool(o["durable"]),
                                            bool(o["auto_delete"]), bool(o["internal"]),
                                            dict(o["arguments"]), entry.inc)
                elif name.startswith(_BINDING):
                    b = Binding(str(o["exchange"]), str(o["queue"]), str(o["key"]),
                                dict(o["arguments"]), int(o["xinc"]), int(o["qinc"]))
                    bindings.setdefault(b.exchange, []).append(b)
            except (KeyError, TypeError, ValueError):
                continue  # a malformed entry (a newer peer's?): it routes nothing
        self._exchanges = exchanges
        self._bindings = {x: sorted(bs, key=lambda b: (b.queue, b.routing_key))
                          for x, bs in bindings.items()}
        self._direct = {}

    def exchange(self, name: str) -> Exchange | None:
        x = _BUILTIN_EXCHANGES.get(name)
        if x is not None:
            return x
        self._refresh()
        return self._exchanges.get(name)

    def _live(self, b: Binding, x: Exchange) -> bool:
        """A binding routes while its queue and exchange live and neither was deleted since
        it was made (a declare elsewhere that gave them a newer incarnation is no
        deletion: only ``dropped`` marks count)."""
        if x.inc:
            e = self.catalog.get(exchange_name(x.name))
            if e is None or not e.live or e.dropped >= b.exchange_inc:
                return False
        q = self.catalog.get(b.queue)
        return q is not None and q.live and q.dropped < b.queue_inc

    def bindings(self, exchange: str) -> list[Binding]:
        """The live bindings from ``exchange``."""
        x = self.exchange(exchange)
        if x is None:
            return []
        return [b for b in self._bindings.get(exchange, []) if self._live(b, x)]

    def bindings_to(self, queue: str) -> list[Binding]:
        self._refresh()
        return [b for bs in self._bindings.values() for b in bs if b.queue == queue]

    def route(self, x: Exchange, routing_key: str, headers: dict[str, Any] | None
              ) -> list[str]:
        """The queues a message published to ``x`` goes to, each once."""
        if x.name == "":
            return [routing_key] if self._queue_live(routing_key) else []
        self._refresh()
        if x.type == "direct":
            index = self._direct.get(x.name)
            if index is None:
                index = {}
                for b in self.bindings(x.name):
                    index.setdefault(b.routing_key, []).append(b.queue)
                self._direct[x.name] = index
            return list(dict.fromkeys(q for q in index.get(routing_key, [])
                                      if self._queue_live(q)))
        live = self.bindings(x.name)
        if x.type == "fanout":
            hits = [b.queue for b in live]
        elif x.type == "topic":
            hits = [b.queue for b in live if topic_match(b.routing_key, routing_key)]
        else:
            hits = [b.queue for b in live if headers_match(b.arguments, headers)]
        return list(dict.fromkeys(hits))

    def _queue_live(self, name: str) -> bool:
        e = self.catalog.get(name)
        return e is not None and e.live and not name.startswith("\x00")
