"""SWIM membership with Lifeguard, as a pure state machine (h11-style: no I/O, no clock).

State here: every known member's (state, incarnation, address, meta), the probe in
flight, relayed ping-reqs, suspicion timers and the broadcast queue. A member's state
changes only through TRANSITIONS below; our own record is never SUSPECT or DEAD (we
refute instead), and nothing about us changes after leave() but LEFT.

Driving it: call ``tick(now)`` at ``next_deadline()``, ``on_message`` for every message
that arrives, and carry out the returned effects: ``SendPacket`` (one UDP packet: a list
of messages, the first the reason for the packet, the rest piggy-backed broadcasts),
``StartStream`` (open a TCP stream, send the PushPull, ``merge_push_pull`` the answer)
and ``MemberChanged`` (tell the rest of the daemon). The side that accepts a stream
merges the remote state first and answers with its own ``push_pull_payload()``. Replies
go to the address a packet came from, so a node must send from the address it binds.
``now`` orders local events; ``wall`` (default: ``now``) is the wall clock, used only
for the timestamps from which clock offsets are estimated.

The transition table (memberlist state.go semantics). A message about member m carries
an incarnation i that is OLDER, SAME or NEWER than the one we hold for m:

    held / msg   ALIVE(i)       SUSPECT(i)           DEAD(i)             LEAVE(i)
    ALIVE        NEWER: ALIVE   SAME/NEWER: SUSPECT  SAME/NEWER: DEAD    SAME/NEWER: LEFT
    SUSPECT      NEWER: ALIVE   SAME/NEWER: SUSPECT  SAME/NEWER: DEAD    SAME/NEWER: LEFT
                                (a confirmation)
    DEAD         NEWER: ALIVE   -                    -                   SAME/NEWER: LEFT
    LEFT         NEWER: ALIVE   -                    -                   -
                 (a rejoin)

LEAVE is a Dead message whose sender is the member itself (a graceful leave); LEFT is
final but for a newer ALIVE. Unlike memberlist, a LEAVE also turns DEAD into LEFT (the
member said why it went). Every other triple is an IllegalTransition: the engine drops
such a message as stale or redundant and counts it. Only ALIVE adds an unknown member.
About ourselves SELF_RULES apply instead: a SUSPECT, DEAD or LEAVE at our incarnation
or newer, or an ALIVE newer than ours (or equal but with another address or meta), is
refuted by taking incarnation max(ours, theirs) + 1 and broadcasting ALIVE; an older
SUSPECT, DEAD or LEAVE is someone's stale view of us, answered by broadcasting our ALIVE
again at our incarnation. A ping from a member we hold SUSPECT or DEAD is answered with
that Suspect attached: a node back from a pause (every Dead about it gossiped while it
slept) learns of it from the first member it probes, instead of at the next push-pull.
"""

from __future__ import annotations

import enum
import ipaddress
import math
import random
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar, Self, TypeAlias

import msgpack

from meshq.errors import ProtocolError
from meshq.mesh._swim_math import (
    Suspicion,
    TransmitQueue,
    apply_awareness_delta,
    clock_offset,
    ewma,
    expected_confirmations,
    median_offset,
    push_pull_scale,
    retransmit_limit,
    scaled_interval,
    suspicion_timeout,
)
from meshq.mesh.wire import TYPE_KEY
from meshq.states import IllegalTransition

__all__ = [
    "SELF_RULES",
    "TRANSITIONS",
    "Ack",
    "Alive",
    "ClockSample",
    "Dead",
    "Effect",
    "Event",
    "IllegalTransition",
    "IncRelation",
    "Member",
    "MemberChanged",
    "MemberState",
    "MemberSummary",
    "Message",
    "Nack",
    "Ping",
    "PingReq",
    "PushPull",
    "SelfReaction",
    "SendPacket",
    "StartStream",
    "Suspect",
    "Swim",
    "SwimConfig",
    "SwimStatistics",
    "WireError",
    "advance",
    "message_from_wire",
    "packet_from_wire",
    "packet_to_wire",
    "relation",
    "wire_size",
]

META_MAX_BYTES = 512
MAX_PUSH_PULL_MEMBERS = 4096  # bounds the work one stream can cause
_MAX_INT = 2**63 - 1
_MAX_NAME_BYTES = 255  # UTF-8: with the address and meta, any message fits one packet
_MAX_ADDR_BYTES = 64
NACK_FRACTION = 0.8  # a relay nacks after this share of its probe timeout (Lifeguard paper)


# ----------------------------------------------------------------------------- the table
class MemberState(enum.Enum):
    ALIVE = "alive"
    SUSPECT = "suspect"
    DEAD = "dead"
    LEFT = "left"


class Event(enum.Enum):
    ALIVE = "alive"
    SUSPECT = "suspect"
    DEAD = "dead"
    LEAVE = "leave"  # a Dead message sent by the member about itself


class IncRelation(enum.Enum):
    OLDER = "older"
    SAME = "same"
    NEWER = "newer"


class SelfReaction(enum.Enum):
    IGNORE = "ignore"
    REFUTE = "refute"  # a new incarnation, broadcast
    REANNOUNCE = "reannounce"  # our ALIVE again, at the incarnation we have


def relation(incoming: int, known: int) -> IncRelation:
    """How a message's incarnation compares with the one we hold."""
    if incoming < known:
        return IncRelation.OLDER
    return IncRelation.SAME if incoming == known else IncRelation.NEWER


_A, _S, _D, _L = MemberState
_E, _R = Event, IncRelation
TRANSITIONS: dict[tuple[MemberState, Event, IncRelation], MemberState] = {
    (_A, _E.ALIVE, _R.NEWER): _A,
    (_S, _E.ALIVE, _R.NEWER): _A,
    (_D, _E.ALIVE, _R.NEWER): _A,
    (_L, _E.ALIVE, _R.NEWER): _A,
    (_A, _E.SUSPECT, _R.SAME): _S,
    (_A, _E.SUSPECT, _R.NEWER): _S,
    (_S, _E.SUSPECT, _R.SAME): _S,  # a confirmation
    (_S, _E.SUSPECT, _R.NEWER): _S,
    (_A, _E.DEAD, _R.SAME): _D,
    (_A, _E.DEAD, _R.NEWER): _D,
    (_S, _E.DEAD, _R.SAME): _D,
    (_S, _E.DEAD, _R.NEWER): _D,
    (_A, _E.LEAVE, _R.SAME): _L,
    (_A, _E.LEAVE, _R.NEWER): _L,
    (_S, _E.LEAVE, _R.SAME): _L,
    (_S, _E.LEAVE, _R.NEWER): _L,
    (_D, _E.LEAVE, _R.SAME): _L,
    (_D, _E.LEAVE, _R.NEWER): _L,
}
#: About ourselves: refute what accuses us at our incarnation or later, and an ALIVE newer
#: than ours (someone replays our old name); an older accusation is a stale view that
#: missed our last refutation: announce ourselves again; older or equal ALIVEs are our own
#: news coming back.
SELF_RULES: dict[tuple[Event, IncRelation], SelfReaction] = {
    (_E.ALIVE, _R.OLDER): SelfReaction.IGNORE,
    (_E.ALIVE, _R.SAME): SelfReaction.IGNORE,  # unless its address or meta differ
    (_E.ALIVE, _R.NEWER): SelfReaction.REFUTE,
    **{(ev, _R.OLDER): SelfReaction.REANNOUNCE for ev in (_E.SUSPECT, _E.DEAD, _E.LEAVE)},
    **{(ev, _R.SAME): SelfReaction.REFUTE for ev in (_E.SUSPECT, _E.DEAD, _E.LEAVE)},
    **{(ev, _R.NEWER): SelfReaction.REFUTE for ev in (_E.SUSPECT, _E.DEAD, _E.LEAVE)},
}
del _E, _R


def advance(state: MemberState, event: Event, rel: IncRelation) -> MemberState:
    """The state after ``event``; IllegalTransition when the table does not allow it."""
    try:
        return TRANSITIONS[state, event, rel]
    except KeyError:
        raise IllegalTransition(
            f"{event.value} with a {rel.value} incarnation is not allowed in state {state.name}"
        ) from None


# ------------------------------------------------------------------------------ the wire
class WireError(ProtocolError, ValueError):
    """A SWIM message (as decoded from msgpack) that is not well-formed."""


def _check_addr(addr: object, *, numeric: bool = True) -> str:
    """A 'host:port' string; from the network (``numeric``) the host must be an IP
    literal: a name would make every packet to it wait on DNS, and a malformed one
    could not be sent at all."""
    if not isinstance(addr, str) or len(addr.encode()) > _MAX_ADDR_BYTES:
        raise WireError(f"address must be a short 'host:port' string, not {addr!r:.60}")
    host, sep, port = addr.rpartition(":")
    if not sep or not host or not (port.isascii() and port.isdigit()) \
            or not 0 < int(port) < 65536:
        raise WireError(f"address must be 'host:port', not {addr!r:.60}")
    if numeric:
        literal = host[1:-1] if host.startswith("[") and host.endswith("]") else host
        try:
            ip = ipaddress.ip_address(literal)
        except ValueError:
            raise WireError(f"address must be a numeric IP:port, not {addr!r:.60}") from None
        if (ip.version == 6) != (literal != host):
            raise WireError(f"IPv6 addresses go in brackets: {addr!r:.60}")
    return addr


def _check_name(name: object) -> str:
    if not isinstance(name, str) or not 0 < len(name.encode()) <= _MAX_NAME_BYTES:
        raise WireError(f"a node name must be a non-empty string of at most "
                        f"{_MAX_NAME_BYTES} bytes, not {name!r:.60}")
    return name


def _check_meta(meta: object) -> dict[str, Any]:
    if not isinstance(meta, dict) or not all(isinstance(k, str) for k in meta):
        raise WireError("meta must be a map with string keys")
    try:
        size = len(msgpack.packb(meta, use_bin_type=True))
    except (TypeError, ValueError, OverflowError):
        raise WireError("meta must be msgpack-able") from None
    if size > META_MAX_BYTES:
        raise WireError(f"meta is {size} bytes, more than {META_MAX_BYTES}")
    return meta


_CHECKS: dict[str, Callable[[object], Any]] = {"name": _check_name, "addr": _check_addr,
                                             "meta": _check_meta}


def _read(type_: str, key: str, kind: str, v: object) -> Any:
    if kind == "int":
        if type(v) is not int or not 0 <= v <= _MAX_INT:
            raise WireError(f"{type_}: {key!r} must be an int in 0..2**63-1")
        return v
    if kind in ("time", "time?"):
        if v is None and kind == "time?":
            return None
        if type(v) not in (int, float) or not math.isfinite(v):  # type: ignore[arg-type]
            raise WireError(f"{type_}: {key!r} must be a finite number")
        return float(v)  # type: ignore[arg-type]
    try:
        return _CHECKS[kind](v)
    except WireError as exc:
        raise WireError(f"{type_}: {key!r}: {exc}") from None


class _Wire:
    """to_wire/from_wire from a schema: FIELDS holds (attribute, wire key, kind)."""

    TYPE: ClassVar[str]
    FIELDS: ClassVar[tuple[tuple[str, str, str], ...]]

    def to_wire(self) -> dict[str, Any]:
        return {TYPE_KEY: self.TYPE, **{key: getattr(self, a) for a, key, _ in self.FIELDS}}

    @classmethod
    def from_wire(cls, d: object) -> Self:
        """Validate a wire dict (extra keys are ignored); WireError if it is not one."""
        if not isinstance(d, Mapping) or d.get(TYPE_KEY) != cls.TYPE:
            raise WireError(f"not a {cls.TYPE!r} message")
        missing = [key for _, key, _ in cls.FIELDS if key not in d]
        if missing:
            raise WireError(f"{cls.TYPE}: missing {missing[0]!r}")
        return cls(**{a: _read(cls.TYPE, key, kind, d[key]) for a, key, kind in cls.FIELDS})


@dataclass(frozen=True)
class Ping(_Wire):
    """A probe. ``t0`` is the sender's wall time when sending (for clock offsets)."""

    TYPE = "ping"
    FIELDS = (("seq", "seq", "int"), ("target", "target", "name"), ("t0", "t0", "time"))
    seq: int
    target: str
    t0: float


@dataclass(frozen=True)
class Ack(_Wire):
    """The answer to a Ping: t1/t2 the receiver's wall time on arrival and reply;
    None on an ack relayed for a PingReq (its timing says nothing about offsets)."""

    TYPE = "ack"
    FIELDS = (("seq", "seq", "int"), ("t1", "t1", "time?"), ("t2", "t2", "time?"))
    seq: int
    t1: float | None
    t2: float | None


@dataclass(frozen=True)
class Nack(_Wire):
    """A relay could not reach the target of a PingReq (Lifeguard: the asker is healthy)."""

    TYPE = "nack"
    FIELDS = (("seq", "seq", "int"),)
    seq: int


@dataclass(frozen=True)
class PingReq(_Wire):
    """Ask the receiver to ping ``target`` at ``addr`` and relay the Ack (or a Nack)."""

    TYPE = "ping_req"
    FIELDS = (("seq", "seq", "int"), ("target", "target", "name"), ("addr", "addr", "addr"))
    seq: int
    target: str
    addr: str


@dataclass(frozen=True)
class Alive(_Wire):
    TYPE = "alive"
    FIELDS = (("inc", "inc", "int"), ("node", "node", "name"), ("addr", "addr", "addr"),
              ("meta", "meta", "meta"))
    inc: int
    node: str
    addr: str
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Suspect(_Wire):
    TYPE = "suspect"
    FIELDS = (("inc", "inc", "int"), ("node", "node", "name"), ("from_", "from", "name"))
    inc: int
    node: str
    from_: str


@dataclass(frozen=True)
class Dead(_Wire):
    """``node`` has failed; when ``from_ == node`` it is a graceful leave."""

    TYPE = "dead"
    FIELDS = (("inc", "inc", "int"), ("node", "node", "name"), ("from_", "from", "name"))
    inc: int
    node: str
    from_: str


@dataclass(frozen=True)
class MemberSummary:
    """One member in a PushPull; on the wire ``[name, addr, inc, state, meta]``."""

    name: str
    addr: str
    inc: int
    state: MemberState
    meta: dict[str, Any] = field(default_factory=dict)

    def to_wire(self) -> list[Any]:
        return [self.name, self.addr, self.inc, self.state.value, self.meta]

    @classmethod
    def from_wire(cls, item: object) -> MemberSummary:
        if not isinstance(item, list | tuple) or len(item) != 5:
            raise WireError("push_pull: a member must be [name, addr, inc, state, meta]")
        name, addr, inc, state, meta = item
        if type(inc) is not int or not 0 <= inc <= _MAX_INT:
            raise WireError("push_pull: a member's incarnation must be an int in 0..2**63-1")
        try:
            st = MemberState(state)
        except ValueError:
            raise WireError(f"push_pull: unknown member state {state!r:.30}") from None
        return cls(_check_name(name), _check_addr(addr), inc, st, _check_meta(meta))


@dataclass(frozen=True)
class PushPull:
    """Full state, sent over a stream; ``join`` marks the first exchange of a joining node."""

    TYPE: ClassVar[str] = "push_pull"
    join: bool
    members: tuple[MemberSummary, ...]

    def to_wire(self) -> dict[str, Any]:
        return {TYPE_KEY: self.TYPE, "join": self.join,
                "members": [m.to_wire() for m in self.members]}

    @classmethod
    def from_wire(cls, d: object) -> PushPull:
        if not isinstance(d, Mapping) or d.get(TYPE_KEY) != cls.TYPE:
            raise WireError(f"not a {cls.TYPE!r} message")
        join, members = d.get("join"), d.get("members")
        if not isinstance(join, bool) or not isinstance(members, list | tuple):
            raise WireError("push_pull: 'join' must be a bool and 'members' a list")
        if len(members) > MAX_PUSH_PULL_MEMBERS:
            raise WireError(f"push_pull: more than {MAX_PUSH_PULL_MEMBERS} members")
        return cls(join, tuple(MemberSummary.from_wire(m) for m in members))


Message: TypeAlias = Ping | Ack | Nack | PingReq | Alive | Suspect | Dead | PushPull
_TYPES: dict[str, Callable[[object], Message]] = {
    cls.TYPE: cls.from_wire for cls in (Ping, Ack, Nack, PingReq, Alive, Suspect, Dead, PushPull)
}


def message_from_wire(d: object) -> Message:
    """The message a wire dict holds; WireError (a ProtocolError and ValueError) if none."""
    if not isinstance(d, Mapping):
        raise WireError("a message must be a map")
    kind = d.get(TYPE_KEY)
    decode = _TYPES.get(kind) if isinstance(kind, str) else None
    if decode is None:
        raise WireError(f"unknown message type {d.get('type')!r:.30}")
    return decode(d)


def packet_to_wire(messages: Iterable[Message]) -> list[dict[str, Any]]:
    return [m.to_wire() for m in messages]


def packet_from_wire(obj: object, max_messages: int = 256) -> list[Message]:
    """The messages of one packet (a list of wire dicts)."""
    if not isinstance(obj, list | tuple) or len(obj) > max_messages:
        raise WireError(f"a packet must be a list of at most {max_messages} messages")
    return [message_from_wire(d) for d in obj]


def wire_size(msg: Message) -> int:
    """Bytes of ``msg`` as msgpack (how piggy-backing fills a packet)."""
    return len(msgpack.packb(msg.to_wire(), use_bin_type=True))


# ------------------------------------------------------------------ records and effects
@dataclass(frozen=True)
class Member:
    """A snapshot of one member. ``clock_offset`` is its clock minus ours (EWMA, seconds);
    ``rtt`` and ``last_seen`` come from our direct probes of it (``now`` of the last ack)."""

    name: str
    address: str
    incarnation: int
    state: MemberState
    state_changed_at: float
    meta: dict[str, Any] = field(default_factory=dict)
    clock_offset: float | None = None
    rtt: float | None = None
    last_seen: float | None = None


@dataclass(frozen=True)
class SendPacket:
    addr: str
    messages: tuple[Message, ...]


@dataclass(frozen=True)
class StartStream:
    addr: str
    payload: PushPull


@dataclass(frozen=True)
class ClockSample:
    """A direct probe's four wall times (seconds): our send, their receive and reply, our
    receive; for a clock-offset estimator with a better filter than the EWMA here."""

    member: str
    t0: float
    t1: float
    t2: float
    t3: float


@dataclass(frozen=True)
class MemberChanged:
    """A member was added (``old_state`` None) or changed state, address or meta."""

    member: Member
    old_state: MemberState | None


Effect: TypeAlias = SendPacket | StartStream | MemberChanged | ClockSample


@dataclass(frozen=True)
class SwimConfig:
    """Timing and sizes; defaults are memberlist's DefaultLANConfig. Seconds and bytes."""

    probe_interval: float = 1.0
    probe_timeout: float = 0.5
    indirect_checks: int = 3
    retransmit_mult: int = 4
    suspicion_mult: int = 4
    suspicion_max_timeout_mult: int = 6
    awareness_max_multiplier: int = 8
    gossip_interval: float = 0.2
    gossip_nodes: int = 3
    gossip_to_the_dead_time: float = 30.0
    push_pull_interval: float = 30.0
    reconnect_dead: bool = True  # each push-pull round also tries one dead member
    dead_reap_time: float = 3600.0  # forget dead and left members after this long
    max_packet_bytes: int = 1400
    packet_overhead_bytes: int = 64  # kept free for framing, version and encryption
    clock_offset_alpha: float = 0.25

    def __post_init__(self) -> None:
        if not 0 < self.probe_timeout < self.probe_interval:
            raise ValueError("need 0 < probe_timeout < probe_interval")
        for name in ("gossip_interval", "push_pull_interval", "dead_reap_time"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0")
        if min(self.indirect_checks, self.retransmit_mult, self.gossip_nodes) < 1:
            raise ValueError("indirect_checks, retransmit_mult, gossip_nodes must be >= 1")
        if self.suspicion_mult < 1 or self.suspicion_max_timeout_mult < 1:
            raise ValueError("suspicion multipliers must be >= 1")
        if self.awareness_max_multiplier < 1 or not 0 < self.clock_offset_alpha <= 1:
            raise ValueError("awareness_max_multiplier >= 1 and 0 < clock_offset_alpha <= 1")
        if self.max_packet_bytes - self.packet_overhead_bytes < 256:
            raise ValueError("max_packet_bytes leaves under 256 bytes per packet")


@dataclass(frozen=True)
class SwimStatistics:
    """Counters since start. ``median_clock_offset``: median of our offsets to alive
    members and 0 for ourselves, i.e. the cluster median clock minus ours (None: none)."""

    name: str
    incarnation: int
    health_score: int
    left: bool
    members_alive: int
    members_suspect: int
    members_dead: int
    members_left: int
    pending_broadcasts: int
    median_clock_offset: float | None
    probes_sent: int
    probes_failed: int
    indirect_probes_sent: int
    acks_received: int
    nacks_received: int
    pings_received: int
    ping_reqs_relayed: int
    suspicions_started: int
    confirmations: int
    refutations: int
    updates_ignored: int
    address_conflicts: int
    push_pulls_started: int


@dataclass
class _Probe:
    seq: int
    target: str
    addr: str
    inc: int
    sent_wall: float
    timeout_at: float
    deadline: float
    indirect_sent: bool = False
    expected_nacks: int = 0
    nacks: int = 0


@dataclass(frozen=True)
class _Relay:
    origin_addr: str
    origin_seq: int
    nack_at: float


_COUNTER_FIELDS = ("probes_sent", "probes_failed", "indirect_probes_sent", "acks_received",
                   "nacks_received", "pings_received", "ping_reqs_relayed", "suspicions_started",
                   "confirmations", "refutations", "updates_ignored", "address_conflicts",
                   "push_pulls_started")
_LIST_HEADER = 5  # bytes of a msgpack array header, at most


# ---------------------------------------------------------------------------- the engine
class Swim:
    """One node's view of the cluster, driven by events; every method returns effects.

    Probing is round-robin over a shuffled member list (reshuffled each round, new
    members inserted at random): one probe per (health-scaled) probe interval; no ack
    by the (scaled) probe timeout sends PingReqs through ``indirect_checks`` random alive
    members; no ack by the end of the interval suspects the target. Broadcasts (Alive,
    Suspect, Dead) are piggy-backed on every packet and gossiped every gossip interval.
    A Swim that has left stays left: to rejoin, make a new one.
    """

    def __init__(self, self_name: str, self_addr: str, config: SwimConfig, rng: random.Random,
                 *, meta: Mapping[str, Any] | None = None, incarnation: int = 1,
                 now: float = 0.0) -> None:
        own_meta = _check_meta(dict(meta or {}))
        if not 0 <= incarnation <= _MAX_INT:
            raise ValueError(f"incarnation out of range: {incarnation}")
        self.name, self.addr = _check_name(self_name), _check_addr(self_addr)
        self.config, self._rng = config, rng
        me = Member(self_name, self_addr, incarnation, _A, now, own_meta, clock_offset=0.0)
        self._members: dict[str, Member] = {self_name: me}
        self._order, self._index = [self_name], 0
        self._suspicions: dict[str, Suspicion] = {}
        self._queue: TransmitQueue[Alive | Suspect | Dead] = TransmitQueue()
        self._awareness = self._seq = 0
        self._probe: _Probe | None = None
        self._relays: dict[int, _Relay] = {}
        self._left = False
        self._counts: Counter[str] = Counter()
        self._next_probe = now + rng.random() * config.probe_interval
        self._next_gossip = now + rng.random() * config.gossip_interval
        self._next_push_pull = now + rng.random() * config.push_pull_interval
        self._broadcast(Alive(incarnation, self_name, self_addr, own_meta))

    # ---- accessors
    @property
    def incarnation(self) -> int:
        return self._members[self.name].incarnation

    @property
    def health_score(self) -> int:
        return self._awareness

    @property
    def has_left(self) -> bool:
        return self._left

    def members(self) -> list[Member]:
        """Snapshots of every known member, ourselves included."""
        return [_snapshot(m) for m in self._members.values()]

    def member(self, name: str) -> Member | None:
        m = self._members.get(name)
        return None if m is None else _snapshot(m)

    def suspicion_deadline(self, name: str) -> float | None:
        """When ``name`` (a suspect) will be declared dead, given its confirmations so far."""
        s = self._suspicions.get(name)
        return None if s is None else s.deadline

    def clock_offsets(self) -> dict[str, float]:
        """Each live peer's clock minus ours (seconds), where probes have measured it."""
        return {m.name: m.clock_offset for m in self._members.values()
                if m.name != self.name and m.state in (_A, _S) and m.clock_offset is not None}

    def statistics(self) -> SwimStatistics:
        by_state = Counter(m.state for m in self._members.values())
        offsets = [off for name, off in self.clock_offsets().items()
                   if self._members[name].state is _A]
        return SwimStatistics(
            name=self.name, incarnation=self.incarnation, health_score=self._awareness,
            left=self._left, members_alive=by_state[_A], members_suspect=by_state[_S],
            members_dead=by_state[_D], members_left=by_state[_L],
            pending_broadcasts=len(self._queue),
            median_clock_offset=median_offset([0.0, *offsets]) if offsets else None,
            **{k: self._counts[k] for k in _COUNTER_FIELDS},
        )

    def next_deadline(self) -> float:
        """The earliest ``now`` at which tick() has something to do."""
        times = [self._next_gossip, *(r.nack_at for r in self._relays.values()),
                 *(s.deadline for s in self._suspicions.values())]
        if not self._left:
            times += [self._next_probe, self._next_push_pull]
        if self._probe is not None:
            times.append(self._probe.deadline)
            if not self._probe.indirect_sent:
                times.append(self._probe.timeout_at)
        return min(times)

    # ---- inputs
    def tick(self, now: float, wall: float | None = None) -> list[Effect]:
        """Run the timers that are due at ``now``: probes, relay nacks, suspicion
        timeouts, gossip and push-pull."""
        wall = now if wall is None else wall
        fx: list[Effect] = []
        self._check_probe(now, fx)
        for seq, relay in list(self._relays.items()):
            if now >= relay.nack_at:
                del self._relays[seq]
                fx.append(self._packet(relay.origin_addr, [Nack(relay.origin_seq)]))
        for name, susp in list(self._suspicions.items()):
            if now >= susp.deadline:
                fx += self._on_dead(Dead(self._members[name].incarnation, name, self.name), now)
        if not self._left and now >= self._next_probe:
            self._start_probe(now, wall, fx)
        if now >= self._next_gossip:
            self._next_gossip = now + self.config.gossip_interval
            self._gossip(now, fx)
        if not self._left and now >= self._next_push_pull:
            n = self._live_count()
            self._next_push_pull = now + push_pull_scale(self.config.push_pull_interval, n)
            self._start_push_pulls(fx)
        return fx

    def on_message(self, src_addr: str, msg: Message, now: float,
                   wall: float | None = None) -> list[Effect]:
        """Handle one message that came from ``src_addr`` (where replies go). A PushPull
        is merged as merge_push_pull() does; answering a stream is the driver's part."""
        wall = now if wall is None else wall
        fx: list[Effect] = []
        if isinstance(msg, Ping):
            self._counts["pings_received"] += 1
            if msg.target == self.name:  # else a stale address: stay quiet
                answer: list[Message] = [Ack(msg.seq, wall, wall)]
                sender = self._held_down(src_addr)
                if sender is not None:  # tell it, so that it refutes
                    answer.append(Suspect(sender.incarnation, sender.name, self.name))
                fx.append(self._packet(src_addr, answer))
        elif isinstance(msg, Ack):
            self._on_ack(src_addr, msg, now, wall, fx)
        elif isinstance(msg, Nack):
            if self._probe is not None and self._probe.seq == msg.seq:
                self._probe.nacks += 1
                self._counts["nacks_received"] += 1
        elif isinstance(msg, PingReq):
            self._seq += 1
            nack_at = now + NACK_FRACTION * self.config.probe_timeout
            self._relays[self._seq] = _Relay(src_addr, msg.seq, nack_at)
            self._counts["ping_reqs_relayed"] += 1
            fx.append(self._packet(msg.addr, [Ping(self._seq, msg.target, wall)]))
        elif isinstance(msg, Alive):
            fx += self._on_alive(msg, now)
        elif isinstance(msg, Suspect):
            fx += self._on_suspect(msg, now)
        elif isinstance(msg, Dead):
            fx += self._on_dead(msg, now)
        else:
            fx += self.merge_push_pull(msg, now)
        return fx

    def on_packet(self, src_addr: str, messages: Iterable[Message], now: float,
                  wall: float | None = None) -> list[Effect]:
        """on_message for each message of one packet, in order."""
        return [e for msg in messages for e in self.on_message(src_addr, msg, now, wall)]

    def join(self, seed_addrs: Iterable[str], now: float) -> list[Effect]:
        """Push-pull with every seed (but ourselves); one that answers is enough."""
        if self._left:
            return []
        payload = self.push_pull_payload(join=True)
        addrs = [a for a in dict.fromkeys(_check_addr(a, numeric=False) for a in seed_addrs)
                 if a != self.addr]
        self._counts["push_pulls_started"] += len(addrs)
        return [StartStream(a, payload) for a in addrs]

    def leave(self, now: float) -> list[Effect]:
        """Leave gracefully: we become LEFT and gossip Dead(from ourselves) at once. Keep
        ticking until statistics().pending_broadcasts is 0 (or a deadline) to spread it."""
        if self._left:
            return []
        me = self._members[self.name]
        new = replace(me, state=advance(me.state, Event.LEAVE, IncRelation.SAME),
                      state_changed_at=now)
        self._left, self._probe, self._members[self.name] = True, None, new
        self._broadcast(Dead(me.incarnation, self.name, self.name))
        fx: list[Effect] = [MemberChanged(_snapshot(new), me.state)]
        self._gossip(now, fx)
        return fx

    def set_meta(self, meta: Mapping[str, Any], now: float) -> list[Effect]:
        """Change our own meta (gossiped as an Alive at a new incarnation)."""
        own = _check_meta(dict(meta))
        me = self._members[self.name]
        if self._left or own == me.meta:
            return []
        new = replace(me, incarnation=me.incarnation + 1, meta=own)
        self._members[self.name] = new
        self._broadcast(Alive(new.incarnation, self.name, self.addr, dict(own)))
        return [MemberChanged(_snapshot(new), me.state)]

    def probe_soon(self, name: str, now: float) -> None:
        """Probe ``name`` next, and now if no probe is under way: something else (a broken
        stream to it) suggests it is down, so find out at once instead of in its turn."""
        m = self._members.get(name)
        if m is None or name == self.name or m.state is not _A or self._left:
            return
        if self._probe is not None and self._probe.target == name:
            return
        try:
            pos = self._order.index(name)
        except ValueError:
            return
        del self._order[pos]
        if pos < self._index:
            self._index -= 1
        self._order.insert(self._index, name)
        if self._probe is None:
            self._next_probe = min(self._next_probe, now)

    def push_pull_payload(self, join: bool = False) -> PushPull:
        return PushPull(join, tuple(MemberSummary(m.name, m.address, m.incarnation, m.state,
                                                  dict(m.meta)) for m in self._members.values()))

    def merge_push_pull(self, payload: PushPull, now: float) -> list[Effect]:
        """Merge a peer's full state: alive as Alive, left as a leave, and (as memberlist
        does) suspect or dead only as a Suspect from us, so that our own probes decide."""
        fx: list[Effect] = []
        for r in payload.members:
            if r.state is _A:
                fx += self._on_alive(Alive(r.inc, r.name, r.addr, r.meta), now)
            elif r.state is _L:
                fx += self._on_dead(Dead(r.inc, r.name, r.name), now)
            else:
                fx += self._on_suspect(Suspect(r.inc, r.name, self.name), now)
        return fx

    # ---- probing
    def _start_probe(self, now: float, wall: float, fx: list[Effect]) -> None:
        if self._probe is not None:  # not reached: a probe's deadline is the next start
            probe, self._probe = self._probe, None
            self._probe_failed(probe, now, fx)
        interval = scaled_interval(self.config.probe_interval, self._awareness)
        self._next_probe = now + interval
        target = self._next_target(now)
        if target is None:
            return
        self._seq += 1
        timeout = scaled_interval(self.config.probe_timeout, self._awareness)
        self._probe = _Probe(self._seq, target.name, target.address, target.incarnation, wall,
                             now + timeout, now + interval)
        msgs: list[Message] = [Ping(self._seq, target.name, wall)]
        if target.state is _S:  # let it refute as soon as possible
            msgs.append(Suspect(target.incarnation, target.name, self.name))
        self._counts["probes_sent"] += 1
        fx.append(self._packet(target.address, msgs))

    def _next_target(self, now: float) -> Member | None:
        for _ in range(2 * len(self._order) + 2):
            if self._index >= len(self._order):
                self._reset_order(now)
            name = self._order[self._index]
            self._index += 1
            m = self._members.get(name)
            if m is not None and name != self.name and m.state in (_A, _S):
                return m
        return None

    def _reset_order(self, now: float) -> None:
        """A probe round is over: forget long-dead members and reshuffle."""
        for name, m in list(self._members.items()):
            if (m.state in (_D, _L) and name != self.name
                    and now - m.state_changed_at >= self.config.dead_reap_time):
                del self._members[name]
        self._order, self._index = list(self._members), 0
        self._rng.shuffle(self._order)

    def _check_probe(self, now: float, fx: list[Effect]) -> None:
        p = self._probe
        if p is None:
            return
        if not p.indirect_sent and now >= p.timeout_at:
            p.indirect_sent = True
            peers = self._pick(self.config.indirect_checks,
                               lambda m: m.state is _A and m.name not in (self.name, p.target))
            for peer in peers:
                fx.append(self._packet(peer.address, [PingReq(p.seq, p.target, p.addr)]))
            p.expected_nacks = len(peers)
            self._counts["indirect_probes_sent"] += len(peers)
        if now >= p.deadline:
            self._probe = None
            self._probe_failed(p, now, fx)

    def _probe_failed(self, p: _Probe, now: float, fx: list[Effect]) -> None:
        m = self._members.get(p.target)
        if m is None or m.state not in (_A, _S):
            return  # it left or died meanwhile: nothing to learn about us
        self._counts["probes_failed"] += 1
        missed = p.expected_nacks - p.nacks if p.expected_nacks else 1
        self._awareness = apply_awareness_delta(
            self._awareness, missed, self.config.awareness_max_multiplier)
        fx += self._on_suspect(Suspect(p.inc, p.target, self.name), now)

    def _on_ack(self, src_addr: str, msg: Ack, now: float, wall: float,
                fx: list[Effect]) -> None:
        p = self._probe
        if p is not None and p.seq == msg.seq:
            self._probe = None
            self._counts["acks_received"] += 1
            self._awareness = apply_awareness_delta(
                self._awareness, -1, self.config.awareness_max_multiplier)
            m = self._members.get(p.target)
            if m is None:
                return
            offset, rtt = m.clock_offset, m.rtt
            if msg.t1 is not None and msg.t2 is not None and src_addr == p.addr:
                off_sample, rtt_sample = clock_offset(p.sent_wall, msg.t1, msg.t2, wall)
                fx.append(ClockSample(p.target, p.sent_wall, msg.t1, msg.t2, wall))
                offset = ewma(offset, off_sample, self.config.clock_offset_alpha)
                rtt = ewma(rtt, rtt_sample, self.config.clock_offset_alpha)
            self._members[p.target] = replace(m, last_seen=now, clock_offset=offset, rtt=rtt)
        elif (relay := self._relays.pop(msg.seq, None)) is not None:
            fx.append(self._packet(relay.origin_addr, [Ack(relay.origin_seq, None, None)]))

    # ---- membership updates (the table is applied here, and only here)
    def _on_alive(self, a: Alive, now: float) -> list[Effect]:
        if a.node == self.name:
            return self._about_self(Event.ALIVE, a.inc, a)
        m = self._members.get(a.node)
        if m is None:
            new = Member(a.node, a.addr, a.inc, _A, now, dict(a.meta))
            self._members[a.node] = new
            pos = self._rng.randint(0, len(self._order))
            self._order.insert(pos, a.node)
            self._index += pos < self._index
            self._broadcast(a)
            return [MemberChanged(_snapshot(new), None)]
        key = (m.state, Event.ALIVE, relation(a.inc, m.incarnation))
        if key not in TRANSITIONS:
            return self._ignored()
        moved = a.addr != m.address
        if moved and m.state not in (_D, _L):
            self._counts["address_conflicts"] += 1  # two live nodes claim one name
            return []
        state = advance(*key)
        new = replace(m, address=a.addr, incarnation=a.inc, state=state, meta=dict(a.meta),
                      state_changed_at=now if state is not m.state else m.state_changed_at,
                      clock_offset=None if moved else m.clock_offset,
                      rtt=None if moved else m.rtt)
        return self._update(m, new, a)

    def _on_suspect(self, s: Suspect, now: float) -> list[Effect]:
        if s.node == self.name:
            return self._about_self(Event.SUSPECT, s.inc, None)
        m = self._members.get(s.node)
        key = None if m is None else (m.state, Event.SUSPECT, relation(s.inc, m.incarnation))
        if m is None or key not in TRANSITIONS:
            return self._ignored()
        if m.state is _S:  # a confirmation: may shorten the timer, never restarts it
            self._members[m.name] = replace(m, incarnation=s.inc)
            if self._suspicions[m.name].confirm(s.from_):
                self._counts["confirmations"] += 1
                self._broadcast(s)
            return []
        n, cfg = self._live_count(), self.config
        min_t = suspicion_timeout(cfg.suspicion_mult, n, cfg.probe_interval)
        self._suspicions[m.name] = Suspicion(
            s.from_, expected_confirmations(cfg.suspicion_mult, n), min_t,
            cfg.suspicion_max_timeout_mult * min_t, now)
        self._counts["suspicions_started"] += 1
        new = replace(m, incarnation=s.inc, state=_S, state_changed_at=now)
        return self._update(m, new, s)

    def _on_dead(self, d: Dead, now: float) -> list[Effect]:
        event = Event.LEAVE if d.from_ == d.node else Event.DEAD
        if d.node == self.name:
            return self._about_self(event, d.inc, None)
        m = self._members.get(d.node)
        key = None if m is None else (m.state, event, relation(d.inc, m.incarnation))
        if m is None or key not in TRANSITIONS:
            return self._ignored()
        new = replace(m, incarnation=d.inc, state=TRANSITIONS[key], state_changed_at=now)
        return self._update(m, new, d)

    def _about_self(self, event: Event, inc: int, alive: Alive | None) -> list[Effect]:
        me = self._members[self.name]
        rel = relation(inc, me.incarnation)
        reaction = SELF_RULES[event, rel]
        if alive is not None and rel is IncRelation.SAME and (
                alive.addr != me.address or alive.meta != me.meta):
            reaction = SelfReaction.REFUTE  # someone else claims our name, or an old meta
        if self._left or reaction is SelfReaction.IGNORE:
            return self._ignored()
        if reaction is SelfReaction.REANNOUNCE:
            self._broadcast(Alive(me.incarnation, self.name, self.addr, dict(me.meta)))
            return []
        self._counts["refutations"] += 1
        self._awareness = apply_awareness_delta(
            self._awareness, 1, self.config.awareness_max_multiplier)
        self._members[self.name] = me = replace(me, incarnation=max(inc, me.incarnation) + 1)
        self._broadcast(Alive(me.incarnation, self.name, self.addr, dict(me.meta)))
        return []

    def _update(self, old: Member, new: Member, msg: Alive | Suspect | Dead) -> list[Effect]:
        self._members[new.name] = new
        if new.state is not _S:
            self._suspicions.pop(new.name, None)
        self._broadcast(msg)
        if (new.state, new.address, new.meta) == (old.state, old.address, old.meta):
            return []
        return [MemberChanged(_snapshot(new), old.state)]

    def _held_down(self, addr: str) -> Member | None:
        """The member at ``addr`` if we hold it SUSPECT or DEAD (not LEFT)."""
        for m in self._members.values():
            if m.address == addr and m.name != self.name and m.state in (_S, _D):
                return m
        return None

    def _ignored(self) -> list[Effect]:
        self._counts["updates_ignored"] += 1
        return []

    # ---- dissemination
    def _broadcast(self, msg: Alive | Suspect | Dead) -> None:
        self._queue.put(msg.node, msg, wire_size(msg))

    def _budget(self) -> int:
        return self.config.max_packet_bytes - self.config.packet_overhead_bytes - _LIST_HEADER

    def _packet(self, addr: str, primary: list[Message]) -> SendPacket:
        """One packet: ``primary`` then as many broadcasts as fit."""
        budget = self._budget() - sum(wire_size(m) for m in primary)
        limit = retransmit_limit(self.config.retransmit_mult, self._live_count())
        return SendPacket(addr, (*primary, *self._queue.take(budget, limit)))

    def _gossip(self, now: float, fx: list[Effect]) -> None:
        if not len(self._queue):
            return
        to_dead = self.config.gossip_to_the_dead_time
        targets = self._pick(self.config.gossip_nodes, lambda m: m.name != self.name and (
            m.state in (_A, _S) or (m.state is _D and now - m.state_changed_at < to_dead)))
        limit = retransmit_limit(self.config.retransmit_mult, self._live_count())
        for t in targets:
            msgs = self._queue.take(self._budget(), limit)
            if not msgs:
                break
            fx.append(SendPacket(t.address, tuple(msgs)))

    def _start_push_pulls(self, fx: list[Effect]) -> None:
        """Push-pull with one random alive member and (to heal partitions, as Serf's
        reconnect does) one random dead one."""
        states = (_A, _D) if self.config.reconnect_dead else (_A,)
        for state in states:
            for m in self._pick(1, lambda m: m.name != self.name and m.state is state):  # noqa: B023
                self._counts["push_pulls_started"] += 1
                fx.append(StartStream(m.address, self.push_pull_payload()))

    def _pick(self, k: int, pred: Callable[[Member], bool]) -> list[Member]:
        candidates = [m for m in self._members.values() if pred(m)]
        return self._rng.sample(candidates, min(k, len(candidates)))

    def _live_count(self) -> int:
        return sum(m.state in (_A, _S) for m in self._members.values())


def _snapshot(m: Member) -> Member:
    return replace(m, meta=dict(m.meta))
