"""Where a queue partition lives: its replicas on the ring, its dispatching node, its quorum.

The unit is the queue partition ``(queue, index)``: its key on the ring is
``ring_key(queue, index)``, its replicas the first N distinct nodes clockwise from it. A
queue of several partitions spreads their first replicas evenly over the ring's nodes:
partition i takes ``ring_key(queue, i)``, or, when that key's first node already has more
of the queue's earlier partitions than another node, the first of ``<queue>#<i>~1``,
``~2``, ... whose first node has the fewest (``partition_keys``: the same on every node
with the same ring; six partitions on three nodes are 2/2/2, where plain hashing gives
that one time in eight and a node with half the queue more often than not).
The ring is built from every member that has not left (alive, suspect and dead), so a
crash does not reshuffle placement; the *holders* are the first N *live* (alive or
suspect) nodes of the same walk, a holder outside the preferred N standing in for a down
one (sloppy quorum), and the *spares* the live nodes after them (stand-ins for a holder
that fails a write). The *primary*, the one node that dispatches, is the first holder
that is alive (not suspect: a suspected primary hands over at once) and whose clock is
accepted (its gossiped meta does not say ``w: 0``).

State here: the ring and the live and dispatch-eligible sets of the current membership
view, rebuilt when that view changes. Never: two nodes with the same view computing
different placements.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

from meshq.mesh.ring import DEFAULT_VNODES, Ring
from meshq.mesh.swim import Member, MemberState

__all__ = ["Placement", "Replicas", "majority", "partition_keys", "ring_key"]

MAX_SPARES = 2


def majority(n: int) -> int:
    return n // 2 + 1


def ring_key(queue: str, index: int) -> str:
    """A partition's key on the ring (of a queue of one partition; see partition_keys)."""
    return f"{queue}#{index}"


KEY_TRIES = 64  # keys tried per partition for an evenly spread first replica


def partition_keys(ring: Ring, queue: str, partitions: int) -> list[str]:
    """The ring keys of a queue's partitions, their first nodes spread evenly (see the
    module's docstring). Partition 0's is always ``ring_key(queue, 0)``."""
    counts = dict.fromkeys(ring.nodes, 0)
    keys = []
    for i in range(partitions):
        fewest = min(counts.values()) if counts else 0
        chosen, first = ring_key(queue, i), None
        for k in range(KEY_TRIES):
            key = ring_key(queue, i) if k == 0 else f"{ring_key(queue, i)}~{k}"
            node = ring.preference_list(key, 1)[0]
            if counts.get(node, 0) == fewest:
                chosen, first = key, node
                break
        if first is None:
            first = ring.preference_list(chosen, 1)[0]
        counts[first] = counts.get(first, 0) + 1
        keys.append(chosen)
    return keys


@dataclass(frozen=True)
class Replicas:
    """One partition's placement in one membership view.

    ``preferred``: the first N distinct ring nodes from its key (N = replicas, capped by
    the ring's size). ``holders``: the first N live nodes of the same walk. ``spares``:
    the next live nodes. ``primary``: the first holder eligible to dispatch, or None.
    ``write_quorum``: durable copies that confirm a write, capped by N.
    """

    preferred: tuple[str, ...]
    holders: tuple[str, ...]
    write_quorum: int
    primary: str | None
    spares: tuple[str, ...] = ()

    @property
    def followers(self) -> tuple[str, ...]:
        return tuple(h for h in self.holders if h != self.primary)

    @property
    def writable(self) -> bool:
        return len(self.holders) >= self.write_quorum


class Placement:
    """Placements in the current membership view. ``members`` returns the view."""

    def __init__(self, me: str, members: Callable[[], Iterable[Member]] | None = None,
                 vnodes: int = DEFAULT_VNODES) -> None:
        self.me = me
        self._members = members
        self.vnodes = vnodes
        self.epoch = 0  # bumped whenever the ring, the live or the eligible set changes
        self._key: tuple[tuple[str, int], ...] = ()
        self.ring = Ring.build([me], vnodes)
        self.live: frozenset[str] = frozenset([me])
        self.eligible: frozenset[str] = frozenset([me])
        self._cache: dict[tuple[str, int, int, int | None, int], Replicas] = {}
        self._keys: dict[tuple[str, int], list[str]] = {}
        self.refresh()

    def refresh(self) -> bool:
        """Re-read the membership view; True when the placement changed."""
        if self._members is None:
            return False
        view = []
        for m in self._members():
            if m.state is MemberState.LEFT:
                continue
            rank = 0  # dead
            if m.state is MemberState.SUSPECT:
                rank = 1
            elif m.state is MemberState.ALIVE:
                rank = 2 if m.meta.get("w", 1) != 0 else 1
            view.append((m.name, rank))
        key = tuple(sorted(view))
        if key == self._key:
            return False
        self._key = key
        names = [name for name, _ in key] or [self.me]
        self.ring = Ring.build(names, self.vnodes)
        self.live = frozenset(name for name, rank in key if rank >= 1)
        self.eligible = frozenset(name for name, rank in key if rank == 2)
        if self.me not in {name for name, _ in key}:
            self.live |= {self.me}
            self.eligible |= {self.me}
        self._cache.clear()
        self._keys.clear()
        self.epoch += 1
        return True

    def key(self, queue: str, index: int, partitions: int = 1) -> str:
        """Partition ``index``'s key on the ring, of a queue of ``partitions``."""
        if partitions <= 1 or index == 0 or index >= partitions:
            return ring_key(queue, index)
        keys = self._keys.get((queue, partitions))
        if keys is None:
            if len(self._keys) > 10_000:
                self._keys.clear()
            keys = self._keys[queue, partitions] = partition_keys(self.ring, queue,
                                                                  partitions)
        return keys[index]

    def replicas(self, queue: str, index: int, n: int,
                 write_quorum: int | None = None, partitions: int = 1) -> Replicas:
        cache_key = (queue, index, n, write_quorum, partitions)
        hit = self._cache.get(cache_key)
        if hit is not None:
            return hit
        key = self.key(queue, index, partitions)
        n = max(1, min(n, len(self.ring)))
        preferred = tuple(self.ring.preference_list(key, n))
        holders: list[str] = []
        spares: list[str] = []
        for node in self.ring.successors(key):
            if node in self.live:
                if len(holders) < n:
                    holders.append(node)
                elif len(spares) < MAX_SPARES:
                    spares.append(node)
                else:
                    break
        primary = next((h for h in holders if h in self.eligible), None)
        w = majority(n) if write_quorum is None else min(write_quorum, n)
        result = Replicas(preferred, tuple(holders), w, primary, tuple(spares))
        if len(self._cache) > 100_000:
            self._cache.clear()
        self._cache[cache_key] = result
        return result

    def nodes(self) -> tuple[str, ...]:
        return self.ring.nodes
