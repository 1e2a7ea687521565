"""The backlog on disk: a partition keeps at most ``hot_ready`` READY messages in memory
(about: those that change meanwhile stay); the others stay in the store only, counted,
and are paged in, in (HLC, seq) order, as consumers take the ones in memory (or by id,
where a merge names one).

State here, per partition (on its Queue): ``cold``, how many READY messages are in the
store only (counted in ``counts[READY]`` too); ``cold_after``, an (hlc, seq) that every
one of them is after; ``cold_top``, an HLC at or above theirs; ``cold_gen``, bumped when
the cold ones are dropped wholesale (a purge, a deletion, a hand-off), which makes a page
read meanwhile stale; ``sums.cold``, their digest shares (meshq.broker.digests). Here: the
partitions waiting for a page. Never: a message in memory that is also counted cold (a
page skips every id memory knows: indexed, tombstoned, or in flight); a message counted
cold before its row committed as memory holds it (a send leased at its commit and
undone there, a merge whose progress moved since, stays in memory); a cold message that
changes while cold (a merge or a fetch that names it pages that one message in first:
``page_ids``); a read of a whole backlog on the event loop (the keys of the cold
messages are read in a worker thread, by ``count_cold`` and ``cold_members``).

Who pages: the dispatcher of a partition, and a node that holds one alone (the embedded
node; a cluster's ``replicas=1`` queues: ``Broker.hand_over_early``), at each commit of
a send. A holder that does not dispatch pages out what replication merges into it, at
that merge's commit (``page_out``), and pages in by id what the dispatcher's changes
name (``page_ids``), never in order. ``pinned``: reads that look at the store and at
memory in turn hold a partition so that nothing leaves memory between the two. Leases
stay in memory; a cold message's TTL is checked when it is paged in or reaches the head,
as RabbitMQ expires messages at the head of a queue.

Delays (``late``): a partition held alone keeps at most twice ``hot_delayed`` DELAYED
messages in memory; past that, at a commit of sends, those due last (never delivered,
their put committed) leave memory, counted in ``late`` (and in ``counts[DELAYED]``), all
after ``late_after`` (ready_at, seq); the broker's timers wake ``LATE_LEAD`` s before
that is due and a page is read in (ready_at, seq) order, their own timers then running as
any delay's, while the partition has room (fewer than twice ``hot_ready`` READY and
twice ``hot_delayed`` DELAYED in memory; ``want`` asks again as consumers take). A
start leaves the DELAYED messages past the first ``hot_ready`` on disk the same way, on
every partition. Replication does not read delays on disk: before it compares, merges or
copies a partition, ``warm_tombs`` reads them all back (``tombs_on_disk`` is set while
there are some). Never: a late message also in memory; one due and not read back while
its partition has room.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import trio

from meshq.broker.digests import MOD, add_share, message_key, walk
from meshq.broker.queue import Queue
from meshq.cluster.lattice import BUCKETS, bucket_of
from meshq.errors import Unavailable
from meshq.model import Message
from meshq.states import State

if TYPE_CHECKING:
    from meshq.broker.core import Broker

__all__ = ["HOT_DELAYED", "HOT_READY", "REFILL_BELOW", "Backlog"]

log = logging.getLogger("meshq.broker.backlog")

HOT_READY = 2048  # READY messages of a partition kept in memory; newer ones stay on disk
TOMBS_KEPT = 8192  # tombstones of a partition kept in memory (the rest: in the store)
RECHECK_TOMBS = 1024  # deletes before a replicated partition is asked again
# Page in when fewer than this are in memory: early, so that a consumer draining the
# partition at full speed never finds it empty while a page is read (a page of ~500 takes
# 4-20 ms under load; 1,500 messages last 40 ms at 40,000 msg/s).
REFILL_BELOW = 1536
WHOLE_PAGE = 4096  # messages read at a time by page_all_now
# DELAYED messages of a partition held alone kept in memory (the first due): past twice
# this, those due last stay on disk only, and are read back LATE_LEAD s before the first
# of them is due, a page at a time, while fewer than twice HOT_READY READY messages are
# in memory (due ones wait on disk meanwhile: memory stays bounded under a flood of them).
HOT_DELAYED = 2048
LATE_LEAD = 2.0
COUNT_TRIES = 3  # counts of the cold shares spoilt by a change meanwhile before giving up


class _Counting:
    """A count of a partition's cold shares under way (``Backlog.count_cold``): the cold
    messages whose seq is at most ``old_seq`` are counted from the store; those that stay
    cold meanwhile (seq above it) are added to ``new`` here. ``spoilt``: one counted from
    the store changed meanwhile (paged in, dropped), so the count is thrown away."""

    __slots__ = ("done", "new", "old_seq", "read", "spoilt")

    def __init__(self, old_seq: int) -> None:
        self.old_seq = old_seq
        self.new = [0] * BUCKETS
        self.spoilt = False
        self.read = False  # the store's rows were folded (what leaves memory now is not)
        self.done = trio.Event()


class Backlog:
    """The paging of one Broker's partitions; see the module docstring."""

    def __init__(self, broker: Broker) -> None:
        self.b = broker
        self.hot_ready = HOT_READY
        self.refill_below = REFILL_BELOW
        self._wanted: dict[Queue, None] = {}  # (a dict: deterministic order)
        self._wake = trio.Event()
        self.tombs_kept = TOMBS_KEPT
        # Since start: messages left on disk at their commit (``shared``: of them, on a
        # partition another node holds too), messages found on disk at the start, read
        # back (``by_id``: of them, one at a time, for a merge or a dedup hit), and counts
        # of the cold shares from the store.
        self.paged_out = self.paged_out_shared = self.restored = 0
        self.paged_in = self.paged_in_by_id = 0
        self.counts = 0
        # Delays on disk (``late``): partitions with some, whose next page is not asked
        # yet; those whose page is asked; those whose page waits for room; and counters
        # (messages that left memory, came back).
        self.hot_delayed = HOT_DELAYED
        self._late: dict[Queue, None] = {}
        self._late_wanted: dict[Queue, None] = {}
        self._late_blocked: dict[Queue, None] = {}
        self.late_out = self.late_in = 0
        # Partitions whose memory and store a read looks at in turn (``pinned``): their
        # messages due to leave memory wait here until it is done.
        self._pins: dict[Queue, int] = {}
        self._deferred: dict[Queue, list[tuple[Queue, Message, tuple[Any, ...]]]] = {}

    def alone(self, q: Queue) -> bool:
        """Whether this node alone holds ``q`` (its tombstones may stay on disk)."""
        return self.b.store.pages and self.b.hand_over_early(q)

    def pageable(self, q: Queue) -> bool:
        """Whether a message committed to ``q`` now may stay on disk: ``q`` is dispatched
        here or held alone."""
        return self.b.store.pages and (q.active or self.b.hand_over_early(q))

    def restore(self, q: Queue, count: int, after: tuple[int, int], top: int) -> None:
        """At start-up: ``count`` READY messages of ``q`` after ``after`` left on disk, their
        HLCs at most ``top``; their shares unknown until a digest counts them."""
        q.cold, q.cold_after, q.cold_top = count, after, max(q.cold_top, top)
        q.counts[State.READY] += count
        self.restored += count
        if count:
            q.sums.cold = None

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
        q.counts[State.READY] += 1
        self._now_cold(q, msg, read_by_count=False)
        return True

    def _now_cold(self, q: Queue, msg: Message, read_by_count: bool) -> None:
        """``msg`` (READY, counted so by the caller) is on disk only from now on: counted
        in ``cold``, its share kept with the cold ones (or with a count under way's, when
        the count's read leaves it out). ``read_by_count``: it was in memory, so a count
        under way reads it from the store if it has not read the store yet and its seq is
        not above the count's (a new message in the same case spoils the count)."""
        if not q.cold:
            q.cold_after = (msg.hlc, msg.seq - 1)
        q.cold += 1
        if msg.hlc > q.cold_top:
            q.cold_top = msg.hlc
        self.paged_out += 1
        sums = q.sums
        if sums.cold is not None:
            if self.b.hand_over_early(q):
                sums.cold = None  # held alone: no digest reads it, so no share is kept
            else:
                add_share(sums.cold, msg)
                self.paged_out_shared += 1
        elif sums.counting is not None:
            counting = sums.counting
            if msg.seq > counting.old_seq or (read_by_count and counting.read):
                add_share(counting.new, msg)  # (the count's read leaves it out)
            elif not read_by_count:
                counting.spoilt = True
            self.paged_out_shared += 1

    def page_out(self, merged: list[tuple[Queue, Message, tuple[Any, ...]]],
                 error: BaseException | None = None) -> None:
        """At the local commit of messages merged into partitions this node holds and
        does not dispatch (``Replica.merge``; each with its ``message_key`` as merged):
        those past ``hot_ready`` READY ones in memory leave it, counted cold (the row
        committed is what memory holds: a page or a read by id finds it), so a holder's
        memory is bounded as its dispatcher's is. One whose progress moved since its
        merge (its row may be behind, a change staged and not yet committed), or that
        would come before the cold ones, stays; on a partition ``pinned`` they wait
        until it is not."""
        if error is not None:
            return
        touched: dict[Queue, None] = {}
        for q, msg, key in merged:
            if (q.active or q.messages.get(msg.id) is not msg or msg.state != State.READY
                    or msg.owner is not None or q.ready - q.cold <= self.hot_ready
                    or not self.b.live(q) or message_key(msg) != key):
                continue
            entry = self.b.catalog.get(q.name)
            if entry is None or entry.absorbs(msg.inc):
                continue  # (an earlier incarnation's, which a drop removes from memory)
            if q.cold and (msg.hlc, msg.seq) <= q.cold_after:
                continue
            if q in self._pins:
                self._deferred.setdefault(q, []).append((q, msg, key))
                continue
            q.evict(msg)  # (its share leaves the hot sums; it is still counted READY)
            touched[q] = None
            self._now_cold(q, msg, read_by_count=True)
        for q in touched:
            q.compact()

    @contextmanager
    def pinned(self, q: Queue) -> Iterator[None]:
        """While open, no message of ``q`` leaves memory for the disk (``page_out``
        defers it): for a read that looks at the store and at memory in turn (a count,
        the members of buckets, records or merges by id), which one moving between them
        would make it miss."""
        self._pins[q] = self._pins.get(q, 0) + 1
        try:
            yield
        finally:
            left = self._pins.pop(q) - 1
            if left:
                self._pins[q] = left
            else:
                later = self._deferred.pop(q, None)
                if later:
                    self.page_out(later)

    def _came_in(self, q: Queue, msg: Message) -> None:
        """A cold message read back from the store comes into memory: counted out of
        ``cold``, its share moved from the cold sums to the hot ones."""
        q.cold -= 1
        q.counts[State.READY] -= 1
        sums = q.sums
        if sums.cold is not None:
            q.add(msg, add_share(sums.cold, msg, -1))
        elif sums.counting is not None and msg.seq > sums.counting.old_seq:
            q.add(msg, add_share(sums.counting.new, msg, -1))
        else:
            if sums.counting is not None:
                sums.counting.spoilt = True
            q.add(msg)
        if not q.cold:
            sums.cold = [0] * BUCKETS  # (none left: nothing to count)
        self.paged_in += 1
        if q.active:
            self.b._schedule_message(msg)

    def drop(self, q: Queue) -> int:
        """The cold messages are gone (the caller stages their deletion): how many."""
        n = q.cold
        q.counts[State.READY] -= n
        q.cold = 0
        q.cold_gen += 1
        q.sums.cold = [0] * BUCKETS
        if q.sums.counting is not None:
            q.sums.counting.spoilt = True
        return n

    def trim_tombs(self, q: Queue) -> None:
        """Past ``tombs_kept`` tombstones, a partition held alone keeps the newer half in
        memory (the store has every one, for ``warm_tombs`` to read back). Called on every
        delete past that; a replicated partition (which keeps them all) is asked again
        only every RECHECK_TOMBS deletes, not on each ack."""
        if q.tombs_recheck > 0:
            q.tombs_recheck -= 1
            return
        if not self.alone(q):
            q.tombs_recheck = RECHECK_TOMBS
            return
        q.tombs = dict(list(q.tombs.items())[-(self.tombs_kept // 2):])  # (the newest)
        q.tombs_on_disk = True

    def want(self, q: Queue, behind: bool = False) -> None:
        """After a dispatch: page in if few READY messages are left in memory, or the
        first of them comes after messages on disk only (``behind``: the caller saw it)."""
        if q in self._late_blocked and self._late_room(q):
            del self._late_blocked[q]
            self._late_wanted[q] = None
            self._wake.set()
        if not q.cold or q in self._wanted:
            return
        if not behind and q.ready - q.cold >= self.refill_below:
            head = q.head_ready()
            behind = head is not None and head.hlc > q.cold_after[0]
        if behind or q.ready - q.cold < self.refill_below:
            self._wanted[q] = None
            self._wake.set()

    def behind_cold(self, q: Queue, msg: Message) -> bool:
        """Whether ``msg``, READY and just taken from the head of ``q``'s ready heap, comes
        after messages on disk only (a message paged in by id, for a merge; one that came
        back from a lease or a delay): then it goes back (the caller waits for a page)."""
        if not q.cold or msg.hlc <= q.cold_after[0]:
            return False
        q.push_ready(msg)
        return True

    async def run(self) -> None:
        """Read the pages wanted, one partition at a time, forever."""
        while True:
            await self._wake.wait()
            self._wake = trio.Event()
            while self._wanted:
                q = next(iter(self._wanted))
                if q.sums.counting is not None:  # (paged once its count is done)
                    self._wanted.pop(q, None)
                    continue
                gen, after = q.cold_gen, q.cold_after
                # (at least a quarter of hot_ready: the head may wait behind this page)
                limit = max(1, self.hot_ready - (q.ready - q.cold), self.hot_ready // 4)
                try:
                    msgs = await self.b.store.read_ready_async(q.name, q.index, after, limit)
                except Exception:  # (a read error: try again at the next dispatch)
                    log.exception("paging in %s/%d", q.name, q.index)
                    msgs = None
                self._wanted.pop(q, None)
                if msgs is not None and self._apply(q, gen, msgs, limit):
                    self.b._page_came(q)
            while self._late_wanted and not self._wanted:
                q = next(iter(self._late_wanted))
                gen, due = q.cold_gen, q.late_after
                limit = max(self.hot_delayed // 4, self.hot_delayed - self.delayed_in_memory(q))
                try:
                    msgs = await self.b.store.read_delayed_async(q.name, q.index, due, limit)
                except Exception:  # (a read error: try again in a while)
                    log.exception("paging in the delays of %s/%d", q.name, q.index)
                    msgs = None
                self._late_wanted.pop(q, None)
                if msgs is not None:
                    self._late_came(q, gen, msgs, limit)
                if q.late and self.b.live(q):
                    self._late[q] = None
                    self.b._wake_timers()

    async def warm_tombs(self, q: Queue) -> None:
        """Read the stored tombstones of ``q`` back into memory, if some may be there only
        (whether it holds anything: ``Queue.has_copy``); and its delays on disk only
        (``late``: what replication compares, merges or copies must be in memory)."""
        if q.tombs_on_disk:
            if q.late:
                self.page_late_now(q)
            self._tombs_came(q, await self.b.store.read_tombs_async(q.name, q.index))

    def warm_tombs_now(self, q: Queue) -> None:
        """``warm_tombs``, blocking (a merge not prepared by ``page_ids``: rare)."""
        if q.tombs_on_disk:
            if q.late:
                self.page_late_now(q)
            self._tombs_came(q, self.b.store.read_tombs(q.name, q.index))

    # -- delays on disk (``late``) --------------------------------------------------------
    def delayed_in_memory(self, q: Queue) -> int:
        return q.counts[State.DELAYED] - q.late

    def restore_late(self, q: Queue, count: int, after: tuple[float, int]) -> None:
        """At start-up: ``count`` DELAYED messages of ``q`` due after ``after`` left on
        disk."""
        q.late, q.late_after = count, after
        q.counts[State.DELAYED] += count
        if count:
            q.tombs_on_disk = True  # (read back before replication looks: warm_tombs)
            self._late[q] = None

    def trim_late(self, q: Queue) -> None:
        """After a commit of sends to ``q``: past twice ``hot_delayed`` DELAYED messages in
        memory of a partition held alone, those due last leave memory (on disk only,
        counted), down to ``hot_delayed``. Only delays never delivered, whose put has
        committed: their row is what memory holds (a nack's delay may not be written
        yet, and stays)."""
        if self.delayed_in_memory(q) <= 2 * self.hot_delayed or not self.alone(q):
            return
        in_flight = self.b.in_flight
        delayed = sorted((m for m in q.messages.values()
                          if m.state == State.DELAYED and not m.delivery_count
                          and m.id not in in_flight), key=lambda m: (m.ready_at, m.seq))
        out = delayed[self.hot_delayed:]
        if not out:
            return
        low = (out[0].ready_at, out[0].seq - 1)  # (every one that leaves is after it)
        if not q.late or low < q.late_after:
            q.late_after = low
        for msg in out:
            q.remove(msg)  # (still counted DELAYED: ``late`` says it is on disk only)
        q.late += len(out)
        self.late_out += len(out)
        q.tombs_on_disk = True  # (read back before replication looks: warm_tombs)
        if q not in self._late_wanted and q not in self._late_blocked:
            self._late[q] = None
            self.b._wake_timers()

    def next_late(self) -> float:
        """When the next page of delays on disk is to be read (inf: none)."""
        return min((q.late_after[0] - LATE_LEAD for q in self._late), default=math.inf)

    def late_due(self, now: float) -> None:
        """The timers' turn: ask the pages of delays due within LATE_LEAD, where there is
        room for them (else ``want`` asks once a consumer made room)."""
        for q in [q for q in self._late if q.late_after[0] - LATE_LEAD <= now]:
            del self._late[q]
            if not q.late or not self.b.live(q):
                continue
            if self._late_room(q):
                self._late_wanted[q] = None
                self._wake.set()
            else:
                self._late_blocked[q] = None

    def _late_room(self, q: Queue) -> bool:
        return (q.ready - q.cold < 2 * self.hot_ready
                and self.delayed_in_memory(q) < 2 * self.hot_delayed)

    def _late_came(self, q: Queue, gen: int, msgs: list[Message], limit: int) -> None:
        """Index a page of delays read at ``gen`` (their timers run from now)."""
        if not self.b.live(q) or q.cold_gen != gen:
            return
        known = self._known(q)
        for msg in msgs:
            q.late_after = (msg.ready_at, msg.seq)
            if known(msg):
                continue  # (never counted late), or gone
            q.late -= 1
            q.counts[State.DELAYED] -= 1
            q.add(msg)
            self.late_in += 1
            if q.active:
                self.b._schedule_message(msg)
        if len(msgs) < limit and q.late:
            if self.b.check_digests:  # (the simulation: a bug)
                raise AssertionError(f"{q.name}/{q.index}: {q.late} delays counted on disk "
                                     f"but not there")
            log.warning("%s/%d: %d delays counted on disk but not there", q.name, q.index,
                        q.late)
            self.drop_late(q)

    def page_late_now(self, q: Queue) -> None:
        """Read every delay on disk of ``q`` back, blocking: before replication compares,
        merges or copies the partition (held alone until now, or after a start). O(its
        delays) in memory, as before they went to disk."""
        while q.late and self.b.live(q):
            before = q.late
            self._late_came(q, q.cold_gen, self.b.store.read_delayed(
                q.name, q.index, q.late_after, WHOLE_PAGE), WHOLE_PAGE)
            if q.late == before:
                break
        self._unschedule_late(q)

    def drop_late(self, q: Queue) -> int:
        """The delays on disk are gone (the caller stages their deletion): how many."""
        n = q.late
        q.counts[State.DELAYED] -= n
        q.late = 0
        q.cold_gen += 1
        self._unschedule_late(q)
        return n

    def _unschedule_late(self, q: Queue) -> None:
        """No page of ``q``'s delays is to be read any more (none is left on disk)."""
        for book in (self._late, self._late_blocked, self._late_wanted):
            book.pop(q, None)

    def _tombs_came(self, q: Queue, stored: list[tuple[str, float]]) -> None:
        if not q.tombs_on_disk:
            return  # (read twice meanwhile)
        merged = dict(stored)
        merged.update(q.tombs)
        q.tombs = dict(sorted(merged.items(), key=lambda t: t[1]))  # (oldest first)
        q.tombs_on_disk = False

    def _known(self, q: Queue) -> Callable[[Message], bool]:
        """Whether a message read from ``q``'s store is known here (indexed, tombstoned
        or in flight: a page skips it), or gone (its incarnation dropped)."""
        entry = self.b.catalog.get(q.name)
        in_flight = self.b.in_flight

        def known(msg: Message) -> bool:
            return (msg.id in q.messages or msg.id in q.tombs or msg.id in in_flight
                    or entry is None or entry.absorbs(msg.inc))
        return known

    def _apply(self, q: Queue, gen: int, msgs: list[Message], limit: int) -> bool:
        """Index a page read at ``gen``; False when it was stale or nothing came."""
        if not self.b.live(q) or q.cold_gen != gen:
            return False
        known = self._known(q)
        for msg in msgs:
            q.cold_after = (msg.hlc, msg.seq)
            if known(msg):
                continue  # (never counted cold), or gone
            self._came_in(q, msg)
        if len(msgs) < limit and q.cold:
            # The store holds fewer than counted: a page read just before a commit, or a
            # count gone wrong. Two short reads in a row: trust the store.
            q.cold_misses += 1
            if q.cold_misses >= 2 and self.b.check_digests:  # (the simulation: a bug)
                raise AssertionError(f"{q.name}/{q.index}: {q.cold} cold messages counted "
                                     f"but not on disk")
            if q.cold_misses >= 2:
                log.warning("%s/%d: %d cold messages counted but not on disk", q.name,
                            q.index, q.cold)
                self.drop(q)
            else:  # (at once: a head held back behind them would wait for a dispatch)
                self._wanted[q] = None
        else:
            q.cold_misses = 0
        return bool(msgs)

    # -- a replicated partition's cold messages, for replication -------------------------
    def cold_of(self, q: Queue, gen: int, msgs: Iterable[Message]) -> list[Message]:
        """Those of ``msgs`` (read from the store at ``gen``) that are cold in ``q`` now."""
        if not q.cold or q.cold_gen != gen or not self.b.live(q):
            return []
        entry = self.b.catalog.get(q.name)
        in_flight = self.b.in_flight
        return [m for m in msgs
                if m.state == State.READY and (m.hlc, m.seq) > q.cold_after
                and m.id not in q.messages and m.id not in q.tombs and m.id not in in_flight
                and entry is not None and not entry.absorbs(m.inc)]

    def may_be_cold(self, q: Queue, mid: str, hlc: int | None = None) -> bool:
        """Whether ``mid`` may be a cold message of ``q`` (``hlc``: its HLC, if known)."""
        return (q.cold > 0 and mid not in q.messages and mid not in q.tombs
                and (hlc is None or hlc <= q.cold_top))

    async def page_ids(self, q: Queue, ids: Iterable[tuple[str, int | None]]) -> int:
        """Page in the cold messages of ``q`` among ``ids`` (id, HLC if known), before
        a merge names them (what is joined is the one in memory), reading them by id in
        a worker thread, once a count of the cold shares under way is done; how many
        came. Their consumers get them."""
        await self.warm_tombs(q)
        while q.sums.counting is not None:  # (as pages do: a page-in would spoil it)
            await q.sums.counting.done.wait()
        wanted = [mid for mid, hlc in ids if self.may_be_cold(q, mid, hlc)]
        if not wanted:
            return 0
        gen = q.cold_gen
        msgs = await self.b.store.read_ids_async(q.name, q.index, wanted)
        came = self._ids_came(q, gen, msgs)
        if came and q.active:
            self.b._page_came(q)
        return came

    def page_ids_now(self, q: Queue, ids: Iterable[tuple[str, int | None]]) -> int:
        """``page_ids``, blocking (a point read by id: a merge not prepared, a dedup hit
        on a message that may be cold), and without a dispatch (the caller's)."""
        self.warm_tombs_now(q)
        wanted = [mid for mid, hlc in ids if self.may_be_cold(q, mid, hlc)]
        if not wanted:
            return 0
        return self._ids_came(q, q.cold_gen,
                              self.b.store.read_ids(q.name, q.index, wanted))

    def page_all_now(self, q: Queue) -> None:
        """Read every cold message of ``q`` back, blocking: only for a fifo takeover that
        must stamp again a suffix of the partition's order reaching the disk (rare: a
        message below the closed bound, on a partition with a backlog on disk), and for
        the drop of an earlier incarnation of a queue whose later one this node holds
        already (rarer: the drop and the declaration came in out of order). O(the
        backlog) in memory until it drains, as before the backlog went to disk."""
        self.warm_tombs_now(q)
        while q.cold and self.b.live(q):
            if not self._apply(q, q.cold_gen, self.b.store.read_ready(
                    q.name, q.index, q.cold_after, WHOLE_PAGE), WHOLE_PAGE):
                break

    def _ids_came(self, q: Queue, gen: int, msgs: list[Message]) -> int:
        came = self.cold_of(q, gen, msgs)
        for msg in came:
            self._came_in(q, msg)
        self.paged_in_by_id += len(came)
        return len(came)

    async def count_cold(self, q: Queue) -> None:
        """Count the shares of ``q``'s cold messages from a keys-only read of the store
        in a worker thread (they are unknown after a start). The sends staged so far are
        let complete first, so that none of the messages counted from the store is
        counted cold meanwhile; those staged since are added as they stay cold. Pages
        wait while the store is read; a page-in or a drop meanwhile spoils the count,
        which is tried again (Unavailable after COUNT_TRIES)."""
        for _ in range(COUNT_TRIES):
            sums = q.sums
            if sums.cold is not None or not q.cold:
                return
            if not self.b.live(q):
                raise Unavailable(f"{q.name}/{q.index} was deleted")
            if sums.counting is not None:  # (another digest counts it: wait for it)
                await sums.counting.done.wait()
                continue
            counting = sums.counting = _Counting(self.b._seq - 1)
            try:
                part = q.part
                if any((m.queue, m.index) == part for m in self.b.in_flight.values()):
                    # Sends to it not yet complete: once the open batch is (batches
                    # complete in order), every one staged before the count is.
                    self.b._stage_partition(q)  # (so that the open batch commits)
                    await self.b.store.current_batch().wait_done()
                with self.pinned(q):  # (none leaves memory while rows are folded)
                    found = await self.b.store.scan_ready_async(
                        q.name, q.index, q.cold_after, self._fold_shares(q),
                        counting.old_seq)
                    counting.read = True  # (those waiting leave memory as the pin ends)
            finally:
                sums.counting = None
                counting.done.set()
                if q.active:
                    self.want(q, behind=True)  # (what waited for the count)
            if counting.spoilt or sums.cold is not None or not self.b.live(q):
                continue
            self.counts += 1
            sums.cold = [(a + b) % MOD for a, b in zip(found, counting.new, strict=True)]
            return
        raise Unavailable(f"{q.name}/{q.index}: its cold messages kept changing while "
                          f"their digest shares were counted")

    def _fold_shares(self, q: Queue) -> Callable[[Iterator[Message]], list[int]]:
        """What ``count_cold`` runs over the store's rows, where the read is (a worker
        thread): the shares of those that are cold, by bucket. It looks at ``q``'s dicts
        without changing them (no page-in runs meanwhile)."""
        entry = self.b.catalog.get(q.name)
        messages, tombs, in_flight = q.messages, q.tombs, self.b.in_flight

        def fold(rows: Iterator[Message]) -> list[int]:
            return walk(m for m in rows
                        if not (m.id in messages or m.id in tombs or m.id in in_flight
                                or entry is None or entry.absorbs(m.inc)))
        return fold

    async def cold_members(self, q: Queue, buckets: Iterable[int]
                           ) -> tuple[int, dict[int, list[Message]]]:
        """The cold messages of ``q`` in ``buckets`` (keys only), read in a worker thread,
        and the ``cold_gen`` they were read at: the caller checks each is still cold
        (``still_cold``), and holds ``q`` ``pinned`` until it has walked memory too."""
        out: dict[int, list[Message]] = {b: [] for b in buckets}
        await self.warm_tombs(q)
        gen = q.cold_gen
        if not out or not q.cold:
            return gen, out
        messages, tombs = q.messages, q.tombs

        def fold(rows: Iterator[Message]) -> dict[int, list[Message]]:
            for m in rows:
                found = out.get(bucket_of(m.id))
                if found is not None and m.id not in messages and m.id not in tombs:
                    found.append(m)
            return out
        return gen, await self.b.store.scan_ready_async(q.name, q.index, q.cold_after, fold)

    def still_cold(self, q: Queue, gen: int, m: Message) -> bool:
        """Whether ``m``, read by ``cold_members`` at ``gen``, is still cold in ``q``."""
        return bool(self.cold_of(q, gen, (m,)))

    def cold_messages(self, q: Queue) -> list[Message]:
        """``q``'s cold messages as the store holds them now (keys only), read blocking:
        for tests and the simulation, which compare whole copies."""
        return self.cold_of(q, q.cold_gen,
                               self.b.store.scan_ready(q.name, q.index, q.cold_after, list))

    def cold_walk(self, q: Queue) -> tuple[int, list[int]]:
        """How many cold messages the store holds for ``q`` and their shares, read now,
        blocking (the simulation's check of the kept sums, ``Broker.check_digests``)."""
        cold = self.cold_messages(q)
        return len(cold), walk(cold)
