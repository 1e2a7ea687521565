"""The cluster layer's driver: replication of this node's broker, as one component.

It is the store's gate (every batch's typed changes go to the holders of their
partitions, and the batch completes once the quorum gate says so), it serves other
nodes' requests (apply, promise, digest, fetch, catalog) by merging, and it runs the
rounds: on every membership change and every ROUND seconds it takes over the partitions
this node is now first for, stops dispatching those it is not, repairs holders by
digests in both directions, hands off copies it should not hold, exchanges the catalog,
and releases leases whose consumer's node died. It keeps the moves of those rounds
(meshq.cluster.moves) and sums every live node's for the rebalance status.

State here: the batches held by the gate, the tasks under way per partition, counters.
Never: a batch completed before the gate says so; a partition dispatched here without a
takeover at an epoch a quorum promised; two tasks on one partition at once.
"""

from __future__ import annotations

import functools
import itertools
import logging
import math
from collections import defaultdict
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import trio

from meshq.broker.core import Broker
from meshq.broker.queue import Queue
from meshq.broker.replica import Merged, message_key
from meshq.cluster import gate as gates
from meshq.cluster.changes import (
    Answer,
    ApplyAnswer,
    ApplyReq,
    CatalogAnswer,
    CatalogReq,
    Change,
    Decl,
    DigestAnswer,
    DigestReq,
    Drop,
    FetchAnswer,
    FetchReq,
    MovesAnswer,
    MovesReq,
    PartKey,
    PromiseAnswer,
    PromiseReq,
    Request,
)
from meshq.cluster.lattice import BUCKETS, catalog_digest, part_of
from meshq.cluster.moves import Moves, PartView, summary
from meshq.cluster.peers import Peers
from meshq.cluster.placement import Placement, Replicas
from meshq.cluster.repair import digest, durable, members, next_epoch, sync, take_over
from meshq.errors import MeshqError, Timeout, Unavailable
from meshq.mesh.swim import MemberState
from meshq.model import QueueOptions
from meshq.store import Batch, Store, StoreError

__all__ = ["ROUND", "Cluster", "ClusterStatistics"]

log = logging.getLogger("meshq.cluster")

ROUND = 5.0  # seconds between anti-entropy rounds
FULL_EVERY = 12  # rounds: a holder kept current by replication is compared this seldom
FULL_BUSY_MAX = 120  # rounds: ... and put off while the partition is written, this long,
FULL_BUSY_MIN = 20_000  # ... when it holds this many messages or more
TAKEOVER_WAIT = 10.0  # a client op waits this long for a takeover before UNAVAILABLE
CATALOG_WAIT = 5.0  # an op on an unknown queue waits this long for the first catalog sync
HAND_BACK_DELAY = 0.2  # a deposed dispatcher pushes its last changes after this long
AUTO_PARTITIONS_MAX = 16  # the most partitions a queue gets without asking
MOVES_WAIT = 2.0  # a rebalance status waits this long for each node's moves


@dataclass(frozen=True)
class ClusterStatistics:
    """The ``replication`` section of ``meshq-ctl status``."""

    hinted_messages: int  # held here for partitions this node is not a holder of
    taking_over: tuple[str, ...]
    dispatching: int  # partitions dispatched here
    waiting_batches: int
    failed_quorums: int
    fenced_batches: int
    takeovers: int
    repair_rounds: int
    repaired: dict[str, int]
    links: tuple[str, ...]


class Cluster:
    def __init__(self, *, me: str, broker: Broker, store: Store, placement: Placement,
                 peers: Peers, members: Callable[[str], Any] | None = None,
                 write_quorum: int | None = None, boot: str = "",
                 now: Callable[[], float] = trio.current_time,
                 default_partitions: int | None = None) -> None:
        self.me = me
        self.broker = broker
        self.store = store
        self.placement = placement
        self.peers = peers
        self.members = members  # name -> Member (or None), for lease holders' liveness
        self.write_quorum = write_quorum
        self.boot = boot
        self._now = now
        self.node_int = (int(broker.node_id, 16) if _is_hex(broker.node_id)
                         else hash(me)) & 0xFFFFFFFF
        self.gate = gates.Gate()
        self._rng = broker.rng
        self._ids = itertools.count(1)
        self._batches: dict[int, Batch] = {}
        self._batch_ids: dict[int, int] = {}  # id(batch) -> gate id
        self._shipped: dict[int, tuple[dict[PartKey, list[Change]], list[Change],
                                       dict[PartKey, int]]] = {}
        self._local_errors: dict[int, BaseException] = {}
        # Per batch shipped, per partition: the holders it went to (a holder that joined
        # meanwhile is compared at the next round once the batch completes).
        self._shipped_to: dict[int, dict[PartKey, frozenset[str]]] = {}
        # Per batch shipped and not complete, the (partition, holder) pairs it failed to
        # reach: missed again when it completes, since a sync meanwhile could not give
        # them its sends (ours, not yet confirmed: in no digest) and took them for current.
        self._failed_to: dict[int, set[tuple[PartKey, str]]] = {}
        self._busy: set[Any] = set()
        # Applies into partitions with messages on disk only, merged by one task in the
        # order they came (and those behind them, while any is under way).
        self._apply_in, self._apply_out = trio.open_memory_channel[_Apply](math.inf)
        self._applying = 0
        # Per partition, the holders known equal to it since their last sync: every batch
        # sent to them since was applied there. A failed or fenced batch takes the holder
        # out; a merge that changed the partition here, a batch from another dispatcher,
        # a takeover or deposition, or a sync that left an unconfirmed send of ours alone
        # takes the partition out; a placement change empties it. Anti-entropy skips the
        # holders in it but every FULL_EVERY rounds, so that a busy queue is not digested
        # whole every round.
        self._current: dict[PartKey, set[str]] = {}
        # The round each partition was last written to (a batch shipped with a change of
        # it), and last fully compared (_full_compare).
        self._written: dict[PartKey, int] = {}
        self._compared: dict[PartKey, int] = {}
        self._misses: dict[tuple[PartKey, str], int] = defaultdict(int)
        self._takeovers: dict[PartKey, trio.Event] = {}
        self._wake = trio.Event()
        self._gate_wake = trio.Event()
        self.changed = trio.Event()  # set (and replaced) whenever placement changes
        self.catalog_ready = trio.Event()
        self._nursery: trio.Nursery | None = None
        self.rounds = 0
        self.takeovers = 0
        self.repaired = {"sent": 0, "fetched": 0, "deleted": 0, "handed_off": 0}
        self.moves = Moves()
        store.gate = self
        broker.dispatch_by_default = False
        broker.hand_over_early = self._held_alone
        broker.preferred_here = lambda q: self.replicas(q).preferred[:1] == (self.me,)
        broker.placement_gen = lambda: self.placement.epoch
        self._stopping = False  # abandon(): the store is stopping
        self.partitions_setting = default_partitions
        broker.default_partitions = self._default_partitions
        broker.holder = f"{me}/{boot}" if boot else broker.holder
        broker.on_declare = self._declared
        broker.on_catalog = lambda name: self.wake()
        broker.replica.on_deposed = self._deposed
        broker.replica.holder_alive = self._holder_alive
        broker.replica.on_merged = self._merged
        for q in broker.parts.values():
            q.active = False

    # -- placement ---------------------------------------------------------------------
    def replicas(self, q: Queue) -> Replicas:
        w = q.options.write_quorum
        return self.placement.replicas(q.name, q.index, q.options.replicas,
                                       self.write_quorum if w is None else w,
                                       q.options.partition_count)

    def _default_partitions(self, options: QueueOptions) -> int:
        """Partitions of a queue declared without the option: the config's
        ``default_partitions``, else one on a lone node and twice the ring's members (at
        most AUTO_PARTITIONS_MAX) on a cluster, so that a fair queue spreads over every
        node; a fifo queue (its order across partitions costs a closed-timestamp wait)
        or one that expires (used or not, judged by one node) gets one."""
        if options.ordering == "fifo" or options.expires is not None:
            return 1  # (whatever the config says: docs/operations.md)
        if self.partitions_setting is not None:
            return self.partitions_setting
        members = len(self.placement.nodes())
        return 1 if members <= 1 else min(2 * members, AUTO_PARTITIONS_MAX)

    def _held_alone(self, q: Queue) -> bool:
        """This node alone holds the partition and confirms its writes: a lease that
        commits with its message can be handed over before the commit (broker.send)."""
        gen = self.placement.epoch
        if q.alone[0] == gen:
            return q.alone[1]
        r = self.replicas(q)
        alone = r.write_quorum == 1 and r.holders == (self.me,)
        q.alone = (gen, alone)  # (a queue's options never change: only the placement)
        return alone

    def replicas_of(self, name: str, options: QueueOptions | None = None,
                    index: int = 0) -> Replicas:
        """A queue partition's placement, known or not (a declare's, default options)."""
        q = self.broker.parts.get((name, index))
        if q is not None:
            return self.replicas(q)
        opts = options or QueueOptions()
        w = opts.write_quorum
        return self.placement.replicas(name, index, opts.replicas,
                                       self.write_quorum if w is None else w,
                                       opts.partition_count)

    def wake(self) -> None:
        self._wake.set()

    def membership_changed(self, *_: Any) -> None:
        self._wake.set()

    async def until_active(self, q: Queue) -> None:
        """Wait (bounded) until this node dispatches ``q`` after its takeover."""
        if q.active:
            return
        self.wake()
        with trio.move_on_after(TAKEOVER_WAIT):
            while not q.active and self.broker.live(q):
                if self.replicas(q).primary != self.me:
                    return  # not ours any more: the caller routes again
                event = self._takeovers.get(q.part)
                if event is None:
                    event = self._takeovers[q.part] = trio.Event()
                    self.wake()
                await event.wait()
        if not q.active and self.broker.live(q) \
                and self.replicas(q).primary == self.me:
            raise Unavailable(f"queue {q.name!r} is being taken over by this node; retry")

    async def until_catalog(self) -> None:
        with trio.move_on_after(CATALOG_WAIT):
            await self.catalog_ready.wait()

    # -- hooks from the broker ---------------------------------------------------------
    def _declared(self, q: Queue) -> None:
        """A queue declared here (this node routes declares to the primary): dispatch its
        partition at once, at a new epoch (the declare's batch carries it)."""
        reps = self.replicas(q)
        if reps.primary == self.me:
            self.broker.replica.activate(q, next_epoch(q.promised, self.node_int))
        self.wake()

    def _deposed(self, q: Queue) -> None:
        log.info("%s: partition %s/%d taken over elsewhere (epoch %x)", self.me, q.name,
                 q.index, q.promised)
        self._merged({q.part})  # the copies are the new dispatcher's to vouch for now
        self._spawn(("handback", q.part), self._hand_back, q)
        self.wake()

    async def _hand_back(self, q: Queue) -> None:
        """We stopped dispatching ``q``: what we changed last (leases whose batch was
        refused, and their release) goes to the new dispatcher now, not at the next
        round, so that it does not wait for those leases' deadlines."""
        await trio.sleep(HAND_BACK_DELAY)  # the refused batches complete (and requeue)
        primary = self.replicas(q).primary
        if primary is None or primary == self.me or not self.broker.live(q):
            return
        stats = await sync(self.peers, self.broker, q, primary, pull=False)
        self.repaired["sent"] += stats.sent

    def _holder_alive(self, holder: str) -> bool:
        node, _, boot = holder.partition("/")
        if node == self.me:
            return boot == self.boot or not self.boot
        if self.members is None:
            return True
        m = self.members(node)
        if m is None:
            return False
        if m.state in (MemberState.DEAD, MemberState.LEFT):
            return False
        theirs = m.meta.get("b")
        return theirs is None or theirs == boot

    # -- the gate (Store.gate) -----------------------------------------------------------
    def ship(self, batch: Batch) -> None:
        bid = next(self._ids)
        self._batches[bid] = batch
        self._batch_ids[id(batch)] = bid
        now = self._now()
        if not batch.changes and not batch.bounds:
            self._run(self.gate.shipped(bid, {}, now))
            return
        by_part: dict[PartKey, list[Change]] = defaultdict(list)
        for bounded in batch.bounds:  # (a closed bound alone goes to the holders too)
            by_part.setdefault(bounded, [])
        catalog: list[Change] = []
        for c in batch.changes:
            part = part_of(c)
            if part is not None:
                by_part[part].append(c)
            elif isinstance(c, Decl | Drop):
                catalog.append(c)
                for i in range(self._partitions_of(c.queue)):  # a declare (a drop) waits
                    by_part.setdefault((c.queue, i), [])  # for each partition's holders
            else:  # a Dedup alone: with its queue's partition 0
                by_part[(c.queue, 0)].append(c)
        live_others = sorted(self.placement.live - {self.me})
        needs: dict[PartKey, gates.Need] = {}
        to_node: dict[str, list[Change]] = defaultdict(list)
        parts_of: dict[str, set[PartKey]] = defaultdict(set)
        went: dict[PartKey, frozenset[str]] = {}
        for part, changes in by_part.items():
            if changes:
                self._written[part] = self.rounds
            q = self.broker.replica.part(*part)
            if q is None:  # deleted in this very batch: the Drop goes to every live node,
                reps = self._replicas_of_dropped(*part)  # and W holders confirm it
                if reps is None:
                    continue
                targets = [h for h in reps.holders if h != self.me]
                wanted = reps.write_quorum - (1 if self.me in reps.holders else 0)
                needs[part] = gates.Need(max(0, wanted), tuple(targets),
                                         tuple(s for s in reps.spares if s != self.me))
                for node in targets:
                    parts_of[node].add(part)
                continue
            reps = self.replicas(q)
            targets = [h for h in reps.holders if h != self.me]
            wanted = reps.write_quorum - (1 if self.me in reps.holders else 0)
            needs[part] = gates.Need(max(0, wanted), tuple(targets),
                                     tuple(s for s in reps.spares if s != self.me))
            went[part] = frozenset(targets)
            decl = self._decl_of(q)
            for node in targets:
                if decl is not None and not catalog:
                    to_node[node].append(decl)
                to_node[node].extend(changes)
                parts_of[node].add(part)
        for node in live_others:
            if catalog:
                to_node[node][:0] = catalog
        self._shipped[bid] = (dict(by_part), catalog, dict(batch.epochs))
        self._shipped_to[bid] = went
        for node, changes in to_node.items():
            self._send(bid, node, changes, parts_of[node], batch.epochs)
        self._run(self.gate.shipped(bid, needs, now))
        self._gate_wake.set()

    def _options_of(self, name: str) -> QueueOptions:
        entry = self.broker.catalog.get(name)
        try:
            return QueueOptions.from_dict(dict(entry.options)) if entry else QueueOptions()
        except MeshqError:
            return QueueOptions()

    def _partitions_of(self, name: str) -> int:
        qs = self.broker.queues.get(name)
        return len(qs) if qs else self._options_of(name).partition_count

    def _replicas_of_dropped(self, name: str, index: int) -> Replicas | None:
        entry = self.broker.catalog.get(name)
        if entry is None or entry.live:
            return None
        return self.replicas_of(name, self._options_of(name), index)

    def _decl_of(self, q: Queue) -> Decl | None:
        e = self.broker.catalog.get(q.name)
        return None if e is None or not e.inc else Decl(q.name, e.inc, e.options)

    def _send(self, bid: int, node: str, changes: list[Change], parts: set[PartKey],
              epochs: dict[PartKey, int]) -> None:
        fence = tuple((p[0], p[1], e) for p, e in epochs.items() if p in parts)
        batch = self._batches.get(bid)
        bounds = () if batch is None else tuple(
            (p[0], p[1], b) for p, b in batch.bounds.items() if p in parts)
        self.peers.send(node, ApplyReq(fence, tuple(changes), bounds),
                        functools.partial(self._answered, bid, node, frozenset(parts)))

    def _answered(self, bid: int, node: str, parts: frozenset[PartKey],
                  answer: Answer | None) -> None:
        log.debug("%s: batch %d answered by %s: %s", self.me, bid, node,
                  type(answer).__name__ if not isinstance(answer, ApplyAnswer) else
                  f"fenced={answer.fenced} missing={len(answer.missing)}")
        if not isinstance(answer, ApplyAnswer):
            self._failed(bid, parts, node)
            self._run(self.gate.failed(bid, node))
            return
        fenced = {(q, i): e for q, i, e in answer.fenced}
        missing = {(q, i) for q, i, _ in answer.missing}
        self._failed(bid, fenced.keys() | missing, node)
        if answer.tombs:  # we sent what it has deleted: its tombstones win here too
            self.broker.replica.merge(list(answer.tombs))
        if missing:
            self.wake()  # a holder lacks records: the next round repairs it
        self._run(self.gate.answered(bid, node, set(parts - missing - fenced.keys()), fenced))

    def _failed(self, bid: int, parts: Iterable[PartKey], node: str) -> None:
        """Batch ``bid`` did not reach ``node``'s copies of ``parts``: compare them at the
        next round, and again once the batch completes."""
        pending = bid in self._batches
        for part in parts:
            self._missed(part, node)
            if pending:
                self._failed_to.setdefault(bid, set()).add((part, node))

    def _merged(self, parts: set[PartKey]) -> None:
        """A merge changed these partitions here, or another node dispatched them: the
        other copies may differ from this one."""
        for part in parts:
            self._current.pop(part, None)
            self._misses[part, self.me] += 1  # (a sync under way cannot vouch for it)

    def _missed(self, part: PartKey, node: str) -> None:
        """``node`` may lack some of ``part``'s changes: compare it at the next round."""
        self._current.get(part, set()).discard(node)
        self._misses[part, node] += 1

    def committed(self, batch: Batch, error: BaseException | None) -> None:
        bid = self._batch_ids.get(id(batch))
        if bid is None:
            batch.complete(error)
            return
        if error is not None:
            self._local_errors[bid] = error
        self._run(self.gate.local_done(bid, error))

    def abandon(self) -> None:
        """The store stops: every batch waiting for replicas fails (and nothing new is
        started for them: the driver's tasks are ending)."""
        self._stopping = True
        self._run(self.gate.abandon())

    def _run(self, effects: list[gates.Effect]) -> None:
        for e in effects:
            if isinstance(e, gates.Complete):
                self._complete(e)
            elif isinstance(e, gates.Ship):
                shipped = self._shipped.get(e.batch)
                if shipped is None:
                    continue
                by_part, _, epochs = shipped
                changes: list[Change] = []
                for part in e.parts:
                    q = self.broker.replica.part(*part)
                    decl = self._decl_of(q) if q is not None else None
                    if decl is not None:
                        changes.append(decl)
                    changes.extend(by_part.get(part, ()))
                self._send(e.batch, e.node, changes, set(e.parts), epochs)
            elif isinstance(e, gates.Fenced):
                q = self.broker.replica.part(*e.part)
                if q is not None:
                    self.broker.replica.promise(q, e.epoch)  # (_deposed if it was active)
                self.wake()

    def _complete(self, e: gates.Complete) -> None:
        if e.failure is not None:
            log.debug("%s: batch %d failed: %s", self.me, e.batch, e.failure)
        batch = self._batches.pop(e.batch, None)
        shipped = self._shipped.pop(e.batch, None)
        for part, went in self._shipped_to.pop(e.batch, {}).items():
            q = self.broker.replica.part(*part)
            if q is not None:  # holders it did not go to lack it (they joined meanwhile)
                for node in set(self.replicas(q).holders) - went - {self.me}:
                    self._missed(part, node)
        for part, node in self._failed_to.pop(e.batch, ()):
            self._missed(part, node)  # (a sync since could not vouch for its sends)
        if e.failure is not None and shipped is not None:
            self._merged(set(shipped[0]))  # its copies may differ now: compare them again
            for part in shipped[0]:
                q = self.broker.replica.part(*part)
                if (q is not None and not q.active and self._nursery is not None
                        and not self._stopping):
                    # Written here (and visible once the batch completes) after another
                    # node took the partition over, perhaps after it read this copy: the
                    # dispatcher hears of it now, not at its next full round.
                    self._spawn(("handback", part), self._hand_back, q)
        local = self._local_errors.pop(e.batch, None)
        if batch is None:
            return
        self._batch_ids.pop(id(batch), None)
        error: BaseException | None = None
        if e.failure == "local":
            remote = any(batch.changes)
            error = (Timeout(f"the local commit failed ({local}) after the changes went to "
                             "the replicas; outcome unknown") if remote and local is not None
                     else (local or StoreError("the local commit failed")))
        elif e.failure == "quorum":
            error = Timeout("fewer replicas than the write quorum confirmed the write; "
                            "outcome unknown (retry with the same dedup id)")
        elif e.failure == "fenced":
            error = Timeout("another node took over dispatch of this queue meanwhile; "
                            "outcome unknown (retry with the same dedup id)")
        elif e.failure == "stopped":
            error = Timeout("the node stopped; outcome unknown")
        batch.complete(error)

    async def _gate_timer(self) -> None:
        while True:
            at = self.gate.next_deadline()
            self._gate_wake = trio.Event()
            with trio.move_on_at(at):
                await self._gate_wake.wait()
            if self._now() >= at:
                self._run(self.gate.tick(self._now()))

    # -- serving other nodes -------------------------------------------------------------
    def handle(self, peer: str, request: Request) -> Answer | Awaitable[Answer]:
        """Serve one request of ``peer`` (meshq.cluster.peers.serve_link calls it)."""
        replica = self.broker.replica
        if isinstance(request, ApplyReq):
            epochs = {(q, i): e for q, i, e in request.epochs}
            if self._current:  # another node dispatches these (or did): compare them again
                self._merged(set(epochs))
            if self._applying or self._names_cold(request.changes):
                # (messages on disk only to page in first: by one task, in order)
                pending = _Apply(request.changes, epochs, tuple(request.bounds))
                self._applying += 1
                self._apply_in.send_nowait(pending)
                return self._apply_answer(pending)
            return self._applied(replica.merge(request.changes, epochs, request.bounds))
        if isinstance(request, PromiseReq):
            if request.decl is not None:
                replica.merge([request.decl])
            q = replica.part(request.queue, request.index)
            if q is None:
                return PromiseAnswer(False, 0, False)
            if self.replicas(q).primary != peer:
                # Promise only to the node this one's view makes the primary: while views
                # disagree (a suspicion on one side only), no node steals dispatch from a
                # primary that the others still reach -- they would take turns forever.
                return PromiseAnswer(False, q.promised, q.has_copy)
            ok = replica.promise(q, request.epoch)
            return self._promised(q, ok, q.promised, self.store.current_batch())
        if isinstance(request, DigestReq):
            return self._digest(request)
        if isinstance(request, FetchReq):
            return self._fetch(request)
        if isinstance(request, CatalogReq):
            return self._catalog(request)
        if isinstance(request, MovesReq):
            return self.moves_here()
        raise ValueError(f"unexpected request {type(request).__name__}")

    def _applied(self, merged: Merged) -> Awaitable[Answer]:
        answer = ApplyAnswer(tuple((p[0], p[1], e) for p, e in merged.fenced.items()),
                             tuple(merged.missing), tuple(merged.tombs))
        if merged.catalog:  # (not for the Decl every batch repeats)
            self.wake()
        return self._after(merged.batch, answer)

    def _names_cold(self, changes: Sequence[Change]) -> bool:
        """Whether ``changes`` touch a partition with messages (or tombstones) on disk."""
        parts = self.broker.parts
        last = None
        for c in changes:
            part = part_of(c)
            if part is None or part == last:
                continue
            last = part
            q = parts.get(part)
            if q is not None and (q.cold or q.tombs_on_disk):
                return True
        return False

    async def _apply_cold(self) -> None:
        """Merge the applies into partitions with messages on disk only, one at a time in
        the order they came: each pages in what it names first, in a worker thread
        (meshq.broker.replica.merge_async); applies behind one wait for it, so that
        merges stay in their order (a Step after its Put)."""
        async for pending in self._apply_out:
            try:
                pending.merged = await self.broker.replica.merge_async(
                    pending.changes, pending.epochs, pending.bounds)
            except MeshqError as exc:
                pending.error = exc
            except Exception as exc:  # (a read that failed: the sender tries again)
                log.exception("%s: an apply into cold messages", self.me)
                pending.error = Unavailable(f"reading what an apply names failed: {exc}")
            finally:
                self._applying -= 1
                pending.done.set()

    async def _apply_answer(self, pending: _Apply) -> Answer:
        await pending.done.wait()
        if pending.merged is None:
            raise pending.error or Unavailable("apply not merged")
        return await self._applied(pending.merged)

    async def _fetch(self, req: FetchReq) -> FetchAnswer:
        q = self.broker.replica.part(req.queue, req.index)
        if q is None:
            return FetchAnswer((), ())
        recs, tombs = await self.broker.replica.records(q, req.ids)
        return FetchAnswer(tuple(recs), tuple(tombs))

    async def _promised(self, q: Queue, ok: bool, promised: int, batch: Batch) -> Answer:
        """The answer to a promise, once ``batch`` (which holds it) is durable. Whether
        this node holds a copy is exact: tombstones in the store only (after a restart)
        are read back first, as a takeover reads a copy of tombstones alone."""
        await self.broker.backlog.warm_tombs(q)
        return await self._after(batch, PromiseAnswer(ok, promised, q.has_copy, q.bound))

    async def _after(self, batch: Batch, answer: Answer) -> Answer:
        """The answer, once what the request staged is durable here."""
        await durable(batch)
        if batch.ops and batch.error is not None:
            raise Unavailable(f"commit failed: {batch.error}")
        return answer

    async def _digest(self, req: DigestReq) -> DigestAnswer:
        if req.decl is not None:
            merged = self.broker.replica.merge([req.decl])
            await durable(merged.batch)
        q = self.broker.replica.part(req.queue, req.index)
        if q is None or len(req.sums) != BUCKETS:
            return DigestAnswer((), 0)
        sums = await digest(self.broker, q)
        found = await members(self.broker, q,
                              (b for b in range(BUCKETS) if sums[b] != req.sums[b]))
        diff = []
        for b in found.hot:
            await trio.lowlevel.checkpoint()  # (a bucket of a deep partition is long)
            hot, cold = found.now(self.broker, q, b)
            diff.append((b, tuple((m.id, message_key(m)) for m in (*hot, *cold))))
        # The epoch it promised, when another node's: a dispatcher of an earlier epoch
        # learns that it was taken over. Not its own: a takeover of its own that failed
        # (the others saw another primary) must not stop the primary they saw.
        foreign = q.promised if (q.promised & 0xFFFFFFFF) != self.node_int else 0
        return DigestAnswer(tuple(diff), foreign)

    async def _catalog(self, req: CatalogReq) -> CatalogAnswer:
        if req.entries is not None:
            merged = self.broker.replica.merge(list(req.entries))
            if merged.catalog:
                self.wake()
            await durable(merged.batch)
        entries = self.broker.replica.catalog_entries()
        mine = catalog_digest(entries)
        if mine == req.digest:
            return CatalogAnswer(mine, None)
        return CatalogAnswer(mine, tuple(c for e in entries for c in e.changes()))

    # -- the rounds --------------------------------------------------------------------
    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            self.placement.refresh()
            nursery.start_soon(self._gate_timer)
            nursery.start_soon(self._apply_cold)
            nursery.start_soon(self._rounds)
            task_status.started()

    def _spawn(self, key: Any, fn: Callable[..., Awaitable[Any]], *args: Any) -> None:
        if key in self._busy:
            return
        self._busy.add(key)
        assert self._nursery is not None
        self._nursery.start_soon(self._guarded, key, fn, *args)

    async def _guarded(self, key: Any, fn: Callable[..., Awaitable[Any]], *args: Any) -> None:
        try:
            await fn(*args)
        except (MeshqError, ValueError, TypeError, KeyError) as exc:
            log.info("%s: %s", key, exc)
        finally:
            self._busy.discard(key)
            self.wake()

    async def _rounds(self) -> None:
        next_full = 0.0
        while True:
            if self.placement.refresh():
                self._current.clear()  # new holders, or holders back: compare them all
                self.moves.placement_changed()
                self.changed.set()
                self.changed = trio.Event()
                self._release_dead_holders()
            others = self.placement.live - {self.me}
            self.broker.replicating = bool(others)
            if not others:
                self.catalog_ready.set()
            now = self._now()
            full = now >= next_full
            if full:
                next_full = now + ROUND
                self.rounds += 1
                self._forget_gone()
                for node in sorted(others):
                    self._spawn(("catalog", node), self._exchange_catalog, node)
            for q in list(self.broker.parts.values()):
                self._tend(q, full)
            with trio.move_on_at(next_full):
                await self._wake.wait()
            self._wake = trio.Event()

    def _full_compare(self, q: Queue) -> bool:
        """Whether this round compares every follower of ``q`` (dispatched here), even
        those replication kept current: FULL_EVERY rounds after the last time; and, on
        a partition of FULL_BUSY_MIN messages or more, only once a round goes by without
        a write to it, but at most FULL_BUSY_MAX rounds apart. On a quiet partition a
        current copy's digest equals ours, which costs O(buckets); under writes the
        batches in flight make most buckets differ, and listing the members of a bucket
        reads every message of it, on disk too (a small partition's are cheap)."""
        part = q.part
        since = self.rounds - self._compared.get(part, 0)
        if since < FULL_EVERY:
            return False
        if (self._written.get(part, -1) >= self.rounds - 1 and since < FULL_BUSY_MAX
                and len(q.messages) + q.cold >= FULL_BUSY_MIN):
            return False
        self._compared[part] = self.rounds
        return True

    def _forget_gone(self) -> None:
        """Drop what repair remembers of partitions whose queue is gone from here."""
        parts = {q.part for q in self.broker.parts.values()}
        for key in [k for k in self._misses if k[0] not in parts]:
            del self._misses[key]
        for part in [p for p in self._current if p not in parts]:
            del self._current[part]
        for book in (self._written, self._compared):
            for part in [p for p in book if p not in parts]:
                del book[part]
        self.moves.retain(parts)

    def _tend(self, q: Queue, full: bool) -> None:
        reps = self.replicas(q)
        part = q.part
        if reps.primary == self.me:
            if not q.active:
                self._spawn(("takeover", part), self._take_over, q)
                return
            self.moves.dispatching(part, q.epoch, reps.followers, self._now())
            if full:
                every = self._full_compare(q)
                for node in reps.followers:
                    if (every or node not in self._current.get(part, ())
                            or self.moves.waiting(part, node)):
                        self._spawn(("sync", part, node), self._sync, q, node)
            return
        self.moves.stopped(part)
        if q.active:
            self.broker.replica.deactivate(
                q, f"queue moved to node {reps.primary}; subscribe again")
            if self.me in reps.holders:  # (a former holder hands its copy off below)
                # What it wrote while dispatching goes to the new primary now: that node
                # may never have stopped dispatching in its own view (it only seemed dead
                # here), so it holds neither those writes nor the epoch that fences its
                # own, and takes the holders that took them for current until a full
                # round.
                self._spawn(("handback", part), self._hand_back, q)
        event = self._takeovers.pop(part, None)
        if event is not None:
            event.set()  # waiters route again
        if (full and q.has_copy and self.me not in reps.holders
                and reps.primary is not None):
            self._spawn(("handoff", part), self._hand_off, q, reps.primary)

    async def _take_over(self, q: Queue) -> None:
        reps = self.replicas(q)
        others = sorted(self.placement.live - {self.me})
        result = await take_over(self.peers, self.broker, q, reps, others, self.node_int)
        if result.higher:
            self.broker.replica.promise(q, result.higher)  # remember; next try goes above
        if result.ok:
            self.takeovers += 1
            self._merged({q.part})  # compare every copy at the next round
            # Holders that had a copy were read both ways; those with none got nothing,
            # which is all they lack only when there was nothing here either.
            read = set(result.read_from)
            if q.has_copy:
                read -= set(result.empty)
            self.moves.taken_over(q.part, result.epoch, reps.followers, read, self._now())
            log.info("%s: dispatching %s/%d at epoch %x (promised by %s, read %s)", self.me,
                     q.name, q.index, result.epoch, ", ".join(result.promised_by) or "-",
                     ", ".join(result.read_from) or "-")
            if self.replicas(q).primary != self.me:  # the view moved on meanwhile
                self.broker.replica.deactivate(q, "queue moved; subscribe again")
        else:
            log.info("%s: takeover of %s/%d failed: %s", self.me, q.name, q.index,
                     result.reason)
            # The next round tries again: views may be settling. Not in lockstep with
            # another node that tries too.
            await trio.sleep(0.2 + 0.4 * self._rng.random())
        event = self._takeovers.pop(q.part, None)
        if event is not None:
            event.set()

    async def _sync(self, q: Queue, node: str) -> None:
        before = (self._misses[q.part, node], self._misses[q.part, self.me])
        started = self._now()
        try:
            stats = await sync(self.peers, self.broker, q, node,
                               on_progress=functools.partial(self.moves.syncing, q.part, node))
        except BaseException:
            self.moves.syncing(q.part, node, "waiting")
            raise
        self.moves.synced(q.part, node, started)
        if (self._misses[q.part, node], self._misses[q.part, self.me]) == before:
            # Nothing failed to reach it, or came in. (Sends of ours it holds and we have
            # not confirmed yet were left alone: should one's batch fail, _complete puts
            # the holders back into the next round.)
            self._current.setdefault(q.part, set()).add(node)
        self.repaired["sent"] += stats.sent
        self.repaired["fetched"] += stats.fetched
        self.repaired["deleted"] += stats.deleted

    async def _hand_off(self, q: Queue, primary: str) -> None:
        """A copy this node should not hold (a stand-in's hints, or a partition whose
        replicas moved): push it to the primary, then forget it."""
        def progress(phase: str, done: int, total: int) -> None:
            self.moves.handing_off(q.part, primary, phase, self._now(), done,
                                   total if phase == "copying" else None)

        await self.broker.backlog.warm_tombs(q)  # (after a restart: there may be none)
        if not q.has_copy:
            return  # (nothing to hand off, and nothing to count as a move)
        dropped = False
        try:
            stats = await sync(self.peers, self.broker, q, primary, pull=False,
                               on_progress=progress)
            self.repaired["sent"] += stats.sent
            if not self.broker.live(q) or q.active or self.me in self.replicas(q).holders:
                return
            self.broker.replica.forget(q)
            self.repaired["handed_off"] += 1
            dropped = True
        finally:
            self.moves.handed_off(q.part, dropped)

    async def _exchange_catalog(self, node: str) -> None:
        entries = self.broker.replica.catalog_entries()
        mine = catalog_digest(entries)
        answer = await self.peers.call(node, CatalogReq(mine, None))
        if not isinstance(answer, CatalogAnswer):
            raise Unavailable(f"node {node!r} answered a catalog with {type(answer).__name__}")
        if answer.entries is not None:
            merged = self.broker.replica.merge(list(answer.entries))
            await durable(merged.batch)
            entries = self.broker.replica.catalog_entries()
            if catalog_digest(entries) != answer.digest:  # it lacks some of ours
                await self.peers.call(node, CatalogReq(
                    catalog_digest(entries), tuple(c for e in entries for c in e.changes())))
        self.catalog_ready.set()

    def _release_dead_holders(self) -> None:
        """Membership changed: leases of consumers whose node died or restarted end."""
        for q in self.broker.parts.values():
            if q.active and q.leased:
                self.broker.replica.release_leases(q)

    # -- status -------------------------------------------------------------------------
    def moves_here(self) -> MovesAnswer:
        """The moves this node makes, and what a rebalance status needs to trust it."""
        views = []
        for q in self.broker.parts.values():
            reps = self.replicas(q)
            views.append(PartView(q.part, reps.primary, reps.holders, q.active,
                                  len(q.messages) + q.cold, len(q.tombs)))
        return MovesAnswer(tuple(sorted(self.placement.live)), self.catalog_ready.is_set(),
                           self.moves.report(self.me, views, self._now()))

    async def rebalance(self) -> dict[str, Any]:
        """The ``rebalance`` status: every live node's moves, summed (a node that does
        not answer within MOVES_WAIT is listed as unreachable)."""
        answers: dict[str, MovesAnswer | None] = {self.me: self.moves_here()}

        async def ask(node: str) -> None:
            try:
                got = await self.peers.call(node, MovesReq(), MOVES_WAIT)
            except MeshqError as exc:
                log.debug("%s: moves of %s: %s", self.me, node, exc)
                got = None
            answers[node] = got if isinstance(got, MovesAnswer) else None

        async with trio.open_nursery() as nursery:
            for node in sorted(self.placement.live - {self.me}):
                answers[node] = None
                nursery.start_soon(ask, node)
        return summary(answers)

    def statistics(self) -> ClusterStatistics:
        hints = 0
        taking_over = []
        dispatching = 0
        for q in self.broker.parts.values():
            reps = self.replicas(q)
            if (q.messages or q.cold) and self.me not in reps.holders:
                hints += len(q.messages) + q.cold
            if reps.primary == self.me and not q.active:
                taking_over.append(q.name)
            dispatching += q.active
        open_links: list[str] = getattr(self.peers, "open_links", list)()
        return ClusterStatistics(
            hinted_messages=hints, taking_over=tuple(sorted(taking_over)),
            dispatching=dispatching, waiting_batches=len(self.gate),
            failed_quorums=self.gate.failed_quorums, fenced_batches=self.gate.fenced,
            takeovers=self.takeovers, repair_rounds=self.rounds,
            repaired=dict(self.repaired), links=tuple(open_links))


@dataclass(eq=False)
class _Apply:
    """An apply waiting for ``Cluster._apply_cold``."""

    changes: Sequence[Change]
    epochs: dict[PartKey, int]
    bounds: tuple[tuple[str, int, int], ...] = ()
    merged: Merged | None = None
    error: MeshqError | None = None
    done: trio.Event = field(default_factory=trio.Event)


def _is_hex(text: str) -> bool:
    try:
        int(text, 16)
    except ValueError:
        return False
    return True

