"""The quorum gate, sans-IO: a store batch is confirmed once durable here and on W replicas
of every partition it touches.

State here: the batches shipped and not yet completed, oldest first, and per batch and
partition the copies still wanted, the replicas asked and not yet answered, and the
stand-ins not yet tried. Never: a batch completed before its local commit and its
quorums (or before an older batch), a batch left waiting forever (``tick`` ends it after
DEADLINE), a replica counted twice.

Driving it (h11 style: inputs in, effects out; the driver does the I/O):

- ``shipped(batch, needs, now)`` as a batch goes to be committed here and its changes go
  to ``needs[part].targets``. A partition that needs more copies than there are replicas
  to ask fails at once (its batch still completes in order).
- ``answered(batch, node, ok, fenced)`` for a replica's answer: ``ok`` the partitions it
  made durable, ``fenced`` those it refused because it promised a later epoch.
- ``failed(batch, node)`` when the link to ``node`` broke or it gave no usable answer.
- ``local_done(batch, error)`` once the local commit finished (``error``: it failed).
- ``tick(now)`` at ``next_deadline()``: a partition still short of copies
  ``SPARE_AFTER`` seconds after shipping is also sent to a stand-in (a paused replica
  costs latency, not the write); at ``DEADLINE`` what is still missing fails.

Effects: ``Ship(batch, node, parts)`` (send those partitions' changes of the batch to a
stand-in), ``Fenced(part, epoch)`` (stop dispatching ``part``: someone took over at
``epoch``), ``Complete(batch, failure)`` with ``failure`` None (confirmed), ``"local"``
(the local commit failed), ``"quorum"`` (too few copies) or ``"fenced"``.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

from meshq.cluster.changes import PartKey

__all__ = ["DEADLINE", "SPARE_AFTER", "Complete", "Fenced", "Gate", "Need", "Ship"]

SPARE_AFTER = 2.0
DEADLINE = 10.0


@dataclass(frozen=True)
class Need:
    """One partition of a batch: ``acks`` durable copies wanted besides this node's, from
    ``targets`` (the changes went there) or, when they fail, from ``spares`` in order."""

    acks: int
    targets: tuple[str, ...]
    spares: tuple[str, ...] = ()


@dataclass(frozen=True)
class Ship:
    batch: int
    node: str
    parts: tuple[PartKey, ...]


@dataclass(frozen=True)
class Fenced:
    part: PartKey
    epoch: int


@dataclass(frozen=True)
class Complete:
    batch: int
    failure: str | None


Effect = Ship | Fenced | Complete


@dataclass
class _Part:
    acks: int
    waiting: set[str]
    tried: set[str]
    spares: list[str]
    hedged: bool = False
    failure: str | None = None


@dataclass
class _Held:
    batch: int
    shipped_at: float
    parts: dict[PartKey, _Part] = field(default_factory=dict)
    local: bool = False
    failure: str | None = None

    def ready(self) -> bool:
        if not self.local:
            return False
        if self.failure is not None:
            return True
        return all(p.acks <= 0 or p.failure is not None for p in self.parts.values())


class Gate:
    def __init__(self) -> None:
        self._held: deque[_Held] = deque()
        self._by_id: dict[int, _Held] = {}
        self.failed_quorums = 0
        self.fenced = 0

    def __len__(self) -> int:
        return len(self._held)

    def shipped(self, batch: int, needs: dict[PartKey, Need], now: float) -> list[Effect]:
        held = _Held(batch, now)
        for part, need in needs.items():
            p = _Part(need.acks, set(need.targets), set(need.targets), list(need.spares))
            if p.acks > len(p.waiting) + len(p.spares):
                p.failure = "quorum"
            held.parts[part] = p
        self._held.append(held)
        self._by_id[batch] = held
        return []

    def answered(self, batch: int, node: str, ok: set[PartKey] | frozenset[PartKey],
                 fenced: dict[PartKey, int]) -> list[Effect]:
        held = self._by_id.get(batch)
        if held is None:
            return []
        fx: list[Effect] = []
        for part, p in held.parts.items():
            if node not in p.waiting:
                continue
            p.waiting.discard(node)
            if part in fenced:
                if p.failure is None:
                    p.failure = "fenced"
                    self.fenced += 1
                fx.append(Fenced(part, fenced[part]))
            elif part in ok:
                p.acks -= 1
            else:
                self._replace(held, part, p, fx)
        return fx + self._release()

    def failed(self, batch: int, node: str) -> list[Effect]:
        held = self._by_id.get(batch)
        if held is None:
            return []
        fx: list[Effect] = []
        for part, p in held.parts.items():
            if node in p.waiting:
                p.waiting.discard(node)
                self._replace(held, part, p, fx)
        return fx + self._release()

    def _replace(self, held: _Held, part: PartKey, p: _Part, fx: list[Effect]) -> None:
        """A replica failed this partition: ask a stand-in if one is left."""
        if p.acks <= 0 or p.failure is not None:
            return
        while p.acks > len(p.waiting) and p.spares:
            node = p.spares.pop(0)
            if node in p.tried:
                continue
            p.tried.add(node)
            p.waiting.add(node)
            fx.append(Ship(held.batch, node, (part,)))
        if p.acks > len(p.waiting):
            p.failure = "quorum"

    def local_done(self, batch: int, error: BaseException | None) -> list[Effect]:
        held = self._by_id.get(batch)
        if held is None:
            return []
        held.local = True
        if error is not None:
            held.failure = "local"
        return self._release()

    def next_deadline(self) -> float:
        """When ``tick`` has something to do: the earliest pending stand-in or deadline of
        a partition still short of copies (never a time that has nothing left to do:
        a batch waiting only for its local commit has no timer)."""
        at = math.inf
        for held in self._held:
            for p in held.parts.values():
                if p.acks <= 0 or p.failure is not None:
                    continue
                if not p.hedged and p.spares:
                    at = min(at, held.shipped_at + SPARE_AFTER)
                else:
                    at = min(at, held.shipped_at + DEADLINE)
        return at

    def tick(self, now: float) -> list[Effect]:
        fx: list[Effect] = []
        for held in self._held:
            # (times compared as next_deadline computes them: shipped_at + x, never
            # now - shipped_at, which rounds differently and would leave a timer due)
            if now < held.shipped_at + SPARE_AFTER:
                break
            for part, p in held.parts.items():
                if p.acks <= 0 or p.failure is not None:
                    continue
                if now >= held.shipped_at + DEADLINE:
                    p.failure = "quorum"
                elif not p.hedged:
                    p.hedged = True
                    while p.spares:
                        node = p.spares.pop(0)
                        if node not in p.tried:
                            p.tried.add(node)
                            p.waiting.add(node)
                            fx.append(Ship(held.batch, node, (part,)))
                            break
        return fx + self._release()

    def _release(self) -> list[Effect]:
        fx: list[Effect] = []
        while self._held and self._held[0].ready():
            held = self._held.popleft()
            del self._by_id[held.batch]
            failure = held.failure
            if failure is None:
                failure = next((p.failure for p in held.parts.values()
                                if p.failure is not None), None)
            if failure in ("quorum", "fenced"):
                self.failed_quorums += 1
            fx.append(Complete(held.batch, failure))
        return fx

    def abandon(self) -> list[Effect]:
        """The node stops: every batch held completes with an unknown outcome."""
        fx: list[Effect] = [Complete(h.batch, "stopped") for h in self._held]
        self._held.clear()
        self._by_id.clear()
        return fx
