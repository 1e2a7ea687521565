"""The op kinds a store applies (the broker stages them, the writer process applies
them): plain constants, importable without the rest of meshq (the writer loads little).
"""

from __future__ import annotations

__all__ = [
    "OP_CATALOG_PRUNE",
    "OP_DEDUP",
    "OP_DEDUP_PRUNE",
    "OP_DELETE",
    "OP_DISCARD",
    "OP_DROP_QUEUE",
    "OP_FORGET",
    "OP_META",
    "OP_PARTITION",
    "OP_PURGE_DELAYED",
    "OP_PURGE_READY",
    "OP_PUT",
    "OP_QUEUE",
    "OP_TOMBSTONE",
    "OP_TOMBSTONE_PRUNE",
    "OP_UPDATE",
    "bound_key",
]

# Op kinds; each op is (kind, params) with params a tuple in the kind's SQL order.
OP_PUT = 0  # (seq, id, queue, idx, inc, hlc, node, body, headers_packed, state, count,
#             ready_at, expires_at, lease_deadline, lease_id, holder, epoch, vn)
OP_UPDATE = 1  # (state, count, ready_at, lease_deadline, lease_id, holder, epoch, vn, seq)
OP_DELETE = 2  # (seq, queue, idx, id, at): the row goes, a tombstone stays
OP_QUEUE = 3  # (name, inc, options_packed, dropped, dropped_at): a catalog entry
OP_DROP_QUEUE = 4  # (name, upto, at): the queue's incarnations up to ``upto`` are gone
OP_DEDUP = 5  # (queue, dedup_id, message_id, expires_at)
OP_DEDUP_PRUNE = 6  # (now,)
OP_META = 7  # (key, value)
OP_TOMBSTONE = 8  # (queue, idx, id, at): a deletion of a message not held here
OP_TOMBSTONE_PRUNE = 9  # (before,): forget tombstones older than this
OP_FORGET = 10  # (queue, idx): a partition handed to its replicas; no tombstones left
OP_PARTITION = 11  # (queue, idx, promised, tally_packed)
OP_CATALOG_PRUNE = 12  # (before,): forget queues dropped before this (their partitions, and
#                       their partitions' closed bounds in ``meta``: ``bound_key``)
OP_PURGE_READY = 13  # (queue, idx, hlc, seq, below, at): the READY messages after (hlc, seq)
#                      whose seq is below ``below`` (not one staged since) go,
#                      tombstoned (the broker's backlog on disk, meshq.broker.backlog)
OP_DISCARD = 14  # (seq,): the row goes, no tombstone (a send never confirmed, taken back)
OP_PURGE_DELAYED = 15  # (queue, idx, ready_at, seq, below, at): as OP_PURGE_READY, for the
#                        DELAYED messages after (ready_at, seq) (the delays on disk)


BOUND_PREFIX = "closed "


def bound_key(name: str, index: int) -> str:
    """The meta row of a partition's closed bound (fifo)."""
    return f"{BOUND_PREFIX}{index} {name}"
