"""Repair and takeover, written against Peers and the broker's replica surface.

Every read of another replica's state is a merge in both directions (read-repair):
``sync`` compares one partition with one node by range digests and sends each side what
the other lacks or holds behind -- records, later progress, tombstones. ``take_over``
makes this node the partition's dispatcher: it takes an epoch above every epoch promised,
gets it promised by a write quorum of the holders (from then on they refuse the changes of
any earlier dispatcher), reads every live copy, and only then dispatches.

State here: none between calls. Never: a record pushed over a tombstone without the
tombstone winning (the receiver answers with it), a takeover that dispatches before a
quorum promised its epoch and a quorum's copies were merged.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncGenerator, Callable, Iterable, Sequence
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any

import trio

from meshq.broker.core import Broker
from meshq.broker.digests import message_key, walk
from meshq.broker.queue import Queue
from meshq.broker.replica import progress_of, record_of
from meshq.cluster.changes import (
    ApplyAnswer,
    ApplyReq,
    Change,
    Decl,
    DigestAnswer,
    DigestReq,
    FetchAnswer,
    FetchReq,
    PromiseAnswer,
    PromiseReq,
    Put,
    Step,
    Tally,
    Tomb,
)
from meshq.cluster.lattice import BUCKETS, bucket_of
from meshq.cluster.peers import Peers
from meshq.cluster.placement import Replicas
from meshq.errors import Unavailable
from meshq.model import Message
from meshq.store import Batch

__all__ = ["DIGEST_SLICE", "OnProgress", "SyncStats", "digest", "members", "next_epoch",
           "sync", "take_over"]

log = logging.getLogger("meshq.cluster.repair")

DIGEST_SLICE = 2000  # shares counted per event-loop turn: a big queue never stalls it
MEMBERS_SLICE = 20000  # messages looked at per event-loop turn for a bucket's members
COLD_CHUNK = 512  # cold messages whose bodies a sync reads from the store at a time
CHUNK_BYTES = 4 * 1024 * 1024  # bodies per repair request
# on_progress(phase, done, total): a sync is "comparing" digests, or "copying" records to
# the other node, ``done`` of ``total`` acknowledged by it (meshq.cluster.moves).
OnProgress = Callable[[str, int, int], None]


@dataclass
class SyncStats:
    sent: int = 0  # records, progress and tombstones pushed to the other node
    fetched: int = 0  # records and tombstones merged from it
    deleted: int = 0  # of which tombstones (either way)
    skipped: int = 0  # ids it holds that are ours and not yet confirmed (left alone)


def next_epoch(known: int, node_int: int) -> int:
    """An epoch above ``known``: the next round number, with this node's id as tiebreak."""
    return (((known >> 32) + 1) << 32) | (node_int & 0xFFFFFFFF)


async def digest(broker: Broker, q: Queue) -> list[int]:
    """Per bucket of ids, the sum of the fingerprints of the partition's live records,
    in memory and on disk. The sums are kept as messages change (meshq.broker.digests):
    this counts the shares of the messages changed since the last digest, a slice at a
    time so that other tasks run meanwhile, and returns the sums as of its return. The
    shares of the READY messages on disk only are counted from the store the first time
    (after a start: meshq.broker.backlog.count_cold), in a worker thread. Stored
    tombstones are read back first (compared, they must be in memory)."""
    await broker.backlog.warm_tombs(q)
    sums = q.sums
    while True:
        if q.cold and sums.cold is None:
            await broker.backlog.count_cold(q)
        elif not sums.settle(DIGEST_SLICE):
            await trio.lowlevel.checkpoint()
        elif sums.cold is not None or not q.cold:
            break
    if broker.check_digests:
        expected = walk(q.messages.values())
        if sums.hot != expected:
            raise AssertionError(f"{q.name}/{q.index}: digest sums drifted from the "
                                 f"messages in memory: {sums.hot} != {expected}")
        count, cold = broker.backlog.cold_walk(q)
        if count != q.cold or (sums.cold or [0] * BUCKETS) != cold:
            raise AssertionError(f"{q.name}/{q.index}: {q.cold} cold messages counted, "
                                 f"{count} in the store; their sums {sums.cold} != {cold}")
    if sums.cold is None:
        return list(sums.hot)
    return sums.total()


@dataclass
class Members:
    """The messages of a partition in some buckets, as read: those in memory, and those
    on disk only (keys only, read at ``gen``). ``now`` says what each is now."""

    hot: dict[int, list[Message]]
    cold: dict[int, list[Message]]
    gen: int = 0

    def now(self, broker: Broker, q: Queue, b: int) -> tuple[list[Message], list[Message]]:
        """Bucket ``b``'s members now: those in memory (read there, or on disk and paged
        in since), and those on disk only (read there, or in memory and paged out since,
        meshq.broker.backlog.Backlog.page_out); one deleted meanwhile in neither."""
        messages = q.messages
        hot, cold = [], []
        seen: set[str] = set()
        for m in (*self.hot[b], *self.cold[b]):  # (one moved either way since is found)
            here = messages.get(m.id)
            if here is not None:
                if m.id not in seen:
                    seen.add(m.id)
                    hot.append(here)
            elif m.id not in seen and broker.backlog.still_cold(q, self.gen, m):
                seen.add(m.id)
                cold.append(m)
        return hot, cold


async def members(broker: Broker, q: Queue, buckets: Iterable[int]) -> Members:
    """The messages of ``q`` in ``buckets``: those on disk only first (read from the
    store in a worker thread), then those in memory (walked a slice at a time), so that
    one paged in meanwhile is found either way (``Members.now``)."""
    wanted = list(buckets)
    with broker.backlog.pinned(q):  # (none leaves memory for the disk between the two)
        gen, cold = await broker.backlog.cold_members(q, wanted)
        out: dict[int, list[Message]] = {b: [] for b in wanted}
        if not out:
            return Members(out, cold, gen)
        msgs = list(q.messages.values())
        for start in range(0, len(msgs), MEMBERS_SLICE):
            for msg in msgs[start:start + MEMBERS_SLICE]:
                found = out.get(bucket_of(msg.id))
                if found is not None:
                    found.append(msg)
            await trio.lowlevel.checkpoint()
    return Members(out, cold, gen)


async def durable(batch: Batch) -> None:
    """Wait until a batch of merges is durable here (not for replication: merges are not
    replicated)."""
    if not batch.ops or batch.done:
        await trio.lowlevel.checkpoint()
        return
    done = trio.Event()
    batch.on_local.append(lambda err: done.set())
    await done.wait()


def _chunks(changes: Sequence[Change]) -> list[list[Change]]:
    out: list[list[Change]] = []
    size = 0
    for c in changes:
        if not out or size > CHUNK_BYTES:
            out.append([])
            size = 0
        out[-1].append(c)
        size += 64 + (len(c.record.body) if isinstance(c, Put) else 0)
    return out


async def _all_chunks(broker: Broker, q: Queue, push: list[Change], gen: int,
                      seqs: list[int]) -> AsyncGenerator[list[Change], None]:
    """``push`` in chunks, then Puts of the cold messages ``seqs`` (read at ``gen``),
    their bodies read from the store by seq in a worker thread a chunk at a time: one
    still cold is sent as read, one paged in meanwhile as it is in memory now, one gone
    is left out."""
    for chunk in _chunks(push):
        yield chunk
    for start in range(0, len(seqs), COLD_CHUNK):
        read = await broker.store.read_seqs_async(seqs[start:start + COLD_CHUNK])
        puts: list[Change] = []
        for m in read:
            now = q.messages.get(m.id)
            if now is not None:
                puts.append(Put(record_of(now)))
            elif broker.backlog.still_cold(q, gen, m):
                puts.append(Put(record_of(m)))
        for chunk in _chunks(puts):
            yield chunk


def _decl(broker: Broker, q: Queue) -> Decl | None:
    entry = broker.catalog.get(q.name)
    return None if entry is None or not entry.inc else Decl(q.name, entry.inc, entry.options)


async def sync(peers: Peers, broker: Broker, q: Queue, node: str, *,
               pull: bool = True, on_progress: OnProgress | None = None) -> SyncStats:
    """Make ``node``'s copy of ``q`` and ours equal: it gets what we hold that it lacks or
    holds behind, and (``pull``) we get what it holds that we lack or hold behind.
    ``on_progress`` hears how far the push is. Raises Unavailable when the node does not
    answer usably."""
    stats = SyncStats()
    progress = on_progress or _no_progress
    progress("comparing", 0, 0)
    mine = await digest(broker, q)
    answer = await peers.call(node, DigestReq(q.name, q.index, _decl(broker, q),
                                              tuple(mine)))
    if not isinstance(answer, DigestAnswer):
        raise Unavailable(f"node {node!r} answered a digest with {type(answer).__name__}")
    if answer.promised > q.promised:  # it promised a later dispatcher (another node:
        broker.replica.promise(q, answer.promised)  # see Cluster._digest): so do we
    push: list[Change] = []
    wanted: list[str] = []
    messages = q.messages

    def compare(msg: Message, theirs: tuple[Any, ...]) -> None:
        key = message_key(msg)
        if theirs < key:
            push.append(Step(q.name, q.index, msg.id, progress_of(msg)))
        elif theirs > key:
            wanted.append(msg.id)

    # Both sides were read at different moments and changes went on meanwhile, so what is
    # compared is our state *now*.
    diff = [(b, items) for b, items in answer.diff if 0 <= b < BUCKETS]
    ours = await members(broker, q, (b for b, _ in diff))
    cold_puts: list[int] = []  # the seqs of cold messages it lacks (bodies read below)
    for b, items in diff:
        await trio.lowlevel.checkpoint()  # (a bucket of a deep partition is long)
        theirs = dict(items)
        hot, cold = ours.now(broker, q, b)  # (one deleted meanwhile: its tombstone is
        for msg in hot:  # compared below)
            t = theirs.pop(msg.id, None)
            if t is None:
                push.append(Put(record_of(msg)))
            else:
                compare(msg, t)
        for msg in cold:
            t = theirs.pop(msg.id, None)
            if t is None:
                cold_puts.append(msg.seq)
            else:
                compare(msg, t)  # (a cold message's progress is the one on disk)
        for mid, t in theirs.items():
            now_msg = messages.get(mid)
            if now_msg is not None:
                compare(now_msg, t)
            elif mid in q.tombs:
                push.append(Tomb(q.name, q.index, mid, q.tombs[mid]))
            elif mid in broker.in_flight:  # ours and not yet confirmed: not theirs
                stats.skipped += 1
            else:
                wanted.append(mid)
    if wanted and pull:
        got = await peers.call(node, FetchReq(q.name, q.index, tuple(wanted)))
        if not isinstance(got, FetchAnswer):
            raise Unavailable(f"node {node!r} answered a fetch with {type(got).__name__}")
        changes: list[Change] = [Put(r) for r in got.records if r.part == q.part]
        changes += [t for t in got.tombs if (t.queue, t.index) == q.part]
        merged = await broker.replica.merge_async(changes)
        stats.fetched += len(changes)
        stats.deleted += len(got.tombs)
        await durable(merged.batch)
    records = len(push) + len(cold_puts)
    progress("copying", 0, records)
    if push or cold_puts:
        push += [Tally(q.name, q.index, node_id, *values) for node_id, values in q.tally.items()]
    decl = _decl(broker, q)
    pushed = 0
    async with aclosing(_all_chunks(broker, q, push, ours.gen, cold_puts)) as chunks:
        async for chunk in chunks:
            if decl is not None:
                chunk.insert(0, decl)
            answer2 = await peers.call(node, ApplyReq((), tuple(chunk)))
            if not isinstance(answer2, ApplyAnswer):
                raise Unavailable(f"node {node!r} answered an apply with {type(answer2).__name__}")
            if answer2.tombs:  # it had deleted what we pushed: its tombstones win here too
                merged = await broker.replica.merge_async(list(answer2.tombs))
                stats.deleted += len(answer2.tombs)
                await durable(merged.batch)
            stats.sent += len(chunk) - (1 if decl is not None else 0)
            pushed += sum(1 for c in chunk if not isinstance(c, Tally | Decl))
            progress("copying", min(pushed, records), records)
    stats.deleted += sum(1 for c in push if isinstance(c, Tomb))
    return stats


def _no_progress(phase: str, done: int, total: int) -> None:
    pass


@dataclass
class Takeover:
    ok: bool
    epoch: int
    promised_by: tuple[str, ...] = ()
    read_from: tuple[str, ...] = ()  # the nodes read (an empty copy counts as read)
    empty: tuple[str, ...] = ()  # the nodes read that had no copy (so got none from us)
    higher: int = 0  # an epoch promised elsewhere above ours (retry above it)
    reason: str = ""


async def take_over(peers: Peers, broker: Broker, q: Queue, reps: Replicas,
                    others: Sequence[str], node_int: int,
                    timeout: float = 3.0) -> Takeover:  # noqa: ASYNC109
    """Become ``q``'s dispatcher: promise a new epoch on this node and on the live
    ``others``, merge every copy they hold, then activate. Needs promises and reads from
    a write quorum of the holders (this node included)."""
    epoch = next_epoch(q.promised, node_int)
    if not broker.replica.promise(q, epoch):
        return Takeover(False, epoch, reason="a later epoch was promised here")
    await durable(broker.store.current_batch())
    decl = _decl(broker, q)
    answers: dict[str, PromiseAnswer] = {}

    async def ask(node: str) -> None:
        try:
            a = await peers.call(node, PromiseReq(q.name, q.index, epoch, decl), timeout)
        except Unavailable as exc:
            log.info("%s: promise of %s/%d at %x: %s", peers.me, q.name, q.index, epoch, exc)
            return
        if isinstance(a, PromiseAnswer):
            answers[node] = a

    async with trio.open_nursery() as nursery:
        for node in others:
            nursery.start_soon(ask, node)
    higher = max((a.promised for a in answers.values() if not a.ok), default=0)
    refused = sorted(n for n, a in answers.items() if not a.ok and a.promised <= epoch)
    if higher > epoch:
        return Takeover(False, epoch, higher=higher, reason="a later epoch was promised")
    promised = [n for n, a in answers.items() if a.ok]
    # (what any earlier dispatcher closed is below a bound a write quorum has: stamp above)
    broker.keep_bound(q, max((answers[n].bound for n in promised), default=0))
    log.debug("%s: promises of %s/%d at %x: %s", peers.me, q.name, q.index, epoch, answers)
    holders_ok = 1 + sum(1 for n in promised if n in reps.holders)
    if holders_ok < reps.write_quorum:
        why = f" ({', '.join(refused)} see another primary)" if refused else ""
        return Takeover(False, epoch, tuple(promised),
                        reason=f"{holders_ok} of the {reps.write_quorum} holders needed "
                               f"promised{why}")
    read: list[str] = []
    empty: list[str] = []
    for node in sorted(promised, key=lambda n: n not in reps.holders):
        if not answers[node].has_copy:
            read.append(node)  # nothing to read: an empty copy is read already
            empty.append(node)
            continue
        try:
            await sync(peers, broker, q, node)
        except Unavailable as exc:
            log.info("takeover of %s: reading %s failed: %s", q.name, node, exc)
            continue
        read.append(node)
    holders_read = 1 + sum(1 for n in read if n in reps.holders)
    if holders_read < reps.write_quorum:
        return Takeover(False, epoch, tuple(promised), tuple(read),
                        reason=f"read {holders_read} of the {reps.write_quorum} holders needed")
    if q.promised != epoch or not broker.live(q):
        return Takeover(False, epoch, tuple(promised), tuple(read),
                        reason="another node took over meanwhile")
    broker.replica.activate(q, epoch)
    return Takeover(True, epoch, tuple(promised), tuple(read), tuple(empty))
