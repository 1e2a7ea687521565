"""The Unix-socket listener: accepts clients and runs one Connection task per client.

State here: the listening socket and the set of live connections. Never: a second daemon
started on a socket that a live daemon answers on (a stale socket file is replaced).
"""

from __future__ import annotations

import errno
import logging
import os
import socket as _socket
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from meshq.errors import StartupError
from meshq.server.connection import Connection

if TYPE_CHECKING:
    from meshq.node import Node

__all__ = ["SocketInUse", "UnixServer"]

log = logging.getLogger("meshq.server")


class SocketInUse(StartupError):
    pass


def _prepare_dir(path: Path) -> bool:
    """Make the socket's directory; True when a socket file is already there."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    return path.exists() or path.is_symlink()


async def _prepare(path: Path) -> None:
    if not await trio.to_thread.run_sync(_prepare_dir, path):
        return
    probe = trio.socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    try:
        await probe.connect(os.fspath(path))
    except OSError as exc:
        if exc.errno not in (errno.ECONNREFUSED, errno.ENOENT, errno.ENOTSOCK):
            raise
        await trio.to_thread.run_sync(path.unlink)  # stale: nobody listens
    else:
        raise SocketInUse(f"another meshqd is already listening on {path}")
    finally:
        probe.close()


class UnixServer:
    def __init__(self, node: Node, path: Path, max_frame: int, max_connections: int) -> None:
        self.node = node
        self.path = path
        self.max_frame = max_frame
        self.max_connections = max_connections
        self.connections: set[Connection] = set()
        self._listener: trio.SocketListener | None = None
        self.accepted = 0

    async def bind(self) -> None:
        """Take over the socket path and listen; SocketInUse if a live daemon has it."""
        await _prepare(self.path)
        sock = trio.socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
        await sock.bind(os.fspath(self.path))
        os.chmod(self.path, 0o660)
        sock.listen(512)
        self._listener = trio.SocketListener(sock)

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Accept clients (after ``bind``) until cancelled or ``stop_accepting``."""
        if self._listener is None:
            await self.bind()
        assert self._listener is not None
        try:
            async with trio.open_nursery() as nursery:
                task_status.started()
                while True:
                    try:
                        stream = await self._listener.accept()
                    except trio.ClosedResourceError:
                        return
                    except OSError as exc:  # EMFILE and friends: back off, keep serving
                        log.warning("accept failed: %s", exc)
                        await trio.sleep(0.1)
                        continue
                    if len(self.connections) >= self.max_connections:
                        await trio.aclose_forcefully(stream)
                        continue
                    self.accepted += 1
                    nursery.start_soon(self._serve_one, stream)
        finally:
            try:
                self.path.unlink()
            except OSError:
                pass

    async def _serve_one(self, stream: trio.SocketStream) -> None:
        conn = Connection(stream, self.node, self.max_frame)
        self.connections.add(conn)
        try:
            await conn.serve()
        finally:
            self.connections.discard(conn)

    async def stop_accepting(self) -> None:
        if self._listener is not None:
            await self._listener.aclose()

    async def drain(self) -> None:
        """Wait until every connection's pending responses have been written."""
        for conn in list(self.connections):
            await conn.drain()
