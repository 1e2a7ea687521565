"""Resource alarms (meshq/resources.py): free disk space and the daemon's memory.

The rules on samples fed by hand; then real daemons with limits that trip at once:
sends refused UNAVAILABLE with the reason, consumers going on, the status section, the
metric, and AMQP's connection.blocked."""

from __future__ import annotations

import os
import socket
import urllib.request
from pathlib import Path

import pika
import pytest
import trio

from meshq.errors import Unavailable
from meshq.resources import Alarms, Sample, system_sample
from meshq.testing import DaemonProcess

GIB = 1024 ** 3


def test_each_alarm_is_raised_under_its_limit_and_clears_above_it() -> None:
    alarms = Alarms(Path("/data"), disk_free_limit=GIB, memory_high_watermark=0.5,
                    sample=lambda pids: Sample(0, 0, 0))
    alarms.check(Sample(disk_free=2 * GIB, memory=GIB, memory_total=4 * GIB))
    assert alarms.raised == {} and alarms.reason() is None
    alarms.check(Sample(disk_free=GIB - 1, memory=GIB, memory_total=4 * GIB))
    assert list(alarms.raised) == ["disk"]
    reason = alarms.reason()
    assert reason is not None
    assert "disk_free_limit (1,024 MiB)" in reason and "/data" in reason
    alarms.check(Sample(disk_free=GIB - 1, memory=2 * GIB + 1, memory_total=4 * GIB))
    assert sorted(alarms.raised) == ["disk", "memory"]
    assert "memory_high_watermark (0.5 of 4,096 MiB = 2,048 MiB)" in (alarms.reason() or "")
    alarms.check(Sample(disk_free=GIB, memory=2 * GIB, memory_total=4 * GIB))
    assert alarms.raised == {} and alarms.reason() is None
    assert alarms.status() == {
        "alarms": [], "disk_free_bytes": GIB, "disk_free_limit_bytes": GIB,
        "memory_bytes": 2 * GIB, "memory_limit_bytes": 2 * GIB,
        "memory_high_watermark": 0.5}


def test_the_system_sample_sees_this_disk_and_this_process(tmp_path: Path) -> None:
    s = system_sample(tmp_path, [os.getpid()])  # ourselves twice: a helper counts
    alone = system_sample(tmp_path)
    assert s.disk_free > 0 and 0 < alone.memory < s.memory <= s.memory_total
    st = os.statvfs(tmp_path)
    assert abs(s.disk_free - st.f_bavail * st.f_frsize) < GIB


def test_a_disk_alarm_refuses_sends_and_lets_consumers_drain(tmp_path: Path) -> None:
    d = DaemonProcess(tmp_path / "data").start()
    try:
        with d.client() as c:
            c.declare("jobs")
            sent = c.send_batch("jobs", [b"a", b"b"])
        d.stop()
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        d.env = {**os.environ, "MESHQ_DISK_FREE_LIMIT": str(1 << 60),  # an exabyte
                 "MESHQ_METRICS_BIND": f"127.0.0.1:{port}"}
        d.start()
        with d.client(retry_for=0) as c:
            with pytest.raises(Unavailable) as info:
                c.send("jobs", b"c")
            assert "disk alarm" in info.value.message
            assert "disk_free_limit" in info.value.message
            status = c.status()
            assert status["resources"]["alarms"] == ["disk"]
            assert status["node"]["accepting_writes"] is False
            assert "disk alarm" in status["node"]["not_accepting_reason"]
            got = c.receive("jobs", max=10)  # consumers go on
            assert sorted(m.id for m in got) == sorted(sent)
            assert sorted(c.ack("jobs", got)) == sorted(sent)
            c.declare("other")  # so do declares, purges and deletes
            c.purge("jobs")
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
            body = r.read()
        assert b'meshq_alarm{resource="disk"} 1.0' in body
        assert b'meshq_alarm{resource="memory"} 0.0' in body
    finally:
        d.kill()


def test_a_memory_alarm_blocks_an_amqp_publisher(tmp_path: Path) -> None:
    """A watermark no daemon fits under: pika, which announces connection.blocked, is told
    so with the reason, and a publish with confirms is refused."""
    env = {**os.environ, "MESHQ_MEMORY_HIGH_WATERMARK": "0.000001"}
    with DaemonProcess(tmp_path / "data", env=env).start() as d:
        blocked: list[str] = []
        conn = pika.BlockingConnection(pika.URLParameters(
            f"amqp://guest:guest@{d.amqp}/%2F"))
        conn.add_on_connection_blocked_callback(
            lambda _conn, frame: blocked.append(frame.method.reason))
        ch = conn.channel()
        ch.queue_declare("work")
        ch.exchange_declare("jobs.x", "direct")  # what a consumer sets up still works
        ch.queue_bind("work", "jobs.x", "k")
        ch.confirm_delivery()
        with pytest.raises(pika.exceptions.NackError):
            ch.basic_publish("", "work", b"x")
        deadline = 50
        while not blocked and deadline:  # sent on the listener's next tick (1 s)
            conn.process_data_events(time_limit=0.2)
            deadline -= 1
        assert blocked and "memory alarm" in blocked[0], blocked
        conn.close()
        with d.client() as c:
            assert c.status()["resources"]["alarms"] == ["memory"]


async def test_a_failing_sample_is_skipped_not_fatal(autojump_clock: object) -> None:
    """statvfs can fail (an I/O error, a stale mount): the check is logged and skipped,
    and the next one raises the alarm it finds; the helpers' pids reach the sampler."""
    seen: list[tuple[int, ...]] = []
    samples: list[Sample | OSError] = [OSError(5, "I/O error"),
                                       Sample(disk_free=0, memory=1, memory_total=4)]

    def sample(pids: tuple[int, ...]) -> Sample:
        seen.append(pids)
        got = samples.pop(0) if samples else Sample(GIB, 1, 4)
        if isinstance(got, OSError):
            raise got
        return got

    alarms = Alarms(Path("/data"), 1, 0.5, sample, helpers=lambda: [42])
    checked: trio.MemorySendChannel[list[str]]
    checked, results = trio.open_memory_channel[list[str]](10)
    check = alarms.check

    def counted(s: Sample) -> None:
        check(s)
        checked.send_nowait(sorted(alarms.raised))

    alarms.check = counted  # type: ignore[method-assign]
    async with trio.open_nursery() as nursery:
        await nursery.start(alarms.run)
        assert alarms.raised == {} and alarms.last is None  # the first sample failed
        assert await results.receive() == ["disk"]
        assert await results.receive() == []
        nursery.cancel_scope.cancel()
    assert seen[:3] == [(42,), (42,), (42,)]
