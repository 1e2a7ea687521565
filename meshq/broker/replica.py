"""The broker's replica surface: what the cluster layer (and only it) calls.

``merge`` joins typed changes from other replicas into this node's partitions, memory and
store, by the rules of meshq.cluster.lattice; ``promise``, ``activate`` and ``deactivate``
move dispatch; ``forget`` drops a copy handed to its replicas; ``records`` reads a
partition for repair. State lives in the Broker; this class only holds a reference to it
(``broker.replica``). Never: a merge that undoes anything (a tombstone, a drop, later
progress), a merged change shipped on again (merges are not replicated: anti-entropy
carries them), or a partition that keeps dispatching after it learnt of a later epoch.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import msgpack

from meshq.broker.closed import to_restamp
from meshq.broker.digests import message_key
from meshq.broker.queue import Queue
from meshq.cluster.changes import (
    Change,
    Decl,
    Dedup,
    Drop,
    PartKey,
    Progress,
    Put,
    Record,
    Step,
    Tally,
    Tomb,
)
from meshq.cluster.lattice import (
    CatalogEntry,
    is_reserved,
    join_catalog,
    join_dedup,
    join_tally,
    part_of,
    progress_key,
)
from meshq.errors import BadRequest, Unavailable
from meshq.hlc import ClockOffsetError
from meshq.model import Message, QueueOptions, id_stamp
from meshq.states import Event, State
from meshq.store import OP_DEDUP, OP_DROP_QUEUE, OP_FORGET, OP_TOMBSTONE, Batch
from meshq.store.base import delete_op, put_op, update_op

if TYPE_CHECKING:
    from meshq.broker.core import Broker

__all__ = ["Merged", "Moved", "Replica", "message_key", "progress_of", "record_of"]

_packb = msgpack.Packer(use_bin_type=True).pack


class Moved(Unavailable):
    """The partition is dispatched by another node now (the caller may route again)."""


def progress_of(m: Message) -> Progress:
    return Progress(int(m.state), m.delivery_count, m.ready_at, m.lease_deadline, m.lease_id,
                    m.epoch, m.vn, m.holder)


def record_of(m: Message, headers: bytes | Any | None = ...) -> Record:
    if headers is ...:
        headers = _packb(m.headers) if m.headers else None
    return Record(m.id, m.queue, m.index, m.inc, m.hlc, m.node, m.body, headers,
                  m.expires_at, progress_of(m))


def _first_stamp(q: Queue, msg: Message) -> int | None:
    """The stamp its id was made with, of a fifo partition's READY message never
    delivered whose stamp is above it (a dispatcher stamped it again: ``to_restamp``);
    None for any other."""
    if q.options.ordering != "fifo" or msg.state != State.READY or msg.delivery_count:
        return None
    first = id_stamp(msg.id)
    return first if first is not None and first < msg.hlc else None


def _message_of(r: Record, seq: int) -> Message:
    p = r.progress
    return Message(seq, r.id, r.queue, r.body, msgpack.unpackb(r.headers) if r.headers else {},
                   r.hlc, r.node, State(p.state), p.count, p.ready_at, r.expires_at,
                   p.deadline, r.index, r.inc, p.lease, p.holder, p.epoch, p.vn)


def _stamp_hint(q: Queue, rec: Record) -> int | None:
    """What a Put tells of whether its message may be cold here: its HLC (one above every
    cold message's is not: ``Backlog.may_be_cold``); on a fifo queue, where a takeover
    may have stamped a message again under its id (``Broker.restamp``, which only raises
    it), the HLC its id was made with if lower (None: an id not made so)."""
    if q.options.ordering != "fifo":
        return rec.hlc
    made = id_stamp(rec.id)
    return None if made is None else min(rec.hlc, made)


@dataclass
class Merged:
    """What a merge did: the batch it staged into (``batch.ops`` empty: nothing to make
    durable), partitions refused for a later promise (part -> promised epoch), Steps for
    records not held here, Puts and Steps refused by a tombstone (sent back), whether
    anything changed, and whether the catalog did (a queue came, went or changed)."""

    batch: Batch
    fenced: dict[PartKey, int] = field(default_factory=dict)
    missing: list[tuple[str, int, str]] = field(default_factory=list)
    tombs: list[Tomb] = field(default_factory=list)
    changed: bool = False
    catalog: bool = False
    # READY messages merged into partitions not dispatched here: past the hot ones, they
    # leave memory at their commit (meshq.broker.backlog.Backlog.page_out)
    fresh: list[tuple[Queue, Message, tuple[Any, ...]]] = field(default_factory=list)


class Replica:
    """The replica surface of one Broker; see the module docstring."""

    def __init__(self, broker: Broker) -> None:
        self.b = broker
        # Called with a partition this node stopped dispatching because another node took
        # it over at a later epoch (the cluster layer re-homes its consumers).
        self.on_deposed: Callable[[Queue], None] | None = None
        # Whether the consumer connection a lease names ("node/boot") may still be alive;
        # leases of connections certainly gone are released when a partition is activated.
        self.holder_alive: Callable[[str], bool] | None = None
        # Told which partitions a merge changed here (the other copies may lack it now).
        self.on_merged: Callable[[set[PartKey]], None] | None = None

    # -- dispatch --------------------------------------------------------------------------
    def promise(self, q: Queue, epoch: int) -> bool:
        """Accept no change from a dispatcher of an epoch below ``epoch`` any more (staged:
        durable with the open batch). False when a later epoch was promised already."""
        if epoch < q.promised:
            return False
        if epoch > q.promised:
            q.promised = epoch
            self.b._stage_partition(q)
            if q.active and epoch > q.epoch:
                self.deactivate(q, "taken over by another node")
                if self.on_deposed is not None:
                    self.on_deposed(q)
        return True

    def activate(self, q: Queue, epoch: int) -> None:
        """Dispatch ``q`` here from now on, at ``epoch``: its timers run, consumers get
        leases, and leases whose consumer connection is certainly gone are released."""
        if q.active and q.epoch == epoch:
            return
        q.active = True
        q.epoch = epoch
        if epoch > q.promised:
            q.promised = epoch
            self.b._stage_partition(q)
        if self.b.replicating:
            self.b.store.current_batch().epochs[q.part] = epoch
        now = self.b.clock.time()
        # Stamp above every message of the partition, whatever clock stamped it: one
        # stamped by a clock too far ahead was merged without moving this HLC (receive
        # refuses it), and a send after it must not come out first (a key's order, fifo);
        # and above its closed bound (fifo: what an earlier dispatcher may have closed),
        # stamping again what came in below it and was never delivered.
        self.b.hlc.restore(max(max((m.hlc for m in q.messages.values()), default=0),
                               q.bound, q.cold_top if q.cold else 0))
        q.bound_ok, q.bound_batch = 0, None  # (confirmed anew at this epoch: closed_of)
        if q.bound:
            if q.cold and (q.cold_after[0] < q.bound or any(
                    m.state == State.READY and m.hlc < q.bound for m in q.messages.values())):
                # (what is stamped again is a suffix of the order: the disk's part too)
                self.b.backlog.page_all_now(q)
            ready = {m.seq: m for m in q.messages.values() if m.state == State.READY}
            for seq in to_restamp(((m.hlc, m.node, seq, m.delivery_count)
                                   for seq, m in ready.items()), q.bound):
                self.b.restamp(q, ready[seq], now)
        for msg in q.messages.values():
            self._schedule_all(q, msg, now)
        self.b.used(q)  # an expiring queue's unused time counts from its activation here
        self.release_leases(q)
        self.b._dispatch(q, now)

    def deactivate(self, q: Queue, reason: str) -> None:
        """Another node dispatches ``q`` now: end its consumers here (told ``reason``, not
        final: they may subscribe again where it went); leases stay recorded until their
        deadline, for the new dispatcher to honour."""
        if not q.active:
            return
        q.active = False
        for c in list(q.consumers):
            c.session.forget(c)
            c.credit, c.cancelled, c.moved = 0, True, True
            if c.replenish:
                c.replenish = False
                c.session.cancelled(c.tag, reason, False, q.index)
            elif c.pending == 0:
                c.sink(c, [])  # a waiting pull receive: it ends (and is routed again)
        q.consumers.clear()
        for msg in q.messages.values():
            if msg.owner is not None:
                self.b._detach(msg)

    def release_leases(self, q: Queue) -> int:
        """End the leases recorded without a consumer here whose holder is certainly gone
        (a previous process of this node, a node that died or restarted)."""
        if not q.active:
            return 0
        alive = self.holder_alive or (lambda h: h == self.b.holder)
        now = self.b.clock.time()
        gone = [m for m in q.messages.values()
                if m.state == State.LEASED and m.owner is None and not alive(m.holder)]
        for msg in gone:
            self.b.redeliveries += 1
            self.b._end_lease(q, msg, now, Event.REQUEUE)
        if gone:
            self.b._dispatch(q, now)
        return len(gone)

    def _schedule_all(self, q: Queue, msg: Message, now: float) -> None:
        """Its delay and TTL timers, and the deadline of a lease recorded without its
        consumer here (granted by another node or process): it ends then, as any unacked
        lease does."""
        self.b._schedule_message(msg)
        if msg.state == State.LEASED and msg.owner is None:
            if msg.lease_deadline is None:
                msg.lease_deadline = now
                q.changed(msg)
            self.b._add_timer(msg.lease_deadline, 1, msg)  # _T_LEASE

    def forget(self, q: Queue) -> None:
        """Drop this node's copy of an inactive partition (handed to its replicas): no
        tombstones, since the messages live on there."""
        for msg in list(q.messages.values()):
            if msg.owner is not None:
                self.b._detach(msg)
            q.set_state(msg, State.DROPPED)
            q.remove(msg)
        q.tombs.clear()
        q.tombs_on_disk = False  # (the stored ones go with OP_FORGET too)
        self.b.backlog.drop(q)  # (their rows go with OP_FORGET)
        self.b.backlog.drop_late(q)
        q.compact()
        self.b.store.stage((OP_FORGET, (q.name, q.index)))

    # -- reading a partition -------------------------------------------------------------
    def part(self, queue: str, index: int) -> Queue | None:
        return self.b.parts.get((queue, index))

    async def records(self, q: Queue, ids: Iterable[str]) -> tuple[list[Record], list[Tomb]]:
        """The records of ``ids`` held here (in memory, or cold: read from the store by
        id in a worker thread), and tombstones of those deleted here."""
        ids = list(ids)
        await self.b.backlog.warm_tombs(q)
        cold: dict[str, Message] = {}
        recs, tombs = [], []
        with self.b.backlog.pinned(q):  # (none leaves memory for the disk meanwhile)
            if q.cold:
                gen = q.cold_gen
                maybe = [mid for mid in ids if self.b.backlog.may_be_cold(q, mid)]
                if maybe:
                    read = await self.b.store.read_ids_async(q.name, q.index, maybe)
                    cold = {m.id: m for m in self.b.backlog.cold_of(q, gen, read)}
            for mid in ids:
                msg = q.messages.get(mid) or cold.get(mid)
                if msg is not None:
                    recs.append(record_of(msg))
                elif mid in q.tombs:
                    tombs.append(Tomb(q.name, q.index, mid, q.tombs[mid]))
        return recs, tombs

    def catalog_entries(self) -> list[CatalogEntry]:
        return list(self.b.catalog.values())

    # -- merging -----------------------------------------------------------------------------
    async def merge_async(self, changes: Sequence[Change],
                          epochs: dict[PartKey, int] | None = None,
                          bounds: Iterable[tuple[str, int, int]] = ()) -> Merged:
        """``merge``, after paging in (in a worker thread) the cold messages the changes
        name, and reading back stored tombstones, so that the merge itself reads nothing."""
        named: dict[Queue, list[tuple[str, int | None]]] = {}
        parts: dict[Queue, None] = {}  # (every partition named: pinned below)
        for c in changes:
            part = part_of(c)
            q = self.b.parts.get(part) if part is not None else None
            if q is None:
                continue
            parts[q] = None
            if not (q.cold or q.tombs_on_disk):
                continue
            if isinstance(c, Put):
                named.setdefault(q, []).append((c.record.id, _stamp_hint(q, c.record)))
            elif isinstance(c, Step | Tomb):
                named.setdefault(q, []).append((c.id, None))
        looked: set[str] = set()
        with ExitStack() as pins:  # (none of them leaves memory for the disk meanwhile)
            for q in parts:
                pins.enter_context(self.b.backlog.pinned(q))
            for q, ids in named.items():
                await self.b.backlog.page_ids(q, ids)
                looked.update(mid for mid, _ in ids)
            return self.merge(changes, epochs, bounds, looked)

    def _page_for(self, q: Queue, mid: str, hlc: int | None, looked: set[str],
                  touched: dict[Queue, None]) -> None:
        """Before a change of ``mid`` is merged into ``q``: its tombstones read back, and
        the message paged in if it is cold (blocking: ``merge_async`` did it already for
        what it names, ``looked``; dispatched with what the merge touched)."""
        if mid not in looked and self.b.backlog.page_ids_now(q, ((mid, hlc),)):
            touched[q] = None

    def merge(self, changes: Iterable[Change],
              epochs: dict[PartKey, int] | None = None,
              bounds: Iterable[tuple[str, int, int]] = (),
              looked: set[str] | None = None) -> Merged:
        """Join ``changes`` into this replica; see Merged. ``epochs``: the sender's dispatch
        epoch per partition, which fences (a partition promised to a later epoch refuses
        the changes) and promises (a later epoch is accepted and promised from now on).
        ``bounds``: closed bounds of partitions (fenced the same way), kept when higher.
        A change of a message that is cold here pages it in first (the join is the one in
        memory), blocking unless ``merge_async`` did it (``looked``: the ids it did)."""
        looked = looked or set()
        out = Merged(self.b.store.current_batch())
        replicating, self.b.replicating = self.b.replicating, False
        touched: dict[Queue, None] = {}
        try:
            rest = []
            for c in changes:
                if type(c) is Decl or type(c) is Drop:
                    if self._merge_catalog(c):
                        out.changed = out.catalog = True
                else:
                    rest.append(c)
            for (qname, idx), epoch in (epochs or {}).items():
                q = self.part(qname, idx)
                if q is None:
                    continue
                if epoch < q.promised:
                    out.fenced[q.part] = q.promised
                elif epoch > q.promised:
                    self.promise(q, epoch)
                    out.changed = True
            for qname, idx, bound in bounds:
                q = self.part(qname, idx)
                if q is not None and q.part not in out.fenced:
                    self.b.keep_bound(q, bound)
            now = self.b.clock.time()
            changed_parts: set[PartKey] = set()
            for c in rest:
                t = type(c)
                if isinstance(c, Put) and c.dedup_id is not None:
                    # (a dedup entry is not fenced, whether alone or with its Put)
                    out.changed |= self._merge_dedup(c.record.queue, c.dedup_id, c.record.id,
                                                     c.dedup_expires, now)
                elif isinstance(c, Dedup):
                    out.changed |= self._merge_dedup(c.queue, c.dedup_id, c.id, c.expires_at,
                                                     now)
                    continue
                part = part_of(c)
                if part is not None and part in out.fenced:
                    continue
                home = self.b.parts.get(part) if part is not None else None
                if home is not None and (home.cold or home.tombs_on_disk):
                    if t is Put:  # (what it merges must be in memory)
                        self._page_for(home, c.record.id, _stamp_hint(home, c.record),  # type: ignore[union-attr]
                                       looked, touched)
                    elif t is Step or t is Tomb:
                        self._page_for(home, c.id, None, looked, touched)  # type: ignore[union-attr]
                if t is Tally:
                    q = self.part(c.queue, c.index)  # type: ignore[union-attr]
                    if q is not None:
                        new = join_tally(q.tally, c.node, (c.dead_lettered, c.expired,  # type: ignore[union-attr]
                                                           c.dropped))  # type: ignore[union-attr]
                        if new is not q.tally:
                            q.tally = new
                            self.b._stage_partition(q)
                            out.changed = True
                    continue
                if t is Put:
                    did = self._merge_put(c.record, now, out, touched)  # type: ignore[union-attr]
                elif t is Step:
                    did = self._merge_step(c, now, out, touched)  # type: ignore[arg-type]
                elif t is Tomb:
                    did = self._merge_tomb(c, touched)  # type: ignore[arg-type]
                else:
                    continue
                if did:  # a record's state here moved: the partition's other copies lag
                    out.changed = True
                    changed_parts.add(part)  # type: ignore[arg-type]
        finally:
            self.b.replicating = replicating
        for q in touched:
            if q.active and self.b.live(q):
                self.b._dispatch(q, now)
        if changed_parts and self.on_merged is not None:
            self.on_merged(changed_parts)
        out.batch = self.b.store.current_batch()
        if out.fresh:
            out.batch.on_local.append(functools.partial(self.b.backlog.page_out, out.fresh))
        return out

    def _merge_catalog(self, c: Decl | Drop) -> bool:
        name = c.queue
        known = self.b.catalog.get(name)
        if (known is not None and type(c) is Decl and c.inc == known.inc
                and c.options == known.options):
            return False  # the usual case: every batch carries its queue's declaration
        old = known or CatalogEntry(name)
        new = join_catalog(old, c)
        if new == old:
            return False
        if is_reserved(name):  # an AMQP exchange or binding: an entry, never a Queue
            self.b.catalog[name] = new
            if isinstance(c, Drop):
                self.b.store.stage((OP_DROP_QUEUE, (name, new.dropped, new.dropped_at)))
            else:
                self.b._stage_catalog(name)
            return True
        if isinstance(c, Decl) and new.inc != old.inc:
            try:
                options = QueueOptions.from_dict(dict(new.options))
            except BadRequest:
                return False  # a peer's options we cannot read: leave the entry as it was
        qs = self.b.queues.get(name, ())
        if isinstance(c, Drop):
            for q in qs:  # a later incarnation lives on: what the dropped one has on disk
                if q.cold and not new.absorbs(q.inc):  # only is read back, so that the
                    self.b.backlog.page_all_now(q)  # loop below drops it (rare: see there)
        self.b.catalog[name] = new
        if isinstance(c, Drop):
            self.b.store.stage((OP_DROP_QUEUE, (name, new.dropped, new.dropped_at)))
            for q in qs:
                if new.absorbs(q.inc):
                    self.b._drop(q, "queue deleted")
                else:  # a later incarnation lives on; the dropped one's messages go
                    for msg in [m for m in q.messages.values() if new.absorbs(m.inc)]:
                        self.b._detach(msg)
                        q.set_state(msg, State.DROPPED)
                        q.remove(msg)
                    q.compact()
            return True
        self.b._stage_catalog(name)
        if new.live and (not qs or qs[0].inc < new.inc):
            if not qs:
                for q in self.b._make_queue(name, options, new.inc):
                    q.active = False
                if self.b.on_catalog is not None:
                    self.b.on_catalog(name)
            elif len(qs) != options.partition_count:  # a later incarnation, partitioned anew
                for q in qs:
                    self.b._drop(q, "queue declared again with other partitions")
                for q in self.b._make_queue(name, options, new.inc):
                    q.active = False
                if self.b.on_catalog is not None:
                    self.b.on_catalog(name)
            else:
                for q in qs:
                    q.inc, q.options = new.inc, options
        return True

    def _merge_put(self, rec: Record, now: float, out: Merged,
                   touched: dict[Queue, None]) -> bool:
        entry = self.b.catalog.get(rec.queue)
        q = self.part(rec.queue, rec.index)
        if entry is None or q is None or entry.absorbs(rec.inc):
            return False
        if rec.id in q.tombs:
            out.tombs.append(Tomb(q.name, q.index, rec.id, q.tombs[rec.id]))
            return False
        pending = self.b.in_flight.get(rec.id)
        if pending is not None and pending.queue == rec.queue:
            return False  # ours, staged and not yet confirmed: it is added then
        msg = q.messages.get(rec.id)
        if msg is not None:
            return self._merge_progress(q, msg, rec.progress, now, touched)
        msg = _message_of(rec, self.b._next_seq())
        first = _first_stamp(q, msg)
        if first is not None:
            # fifo: a dispatcher stamped it again (not replicated: each decides by its
            # own bound); the messages after it here keep the stamps they came with, so
            # it takes back its first one, and the rules below and a takeover here decide
            # from that (else a key's later message came first: heavy --fifo 6
            # --hot-ready 2 seed 11049)
            msg.hlc = first
        if msg.hlc > self.b.hlc.last:  # a later takeover stamps above it (fifo)
            try:
                self.b.hlc.receive(msg.hlc, int(now * 1000))
            except ClockOffsetError:
                pass  # (stamped by a clock too far ahead: activate() stamps above it)
        elif (q.active and msg.state == State.READY and msg.delivery_count == 0
              and msg.hlc < q.bound):  # (to_restamp's rule, for one message)
            # fifo: it comes in below what this dispatcher may have closed (its sender was
            # deposed before a write quorum had it: never confirmed), and takes a new stamp
            msg.hlc = self.b._stamp(now)
        q.add(msg)
        if q.active:
            self._schedule_all(q, msg, now)
            touched[q] = None
        elif msg.state == State.READY and self.b.store.pages:
            out.fresh.append((q, msg, message_key(msg)))
        op = put_op(msg)
        self.b.store.stage(op).body_bytes += len(msg.body)
        return True

    def _merge_step(self, c: Step, now: float, out: Merged,
                    touched: dict[Queue, None]) -> bool:
        q = self.part(c.queue, c.index)
        if q is None:
            return False
        msg = q.messages.get(c.id)
        if msg is None:
            if c.id in q.tombs:
                out.tombs.append(Tomb(q.name, q.index, c.id, q.tombs[c.id]))
            else:
                out.missing.append((q.name, q.index, c.id))
            return False
        return self._merge_progress(q, msg, c.progress, now, touched)

    def _merge_progress(self, q: Queue, msg: Message, p: Progress, now: float,
                        touched: dict[Queue, None]) -> bool:
        if progress_key(p) <= message_key(msg):
            return False
        if q.active and p.epoch > q.epoch:  # someone dispatched it at a later epoch
            self.deactivate(q, "taken over by another node")
            if self.on_deposed is not None:
                self.on_deposed(q)
        if msg.state == State.LEASED and (p.state != State.LEASED or p.lease != msg.lease_id):
            self.b._detach(msg)
        q.set_state(msg, State(p.state))
        msg.delivery_count, msg.ready_at, msg.lease_deadline = p.count, p.ready_at, p.deadline
        msg.lease_id, msg.holder, msg.epoch, msg.vn = p.lease, p.holder, p.epoch, p.vn
        q.changed(msg)
        if q.active:
            self._schedule_all(q, msg, now)
            touched[q] = None
        self.b.store.stage(update_op(msg))
        return True

    def _merge_tomb(self, c: Tomb, touched: dict[Queue, None]) -> bool:
        q = self.part(c.queue, c.index)
        if q is None:
            return False
        msg = q.messages.get(c.id)
        if msg is not None:
            self.b._detach(msg)
            q.set_state(msg, State.ACKED)
            q.remove(msg)
            q.compact()
            q.tombs[c.id] = c.at
            self.b.store.stage(delete_op(msg, c.at))
            touched[q] = None
            return True
        if c.id in q.tombs and q.tombs[c.id] >= c.at:
            return False
        q.tombs[c.id] = c.at
        self.b.store.stage((OP_TOMBSTONE, (q.name, q.index, c.id, c.at)))
        return True

    def _merge_dedup(self, queue: str, dedup_id: str, mid: str, expires_at: float,
                     now: float) -> bool:
        """Join a dedup entry (a Dedup, or the one a Put carries)."""
        if expires_at <= now or queue not in self.b.queues:
            return False
        old = self.b._dedup.get((queue, dedup_id), now)
        new = join_dedup(None if old is None else (old[0], old[1]), (mid, expires_at))
        if old is not None and new == (old[0], old[1]):
            return False
        self.b._dedup[queue, dedup_id] = (new[0], new[1], None)
        self.b.store.stage((OP_DEDUP, (queue, dedup_id, new[0], new[1])))
        return True
