"""Unit tests for meshq.protocol.codec: length-prefixed msgpack frames, no I/O."""

from __future__ import annotations

import itertools
import math
from typing import Any

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from meshq.errors import FrameTooLarge, ProtocolError, TooLarge
from meshq.protocol.codec import HEADER, FrameDecoder, decode_frame, encode_frame

TYPICAL: list[dict[str, Any]] = [
    {},
    {"op": "send", "id": 7, "queue": "jobs"},
    {"ints": [0, 1, -1, 127, 128, -33, 2**32, 2**64 - 1, -(2**63)]},
    {"text": "héllo ✓ 日本", "empty": ""},
    {"body": b"\x00\xff" * 300, "empty": b""},
    {"nested": {"a": {"b": [1, 2, {"c": None}]}, "d": {}}},
    {"mixed": [1, "x", b"y", True, False, None, 1.5, -0.0, math.inf, []]},
]


def raw_frame(payload: bytes) -> bytes:
    """A frame holding arbitrary payload bytes (valid or not)."""
    return HEADER.pack(len(payload)) + payload


def drain(dec: FrameDecoder) -> list[dict[str, Any]]:
    """Every whole frame buffered now, via next_frame (as the server reads them)."""
    out = []
    while (frame := dec.next_frame()) is not None:
        out.append(frame)
    return out


@pytest.mark.parametrize("obj", TYPICAL)
def test_encode_decode_round_trip(obj: dict[str, Any]) -> None:
    frame = encode_frame(obj)
    (length,) = HEADER.unpack(frame[:4])
    assert length == len(frame) - 4
    assert decode_frame(frame[4:]) == obj
    dec = FrameDecoder()
    dec.feed(frame)
    assert list(dec.frames()) == [obj]
    assert dec.pending() == 0


def test_byte_at_a_time() -> None:
    """One byte per feed yields exactly the frames, in order, and nothing is left over."""
    stream = b"".join(encode_frame(obj) for obj in TYPICAL)
    dec = FrameDecoder()
    got: list[dict[str, Any]] = []
    for i in range(len(stream)):
        dec.feed(stream[i : i + 1])
        got.extend(dec.frames())
    assert got == TYPICAL
    assert dec.pending() == 0


def test_split_at_every_boundary() -> None:
    frames = [{"a": 1}, {"b": b"xyz", "c": [1, 2]}, {}]
    stream = b"".join(encode_frame(f) for f in frames)
    for cut in range(len(stream) + 1):
        dec = FrameDecoder()
        dec.feed(stream[:cut])
        got = list(dec.frames())
        dec.feed(stream[cut:])
        got += list(dec.frames())
        assert got == frames, f"cut at {cut}"
        assert dec.pending() == 0


def test_pending_counts_partial_frame() -> None:
    frame = encode_frame({"k": "v"})
    dec = FrameDecoder()
    dec.feed(frame + frame[:3])
    assert dec.next_frame() == {"k": "v"}
    assert dec.next_frame() is None
    assert dec.pending() == 3


def test_too_large_is_refused_before_the_body() -> None:
    dec = FrameDecoder(max_frame=16)
    dec.feed(HEADER.pack(17)[:3])
    assert dec.next_frame() is None  # header incomplete: no verdict yet
    dec.feed(HEADER.pack(17)[3:])  # header only, no body at all
    with pytest.raises(FrameTooLarge) as info:
        dec.next_frame()
    assert isinstance(info.value, ProtocolError)
    assert isinstance(info.value, TooLarge)
    assert info.value.code == "TOO_LARGE"


def test_huge_length_prefix_is_refused() -> None:
    dec = FrameDecoder()
    dec.feed(b"\xff\xff\xff\xff")
    with pytest.raises(FrameTooLarge):
        dec.next_frame()


def test_frame_of_exactly_max_frame_is_accepted() -> None:
    obj = {"b": b"x" * 50}
    frame = encode_frame(obj)
    dec = FrameDecoder(max_frame=len(frame) - 4)
    dec.feed(frame)
    assert list(dec.frames()) == [obj]


def test_good_frames_before_a_bad_one_are_delivered() -> None:
    dec = FrameDecoder()
    dec.feed(encode_frame({"ok": 1}) + raw_frame(msgpack.packb([1, 2])))
    assert dec.next_frame() == {"ok": 1}
    with pytest.raises(ProtocolError):
        dec.next_frame()


@pytest.mark.parametrize("value", [[1, 2], 5, "text", b"bin", None, True, 1.5, [{}]])
def test_non_map_payload_is_a_protocol_error(value: Any) -> None:
    payload = msgpack.packb(value, use_bin_type=True)
    with pytest.raises(ProtocolError, match="map"):
        decode_frame(payload)
    dec = FrameDecoder()
    dec.feed(raw_frame(payload))
    with pytest.raises(ProtocolError):
        dec.next_frame()


BAD_PAYLOADS = {
    "empty": b"",
    "invalid-utf8-value": b"\x81\xa1a\xa2\xc3\x28",
    "invalid-utf8-key": b"\x81\xa1\xff\x01",
    "truncated": msgpack.packb({"a": "hello", "b": [1, 2, 3]})[:-1],
    "truncated-header-only": b"\x82",
    "trailing-data": msgpack.packb({}) + msgpack.packb({}),
    "int-key": msgpack.packb({1: "x"}),
    "nested-int-key": msgpack.packb({"a": {2: "x"}}),
    "nil-key": msgpack.packb({None: 1}),
    "float-key": msgpack.packb({1.5: 1}),
    "array-key": b"\x81\x91\x01\x01",
    "reserved-byte": b"\x81\xa1a\xc1",
    "deep-nesting": b"\x81\xa1a" + b"\x91" * 100_000 + b"\xc0",
}


@pytest.mark.parametrize("payload", BAD_PAYLOADS.values(), ids=BAD_PAYLOADS.keys())
def test_bad_payload_is_a_protocol_error(payload: bytes) -> None:
    with pytest.raises(ProtocolError):
        decode_frame(payload)
    dec = FrameDecoder()
    dec.feed(raw_frame(payload))
    with pytest.raises(ProtocolError):
        dec.next_frame()


@pytest.mark.parametrize("obj", [{b"k": 1}, {"a": {b"k": 1}}], ids=["top", "nested"])
def test_bytes_map_key_is_a_protocol_error(obj: dict[Any, Any]) -> None:
    with pytest.raises(ProtocolError):
        decode_frame(msgpack.packb(obj, use_bin_type=True))


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    """``data`` cut at the given offsets (sorted, clamped, duplicates allowed)."""
    points = [0, *sorted(min(c, len(data)) for c in cuts), len(data)]
    return [data[a:b] for a, b in itertools.pairwise(points)]


_framed_garbage = st.lists(st.binary(max_size=40), max_size=6).map(
    lambda payloads: b"".join(raw_frame(p) for p in payloads)
)


@given(
    data=st.one_of(st.binary(max_size=300), _framed_garbage),
    cuts=st.lists(st.integers(0, 300), max_size=8),
    max_frame=st.sampled_from([0, 8, 64, 1 << 20]),
)
def test_fuzz_any_bytes_yield_frames_or_protocol_error(
    data: bytes, cuts: list[int], max_frame: int
) -> None:
    """Arbitrary bytes in arbitrary chunks: dict frames, or ProtocolError, nothing else."""
    dec = FrameDecoder(max_frame=max_frame)
    try:
        for chunk in split(data, cuts):
            dec.feed(chunk)
            while (frame := dec.next_frame()) is not None:
                assert isinstance(frame, dict)
    except ProtocolError:
        pass


_scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=False)
    | st.text()
    | st.binary()
)
_values = st.recursive(
    _scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20,
)
_dicts = st.dictionaries(st.text(), _values, max_size=6)


@given(objs=st.lists(_dicts, max_size=6), cuts=st.lists(st.integers(0, 2_000), max_size=10))
def test_round_trip_in_random_chunks(objs: list[dict[str, Any]], cuts: list[int]) -> None:
    stream = b"".join(encode_frame(obj) for obj in objs)
    dec = FrameDecoder()
    got: list[dict[str, Any]] = []
    for chunk in split(stream, cuts):
        dec.feed(chunk)
        got.extend(dec.frames())
    assert got == objs
    # Byte-identical re-encoding also tells True from 1 and -0.0 from 0.0.
    assert b"".join(encode_frame(obj) for obj in got) == stream
    assert dec.pending() == 0
