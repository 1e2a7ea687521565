"""Local first: a subscription to a queue of several partitions takes from the partitions
its own node dispatches while they have ready messages, and from the others only when
those run dry (work stealing).

Why: a subscription has a part on every partition (meshq.server.spread), each with a
share of its prefetch. With every partition busy, each part stays saturated, so one
consumer's deliveries and acks were six ops of a sixth of its prefetch each, most of them
relayed through a second node. Local first, it holds its whole prefetch in its own
node's partitions (two ops of half of it each, none relayed) while they have messages.

How: the client's node sets each part's capacity (its most unsettled leases:
``Broker.flow`` here, the ``_flow`` op at another node). While a partition this node
dispatches for the subscription has ready messages, its parts elsewhere have capacity 0
and its parts on those partitions share the prefetch (``capacities``). When none has,
it steals: its parts here have their shares again, as without local first, and its
parts elsewhere share the rest and wait at their primaries as any part does, so waiting
costs no polling. A partition here that runs dry gives its part's
capacity to the others at once (a consumer with free credit never idles while another
partition has messages); one that has messages again takes it back DWELL after the last
change at the soonest, so that a partition that empties and refills with every message
costs no flow ops per message.

State here, per subscription (``Steal``): whether it steals, each remote part's capacity
as last asked and as possibly in force, and what each part still held when its capacity
was last changed, less what the client settled since. Never: a subscription's parts given
more capacity than its prefetch, counting what a part elsewhere may still hold (except
while a part moves between nodes, where its leases are not counted); a subscription of
prefetch below its partitions' count or to a fifo queue taking local first (the former has
no prefetch to move, the latter's merge needs every partition).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import trio

from meshq.broker.partitions import spread

if TYPE_CHECKING:
    from meshq.broker.queue import Queue
    from meshq.server.session import ClientSession, _Sub

__all__ = ["DWELL", "LocalFirst", "Steal", "capacities"]

DWELL = 0.05  # seconds between a switch and the next switch back to local first


def capacities(prefetch: int, partitions: int, local: Collection[int], busy: Collection[int],
               local_held: Mapping[int, int], holds: Mapping[int, int]) -> dict[int, int]:
    """Each part's capacity. ``local``: the partitions whose part is on the subscriber's
    node (every other is remote); ``busy``: those of them with ready messages;
    ``local_held``: what each part there holds now; ``holds``: what each remote part may
    hold whatever its new capacity (absent: 0).

    No local part: each its share of ``prefetch`` (meshq.broker.partitions.spread), as
    without local first. Some local partition busy (local first): the remote parts 0; a
    local part whose partition has nothing ready, what it holds, at least one (a message
    arriving there is taken at once, and more of them make the partition busy); the busy
    ones share what is left of the prefetch once the others and what the remote parts
    may still hold are counted: evenly, except that a part holding more than its share
    keeps what it holds and takes nothing (at least one each). None busy (stealing): each
    local part its share, or what it holds if more (so that messages arriving at a
    steady rate are taken here at once, as without local first); the remote parts share
    the rest evenly, each at most what is left once the parts before it are counted with
    what they may hold."""
    shares = spread(prefetch, partitions)
    if not local:
        return dict(enumerate(shares))
    remote = [i for i in range(partitions) if i not in local]
    busy = [i for i in sorted(busy) if i in local]
    if busy:
        caps = {i: max(1, local_held.get(i, 0)) for i in sorted(local) if i not in busy}
        caps.update((i, 0) for i in remote)
        pool = (prefetch - sum(caps.values()) - sum(holds.get(i, 0) for i in remote))
        caps.update(_fill(pool, busy, local_held))
        return caps
    caps = {i: max(shares[i], local_held.get(i, 0)) for i in sorted(local)}
    budget = prefetch - sum(caps.values())
    for i, share in zip(remote, spread(max(budget, 0), len(remote)), strict=True):
        caps[i] = max(0, min(share, budget))
        budget -= max(caps[i], holds.get(i, 0))
    return caps


def _fill(pool: int, parts: list[int], held: Mapping[int, int]) -> dict[int, int]:
    """``pool`` shared by ``parts`` evenly (at least one each), except that a part holding
    its share or more keeps what it holds and the others share the rest."""
    caps: dict[int, int] = {}
    rest = list(parts)
    while rest:
        shares = dict(zip(rest, spread(max(pool, len(rest)), len(rest)), strict=True))
        over = [i for i in rest if held.get(i, 0) >= shares[i]]
        if not over:
            caps.update(shares)
            break
        for i in over:  # (a share is at least one, so what it holds is too)
            caps[i] = held[i]
            pool -= held[i]
            rest.remove(i)
    return caps


@dataclass
class Steal:
    """One subscription's local-first state on its client's node."""

    prefetch: int
    partitions: int
    busy: frozenset[int] = frozenset()  # partitions here with ready messages, as last seen
    asked: dict[int, int] = field(default_factory=dict)  # remote part -> capacity asked
    # remote part -> the most it may hold under its capacity (the larger of the old and
    # the new one while a change is on its way)
    ceiling: dict[int, int] = field(default_factory=dict)
    owed: dict[int, int] = field(default_factory=dict)  # held at the last change, less settled
    refused: set[int] = field(default_factory=set)  # parts whose node took no capacity
    switched: float = float("-inf")  # when it last switched
    checking: bool = False  # a check is scheduled

    def holds(self) -> dict[int, int]:
        return {i: max(self.ceiling.get(i, 0), self.owed.get(i, 0))
                for i in set(self.ceiling) | set(self.owed)}

    def placed(self, index: int, capacity: int | None) -> None:
        """A part was placed elsewhere with ``capacity`` (a fresh part: it holds nothing);
        None: its node took its share instead (an older node)."""
        self.gone(index)
        if capacity is None:
            self.refuse(index)
        else:
            self.asked[index] = self.ceiling[index] = capacity

    def refuse(self, index: int) -> None:
        """Part ``index``'s node does not take capacities (an older node): it keeps its
        share, counted, and is asked nothing more until placed again."""
        self.refused.add(index)
        share = spread(self.prefetch, self.partitions)[index]
        self.ceiling[index] = max(share, self.ceiling.get(index, 0))

    def gone(self, index: int) -> None:
        """A part is here now, or being placed again: nothing counted elsewhere."""
        for d in (self.asked, self.ceiling, self.owed):
            d.pop(index, None)
        self.refused.discard(index)

    def asking(self, index: int, capacity: int) -> None:
        self.ceiling[index] = max(capacity, self.ceiling.get(index, 0))
        self.asked[index] = capacity

    def answered(self, index: int, capacity: int, held: int) -> None:
        """Part ``index`` took ``capacity`` when it held ``held``."""
        if self.asked.get(index) == capacity:
            self.ceiling[index] = capacity
        self.owed[index] = held

    def settled(self, index: int, n: int) -> None:
        """The client settled ``n`` of part ``index``'s deliveries."""
        if self.owed.get(index):
            self.owed[index] = max(0, self.owed[index] - n)


class LocalFirst:
    """Local first for one client connection's subscriptions (``_Sub.steal``): their parts'
    capacities, here and (by ``_flow``) elsewhere, kept as ``capacities`` says."""

    def __init__(self, session: ClientSession,
                 spawn: Callable[..., None]) -> None:
        self.s = session
        self.spawn = spawn  # a task of the connection's (meshq.server.spread.Spread._spawn)

    def capacity(self, sub: _Sub, index: int) -> int | None:
        """The capacity part ``index`` of ``sub`` is placed with (None: its share)."""
        steal = sub.steal
        if steal is None:
            return None
        return self._caps(sub, steal, self.s.broker.queues.get(sub.queue, ())).get(index)

    def _caps(self, sub: _Sub, steal: Steal, qs: tuple[Queue, ...]) -> dict[int, int]:
        """Each part's capacity now (``capacities``, from what ``sub`` holds here and
        may hold elsewhere)."""
        return capacities(steal.prefetch, steal.partitions, _here(sub, qs), steal.busy,
                          self._held_here(sub), steal.holds())

    def _held_here(self, sub: _Sub) -> dict[int, int]:
        """What each part of ``sub`` here holds."""
        return {c.queue.index: c.capacity - c.credit
                for c in self.s.session.consumers.get(sub.tag, ()) if c.replenish}

    def flow(self, sub: _Sub) -> None:
        """Give each part of ``sub`` the capacity it should have now: the parts here at
        once, those elsewhere by a ``_flow`` op (answered with what they held)."""
        s = self.s
        steal, homes = sub.steal, sub.homes
        qs = s.broker.queues.get(sub.queue, ())
        if steal is None or homes is None or s.closed or len(qs) != steal.partitions:
            return
        caps = self._caps(sub, steal, qs)
        for c in list(s.session.consumers.get(sub.tag, ())):
            cap = caps.get(c.queue.index)
            if c.replenish and cap is not None and c.capacity != cap:
                s.broker.flow(s.session, sub.tag, [c.queue.index], cap)
        asks: dict[tuple[str, int], list[int]] = {}
        for index, home in homes.items():
            if home and steal.asked.get(index) != caps[index] and index not in steal.refused:
                steal.asking(index, caps[index])
                asks.setdefault((home, caps[index]), []).append(index)
        for (node, cap), indexes in asks.items():
            s._upstream(node).request(
                {"op": "_flow", "consumer": sub.tag, "partitions": indexes, "capacity": cap},
                functools.partial(self._flowed, sub, node, indexes, cap))

    def _flowed(self, sub: _Sub, node: str, indexes: list[int], cap: int,
                answer: dict[str, Any] | None, sent: bool) -> None:
        steal, homes = sub.steal, sub.homes or {}
        if steal is None or self.s.subs.get(sub.tag) is not sub or answer is None:
            return  # (a part whose stream ended is placed again, with its capacity then)
        result = answer.get("result")
        held = result.get("held") if isinstance(result, dict) else None
        if not isinstance(held, list) or len(held) != len(indexes):
            # Refused (an older node; or the part ended there, and is placed again): it
            # may hold its share, and is asked no more.
            for index in indexes:
                if homes.get(index) == node:
                    steal.refuse(index)
            self.flow(sub)
            return
        for index, n in zip(indexes, held, strict=True):
            if homes.get(index) == node and type(n) is int:
                steal.answered(index, cap, n)
        self.flow(sub)  # what they held may leave more to the parts here

    def settled(self, name: str, parts: list[tuple[int, list[str]]], outcomes: list[Any],
                 key: str) -> None:
        """Acks or nacks came back: what a paused part elsewhere held, or a part here on a
        partition with nothing ready, may be free for the others."""
        for sub in list(self.s.subs.values()):
            steal, homes = sub.steal, sub.homes
            if steal is None or homes is None or sub.queue != name:
                continue
            for (index, _), outcome in zip(parts, outcomes, strict=True):
                if isinstance(outcome, dict) and homes.get(index):
                    steal.settled(index, len(outcome.get(key, ()))
                                  + len(outcome.get("failed") or ()))
            self.flow(sub)  # (sends nothing where nothing changed)

    def watcher(self, sub: _Sub) -> Callable[[Queue], None]:
        """A part here's ``Consumer.watch``: a look soon when its partition's ready count
        says the subscription may have to switch (not now: the broker is mid-dispatch)."""
        def watch(q: Queue) -> None:
            steal = sub.steal
            if (steal is not None and not steal.checking
                    and (q.ready > 0) != (q.index in steal.busy)):
                self.check_soon(sub)
        return watch

    def refresh(self, sub: _Sub) -> None:
        """``sub``'s parts were placed (again): their capacities now, and which local
        partitions are busy, soon."""
        self.flow(sub)
        self.check_soon(sub)

    def check_soon(self, sub: _Sub) -> None:
        steal = sub.steal
        if steal is not None and not steal.checking and not self.s.closed:
            steal.checking = True
            self.spawn(self._check, sub)

    async def _check(self, sub: _Sub) -> None:
        """Follow which partitions dispatched here have ready messages: at once when one
        runs dry, DWELL after the last change at the soonest when one has some again."""
        s = self.s
        steal = sub.steal
        assert steal is not None
        try:
            while s.subs.get(sub.tag) is sub and not s.closed:
                qs = s.broker.queues.get(sub.queue, ())
                here = _here(sub, qs)
                busy = frozenset(q.index for q in qs if q.ready and q.index in here)
                if busy == steal.busy:
                    return
                now = trio.current_time()
                if busy - steal.busy and now < steal.switched + DWELL:
                    await trio.sleep_until(steal.switched + DWELL)
                    continue
                steal.busy, steal.switched = busy, now
                self.flow(sub)
                return
        finally:
            steal.checking = False



def _here(sub: _Sub, qs: tuple[Queue, ...]) -> list[int]:
    """The partitions whose part of ``sub`` is on this node, or will be: dispatched here
    (what ``Spread._local`` lists), and not (still) placed elsewhere."""
    homes = sub.homes or {}
    return [q.index for q in qs if q.active and not homes.get(q.index)]
