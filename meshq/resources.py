"""Resource alarms, as RabbitMQ raises them: free disk space where the store lives, and
the daemon's memory.

While an alarm is raised the node refuses ``send`` with UNAVAILABLE and a reason that
names the limit and what to do, AMQP publishers that announce the capability get
``connection.blocked``, and ``meshq-ctl status`` (section ``resources``) and the metrics
show it. Everything else goes on (receives, acks, purges, deletes), so that consumers can
drain the backlog that caused it. An alarm clears on the first check under its limit;
while the memory alarm is raised, each check first hands the C allocator's free memory
back to the system (``malloc_trim``), since resident memory does not fall by itself
after a backlog drains.

``Alarms.check`` is pure (tests feed it samples); ``Alarms.run`` samples the real
system every CHECK_INTERVAL seconds: ``statvfs`` of the data directory, the resident
set of this process and of its store's writer (``/proc/<pid>/statm``), and the
machine's memory or the cgroup's limit, whichever is smaller. Never: a send refused
without the reason, or an alarm that blocks consumers.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import trio

from meshq.allocator import malloc_trim

__all__ = ["CHECK_INTERVAL", "Alarms", "Sample", "resident_bytes", "system_sample"]

log = logging.getLogger("meshq.resources")

CHECK_INTERVAL = 1.0  # seconds between samples
_MIB = 1024 * 1024


@dataclass(frozen=True)
class Sample:
    disk_free: int  # bytes available to us on the data directory's file system
    memory: int  # resident bytes of the daemon (and its writer process)
    memory_total: int  # bytes the daemon may use: RAM, or its cgroup's limit if lower


def _mib(n: float) -> str:
    return f"{n / _MIB:,.0f} MiB"


class Alarms:
    """The disk and memory alarms of one node."""

    def __init__(self, data_dir: Path, disk_free_limit: int, memory_high_watermark: float,
                 sample: Callable[[tuple[int, ...]], Sample],
                 helpers: Callable[[], Iterable[int]] = tuple) -> None:
        self.data_dir = data_dir
        self.disk_free_limit = disk_free_limit
        self.memory_high_watermark = memory_high_watermark
        # system_sample in the daemon (tests feed their own), given the pids of the
        # helpers() (the store's writer), which are read on the event loop.
        self.sample = sample
        self.helpers = helpers
        self.raised: dict[str, str] = {}  # "disk" / "memory" -> the reason
        self.last: Sample | None = None

    @property
    def memory_limit(self) -> int | None:
        last = self.last
        return None if last is None else int(last.memory_total * self.memory_high_watermark)

    def check(self, s: Sample) -> None:
        self.last = s
        if s.disk_free < self.disk_free_limit:
            self.raised["disk"] = (
                f"disk alarm: {_mib(s.disk_free)} free for {self.data_dir}, under "
                f"disk_free_limit ({_mib(self.disk_free_limit)}); free disk space or "
                "lower the limit. Consumers go on")
        else:
            self.raised.pop("disk", None)
        limit = s.memory_total * self.memory_high_watermark
        if s.memory > limit:
            self.raised["memory"] = (
                f"memory alarm: meshqd uses {_mib(s.memory)}, over memory_high_watermark "
                f"({self.memory_high_watermark:g} of {_mib(s.memory_total)} = "
                f"{_mib(limit)}); consume the backlog or raise the watermark")
        else:
            self.raised.pop("memory", None)

    def reason(self) -> str | None:
        """Why sends are refused now (None: they are not, on our account)."""
        return "; ".join(self.raised[k] for k in sorted(self.raised)) or None

    def status(self) -> dict[str, object]:
        last = self.last
        return {
            "alarms": sorted(self.raised),
            "disk_free_bytes": None if last is None else last.disk_free,
            "disk_free_limit_bytes": self.disk_free_limit,
            "memory_bytes": None if last is None else last.memory,
            "memory_limit_bytes": self.memory_limit,
            "memory_high_watermark": self.memory_high_watermark,
        }

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
                  ) -> None:
        """Sample now (so that an alarm holds from the start), then every CHECK_INTERVAL.
        A sample that fails (the file system errs) is logged and skipped."""
        await self._check()
        task_status.started()
        while True:
            await trio.sleep(CHECK_INTERVAL)
            await self._check()

    async def _check(self) -> None:
        pids = tuple(self.helpers())
        trim = "memory" in self.raised
        try:
            s = await trio.to_thread.run_sync(self._sample, pids, trim)
        except OSError as exc:
            log.warning("resource check failed: %s", exc)
            return
        self.check(s)

    def _sample(self, pids: tuple[int, ...], trim: bool) -> Sample:
        if trim:  # freed memory the allocator kept would hold the alarm up: give it back
            malloc_trim()
        return self.sample(pids)


def resident_bytes(pid: int | str) -> int:
    """Resident memory of a process (``"self"``: this one); 0 if it is gone."""
    try:
        with open(f"/proc/{pid}/statm", "rb") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def _memory_total() -> int:
    total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(path).read_text().strip()
        except OSError:
            continue
        if text.isdigit() and 0 < int(text) < total:
            total = int(text)
    return total


def system_sample(data_dir: Path, pids: Iterable[int] = ()) -> Sample:
    """Free space for ``data_dir``, and the resident memory of this process and of
    ``pids`` (the store's writer)."""
    st = os.statvfs(data_dir)
    memory = resident_bytes("self") + sum(resident_bytes(pid) for pid in pids)
    return Sample(st.f_bavail * st.f_frsize, memory, _memory_total())
