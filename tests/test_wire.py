"""Unit tests for meshq.mesh.wire: versioned peer packets, stream hello, peer frames."""

from __future__ import annotations

import itertools
import math
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meshq.errors import ProtocolError
from meshq.mesh import wire
from meshq.mesh.wire import (
    DEFAULT_MAX_PACKET_BYTES,
    FLAG_ENCRYPTED,
    MAGIC,
    PROTOCOL_VERSION,
    Packet,
    PeerFrameDecoder,
    PeerProtocolError,
    UnsupportedVersion,
    check_hello,
    decode_packet,
    encode_packet,
    hello_frame,
    split_messages,
)
from meshq.protocol.codec import HEADER as FRAME_HEADER
from meshq.protocol.codec import MAX_DEPTH, FrameDecoder, encode_frame

V1 = MAGIC + bytes([1, 0])  # the header of every version-1 packet we send

MESSAGES: list[list[dict[str, Any]]] = [
    [],
    [{"t": "ping", "seq": 1, "target": "node-b", "t0": 1700000000.25}],
    [{"t": "ack", "seq": 1, "t1": None, "t2": None}, {"t": "alive", "inc": 3, "node": "n"}],
    [{"t": "x", "text": "héllo ✓ 日本", "bin": b"\x00\xff" * 50, "empty": b""}],
    [{"t": "x", "ints": [0, -1, 2**32, 2**64 - 1, -(2**63)], "f": [-0.0, math.inf, 1.5]}],
    [{"t": "x", "nested": {"a": {"b": [1, {"c": None}, []]}}, "flag": True}],
    [{"t": f"m{i}", "i": i} for i in range(40)],  # array16 header
]


def body(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def nested(depth: int) -> dict[str, Any]:
    """A message whose maps and lists nest ``depth`` levels, counting the message as 1."""
    inner: Any = 0
    for level in range(depth - 1, 0, -1):
        inner = {"k": inner} if level % 2 else [inner]
    return {"t": "deep", "v": inner}


# ----------------------------------------------------------------------- packets
@pytest.mark.parametrize("messages", MESSAGES)
def test_packet_round_trip(messages: list[dict[str, Any]]) -> None:
    data = encode_packet(messages)
    assert data[:4] == V1
    assert decode_packet(data) == Packet(PROTOCOL_VERSION, messages)
    assert msgpack.unpackb(data[4:], raw=False) == messages  # the body is plain msgpack


def test_header_layout_is_fixed() -> None:
    assert MAGIC == b"MQ" and PROTOCOL_VERSION == 1
    assert wire.HEADER.size == 4
    assert encode_packet([{"t": "p"}]) == b"MQ\x01\x00" + body([{"t": "p"}])


BAD_PACKETS: dict[str, tuple[bytes, str]] = {
    "empty": (b"", "magic"),
    "one-byte": (b"M", "magic"),
    "magic-only": (b"MQ", "magic"),
    "wrong-magic": (b"QM\x01\x00" + body([]), "magic"),
    "client-frame": (encode_frame({"op": "send"}), "magic"),
    "version-0": (b"MQ\x00\x00" + body([]), "version 0"),
    "no-flags": (b"MQ\x01", "header"),
    "no-body": (V1, "msgpack"),
    "encrypted-flag": (b"MQ\x01\x01" + body([]), "cluster key"),
    "unknown-flag": (b"MQ\x01\x80" + body([]), "flags 0x80"),
    "truncated-body": (V1 + body([{"t": "p", "s": "hello"}])[:-1], "msgpack"),
    "trailing-data": (V1 + body([]) + body([]), "msgpack"),
    "invalid-utf8": (V1 + b"\x91\x81\xa1t\xa2\xc3\x28", "msgpack"),
    "reserved-byte": (V1 + b"\xc1", "msgpack"),
    "body-is-map": (V1 + body({"t": "p"}), "array"),
    "body-is-int": (V1 + body(5), "array"),
    "message-is-int": (V1 + body([1]), "map"),
    "message-is-list": (V1 + body([[{"t": "p"}]]), "map"),
    "message-is-str": (V1 + body(["ping"]), "map"),
    "message-is-nil": (V1 + body([None]), "map"),
    "second-message-bad": (V1 + body([{"t": "p"}, 7]), "map"),
    "missing-t": (V1 + body([{"seq": 1}]), "'t'"),
    "t-not-str": (V1 + body([{"t": 1}]), "'t'"),
    "t-is-bytes": (V1 + body([{"t": b"ping"}]), "'t'"),
    "t-empty": (V1 + body([{"t": ""}]), "'t'"),
    "bytes-key": (V1 + body([{"t": "p", b"k": 1}]), "keys"),
    "nested-bytes-key": (V1 + body([{"t": "p", "a": [{b"k": 1}]}]), "keys"),
    "int-key": (V1 + body([{"t": "p", 1: 1}]), "msgpack"),
    "array-key": (V1 + b"\x91\x82\xa1t\xa1p\x91\x01\x01", "msgpack"),
    "ext-type": (V1 + body([{"t": "p", "x": msgpack.ExtType(5, b"ab")}]), "ExtType"),
    "timestamp": (V1 + body([{"t": "p", "x": msgpack.Timestamp(1, 0)}]), "Timestamp"),
    "too-deep": (V1 + body([nested(MAX_DEPTH + 1)]), "deeper"),
    "very-deep": (V1 + b"\x91\x82\xa1t\xa1p\xa1v" + b"\x91" * 60_000 + b"\xc0", "msgpack|deeper"),
}


@pytest.mark.parametrize(("data", "match"), BAD_PACKETS.values(), ids=BAD_PACKETS.keys())
def test_bad_packet_is_a_peer_protocol_error(data: bytes, match: str) -> None:
    with pytest.raises(PeerProtocolError, match=match) as info:
        decode_packet(data)
    assert type(info.value) is PeerProtocolError  # not UnsupportedVersion


def test_nesting_up_to_max_depth_is_accepted() -> None:
    message = nested(MAX_DEPTH)
    assert decode_packet(encode_packet([message])).messages == [message]


def test_oversize_packet_is_refused_before_decoding() -> None:
    data = encode_packet([{"t": "p", "pad": b"x" * 100}])
    assert decode_packet(data, max_size=len(data)).messages[0]["pad"] == b"x" * 100
    with pytest.raises(PeerProtocolError, match="exceeds"):
        decode_packet(data, max_size=len(data) - 1)
    with pytest.raises(PeerProtocolError, match="exceeds"):
        decode_packet(b"MQ\x01\x00" + b"\x00" * wire.MAX_DATAGRAM)


@pytest.mark.parametrize("version", [2, 7, 255])
def test_newer_version_is_unsupported_and_names_it(version: int) -> None:
    # Whatever follows the version byte: a newer layout is not ours to read.
    for rest in (b"", b"\x00" + body([{"t": "p"}]), b"\xff\xfe garbage"):
        with pytest.raises(UnsupportedVersion) as info:
            decode_packet(MAGIC + bytes([version]) + rest)
        assert info.value.version == version
        assert isinstance(info.value, PeerProtocolError)
        assert f"version {version}" in str(info.value) and "newer" in str(info.value)


def test_every_version_from_min_to_ours_is_accepted() -> None:
    """The rule: MIN_PROTOCOL_VERSION..PROTOCOL_VERSION decode (only 1 exists today)."""
    for version in range(wire.MIN_PROTOCOL_VERSION, PROTOCOL_VERSION + 1):
        data = encode_packet([{"t": "p"}], version=version)
        assert data[2] == version
        assert decode_packet(data) == Packet(version, [{"t": "p"}])


def test_peer_errors_are_distinct_from_client_errors() -> None:
    assert issubclass(PeerProtocolError, ProtocolError)
    assert not issubclass(ProtocolError, PeerProtocolError)
    client = FrameDecoder()
    client.feed(FRAME_HEADER.pack(1) + b"\xc1")
    with pytest.raises(ProtocolError) as info:
        client.next_frame()
    assert not isinstance(info.value, PeerProtocolError)


@pytest.mark.parametrize("version", [0, PROTOCOL_VERSION + 1, 256])
def test_encode_refuses_versions_we_cannot_speak(version: int) -> None:
    with pytest.raises(ValueError, match="version"):
        encode_packet([{"t": "p"}], version=version)
    with pytest.raises(ValueError, match="version"):
        split_messages([{"t": "p"}], version=version)


@pytest.mark.parametrize("message", [{}, {"seq": 1}, {"t": 1}, {"t": b"p"}, ["t", "p"], "p"])
def test_encode_refuses_messages_without_a_type(message: Any) -> None:
    with pytest.raises(ValueError, match="'t'"):
        encode_packet([message])
    with pytest.raises(ValueError, match="'t'"):
        split_messages([message])


# ----------------------------------------------------------------------- fuzzing
_scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=8)
    | st.binary(max_size=8)
)
_keys = st.text(max_size=4) | st.binary(max_size=4)  # bytes keys must be refused


def _values_with(keys: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.recursive(
        _scalars,
        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(keys, inner, max_size=3),
        max_leaves=20,
    )


_values = _values_with(_keys)
_valid_values = _values_with(st.text(max_size=4))
_messages = st.one_of(
    st.dictionaries(_keys, _values, max_size=4),  # mostly no "t"
    st.builds(lambda d, t: {**d, "t": t}, st.dictionaries(_keys, _values, max_size=3),
              st.text(max_size=5) | st.integers(-5, 5) | st.binary(max_size=3)),
    _values,  # non-map messages
)


def _decodes_or_peer_error(data: bytes, max_size: int = wire.MAX_DATAGRAM) -> Packet | None:
    try:
        packet = decode_packet(data, max_size=max_size)
    except PeerProtocolError:
        return None
    assert isinstance(packet.version, int) and isinstance(packet.messages, list)
    for message in packet.messages:
        assert isinstance(message, dict) and isinstance(message["t"], str) and message["t"]
    return packet


@settings(max_examples=400)
@given(data=st.one_of(
    st.binary(max_size=200),
    st.binary(max_size=200).map(lambda b: V1 + b),
    st.binary(max_size=200).map(lambda b: MAGIC + b),
))
def test_fuzz_any_bytes_decode_or_raise_peer_error(data: bytes) -> None:
    _decodes_or_peer_error(data)


def _oracle_ok(value: Any, depth: int) -> bool:
    """Independent statement of the rule: str keys only, at most MAX_DEPTH levels."""
    if isinstance(value, dict):
        return depth <= MAX_DEPTH and all(
            isinstance(k, str) and _oracle_ok(v, depth + 1) for k, v in value.items())
    if isinstance(value, list):
        return depth <= MAX_DEPTH and all(_oracle_ok(v, depth + 1) for v in value)
    return True


@settings(max_examples=150, suppress_health_check=[HealthCheck.too_slow])
@given(body_obj=st.one_of(st.lists(_messages, max_size=4), _values), deep=st.integers(0, 40))
def test_fuzz_structured_bodies(body_obj: Any, deep: int) -> None:
    """msgpack that is well-formed but of any shape: bytes keys, non-map messages, missing
    or non-str "t", deep nesting. Decodes exactly when every message is valid."""
    if deep and isinstance(body_obj, list) and body_obj and isinstance(body_obj[0], dict):
        body_obj[0] = {**body_obj[0], "deep": nested(deep)["v"]}
    valid = isinstance(body_obj, list) and all(
        isinstance(m, dict) and isinstance(m.get("t"), str) and m["t"] and _oracle_ok(m, 1)
        for m in body_obj
    )
    packet = _decodes_or_peer_error(V1 + body(body_obj))
    assert (packet is not None) == valid
    if packet is not None:
        assert packet.messages == body_obj


@settings(max_examples=100)
@given(
    messages=st.lists(
        st.builds(lambda d, t: {**d, "t": t},
                  st.dictionaries(st.text(max_size=4), _valid_values, max_size=3),
                  st.text(min_size=1, max_size=5)),
        max_size=6,
    ),
    cut=st.integers(0, 10_000),
    flip=st.integers(0, 10_000),
)
def test_fuzz_mutated_valid_packets(messages: list[dict[str, Any]], cut: int, flip: int) -> None:
    data = encode_packet(messages)
    assert decode_packet(data).messages == messages
    _decodes_or_peer_error(data[: cut % (len(data) + 1)])
    mutated = bytearray(data)
    mutated[flip % len(data)] ^= 1 + flip % 255
    _decodes_or_peer_error(bytes(mutated))


# ----------------------------------------------------------------------- splitting
def _msg(i: int, pad: int) -> dict[str, Any]:
    return {"t": "alive", "i": i, "pad": b"x" * pad}


def test_split_nothing_gives_no_packets() -> None:
    assert split_messages([]) == []


def test_split_small_messages_share_one_packet() -> None:
    messages = [_msg(i, 10) for i in range(20)]
    (packet,) = split_messages(messages)
    assert len(packet) <= DEFAULT_MAX_PACKET_BYTES
    assert decode_packet(packet).messages == messages


def test_split_message_filling_a_packet_exactly_fits_alone() -> None:
    overhead = len(encode_packet([_msg(0, 0)]))
    exact = _msg(0, DEFAULT_MAX_PACKET_BYTES - overhead - 1)  # bin8 -> bin16 adds 1 byte
    assert len(encode_packet([exact])) == DEFAULT_MAX_PACKET_BYTES
    assert split_messages([exact, _msg(1, 0)]) == [encode_packet([exact]),
                                                   encode_packet([_msg(1, 0)])]
    with pytest.raises(ValueError, match="does not fit"):
        split_messages([_msg(1, 0), _msg(0, DEFAULT_MAX_PACKET_BYTES)])


def test_split_refuses_a_message_larger_than_the_limit() -> None:
    big = _msg(0, 200)
    with pytest.raises(ValueError, match="'alive' message of"):
        split_messages([_msg(1, 1), big], max_packet_bytes=100)


@settings(max_examples=200)
@given(
    sizes=st.lists(st.integers(0, 300), max_size=60),
    limit=st.sampled_from([64, 200, 512, DEFAULT_MAX_PACKET_BYTES]),
)
def test_split_property(sizes: list[int], limit: int) -> None:
    """Packets fit, keep every message in order, and are full: the next packet's first
    message would not have fitted in the one before (so greedy gives the fewest)."""
    messages = [_msg(i, n) for i, n in enumerate(sizes)]
    try:
        packets = split_messages(messages, max_packet_bytes=limit)
    except ValueError:
        assert any(len(encode_packet([m])) > limit for m in messages)
        return
    decoded = [decode_packet(p).messages for p in packets]
    assert list(itertools.chain.from_iterable(decoded)) == messages
    assert all(len(p) <= limit for p in packets) and all(decoded)
    for this, following in itertools.pairwise(decoded):
        assert len(encode_packet([*this, following[0]])) > limit


# ----------------------------------------------------------------------- streams
def test_hello_round_trip_through_a_stream() -> None:
    frames = [hello_frame("prod", "node-a"), {"t": "push_pull", "members": [["a", 1]]}]
    dec = PeerFrameDecoder()
    for byte in b"".join(encode_frame(f) for f in frames):
        dec.feed(bytes([byte]))
    got = list(dec.frames())
    assert got == frames
    assert got[0] == {"t": "hello", "v": PROTOCOL_VERSION, "cluster": "prod", "node": "node-a"}
    assert check_hello(got[0], "prod") == PROTOCOL_VERSION
    assert got[0]["node"] == "node-a"


def test_hello_from_another_cluster_is_refused_clearly() -> None:
    with pytest.raises(PeerProtocolError) as info:
        check_hello(hello_frame("staging", "node-b"), "prod")
    assert type(info.value) is PeerProtocolError
    text = str(info.value)
    assert "'node-b'" in text and "'staging'" in text and "'prod'" in text


@pytest.mark.parametrize("version", [2, 99])
def test_hello_from_a_newer_node_is_unsupported(version: int) -> None:
    frame = {"t": "hello", "v": version, "cluster": "prod", "node": "n", "extra": [1]}
    with pytest.raises(UnsupportedVersion) as info:
        check_hello(frame, "prod")
    assert info.value.version == version
    # A newer node is told apart before its cluster (a newer hello may differ).
    with pytest.raises(UnsupportedVersion):
        check_hello({"t": "hello", "v": version}, "prod")


BAD_HELLOS: dict[str, dict[str, Any]] = {
    "not-hello": {"t": "ping", "v": 1, "cluster": "prod", "node": "n"},
    "no-type": {"v": 1, "cluster": "prod", "node": "n"},
    "no-version": {"t": "hello", "cluster": "prod", "node": "n"},
    "version-0": {"t": "hello", "v": 0, "cluster": "prod", "node": "n"},
    "version-str": {"t": "hello", "v": "1", "cluster": "prod", "node": "n"},
    "version-bool": {"t": "hello", "v": True, "cluster": "prod", "node": "n"},
    "no-node": {"t": "hello", "v": 1, "cluster": "prod"},
    "empty-node": {"t": "hello", "v": 1, "cluster": "prod", "node": ""},
    "node-bytes": {"t": "hello", "v": 1, "cluster": "prod", "node": b"n"},
    "no-cluster": {"t": "hello", "v": 1, "node": "n"},
    "cluster-bytes": {"t": "hello", "v": 1, "cluster": b"prod", "node": "n"},
}


@pytest.mark.parametrize("frame", BAD_HELLOS.values(), ids=BAD_HELLOS.keys())
def test_bad_hello_is_a_peer_protocol_error(frame: dict[str, Any]) -> None:
    with pytest.raises(PeerProtocolError) as info:
        check_hello(frame, "prod")
    assert type(info.value) is PeerProtocolError


def test_hello_frame_refuses_what_it_cannot_say() -> None:
    with pytest.raises(ValueError):
        hello_frame("prod", "n", version=PROTOCOL_VERSION + 1)
    with pytest.raises(ValueError):
        hello_frame("", "n")
    with pytest.raises(ValueError):
        hello_frame("prod", "")


STREAM_GARBAGE: dict[str, bytes] = {
    "oversize": FRAME_HEADER.pack(1 << 30),
    "not-msgpack": FRAME_HEADER.pack(1) + b"\xc1",
    "not-a-map": FRAME_HEADER.pack(2) + b"\x91\x01",
    "no-type": encode_frame({"seq": 1}),
    "bytes-key": FRAME_HEADER.pack(5) + b"\x81\xc4\x01k\x01",
    "ext-type": FRAME_HEADER.pack(len(body({"t": "p", "x": msgpack.ExtType(1, b"")})))
    + body({"t": "p", "x": msgpack.ExtType(1, b"")}),
}


@pytest.mark.parametrize("data", STREAM_GARBAGE.values(), ids=STREAM_GARBAGE.keys())
def test_peer_stream_errors_are_peer_protocol_errors(data: bytes) -> None:
    dec = PeerFrameDecoder()
    dec.feed(encode_frame({"t": "ok"}) + data)
    assert dec.next_frame() == {"t": "ok"}
    with pytest.raises(PeerProtocolError):
        dec.next_frame()


@settings(max_examples=300)
@given(data=st.binary(max_size=200), chunk=st.integers(1, 17))
def test_fuzz_peer_stream(data: bytes, chunk: int) -> None:
    dec = PeerFrameDecoder(max_frame=128)
    try:
        for i in range(0, len(data), chunk):
            dec.feed(data[i : i + chunk])
            for frame in dec.frames():
                assert isinstance(frame, dict) and isinstance(frame["t"], str)
    except PeerProtocolError:
        pass


def test_all_is_the_public_surface() -> None:
    for name in wire.__all__:
        assert hasattr(wire, name), name
    assert FLAG_ENCRYPTED == 1
