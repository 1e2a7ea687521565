"""meshq.mesh.transport: the contract's helpers, and UdpTcpTransport on real loopback sockets."""

from __future__ import annotations

import errno
import math
import socket
from collections.abc import AsyncIterator
from typing import Any

import pytest
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

import meshq.mesh.transport as transport
from meshq.errors import ProtocolError
from meshq.mesh.accept import ACCEPT_BACKOFF, serve_accepted
from meshq.mesh.transport import (
    BindError,
    FramedStream,
    Packet,
    PeerUnreachable,
    Transport,
    UdpTcpTransport,
    format_address,
    next_frames,
    parse_address,
    run_stream_handler,
)
from meshq.protocol.codec import encode_frame


def _can_bind(host: str) -> bool:
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.bind((host, 0))
    except OSError:
        return False
    return True


#: A second loopback address, so that "leaves from the bind host" is visible (Linux routes
#: all of 127/8 to lo; elsewhere those tests use 127.0.0.1 for both ends).
OTHER_HOST = "127.0.0.2" if _can_bind("127.0.0.2") else "127.0.0.1"


@pytest.fixture
async def pair() -> AsyncIterator[tuple[UdpTcpTransport, UdpTcpTransport]]:
    a = await UdpTcpTransport.bind(f"{OTHER_HOST}:0")
    b = await UdpTcpTransport.bind("127.0.0.1:0")
    async with a, b:
        yield a, b


# -- addresses --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:7946", ("127.0.0.1", 7946)),
        ("node-1.example:0", ("node-1.example", 0)),
        ("[::1]:7946", ("::1", 7946)),
        ("[fe80::1]:65535", ("fe80::1", 65535)),
    ],
)
def test_parse_address(text: str, expected: tuple[str, int]) -> None:
    assert parse_address(text) == expected
    assert format_address(*expected) == text


@pytest.mark.parametrize(
    "text",
    [
        "",
        "host",
        "host:",
        ":7946",
        "host:port",
        "host:-1",
        "host:65536",
        "::1:7946",
        "[nonsense]:1",
        "1.2.3.4:7946x",
    ],
)
def test_parse_address_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        parse_address(text)


@settings(max_examples=100)
@given(
    host=st.one_of(
        st.ip_addresses(v=4).map(str),
        st.ip_addresses(v=6).map(str),
        st.from_regex(r"[a-z][a-z0-9.-]{0,20}", fullmatch=True),
    ),
    port=st.integers(0, 65535),
)
def test_address_round_trip(host: str, port: int) -> None:
    assert parse_address(format_address(host, port)) == (host, port)


def test_public_names() -> None:
    for name in transport.__all__:
        assert hasattr(transport, name), name


# -- framing and handler rules ----------------------------------------------------------------


async def test_framed_stream_byte_at_a_time_and_clean_eof() -> None:
    left, right = trio.testing.memory_stream_pair()
    frames: list[dict[str, Any]] = [{"n": i, "body": b"x" * i} for i in range(4)]
    wire = b"".join(encode_frame(f) for f in frames)

    async def dribble() -> None:
        for i in range(len(wire)):
            await left.send_all(wire[i : i + 1])
        await left.aclose()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(dribble)
        assert [f async for f in FramedStream(right)] == frames


async def test_a_writer_sends_what_is_queued_in_order_with_one_write() -> None:
    """next_frames takes the frames queued behind the first (up to COALESCE), and
    send_many writes them at once; a closed channel still yields what it held."""
    left, right = trio.testing.memory_stream_pair()
    writes: list[int] = []
    inner = left.send_all

    async def counting(data: bytes) -> None:
        writes.append(len(data))
        await inner(data)

    left.send_all = counting  # type: ignore[method-assign]
    tx, rx = trio.open_memory_channel[dict[str, Any]](math.inf)
    frames: list[dict[str, Any]] = [{"n": i} for i in range(transport.COALESCE + 3)]
    for f in frames:
        tx.send_nowait(f)
    tx.close()
    out = FramedStream(left)
    batches = []
    while True:
        try:
            batch = await next_frames(rx)
        except trio.EndOfChannel:
            break
        batches.append(len(batch))
        await out.send_many(batch)
    await left.aclose()
    assert batches == [transport.COALESCE, 3] and len(writes) == 2
    assert [f async for f in FramedStream(right)] == frames


async def test_framed_stream_eof_inside_a_frame_is_a_protocol_error() -> None:
    left, right = trio.testing.memory_stream_pair()
    await left.send_all(encode_frame({"n": 1})[:-1])
    await left.aclose()
    with pytest.raises(ProtocolError, match="inside a frame"):
        await FramedStream(right).receive()


@pytest.mark.parametrize(
    ("error", "propagates"),
    [
        (trio.BrokenResourceError("peer went away"), False),
        (ProtocolError("garbage"), False),
        (trio.TooSlowError(), False),
        (RuntimeError("a bug"), True),
    ],
)
async def test_run_stream_handler_rules(error: BaseException, propagates: bool) -> None:
    _, right = trio.testing.memory_stream_pair()

    async def handler(stream: trio.abc.Stream, remote: str) -> None:
        assert remote == "10.0.0.9:1234"
        raise error

    if propagates:
        with pytest.raises(type(error)):
            await run_stream_handler(handler, right, "10.0.0.9:1234")
    else:
        await run_stream_handler(handler, right, "10.0.0.9:1234")
    with pytest.raises(trio.ClosedResourceError):  # closed in every case
        await right.send_all(b"x")


# -- real sockets -----------------------------------------------------------------------------


async def test_binds_udp_and_tcp_on_the_same_port() -> None:
    async with await UdpTcpTransport.bind("127.0.0.1:0") as t:
        assert isinstance(t, Transport)
        host, port = parse_address(t.local_address)
        assert host == "127.0.0.1" and port > 0
        # Both protocols answer on that port: a plain UDP datagram and a plain TCP connect.
        udp = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        with udp:
            await udp.sendto(b"hello", (host, port))
            packet = await t.receive_packet()
        assert packet.data == b"hello"
        stream = await trio.open_tcp_stream(host, port)
        await stream.aclose()


async def test_a_taken_port_is_a_bind_error() -> None:
    async with await UdpTcpTransport.bind("127.0.0.1:0") as t:
        with pytest.raises(BindError, match="TCP"):
            await UdpTcpTransport.bind(t.local_address)
    # only UDP taken: TCP binds, UDP fails, nothing is left bound
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        udp.bind(("127.0.0.1", 0))
        port = udp.getsockname()[1]
        with pytest.raises(BindError, match="UDP"):
            await UdpTcpTransport.bind(f"127.0.0.1:{port}")
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
            tcp.bind(("127.0.0.1", port))  # the failed attempt released its TCP socket


async def test_port_zero_retries_when_udp_port_is_taken(monkeypatch: pytest.MonkeyPatch) -> None:
    real = transport._bind_udp
    calls: list[int] = []

    async def flaky(family: int, sockaddr: Any) -> trio.socket.SocketType:
        calls.append(sockaddr[1])
        if len(calls) == 1:
            raise OSError(errno.EADDRINUSE, "Address already in use")
        return await real(family, sockaddr)

    monkeypatch.setattr(transport, "_bind_udp", flaky)
    async with await UdpTcpTransport.bind("127.0.0.1:0") as t:
        assert len(calls) == 2
        assert parse_address(t.local_address)[1] == calls[1]


async def test_port_zero_gives_up_after_bounded_attempts(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async def always_taken(family: int, sockaddr: Any) -> trio.socket.SocketType:
        raise OSError(errno.EADDRINUSE, "Address already in use")

    monkeypatch.setattr(transport, "_bind_udp", always_taken)
    with pytest.raises(BindError, match="UDP"):
        await UdpTcpTransport.bind("127.0.0.1:0")


async def test_packet_arrives_with_the_senders_bind_address_as_source(
    pair: tuple[UdpTcpTransport, UdpTcpTransport],
) -> None:
    a, b = pair
    assert parse_address(a.local_address)[0] == OTHER_HOST
    await a.send_packet(b.local_address, b"ping")
    assert await b.receive_packet() == Packet(a.local_address, b"ping")
    await b.send_packet(a.local_address, b"ack")
    source, data = await a.receive_packet()
    assert (source, data) == (b.local_address, b"ack")
    assert a.statistics().packets_sent == 1 and a.statistics().packets_received == 1


async def test_packet_limits(pair: tuple[UdpTcpTransport, UdpTcpTransport]) -> None:
    a, b = pair
    await a.send_packet(b.local_address, b"x" * a.max_packet_size)
    assert len((await b.receive_packet()).data) == a.max_packet_size
    with pytest.raises(ValueError):
        await a.send_packet(b.local_address, b"x" * (a.max_packet_size + 1))
    with pytest.raises(ValueError):
        await a.send_packet("no-port", b"x")
    await a.send_packet("a..b:7946", b"x")  # unresolvable (idna refuses it): lost, counted
    await a.send_packet("[::1]:7946", b"x")  # no IPv4 route to it: lost, counted, no raise
    assert a.statistics().send_errors == 2


async def echo(stream: trio.abc.Stream, remote: str) -> None:
    framed = FramedStream(stream)
    async for frame in framed:
        await framed.send({"echo": frame["n"], "remote": remote})


async def test_stream_carries_frames_both_ways_in_order(
    pair: tuple[UdpTcpTransport, UdpTcpTransport],
) -> None:
    a, b = pair
    async with trio.open_nursery() as nursery:
        await nursery.start(b.serve_streams, echo)
        framed = FramedStream(await a.open_stream(b.local_address, timeout=5))
        for n in range(50):
            await framed.send({"n": n})
        replies = [await framed.receive() for _ in range(50)]
        assert [r["echo"] for r in replies if r] == list(range(50))
        # the connection left from a's bind host (ephemeral port, so not a's address)
        assert {parse_address(r["remote"])[0] for r in replies if r} == {OTHER_HOST}
        await framed.aclose()
        nursery.cancel_scope.cancel()
    assert a.statistics().streams_opened == 1
    assert b.statistics().streams_accepted == 1


async def test_serving_survives_a_peer_that_sends_garbage(
    pair: tuple[UdpTcpTransport, UdpTcpTransport],
) -> None:
    a, b = pair
    async with trio.open_nursery() as nursery:
        await nursery.start(b.serve_streams, echo)
        bad = await a.open_stream(b.local_address, timeout=5)
        await bad.send_all(b"\x00\x00\x00\x01\xc1")  # 0xc1 is never valid msgpack
        assert await bad.receive_some() == b""  # b closed it
        await bad.aclose()
        good = FramedStream(await a.open_stream(b.local_address, timeout=5))
        await good.send({"n": 1})
        assert (await good.receive() or {})["echo"] == 1
        await good.aclose()
        nursery.cancel_scope.cancel()


async def test_open_stream_failures_are_peer_unreachable(
    pair: tuple[UdpTcpTransport, UdpTcpTransport],
) -> None:
    a, b = pair
    port = parse_address(b.local_address)[1]
    await b.aclose()  # nothing listens there any more
    with pytest.raises(PeerUnreachable, match="refused"):
        await a.open_stream(f"127.0.0.1:{port}", timeout=5)
    with pytest.raises(PeerUnreachable, match="within 0 s"):
        await a.open_stream(a.local_address, timeout=0)


async def test_close_wakes_receiver_stops_serving_and_frees_the_port() -> None:
    t = await UdpTcpTransport.bind("127.0.0.1:0")
    address = t.local_address

    async def receive_until_closed() -> None:
        with pytest.raises(trio.ClosedResourceError):
            await t.receive_packet()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(receive_until_closed)
        await nursery.start(t.serve_streams, echo)
        await trio.testing.wait_all_tasks_blocked()
        await t.aclose()  # serve_streams returns by itself
    await t.aclose()  # idempotent
    with pytest.raises(trio.ClosedResourceError):
        await t.send_packet(address, b"x")
    with pytest.raises(trio.ClosedResourceError):
        await t.receive_packet()
    with pytest.raises(trio.ClosedResourceError):
        await t.open_stream(address, timeout=1)
    async with await UdpTcpTransport.bind(address) as again:  # a restart gets its port back
        assert again.local_address == address


async def test_serve_streams_runs_once_at_a_time() -> None:
    async with await UdpTcpTransport.bind("127.0.0.1:0") as t, trio.open_nursery() as nursery:
        await nursery.start(t.serve_streams, echo)
        with pytest.raises(trio.BusyResourceError):
            await t.serve_streams(echo)
        nursery.cancel_scope.cancel()


async def test_the_accept_loop_waits_out_failed_accepts_and_ends_when_closed(
        autojump_clock: trio.testing.MockClock) -> None:
    """Out of descriptors (EMFILE), an aborted connection: logged, waited out, and the
    streams after them are still served; the listener's close ends the loop, and the loop
    waits for the handlers it started."""
    script: list[Any] = [OSError(errno.EMFILE, "Too many open files"), "a",
                         OSError(errno.ECONNABORTED, "aborted"), "b",
                         trio.ClosedResourceError()]
    served: list[tuple[str, float]] = []

    async def accept() -> str:
        item = script.pop(0)
        if isinstance(item, BaseException):
            raise item
        return str(item)

    async def serve(name: str) -> None:
        await trio.sleep(1.0)
        served.append((name, trio.current_time()))

    started = trio.current_time()
    await serve_accepted(accept, lambda nursery, s: nursery.start_soon(serve, s),
                         what="test")
    assert [name for name, _ in served] == ["a", "b"]
    assert served[0][1] - started == pytest.approx(ACCEPT_BACKOFF + 1.0)
    assert served[1][1] - started == pytest.approx(2 * ACCEPT_BACKOFF + 1.0)
