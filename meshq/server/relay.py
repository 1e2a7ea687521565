"""Upstream: one client connection's peer stream to the node that dispatches its queue.

A client talks to its local meshqd only; an op on a partition another node dispatches
goes there over a peer stream opened for this client connection (hello kind ``client``,
carrying the client's lease holder ``node/boot``), where a relayed ClientSession serves
it as if local. Requests carry ids of this upstream's own (a client's id may be any
msgpack value, and one client request may be retried on another upstream); answers and
pushes come back to the ClientSession, which owns the client's view.

State here: the outgoing frames, the requests waiting for an answer, whether the stream
is up. Never: a request left unanswered when the stream ends (its callback learns whether
the request had been written, so the caller knows if the outcome is unknown).
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Callable
from typing import Any

import trio

from meshq.errors import MeshqError, Unavailable
from meshq.mesh.transport import FramedStream, Transport, next_frames
from meshq.mesh.wire import check_hello, hello_frame
from meshq.protocol.codec import DEFAULT_MAX_FRAME

__all__ = ["CONNECT_TIMEOUT", "OnReply", "Upstream"]

log = logging.getLogger("meshq.server.relay")
CONNECT_TIMEOUT = 2.0
# on_reply(frame, sent): the answer frame, or None when the stream ended first; ``sent``
# tells whether the request had been written to the stream (then its outcome is unknown).
OnReply = Callable[[dict[str, Any] | None, bool], None]


class Upstream:
    def __init__(self, node: str, *, me: str, cluster: str, holder: str, transport: Transport,
                 address: Callable[[str], str | None],
                 on_push: Callable[[Upstream, dict[str, Any]], None],
                 on_close: Callable[[Upstream], None]) -> None:
        self.node = node
        self.me = me
        self.cluster = cluster
        self.holder = holder
        self.transport = transport
        self.address = address
        self.on_push = on_push
        self.on_close = on_close
        self.closed = False
        # Queue -> the incarnation whose declaration a request on this stream carried.
        self.declared: dict[str, int] = {}
        self._ids = itertools.count(1)
        self._waiting: dict[int, OnReply] = {}
        self._written: set[int] = set()
        self._out_send, self._out_recv = trio.open_memory_channel[dict[str, Any]](math.inf)

    def request(self, frame: dict[str, Any], on_reply: OnReply) -> None:
        if self.closed:
            on_reply(None, False)
            return
        rid = next(self._ids)
        self._waiting[rid] = on_reply
        self._out_send.send_nowait({**frame, "id": rid})

    def finish(self) -> None:
        """The client went away: say ``bye`` (the other side releases its leases) and end
        once it is written."""
        if not self.closed:
            self._out_send.send_nowait({"op": "_bye"})

    async def run(self) -> None:
        """Connect, then relay until the stream ends, ``finish`` is done, or cancelled.
        Runs in a node-wide nursery, so that a ``bye`` goes out after the client left."""
        try:
            addr = self.address(self.node)
            if addr is None:
                raise Unavailable(f"node {self.node!r} is unknown")
            raw = await self.transport.open_stream(addr, CONNECT_TIMEOUT)
            stream = FramedStream(raw, max_frame=DEFAULT_MAX_FRAME)
            try:
                hello = hello_frame(self.cluster, self.me)
                hello["kind"] = "client"
                hello["holder"] = self.holder
                await stream.send(hello)
                with trio.fail_after(CONNECT_TIMEOUT * 2):
                    answer = await stream.receive()
                if answer is None:
                    raise Unavailable(f"node {self.node!r} refused the relay")
                check_hello(answer, self.cluster)
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._reader, stream, nursery.cancel_scope)
                    await self._writer(stream)  # returns once ``bye`` is written
                    nursery.cancel_scope.cancel()
            finally:
                await trio.aclose_forcefully(raw)
        except* (OSError, MeshqError, trio.BrokenResourceError, trio.ClosedResourceError,
                 trio.TooSlowError) as group:
            log.info("relay to %s ended: %s", self.node, group.exceptions[0])
        finally:
            self.close()

    async def _reader(self, stream: FramedStream, scope: trio.CancelScope) -> None:
        while (frame := await stream.receive()) is not None:
            self._from_upstream(frame)
        scope.cancel()

    async def _writer(self, stream: FramedStream) -> None:
        while True:
            try:
                frames = await next_frames(self._out_recv)
            except trio.EndOfChannel:
                return
            for i, frame in enumerate(frames):  # from now on they may reach the primary
                rid = frame.get("id")
                if isinstance(rid, int):
                    self._written.add(rid)
                if frame.get("op") == "_bye":
                    del frames[i + 1:]  # nothing goes after it
                    break
            await stream.send_many(frames)
            if frames[-1].get("op") == "_bye":
                return

    def _from_upstream(self, frame: dict[str, Any]) -> None:
        if "push" in frame:
            self.on_push(self, frame)
            return
        rid = frame.get("id")
        fn = self._waiting.pop(rid, None) if isinstance(rid, int) else None
        self._written.discard(rid)
        if fn is not None:
            fn(frame, True)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self._out_send.close()
        waiting, self._waiting = self._waiting, {}
        for rid, fn in waiting.items():
            fn(None, rid in self._written)
        self._written.clear()
        self.on_close(self)
