"""The backlog on disk: a partition held alone keeps at most ``hot_ready`` READY messages
in memory; the newer ones stay in the store only, counted, and are paged in, in (HLC, seq)
order, as consumers take the ones in memory.

State here, per partition (on its Queue): ``cold``, how many READY messages are in the
store only (counted in ``counts[READY]`` too); ``cold_after``, an (hlc, seq) that every
one of them is after; ``cold_gen``, bumped when the cold ones are dropped wholesale (a
purge, a deletion, a hand-off), which makes a page read meanwhile stale. Here: the
partitions waiting for a page. Never: a message in memory that is also counted cold (a
page skips every id memory knows: indexed, tombstoned, or in flight); a message counted
cold before its put committed; a cold message on a partition that another node holds too
(what replication compares and merges is in memory: ``warm`` reads them all back first).

Paging is for partitions this node holds alone (the embedded node; a cluster's
``replicas=1`` queues): ``Broker.hand_over_early`` says which. Delays, leases and timers
stay in memory; a cold message's TTL is checked when it is paged in or reaches the head,
as RabbitMQ expires messages at the head of a queue.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import trio

from meshq.broker.queue import Queue
from meshq.model import Message
from meshq.states import State

if TYPE_CHECKING:
    from meshq.broker.core import Broker

__all__ = ["HOT_READY", "PAGE", "REFILL_BELOW", "Backlog"]

log = logging.getLogger("meshq.broker.backlog")

HOT_READY = 2048  # READY messages of a partition kept in memory; newer ones stay on disk
TOMBS_KEPT = 8192  # tombstones of a partition kept in memory (the rest: in the store)
RECHECK_TOMBS = 1024  # deletes before a replicated partition is asked again
# Page in when fewer than this are in memory: early, so that a consumer draining the
# partition at full speed never finds it empty while a page is read (a page of ~500 takes
# 4-20 ms under load; 1,500 messages last 40 ms at 40,000 msg/s).
REFILL_BELOW = 1536
PAGE = 4096  # messages read per page when warming a partition whole


class Backlog:
    """The paging of one Broker's partitions; see the module docstring."""

    def __init__(self, broker: Broker) -> None:
        self.b = broker
        self.hot_ready = HOT_READY
        self.refill_below = REFILL_BELOW
        self._wanted: dict[Queue, None] = {}  # (a dict: deterministic order)
        self._wake = trio.Event()
        self.tombs_kept = TOMBS_KEPT
        self.paged_out = 0  # messages left on disk at their commit, since start
        self.paged_in = 0  # messages read back, since start

    def pageable(self, q: Queue) -> bool:
        return self.b.store.pages and self.b.hand_over_early(q)

    def restore(self, q: Queue, count: int, after: tuple[int, int]) -> None:
        """At start-up: ``count`` READY messages of ``q`` after ``after`` left on disk."""
        q.cold, q.cold_after = count, after
        q.counts[State.READY] += count

    def stays_cold(self, q: Queue, msg: Message, pageable: bool) -> bool:
        """At the commit of a new message: True when it stays on disk only (counted).
        ``pageable``: ``self.pageable(q)``, asked once per commit by the caller."""
        if msg.state != State.READY or msg.owner is not None or not pageable:
            return False
        key = (msg.hlc, msg.seq)
        if q.cold:
            if key <= q.cold_after:
                return False  # before the cold ones (stamped elsewhere): kept in memory
        elif q.ready < self.hot_ready:
            return False
        else:
            q.cold_after = (msg.hlc, msg.seq - 1)
        q.cold += 1
        q.counts[State.READY] += 1
        self.paged_out += 1
        return True

    def drop(self, q: Queue) -> int:
        """The cold messages are gone (the caller stages their deletion): how many."""
        n = q.cold
        q.counts[State.READY] -= n
        q.cold = 0
        q.cold_gen += 1
        return n

    def trim_tombs(self, q: Queue) -> None:
        """Past ``tombs_kept`` tombstones, a partition held alone keeps the newer half in
        memory (the store has every one, for ``warm`` to read back). Called on every
        delete past that; a replicated partition (which keeps them all) is asked again
        only every RECHECK_TOMBS deletes, not on each ack."""
        if q.tombs_recheck > 0:
            q.tombs_recheck -= 1
            return
        if not self.pageable(q):
            q.tombs_recheck = RECHECK_TOMBS
            return
        q.tombs = dict(list(q.tombs.items())[-(self.tombs_kept // 2):])  # (the newest)
        q.tombs_on_disk = True

    def want(self, q: Queue) -> None:
        """After a dispatch: page in if few READY messages are left in memory."""
        if q.cold and q.ready - q.cold < self.refill_below and q not in self._wanted:
            self._wanted[q] = None
            self._wake.set()

    async def run(self) -> None:
        """Read the pages wanted, one partition at a time, forever."""
        while True:
            await self._wake.wait()
            self._wake = trio.Event()
            while self._wanted:
                q = next(iter(self._wanted))
                gen, after = q.cold_gen, q.cold_after
                limit = max(1, self.hot_ready - (q.ready - q.cold))
                try:
                    msgs = await self.b.store.read_ready_async(q.name, q.index, after, limit)
                except Exception:  # (a read error: try again at the next dispatch)
                    log.exception("paging in %s/%d", q.name, q.index)
                    msgs = None
                self._wanted.pop(q, None)
                if msgs is not None and self._apply(q, gen, msgs, limit):
                    self.b._page_came(q)

    async def warm(self, q: Queue) -> None:
        """Read every cold message and stored tombstone of ``q`` back into memory
        (another node is to compare or merge this partition)."""
        await self.warm_tombs(q)
        while q.cold and self.b.live(q):
            gen = q.cold_gen
            msgs = await self.b.store.read_ready_async(q.name, q.index, q.cold_after, PAGE)
            if not self._apply(q, gen, msgs, PAGE):
                break
        self.b._page_came(q)

    async def warm_tombs(self, q: Queue) -> None:
        """Read the stored tombstones of ``q`` back into memory, if some may be there only
        (whether it holds anything: ``Queue.has_copy``)."""
        if q.tombs_on_disk:
            self._tombs_came(q, await self.b.store.read_tombs_async(q.name, q.index))

    def warm_now(self, q: Queue) -> None:
        """``warm``, blocking: for a merge into a partition that still has cold messages
        (a hand-off to a partition held alone, a stale dispatcher's changes): rare."""
        if q.tombs_on_disk:
            self._tombs_came(q, self.b.store.read_tombs(q.name, q.index))
        while q.cold and self.b.live(q):
            gen = q.cold_gen
            msgs = self.b.store.read_ready(q.name, q.index, q.cold_after, PAGE)
            if not self._apply(q, gen, msgs, PAGE):
                break

    def _tombs_came(self, q: Queue, stored: list[tuple[str, float]]) -> None:
        if not q.tombs_on_disk:
            return  # (read twice meanwhile)
        merged = dict(stored)
        merged.update(q.tombs)
        q.tombs = dict(sorted(merged.items(), key=lambda t: t[1]))  # (oldest first)
        q.tombs_on_disk = False

    def _apply(self, q: Queue, gen: int, msgs: list[Message], limit: int) -> bool:
        """Index a page read at ``gen``; False when it was stale or nothing came."""
        if not self.b.live(q) or q.cold_gen != gen:
            return False
        entry = self.b.catalog.get(q.name)
        in_flight = self.b.in_flight
        for msg in msgs:
            q.cold_after = (msg.hlc, msg.seq)
            if (msg.id in q.messages or msg.id in q.tombs or msg.id in in_flight
                    or entry is None or entry.absorbs(msg.inc)):
                continue  # known here (never counted cold), or gone
            q.cold -= 1
            q.counts[State.READY] -= 1
            q.add(msg)
            self.paged_in += 1
            if q.active:
                self.b._schedule_message(msg)
        if len(msgs) < limit and q.cold:
            # The store holds fewer than counted: a page read just before a commit, or a
            # count gone wrong. Two short reads in a row: trust the store.
            q.cold_misses += 1
            if q.cold_misses >= 2:
                log.warning("%s/%d: %d cold messages counted but not on disk", q.name,
                            q.index, q.cold)
                self.drop(q)
        else:
            q.cold_misses = 0
        return bool(msgs)
