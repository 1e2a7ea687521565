"""The broker core: queue semantics of SPEC section 2 over a Store and a Clock.

State here: the catalog (every queue name this node knows, live or deleted, with its
incarnation), the queue partitions and their messages (in memory, mirrored durably by the
store), the HLC, the timer heap (delays, lease deadlines, TTLs) and dedup entries. Never:
a message visible to consumers before the batch that wrote it committed; a send, ack,
nack or declare confirmed before its batch committed; a message leased to two consumers
at once; a change to a message's progress without a new version (meshq.cluster.lattice).
Methods are synchronous and never block; those that write return a Pending.

The broker has single-node semantics. The cluster layer (meshq.cluster) decides which
partitions this node dispatches (``activate``/``deactivate``), ships the typed changes
each batch collects while ``replicating``, and merges other replicas' changes through the
replica surface in meshq.broker.replica.
"""

from __future__ import annotations

import dataclasses
import functools
import heapq
import itertools
import math
import random
import weakref
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import msgpack
import trio

from meshq.broker.backlog import Backlog
from meshq.broker.closed import closed_timestamp, renewed_bound
from meshq.broker.dedup import CONFIRMED, DedupIndex
from meshq.broker.partitions import (
    RECEIPT_SEP,
    RETRY_DEDUP,
    key_partition,
    parse_receipt,
    spread,
)
from meshq.broker.queue import Consumer, Queue, Session
from meshq.broker.replica import Moved, Replica, progress_of, record_of
from meshq.clock import Clock
from meshq.cluster.changes import Decl, Drop, Put, Step, Tally, Tomb
from meshq.cluster.lattice import (
    TOMBSTONE_WINDOW,
    Catalog,
    CatalogEntry,
    is_reserved,
    join_catalog,
)
from meshq.errors import BadRequest, NotFound, PreconditionFailed, TooLarge
from meshq.hlc import HLC, pack, physical_ms
from meshq.model import MAX_PARTITIONS, Message, QueueOptions, finite, message_id
from meshq.states import Event, State
from meshq.store import (
    OP_CATALOG_PRUNE,
    OP_DEDUP,
    OP_DEDUP_PRUNE,
    OP_DISCARD,
    OP_DROP_QUEUE,
    OP_META,
    OP_PARTITION,
    OP_PURGE_DELAYED,
    OP_PURGE_READY,
    OP_QUEUE,
    OP_TOMBSTONE_PRUNE,
    Batch,
    Snapshot,
    Store,
    bound_key,
)
from meshq.store.base import delete_op, put_op, update_op

__all__ = ["RECEIPT_SEP", "TOMBSTONE_WINDOW", "Broker", "BrokerLimits", "Moved", "Pending",
           "parse_receipt"]

_T_DUE, _T_LEASE, _T_TTL = 0, 1, 2
_consumer_tags = itertools.count(1)
DEDUP_PRUNE_INTERVAL = 60.0
EXPIRY_CHECK = 0.25  # s between checks for queues unused past their ``expires``
HLC_CEILING_MS = 200  # how far the persisted HLC ceiling runs ahead (< max_clock_offset)
HLC_REFRESH = pack(HLC_CEILING_MS // 2)  # renew the ceiling when this close to it
TICK_BUDGET = 2000  # timers handled per event-loop turn
TIMERS_SLACK = 4096  # timers past twice those live at the last compaction, before the next
LATE_HAND_OVER = 0.25  # s: a lease taken at send time and handed over later runs from then


class Pending:
    """The result of a write: known now, valid once ``batch`` is durable (and ``also``, an
    earlier batch the result depends on: a dedup hit on a send not yet committed)."""

    __slots__ = ("also", "batch", "result")

    def __init__(self, batch: Batch | None, result: Any, also: Batch | None = None) -> None:
        self.batch = batch
        self.result = result
        self.also = also

    def then(self, fn: Callable[[Any, BaseException | None], None]) -> None:
        """Call ``fn(result, error)`` once durable (now, if nothing had to be written)."""
        if self.batch is None:
            fn(self.result, None)
        elif self.also is None:
            self.batch.add_callback(functools.partial(fn, self.result))
        else:  # batches complete in order, so ``also`` is done when ``batch`` is
            also = self.also
            self.batch.add_callback(lambda err: fn(self.result, err or also.error))

    async def wait(self) -> Any:
        if self.batch is not None:
            await self.batch.wait()
            if self.also is not None:
                await self.also.wait()
        else:
            await trio.lowlevel.checkpoint()
        return self.result


@dataclass(frozen=True)
class BrokerLimits:
    max_message_bytes: int = 1024 * 1024
    dedup_window: float = 300.0
    max_batch: int = 10_000


def _number(value: Any, name: str, *, minimum: float = 0.0) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not finite(value):
        raise BadRequest(f"{name!r} must be a number, not {value!r}")
    if value < minimum:
        raise BadRequest(f"{name!r} must be >= {minimum}, not {value!r}")
    return float(value)


# A parsed message: body, headers, ttl, delay, dedup id, partition key.
_Parsed = tuple[bytes, dict[str, Any], Any, Any, Any, Any]
_MESSAGE_FIELDS = frozenset(("body", "headers", "ttl", "delay", "dedup_id", "partition_key"))


class Broker:
    def __init__(self, store: Store, clock: Clock, *, node_id: str,
                 limits: BrokerLimits | None = None, max_clock_offset_ms: int = 500,
                 rng: random.Random | None = None, holder: str | None = None) -> None:
        self.store = store
        self.clock = clock
        self.node_id = node_id
        self.limits = limits or BrokerLimits()
        self.hlc = HLC(max_offset_ms=max_clock_offset_ms)
        self.rng = rng or random.Random()
        # Who this process's consumers are, in lease records: "node/boot" (meshq.cluster
        # sets it from the node's name and boot id).
        self.holder = holder or f"{node_id}/{self.rng.getrandbits(32):08x}"
        self.catalog = Catalog()
        # (exchange, routing key, headers) -> queue names, for dead-letter exchanges; set
        # by the AMQP layer (meshq.amqp.server), which owns exchanges
        self.route_dead_letter: Callable[[str, str, dict[str, Any]], list[str]] | None = None
        self.on_queue_deleted: Callable[[str], None] | None = None
        # Live queues: by name, their partitions in index order; by (name, index), each.
        self.queues: dict[str, tuple[Queue, ...]] = {}
        self.parts: dict[tuple[str, int], Queue] = {}
        self._turn: dict[str, int] = {}  # per queue, the round-robin of unkeyed sends
        # The number of partitions a queue gets when its declare does not say (the cluster
        # layer sets it from the config and the cluster's size).
        self.default_partitions: Callable[[QueueOptions], int] = lambda options: 1
        self._seq = 1
        # (when, order, kind, the message): by weak reference, so that an acked message's
        # lease timer, stale in the heap until its deadline, does not keep it alive
        self._timers: list[tuple[float, int, int, weakref.ref[Message]]] = []
        self._timers_compact_at = TIMERS_SLACK
        self._timer_ids = itertools.count()
        self._timer_scope: trio.CancelScope | None = None
        self._timer_at = math.inf
        self._dedup = DedupIndex(store.read_dedup if store.pages else None,
                                 self.limits.dedup_window, clock.time)
        self._next_prune = 0.0
        self._next_expiry = 0.0  # the next check of unused queues (inf: none expires)
        self._pruned = False
        self._hlc_batch: Batch | None = None  # the batch holding the last ceiling staged
        self._hlc_ceiling = 0  # that ceiling
        self._hlc_durable = 0  # the highest ceiling committed
        # Messages this node staged (sent, dead-lettered) whose batch has not completed:
        # not visible yet, but already on the holders that applied it. A merge must not
        # bring them in as a second copy (anti-entropy sees them on a holder first).
        self.in_flight: dict[str, Message] = {}
        self._sends_batch: Batch | None = None
        self._sends: list[tuple[Queue, list[Message], list[str | None]]] = []
        self.redeliveries = 0
        # Since start, per queue: "published", "delivered", "redelivered" (delivered with
        # delivery_count > 1) and "acked" on the node that dispatches it (meshq.metrics).
        self.totals: defaultdict[str, Counter[str]] = defaultdict(Counter)
        # Set by the cluster layer: typed changes then go with each batch (_put, ...).
        self.replicating = False
        # Tests and the simulation: each digest checks its kept sums against a walk of the
        # messages (meshq.cluster.repair.digest), which costs what the sums save.
        self.check_digests = False
        # Without a cluster layer every partition dispatches here; with one, only those
        # it activates (and a new queue's, through ``on_declare``).
        self.dispatch_by_default = True
        self.on_declare: Callable[[Queue], None] | None = None
        self.on_catalog: Callable[[str], None] | None = None  # a queue appeared or went
        # Whether a lease may go to its consumer before its commit: only where this node
        # alone holds the partition and confirms its writes (set by the cluster layer).
        self.hand_over_early: Callable[[Queue], bool] = lambda q: True
        # Whether this node is the first of a partition's preference list (the cluster
        # layer says; a lone broker is everything's).
        self.preferred_here: Callable[[Queue], bool] = lambda q: True
        # bumped when the placement changes (what preferred_here says may change with it)
        self.placement_gen: Callable[[], int] = lambda: 0
        # queue name -> (its partitions, placement generation, the indexes preferred here)
        self._preferred: dict[str, tuple[tuple[Queue, ...], int, list[int]]] = {}
        self._soon: list[tuple[Consumer, list[Message], list[int]]] = []
        self._soon_ready = trio.Event()
        self._flushing = False
        self.tag_prefix = ""  # consumer tags start with it (the daemon: its node name)
        self.replica = Replica(self)  # the surface the cluster layer uses
        self.backlog = Backlog(self)  # READY messages left on disk (meshq.broker.backlog)

    # -- start-up ----------------------------------------------------------------------
    def restore(self, snap: Snapshot) -> None:
        """Rebuild memory from what the store holds. Leases stay recorded until their
        deadline; those of this node's own consumers (a previous process's connections,
        gone now) are released when the partition is activated."""
        now = self.clock.time()
        high = self._hlc_durable = int(snap.meta.get("hlc", 0) or 0)  # a ceiling
        for name, inc, options, dropped, dropped_at in snap.catalog:
            entry = CatalogEntry(name, inc, options or {}, dropped, dropped_at)
            self.catalog[name] = entry
            high = max(high, inc, dropped)
            if entry.live and not is_reserved(name):
                for fresh in self._make_queue(name, QueueOptions.from_dict(entry.options),
                                              inc):
                    fresh.active = False
        for name, idx, promised, tally in snap.partitions:
            q = self.parts.get((name, idx))
            if q is not None:
                q.promised = promised
                q.tally = {node: (int(v[0]), int(v[1]), int(v[2])) for node, v in tally.items()}
        self._seq = max(self._seq, snap.max_seq + 1)
        high = max(high, snap.max_hlc)
        for msg in snap.messages:
            self._seq = max(self._seq, msg.seq + 1)
            high = max(high, msg.hlc)
            home = self.parts.get((msg.queue, msg.index))
            if home is None or self.catalog[msg.queue].absorbs(msg.inc):
                continue
            home.add(msg)
        if snap.tombs_on_disk:  # (read back where replication compares or merges)
            for q in self.parts.values():
                q.tombs_on_disk = True
        for part, (count, after) in snap.cold.items():
            home = self.parts.get(part)
            if home is not None:
                self.backlog.restore(home, count, after, snap.max_hlc)
        for part, (count, late_after) in snap.late.items():
            home = self.parts.get(part)
            if home is not None:
                self.backlog.restore_late(home, count, late_after)
        for queue, idx, mid, at in sorted(snap.tombstones, key=lambda t: t[3]):
            home = self.parts.get((queue, idx))
            if home is not None:
                home.tombs[mid] = at
        self._dedup.restore(snap.dedup, now, on_disk=snap.dedup_on_disk,
                            filters=snap.dedup_filters)
        for q in self.parts.values():
            q.bound = int(snap.meta.get(bound_key(q.name, q.index), 0) or 0)
        self.hlc.restore(high)
        if self.dispatch_by_default:
            for q in self.parts.values():
                self.replica.activate(q, q.promised)

    def dedup_filters(self) -> bytes | None:
        """The dedup filters to save at a clean stop, once nothing more is written (the
        store's ``save_dedup_filters``); None if they are not complete yet."""
        return self._dedup.dump(self.clock.time())

    # -- the timer loop ------------------------------------------------------------------
    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Fire delays, lease deadlines, TTLs and dedup pruning, and hand over what
        ``_deliver_soon`` queued, forever."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._hand_overs)
            nursery.start_soon(self.backlog.run)
            nursery.start_soon(self._dedup.load, self.store, self.clock)
            task_status.started()
            await self._timers_loop()

    async def _hand_overs(self) -> None:
        while True:
            await self._soon_ready.wait()
            self._soon_ready = trio.Event()
            self.flush_hand_overs()

    def flush_hand_overs(self) -> None:
        """Hand over what ``_deliver_soon`` queued. The client session calls it as soon as
        an operation has returned; a task does it otherwise, on the next turn. Not from
        within itself: what a consumer's sink queues (its own nack, say) waits for the
        next turn, so a sink that requeues at once neither recurses nor spins."""
        if self._flushing or not self._soon:
            return
        self._flushing = True
        try:
            soon, self._soon = self._soon, []
            for c, msgs, leases in soon:
                self._deliver(c, msgs, leases, None)
        finally:
            self._flushing = False

    async def _timers_loop(self) -> None:
        while True:
            now = self.clock.time()
            if self.tick(now):  # more is due: let the event loop breathe, then go on
                await trio.lowlevel.checkpoint()
                continue
            at = min(self._timers[0][0] if self._timers else math.inf, self._next_prune,
                     self._next_expiry, self.backlog.next_late())
            with trio.CancelScope() as scope:
                self._timer_scope, self._timer_at = scope, at
                await self.clock.sleep_until(at)
            self._timer_scope, self._timer_at = None, math.inf

    def _wake_timers(self) -> None:
        """Something new is due, maybe before the timers' loop wakes: it looks again."""
        if self._timer_scope is not None:
            self._timer_scope.cancel()

    def _add_timer(self, when: float, kind: int, msg: Message) -> None:
        timers = self._timers
        heapq.heappush(timers, (when, next(self._timer_ids), kind, weakref.ref(msg)))
        if len(timers) > self._timers_compact_at:
            self._compact_timers()
        if when < self._timer_at and self._timer_scope is not None:
            self._timer_scope.cancel()

    def _schedule_message(self, msg: Message) -> None:
        if msg.state == State.DELAYED:
            self._add_timer(msg.ready_at, _T_DUE, msg)
        if msg.expires_at is not None:
            self._add_timer(msg.expires_at, _T_TTL, msg)

    def _compact_timers(self) -> None:
        """Drop the timers of messages gone from memory, in place (``tick`` may be
        walking the heap). An acked message's lease timer would otherwise stay until
        due: at 40,000 acks a second and a 30 s visibility timeout, over a million
        entries. The next compaction waits until the heap doubles: O(1) a timer."""
        timers = self._timers
        timers[:] = [t for t in timers if t[3]() is not None]
        heapq.heapify(timers)
        self._timers_compact_at = 2 * len(timers) + TIMERS_SLACK

    def tick(self, now: float, budget: int = TICK_BUDGET) -> bool:
        """Handle timers due at ``now``, at most ``budget`` of them (most are stale: a
        lease timer stays in the heap after its ack). True when more are due."""
        timers = self._timers
        touched: dict[Queue, None] = {}  # (a dict: deterministic order)
        while timers and timers[0][0] <= now:
            budget -= 1
            if budget < 0:
                break
            when, _, kind, ref = heapq.heappop(timers)
            msg = ref()
            if msg is None:
                continue  # (acked, and let go)
            q = self.parts.get((msg.queue, msg.index))
            if q is None or not q.active or q.messages.get(msg.id) is not msg:
                continue  # (activate() schedules an inactive partition's timers again)
            if kind == _T_DUE and msg.state == State.DELAYED and msg.ready_at == when:
                self._become_ready(q, msg, now)
                touched[q] = None
            elif kind == _T_LEASE and msg.state == State.LEASED and msg.lease_deadline == when:
                self.redeliveries += 1
                self._end_lease(q, msg, now, Event.REQUEUE)
                touched[q] = None
            elif kind == _T_TTL and msg.state in (State.READY, State.DELAYED):
                self._dead_letter(q, msg, "expired", now)
                q.compact()  # its ready-heap entry is stale now
                touched[q] = None  # (its watchers may see it run dry)
        if now >= self.backlog.next_late():
            self.backlog.late_due(now)
        if now >= self._next_prune:
            self._prune(now)
        if now >= self._next_expiry:
            self._expire_unused(now)
        for q in touched:
            self._dispatch(q, now)
        return budget < 0

    def _expire_unused(self, now: float) -> None:
        """Delete the queues dispatched here that went unused for their ``expires`` (no
        consumer, no receive, no declare), as RabbitMQ's x-expires; checked every
        EXPIRY_CHECK s while some queue has the option. A queue newly dispatched here
        counts from then."""
        self._next_expiry = math.inf
        for q in list(self.parts.values()):  # (a queue with ``expires`` has one partition)
            if self.parts.get(q.part) is not q:
                continue  # deleted in this very loop
            limit = q.options.expires
            if limit is None:
                continue
            self._next_expiry = now + EXPIRY_CHECK
            if not q.active:
                continue
            if not q.last_used or any(c.replenish for c in q.consumers):
                q.last_used = now
            elif now - q.last_used >= limit:
                self.delete_queue(q.name)

    def used(self, q: Queue) -> None:
        """``q`` was declared, received from or consumed: its ``expires`` starts again."""
        if q.options.expires is None:
            return
        q.last_used = self.clock.time()
        if self._next_expiry == math.inf:
            self._next_expiry = q.last_used + EXPIRY_CHECK
            if self._timer_scope is not None and self._next_expiry < self._timer_at:
                self._timer_scope.cancel()

    def _prune(self, now: float) -> None:
        """Dedup entries past their window; tombstones and deleted queues past theirs."""
        self._next_prune = now + DEDUP_PRUNE_INTERVAL
        if self._dedup.prune(now):
            self.store.stage((OP_DEDUP_PRUNE, (now,)))  # (entries no longer in memory too)
        if not self._pruned:  # (not at start-up: nothing is that old yet)
            self._pruned = True
            return
        before = now - TOMBSTONE_WINDOW
        for q in self.parts.values():
            tombs = q.tombs
            while tombs:
                mid, at = next(iter(tombs.items()))
                if at >= before:
                    break
                del tombs[mid]
        self.store.stage((OP_TOMBSTONE_PRUNE, (before,)))
        gone = [n for n, e in self.catalog.items() if not e.live and e.dropped_at < before]
        for name in gone:
            del self.catalog[name]
        if gone:
            self.store.stage((OP_CATALOG_PRUNE, (before,)))

    # -- helpers -------------------------------------------------------------------------
    def queue(self, name: Any) -> tuple[Queue, ...]:
        """The partitions of the queue called ``name``; NotFound (or BadRequest for a
        non-string) if none."""
        if not isinstance(name, str):
            raise BadRequest(f"queue name must be a string, not {type(name).__name__}")
        qs = self.queues.get(name)
        if qs is None:
            raise NotFound(f"queue {name!r} does not exist")
        return qs

    def _chosen(self, qs: tuple[Queue, ...], indexes: Any) -> tuple[Queue, ...]:
        """The partitions ``indexes`` names (None: those dispatched here, or all of them
        where none is: they say they moved)."""
        if indexes is None:
            return tuple(q for q in qs if q.active) or qs
        if (not isinstance(indexes, list | tuple) or not indexes
                or not all(type(i) is int and 0 <= i < len(qs) for i in indexes)):
            raise BadRequest(f"'partitions' must be a non-empty list of partition indexes "
                             f"below {len(qs)}")
        return tuple(qs[i] for i in sorted(set(indexes)))

    def _make_queue(self, name: str, options: QueueOptions, inc: int) -> tuple[Queue, ...]:
        """A queue's partitions, new, indexed (replacing any of an older incarnation)."""
        for q in self.queues.pop(name, ()):
            self.parts.pop(q.part, None)
        qs = tuple(Queue(name, options, inc, i) for i in range(options.partition_count))
        self.queues[name] = qs
        for q in qs:
            self.parts[q.part] = q
        return qs

    def live(self, q: Queue) -> bool:
        """Whether ``q`` is still a partition of a live queue (not deleted since)."""
        return self.parts.get(q.part) is q

    def _stamp(self, now: float) -> int:
        """A new HLC timestamp, below a durable ceiling (CockroachDB's persisted upper
        bound): a timestamp is handed out only under a ceiling already committed or
        committing in the same batch, so a restart, which starts above the ceiling, never
        repeats one. Ceilings run HLC_CEILING_MS ahead, so few commits carry one."""
        ts = self.hlc.now(int(now * 1000))
        if ts < self._hlc_durable - HLC_REFRESH:
            return ts
        batch = self.store.current_batch()
        if batch is not self._hlc_batch or ts >= self._hlc_ceiling:
            ceiling = pack(physical_ms(ts) + HLC_CEILING_MS)
            self._hlc_batch, self._hlc_ceiling = batch, ceiling
            self.store.stage((OP_META, ("hlc", ceiling)))
            batch.add_callback(functools.partial(self._ceiling_committed, ceiling))
        return ts

    def closed_of(self, q: Queue, pending: list[int], *, ready: bool = True) -> int:
        """Partition ``q``'s closed timestamp for a consumer of it whose leases not yet
        handed over have the HLCs ``pending`` (meshq.broker.closed); not ``ready``: above
        its ready messages too. It takes a stamp, so it moves on with the clock, and
        stays under the durable HLC ceiling, renewing it (with one commit under way at
        most: it is asked for far more often than messages are sent). Replicated, it
        also stays under the partition's closed bound that a write quorum confirmed at
        this dispatcher's epoch (``q.bound_ok``), renewing that the same way: a takeover
        reads the bound from a quorum and stamps above it, so what this dispatcher closed
        is never stamped under by the next one, however its clock stands, nor while this
        one, deposed without knowing it yet, goes on answering."""
        now = self.clock.time()
        ts = self.hlc.now(int(now * 1000))
        if ts >= self._hlc_durable - HLC_REFRESH and (self._hlc_batch is None
                                                      or self._hlc_batch.done):
            ts = self._stamp(now)
        first = next(iter(self.in_flight.values()), None)  # (stamped in order: the oldest)
        oldest = None if first is None else first.hlc
        floor = self.ready_floor(q) if ready else None
        closed = closed_timestamp(ts, self._hlc_durable, oldest, floor, pending)
        if not self.replicating:
            return closed
        if closed >= q.bound_ok - HLC_REFRESH and (q.bound_batch is None
                                                   or q.bound_batch.done):
            # (at or below the ready head, so that a takeover leaves a backlog's stamps
            # alone; a fifo receive's look past the ready messages runs ahead of them)
            bound = renewed_bound(closed, HLC_CEILING_MS, (floor, oldest) if ready else ())
            if bound > q.bound_ok:
                self._raise_bound(q, bound)
        return min(closed, q.bound_ok)

    def _raise_bound(self, q: Queue, bound: int) -> None:
        """Stage ``q``'s closed bound ``bound``: replicated to its holders with the open
        batch (fenced by this dispatcher's epoch), kept here in the meta table; once the
        batch is confirmed, this dispatcher closes up to it."""
        batch = self._stage_bound(q, bound)
        q.bound_batch = batch
        batch.add_callback(functools.partial(self._bound_confirmed, q, q.epoch, bound))

    def _stage_bound(self, q: Queue, bound: int) -> Batch:
        """``q``'s closed bound is at least ``bound``, here and, with the open batch (which
        it returns), on the holders that confirm it."""
        batch = self.store.current_batch()
        if batch.bounds.get(q.part, 0) < bound:
            batch.bounds[q.part] = bound
        batch.epochs.setdefault(q.part, q.epoch)
        self.keep_bound(q, bound)
        return batch

    def keep_bound(self, q: Queue, bound: int) -> None:
        """``q``'s closed bound is at least ``bound`` (staged in the meta table)."""
        if bound > q.bound:
            q.bound = bound
            self.store.stage((OP_META, (bound_key(q.name, q.index), bound)))

    def _bound_confirmed(self, q: Queue, epoch: int, bound: int,
                         error: BaseException | None) -> None:
        if error is None and q.active and q.epoch == epoch:
            q.bound_ok = max(q.bound_ok, bound)

    def restamp(self, q: Queue, msg: Message, now: float) -> None:
        """Give a READY message never delivered a new stamp (fifo: it came below what was
        closed; its id stays, so a client's confirmation or retry of it still holds). Not
        replicated: the next dispatcher decides again, by its own bound."""
        msg.hlc = self._stamp(now)
        q.push_ready(msg)  # (its old heap entry goes stale)
        self.store.stage(put_op(msg))

    def ready_floor(self, q: Queue) -> int | None:
        """An HLC at or below every READY message of ``q``, in memory or on disk only
        (``cold``: all after ``cold_after``); None when none is READY."""
        head = q.head_ready()
        low = None if head is None else head.hlc
        if q.cold and (low is None or q.cold_after[0] < low):
            low = q.cold_after[0]
        return low

    def _ceiling_committed(self, ceiling: int, error: BaseException | None) -> None:
        if error is None:
            self._hlc_durable = max(self._hlc_durable, ceiling)

    def _lease_id(self) -> int:
        return self.rng.getrandbits(32) | 1

    # Every change goes through these, which also add the typed change to the batch when
    # the cluster layer replicates (its epoch fences the partition's changes).
    def _emit(self, batch: Batch, q: Queue | None, change: Any) -> None:
        batch.changes.append(change)
        if q is not None and q.active:
            batch.epochs.setdefault(q.part, q.epoch)

    def _stage_catalog(self, name: str) -> Batch:
        e = self.catalog[name]
        batch = self.store.stage((OP_QUEUE, (name, e.inc, msgpack.packb(
            e.options, use_bin_type=True), e.dropped, e.dropped_at)))
        if self.replicating:
            for change in e.changes():
                self._emit(batch, None, change)
        return batch

    def _stage_partition(self, q: Queue) -> Batch:
        return self.store.stage((OP_PARTITION, (q.name, q.index, q.promised, msgpack.packb(
            {node: list(v) for node, v in q.tally.items()}, use_bin_type=True))))

    def _count(self, q: Queue, dead_lettered: int = 0, expired: int = 0,
               dropped: int = 0) -> None:
        old = q.tally.get(self.node_id, (0, 0, 0))
        new = (old[0] + dead_lettered, old[1] + expired, old[2] + dropped)
        q.tally[self.node_id] = new
        batch = self._stage_partition(q)
        if self.replicating:
            self._emit(batch, q, Tally(q.name, q.index, self.node_id, *new))

    def _put(self, q: Queue, msg: Message, dedup: tuple[str, float] | None = None) -> Batch:
        """Stage a message (``dedup``: its dedup id and when that entry expires, which
        replicate with it; the entry itself is the caller's to stage)."""
        op = put_op(msg)
        batch = self.store.stage(op)
        batch.body_bytes += len(msg.body)
        if self.replicating:
            rec = record_of(msg, op[1][8])
            self._emit(batch, q, Put(rec) if dedup is None else Put(rec, *dedup))
        return batch

    def _progress(self, q: Queue, msg: Message) -> None:
        """The message's progress moved: a new version, staged and replicated."""
        if msg.epoch == q.epoch:
            msg.vn += 1
        else:
            msg.epoch, msg.vn = q.epoch, 1
        q.changed(msg)
        batch = self.store.stage(update_op(msg))
        if self.replicating:
            self._emit(batch, q, Step(q.name, q.index, msg.id, progress_of(msg)))

    def _delete(self, q: Queue, msg: Message, now: float) -> None:
        """The message leaves the partition for good: a tombstone."""
        q.tombs[msg.id] = now
        if len(q.tombs) > self.backlog.tombs_kept:
            self.backlog.trim_tombs(q)
        batch = self.store.stage(delete_op(msg, now))
        if self.replicating:
            self._emit(batch, q, Tomb(q.name, q.index, msg.id, now))

    def _become_ready(self, q: Queue, msg: Message, now: float) -> None:
        q.move(msg, Event.DUE)
        if msg.expires_at is not None and msg.expires_at <= now:
            self._dead_letter(q, msg, "expired", now)
        else:
            q.push_ready(msg)
            self._progress(q, msg)

    def _detach(self, msg: Message) -> None:
        c: Consumer | None = msg.owner
        if c is not None:
            msg.owner = None
            c.session.leases.pop(msg, None)
            if c.replenish:
                c.credit += 1

    def _end_lease(self, q: Queue, msg: Message, now: float, event: Event,
                   delay: float = 0.0) -> None:
        """Back to ready (or delayed), or on to the DLQ past max_deliveries."""
        self._detach(msg)
        msg.lease_deadline, msg.lease_id, msg.holder = None, 0, ""
        limit = q.options.max_deliveries
        if limit is not None and msg.delivery_count >= limit:
            self._dead_letter(q, msg, "max_deliveries", now)
            return
        if event == Event.REQUEUE_LATER:
            q.move(msg, Event.REQUEUE_LATER)
            msg.ready_at = now + delay
            self._add_timer(msg.ready_at, _T_DUE, msg)
        elif msg.expires_at is not None and msg.expires_at <= now:
            self._dead_letter(q, msg, "expired", now)
            return
        else:
            q.move(msg, Event.REQUEUE)
            q.push_ready(msg)
        self._progress(q, msg)

    def _dead_letter(self, q: Queue, msg: Message, reason: str, now: float) -> None:
        """Move a message to the queue's DLQ (or the queues its dead-letter exchange routes
        it to: a copy each, the first keeping its id), or drop it (counted) when there is
        none."""
        self._detach(msg)
        death = {"queue": q.name, "reason": reason, "delivery_count": msg.delivery_count,
                 "time": now}
        dlqs = self._dead_letter_queues(q, msg, death)
        q.move(msg, Event.DEAD_LETTER if dlqs else Event.DROP)
        q.remove(msg)
        self._count(q, dead_lettered=1, expired=1 if reason == "expired" else 0,
                    dropped=0 if dlqs else 1)
        self._delete(q, msg, now)
        for i, dlq in enumerate(dlqs):
            self._ensure_created(dlq)
            headers = dict(msg.headers)
            headers["x-death"] = death
            hlc = self._stamp(now)
            # It keeps its id, unless it has been in that queue before (a dead-letter cycle:
            # the id is a tombstone there, which would absorb it) or is a second copy; or
            # may have been (tombstones or messages there on disk only, not looked up).
            fresh = (i > 0 or msg.id in dlq.tombs or msg.id in dlq.messages
                     or dlq.tombs_on_disk or dlq.cold > 0)
            moved = Message(self._next_seq(), message_id(hlc, self.node_id) if fresh else msg.id,
                            dlq.name, msg.body, headers, hlc, self.node_id, index=dlq.index,
                            inc=dlq.inc, epoch=dlq.epoch, vn=1)
            if dlq.options.message_ttl is not None:
                moved.expires_at = now + dlq.options.message_ttl
            batch = self._put(dlq, moved)
            self.in_flight[moved.id] = moved
            batch.add_callback(functools.partial(self._committed, dlq, [moved], batch))

    def _dead_letter_queues(self, q: Queue, msg: Message, death: dict[str, Any]
                            ) -> list[Queue]:
        """Where a dead letter of ``q`` goes: its ``dead_letter_queue``, or what its
        ``dead_letter_exchange`` routes it to (``route_dead_letter``, set by the AMQP
        layer; ``q`` itself excluded), with that exchange and key noted in ``death``."""
        o = q.options
        if o.dead_letter_queue is not None:
            dlq = self._partition_for(o.dead_letter_queue, msg.id)
            return [dlq] if dlq is not None else []
        if o.dead_letter_exchange is None or self.route_dead_letter is None:
            return []
        key = o.dead_letter_routing_key
        if key is None:  # the message's own routing key, as RabbitMQ
            kept = msg.headers.get("x-amqp")
            key = str(kept[1]) if isinstance(kept, list) and len(kept) == 3 else q.name
        death["exchange"], death["routing_key"] = o.dead_letter_exchange, key
        names = self.route_dead_letter(o.dead_letter_exchange, key, msg.headers)
        out = [self._partition_for(n, msg.id) for n in names if n != q.name]
        return [dlq for dlq in out if dlq is not None]

    def _partition_for(self, name: str, key: str) -> Queue | None:
        """The partition of queue ``name`` a message that is not sent (a dead letter) goes
        to: one dispatched here, in turn, else the one its key maps to."""
        qs = self.queues.get(name)
        if qs is None:
            return None
        if len(qs) == 1:
            return qs[0]
        if any(q.active for q in qs):
            return self._next_partition(qs)
        return qs[key_partition(key, len(qs))]

    def _next_seq(self) -> int:
        seq = self._seq
        self._seq += 1
        return seq

    def _committed(self, q: Queue, msgs: list[Message], batch: Batch,
                   error: BaseException | None) -> None:
        """Messages whose put committed become visible (unless their queue went away);
        those leased at send time go to their consumer now. A put durable here whose
        write quorum failed is visible too (the client heard "outcome unknown"), but a
        lease taken at send time is not handed over unconfirmed; on a fifo queue it is
        taken back instead (``_taken_back``)."""
        # (those leased at send time were put LEASED: one whose lease is undone below has
        # a row behind until its update commits, and so stays in memory, not cold)
        at_send = {msg.id for msg in msgs if msg.owner is not None}
        for msg in msgs:
            if self.in_flight.get(msg.id) is msg:
                del self.in_flight[msg.id]
        taken_back = _taken_back(q, batch, error)
        if taken_back and batch.local_ok:
            for msg in msgs:
                self.store.stage((OP_DISCARD, (msg.seq,)))
        if any(m.early for m in msgs):
            msgs = self._settle_early(q, msgs, taken_back)
        if error is not None and not taken_back:
            for msg in msgs:
                if msg.owner is not None:
                    self._unreserve(msg)
                    msg.state, msg.delivery_count = State.READY, 0
                    msg.lease_deadline, msg.lease_id, msg.holder = None, 0, ""
                    self._progress(q, msg)
            error = None
        if error is not None or self.parts.get(q.part) is not q:
            for msg in msgs:
                if msg.owner is not None:
                    self._unreserve(msg)
            if self.parts.get(q.part) is q:  # the refunded credit may take a ready one
                self._dispatch(q, self.clock.time())
            return
        now = self.clock.time()
        out: dict[Consumer, list[Message]] = {}
        pageable = self.backlog.pageable(q)
        for msg in msgs:
            c = msg.owner
            if msg.id in q.messages or msg.id in q.tombs:  # a twin (dedup race, a merge)
                if c is not None:
                    self._unreserve(msg)
                continue
            if c is not None:
                c.pending -= 1
                if c.session.closed or c.cancelled:  # gone before it could be handed over
                    msg.owner, msg.lease_deadline, msg.lease_id, msg.holder = None, None, 0, ""
                    msg.state, msg.delivery_count = State.READY, 0
                    self._progress(q, msg)
                else:
                    self._renew_if_late(q, msg, c, now)
                    c.session.leases[msg] = None
                    self._add_timer(msg.lease_deadline, _T_LEASE, msg)  # type: ignore[arg-type]
                    out.setdefault(c, []).append(msg)
            if msg.id in at_send or not self.backlog.stays_cold(q, msg, pageable):
                q.add(msg)
                if q.active:
                    self._schedule_message(msg)
        for c, leased in out.items():
            self._hand_over(c, leased)
        if q.counts[State.DELAYED] > q.late:
            self.backlog.trim_late(q)
        self._page_came(q, now)

    def _page_came(self, q: Queue, now: float | None = None) -> None:
        """Messages became ready in ``q`` (committed, or paged in from disk): the oldest
        go past ``max_length``, then consumers get the rest."""
        now = self.clock.time() if now is None else now
        limit = q.options.max_length
        if limit is not None and q.options.partition_count > 1:  # its share of the bound
            limit = -(-limit // q.options.partition_count)
        while limit is not None and q.ready > limit and q.active:
            head = q.pop_ready()
            if head is None or self.backlog.behind_cold(q, head):
                self.backlog.want(q, behind=True)  # (the oldest are on disk: paged in,
                break  # then dropped)
            self._dead_letter(q, head, "maxlen", now)
        self._dispatch(q, now)

    def _settle_early(self, q: Queue, msgs: list[Message], lost: bool) -> list[Message]:
        """The commit of messages handed over early completed: the rest of ``msgs``, for
        the usual path. ``lost``: not written here, so those still indexed go (an ack
        of them then fails: the message never existed)."""
        rest = []
        for msg in msgs:
            if not msg.early:
                rest.append(msg)
                continue
            msg.early = False
            if lost and q.messages.get(msg.id) is msg:
                self._detach(msg)
                msg.lease_deadline, msg.lease_id, msg.holder = None, 0, ""
                q.set_state(msg, State.DROPPED)  # (a ready-heap entry of it goes stale)
                q.remove(msg)
                q.compact()
        return rest

    def _lease(self, q: Queue, msg: Message, c: Consumer, now: float) -> None:
        msg.delivery_count += 1
        vt = c.visibility_timeout or q.options.visibility_timeout
        msg.lease_deadline = now + vt
        msg.lease_id = self._lease_id()
        msg.holder = c.session.holder or self.holder
        msg.owner = c
        if msg.hlc >= q.bound and self.replicating and q.options.ordering == "fifo":
            # (with the lease: a takeover stamps above what was delivered, and stamps
            # again what is not delivered yet below it: see Replica.activate)
            self._stage_bound(q, msg.hlc + 1)
        if c.siblings is None:
            c.credit -= 1
        else:
            for each in c.siblings:
                each.credit -= 1

    def _dispatch(self, q: Queue, now: float) -> None:
        """Lease ready messages to consumers with credit, round-robin; then tell the
        consumers that watch the partition's ready count (meshq.server.steal)."""
        self._lease_ready(q, now)
        for c in q.consumers:
            if c.watch is not None:
                c.watch(q)

    def _lease_ready(self, q: Queue, now: float) -> None:
        if not q.consumers or not q.ready or not q.active:
            return
        out: dict[Consumer, list[Message]] = {}
        while q.ready:
            c = q.next_consumer()
            if c is None:
                break
            msg = q.pop_ready()
            if msg is None:
                break
            if q.cold and self.backlog.behind_cold(q, msg):
                self.backlog.want(q, behind=True)  # (older ones are on disk: paged first)
                break
            if msg.expires_at is not None and msg.expires_at <= now:
                self._dead_letter(q, msg, "expired", now)
                continue
            q.move(msg, Event.LEASE)
            self._lease(q, msg, c, now)
            c.session.leases[msg] = None
            self._add_timer(msg.lease_deadline, _T_LEASE, msg)  # type: ignore[arg-type]
            self._progress(q, msg)
            if c in out:
                out[c].append(msg)
            else:
                out[c] = [msg]
        if q.cold or q.late:
            self.backlog.want(q)
        if not out:
            return
        if self.hand_over_early(q):
            # Held alone: handed over once this operation returns, the lease committed
            # just after (RabbitMQ's classic queues deliver before their fsync too). A
            # crash in between brings the message back with the count it had before.
            for c, msgs in out.items():
                c.pending += len(msgs)
                self._deliver_soon(c, msgs)
            return
        # Held elsewhere too: a lease (and its delivery count) is durable on the write
        # quorum before the consumer sees the message, so that a new dispatcher after a
        # failure knows it, and the message comes back redelivered, counted.
        batch = self.store.current_batch()
        for c, msgs in out.items():
            c.pending += len(msgs)
            batch.add_callback(functools.partial(self._deliver, c, msgs,
                                                 [m.lease_id for m in msgs]))

    def _deliver(self, c: Consumer, msgs: list[Message], leases: list[int],
                 error: BaseException | None) -> None:
        """Hand over messages whose lease committed, unless the lease ended meanwhile."""
        c.pending -= len(msgs)
        if error is None and not c.session.closed and (not c.cancelled or c.moved):
            # Durable on the quorum: hand over, even when the partition moved to another
            # node meanwhile (this node detached the lease then): the lease is valid there
            # too, and the consumer acks it by receipt.
            still = [m for m, lease in zip(msgs, leases, strict=True)
                     if m.state == State.LEASED and m.lease_id == lease
                     and (m.owner is c or m.owner is None)]
            now = self.clock.time()
            for m in still:
                q = self.parts.get((m.queue, m.index))
                if (q is not None and q.active and q.messages.get(m.id) is m
                        and self._renew_if_late(q, m, c, now)):
                    self._add_timer(m.lease_deadline, _T_LEASE, m)  # type: ignore[arg-type]
            if still or not c.replenish:  # a pull receive waits to hear, even of nothing
                self._hand_over(c, still)
            return
        # Never handed over: back to ready. Also when the partition stopped being
        # dispatched here meanwhile: the change goes to the replicas, where it wins
        # unless the new dispatcher moved on. Its delivery stays counted when the lease
        # is durable (its consumer went away first: it comes back redelivered, as
        # RabbitMQ marks a closed channel's messages), since a later message may have
        # been dealt to another consumer meanwhile (a key's order: --heavy --hot-ready 2
        # seed 314); not when its write quorum failed.
        now = self.clock.time()
        for m, lease in zip(msgs, leases, strict=True):
            q = self.parts.get((m.queue, m.index))
            if (q is None or q.messages.get(m.id) is not m or m.state != State.LEASED
                    or m.lease_id != lease or (m.owner is not c and m.owner is not None)):
                continue
            if error is not None:
                m.delivery_count -= 1  # it was never delivered
            self._end_lease(q, m, now, Event.REQUEUE)
            self._dispatch(q, now)
        if (not c.replenish and c.pending == 0 and not c.cancelled
                and not c.session.closed):
            c.sink(c, [])  # wake the pull receive that waits for them

    def _renew_if_late(self, q: Queue, msg: Message, c: Consumer, now: float) -> bool:
        """A lease handed over well after it was taken (its write quorum took a while)
        runs the consumer's whole visibility timeout from now, not what is left of it: a
        new version, replicated like any step. True if renewed (its timer is the
        caller's to set)."""
        vt = c.visibility_timeout or q.options.visibility_timeout
        if msg.lease_deadline is None or msg.lease_deadline - vt >= now - LATE_HAND_OVER:
            return False
        msg.lease_deadline = now + vt
        self._progress(q, msg)
        return True

    def _hand_over(self, c: Consumer, msgs: list[Message]) -> None:
        """Give a consumer messages whose lease committed, counting them."""
        if msgs:
            totals = self.totals[c.queue.name]
            totals["delivered"] += len(msgs)
            totals["redelivered"] += sum(1 for m in msgs if m.delivery_count > 1)
        c.sink(c, msgs)

    def _unreserve(self, msg: Message) -> None:
        """Undo a lease taken at send time whose message never became durable."""
        c: Consumer = msg.owner
        msg.owner = None
        c.pending -= 1
        if not c.cancelled:
            for each in c.siblings or (c,):
                each.credit += 1
            if not c.replenish and c.pending == 0:
                c.sink(c, [])  # wake the pull receive that waits for it

    # -- operations ----------------------------------------------------------------------
    def declare(self, name: Any, options: Any = None, *, passive: bool = False) -> Pending:
        if not isinstance(name, str) or not name or len(name) > 255 or is_reserved(name):
            raise BadRequest("queue name must be a non-empty string of at most 255 characters "
                             "not beginning with NUL")
        qs = self.queues.get(name)
        if passive:
            if qs is None:
                raise NotFound(f"queue {name!r} does not exist")
            for q in qs:
                self.used(q)
            return Pending(qs[0].created, self.stats_of(name))
        opts = QueueOptions.from_dict(options or {})
        if opts.dead_letter_queue == name:
            raise BadRequest("a queue cannot be its own dead_letter_queue")
        if qs is not None:
            q = qs[0]
            differ = q.options.diff(opts)
            if differ:
                raise PreconditionFailed(
                    f"queue {name!r} exists with different options: "
                    + ", ".join(f"{k}={getattr(q.options, k)!r} (asked {getattr(opts, k)!r})"
                                for k in differ))
            for q in qs:
                self._ensure_created(q)
                self.used(q)
            created = q.created if q.created is not None and not q.created.done else None
            return Pending(created, self.stats_of(name))
        if opts.partitions is None:
            opts = dataclasses.replace(opts, partitions=max(1, min(
                MAX_PARTITIONS, self.default_partitions(opts))))
        if opts.partition_count > 1 and opts.expires is not None:
            raise BadRequest("option 'expires' (x-expires) is for queues of one partition; "
                             "declare it with partitions=1")
        entry = self.catalog.get(name) or CatalogEntry(name)
        inc = max(self._stamp(self.clock.time()), entry.dropped + 1, entry.inc + 1)
        self.catalog[name] = join_catalog(entry, Decl(name, inc, opts.to_dict()))
        qs = self._make_queue(name, opts, inc)
        created = self._stage_catalog(name)
        for q in qs:
            q.active = self.dispatch_by_default
            q.created = created
            if self.on_declare is not None:
                self.on_declare(q)  # the cluster layer: dispatch it here, at a new epoch
            self.used(q)
        return Pending(created, self.stats_of(name))

    def put_entry(self, name: str, options: dict[str, Any]) -> Pending:
        """Declare a reserved catalog entry (an AMQP exchange or binding): replicated to
        every node like a queue's declaration. The result is its incarnation."""
        assert is_reserved(name)
        entry = self.catalog.get(name) or CatalogEntry(name)
        if entry.live and entry.options == options:
            return Pending(None, entry.inc)
        inc = max(self._stamp(self.clock.time()), entry.dropped + 1, entry.inc + 1)
        self.catalog[name] = join_catalog(entry, Decl(name, inc, options))
        return Pending(self._stage_catalog(name), inc)

    def drop_entry(self, name: str) -> Pending:
        """Delete a reserved catalog entry (as a queue's deletion: for good, everywhere)."""
        assert is_reserved(name)
        entry = self.catalog.get(name)
        if entry is None or not entry.live:
            return Pending(None, 0)
        now = self.clock.time()
        self.catalog[name] = join_catalog(entry, Drop(name, entry.inc, now))
        batch = self.store.stage((OP_DROP_QUEUE, (name, entry.inc, now)))
        if self.replicating:
            self._emit(batch, None, Drop(name, entry.inc, now))
        return Pending(batch, entry.inc)

    def _ensure_created(self, q: Queue) -> None:
        """Stage the queue's row again unless it committed or commits with the open batch.

        Its declare may have failed (or be in flight and fail); what is staged next for the
        queue must not be confirmed without the row, or a restart would drop it."""
        created = q.created
        if (created is not None and (created.error is not None or not created.done)
                and created is not self.store.current_batch()):
            q.created = self._stage_catalog(q.name)

    def delete_queue(self, name: Any) -> Pending:
        qs = self.queue(name)
        if self.on_queue_deleted is not None:
            self.on_queue_deleted(name)  # (the AMQP layer drops its bindings)
        now = self.clock.time()
        inc = qs[0].inc
        self.catalog[name] = join_catalog(self.catalog[name], Drop(name, inc, now))
        count = sum(len(q.messages) + q.cold for q in qs)
        for q in qs:
            self._drop(q, "queue deleted")
        batch = self.store.stage((OP_DROP_QUEUE, (name, inc, now)))
        if self.replicating:
            self._emit(batch, None, Drop(name, inc, now))
        return Pending(batch, count)

    def _drop(self, q: Queue, reason: str) -> None:
        """Forget a deleted queue's partition in memory: its consumers are told, for
        good; the last one forgets the queue."""
        if self.parts.get(q.part) is q:
            del self.parts[q.part]
        rest = tuple(p for p in self.queues.get(q.name, ()) if p is not q)
        if rest:
            self.queues[q.name] = rest
        else:
            self.queues.pop(q.name, None)
            self.totals.pop(q.name, None)
            self._turn.pop(q.name, None)
            self._preferred.pop(q.name, None)
        for c in list(q.consumers):
            c.session.forget(c)
            c.credit, c.cancelled = 0, True
            if c.replenish:
                c.session.cancelled(c.tag, reason, True, q.index)
            else:
                c.sink(c, [])
        q.consumers.clear()
        for msg in q.messages.values():
            if msg.state == State.LEASED:
                self._detach(msg)
            q.move(msg, Event.DROP)
        q.messages.clear()
        q.sums.clear()
        self.backlog.drop(q)  # (the queue's rows go with OP_DROP_QUEUE)
        self.backlog.drop_late(q)
        if not rest:
            self._dedup.drop_queue(q.name)
            if self.on_catalog is not None:
                self.on_catalog(q.name)

    def purge(self, name: Any, indexes: Any = None) -> Pending:
        """Drop every ready and delayed message (leased ones stay, as in RabbitMQ) of the
        partitions dispatched here (or ``indexes``)."""
        doomed = 0
        now = self.clock.time()
        for q in self._chosen(self.queue(name), indexes):
            gone = [m for m in q.messages.values() if m.state in (State.READY, State.DELAYED)]
            for msg in gone:
                q.move(msg, Event.DROP)
                q.remove(msg)
                self._delete(q, msg, now)
                msg.body = b""  # (as an ack's)
            q.compact()
            doomed += len(gone)
            self._dispatch(q, now)  # (nothing to lease: its watchers see it dry)
            if not (q.cold or q.late):
                continue
            # What is on disk only goes with one statement each; not the sends staged and
            # not yet committed (their seqs are above every committed one's): they were
            # not in the queue when it was purged.
            below = min((m.seq for m in self.in_flight.values()), default=self._seq)
            if q.cold:
                self.store.stage((OP_PURGE_READY, (q.name, q.index, *q.cold_after, below,
                                                   now)))
                doomed += self.backlog.drop(q)
            if q.late:
                self.store.stage((OP_PURGE_DELAYED, (q.name, q.index, *q.late_after, below,
                                                     now)))
                doomed += self.backlog.drop_late(q)
            if not self.backlog.alone(q):
                # Their tombstones are in the store only, not in this batch's changes:
                # the next repair round reads them back and takes them to the other
                # holders (a purge is not confirmed by W copies of those).
                q.tombs_on_disk = True
                if self.replica.on_merged is not None:
                    self.replica.on_merged({q.part})
        return Pending(self.store.current_batch() if doomed else None, doomed)

    def partition_of(self, qs: tuple[Queue, ...], partition_key: str | None,
                     dedup_id: str | None) -> int | None:
        """Where a message goes (meshq.broker.partitions), or None: anywhere. A client's
        retry dedup id picks among the partitions whose preferred primary is this node
        (the same ones until the ring changes, failovers or not), so that its retry
        through this node meets the first copy's dedup entry without a relay hop."""
        if len(qs) == 1:
            return 0
        if partition_key is not None:
            return key_partition(partition_key, len(qs))
        if dedup_id is None:
            return None
        if not dedup_id.startswith(RETRY_DEDUP):  # the user's: the same from any node
            return key_partition(dedup_id, len(qs))
        gen = self.placement_gen()
        hit = self._preferred.get(qs[0].name)
        if hit is not None and hit[0] is qs and hit[1] == gen:
            pool = hit[2]
        else:  # (asked per message: P placement lookups each time would cost microseconds)
            pool = [q.index for q in qs if self.preferred_here(q)] or list(range(len(qs)))
            self._preferred[qs[0].name] = (qs, gen, pool)
        return pool[key_partition(dedup_id, len(pool))]

    def _next_partition(self, qs: tuple[Queue, ...]) -> Queue:
        """An unkeyed message's partition: one dispatched here, in turn (all of them when
        none is: the caller routed it here, and its partitions tell it they moved)."""
        here = [q for q in qs if q.active] or list(qs)
        name = qs[0].name
        turn = self._turn.get(name, 0)
        self._turn[name] = turn + 1
        return here[turn % len(here)]

    def send(self, name: Any, messages: Any, index: Any = None) -> Pending:
        """Stage a batch of messages; the Pending result is their ids, in order. Each goes
        to the partition its key says, else ``index``, else the one dispatched here whose
        turn it is (the unkeyed messages of one send stay together, in order)."""
        qs = self.queue(name)
        if not isinstance(messages, list) or not messages:
            raise BadRequest("'messages' must be a non-empty list")
        if len(messages) > self.limits.max_batch:
            raise TooLarge(f"a batch holds at most {self.limits.max_batch} messages")
        if index is not None and (type(index) is not int or not 0 <= index < len(qs)):
            raise BadRequest(f"'partition' must be a partition index below {len(qs)}")
        now = self.clock.time()
        parsed = [self._parse_message(m, i) for i, m in enumerate(messages)]
        by_part: dict[Queue, list[tuple[int, _Parsed]]] = {}
        unkeyed: Queue | None = None  # (one per send, as Kafka's sticky partitioner)
        for i, item in enumerate(parsed):
            if index is not None:  # (the client's node placed it)
                if item[5] is not None and key_partition(item[5], len(qs)) != index:
                    raise BadRequest(f"message {i}: its partition_key belongs to partition "
                                     f"{key_partition(item[5], len(qs))}, not {index}")
                q = qs[index]
            else:
                at = self.partition_of(qs, item[5], item[4])
                if at is not None:
                    q = qs[at]
                else:
                    q = unkeyed = unkeyed or self._next_partition(qs)
            if q in by_part:
                by_part[q].append((i, item))
            else:
                by_part[q] = [(i, item)]
        ids: list[str] = [""] * len(parsed)
        waits: list[Batch] = []
        staged = False
        for q, items in by_part.items():
            staged = self._send_to(q, items, now, ids, waits) or staged
        wait_for = waits[-1] if waits else None  # (batches complete in order)
        if not staged:
            return Pending(wait_for, ids)
        return Pending(self.store.current_batch(), ids, also=wait_for)

    def _send_to(self, q: Queue, items: list[tuple[int, _Parsed]], now: float,
                 ids: list[str], waits: list[Batch]) -> bool:
        """Stage one partition's share of a send (ids go in at their places); True if
        anything was staged."""
        name = q.name
        self._ensure_created(q)
        fresh: list[Message] = []
        fresh_dedup: list[str | None] = []
        window = self.limits.dedup_window
        qttl = q.options.message_ttl
        store = self.store
        # A fair queue with no backlog leases a new message to a waiting consumer in the
        # same commit as the message itself: one commit from send to delivery.
        direct = q.options.ordering == "fair" and bool(q.consumers) and q.active
        early = direct and self.hand_over_early(q)
        for at, (body, headers, ttl, delay, dedup_id, _key) in items:
            if dedup_id is not None:
                hit = self._dedup.get((name, dedup_id), now)
                if hit is not None and hit[1] > now and self._dedup_hit(q, dedup_id, hit,
                                                                        waits):
                    ids[at] = hit[0]
                    continue
            hlc = self._stamp(now)
            msg = Message(self._next_seq(), message_id(hlc, self.node_id), name, body, headers,
                          hlc, self.node_id, index=q.index, inc=q.inc, epoch=q.epoch, vn=1)
            if qttl is not None:
                ttl = qttl if ttl is None else min(ttl, qttl)
            if ttl is not None:
                msg.expires_at = now + ttl
            if delay:
                msg.state, msg.ready_at = State.DELAYED, now + delay
            elif direct and q.ready == 0:
                c = q.next_consumer()
                if c is None:
                    direct = False
                else:
                    c.pending += 1
                    msg.state = State.LEASED
                    self._lease(q, msg, c, now)
            if dedup_id is None:
                batch = self._put(q, msg)
            else:
                batch = self._put(q, msg, (dedup_id, now + window))
                self._dedup[name, dedup_id] = (msg.id, now + window, batch)
                store.stage((OP_DEDUP, (name, dedup_id, msg.id, now + window)))
            ids[at] = msg.id
            fresh.append(msg)
            fresh_dedup.append(dedup_id)
            self.in_flight[msg.id] = msg
        if not fresh:
            return False
        if early:
            self._hand_over_early(q, fresh, now)
        batch = store.current_batch()
        if batch is not self._sends_batch:  # one callback per batch, not per send
            self._sends_batch, self._sends = batch, []
            batch.add_callback(functools.partial(self._sent, self._sends, batch))
        self._sends.append((q, fresh, fresh_dedup))
        return True

    def _hand_over_early(self, q: Queue, fresh: list[Message], now: float) -> None:
        """Hand messages leased at send time to their consumers before their commit, as
        RabbitMQ's classic queues do: the message and its lease commit together, so a
        crash before the commit loses both, and the producer, never confirmed, sends it
        again. Only on a partition this node holds alone (``hand_over_early``): a replica
        elsewhere could otherwise make a second dispatcher that does not know the lease.
        Indexed now, so that an ack, nack or disconnect before the commit acts on it (its
        ops commit after the put); a failed commit takes it back (``_settle_early``)."""
        out: dict[Consumer, list[Message]] = {}
        for msg in fresh:
            c = msg.owner
            if c is None or q.messages.get(msg.id) is not None or msg.id in q.tombs:
                continue  # not leased at send time; or a twin, which _committed settles
            c.session.leases[msg] = None
            self._add_timer(msg.lease_deadline, _T_LEASE, msg)  # type: ignore[arg-type]
            q.add(msg)
            self._schedule_message(msg)
            msg.early = True
            if c in out:
                out[c].append(msg)
            else:
                out[c] = [msg]
        for c, msgs in out.items():
            self._deliver_soon(c, msgs)

    def _deliver_soon(self, c: Consumer, msgs: list[Message]) -> None:
        """Hand leases over once the operation that took them has returned (the client
        session flushes them then; else the next turn), as ``_deliver`` does once a
        commit is done: never inside that operation, whose batch and state a consumer's
        sink (which may run ops of its own) must not see half made."""
        self._soon.append((c, msgs, [m.lease_id for m in msgs]))
        self._soon_ready.set()  # (cheaper than run_sync_soon, which wakes the loop by fd)

    def _dedup_hit(self, q: Queue, dedup_id: str, hit: tuple[str, float, Any],
                   waits: list[Batch]) -> bool:
        """A send repeats ``dedup_id`` of an entry not expired: True when it is answered by
        the entry's message (its batch, if any, goes to ``waits``); False when it must be
        sent as a new message. An entry only this node's own confirmed send proves that a
        write quorum has its message. Any other (merged from a peer, whose Put may have
        been refused everywhere but on its sender; or read back from the store) confirms
        its message only once this node has replicated it again, which takes the message
        being here: on a partition of the queue held here, as a message (sent again) or a
        tombstone (consumed: nothing to confirm). One that is nowhere here is sent anew,
        and the new entry (later expiry) wins the join everywhere: should the first copy
        turn up later, the message is there twice (at-least-once), never confirmed and
        lost with the one node that held it."""
        mid, expires_at, batch = hit
        if batch is CONFIRMED:
            return True
        if batch is not None:
            if not batch.done:
                waits.append(batch)
            elif batch.error is not None:
                # Its first send was not confirmed (the quorum failed after the local
                # commit): replicate it again, and confirm it this time.
                again = self._resend(q, mid, dedup_id, expires_at)
                if again is not None:
                    waits.append(again)
            return True
        if self.hand_over_early(q):
            return True  # (held alone: what this node committed is the write quorum)
        for p in self.queues.get(q.name, ()):
            if not self.hand_over_early(p):  # (tombstones on disk since a restart; or
                self.backlog.page_ids_now(p, ((mid, None),))  # the message: a point read)
            if mid in p.messages:
                if p is q or p.active:
                    again = self._resend(p, mid, dedup_id, expires_at)
                    if again is not None:
                        waits.append(again)
                return True  # (a partition dispatched elsewhere: its repair spreads it)
            if mid in p.tombs:
                return True
        return False

    def _resend(self, q: Queue, mid: str, dedup_id: str, expires_at: float) -> Batch | None:
        if mid not in q.messages and q.cold:  # on disk only (meshq.broker.backlog): it
            self.backlog.page_ids_now(q, ((mid, None),))  # must be replicated again too
        msg = q.messages.get(mid)
        if msg is None:  # delivered and acked (or expired) since: nothing to confirm
            return None
        batch = self._put(q, msg, (dedup_id, expires_at))
        self._dedup[q.name, dedup_id] = (mid, expires_at, batch)
        batch.add_callback(functools.partial(self._dedup_settled, q.name, [dedup_id], batch))
        return batch

    def _dedup_settled(self, queue: str, dedup_ids: list[str | None], batch: Batch,
                       error: BaseException | None) -> None:
        """A send's batch completed: its dedup entries stop naming it, unless it failed
        after the local commit (a later hit replicates the message again). An entry
        holding its batch for the whole window would keep the batch's ops, changes and
        messages alive for minutes, for the garbage collector to walk again and again."""
        if error is not None:
            return
        for dedup_id in dedup_ids:
            if dedup_id is None:
                continue
            self._dedup.settle((queue, dedup_id), batch)

    def _sent(self, sends: list[tuple[Queue, list[Message], list[str | None]]], batch: Batch,
              error: BaseException | None) -> None:
        by_queue: dict[Queue, list[Message]] = {}
        for q, msgs, dedup_ids in sends:
            if _taken_back(q, batch, error):  # not written (or taken back): forget them
                for msg, dedup_id in zip(msgs, dedup_ids, strict=True):
                    if dedup_id is None:
                        continue
                    self._dedup.discard((q.name, dedup_id), msg.id)
            else:
                self._dedup_settled(q.name, dedup_ids, batch, error)
            if q in by_queue:
                by_queue[q].extend(msgs)
            else:
                by_queue[q] = list(msgs)
        for q, msgs in by_queue.items():  # one dispatch per queue, not per send
            if error is None and self.parts.get(q.part) is q:  # not deleted meanwhile
                self.totals[q.name]["published"] += len(msgs)
            self._committed(q, msgs, batch, error)

    def check_messages(self, messages: Any) -> None:
        """Raise what ``send`` would about ``messages`` (before a send is split over
        partitions, so that no part is written when another is refused)."""
        if not isinstance(messages, list) or not messages:
            raise BadRequest("'messages' must be a non-empty list")
        if len(messages) > self.limits.max_batch:
            raise TooLarge(f"a batch holds at most {self.limits.max_batch} messages")
        for i, m in enumerate(messages):
            self._parse_message(m, i)

    def _parse_message(self, m: Any, i: int) -> _Parsed:
        if type(m) is dict and len(m) == 1:  # the common case: a body and nothing else
            body = m.get("body")
            if type(body) is bytes and len(body) <= self.limits.max_message_bytes:
                return body, {}, None, None, None, None
        if not isinstance(m, dict):
            raise BadRequest(f"message {i} must be a map")
        body = m.get("body")
        if isinstance(body, str):
            body = body.encode()
        elif not isinstance(body, bytes):
            raise BadRequest(f"message {i}: 'body' must be bytes or a string")
        if len(body) > self.limits.max_message_bytes:
            raise TooLarge(f"message {i}: body of {len(body)} bytes exceeds "
                           f"max_message_bytes ({self.limits.max_message_bytes})")
        headers = m.get("headers") or {}
        if not isinstance(headers, dict) or not all(isinstance(k, str) for k in headers):
            raise BadRequest(f"message {i}: 'headers' must be a map with string keys")
        ttl = m.get("ttl")
        if ttl is not None:
            ttl = _number(ttl, "ttl", minimum=0.001)
        delay = m.get("delay")
        if delay is not None:
            delay = _number(delay, "delay")
        dedup_id = m.get("dedup_id")
        if dedup_id is not None and (not isinstance(dedup_id, str) or not dedup_id
                                     or len(dedup_id) > 1024):
            raise BadRequest(f"message {i}: 'dedup_id' must be a non-empty string "
                             "(at most 1024 characters)")
        key = m.get("partition_key")
        if key is not None and (not isinstance(key, str) or len(key) > 1024):
            raise BadRequest(f"message {i}: 'partition_key' must be a string "
                             "(at most 1024 characters)")
        unknown = set(m) - _MESSAGE_FIELDS
        if unknown:
            raise BadRequest(
                f"message {i}: unknown field(s) {', '.join(sorted(map(str, unknown)))}")
        return body, headers, ttl, delay, dedup_id, key

    def consume(self, session: Session, name: Any, prefetch: Any,
                sink: Callable[[Consumer, list[Message]], None] | None = None,
                tag: str | None = None, indexes: Any = None, capacity: Any = None,
                watch: Callable[[Queue], None] | None = None) -> str:
        """Subscribe to the partitions dispatched here (or ``indexes``), one consumer each
        under one tag, ``prefetch`` spread over all the queue's partitions: deliveries are
        pushed while a partition's consumer has credit. ``capacity``: each part's most
        unsettled leases instead of its share of ``prefetch`` (0: none until ``flow``
        gives it some); ``watch``: each part's ``Consumer.watch``."""
        qs = self.queue(name)
        if (isinstance(prefetch, bool) or not isinstance(prefetch, int)
                or not 1 <= prefetch <= 65535):
            raise BadRequest("'prefetch' must be an integer from 1 to 65535")
        if capacity is not None and (isinstance(capacity, bool) or not isinstance(capacity, int)
                                     or not 0 <= capacity <= 65535):
            raise BadRequest("'capacity' must be an integer from 0 to 65535")
        chosen = self._chosen(qs, indexes)
        credits = spread(prefetch, len(qs))
        tag = tag or f"{self.tag_prefix}c{next(_consumer_tags)}"  # unique in the cluster
        taken = session.consumers.get(tag, ())  # (a subscription's part on each partition)
        if any(c.queue.name != name or c.queue in chosen for c in taken):
            raise BadRequest(f"consumer tag {tag!r} is in use on this connection")
        deliver = sink or (lambda c, msgs: c.session.push(c.tag, msgs))
        now = self.clock.time()
        for q in chosen:
            c = Consumer(q, session, credits[q.index] if capacity is None else capacity,
                         replenish=True, sink=deliver)
            c.tag = tag
            c.watch = watch
            session.add(c)
            q.consumers.append(c)
            self.used(q)
            self._dispatch(q, now)
        return tag

    def flow(self, session: Session, tag: Any, indexes: Any, capacity: Any) -> list[int]:
        """Set the most unsettled leases of subscription ``tag``'s part on each partition
        of ``indexes`` (dispatched here) to ``capacity``: what it holds stays, and it is
        given more only below its new capacity (0 pauses it). Returns what each part
        holds now (leased, acks not yet in), in the order of ``indexes``; a partition it
        has no part on here holds 0."""
        cs = session.consumers.get(tag) if isinstance(tag, str) else None
        if cs is None:
            raise NotFound(f"no consumer {tag!r} on this connection")
        if (not isinstance(indexes, list) or not all(type(i) is int for i in indexes)
                or isinstance(capacity, bool) or not isinstance(capacity, int)
                or not 0 <= capacity <= 65535):
            raise BadRequest("'partitions' must be a list of partition indexes and "
                             "'capacity' an integer from 0 to 65535")
        by_index = {c.queue.index: c for c in cs if c.replenish}
        held = []
        now = self.clock.time()
        for i in indexes:
            c = by_index.get(i)
            if c is None:
                held.append(0)
                continue
            held.append(c.capacity - c.credit)
            c.credit += capacity - c.capacity
            c.capacity = capacity
            self._dispatch(c.queue, now)
        return held

    def cancel(self, session: Session, tag: Any) -> None:
        """Stop a subscription; its leases stay until acked, nacked or disconnected."""
        cs = session.consumers.pop(tag, None) if isinstance(tag, str) else None
        if cs is None:
            raise NotFound(f"no consumer {tag!r} on this connection")
        _stop_consumers(cs)

    async def receive(self, session: Session, name: Any, max_messages: Any = 1,
                      wait: Any = 0.0, visibility_timeout: Any = None,
                      indexes: Any = None, *, stop: trio.Event | None = None,
                      ) -> list[Message]:
        """Pull up to ``max_messages`` from the partitions dispatched here (or
        ``indexes``), waiting up to ``wait`` s for the first to arrive, or until the
        caller sets ``stop`` (then it returns what it has, perhaps nothing). Raises Moved
        if they moved to another node before anything came."""
        qs = self._chosen(self.queue(name), indexes)
        if (isinstance(max_messages, bool) or not isinstance(max_messages, int)
                or not 1 <= max_messages <= self.limits.max_batch):
            raise BadRequest(f"'max' must be an integer from 1 to {self.limits.max_batch}")
        wait = _number(wait, "wait")
        vt = None if visibility_timeout is None else _number(
            visibility_timeout, "visibility_timeout", minimum=0.001)
        got: list[Message] = []
        for q in qs:
            self.used(q)
        deadline = trio.current_time() + wait
        while True:
            moved = await self._receive_once(qs, session, max_messages, deadline, vt, got,
                                             stop)
            if got or moved or trio.current_time() >= deadline or not all(
                    self.live(q) for q in qs) or (stop is not None and stop.is_set()):
                break
            # Leases were granted and not confirmed (their batch failed): wait on.
        if not got and moved:
            raise Moved(f"queue {qs[0].name!r} moved to another node")
        return got

    async def _receive_once(self, qs: tuple[Queue, ...], session: Session,
                            max_messages: int, deadline: float, vt: float | None,
                            got: list[Message], stop: trio.Event | None) -> bool:
        """One try of ``receive``: a consumer on each partition, sharing one credit; True
        when the partitions moved meanwhile."""
        settled = trio.Event()
        arrived = trio.Event()
        cs: list[Consumer] = []

        def sink(c: Consumer, msgs: list[Message]) -> None:
            got.extend(msgs)
            for each in cs:
                each.credit = 0
            arrived.set()
            if all(each.pending == 0 for each in cs):
                settled.set()

        for q in qs:
            c = Consumer(q, session, max_messages, replenish=False, sink=sink,
                         visibility_timeout=vt)
            c.siblings = cs
            cs.append(c)
            q.consumers.append(c)
        try:
            now = self.clock.time()
            for c in cs:
                self._dispatch(c.queue, now)
            if (all(c.pending == 0 for c in cs) and deadline > trio.current_time()
                    and not (stop is not None and stop.is_set())):
                with trio.move_on_at(deadline):
                    await _first_of(arrived, stop)
        finally:
            for c in cs:
                c.credit = 0  # no new leases from here on
                try:
                    c.queue.consumers.remove(c)
                except ValueError:
                    pass
        while any(c.pending for c in cs):  # leases granted whose commit is under way
            settled = trio.Event()
            await settled.wait()
        moved = all(c.moved or not c.queue.active for c in cs)
        cs.clear()  # (consumers -> sink -> cs: a cycle that would hold what ``got`` took
        return moved  # until the collector runs, and their lease timers with it)

    def _leased_by(self, session: Session, qs: tuple[Queue, ...], ids: Any,
                   ) -> tuple[dict[Queue, list[Message]], dict[str, str]]:
        """The messages of ``ids`` this caller holds the lease of, by partition: by receipt
        (``id~lease[~index]``, from any connection, until the lease's deadline), or by a
        bare id leased through this very connection."""
        if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
            raise BadRequest("'ids' must be a list of message ids or receipts")
        mine: dict[Queue, list[Message]] = {}
        failed = {}
        now = self.clock.time()
        for item in ids:
            mid, lease, index = parse_receipt(item)
            msg = q = None
            if index is None:  # a bare id: whichever partition holds it
                for q in qs:
                    msg = q.messages.get(mid)
                    if msg is not None:
                        break
            elif 0 <= index < len(qs):
                q = qs[index]
                msg = q.messages.get(mid)
            if msg is None or q is None:
                failed[item] = "no such message (already acked, expired or deleted)"
            elif msg.state != State.LEASED:
                failed[item] = "not leased (lease expired or released)"
            elif lease is not None:
                if lease != msg.lease_id or (msg.lease_deadline is not None
                                             and msg.lease_deadline <= now):
                    failed[item] = "lease expired or released (another lease holds it now)"
                else:
                    mine.setdefault(q, []).append(msg)
            elif msg.owner is None or msg.owner.session is not session:
                failed[item] = "not leased to this connection (lease expired or released)"
            else:
                mine.setdefault(q, []).append(msg)
        return mine, failed

    def ack(self, session: Session, name: Any, ids: Any) -> Pending:
        """Remove leased messages; result is {'acked': [...], 'failed': {id: why}}."""
        mine, failed = self._leased_by(session, self.queue(name), ids)
        now = self.clock.time()
        acked: list[str] = []
        for q, msgs in mine.items():
            for msg in msgs:
                self._detach(msg)
                q.move(msg, Event.ACK)
                q.remove(msg)
                self._delete(q, msg, now)
                # A stale timer (its lease's, its TTL's) keeps the object until it comes
                # due, up to a visibility timeout or a TTL: not its body.
                msg.body = b""
                acked.append(msg.id)
            self._dispatch(q, now)
        result = {"acked": acked, "failed": failed}
        pending = Pending(self.store.current_batch() if acked else None, result)
        if acked:  # counted once durable, as sends are
            pending.then(functools.partial(self._count_acked, name, len(acked)))
        return pending

    def _count_acked(self, name: str, n: int, _result: Any,
                     error: BaseException | None) -> None:
        if error is None and name in self.queues:
            self.totals[name]["acked"] += n

    def nack(self, session: Session, name: Any, ids: Any, *, requeue: Any = True,
             delay: Any = 0.0) -> Pending:
        """Requeue now or after ``delay`` s, or (requeue=False) dead-letter right away."""
        qs = self.queue(name)
        if not isinstance(requeue, bool):
            raise BadRequest("'requeue' must be a boolean")
        delay = _number(delay, "delay")
        mine, failed = self._leased_by(session, qs, ids)
        now = self.clock.time()
        nacked: list[str] = []
        for q, msgs in mine.items():
            for msg in msgs:
                if not requeue:
                    self._dead_letter(q, msg, "rejected", now)
                else:
                    self._end_lease(q, msg, now,
                                    Event.REQUEUE_LATER if delay else Event.REQUEUE, delay)
                nacked.append(msg.id)
            self._dispatch(q, now)
        result = {"nacked": nacked, "failed": failed}
        return Pending(self.store.current_batch() if nacked else None, result)

    def extend(self, session: Session, name: Any, ids: Any, timeout: Any) -> dict[str, Any]:
        """Move the lease deadline of leased messages to now + ``timeout`` s."""
        qs = self.queue(name)
        timeout = _number(timeout, "timeout", minimum=0.001)
        mine, failed = self._leased_by(session, qs, ids)
        now = self.clock.time()
        extended: list[str] = []
        for q, msgs in mine.items():
            for msg in msgs:
                msg.lease_deadline = now + timeout
                self._add_timer(msg.lease_deadline, _T_LEASE, msg)
                self._progress(q, msg)
                extended.append(msg.id)
        return {"extended": extended, "failed": failed}

    def close_session(self, session: Session, *, release: bool = True) -> None:
        """The connection is gone: drop its consumers and (``release``) its leases. A
        relayed connection that broke keeps its leases: its client may ack them by
        receipt through another path until their deadline."""
        session.closed = True
        for cs in session.consumers.values():
            _stop_consumers(cs)
        session.consumers.clear()
        now = self.clock.time()
        touched: dict[Queue, None] = {}
        for msg in list(session.leases):
            q = self.parts.get((msg.queue, msg.index))
            if q is None or q.messages.get(msg.id) is not msg or msg.state != State.LEASED:
                continue
            if release and q.active:
                self.redeliveries += 1
                self._end_lease(q, msg, now, Event.REQUEUE)
                touched[q] = None
            else:
                self._detach(msg)
        session.leases.clear()
        for q in touched:
            self._dispatch(q, now)

    # -- statistics ----------------------------------------------------------------------
    def queue_stats(self, q: Queue) -> dict[str, Any]:
        return {
            "name": q.name,
            "ready": q.ready,
            "leased": q.leased,
            "delayed": q.delayed,
            "dead_lettered": q.dead_lettered,
            "expired": q.expired,
            "dropped": q.dropped,
            "consumers": sum(1 for c in q.consumers if c.replenish),
            "options": q.options.to_dict(),
        }

    def stats_of(self, name: str, indexes: Any = None) -> dict[str, Any]:
        """A queue's stats summed over its partitions (or ``indexes``); ``consumers``:
        the most any one partition has (a subscription has a consumer on each)."""
        qs = self.queue(name)
        chosen = qs if indexes is None else self._chosen(qs, indexes)
        out = self.queue_stats(chosen[0])
        for q in chosen[1:]:
            more = self.queue_stats(q)
            for key in ("ready", "leased", "delayed", "dead_lettered", "expired", "dropped"):
                out[key] += more[key]
            out["consumers"] = max(out["consumers"], more["consumers"])
        return out

    def stats(self, name: Any = None) -> list[dict[str, Any]]:
        if name is not None:
            return [self.stats_of(name)]
        return [self.stats_of(n) for n in sorted(self.queues)]


def _taken_back(q: Queue, batch: Batch, error: BaseException | None) -> bool:
    """Whether a send's batch that completed with ``error`` leaves its messages unwritten:
    not durable here, or durable here only on a fifo queue, which takes them back (its
    row goes, the dedup entry too, so a retry is stamped anew). Made visible, such a
    message could reach a consumer below what a later dispatcher of its partition had
    closed (SPEC section 2: fifo; docs/architecture.md)."""
    return error is not None and (not batch.local_ok or q.options.ordering == "fifo")


def _stop_consumers(cs: list[Consumer]) -> None:
    """No more deliveries to ``cs`` (cancelled, or their connection closed)."""
    for c in cs:
        c.credit, c.replenish, c.cancelled = 0, False, True
        try:
            c.queue.consumers.remove(c)
        except ValueError:
            pass


async def _first_of(event: trio.Event, other: trio.Event | None) -> None:
    """Wait until ``event`` or ``other`` (if any) is set."""
    if other is None:
        await event.wait()
        return
    async with trio.open_nursery() as nursery:
        async def one(e: trio.Event) -> None:
            await e.wait()
            nursery.cancel_scope.cancel()
        nursery.start_soon(one, event)
        nursery.start_soon(one, other)
