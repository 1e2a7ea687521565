"""A Clock in trio's virtual time: use under trio.testing.MockClock(autojump_threshold=0).

The simulation skews one node's clock (``offset``) or stops it while the node is paused
(``freeze``/``thaw``); trio's own clock, which orders events, is never touched.
"""

from __future__ import annotations

import trio

__all__ = ["TrioClock"]


class TrioClock:
    """Wall time = ``epoch`` + ``offset`` + trio.current_time(), or the time it was frozen
    at; sleeps follow trio's (mock) clock."""

    def __init__(self, epoch: float = 1_700_000_000.0, offset: float = 0.0) -> None:
        self.epoch = epoch
        self.offset = offset
        self._frozen: float | None = None
        self._thawed = trio.Event()

    def time(self) -> float:
        if self._frozen is not None:
            return self._frozen
        return self.epoch + self.offset + trio.current_time()

    def freeze(self) -> None:
        if self._frozen is None:
            self._frozen = self.time()
            self._thawed = trio.Event()

    def thaw(self) -> None:
        self._frozen = None
        self._thawed.set()

    async def sleep_until(self, when: float) -> None:
        """Until this clock reads ``when`` (a stopped clock reads nothing later)."""
        while True:
            if self._frozen is not None:
                await self._thawed.wait()
                continue
            await trio.sleep_until(when - self.epoch - self.offset)
            if self.time() >= when:
                return
