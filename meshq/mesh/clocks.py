"""Clock-offset bookkeeping (SPEC section 3, "Clocks"): should this node accept writes?

State here: the last few probe timings per peer and the last NTP measurement. What must
never happen: a node whose clock is off from the cluster median by more than the limit
accepting writes (it would stamp bad HLC timestamps), nor one staying refused after its
clock is back in range. Pure: every time is an argument, nothing here reads a clock.

Signs and units. A probe gives t0 (our wall clock when the ping left), t1 (the peer's
when it arrived), t2 (the peer's when the ack left), t3 (ours when the ack came back),
in seconds. A peer's *offset* is its clock minus ours (NTP's theta), so a peer that is
ahead has a positive offset; ntp_check takes the NTP server's offset with the same sign
(ntplib's ``offset``). The verdict's ``median_offset_ms`` is the other way round: our
clock minus the cluster median, positive when our clock is ahead. The tracker's offsets
are in milliseconds; ``now`` is any clock in seconds (say trio.current_time()), the same
one for every call, and only ever compared with itself to age samples.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from typing import NamedTuple

__all__ = [
    "DEFAULT_MAX_AGE",
    "DEFAULT_MAX_OFFSET_MS",
    "ClockTracker",
    "ClockVerdict",
    "Sample",
    "ntp_offset",
]

DEFAULT_MAX_OFFSET_MS = 500.0  # SPEC: max_clock_offset
# Seconds after which a sample no longer counts. SWIM probes each peer about once per
# (members x probe interval), so this should cover a few such rounds: 120 s suits up to
# a few dozen nodes at 1 s probes; pass a larger max_age for bigger clusters.
DEFAULT_MAX_AGE = 120.0
# Slack (seconds) when asking whether two samples can both be right (see observe).
_STEP_SLACK = 0.001
# A round-trip delay this far below zero is float rounding; further is a bad sample.
_DELAY_TOLERANCE = 1e-6


def ntp_offset(t0: float, t1: float, t2: float, t3: float) -> tuple[float, float]:
    """(offset, delay) of one probe round trip, the NTP way.

    offset = ((t1 - t0) + (t2 - t3)) / 2 is the peer's clock minus ours; delay =
    (t3 - t0) - (t2 - t1) is the round trip without the peer's time between receiving
    and answering. The offset is exact when both directions take equal time, and
    whatever the asymmetry the true offset lies within offset +- delay / 2.
    """
    return ((t1 - t0) + (t2 - t3)) / 2.0, (t3 - t0) - (t2 - t1)


class Sample(NamedTuple):
    """One probe's estimate: ``offset`` and ``delay`` in seconds, taken at ``at`` (now)."""

    offset: float
    delay: float
    at: float

    def agrees_with(self, other: Sample) -> bool:
        """Whether both can be right: their error intervals (offset +- delay / 2) meet."""
        gap = abs(self.offset - other.offset)
        return gap <= (self.delay + other.delay) / 2.0 + _STEP_SLACK


@dataclass(frozen=True)
class ClockVerdict:
    """Whether this node may accept writes now, and if not why (a sentence for the
    client's error and for ``meshq-ctl status``). ``median_offset_ms``: our clock minus
    the cluster median (positive: ours is ahead); ``peers``: how many peers had fresh
    samples; ``ntp_offset_ms``: the fresh NTP measurement, if any (server minus ours)."""

    accepting_writes: bool
    reason: str | None
    median_offset_ms: float
    peers: int = 0
    ntp_offset_ms: float | None = None


class ClockTracker:
    """Estimates this node's clock offset to the cluster and decides whether it may
    accept writes.

    Feed it every probe round trip (``observe``), ``forget`` a peer that is dead or has
    left, and optionally NTP measurements (``ntp_check``). Per peer it keeps the last
    ``window`` samples, and the one with the smallest round-trip delay among the fresh
    ones (at most ``max_age`` seconds old) is that peer's offset: the NTP clock filter,
    since the shortest round trip has the tightest error bound. ``verdict`` refuses
    writes when our offset to the median of {us: 0} and the peers' offsets, or a fresh
    NTP offset, is beyond ``max_offset_ms`` in either direction. With fewer than
    ``min_peers`` peers measured the peer check passes: a single node has no cluster to
    disagree with, and with one peer there is no telling whose clock is wrong.
    """

    def __init__(
        self,
        max_offset_ms: float = DEFAULT_MAX_OFFSET_MS,
        window: int = 8,
        max_age: float = DEFAULT_MAX_AGE,
        min_peers: int = 2,
    ) -> None:
        if not max_offset_ms > 0 or window < 1 or not max_age > 0:
            raise ValueError("max_offset_ms and max_age must be positive, window at least 1")
        self.max_offset_ms = max_offset_ms
        self.window = window
        self.max_age = max_age
        self.min_peers = min_peers  # fewer measured peers: no majority to judge our clock by
        self._samples: dict[str, deque[Sample]] = {}
        self._ntp: tuple[float, float] | None = None  # (offset ms, at)

    # ------------------------------------------------------------------ input
    def observe(self, peer: str, t0: float, t1: float, t2: float, t3: float,
                now: float) -> bool:
        """Record one probe round trip with ``peer`` (times as in ntp_offset), seen at
        ``now``. Returns False, recording nothing, for a sample no clock can produce: a
        time that is not finite, or a negative round trip (our clock stepped back during
        the probe, or the peer's t1/t2 are nonsense).

        A sample whose error interval does not meet an older sample's means one of the
        two clocks stepped in between: the older samples that disagree are dropped, so a
        clock that is set right again counts at once instead of after max_age.
        """
        offset, delay = ntp_offset(t0, t1, t2, t3)
        if not (math.isfinite(offset) and math.isfinite(delay) and math.isfinite(now)):
            return False
        if delay < -_DELAY_TOLERANCE:
            return False
        sample = Sample(offset, max(delay, 0.0), now)
        history = self._samples.get(peer)
        if history is None:
            history = self._samples[peer] = deque(maxlen=self.window)
        kept = [s for s in history if s.agrees_with(sample)]
        if len(kept) != len(history):
            history.clear()
            history.extend(kept)
        history.append(sample)
        return True

    def forget(self, peer: str) -> None:
        """Drop everything about ``peer`` (it is dead or has left); unknown peers are fine."""
        self._samples.pop(peer, None)

    def ntp_check(self, offset_ms: float, now: float) -> None:
        """Record an NTP measurement: the server's clock minus ours, in ms, taken at
        ``now``. It counts in verdicts for max_age seconds; a non-finite one is ignored."""
        if math.isfinite(offset_ms) and math.isfinite(now):
            self._ntp = (offset_ms, now)

    # ------------------------------------------------------------------ estimates
    def _best(self, history: deque[Sample], now: float | None) -> Sample | None:
        fresh = [s for s in history if now is None or now - s.at <= self.max_age]
        return min(fresh, key=lambda s: s.delay, default=None)

    def offsets(self, now: float | None = None) -> dict[str, float]:
        """Each peer's clock minus ours in ms, from its filtered sample. With ``now``, only
        peers with a sample at most max_age old; without it, the last estimate of each
        peer however old (for status displays)."""
        out: dict[str, float] = {}
        for peer, history in self._samples.items():
            best = self._best(history, now)
            if best is not None:
                out[peer] = best.offset * 1000.0
        return out

    def cluster_median_offset(self, now: float | None = None) -> float:
        """Our clock minus the cluster median, in ms (positive: ours is ahead). The median
        is over {us: 0} and the peers' offsets (fresh ones only, given ``now``); with an
        even count it is the mean of the middle two. 0.0 with no peers."""
        return _ours_to_median(self.offsets(now).values())

    def verdict(self, now: float) -> ClockVerdict:
        """Whether to accept writes at ``now``; see the class docstring for the rule."""
        peer_offsets = self.offsets(now)
        ours = _ours_to_median(peer_offsets.values())
        reasons: list[str] = []
        limit = self.max_offset_ms
        if abs(ours) > limit and len(peer_offsets) >= self.min_peers:
            reasons.append(
                f"this node's clock is {abs(ours):.0f} ms {_side(ours)} the cluster median "
                f"(of {len(peer_offsets) + 1} nodes), beyond max_clock_offset of {limit:g} ms"
            )
        ntp: float | None = None
        if self._ntp is not None and now - self._ntp[1] <= self.max_age:
            ntp = self._ntp[0]
            if abs(ntp) > limit:
                reasons.append(
                    f"this node's clock is {abs(ntp):.0f} ms {_side(-ntp)} its NTP server, "
                    f"beyond max_clock_offset of {limit:g} ms"
                )
        reason = None
        if reasons:
            reason = "; ".join(reasons) + ": refusing writes until the clock is back in range"
        return ClockVerdict(not reasons, reason, ours, len(peer_offsets), ntp)


def _ours_to_median(peer_offsets: Iterable[float]) -> float:
    """Our clock minus the median of {us: 0} and the peers' (theirs minus ours) offsets."""
    return 0.0 - statistics.median([0.0, *peer_offsets])  # 0.0 - x: never -0.0


def _side(ours_minus_theirs: float) -> str:
    return "ahead of" if ours_minus_theirs > 0 else "behind"
