"""Where a queue lives: its replicas on the ring, its dispatching node, its write quorum.

The placement unit is the queue: a queue's key on the ring is its name, so every message
of a queue has the same preference list and one dispatching node at a time (the first
live replica). See docs/architecture.md ("Replication") for why.

State here: the ring built from the members that have not left (alive, suspect, dead),
rebuilt when that set changes, and which of them are live (alive or suspect).
Never: two nodes with the same membership view computing different placements.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

from meshq.mesh.ring import DEFAULT_VNODES, Ring
from meshq.mesh.swim import Member, MemberState

__all__ = ["Placement", "Replicas", "majority"]


def majority(n: int) -> int:
    return n // 2 + 1


@dataclass(frozen=True)
class Replicas:
    """One queue's placement in one membership view.

    ``preferred``: the first N distinct ring nodes from the queue's key (N = replicas,
    capped by the ring's size). ``holders``: the first N *live* nodes in the same walk;
    a holder outside ``preferred`` stands in for a preferred node that is down (sloppy
    quorum) and keeps what it gets as a hint. ``primary`` is holders[0]: it dispatches.
    ``write_quorum``: commits needed to confirm a write, capped by N.
    """

    preferred: tuple[str, ...]
    holders: tuple[str, ...]
    write_quorum: int

    @property
    def primary(self) -> str | None:
        return self.holders[0] if self.holders else None

    @property
    def followers(self) -> tuple[str, ...]:
        return self.holders[1:]

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
        self.epoch = 0  # bumped whenever the ring or the live set changes
        self._key: tuple[tuple[str, bool], ...] = ()
        self.ring = Ring.build([me], vnodes)
        self.live: frozenset[str] = frozenset([me])
        self._cache: dict[tuple[str, int, int | None], Replicas] = {}
        self.refresh()

    def refresh(self) -> bool:
        """Re-read the membership view; True when the placement changed."""
        if self._members is None:
            return False
        view = sorted((m.name, m.state in (MemberState.ALIVE, MemberState.SUSPECT))
                      for m in self._members() if m.state is not MemberState.LEFT)
        key = tuple(view)
        if key == self._key:
            return False
        self._key = key
        names = [name for name, _ in view] or [self.me]
        self.ring = Ring.build(names, self.vnodes)
        self.live = frozenset(name for name, live in view if live) | {self.me}
        self._cache.clear()
        self.epoch += 1
        return True

    def replicas(self, queue: str, n: int, write_quorum: int | None = None) -> Replicas:
        key = (queue, n, write_quorum)
        hit = self._cache.get(key)
        if hit is not None:
            return hit
        n = max(1, min(n, len(self.ring)))
        preferred = tuple(self.ring.preference_list(queue, n))
        holders = []
        for node in self.ring.successors(queue):
            if node in self.live:
                holders.append(node)
                if len(holders) == n:
                    break
        w = majority(n) if write_quorum is None else min(write_quorum, n)
        result = Replicas(preferred, tuple(holders), w)
        if len(self._cache) > 100_000:
            self._cache.clear()
        self._cache[key] = result
        return result

    def nodes(self) -> tuple[str, ...]:
        return self.ring.nodes
