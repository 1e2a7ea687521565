"""sd_notify for systemd's ``Type=notify``: READY, STATUS, STOPPING and the watchdog.

State here: the notify socket's address and the watchdog interval, read once from the
environment at start-up. Never: an exception from a send (a notify failure must not stop
the node), nor a watchdog ping from anywhere but the event loop (a stuck loop must go quiet).
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Callable, MutableMapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from meshq.mesh.swim import MemberState

if TYPE_CHECKING:
    from meshq.node import Node

__all__ = ["ENV_VARS", "STATUS_REFRESH", "Notifier", "status_line"]

log = logging.getLogger("meshq.sdnotify")

ENV_VARS = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")
STATUS_REFRESH = 5.0  # seconds between STATUS= refreshes (sent only when the text changed)


def _address(value: str) -> str | None:
    """The AF_UNIX address in ``$NOTIFY_SOCKET``: a path, or ``@name`` (abstract)."""
    if value.startswith("@") and len(value) > 1:
        return "\0" + value[1:]
    if value.startswith("/"):
        return value
    return None  # relative paths and vsock: (systemd 254+, VMs) are not supported


def _watchdog_usec(environ: MutableMapping[str, str]) -> int | None:
    """``$WATCHDOG_USEC`` if it is meant for this process (``$WATCHDOG_PID``), else None."""
    usec, pid = environ.get("WATCHDOG_USEC", ""), environ.get("WATCHDOG_PID", "")
    if not usec:
        return None
    if pid and pid != str(os.getpid()):
        return None  # systemd meant another process (we were started by a wrapper)
    try:
        value = int(usec)
    except ValueError:
        log.warning("ignoring WATCHDOG_USEC=%r: not an integer", usec)
        return None
    return value if value > 0 else None


class Notifier:
    """Sends state changes to systemd; every method is a no-op without a notify socket.

    Sends never block and never raise: a failure is logged once, then dropped.
    ``run`` is the task that pings the watchdog every half ``WATCHDOG_USEC`` and
    refreshes STATUS= from the source given to ``ready``.
    """

    def __init__(self, address: str | None, *, watchdog_usec: int | None = None) -> None:
        self.address = address
        self.watchdog_usec = watchdog_usec if address is not None else None
        self.sent = 0
        self.failed = 0
        self._sock: socket.socket | None = None
        self._source: Callable[[], str] | None = None
        self._last_status: str | None = None

    @classmethod
    def from_environ(cls, environ: MutableMapping[str, str] | None = None, *,
                     unset: bool = True) -> Notifier:
        """Read ``$NOTIFY_SOCKET`` and ``$WATCHDOG_USEC``/``$WATCHDOG_PID``.

        With ``unset`` (the default) the three variables are removed from ``environ``
        (``os.environ``) so that child processes do not inherit them, as
        ``sd_notify(unset_environment=1)`` does.
        """
        env = os.environ if environ is None else environ
        raw = env.get("NOTIFY_SOCKET", "")
        address = _address(raw) if raw else None
        if raw and address is None:
            log.warning("ignoring NOTIFY_SOCKET=%r: not a path nor @abstract", raw)
        watchdog = _watchdog_usec(env)
        if unset:
            for name in ENV_VARS:
                env.pop(name, None)
        return cls(address, watchdog_usec=watchdog)

    @property
    def enabled(self) -> bool:
        return self.address is not None

    @property
    def watchdog_interval(self) -> float | None:
        """Seconds between WATCHDOG=1 pings (half the timeout, as systemd advises)."""
        return None if self.watchdog_usec is None else self.watchdog_usec / 2e6

    def notify(self, **fields: str) -> bool:
        """Send one datagram ``KEY=value`` per line; True if it went out."""
        if self.address is None:
            return False
        text = "\n".join(f"{key}={_one_line(value)}" for key, value in fields.items())
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                self._sock.setblocking(False)  # a full queue in systemd drops the datagram
            self._sock.sendto(text.encode(), self.address)
        except OSError as exc:
            if not self.failed:
                log.warning("sd_notify to %s failed (logged once): %s",
                            self.address.replace("\0", "@"), exc)
            self.failed += 1
            return False
        self.sent += 1
        return True

    def ready(self, status: Callable[[], str]) -> bool:
        """READY=1 with a STATUS= line; ``run`` then refreshes STATUS= from ``status``."""
        self._source = status
        self._last_status = _one_line(status())
        return self.notify(READY="1", STATUS=self._last_status)

    def status(self, text: str) -> bool:
        self._last_status = _one_line(text)
        return self.notify(STATUS=self._last_status)

    def stopping(self, status: str = "stopping") -> bool:
        self._last_status = _one_line(status)
        return self.notify(STOPPING="1", STATUS=self._last_status)

    def watchdog(self) -> bool:
        return self.notify(WATCHDOG="1")

    def refresh(self) -> bool:
        """Send STATUS= from the ``ready`` source if its text changed."""
        if self._source is None:
            return False
        try:
            text = _one_line(self._source())
        except Exception:  # a status bug must not stop the watchdog
            log.exception("status line failed")
            return False
        if text == self._last_status:
            return False
        return self.status(text)

    async def run(self, *, status_every: float = STATUS_REFRESH,
                  task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Ping the watchdog and refresh STATUS= until cancelled (returns if disabled).

        STATUS= is refreshed every ``status_every`` seconds, or at each ping if those are closer.
        """
        task_status.started()
        if not self.enabled:
            return
        interval = self.watchdog_interval
        if interval is not None:
            status_every = min(status_every, interval)
        next_ping = next_status = trio.current_time()
        try:
            while True:
                now = trio.current_time()
                if interval is not None and now >= next_ping:
                    self.watchdog()
                    next_ping = now + interval
                if now >= next_status:
                    self.refresh()
                    next_status = now + status_every
                wake = next_status if interval is None else min(next_ping, next_status)
                await trio.sleep_until(wake)
        finally:
            self.close()

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def status_line(node: Node, socket_path: Path) -> str:
    """The daemon's STATUS= text: members alive, queues, whether it takes writes."""
    if node.membership is not None:
        states = [m.state for m in node.membership.swim.members()]
        known = sum(s is not MemberState.LEFT for s in states)
        alive = sum(s is MemberState.ALIVE for s in states)
    else:
        known = alive = 1
    accepting, why_not = node.writes()
    writes = "accepting writes" if accepting else (
        "no writes: " + (why_not or "").removeprefix("this node accepts no writes: "))
    state = "stopping" if node.stop_requested.is_set() else "serving"
    queues = len(node.broker.queues)
    return (f"{state}: node {node.name}, {alive}/{known} members alive, "
            f"{queues} queue{'' if queues == 1 else 's'}, {writes}; socket {socket_path}")
