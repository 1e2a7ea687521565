"""The Unix-socket listener: accepts clients and runs one Connection task per client.

State here: the listening socket and the set of live connections. Never: a second daemon
started on a socket that a live daemon answers on (a stale socket file is replaced), nor a
socket file more open than ``socket_mode``, not even while it is being set up.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import os
import socket as _socket
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from meshq.errors import StartupError
from meshq.mesh.accept import serve_accepted
from meshq.protocol.codec import encode_frame
from meshq.server.access import AccessConfigError, resolve_group
from meshq.server.connection import Connection

if TYPE_CHECKING:
    from meshq.node import Node

__all__ = ["ServerStatistics", "SocketInUse", "UnixServer"]

log = logging.getLogger("meshq.server")
REFUSE_TIMEOUT = 0.5  # for the "too many connections" frame to go out
REFUSE_LINGER = 0.05  # then read what the refused client sends for this long,
REFUSE_DRAIN_BYTES = 64 * 1024  # up to this much, before closing
MAX_REFUSING = 1024  # refusals in flight; beyond that, over-limit connections just close
REFUSAL_LOG_INTERVAL = 10.0  # seconds between two "refused" warnings


class SocketInUse(StartupError):
    pass


def _prepare_dir(path: Path, gid: int | None) -> bool:
    """Make the socket's directory; True when a socket file is already there. A directory
    made here is 0700, or 0750 and given to ``gid`` (socket_group), so that the group can
    reach the socket; an existing one is left as it is (systemd's RuntimeDirectory)."""
    if not path.parent.exists():
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        if gid is not None:
            os.chown(path.parent, -1, gid)
            os.chmod(path.parent, 0o750)
    return path.exists() or path.is_symlink()


async def _prepare(path: Path, gid: int | None = None) -> None:
    if not await trio.to_thread.run_sync(_prepare_dir, path, gid):
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


def _bind(path: Path, mode: int, gid: int | None, group: str | None) -> _socket.socket:
    """A listening socket at ``path``: bound under umask 0o177 (never more open than 0600,
    not even for an instant), given to ``gid``, then set to ``mode``. No await in here:
    no other task runs while the process-wide umask is narrowed."""
    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    bound = False
    try:
        old = os.umask(0o177)
        try:
            sock.bind(os.fspath(path))
            bound = True
        except OSError as exc:
            raise StartupError(f"cannot listen on the socket {path}: "
                               f"{exc.strerror or exc}") from None
        finally:
            os.umask(old)
        try:
            if gid is not None:  # before the chmod: the group gets access only once it is right
                os.chown(path, -1, gid)
            os.chmod(path, mode)
        except OSError as exc:
            what = f"give it to group {group!r}" if gid is not None else f"set mode {mode:#o}"
            raise StartupError(f"cannot {what} on the socket {path}: "
                               f"{exc.strerror or exc}") from None
        sock.listen(512)
    except BaseException:
        sock.close()
        if bound:
            path.unlink(missing_ok=True)
        raise
    return sock


@dataclasses.dataclass(frozen=True)
class ServerStatistics:
    """The client socket's counters (``status`` section ``server``)."""

    connections: int  # open now
    accepted: int  # since start, within max_connections
    refused_over_limit: int  # closed at once (after an UNAVAILABLE frame): max_connections
    frame_timeouts: int  # closed: a frame begun and not finished in client_frame_timeout
    oversize_frames: int  # closed: a frame length above max_frame_bytes


class UnixServer:
    def __init__(self, node: Node, path: Path, max_frame: int, max_connections: int, *,
                 mode: int = 0o660, group: str | None = None,
                 frame_timeout: float | None = None,
                 max_inflight: int | None = None) -> None:
        self.node = node
        self.path = path
        self.mode = mode  # socket file mode (config socket_mode)
        self.group = group  # socket file group, a name or a numeric gid (socket_group)
        self.max_frame = max_frame
        self.max_connections = max_connections
        self.connections: set[Connection] = set()
        self._listener: trio.SocketListener | None = None
        self.accepted = 0
        self.frame_timeout = frame_timeout  # config client_frame_timeout
        self.max_inflight = max_inflight  # config max_inflight_requests, per connection
        self.refused_over_limit = 0
        self.frame_timeouts = 0
        self.oversize_frames = 0
        self._open = 0  # connections accepted and not yet closed (some not yet identified)
        self._refusing = 0
        self._refusal_logged = float("-inf")

    def statistics(self) -> ServerStatistics:
        return ServerStatistics(len(self.connections), self.accepted, self.refused_over_limit,
                                self.frame_timeouts, self.oversize_frames)

    async def bind(self) -> None:
        """Take over the socket path and listen; SocketInUse if a live daemon has it,
        StartupError if its group is unknown or cannot be given to it."""
        gid = None
        if self.group is not None:
            try:
                gid = await trio.to_thread.run_sync(resolve_group, self.group)
            except AccessConfigError as exc:
                raise AccessConfigError(f"socket_group: {exc}") from None
        try:
            await _prepare(self.path, gid)
        except (PermissionError, NotADirectoryError, FileExistsError) as exc:
            raise StartupError(f"cannot prepare the socket directory {self.path.parent}: "
                               f"{exc.strerror or exc}") from None
        sock = _bind(self.path, self.mode, gid, self.group)
        self._listener = trio.SocketListener(trio.socket.from_stdlib_socket(sock))

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Accept clients (after ``bind``) until cancelled or ``stop_accepting``."""
        if self._listener is None:
            await self.bind()
        assert self._listener is not None
        try:
            await serve_accepted(self._listener.accept, self._accepted, what="client socket",
                                 task_status=task_status)
        finally:
            try:
                self.path.unlink()
            except OSError:
                pass

    def _accepted(self, nursery: trio.Nursery, stream: trio.SocketStream) -> None:
        if self._open >= self.max_connections:
            self._refuse(nursery, stream)
            return
        self.accepted += 1
        self._open += 1
        nursery.start_soon(self._serve_counted, stream)

    def _refuse(self, nursery: trio.Nursery, stream: trio.SocketStream) -> None:
        """Over max_connections: one UNAVAILABLE frame, then close, in a task of its own
        so that a client that does not read cannot hold up the accept loop."""
        self.refused_over_limit += 1
        now = trio.current_time()
        if now - self._refusal_logged >= REFUSAL_LOG_INTERVAL:
            self._refusal_logged = now
            log.warning("refusing connections: max_connections=%d reached (%d refused "
                        "since start)", self.max_connections, self.refused_over_limit)
        if self._refusing >= MAX_REFUSING:
            stream.socket.close()
            return
        self._refusing += 1
        nursery.start_soon(self._send_refusal, stream)

    async def _send_refusal(self, stream: trio.SocketStream) -> None:
        frame = encode_frame({"id": None, "error": {
            "code": "UNAVAILABLE",
            "message": f"too many connections (max_connections={self.max_connections})"}})
        try:
            with trio.move_on_after(REFUSE_TIMEOUT):
                await stream.send_all(frame)
            # Read (and drop) what the client sends meanwhile: a close with unread bytes
            # is a reset, which can destroy the frame before the client has read it.
            drained = 0
            with trio.move_on_after(REFUSE_LINGER):
                while drained < REFUSE_DRAIN_BYTES and (data := await stream.receive_some()):
                    drained += len(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            self._refusing -= 1
            await trio.aclose_forcefully(stream)

    async def _serve_counted(self, stream: trio.SocketStream) -> None:
        try:
            await self._serve_one(stream)
        finally:
            self._open -= 1

    async def _serve_one(self, stream: trio.SocketStream) -> None:
        try:
            creds = await self.node.access.identify(stream.socket)  # SO_PEERCRED (+ groups)
        except BaseException:
            await trio.aclose_forcefully(stream)
            raise
        conn = Connection(stream, self.node, self.max_frame, creds=creds,
                          frame_timeout=self.frame_timeout, max_inflight=self.max_inflight)
        self.connections.add(conn)
        try:
            await conn.serve()
        finally:
            self.connections.discard(conn)
            self.frame_timeouts += conn.frame_timed_out
            self.oversize_frames += conn.oversize_frame

    async def stop_accepting(self) -> None:
        if self._listener is not None:
            await self._listener.aclose()

    async def drain(self) -> None:
        """Wait until every connection's pending responses have been written."""
        for conn in list(self.connections):
            await conn.drain()
