"""A queue of several partitions, served to a client as one queue (SPEC section 2).

The client's node spreads; each partition's own part of an op goes where the router says,
as an op on a queue of one partition does (ClientSession._serve: served here, after a
takeover here, or relayed to its primary, routed again while refused). A send goes to one
partition: its messages' key's (``partition_key``, else ``dedup_id``:
meshq.broker.partitions), else one this node dispatches, in turn, else the next in turn; a
send whose messages belong to several partitions is split, and its outcome is unknown
when some parts were written and others not. A subscription has a part on every partition
(its prefetch spread over them, or moved to the partitions here while they have ready
messages: meshq.server.steal), each placed, and placed again when its partition moves,
on its own; the client sees one consumer tag. A receive takes from the partitions here
first, then from the others in turn; when it must wait, it waits on all of them at once,
and what reaches a second partition's wait after the first one answered is put back
(nack, requeue: it counts as a delivery). Acks go by receipt to their partition. Counts
are summed from each partition's primary.

State here: the client's node's turn among partitions, and the receipts of the latest
deliveries from partitioned queues (bounded), so that a bare message id settles too.
Never: a part of a subscription silently missing (it is placed again until its queue is
deleted, and then the client hears a final cancel), or an id settled on another partition
than its receipt names.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import trio

from meshq.broker import Moved
from meshq.broker.partitions import parse_receipt
from meshq.cluster.router import AwaitTakeover, Local, Relay
from meshq.errors import BadRequest, MeshqError, NotFound, Timeout, Unavailable
from meshq.server.steal import LocalFirst, Steal

if TYPE_CHECKING:
    from meshq.broker.queue import Queue
    from meshq.server.session import ClientSession, _Sub

__all__ = ["SPREAD_OPS", "Spread", "named"]

log = logging.getLogger("meshq.server.spread")

SPREAD_OPS = frozenset({"send", "receive", "consume", "ack", "nack", "extend", "stats",
                        "purge"})
MAX_RECEIPTS = 65536  # receipts remembered for settling by bare id
QUICK_RETRY = 0.5  # a receive's first pass skips a partition refused this long
QUICK_TIMEOUT = 1.0  # or whose node does not answer within this long
LOSERS_WAIT = 2.0  # a waiting receive's answer waits this long for its other parts to end
_SETTLED_KEY = {"ack": "acked", "nack": "nacked", "extend": "extended"}

Handler = Callable[["ClientSession", dict[str, Any]], Any]


def named(qs: tuple[Queue, ...], req: dict[str, Any]) -> tuple[Queue, ...]:
    """The partitions a request names (``partition``, or ``partitions``), else partition
    0; a name out of range names partition 0 (whose node's broker then says so)."""
    if not qs:
        return ()
    one = req.get("partition")
    if type(one) is int and 0 <= one < len(qs):
        return (qs[one],)
    many = req.get("partitions")
    if (isinstance(many, list) and many
            and all(type(i) is int and 0 <= i < len(qs) for i in many)):
        return tuple(qs[i] for i in sorted(set(many)))
    return (qs[0],)


class Spread:
    def __init__(self, session: ClientSession) -> None:
        self.s = session
        self._turn = 0
        self._receipts: OrderedDict[str, str] = OrderedDict()
        # Parts of subscriptions that ended on a node while being placed there.
        self._late: set[tuple[str, int, str]] = set()
        self.local = LocalFirst(session, self._spawn)

    # -- entry -----------------------------------------------------------------------------
    def handle(self, rid: Any, op: str, name: str, req: dict[str, Any],
               handler: Handler) -> bool:
        """Serve ``op`` if ``name`` is a queue of several partitions and the request does
        not name one itself; False leaves it to the caller."""
        qs = self.s.broker.queues.get(name)
        if op not in SPREAD_OPS or "partition" in req or "partitions" in req:
            return False
        cluster = self.s.cluster
        if qs is None and cluster is not None and not cluster.catalog_ready.is_set():
            self.s.out.spawn(self._after_catalog, rid, op, req, handler)
            return True  # (just started: how many partitions it has is not known yet)
        if qs is None or len(qs) < 2:
            return False
        if op == "send":
            return self._send(rid, name, req, handler, qs)
        self.s.out.spawn(self._answer, rid, op, self._serve(op, name, req, handler, qs))
        return True

    async def _after_catalog(self, rid: Any, op: str, req: dict[str, Any],
                             handler: Handler) -> None:
        cluster = self.s.cluster
        assert cluster is not None
        await cluster.until_catalog()
        if not cluster.catalog_ready.is_set():
            self.s.out.error(rid, Unavailable("this node has not learned the cluster's "
                                              "queues yet; retry"))
            return
        self.s.handle(rid, op, req, handler)

    async def _answer(self, rid: Any, op: str, work: Awaitable[dict[str, Any]]) -> None:
        try:
            result = await work
        except MeshqError as exc:
            self.s.out.error(rid, exc)
            return
        except Exception:
            self.s._internal_error(rid, op)
            return
        self.s.out.respond(rid, result)

    async def _serve(self, op: str, name: str, req: dict[str, Any], handler: Handler,
                     qs: tuple[Queue, ...]) -> dict[str, Any]:
        if op == "receive":
            return await self._receive(name, req, handler, qs)
        if op == "consume":
            return await self._consume(name, req, qs)
        if op in _SETTLED_KEY:
            return await self._settle(op, name, req, handler, qs)
        if op == "send":
            return await self._send_split(name, req, handler, qs)
        return await self._sum(op, name, req, handler, qs)

    async def _part(self, op: str, name: str, req: dict[str, Any], handler: Handler,
                    indexes: list[int], *, retry_for: float | None = None,
                    ) -> dict[str, Any]:
        """``op`` on these partitions (which share a primary), wherever it is served,
        routed again while refused for ``retry_for`` s (None: as any op)."""
        s = self.s
        sub = {**req, "partitions": indexes}
        r = s._route(op, name, sub)
        if retry_for is None:
            return await s._serve(op, sub, handler, r)
        return await s._serve(op, sub, handler, r, retry_for=retry_for)

    def _local(self, qs: tuple[Queue, ...]) -> list[int]:
        """The partitions this node dispatches now."""
        return [q.index for q in qs if q.active]

    # -- send --------------------------------------------------------------------------------
    def _send(self, rid: Any, name: str, req: dict[str, Any], handler: Handler,
              qs: tuple[Queue, ...]) -> bool:
        msgs = req.get("messages")
        if not isinstance(msgs, list) or not msgs or not all(isinstance(m, dict)
                                                             for m in msgs):
            return False  # partition 0's broker says what is wrong with it
        groups = self._send_groups(msgs, qs)
        if len(groups) > 1:
            try:
                self.s.broker.check_messages(msgs)  # all of them, or no part is written
            except MeshqError as exc:
                self.s.out.error(rid, exc)
                return True
            self.s.out.spawn(self._answer, rid, "send",
                             self._send_split(name, req, handler, qs, groups))
            return True
        s = self.s
        sub = {**req, "partition": next(iter(groups))}
        r = s._route("send", name, sub)
        if isinstance(r, Local):
            s._run_local(rid, "send", sub, handler)
        elif isinstance(r, Relay):
            s._relay_once(rid, "send", sub, handler, r.node)
        else:
            s.out.spawn(s._routed, rid, "send", sub, handler, r)
        return True

    def _send_groups(self, msgs: list[dict[str, Any]], qs: tuple[Queue, ...],
                     ) -> dict[int, list[int]]:
        """Partition index -> the positions of the messages that go there."""
        groups: dict[int, list[int]] = {}
        free: int | None = None
        for i, m in enumerate(msgs):
            key, dedup_id = m.get("partition_key"), m.get("dedup_id")
            at = self.s.broker.partition_of(qs, key if isinstance(key, str) else None,
                                            dedup_id if isinstance(dedup_id, str) else None)
            if at is None:
                if free is None:
                    free = self._next(qs)
                at = free
            groups.setdefault(at, []).append(i)
        return groups

    def _next(self, qs: tuple[Queue, ...]) -> int:
        """An unkeyed send's partition: one dispatched here, in turn, else any in turn."""
        pool = self._local(qs) or list(range(len(qs)))
        self._turn += 1
        return pool[self._turn % len(pool)]

    async def _send_split(self, name: str, req: dict[str, Any], handler: Handler,
                          qs: tuple[Queue, ...],
                          groups: dict[int, list[int]] | None = None) -> dict[str, Any]:
        msgs = req["messages"]
        groups = groups or self._send_groups(msgs, qs)
        ids: list[Any] = [None] * len(msgs)
        parts = list(groups.items())
        outcomes = await _gather([
            self._part_send(name, req, handler, index, [msgs[i] for i in at])
            for index, at in parts])
        errors = [o for o in outcomes if isinstance(o, MeshqError)]
        for (_, at), outcome in zip(parts, outcomes, strict=True):
            if not isinstance(outcome, BaseException):
                for i, mid in zip(at, outcome.get("ids", ()), strict=False):
                    ids[i] = mid
        if errors:
            if len(errors) < len(parts) or any(isinstance(e, Timeout) for e in errors):
                raise Timeout(f"the batch went to {len(parts)} partitions and some did not "
                              f"confirm their part ({errors[0].message}); outcome unknown "
                              "(retry with dedup ids)")
            raise errors[0]
        return {"ids": ids}

    async def _part_send(self, name: str, req: dict[str, Any], handler: Handler, index: int,
                         msgs: list[Any]) -> dict[str, Any]:
        s = self.s
        sub = {**req, "messages": msgs, "partition": index}
        return await s._serve("send", sub, handler, s._route("send", name, sub))

    # -- receive ------------------------------------------------------------------------------
    async def _receive(self, name: str, req: dict[str, Any], handler: Handler,
                       qs: tuple[Queue, ...]) -> dict[str, Any]:
        want, wait, auto_ack = self._receive_fields(req)
        part_req = {k: v for k, v in req.items() if k != "auto_ack"}  # (acked at the end)
        local = self._local(qs)
        self._turn += 1
        others = [(self._turn + i) % len(qs) for i in range(len(qs))]
        parts = ([local] if local else []) + [[i] for i in others if i not in local]
        clock = self.s.broker.clock
        if self.s.fifo.ordered(name):  # in HLC order over the partitions
            got, stamps = await self.s.fifo.receive(name, part_req, handler, parts, want,
                                                    wait)
        else:
            got, stamps = await self._take(name, part_req, handler, parts, want, wait)
        if auto_ack and got:
            from meshq.server.ops import OPS
            done = await self._settle("ack", name, {"op": "ack", "queue": name,
                                                    "ids": [m["receipt"] for m in got]},
                                      OPS["ack"], qs)
            acked = set(done["acked"])
            got = [m for m in got if m.get("id") in acked]  # (a lease ran out meanwhile)
        else:
            got = _held(got, stamps, clock.time())
        self._learn(got)
        return {"messages": got}

    async def _take(self, name: str, req: dict[str, Any], handler: Handler,
                    parts: list[list[int]], want: int, wait: float,
                    ) -> tuple[list[dict[str, Any]], list[float]]:
        """A receive's deliveries, and when each reached this node: what is there now,
        here first, then the others in turn; else the first to come anywhere."""
        clock = self.s.broker.clock
        got: list[dict[str, Any]] = []
        stamps: list[float] = []  # when each reached this node
        refused: list[MeshqError] = []
        for indexes in parts:  # what is there now, here first, then the others in turn
            res: dict[str, Any] | None = None
            try:
                with trio.move_on_after(QUICK_TIMEOUT):
                    res = await self._part("receive", name, {
                        **req, "wait": 0, "max": want - len(got)}, handler, indexes,
                        retry_for=QUICK_RETRY)
            except (Unavailable, Timeout, Moved) as exc:
                refused.append(exc)
                continue
            if res is None:  # its node does not answer (what it leased comes back)
                refused.append(Timeout(f"partitions {indexes} of {name!r} did not answer"))
                continue
            msgs = res.get("messages", [])
            got += msgs
            stamps += [clock.time()] * len(msgs)
            if len(got) >= want:
                break
        if not got and len(refused) == len(parts):
            raise refused[0]
        if not got and wait:
            got = await self._wait_all(name, req, handler, parts, want)
            stamps = [clock.time()] * len(got)
        return got, stamps

    def _receive_fields(self, req: dict[str, Any]) -> tuple[int, float, bool]:
        """A receive's fields, checked before any partition is asked."""
        most = self.s.broker.limits.max_batch
        want, wait = req.get("max", 1), req.get("wait", 0.0)
        vt, auto_ack = req.get("visibility_timeout"), req.get("auto_ack", False)
        if isinstance(want, bool) or not isinstance(want, int) or not 1 <= want <= most:
            raise BadRequest(f"'max' must be an integer from 1 to {most}")
        if isinstance(wait, bool) or not isinstance(wait, int | float) or not wait >= 0:
            raise BadRequest("'wait' must be a number >= 0")
        if vt is not None and (isinstance(vt, bool) or not isinstance(vt, int | float)
                               or not vt > 0):
            raise BadRequest("'visibility_timeout' must be a number > 0")
        if not isinstance(auto_ack, bool):
            raise BadRequest("field 'auto_ack' has the wrong type")
        return want, float(wait), auto_ack

    async def _wait_all(self, name: str, req: dict[str, Any], handler: Handler,
                        parts: list[list[int]], want: int) -> list[dict[str, Any]]:
        """Wait on every partition at once, each part on its own node; the first to
        answer with messages wins, and the others are told to stop waiting (the parts
        here by an event, the relayed ones by ``_unwait``). What another part took before
        it heard goes back (rare: two partitions got messages at the same moment), before
        the receive answers (unless that takes LOSERS_WAIT s: a node stopped answering),
        so that no part of a receive holds anything once the client has its answer."""
        s = self.s
        stop = trio.Event()
        wait_id = f"{s.new_tag()}w"
        won: list[dict[str, Any]] = []
        done, ended = trio.Event(), trio.Event()
        left = [len(parts)]

        async def poll(indexes: list[int]) -> None:
            sub = {**req, "max": want, "_stop": stop, "wait_id": wait_id}
            try:
                try:
                    res = await self._part("receive", name, sub, handler, indexes)
                    msgs = res.get("messages", [])
                except (Unavailable, Timeout, NotFound) as exc:
                    log.debug("a part of a receive on %r failed: %s", name, exc)
                    msgs = []
                if msgs and not done.is_set():
                    won.extend(msgs)
                    done.set()
                elif msgs:
                    await self._put_back(name, msgs)
            finally:
                left[0] -= 1
                if left[0] == 0:
                    done.set()
                    ended.set()

        for indexes in parts:
            self._spawn(poll, indexes)
        await done.wait()
        if left[0]:  # the others wait no more
            stop.set()
            for up in list(s.upstreams.values()):
                if not up.closed:
                    up.request({"op": "_unwait", "wait_id": wait_id},
                               lambda answer, sent: None)
            with trio.move_on_after(LOSERS_WAIT):
                await ended.wait()
        return won

    async def _put_back(self, name: str, msgs: list[dict[str, Any]]) -> None:
        """Messages a receive took after another part of it answered: requeued."""
        from meshq.server.ops import OPS  # (ops imports the session module)
        receipts = [m.get("receipt") for m in msgs if isinstance(m.get("receipt"), str)]
        qs = self.s.broker.queues.get(name)
        if not receipts or qs is None:
            return
        await self._try(self._settle("nack", name, {"op": "nack", "queue": name,
                                                    "ids": receipts, "requeue": True},
                                     OPS["nack"], qs))

    # -- consume ---------------------------------------------------------------------------
    async def _consume(self, name: str, req: dict[str, Any], qs: tuple[Queue, ...],
                       ) -> dict[str, Any]:
        from meshq.server.session import _Sub
        prefetch = req.get("prefetch", 100)
        if (isinstance(prefetch, bool) or not isinstance(prefetch, int)
                or not 1 <= prefetch <= 65535):
            raise BadRequest("'prefetch' must be an integer from 1 to 65535")
        s = self.s
        tag = s.new_tag()
        sub = _Sub(tag, name, prefetch, None, homes={})
        s.subs[tag] = sub
        if s.fifo.ordered(name):
            s.fifo.follow(tag, name)
        elif prefetch >= len(qs):  # local first (meshq.server.steal)
            sub.steal = Steal(prefetch, len(qs),
                              busy=frozenset(q.index for q in qs if q.active and q.ready))
        outcomes = await _gather([self._place(sub, q.index) for q in qs])
        if s.subs.get(tag) is not sub:  # cancelled meanwhile (connection closed)
            raise Unavailable("the subscription ended while it was being made")
        missing = [e for e in outcomes if isinstance(e, MeshqError)]
        gone = [e for e in missing if isinstance(e, NotFound)]
        if gone or len(missing) == len(qs):
            self.cancel(sub)
            del s.subs[tag]
            raise (gone or missing)[0]
        for q, outcome in zip(qs, outcomes, strict=True):
            if isinstance(outcome, MeshqError):  # placed again, in the background
                self._again(sub, q.index)
        self.local.refresh(sub)
        return {"consumer": tag}

    async def _place(self, sub: _Sub, index: int) -> None:
        """Subscribe ``sub``'s part on partition ``index`` where it is dispatched now;
        Unavailable when nobody may dispatch it."""
        s = self.s
        cluster = s.cluster
        assert cluster is not None and sub.homes is not None
        req: dict[str, Any] = {"op": "consume", "queue": sub.queue, "prefetch": sub.prefetch,
                               "tag": sub.tag, "partitions": [index]}
        while True:
            r = s._route("consume", sub.queue, req)
            if isinstance(r, AwaitTakeover):
                for q in named(s.broker.queues.get(sub.queue, ()), req):
                    await cluster.until_active(q)
                if s.subs.get(sub.tag) is not sub or s.closed:
                    return  # cancelled meanwhile: nothing to place
                r = s._route("consume", sub.queue, req)
                if isinstance(r, AwaitTakeover):
                    raise Unavailable(f"partition {index} of queue {sub.queue!r} is still "
                                      "being taken over")
            if isinstance(r, Local):
                steal = sub.steal
                if steal is not None:
                    steal.gone(index)
                s.broker.consume(s.session, sub.queue, sub.prefetch, tag=sub.tag,
                                 indexes=[index], capacity=self.local.capacity(sub, index),
                                 watch=None if steal is None else self.local.watcher(sub))
                sub.homes[index] = None
                return
            if isinstance(r, Relay):
                self._late.discard((sub.tag, index, r.node))
                capacity = self.local.capacity(sub, index)
                if capacity is not None:
                    req["capacity"] = capacity
                answer = await s._call_remote(r.node, "consume", req, register=False)
                if s.subs.get(sub.tag) is not sub:  # cancelled meanwhile: undo
                    s._request_quietly(r.node, {"op": "cancel", "consumer": sub.tag})
                    return
                if (sub.tag, index, r.node) in self._late:  # it ended there already
                    self._late.discard((sub.tag, index, r.node))
                    continue
                sub.homes[index] = r.node
                if sub.steal is not None and capacity is not None:  # (an older node
                    # answers without it: it gave the part its share)
                    sub.steal.placed(index, answer.get("capacity"))
                return
            raise Unavailable(r.reason)

    def _again(self, sub: _Sub, index: int) -> None:
        assert sub.homes is not None
        sub.homes[index] = ""
        if sub.steal is not None:
            sub.steal.gone(index)
        self._spawn(self._replace, sub, index)

    async def _replace(self, sub: _Sub, index: int) -> None:
        """Place a part again until it is placed, or the subscription ends."""
        s = self.s
        cluster = s.cluster
        assert cluster is not None
        backoff = 0.02
        while s.subs.get(sub.tag) is sub and not s.closed:
            try:
                await self._place(sub, index)
                self.local.refresh(sub)  # (the partitions here may be others now)
                return
            except NotFound as exc:
                self.ended(sub, index, "", exc.message, True)
                return
            except MeshqError:
                with trio.move_on_after(backoff):
                    await cluster.changed.wait()
                backoff = min(1.0, backoff * 2)

    def ended(self, sub: _Sub, index: int, home: str | None, reason: str,
              final: bool) -> None:
        """A part of ``sub`` ended where it was (``home``: None here, else a node; "" a
        part being placed): for good (its queue was deleted), or to be placed again."""
        s = self.s
        homes = sub.homes
        if s.subs.get(sub.tag) is not sub or homes is None:
            return
        if homes.get(index, "") != home:
            if home and homes.get(index, "") == "":  # news from where it is being placed
                self._late.add((sub.tag, index, home))
            return  # else an old home's news
        if final:
            del s.subs[sub.tag]
            homes[index] = ""
            self.cancel(sub)
            s.out.push({"push": "cancel", "consumer": sub.tag, "reason": reason,
                        "final": True})
            return
        if not s.closed:
            self._again(sub, index)

    def lost_home(self, sub: _Sub, node: str) -> None:
        """The relay to ``node`` broke: the parts there are placed again."""
        for index, home in list((sub.homes or {}).items()):
            if home == node:
                self._again(sub, index)

    def cancel(self, sub: _Sub) -> None:
        """End every part of ``sub`` (the client cancelled, or its queue is gone)."""
        s = self.s
        homes = sub.homes or {}
        self._late = {late for late in self._late if late[0] != sub.tag}
        held = s.fifo.unfollow(sub.tag)  # (a fifo merge's: back to their partitions)
        if held and not s.closed:
            self._spawn(self._put_back, sub.queue, held)
        if None in homes.values():
            try:
                s.broker.cancel(s.session, sub.tag)
            except NotFound:
                pass  # its parts here ended meanwhile (moved)
        for node in sorted({h for h in homes.values() if h}):
            s._request_quietly(node, {"op": "cancel", "consumer": sub.tag})

    # -- acks by receipt ---------------------------------------------------------------------
    def delivered(self, frame: dict[str, Any]) -> None:
        """Remember the receipts of deliveries from partitioned queues, for bare ids."""
        msgs = frame.get("messages")
        if frame.get("push") == "deliver" and isinstance(msgs, list):
            self._learn(msgs)

    def _learn(self, msgs: list[Any]) -> None:
        queues = self.s.broker.queues
        for m in msgs:
            if not isinstance(m, dict):
                continue
            mid, receipt, queue = m.get("id"), m.get("receipt"), m.get("queue")
            if (isinstance(mid, str) and isinstance(receipt, str) and isinstance(queue, str)
                    and len(queues.get(queue, ())) > 1):
                self._receipts.pop(mid, None)
                self._receipts[mid] = receipt
                if len(self._receipts) > MAX_RECEIPTS:
                    self._receipts.popitem(last=False)

    async def _settle(self, op: str, name: str, req: dict[str, Any], handler: Handler,
                      qs: tuple[Queue, ...]) -> dict[str, Any]:
        ids = req.get("ids")
        if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
            raise BadRequest("'ids' must be a list of message ids or receipts")
        groups: dict[int, list[str]] = {}
        given: dict[str, str] = {}  # what we send -> what the client gave
        failed: dict[str, str] = {}
        for item in ids:
            mid, _, index = parse_receipt(item)
            sent = item
            if index is None:  # a bare id: the receipt of its delivery, or a copy here
                known = self._receipts.get(mid)
                if known is not None:
                    sent, index = known, parse_receipt(known)[2]
                else:
                    index = next((q.index for q in qs if mid in q.messages), None)
            if index is None or not 0 <= index < len(qs):
                failed[item] = "no such message (already acked, expired or deleted)"
                continue
            given[sent] = item
            groups.setdefault(index, []).append(sent)
        parts = list(groups.items())
        outcomes = await _gather([self._part(op, name, {**req, "ids": items}, handler,
                                             [index]) for index, items in parts])
        key = _SETTLED_KEY[op]
        done: list[str] = []
        errors = [o for o in outcomes if isinstance(o, MeshqError)]
        if errors and len(errors) == len(parts):
            raise errors[0]
        for (_, items), outcome in zip(parts, outcomes, strict=True):
            if isinstance(outcome, BaseException):
                why = getattr(outcome, "message", str(outcome))
                failed.update({given[i]: why for i in items})
                continue
            done += outcome.get(key, [])
            for i, why in (outcome.get("failed") or {}).items():
                failed[given.get(i, i)] = why
        if op != "extend":
            for mid in done:
                self._receipts.pop(mid, None)
            self.local.settled(name, parts, outcomes, key)
        return {key: done, "failed": failed}

    # -- counts ------------------------------------------------------------------------------
    async def _sum(self, op: str, name: str, req: dict[str, Any], handler: Handler,
                   qs: tuple[Queue, ...]) -> dict[str, Any]:
        if op == "stats":
            stats = await self.counts(name, qs)
            stats.pop("by_partition", None)
            return {"queues": [stats]}
        local = self._local(qs)
        parts = ([local] if local else []) + [[q.index] for q in qs if q.index not in local]
        outcomes = await _gather([self._part(op, name, req, handler, p) for p in parts])
        errors = [o for o in outcomes if isinstance(o, MeshqError)]
        if errors:
            raise errors[0]
        return {"purged": sum(o.get("purged", 0) for o in outcomes if isinstance(o, dict))}

    async def counts(self, name: str, qs: tuple[Queue, ...]) -> dict[str, Any]:
        """The queue's counts summed over its partitions, each counted by its primary
        (this node's copy, ``counted_by`` None, when that fails), and ``by_partition``."""
        s = self.s
        me = s.cluster.me if s.cluster is not None else None
        req = {"op": "stats", "queue": name}

        async def one(q: Queue) -> dict[str, Any]:
            sub = {**req, "partitions": [q.index]}
            r = s._route("stats", name, sub)
            try:
                if isinstance(r, Relay):
                    got = await s._call_remote(r.node, "stats", sub)
                    stats: dict[str, Any] = got["queues"][0]
                    stats["counted_by"] = r.node
                    return stats
            except (MeshqError, KeyError, IndexError, TypeError):
                pass
            stats = s.broker.stats_of(name, [q.index]) if name in s.broker.queues else {}
            stats["counted_by"] = me if isinstance(r, Local) else None
            return stats

        each = await _gather([one(q) for q in qs])
        rows = [e if isinstance(e, dict) else {} for e in each]
        total = dict(rows[0]) if rows[0] else s.broker.stats_of(name)
        for key in ("ready", "leased", "delayed", "dead_lettered", "expired", "dropped"):
            total[key] = sum(int(r.get(key) or 0) for r in rows)
        total["consumers"] = max(int(r.get("consumers") or 0) for r in rows)
        counters = {r.get("counted_by") for r in rows}
        total["counted_by"] = counters.pop() if len(counters) == 1 else None
        total["by_partition"] = [{**r, "index": i} for i, r in enumerate(rows)]
        return total

    def _spawn(self, fn: Callable[..., Awaitable[None]], *args: Any) -> None:
        """A task of the connection's that never takes it (or the daemon) down."""
        self.s.out.spawn(self._guarded, fn, *args)

    async def _guarded(self, fn: Callable[..., Awaitable[None]], *args: Any) -> None:
        try:
            await fn(*args)
        except Exception:
            log.exception("a part of an op on a partitioned queue failed")

    async def _try(self, work: Awaitable[dict[str, Any]]) -> dict[str, Any] | None:
        try:
            return await work
        except MeshqError as exc:
            log.debug("a part of an op on a partitioned queue failed: %s", exc)
            return None


def _held(msgs: list[dict[str, Any]], stamps: list[float], now: float,
          ) -> list[dict[str, Any]]:
    """Deliveries that waited here since ``stamps`` (while a receive asked its other
    partitions), their ``lease_left`` less that wait, without those whose lease ran out:
    those are another consumer's by now."""
    out = []
    for m, at in zip(msgs, stamps, strict=True):
        left = m.get("lease_left")
        if isinstance(left, int | float):
            if left - (now - at) <= 0:
                continue
            m["lease_left"] = round(left - (now - at), 3)
        out.append(m)
    return out


async def _gather(works: list[Awaitable[Any]]) -> list[Any]:
    """Run ``works`` at once; each one's result, or the MeshqError it raised."""
    out: list[Any] = [None] * len(works)

    async def run(i: int, work: Awaitable[Any]) -> None:
        try:
            out[i] = await work
        except MeshqError as exc:
            out[i] = exc

    if len(works) == 1:
        await run(0, works[0])
        return out
    async with trio.open_nursery() as nursery:
        for i, work in enumerate(works):
            nursery.start_soon(run, i, work)
    return out
