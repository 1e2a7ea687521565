"""AsyncClient: the trio client. Requests are pipelined on one connection; any number of
tasks may call it at once. State here: pending requests by id and the channels of active
subscriptions. Never: a request left waiting after the connection died (it gets Timeout).
"""

from __future__ import annotations

import itertools
import os
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from typing import Any

import trio

from meshq.client._common import Delivery, check_failed, message_fields, result_of
from meshq.config import resolve_socket
from meshq.errors import ProtocolError, Timeout, Unavailable
from meshq.protocol.codec import FrameDecoder, encode_frame

__all__ = ["AsyncClient", "AsyncSubscription"]


class _Waiter:
    __slots__ = ("event", "frame")

    def __init__(self) -> None:
        self.event = trio.Event()
        self.frame: dict[str, Any] | None = None


class AsyncSubscription:
    """Deliveries pushed for one consumer; iterate with ``async for``."""

    def __init__(self, client: AsyncClient, queue: str, tag: str,
                 receive: trio.MemoryReceiveChannel[Delivery | None]) -> None:
        self.client, self.queue, self.tag = client, queue, tag
        self._receive = receive

    def __aiter__(self) -> AsyncSubscription:
        return self

    async def __anext__(self) -> Delivery:
        try:
            item = await self._receive.receive()
        except trio.EndOfChannel:
            raise StopAsyncIteration from None
        if item is None:  # cancelled by the daemon (queue deleted)
            raise StopAsyncIteration
        return item

    async def ack(self, delivery: Delivery | str) -> None:
        mid = delivery.id if isinstance(delivery, Delivery) else delivery
        await self.client.ack(self.queue, [mid])


class AsyncClient:
    """``async with AsyncClient() as c:`` connects to the local meshqd."""

    def __init__(self, socket: str | os.PathLike[str] | None = None, *,
                 max_frame: int = 8 * 1024 * 1024) -> None:
        self.path = resolve_socket(os.fspath(socket) if socket is not None else None)
        self._ids = itertools.count(1)
        self._waiters: dict[int, _Waiter] = {}
        self._subs: dict[str, trio.MemorySendChannel[Delivery | None]] = {}
        self._early: dict[str, list[Delivery]] = {}
        self._out = bytearray()
        self._out_ready = trio.Event()
        self._stream: trio.SocketStream | None = None
        self._nursery_cm: Any = None
        self._max_frame = max_frame
        self._dead: str | None = None
        self._farewell: dict[str, Any] | None = None  # an error for no request, then EOF

    async def __aenter__(self) -> AsyncClient:
        try:
            self._stream = await trio.open_unix_socket(os.fspath(self.path))
        except OSError as exc:
            raise Unavailable(f"cannot reach meshqd at {self.path}: {exc.strerror}") from None
        self._nursery_cm = trio.open_nursery()
        nursery = await self._nursery_cm.__aenter__()
        nursery.start_soon(self._reader)
        nursery.start_soon(self._writer)
        self._nursery = nursery
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._nursery.cancel_scope.cancel()
        try:
            await self._nursery_cm.__aexit__(None, None, None)
        finally:
            await self.aclose()

    async def aclose(self) -> None:
        self._fail("connection closed")
        if self._stream is not None:
            await trio.aclose_forcefully(self._stream)

    def _fail(self, why: str) -> None:
        if self._dead is None:
            self._dead = why
        for w in self._waiters.values():
            w.event.set()
        for ch in self._subs.values():
            ch.close()

    async def _writer(self) -> None:
        assert self._stream is not None
        try:
            while True:
                await self._out_ready.wait()
                self._out_ready = trio.Event()
                while self._out:
                    data, self._out = bytes(self._out), bytearray()
                    await self._stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self._fail("connection lost")

    async def _reader(self) -> None:
        assert self._stream is not None
        decoder = FrameDecoder(self._max_frame)
        try:
            while True:
                data = await self._stream.receive_some(65536)
                if not data:
                    break
                decoder.feed(data)
                for frame in decoder.frames():
                    self._dispatch(frame)
        except (trio.BrokenResourceError, trio.ClosedResourceError, ProtocolError):
            pass
        self._fail("connection lost")

    def _dispatch(self, frame: dict[str, Any]) -> None:
        push = frame.get("push")
        if push is None:
            if frame.get("id") is None and "error" in frame:
                self._farewell = frame  # why the daemon is closing the connection
                return
            waiter = self._waiters.pop(frame.get("id"), None)  # type: ignore[arg-type]
            if waiter is not None:
                waiter.frame = frame
                waiter.event.set()
            return
        tag = frame.get("consumer")
        if not isinstance(tag, str):
            return
        ch = self._subs.get(tag)
        if push == "deliver":
            items = [Delivery.from_wire(d, tag) for d in frame.get("messages", [])]
            if ch is None:  # pushed before the consume response reached us
                self._early.setdefault(tag, []).extend(items)
            else:
                for item in items:
                    ch.send_nowait(item)
        elif push == "cancel" and ch is not None:
            ch.send_nowait(None)

    def _enqueue(self, frame: dict[str, Any]) -> None:
        self._out += encode_frame(frame)
        self._out_ready.set()

    async def request(self, op: str, **fields: Any) -> dict[str, Any]:
        """Send one request and wait for its result (raising the daemon's error)."""
        if self._dead is not None:
            raise Unavailable(f"not connected to meshqd: {self._dead}")
        rid = next(self._ids)
        fields["op"], fields["id"] = op, rid
        waiter = _Waiter()
        self._waiters[rid] = waiter
        self._enqueue(fields)
        await waiter.event.wait()
        if waiter.frame is None:
            self._waiters.pop(rid, None)
            if self._farewell is not None:  # it said why: e.g. too many connections
                result_of(self._farewell)
            raise Timeout(f"{op}: connection to meshqd lost; the outcome is unknown")
        return result_of(waiter.frame)

    # -- operations ----------------------------------------------------------------------
    async def ping(self) -> dict[str, Any]:
        return await self.request("ping")

    async def declare(self, queue: str, *, passive: bool = False,
                      **options: Any) -> dict[str, Any]:
        return await self.request("declare", queue=queue, options=options, passive=passive)

    async def send(self, queue: str, body: bytes | str, *, headers: dict[str, Any] | None = None,
                   ttl: float | None = None, delay: float | None = None,
                   dedup_id: str | None = None) -> str:
        """Send one message; returns its id once it is durable."""
        m = message_fields(body, headers, ttl, delay, dedup_id)
        return (await self.request("send", queue=queue, messages=[m]))["ids"][0]

    async def send_batch(self, queue: str, messages: Iterable[bytes | str | dict[str, Any]],
                         ) -> list[str]:
        """Send several messages in one atomic write. Items are bodies or
        ``{"body": ..., "headers": ..., "ttl": ..., "delay": ..., "dedup_id": ...}``."""
        ms = [message_fields(**m) if isinstance(m, dict) else message_fields(m)
              for m in messages]
        return (await self.request("send", queue=queue, messages=ms))["ids"]

    async def receive(self, queue: str, max: int = 1, wait: float = 0.0, *,
                      visibility_timeout: float | None = None,
                      auto_ack: bool = False) -> list[Delivery]:
        fields: dict[str, Any] = {"queue": queue, "max": max, "wait": wait, "auto_ack": auto_ack}
        if visibility_timeout is not None:
            fields["visibility_timeout"] = visibility_timeout
        result = await self.request("receive", **fields)
        return [Delivery.from_wire(d) for d in result["messages"]]

    @asynccontextmanager
    async def consume(self, queue: str, prefetch: int = 100,
                      ) -> AsyncIterator[AsyncSubscription]:
        """Subscribe; deliveries are pushed while fewer than ``prefetch`` are unacked."""
        send, recv = trio.open_memory_channel[Delivery | None](float("inf"))
        tag = (await self.request("consume", queue=queue, prefetch=prefetch))["consumer"]
        self._subs[tag] = send
        for item in self._early.pop(tag, []):
            send.send_nowait(item)
        try:
            yield AsyncSubscription(self, queue, tag, recv)
        finally:
            # Fire and forget: waiting for the answer could hang when the same
            # cancellation has already stopped this client's reader.
            self._subs.pop(tag, None)
            if self._dead is None:
                self._enqueue({"op": "cancel", "consumer": tag, "id": next(self._ids)})

    async def ack(self, queue: str, ids: list[str]) -> list[str]:
        """Ack leased messages; raises PreconditionFailed naming any it could not ack."""
        return check_failed(await self.request("ack", queue=queue, ids=list(ids)), "ack")

    async def nack(self, queue: str, ids: list[str], *, requeue: bool = True,
                   delay: float = 0.0) -> list[str]:
        result = await self.request("nack", queue=queue, ids=list(ids), requeue=requeue,
                                    delay=delay)
        return check_failed(result, "nack")

    async def reject(self, queue: str, ids: list[str]) -> list[str]:
        """Dead-letter leased messages now (dropped and counted when there is no DLQ)."""
        return await self.nack(queue, ids, requeue=False)

    async def extend(self, queue: str, ids: list[str], seconds: float) -> list[str]:
        """Move the lease deadline of leased messages to now + ``seconds``."""
        result = await self.request("extend", queue=queue, ids=list(ids), timeout=seconds)
        return check_failed(result, "extend")

    async def purge(self, queue: str) -> int:
        return (await self.request("purge", queue=queue))["purged"]

    async def delete(self, queue: str) -> int:
        return (await self.request("delete", queue=queue))["deleted"]

    async def stats(self, queue: str | None = None) -> list[dict[str, Any]]:
        fields = {"queue": queue} if queue is not None else {}
        return (await self.request("stats", **fields))["queues"]

    async def status(self) -> dict[str, Any]:
        return await self.request("status")
