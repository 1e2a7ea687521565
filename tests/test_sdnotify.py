"""sd_notify: the client on its own, and a real meshqd talking to a socket posing as systemd."""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import signal
import socket
import struct
import tempfile
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
from trio.testing import MockClock, wait_all_tasks_blocked

from meshq.sdnotify import Notifier
from meshq.testing import DaemonProcess

UCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


@asynccontextmanager
async def notify_socket(abstract: bool = False) -> AsyncIterator[tuple[trio.socket.SocketType,
                                                                       str]]:
    """A SOCK_DGRAM socket that records senders' pids, and its $NOTIFY_SOCKET value."""
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
    directory = None
    if abstract:
        name = f"meshq-test-{secrets.token_hex(8)}"
        await sock.bind("\0" + name)
        value = "@" + name
    else:  # AF_UNIX paths are short: keep it under /tmp
        directory = Path(tempfile.mkdtemp(prefix="meshq-notify-"))
        value = str(directory / "notify")
        await sock.bind(value)
    try:
        yield sock, value
    finally:
        sock.close()
        if directory is not None:
            (directory / "notify").unlink(missing_ok=True)
            directory.rmdir()


async def receive(sock: trio.socket.SocketType) -> tuple[int, dict[str, str]]:
    """One datagram: the sender's pid and its KEY=value fields."""
    data, ancdata, _flags, _addr = await sock.recvmsg(4096, socket.CMSG_SPACE(UCRED.size))
    pid = -1
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
            pid = UCRED.unpack(payload[:UCRED.size])[0]
    fields = dict(line.split("=", 1) for line in data.decode().split("\n"))
    return pid, fields


# ----------------------------------------------------------------------------- the client


def test_without_notify_socket_everything_is_a_noop() -> None:
    env: dict[str, str] = {"WATCHDOG_USEC": "1000000"}
    n = Notifier.from_environ(env)
    assert not n.enabled
    assert n.watchdog_interval is None
    assert not n.ready(lambda: "x")
    assert not n.stopping()
    assert not n.watchdog()
    assert (n.sent, n.failed) == (0, 0)
    assert env == {}


async def test_run_returns_at_once_when_disabled() -> None:
    with trio.fail_after(1):
        await Notifier(None).run()


async def test_abstract_socket_and_environment_unset() -> None:
    async with notify_socket(abstract=True) as (sock, value):
        env = {"NOTIFY_SOCKET": value, "WATCHDOG_USEC": "60000000", "OTHER": "kept"}
        n = Notifier.from_environ(env)
        assert env == {"OTHER": "kept"}  # children of the daemon must not inherit them
        assert n.address == "\0" + value[1:]
        assert n.watchdog_interval == 30.0
        assert n.ready(lambda: "serving:\n two  lines")
        with trio.fail_after(5):
            pid, fields = await receive(sock)
        assert pid == os.getpid()
        assert fields == {"READY": "1", "STATUS": "serving: two lines"}
        n.close()


async def test_environment_kept_when_asked() -> None:
    env = {"NOTIFY_SOCKET": "@x", "WATCHDOG_USEC": "1"}
    Notifier.from_environ(env, unset=False)
    assert env == {"NOTIFY_SOCKET": "@x", "WATCHDOG_USEC": "1"}


@pytest.mark.parametrize(("env", "interval"), [
    ({"WATCHDOG_USEC": "200000"}, 0.1),
    ({"WATCHDOG_USEC": "200000", "WATCHDOG_PID": str(os.getpid())}, 0.1),
    ({"WATCHDOG_USEC": "200000", "WATCHDOG_PID": str(os.getpid() + 1)}, None),
    ({"WATCHDOG_USEC": "0"}, None),
    ({"WATCHDOG_USEC": "soon"}, None),
    ({}, None),
])
def test_watchdog_interval_is_half_the_timeout_and_only_ours(env: dict[str, str],
                                                              interval: float | None) -> None:
    n = Notifier.from_environ({"NOTIFY_SOCKET": "/run/x", **env})
    assert n.watchdog_interval == interval


@pytest.mark.parametrize("value", ["relative/path", "@", "vsock:2:1234"])
def test_unsupported_address_disables(value: str, caplog: pytest.LogCaptureFixture) -> None:
    n = Notifier.from_environ({"NOTIFY_SOCKET": value})
    assert not n.enabled
    assert "ignoring NOTIFY_SOCKET" in caplog.text


def test_send_errors_are_logged_once_and_never_raised(caplog: pytest.LogCaptureFixture,
                                                      tmp_path: Path) -> None:
    n = Notifier(str(tmp_path / "nobody-listens"))
    with caplog.at_level(logging.WARNING, logger="meshq.sdnotify"):
        assert not n.ready(lambda: "x")
        assert not n.watchdog()
        assert not n.stopping()
    assert (n.sent, n.failed) == (0, 3)
    assert [r.message.count("sd_notify") for r in caplog.records] == [1]
    n.close()


async def test_run_pings_the_watchdog_and_refreshes_status_when_it_changes() -> None:
    text = ["one"]
    async with notify_socket() as (sock, value):
        n = Notifier.from_environ({"NOTIFY_SOCKET": value, "WATCHDOG_USEC": "100000"})
        async with trio.open_nursery() as nursery:
            await nursery.start(n.run)
            n.ready(lambda: text[0])
            seen: list[dict[str, str]] = []
            with trio.fail_after(5):
                while sum(f == {"WATCHDOG": "1"} for f in seen) < 3:
                    seen.append((await receive(sock))[1])
                text[0] = "two"
                while {"STATUS": "two"} not in seen:
                    seen.append((await receive(sock))[1])
            assert {"READY": "1", "STATUS": "one"} in seen
            assert [f for f in seen if "STATUS" in f and "READY" not in f] == [{"STATUS": "two"}]
            nursery.cancel_scope.cancel()
        assert n._sock is None  # closed when run ends


def _pending(sock: socket.socket) -> list[bytes]:
    out = []
    while True:
        try:
            out.append(sock.recv(4096))
        except BlockingIOError:
            return out


async def test_pings_are_timed_by_the_event_loop(mock_clock: MockClock) -> None:
    """No thread pings for us: with trio's clock standing still, no ping goes out."""
    directory = Path(tempfile.mkdtemp(prefix="meshq-notify-"))
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(directory / "notify"))
        sock.setblocking(False)
        try:
            n = Notifier(str(directory / "notify"), watchdog_usec=100_000)
            async with trio.open_nursery() as nursery:
                await nursery.start(n.run)
                await wait_all_tasks_blocked()
                assert _pending(sock) == [b"WATCHDOG=1"]  # at once
                mock_clock.jump(0.04)
                await wait_all_tasks_blocked()
                assert _pending(sock) == []  # not before half the timeout
                mock_clock.jump(0.02)
                await wait_all_tasks_blocked()
                assert _pending(sock) == [b"WATCHDOG=1"]
                nursery.cancel_scope.cancel()
        finally:
            shutil.rmtree(directory)


# ----------------------------------------------------------------------------- meshqd


def _children(pid: int) -> Iterator[int]:
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            text = Path(f"/proc/{pid}/task/{task}/children").read_text()
        except OSError:
            continue
        yield from (int(c) for c in text.split())


def _ask(d: DaemonProcess, op: str, *args: str) -> Any:
    with d.client() as c:
        return getattr(c, op)(*args)


def _environ(pid: int) -> set[str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    return {item.split(b"=", 1)[0].decode() for item in raw.split(b"\0") if item}


async def test_meshqd_ready_status_watchdog_stopping(tmp_path: Path) -> None:
    async with notify_socket() as (sock, value):
        env = {k: v for k, v in os.environ.items() if not k.startswith("WATCHDOG_")}
        env.update(NOTIFY_SOCKET=value, WATCHDOG_USEC="200000")
        d = DaemonProcess(tmp_path / "data", env=env)
        messages: list[tuple[int, dict[str, str]]] = []

        async def start() -> None:  # it blocks until the ready line; READY=1 may come first
            await trio.to_thread.run_sync(d.start)

        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(start)
                with trio.fail_after(30):
                    while "READY" not in (fields := (await receive(sock))[1]):
                        assert set(fields) == {"WATCHDOG"}, fields  # nothing else before
                    # READY=1 comes only once the socket answers: ask it now.
                    status = await trio.to_thread.run_sync(_ask, d, "status")
            assert status["node"]["name"] == "test-node"
            assert fields["STATUS"] == (f"serving: node test-node, 1/1 members alive, 0 queues, "
                                        f"accepting writes; socket {d.socket}")

            with trio.fail_after(10):  # pings keep coming, a changed status shows up
                pings = 0
                while pings < 5:
                    pid, fields = await receive(sock)
                    messages.append((pid, fields))
                    pings += fields == {"WATCHDOG": "1"}
                await trio.to_thread.run_sync(_ask, d, "declare", "q")
                while "1 queue," not in fields.get("STATUS", ""):
                    pid, fields = await receive(sock)
                    messages.append((pid, fields))

            children = list(_children(d.pid))
            assert children, "meshqd runs its SQLite writer as a child process"
            for child in children:
                assert not _environ(child) & {"NOTIFY_SOCKET", "WATCHDOG_USEC"}

            assert d.proc is not None
            d.proc.send_signal(signal.SIGTERM)
            with trio.fail_after(15):
                while "STOPPING" not in fields:
                    pid, fields = await receive(sock)
                    messages.append((pid, fields))
                assert fields["STATUS"].startswith("stopping: node test-node,")
                code = await trio.to_thread.run_sync(d.proc.wait)
            assert code == 0, d.log_tail()
            assert {pid for pid, _ in messages} == {d.pid}  # NotifyAccess=main would drop others
        finally:
            d.kill()
