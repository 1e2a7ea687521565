"""The optional NTP check (SPEC section 3, "Clocks"): one ntplib query in a worker thread.

No state lives here. The answer goes to ClockTracker.ntp_check, which decides; this
module must never block the trio thread (ntplib's socket calls run in a worker thread).
"""

from __future__ import annotations

import ntplib
import trio

__all__ = ["NtpError", "query_ntp"]


class NtpError(Exception):
    """The NTP server could not be asked or did not answer in time."""


# ``timeout`` is the worker thread's socket timeout, which trio's cancellation cannot reach.
async def query_ntp(server: str, timeout: float = 5.0, port: int = 123) -> float:  # noqa: ASYNC109
    """The NTP server's clock minus ours, in milliseconds (positive: our clock is behind).

    One NTPv3 request to ``server`` in a worker thread, waiting at most ``timeout``
    seconds for the answer (name resolution is not covered by it); on cancellation the
    thread is abandoned and finishes its wait alone. Raises NtpError on any failure.
    """
    client = ntplib.NTPClient()
    try:
        stats = await trio.to_thread.run_sync(
            client.request, server, 3, port, timeout, abandon_on_cancel=True
        )
    except (ntplib.NTPException, OSError) as exc:
        raise NtpError(f"NTP server {server}: {exc}") from exc
    return float(stats.offset) * 1000.0
