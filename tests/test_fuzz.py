"""Fuzzing of every decoder that reads bytes from outside the process.

The client codec, the peer wire (UDP packets, stream frames, the hello, SWIM messages)
and the daemon's op layer: any input yields values or the project's own error, never
another exception, and the decoders never buffer more than one frame's worth of input.
"""

from __future__ import annotations

import itertools
import socket
from collections.abc import Iterator
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from meshq.errors import FrameTooLarge, ProtocolError
from meshq.mesh.swim import WireError, message_from_wire
from meshq.mesh.wire import (
    MAGIC,
    PROTOCOL_VERSION,
    PeerFrameDecoder,
    PeerProtocolError,
    check_hello,
    decode_packet,
)
from meshq.protocol.codec import HEADER, MAX_DEPTH, FrameDecoder, decode_frame, encode_frame
from meshq.testing import DaemonProcess

PURE = settings(max_examples=200, deadline=None)
V1 = MAGIC + bytes([PROTOCOL_VERSION, 0])
LIMIT = 10.0  # upper bound on any one socket wait in the daemon tests

# -- strategies -----------------------------------------------------------------------
_exts = st.builds(msgpack.ExtType, st.integers(0, 127), st.binary(max_size=6))
scalars = (st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1)
           | st.floats(allow_nan=False) | st.text(max_size=12) | st.binary(max_size=12))
# What a peer or client can put in a frame that still round-trips (ext types included).
values = st.recursive(
    scalars | _exts,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner,
                                                                max_size=4),
    max_leaves=8,
)
maps = st.dictionaries(st.text(max_size=8), values, max_size=4)
# Keys of any hashable msgpack type, and nesting past MAX_DEPTH: valid msgpack, bad frames.
_any_keys = st.none() | st.booleans() | st.integers(-5, 5) | st.text(max_size=3) | st.binary(
    max_size=3) | st.floats(allow_nan=False, width=32)
hostile = st.recursive(
    scalars | _exts,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_any_keys, inner, max_size=3),
    max_leaves=12,
)


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    """``data`` cut at the given offsets (clamped; duplicates give empty chunks)."""
    points = [0, *sorted(min(c, len(data)) for c in cuts), len(data)]
    return [data[a:b] for a, b in itertools.pairwise(points)]


def deep(depth: int) -> Any:
    """A value that nests ``depth`` levels of alternating maps and lists."""
    inner: Any = 0
    for level in range(depth):
        inner = {"k": inner} if level % 2 else [inner]
    return inner


def valid_frame_value(value: Any, depth: int = 1) -> bool:
    """The frame rule, stated independently: str keys in every map, at most MAX_DEPTH."""
    if isinstance(value, dict):
        return depth <= MAX_DEPTH and all(
            type(k) is str and valid_frame_value(v, depth + 1) for k, v in value.items())
    if isinstance(value, list):
        return depth <= MAX_DEPTH and all(valid_frame_value(v, depth + 1) for v in value)
    return True


def decode_all(dec: FrameDecoder, chunks: list[bytes]) -> tuple[list[dict[str, Any]], str]:
    """Feed ``chunks`` one at a time as a server does; the frames, and the error class name
    ("" for none). Checks the memory bound after every chunk."""
    frames: list[dict[str, Any]] = []
    try:
        for chunk in chunks:
            dec.feed(chunk)
            while (frame := dec.next_frame()) is not None:
                frames.append(frame)
            # Only an unfinished frame of at most max_frame bytes is ever kept.
            assert dec.pending() < HEADER.size + dec.max_frame
    except ProtocolError as exc:
        return frames, type(exc).__name__
    return frames, ""


garbage_streams = st.one_of(
    st.binary(max_size=300),
    st.lists(st.binary(max_size=40).map(lambda p: HEADER.pack(len(p)) + p), max_size=6).map(
        b"".join),
    st.lists(maps.map(encode_frame), min_size=1, max_size=4).map(b"".join).flatmap(
        lambda s: st.tuples(st.just(s), st.integers(0, len(s)), st.integers(0, 255)).map(
            lambda t: t[0][: t[1]] + bytes([t[2]]) + t[0][t[1] + 1:])),  # one byte replaced
    st.tuples(maps.map(encode_frame), st.binary(max_size=20)).map(b"".join),
)


# -- the client codec -----------------------------------------------------------------
@PURE
@given(data=garbage_streams, cuts=st.lists(st.integers(0, 400), max_size=10),
       max_frame=st.sampled_from([0, 1, 16, 100, 1 << 20]))
@example(data=b"\x00\x00\x00\x01\x80" * 2 + b"\x00\x00\x00\x0c\x81\xa0\x91\xcb\x7f\xf0"
         + b"\x00" * 5 + b"\x01", cuts=[], max_frame=16)  # a NaN in a frame: found in CI
def test_codec_any_bytes_in_any_chunks(data: bytes, cuts: list[int], max_frame: int) -> None:
    """Frames (str-keyed maps, nesting bounded) or ProtocolError, and the same outcome
    however the bytes are cut: byte-at-a-time, random chunks, one piece."""
    outcomes = [decode_all(FrameDecoder(max_frame), chunks) for chunks in (
        split(data, cuts), [data], [data[i:i + 1] for i in range(len(data))])]
    # (repr: a NaN decoded from the bytes equals itself only as text)
    assert repr(outcomes[0]) == repr(outcomes[1]) == repr(outcomes[2])
    frames, error = outcomes[0]
    assert error in ("", "ProtocolError", "FrameTooLarge")
    for frame in frames:
        assert type(frame) is dict and valid_frame_value(frame)


@PURE
@given(before=st.lists(maps, max_size=2), max_frame=st.integers(0, 1 << 24),
       excess=st.integers(1, 1 << 20), body_bytes=st.integers(0, 300),
       cut=st.integers(0, 3))
def test_codec_oversize_refused_at_its_header(before: list[dict[str, Any]], max_frame: int,
                                              excess: int, body_bytes: int, cut: int) -> None:
    """A length above max_frame raises FrameTooLarge once its 4 header bytes are in, with
    however little of the body, after the good frames before it; nothing earlier."""
    length = min(max_frame + excess, 2**32 - 1)
    good = [b for b in before if len(encode_frame(b)) - 4 <= max_frame]
    head = HEADER.pack(length)
    dec = FrameDecoder(max_frame)
    dec.feed(b"".join(encode_frame(b) for b in good) + head[:cut])
    assert list(dec.frames()) == good  # the partial header gives no verdict yet
    dec.feed(head[cut:] + b"\x00" * body_bytes)
    with pytest.raises(FrameTooLarge):
        dec.next_frame()
    assert dec.pending() == 4 + body_bytes  # what was fed, not what the header announced


@PURE
@given(objs=st.lists(maps, max_size=4), cuts=st.lists(st.integers(0, 1000), max_size=10))
def test_codec_round_trip(objs: list[dict[str, Any]], cuts: list[int]) -> None:
    """Valid frames (ext types included) come back equal and re-encode byte-identically,
    with max_frame set to exactly the largest body."""
    stream = b"".join(encode_frame(o) for o in objs)
    largest = max((len(encode_frame(o)) - 4 for o in objs), default=0)
    got, error = decode_all(FrameDecoder(largest), split(stream, cuts))
    assert (got, error) == (objs, "")
    assert b"".join(encode_frame(o) for o in got) == stream


@PURE
@given(top=hostile, nesting=st.integers(0, MAX_DEPTH + 3))
def test_codec_structured_bodies(top: Any, nesting: int) -> None:
    """Well-formed msgpack of any shape decodes exactly when it is a valid frame."""
    if isinstance(top, dict) and nesting:
        top = {**top, "deep": deep(nesting)}
    payload = msgpack.packb(top, use_bin_type=True)
    valid = type(top) is dict and valid_frame_value(top)
    try:
        got = decode_frame(payload)
    except ProtocolError:
        assert not valid
    else:
        assert valid and got == top


# -- the peer wire ----------------------------------------------------------------------
def _message(kind: str) -> Any:
    return st.fixed_dictionaries({"t": st.just(kind)}, optional={
        k: values | st.integers(0, 2**63 - 1) | st.sampled_from(
            ["10.0.0.1:7946", "[::1]:1", "h:1", "1.2.3.4:0", "n1", ""])
        for k in ("seq", "target", "t0", "t1", "t2", "addr", "inc", "node", "from", "meta",
                  "join", "members")})


swim_messages = st.one_of(
    *(_message(k) for k in ("ping", "ack", "nack", "ping_req", "alive", "suspect", "dead",
                            "push_pull")),
    maps.map(lambda m: {**m, "t": "x"}), values)


@PURE
@given(body=st.lists(swim_messages, max_size=4) | values, data=st.binary(max_size=100),
       use_body=st.booleans())
def test_wire_packet_then_swim_messages(body: Any, data: bytes, use_body: bool) -> None:
    """A packet and the SWIM messages in it: decoded, or an error the membership loop
    counts as a bad packet (PeerProtocolError, WireError)."""
    raw = V1 + msgpack.packb(body, use_bin_type=True) if use_body else V1 + data
    try:
        packet = decode_packet(raw)
        for m in packet.messages:
            try:
                message_from_wire(m)
            except WireError:
                pass
    except PeerProtocolError:
        pass


def test_swim_address_with_unicode_digit_port_is_a_wire_error() -> None:
    with pytest.raises(WireError):
        message_from_wire({"t": "ping_req", "seq": 1, "target": "n", "addr": "1.2.3.4:\u00b2"})


@PURE
@given(objs=st.lists(maps.map(lambda m: m if m.get("t") else {**m, "t": "x"}) | maps,
                     max_size=3),
       tail=st.binary(max_size=30), cuts=st.lists(st.integers(0, 600), max_size=8),
       max_frame=st.sampled_from([8, 64, 1 << 20]))
def test_wire_stream_frames_any_chunks(objs: list[dict[str, Any]], tail: bytes,
                                       cuts: list[int], max_frame: int) -> None:
    """Peer stream frames: maps with a str "t", or PeerProtocolError (never the client's
    ProtocolError), the same however the bytes are cut."""
    data = b"".join(encode_frame(o) for o in objs) + tail
    outcomes = []
    for chunks in (split(data, cuts), [data]):
        dec = PeerFrameDecoder(max_frame)
        frames: list[dict[str, Any]] = []
        error = ""
        try:
            for chunk in chunks:
                dec.feed(chunk)
                frames.extend(dec.frames())
                assert dec.pending() < HEADER.size + max_frame
        except PeerProtocolError as exc:
            error = type(exc).__name__
        outcomes.append((frames, error))
    assert repr(outcomes[0]) == repr(outcomes[1])  # (repr: NaN equals itself as text)
    for frame in outcomes[0][0]:
        assert type(frame) is dict and type(frame["t"]) is str and frame["t"]


hellos = st.fixed_dictionaries({"t": st.sampled_from(["hello", "hello", "ping"]) | values},
                               optional={"v": st.integers(-2, 3) | values,
                                         "cluster": st.sampled_from(["meshq", "other"]) | values,
                                         "node": st.sampled_from(["n1", ""]) | values})


@PURE
@given(frame=hellos | values)
def test_wire_hello(frame: Any) -> None:
    """check_hello returns a version we speak for a hello of our cluster, else raises
    PeerProtocolError."""
    try:
        version = check_hello(frame, "meshq")
    except PeerProtocolError:
        return
    assert version == PROTOCOL_VERSION
    assert frame["cluster"] == "meshq" and type(frame["node"]) is str and frame["node"]


# -- the daemon's op layer --------------------------------------------------------------
CODES = {"NOT_FOUND", "PRECONDITION_FAILED", "BAD_REQUEST", "TOO_LARGE", "UNAVAILABLE",
         "UNAUTHORIZED"}
OP_NAMES = ["ping", "declare", "delete", "purge", "send", "receive", "consume", "cancel",
            "ack", "nack", "extend", "stats", "status"]  # not "leave": it stops the daemon
FIELDS = ["queue", "messages", "ids", "options", "max", "wait", "prefetch", "delay",
          "requeue", "timeout", "consumer", "passive", "auto_ack", "visibility_timeout"]
_queue_names = st.sampled_from(["fz", "fz-dlq"]) | values
fuzz_requests = st.builds(
    lambda base, extra: {**extra, **base},
    st.fixed_dictionaries(
        {"op": st.sampled_from(OP_NAMES) | values},
        optional={"queue": _queue_names,
                  "messages": st.lists(st.dictionaries(
                      st.sampled_from(["body", "headers", "ttl", "delay", "dedup_id"]) | st.text(
                          max_size=4), values | st.binary(max_size=20), max_size=4), max_size=3)
                  | values,
                  **{f: values for f in FIELDS[2:]}}),
    maps,
).filter(lambda r: r.get("op") != "leave")


def _tame(req: dict[str, Any]) -> dict[str, Any]:
    """A long ``wait`` would only make the test slow: cap it."""
    wait = req.get("wait")
    if isinstance(wait, int | float) and not wait < 0.05:  # True and NaN too
        req["wait"] = 0.01
    return req


def _read_responses(sock: socket.socket, n: int) -> dict[int, dict[str, Any]]:
    dec = FrameDecoder(1 << 30)
    got: dict[int, dict[str, Any]] = {}
    while len(got) < n:
        data = sock.recv(65536)  # TimeoutError after LIMIT s fails the test
        assert data, f"connection closed with {n - len(got)} responses missing"
        dec.feed(data)
        for frame in dec.frames():
            if "push" not in frame:
                got[frame["id"]] = frame
    return got


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[DaemonProcess, Any]]:
    """One daemon for the module, with a queue of confirmed messages to find at the end."""
    with DaemonProcess(tmp_path_factory.mktemp("fuzz") / "data") as d, d.client(
            timeout=LIMIT) as c:
        c.declare("survivor-queue")
        ids = [c.send("survivor-queue", f"before-{i}".encode()) for i in range(20)]
        yield d, ids


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(reqs=st.lists(fuzz_requests, min_size=1, max_size=4))
@example(reqs=[{"op": "cancel", "consumer": [1]}])  # once killed the daemon (unhashable)
def test_daemon_random_requests(fuzzed: tuple[DaemonProcess, Any],
                                reqs: list[dict[str, Any]]) -> None:
    """Random maps as pipelined requests: each gets a success or a clear error (never an
    internal one), in one frame echoing its id, and the connection stays usable."""
    d, _ = fuzzed
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(LIMIT)
        sock.connect(str(d.socket))
        reqs = [_tame({**r, "id": i}) for i, r in enumerate(reqs)]
        reqs.append({"op": "ping", "id": len(reqs)})
        sock.sendall(b"".join(encode_frame(r) for r in reqs))
        got = _read_responses(sock, len(reqs))
    assert sorted(got) == list(range(len(reqs)))
    for resp in got.values():
        assert set(resp) in ({"id", "result"}, {"id", "error"}), resp
        if "error" in resp:
            assert resp["error"]["code"] in CODES, resp
    assert "result" in got[len(reqs) - 1]


def test_daemon_kept_everything_after_the_fuzz(fuzzed: tuple[DaemonProcess, Any]) -> None:
    """Runs after the fuzz (file order): the daemon is up and every confirmed message is
    there to receive."""
    d, ids = fuzzed
    assert d.proc is not None and d.proc.poll() is None, d.log_tail()
    with d.client(timeout=LIMIT) as c:
        got = c.receive("survivor-queue", max=100, wait=1.0)
        assert sorted(m.id for m in got) == sorted(ids)
        assert c.ack("survivor-queue", [m.id for m in got]) == [m.id for m in got]
