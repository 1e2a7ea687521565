"""Replication (SPEC section 3): writes on N replicas confirmed after W, dispatch by the
first live replica, repair by range digests, queue declarations on every node.

How it fits (docs/architecture.md, "Replication"): the broker of the queue's dispatching
node (its *primary*, the first live replica) does everything it does on a single node, and
tags each change with a replica op ("rop") in the same store batch. As the batch goes to
be committed, ``ship`` sends its rops to the queue's other holders over peer links; the
batch completes (its clients are answered, its messages become visible) once it is
durable here and on W - 1 holders too. Holders apply rops to their own broker, where the
queue is inactive (no dispatch, no timers), and answer once those are durable.

When a node becomes a queue's primary it first merges the state of the other live holders
(takeover), then dispatches. Every ``ROUND`` seconds, and when the placement changes, a
primary compares its queues with each holder by 64 range digests and sends what differs
(anti-entropy); a node that holds messages of a queue without being one of its holders
(a stand-in's hints, or data whose replica set moved) hands them to the primary and
forgets them. Deleted messages leave tombstones (``meshq.store``), so that a stale holder
cannot bring them back.

State here: peer links, the batches waiting for their quorum (completed in order),
takeovers under way, dropped-queue tombstones, repair counters.
Never: a batch completed before W holders (this node included) have it durable; a client
op served for a queue whose takeover is not finished.
"""

from __future__ import annotations

import functools
import logging
import math
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import trio

from meshq.broker.core import Broker
from meshq.broker.queue import Queue
from meshq.errors import MeshqError, Unavailable
from meshq.mesh._rops import (
    BUCKETS,
    Digests,
    add_to_digests,
    chunks,
    item,
    merged,
    new_digests,
    put_rop,
    qrow,
    update_rop,
)
from meshq.mesh.placement import Placement, Replicas
from meshq.mesh.transport import FramedStream, Transport
from meshq.mesh.wire import hello_frame
from meshq.model import Message, QueueOptions
from meshq.store.base import Batch, Store

if TYPE_CHECKING:
    from meshq.mesh.membership import Membership

__all__ = ["Replicator"]

log = logging.getLogger("meshq.mesh.replication")

ROUND = 5.0  # seconds between anti-entropy rounds
REPLY_TIMEOUT = 10.0  # a holder that has not answered a rop batch by then counts as failed
CONNECT_TIMEOUT = 2.0
TAKEOVER_WAIT = 10.0  # a client op waits this long for a takeover before UNAVAILABLE
LINK_MAX_FRAME = 96 * 1024 * 1024  # a batch of rops: up to 64 MiB of bodies and change
DROPPED_KEEP = 3600.0  # how long a deleted queue's name stays a tombstone


# A peer stream that fails ends, logged; the other streams go on.
_LINK_ERRORS = (OSError, MeshqError, trio.BrokenResourceError, trio.ClosedResourceError,
                trio.TooSlowError)


# An exchange with a peer that fails, or whose answer is malformed, ends that exchange
# (logged); the next round tries again.
_EXCHANGE_ERRORS = (Unavailable, KeyError, TypeError, ValueError, IndexError)


class _Held:
    """A batch committed here (or not yet) and waiting for its holders."""

    __slots__ = ("batch", "error", "local", "needs", "rops_by_queue", "shipped_at")

    def __init__(self, batch: Batch) -> None:
        self.batch = batch
        self.local = False
        self.error: BaseException | None = None
        # queue -> [acks still needed, nodes tried, nodes not answered yet]
        self.needs: dict[str, list[Any]] = {}
        self.rops_by_queue: dict[str, list[list[Any]]] = {}
        self.shipped_at = trio.current_time()

    def ready(self) -> bool:
        return self.local and (self.error is not None
                               or all(n[0] <= 0 for n in self.needs.values()))


class _Link:
    """Our stream to one peer: requests go out in order, answers come back in order."""

    def __init__(self, repl: Replicator, node: str) -> None:
        self.repl = repl
        self.node = node
        self.out_send, self.out_recv = trio.open_memory_channel[dict[str, Any]](math.inf)
        self.waiting: deque[Callable[[dict[str, Any] | None], None]] = deque()
        self.closed = False

    def request(self, frame: dict[str, Any],
                on_reply: Callable[[dict[str, Any] | None], None]) -> None:
        """Send; ``on_reply(answer)``, or ``on_reply(None)`` if the link breaks first."""
        if self.closed:
            on_reply(None)
            return
        self.waiting.append(on_reply)
        self.out_send.send_nowait(frame)

    async def call(self, frame: dict[str, Any],
                   timeout: float = REPLY_TIMEOUT) -> dict[str, Any]:  # noqa: ASYNC109
        done = trio.Event()
        box: list[dict[str, Any] | None] = []

        def got(answer: dict[str, Any] | None) -> None:
            box.append(answer)
            done.set()

        self.request(frame, got)
        with trio.move_on_after(timeout):
            await done.wait()
        if not box or box[0] is None:
            raise Unavailable(f"no answer from node {self.node!r}")
        answer = box[0]
        if "error" in answer:
            raise Unavailable(f"node {self.node!r}: {answer['error']}")
        return answer

    async def run(self) -> None:
        try:
            addr = self.repl.address_of(self.node)
            if addr is None:
                return
            raw = await self.repl.transport.open_stream(addr, CONNECT_TIMEOUT)
            stream = FramedStream(raw, max_frame=LINK_MAX_FRAME)
            try:
                hello = hello_frame(self.repl.cluster, self.repl.me)
                hello["kind"] = "peer"
                await stream.send(hello)
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._writer, stream)
                    while True:
                        answer = await stream.receive()
                        if answer is None or not self.waiting:
                            break
                        self.waiting.popleft()(answer)
                    nursery.cancel_scope.cancel()
            finally:
                await trio.aclose_forcefully(raw)
        except* _LINK_ERRORS as group:
            log.info("link to %s ended: %s", self.node, group.exceptions[0])
        finally:
            self.close()

    async def _writer(self, stream: FramedStream) -> None:
        async for frame in self.out_recv:
            await stream.send(frame)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.repl.links.get(self.node) is self:
            del self.repl.links[self.node]
        waiting, self.waiting = self.waiting, deque()
        for fn in waiting:
            fn(None)


class Replicator:
    def __init__(self, *, me: str, broker: Broker, store: Store, placement: Placement,
                 transport: Transport, cluster: str,
                 membership: Membership | None = None,
                 write_quorum: int | None = None) -> None:
        self.me = me
        self.broker = broker
        self.store = store
        self.placement = placement
        self.transport = transport
        self.cluster = cluster
        self.membership = membership
        self.write_quorum = write_quorum  # for queues that set none (None: a majority)
        self.links: dict[str, _Link] = {}
        self._held: deque[_Held] = deque()
        self._by_batch: dict[int, _Held] = {}
        self._nursery: trio.Nursery | None = None
        self._takeovers: dict[str, trio.Event] = {}
        self._wake = trio.Event()
        self.dropped: dict[str, float] = {}  # deleted queue -> when (a queue tombstone)
        self.rounds = 0
        self.repaired = {"sent": 0, "fetched": 0, "deleted": 0, "handed_off": 0}
        self.failed_quorums = 0
        broker.replicating = True
        store.gate = self

    # -- where things go ---------------------------------------------------------------
    def address_of(self, node: str) -> str | None:
        if self.membership is None:
            return None
        m = self.membership.swim.member(node)
        return None if m is None else m.address

    def replicas(self, q: Queue) -> Replicas:
        w = q.options.write_quorum
        return self.placement.replicas(q.name, q.options.replicas,
                                       self.write_quorum if w is None else w)

    def route(self, name: str) -> str:
        """The node that serves client ops on queue ``name`` (this one: ``self.me``)."""
        q = self.broker.queues.get(name)
        if q is None:  # not declared (yet): its primary with the default replica count
            return self.placement.replicas(name, QueueOptions().replicas).primary or self.me
        return self.replicas(q).primary or self.me

    def check_writable(self, q: Queue) -> None:
        reps = self.replicas(q)
        if not reps.writable:
            raise Unavailable(
                f"queue {q.name!r} needs {reps.write_quorum} of its replicas and "
                f"{len(reps.holders)} are reachable ({', '.join(reps.holders)})")

    async def until_active(self, name: str) -> None:
        """Wait (bounded) until this node dispatches ``name``, after a takeover."""
        q = self.broker.queues.get(name)
        if q is None or q.active:
            return
        self._wake.set()
        with trio.move_on_after(TAKEOVER_WAIT):
            while not q.active and self.broker.queues.get(name) is q:
                event = self._takeovers.get(name)
                if event is None:
                    event = self._takeovers[name] = trio.Event()
                    self._wake.set()
                await event.wait()
        if not q.active and self.broker.queues.get(name) is q:
            raise Unavailable(f"queue {name!r} is being taken over by this node; retry")

    def _link(self, node: str) -> _Link:
        link = self.links.get(node)
        if link is None or link.closed:
            link = self.links[node] = _Link(self, node)
            assert self._nursery is not None
            self._nursery.start_soon(link.run)
        return link

    # -- the gate (Store.gate): ship, then hold each batch until its quorum -------------
    def ship(self, batch: Batch) -> None:
        held = _Held(batch)
        self._held.append(held)
        self._by_batch[id(batch)] = held
        if not batch.rops:
            return
        by_queue = held.rops_by_queue
        for qname, rop in batch.rops:
            if qname in by_queue:
                by_queue[qname].append(rop)
            else:
                by_queue[qname] = [rop]
        to_node: dict[str, list[list[Any]]] = {}
        everyone = [n for n in self.placement.live if n != self.me]
        for qname, rops in by_queue.items():
            q = self.broker.queues.get(qname)
            catalog = any(r[0] in ("q", "x") for r in rops)
            if q is None:  # deleted in this batch: tell every node, wait for nobody
                for node in everyone:
                    to_node.setdefault(node, []).extend(rops)
                continue
            reps = self.replicas(q)
            targets = [n for n in reps.holders if n != self.me]
            held.needs[qname] = [reps.write_quorum - 1, set(targets), set(targets)]
            if reps.write_quorum - 1 > len(targets):
                held.error = Unavailable(
                    f"queue {qname!r} needs {reps.write_quorum} replicas and "
                    f"{len(reps.holders)} are reachable")
            for node in (everyone if catalog else targets):
                to_node.setdefault(node, []).extend(rops)
        for node, rops in to_node.items():
            self._send_rops(held, node, rops)

    def _send_rops(self, held: _Held, node: str, rops: list[list[Any]]) -> None:
        link = self._link(node)
        link.request({"t": "rep", "ops": rops}, functools.partial(self._acked, held, node))

    def _acked(self, held: _Held, node: str, answer: dict[str, Any] | None) -> None:
        ok = answer is not None and "error" not in answer
        for qname, need in held.needs.items():
            tried, waiting = need[1], need[2]
            if node not in waiting:
                continue
            waiting.discard(node)
            if ok:
                need[0] -= 1
                continue
            if need[0] > len(waiting):  # sloppy quorum: try a holder not tried yet
                q = self.broker.queues.get(qname)
                fresh = [] if q is None else [
                    n for n in self.replicas(q).holders if n != self.me and n not in tried]
                if fresh:
                    tried.add(fresh[0])
                    waiting.add(fresh[0])
                    self._send_rops(held, fresh[0], held.rops_by_queue[qname])
            if need[0] > len(waiting) and held.error is None:
                held.error = Unavailable(
                    f"queue {qname!r}: fewer than its write quorum of replicas "
                    f"confirmed (lost node {node!r})")
        self._release()

    def committed(self, batch: Batch, error: BaseException | None) -> None:
        held = self._by_batch.get(id(batch))
        if held is None:
            batch.complete(error)
            return
        held.local = True
        if error is not None:
            held.error = error
        self._release()

    def _release(self) -> None:
        while self._held and self._held[0].ready():
            held = self._held.popleft()
            del self._by_batch[id(held.batch)]
            if held.error is not None and held.needs:
                self.failed_quorums += 1
            held.batch.complete(held.error)

    def abandon(self) -> None:
        while self._held:
            held = self._held.popleft()
            self._by_batch.pop(id(held.batch), None)
            if not held.batch.done:
                held.batch.complete(Unavailable("the node stopped; outcome unknown"))

    async def _expire_waits(self) -> None:
        """A holder that never answers counts as failed (its link is closed)."""
        while True:
            await trio.sleep(REPLY_TIMEOUT / 4)
            if self._held and not self._held[0].ready() and self._held[0].local:
                head = self._held[0]
                if trio.current_time() - head.shipped_at > REPLY_TIMEOUT:
                    for need in head.needs.values():
                        for node in list(need[2]):
                            link = self.links.get(node)
                            if link is not None:
                                link.close()

    # -- serving peers: rops, digests, fetches, hand-offs --------------------------------
    async def serve_link(self, stream: FramedStream, hello: dict[str, Any]) -> None:
        stream.allow_frames(LINK_MAX_FRAME)
        peer = hello["node"]
        out_send, out_recv = trio.open_memory_channel[Any](math.inf)
        # Answers go out in request order, some only once a local commit is durable.
        answers: deque[list[Any]] = deque()

        def answer_later(box: list[Any], frame: dict[str, Any]) -> None:
            box.append(frame)
            while answers and answers[0]:
                out_send.send_nowait(answers.popleft()[0])

        async def writer() -> None:
            async for frame in out_recv:
                await stream.send(frame)

        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(writer)
                while (frame := await stream.receive()) is not None:
                    box: list[Any] = []
                    answers.append(box)
                    try:
                        await self._serve_request(peer, frame,
                                                  functools.partial(answer_later, box))
                    except (MeshqError, ValueError, TypeError, KeyError, IndexError) as exc:
                        answer_later(box, {"error": str(exc)})
                nursery.cancel_scope.cancel()
        except* _LINK_ERRORS as group:
            log.info("link from %s ended: %s", peer, group.exceptions[0])

    async def _serve_request(self, peer: str, frame: dict[str, Any],
                             answer: Callable[[dict[str, Any]], None]) -> None:
        kind = frame.get("t")
        if kind == "rep":
            self._apply_then(frame["ops"], answer)
        elif kind == "digest":
            q = self.broker.queues.get(frame["qrow"][1])
            if q is None or qrow(q) != frame["qrow"]:  # new, or options/counters changed
                self._apply_then([frame["qrow"]], lambda _: None)
                q = self.broker.queues.get(frame["qrow"][1])
            theirs = frame["sums"]
            diff: list[list[Any]] = []  # [[bucket, items], ...] (map keys are strings)
            if q is not None:
                sums, members = await _digests(q)
                for b in range(BUCKETS):
                    if sums[b] != theirs[b]:
                        diff.append([b, [item(m) for m in members[b]]])
            answer({"diff": diff})
        elif kind == "fetch":
            q = self.broker.queues.get(frame["q"])
            recs = []
            if q is not None:
                for mid in frame["ids"]:
                    msg = q.messages.get(mid)
                    if msg is not None:
                        recs.append(put_rop(msg))
            answer({"records": recs})
        elif kind == "handoff":  # the peer holds a queue it is no longer a holder of
            q = self.broker.queues.get(frame["q"])
            if q is None or self.replicas(q).primary != self.me or not q.active:
                answer({"error": "not the primary"})
                return
            await self._sync(q, peer, merge=True)
            answer({})
        elif kind == "catalog":
            rops: list[list[Any]] = []
            for row in frame["queues"]:
                if row[1] not in self.broker.queues and row[1] not in self.dropped:
                    rops.append(row)
            for name in frame["dropped"]:
                if name in self.broker.queues:
                    rops.append(["x", name])
            self._apply_then(rops, answer)
        else:
            raise ValueError(f"unknown peer request {kind!r:.40}")

    def _apply_then(self, rops: list[list[Any]],
                    answer: Callable[[dict[str, Any]], None]) -> None:
        for rop in rops:
            if rop[0] == "x":
                self.dropped[rop[1]] = trio.current_time()
            elif rop[0] == "q":
                self.dropped.pop(rop[1], None)
        batch = self.broker.apply(rops)
        if any(rop[0] in ("q", "x") for rop in rops):
            self.placement_changed()  # a new queue may need a takeover or a hand-off
        if not batch.ops:
            answer({})
            return
        batch.on_local.append(
            lambda err: answer({} if err is None else {"error": f"commit failed: {err}"}))

    # -- anti-entropy, takeover, hand-off ------------------------------------------------
    async def _sync(self, q: Queue, node: str, *, merge: bool) -> None:
        """Make ``node``'s copy of ``q`` equal ours (``merge``: take what it has that we
        lack, unless tombstoned, and the further-along state of a message)."""
        sums, members = await _digests(q)
        link = self._link(node)
        answer = await link.call({"t": "digest", "qrow": qrow(q), "sums": sums})
        repairs: list[list[Any]] = []
        theirs_only: list[str] = []
        local: list[list[Any]] = []

        def compare(msg: Message, theirs: list[Any]) -> None:
            mine = item(msg)
            if theirs != mine:
                best = merged(mine, theirs) if merge else mine
                if best is not mine:
                    local.append(update_rop(q.name, best))
                repairs.append(update_rop(q.name, best))

        # Both sides were read at different moments, and changes went on meanwhile, so
        # what is compared is our state *now*: a message that arrived after our digest
        # is not "theirs only", and one deleted since is not sent again.
        messages = q.messages
        for b, items in answer["diff"]:
            theirs = {it[0]: it for it in items}
            for msg in members[int(b)]:
                if messages.get(msg.id) is not msg:
                    continue  # deleted since our digest (the deletion is replicated)
                t = theirs.pop(msg.id, None)
                if t is None:
                    repairs.append(put_rop(msg))
                else:
                    compare(msg, t)
            for mid, t in theirs.items():
                now = messages.get(mid)
                if now is None:
                    theirs_only.append(mid)
                else:
                    compare(now, t)
        if theirs_only:
            # Only a tombstone says that a message is gone: one the holder has and we do
            # not may be a send still waiting for its quorum here (holders apply at once).
            gone = await self.store.tombstoned(q.name, theirs_only)
            wanted = [mid for mid in theirs_only if mid not in gone] if merge else []
            if wanted:
                got = await link.call({"t": "fetch", "q": q.name, "ids": wanted})
                local.extend(got["records"])
                self.repaired["fetched"] += len(got["records"])
            repairs.extend(["d", q.name, mid] for mid in gone)
            self.repaired["deleted"] += len(gone)
        if local:
            await self._wait_local(self.broker.apply(local))
        self.repaired["sent"] += len(repairs)
        for chunk in chunks(repairs):
            await link.call({"t": "rep", "ops": chunk})

    async def _wait_local(self, batch: Batch) -> None:
        if not batch.ops:
            return
        done = trio.Event()
        batch.on_local.append(lambda err: done.set())
        await done.wait()

    async def _takeover(self, q: Queue) -> None:
        reps = self.replicas(q)
        for node in reps.followers:
            try:
                await self._sync(q, node, merge=True)
            except _EXCHANGE_ERRORS as exc:
                log.info("takeover of %s: %s", q.name, exc)
        if self.broker.queues.get(q.name) is q and self.replicas(q).primary == self.me:
            self.broker.activate(q)
            log.info("dispatching queue %s", q.name)
        event = self._takeovers.pop(q.name, None)
        if event is not None:
            event.set()

    async def _handoff(self, q: Queue, primary: str) -> None:
        try:
            await self._link(primary).call({"t": "handoff", "q": q.name}, timeout=60.0)
        except _EXCHANGE_ERRORS as exc:
            log.info("hand-off of %s to %s: %s", q.name, primary, exc)
            return
        if self.broker.queues.get(q.name) is not q or q.active:
            return
        if self.me in self.replicas(q).holders:
            return
        self.broker.forget(q)
        self.repaired["handed_off"] += 1

    def placement_changed(self) -> None:
        self._wake.set()

    async def _rounds(self) -> None:
        busy: set[str] = set()

        async def guarded(key: str, fn: Callable[..., Any], *args: Any) -> None:
            try:
                await fn(*args)
            except _EXCHANGE_ERRORS as exc:
                log.info("%s: %s", key, exc)
            finally:
                busy.discard(key)

        assert self._nursery is not None
        next_full = 0.0
        while True:
            self.placement.refresh()
            now = trio.current_time()
            full = now >= next_full
            if full:
                next_full = now + ROUND
                self.rounds += 1
                self._gossip_catalog()
            for q in list(self.broker.queues.values()):
                reps = self.replicas(q)
                if reps.primary == self.me:
                    key = f"takeover {q.name}" if not q.active else f"sync {q.name}"
                    if key in busy or (q.active and not full):
                        continue
                    busy.add(key)
                    if not q.active:
                        self._nursery.start_soon(guarded, key, self._takeover, q)
                    else:
                        busy.discard(key)
                        push = functools.partial(self._sync, merge=False)
                        for node in reps.followers:
                            k = f"{key} {node}"
                            if k not in busy:
                                busy.add(k)
                                self._nursery.start_soon(guarded, k, push, q, node)
                else:
                    if q.active:
                        self.broker.deactivate(
                            q, f"queue moved to node {reps.primary}; subscribe again")
                    if (full and q.messages and self.me not in reps.holders
                            and reps.primary is not None):
                        key = f"handoff {q.name}"
                        if key not in busy:
                            busy.add(key)
                            self._nursery.start_soon(guarded, key, self._handoff, q,
                                                     reps.primary)
            with trio.move_on_after(max(0.0, next_full - trio.current_time())):
                await self._wake.wait()
            self._wake = trio.Event()

    def _gossip_catalog(self) -> None:
        now = trio.current_time()
        for name, at in list(self.dropped.items()):
            if now - at > DROPPED_KEEP:
                del self.dropped[name]
        frame = {"t": "catalog", "queues": [qrow(q) for q in self.broker.queues.values()],
                 "dropped": list(self.dropped)}
        for node in self.placement.live:
            if node != self.me:
                self._link(node).request(frame, lambda answer: None)

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            if self.membership is not None:
                self.membership.stream_handlers["peer"] = self.serve_link
            self.placement.refresh()
            for q in self.broker.queues.values():  # nothing dispatches before its takeover
                q.active = False
            nursery.start_soon(self._rounds)
            nursery.start_soon(self._expire_waits)
            task_status.started()

    def status(self) -> dict[str, Any]:
        hints = 0
        taking_over = []
        for q in self.broker.queues.values():
            reps = self.replicas(q)
            if q.messages and self.me not in reps.holders:
                hints += len(q.messages)
            if reps.primary == self.me and not q.active:
                taking_over.append(q.name)
        return {
            "hinted_messages": hints,
            "taking_over": sorted(taking_over),
            "waiting_batches": len(self._held),
            "failed_quorums": self.failed_quorums,
            "repair_rounds": self.rounds,
            "repaired": dict(self.repaired),
            "links": sorted(n for n, link in self.links.items() if not link.closed),
        }


DIGEST_SLICE = 2000  # messages digested per event-loop turn: a big queue never stalls it


async def _digests(q: Queue) -> Digests:
    """``digests(q)``, computed a slice at a time so that other tasks run meanwhile."""
    out = new_digests()
    msgs = list(q.messages.values())
    for start in range(0, len(msgs), DIGEST_SLICE):
        add_to_digests(out, msgs[start:start + DIGEST_SLICE])
        await trio.lowlevel.checkpoint()
    return out
