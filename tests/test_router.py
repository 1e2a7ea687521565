"""The router and partition placement (meshq.cluster.router, meshq.cluster.placement):
pure functions of the membership view."""

from __future__ import annotations

from collections import Counter

from meshq.cluster.placement import Placement, Replicas, ring_key
from meshq.cluster.router import AwaitTakeover, Local, Refuse, Relay, route
from meshq.mesh.swim import Member, MemberState

A, S, D, L = MemberState


def reps(holders: tuple[str, ...], primary: str | None, w: int = 2) -> Replicas:
    return Replicas(holders, holders, w, primary)


def test_route_table() -> None:
    three = reps(("a", "b", "c"), "a")
    assert route("send", "q", "a", three, active=True) == Local()
    assert route("send", "q", "a", three, active=False) == AwaitTakeover()
    assert route("send", "q", "b", three, active=False) == Relay("a")
    assert isinstance(route("send", "q", "b", three, active=False, relayed=True), Refuse)
    lonely = reps(("a",), "a")
    assert isinstance(route("send", "q", "a", lonely, active=True), Refuse)
    assert isinstance(route("receive", "q", "a", lonely, active=True), Refuse)
    assert route("stats", "q", "a", lonely, active=True) == Local()
    assert route("declare", "q", "a", lonely, active=True, read_only=True) == Local()
    assert isinstance(route("stats", "q", "a", reps(("a", "b"), None), active=False), Refuse)
    assert isinstance(route("stats", "q", "a", reps((), None), active=False), Refuse)


def view(*members: tuple[str, MemberState, dict]):
    return lambda: [Member(n, f"10.0.0.{i}:1", 1, s, 0.0, meta)
                    for i, (n, s, meta) in enumerate(members)]


def test_a_suspect_or_clock_refused_holder_is_not_primary() -> None:
    members = [("a", A, {}), ("b", A, {}), ("c", A, {})]
    p = Placement("a", view(*members))
    first = p.replicas("q", 0, 3)
    assert sorted(first.holders) == ["a", "b", "c"] and first.primary == first.holders[0]
    old = first.primary
    states = {n: (n, S, {}) if n == old else (n, A, {}) for n, _, _ in members}
    p2 = Placement("a" if old != "a" else "b", view(*states.values()))
    second = p2.replicas("q", 0, 3)
    assert second.holders == first.holders  # still a holder (it may be alive)
    assert second.primary == first.holders[1]
    refused = {n: (n, A, {"w": 0}) if n == old else (n, A, {}) for n, _, _ in members}
    p3 = Placement("a" if old != "a" else "b", view(*refused.values()))
    assert p3.replicas("q", 0, 3).primary == first.holders[1]


def test_dead_holders_are_replaced_by_stand_ins_and_spares_follow() -> None:
    names = [f"n{i}" for i in range(6)]
    p = Placement("n0", view(*[(n, A, {}) for n in names]))
    r = p.replicas("q", 0, 3)
    assert len(r.holders) == 3 and len(r.spares) == 2
    assert set(r.holders).isdisjoint(r.spares)
    dead = r.holders[1]
    p2 = Placement("n0" if dead != "n0" else "n1",
                   view(*[(n, D if n == dead else A, {}) for n in names]))
    r2 = p2.replicas("q", 0, 3)
    assert dead not in r2.holders and r2.preferred == r.preferred
    assert r2.holders[2] == r.spares[0]


def test_partitions_of_one_queue_are_placed_by_their_own_key() -> None:
    assert ring_key("q", 0) != ring_key("q", 1)
    names = [f"n{i}" for i in range(8)]
    p = Placement("n0", view(*[(n, A, {}) for n in names]))
    primaries = {p.replicas("q", i, 3).primary for i in range(16)}
    assert len(primaries) > 1


def test_a_queue_s_partitions_have_their_primaries_spread_evenly() -> None:
    names = ["a", "b", "c"]
    p = Placement("a", view(*[(n, A, {}) for n in names]))
    for q in (f"queue-{i}" for i in range(200)):
        firsts = Counter(p.replicas(q, i, 3, partitions=6).primary for i in range(6))
        assert sorted(firsts.values()) == [2, 2, 2], (q, firsts)
        assert p.key(q, 0, 6) == ring_key(q, 0)  # partition 0 as a queue of one
        assert p.replicas(q, 0, 3, partitions=6) == p.replicas(q, 0, 3)
    seven = Placement("a", view(*[(n, A, {}) for n in [*names, "d", "e", "f", "g"]]))
    firsts = Counter(seven.replicas("q", i, 2, partitions=16).primary for i in range(16))
    assert max(firsts.values()) - min(firsts.values()) <= 1 and len(firsts) == 7
    # The same on every node with the same view, and every replica set is the ring's walk
    # from its key: N distinct nodes.
    other = Placement("c", view(*[(n, A, {}) for n in names]))
    assert all(other.replicas("q", i, 3, partitions=6) == p.replicas("q", i, 3, partitions=6)
               for i in range(6))
    assert all(len(set(p.replicas("q", i, 3, partitions=6).holders)) == 3 for i in range(6))
    # A dead node keeps its share (the ring keeps it): its partitions fail over.
    down = Placement("a", view(("a", A, {}), ("b", A, {}), ("c", D, {})))
    assert [down.key("q", i, 6) for i in range(6)] == [p.key("q", i, 6) for i in range(6)]
