"""The change vocabulary's codec (meshq.cluster.changes): every value round-trips, and
anything a peer can send decodes or raises PeerProtocolError, nothing else."""

from __future__ import annotations

import msgpack
from hypothesis import given, settings
from hypothesis import strategies as st

from meshq.cluster.changes import (
    ApplyAnswer,
    ApplyReq,
    CatalogAnswer,
    CatalogReq,
    Decl,
    Dedup,
    DigestAnswer,
    DigestReq,
    Drop,
    FetchAnswer,
    FetchReq,
    Move,
    MovesAnswer,
    MovesReq,
    Progress,
    PromiseAnswer,
    PromiseReq,
    Put,
    Record,
    Step,
    Tally,
    Tomb,
    decode,
    encode,
)
from meshq.mesh.wire import PeerProtocolError

P = Progress(2, 3, 1.5, 40.25, 77, (5 << 32) | 9, 4, "n1/abc")
R = Record("0001-abcd", "jobs", 0, 12, 1 << 40, "abcd", b"body", b"\x80", 99.5, P)
TOMB = Tomb("jobs", 0, "0002-abcd", 12.0)
CHANGES = (Put(R), Put(R, "d-1", 300.0), Step("jobs", 0, R.id, P), TOMB,
           Dedup("jobs", "d-1", R.id, 300.0),
           Tally("jobs", 0, "abcd", 1, 2, 3), Decl("jobs", 12, {"replicas": 3}),
           Drop("jobs", 12, 7.0))
VALUES = [
    ApplyReq((("jobs", 0, 5),), CHANGES),
    ApplyReq((("jobs", 1, 5),), (), (("jobs", 1, 1 << 60),)),  # a closed bound alone
    ApplyAnswer((("jobs", 0, 9),), (("jobs", 0, "x-1"),), (TOMB,)),
    ApplyAnswer(),
    PromiseReq("jobs", 0, 7, Decl("jobs", 12, {})),
    PromiseReq("jobs", 0, 7, None),
    PromiseAnswer(True, 7, False),
    PromiseAnswer(True, 7, True, 1 << 60),
    DigestReq("jobs", 0, None, tuple(range(64))),
    DigestAnswer(((3, (("m1", (1, 2, 3, 0, -1.0, 0.0, 0, "")),)),)),
    FetchReq("jobs", 0, ("m1", "m2")),
    FetchAnswer((R,), (TOMB,)),
    CatalogReq(123, (Decl("a", 1, {}), Drop("b", 2, 1.0))),
    CatalogAnswer(5, None),
    MovesReq(),
    MovesAnswer(("a", "b"), True, (Move("jobs", 3, "copy", "a", "b", "copying", 50, 20, 1.5),
                                   Move("jobs", 0, "takeover", "", "a", "reading", 0, 0,
                                        0.0))),
    MovesAnswer((), False, ()),
]


def roundtrip(value):
    wire = msgpack.unpackb(msgpack.packb(encode(value), use_bin_type=True), raw=False)
    return decode(wire)


def test_every_value_round_trips_through_msgpack() -> None:
    for value in VALUES:
        assert roundtrip(value) == value


def test_closed_bounds_are_keys_a_node_of_the_previous_version_ignores() -> None:
    """(A frame is a map: an earlier version reads the keys it knows and no others.) A
    frame from such a node decodes with no bound; one without bounds has no ``b``."""
    req = encode(ApplyReq((("jobs", 1, 5),), (TOMB,), (("jobs", 1, 99),)))
    assert req["b"] == [["jobs", 1, 99]]
    assert decode({k: v for k, v in req.items() if k != "b"}) == ApplyReq(
        (("jobs", 1, 5),), (TOMB,))
    assert "b" not in encode(ApplyReq((), (TOMB,)))
    answer = encode(PromiseAnswer(True, 7, True, 99))
    assert answer["b"] == 99
    assert decode({k: v for k, v in answer.items() if k != "b"}) == PromiseAnswer(True, 7, True)


PUT = encode(ApplyReq((), (Put(R),)))["c"][0]  # ["P", record]


def test_a_wrong_shape_is_a_peer_protocol_error() -> None:
    bad = [
        None, 3, {}, {"t": "nope"}, {"t": "apply"}, {"t": "apply", "e": [], "c": [["P"]]},
        {"t": "apply", "e": [["q", 0, -1]], "c": []},
        {"t": "apply", "e": [], "c": [["S", "q", 0, "m", [9, 0, 0.0, None, 0, 0, 0, ""]]]},
        {"t": "apply", "e": [], "c": [["T", "q", 0, "m", float("nan")]]},
        {"t": "apply", "e": [], "c": [["Q", "q", 1, {1: 2}]]},
        {"t": "promise", "q": "", "i": 0, "e": 1, "d": None},
        {"t": "promised", "ok": 1, "p": 0, "c": False},
        {"t": "digested", "diff": [[0, [["m", [1, 2]]]]]},
        {"t": "fetched", "r": [], "x": [["P", []]]},
        {"t": "catalog", "h": 0, "c": [["T", "q", 0, "m", 1.0]]},
        {"t": "apply", "e": [], "c": [[*PUT, 5, 1.0]]},  # a dedup id that is not a string
        {"t": "apply", "e": [], "c": [[*PUT, "d", float("inf")]]},
        {"t": "apply", "e": [], "c": [[*PUT, "d"]]},
        {"t": "moving", "l": ["a"], "c": 1, "m": []},
        {"t": "moving", "l": [""], "c": True, "m": []},
        {"t": "moving", "l": [], "c": True, "m": [["q", 0, "copy", "a", "b", "done", -1, 0,
                                                   0.0]]},
        {"t": "moving", "l": [], "c": True, "m": [["q", 0, "copy", 5, "b", "done", 1, 0,
                                                   0.0]]},
        {"t": "moving", "l": [], "c": True, "m": [["q", 0, "copy", "a", "b"]]},
    ]
    for frame in bad:
        try:
            decode(frame)
        except PeerProtocolError:
            continue
        raise AssertionError(f"decoded {frame!r}")


wire_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats()
    | st.text(max_size=8) | st.binary(max_size=8),
    lambda inner: st.lists(inner, max_size=6)
    | st.dictionaries(st.text(max_size=3), inner, max_size=5),
    max_leaves=25,
)
tags = st.sampled_from(["apply", "applied", "promise", "promised", "digest", "digested",
                        "fetch", "fetched", "catalog", "cataloged", "moves", "moving"])


@given(tags, st.dictionaries(st.sampled_from(["e", "c", "f", "m", "x", "q", "i", "d", "ok",
                                              "p", "s", "diff", "ids", "r", "h", "l"]),
                             wire_values, max_size=6))
@settings(max_examples=600)
def test_fuzzed_frames_decode_or_raise_our_error(tag, fields) -> None:
    try:
        decode({"t": tag, **fields})
    except PeerProtocolError:
        pass


@given(st.sampled_from(VALUES), st.data())
@settings(max_examples=300)
def test_mutated_valid_frames_decode_or_raise_our_error(value, data) -> None:
    frame = msgpack.unpackb(msgpack.packb(encode(value), use_bin_type=True), raw=False)
    key = data.draw(st.sampled_from(sorted(frame)))
    frame[key] = data.draw(wire_values)
    try:
        decode(frame)
    except PeerProtocolError:
        pass
