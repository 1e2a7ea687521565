"""One queue partition's in-memory index, and the consumer / session records that lease from it.

State here: every live message of the partition held in memory by id (the READY ones past
the first few thousand may be on disk only: ``cold``, meshq.broker.backlog), its
tombstones, a heap of READY messages in (HLC, node) order, per-state counts, the consumers
in round-robin order, and its replication state (incarnation, dispatch epoch, promised
epoch, counters, digest sums of the messages in memory: meshq.broker.digests).
Never: a heap entry counted as ready unless its token matches the message's token and the
message is READY (entries go stale instead of being removed, which keeps pushes O(log n)).
"""

from __future__ import annotations

import heapq
import itertools
from collections import deque
from collections.abc import Callable
from typing import Any

from meshq.broker.digests import Sums
from meshq.model import Message, QueueOptions
from meshq.states import Event, State, advance

__all__ = ["Consumer", "Queue", "Session"]

_tags = itertools.count(1)
# Heap tokens, unique in the process: two copies of one message (one that left memory for
# the disk while its heap entry stayed, and the copy read back) never tie in the heap.
_tokens = itertools.count(1)


class Session:
    """A client connection as the broker sees it.

    ``push(tag, messages)`` hands deliveries for consumer ``tag`` to the connection and
    ``cancelled(tag, reason, final, index)`` says the broker ended a consumer of partition
    ``index``: ``final`` when its queue was deleted, else because the partition moved to
    another node (subscribe again, there); neither may block. ``consumers``: per tag, a
    consumer for each partition subscribed here. ``leases`` is every message leased
    through this session.
    """

    def __init__(self, push: Callable[[str, list[Message]], None] | None = None,
                 cancelled: Callable[[str, str, bool, int], None] | None = None,
                 peer: str = "") -> None:
        self.push = push or (lambda tag, msgs: None)
        self.cancelled = cancelled or (lambda tag, reason, final, index: None)
        self.peer = peer
        self.holder = ""  # "node/boot" its leases are recorded under ("": this process)
        self.consumers: dict[str, list[Consumer]] = {}
        self.leases: dict[Message, None] = {}  # (a dict: deterministic order)
        self.closed = False

    def add(self, c: Consumer) -> None:
        self.consumers.setdefault(c.tag, []).append(c)

    def forget(self, c: Consumer) -> None:
        """``c`` ended (its partition went away or moved): its tag lives on while another
        partition's consumer does."""
        cs = self.consumers.get(c.tag)
        if cs is not None and c in cs:
            cs.remove(c)
            if not cs:
                del self.consumers[c.tag]


class Consumer:
    """A subscription (prefetch credit, refilled by acks) or a one-shot pull receive."""

    __slots__ = ("cancelled", "capacity", "credit", "moved", "pending", "queue", "replenish",
                 "session", "siblings", "sink", "tag", "visibility_timeout", "watch")

    def __init__(self, queue: Queue, session: Session, credit: int, *, replenish: bool,
                 sink: Callable[[Consumer, list[Message]], None],
                 visibility_timeout: float | None = None) -> None:
        self.tag = f"c{next(_tags)}"
        self.queue = queue
        self.session = session
        self.credit = credit
        # A subscription's most unsettled leases here (its credit plus what it holds);
        # Broker.flow changes it (meshq.server.steal).
        self.capacity = credit
        # Called with the partition after each dispatch to it, to look at its ready count
        # (meshq.server.steal); it must not call the broker.
        self.watch: Callable[[Queue], None] | None = None
        self.pending = 0  # leased, lease not yet durable, so not yet handed over
        self.cancelled = False  # a subscription ended by cancel or disconnect
        self.moved = False  # ended because the partition is dispatched elsewhere now
        self.replenish = replenish
        self.sink = sink
        self.visibility_timeout = visibility_timeout
        # A pull receive over several partitions: a consumer on each, sharing one credit.
        self.siblings: list[Consumer] | None = None


class Queue:
    """One queue partition as this node holds it (a queue has ``options.partitions``)."""

    def __init__(self, name: str, options: QueueOptions, inc: int = 1, index: int = 0) -> None:
        self.name = name
        self.options = options
        self.inc = inc  # the queue's incarnation (meshq.cluster.lattice.CatalogEntry)
        self.index = index
        self.messages: dict[str, Message] = {}
        self.sums = Sums()  # the digest of ``messages``: add, remove and changed keep it
        self.tombs: dict[str, float] = {}  # deleted message id -> when (insertion order)
        self._ready: list[tuple[int, str, int, int, Message]] = []
        self.counts = [0] * len(State)
        self.consumers: deque[Consumer] = deque()
        # A G-counter: per dispatching node id, (dead_lettered, expired, dropped).
        self.tally: dict[str, tuple[int, int, int]] = {}
        self.created: Any = None  # the store batch that made it durable
        # False on a node that holds a replica but does not dispatch this partition (the
        # cluster): no leases, no timers; merged changes keep it current.
        self.active = True
        self.last_used = 0.0  # when last declared, received from or consumed (expires)
        self.epoch = 0  # the dispatch epoch while active (versions its changes)
        self.promised = 0  # no change from a dispatcher of an earlier epoch is accepted
        # Closed bounds (fifo, meshq.broker.core.Broker.closed_of): the highest known here
        # (a takeover stamps above it), the one this dispatcher had a write quorum confirm
        # at its epoch (it closes no higher), and the batch raising it.
        self.bound = 0
        self.bound_ok = 0
        self.bound_batch: Any = None
        # READY messages on disk only, counted in ``counts`` too (meshq.broker.backlog)
        self.cold = 0
        self.cold_after = (0, 0)  # (hlc, seq): every cold message is after it
        self.cold_gen = 0  # bumped when the cold ones are dropped wholesale
        self.cold_misses = 0  # page reads in a row that found fewer than counted
        self.cold_top = 0  # an HLC at or above every cold message's (a Put above: not cold)
        # DELAYED messages on disk only, counted in ``counts`` too (meshq.broker.backlog)
        self.late = 0
        self.late_after = (0.0, 0)  # (ready_at, seq): every late message is after it
        self.tombs_on_disk = False  # older tombstones (or delays: ``late``) in the store only
        self.tombs_recheck = 0  # deletes until trim_tombs asks whether it is held alone
        # (placement generation, answer): meshq.cluster.driver's cache of whether this
        # node holds the partition alone (asked per commit and per send)
        self.alone: tuple[int, bool] = (-1, False)

    @property
    def part(self) -> tuple[str, int]:
        return (self.name, self.index)

    @property
    def has_copy(self) -> bool:
        """Whether this node holds anything of the partition: messages (in memory or
        cold) or tombstones, in memory or possibly in the store only (after a restart,
        until meshq.broker.backlog reads them back). Tombstones alone are a copy: a
        takeover must read them, a hand-off must push them, or an acked message comes
        back."""
        return bool(self.messages or self.tombs or self.cold or self.tombs_on_disk)

    @property
    def dead_lettered(self) -> int:
        return sum(t[0] for t in self.tally.values())

    @property
    def expired(self) -> int:
        return sum(t[1] for t in self.tally.values())

    @property
    def dropped(self) -> int:
        return sum(t[2] for t in self.tally.values())

    # -- state changes -------------------------------------------------------------
    def move(self, msg: Message, event: Event) -> None:
        old = msg.state
        new = advance(old, event)
        counts = self.counts
        counts[old] -= 1
        counts[new] += 1
        msg.state = new

    def add(self, msg: Message, fp: int | None = None) -> None:
        """Index a message in the state it already has (READY, DELAYED or LEASED);
        ``fp``: its digest share, known (a page-in moves it from the cold sums)."""
        self.messages[msg.id] = msg
        if fp is None:
            self.sums.changed(msg)
        else:
            self.sums.counted(msg, fp)
        self.counts[msg.state] += 1
        if msg.state == State.READY:
            self.push_ready(msg)

    def set_state(self, msg: Message, state: State) -> None:
        """Put a message in ``state`` as a replica op says, whatever it was in before."""
        old = msg.state
        if old != state:
            self.counts[old] -= 1
            self.counts[state] += 1
            msg.state = state
            if state == State.READY:
                self.push_ready(msg)

    def remove(self, msg: Message) -> None:
        """Forget a message that has reached a terminal state."""
        gone = self.messages.pop(msg.id, None)
        if gone is not None:
            self.sums.removed(gone)

    def evict(self, msg: Message) -> None:
        """A READY message leaves memory but not the partition: it stays on disk only
        (the caller counts it cold, meshq.broker.backlog)."""
        self.remove(msg)
        msg.token = 0  # (its heap entry goes stale)

    def changed(self, msg: Message) -> None:
        """``msg``'s progress moved (its share of the digest is counted again)."""
        if self.messages.get(msg.id) is msg:
            self.sums.changed(msg)

    def push_ready(self, msg: Message) -> None:
        msg.token = next(_tokens)
        heapq.heappush(self._ready, (msg.hlc, msg.node, msg.seq, msg.token, msg))

    def pop_ready(self) -> Message | None:
        """The READY message first in (HLC, node) order, removed from the heap."""
        heap = self._ready
        while heap:
            entry = heapq.heappop(heap)
            msg = entry[4]
            if msg.token == entry[3] and msg.state == State.READY:
                return msg
        return None

    def head_ready(self) -> Message | None:
        """The READY message first in (HLC, node) order, left in the heap."""
        heap = self._ready
        while heap:
            entry = heap[0]
            if entry[4].token == entry[3] and entry[4].state == State.READY:
                return entry[4]
            heapq.heappop(heap)
        return None

    def ready_below(self, key: tuple[int, str], most: int) -> int:
        """How many READY messages come before ``key`` (HLC, node), counting at most
        ``most``, walking the heap in order from its top: O(``most`` log ``most``)."""
        heap = self._ready
        count = 0
        todo = [(heap[0], 0)] if heap else []
        while todo and count < most:
            entry, i = heapq.heappop(todo)
            if (entry[0], entry[1]) >= key:
                break
            if entry[4].token == entry[3] and entry[4].state == State.READY:
                count += 1
            for child in (2 * i + 1, 2 * i + 2):
                if child < len(heap):
                    heapq.heappush(todo, (heap[child], child))
        return count

    def next_consumer(self) -> Consumer | None:
        """Round-robin: the next consumer with credit, rotated to the back."""
        consumers = self.consumers
        for _ in range(len(consumers)):
            c = consumers[0]
            consumers.rotate(-1)
            if c.credit > 0:
                return c
        return None

    @property
    def ready(self) -> int:
        return self.counts[State.READY]

    @property
    def leased(self) -> int:
        return self.counts[State.LEASED]

    @property
    def delayed(self) -> int:
        return self.counts[State.DELAYED]

    def compact(self) -> None:
        """Drop stale heap entries when they outnumber live ones (after purges)."""
        if len(self._ready) > 2 * (self.ready - self.cold) + 1024:
            self._ready = [e for e in self._ready
                           if e[4].token == e[3] and e[4].state == State.READY]
            heapq.heapify(self._ready)
