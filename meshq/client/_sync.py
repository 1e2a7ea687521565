"""Client: the blocking client, for scripts and the command-line tools.

One socket, used by one thread at a time. Frames that arrive while waiting for a
response (deliveries, other pipelined responses) are kept until asked for.
"""

from __future__ import annotations

import itertools
import os
import select
import socket as _socket
from collections import deque
from collections.abc import Iterable, Iterator
from typing import Any

from meshq.client._common import Delivery, check_failed, message_fields, result_of
from meshq.config import resolve_socket
from meshq.errors import NotFound, Timeout, Unavailable
from meshq.protocol.codec import FrameDecoder, encode_frame

__all__ = ["Client", "Subscription"]


def _readable(sock: _socket.socket, timeout: float) -> bool:
    """Whether ``sock`` has bytes (or EOF) within ``timeout`` s; poll(2), unlike select(2),
    works with descriptors above 1023 (a program with many files open)."""
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    return bool(poller.poll(max(0.0, timeout) * 1000))


class Subscription:
    """Deliveries for one consumer: iterate, or ``get(timeout)`` one at a time."""

    def __init__(self, client: Client, queue: str, tag: str) -> None:
        self.client, self.queue, self.tag = client, queue, tag

    def get(self, timeout: float | None = None) -> Delivery | None:
        """The next delivery, or None after ``timeout`` s (or when the daemon cancelled)."""
        return self.client._next_delivery(self.tag, timeout)

    def __iter__(self) -> Iterator[Delivery]:
        while (d := self.get()) is not None:
            yield d

    def ack(self, delivery: Delivery | str) -> None:
        self.client.ack(self.queue, [delivery.id if isinstance(delivery, Delivery) else delivery])

    def cancel(self) -> None:
        """Stop deliveries (a no-op when the daemon already ended it: queue deleted)."""
        box = self.client._deliveries.pop(self.tag, None)
        if box is not None and None in box:
            return
        try:
            self.client.request("cancel", consumer=self.tag)
        except NotFound:
            pass

    def __enter__(self) -> Subscription:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.client._sock is not None:
            self.cancel()


class Client:
    """``with Client() as c:`` connects to the local meshqd (socket rule of SPEC section 5)."""

    def __init__(self, socket: str | os.PathLike[str] | None = None, *,
                 timeout: float | None = None, max_frame: int = 8 * 1024 * 1024) -> None:
        self.path = resolve_socket(os.fspath(socket) if socket is not None else None)
        self.timeout = timeout
        self._ids = itertools.count(1)
        self._decoder = FrameDecoder(max_frame)
        self._responses: dict[int, dict[str, Any]] = {}
        self._farewell: dict[str, Any] | None = None  # an error for no request, then EOF
        self._deliveries: dict[str, deque[Delivery | None]] = {}
        sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
        try:
            sock.connect(os.fspath(self.path))
        except OSError as exc:
            sock.close()
            raise Unavailable(f"cannot reach meshqd at {self.path}: {exc.strerror}") from None
        self._sock: _socket.socket | None = sock

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    # -- frames ----------------------------------------------------------------------
    def _read_frames(self, timeout: float | None) -> bool:
        """Read once; file frames away. False on timeout."""
        if self._sock is None:
            raise Unavailable("client is closed")
        try:
            if timeout is not None and not _readable(self._sock, timeout):
                return False
            data = self._sock.recv(262144)
        except OSError as exc:
            self._read_farewell()  # a reset is reported before the bytes that preceded it
            self.close()
            raise Timeout(f"connection to meshqd lost: {exc}") from None
        if not data:
            self.close()
            if self._farewell is not None:  # why it closed: e.g. too many connections
                result_of(self._farewell)
            raise Timeout("meshqd closed the connection; the outcome is unknown")
        self._decoder.feed(data)
        for frame in self._decoder.frames():
            push = frame.get("push")
            tag = frame.get("consumer")
            if push == "deliver" and isinstance(tag, str):
                box = self._deliveries.setdefault(tag, deque())
                box.extend(Delivery.from_wire(d, tag) for d in frame.get("messages", []))
            elif push == "cancel" and isinstance(tag, str):
                self._deliveries.setdefault(tag, deque()).append(None)
            elif push is None and isinstance(frame.get("id"), int):
                self._responses[frame["id"]] = frame
            elif push is None and frame.get("id") is None and "error" in frame:
                self._farewell = frame
        return True

    def _read_farewell(self) -> None:
        """After a failed send: if the daemon said why it closed (an error frame with no
        id, such as "too many connections"), raise that."""
        assert self._sock is not None
        try:
            while data := self._sock.recv(262144, _socket.MSG_DONTWAIT):
                self._decoder.feed(data)
        except OSError:
            pass
        for frame in self._decoder.frames():
            if frame.get("id") is None and "error" in frame:
                self.close()
                result_of(frame)

    def submit(self, op: str, **fields: Any) -> int:
        """Send a request without waiting; returns its id for :meth:`wait`."""
        if self._sock is None:
            raise Unavailable("client is closed")
        rid = next(self._ids)
        fields["op"], fields["id"] = op, rid
        try:
            self._sock.sendall(encode_frame(fields))
        except OSError as exc:
            self._read_farewell()
            self.close()
            raise Timeout(f"connection to meshqd lost: {exc}") from None
        return rid

    def wait(self, rid: int) -> dict[str, Any]:
        """The result of request ``rid`` (raising the daemon's error)."""
        while rid not in self._responses:
            if not self._read_frames(self.timeout):
                raise Timeout(f"no answer from meshqd within {self.timeout} s")
        return result_of(self._responses.pop(rid))

    def request(self, op: str, **fields: Any) -> dict[str, Any]:
        return self.wait(self.submit(op, **fields))

    def _next_delivery(self, tag: str, timeout: float | None) -> Delivery | None:
        box = self._deliveries.setdefault(tag, deque())
        while not box:
            if not self._read_frames(timeout):
                return None
        return box.popleft()

    # -- operations ----------------------------------------------------------------------
    def ping(self) -> dict[str, Any]:
        return self.request("ping")

    def declare(self, queue: str, *, passive: bool = False, **options: Any) -> dict[str, Any]:
        return self.request("declare", queue=queue, options=options, passive=passive)

    def send(self, queue: str, body: bytes | str, *, headers: dict[str, Any] | None = None,
             ttl: float | None = None, delay: float | None = None,
             dedup_id: str | None = None) -> str:
        m = message_fields(body, headers, ttl, delay, dedup_id)
        return self.request("send", queue=queue, messages=[m])["ids"][0]

    def send_batch(self, queue: str, messages: Iterable[bytes | str | dict[str, Any]],
                   ) -> list[str]:
        ms = [message_fields(**m) if isinstance(m, dict) else message_fields(m)
              for m in messages]
        return self.request("send", queue=queue, messages=ms)["ids"]

    def send_stream(self, queue: str, bodies: Iterable[bytes | str], *,
                    window: int = 64) -> Iterator[str]:
        """Send one message per body, pipelined ``window`` deep; yields each id as it is
        confirmed, in input order. If it raises, the ids yielded so far are exactly the
        confirmed ones among the first bodies."""
        inflight: deque[int] = deque()
        for body in bodies:
            inflight.append(self.submit("send", queue=queue, messages=[message_fields(body)]))
            while len(inflight) >= window:
                yield self.wait(inflight.popleft())["ids"][0]
        while inflight:
            yield self.wait(inflight.popleft())["ids"][0]

    def receive(self, queue: str, max: int = 1, wait: float = 0.0, *,
                visibility_timeout: float | None = None,
                auto_ack: bool = False) -> list[Delivery]:
        fields: dict[str, Any] = {"queue": queue, "max": max, "wait": wait, "auto_ack": auto_ack}
        if visibility_timeout is not None:
            fields["visibility_timeout"] = visibility_timeout
        result = self.request("receive", **fields)
        return [Delivery.from_wire(d) for d in result["messages"]]

    def consume(self, queue: str, prefetch: int = 100) -> Subscription:
        tag = self.request("consume", queue=queue, prefetch=prefetch)["consumer"]
        return Subscription(self, queue, tag)

    def ack(self, queue: str, ids: list[str]) -> list[str]:
        return check_failed(self.request("ack", queue=queue, ids=list(ids)), "ack")

    def nack(self, queue: str, ids: list[str], *, requeue: bool = True,
             delay: float = 0.0) -> list[str]:
        result = self.request("nack", queue=queue, ids=list(ids), requeue=requeue, delay=delay)
        return check_failed(result, "nack")

    def reject(self, queue: str, ids: list[str]) -> list[str]:
        return self.nack(queue, ids, requeue=False)

    def extend(self, queue: str, ids: list[str], seconds: float) -> list[str]:
        """Move the lease deadline of leased messages to now + ``seconds``."""
        return check_failed(self.request("extend", queue=queue, ids=list(ids),
                                         timeout=seconds), "extend")

    def purge(self, queue: str) -> int:
        return self.request("purge", queue=queue)["purged"]

    def delete(self, queue: str) -> int:
        return self.request("delete", queue=queue)["deleted"]

    def stats(self, queue: str | None = None) -> list[dict[str, Any]]:
        fields = {"queue": queue} if queue is not None else {}
        return self.request("stats", **fields)["queues"]

    def status(self) -> dict[str, Any]:
        return self.request("status")


