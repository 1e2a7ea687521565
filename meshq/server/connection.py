"""One client connection: frames in, requests to its ClientSession, responses and pushes out.

State here: the frame decoder, the outgoing buffer, and the back-pressure counters; where
each op is served is the ClientSession's business (meshq.server.session). Never: an
unexpected exception that escapes and takes other connections down; a request read while
the outgoing buffer is over its high-water mark (so a client that never reads is bounded).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import trio

from meshq.broker import Broker
from meshq.errors import BadRequest, FrameTooLarge, MeshqError, ProtocolError, Unauthorized
from meshq.metrics import request_timer
from meshq.protocol.codec import HEADER, FrameDecoder, pack_payload
from meshq.server.access import UNKNOWN, PeerCreds
from meshq.server.ops import OPS, RELAYED_OPS
from meshq.server.session import ClientSession

if TYPE_CHECKING:
    from meshq.node import Node

__all__ = ["Connection"]

log = logging.getLogger("meshq.server")
_pack = pack_payload
HIGH_WATER = 4 * 1024 * 1024
FINAL_WRITE_TIMEOUT = 1.0


def _read_now(stream: trio.abc.Stream) -> bytes | None:
    """What the kernel already holds for a Unix-socket client, without waiting: a client
    whose bytes came while this loop was busy did finish in time. None: nothing there."""
    sock = getattr(stream, "socket", None)
    if sock is None:
        return None
    try:
        return os.read(sock.fileno(), 65536)  # trio sockets are non-blocking
    except (BlockingIOError, InterruptedError):
        return None
    except OSError:
        return b""  # reset: the reader treats it as gone


class Connection:
    def __init__(self, stream: trio.abc.Stream, node: Node, max_frame: int, *,
                 relayed_holder: str | None = None, creds: PeerCreds = UNKNOWN,
                 frame_timeout: float | None = None, max_inflight: int | None = None) -> None:
        self.stream = stream
        # Seconds a client may take to finish a frame it has begun (None: no limit), and
        # why the reader closed the connection, for UnixServer's counters.
        self.frame_timeout = frame_timeout
        # Requests read and not yet answered, and how many may be (None: no limit): past
        # it the reader waits, so a client pipelining without end is bounded.
        self.max_inflight = max_inflight
        self._inflight = 0
        self._room = trio.Event()
        self.frame_timed_out = False
        self.oversize_frame = False
        self.creds = creds  # the peer process (SO_PEERCRED), judged by node.access
        self.node = node
        self.broker: Broker = node.broker
        self.store = node.store
        self.max_frame = max_frame
        self.session = ClientSession(node, self, relayed_holder=relayed_holder)
        self._out = bytearray()
        self._out_ready = trio.Event()
        self._drained = trio.Event()
        self._nursery: trio.Nursery | None = None
        self._writing = False
        self._gone = trio.Event()
        self.relayed = relayed_holder is not None  # another node's client (relay.py)
        self._timer = request_timer(node)  # request latency per op (meshq.metrics)

    # -- outgoing --------------------------------------------------------------------
    def _answered(self) -> None:
        if self._inflight:
            self._inflight -= 1
            if self.max_inflight is not None and self._inflight < self.max_inflight:
                self._room.set()

    def _write(self, frame: dict[str, Any]) -> None:
        payload = _pack(frame)
        out = self._out
        out += HEADER.pack(len(payload))
        out += payload
        self._out_ready.set()
        if "push" not in frame:
            self._timer.done(frame.get("id"))  # a response is ready
            self._answered()

    def _respond(self, rid: Any, result: dict[str, Any]) -> None:
        self._write({"id": rid, "result": result})

    def _error(self, rid: Any, exc: MeshqError) -> None:
        self._write({"id": rid, "error": {"code": exc.code, "message": exc.message}})

    async def _writer(self) -> None:
        try:
            while True:
                await self._out_ready.wait()
                self._out_ready = trio.Event()
                while self._out:
                    data, self._out = bytes(self._out), bytearray()
                    self._writing = True
                    try:
                        await self.stream.send_all(data)
                    finally:
                        self._writing = False
                self._drained.set()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self._out.clear()  # nobody will read it
            self._drained.set()
            self._gone.set()  # the client went away: stop reading too

    async def drain(self) -> None:
        """Wait until everything buffered has been written."""
        while self._out or self._writing:
            self._drained = trio.Event()
            await self._drained.wait()

    # -- incoming --------------------------------------------------------------------
    def _handle(self, req: dict[str, Any]) -> None:
        self.store.seal_if_full()  # between two requests: a safe place to cut a batch
        rid = req.get("id")
        op = req.get("op")
        handler = OPS.get(op) if isinstance(op, str) else None
        if not self.relayed and isinstance(op, str) and op.startswith("_"):
            handler = None  # between nodes only
        if self.relayed and op == "_bye":  # the client's node: its client is gone
            self.session.graceful = True
            self._answered()
            return
        if handler is None:
            self._error(rid, ProtocolError(f"unknown op {op!r}"))
            return
        if self.relayed:  # checked by the client's own node; only what relay.py sends
            if op not in RELAYED_OPS:
                self._error(rid, BadRequest(f"op {op!r} is not relayed between nodes"))
                return
        else:
            try:
                self.node.access.check(str(op), self.creds)
                if op == "receive" and req.get("auto_ack") is True:
                    self.node.access.check("ack", self.creds)  # it acks too
            except Unauthorized as exc:
                self._error(rid, exc)
                return
        self._timer.start(rid, op)
        self.session.handle(rid, str(op), req, handler)

    # Out, for the session
    def respond(self, rid: Any, result: dict[str, Any]) -> None:
        self._respond(rid, result)

    def error(self, rid: Any, exc: MeshqError) -> None:
        self._error(rid, exc)

    def push(self, frame: dict[str, Any]) -> None:
        self._write(frame)

    def spawn(self, fn: Callable[..., Awaitable[Any]], *args: Any) -> None:
        """Run ``fn`` for this connection; nothing once it has ended (a relay's answer
        that comes in while the connection closes has no one to go to)."""
        if self._nursery is not None:
            self._nursery.start_soon(fn, *args)

    async def _reader(self) -> None:
        decoder = FrameDecoder(self.max_frame)
        begun: float | None = None  # when the first bytes of the unfinished frame came
        try:
            while True:
                if len(self._out) > HIGH_WATER:
                    self._drained = trio.Event()
                    await self._drained.wait()
                    if begun is not None:  # our pause, not the client's stall: restart
                        begun = trio.current_time()
                    continue
                if begun is None or self.frame_timeout is None:
                    data = await self.stream.receive_some(65536)
                else:
                    data = None
                    with trio.move_on_at(begun + self.frame_timeout):
                        data = await self.stream.receive_some(65536)
                    if data is None:  # bytes already here are not the client's fault
                        data = _read_now(self.stream)
                    if data is None:
                        self.frame_timed_out = True
                        await self._fail(ProtocolError(
                            f"frame not finished within client_frame_timeout "
                            f"({self.frame_timeout:g} s)"))
                        return
                if not data:
                    return
                decoder.feed(data)
                finished = waited = False
                try:
                    while True:
                        if self.max_inflight is not None and \
                                self._inflight >= self.max_inflight:
                            self._room = trio.Event()
                            await self._room.wait()  # answers first, then more requests
                            waited = True
                        if (frame := decoder.next_frame()) is None:
                            break
                        finished = True
                        self._handle_safely(frame)
                except ProtocolError as exc:
                    self.oversize_frame = isinstance(exc, FrameTooLarge)
                    await self._fail(exc)
                    return
                finally:
                    self.store.ship_now()
                if not decoder.pending():
                    begun = None
                elif begun is None or finished or waited:  # a new frame, or our pause
                    begun = trio.current_time()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return

    def _handle_safely(self, req: dict[str, Any]) -> None:
        """``_handle``; an exception it lets out fails this request only (not the daemon)."""
        self._inflight += 1
        try:
            self._handle(req)
        except MeshqError as exc:
            self._error(req.get("id"), exc)
        except Exception:
            log.exception("request %.80r failed", req.get("id"))
            self._error(req.get("id"), MeshqError("internal error; see the daemon's log"))

    async def _fail(self, exc: ProtocolError) -> None:
        """Answer with ``exc``, then let the caller close: the stream cannot be
        resynchronised. Waits at most FINAL_WRITE_TIMEOUT for the client to read."""
        self._error(None, exc)
        with trio.move_on_after(FINAL_WRITE_TIMEOUT):
            await self.drain()

    async def _watch_gone(self, cancel_scope: trio.CancelScope) -> None:
        await self._gone.wait()
        cancel_scope.cancel()

    async def serve(self) -> None:
        """Run until the client goes away or the server shuts down."""
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._writer)
                nursery.start_soon(self._watch_gone, nursery.cancel_scope)
                try:
                    await self._reader()
                finally:
                    self._nursery = None  # (closed to new tasks from here)
                    nursery.cancel_scope.cancel()
        finally:
            self.session.close()
            with trio.CancelScope(shield=True):
                await trio.aclose_forcefully(self.stream)
