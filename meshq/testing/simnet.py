"""A simulated network that misbehaves: many mesh nodes in one trio process, in virtual time.

State here: packets in flight per destination, open stream pipes, partitions, down nodes and
per-link policies. Never: a random outcome that depends on trio's task scheduling order (each
directed link draws from its own stream seeded by the net's seed), nor delivery across a cut.
"""

from __future__ import annotations

import heapq
import math
import operator
import random
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field, replace

import trio

from meshq.mesh.accept import serve_accepted
from meshq.mesh.transport import (
    DEFAULT_MAX_PACKET,
    BindError,
    Packet,
    PeerUnreachable,
    StreamHandler,
    TransportStatistics,
    parse_address,
    run_stream_handler,
)

__all__ = [
    "ROLLS_PER_PACKET",
    "LinkPolicy",
    "RouteHook",
    "SimNet",
    "SimNetStatistics",
    "SimStream",
    "SimTransport",
    "decide_route",
    "reachable",
]

#: Uniform draws taken from a link's random stream for every packet, whatever its fate, so
#: that one packet's outcome never shifts the draws of the packets after it.
ROLLS_PER_PACKET = 4

#: ``hook(src, dst, data, delays) -> delays``: sees every packet with the delays the policy
#: chose (one per copy, empty = dropped) and may return others. Partitions, down nodes and
#: closed endpoints still drop the packet afterwards.
RouteHook = Callable[[str, str, bytes, tuple[float, ...]], Sequence[float]]


@dataclass(frozen=True)
class LinkPolicy:
    """How one directed link treats packets: each copy arrives after ``delay`` plus a uniform
    draw in [0, ``jitter``); it is lost with probability ``drop``, and a kept packet is
    duplicated (the copy with its own delay) with probability ``duplicate``. Streams see only
    ``delay`` (TCP hides loss and jitter) and are cut only by partitions and ``down``."""

    delay: float = 0.001
    jitter: float = 0.0
    drop: float = 0.0
    duplicate: float = 0.0

    def __post_init__(self) -> None:
        if self.delay < 0 or self.jitter < 0:
            raise ValueError("delay and jitter must be >= 0")
        if not (0.0 <= self.drop <= 1.0 and 0.0 <= self.duplicate <= 1.0):
            raise ValueError("drop and duplicate are probabilities in [0, 1]")


def decide_route(policy: LinkPolicy, rolls: Sequence[float]) -> tuple[float, ...]:
    """The delay of each copy of one packet under ``policy``; () means dropped.

    ``rolls`` are ROLLS_PER_PACKET uniform draws in [0, 1): drop?, delay, duplicate?, delay
    of the copy.
    """
    drop_roll, delay_roll, dup_roll, dup_delay_roll = rolls
    if drop_roll < policy.drop:
        return ()
    first = policy.delay + delay_roll * policy.jitter
    if dup_roll < policy.duplicate:
        return (first, policy.delay + dup_delay_roll * policy.jitter)
    return (first,)


def reachable(
    a: str, b: str, *, groups: Sequence[AbstractSet[str]], down: AbstractSet[str]
) -> bool:
    """Can ``a`` reach ``b``? A node always reaches itself; a down node reaches nobody else.
    Otherwise both must sit in the same partition group, where every address named in no
    group belongs to one more, implicit group."""
    if a == b:
        return True
    if a in down or b in down:
        return False
    return _side(a, groups) == _side(b, groups)


def _side(addr: str, groups: Sequence[AbstractSet[str]]) -> int:
    for i, group in enumerate(groups):
        if addr in group:
            return i
    return -1


@dataclass(frozen=True)
class SimNetStatistics:
    """Copies of packets: sent + duplicated == delivered + dropped + in_flight."""

    packets_sent: int
    packets_delivered: int  # reached the destination's receive buffer
    packets_dropped: int  # lost: policy, cut, closed endpoint or full receive buffer
    packets_duplicated: int  # extra copies made
    packets_in_flight: int
    streams_opened: int
    streams_failed: int  # refused or timed out
    streams_broken: int  # by a partition, down() or a closed endpoint


@dataclass(order=True)
class _Flight:
    at: float
    src: str
    seq: int  # per-link send number: ties at the same instant never depend on scheduling
    copy: int
    data: bytes = field(compare=False)


class SimNet:
    """The network: create endpoints with ``endpoint(addr)``, misbehave with ``set_link``,
    ``partition``/``heal`` and ``down``/``up``. Run everything inside one trio run (ideally
    with ``MockClock(autojump_threshold=0)``); the methods that change the topology use
    trio's clock and must be called from inside it.

    Same seed and the same sends on each directed link give the same outcomes, whatever the
    interleaving between links.
    """

    def __init__(
        self,
        seed: int,
        *,
        delay: float = 0.001,
        jitter: float = 0.0,
        drop: float = 0.0,
        duplicate: float = 0.0,
        max_packet_size: int = DEFAULT_MAX_PACKET,
        inbox_limit: int = 4096,
    ) -> None:
        self.seed = seed
        self.default_policy = LinkPolicy(delay, jitter, drop, duplicate)
        self.max_packet_size = max_packet_size
        self.inbox_limit = inbox_limit
        self.route_hook: RouteHook | None = None
        self._links: dict[tuple[str, str], LinkPolicy] = {}
        self._rngs: dict[tuple[str, str], random.Random] = {}
        self._seqs: dict[tuple[str, str], int] = {}
        self._groups: list[frozenset[str]] = []
        self._down: set[str] = set()
        self._endpoints: dict[str, SimTransport] = {}
        self._conns: set[_Conn] = set()
        self._changed = trio.Event()
        self._next_host = 1
        self._sent = self._delivered = self._dropped = self._duplicated = 0
        self._opened = self._failed = self._broken = 0

    # -- endpoints and topology -------------------------------------------------------------

    def endpoint(self, addr: str | None = None) -> SimTransport:
        """A new transport at ``addr`` (default ``10.0.0.N:7946``); BindError if an open one
        holds it. A closed address can be taken again, as a restarted node would."""
        if addr is None:
            addr = f"10.0.0.{self._next_host}:7946"
            self._next_host += 1
        parse_address(addr)
        if addr in self._endpoints:
            raise BindError(f"address {addr} is in use on the simulated network")
        ep = SimTransport(self, addr)
        self._endpoints[addr] = ep
        return ep

    def policy(self, src: str, dst: str) -> LinkPolicy:
        return self._links.get((src, dst), self.default_policy)

    def set_link(
        self,
        a: str,
        b: str,
        *,
        delay: float | None = None,
        jitter: float | None = None,
        drop: float | None = None,
        duplicate: float | None = None,
        both_ways: bool = True,
    ) -> None:
        """Override the policy of link a->b (and b->a unless ``both_ways`` is False); fields
        not given keep their current value."""
        changes = {
            k: v
            for k, v in (
                ("delay", delay),
                ("jitter", jitter),
                ("drop", drop),
                ("duplicate", duplicate),
            )
            if v is not None
        }
        for key in [(a, b), (b, a)] if both_ways else [(a, b)]:
            self._links[key] = replace(self.policy(*key), **changes)
        self._topology_changed()

    def clear_link(self, a: str, b: str, *, both_ways: bool = True) -> None:
        for key in [(a, b), (b, a)] if both_ways else [(a, b)]:
            self._links.pop(key, None)
        self._topology_changed()

    def partition(self, *groups: Iterable[str]) -> None:
        """Cut the network into ``groups`` (replacing any earlier partition); addresses in
        no group form one more group together. Packets in flight across the cut are lost
        and streams across it break."""
        frozen = [frozenset(g) for g in groups]
        seen: set[str] = set()
        for g in frozen:
            if seen & g:
                raise ValueError(f"{sorted(seen & g)} named in two partition groups")
            seen |= g
        self._groups = [g for g in frozen if g]
        self._cut()

    def heal(self) -> None:
        """Undo ``partition`` (down nodes stay down, link policies stay)."""
        self._groups = []
        self._topology_changed()

    def down(self, addr: str) -> None:
        """Pull ``addr``'s cable: nothing reaches it or leaves it (its sends are silently
        lost), packets in flight to or from it are lost and its streams break. The endpoint
        itself stays open and keeps what it had already received."""
        self._down.add(addr)
        self._cut()

    def up(self, addr: str) -> None:
        self._down.discard(addr)
        self._topology_changed()

    def reachable(self, a: str, b: str) -> bool:
        return reachable(a, b, groups=self._groups, down=self._down)

    def statistics(self) -> SimNetStatistics:
        now = _now_or_none()
        if now is not None:
            self._settle(now)
        return SimNetStatistics(
            packets_sent=self._sent,
            packets_delivered=self._delivered,
            packets_dropped=self._dropped,
            packets_duplicated=self._duplicated,
            packets_in_flight=sum(len(ep._flights) for ep in self._endpoints.values()),
            streams_opened=self._opened,
            streams_failed=self._failed,
            streams_broken=self._broken,
        )

    # -- internals --------------------------------------------------------------------------

    def _topology_changed(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    def _settle(self, now: float) -> None:
        for ep in self._endpoints.values():
            ep._settle(now)

    def _cut(self) -> None:
        """Apply a new cut: deliver what is due, lose what crosses it, break its streams."""
        self._settle(trio.current_time())
        for ep in self._endpoints.values():
            kept = [f for f in ep._flights if self.reachable(f.src, ep.local_address)]
            self._dropped += len(ep._flights) - len(kept)
            heapq.heapify(kept)
            ep._flights = kept
        for conn in list(self._conns):
            if not self.reachable(conn.client, conn.server):
                self._break(conn)
        self._topology_changed()

    def _break(self, conn: _Conn) -> None:
        if not conn.broken:
            conn.broken = True
            self._broken += 1
            for pipe in conn.pipes:
                pipe.wake()
        self._conns.discard(conn)

    def _route(self, src: str, dst: str, data: bytes) -> tuple[float, ...]:
        key = (src, dst)
        rng = self._rngs.get(key)
        if rng is None:
            rng = self._rngs[key] = random.Random(f"meshq.simnet:{self.seed}:{src}>{dst}")
        rolls = [rng.random() for _ in range(ROLLS_PER_PACKET)]
        delays = decide_route(self.policy(src, dst), rolls)
        if self.route_hook is not None:
            delays = tuple(max(0.0, d) for d in self.route_hook(src, dst, data, delays))
        target = self._endpoints.get(dst)
        if target is None or not self.reachable(src, dst):
            delays = ()
        self._sent += 1
        self._duplicated += max(0, len(delays) - 1)
        self._dropped += 0 if delays else 1
        return delays

    def _next_seq(self, src: str, dst: str) -> int:
        seq = self._seqs.get((src, dst), 0)
        self._seqs[(src, dst)] = seq + 1
        return seq

    def _connect(self, client: str, server: str) -> tuple[SimStream, SimStream]:
        conn = _Conn(client, server)
        self._conns.add(conn)
        self._opened += 1
        to_server, to_client = conn.pipes
        return (
            SimStream(self, conn, client, server, out=to_server, inbound=to_client),
            SimStream(self, conn, server, client, out=to_client, inbound=to_server),
        )


def _now_or_none() -> float | None:
    try:
        return trio.current_time()
    except RuntimeError:  # outside trio.run: report without settling
        return None


class SimTransport:
    """One node's Transport on a SimNet (see meshq.mesh.transport.Transport for the contract).

    Differences from UDP+TCP worth knowing: a stream to an address with no open endpoint is
    refused after one round trip, one across a cut waits (retrying when the topology
    changes) until its timeout; streams break at once when cut; the ``remote`` a handler
    gets is the opener's ``local_address``; stream buffers are unbounded.
    """

    def __init__(self, net: SimNet, addr: str) -> None:
        self._net = net
        self._addr = addr
        self._closed = False
        self._flights: list[_Flight] = []  # heap: in flight to this endpoint
        self._inbox: deque[Packet] = deque()
        self._arrival = trio.Event()
        self._receiving = False
        self._backlog: deque[tuple[SimStream, str]] = deque()
        self._backlog_event = trio.Event()
        self._serving = False
        self._sent = self._received = self._opened = self._accepted = 0

    @property
    def local_address(self) -> str:
        return self._addr

    @property
    def max_packet_size(self) -> int:
        return self._net.max_packet_size

    def _check_open(self) -> None:
        if self._closed:
            raise trio.ClosedResourceError("transport is closed")

    def _settle(self, now: float) -> None:
        net = self._net
        while self._flights and self._flights[0].at <= now:
            flight = heapq.heappop(self._flights)
            if len(self._inbox) >= net.inbox_limit:
                net._dropped += 1
            else:
                self._inbox.append(Packet(flight.src, flight.data))
                net._delivered += 1

    async def send_packet(self, addr: str, data: bytes) -> None:
        self._check_open()
        if len(data) > self.max_packet_size:
            raise ValueError(f"packet of {len(data)} bytes exceeds {self.max_packet_size}")
        parse_address(addr)
        net = self._net
        now = trio.current_time()
        seq = net._next_seq(self._addr, addr)
        data = bytes(data)
        delays = net._route(self._addr, addr, data)
        if delays:
            target = net._endpoints[addr]
            for copy, delay in enumerate(delays):
                heapq.heappush(target._flights, _Flight(now + delay, self._addr, seq, copy, data))
            target._arrival.set()
        self._sent += 1
        await trio.lowlevel.checkpoint()

    async def receive_packet(self) -> Packet:
        self._check_open()
        if self._receiving:
            raise trio.BusyResourceError("another task is already receiving packets")
        await trio.lowlevel.checkpoint_if_cancelled()
        self._receiving = True
        try:
            while True:
                self._check_open()
                self._settle(trio.current_time())
                if self._inbox:
                    self._received += 1
                    packet = self._inbox.popleft()
                    await trio.lowlevel.cancel_shielded_checkpoint()
                    return packet
                if self._arrival.is_set():
                    self._arrival = trio.Event()
                deadline = self._flights[0].at if self._flights else math.inf
                with trio.move_on_at(deadline):
                    await self._arrival.wait()
        finally:
            self._receiving = False

    async def open_stream(self, addr: str, timeout: float) -> trio.abc.Stream:  # noqa: ASYNC109
        self._check_open()
        parse_address(addr)
        net, me = self._net, self._addr
        with trio.move_on_after(timeout):
            while True:
                changed = net._changed
                if not net.reachable(me, addr):
                    await changed.wait()  # SYNs go unanswered until the cut heals
                    continue
                await trio.sleep(net.policy(me, addr).delay)  # SYN
                target = net._endpoints.get(addr)
                if net.reachable(me, addr) and (target is None or target._closed):
                    await trio.sleep(net.policy(addr, me).delay)  # RST
                    net._failed += 1
                    raise PeerUnreachable(f"stream to {addr} refused: nothing listens there")
                await trio.sleep(net.policy(addr, me).delay)  # SYN-ACK
                if target is None or target._closed or not net.reachable(me, addr):
                    continue
                client, server = net._connect(me, addr)
                target._backlog.append((server, me))
                target._backlog_event.set()
                self._opened += 1
                return client
        net._failed += 1
        raise PeerUnreachable(f"no stream to {addr} within {timeout} s")

    async def serve_streams(
        self,
        handler: StreamHandler,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        self._check_open()
        if self._serving:
            raise trio.BusyResourceError("serve_streams is already running")
        self._serving = True

        def accepted(nursery: trio.Nursery, item: tuple[SimStream, str]) -> None:
            self._accepted += 1
            nursery.start_soon(run_stream_handler, handler, *item)

        try:
            await serve_accepted(self._accept, accepted, what=f"{self._addr} streams",
                                 task_status=task_status)
        finally:
            self._serving = False

    async def _accept(self) -> tuple[SimStream, str]:
        """The next stream opened to us and its opener (as a listener's accept)."""
        while not self._closed:
            if self._backlog:
                return self._backlog.popleft()
            if self._backlog_event.is_set():
                self._backlog_event = trio.Event()
            await self._backlog_event.wait()
        raise trio.ClosedResourceError("the endpoint was closed")

    def statistics(self) -> TransportStatistics:
        return TransportStatistics(
            local_address=self._addr,
            packets_sent=self._sent,
            packets_received=self._received,
            send_errors=0,
            streams_opened=self._opened,
            streams_accepted=self._accepted,
        )

    async def aclose(self) -> None:
        if not self._closed:
            self._closed = True
            net = self._net
            net._dropped += len(self._flights)
            self._flights = []
            self._inbox.clear()
            for stream, _ in self._backlog:  # never accepted: the opener sees a reset
                net._break(stream._conn)
            self._backlog.clear()
            self._arrival.set()
            self._backlog_event.set()
            if net._endpoints.get(self._addr) is self:
                del net._endpoints[self._addr]
            net._topology_changed()
        await trio.lowlevel.checkpoint()

    async def __aenter__(self) -> SimTransport:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


class _Pipe:
    """One direction of a stream: chunks with their arrival times; b"" marks the end."""

    def __init__(self) -> None:
        self.chunks: deque[tuple[float, bytes]] = deque()
        self.last_at = -math.inf
        self.ready = bytearray()
        self.eof = False
        self.reader_closed = False
        self.event = trio.Event()

    def wake(self) -> None:
        self.event.set()


class _Conn:
    def __init__(self, client: str, server: str) -> None:
        self.client = client
        self.server = server
        self.broken = False
        self.open_ends = 2
        self.pipes = (_Pipe(), _Pipe())  # (to server, to client)


class SimStream(trio.abc.Stream):
    """One end of a simulated TCP connection: ordered, each chunk arriving after the link's
    ``delay``; BrokenResourceError once cut, or on sending after the peer closed."""

    def __init__(
        self, net: SimNet, conn: _Conn, local: str, remote: str, *, out: _Pipe, inbound: _Pipe
    ) -> None:
        self._net = net
        self._conn = conn
        self.local = local
        self.remote = remote
        self._out = out
        self._in = inbound
        self._closed = False
        self._sending = False
        self._receiving = False

    def _check(self) -> None:
        if self._closed:
            raise trio.ClosedResourceError("stream is closed")
        if self._conn.broken:
            raise trio.BrokenResourceError("the simulated network cut this stream")

    def _push(self, data: bytes) -> None:
        at = max(
            trio.current_time() + self._net.policy(self.local, self.remote).delay, self._out.last_at
        )
        self._out.chunks.append((at, data))
        self._out.last_at = at
        self._out.wake()

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if self._sending:
            raise trio.BusyResourceError("another task is sending on this stream")
        self._sending = True
        try:
            self._check()
            if self._out.reader_closed:
                raise trio.BrokenResourceError("the peer closed this stream")
            if data:
                self._push(bytes(data))
            await trio.lowlevel.checkpoint()
        finally:
            self._sending = False

    async def wait_send_all_might_not_block(self) -> None:
        if self._sending:
            raise trio.BusyResourceError("another task is sending on this stream")
        self._check()
        await trio.lowlevel.checkpoint()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if max_bytes is not None and operator.index(max_bytes) < 1:
            raise ValueError("max_bytes must be >= 1")
        if self._receiving:
            raise trio.BusyResourceError("another task is receiving on this stream")
        await trio.lowlevel.checkpoint_if_cancelled()
        self._receiving = True
        pipe = self._in
        try:
            while True:
                self._check()
                now = trio.current_time()
                while pipe.chunks and pipe.chunks[0][0] <= now:
                    chunk = pipe.chunks.popleft()[1]
                    pipe.ready += chunk
                    pipe.eof = pipe.eof or not chunk
                if pipe.ready or pipe.eof:
                    n = len(pipe.ready) if max_bytes is None else max_bytes
                    out = bytes(pipe.ready[:n])
                    del pipe.ready[:n]
                    await trio.lowlevel.cancel_shielded_checkpoint()
                    return out
                if pipe.event.is_set():
                    pipe.event = trio.Event()
                deadline = pipe.chunks[0][0] if pipe.chunks else math.inf
                with trio.move_on_at(deadline):
                    await pipe.event.wait()
        finally:
            self._receiving = False

    async def aclose(self) -> None:
        if not self._closed:
            self._closed = True
            conn = self._conn
            if not conn.broken:
                self._push(b"")
            self._in.reader_closed = True
            self._in.wake()
            conn.open_ends -= 1
            if conn.open_ends == 0:
                self._net._conns.discard(conn)
        await trio.lowlevel.checkpoint()
