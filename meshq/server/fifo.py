"""A fifo queue of several partitions, served to each consumer in HLC order (SPEC section 2).

On the consumer's node, a subscription's parts (one on every partition, each where that
partition is dispatched: meshq.server.spread) deliver into a FifoMerge
(meshq.broker.closed), which hands the client the lowest message it holds once every other
partition holds something behind it or has closed above it. Each part reports its closed
timestamp for its consumer: piggy-backed on every delivery relayed from its node, and when
the merge asks (op ``_closed``, between nodes: a long poll answered as soon as the closed
timestamps pass what the merge waits on, or after CLOSED_WAIT s); a part on this node is
looked at directly. So a merge that waits costs one round trip, not a timer's period.

State here: per fifo subscription of this client, its merge and which homes are being
asked; per consumer tag served here, the ids of the leases handed over to it (the others
are granted and on their way: the closed timestamp stays below them).
Never: a held message lost (it is released, or put back when its subscription ends), a
``closed`` field reaching the client.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import trio

from meshq.broker.closed import FifoMerge, Key
from meshq.broker.partitions import parse_receipt
from meshq.broker.replica import Moved
from meshq.errors import BadRequest, MeshqError, Timeout
from meshq.server.spread import QUICK_RETRY, QUICK_TIMEOUT, _gather, _held

if TYPE_CHECKING:
    from meshq.model import Message
    from meshq.server.session import ClientSession

__all__ = ["ASK_BACKOFF", "CLOSED_POLL", "CLOSED_WAIT", "Fifo", "order_key"]

log = logging.getLogger("meshq.server.fifo")

CLOSED_POLL = 0.002  # s between looks at closed timestamps a long poll waits on
CLOSED_WAIT = 0.5  # s a long poll waits at most before it answers what it has
ASK_BACKOFF = 0.05  # s before asking again after a failure, or while a part is placed


@dataclass
class _Follow:
    """A fifo subscription's merge on the client's node."""

    tag: str
    queue: str
    merge: FifoMerge
    asking: set[str | None] = field(default_factory=set)  # homes asked (None: here)


class Fifo:
    def __init__(self, session: ClientSession) -> None:
        self.s = session
        self.handed: dict[str, set[str]] = {}
        self.follows: dict[str, _Follow] = {}

    def ordered(self, name: str) -> bool:
        """Whether ``name`` is a fifo queue of several partitions (one partition keeps
        HLC order by itself: its primary alone stamps, in order)."""
        qs = self.s.broker.queues.get(name)
        return qs is not None and len(qs) > 1 and qs[0].options.ordering == "fifo"

    # -- where a partition is dispatched -------------------------------------------------
    def frontier(self, name: str, tag: str, index: int) -> int | None:
        """The closed timestamp of partition ``index`` for this session's consumer ``tag``
        (None: not dispatched here, or no such consumer here)."""
        s = self.s
        qs = s.broker.queues.get(name)
        if qs is None or not 0 <= index < len(qs) or not qs[index].active:
            return None
        q = qs[index]
        c = next((c for c in s.session.consumers.get(tag, ()) if c.queue is q), None)
        if c is None:
            return None
        handed = self.handed.get(tag, set())
        mine = [m for m in s.session.leases if m.owner is c]  # (at most its prefetch)
        self.handed[tag] = {m.id for m in mine if m.id in handed}
        return s.broker.closed_of(q, [m.hlc for m in mine if m.id not in handed])

    def handed_over(self, tag: str, msgs: list[Message], frame: dict[str, Any]) -> None:
        """Deliveries of consumer ``tag`` go out in ``frame``; relayed, it carries the
        closed timestamps for that consumer of its partitions here ([index, closed]...)."""
        self.handed.setdefault(tag, set()).update(m.id for m in msgs)
        if self.s.relayed:
            closed = [[c.queue.index, self.frontier(c.queue.name, tag, c.queue.index)]
                      for c in self.s.session.consumers.get(tag, ())]
            frame["closed"] = [pair for pair in closed if pair[1] is not None]

    async def wait_closed(self, name: str, tag: str, indexes: list[int],
                          after: int) -> list[int | None]:
        """The closed timestamps of ``tag``'s parts on ``indexes``, once all are above
        ``after``, or as they are after CLOSED_WAIT s."""
        await _until(lambda: all(ts is not None and ts > after for ts in (
            self.frontier(name, tag, i) for i in indexes)))
        return [self.frontier(name, tag, i) for i in indexes]

    async def closed_op(self, req: dict[str, Any]) -> dict[str, Any]:
        """Op ``_closed`` (between nodes): {queue, consumer, partitions, after}."""
        name, tag = req.get("queue"), req.get("consumer")
        indexes, after = req.get("partitions"), req.get("after")
        if (not isinstance(name, str) or not isinstance(tag, str)
                or not isinstance(indexes, list) or not 0 < len(indexes) <= 1024
                or not all(type(i) is int for i in indexes) or type(after) is not int):
            raise BadRequest("'_closed' takes queue, consumer, partitions and after")
        return {"closed": await self.wait_closed(name, tag, indexes, after)}

    async def take_op(self, req: dict[str, Any]) -> dict[str, Any]:
        """Op ``_fifo_take`` (a fifo receive's share of partitions here): {queue,
        partitions, max, before, after, visibility_timeout}. With ``after`` it first waits
        (up to CLOSED_WAIT s) until each partition has closed above it or has a ready
        message at or below it; then it leases up to ``max[i]`` of partition i's lowest
        ready messages below ``before[i]`` ([HLC, node]: ``order_key``), and answers
        ``parts``: per partition, its closed timestamp not counting its ready messages,
        its ready head's [HLC, node] (None: none) after that, and what it took."""
        from meshq.server.session import delivery  # (the session imports this module)
        s = self.s
        name, indexes = req.get("queue"), req.get("partitions")
        most, before, after = req.get("max"), req.get("before"), req.get("after")
        if (not isinstance(name, str) or not isinstance(indexes, list)
                or not isinstance(most, list) or not isinstance(before, list)
                or not len(indexes) == len(most) == len(before)
                or not all(type(v) is int for v in (*indexes, *most))
                or not all(_is_key(b) for b in before)
                or not (after is None or type(after) is int)):
            raise BadRequest("'_fifo_take' takes queue, partitions, max, before and after")
        qs = s.broker.queue(name)
        chosen = s.broker._chosen(qs, indexes)
        if len(chosen) != len(indexes) or not all(q.active for q in chosen):
            raise Moved(f"queue {name!r} moved to another node")
        if after is not None:
            await _until(lambda: all(_passed(s.broker.closed_of(q, []),
                                             s.broker.ready_floor(q), after) for q in chosen))
        parts = []
        for q, n, below in zip(chosen, most, before, strict=True):
            took = []
            k = (q.ready_below(order_key(*below), min(n, s.broker.limits.max_batch))
                 if n > 0 else 0)
            if k:
                took = await s.broker.receive(s.session, name, k, 0.0,
                                              req.get("visibility_timeout"), [q.index])
            head = q.head_ready()
            key = None if head is None else [head.hlc, head.node]
            floor = s.broker.ready_floor(q)
            if floor is not None and (head is None or floor < head.hlc):
                key = [floor, ""]  # (below what is on disk only: paged in soon)
                s.broker.backlog.want(q)
            now = s.broker.clock.time()
            parts.append([s.broker.closed_of(q, [], ready=False), key,
                          [delivery(m, now, s.relayed) for m in took]])
        return {"parts": parts}

    # -- on the client's node ------------------------------------------------------------
    async def receive(self, name: str, req: dict[str, Any], handler: Any,
                      parts: list[list[int]], want: int, wait: float,
                      ) -> tuple[list[dict[str, Any]], list[float]]:
        """A receive on a fifo queue of several partitions: up to ``want`` messages in
        HLC order, and when each reached this node. It learns each partition's closed
        timestamp and ready head, takes only what every other partition has closed above
        (op ``_fifo_take``, grouped by primary), and, when nothing is ready anywhere,
        waits for the first arrival (meshq.server.spread) and then for the others to
        close above it. What it took and may not return yet goes back (counted)."""
        s = self.s
        n = len(s.broker.queues[name])
        merge = FifoMerge(n)
        heads: list[Key | None] = [None] * n
        deadline = trio.current_time() + wait
        out: list[tuple[dict[str, Any], float]] = []
        look = (0, (0, ""))  # (max, before): take nothing, say how far closed
        first = await self._take(name, req, merge, heads, dict.fromkeys(range(n), look))
        if first is not None:
            raise first  # no partition answered
        waited = False
        last: Any = None
        while True:
            state = (list(heads), list(merge.closed), sum(map(len, merge.held)), len(out))
            if state == last:  # nothing moved since the last turn: not so fast
                await trio.sleep(ASK_BACKOFF)
            last = state
            await trio.lowlevel.checkpoint()  # (what it asks may all be here)
            out += merge.release()
            if len(out) >= want:
                break
            room = want - len(out) - sum(map(len, merge.held))
            plan = {}
            for j, head in enumerate(heads):
                # below every other partition's closed timestamp and what it holds
                bound = min((h[0][0] if h else merge.closed[k]
                             for k, h in enumerate(merge.held) if k != j), default=head)
                if head is not None and bound is not None and head < bound:
                    # (one at least: what it holds waits for it; one too many goes back)
                    plan[j] = (max(room, 1), bound)
            if plan and await self._take(name, req, merge, heads, plan) is None:
                continue
            held = merge.waits_on()
            now = trio.current_time()
            if held is not None and now < deadline + CLOSED_WAIT:
                after, blocking = held
                await self._take(name, req, merge, heads, dict.fromkeys(blocking, look),
                                 after)
                continue
            if out or waited or now >= deadline:
                break
            waited = True
            got = await s.spread._wait_all(name, {**req, "wait": deadline - now}, handler,
                                           parts, 1)  # (then the rest, in order)
            at = s.broker.clock.time()
            for m in got:
                merge.add(parse_receipt(str(m.get("receipt", "")))[2] or 0,
                          order_key(m["hlc"], m["id"]), (m, at))
            await self._take(name, req, merge, heads, dict.fromkeys(range(n), look))
        back = [m for m, _ in out[want:] + merge.drain()]
        if back:
            await s.spread._put_back(name, back)
        return [m for m, _ in out[:want]], [at for _, at in out[:want]]

    async def _take(self, name: str, req: dict[str, Any], merge: FifoMerge,
                    heads: list[Key | None], plan: dict[int, tuple[int, Key]],
                    after: int | None = None) -> MeshqError | None:
        """Op ``_fifo_take`` on the partitions of ``plan`` (index -> (max, before)), one
        request per primary at once; what they took goes into ``merge``, their closed
        timestamps and heads into it and ``heads``. None if something answered, else the
        first error."""
        from meshq.server.ops import OPS  # (ops imports the session module)
        s = self.s
        qs = s.broker.queues.get(name)
        if qs is None:
            return MeshqError(f"queue {name!r} was deleted")
        cluster = s.cluster
        groups: dict[str | None, list[int]] = {}
        for j in plan:
            key = cluster.replicas(qs[j]).primary if cluster is not None else None
            groups.setdefault(key, []).append(j)

        async def one(indexes: list[int]) -> dict[str, Any]:
            sub = {"op": "_fifo_take", "queue": name, "max": [plan[j][0] for j in indexes],
                   "before": [list(plan[j][1]) for j in indexes], "after": after,
                   "visibility_timeout": req.get("visibility_timeout")}
            with trio.move_on_after(CLOSED_WAIT + QUICK_TIMEOUT):
                return await s.spread._part("_fifo_take", name, sub, OPS["_fifo_take"],
                                            indexes, retry_for=QUICK_RETRY)
            raise Timeout(f"partitions {indexes} of {name!r} did not answer")

        batches = list(groups.values())
        results = await _gather([one(indexes) for indexes in batches])
        errors = []
        at = s.broker.clock.time()
        for indexes, res in zip(batches, results, strict=True):
            got = res.get("parts") if isinstance(res, dict) else None
            if not isinstance(got, list) or len(got) != len(indexes):
                errors.append(res if isinstance(res, MeshqError) else MeshqError(
                    f"partitions {indexes} of {name!r} did not answer"))
                continue
            for j, (closed, head, msgs) in zip(indexes, got, strict=True):
                heads[j] = order_key(head[0], head[1]) if _is_key(head) else None
                for m in msgs:
                    merge.add(j, order_key(m["hlc"], m["id"]), (m, at))
                if type(closed) is int:  # (the ready head is not closed: it is there)
                    merge.close(j, min((closed, ""), heads[j] or (closed, "")))
        return errors[0] if len(errors) == len(batches) else None

    def follow(self, tag: str, name: str) -> None:
        """Subscription ``tag`` on fifo queue ``name``: its deliveries go through a merge."""
        qs = self.s.broker.queues[name]
        self.follows[tag] = _Follow(tag, name, FifoMerge(len(qs)))

    def unfollow(self, tag: str) -> list[dict[str, Any]]:
        """The subscription ended: what its merge still held (to put back)."""
        f = self.follows.pop(tag, None)
        self.handed.pop(tag, None)
        return [] if f is None else [m for m, _ in f.merge.drain()]

    def take(self, frame: dict[str, Any]) -> bool:
        """A delivery frame for the client: True if a merge took it (it releases it in
        order); False: push it as it is."""
        closed = frame.pop("closed", None)
        tag = frame.get("consumer")
        f = self.follows.get(tag) if isinstance(tag, str) else None
        if f is None:
            return False
        merge = f.merge
        for pair in closed if isinstance(closed, list) else ():
            if (isinstance(pair, list) and len(pair) == 2 and type(pair[0]) is int
                    and 0 <= pair[0] < len(merge.held) and type(pair[1]) is int):
                merge.close(pair[0], pair[1])
        now = self.s.broker.clock.time()
        for m in frame.get("messages") or ():
            _, _, at = parse_receipt(str(m.get("receipt", "")))
            if at is not None and 0 <= at < len(merge.held) and type(m.get("hlc")) is int:
                merge.add(at, order_key(m["hlc"], m.get("id")), (m, now))
        self._release(f)
        return True

    def _release(self, f: _Follow) -> None:
        s = self.s
        sub = s.subs.get(f.tag)
        homes = (sub.homes if sub is not None else None) or {}
        merge = f.merge
        for j, home in homes.items():  # the parts here: looked at now
            if home is None and not merge.held[j]:
                closed = self.frontier(f.queue, f.tag, j)
                if closed is not None:
                    merge.close(j, closed)
        out = merge.release()
        if out:
            # (less the time they waited here; one whose lease ran out meanwhile is
            # another consumer's by now, and comes again, redelivered)
            msgs = _held([m for m, _ in out], [at for _, at in out], s.broker.clock.time())
            if msgs:
                s.out.push({"push": "deliver", "consumer": f.tag, "messages": msgs})
        wait = merge.waits_on()
        if wait is None:
            return
        after, blocking = wait
        by_home: dict[str | None, list[int]] = {}
        for j in blocking:
            by_home.setdefault(homes.get(j, ""), []).append(j)
        for home, indexes in by_home.items():
            if home not in f.asking:
                f.asking.add(home)
                s.spread._spawn(self._ask, f, home, indexes, after)

    async def _ask(self, f: _Follow, home: str | None, indexes: list[int],
                   after: int) -> None:
        """Learn the closed timestamps of ``indexes`` (on ``home``) once above ``after``."""
        got: Any = None
        try:
            if home is None:
                got = await self.wait_closed(f.queue, f.tag, indexes, after)
            elif home:
                got = (await self.s._call_remote(home, "_closed", {
                    "op": "_closed", "queue": f.queue, "consumer": f.tag,
                    "partitions": indexes, "after": after})).get("closed")
            if not isinstance(got, list):
                await trio.sleep(ASK_BACKOFF)  # (being placed, or an older node)
        except MeshqError as exc:
            log.debug("closed timestamps of %r %s from %s: %s", f.queue, indexes, home, exc)
            await trio.sleep(ASK_BACKOFF)
        finally:
            f.asking.discard(home)
        if self.follows.get(f.tag) is not f or self.s.closed:
            return
        for j, ts in zip(indexes, got if isinstance(got, list) else (), strict=False):
            if type(ts) is int:
                f.merge.close(j, ts)
        self._release(f)


def _passed(closed: int, floor: int | None, after: int) -> bool:
    """Whether a partition closed above ``after``, or has a ready message to take at or
    below it (``floor``: at or below its ready messages)."""
    return closed > after or (floor is not None and floor <= after)


async def _until(done: Callable[[], bool]) -> None:
    """Until ``done()``, or CLOSED_WAIT s, looking every CLOSED_POLL s (only while a merge
    or a receive waits on a closed timestamp)."""
    deadline = trio.current_time() + CLOSED_WAIT
    while True:
        if done() or trio.current_time() >= deadline:
            return
        await trio.sleep(CLOSED_POLL)


def order_key(hlc: int, mid: Any) -> Key:
    """A message's order key (HLC, node) from its HLC and its id ("<hlc>-<node>"), or
    from a key as it travels ([HLC, node]; [HLC, id] from a node of an earlier version).
    Not from the id alone: a message stamped again (fifo, after a failover) keeps its id,
    and two nodes may stamp two messages alike, so ids would order them otherwise."""
    return (hlc, str(mid).rpartition("-")[2])


def _is_key(v: Any) -> bool:
    """[HLC, node] (a message's order key, as it travels)."""
    return (isinstance(v, list | tuple) and len(v) == 2 and type(v[0]) is int
            and isinstance(v[1], str))
