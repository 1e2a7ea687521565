"""Peers: request/answer exchanges with other nodes, the cluster layer's only I/O.

The contract (``Peers``), written after memberlist's transport.go:

- ``call(node, request, timeout)`` sends one request (meshq.cluster.changes) and returns
  the node's answer. It raises Unavailable when the node is unknown or unreachable, the
  link breaks, the answer does not come within ``timeout`` seconds, or the node answered
  with an error; then the request may or may not have been applied there (every request
  is a lattice merge or a read, so repeating it is safe).
- ``send(node, request, on_answer)`` is the same without waiting: ``on_answer`` is called
  exactly once, with the answer or with None (no usable answer). It never blocks.
- Requests to one node leave in the order they were made; answers may come in any order.

``LinkPeers`` implements it over Transport streams (one outgoing stream per node, hello
kind ``repl``, request ids in ``rid``), and ``serve_link`` runs the serving side. State
here: the links and the requests waiting on each. Never: a callback left uncalled when a
link ends, a request of a broken link reported as answered, an exchange with no bound.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Protocol

import trio

from meshq.cluster.changes import Answer, Request, decode, encode
from meshq.errors import MeshqError, ProtocolError, Unavailable
from meshq.mesh.transport import FramedStream, Transport
from meshq.mesh.wire import PeerProtocolError, hello_frame

if TYPE_CHECKING:
    from meshq.mesh.membership import Membership

__all__ = ["CONNECT_TIMEOUT", "LINK_MAX_FRAME", "LinkPeers", "Peers", "serve_link"]

log = logging.getLogger("meshq.cluster.peers")

CONNECT_TIMEOUT = 2.0
CALL_TIMEOUT = 10.0
RECONNECT_AFTER = 0.25  # after a link could not connect, requests fail at once this long
LINK_MAX_FRAME = 96 * 1024 * 1024  # a batch of changes: up to 64 MiB of bodies and more
LINK_KIND = "repl"

OnAnswer = Callable[[Answer | None], None]
# What serves one request: an answer now, or an awaitable answer (run in its own task).
Handler = Callable[[str, Request], "Answer | Awaitable[Answer]"]

_LINK_ERRORS = (OSError, MeshqError, trio.BrokenResourceError, trio.ClosedResourceError,
                trio.TooSlowError)


class Peers(Protocol):
    me: str

    async def call(self, node: str, request: Request,
                   timeout: float = CALL_TIMEOUT) -> Answer: ...  # noqa: ASYNC109

    def send(self, node: str, request: Request, on_answer: OnAnswer) -> None: ...


class _Link:
    """Our stream to one peer."""

    def __init__(self, peers: LinkPeers, node: str) -> None:
        self.peers = peers
        self.node = node
        self.out_send, self.out_recv = trio.open_memory_channel[dict[str, Any]](math.inf)
        self.waiting: dict[int, OnAnswer] = {}
        self.closed = False

    def request(self, frame: dict[str, Any], on_answer: OnAnswer) -> None:
        if self.closed:
            on_answer(None)
            return
        rid = next(self.peers._ids)
        frame["rid"] = rid
        self.waiting[rid] = on_answer
        self.out_send.send_nowait(frame)

    async def run(self) -> None:
        try:
            addr = self.peers.address_of(self.node)
            if addr is None:
                raise Unavailable(f"node {self.node!r} is unknown")
            try:
                raw = await self.peers.transport.open_stream(addr, CONNECT_TIMEOUT)
            except BaseException:
                # Do not try again for every request: a dead node would get thousands.
                self.peers._down_until[self.node] = trio.current_time() + RECONNECT_AFTER
                raise
            self.peers._down_until.pop(self.node, None)
            stream = FramedStream(raw, max_frame=LINK_MAX_FRAME)
            stream.allow_frames(LINK_MAX_FRAME, check_keys=False)  # (decode() checks)
            try:
                hello = hello_frame(self.peers.cluster, self.peers.me)
                hello["kind"] = LINK_KIND
                await stream.send(hello)
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._writer, stream)
                    while (frame := await stream.receive()) is not None:
                        self._answered(frame)
                    nursery.cancel_scope.cancel()
            finally:
                await trio.aclose_forcefully(raw)
        except* _LINK_ERRORS as group:
            exc = group.exceptions[0]
            log.info("link to %s ended: %s", self.node, exc)
            if self.peers.on_link_failure is not None:
                self.peers.on_link_failure(self.node)
        finally:
            self.close()

    def _answered(self, frame: dict[str, Any]) -> None:
        rid = frame.get("rid")
        fn = self.waiting.pop(rid, None) if isinstance(rid, int) else None
        if fn is None:
            return
        if "error" in frame:
            log.info("node %s: %s", self.node, str(frame["error"])[:200])
            fn(None)
            return
        try:
            answer = decode(frame)
        except PeerProtocolError as exc:
            log.info("malformed answer from %s: %s", self.node, exc)
            fn(None)
            return
        fn(answer)  # type: ignore[arg-type]

    async def _writer(self, stream: FramedStream) -> None:
        await stream.send_from(self.out_recv)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.peers.links.get(self.node) is self:
            del self.peers.links[self.node]
        waiting, self.waiting = self.waiting, {}
        for fn in waiting.values():
            fn(None)


class LinkPeers:
    """Peers over Transport streams. ``run`` must be running (it owns the link tasks)."""

    def __init__(self, me: str, cluster: str, transport: Transport,
                 membership: Membership | None) -> None:
        self.me = me
        self.cluster = cluster
        self.transport = transport
        self.membership = membership
        self.links: dict[str, _Link] = {}
        self._down_until: dict[str, float] = {}  # node -> no new link before then
        self._ids = itertools.count(1)
        self._nursery: trio.Nursery | None = None
        # Told of a link that could not connect or broke (a hint that the node is down).
        self.on_link_failure: Callable[[str], None] | None = None

    def address_of(self, node: str) -> str | None:
        if self.membership is None:
            return None
        m = self.membership.swim.member(node)
        return None if m is None else m.address

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            await trio.sleep_forever()

    def _link(self, node: str) -> _Link:
        link = self.links.get(node)
        if link is None or link.closed:
            link = self.links[node] = _Link(self, node)
            assert self._nursery is not None
            self._nursery.start_soon(link.run)
        return link

    def send(self, node: str, request: Request, on_answer: OnAnswer) -> None:
        if node == self.me:
            raise ValueError("a node does not send requests to itself")
        link = self.links.get(node)
        if (link is None or link.closed) and \
                self._down_until.get(node, -math.inf) > trio.current_time():
            on_answer(None)  # it refused a moment ago: fail now, try again soon
            return
        self._link(node).request(encode(request), on_answer)

    async def call(self, node: str, request: Request,
                   timeout: float = CALL_TIMEOUT) -> Answer:  # noqa: ASYNC109
        done = trio.Event()
        box: list[Answer | None] = []

        def got(answer: Answer | None) -> None:
            box.append(answer)
            done.set()

        self.send(node, request, got)
        with trio.move_on_after(timeout):
            await done.wait()
        if not box or box[0] is None:
            raise Unavailable(f"no answer from node {node!r}")
        return box[0]

    def close_link(self, node: str) -> None:
        link = self.links.get(node)
        if link is not None:
            link.close()

    def open_links(self) -> list[str]:
        return sorted(n for n, link in self.links.items() if not link.closed)


async def serve_link(stream: FramedStream, hello: dict[str, Any], handler: Handler) -> None:
    """Serve one peer's link: decode each request, answer it (by its ``rid``), in any order.
    A request that cannot be decoded or fails gets an error answer; the link goes on. The
    synchronous part of each request runs in arrival order (merges stage in order)."""
    peer = str(hello.get("node"))
    stream.allow_frames(LINK_MAX_FRAME, check_keys=False)  # (decode() checks each field)
    out_send, out_recv = trio.open_memory_channel[dict[str, Any]](math.inf)

    async def writer() -> None:
        await stream.send_from(out_recv)

    async def finish(rid: Any, work: Awaitable[Answer]) -> None:
        try:
            answer = await work
        except (MeshqError, ValueError, TypeError, KeyError) as exc:
            out_send.send_nowait({"rid": rid, "error": str(exc)[:500]})
            return
        frame = encode(answer)
        frame["rid"] = rid
        out_send.send_nowait(frame)

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(writer)
            async for frame in stream:
                rid = frame.get("rid")
                try:
                    request = decode(frame)
                    result = handler(peer, request)  # type: ignore[arg-type]
                except (MeshqError, ValueError, TypeError, KeyError) as exc:
                    out_send.send_nowait({"rid": rid, "error": str(exc)[:500]})
                    continue
                if isinstance(result, Awaitable):
                    nursery.start_soon(finish, rid, result)
                else:
                    answer = encode(result)
                    answer["rid"] = rid
                    out_send.send_nowait(answer)
            nursery.cancel_scope.cancel()
    except* (trio.BrokenResourceError, trio.ClosedResourceError, ProtocolError) as group:
        log.info("link from %s ended: %s", peer, group.exceptions[0])
