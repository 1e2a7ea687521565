"""Unit tests for meshq.mesh.ring: hand-computable toy rings, pinned mmh3 positions, balance
and movement on real rings, and hypothesis properties tying placement to the range views."""

from __future__ import annotations

from collections.abc import Callable
from itertools import pairwise

import mmh3
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshq.mesh.ring import (
    DEFAULT_VNODES,
    RING_SIZE,
    KeyRange,
    RangeChange,
    Ring,
    mmh3_position,
    moved_fraction,
    ranges_changed,
    vnode_label,
)

TOP = RING_SIZE - 1

# -- a toy position function: vnode labels from a table, every other key is a decimal number --

TOY_POINTS: dict[bytes, int] = {
    # ring order: 10 a, 20 b, 40 c, 60 a, 70 b, 90 c
    b"a#0": 10, b"a#1": 60, b"b#0": 20, b"b#1": 70, b"c#0": 40, b"c#1": 90,
    b"d#0": 50,
    # adjacent points of one node: 10 p, 20 p, 30 q, 50 r
    b"p#0": 10, b"p#1": 20, b"q#0": 30, b"r#0": 50,
    # a tie at 100 between x and y
    b"x#0": 100, b"y#0": 100, b"z#0": 200,
    # points just past 0 and just before the top, for wrap-around
    b"w#0": 5, b"w#1": TOP - 4, b"m#0": 50, b"n#0": 10,
}  # fmt: skip


def toy(data: bytes) -> int:
    return TOY_POINTS[data] if data in TOY_POINTS else int(data)


def toy_ring(spec: dict[str, int]) -> Ring:
    return Ring.build(spec, position_fn=toy)


ABC = {"a": 2, "b": 2, "c": 2}


# -- the hash rule is a cluster-wide contract -------------------------------------------------


def test_position_rule_is_pinned() -> None:
    """Changing these numbers changes where every message lives: a cluster-wide migration."""
    assert vnode_label("node-a", 0) == b"node-a#0"
    assert vnode_label("a#1", 2) == b"a#1#2"
    assert mmh3_position(b"node-a#0") == 7444514747090285596
    assert mmh3_position(b"node-a#127") == 4313978031188625318
    assert mmh3_position(b"orders/42") == 13931499440729738280
    assert mmh3_position(b"") == 0
    for data in (b"node-a#0", b"orders/42", "é".encode()):
        assert mmh3_position(data) == mmh3.hash128(data, signed=False) & (RING_SIZE - 1)
    ring = Ring.build(["node-a", "node-b", "node-c", "node-d", "node-e"])
    assert ring.key_position("é") == 14490466646156927976 == ring.key_position("é".encode())
    assert ring.preference_list("orders/1", 3) == ["node-c", "node-a", "node-d"]
    assert ring.preference_list("orders/2", 3) == ["node-e", "node-a", "node-b"]
    assert ring.preference_list(b"orders/3", 3) == ["node-b", "node-c", "node-a"]
    assert ring.points[0] == min(ring.points)
    assert len(ring.points) == 5 * DEFAULT_VNODES


# -- table tests on toy rings -----------------------------------------------------------------

PREFERENCE_TABLE: list[tuple[dict[str, int], str, int, list[str]]] = [
    # ring, key (its position), n, expected preference list
    (ABC, "0", 3, ["a", "b", "c"]),
    (ABC, "10", 3, ["a", "b", "c"]),  # a point owns its own position
    (ABC, "11", 3, ["b", "c", "a"]),
    (ABC, "40", 1, ["c"]),
    (ABC, "41", 2, ["a", "b"]),
    (ABC, "65", 3, ["b", "c", "a"]),
    (ABC, "90", 3, ["c", "a", "b"]),  # walks through the wrap to 10 a, 20 b
    (ABC, "91", 2, ["a", "b"]),  # past the last point: wraps to the first
    (ABC, str(TOP), 1, ["a"]),
    (ABC, "11", 5, ["b", "c", "a"]),  # n above the node count: every node once
    ({"p": 2, "q": 1, "r": 1}, "5", 2, ["p", "q"]),  # p#1 at 20 is skipped
    ({"p": 2, "q": 1, "r": 1}, "5", 3, ["p", "q", "r"]),
    ({"p": 2, "q": 1, "r": 1}, "15", 2, ["p", "q"]),
    ({"p": 2, "q": 1, "r": 1}, "25", 3, ["q", "r", "p"]),
    ({"p": 2, "q": 1, "r": 1}, "55", 2, ["p", "q"]),
    ({"p": 2, "q": 1, "r": 1}, "55", 1, ["p"]),
    ({"a": 1}, "12345", 3, ["a"]),
    ({"x": 1, "y": 1, "z": 1}, "100", 3, ["x", "y", "z"]),  # tie: smaller id first
    ({"x": 1, "y": 1, "z": 1}, "150", 2, ["z", "x"]),
    ({}, "7", 3, []),
]


@pytest.mark.parametrize(("spec", "key", "n", "expected"), PREFERENCE_TABLE)
def test_preference_list_table(spec: dict[str, int], key: str, n: int, expected: list[str]) -> None:
    ring = toy_ring(spec)
    assert ring.preference_list(key, n) == expected
    assert ring.preference_list(key.encode(), n) == expected
    assert list(ring.preference_at(int(key), n)) == expected
    assert list(ring.successors(key))[:n] == expected
    if expected:
        assert ring.owner(key) == expected[0]


def test_bad_arguments() -> None:
    ring = toy_ring(ABC)
    for n in (0, -1):
        with pytest.raises(ValueError):
            ring.preference_list("1", n)
        with pytest.raises(ValueError):
            ring.ranges(n)
        with pytest.raises(ValueError):
            ranges_changed(ring, ring, n)
    with pytest.raises(LookupError):
        toy_ring({}).owner("1")
    with pytest.raises(ValueError):
        ring.preference_at(RING_SIZE, 1)
    with pytest.raises(ValueError):
        ring.preference_list(str(RING_SIZE), 1)  # the position function broke its contract
    with pytest.raises(TypeError):
        ring.preference_list(7, 1)  # type: ignore[arg-type]
    for bad in ({"a": 0}, {"a": -3}, {"": 1}, {"a": True}):
        with pytest.raises(ValueError):
            Ring.build(bad)
    with pytest.raises(ValueError):
        Ring.build(["a", "b", "a"])
    with pytest.raises(ValueError):
        Ring.build(["a"], vnodes=0)
    with pytest.raises(ValueError):
        ring.with_node("d", 0)
    with pytest.raises(ValueError):
        ranges_changed(ring, Ring.build(["a"]), 1)  # different position functions


def test_toy_ownership_is_the_arc_lengths() -> None:
    ring = toy_ring(ABC)
    # a owns (90, 10] and (40, 60]; b owns (10, 20] and (60, 70]; c the rest.
    a = (RING_SIZE - 90 + 10) + 20
    own = ring.ownership()
    assert own == pytest.approx({"a": a / RING_SIZE, "b": 20 / RING_SIZE, "c": 40 / RING_SIZE})
    assert ring.replica_ownership(3) == {"a": 1.0, "b": 1.0, "c": 1.0}
    # n = 2: b is in the lists of (90, 10], (10, 20], (40, 60] and (60, 70]
    two = ring.replica_ownership(2)
    assert two["b"] == pytest.approx(((RING_SIZE - 90 + 10) + 10 + 20 + 10) / RING_SIZE)
    assert sum(two.values()) == pytest.approx(2.0)
    tie = toy_ring({"x": 1, "y": 1, "z": 1}).ownership()
    assert tie["y"] == 0.0  # its only point is tied with x's, and x < y
    assert toy_ring({}).ownership() == {}
    assert toy_ring({"a": 1}).ownership() == {"a": 1.0}


def test_toy_ranges() -> None:
    ring = toy_ring(ABC)
    assert [(r.range.start, r.range.end, r.replicas) for r in ring.ranges(2)] == [
        (90, 10, ("a", "b")),
        (10, 20, ("b", "c")),
        (20, 40, ("c", "a")),
        (40, 60, ("a", "b")),
        (60, 70, ("b", "c")),
        (70, 90, ("c", "a")),
    ]
    assert [r.range for r in ring.ranges_of("b", 1)] == [KeyRange(10, 20), KeyRange(60, 70)]
    (whole,) = toy_ring({"a": 1}).ranges(3)
    assert whole == toy_ring({"a": 1}).ranges(1)[0]
    assert (whole.range, whole.replicas) == (KeyRange(10, 10), ("a",))
    assert whole.range.length == RING_SIZE
    # the tied point of y owns an empty arc and is left out
    tied = toy_ring({"x": 1, "y": 1, "z": 1}).ranges(1)
    assert [(r.range, r.replicas) for r in tied] == [
        (KeyRange(200, 100), ("x",)),
        (KeyRange(100, 200), ("z",)),
    ]


KEY_RANGE_TABLE: list[tuple[KeyRange, int, bool, list[tuple[int, int]], list[int], list[int]]] = [
    # range, length, wraps, segments, positions inside, positions outside
    (KeyRange(10, 20), 10, False, [(11, 20)], [11, 15, 20], [10, 21, 0, TOP]),
    (KeyRange(20, 10), RING_SIZE - 10, True, [(21, TOP), (0, 10)], [21, TOP, 0, 10], [11, 20]),
    (KeyRange(TOP, 5), 6, True, [(0, 5)], [0, 5], [TOP, 6]),
    (KeyRange(5, TOP), TOP - 5, False, [(6, TOP)], [6, TOP], [5, 0]),
    (KeyRange(7, 7), RING_SIZE, True, [(8, TOP), (0, 7)], [0, 7, 8, TOP], [-1, RING_SIZE]),
    (KeyRange(TOP, TOP), RING_SIZE, True, [(0, TOP)], [0, TOP], []),
]


@pytest.mark.parametrize(("rng", "length", "wraps", "segments", "inside", "outside"),
                         KEY_RANGE_TABLE)  # fmt: skip
def test_key_range_table(
    rng: KeyRange,
    length: int,
    wraps: bool,
    segments: list[tuple[int, int]],
    inside: list[int],
    outside: list[int],
) -> None:
    assert rng.length == length
    assert rng.wraps is wraps
    assert rng.segments() == segments
    assert sum(hi - lo + 1 for lo, hi in segments) == length
    assert all(p in rng for p in inside)
    assert not any(p in rng for p in outside)


# -- comparing rings: hand-computed changes ---------------------------------------------------


Change = tuple[int, int, tuple[str, ...], tuple[str, ...]]


def changes(old: Ring, new: Ring, n: int) -> list[Change]:
    """(start, end, old list, new list) of each changed range."""
    return [(c.range.start, c.range.end, c.old, c.new) for c in ranges_changed(old, new, n)]


def test_toy_join_changes() -> None:
    old = toy_ring(ABC)
    new = old.with_node("d", 1)  # one point at 50, inside a's arc (40, 60]
    assert changes(old, new, 1) == [(40, 50, ("a",), ("d",))]
    assert changes(old, new, 2) == [
        (20, 40, ("c", "a"), ("c", "d")),
        (40, 50, ("a", "b"), ("d", "a")),
    ]
    assert moved_fraction(old, new, 2) == 30 / RING_SIZE
    assert changes(new, old, 1) == [(40, 50, ("d",), ("a",))]  # and the leave undoes it
    # n = 3 over 4 nodes: a list changes exactly when d enters it, pushing out the last node
    assert changes(old, new, 3) == [
        (10, 20, ("b", "c", "a"), ("b", "c", "d")),
        (20, 40, ("c", "a", "b"), ("c", "d", "a")),
        (40, 50, ("a", "b", "c"), ("d", "a", "b")),
    ]
    assert [c.gained for c in ranges_changed(old, new, 3)] == [{"d"}] * 3
    assert [c.lost for c in ranges_changed(old, new, 3)] == [{"a"}, {"b"}, {"c"}]


def test_reordering_alone_is_not_a_change() -> None:
    old = toy_ring({"a": 1, "b": 1})  # a at 10, b at 20
    new = toy_ring({"a": 1, "b": 2})  # b also at 70: keys in (20, 70] now go (b, a)
    assert changes(old, new, 1) == [(20, 70, ("a",), ("b",))]
    assert ranges_changed(old, new, 2) == []  # same two nodes hold them: no data moves


def test_a_tied_point_takes_no_primary_but_joins_lists() -> None:
    old = toy_ring({"x": 1, "z": 1})  # x at 100, z at 200
    new = old.with_node("y", 1)  # y at 100 too: x < y, so x keeps the arc
    assert ranges_changed(old, new, 1) == []
    assert changes(old, new, 2) == [(200, 100, ("x", "z"), ("x", "y"))]


def test_change_across_the_wrap_is_one_range() -> None:
    old = toy_ring({"a": 1, "m": 1})  # a at 10, m at 50
    new = old.with_node("w", 2)  # w at 5 and at TOP - 4: takes (50, 5] from a
    assert ranges_changed(old, new, 1) == [RangeChange(KeyRange(50, 5), ("a",), ("w",))]
    (change,) = ranges_changed(old, new, 1)
    assert change.range.wraps
    assert change.gained == {"w"}
    assert change.lost == {"a"}
    assert moved_fraction(old, new, 1) == (RING_SIZE - 50 + 5) / RING_SIZE


def test_from_and_to_an_empty_ring() -> None:
    empty = toy_ring({})
    ring = toy_ring(ABC)
    assert ranges_changed(empty, empty, 3) == []
    assert moved_fraction(empty, ring, 3) == 1.0
    assert moved_fraction(ring, empty, 1) == 1.0
    assert all(c.old == () and c.new for c in ranges_changed(empty, ring, 2))
    one = toy_ring({"a": 1})
    assert ranges_changed(empty, one, 1) == [RangeChange(KeyRange(10, 10), (), ("a",))]
    assert ranges_changed(ring, ring, 3) == []


# -- determinism and immutability -------------------------------------------------------------


def test_same_members_same_ring_whatever_the_order() -> None:
    names = [f"node-{i:02d}" for i in range(7)]
    a = Ring.build(names)
    b = Ring.build(reversed(names))
    c = Ring.build({name: DEFAULT_VNODES for name in sorted(names, key=hash)})
    d = Ring.build()
    for name in names[::-1]:
        d = d.with_node(name)
    e = Ring.build([*names, "extra"]).without_node("extra")
    for ring in (b, c, d, e):
        assert ring == a
        assert hash(ring) == hash(a)
        assert ring.points == a.points
        assert ring.nodes == tuple(names)
    for i in range(200):
        assert b.preference_list(f"k{i}", 3) == a.preference_list(f"k{i}", 3)
    assert a != Ring.build(names, vnodes=64)
    assert a != Ring.build(names, position_fn=lambda data: mmh3_position(data))


def test_with_and_without_return_new_rings() -> None:
    ring = Ring.build(["a", "b"], vnodes=4)
    bigger = ring.with_node("c", 8)
    assert ring.nodes == ("a", "b")
    assert bigger.nodes == ("a", "b", "c")
    assert bigger.vnodes == {"a": 4, "b": 4, "c": 8}
    assert len(bigger.points) == 16
    assert ring.with_node("a", 4) is ring
    assert ring.without_node("zzz") is ring
    reweighted = ring.with_node("a", 12)
    assert reweighted.vnodes["a"] == 12
    assert len(reweighted) == 2
    assert "a" in reweighted
    assert "c" not in reweighted
    with pytest.raises(TypeError):
        ring.vnodes["a"] = 5  # type: ignore[index]


# -- balance and movement on real mmh3 rings --------------------------------------------------

NAMINGS: dict[str, Callable[[int], str]] = {
    "node-XX": lambda i: f"node-{i:02d}",
    "address": lambda i: f"10.0.{i // 256}.{i % 256}:7946",
    "hostname": lambda i: f"host{i}.example.net",
}

# Primary ownership max/min at 128 vnodes, measured for the three namings above:
#   nodes   node-XX  address  hostname   asserted bound
#     3      1.119    1.220    1.238        1.35
#     5      1.145    1.205    1.283        1.35
#    10      1.212    1.144    1.134        1.35
#    20      1.384    1.481    1.338        1.60
#    50      1.530    1.579    1.538        1.70
# (The spread is ~1/sqrt(vnodes) per node, so the extremes widen slowly with the node count.)
BALANCE_BOUND = {3: 1.35, 5: 1.35, 10: 1.35, 20: 1.60, 50: 1.70}


@pytest.mark.parametrize("naming", list(NAMINGS))
@pytest.mark.parametrize("count", list(BALANCE_BOUND))
def test_primary_ownership_is_balanced(naming: str, count: int) -> None:
    ring = Ring.build([NAMINGS[naming](i) for i in range(count)])
    own = ring.ownership()
    assert sum(own.values()) == pytest.approx(1.0)
    assert max(own.values()) / min(own.values()) <= BALANCE_BOUND[count]
    replicas = ring.replica_ownership(3)
    assert sum(replicas.values()) == pytest.approx(3.0)
    assert max(replicas.values()) / min(replicas.values()) <= BALANCE_BOUND[count]


def test_vnode_count_is_a_weight() -> None:
    names = [f"node-{i:02d}" for i in range(10)]
    ring = Ring.build({name: (512 if name == "node-00" else 128) for name in names})
    own = ring.ownership()
    others = [own[name] for name in names[1:]]
    assert 3.0 <= own["node-00"] / (sum(others) / len(others)) <= 5.0


# On a join the new node's share of moves, relative to the ideal, was 0.83 .. 1.14 (n = 1) and
# 0.87 .. 1.13 (n = 3) across the namings and sizes below; a 25% tolerance holds it.
JOIN_TOLERANCE = 0.25


@pytest.mark.parametrize("naming", list(NAMINGS))
@pytest.mark.parametrize("count", [3, 5, 10, 20, 50])
def test_join_moves_about_one_share_and_only_to_the_new_node(naming: str, count: int) -> None:
    name = NAMINGS[naming]
    old = Ring.build([name(i) for i in range(count)])
    joiner = name(count)
    new = old.with_node(joiner)

    primary = ranges_changed(old, new, 1)
    assert all(c.new == (joiner,) for c in primary)  # keys move only TO the new node
    moved = moved_fraction(old, new, 1)
    assert moved == pytest.approx(new.ownership()[joiner], abs=1e-12)
    assert moved * (count + 1) == pytest.approx(1.0, rel=JOIN_TOLERANCE)

    n = 3
    for c in ranges_changed(old, new, n):
        assert joiner in c.new
        # the joiner slots into the old list, which loses at most its last node
        assert tuple(x for x in c.new if x != joiner) == c.old[: len(c.new) - 1]
    moved3 = moved_fraction(old, new, n)
    assert moved3 == pytest.approx(new.replica_ownership(n)[joiner], abs=1e-12)
    assert moved3 * (count + 1) / n == pytest.approx(1.0, rel=JOIN_TOLERANCE)


@pytest.mark.parametrize("count", [3, 5, 10, 20, 50])
def test_leave_moves_only_the_leaving_nodes_keys(count: int) -> None:
    names = [f"node-{i:02d}" for i in range(count)]
    old = Ring.build(names)
    for leaver in (names[0], names[-1]):
        new = old.without_node(leaver)
        for c in ranges_changed(old, new, 1):
            assert c.old == (leaver,)
        assert moved_fraction(old, new, 1) == pytest.approx(old.ownership()[leaver], abs=1e-12)
        for c in ranges_changed(old, new, 3):
            assert leaver in c.old
            assert leaver not in c.new
            # the others keep their order, and the next node along the ring fills the gap
            assert c.new[:2] == tuple(x for x in c.old if x != leaver)[:2]
            assert len(c.new) == min(3, count - 1)
        moved3 = moved_fraction(old, new, 3)
        assert moved3 == pytest.approx(old.replica_ownership(3)[leaver], abs=1e-12)


# -- properties -------------------------------------------------------------------------------

node_ids = st.text(min_size=1, max_size=6)
rings = st.dictionaries(node_ids, st.integers(1, 12), max_size=8).map(Ring.build)
keys = st.one_of(st.text(max_size=12), st.binary(max_size=12))


@settings(max_examples=100, deadline=None)
@given(ring=rings, key=keys, n=st.integers(1, 10))
def test_preference_list_properties(ring: Ring, key: str | bytes, n: int) -> None:
    prefs = ring.preference_list(key, n)
    assert len(prefs) == min(n, len(ring))
    assert len(set(prefs)) == len(prefs)
    assert all(node in ring for node in prefs)
    assert prefs == ring.preference_list(key, n + 1)[:n]
    assert prefs == list(ring.successors(key))[:n]
    assert sorted(ring.successors(key)) == list(ring.nodes)
    if prefs:
        assert ring.owner(key) == prefs[0]
    holding = [r for r in ring.ranges(n) if ring.key_position(key) in r.range]
    assert len(holding) == (1 if len(ring) else 0)
    assert [list(r.replicas) for r in holding] == ([prefs] if prefs else [])


@settings(max_examples=100, deadline=None)
@given(ring=rings, n=st.integers(1, 4))
def test_ranges_cover_the_ring_once(ring: Ring, n: int) -> None:
    ranges = ring.ranges(n)
    assert sum(r.range.length for r in ranges) == (RING_SIZE if len(ring) else 0)
    ends = [r.range.end for r in ranges]
    assert ends == sorted(set(ends))
    for prev, cur in pairwise([*ranges, *ranges[:1]]):  # contiguous, through the wrap
        assert prev.range.end == cur.range.start
    own = ring.replica_ownership(n)
    assert sum(own.values()) == pytest.approx(min(n, len(ring)))


@settings(max_examples=100, deadline=None)
@given(
    old=rings,
    new=rings,
    n=st.integers(1, 4),
    sample=st.lists(keys, min_size=1, max_size=20),
)
def test_ranges_changed_matches_key_by_key(
    old: Ring, new: Ring, n: int, sample: list[str | bytes]
) -> None:
    changed = ranges_changed(old, new, n)
    assert sum(c.range.length for c in changed) == round(moved_fraction(old, new, n) * RING_SIZE)
    assert sum(c.range.length for c in changed) <= RING_SIZE
    for key in sample:
        pos = old.key_position(key)
        before, after = old.preference_list(key, n), new.preference_list(key, n)
        hits = [c for c in changed if pos in c.range]
        if set(before) == set(after):
            assert hits == []
        else:
            assert [(list(c.old), list(c.new)) for c in hits] == [(before, after)]


@settings(max_examples=50, deadline=None)
@given(ring=rings, node=node_ids, count=st.integers(1, 12))
def test_join_then_leave_is_the_same_ring(ring: Ring, node: str, count: int) -> None:
    if node in ring:
        return
    assert ring.with_node(node, count).without_node(node) == ring
    assert ranges_changed(ring, ring.with_node(node, count).without_node(node), 2) == []
