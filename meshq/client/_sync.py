"""Client: the blocking client, for scripts and the command-line tools.

One connection at a time, used by one thread at a time. Frames that arrive while waiting
for a response (deliveries, other pipelined responses) are kept until asked for. When the
connection is lost, the next request (or a subscription's ``get``) connects again to the
same socket and subscribes again to what was open; requests are repeated as
meshq.client._common.Retry allows, for up to ``retry_for`` seconds.

State here: the current connection, answers not yet asked for, the open subscriptions,
the receipt book and the dedup-id counter. Never: an answer or a delivery of one
connection taken for another's (request ids and consumer tags are per connection), nor
a request repeated that could be applied twice.
"""

from __future__ import annotations

import copy
import itertools
import os
import select
import socket as _socket
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

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

__all__ = ["Client", "Subscription"]

T = TypeVar("T")
_READ = 262144


def _readable(sock: _socket.socket, timeout: float) -> bool:
    """Whether ``sock`` has bytes (or EOF) within ``timeout`` s; poll(2), unlike select(2),
    works with descriptors above 1023 (a program with many files open)."""
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    return bool(poller.poll(max(0.0, timeout) * 1000))


class _Conn:
    """One connection: its socket and decoder, the subscriptions it serves (by the tag it
    gave them), and once lost, why."""

    def __init__(self, sock: _socket.socket, max_frame: int) -> None:
        self.sock = sock
        self.decoder = FrameDecoder(max_frame)
        self.subs: dict[str, Subscription] = {}
        self.early: dict[str, list[Delivery]] = {}  # pushed before the consume answer
        self.early_cancel: dict[str, str] = {}
        self.gone: set[str] = set()  # tags this client cancelled: drop their deliveries
        self.abandoned: set[int] = set()  # requests given up on: drop their answers
        self.farewell: dict[str, Any] | None = None  # an error for no request, then EOF
        self.lost: str | None = None
        self.ready = False  # the open subscriptions are subscribed here

    def error(self, op: str, *, sent: bool) -> MeshqError:
        return lost_error(op, self.lost or "connection to meshqd lost", self.farewell,
                          sent=sent)


class Subscription:
    """Deliveries for one consumer: iterate, or ``get(timeout)`` one at a time.

    It outlives a lost connection: the client subscribes again (same queue and prefetch)
    and ``tag`` becomes the new consumer tag. Deliveries received before that stay here
    and can still be acked (by receipt)."""

    def __init__(self, client: Client, queue: str, prefetch: int) -> None:
        self.client, self.queue, self.prefetch = client, queue, prefetch
        self.tag = ""
        self._conn: _Conn | None = None
        self._box: deque[Delivery] = deque()
        self._ended: MeshqError | None = None  # why no more deliveries will come
        self._cancelled = False  # by this client

    def get(self, timeout: float | None = None) -> Delivery | None:
        """The next delivery, or None after ``timeout`` s. Raises ConsumerCancelled once
        the daemon ended the subscription (its queue was deleted) or it was cancelled, and
        the connection's error when it cannot be restored within the retry budget."""
        return self.client._next_delivery(self, timeout)

    def __iter__(self) -> Iterator[Delivery]:
        """Every delivery; ends after ``cancel()``, raises ConsumerCancelled when the
        daemon ends the subscription."""
        while True:
            try:
                d = self.get()
            except ConsumerCancelled:
                if self._cancelled:
                    return
                raise
            if d is not None:
                yield d

    def ack(self, delivery: Delivery | str) -> None:
        self.client.ack(self.queue, [delivery])

    def cancel(self) -> None:
        """Stop deliveries (a no-op when the daemon already ended it: queue deleted)."""
        self.client._cancel(self)

    def __enter__(self) -> Subscription:
        return self

    def __exit__(self, *exc: object) -> None:
        self.cancel()


class _SendStream:
    """The messages of one ``send_stream`` not yet confirmed, in input order, each with
    its request id (None: to be sent)."""

    def __init__(self, client: Client, queue: str) -> None:
        self.client, self.queue = client, queue
        self.inflight: deque[list[Any]] = deque()  # [rid | None, message]
        self.backoff: Backoff | None = None

    def add(self, message: dict[str, Any]) -> None:
        self.inflight.append([None, message])
        self._submit_all()

    def confirm(self) -> str:
        """Wait for the first message's id."""
        client = self.client
        while True:
            self._submit_all()
            rid = self.inflight[0][0]
            try:
                ids = result_of(client._await(rid, "send", client.timeout))["ids"]
            except MeshqError as exc:
                self._failed(exc)
                continue
            self.inflight.popleft()
            self.backoff = None
            return str(ids[0])

    def _submit_all(self) -> None:
        """Send what is to be sent. When the connection changed under unanswered
        messages, they and every later one are sent again first, so that the daemon
        sees them in input order."""
        client = self.client
        while True:
            try:
                if all(entry[0] is not None for entry in self.inflight):
                    return
                conn = client._connected()
                stale = False
                for entry in self.inflight:
                    rid = entry[0]
                    if rid is None or rid in client._responses:
                        continue
                    stale = stale or client._owner.get(rid) is not conn
                    if stale:
                        client._abandon(rid)
                        entry[0] = None
                for entry in self.inflight:
                    if entry[0] is None:
                        entry[0] = client._submit(conn, "send", {"queue": self.queue,
                                                                 "messages": [entry[1]]})
                return
            except MeshqError as exc:
                self._failed(exc)

    def _failed(self, exc: MeshqError) -> None:
        """Raise ``exc``, or wait and mark every unconfirmed message to be sent again, in
        order (their dedup ids make a repeat of a confirmed one return its id)."""
        client = self.client
        if client._closed or not retryable(exc, Retry.SEND):
            raise exc
        if self.backoff is None:
            self.backoff = Backoff(client.retry_for)
        delay = self.backoff.next_delay(time.monotonic())
        if delay is None:
            raise exc
        for entry in self.inflight:
            if entry[0] is not None:
                client._abandon(entry[0])
                entry[0] = None
        time.sleep(delay)


class Client:
    """``with Client() as c:`` connects to the local meshqd (socket rule of SPEC section 5).

    ``timeout``: seconds to wait for an answer (None: no limit). ``retry_for``: how long,
    from the first failure, a request is repeated (default: ``timeout`` when set, else
    30 s; 0: never). Sends give every message a dedup id and are repeated after UNAVAILABLE,
    TIMEOUT and a lost connection, so a repeat never creates a second message; ack, nack,
    reject and extend after UNAVAILABLE and a lost connection; everything else only after
    UNAVAILABLE (nothing was done). Waits between attempts start at 20 ms and double up to
    500 ms. When the budget is spent the last error is raised: UNAVAILABLE (nothing was
    written) or TIMEOUT (the outcome is unknown). Connecting in the constructor is not
    retried: no daemon at all is an error at once.
    """

    def __init__(self, socket: str | os.PathLike[str] | None = None, *,
                 timeout: float | None = None, max_frame: int = 8 * 1024 * 1024,
                 retry_for: float | None = None) -> None:
        self.path = resolve_socket(os.fspath(socket) if socket is not None else None)
        self.timeout = timeout
        self.retry_for = budget(retry_for, timeout)
        self._max_frame = max_frame
        self._ids = itertools.count(1)
        self._responses: dict[int, dict[str, Any]] = {}
        self._owner: dict[int, _Conn] = {}  # request id -> the connection it was sent on
        self._subs: list[Subscription] = []  # open, in the order they were made
        self._receipts = Receipts()
        self._dedup = DedupIds()
        self._closed = False
        self._revive: Backoff | None = None  # subscriptions waiting for a connection
        self._conn: _Conn | None = self._open()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._closed = True
        if self._conn is not None:
            self._lose(self._conn, "client closed")

    @property
    def _sock(self) -> _socket.socket | None:
        return self._conn.sock if self._conn is not None else None

    # -- the connection ------------------------------------------------------------------
    def _open(self) -> _Conn:
        sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
        try:
            sock.connect(os.fspath(self.path))
        except OSError as exc:
            sock.close()
            raise Unavailable(f"cannot reach meshqd at {self.path}: {exc.strerror}") from None
        return _Conn(sock, self._max_frame)

    def _lose(self, conn: _Conn, why: str) -> None:
        if conn.lost is None:
            conn.lost = why
        try:
            conn.sock.close()
        except OSError:
            pass
        conn.subs.clear()
        if self._conn is conn:
            self._conn = None

    def _connected(self) -> _Conn:
        """The live connection, after connecting again (and subscribing again to what was
        open) if it was lost. Raises Unavailable when that fails: this request was not
        sent."""
        if self._closed:
            raise Unavailable("client is closed")
        conn = self._conn
        if conn is not None and _readable(conn.sock, 0):
            self._read(conn, 0)  # file what came, and notice a close before writing
        conn = self._conn
        if conn is None:
            conn = self._conn = self._open()
        if not conn.ready:
            for sub in list(self._subs):
                if sub._conn is conn:
                    continue
                try:
                    self._subscribe(sub, conn)
                except (Unavailable, Timeout) as exc:
                    raise Unavailable(f"subscribing again to {sub.queue!r}: "
                                      f"{exc.message}") from None
                except NotFound as exc:
                    self._end(sub, ConsumerCancelled(exc.message))
                except MeshqError as exc:
                    self._end(sub, exc)
            conn.ready = True
        return conn

    # -- frames --------------------------------------------------------------------------
    def _read(self, conn: _Conn, timeout: float | None) -> bool:
        """Read once and file the frames away; False on timeout. A lost connection is
        marked (``conn.lost``), not raised."""
        try:
            if timeout is not None and not _readable(conn.sock, timeout):
                return False
            data = conn.sock.recv(_READ)
        except OSError as exc:
            self._drain(conn)  # a reset is reported before the bytes that preceded it
            self._lose(conn, f"connection to meshqd lost: {exc}")
            return True
        if not data:
            self._lose(conn, "meshqd closed the connection")
            return True
        self._feed(conn, data)
        return True

    def _drain(self, conn: _Conn) -> None:
        """After a failed send or receive: file what the daemon wrote before it closed
        (answers, and the error frame that says why)."""
        try:
            while data := conn.sock.recv(_READ, _socket.MSG_DONTWAIT):
                self._feed(conn, data)
        except OSError:
            pass

    def _feed(self, conn: _Conn, data: bytes) -> None:
        conn.decoder.feed(data)
        try:
            for frame in conn.decoder.frames():
                self._file(conn, frame)
        except ProtocolError as exc:
            self._lose(conn, f"bad frame from meshqd ({exc.message})")

    def _file(self, conn: _Conn, frame: dict[str, Any]) -> None:
        push = frame.get("push")
        tag = frame.get("consumer")
        if push == "deliver" and isinstance(tag, str):
            now = time.monotonic()
            items = [Delivery.from_wire(d, now, tag) for d in frame.get("messages", [])]
            for d in items:
                self._receipts.learn(d)
            sub = conn.subs.get(tag)
            if sub is not None:
                sub._box.extend(items)
            elif tag not in conn.gone:
                conn.early.setdefault(tag, []).extend(items)
        elif push == "cancel" and isinstance(tag, str):
            # Final, whether or not it says so (older daemons do not).
            reason = str(frame.get("reason") or "cancelled by meshqd")
            sub = conn.subs.get(tag)
            if sub is not None:
                self._end(sub, ConsumerCancelled(reason))
            elif tag not in conn.gone:
                conn.early_cancel[tag] = reason
        elif push is None and isinstance(frame.get("id"), int):
            if frame["id"] in conn.abandoned:
                conn.abandoned.discard(frame["id"])
            else:
                self._responses[frame["id"]] = frame
        elif push is None and frame.get("id") is None and "error" in frame:
            conn.farewell = frame

    # -- requests ------------------------------------------------------------------------
    def _submit(self, conn: _Conn, op: str, fields: dict[str, Any]) -> int:
        rid = next(self._ids)
        fields["op"], fields["id"] = op, rid
        try:
            conn.sock.sendall(encode_frame(fields))
        except OSError as exc:
            self._drain(conn)
            self._lose(conn, f"connection to meshqd lost: {exc}")
            raise conn.error(op, sent=False) from None
        self._owner[rid] = conn
        return rid

    def _await(self, rid: int, op: str, timeout: float | None) -> dict[str, Any]:
        """The answer frame of request ``rid``; raises when its connection was lost, and
        Timeout (giving the request up) when nothing came within ``timeout`` s."""
        while rid not in self._responses:
            conn = self._owner.get(rid)
            if conn is None:
                raise ValueError(f"no request {rid} is waiting for an answer")
            if conn.lost is not None:
                del self._owner[rid]
                raise conn.error(op, sent=True)
            if not self._read(conn, timeout):
                self._abandon(rid)
                raise Timeout(f"{op}: no answer from meshqd within {timeout} s")
        self._owner.pop(rid, None)
        return self._responses.pop(rid)

    def _abandon(self, rid: int) -> None:
        conn = self._owner.pop(rid, None)
        if self._responses.pop(rid, None) is None and conn is not None:
            conn.abandoned.add(rid)

    def _call(self, conn: _Conn, op: str, fields: dict[str, Any],
              timeout: float | None = None) -> dict[str, Any]:
        rid = self._submit(conn, op, fields)
        return result_of(self._await(rid, op, timeout if timeout is not None
                                     else self.timeout))

    def _once(self, op: str, fields: dict[str, Any],
              timeout: float | None = None) -> dict[str, Any]:
        return self._call(self._connected(), op, fields, timeout)

    def _retrying(self, kind: str, attempt: Callable[[], T]) -> T:
        backoff: Backoff | None = None
        while True:
            try:
                return attempt()
            except MeshqError as exc:
                if self._closed or not retryable(exc, kind):
                    raise
                if backoff is None:
                    backoff = Backoff(self.retry_for)
                delay = backoff.next_delay(time.monotonic())
                if delay is None:
                    raise
                time.sleep(delay)

    def submit(self, op: str, **fields: Any) -> int:
        """Send a request without waiting; returns its id for :meth:`wait`. Connects
        again first if the connection was lost; never repeated."""
        return self._submit(self._connected(), op, fields)

    def wait(self, rid: int) -> dict[str, Any]:
        """The result of request ``rid`` (raising the daemon's error)."""
        return result_of(self._await(rid, "request", self.timeout))

    def request(self, op: str, **fields: Any) -> dict[str, Any]:
        return self.wait(self.submit(op, **fields))

    # -- subscriptions -------------------------------------------------------------------
    def _subscribe(self, sub: Subscription, conn: _Conn) -> None:
        result = self._call(conn, "consume", {"queue": sub.queue, "prefetch": sub.prefetch})
        tag = result.get("consumer")
        if not isinstance(tag, str):
            raise ProtocolError("consume answer without a consumer tag")
        if conn.lost is not None:  # answered, then lost: the consumer is gone with it
            raise conn.error("consume", sent=True)
        conn.subs[tag] = sub
        sub.tag, sub._conn = tag, conn
        sub._box.extend(conn.early.pop(tag, []))
        reason = conn.early_cancel.pop(tag, None)
        if reason is not None:
            self._end(sub, ConsumerCancelled(reason))

    def _end(self, sub: Subscription, err: MeshqError) -> None:
        if sub._ended is None:
            sub._ended = err
        if sub in self._subs:
            self._subs.remove(sub)
        conn = sub._conn
        if conn is not None and conn.subs.get(sub.tag) is sub:
            del conn.subs[sub.tag]
            conn.gone.add(sub.tag)

    def _cancel(self, sub: Subscription) -> None:
        if sub._cancelled or sub._ended is not None:
            return
        sub._cancelled = True
        if sub in self._subs:
            self._subs.remove(sub)
        conn = sub._conn
        if conn is None or conn.lost is not None or conn.subs.get(sub.tag) is not sub:
            return  # the consumer ended with its connection
        del conn.subs[sub.tag]
        conn.gone.add(sub.tag)
        try:
            self._call(conn, "cancel", {"consumer": sub.tag})
        except (NotFound, ConnectionLost, Unavailable):
            pass  # it ended already, or with the connection

    def _next_delivery(self, sub: Subscription, timeout: float | None) -> Delivery | None:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            box = sub._box
            while box and box[0].lapsed(time.monotonic()):  # another consumer's by now
                box.popleft()
            if box:
                return box.popleft()
            if sub._ended is not None:
                raise copy.copy(sub._ended)
            if sub._cancelled:
                raise ConsumerCancelled("the subscription was cancelled")
            conn = sub._conn
            if conn is None or conn is not self._conn or conn.lost is not None:
                if not self._restore(deadline):
                    return None
                continue
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not self._read(conn, left):
                return None

    def _restore(self, deadline: float | None) -> bool:
        """Connect again and subscribe again, or wait before the next attempt; False when
        ``deadline`` passed meanwhile. Raises the last error once the budget is spent."""
        try:
            self._connected()
        except MeshqError as exc:
            if self._closed or not retryable(exc, Retry.SESSION):
                raise
            if self._revive is None:
                self._revive = Backoff(self.retry_for)
            delay = self._revive.next_delay(time.monotonic())
            if delay is None:
                self._revive = None
                raise
            if deadline is not None and deadline - time.monotonic() <= delay:
                time.sleep(max(0.0, deadline - time.monotonic()))
                return False
            time.sleep(delay)
            return True
        self._revive = None
        return True

    # -- operations ----------------------------------------------------------------------
    def ping(self) -> dict[str, Any]:
        return self._retrying(Retry.PLAIN, lambda: self._once("ping", {}))

    def declare(self, queue: str, *, passive: bool = False, **options: Any) -> dict[str, Any]:
        fields = {"queue": queue, "options": options, "passive": passive}
        return self._retrying(Retry.PLAIN, lambda: self._once("declare", fields))

    def send(self, queue: str, body: bytes | str, *, headers: dict[str, Any] | None = None,
             ttl: float | None = None, delay: float | None = None,
             dedup_id: str | None = None, partition_key: str | None = None) -> str:
        """Send one message; returns its id once it is durable. Without ``dedup_id`` the
        client gives it one, so that a repeat after a failure creates no second message.
        Messages with the same ``partition_key`` go to one partition, in order."""
        m = self._dedup.fill(message_fields(body, headers, ttl, delay, dedup_id,
                                            partition_key))
        return self._send(queue, [m])[0]

    def send_batch(self, queue: str, messages: Iterable[bytes | str | dict[str, Any]],
                   ) -> list[str]:
        """Send several messages in one atomic write. Items are bodies or
        ``{"body": ..., "headers": ..., "ttl": ..., "delay": ..., "dedup_id": ...,
        "partition_key": ...}``."""
        ms = [self._dedup.fill(message_fields(**m) if isinstance(m, dict)
                               else message_fields(m)) for m in messages]
        return self._send(queue, ms)

    def _send(self, queue: str, ms: list[dict[str, Any]]) -> list[str]:
        fields = {"queue": queue, "messages": ms}
        result = self._retrying(Retry.SEND, lambda: self._once("send", dict(fields)))
        return list(result["ids"])

    def send_stream(self, queue: str, bodies: Iterable[bytes | str], *,
                    window: int = 64) -> Iterator[str]:
        """Send one message per body, pipelined ``window`` deep; yields each id as it is
        confirmed, in input order. After a failure that may be repeated (see the class)
        every unconfirmed message is sent again, in order, with its dedup id. If it
        raises, the ids yielded so far are exactly the confirmed ones among the first
        bodies."""
        stream = _SendStream(self, queue)
        for body in bodies:
            stream.add(self._dedup.fill(message_fields(body)))
            while len(stream.inflight) >= window:
                yield stream.confirm()
        while stream.inflight:
            yield stream.confirm()

    def receive(self, queue: str, max: int = 1, wait: float = 0.0, *,
                visibility_timeout: float | None = None,
                auto_ack: bool = False) -> list[Delivery]:
        """Lease up to ``max`` messages, waiting up to ``wait`` s for the first. Repeated
        only after UNAVAILABLE, within the rest of ``wait`` plus the retry budget."""
        end = time.monotonic() + wait

        def attempt() -> dict[str, Any]:
            left = wait and end - time.monotonic()
            fields: dict[str, Any] = {"queue": queue, "max": max, "wait": left if left > 0
                                      else 0.0, "auto_ack": auto_ack}
            if visibility_timeout is not None:
                fields["visibility_timeout"] = visibility_timeout
            timeout = None if self.timeout is None else self.timeout + fields["wait"]
            return self._once("receive", fields, timeout)

        result = self._retrying(Retry.PLAIN, attempt)
        now = time.monotonic()
        got = [Delivery.from_wire(d, now) for d in result["messages"]]
        if not auto_ack:
            for d in got:
                self._receipts.learn(d)
        return got

    def consume(self, queue: str, prefetch: int = 100) -> Subscription:
        """Subscribe; deliveries are pushed while fewer than ``prefetch`` are unacked."""
        sub = Subscription(self, queue, prefetch)
        self._retrying(Retry.SESSION, lambda: self._subscribe(sub, self._connected()))
        if sub._ended is None:
            self._subs.append(sub)
        return sub

    def _settle(self, verb: str, queue: str, ids: Iterable[Delivery | str],
                **extra: Any) -> list[str]:
        sent = self._receipts.items(ids)
        lost = False

        def attempt() -> dict[str, Any]:
            nonlocal lost
            try:
                return self._once(verb, {"queue": queue, "ids": sent, **extra})
            except ConnectionLost:
                lost = True
                raise

        result = self._retrying(Retry.SETTLE, attempt)
        if verb != "extend":
            self._receipts.forget(sent)
        return settled(result, verb, after_loss=lost)

    def ack(self, queue: str, ids: Iterable[Delivery | str]) -> list[str]:
        """Ack leased messages: Delivery objects, message ids or receipts (a known
        receipt is sent for an id, so any connection may ack). Returns the message ids
        acked; raises PreconditionFailed naming any it could not ack, after the others.

        Repeated after UNAVAILABLE and after a lost connection. A lost connection leaves
        the first attempt's outcome unknown, so on the repeat a message the daemon no
        longer has ("no such message") counts as acked: the first attempt most likely
        acked it; any other failure on the repeat raises Timeout (the first attempt may
        have acked it before its lease was released)."""
        return self._settle("ack", queue, ids)

    def nack(self, queue: str, ids: Iterable[Delivery | str], *, requeue: bool = True,
             delay: float = 0.0) -> list[str]:
        """Give leased messages back (now, or after ``delay`` s), or with
        ``requeue=False`` dead-letter them. Items and repeats as for :meth:`ack`."""
        return self._settle("nack", queue, ids, requeue=requeue, delay=delay)

    def reject(self, queue: str, ids: Iterable[Delivery | str]) -> list[str]:
        """Dead-letter leased messages now (dropped and counted when there is no DLQ)."""
        return self.nack(queue, ids, requeue=False)

    def extend(self, queue: str, ids: Iterable[Delivery | str], seconds: float) -> list[str]:
        """Move the lease deadline of leased messages to now + ``seconds``. Items and
        repeats as for :meth:`ack`."""
        return self._settle("extend", queue, ids, timeout=seconds)

    def purge(self, queue: str) -> int:
        return self._retrying(Retry.PLAIN, lambda: self._once("purge", {"queue": queue}))[
            "purged"]

    def delete(self, queue: str) -> int:
        return self._retrying(Retry.PLAIN, lambda: self._once("delete", {"queue": queue}))[
            "deleted"]

    def stats(self, queue: str | None = None) -> list[dict[str, Any]]:
        fields = {"queue": queue} if queue is not None else {}
        return self._retrying(Retry.PLAIN, lambda: self._once("stats", dict(fields)))[
            "queues"]

    def status(self) -> dict[str, Any]:
        return self._retrying(Retry.PLAIN, lambda: self._once("status", {}))

    def rebalance(self) -> dict[str, Any]:
        """The moves of partitions under way, cluster-wide (docs/ctl-json.md)."""
        return self._retrying(Retry.PLAIN, lambda: self._once("rebalance", {}))
