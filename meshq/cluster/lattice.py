"""The merge rules of replication: a replica's state of a queue partition is a join-semilattice.

Pure functions; every exchange between replicas (dispatch, takeover, hand-off,
anti-entropy, read-repair) applies them, in both directions. What must never happen: a
join that undoes anything. Concretely:

- **Messages are added** and never removed but by a tombstone.
- **A tombstone absorbs** the message (ack, expiry, dead-letter move, purge): joined with
  anything it stays a tombstone.
- **Progress only moves forward** in one total order, ``progress_key``: first the version
  ``(epoch, vn)`` -- the dispatch epoch of the node that made the change (a takeover
  takes an epoch above every epoch a quorum promised, so a later dispatcher's changes
  outrank an earlier one's) and the count of changes within it -- then, only to make the
  order total where versions tie, delivery count, state, lease deadline, ready time,
  lease id and lease holder.
- **The catalog** entry of a queue name is the pair (newest incarnation, newest drop):
  the queue exists while its incarnation is above its drop, and a drop absorbs every
  message of an incarnation at or below it. A re-declare creates a new incarnation
  above the drop, so it does not bring the old messages back.
- **Counters** are G-counters (per dispatching node, each field the max); a promised
  epoch is a max register.

Join of any of these is commutative, associative and idempotent (tests/test_lattice.py
checks it with hypothesis).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import mmh3
import msgpack

from meshq.cluster.changes import (
    Change,
    Decl,
    Drop,
    PartKey,
    Progress,
    Put,
    Record,
    Step,
    Tally,
    Tomb,
)

__all__ = [
    "BUCKETS",
    "RESERVED_PREFIX",
    "TOMBSTONE_WINDOW",
    "Catalog",
    "CatalogEntry",
    "PartState",
    "bucket_of",
    "catalog_digest",
    "fingerprint",
    "is_reserved",
    "join_catalog",
    "join_dedup",
    "join_progress",
    "join_record",
    "join_tally",
    "part_of",
    "progress_key",
]

#: How long a tombstone (of a message or of a queue) is kept. A node away for longer
#: must be wiped before it rejoins, or what was deleted meanwhile could come back.
TOMBSTONE_WINDOW = 3600.0
BUCKETS = 64  # ranges of message ids compared by anti-entropy


def progress_key(p: Progress) -> tuple[Any, ...]:
    """The total order of progress ("further along" is greater)."""
    return (p.epoch, p.vn, p.count, p.state,
            -1.0 if p.deadline is None else p.deadline, p.ready_at, p.lease, p.holder)


def join_progress(a: Progress, b: Progress) -> Progress:
    return b if progress_key(b) > progress_key(a) else a


def join_record(a: Record | Tomb | None, b: Record | Tomb | None) -> Record | Tomb | None:
    """Two replicas' versions of one message id."""
    if a is None:
        return b
    if b is None:
        return a
    if isinstance(a, Tomb):
        if isinstance(b, Tomb):
            return b if b.at > a.at else a
        return a
    if isinstance(b, Tomb):
        return b
    if _content(a) == _content(b):  # one id, one content: the usual case
        return b if progress_key(b.progress) > progress_key(a.progress) else a
    return _tie_content(a, b)


def _content(r: Record) -> tuple[Any, ...]:
    return (r.hlc, r.node, r.body, r.headers or b"", r.inc,
            -1.0 if r.expires_at is None else r.expires_at)


def _tie_content(a: Record, b: Record) -> Record:
    """Two contents under one id should not exist; if they do, the join is the product
    of the greater content and the further progress, so it stays a lattice."""
    base = b if _content(b) > _content(a) else a
    prog = join_progress(a.progress, b.progress)
    if base.progress is prog:
        return base
    return Record(base.id, base.queue, base.index, base.inc, base.hlc, base.node, base.body,
                  base.headers, base.expires_at, prog)


@dataclass(frozen=True)
class CatalogEntry:
    """One queue name: its newest incarnation (0: never declared here) with its options,
    and its newest drop (``dropped``: incarnations up to it are gone; 0: none)."""

    queue: str
    inc: int = 0
    options: dict[str, Any] = field(default_factory=dict)
    dropped: int = 0
    dropped_at: float = 0.0

    @property
    def live(self) -> bool:
        return self.inc > self.dropped

    def absorbs(self, inc: int) -> bool:
        """Is a message of incarnation ``inc`` deleted with its queue?"""
        return inc <= self.dropped

    def changes(self) -> list[Decl | Drop]:
        out: list[Decl | Drop] = []
        if self.inc:
            out.append(Decl(self.queue, self.inc, self.options))
        if self.dropped:
            out.append(Drop(self.queue, self.dropped, self.dropped_at))
        return out


#: Catalog names that are not queues begin with this (AMQP exchanges and bindings,
#: meshq.amqp.topology): replicated and repaired like queue declarations, never a Queue.
RESERVED_PREFIX = "\x00"


def is_reserved(name: str) -> bool:
    return name.startswith(RESERVED_PREFIX)


class Catalog(dict[str, CatalogEntry]):
    """The catalog, name -> entry, with a ``version`` that grows on every change (views
    built from it, such as AMQP's routing tables, know when to rebuild)."""

    version = 0

    def __setitem__(self, name: str, entry: CatalogEntry) -> None:
        self.version += 1
        super().__setitem__(name, entry)

    def __delitem__(self, name: str) -> None:
        self.version += 1
        super().__delitem__(name)


def _options_key(options: dict[str, Any]) -> bytes:
    return msgpack.packb(sorted(options.items()), use_bin_type=True)


def join_catalog(a: CatalogEntry, change: Decl | Drop | CatalogEntry) -> CatalogEntry:
    """``a`` joined with a catalog change (or a whole entry) of the same queue."""
    if isinstance(change, CatalogEntry):
        out = a
        for c in change.changes():
            out = join_catalog(out, c)
        return out
    if isinstance(change, Decl):
        if (change.inc, _options_key(change.options)) > (a.inc, _options_key(a.options)):
            return CatalogEntry(a.queue, change.inc, dict(change.options), a.dropped,
                                a.dropped_at)
        return a
    if (change.upto, change.at) > (a.dropped, a.dropped_at):
        return CatalogEntry(a.queue, a.inc, a.options, change.upto, change.at)
    return a


def catalog_digest(entries: Iterable[CatalogEntry]) -> int:
    """A hash of a whole catalog, order-independent: equal catalogs, equal digests."""
    total = 0
    for e in entries:
        item = (e.queue, e.inc, _options_key(e.options), e.dropped, e.dropped_at)
        total = (total + mmh3.hash64(repr(item).encode(), signed=False)[0]) % (1 << 64)
    return total


def join_tally(a: dict[str, tuple[int, int, int]], node: str,
               values: tuple[int, int, int]) -> dict[str, tuple[int, int, int]]:
    """A G-counter: each node's counters, field by field the max. Returns a new map."""
    old = a.get(node, (0, 0, 0))
    new = (max(old[0], values[0]), max(old[1], values[1]), max(old[2], values[2]))
    if new == old:
        return a
    out = dict(a)
    out[node] = new
    return out


def join_dedup(a: tuple[str, float] | None, b: tuple[str, float]) -> tuple[str, float]:
    """A dedup entry (message id, expiry): the later expiry (then the greater id)."""
    if a is None:
        return b
    return b if (b[1], b[0]) > (a[1], a[0]) else a


def bucket_of(mid: str) -> int:
    return mmh3.hash(mid, signed=False) % BUCKETS


def fingerprint(mid: str, key: tuple[Any, ...]) -> int:
    """One message's share of its bucket's digest (its id and progress key)."""
    return mmh3.hash64(repr((mid, key)).encode(), signed=False)[0]


@dataclass
class PartState:
    """A reference model of one replica's partition state, for property tests and the
    simulation's convergence check: what the broker's merge must be equivalent to."""

    records: dict[str, Record | Tomb] = field(default_factory=dict)
    tally: dict[str, tuple[int, int, int]] = field(default_factory=dict)
    promised: int = 0

    def apply(self, change: Change) -> None:
        if isinstance(change, Put):
            mid = change.record.id
            self.records[mid] = join_record(self.records.get(mid), change.record)  # type: ignore[assignment]
        elif isinstance(change, Step):
            old = self.records.get(change.id)
            if isinstance(old, Record):
                self.records[change.id] = join_record(old, Record(
                    old.id, old.queue, old.index, old.inc, old.hlc, old.node, old.body,
                    old.headers, old.expires_at, change.progress))  # type: ignore[assignment]
        elif isinstance(change, Tomb):
            self.records[change.id] = join_record(self.records.get(change.id), change)  # type: ignore[assignment]
        elif isinstance(change, Tally):
            self.tally = join_tally(self.tally, change.node,
                                    (change.dead_lettered, change.expired, change.dropped))

    def join(self, other: PartState) -> PartState:
        out = PartState(dict(self.records), dict(self.tally), max(self.promised,
                                                                 other.promised))
        for mid, rec in other.records.items():
            out.records[mid] = join_record(out.records.get(mid), rec)  # type: ignore[assignment]
        for node, values in other.tally.items():
            out.tally = join_tally(out.tally, node, values)
        return out

    def key(self) -> tuple[Any, ...]:
        """Equal states, equal keys (for comparing replicas)."""
        recs = tuple(sorted(
            (mid, ("T", r.at) if isinstance(r, Tomb) else (progress_key(r.progress),
                                                             _content(r)))
            for mid, r in self.records.items()))
        return (recs, tuple(sorted(self.tally.items())), self.promised)


def part_of(change: Change) -> PartKey | None:
    """The partition a change belongs to (None: the catalog or a dedup entry)."""
    if isinstance(change, Put):
        return change.record.part
    if isinstance(change, Step | Tomb | Tally):
        return (change.queue, change.index)
    return None
