"""The arithmetic of SWIM and Lifeguard, and two small pure structures built on it.

Nothing here holds membership: the functions map numbers to numbers, ``Suspicion`` is one
suspect's timer (its start and its set of distinct confirmers) and ``TransmitQueue`` the
broadcasts waiting to be piggy-backed. No I/O and no clock: every time is an argument.
Times and intervals are float seconds. Formulas follow hashicorp/memberlist (util.go,
suspicion.go, awareness.go, queue.go), and the table tests check memberlist's own values.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from meshq.mesh.clocks import ntp_offset as clock_offset  # (offset, rtt), the NTP way

__all__ = [
    "PUSH_PULL_SCALE_THRESHOLD",
    "Suspicion",
    "TransmitQueue",
    "apply_awareness_delta",
    "clock_offset",
    "ewma",
    "expected_confirmations",
    "median_offset",
    "push_pull_scale",
    "remaining_suspicion_time",
    "retransmit_limit",
    "scaled_interval",
    "suspicion_timeout",
]

#: Up to this many members the push-pull interval is not stretched (memberlist's value).
PUSH_PULL_SCALE_THRESHOLD = 32


def _floor_ms(seconds: float) -> float:
    """Round down to whole milliseconds, as memberlist's Duration arithmetic does."""
    return math.floor(round(seconds * 1000.0, 6)) / 1000.0


def retransmit_limit(retransmit_mult: int, n: int) -> int:
    """How many times one broadcast is sent in a cluster of ``n`` members:
    ``retransmit_mult * ceil(log10(n + 1))`` (0 for an empty cluster)."""
    if n < 0:
        raise ValueError(f"member count must be >= 0, not {n}")
    return retransmit_mult * math.ceil(math.log10(n + 1))


def suspicion_timeout(suspicion_mult: int, n: int, probe_interval: float) -> float:
    """The minimum suspicion timeout for ``n`` members:
    ``suspicion_mult * max(1, log10(max(1, n))) * probe_interval``.

    The scale never drops below 1, so small clusters wait ``suspicion_mult`` probe
    intervals; it is cut to whole milliseconds before multiplying, like memberlist.
    """
    scale = max(1.0, math.log10(max(1, n)))
    return suspicion_mult * (math.floor(round(scale * 1000.0, 6)) / 1000.0) * probe_interval


def expected_confirmations(suspicion_mult: int, n: int) -> int:
    """Lifeguard's k: independent suspicions wanted to bring the timeout to its minimum.

    ``suspicion_mult - 2`` (the nominal timeout is then reached two probe intervals early),
    or 0 when the other ``n - 2`` members (not us, not the suspect) are too few to give k.
    """
    k = suspicion_mult - 2
    return 0 if n - 2 < k else max(0, k)


def remaining_suspicion_time(
    n: int, k: int, elapsed: float, min_timeout: float, max_timeout: float
) -> float:
    """Time left before a suspect is declared dead, after ``n`` of ``k`` confirmations.

    ``timeout = max(min, max - (max - min) * log(n + 1) / log(k + 1))`` (cut to whole
    milliseconds), minus ``elapsed``; the result is negative once it is overdue. With
    ``k < 1`` no confirmations are expected and the timeout is ``min`` from the start.
    """
    if k < 1:
        return min_timeout - elapsed
    frac = math.log(n + 1.0) / math.log(k + 1.0)
    timeout = max(min_timeout, _floor_ms(max_timeout - frac * (max_timeout - min_timeout)))
    return timeout - elapsed


def scaled_interval(base: float, awareness: int) -> float:
    """Lifeguard's local health multiplier: ``base * (awareness + 1)``."""
    if awareness < 0:
        raise ValueError(f"awareness must be >= 0, not {awareness}")
    return base * (awareness + 1)


def apply_awareness_delta(score: int, delta: int, max_multiplier: int) -> int:
    """The health score after ``delta``, held within ``0 .. max_multiplier - 1``."""
    return min(max(score + delta, 0), max(max_multiplier - 1, 0))


def push_pull_scale(interval: float, n: int) -> float:
    """The push-pull interval for ``n`` members: unchanged up to 32, then one more
    ``interval`` each time the cluster doubles (33..64: 2x, 65..128: 3x)."""
    if n <= PUSH_PULL_SCALE_THRESHOLD:
        return interval
    mult = math.ceil(math.log2(n) - math.log2(PUSH_PULL_SCALE_THRESHOLD)) + 1
    return mult * interval


def median_offset(offsets: Iterable[float]) -> float | None:
    """The median of some clock offsets, or None when there are none."""
    values = list(offsets)
    return statistics.median(values) if values else None


def ewma(previous: float | None, sample: float, alpha: float) -> float:
    """Exponentially weighted moving average; the first sample is taken as it is."""
    if previous is None:
        return sample
    return previous + alpha * (sample - previous)


@dataclass
class Suspicion:
    """One suspect's timer: Lifeguard's suspicion that shrinks with confirmations.

    ``starter`` (who raised the suspicion) is never counted as a confirmation, since our
    own suspicion can be gossiped back to us. Confirmations stop counting at ``k``.
    """

    starter: str
    k: int
    min_timeout: float
    max_timeout: float
    started_at: float
    confirmers: set[str] = field(default_factory=set)

    @property
    def confirmations(self) -> int:
        return len(self.confirmers)

    @property
    def deadline(self) -> float:
        """When the suspect is to be declared dead, given the confirmations so far."""
        return self.started_at + remaining_suspicion_time(
            self.confirmations, self.k, 0.0, self.min_timeout, self.max_timeout
        )

    def confirm(self, confirmer: str) -> bool:
        """Count an independent confirmation; True only when it is new information."""
        if self.confirmations >= self.k or confirmer == self.starter:
            return False
        if confirmer in self.confirmers:
            return False
        self.confirmers.add(confirmer)
        return True


T = TypeVar("T")


@dataclass
class _Queued(Generic[T]):
    key: str
    item: T
    size: int
    order: int  # higher is newer
    transmits: int = 0


class TransmitQueue(Generic[T]):
    """Broadcasts waiting to be piggy-backed, at most one per key (a member's name).

    Queuing an item replaces any item with the same key (a newer update supersedes an
    older one about the same member). ``take`` hands out the least-sent items first and,
    among those, the newest; each item leaves the queue after ``limit`` transmissions.
    """

    def __init__(self) -> None:
        self._items: dict[str, _Queued[T]] = {}
        self._counter = 0

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key: object) -> bool:
        return key in self._items

    def put(self, key: str, item: T, size: int) -> None:
        """Queue ``item`` (``size`` bytes on the wire), dropping any older one for ``key``."""
        self._counter += 1
        self._items.pop(key, None)
        self._items[key] = _Queued(key, item, size, self._counter)

    def pending(self) -> list[T]:
        """The queued items, oldest first (for inspection; nothing is counted as sent)."""
        return [q.item for q in sorted(self._items.values(), key=lambda q: q.order)]

    def take(self, budget: int, limit: int) -> list[T]:
        """Items whose sizes sum to at most ``budget`` bytes, each counted as sent once.

        Items that do not fit are skipped, not waited for; an item sent ``limit`` times
        (at least once) is dropped from the queue.
        """
        chosen: list[T] = []
        used = 0
        for q in sorted(self._items.values(), key=lambda q: (q.transmits, -q.order)):
            if used + q.size > budget:
                continue
            used += q.size
            chosen.append(q.item)
            q.transmits += 1
            if q.transmits >= limit:
                del self._items[q.key]
        return chosen
