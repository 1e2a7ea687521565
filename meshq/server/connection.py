"""One client connection: frames in, requests to the op table, responses and pushes out.

State here: the frame decoder, the outgoing buffer, and the broker Session (consumers and
leases of this connection). Never: a response written before its Pending is durable; an
unexpected exception that escapes and takes other connections down; a request read while
the outgoing buffer is over its high-water mark (so a client that never reads is bounded).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable
from typing import TYPE_CHECKING, Any

import trio

from meshq.broker import Broker, Pending, Session
from meshq.errors import MeshqError, ProtocolError
from meshq.model import Message
from meshq.protocol.codec import HEADER, FrameDecoder, pack_payload
from meshq.server.ops import OPS, delivery
from meshq.store import StoreError

if TYPE_CHECKING:
    from meshq.node import Node

__all__ = ["Connection"]

log = logging.getLogger("meshq.server")
_pack = pack_payload
HIGH_WATER = 4 * 1024 * 1024
FINAL_WRITE_TIMEOUT = 1.0


class Connection:
    def __init__(self, stream: trio.abc.Stream, node: Node, max_frame: int) -> None:
        self.stream = stream
        self.node = node
        self.broker: Broker = node.broker
        self.store = node.store
        self.max_frame = max_frame
        self.session = Session(self._push, self._cancelled)
        self._out = bytearray()
        self._out_ready = trio.Event()
        self._drained = trio.Event()
        self._nursery: trio.Nursery | None = None
        self._writing = False
        self._gone = trio.Event()

    # -- outgoing --------------------------------------------------------------------
    def _write(self, frame: dict[str, Any]) -> None:
        payload = _pack(frame)
        out = self._out
        out += HEADER.pack(len(payload))
        out += payload
        self._out_ready.set()

    def _respond(self, rid: Any, result: dict[str, Any]) -> None:
        self._write({"id": rid, "result": result})

    def _error(self, rid: Any, exc: MeshqError) -> None:
        self._write({"id": rid, "error": {"code": exc.code, "message": exc.message}})

    def _push(self, tag: str, msgs: list[Message]) -> None:
        self._write({"push": "deliver", "consumer": tag, "messages": [delivery(m) for m in msgs]})

    def _cancelled(self, tag: str) -> None:
        self._write({"push": "cancel", "consumer": tag, "reason": "queue deleted"})

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
        if handler is None:
            self._error(rid, ProtocolError(f"unknown op {op!r}"))
            return
        try:
            result = handler(self, req)
        except MeshqError as exc:
            self._error(rid, exc)
            return
        except Exception:
            log.exception("op %s failed", op)
            self._error(rid, MeshqError("internal error; see the daemon's log"))
            return
        if isinstance(result, Pending):
            result.then(functools.partial(self._finish, rid))
        elif isinstance(result, dict):
            self._respond(rid, result)
        else:
            assert self._nursery is not None
            self._nursery.start_soon(self._await, rid, result)

    def _finish(self, rid: Any, value: Any, err: BaseException | None) -> None:
        if err is None:
            self._respond(rid, value)
        elif isinstance(err, MeshqError):
            self._error(rid, err)
        else:  # the commit failed and was rolled back: nothing was written
            self._error(rid, StoreError(f"commit failed: {err}"))

    async def _await(self, rid: Any, work: Awaitable[dict[str, Any]]) -> None:
        try:
            self._respond(rid, await work)
        except MeshqError as exc:
            self._error(rid, exc)
        except Exception:
            log.exception("request %r failed", rid)
            self._error(rid, MeshqError("internal error; see the daemon's log"))

    async def _reader(self) -> None:
        decoder = FrameDecoder(self.max_frame)
        try:
            while True:
                if len(self._out) > HIGH_WATER:
                    self._drained = trio.Event()
                    await self._drained.wait()
                    continue
                data = await self.stream.receive_some(65536)
                if not data:
                    return
                decoder.feed(data)
                try:
                    while (frame := decoder.next_frame()) is not None:
                        self._handle(frame)
                except ProtocolError as exc:
                    # Answer, then close: the stream cannot be resynchronised.
                    self._error(None, exc)
                    with trio.move_on_after(FINAL_WRITE_TIMEOUT):
                        await self.drain()
                    return
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return

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
                    nursery.cancel_scope.cancel()
        finally:
            self.broker.close_session(self.session)
            with trio.CancelScope(shield=True):
                await trio.aclose_forcefully(self.stream)
