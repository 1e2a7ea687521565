"""Tests for meshq.mesh.swim: the transition table exhaustively, the wire messages, the
engine's timers one at a time, and scenarios of 3-5 nodes on a tiny deterministic pump
(virtual time, fixed latency, packets through msgpack, links that can be cut)."""

from __future__ import annotations

import heapq
import itertools
import random
from dataclasses import dataclass, field
from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import meshq.mesh._swim_math as swim_math
import meshq.mesh.swim as swim_mod
from meshq.errors import ProtocolError
from meshq.mesh.swim import (
    SELF_RULES,
    TRANSITIONS,
    Ack,
    Alive,
    ClockSample,
    Dead,
    Effect,
    Event,
    IllegalTransition,
    IncRelation,
    MemberChanged,
    MemberState,
    MemberSummary,
    Message,
    Nack,
    Ping,
    PingReq,
    PushPull,
    SelfReaction,
    SendPacket,
    StartStream,
    Suspect,
    Swim,
    SwimConfig,
    WireError,
    advance,
    message_from_wire,
    packet_from_wire,
    packet_to_wire,
    relation,
)

A, S, D, L = MemberState
OLD, SAME, N = IncRelation
CFG = SwimConfig()
SELF_ADDR = "10.0.0.1:7946"
X_ADDR = "10.0.0.50:7946"
STRANGER = "10.9.9.9:7946"


def make(seed: int = 0, incarnation: int = 1, peers: int = 4, **kw: Any) -> Swim:
    """A Swim called "self" that knows ``peers`` alive members p1..pN."""
    s = Swim("self", SELF_ADDR, kw.pop("config", CFG), random.Random(seed),
             incarnation=incarnation, **kw)
    for i in range(1, peers + 1):
        s.on_message(STRANGER, Alive(1, f"p{i}", f"10.0.0.{i + 1}:7946"), 0.0)
    return s


def piggybacked(s: Swim, now: float = 1.0) -> list[Message]:
    """The broadcasts ``s`` attaches to the ack of a ping (each counts as sent once)."""
    (pkt,) = s.on_message(STRANGER, Ping(77, s.name, now), now)
    assert isinstance(pkt, SendPacket) and pkt.addr == STRANGER
    assert pkt.messages[0] == Ack(77, now, now)
    return list(pkt.messages[1:])


def drain(s: Swim) -> None:
    """Send every queued broadcast to its limit, so that only news is piggy-backed after."""
    while s.statistics().pending_broadcasts:
        piggybacked(s)


def put_in_state(s: Swim, name: str, state: MemberState, inc: int) -> None:
    s.on_message(STRANGER, Alive(inc, name, X_ADDR), 0.0)
    if state is S:
        s.on_message(STRANGER, Suspect(inc, name, "p1"), 0.0)
    elif state is D:
        s.on_message(STRANGER, Dead(inc, name, "p1"), 0.0)
    elif state is L:
        s.on_message(STRANGER, Dead(inc, name, name), 0.0)
    m = s.member(name)
    assert m is not None and (m.state, m.incarnation) == (state, inc)


def event_message(event: Event, inc: int, node: str, addr: str = X_ADDR) -> Message:
    if event is Event.ALIVE:
        return Alive(inc, node, addr)
    if event is Event.SUSPECT:
        return Suspect(inc, node, "p2")
    return Dead(inc, node, node if event is Event.LEAVE else "p2")


# ------------------------------------------------------------------ the transition table
TRIPLES = list(itertools.product(MemberState, Event, IncRelation))
TRIPLE_IDS = [f"{s.name}-{e.name}-{r.name}" for s, e, r in TRIPLES]


@pytest.mark.parametrize(("state", "event", "rel"), TRIPLES, ids=TRIPLE_IDS)
def test_every_triple(state: MemberState, event: Event, rel: IncRelation) -> None:
    if (state, event, rel) in TRANSITIONS:
        assert advance(state, event, rel) is TRANSITIONS[state, event, rel]
    else:
        with pytest.raises(IllegalTransition, match=state.name):
            advance(state, event, rel)


def test_transition_table_is_what_we_expect() -> None:
    """Spelled out, so that any change to the table is a deliberate one."""
    assert TRANSITIONS == {
        (A, Event.ALIVE, N): A, (S, Event.ALIVE, N): A, (D, Event.ALIVE, N): A,
        (L, Event.ALIVE, N): A,
        (A, Event.SUSPECT, SAME): S, (A, Event.SUSPECT, N): S,
        (S, Event.SUSPECT, SAME): S, (S, Event.SUSPECT, N): S,
        (A, Event.DEAD, SAME): D, (A, Event.DEAD, N): D,
        (S, Event.DEAD, SAME): D, (S, Event.DEAD, N): D,
        (A, Event.LEAVE, SAME): L, (A, Event.LEAVE, N): L,
        (S, Event.LEAVE, SAME): L, (S, Event.LEAVE, N): L,
        (D, Event.LEAVE, SAME): L, (D, Event.LEAVE, N): L,
    }
    assert all(rel is not OLD for _, _, rel in TRANSITIONS), "an older incarnation never applies"


def test_self_rules_are_what_we_expect() -> None:
    refute = {k for k, v in SELF_RULES.items() if v is SelfReaction.REFUTE}
    assert set(SELF_RULES) == set(itertools.product(Event, IncRelation))
    assert refute == {
        (Event.ALIVE, N), (Event.SUSPECT, SAME), (Event.SUSPECT, N), (Event.DEAD, SAME),
        (Event.DEAD, N), (Event.LEAVE, SAME), (Event.LEAVE, N),
    }
    reannounce = {k for k, v in SELF_RULES.items() if v is SelfReaction.REANNOUNCE}
    assert reannounce == {(Event.SUSPECT, OLD), (Event.DEAD, OLD), (Event.LEAVE, OLD)}


@pytest.mark.parametrize(("incoming", "known", "expected"), [(1, 2, OLD), (2, 2, SAME), (3, 2, N)])
def test_relation(incoming: int, known: int, expected: IncRelation) -> None:
    assert relation(incoming, known) is expected


INC = {OLD: 4, SAME: 5, N: 6}


@pytest.mark.parametrize(("state", "event", "rel"), TRIPLES, ids=TRIPLE_IDS)
def test_engine_follows_the_table(state: MemberState, event: Event, rel: IncRelation) -> None:
    """Every triple, applied to a member "x" known at incarnation 5: the engine moves it
    exactly as TRANSITIONS says, re-broadcasts what applied and ignores the rest."""
    s = make()
    put_in_state(s, "x", state, 5)
    drain(s)
    ignored = s.statistics().updates_ignored
    msg = event_message(event, INC[rel], "x")
    fx = s.on_message(STRANGER, msg, 2.0)
    m = s.member("x")
    assert m is not None
    key = (state, event, rel)
    if key in TRANSITIONS:
        assert (m.state, m.incarnation) == (TRANSITIONS[key], INC[rel])
        assert msg in piggybacked(s), "an applied update is gossiped on"
        changed = [e for e in fx if isinstance(e, MemberChanged)]
        if m.state is state:
            assert changed == []
            assert m.state_changed_at == 0.0
        else:
            assert [(e.member.name, e.member.state, e.old_state) for e in changed] == [
                ("x", m.state, state)]
            assert m.state_changed_at == 2.0
        assert s.suspicion_deadline("x") is None or m.state is S
    else:
        assert (m.state, m.incarnation) == (state, 5)
        assert fx == []
        assert s.statistics().updates_ignored == ignored + 1
        assert msg not in piggybacked(s)


@pytest.mark.parametrize(("event", "rel"), list(itertools.product(Event, IncRelation)))
def test_engine_follows_self_rules(event: Event, rel: IncRelation) -> None:
    s = make(incarnation=5)
    drain(s)
    fx = s.on_message(STRANGER, event_message(event, INC[rel], "self", SELF_ADDR), 2.0)
    me = s.member("self")
    assert fx == [] and me is not None and me.state is A
    if SELF_RULES[event, rel] is SelfReaction.REFUTE:
        assert me.incarnation == max(5, INC[rel]) + 1
        assert s.statistics().refutations == 1 and s.health_score == 1
        assert Alive(me.incarnation, "self", SELF_ADDR, {}) in piggybacked(s)
    else:
        assert me.incarnation == 5
        assert s.statistics().refutations == 0 and s.health_score == 0
        again = Alive(5, "self", SELF_ADDR, {}) in piggybacked(s)
        assert again is (SELF_RULES[event, rel] is SelfReaction.REANNOUNCE)


@pytest.mark.parametrize("state", [S, D, L, A])
def test_a_ping_from_a_member_held_down_is_answered_with_the_suspicion(
        state: MemberState) -> None:
    s = make()
    put_in_state(s, "x", state, 3)
    drain(s)
    (pkt,) = s.on_message(X_ADDR, Ping(9, "self", 1.0), 1.0)
    assert isinstance(pkt, SendPacket) and pkt.addr == X_ADDR
    assert isinstance(pkt.messages[0], Ack) and pkt.messages[0].seq == 9
    told = [m for m in pkt.messages[1:] if isinstance(m, Suspect) and m.node == "x"]
    assert told == ([Suspect(3, "x", "self")] if state in (S, D) else [])


@pytest.mark.parametrize("alive", [Alive(5, "self", "10.7.7.7:1"), Alive(5, "self", SELF_ADDR,
                                                                        {"role": "old"})])
def test_alive_about_us_with_another_address_or_meta_is_refuted(alive: Alive) -> None:
    s = make(incarnation=5)
    s.on_message(STRANGER, alive, 1.0)
    assert s.incarnation == 6


def test_nothing_is_refuted_after_leave() -> None:
    s = make(incarnation=5)
    s.leave(1.0)
    s.on_message(STRANGER, Suspect(9, "self", "p1"), 2.0)
    s.on_message(STRANGER, Alive(9, "self", SELF_ADDR), 2.0)
    me = s.member("self")
    assert me is not None and (me.state, me.incarnation) == (L, 5)


def test_only_alive_adds_an_unknown_member() -> None:
    s = make()
    assert s.on_message(STRANGER, Suspect(1, "u", "p1"), 1.0) == []
    assert s.on_message(STRANGER, Dead(1, "u", "p1"), 1.0) == []
    assert s.on_message(STRANGER, Dead(1, "u", "u"), 1.0) == []
    assert s.member("u") is None
    (changed,) = s.on_message(STRANGER, Alive(3, "u", X_ADDR, {"zone": "b"}), 1.0)
    assert isinstance(changed, MemberChanged) and changed.old_state is None
    assert (changed.member.state, changed.member.incarnation, changed.member.meta) == (
        A, 3, {"zone": "b"})


def test_a_live_member_keeps_its_address_but_a_dead_one_may_move() -> None:
    s = make()
    s.on_message(STRANGER, Alive(1, "x", X_ADDR), 1.0)
    assert s.on_message(STRANGER, Alive(2, "x", "10.0.0.99:7946"), 1.0) == []
    x = s.member("x")
    assert x is not None and (x.address, x.incarnation) == (X_ADDR, 1)
    assert s.statistics().address_conflicts == 1
    s.on_message(STRANGER, Dead(1, "x", "p1"), 2.0)
    (changed,) = s.on_message(STRANGER, Alive(2, "x", "10.0.0.99:7946"), 3.0)
    assert isinstance(changed, MemberChanged)
    assert (changed.member.address, changed.old_state, changed.member.state) == (
        "10.0.0.99:7946", D, A)


def test_meta_change_is_reported() -> None:
    s = make()
    s.on_message(STRANGER, Alive(1, "x", X_ADDR, {"v": 1}), 1.0)
    (changed,) = s.on_message(STRANGER, Alive(2, "x", X_ADDR, {"v": 2}), 2.0)
    assert isinstance(changed, MemberChanged) and changed.old_state is A
    assert changed.member.meta == {"v": 2}
    snapshot = s.member("x")
    assert snapshot is not None
    snapshot.meta["v"] = 99  # snapshots are copies
    assert s.member("x") == changed.member


# ---------------------------------------------------------------------------- the wire
MESSAGES: list[Message] = [
    Ping(1, "a", 1.5), Ack(2, 1.0, 1.25), Ack(3, None, None), Nack(4),
    PingReq(5, "b", "192.0.2.7:7946"), Alive(1, "c", "[::1]:7946", {"zone": "x", "n": 3}),
    Alive(2**63 - 1, "c", "10.0.0.1:1"), Suspect(2, "c", "d"), Dead(3, "c", "c"),
    PushPull(True, (MemberSummary("a", "10.0.0.1:7946", 1, A),
                    MemberSummary("b", "10.0.0.2:7946", 7, L, {"k": "v"}))),
    PushPull(False, ()),
]


@pytest.mark.parametrize("msg", MESSAGES, ids=lambda m: type(m).__name__)
def test_wire_round_trip(msg: Message) -> None:
    wire = msgpack.unpackb(msgpack.packb(msg.to_wire(), use_bin_type=True), raw=False)
    assert message_from_wire(wire) == msg
    assert type(msg).from_wire(wire) == msg


def test_packet_round_trip() -> None:
    wire = msgpack.unpackb(msgpack.packb(packet_to_wire(MESSAGES)), raw=False)
    assert packet_from_wire(wire) == MESSAGES


def _ping(**kw: Any) -> dict[str, Any]:
    return {"t": "ping", "seq": 1, "target": "a", "t0": 0.0, **kw}


def _alive(**kw: Any) -> dict[str, Any]:
    return {"t": "alive", "inc": 1, "node": "a", "addr": "h:1", "meta": {}, **kw}


def _pp(**kw: Any) -> dict[str, Any]:
    return {"t": "push_pull", "join": False, "members": [], **kw}


BAD_WIRE: list[object] = [
    None, [1, 2], "ping", {}, {"t": "pong"}, {"t": 7},
    {"t": "ping", "seq": 1, "target": "a"},
    _ping(seq=-1), _ping(seq=True), _ping(seq=1.0), _ping(seq=2**64), _ping(seq="1"),
    _ping(t0=float("nan")), _ping(t0=float("inf")), _ping(t0="now"), _ping(t0=None),
    _ping(target=""), _ping(target=5), _ping(target="x" * 300),
    {"t": "ack", "seq": 1, "t1": 0.0}, {"t": "ack", "seq": 1, "t1": [], "t2": None},
    {"t": "ping_req", "seq": 1, "target": "a", "addr": "nohost"},
    {"t": "ping_req", "seq": 1, "target": "a", "addr": "h:0"},
    {"t": "ping_req", "seq": 1, "target": "a", "addr": "h:70000"},
    {"t": "ping_req", "seq": 1, "target": "a", "addr": ":80"},
    {"t": "ping_req", "seq": 1, "target": "a", "addr": "h:http"},
    _alive(meta=[]), _alive(meta={1: 2}), _alive(meta={"k": "x" * 600}), _alive(inc=-3),
    {"t": "suspect", "inc": 1, "node": "a"}, {"t": "dead", "inc": 1, "node": "a", "from": ""},
    _pp(join=1), _pp(members={}), _pp(members=[["a", "h:1", 1, "alive"]]),
    _pp(members=[["a", "h:1", 1, "zombie", {}]]), _pp(members=[["a", "h:1", -1, "alive", {}]]),
    _pp(members=[["a", "bad", 1, "alive", {}]]), _pp(members=[["a", "h:1", 1, "alive", []]]),
    _pp(members=["a"]),
]


@pytest.mark.parametrize("wire", BAD_WIRE, ids=[f"bad{i}" for i in range(len(BAD_WIRE))])
def test_bad_wire_raises_wire_error(wire: object) -> None:
    with pytest.raises(WireError) as info:
        message_from_wire(wire)
    assert isinstance(info.value, ValueError) and isinstance(info.value, ProtocolError)


def test_bad_packets() -> None:
    with pytest.raises(WireError):
        packet_from_wire({"t": "nack", "seq": 1})
    with pytest.raises(WireError):
        packet_from_wire([{"t": "nack", "seq": 1}] * 300)
    with pytest.raises(WireError):
        packet_from_wire([{"t": "nack", "seq": 1}, 5])


def test_extra_keys_are_ignored_for_forward_compatibility() -> None:
    assert message_from_wire(_ping(added_in_v2=True)) == Ping(1, "a", 0.0)


_scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8) | \
    st.binary(max_size=8)
_values = st.recursive(_scalars, lambda c: st.lists(c, max_size=4) | st.dictionaries(
    st.text(max_size=6), c, max_size=4), max_leaves=12)
_types = st.sampled_from(["ping", "ack", "nack", "ping_req", "alive", "suspect", "dead",
                          "push_pull", "other"])
_keys = st.sampled_from(["seq", "target", "t0", "t1", "t2", "addr", "inc", "node", "from",
                         "meta", "join", "members"])
_messageish = st.builds(lambda t, d: {**d, "t": t}, _types, st.dictionaries(_keys, _values))


@given(wire=_values | _messageish)
@settings(max_examples=200)
def test_garbage_decodes_or_raises_wire_error(wire: object) -> None:
    try:
        msg = message_from_wire(wire)
    except WireError:
        return
    assert message_from_wire(msg.to_wire()) == msg


# -------------------------------------------------------------------------- the config
@pytest.mark.parametrize("kw", [
    {"probe_timeout": 1.0}, {"probe_timeout": 0.0}, {"gossip_interval": 0.0},
    {"indirect_checks": 0}, {"suspicion_mult": 0}, {"awareness_max_multiplier": 0},
    {"clock_offset_alpha": 0.0}, {"max_packet_bytes": 300},
])
def test_bad_config(kw: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        SwimConfig(**kw)


def test_lan_defaults_are_memberlists() -> None:
    c = SwimConfig()
    assert (c.probe_interval, c.probe_timeout, c.indirect_checks) == (1.0, 0.5, 3)
    assert (c.retransmit_mult, c.suspicion_mult, c.suspicion_max_timeout_mult) == (4, 4, 6)
    assert (c.awareness_max_multiplier, c.push_pull_interval, c.gossip_interval) == (8, 30.0, 0.2)


def test_bad_constructor_arguments() -> None:
    with pytest.raises(ValueError):
        Swim("", SELF_ADDR, CFG, random.Random(0))
    with pytest.raises(ValueError):
        Swim("a", "no-port", CFG, random.Random(0))
    with pytest.raises(ValueError):
        Swim("a", SELF_ADDR, CFG, random.Random(0), meta={"x": "y" * 1000})


def test_public_names() -> None:
    for mod in (swim_mod, swim_math):
        assert sorted(mod.__all__) == sorted(set(mod.__all__))
        for name in mod.__all__:
            assert hasattr(mod, name), name


# -------------------------------------------------------------- the engine, one at a time
def run_alone(s: Swim, until: float) -> list[tuple[float, Effect, int]]:
    """Tick ``s`` at each of its deadlines up to ``until``, with nobody answering:
    (now, effect, health score after that tick)."""
    out: list[tuple[float, Effect, int]] = []
    while (t := s.next_deadline()) <= until:
        out += [(t, e, s.health_score) for e in s.tick(t)]
    return out


def probes(log: list[tuple[float, Effect, int]]) -> list[tuple[float, str, int]]:
    return [(t, e.messages[0].target, h) for t, e, h in log
            if isinstance(e, SendPacket) and isinstance(e.messages[0], Ping)]


def test_unanswered_probe_goes_indirect_then_suspects() -> None:
    s = make(seed=3)
    log = run_alone(s, 1.99)
    (t0, target, _), *_ = probes(log)
    target_addr = s.member(target).address  # type: ignore[union-attr]
    reqs = [(t, e.addr, e.messages[0]) for t, e, _ in log
            if isinstance(e, SendPacket) and isinstance(e.messages[0], PingReq)]
    assert len(reqs) == 3, "k = 3 indirect probes"
    assert all(t == pytest.approx(t0 + 0.5) for t, _, _ in reqs)
    assert {m.target for _, _, m in reqs} == {target}
    assert {m.addr for _, _, m in reqs} == {target_addr}
    assert target_addr not in {a for _, a, _ in reqs}
    suspected = [(t, e) for t, e, _ in log if isinstance(e, MemberChanged)]
    assert len(suspected) == 1
    t_s, change = suspected[0]
    assert t_s == pytest.approx(t0 + 1.0)
    assert (change.member.name, change.old_state, change.member.state) == (target, A, S)
    assert s.health_score == 3, "three nacks were expected and none came"
    st_ = s.statistics()
    # the next probe starts as this one fails
    assert (st_.probes_sent, st_.probes_failed, st_.indirect_probes_sent) == (2, 1, 3)


def test_probe_interval_scales_with_local_health() -> None:
    """Lifeguard: each unanswered probe raises the score, which stretches the next."""
    s = make(seed=5)
    ps = probes(run_alone(s, 60.0))
    assert len(ps) >= 6
    for (t_a, _, h_a), (t_b, _, _) in itertools.pairwise(ps):
        assert t_b - t_a == pytest.approx(CFG.probe_interval * (h_a + 1))
    scores = [h for _, _, h in ps]
    assert scores == sorted(scores) and scores[-1] == CFG.awareness_max_multiplier - 1


def test_ack_lowers_health_and_measures_the_clock() -> None:
    s = make(seed=3)
    log = run_alone(s, 1.99)
    assert s.health_score == 3
    *_, ping = [e for _, e, _ in log if isinstance(e, SendPacket)
                and isinstance(e.messages[0], Ping)]  # the second probe, still in flight
    p = ping.messages[0]
    assert isinstance(p, Ping)
    now = p.t0 + 0.02
    fx = s.on_message(ping.addr, Ack(p.seq, p.t0 + 5.01, p.t0 + 5.01), now)
    assert fx == [ClockSample(p.target, p.t0, p.t0 + 5.01, p.t0 + 5.01, now)]
    assert s.health_score == 2
    m = s.member(p.target)
    assert m is not None and m.last_seen == now
    assert m.clock_offset == pytest.approx(5.0) and m.rtt == pytest.approx(0.02)
    assert s.statistics().acks_received == 1


def test_a_suspect_is_probed_with_the_suspicion_attached() -> None:
    s = make(seed=1, peers=1)
    s.on_message(STRANGER, Suspect(1, "p1", "p9"), 0.0)
    ping, *_ = [e for _, e, _ in run_alone(s, 1.5) if isinstance(e, SendPacket)
                and isinstance(e.messages[0], Ping)]
    assert Suspect(1, "p1", "self") in ping.messages[1:]


def test_relaying_a_ping_req() -> None:
    s = make(peers=0)
    origin, target = "10.0.0.9:7946", "10.0.0.5:7946"
    (out,) = s.on_message(origin, PingReq(42, "t", target), 10.0, wall=110.0)
    assert isinstance(out, SendPacket) and out.addr == target
    ping = out.messages[0]
    assert isinstance(ping, Ping) and (ping.target, ping.t0) == ("t", 110.0)
    (fwd,) = s.on_message(target, Ack(ping.seq, 1.0, 1.0), 10.01)
    assert isinstance(fwd, SendPacket) and fwd.addr == origin
    assert fwd.messages[0] == Ack(42, None, None)
    assert s.on_message(target, Ack(ping.seq, 1.0, 1.0), 10.02) == [], "relayed only once"
    # a second request whose target stays silent is nacked at 80% of the probe timeout
    (out,) = s.on_message(origin, PingReq(43, "t", target), 20.0)
    assert not any(isinstance(e, SendPacket) and e.addr == origin for e in s.tick(20.39))
    nacks = [e for e in s.tick(20.4) if isinstance(e, SendPacket) and e.addr == origin]
    assert [e.messages[0] for e in nacks] == [Nack(43)]
    assert s.statistics().ping_reqs_relayed == 2


def test_a_misaddressed_ping_is_not_answered() -> None:
    s = make()
    assert s.on_message(STRANGER, Ping(1, "someone-else", 0.0), 1.0) == []


def test_suspicion_timeout_shrinks_with_independent_confirmations() -> None:
    """Five members: k = 2, min 4 s, max 24 s. Confirmations from distinct members pull
    the deadline in; repeats and the starter do not."""
    s = make(peers=3)
    s.on_message(STRANGER, Alive(1, "x", X_ADDR), 0.0)
    s.on_message(STRANGER, Suspect(1, "x", "p1"), 0.0)
    assert s.suspicion_deadline("x") == pytest.approx(24.0)
    s.on_message(STRANGER, Suspect(1, "x", "p1"), 0.5)  # the starter does not confirm
    assert s.suspicion_deadline("x") == pytest.approx(24.0)
    s.on_message(STRANGER, Suspect(1, "x", "p2"), 1.0)
    assert s.suspicion_deadline("x") == pytest.approx(11.381)
    s.on_message(STRANGER, Suspect(1, "x", "p2"), 1.5)
    assert s.suspicion_deadline("x") == pytest.approx(11.381)
    s.on_message(STRANGER, Suspect(1, "x", "p3"), 2.0)
    assert s.suspicion_deadline("x") == pytest.approx(4.0)
    assert s.statistics().confirmations == 2
    assert s.member("x").state is S  # type: ignore[union-attr]
    s.tick(3.99)
    assert s.member("x").state is S  # type: ignore[union-attr]
    dead = [e for e in s.tick(4.0) if isinstance(e, MemberChanged)]
    assert [(e.member.name, e.member.state) for e in dead] == [("x", D)]
    assert s.suspicion_deadline("x") is None
    assert Dead(1, "x", "self") in piggybacked(s, 4.0)


def test_small_cluster_suspicion_uses_the_minimum() -> None:
    s = make(peers=1)  # self, p1, x: too few for confirmations
    s.on_message(STRANGER, Alive(1, "x", X_ADDR), 0.0)
    s.on_message(STRANGER, Suspect(1, "x", "p1"), 0.0)
    assert s.suspicion_deadline("x") == pytest.approx(4.0)


def test_merge_push_pull_maps_states_like_memberlist() -> None:
    """Alive merges as Alive, left as a leave; suspect and dead only as our own Suspect,
    so that a peer's stale verdict never kills a member outright."""
    s = make(peers=0)
    s.on_message(STRANGER, Alive(1, "x", X_ADDR), 0.0)
    s.on_message(STRANGER, Alive(1, "y", "10.0.0.51:7946"), 0.0)
    s.on_message(STRANGER, Alive(1, "z", "10.0.0.52:7946"), 0.0)
    payload = PushPull(False, (
        MemberSummary("x", X_ADDR, 1, D),  # dead there: only suspect here
        MemberSummary("y", "10.0.0.51:7946", 1, S),
        MemberSummary("z", "10.0.0.52:7946", 1, L),
        MemberSummary("new", "10.0.0.53:7946", 4, A),
        MemberSummary("gone", "10.0.0.54:7946", 4, D),  # unknown and dead: not added
        MemberSummary("self", SELF_ADDR, 1, S),  # we are suspected there: refute
    ))
    fx = s.merge_push_pull(payload, 1.0)
    assert {(e.member.name, e.old_state, e.member.state) for e in fx
            if isinstance(e, MemberChanged)} == {
        ("x", A, S), ("y", A, S), ("z", A, L), ("new", None, A)}
    assert s.member("gone") is None
    assert s.incarnation == 2
    assert s.on_message(STRANGER, PushPull(False, ()), 1.0) == []


def test_probes_go_round_robin_while_members_join() -> None:
    """One probe per member per round, even when members join mid-round."""
    s = make(seed=12, peers=6)
    targets: list[str] = []
    joined = 0
    while len(targets) < 60:
        t = s.next_deadline()
        for e in s.tick(t):
            if isinstance(e, SendPacket) and isinstance(e.messages[0], Ping):
                ping = e.messages[0]
                targets.append(ping.target)
                s.on_message(e.addr, Ack(ping.seq, t, t), t)
                if joined < 20:
                    joined += 1
                    s.on_message(STRANGER, Alive(1, f"j{joined}", f"10.0.1.{joined}:7946"), t)
    assert all(m.state is A for m in s.members())
    assert all(a != b for a, b in itertools.pairwise(targets)), "probed twice in a row"


def test_broadcasts_fit_the_packet_and_stop_at_the_retransmit_limit() -> None:
    s = make(peers=0)
    payload = PushPull(False, tuple(
        MemberSummary(f"node-{i:03d}", f"10.1.{i // 200}.{i % 200 + 1}:7946", 1, A,
                      {"zone": "z" * 20}) for i in range(80)))
    s.merge_push_pull(payload, 0.0)
    limit = swim_math.retransmit_limit(CFG.retransmit_mult, 81)
    assert limit == 8
    counts: dict[str, int] = {}
    for i in range(200):
        (pkt,) = s.on_message(STRANGER, Ping(i, "self", 1.0), 1.0)
        assert isinstance(pkt, SendPacket)
        size = len(msgpack.packb(packet_to_wire(pkt.messages), use_bin_type=True))
        assert size <= CFG.max_packet_bytes - CFG.packet_overhead_bytes
        for m in pkt.messages[1:]:
            assert isinstance(m, Alive)
            counts[m.node] = counts.get(m.node, 0) + 1
    assert s.statistics().pending_broadcasts == 0
    assert set(counts.values()) == {limit} and len(counts) == 81


# ---------------------------------------------------------------- the pump and scenarios
@dataclass
class Net:
    """Nodes n0..n{k-1} at 10.0.0.{i+1}:7946 in virtual time; every packet takes
    ``latency`` and goes through msgpack. ``down`` nodes neither run nor hear; a pair in
    ``cut`` drops packets (and streams) from the first to the second."""

    seed: int = 1
    latency: float = 0.005
    config: SwimConfig = field(default_factory=SwimConfig)
    skew: dict[str, float] = field(default_factory=dict)
    now: float = 0.0
    nodes: dict[str, Swim] = field(default_factory=dict)
    down: set[str] = field(default_factory=set)
    cut: set[tuple[str, str]] = field(default_factory=set)
    log: list[tuple[float, str, str, MemberState | None, MemberState]] = field(
        default_factory=list)
    _q: list[tuple[float, int, tuple[str, str, str, Any]]] = field(default_factory=list)
    _n: int = 0

    def start(self, name: str, **kw: Any) -> Swim:
        i = int(name[1:])
        self.nodes[name] = Swim(name, f"10.0.0.{i + 1}:7946", self.config,
                                random.Random(self.seed * 1000 + i + 100 * self._n),
                                now=self.now, **kw)
        self._n += 1
        return self.nodes[name]

    def join(self, name: str, *seeds: str) -> None:
        node = self.nodes.get(name) or self.start(name)
        self.handle(node, node.join([f"10.0.0.{int(s[1:]) + 1}:7946" for s in seeds], self.now))

    def isolate(self, name: str, on: bool = True) -> None:
        pairs = {p for o in self.nodes if o != name for p in ((name, o), (o, name))}
        self.cut = self.cut | pairs if on else self.cut - pairs

    def _dst(self, addr: str) -> str:
        return f"n{int(addr.split(':')[0].rsplit('.', 1)[1]) - 1}"

    def _blocked(self, a: str, b: str) -> bool:
        return b not in self.nodes or a in self.down or b in self.down or (a, b) in self.cut

    def _push(self, item: tuple[str, str, str, Any]) -> None:
        self._n += 1
        heapq.heappush(self._q, (self.now + self.latency, self._n, item))

    def handle(self, node: Swim, fx: list[Effect]) -> None:
        for e in fx:
            if isinstance(e, MemberChanged):
                self.log.append((self.now, node.name, e.member.name, e.old_state,
                                 e.member.state))
            elif isinstance(e, SendPacket):
                if not self._blocked(node.name, self._dst(e.addr)):
                    wire = msgpack.packb(packet_to_wire(e.messages), use_bin_type=True)
                    self._push(("packet", node.name, self._dst(e.addr), wire))
            elif isinstance(e, StartStream):
                dst = self._dst(e.addr)
                if not (self._blocked(node.name, dst) or self._blocked(dst, node.name)):
                    self._push(("stream", node.name, dst, e.payload.to_wire()))

    def run(self, until: float) -> None:
        for _ in range(1_000_000):
            live = [s for s in self.nodes.values() if s.name not in self.down]
            t = min([s.next_deadline() for s in live] + [q[0] for q in self._q[:1]])
            if t > until:
                self.now = until
                return
            self.now = max(self.now, t)
            if self._q and self._q[0][0] <= self.now:
                kind, src, dst, data = heapq.heappop(self._q)[2]
                node = self.nodes[dst]
                if dst in self.down:
                    continue
                if kind == "packet":
                    msgs = packet_from_wire(msgpack.unpackb(data, raw=False))
                    wall = self.now + self.skew.get(dst, 0.0)
                    self.handle(node, node.on_packet(self.nodes[src].addr, msgs, self.now, wall))
                else:
                    self.handle(node, node.merge_push_pull(PushPull.from_wire(data), self.now))
                    if kind == "stream":  # the accepting side answers with its state
                        self._push(("reply", dst, src, node.push_pull_payload().to_wire()))
                continue
            for s in live:
                if s.next_deadline() <= self.now:
                    self.handle(s, s.tick(self.now, self.now + self.skew.get(s.name, 0.0)))
        raise AssertionError("the pump did not reach its deadline")

    def view(self, name: str) -> dict[str, tuple[MemberState, int]]:
        return {m.name: (m.state, m.incarnation) for m in self.nodes[name].members()}

    def changes(self, about: str, since: float = 0.0) -> list[tuple[float, str, MemberState]]:
        return [(t, who, new) for t, who, m, _, new in self.log if m == about and t >= since]


def cluster(n: int, seed: int = 1, **kw: Any) -> Net:
    """n nodes that all joined through n0, run until t = 5."""
    net = Net(seed=seed, **kw)
    net.start("n0")
    for i in range(1, n):
        net.join(f"n{i}", "n0")
    net.run(5.0)
    for name in net.nodes:
        assert net.view(name) == {f"n{i}": (A, 1) for i in range(n)}, name
    return net


def test_join_through_any_one_seed() -> None:
    """Each node knows one seed only (one of them also a dead address); push-pull plus
    gossip still gives everyone everyone."""
    net = Net(seed=7)
    net.start("n0")
    net.join("n1", "n0")
    net.run(1.0)
    net.join("n2", "n1")
    net.run(2.0)
    net.join("n3", "n9", "n2")  # n9 does not exist
    net.run(3.0)
    net.join("n4", "n3")
    net.run(6.0)
    everyone = {f"n{i}": (A, 1) for i in range(5)}
    for name in net.nodes:
        assert net.view(name) == everyone, name
    assert not [c for c in net.log if c[4] is not A]


def test_failure_detection_of_a_silent_node() -> None:
    net = cluster(5, seed=2)
    net.run(10.0)
    net.down.add("n4")
    net.run(50.0)
    suspect_at: dict[str, float] = {}
    dead_at: dict[str, float] = {}
    for t, who, new in net.changes("n4", since=10.0):
        (suspect_at if new is S else dead_at).setdefault(who, t)
    observers = {"n0", "n1", "n2", "n3"}
    assert set(suspect_at) == set(dead_at) == observers
    assert min(suspect_at.values()) >= 10.5, "nobody suspects before a probe could fail"
    assert max(suspect_at.values()) <= 10.0 + 8.0
    assert max(dead_at.values()) <= 10.0 + 8.0 + 24.0 + 1.0
    assert min(dead_at.values()) - min(suspect_at.values()) >= 4.0 - 1e-9, "the minimum"
    for who in observers:
        assert net.view(who)["n4"] == (D, 1)
    assert min(dead_at[w] - suspect_at[w] for w in observers) < 24.0, "confirmations count"
    assert all(m == "n4" for _, _, m, _, new in net.log if new is not A), "no false positive"


def test_runs_are_deterministic() -> None:
    def run() -> list[Any]:
        net = cluster(4, seed=11)
        net.down.add("n3")
        net.run(30.0)
        return net.log

    assert run() == run()


def test_a_suspected_live_node_refutes() -> None:
    net = cluster(3, seed=3)
    net.run(10.0)
    n0 = net.nodes["n0"]
    net.handle(n0, n0.on_message("10.0.0.2:7946", Suspect(1, "n2", "n1"), net.now))
    assert net.view("n0")["n2"] == (S, 1)
    net.run(13.0)
    for name in net.nodes:
        assert net.view(name)["n2"] == (A, 2), name
    assert net.nodes["n2"].statistics().refutations == 1
    assert not [c for c in net.changes("n2") if c[2] is D]


def test_a_short_partition_heals_by_refutation() -> None:
    net = cluster(3, seed=4)
    net.run(10.0)
    net.isolate("n2")
    net.run(13.5)
    net.isolate("n2", on=False)
    net.run(30.0)
    assert [c for c in net.changes("n2", since=10.0) if c[2] is S], "it was suspected"
    assert not [c for c in net.changes("n2") if c[2] is D], "and refuted in time"
    for name in net.nodes:
        assert {m: st for m, (st, _) in net.view(name).items()} == {
            "n0": A, "n1": A, "n2": A}, name
    assert net.nodes["n2"].incarnation > 1


def test_indirect_probes_route_around_a_broken_link() -> None:
    net = cluster(3, seed=5)
    net.run(10.0)
    net.cut |= {("n0", "n2"), ("n2", "n0")}
    net.run(40.0)
    assert not [c for c in net.log if c[0] >= 10.0], "nobody was even suspected"
    assert net.nodes["n0"].statistics().indirect_probes_sent > 0
    assert net.nodes["n1"].statistics().ping_reqs_relayed > 0
    assert net.nodes["n0"].health_score == net.nodes["n2"].health_score == 0


def test_local_health_rises_only_where_the_fault_is() -> None:
    """n0 can hear but not send: its probes fail without nacks, so its score rises and
    it probes less often; n1 and n2 get nacks from each other and stay healthy."""
    net = cluster(3, seed=6)
    net.run(10.0)
    sent = {n: net.nodes[n].statistics().probes_sent for n in net.nodes}
    net.cut |= {("n0", "n1"), ("n0", "n2")}
    net.run(40.0)
    stats = {n: net.nodes[n].statistics() for n in net.nodes}
    assert stats["n0"].health_score >= 3
    assert stats["n1"].health_score == stats["n2"].health_score == 0
    assert stats["n1"].nacks_received > 0
    assert stats["n0"].probes_sent - sent["n0"] < (stats["n1"].probes_sent - sent["n1"]) / 2


def test_graceful_leave_and_rejoin() -> None:
    net = cluster(4, seed=8)
    net.run(10.0)
    net.handle(net.nodes["n3"], net.nodes["n3"].leave(net.now))
    assert net.nodes["n3"].has_left
    net.run(12.0)
    assert net.nodes["n3"].statistics().pending_broadcasts == 0
    for name in net.nodes:
        assert net.view(name)["n3"] == (L, 1), name
    net.down.add("n3")  # the process exits
    net.run(70.0)
    assert {new for _, _, new in net.changes("n3")} == {A, L}, "never suspect, never dead"
    for name in ("n0", "n1", "n2"):
        assert net.view(name)["n3"] == (L, 1)
    # a new process with the same name comes back: it refutes the old leave
    net.down.discard("n3")
    net.start("n3")
    net.join("n3", "n0")
    net.run(75.0)
    for name in net.nodes:
        assert net.view(name)["n3"] == (A, 2), name


def test_clock_offsets_from_probes() -> None:
    net = cluster(3, seed=9, skew={"n1": 0.25, "n2": -0.1})
    net.run(20.0)
    n0, n1 = net.nodes["n0"], net.nodes["n1"]
    assert n0.clock_offsets() == pytest.approx({"n1": 0.25, "n2": -0.1}, abs=1e-6)
    assert n1.clock_offsets() == pytest.approx({"n0": -0.25, "n2": -0.35}, abs=1e-6)
    assert n0.statistics().median_clock_offset == pytest.approx(0.0, abs=1e-6)
    assert n1.statistics().median_clock_offset == pytest.approx(-0.25, abs=1e-6)
    m = n0.member("n1")
    assert m is not None and m.rtt == pytest.approx(2 * net.latency)
    assert m.last_seen is not None and m.last_seen > 15.0


def test_push_pull_runs_periodically_and_reconnects_to_the_dead() -> None:
    net = cluster(3, seed=10, config=SwimConfig(push_pull_interval=5.0))
    starts = {n: net.nodes[n].statistics().push_pulls_started for n in net.nodes}
    net.run(30.0)
    for n in net.nodes:
        assert net.nodes[n].statistics().push_pulls_started - starts[n] >= 4
    s = make(peers=0)
    s.on_message(STRANGER, Alive(1, "x", X_ADDR), 0.0)
    s.on_message(STRANGER, Dead(1, "x", "p1"), 0.0)
    streams = [e for _, e, _ in run_alone(s, 30.0) if isinstance(e, StartStream)]
    assert [(e.addr, e.payload.join) for e in streams] == [(X_ADDR, False)]
    quiet = make(peers=0, config=SwimConfig(reconnect_dead=False))
    quiet.on_message(STRANGER, Alive(1, "x", X_ADDR), 0.0)
    quiet.on_message(STRANGER, Dead(1, "x", "p1"), 0.0)
    assert not [e for _, e, _ in run_alone(quiet, 30.0) if isinstance(e, StartStream)]


@pytest.mark.parametrize("addr", ["host.example:7946", "a:b:1", "[zz]:1", "a..b:1",
                                  "::1:7946", "[10.0.0.1]:7946", "10.0.0.1:0"])
def test_addresses_from_the_network_must_be_numeric(addr: str) -> None:
    with pytest.raises(WireError):
        message_from_wire({"t": "ping_req", "seq": 1, "target": "x", "addr": addr})


def test_names_are_bounded_in_bytes_so_every_message_fits_a_packet() -> None:
    name = "\U0001d51e" * 64  # 256 bytes in UTF-8, 64 characters
    with pytest.raises(WireError):
        message_from_wire({"t": "alive", "inc": 1, "node": name, "addr": "10.0.0.1:1",
                           "meta": {}})


def test_a_node_back_from_a_long_pause_is_seen_alive_without_waiting_for_push_pull() -> None:
    """Paused (SIGSTOP) until it was declared dead: every Dead about it was gossiped while
    it slept, and on waking it times out its own probes of the others. The members that
    hold it dead tell it so when it pings them, it refutes, and everyone sees everyone
    alive within a few probe rounds, not at the next push-pull (made far off here)."""
    net = cluster(3, seed=5, config=SwimConfig(push_pull_interval=600.0))
    net.run(10.0)
    net.down.add("n2")
    net.run(60.0)
    assert net.view("n0")["n2"][0] is D and net.view("n1")["n2"][0] is D
    net.down.discard("n2")
    net.run(70.0)
    for name in net.nodes:
        assert {m: st for m, (st, _) in net.view(name).items()} == {
            "n0": A, "n1": A, "n2": A}, name
