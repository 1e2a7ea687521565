"""The one source of time for the daemon, so that tests can run it in virtual time.

Contract: ``time()`` is wall-clock seconds since the epoch (it may jump when the host's
clock is stepped; the HLC absorbs that); ``sleep_until(t)`` returns no earlier than when
``time()`` reaches t, and is cancellable. Neither blocks the event loop.
"""

from __future__ import annotations

import time as _time
from typing import Protocol

import trio

__all__ = ["Clock", "SystemClock"]


class Clock(Protocol):
    def time(self) -> float: ...

    async def sleep_until(self, when: float) -> None: ...


class SystemClock:
    """The host's wall clock."""

    def time(self) -> float:
        return _time.time()

    async def sleep_until(self, when: float) -> None:
        # The wall clock may be stepped while we sleep: re-check, sleep the rest.
        while (delay := when - _time.time()) > 0:  # noqa: ASYNC110 - a deadline
            await trio.sleep(delay)
