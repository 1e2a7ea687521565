"""Replica ops ("rops") and range digests, as pure functions (meshq.mesh.replication).

A rop is a list: ["p", id, queue, hlc, node, body, headers, state, count, ready_at,
expires_at, lease_deadline] (put), ["u", queue, id, state, count, ready_at,
lease_deadline] (update), ["d", queue, id] (delete), ["q", name, options, dead_lettered,
expired, dropped] (queue row), ["x", name] (queue dropped), ["k", queue, dedup_id, id,
expires_at] (dedup entry). A digest is, per range of message ids, the sum of the
fingerprints of the messages' replica-visible state.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import mmh3

from meshq.broker.queue import Queue
from meshq.model import Message
from meshq.states import State
from meshq.store.base import put_op

__all__ = ["BUCKETS", "Digests", "add_to_digests", "bucket_of", "chunks", "digests",
           "fingerprint", "item", "merged", "new_digests", "put_rop", "qrow", "update_rop"]

BUCKETS = 64
REPAIR_CHUNK_BYTES = 4 * 1024 * 1024


def bucket_of(mid: str) -> int:
    return mmh3.hash(mid, signed=False) % BUCKETS


def fingerprint(item: tuple[Any, ...]) -> int:
    return mmh3.hash64(repr(item).encode(), signed=False)[0]


def item(msg: Message) -> list[Any]:
    """A message's replica-visible state, as compared by anti-entropy."""
    return [msg.id, int(msg.state), msg.delivery_count, msg.ready_at, msg.lease_deadline]


Digests = tuple[list[int], list[list[Message]]]  # sums, and the messages, by range


def new_digests() -> Digests:
    return [0] * BUCKETS, [[] for _ in range(BUCKETS)]


def add_to_digests(digests: Digests, msgs: Iterable[Message]) -> None:
    sums, members = digests
    for msg in msgs:
        b = bucket_of(msg.id)
        members[b].append(msg)
        sums[b] = (sums[b] + fingerprint(tuple(item(msg)))) % (1 << 64)


def digests(q: Queue) -> Digests:
    out = new_digests()
    add_to_digests(out, q.messages.values())
    return out


def put_rop(msg: Message) -> list[Any]:
    return ["p", *put_op(msg)[1][1:]]


def update_rop(q: str, item: list[Any]) -> list[Any]:
    return ["u", q, *item]


def merged(mine: list[Any], theirs: list[Any]) -> list[Any]:
    """Two holders disagree on a message: the one further along wins (more deliveries;
    then a lease over no lease, the later deadline): never a lease forgotten."""
    def rank(item: list[Any]) -> tuple[Any, ...]:
        return (item[2], item[1] == State.LEASED, item[4] or 0.0)
    return theirs if rank(theirs) > rank(mine) else mine


def qrow(q: Queue) -> list[Any]:
    return ["q", q.name, q.options.to_dict(), q.dead_lettered, q.expired, q.dropped]


def chunks(rops: list[list[Any]]) -> list[list[list[Any]]]:
    out: list[list[list[Any]]] = []
    size = 0
    for rop in rops:
        if not out or size > REPAIR_CHUNK_BYTES:
            out.append([])
            size = 0
        out[-1].append(rop)
        size += 64 + (len(rop[5]) if rop[0] == "p" else 0)
    return out

