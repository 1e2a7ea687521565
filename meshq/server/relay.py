"""Relaying a client's ops on a queue to the node that dispatches it.

A client talks to its local meshqd only. An op on a queue whose primary (first live
replica) is another node goes there over a peer stream opened for this client connection
(hello kind "client"), where a Connection serves it as if the client were local: its
leases and subscriptions belong to that stream and end with it. Responses and pushes come
back unchanged (request ids are the client's own).

State here: one Upstream per (client connection, node): its outgoing frames, the request
ids waiting for an answer, the consumer tags it owns.
Never: a relayed request left unanswered when its upstream breaks (UNAVAILABLE), a
subscription left silent (a cancel push).
"""

from __future__ import annotations

import itertools
import logging
import math
from typing import TYPE_CHECKING, Any

import msgpack
import trio

from meshq.errors import MeshqError, Unavailable
from meshq.mesh.transport import FramedStream
from meshq.mesh.wire import check_hello, hello_frame
from meshq.protocol.codec import DEFAULT_MAX_FRAME

if TYPE_CHECKING:
    from meshq.server.connection import Connection

__all__ = ["Upstream"]

log = logging.getLogger("meshq.server.relay")
CONNECT_TIMEOUT = 2.0
_internal_ids = itertools.count(1)


def _key(rid: Any) -> bytes:
    """A request id as a dict key: ids are any msgpack value, lists and maps included."""
    return msgpack.packb(rid, use_bin_type=True)


class Upstream:
    def __init__(self, conn: Connection, node: str) -> None:
        self.conn = conn
        self.node = node
        self.closed = False
        self.pending: dict[bytes, Any] = {}  # packed id -> id: a client's id may be a list
        self.tags: set[str] = set()
        self._internal: dict[str, list[Any]] = {}
        self._out_send, self._out_recv = trio.open_memory_channel[dict[str, Any]](math.inf)

    def send(self, req: dict[str, Any]) -> None:
        if self.closed:
            self.conn._error(req.get("id"), self._lost())
            return
        rid = req.get("id")
        self.pending[_key(rid)] = rid
        self._out_send.send_nowait(req)

    async def call(self, req: dict[str, Any]) -> dict[str, Any]:
        """An op of our own (not the client's) through this upstream."""
        rid = f"_relay{next(_internal_ids)}"
        box: list[Any] = [trio.Event()]
        self._internal[rid] = box
        self.send({**req, "id": rid})
        await box[0].wait()
        frame = box[1]
        if "error" in frame:
            raise MeshqError(frame["error"].get("message", "relay error"))
        result: dict[str, Any] = frame["result"]
        return result

    def _lost(self) -> Unavailable:
        return Unavailable(f"lost the connection to node {self.node!r}, which dispatches "
                           "this queue; retry")

    async def run(self) -> None:
        repl = self.conn.node.replicator
        try:
            addr = repl.address_of(self.node) if repl is not None else None
            if addr is None:
                raise Unavailable(f"node {self.node!r} is unknown")
            raw = await repl.transport.open_stream(addr, CONNECT_TIMEOUT)  # type: ignore[union-attr]
            stream = FramedStream(raw, max_frame=DEFAULT_MAX_FRAME)
            try:
                hello = hello_frame(repl.cluster, repl.me)  # type: ignore[union-attr]
                hello["kind"] = "client"
                await stream.send(hello)
                with trio.fail_after(CONNECT_TIMEOUT * 2):
                    answer = await stream.receive()
                if answer is None:
                    raise Unavailable(f"node {self.node!r} refused the relay")
                check_hello(answer, repl.cluster)  # type: ignore[union-attr]
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._writer, stream)
                    while (frame := await stream.receive()) is not None:
                        self._from_upstream(frame)
                    nursery.cancel_scope.cancel()
            finally:
                await trio.aclose_forcefully(raw)
        except* (OSError, MeshqError, trio.BrokenResourceError, trio.ClosedResourceError,
                 trio.TooSlowError) as group:
            log.info("relay to %s ended: %s", self.node, group.exceptions[0])
        finally:
            self.close()

    async def _writer(self, stream: FramedStream) -> None:
        async for req in self._out_recv:
            await stream.send(req)

    def _from_upstream(self, frame: dict[str, Any]) -> None:
        if "push" not in frame:
            rid = frame.get("id")
            self.pending.pop(_key(rid), None)
            box = self._internal.pop(rid, None) if isinstance(rid, str) else None
            if box is not None:
                box.append(frame)
                box[0].set()
                return
            result = frame.get("result")
            if isinstance(result, dict) and isinstance(result.get("consumer"), str):
                self.tags.add(result["consumer"])
                self.conn.relayed_tags[result["consumer"]] = self
        elif frame.get("push") == "cancel":
            self.tags.discard(frame.get("consumer"))
            self.conn.relayed_tags.pop(frame.get("consumer"), None)  # type: ignore[arg-type]
        self.conn._write(frame)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.conn.upstreams.get(self.node) is self:
            del self.conn.upstreams[self.node]
        lost = self._lost()
        for rid in self.pending.values():
            box = self._internal.pop(rid, None) if isinstance(rid, str) else None
            if box is not None:
                box.append({"error": {"message": lost.message}})
                box[0].set()
            else:
                self.conn._error(rid, lost)
        self.pending.clear()
        for tag in self.tags:
            self.conn.relayed_tags.pop(tag, None)
            self.conn._cancelled(tag, f"lost node {self.node!r}, which dispatched the queue; "
                                      "subscribe again")
        self.tags.clear()
