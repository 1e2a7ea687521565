"""Hybrid logical clock (Kulkarni et al.), as a pure module: no I/O, time is an argument.

A timestamp is one int: wall milliseconds in the high bits, a 16-bit logical counter in
the low bits, so timestamps compare as ints and fit SQLite's INTEGER. Invariant: the
timestamps one HLC hands out strictly increase, whatever the wall clock does.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["HLC", "LOGICAL_BITS", "ClockOffsetError", "pack", "physical_ms", "unpack"]

LOGICAL_BITS = 16
_LOGICAL_MASK = (1 << LOGICAL_BITS) - 1


def pack(wall_ms: int, logical: int = 0) -> int:
    """The timestamp for a wall time in milliseconds and a logical counter."""
    if not 0 <= logical <= _LOGICAL_MASK:
        raise ValueError(f"logical counter out of range: {logical}")
    return (wall_ms << LOGICAL_BITS) | logical


def unpack(ts: int) -> tuple[int, int]:
    """(wall milliseconds, logical counter) of a timestamp."""
    return ts >> LOGICAL_BITS, ts & _LOGICAL_MASK


def physical_ms(ts: int) -> int:
    return ts >> LOGICAL_BITS


class ClockOffsetError(ValueError):
    """A remote timestamp is further ahead of our wall clock than max_offset allows."""


@dataclass
class HLC:
    """The clock state: the last timestamp handed out (or received).

    ``max_offset_ms`` bounds how far a remote timestamp may be ahead of our wall clock
    before :meth:`receive` rejects it instead of dragging our clock forward.
    """

    last: int = 0
    max_offset_ms: int = 500

    def now(self, wall_ms: int) -> int:
        """A new timestamp for a local event (send): greater than every earlier one."""
        ts = max(self.last + 1, wall_ms << LOGICAL_BITS)
        self.last = ts
        return ts

    def receive(self, remote: int, wall_ms: int) -> int:
        """Merge a timestamp from a peer; return a new local timestamp above both.

        Raises ClockOffsetError (and leaves the clock untouched) when the remote
        timestamp's wall part is more than max_offset_ms ahead of ``wall_ms``.
        """
        if physical_ms(remote) - wall_ms > self.max_offset_ms:
            raise ClockOffsetError(
                f"remote timestamp is {physical_ms(remote) - wall_ms} ms ahead of the local "
                f"clock (max_clock_offset is {self.max_offset_ms} ms)"
            )
        ts = max(self.last + 1, remote + 1, wall_ms << LOGICAL_BITS)
        self.last = ts
        return ts

    def restore(self, high_water: int) -> None:
        """After a restart: never hand out a timestamp at or below ``high_water``."""
        self.last = max(self.last, high_water)
