"""The broker core: queue semantics of SPEC section 2 over a Store and a Clock.

State here: queues and their messages (in memory, mirrored durably by the store), the HLC,
the timer heap (delays, lease deadlines, TTLs) and dedup entries. Never: a message visible
to consumers before the batch that wrote it committed; a send, ack, nack or declare
confirmed before its batch committed; a message leased to two consumers at once.
Methods are synchronous and never block; those that write return a Pending.
"""

from __future__ import annotations

import contextlib
import functools
import heapq
import itertools
import math
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import msgpack
import trio

from meshq.broker.queue import Consumer, Queue, Session
from meshq.clock import Clock
from meshq.errors import BadRequest, NotFound, PreconditionFailed, TooLarge
from meshq.hlc import HLC, ClockOffsetError, pack, physical_ms
from meshq.model import Message, QueueOptions, finite
from meshq.states import Event, State
from meshq.store import (
    OP_DEDUP,
    OP_DEDUP_PRUNE,
    OP_DELETE,
    OP_DROP_QUEUE,
    OP_FORGET,
    OP_META,
    OP_QUEUE,
    OP_TOMBSTONE,
    OP_TOMBSTONE_PRUNE,
    Batch,
    Snapshot,
    Store,
)
from meshq.store.base import put_op, update_op

__all__ = ["Broker", "BrokerLimits", "Pending"]

_T_DUE, _T_LEASE, _T_TTL = 0, 1, 2
DEDUP_PRUNE_INTERVAL = 60.0
HLC_CEILING_MS = 200  # how far the persisted HLC ceiling runs ahead (< max_clock_offset)
HLC_REFRESH = pack(HLC_CEILING_MS // 2)  # renew the ceiling when this close to it
TICK_BUDGET = 2000  # timers handled per event-loop turn
# How long a deleted message's tombstone is kept (see meshq.mesh.replication): a replica
# away for longer must not bring back what it holds (docs/architecture.md, Replication).
TOMBSTONE_WINDOW = 3600.0


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


class Broker:
    def __init__(self, store: Store, clock: Clock, *, node_id: str,
                 limits: BrokerLimits | None = None, max_clock_offset_ms: int = 500) -> None:
        self.store = store
        self.clock = clock
        self.node_id = node_id
        self.limits = limits or BrokerLimits()
        self.hlc = HLC(max_offset_ms=max_clock_offset_ms)
        self.queues: dict[str, Queue] = {}
        self._seq = 1
        self._timers: list[tuple[float, int, int, Message]] = []
        self._timer_ids = itertools.count()
        self._timer_scope: trio.CancelScope | None = None
        self._timer_at = math.inf
        self._dedup: dict[tuple[str, str], tuple[str, float, Batch | None]] = {}
        self._next_prune = 0.0
        self._pruned = False
        self._hlc_batch: Batch | None = None  # the batch holding the last ceiling staged
        self._hlc_ceiling = 0  # that ceiling
        self._hlc_durable = 0  # the highest ceiling committed
        self._sends_batch: Batch | None = None
        self._sends: list[tuple[Queue, list[Message], list[str | None]]] = []
        self.redeliveries = 0
        # Since start, per queue: "published", "delivered", "redelivered" (delivered with
        # delivery_count > 1) and "acked" on the node that dispatches it (meshq.metrics).
        self.totals: defaultdict[str, Counter[str]] = defaultdict(Counter)
        # Set by the mesh: replica ops then go with each batch (see _put, _update, ...).
        self.replicating = False
        self.tag_prefix = ""  # consumer tags start with it (the daemon: its node name)

    # -- start-up ----------------------------------------------------------------------
    def restore(self, snap: Snapshot) -> None:
        """Rebuild memory from what the store holds. Leases die with the old process."""
        now = self.clock.time()
        high = self._hlc_durable = int(snap.meta.get("hlc", 0) or 0)  # a ceiling
        for name, options, counters in snap.queues:
            q = Queue(name, QueueOptions.from_dict(options))
            q.dead_lettered = counters["dead_lettered"]
            q.expired = counters["expired"]
            q.dropped = counters["dropped"]
            self.queues[name] = q
        spent: list[tuple[Queue, Message]] = []
        for msg in snap.messages:
            self._seq = max(self._seq, msg.seq + 1)
            high = max(high, msg.hlc)
            home = self.queues.get(msg.queue)
            if home is None:
                continue
            if msg.state == State.LEASED:
                msg.state, msg.lease_deadline = State.READY, None
                limit = home.options.max_deliveries
                if limit is not None and msg.delivery_count >= limit:
                    spent.append((home, msg))
            home.add(msg)
            self._schedule_message(msg)
        for queue, dedup_id, mid, expires_at in snap.dedup:
            if expires_at > now:
                self._dedup[queue, dedup_id] = (mid, expires_at, None)
        self.hlc.restore(high)
        for home, msg in spent:  # a lost lease ends like any other: past max_deliveries, DLQ
            self._dead_letter(home, msg, "max_deliveries", now)

    # -- the timer loop ------------------------------------------------------------------
    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Fire delays, lease deadlines, TTLs and dedup pruning, forever."""
        task_status.started()
        while True:
            now = self.clock.time()
            if self.tick(now):  # more is due: let the event loop breathe, then go on
                await trio.lowlevel.checkpoint()
                continue
            at = min(self._timers[0][0] if self._timers else math.inf, self._next_prune)
            with trio.CancelScope() as scope:
                self._timer_scope, self._timer_at = scope, at
                await self.clock.sleep_until(at)
            self._timer_scope, self._timer_at = None, math.inf

    def _add_timer(self, when: float, kind: int, msg: Message) -> None:
        heapq.heappush(self._timers, (when, next(self._timer_ids), kind, msg))
        if when < self._timer_at and self._timer_scope is not None:
            self._timer_scope.cancel()

    def _schedule_message(self, msg: Message) -> None:
        if msg.state == State.DELAYED:
            self._add_timer(msg.ready_at, _T_DUE, msg)
        if msg.expires_at is not None:
            self._add_timer(msg.expires_at, _T_TTL, msg)

    def tick(self, now: float, budget: int = TICK_BUDGET) -> bool:
        """Handle timers due at ``now``, at most ``budget`` of them (most are stale: a
        lease timer stays in the heap after its ack). True when more are due."""
        timers, touched = self._timers, set()
        while timers and timers[0][0] <= now:
            budget -= 1
            if budget < 0:
                break
            when, _, kind, msg = heapq.heappop(timers)
            q = self.queues.get(msg.queue)
            if q is None or not q.active or q.messages.get(msg.id) is not msg:
                continue  # (activate() schedules an inactive queue's timers again)
            if kind == _T_DUE and msg.state == State.DELAYED and msg.ready_at == when:
                self._become_ready(q, msg, now)
                touched.add(q)
            elif kind == _T_LEASE and msg.state == State.LEASED and msg.lease_deadline == when:
                self.redeliveries += 1
                self._end_lease(q, msg, now, Event.REQUEUE)
                touched.add(q)
            elif kind == _T_TTL and msg.state in (State.READY, State.DELAYED):
                self._dead_letter(q, msg, "expired", now)
                q.compact()  # its ready-heap entry is stale now
        if now >= self._next_prune:
            self._prune_dedup(now)
        for q in touched:
            self._dispatch(q, now)
        return budget < 0

    def _prune_dedup(self, now: float) -> None:
        self._next_prune = now + DEDUP_PRUNE_INTERVAL
        stale = [k for k, (_, exp, _) in self._dedup.items() if exp <= now]
        for key in stale:
            del self._dedup[key]
        if stale:
            self.store.stage((OP_DEDUP_PRUNE, (now,)))
        if self._pruned:  # (not at start-up: nothing is that old yet)
            self.store.stage((OP_TOMBSTONE_PRUNE, (now - TOMBSTONE_WINDOW,)))
        self._pruned = True

    # -- helpers -------------------------------------------------------------------------
    def queue(self, name: Any) -> Queue:
        """The queue called ``name``; NotFound (or BadRequest for a non-string) if none."""
        if not isinstance(name, str):
            raise BadRequest(f"queue name must be a string, not {type(name).__name__}")
        q = self.queues.get(name)
        if q is None:
            raise NotFound(f"queue {name!r} does not exist")
        return q

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

    def _ceiling_committed(self, ceiling: int, error: BaseException | None) -> None:
        if error is None:
            self._hlc_durable = max(self._hlc_durable, ceiling)

    def _stage_counters(self, q: Queue) -> Batch:
        batch = self.store.stage((OP_QUEUE, (q.name, _pack_options(q.options), q.dead_lettered,
                                             q.expired, q.dropped)))
        if self.replicating:
            batch.rops.append((q.name, ["q", q.name, q.options.to_dict(), q.dead_lettered,
                                        q.expired, q.dropped]))
        return batch

    # Every change to a message goes through these three, which also hand the change to
    # the replicator (when ``replicating``) as a replica op ("rop") of the same batch.
    def _put(self, msg: Message) -> Batch:
        op = put_op(msg)
        batch = self.store.stage(op)
        batch.body_bytes += len(msg.body)
        if self.replicating:
            batch.rops.append((msg.queue, ["p", *op[1][1:]]))
        return batch

    def _update(self, msg: Message) -> None:
        batch = self.store.stage(update_op(msg))
        if self.replicating:
            batch.rops.append((msg.queue, ["u", msg.queue, msg.id, int(msg.state),
                                           msg.delivery_count, msg.ready_at,
                                           msg.lease_deadline]))

    def _delete(self, msg: Message) -> None:
        batch = self.store.stage((OP_DELETE, (msg.seq,)))
        if self.replicating:
            batch.rops.append((msg.queue, ["d", msg.queue, msg.id]))

    def _become_ready(self, q: Queue, msg: Message, now: float) -> None:
        q.move(msg, Event.DUE)
        if msg.expires_at is not None and msg.expires_at <= now:
            self._dead_letter(q, msg, "expired", now)
        else:
            q.push_ready(msg)

    def _detach(self, msg: Message) -> None:
        c: Consumer | None = msg.owner
        if c is not None:
            msg.owner = None
            c.session.leases.discard(msg)
            if c.replenish:
                c.credit += 1

    def _end_lease(self, q: Queue, msg: Message, now: float, event: Event,
                   delay: float = 0.0) -> None:
        """Back to ready (or delayed), or on to the DLQ past max_deliveries."""
        self._detach(msg)
        msg.lease_deadline = None
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
        self._update(msg)

    def _dead_letter(self, q: Queue, msg: Message, reason: str, now: float) -> Batch:
        """Move a message to the queue's DLQ, or drop it (counted) when there is none."""
        self._detach(msg)
        dlq = self.queues.get(q.options.dead_letter_queue or "")
        q.move(msg, Event.DEAD_LETTER if dlq is not None else Event.DROP)
        q.remove(msg)
        q.dead_lettered += 1
        if reason == "expired":
            q.expired += 1
        if dlq is None:
            q.dropped += 1
        self._delete(msg)
        if dlq is not None:
            self._ensure_created(dlq)
            headers = dict(msg.headers)
            headers["x-death"] = {"queue": q.name, "reason": reason,
                                  "delivery_count": msg.delivery_count, "time": now}
            moved = Message(self._next_seq(), msg.id, dlq.name, msg.body, headers,
                            self._stamp(now), self.node_id)
            if dlq.options.message_ttl is not None:
                moved.expires_at = now + dlq.options.message_ttl
            self._put(moved)
            self.store.current_batch().add_callback(
                lambda err: self._committed(dlq, [moved], err))
        return self._stage_counters(q)

    def _next_seq(self) -> int:
        seq = self._seq
        self._seq += 1
        return seq

    def _committed(self, q: Queue, msgs: list[Message], error: BaseException | None) -> None:
        """Messages whose put committed become visible (unless their queue went away);
        those leased at send time go to their consumer now."""
        if error is not None or self.queues.get(q.name) is not q:
            for msg in msgs:
                if msg.owner is not None:
                    self._unreserve(msg)
            if self.queues.get(q.name) is q:  # the refunded credit may take a ready one
                self._dispatch(q, self.clock.time())
            return
        now = self.clock.time()
        out: dict[Consumer, list[Message]] = {}
        for msg in msgs:
            c = msg.owner
            if msg.id in q.messages:  # a dedup race left a twin; keep the first
                if c is not None:
                    self._unreserve(msg)
                continue
            if c is not None:
                c.pending -= 1
                if c.session.closed or c.cancelled:  # gone before it could be handed over
                    msg.owner, msg.lease_deadline = None, None
                    msg.state, msg.delivery_count = State.READY, 0
                    self._update(msg)
                else:
                    c.session.leases.add(msg)
                    self._add_timer(msg.lease_deadline, _T_LEASE, msg)  # type: ignore[arg-type]
                    out.setdefault(c, []).append(msg)
            q.add(msg)
            self._schedule_message(msg)
        for c, leased in out.items():
            self._hand_over(c, leased)
        limit = q.options.max_length
        while limit is not None and q.ready > limit:
            head = q.pop_ready()
            if head is None:
                break
            self._dead_letter(q, head, "maxlen", now)
        self._dispatch(q, now)

    def _dispatch(self, q: Queue, now: float) -> None:
        """Lease ready messages to consumers with credit, round-robin."""
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
            if msg.expires_at is not None and msg.expires_at <= now:
                self._dead_letter(q, msg, "expired", now)
                continue
            q.move(msg, Event.LEASE)
            msg.delivery_count += 1
            vt = c.visibility_timeout or q.options.visibility_timeout
            msg.lease_deadline = now + vt
            msg.owner = c
            c.credit -= 1
            c.session.leases.add(msg)
            self._add_timer(msg.lease_deadline, _T_LEASE, msg)
            self._update(msg)
            if c in out:
                out[c].append(msg)
            else:
                out[c] = [msg]
        if not out:
            return
        # A lease (and its delivery count) is durable before the consumer sees the message,
        # so that after a crash the message comes back redelivered, counted.
        batch = self.store.current_batch()
        for c, msgs in out.items():
            c.pending += len(msgs)
            batch.add_callback(functools.partial(self._deliver, c, msgs))

    def _deliver(self, c: Consumer, msgs: list[Message], error: BaseException | None) -> None:
        """Hand over messages whose lease committed, unless the lease ended meanwhile."""
        c.pending -= len(msgs)
        if c.session.closed:
            return
        still = [m for m in msgs if m.owner is c and m.state == State.LEASED]
        if error is not None or c.cancelled:  # never handed over: back to ready
            now = self.clock.time()
            for m in still:
                q = self.queues.get(m.queue)
                if q is not None and q.messages.get(m.id) is m:
                    m.delivery_count -= 1
                    self._end_lease(q, m, now, Event.REQUEUE)
                    self._dispatch(q, now)
            if not c.replenish and c.pending == 0 and not c.cancelled:
                c.sink(c, [])  # wake the pull receive that waits for them
            return
        if still or not c.replenish:  # a pull receive waits to hear, even of nothing
            self._hand_over(c, still)

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
            c.credit += 1
            if not c.replenish and c.pending == 0:
                c.sink(c, [])  # wake the pull receive that waits for it

    # -- operations ----------------------------------------------------------------------
    def declare(self, name: Any, options: Any = None, *, passive: bool = False) -> Pending:
        if not isinstance(name, str) or not name or len(name) > 255:
            raise BadRequest("queue name must be a non-empty string of at most 255 characters")
        q = self.queues.get(name)
        if passive:
            if q is None:
                raise NotFound(f"queue {name!r} does not exist")
            return Pending(q.created, self.queue_stats(q))
        opts = QueueOptions.from_dict(options or {})
        if opts.dead_letter_queue == name:
            raise BadRequest("a queue cannot be its own dead_letter_queue")
        if q is not None:
            differ = q.options.diff(opts)
            if differ:
                raise PreconditionFailed(
                    f"queue {name!r} exists with different options: "
                    + ", ".join(f"{k}={getattr(q.options, k)!r} (asked {getattr(opts, k)!r})"
                                for k in differ))
            self._ensure_created(q)
            created = q.created if q.created is not None and not q.created.done else None
            return Pending(created, self.queue_stats(q))
        q = Queue(name, opts)
        self.queues[name] = q
        q.created = self._stage_counters(q)
        return Pending(q.created, self.queue_stats(q))

    def _ensure_created(self, q: Queue) -> None:
        """Stage the queue's row again unless it committed or commits with the open batch.

        Its declare may have failed (or be in flight and fail); what is staged next for the
        queue must not be confirmed without the row, or a restart would drop it."""
        created = q.created
        if (created is not None and (created.error is not None or not created.done)
                and created is not self.store.current_batch()):
            q.created = self._stage_counters(q)

    def delete_queue(self, name: Any) -> Pending:
        q = self.queue(name)
        del self.queues[name]
        self.totals.pop(name, None)
        for c in list(q.consumers):
            c.session.consumers.pop(c.tag, None)
            if c.replenish:
                c.session.cancelled(c.tag, "queue deleted")
        q.consumers.clear()
        for msg in q.messages.values():
            if msg.state == State.LEASED:
                self._detach(msg)
            q.move(msg, Event.DROP)
        count = len(q.messages)
        q.messages.clear()
        for key in [k for k in self._dedup if k[0] == name]:
            del self._dedup[key]
        batch = self.store.stage((OP_DROP_QUEUE, (name,)))
        if self.replicating:
            batch.rops.append((name, ["x", name]))
        return Pending(batch, count)

    def purge(self, name: Any) -> Pending:
        """Drop every ready and delayed message (leased ones stay, as in RabbitMQ)."""
        q = self.queue(name)
        doomed = [m for m in q.messages.values() if m.state in (State.READY, State.DELAYED)]
        for msg in doomed:
            q.move(msg, Event.DROP)
            q.remove(msg)
            self._delete(msg)
        q.compact()
        return Pending(self.store.current_batch() if doomed else None, len(doomed))

    def send(self, name: Any, messages: Any) -> Pending:
        """Stage a batch of messages; the Pending result is their ids, in order."""
        q = self.queue(name)
        if not isinstance(messages, list) or not messages:
            raise BadRequest("'messages' must be a non-empty list")
        if len(messages) > self.limits.max_batch:
            raise TooLarge(f"a batch holds at most {self.limits.max_batch} messages")
        now = self.clock.time()
        parsed = [self._parse_message(m, i) for i, m in enumerate(messages)]
        self._ensure_created(q)
        ids: list[str] = []
        fresh: list[Message] = []
        fresh_dedup: list[str | None] = []
        wait_for: Batch | None = None
        window = self.limits.dedup_window
        qttl = q.options.message_ttl
        store = self.store
        # A fair queue with no backlog leases a new message to a waiting consumer in the
        # same commit as the message itself: one commit from send to delivery.
        direct = q.options.ordering == "fair" and bool(q.consumers)
        for body, headers, ttl, delay, dedup_id in parsed:
            if dedup_id is not None:
                hit = self._dedup.get((name, dedup_id))
                if hit is not None and hit[1] > now:
                    ids.append(hit[0])
                    if hit[2] is not None and not hit[2].done:
                        wait_for = hit[2]
                    continue
            hlc = self._stamp(now)
            msg = Message(self._next_seq(), f"{hlc:016x}-{self.node_id}", name, body, headers,
                          hlc, self.node_id)
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
                    c.credit -= 1
                    c.pending += 1
                    msg.state, msg.delivery_count, msg.owner = State.LEASED, 1, c
                    msg.lease_deadline = now + (c.visibility_timeout
                                                or q.options.visibility_timeout)
            batch = self._put(msg)
            if dedup_id is not None:
                self._dedup[name, dedup_id] = (msg.id, now + window, batch)
                store.stage((OP_DEDUP, (name, dedup_id, msg.id, now + window)))
                if self.replicating:
                    batch.rops.append((name, ["k", name, dedup_id, msg.id, now + window]))
            ids.append(msg.id)
            fresh.append(msg)
            fresh_dedup.append(dedup_id)
        if not fresh:
            return Pending(wait_for, ids)
        batch = store.current_batch()
        if batch is not self._sends_batch:  # one callback per batch, not per send
            self._sends_batch, self._sends = batch, []
            batch.add_callback(functools.partial(self._sent, self._sends))
        self._sends.append((q, fresh, fresh_dedup))
        return Pending(batch, ids, also=wait_for)

    def _sent(self, sends: list[tuple[Queue, list[Message], list[str | None]]],
              error: BaseException | None) -> None:
        by_queue: dict[Queue, list[Message]] = {}
        for q, msgs, dedup_ids in sends:
            if error is not None:  # nothing was written: forget the dedup entries
                for msg, dedup_id in zip(msgs, dedup_ids, strict=True):
                    if dedup_id is None:
                        continue
                    entry = self._dedup.get((q.name, dedup_id))
                    if entry is not None and entry[0] == msg.id:
                        del self._dedup[q.name, dedup_id]
            if q in by_queue:
                by_queue[q].extend(msgs)
            else:
                by_queue[q] = list(msgs)
        for q, msgs in by_queue.items():  # one dispatch per queue, not per send
            if error is None and self.queues.get(q.name) is q:  # not deleted meanwhile
                self.totals[q.name]["published"] += len(msgs)
            self._committed(q, msgs, error)

    def _parse_message(self, m: Any, i: int) -> tuple[bytes, dict[str, Any], Any, Any, Any]:
        if type(m) is dict and len(m) == 1:  # the common case: a body and nothing else
            body = m.get("body")
            if type(body) is bytes and len(body) <= self.limits.max_message_bytes:
                return body, {}, None, None, None
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
        if dedup_id is not None and (not isinstance(dedup_id, str) or not dedup_id):
            raise BadRequest(f"message {i}: 'dedup_id' must be a non-empty string")
        unknown = set(m) - {"body", "headers", "ttl", "delay", "dedup_id"}
        if unknown:
            raise BadRequest(
                f"message {i}: unknown field(s) {', '.join(sorted(map(str, unknown)))}")
        return body, headers, ttl, delay, dedup_id

    def consume(self, session: Session, name: Any, prefetch: Any,
                sink: Callable[[Consumer, list[Message]], None] | None = None) -> str:
        """Subscribe: deliveries are pushed while the consumer has credit (prefetch)."""
        q = self.queue(name)
        if (isinstance(prefetch, bool) or not isinstance(prefetch, int)
                or not 1 <= prefetch <= 65535):
            raise BadRequest("'prefetch' must be an integer from 1 to 65535")
        c = Consumer(q, session, prefetch, replenish=True,
                     sink=sink or (lambda c, msgs: c.session.push(c.tag, msgs)))
        c.tag = self.tag_prefix + c.tag  # unique in the cluster: a client may relay
        session.consumers[c.tag] = c
        q.consumers.append(c)
        self._dispatch(q, self.clock.time())
        return c.tag

    def cancel(self, session: Session, tag: Any) -> None:
        """Stop a subscription; its leases stay until acked, nacked or disconnected."""
        c = session.consumers.pop(tag, None) if isinstance(tag, str) else None
        if c is None:
            raise NotFound(f"no consumer {tag!r} on this connection")
        c.credit, c.replenish, c.cancelled = 0, False, True
        try:
            c.queue.consumers.remove(c)
        except ValueError:
            pass

    async def receive(self, session: Session, name: Any, max_messages: Any = 1,
                      wait: Any = 0.0, visibility_timeout: Any = None) -> list[Message]:
        """Pull up to ``max_messages``, waiting up to ``wait`` s for the first to arrive."""
        q = self.queue(name)
        if (isinstance(max_messages, bool) or not isinstance(max_messages, int)
                or not 1 <= max_messages <= self.limits.max_batch):
            raise BadRequest(f"'max' must be an integer from 1 to {self.limits.max_batch}")
        wait = _number(wait, "wait")
        vt = None if visibility_timeout is None else _number(
            visibility_timeout, "visibility_timeout", minimum=0.001)
        got: list[Message] = []
        arrived, settled = trio.Event(), trio.Event()

        def sink(c: Consumer, msgs: list[Message]) -> None:
            got.extend(msgs)
            c.credit = 0
            arrived.set()
            if c.pending == 0:
                settled.set()

        c = Consumer(q, session, max_messages, replenish=False, sink=sink,
                     visibility_timeout=vt)
        q.consumers.append(c)
        try:
            self._dispatch(q, self.clock.time())
            if c.pending == 0 and wait > 0:
                with trio.move_on_after(wait):
                    await arrived.wait()
        finally:
            c.credit = 0  # no new leases from here on
            try:
                q.consumers.remove(c)
            except ValueError:
                pass
        if c.pending:  # leases granted whose commit is still under way
            await settled.wait()
        return got

    def _leased_by(self, session: Session, q: Queue, ids: Any,
                   ) -> tuple[list[Message], dict[str, str]]:
        if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
            raise BadRequest("'ids' must be a list of message ids")
        mine, failed = [], {}
        for mid in ids:
            msg = q.messages.get(mid)
            if msg is None:
                failed[mid] = "no such message (already acked, expired or deleted)"
            elif msg.state != State.LEASED or msg.owner is None or msg.owner.session is not session:
                failed[mid] = "not leased to this connection (lease expired or released)"
            else:
                mine.append(msg)
        return mine, failed

    def ack(self, session: Session, name: Any, ids: Any) -> Pending:
        """Remove leased messages; result is {'acked': [...], 'failed': {id: why}}."""
        q = self.queue(name)
        mine, failed = self._leased_by(session, q, ids)
        for msg in mine:
            self._detach(msg)
            q.move(msg, Event.ACK)
            q.remove(msg)
            self._delete(msg)
        if mine:
            self._dispatch(q, self.clock.time())
        result = {"acked": [m.id for m in mine], "failed": failed}
        pending = Pending(self.store.current_batch() if mine else None, result)
        if mine:  # counted once durable, as sends are
            pending.then(functools.partial(self._count_acked, q, len(mine)))
        return pending

    def _count_acked(self, q: Queue, n: int, _result: Any,
                     error: BaseException | None) -> None:
        if error is None and self.queues.get(q.name) is q:
            self.totals[q.name]["acked"] += n

    def nack(self, session: Session, name: Any, ids: Any, *, requeue: Any = True,
             delay: Any = 0.0) -> Pending:
        """Requeue now or after ``delay`` s, or (requeue=False) dead-letter right away."""
        q = self.queue(name)
        if not isinstance(requeue, bool):
            raise BadRequest("'requeue' must be a boolean")
        delay = _number(delay, "delay")
        mine, failed = self._leased_by(session, q, ids)
        now = self.clock.time()
        for msg in mine:
            if not requeue:
                self._dead_letter(q, msg, "rejected", now)
            else:
                self._end_lease(q, msg, now, Event.REQUEUE_LATER if delay else Event.REQUEUE,
                                delay)
        if mine:
            self._dispatch(q, now)
        result = {"nacked": [m.id for m in mine], "failed": failed}
        return Pending(self.store.current_batch() if mine else None, result)

    def extend(self, session: Session, name: Any, ids: Any, timeout: Any) -> dict[str, Any]:
        """Move the lease deadline of leased messages to now + ``timeout`` s."""
        q = self.queue(name)
        timeout = _number(timeout, "timeout", minimum=0.001)
        mine, failed = self._leased_by(session, q, ids)
        now = self.clock.time()
        for msg in mine:
            msg.lease_deadline = now + timeout
            self._add_timer(msg.lease_deadline, _T_LEASE, msg)
            self._update(msg)
        return {"extended": [m.id for m in mine], "failed": failed}

    def close_session(self, session: Session) -> None:
        """The connection is gone: drop its consumers, release its leases."""
        session.closed = True
        for c in session.consumers.values():
            c.credit, c.replenish, c.cancelled = 0, False, True
            try:
                c.queue.consumers.remove(c)
            except ValueError:
                pass
        session.consumers.clear()
        now = self.clock.time()
        touched = set()
        for msg in list(session.leases):
            q = self.queues.get(msg.queue)
            if q is not None and q.messages.get(msg.id) is msg and msg.state == State.LEASED:
                self.redeliveries += 1
                self._end_lease(q, msg, now, Event.REQUEUE)
                touched.add(q)
        session.leases.clear()
        for q in touched:
            self._dispatch(q, now)

    # -- the mesh: replicas that do not dispatch, and taking over ------------------------
    def apply(self, rops: list[Any]) -> Batch:
        """Apply replica ops (from the queue's dispatching node, or a repair) to memory and
        the store; they are not replicated on. Ops on a queue or message this node does
        not have are skipped: anti-entropy brings the whole record. Returns the batch."""
        now = self.clock.time()
        store = self.store
        replicating, self.replicating = self.replicating, False
        try:
            for rop in rops:
                kind = rop[0]
                if kind == "p":
                    (_, mid, qname, hlc, node, body, headers, state, count, ready_at, exp,
                     lease) = rop
                    q = self.queues.get(qname)
                    if q is None:
                        continue
                    if hlc > self.hlc.last:  # a later takeover stamps above it (fifo)
                        with contextlib.suppress(ClockOffsetError):
                            self.hlc.receive(hlc, int(now * 1000))
                    msg = q.messages.get(mid)
                    if msg is None:
                        msg = Message(self._next_seq(), mid, qname, body,
                                      msgpack.unpackb(headers) if headers else {}, hlc, node,
                                      State(state), count, ready_at, exp, lease)
                        q.add(msg)
                        if q.active:
                            self._schedule_all(msg, now)
                    else:
                        self._set(q, msg, State(state), count, ready_at, lease, now)
                    self._put(msg)
                elif kind == "u":
                    _, qname, mid, state, count, ready_at, lease = rop
                    q = self.queues.get(qname)
                    msg = q.messages.get(mid) if q is not None else None
                    if q is None or msg is None:
                        continue
                    self._set(q, msg, State(state), count, ready_at, lease, now)
                    self._update(msg)
                elif kind == "d":
                    _, qname, mid = rop
                    q = self.queues.get(qname)
                    msg = q.messages.get(mid) if q is not None else None
                    if q is None or msg is None:
                        store.stage((OP_TOMBSTONE, (qname, mid)))
                        continue
                    self._detach(msg)
                    q.set_state(msg, State.ACKED)
                    q.remove(msg)
                    self._delete(msg)
                elif kind == "q":
                    _, name, options, dead_lettered, expired, dropped = rop
                    q = self.queues.get(name)
                    if q is None:
                        q = self.queues[name] = Queue(name, QueueOptions.from_dict(options))
                        q.active = False
                    else:
                        q.options = QueueOptions.from_dict(options)
                    q.dead_lettered, q.expired, q.dropped = dead_lettered, expired, dropped
                    q.created = self._stage_counters(q)
                elif kind == "x":
                    if rop[1] in self.queues:
                        self.delete_queue(rop[1])
                elif kind == "k":
                    _, qname, dedup_id, mid, expires_at = rop
                    if expires_at > now:
                        self._dedup[qname, dedup_id] = (mid, expires_at, None)
                        store.stage((OP_DEDUP, (qname, dedup_id, mid, expires_at)))
        finally:
            self.replicating = replicating
        return store.current_batch()

    def _set(self, q: Queue, msg: Message, state: State, count: int, ready_at: float,
             lease: float | None, now: float) -> None:
        if msg.state == State.LEASED and state != State.LEASED:
            self._detach(msg)
        q.set_state(msg, state)
        msg.delivery_count, msg.ready_at, msg.lease_deadline = count, ready_at, lease
        if q.active:
            self._schedule_all(msg, now)

    def _schedule_all(self, msg: Message, now: float) -> None:
        """Its delay and TTL timers, and the deadline of a lease recorded without its
        consumer here (granted by another node, which may be gone): it ends then, as any
        unacked lease does."""
        self._schedule_message(msg)
        if msg.state == State.LEASED and msg.owner is None:
            if msg.lease_deadline is None:
                msg.lease_deadline = now
            self._add_timer(msg.lease_deadline, _T_LEASE, msg)

    def activate(self, q: Queue) -> None:
        """This node dispatches ``q`` from now on: its timers run and consumers get leases."""
        if q.active:
            return
        q.active = True
        now = self.clock.time()
        for msg in q.messages.values():
            self._schedule_all(msg, now)
        self._dispatch(q, now)

    def deactivate(self, q: Queue, reason: str) -> None:
        """Another node dispatches ``q`` now: end its consumers here (told ``reason``);
        leases stay recorded until their deadline, for the new dispatcher to honour."""
        if not q.active:
            return
        q.active = False
        for c in list(q.consumers):
            c.session.consumers.pop(c.tag, None)
            c.credit, c.cancelled = 0, True
            if c.replenish:
                c.replenish = False
                c.session.cancelled(c.tag, reason)
        q.consumers.clear()
        for msg in q.messages.values():
            if msg.owner is not None:
                self._detach(msg)

    def forget(self, q: Queue) -> None:
        """Drop this node's copy of an inactive queue's messages (handed to the holders):
        no tombstones, since the messages live on elsewhere."""
        for msg in list(q.messages.values()):
            q.set_state(msg, State.DROPPED)
            q.remove(msg)
            self.store.stage((OP_FORGET, (msg.seq,)))

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

    def stats(self, name: Any = None) -> list[dict[str, Any]]:
        if name is not None:
            return [self.queue_stats(self.queue(name))]
        return [self.queue_stats(q) for q in sorted(self.queues.values(), key=lambda q: q.name)]


def _pack_options(options: QueueOptions) -> bytes:
    return msgpack.packb(options.to_dict(), use_bin_type=True)
