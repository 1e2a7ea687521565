"""Store base class: batching, the writer loop, and the op encoding shared by stores.

State here: the open batch (collecting ops) and at most one batch being committed.
Never: a batch reported durable before its transaction committed, or two in flight.
"""

from __future__ import annotations

import abc
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import msgpack
import trio

from meshq.errors import MeshqError, Timeout, Unavailable
from meshq.model import Message
from meshq.store._ops import OP_DELETE, OP_PUT, OP_UPDATE

__all__ = [
    "Batch",
    "Op",
    "Snapshot",
    "Store",
    "StoreError",
    "StoreFatal",
    "StoreStatistics",
    "delete_op",
    "put_op",
    "update_op",
]

Op = tuple[int, tuple[Any, ...]]
_T = TypeVar("_T")
MAX_BATCH_OPS = 8192  # a batch is sealed at an operation boundary past this many ops
MAX_BATCH_REQUESTS = 256  # ... or past this many client requests
MAX_BATCH_BYTES = 4 * 1024 * 1024  # ... or past this many bytes of message bodies (a batch
# is held whole in the writer process, twice: 4 MiB commits in well under 100 ms)
_packb = msgpack.Packer(use_bin_type=True).pack


def put_op(m: Message) -> Op:
    """The op writing a whole message (count its body with ``Batch.body_bytes``)."""
    return (OP_PUT, (m.seq, m.id, m.queue, m.index, m.inc, m.hlc, m.node, m.body,
                     _packb(m.headers) if m.headers else None, int(m.state),
                     m.delivery_count, m.ready_at, m.expires_at, m.lease_deadline,
                     m.lease_id, m.holder, m.epoch, m.vn))


def update_op(m: Message) -> Op:
    return (OP_UPDATE, (int(m.state), m.delivery_count, m.ready_at, m.lease_deadline,
                        m.lease_id, m.holder, m.epoch, m.vn, m.seq))


def delete_op(m: Message, at: float) -> Op:
    return (OP_DELETE, (m.seq, m.queue, m.index, m.id, at))


class StoreError(Unavailable):
    """A commit failed (disk full, I/O error): nothing in that batch is durable."""


class StoreFatal(RuntimeError):
    """The store cannot commit anything any more; ``run`` raises it to stop the daemon."""


Callback = Callable[[BaseException | None], None]


class Batch:
    """Ops that commit together. Durable once ``done`` with ``error`` None."""

    __slots__ = ("_callbacks", "_event", "body_bytes", "bounds", "changes", "done", "epochs",
                 "error", "local_ok", "on_local", "ops", "requests", "started")

    def __init__(self) -> None:
        self.ops: list[Op] = []
        self._callbacks: list[Callback] = []
        self._event: trio.Event | None = None
        self.done = False
        self.error: BaseException | None = None
        self.started = 0.0
        self.requests = 0  # client requests handled while this batch was open
        self.body_bytes = 0  # message bodies staged in it (put_op counts them)
        # For replication (meshq.cluster): the typed changes of this batch, and the dispatch
        # epoch of each partition they were made under (which fences them).
        self.changes: list[Any] = []
        self.epochs: dict[tuple[str, int], int] = {}
        # and the closed bounds it raises, per partition (fenced by those epochs too)
        self.bounds: dict[tuple[str, int], int] = {}
        # Called once committed (or failed) on this node, before any replication wait.
        self.on_local: list[Callback] = []
        # Whether it committed here (None: not yet). A batch can be durable here and still
        # fail (its write quorum did not confirm it): its outcome is then unknown.
        self.local_ok: bool | None = None

    def add_callback(self, fn: Callback) -> None:
        if self.done:
            fn(self.error)
        else:
            self._callbacks.append(fn)

    async def wait(self) -> None:
        """Return once durable; raise StoreError if the commit failed."""
        if not self.done:  # (inline, not wait_done: every send's answer waits here)
            if self._event is None:
                self._event = trio.Event()
            await self._event.wait()
        if isinstance(self.error, MeshqError):
            raise self.error
        if self.error is not None:
            raise StoreError(f"commit failed: {self.error}") from self.error

    async def wait_done(self) -> None:
        """Return once complete, committed or not (its callbacks have run)."""
        if not self.done:
            if self._event is None:
                self._event = trio.Event()
            await self._event.wait()

    def complete(self, error: BaseException | None) -> None:
        self.done, self.error = True, error
        callbacks, self._callbacks = self._callbacks, []
        for fn in callbacks:
            fn(error)
        if self._event is not None:
            self._event.set()


@dataclass
class Snapshot:
    """Everything a store holds, as loaded at start-up."""

    meta: dict[str, Any] = field(default_factory=dict)
    # (name, inc, options or None, dropped, dropped_at): every catalog entry, live or not
    catalog: list[tuple[str, int, dict[str, Any] | None, int, float]] = field(
        default_factory=list)
    # (queue, idx, promised, tally {node: [dead_lettered, expired, dropped]})
    partitions: list[tuple[str, int, int, dict[str, list[int]]]] = field(default_factory=list)
    messages: list[Message] = field(default_factory=list)
    dedup: list[tuple[str, str, str, float]] = field(default_factory=list)
    tombstones: list[tuple[str, int, str, float]] = field(default_factory=list)
    # Loaded with ``hot_ready``: per partition, its READY messages left on disk (count) and
    # the (hlc, seq) of the last one loaded (every one left on disk is after it).
    cold: dict[tuple[str, int], tuple[int, tuple[int, int]]] = field(default_factory=dict)
    # And its DELAYED messages left on disk past the first ``hot_ready`` by due time
    # (count), and the (ready_at, seq) of the last one loaded.
    late: dict[tuple[str, int], tuple[int, tuple[float, int]]] = field(default_factory=dict)
    max_seq: int = 0  # the highest message seq stored (cold ones included)
    max_hlc: int = 0  # the highest HLC of a cold message
    # Loaded with ``hot_ready``, the dedup entries are not: ``read_dedup`` reads one, and
    # ``dedup_keys`` lists them (meshq.broker.dedup).
    dedup_on_disk: bool = False
    # ... and with them, the dedup filters saved at the last stop, if it was clean and
    # nothing was written since (``Store.save_dedup_filters``); None: they are rebuilt.
    dedup_filters: bytes | None = None
    # ... nor the message tombstones: ``read_tombs`` reads a partition's when needed.
    tombs_on_disk: bool = False


@dataclass(frozen=True)
class StoreStatistics:
    path: str | None
    size_bytes: int
    commits: int
    ops_committed: int
    failed_commits: int
    commit_seconds: float  # summed over batches, from hand-over to durable


class ReplicationGate(Protocol):
    """The cluster layer's hold on batches (meshq.cluster): ``ship`` sees each batch as
    it goes to be committed locally; ``committed`` takes over a batch committed locally
    (or failed: ``error``) and completes it, in order, once enough replicas have it;
    ``abandon`` completes everything it holds with an unknown outcome."""

    def ship(self, batch: Batch) -> None: ...

    def committed(self, batch: Batch, error: BaseException | None) -> None: ...

    def abandon(self) -> None: ...


class Store(abc.ABC):
    pages = False  # whether read_ready works (the broker may leave READY messages on disk)

    def __init__(self) -> None:
        self.gate: ReplicationGate | None = None
        self._open = Batch()
        self._inflight: deque[Batch] = deque()  # sent to be committed, oldest first
        self._sealed: deque[Batch] = deque()  # full, waiting for their turn
        self._has_work = trio.Event()
        self.commits = 0
        self.ops_committed = 0
        self.failed_commits = 0
        self.commit_seconds = 0.0
        # Called after each batch is finished here and its callbacks have run: where
        # their answers can be written at once (meshq.amqp.server).
        self.after_finish: list[Callable[[], None]] = []

    # -- interface for the broker ------------------------------------------------------
    def stage(self, op: Op) -> Batch:
        batch = self._open
        batch.ops.append(op)
        if len(batch.ops) == 1:
            self._has_work.set()
        return batch

    def seal_if_full(self) -> None:
        """Call once per client request, before handling it: closes the open batch once
        it holds MAX_BATCH_REQUESTS requests or MAX_BATCH_OPS ops.

        Smaller batches let the writer commit one while the daemon answers another,
        instead of the whole load moving in one wave. Never call it half-way through
        an operation: an operation's ops must commit together."""
        batch = self._open
        if batch.ops and (batch.requests >= MAX_BATCH_REQUESTS
                          or len(batch.ops) >= MAX_BATCH_OPS
                          or batch.body_bytes >= MAX_BATCH_BYTES):
            self._sealed.append(batch)
            batch = self._open = Batch()
        batch.requests += 1

    def current_batch(self) -> Batch:
        """The open batch (possibly empty): a callback on it fires after the next commit."""
        return self._open

    async def flush(self) -> None:
        """Wait until every op staged so far is durable (or its commit failed, or, in a
        cluster, its write quorum: a fifo send's batch then completes with a Timeout)."""
        if self._open.ops:
            target: Batch | None = self._open
        else:
            target = (self._sealed or self._inflight or [None])[-1]
        if target is not None:
            await target.wait_done()

    async def next_batch(self) -> Batch:
        """Wait for staged ops; close the open batch and return it (now in flight)."""
        while True:  # the oldest first: a sealed batch always precedes the open one
            if self._sealed:
                return self._take(self._sealed.popleft())
            if self._open.ops:
                batch, self._open = self._open, Batch()
                return self._take(batch)
            await self._has_work.wait()
            self._has_work = trio.Event()

    def _take(self, batch: Batch) -> Batch:
        batch.started = time.perf_counter()
        self._inflight.append(batch)
        if self.gate is not None:
            self.gate.ship(batch)
        return batch

    def ship_now(self) -> None:  # noqa: B027 - optional hook
        """Call after a read's requests were handled: a store that can hand the open
        batch to be committed without waiting (nothing else in flight) does it now
        rather than at its writer task's next turn, one scheduler hop sooner. Batching is
        unchanged under load: while one batch commits, the next one collects."""

    def finish(self, batch: Batch, error: BaseException | None) -> None:
        """Report the oldest in-flight batch committed (error None) or rolled back."""
        assert self._inflight and self._inflight[0] is batch
        self._inflight.popleft()
        if error is None:
            self.commit_seconds += time.perf_counter() - batch.started
            self.commits += 1
            self.ops_committed += len(batch.ops)
        else:
            self.failed_commits += 1
        batch.local_ok = error is None
        for fn in batch.on_local:
            fn(error)
        if self.gate is not None:
            self.gate.committed(batch, error)
        else:
            batch.complete(error)
        for hook in self.after_finish:
            hook()

    def abandon(self) -> None:
        """The store stopped: every batch in flight has an unknown outcome."""
        while self._sealed:  # never handed to the writer: nothing of them was written
            self._sealed.popleft().complete(StoreError("the store stopped"))
        while self._inflight:
            self._inflight.popleft().complete(
                Timeout("the store stopped during a commit; outcome unknown"))
        if self.gate is not None:
            self.gate.abandon()

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """The writer loop: commit one batch at a time, forever."""
        task_status.started()
        try:
            while True:
                batch = await self.next_batch()
                try:
                    await self._commit(batch.ops)
                except (trio.Cancelled, StoreFatal):
                    raise
                except Exception as exc:
                    self.finish(batch, exc)
                else:
                    self.finish(batch, None)
        finally:
            self.abandon()

    @abc.abstractmethod
    def load(self, hot_ready: int | None = None) -> Snapshot:
        """Everything stored; with ``hot_ready``, only the first ``hot_ready`` READY
        messages of each partition (in (hlc, seq) order), the rest counted in
        ``Snapshot.cold`` and left to ``read_ready``, and the first ``hot_ready`` DELAYED
        ones (in (ready_at, seq) order), the rest in ``Snapshot.late`` (``read_delayed``)."""

    def read_ready(self, queue: str, index: int, after: tuple[int, int],
                   limit: int) -> list[Message]:
        """The committed READY messages of a partition whose (hlc, seq) is above
        ``after``, in that order, at most ``limit``. May block (a disk read)."""
        raise NotImplementedError

    def read_delayed(self, queue: str, index: int, after: tuple[float, int],
                     limit: int) -> list[Message]:
        """The committed DELAYED messages of a partition whose (ready_at, seq) is above
        ``after``, in that order, at most ``limit``. May block (a disk read)."""
        raise NotImplementedError

    async def read_delayed_async(self, queue: str, index: int, after: tuple[float, int],
                                 limit: int) -> list[Message]:
        await trio.lowlevel.checkpoint()
        return self.read_delayed(queue, index, after, limit)

    def read_tombs(self, queue: str, index: int) -> list[tuple[str, float]]:
        """The stored tombstones of a partition, (message id, at). May block."""
        raise NotImplementedError

    async def read_tombs_async(self, queue: str, index: int) -> list[tuple[str, float]]:
        await trio.lowlevel.checkpoint()
        return self.read_tombs(queue, index)

    def read_dedup(self, queue: str, dedup_id: str) -> tuple[str, float] | None:
        """The stored dedup entry (message id, expires_at), if any. May block."""
        raise NotImplementedError

    def save_dedup_filters(self, filters: bytes) -> None:
        """Keep ``filters`` (meshq.broker.dedup) for the next ``load``, at a clean stop
        once ``run`` has ended: the next load gives them back only if nothing was
        written in between, and only once. Blocks (a file write). This one keeps nothing."""
        return

    def dedup_keys(self, after: int, limit: int) -> list[tuple[int, str, str, float]]:
        """Stored dedup entries as (position, queue, dedup_id, expires_at), those after
        position ``after`` (0: from the start), at most ``limit``. May block."""
        raise NotImplementedError

    async def dedup_keys_async(self, after: int,
                               limit: int) -> list[tuple[int, str, str, float]]:
        await trio.lowlevel.checkpoint()
        return self.dedup_keys(after, limit)

    async def read_ready_async(self, queue: str, index: int, after: tuple[int, int],
                               limit: int) -> list[Message]:
        """``read_ready`` without blocking the event loop."""
        await trio.lowlevel.checkpoint()
        return self.read_ready(queue, index, after, limit)

    # The backlog of a replicated partition (meshq.broker.backlog): its cold messages'
    # keys, for digests and repair, and single messages, for fetches and merges.
    def scan_ready(self, queue: str, index: int, after: tuple[int, int],
                   fold: Callable[[Iterator[Message]], _T], max_seq: int | None = None) -> _T:
        """``fold`` of the committed READY messages of a partition after ``after`` in
        (hlc, seq) order (``max_seq``: those whose seq is not above it), keys only: their
        bodies empty, headers ``{}``. One consistent read; ``fold`` runs where the read
        does and may look at (never change) the broker's dicts. May block."""
        raise NotImplementedError

    async def scan_ready_async(self, queue: str, index: int, after: tuple[int, int],
                               fold: Callable[[Iterator[Message]], _T],
                               max_seq: int | None = None) -> _T:
        """``scan_ready`` without blocking the event loop (a worker thread runs it, and
        ``fold``)."""
        await trio.lowlevel.checkpoint()
        return self.scan_ready(queue, index, after, fold, max_seq)

    def read_ids(self, queue: str, index: int, ids: Iterable[str]) -> list[Message]:
        """The committed messages of a partition among ``ids`` (any state, whole: an
        index on (queue, idx, id) finds them). May block."""
        raise NotImplementedError

    async def read_ids_async(self, queue: str, index: int, ids: Iterable[str]) -> list[Message]:
        await trio.lowlevel.checkpoint()
        return self.read_ids(queue, index, ids)

    def read_seqs(self, seqs: Iterable[int]) -> list[Message]:
        """The committed messages whose seq is in ``seqs``, whole. May block."""
        raise NotImplementedError

    async def read_seqs_async(self, seqs: Iterable[int]) -> list[Message]:
        await trio.lowlevel.checkpoint()
        return self.read_seqs(seqs)

    @abc.abstractmethod
    async def _commit(self, ops: list[Op]) -> None:
        """Apply ops in order in one transaction, durably."""

    @abc.abstractmethod
    def statistics(self) -> StoreStatistics: ...

    def helper_pids(self) -> tuple[int, ...]:
        """Processes that work for this store (their memory counts as the daemon's)."""
        return ()

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release resources; nothing staged after this commits."""
