"""Closed timestamps, and the fifo merge of a queue's partitions (SPEC section 2). Pure.

A partition's primary stamps every message the partition takes, from one HLC whose
stamps only grow. Its *closed timestamp* for one consumer is an HLC below which no
message of the partition will again be offered to that consumer as a first delivery:
below its next stamp (and its durable HLC ceiling, which a restart starts above), its
oldest stamped message not yet committed, the head of its ready order, and the leases
granted to that consumer and not yet handed over. A fifo consumer's merge holds what each
partition delivered and releases the lowest (HLC, node) it holds only when every other
partition holds something behind it, or has closed above it.

Across failovers, a dispatcher closes no higher than a *closed bound* a write quorum
confirmed (``renewed_bound``), and the next one stamps above the bound it reads, stamping
again what came in below it never delivered (``to_restamp``; docs/architecture.md).

Never: a message released while another partition, holding nothing, has not closed above
it. Outside the promise (so outside fifo order): redeliveries and delayed messages (they
take their place again when ready).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from typing import Any

from meshq.hlc import LOGICAL_BITS

__all__ = ["FifoMerge", "Key", "closed_timestamp", "renewed_bound", "to_restamp"]

Key = tuple[int, str]  # (HLC, node): message order


def closed_timestamp(stamp: int, ceiling: int, unconfirmed: int | None, head: int | None,
                     pending: Iterable[int] = ()) -> int:
    """The closed timestamp from a fresh ``stamp`` (so every later one is above it), the
    durable HLC ceiling, the oldest stamp not yet committed, the ready head's HLC and the
    HLCs of leases granted and not yet handed over (None: there is none)."""
    closed = min(stamp + 1, ceiling)
    for ts in (unconfirmed, head, *pending):
        if ts is not None and ts < closed:
            closed = ts
    return closed


def renewed_bound(closed: int, lead_ms: int, floor: Iterable[int | None] = ()) -> int:
    """The closed bound a dispatcher closing at ``closed`` has a write quorum confirm
    before it closes higher: ``lead_ms`` of wall time above ``closed``, so that a commit
    every ``lead_ms / 2`` or so keeps an idle partition closing with the clock; but not
    above ``floor`` (its ready head, its oldest send not yet committed: None, none), so
    that a takeover finds its backlog above the bound and leaves its stamps alone."""
    bound = ((closed >> LOGICAL_BITS) + lead_ms) << LOGICAL_BITS
    for low in floor:
        if low is not None and low < bound:
            bound = low
    return max(bound, closed)


def to_restamp(ready: Iterable[tuple[int, str, int, int]], bound: int) -> list[int]:
    """Of a partition's READY messages, as (HLC, node, seq, delivery count), the seqs to
    stamp again, in their order: from the first never delivered whose HLC is below
    ``bound`` on, every one never delivered. A dispatcher closed up to ``bound`` at most,
    so such a message may have come in below what was closed (sent to a dispatcher that
    was deposed meanwhile, and merged in late); those after it are stamped again too, so
    that the partition keeps their order (a key's order). One delivered before is a
    redelivery, outside the order, and keeps its place."""
    out: list[int] = []
    for hlc, _, seq, count in sorted(ready):
        if count == 0 and (out or hlc < bound):
            out.append(seq)
    return out


class FifoMerge:
    """One consumer's merge of ``partitions`` partitions: what each delivered, in the
    order it came, and the closed timestamp each last reported (0: none yet)."""

    def __init__(self, partitions: int) -> None:
        self.held: list[deque[tuple[Key, Any]]] = [deque() for _ in range(partitions)]
        self.closed: list[Key] = [(0, "")] * partitions

    def add(self, index: int, key: Key, item: Any) -> None:
        self.held[index].append((key, item))

    def close(self, index: int, ts: int | Key) -> None:
        """Partition ``index`` reports its closed timestamp: an HLC (nothing at it or
        above it is delivered yet), or the key of its ready head (nothing before it is).
        A redelivery put back may lower it: the latest report counts."""
        self.closed[index] = (ts, "") if isinstance(ts, int) else ts

    def _first(self) -> tuple[Key, int] | None:
        heads = [(h[0][0], i) for i, h in enumerate(self.held) if h]
        return min(heads) if heads else None

    def waits_on(self) -> tuple[int, list[int]] | None:
        """(the HLC of the lowest message held, the partitions whose closed timestamp must
        pass it before it is released), or None when nothing is held."""
        first = self._first()
        if first is None:
            return None
        key, index = first
        return key[0], [j for j, h in enumerate(self.held)
                        if j != index and not h and self.closed[j] <= key]

    def release(self) -> list[Any]:
        """What may go to the consumer now, in order."""
        out: list[Any] = []
        while True:
            wait = self.waits_on()
            if wait is None or wait[1]:
                return out
            first = self._first()
            assert first is not None
            out.append(self.held[first[1]].popleft()[1])

    def drain(self) -> list[Any]:
        """Everything held (the consumer went away: it goes back)."""
        out = [item for h in self.held for _, item in h]
        for h in self.held:
            h.clear()
        return out
