"""A Clock in trio's virtual time: use under trio.testing.MockClock(autojump_threshold=0)."""

from __future__ import annotations

import trio

__all__ = ["TrioClock"]


class TrioClock:
    """Wall time = ``epoch`` + trio.current_time(); sleeps follow trio's (mock) clock."""

    def __init__(self, epoch: float = 1_700_000_000.0) -> None:
        self.epoch = epoch

    def time(self) -> float:
        return self.epoch + trio.current_time()

    async def sleep_until(self, when: float) -> None:
        await trio.sleep_until(when - self.epoch)
