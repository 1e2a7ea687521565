"""How mesh nodes reach each other: the Transport contract and its UDP+TCP implementation.

State here: one bound UDP socket and one listening TCP socket on the same host:port.
Never: outgoing peer traffic from any other address, nor a packet silently cut short.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import math
import socket as _socket
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol, runtime_checkable

import trio

from meshq.errors import ProtocolError, StartupError, Unavailable
from meshq.mesh.accept import serve_accepted
from meshq.mesh.keyring import ENVELOPE_HEADER, Keyring
from meshq.mesh.secure import SecureStream
from meshq.protocol.codec import (
    DEFAULT_MAX_FRAME,
    FrameDecoder,
    decode_frame,
    decode_frame_unchecked,
    encode_frame,
)

__all__ = [
    "COALESCE",
    "DEFAULT_MAX_PACKET",
    "BindError",
    "FramedStream",
    "Packet",
    "PeerUnreachable",
    "RateLimit",
    "Rejected",
    "StreamHandler",
    "Transport",
    "TransportStatistics",
    "UdpTcpTransport",
    "format_address",
    "next_frames",
    "parse_address",
    "run_stream_handler",
    "source_host",
]

log = logging.getLogger("meshq.mesh.transport")

#: Largest packet ``send_packet`` accepts by default: fits one Ethernet frame with room for
#: IP/UDP headers, as memberlist's UDPBufferSize does. The gossip layer packs up to this.
DEFAULT_MAX_PACKET = 1400
_RECV_BUFFER = 65536  # a UDP datagram is never larger, so recvfrom never truncates
_PORT0_ATTEMPTS = 16
_UDP_IGNORABLE_RECV_ERRNOS = {errno.ECONNREFUSED, errno.ECONNRESET}
_MAX_RATE_SOURCES = 4096  # source addresses whose packet rate is tracked at once
_REJECT_LOG_INTERVAL = 60.0


class Packet(NamedTuple):
    """One received datagram. ``source`` is the sender's ``host:port`` as the network saw
    it; with meshq peers that is the sender's bind address (its ``local_address``)."""

    source: str
    data: bytes


#: Serves one incoming stream: ``(stream, remote)``, where ``remote`` is the connection's
#: far end as ``host:port``. For TCP its port is ephemeral: use it for logs, never as the
#: peer's identity (the peer says who it is inside the stream).
StreamHandler = Callable[[trio.abc.Stream, str], Awaitable[None]]


class PeerUnreachable(Unavailable):
    """``open_stream`` could not connect: refused, unreachable, or no answer in time.
    Nothing was sent, so retrying (perhaps through another peer) is safe."""


class BindError(StartupError):
    """The bind address cannot be had for both UDP and TCP (in use, or not local)."""


class Rejected:
    """Traffic refused before anyone read it, by reason; counted, never logged one by one
    (a summary at most once a minute). ``unkeyed``: not encrypted, to a keyed node;
    ``bad_key``: encrypted with no key in the ring; ``rate_limited``: over the per-source
    UDP rate (on a keyed node only failed packets count against it)."""

    def __init__(self) -> None:
        self.packets = {"unkeyed": 0, "bad_key": 0, "rate_limited": 0}
        self.streams = {"unkeyed": 0, "bad_key": 0}
        self._logged_at = -math.inf
        self._logged_total = 0

    def packet(self, reason: str) -> None:
        self.packets[reason] += 1
        self._maybe_log()

    def stream(self, reason: str) -> None:
        self.streams[reason] += 1
        self._maybe_log()

    def _maybe_log(self) -> None:
        now = trio.current_time()
        if now - self._logged_at < _REJECT_LOG_INTERVAL:
            return
        total = sum(self.packets.values()) + sum(self.streams.values())
        log.warning("refused peer traffic: %d more since the last report (packets %s, "
                    "streams %s); see meshq-ctl status", total - self._logged_total,
                    self.packets, self.streams)
        self._logged_at, self._logged_total = now, total


class RateLimit:
    """A token bucket per source: ``rate`` packets a second, bursts of ``rate``."""

    def __init__(self, rate: int) -> None:
        self.rate = float(rate)
        self._buckets: dict[str, tuple[float, float]] = {}

    def allow(self, source: str, now: float) -> bool:
        tokens, then = self._buckets.get(source, (self.rate, now))
        tokens = min(self.rate, tokens + (now - then) * self.rate)
        if tokens < 1.0:
            self._buckets[source] = (tokens, now)
            return False
        if len(self._buckets) >= _MAX_RATE_SOURCES and source not in self._buckets:
            self._buckets.clear()  # a spray of sources: forget them all, keep serving
        self._buckets[source] = (tokens - 1.0, now)
        return True


@dataclass(frozen=True)
class TransportStatistics:
    """Counters since the transport was created (see Transport.statistics)."""

    local_address: str
    packets_sent: int
    packets_received: int
    send_errors: int  # packets the OS refused to send (they count as dropped)
    streams_opened: int  # by open_stream
    streams_accepted: int  # handed to a serve_streams handler


@runtime_checkable
class Transport(Protocol):
    """What the mesh needs from a network, after memberlist's Transport.

    Addresses are strings ``host:port`` (``[v6]:port`` for IPv6); see parse_address.

    Packets (gossip) are best effort:
    - ``send_packet(addr, data)`` hands one datagram of at most ``max_packet_size`` bytes to
      the network and returns; a larger one, or a malformed address, raises ValueError and
      nothing is sent. It never raises because of the network (unreachable, unresolvable):
      the packet is then lost (counted in ``send_errors`` when the OS said so). It may block
      briefly while the OS send buffer is full; it never waits for the peer.
    - A sent packet may be delivered once, never, or more than once, and packets may arrive
      in any order. A delivered packet is whole and unmodified.
    - ``receive_packet()`` waits for the next packet to this node and returns it with its
      source address, which for meshq peers equals the sender's ``local_address``. Only one
      task may wait in it at a time (else trio.BusyResourceError). Packets that arrive while
      nobody receives wait in a bounded buffer and overflow is dropped. Take a receipt
      timestamp right after it returns.

    Streams (push-pull sync, replication) are reliable and ordered:
    - ``open_stream(addr, timeout)`` connects to the peer's ``serve_streams`` and returns a
      trio Stream; bytes arrive in order, whole, once, or the stream breaks
      (trio.BrokenResourceError). Failing to connect within ``timeout`` seconds, or being
      refused, raises PeerUnreachable. Connections that arrive before the peer runs
      ``serve_streams`` wait in its backlog.
    - A stream whose peer vanishes may break or may hang: bound every exchange with
      trio.fail_after. The caller owns a stream it opened and must close it.
    - ``serve_streams(handler, task_status=...)`` calls ``task_status.started()`` once it
      accepts, then runs ``handler(stream, remote)`` in its own task for each incoming
      stream, closing the stream when the handler returns; see run_stream_handler for which
      handler errors end only that stream. It runs until cancelled, or returns once the
      transport is closed and its handlers have finished. One at a time per transport.

    Blocking, in short: ``receive_packet`` until a packet comes; ``open_stream`` at most
    ``timeout``; ``serve_streams`` until cancelled; ``send_packet`` and ``aclose`` hardly;
    ``statistics()`` (a frozen snapshot) and ``local_address`` never.

    Lifetime: ``local_address`` is fixed once the transport exists. ``aclose()`` is
    idempotent: it stops both kinds of traffic, wakes a pending ``receive_packet`` with
    trio.ClosedResourceError, and makes every later call raise it. Streams already open
    are not closed by it: their owners close them.
    """

    @property
    def local_address(self) -> str: ...

    @property
    def max_packet_size(self) -> int: ...

    async def send_packet(self, addr: str, data: bytes) -> None: ...

    async def receive_packet(self) -> Packet: ...

    # The timeout bounds the connect only and turns into PeerUnreachable (memberlist's
    # DialTimeout), unlike a caller's cancel scope, which would also cover the exchange.
    async def open_stream(self, addr: str, timeout: float) -> trio.abc.Stream: ...  # noqa: ASYNC109

    async def serve_streams(
        self, handler: StreamHandler, *, task_status: trio.TaskStatus[None] = ...
    ) -> None: ...

    def statistics(self) -> TransportStatistics: ...

    async def aclose(self) -> None: ...


def parse_address(addr: str) -> tuple[str, int]:
    """``"host:port"`` or ``"[v6]:port"`` -> (host, port); ValueError when malformed."""
    host, sep, port_text = addr.rpartition(":")
    if not sep or not host or not port_text.isdigit():
        raise ValueError(f"address must be HOST:PORT, not {addr!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        ipaddress.IPv6Address(host)  # raises ValueError for "[nonsense]"
    elif ":" in host:
        raise ValueError(f"an IPv6 address needs brackets: [{host}]:{port_text}")
    port = int(port_text)
    if port > 65535:
        raise ValueError(f"port out of range in {addr!r}")
    return host, port


def source_host(addr: str) -> str:
    """What limits count per source: the host of ``host:port``, an IPv6 host as its /64
    (one machine usually has a whole /64 to send from)."""
    host = addr.rpartition(":")[0].strip("[]")
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return host
    if ip.version == 6:
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return host


def format_address(host: str, port: int) -> str:
    """The inverse of parse_address: brackets an IPv6 host."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _sockaddr_text(sockaddr: Any) -> str:
    host, port = sockaddr[0], sockaddr[1]
    return format_address(host.split("%", 1)[0], int(port))


async def run_stream_handler(handler: StreamHandler, stream: trio.abc.Stream, remote: str) -> None:
    """How every Transport runs a handler: a handler ending with trio.BrokenResourceError
    (the peer went away), ProtocolError (it sent garbage) or trio.TooSlowError (it was too
    slow), alone or in an exception group from a nursery inside the handler, ends only
    that stream, logged; any other exception is a bug and propagates out of
    serve_streams. The stream is closed in every case."""
    try:
        await handler(stream, remote)
    except* (trio.BrokenResourceError, ProtocolError, trio.TooSlowError) as group:
        exc = group.exceptions[0]  # from the handler itself or from a nursery inside it
        log.info("stream from %s ended: %s: %s", remote, type(exc).__name__, exc)
    finally:
        await trio.aclose_forcefully(stream)


class FramedStream:
    """Length-prefixed msgpack frames (meshq.protocol.codec) over any trio Stream.

    ``receive`` returns None at a clean end of stream; an end inside a frame, or bytes that
    are not a frame, raise ProtocolError. Not safe for two concurrent senders or receivers.
    """

    def __init__(self, stream: trio.abc.Stream, *, max_frame: int = DEFAULT_MAX_FRAME) -> None:
        self.stream = stream
        self._decoder = FrameDecoder(max_frame)

    def allow_frames(self, max_frame: int, *, check_keys: bool = True) -> None:
        """Accept frames up to ``max_frame`` bytes from now on; ``check_keys=False``: do
        not walk each frame for str keys and depth (a peer link's decoder checks every
        field it reads)."""
        self._decoder.max_frame = max_frame
        self._decoder.decode = decode_frame if check_keys else decode_frame_unchecked

    async def send(self, frame: dict[str, Any]) -> None:
        await self.stream.send_all(encode_frame(frame))

    async def send_many(self, frames: list[dict[str, Any]]) -> None:
        """Send ``frames`` in order with one write (one syscall, one record when keyed)."""
        if len(frames) == 1:
            await self.stream.send_all(encode_frame(frames[0]))
        else:
            await self.stream.send_all(b"".join([encode_frame(f) for f in frames]))

    async def send_from(self, channel: trio.MemoryReceiveChannel[dict[str, Any]]) -> None:
        """Send what arrives on ``channel`` until it is closed, the frames queued behind
        one with the same write (next_frames)."""
        while True:
            try:
                frames = await next_frames(channel)
            except trio.EndOfChannel:
                return
            await self.send_many(frames)

    async def receive(self) -> dict[str, Any] | None:
        while True:
            frame = self._decoder.next_frame()
            if frame is not None:
                return frame
            chunk = await self.stream.receive_some()
            if not chunk:
                if self._decoder.pending():
                    raise ProtocolError("stream ended inside a frame")
                return None
            self._decoder.feed(chunk)

    def __aiter__(self) -> AsyncIterator[dict[str, Any]]:
        return self._frames()

    async def _frames(self) -> AsyncIterator[dict[str, Any]]:
        while (frame := await self.receive()) is not None:
            yield frame

    async def aclose(self) -> None:
        await self.stream.aclose()


COALESCE = 64  # frames a writer sends with one write, at most


async def next_frames(channel: trio.MemoryReceiveChannel[dict[str, Any]]) -> list[dict[str, Any]]:
    """Wait for the next frame on ``channel``, then take those already queued behind it
    (up to COALESCE): a busy writer sends them with one write instead of one each.
    Raises trio.EndOfChannel when the channel is closed and empty."""
    frames = [await channel.receive()]
    while len(frames) < COALESCE:
        try:
            frames.append(channel.receive_nowait())
        except (trio.WouldBlock, trio.EndOfChannel):
            break
    return frames


async def _resolve(host: str, port: int, family: int, kind: int) -> tuple[int, Any]:
    """(family, sockaddr) of the first address for host:port in ``family`` (AF_UNSPEC: any);
    OSError when there is none. Numeric hosts resolve without a thread."""
    infos = await trio.socket.getaddrinfo(host, port, family=family, type=kind)
    if not infos:
        raise OSError(errno.EADDRNOTAVAIL, f"no address for {host}")
    return infos[0][0], infos[0][4]


async def _bind_tcp(family: int, sockaddr: Any, backlog: int) -> trio.socket.SocketType:
    sock = trio.socket.socket(family, _socket.SOCK_STREAM)
    try:
        sock.setsockopt(_socket.SOL_SOCKET, _socket.SO_REUSEADDR, 1)  # restart past TIME_WAIT
        await sock.bind(sockaddr)
        sock.listen(backlog)
    except BaseException:
        sock.close()
        raise
    return sock


async def _bind_udp(family: int, sockaddr: Any) -> trio.socket.SocketType:
    # No SO_REUSEADDR: on Linux it would let a second daemon share the gossip port.
    sock = trio.socket.socket(family, _socket.SOCK_DGRAM)
    try:
        await sock.bind(sockaddr)
    except BaseException:
        sock.close()
        raise
    return sock


class UdpTcpTransport:
    """The real Transport: UDP gossip and TCP streams on one ``host:port`` (SPEC ``--bind``).

    Create it with ``await UdpTcpTransport.bind("127.0.0.1:7946")``; port 0 picks a port
    free for both protocols. Packets leave from the bound UDP socket, so peers see
    ``local_address`` as their source; outgoing TCP connections are bound to the bind host
    first. ``async with`` closes it. Bind a specific host in a cluster: with 0.0.0.0 the
    source peers see is whichever interface address the route picks, not ``local_address``.
    """

    def __init__(
        self,
        udp: trio.socket.SocketType,
        tcp: trio.socket.SocketType,
        *,
        max_packet_size: int = DEFAULT_MAX_PACKET,
        keyring: Keyring | None = None,
        packets_per_second: int | None = None,
    ) -> None:
        self._udp = udp
        self.keyring = keyring if keyring is not None else Keyring()
        self.rejected = Rejected()
        self._rate = RateLimit(packets_per_second) if packets_per_second else None
        self._listener = trio.SocketListener(tcp)
        self._family = udp.family
        self._bind_host = udp.getsockname()[0]
        self._local_address = _sockaddr_text(udp.getsockname())
        self._max_packet_size = max_packet_size
        self._closed = False
        self._serving = False
        self._sent = self._received = self._send_errors = 0
        self._opened = self._accepted = 0

    @classmethod
    async def bind(
        cls, address: str, *, max_packet_size: int = DEFAULT_MAX_PACKET, backlog: int = 128,
        keyring: Keyring | None = None, packets_per_second: int | None = None,
    ) -> UdpTcpTransport:
        """Bind UDP and TCP on ``address``; BindError when either cannot be had. With port
        0, TCP binds first on a fresh port and UDP takes the same one, retrying on clash.

        With a non-empty ``keyring`` every packet and stream is encrypted and only traffic
        one of its keys authenticates gets through (see keyring.py and secure.py); the
        ring may change while the transport runs. ``packets_per_second`` bounds the UDP
        packets taken from one source address (the rest are dropped and counted)."""
        host, port = parse_address(address)
        try:
            family, sockaddr = await _resolve(host, port, _socket.AF_UNSPEC, _socket.SOCK_STREAM)
        except OSError as exc:
            raise BindError(f"cannot resolve bind address {address}: {exc}") from None
        attempts = _PORT0_ATTEMPTS if port == 0 else 1
        for attempt in range(attempts):
            try:
                tcp = await _bind_tcp(family, sockaddr, backlog)
            except OSError as exc:
                raise BindError(f"cannot bind TCP on {address}: {exc.strerror or exc}") from None
            udp_addr = (sockaddr[0], tcp.getsockname()[1], *sockaddr[2:])
            try:
                udp = await _bind_udp(family, udp_addr)
            except OSError as exc:
                tcp.close()
                if exc.errno == errno.EADDRINUSE and attempt + 1 < attempts:
                    continue  # port 0 gave TCP a port that someone holds for UDP: again
                raise BindError(f"cannot bind UDP on {address}: {exc.strerror or exc}") from None
            return cls(udp, tcp, max_packet_size=max_packet_size, keyring=keyring,
                       packets_per_second=packets_per_second)
        raise AssertionError("unreachable")  # pragma: no cover

    @property
    def local_address(self) -> str:
        return self._local_address

    @property
    def max_packet_size(self) -> int:
        return self._max_packet_size

    def _over_rate(self, source: str) -> bool:
        return self._rate is not None and not self._rate.allow(source_host(source),
                                                                 trio.current_time())

    def _check_open(self) -> None:
        if self._closed:
            raise trio.ClosedResourceError("transport is closed")

    async def send_packet(self, addr: str, data: bytes) -> None:
        self._check_open()
        if len(data) > self._max_packet_size:
            raise ValueError(f"packet of {len(data)} bytes exceeds {self._max_packet_size}")
        host, port = parse_address(addr)
        if self.keyring:
            data = self.keyring.seal(data)
        try:
            _, sockaddr = await _resolve(host, port, self._family, _socket.SOCK_DGRAM)
            await self._udp.sendto(data, sockaddr)
        except (OSError, UnicodeError) as exc:  # unresolvable names fail in idna too
            if self._closed:
                raise trio.ClosedResourceError("transport is closed") from None
            self._send_errors += 1
            log.debug("packet to %s lost: %s", addr, exc)
            await trio.lowlevel.checkpoint()
            return
        self._sent += 1

    async def receive_packet(self) -> Packet:
        self._check_open()
        while True:
            try:
                data, sockaddr = await self._udp.recvfrom(_RECV_BUFFER)
            except OSError as exc:
                if self._closed:
                    raise trio.ClosedResourceError("transport is closed") from None
                if exc.errno in _UDP_IGNORABLE_RECV_ERRNOS:
                    continue  # an ICMP error for an earlier send, not a packet
                raise
            source = _sockaddr_text(sockaddr)
            if self.keyring:
                # Authenticated packets are never limited (a forged source address must
                # not silence a real peer); what fails is, per source host.
                opened = self.keyring.open(data)
                if opened is None:
                    if self._over_rate(source):
                        self.rejected.packet("rate_limited")
                    else:
                        sealed = data[:len(ENVELOPE_HEADER)] == ENVELOPE_HEADER
                        self.rejected.packet("bad_key" if sealed else "unkeyed")
                    continue
                data = opened
            elif self._over_rate(source):
                self.rejected.packet("rate_limited")
                continue
            self._received += 1
            return Packet(source, data)

    async def open_stream(self, addr: str, timeout: float) -> trio.abc.Stream:  # noqa: ASYNC109
        self._check_open()
        host, port = parse_address(addr)
        sock = trio.socket.socket(self._family, _socket.SOCK_STREAM)
        try:
            with trio.fail_after(timeout):
                await sock.bind((self._bind_host, 0))  # leave from the bind host (SPEC)
                _, sockaddr = await _resolve(host, port, self._family, _socket.SOCK_STREAM)
                await sock.connect(sockaddr)
        except trio.TooSlowError:
            sock.close()
            raise PeerUnreachable(f"no stream to {addr} within {timeout} s") from None
        except OSError as exc:
            sock.close()
            raise PeerUnreachable(f"no stream to {addr}: {exc.strerror or exc}") from None
        except BaseException:
            sock.close()
            raise
        self._opened += 1
        return self._secure(trio.SocketStream(sock), initiator=True)

    def _secure(self, stream: trio.abc.Stream, *, initiator: bool) -> trio.abc.Stream:
        if not self.keyring:
            return stream
        return SecureStream(stream, self.keyring, initiator=initiator,
                            on_refused=self.rejected.stream)

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
        def accepted(nursery: trio.Nursery, stream: trio.SocketStream) -> None:
            try:
                remote = _sockaddr_text(stream.socket.getpeername())
            except OSError:  # reset before we looked
                stream.socket.close()
                return
            self._accepted += 1
            nursery.start_soon(run_stream_handler, handler,
                               self._secure(stream, initiator=False), remote)

        try:
            await serve_accepted(self._listener.accept, accepted, what="peer streams",
                                 task_status=task_status)
        finally:
            self._serving = False

    def statistics(self) -> TransportStatistics:
        return TransportStatistics(
            local_address=self._local_address,
            packets_sent=self._sent,
            packets_received=self._received,
            send_errors=self._send_errors,
            streams_opened=self._opened,
            streams_accepted=self._accepted,
        )

    async def aclose(self) -> None:
        if not self._closed:
            self._closed = True
            self._udp.close()  # wakes a pending recvfrom with ClosedResourceError
            await self._listener.aclose()  # and a pending accept
        await trio.lowlevel.checkpoint()

    async def __aenter__(self) -> UdpTcpTransport:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
