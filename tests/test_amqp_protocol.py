"""The AMQP 0-9-1 connection state machine (meshq/amqp), sans IO: client frames built with
pamqp, fed whole and a byte at a time; garbage fuzzed."""

from __future__ import annotations

import ssl
from typing import Any

import trio
from hypothesis import given, settings
from hypothesis import strategies as st
from pamqp import body as pbody
from pamqp import commands as spec
from pamqp import encode as pencode
from pamqp import frame as pframe
from pamqp import header as pheader
from pamqp import heartbeat as pheartbeat

from meshq.amqp.connection import (
    AmqpConnection,
    ChannelClosed,
    ChannelOpened,
    ConnectionClosed,
    MethodReceived,
    Opened,
    Published,
    State,
    Tuning,
)
from meshq.amqp.frames import PROTOCOL_HEADER, FrameReader

KNOWN_CLOSE_CODES = {200, 403, 501, 502, 503, 504, 505, 530}


def login(user: str, password: str) -> bool:
    return (user, password) == ("guest", "guest")


def f(value: Any, channel: int = 0) -> bytes:
    return pframe.marshal(value, channel)


def server_frames(conn: AmqpConnection) -> list[tuple[int, Any]]:
    """What the server wrote, decoded as a client would."""
    reader = FrameReader(1 << 20)
    reader.header_ok = True
    reader.feed(conn.data_to_send())
    return [(r.channel, r.value) for r in reader.frames()]


HANDSHAKE = (PROTOCOL_HEADER
             + f(spec.Connection.StartOk({"product": "test"}, "PLAIN", "\0guest\0guest"))
             + f(spec.Connection.TuneOk(channel_max=10, frame_max=4096, heartbeat=30))
             + f(spec.Connection.Open("/")))


def opened(**kw: Any) -> AmqpConnection:
    conn = AmqpConnection(login, **kw)
    events = conn.receive_data(HANDSHAKE)
    assert [type(e) for e in events] == [Opened]
    conn.data_to_send()
    return conn


def feed(conn: AmqpConnection, data: bytes, *, bytewise: bool) -> list[Any]:
    if not bytewise:
        return conn.receive_data(data)
    return [e for i in range(len(data)) for e in conn.receive_data(data[i:i + 1])]


def test_a_whole_session_fed_whole_and_a_byte_at_a_time() -> None:
    body = bytes(range(256)) * 40  # 10,240 bytes: three body frames at frame_max 4096
    props = spec.Basic.Properties(content_type="text/plain", headers={"k": 1},
                                  delivery_mode=2, correlation_id="c-1")
    session = (HANDSHAKE + f(spec.Channel.Open(), 1)
               + f(spec.Basic.Publish(exchange="", routing_key="jobs"), 1)
               + f(pheader.ContentHeader(0, len(body), props), 1)
               + b"".join(f(pbody.ContentBody(body[i:i + 4000]), 1)
                          for i in range(0, len(body), 4000))
               + f(spec.Queue.Declare(queue="jobs"), 1)
               + f(pheartbeat.Heartbeat())
               + f(spec.Channel.Close(200, "bye", 0, 0), 1)
               + f(spec.Connection.Close(200, "done", 0, 0)))
    for bytewise in (False, True):
        conn = AmqpConnection(login, tuning=Tuning(channel_max=100, frame_max=8192,
                                                   heartbeat=60))
        events = feed(conn, session, bytewise=bytewise)
        assert [type(e) for e in events] == [Opened, ChannelOpened, Published, MethodReceived,
                                             ChannelClosed, ConnectionClosed]
        assert events[0] == Opened("guest", "/", {"product": "test"})
        pub = events[2]
        assert (pub.channel, pub.method.routing_key, pub.body) == (1, "jobs", body)
        assert pub.properties.headers == {"k": 1} and pub.properties.correlation_id == "c-1"
        assert isinstance(events[3].method, spec.Queue.Declare)
        assert events[5] == ConnectionClosed(200, "done", True)
        out = [type(v) for _, v in server_frames(conn)]
        assert out == [spec.Connection.Start, spec.Connection.Tune, spec.Connection.OpenOk,
                       spec.Channel.OpenOk, spec.Channel.CloseOk, spec.Connection.CloseOk]
        assert (conn.channel_max, conn.frame_max, conn.heartbeat) == (10, 4096, 30)
        assert conn.state is State.CLOSED


def test_amqplain_logs_in_too() -> None:
    table = pencode.field_table({"LOGIN": "guest", "PASSWORD": "guest"})[4:]
    conn = AmqpConnection(login)
    events = conn.receive_data(
        PROTOCOL_HEADER + f(spec.Connection.StartOk({}, "AMQPLAIN", table.decode("latin-1"))))
    assert events == [] and conn.state is State.AWAIT_TUNE_OK


def test_a_wrong_protocol_header_is_answered_with_ours_and_closed() -> None:
    conn = AmqpConnection(login)
    events = conn.receive_data(b"AMQP\x01\x01\x00\x0a")
    assert conn.data_to_send() == PROTOCOL_HEADER
    assert [e.code for e in events] == [501] and conn.state is State.CLOSED


def closed_with(conn: AmqpConnection) -> tuple[int, int, int]:
    (_, close), = [(c, v) for c, v in server_frames(conn)
                   if isinstance(v, spec.Connection.Close)]
    return close.reply_code, close.class_id, close.method_id


def test_a_refused_login_closes_with_access_refused() -> None:
    conn = AmqpConnection(login)
    conn.receive_data(PROTOCOL_HEADER)
    conn.data_to_send()
    conn.receive_data(f(spec.Connection.StartOk({}, "PLAIN", "\0guest\0nope")))
    assert closed_with(conn) == (403, 10, 11)
    events = conn.receive_data(f(spec.Connection.CloseOk()))
    assert events == [ConnectionClosed(200, "closed", False)]


def test_protocol_errors_close_with_the_specs_codes() -> None:
    cases = [
        (f(spec.Queue.Declare(queue="q"), 7), 504),  # a channel that is not open
        (f(spec.Channel.Open(), 1) + f(spec.Channel.Open(), 1), 504),  # opened twice
        (f(spec.Channel.Open(), 11), 504),  # above channel_max
        (f(pbody.ContentBody(b"x"), 1), 505),  # content with no publish
        (f(spec.Channel.Open(), 1) + f(spec.Basic.Publish(), 1) + f(spec.Queue.Declare(), 1),
         505),  # a method where the content header was due
        (f(spec.Connection.Open("/")), 503),  # open again
        (f(spec.Connection.CloseOk()), 503),  # close-ok with no close
    ]
    for data, code in cases:
        conn = opened()
        conn.receive_data(data)
        assert closed_with(conn)[0] == code, data
        assert conn.state is State.CLOSING
        assert conn.receive_data(f(spec.Channel.Open(), 2)) == []  # ignored while closing


def test_framing_errors_end_the_connection_at_once() -> None:
    big = f(spec.Channel.Open(), 1)
    cases = [
        big[:-1] + b"\x00",  # no frame-end octet
        b"\x01\x00\x01\x00\x00\x20\x00" + b"\x00" * 0x2001,  # over frame_max (4096)
        b"\x09\x00\x00\x00\x00\x00\x00\xce",  # an unknown frame type
    ]
    for data in cases:
        conn = opened()
        events = conn.receive_data(data)
        assert [type(e) for e in events] == [ConnectionClosed] and events[0].code == 501
        assert closed_with(conn)[0] == 501 and conn.state is State.CLOSED


def test_garbage_right_after_the_header_gets_start_then_the_close() -> None:
    conn = AmqpConnection(login)
    events = conn.receive_data(PROTOCOL_HEADER + b"\x01\x00\x00" + b"\xff" * 16)
    assert [type(e) for e in events] == [ConnectionClosed] and events[0].code == 501
    frames = server_frames(conn)
    assert [type(v) for _, v in frames] == [spec.Connection.Start, spec.Connection.Close]
    assert frames[1][1].reply_code == 501


def test_a_virtual_host_other_than_the_root_is_not_allowed() -> None:
    conn = AmqpConnection(login)
    conn.receive_data(HANDSHAKE.replace(f(spec.Connection.Open("/")),
                                        f(spec.Connection.Open("/other"))))
    assert closed_with(conn) == (530, 10, 40)


def test_a_channel_exception_closes_only_that_channel() -> None:
    conn = opened()
    conn.receive_data(f(spec.Channel.Open(), 1) + f(spec.Channel.Open(), 2))
    conn.data_to_send()
    conn.close_channel(1, 404, "NOT_FOUND - no queue 'x'", 50, 10)
    (ch, close), = server_frames(conn)
    assert ch == 1 and (close.reply_code, close.class_id, close.method_id) == (404, 50, 10)
    events = conn.receive_data(f(spec.Queue.Declare(queue="late"), 1)  # dropped
                               + f(spec.Channel.CloseOk(), 1)
                               + f(spec.Queue.Declare(queue="q2"), 2))
    assert [type(e) for e in events] == [ChannelClosed, MethodReceived]
    assert conn.channels == {2}


def test_deliveries_are_cut_to_frame_max() -> None:
    conn = opened()
    body = b"y" * 10_000
    conn.send_content(1, spec.Basic.Deliver("ctag", 1, False, "", "q"),
                      spec.Basic.Properties(message_id="m"), body)
    frames = server_frames(conn)
    assert isinstance(frames[0][1], spec.Basic.Deliver)
    assert frames[1][1].body_size == 10_000
    parts = [v.value for _, v in frames[2:]]
    assert b"".join(parts) == body and all(len(p) <= 4096 - 8 for p in parts)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300), st.integers(1, 7))
def test_any_bytes_after_the_handshake_give_events_or_a_clean_close(garbage: bytes,
                                                                   step: int) -> None:
    conn = opened()
    for i in range(0, len(garbage), step):
        conn.receive_data(garbage[i:i + step])
    if conn.state in (State.CLOSING, State.CLOSED):
        codes = [v.reply_code for _, v in server_frames(conn)
                 if isinstance(v, spec.Connection.Close)]
        assert len(codes) <= 1 and set(codes) <= KNOWN_CLOSE_CODES


FRAMES = [
    f(spec.Channel.Open(), 1), f(spec.Channel.Open(), 2), f(spec.Channel.Close(200, "", 0, 0), 1),
    f(spec.Channel.CloseOk(), 1), f(spec.Basic.Publish(routing_key="q"), 1),
    f(pheader.ContentHeader(0, 3, spec.Basic.Properties()), 1), f(pbody.ContentBody(b"abc"), 1),
    f(pbody.ContentBody(b"abcd"), 1), f(spec.Queue.Declare(queue="q"), 2),
    f(spec.Basic.Ack(1), 1), f(pheartbeat.Heartbeat()), f(spec.Connection.Open("/")),
    f(spec.Connection.Close(200, "", 0, 0)), f(spec.Connection.CloseOk()),
    f(spec.Connection.TuneOk(1, 4096, 0)), b"\x01\x00", b"\xce",
]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(FRAMES), max_size=25), st.integers(1, 9))
def test_any_sequence_of_frames_gives_events_or_a_clean_close(frames: list[bytes],
                                                              step: int) -> None:
    conn = opened()
    data = b"".join(frames)
    events = []
    for i in range(0, len(data), step):
        events += conn.receive_data(data[i:i + step])
    codes = [v.reply_code for _, v in server_frames(conn)
             if isinstance(v, spec.Connection.Close)]
    assert len(codes) <= 1 and set(codes) <= KNOWN_CLOSE_CODES
    assert all(e.channel in (1, 2) for e in events if hasattr(e, "channel"))
    if any(isinstance(e, ConnectionClosed) for e in events):
        assert isinstance(events[-1], ConnectionClosed) and conn.state is State.CLOSED


def test_the_direct_deliver_frame_is_what_pamqp_writes() -> None:
    from meshq.amqp.frames import deliver
    for args in (("ctag", 1, False, "", "q"), ("amq.ctag-é", 2 ** 62, True, "x.y", "a.b.#")):
        method = spec.Basic.Deliver(*args)
        assert deliver(7, *args) == f(method, 7)


def test_the_direct_confirm_frame_is_what_pamqp_writes() -> None:
    from meshq.amqp.frames import basic_ack
    assert basic_ack(3, 12345, True) == f(spec.Basic.Ack(12345, True), 3)
    assert basic_ack(1, 1, False) == f(spec.Basic.Ack(1, False), 1)


def test_a_body_announced_over_the_limit_closes_its_channel_before_any_is_kept() -> None:
    conn = opened(max_body=1000)
    conn.receive_data(f(spec.Channel.Open(), 1))
    conn.data_to_send()
    events = conn.receive_data(f(spec.Basic.Publish(exchange="", routing_key="q"), 1)
                               + f(pheader.ContentHeader(0, 1 << 40,
                                                         spec.Basic.Properties()), 1)
                               + f(pbody.ContentBody(b"x" * 100), 1))
    assert events == []
    [(channel, close)] = server_frames(conn)
    assert channel == 1 and isinstance(close, spec.Channel.Close) and close.reply_code == 406
    assert conn.state is State.OPEN and conn._publishing == {}


def test_a_login_decided_later_waits_then_tunes_or_refuses() -> None:
    for ok in (True, False):
        conn = AmqpConnection(lambda user, password: None)
        conn.receive_data(HANDSHAKE[:len(PROTOCOL_HEADER)] + f(spec.Connection.StartOk(
            {"product": "test"}, "PLAIN", "\0app\0secret")))
        conn.data_to_send()
        assert conn.state is State.AWAIT_LOGIN and conn.pending_login == ("app", "secret")
        conn.finish_login("app", ok)
        [(_, reply)] = server_frames(conn)
        if ok:
            assert isinstance(reply, spec.Connection.Tune) and conn.user == "app"
        else:
            assert isinstance(reply, spec.Connection.Close) and reply.reply_code == 403


async def test_quick_ack_finds_the_tcp_socket_under_tls_and_skips_other_streams() -> None:
    """The driver acknowledges each read at once on TCP, plain or under TLS (clients leave
    Nagle on), and leaves streams that are not TCP alone."""
    from meshq.amqp.server import _tcp_socket, quick_ack

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    client = await trio.open_tcp_stream("127.0.0.1", port)
    server = await listeners[0].accept()
    assert _tcp_socket(server) is server.socket
    tls = trio.SSLStream(server, ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER), server_side=True)
    assert _tcp_socket(tls) is server.socket
    quick_ack(_tcp_socket(tls))  # raises nothing on a live TCP socket
    unix_left, unix_right = trio.socket.socketpair()
    assert _tcp_socket(trio.SocketStream(unix_left)) is None
    quick_ack(None)
    for s in (client, server, *listeners):
        await s.aclose()
    unix_left.close()
    unix_right.close()


async def test_after_the_closing_handshake_the_driver_drains_until_the_client_closes() -> None:
    """Closing a socket with unread data resets the connection: a client still writing
    after its connection.close (amqplib writes a channel's last acks after it) would get
    EPIPE instead of a clean close. So the driver half-closes, and reads and drops until
    the client closes its end."""
    from types import SimpleNamespace

    from meshq.amqp.server import _Driver

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    client = await trio.open_tcp_stream("127.0.0.1", port)
    server = await listeners[0].accept()
    lingered = trio.Event()

    async def linger() -> None:
        await _Driver._linger(SimpleNamespace(stream=server))  # type: ignore[arg-type]
        lingered.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(linger)
        assert await client.receive_some(10) == b""  # our end is half-closed at once
        for _ in range(50):  # the client still writes: read and dropped, never reset
            await client.send_all(b"\x08" * 4096)
        assert not lingered.is_set()
        await client.aclose()
        await lingered.wait()
    for s in (server, *listeners):
        await s.aclose()
