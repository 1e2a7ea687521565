"""DaemonProcess: a real ``meshqd`` in a subprocess, on its own socket and data dir.

``start()`` returns once the daemon printed its ready line (an event, not a sleep);
``kill()`` is SIGKILL, as in a crash; ``stop()`` is SIGTERM, as systemd does.
"""

from __future__ import annotations

import os
import select
import selectors
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import IO, Any

from meshq.client import Client

__all__ = ["DaemonProcess"]

READY_PREFIX = "meshqd ready:"


class DaemonProcess:
    def __init__(self, data_dir: str | os.PathLike[str],
                 socket: str | os.PathLike[str] | None = None,
                 *, args: list[str] | None = None, env: dict[str, str] | None = None,
                 node_name: str = "test-node", new_session: bool = False) -> None:
        self.data_dir = Path(data_dir)
        if socket is None:  # AF_UNIX paths are short (108 bytes): keep it under /tmp
            socket = Path(tempfile.mkdtemp(prefix="meshq-")) / "meshq.sock"
        self.socket = Path(socket)
        self.args = list(args or [])
        self.env = env
        self.node_name = node_name
        self.new_session = new_session  # its own process group, as a terminal gives it
        self.proc: subprocess.Popen[str] | None = None
        self.bind: str | None = None  # the peer address it bound, from its ready line
        self.amqp: str | None = None  # its AMQP address (HOST:PORT), from its ready line
        self.stderr_path = self.data_dir.parent / f"{self.data_dir.name}-meshqd.log"
        self._stderr: IO[Any] | None = None

    def command(self) -> list[str]:
        bind = [] if any(a.startswith("--bind") for a in self.args) else [
            "--bind", "127.0.0.1:0"]  # a free port: tests run many daemons side by side
        if not any(a.startswith("--amqp-bind") for a in self.args):
            bind += ["--amqp-bind", "127.0.0.1:0"]
        return [sys.executable, "-m", "meshq.daemon", "--data-dir", str(self.data_dir),
                "--socket", str(self.socket), "--node-name", self.node_name, *bind,
                *self.args]

    def start(self, timeout: float = 30.0) -> DaemonProcess:
        env = dict(os.environ if self.env is None else self.env)
        env.setdefault("PYTHONUNBUFFERED", "1")
        self._stderr = open(self.stderr_path, "a")  # noqa: SIM115 - closed in _reap
        self.proc = subprocess.Popen(self.command(), stdout=subprocess.PIPE,
                                     stderr=self._stderr, stdin=subprocess.DEVNULL, text=True,
                                     env=env, start_new_session=self.new_session)
        assert self.proc.stdout is not None
        sel = selectors.DefaultSelector()
        sel.register(self.proc.stdout, selectors.EVENT_READ)
        deadline = time.monotonic() + timeout
        try:
            while True:
                left = deadline - time.monotonic()
                if left <= 0 or not sel.select(left):
                    self.kill()
                    raise TimeoutError(f"meshqd not ready within {timeout} s; "
                                       f"log: {self.log_tail()}")
                line = self.proc.stdout.readline()
                if not line:
                    code = self.proc.wait()
                    self._reap()
                    raise RuntimeError(f"meshqd exited with {code} before it was ready; "
                                       f"log: {self.log_tail()}")
                if line.startswith(READY_PREFIX):
                    fields = dict(f.split("=", 1) for f in line.split()[2:] if "=" in f)
                    self.bind = fields.get("bind")
                    self.amqp = fields.get("amqp")
                    return self
        finally:
            sel.close()

    def log_tail(self, n: int = 2000) -> str:
        try:
            return self.stderr_path.read_text()[-n:]
        except OSError:
            return ""

    def client(self, **kw: Any) -> Client:
        return Client(self.socket, **kw)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def kill(self) -> None:
        """SIGKILL: the daemon gets no chance to clean up. Its store's writer process
        finishes the commit it is in and exits (as after a real crash); this returns once
        it has, so that the data directory is quiet (a test may wipe it)."""
        if self.proc is not None and self.proc.poll() is None:
            children = _children(self.proc.pid)
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()
            for pid in children:
                _wait_gone(pid, 30.0)
        self._reap()

    def stop(self, timeout: float = 15.0) -> int:
        """SIGTERM and wait; returns the exit status."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
                raise
        code = self.proc.returncode
        self._reap()
        return code

    def restart(self) -> DaemonProcess:
        if self.proc is not None and self.proc.poll() is None:
            self.stop()
        return self.start()

    def _reap(self) -> None:
        if self.proc is not None and self.proc.stdout is not None:
            self.proc.stdout.close()
        if self._stderr is not None:
            self._stderr.close()
            self._stderr = None

    def __enter__(self) -> DaemonProcess:
        return self.start() if self.proc is None else self

    def __exit__(self, *exc: object) -> None:
        self.kill()


def _children(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` now (Linux /proc; empty elsewhere)."""
    out: list[int] = []
    try:
        entries = os.listdir("/proc")
    except OSError:
        return out
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2:].split()  # after "pid (comm) "
        if len(fields) > 1 and fields[1] == str(pid):
            out.append(int(entry))
    return out


def _wait_gone(pid: int, timeout: float) -> None:
    """Until process ``pid`` (not our child: no waitpid) has exited, at most ``timeout``
    seconds: a pidfd becomes readable when it does."""
    try:
        fd = os.pidfd_open(pid)
    except (OSError, AttributeError):  # gone already, or no pidfd here
        return
    try:
        select.select([fd], [], [], timeout)
    finally:
        os.close(fd)
