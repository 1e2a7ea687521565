"""AsyncClient: the trio client. Requests are pipelined on one connection; any number of
tasks may call it at once. When the connection is lost, the next request connects again
(to the same socket, or through ``connect``), open subscriptions subscribe again on their
own, and requests are repeated as meshq.client._common.Retry allows, within ``retry_for``
seconds. All waiting is trio's, so the client runs in virtual time too.

State here: the current connection (its pending requests by id and its subscriptions by
tag), the open subscriptions, the receipt book and the dedup-id counter. Never: a request
left waiting after its connection died (it gets its error), nor an answer or delivery of
one connection taken for another's.
"""

from __future__ import annotations

import copy
import itertools
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import trio

from meshq.client._common import (
    Backoff,
    ConnectionLost,
    DedupIds,
    Delivery,
    Receipts,
    Retry,
    budget,
    lost_error,
    message_fields,
    result_of,
    retryable,
    settled,
)
from meshq.config import resolve_socket
from meshq.errors import (
    ConsumerCancelled,
    MeshqError,
    NotFound,
    ProtocolError,
    Timeout,
    Unavailable,
)
from meshq.protocol.codec import FrameDecoder, encode_frame

__all__ = ["AsyncClient", "AsyncSubscription"]

T = TypeVar("T")


class _Waiter:
    __slots__ = ("event", "frame", "sent")

    def __init__(self) -> None:
        self.event = trio.Event()
        self.frame: dict[str, Any] | None = None
        self.sent = False  # handed to the stream: the daemon may have it


class _Conn:
    """One connection: its stream, the requests waiting on it, the subscriptions it serves
    (by the tag it gave them), and once lost, why."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.waiters: dict[int, _Waiter] = {}
        self.out = bytearray()
        self.queued: list[_Waiter] = []  # the waiters of the requests in ``out``
        self.out_ready = trio.Event()
        self.subs: dict[str, AsyncSubscription] = {}
        self.early: dict[str, list[Delivery]] = {}  # pushed before the consume answer
        self.early_cancel: dict[str, str] = {}
        self.gone: set[str] = set()  # tags this client cancelled: drop their deliveries
        self.farewell: dict[str, Any] | None = None  # an error for no request, then EOF
        self.dead: str | None = None
        self.ready = False  # the open subscriptions are subscribed here
        self.scope = trio.CancelScope()

    def enqueue(self, frame: dict[str, Any], waiter: _Waiter | None = None) -> None:
        self.out += encode_frame(frame)
        if waiter is not None:
            self.queued.append(waiter)
        self.out_ready.set()


class AsyncSubscription:
    """Deliveries pushed for one consumer; iterate with ``async for``.

    It outlives a lost connection: the client subscribes again (same queue and prefetch)
    and ``tag`` becomes the new consumer tag. Iteration raises ConsumerCancelled when the
    daemon ends the subscription (its queue was deleted), the connection's error when it
    cannot be restored within the retry budget, and stops when the client is closed."""

    def __init__(self, client: AsyncClient, queue: str, prefetch: int) -> None:
        self.client, self.queue, self.prefetch = client, queue, prefetch
        self.tag = ""
        self._conn: _Conn | None = None
        self._send, self._receive = trio.open_memory_channel[Delivery | None](float("inf"))
        self._ended: MeshqError | None = None

    def __aiter__(self) -> AsyncSubscription:
        return self

    async def __anext__(self) -> Delivery:
        while True:
            try:
                item = await self._receive.receive()
            except trio.EndOfChannel:
                item = None
            if item is None or not item.lapsed(trio.current_time()):
                break
            # Waited here past its lease: another consumer's by now.
        if item is None:  # the end: why is in _ended (None: the client was closed)
            if self._ended is not None:
                raise copy.copy(self._ended)
            raise StopAsyncIteration
        return item

    async def ack(self, delivery: Delivery | str) -> None:
        await self.client.ack(self.queue, [delivery])

    def _put(self, items: list[Delivery]) -> None:
        for d in items:
            self._send.send_nowait(d)

    def _end(self, err: MeshqError | None) -> None:
        if self._ended is None:
            self._ended = err
        if err is not None:
            try:
                self._send.send_nowait(None)
            except trio.ClosedResourceError:
                pass
        self._send.close()


class AsyncClient:
    """``async with AsyncClient() as c:`` connects to the local meshqd.

    ``connect``: an async callable returning a connected trio Stream, used instead of the
    Unix socket (and for every reconnect); an OSError from it means the daemon is
    unreachable. ``retry_for``: how long, from the first failure, a request is repeated
    (default 30 s; 0: never). Sends give every message a dedup id and are repeated after
    UNAVAILABLE, TIMEOUT and a lost connection, so a repeat never creates a second message;
    ack, nack, reject and extend after UNAVAILABLE and a lost connection; everything else
    only after UNAVAILABLE (nothing was done). Waits between attempts start at 20 ms and
    double up to 500 ms. When the budget is spent the last error is raised: UNAVAILABLE
    (nothing was written) or TIMEOUT (the outcome is unknown). The first connection (in
    ``__aenter__``) is not retried.
    """

    def __init__(self, socket: str | os.PathLike[str] | None = None, *,
                 max_frame: int = 8 * 1024 * 1024, retry_for: float | None = None,
                 connect: Callable[[], Awaitable[trio.abc.Stream]] | None = None,
                 dedup_prefix: str | None = None) -> None:
        self.path = resolve_socket(os.fspath(socket) if socket is not None else None)
        self.retry_for = budget(retry_for, None)
        self._connect = connect
        self._max_frame = max_frame
        self._ids = itertools.count(1)
        self._conn: _Conn | None = None
        self._lock = trio.Lock()  # one connect (and subscribing again) at a time
        self._subs: list[AsyncSubscription] = []  # open, in the order they were made
        self._receipts = Receipts()
        self._dedup = DedupIds(dedup_prefix)  # (a simulation fixes it, to replay)
        self._closed = False
        self._reviving = False
        self._nursery_cm: Any = None
        self._nursery: trio.Nursery | None = None

    async def __aenter__(self) -> AsyncClient:
        stream = await self._open()
        self._nursery_cm = trio.open_nursery()
        self._nursery = await self._nursery_cm.__aenter__()
        self._start(stream)
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._closed = True
        assert self._nursery is not None
        self._nursery.cancel_scope.cancel()
        try:
            await self._nursery_cm.__aexit__(None, None, None)
        finally:
            await self.aclose()

    async def aclose(self) -> None:
        self._closed = True
        conn = self._conn
        if conn is not None:
            self._lost(conn, "connection closed")
            await trio.aclose_forcefully(conn.stream)
        for sub in self._subs:
            sub._end(None)
        self._subs.clear()

    # -- the connection ------------------------------------------------------------------
    async def _open(self) -> trio.abc.Stream:
        try:
            if self._connect is not None:
                return await self._connect()
            return await trio.open_unix_socket(os.fspath(self.path))
        except OSError as exc:
            where = "" if self._connect is not None else f" at {self.path}"
            raise Unavailable(f"cannot reach meshqd{where}: {exc.strerror or exc}") from None

    def _start(self, stream: trio.abc.Stream) -> _Conn:
        conn = _Conn(stream)
        self._conn = conn
        assert self._nursery is not None
        self._nursery.start_soon(self._run, conn)
        return conn

    async def _run(self, conn: _Conn) -> None:
        try:
            with conn.scope:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._writer, conn)
                    nursery.start_soon(self._reader, conn)
        finally:
            await trio.aclose_forcefully(conn.stream)

    def _lost(self, conn: _Conn, why: str) -> None:
        if conn.dead is not None:
            return
        conn.dead = why
        for w in conn.waiters.values():
            w.event.set()
        conn.waiters.clear()
        conn.subs.clear()
        conn.scope.cancel()
        if self._conn is conn:
            self._conn = None
        if self._subs and not self._closed and not self._reviving:
            assert self._nursery is not None
            self._reviving = True
            self._nursery.start_soon(self._revive)

    async def _connected(self) -> _Conn:
        """The live connection, after connecting again (and subscribing again to what was
        open) if it was lost. Raises Unavailable when that fails: the caller's request was
        not sent."""
        if self._closed:
            raise Unavailable("client is closed")
        if self._nursery is None:
            raise RuntimeError("AsyncClient is not open: use it as 'async with AsyncClient()'")
        conn = self._conn
        if conn is not None and conn.ready:
            return conn
        async with self._lock:
            conn = self._conn
            if conn is None:
                conn = self._start(await self._open())
            if not conn.ready:
                for sub in list(self._subs):
                    if sub._conn is conn:
                        continue
                    try:
                        await self._subscribe(sub, conn)
                    except (Unavailable, Timeout) as exc:
                        raise Unavailable(f"subscribing again to {sub.queue!r}: "
                                          f"{exc.message}") from None
                    except NotFound as exc:
                        self._end(sub, ConsumerCancelled(exc.message))
                    except MeshqError as exc:
                        self._end(sub, exc)
                conn.ready = conn.dead is None
            return conn

    async def _revive(self) -> None:
        """After a lost connection, with subscriptions open: connect and subscribe again,
        within the retry budget; past it the subscriptions end with the last error."""
        backoff = Backoff(self.retry_for)
        try:
            while self._subs and not self._closed:
                try:
                    await self._connected()
                    return
                except MeshqError as exc:
                    delay = backoff.next_delay(trio.current_time())
                    if self._closed or not retryable(exc, Retry.SESSION) or delay is None:
                        for sub in list(self._subs):
                            self._end(sub, exc)
                        return
                    await trio.sleep(delay)
        finally:
            self._reviving = False

    # -- frames --------------------------------------------------------------------------
    async def _writer(self, conn: _Conn) -> None:
        try:
            while True:
                await conn.out_ready.wait()
                conn.out_ready = trio.Event()
                while conn.out:
                    data, conn.out = bytes(conn.out), bytearray()
                    for w in conn.queued:
                        w.sent = True
                    conn.queued.clear()
                    await conn.stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self._lost(conn, "connection to meshqd lost")

    async def _reader(self, conn: _Conn) -> None:
        decoder = FrameDecoder(self._max_frame)
        why = "meshqd closed the connection"
        try:
            while True:
                data = await conn.stream.receive_some(65536)
                if not data:
                    break
                decoder.feed(data)
                for frame in decoder.frames():
                    self._dispatch(conn, frame)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            why = "connection to meshqd lost"
        except ProtocolError as exc:
            why = f"bad frame from meshqd ({exc.message})"
        self._lost(conn, why)

    def _dispatch(self, conn: _Conn, frame: dict[str, Any]) -> None:
        push = frame.get("push")
        if push is None:
            if frame.get("id") is None and "error" in frame:
                conn.farewell = frame  # why the daemon is closing the connection
                return
            waiter = conn.waiters.pop(frame.get("id"), None)  # type: ignore[arg-type]
            if waiter is not None:
                waiter.frame = frame
                waiter.event.set()
            return
        tag = frame.get("consumer")
        if not isinstance(tag, str):
            return
        sub = conn.subs.get(tag)
        if push == "deliver":
            now = trio.current_time()
            items = [Delivery.from_wire(d, now, tag) for d in frame.get("messages", [])]
            for d in items:
                self._receipts.learn(d)
            if sub is not None:
                sub._put(items)
            elif tag not in conn.gone:  # pushed before the consume answer reached us
                conn.early.setdefault(tag, []).extend(items)
        elif push == "cancel":
            # Final, whether or not it says so (older daemons do not).
            reason = str(frame.get("reason") or "cancelled by meshqd")
            if sub is not None:
                self._end(sub, ConsumerCancelled(reason))
            elif tag not in conn.gone:
                conn.early_cancel[tag] = reason

    # -- requests ------------------------------------------------------------------------
    async def _call(self, conn: _Conn, op: str, fields: dict[str, Any]) -> dict[str, Any]:
        if conn.dead is not None:
            raise lost_error(op, conn.dead, conn.farewell, sent=False)
        rid = next(self._ids)
        waiter = _Waiter()
        conn.waiters[rid] = waiter
        conn.enqueue({**fields, "op": op, "id": rid}, waiter)
        try:
            await waiter.event.wait()
        finally:
            conn.waiters.pop(rid, None)
        if waiter.frame is None:
            raise lost_error(op, conn.dead or "connection to meshqd lost", conn.farewell,
                             sent=waiter.sent)
        return result_of(waiter.frame)

    async def _once(self, op: str, fields: dict[str, Any]) -> dict[str, Any]:
        return await self._call(await self._connected(), op, fields)

    async def _retrying(self, kind: str, attempt: Callable[[], Awaitable[T]]) -> T:
        backoff: Backoff | None = None
        while True:
            try:
                return await attempt()
            except MeshqError as exc:
                if self._closed or not retryable(exc, kind):
                    raise
                if backoff is None:
                    backoff = Backoff(self.retry_for)
                delay = backoff.next_delay(trio.current_time())
                if delay is None:
                    raise
                await trio.sleep(delay)

    async def request(self, op: str, **fields: Any) -> dict[str, Any]:
        """Send one request and wait for its result (raising the daemon's error). Connects
        again first if the connection was lost; never repeated."""
        return await self._once(op, fields)

    # -- subscriptions -------------------------------------------------------------------
    async def _subscribe(self, sub: AsyncSubscription, conn: _Conn) -> None:
        result = await self._call(conn, "consume", {"queue": sub.queue,
                                                    "prefetch": sub.prefetch})
        tag = result.get("consumer")
        if not isinstance(tag, str):
            raise ProtocolError("consume answer without a consumer tag")
        if conn.dead is not None:  # answered, then lost: the consumer is gone with it
            raise lost_error("consume", conn.dead, conn.farewell, sent=True)
        conn.subs[tag] = sub
        sub.tag, sub._conn = tag, conn
        sub._put(conn.early.pop(tag, []))
        reason = conn.early_cancel.pop(tag, None)
        if reason is not None:
            self._end(sub, ConsumerCancelled(reason))

    def _end(self, sub: AsyncSubscription, err: MeshqError) -> None:
        sub._end(err)
        if sub in self._subs:
            self._subs.remove(sub)
        conn = sub._conn
        if conn is not None and conn.subs.get(sub.tag) is sub:
            del conn.subs[sub.tag]
            conn.gone.add(sub.tag)

    @asynccontextmanager
    async def consume(self, queue: str, prefetch: int = 100,
                      ) -> AsyncIterator[AsyncSubscription]:
        """Subscribe; deliveries are pushed while fewer than ``prefetch`` are unacked."""
        sub = AsyncSubscription(self, queue, prefetch)
        await self._retrying(Retry.SESSION, lambda: self._subscribe_now(sub))
        if sub._ended is None:
            self._subs.append(sub)
        try:
            yield sub
        finally:
            if sub in self._subs:
                self._subs.remove(sub)
            conn = sub._conn
            if conn is not None and conn.dead is None and conn.subs.get(sub.tag) is sub:
                del conn.subs[sub.tag]
                conn.gone.add(sub.tag)
                # Fire and forget: waiting for the answer could hang when the same
                # cancellation has already stopped this client's reader.
                conn.enqueue({"op": "cancel", "consumer": sub.tag, "id": next(self._ids)})

    async def _subscribe_now(self, sub: AsyncSubscription) -> None:
        await self._subscribe(sub, await self._connected())

    # -- operations ----------------------------------------------------------------------
    async def ping(self) -> dict[str, Any]:
        return await self._retrying(Retry.PLAIN, lambda: self._once("ping", {}))

    async def declare(self, queue: str, *, passive: bool = False,
                      **options: Any) -> dict[str, Any]:
        fields = {"queue": queue, "options": options, "passive": passive}
        return await self._retrying(Retry.PLAIN, lambda: self._once("declare", fields))

    async def send(self, queue: str, body: bytes | str, *, headers: dict[str, Any] | None = None,
                   ttl: float | None = None, delay: float | None = None,
                   dedup_id: str | None = None, partition_key: str | None = None) -> str:
        """Send one message; returns its id once it is durable. Without ``dedup_id`` the
        client gives it one, so that a repeat after a failure creates no second message.
        Messages with the same ``partition_key`` go to one partition, in order."""
        m = self._dedup.fill(message_fields(body, headers, ttl, delay, dedup_id,
                                            partition_key))
        return (await self._send(queue, [m]))[0]

    async def send_batch(self, queue: str, messages: Iterable[bytes | str | dict[str, Any]],
                         ) -> list[str]:
        """Send several messages in one atomic write. Items are bodies or
        ``{"body": ..., "headers": ..., "ttl": ..., "delay": ..., "dedup_id": ...,
        "partition_key": ...}``."""
        ms = [self._dedup.fill(message_fields(**m) if isinstance(m, dict)
                               else message_fields(m)) for m in messages]
        return await self._send(queue, ms)

    async def _send(self, queue: str, ms: list[dict[str, Any]]) -> list[str]:
        fields = {"queue": queue, "messages": ms}
        result = await self._retrying(Retry.SEND, lambda: self._once("send", fields))
        return list(result["ids"])

    async def receive(self, queue: str, max: int = 1, wait: float = 0.0, *,
                      visibility_timeout: float | None = None,
                      auto_ack: bool = False) -> list[Delivery]:
        """Lease up to ``max`` messages, waiting up to ``wait`` s for the first. Repeated
        only after UNAVAILABLE, within the rest of ``wait`` plus the retry budget."""
        end = trio.current_time() + wait

        async def attempt() -> dict[str, Any]:
            left = wait and end - trio.current_time()
            fields: dict[str, Any] = {"queue": queue, "max": max, "wait": left if left > 0
                                      else 0.0, "auto_ack": auto_ack}
            if visibility_timeout is not None:
                fields["visibility_timeout"] = visibility_timeout
            return await self._once("receive", fields)

        result = await self._retrying(Retry.PLAIN, attempt)
        now = trio.current_time()
        got = [Delivery.from_wire(d, now) for d in result["messages"]]
        if not auto_ack:
            for d in got:
                self._receipts.learn(d)
        return got

    async def _settle(self, verb: str, queue: str, ids: Iterable[Delivery | str],
                      **extra: Any) -> list[str]:
        sent = self._receipts.items(ids)
        lost = False

        async def attempt() -> dict[str, Any]:
            nonlocal lost
            try:
                return await self._once(verb, {"queue": queue, "ids": sent, **extra})
            except ConnectionLost:
                lost = True
                raise

        result = await self._retrying(Retry.SETTLE, attempt)
        if verb != "extend":
            self._receipts.forget(sent)
        return settled(result, verb, after_loss=lost)

    async def ack(self, queue: str, ids: Iterable[Delivery | str]) -> list[str]:
        """Ack leased messages: Delivery objects, message ids or receipts (a known
        receipt is sent for an id, so any connection may ack). Returns the message ids
        acked; raises PreconditionFailed naming any it could not ack, after the others.

        Repeated after UNAVAILABLE and after a lost connection. A lost connection leaves
        the first attempt's outcome unknown, so on the repeat a message the daemon no
        longer has ("no such message") counts as acked: the first attempt most likely
        acked it; any other failure on the repeat raises Timeout (the first attempt may
        have acked it before its lease was released)."""
        return await self._settle("ack", queue, ids)

    async def nack(self, queue: str, ids: Iterable[Delivery | str], *, requeue: bool = True,
                   delay: float = 0.0) -> list[str]:
        """Give leased messages back (now, or after ``delay`` s), or with
        ``requeue=False`` dead-letter them. Items and repeats as for :meth:`ack`."""
        return await self._settle("nack", queue, ids, requeue=requeue, delay=delay)

    async def reject(self, queue: str, ids: Iterable[Delivery | str]) -> list[str]:
        """Dead-letter leased messages now (dropped and counted when there is no DLQ)."""
        return await self.nack(queue, ids, requeue=False)

    async def extend(self, queue: str, ids: Iterable[Delivery | str],
                     seconds: float) -> list[str]:
        """Move the lease deadline of leased messages to now + ``seconds``. Items and
        repeats as for :meth:`ack`."""
        return await self._settle("extend", queue, ids, timeout=seconds)

    async def purge(self, queue: str) -> int:
        result = await self._retrying(Retry.PLAIN, lambda: self._once("purge", {"queue": queue}))
        return result["purged"]

    async def delete(self, queue: str) -> int:
        result = await self._retrying(Retry.PLAIN,
                                      lambda: self._once("delete", {"queue": queue}))
        return result["deleted"]

    async def stats(self, queue: str | None = None) -> list[dict[str, Any]]:
        fields = {"queue": queue} if queue is not None else {}
        return (await self._retrying(Retry.PLAIN, lambda: self._once("stats", fields)))[
            "queues"]

    async def status(self) -> dict[str, Any]:
        return await self._retrying(Retry.PLAIN, lambda: self._once("status", {}))

    async def rebalance(self) -> dict[str, Any]:
        """The moves of partitions under way, cluster-wide (docs/ctl-json.md)."""
        return await self._retrying(Retry.PLAIN, lambda: self._once("rebalance", {}))
