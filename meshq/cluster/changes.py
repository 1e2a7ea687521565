"""The change vocabulary of replication: typed records, and the one codec for the peer wire.

Everything replicas exchange is made of these frozen values: whole message records
(``Put``), a message's progress (``Step``), tombstones (``Tomb``), dedup entries, per-node
counters (``Tally``), and the catalog (``Decl`` for an incarnation of a queue, ``Drop`` for
its deletion). Requests and answers between peers are here too. Nothing here merges: the
join rules live in meshq.cluster.lattice. Never: a peer's bytes turned into anything but
these values or a PeerProtocolError (``decode`` is fuzzed).

A queue partition is named by ``(queue, index)``; every queue has one partition, index 0,
for now.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, TypeAlias

from meshq.mesh.wire import PeerProtocolError

__all__ = [
    "Answer",
    "ApplyAnswer",
    "ApplyReq",
    "CatalogAnswer",
    "CatalogReq",
    "Change",
    "Decl",
    "Dedup",
    "DigestAnswer",
    "DigestReq",
    "Drop",
    "FetchAnswer",
    "FetchReq",
    "Move",
    "MovesAnswer",
    "MovesReq",
    "PartKey",
    "Progress",
    "PromiseAnswer",
    "PromiseReq",
    "Put",
    "Record",
    "Request",
    "Step",
    "Tally",
    "Tomb",
    "decode",
    "decode_change",
    "encode",
    "encode_change",
]

PartKey: TypeAlias = tuple[str, int]  # (queue name, partition index)

MAX_NAME = 255
MAX_ID = 128
MAX_DEDUP_ID = 1024


@dataclass(frozen=True, slots=True)
class Progress:
    """Where a message stands: state (meshq.states.State value: READY, DELAYED or LEASED),
    delivery count, when a delayed one becomes ready, the lease's deadline, id (0: no
    lease) and holder (``node/boot`` of the consumer's connection, "" when none), and the
    version that orders progress: ``epoch`` (the dispatch epoch of the node that made the
    change) and ``vn`` (changes within that epoch)."""

    state: int
    count: int
    ready_at: float
    deadline: float | None
    lease: int
    epoch: int
    vn: int
    holder: str = ""


@dataclass(frozen=True, slots=True)
class Record:
    """A whole message as replicas hold it: immutable content and its progress.
    ``inc`` is the incarnation of its queue when it was sent; ``headers`` are packed."""

    id: str
    queue: str
    index: int
    inc: int
    hlc: int
    node: str
    body: bytes
    headers: bytes | None
    expires_at: float | None
    progress: Progress

    @property
    def part(self) -> PartKey:
        return (self.queue, self.index)


@dataclass(frozen=True, slots=True)
class Put:
    """A whole message record. A send's Put carries the message's dedup entry too
    (``dedup_id``, expiring at ``dedup_expires``), merged exactly as that entry alone (a
    ``Dedup``, which nothing sends yet) would be."""

    record: Record
    dedup_id: str | None = None
    dedup_expires: float = 0.0


@dataclass(frozen=True, slots=True)
class Step:
    """A message's progress moved (leased, requeued, delayed, extended)."""

    queue: str
    index: int
    id: str
    progress: Progress


@dataclass(frozen=True, slots=True)
class Tomb:
    """A message left its partition for good (acked, expired, dead-lettered, purged)."""

    queue: str
    index: int
    id: str
    at: float


@dataclass(frozen=True, slots=True)
class Dedup:
    queue: str
    dedup_id: str
    id: str
    expires_at: float


@dataclass(frozen=True, slots=True)
class Tally:
    """One dispatching node's counters of a partition (a G-counter entry)."""

    queue: str
    index: int
    node: str
    dead_lettered: int
    expired: int
    dropped: int


@dataclass(frozen=True, slots=True)
class Decl:
    """An incarnation of a queue: ``inc`` (a timestamp above every earlier drop) and its
    options (a map of QueueOptions fields)."""

    queue: str
    inc: int
    options: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Drop:
    """The queue was deleted: every incarnation up to ``upto`` and its messages are gone."""

    queue: str
    upto: int
    at: float


Change: TypeAlias = Put | Step | Tomb | Dedup | Tally | Decl | Drop


# -- requests and answers between peers ---------------------------------------------------
@dataclass(frozen=True, slots=True)
class ApplyReq:
    """Changes to apply. ``epochs`` fences partitions: (queue, index, epoch) of the sender's
    dispatch; a replica that promised a later epoch refuses that partition's changes.
    Changes of partitions without an epoch are merges (repair, dead-letter moves).
    ``bounds``: (queue, index, HLC) raising a fenced partition's closed bound (an HLC its
    dispatcher may close up to: meshq.broker.core, ``Broker.closed_of``); frame key
    ``b``, absent when empty, which a node of an earlier version ignores."""

    epochs: tuple[tuple[str, int, int], ...]
    changes: tuple[Change, ...]
    bounds: tuple[tuple[str, int, int], ...] = ()


@dataclass(frozen=True, slots=True)
class ApplyAnswer:
    fenced: tuple[tuple[str, int, int], ...] = ()  # (queue, index, promised epoch)
    missing: tuple[tuple[str, int, str], ...] = ()  # Steps for records not held here
    tombs: tuple[Tomb, ...] = ()  # Puts refused: the message is tombstoned here


@dataclass(frozen=True, slots=True)
class PromiseReq:
    """Take over dispatch of a partition at ``epoch`` (greater than any promised)."""

    queue: str
    index: int
    epoch: int
    decl: Decl | None


@dataclass(frozen=True, slots=True)
class PromiseAnswer:
    ok: bool
    promised: int  # the replica's promised epoch after the request
    has_copy: bool  # it holds records or tombstones of the partition
    bound: int = 0  # its closed bound of the partition (frame key ``b``; 0: none, or older)


@dataclass(frozen=True, slots=True)
class DigestReq:
    queue: str
    index: int
    decl: Decl | None
    sums: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class DigestAnswer:
    """For each bucket whose sum differed: the responder's (id, progress key) items; and
    the epoch it promised (a dispatcher behind it learns that it was taken over)."""

    diff: tuple[tuple[int, tuple[tuple[str, tuple[Any, ...]], ...]], ...]
    promised: int = 0


@dataclass(frozen=True, slots=True)
class FetchReq:
    queue: str
    index: int
    ids: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class FetchAnswer:
    records: tuple[Record, ...]
    tombs: tuple[Tomb, ...]


@dataclass(frozen=True, slots=True)
class CatalogReq:
    """The sender's whole catalog (live incarnations and drops), or only its hash when
    ``entries`` is None; the answer carries the responder's when they differ."""

    digest: int
    entries: tuple[Decl | Drop, ...] | None


@dataclass(frozen=True, slots=True)
class CatalogAnswer:
    digest: int
    entries: tuple[Decl | Drop, ...] | None


@dataclass(frozen=True, slots=True)
class MovesReq:
    """The moves the node makes (meshq.cluster.moves), for a rebalance status."""


@dataclass(frozen=True, slots=True)
class Move:
    """One partition's copy on its way (meshq.cluster.moves): ``kind`` copy, handoff or
    takeover, from ``source`` to ``target`` ("" when not one node), its ``phase``, the
    records it moves (``total``; an estimate while waiting) and those moved (``done``),
    and how long it has been under way (``age``, seconds)."""

    queue: str
    index: int
    kind: str
    source: str
    target: str
    phase: str
    total: int
    done: int
    age: float


@dataclass(frozen=True, slots=True)
class MovesAnswer:
    live: tuple[str, ...]  # the members the node's placement counts as live
    catalog_ready: bool  # it has learned the cluster's queues
    moves: tuple[Move, ...]


Request: TypeAlias = ApplyReq | PromiseReq | DigestReq | FetchReq | CatalogReq | MovesReq
Answer: TypeAlias = (ApplyAnswer | PromiseAnswer | DigestAnswer | FetchAnswer | CatalogAnswer
                     | MovesAnswer)


# -- the codec ------------------------------------------------------------------------------
# Each value is a list: [tag, field, ...]. Fields are checked on the way in: a peer that
# sends the wrong shape gets PeerProtocolError, never a TypeError deep in the broker.

def _bad(what: str) -> PeerProtocolError:
    return PeerProtocolError(f"malformed {what}")


def _str(v: Any, what: str, limit: int = MAX_NAME) -> str:
    if not isinstance(v, str) or not v or len(v) > limit:
        raise _bad(what)
    return v


def _int(v: Any, what: str, minimum: int = 0) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum or v >= 1 << 64:
        raise _bad(what)
    return v


def _float(v: Any, what: str) -> float:
    if isinstance(v, bool) or not isinstance(v, int | float):
        raise _bad(what)
    try:
        f = float(v)
    except OverflowError:
        raise _bad(what) from None
    if not math.isfinite(f):
        raise _bad(what)
    return f


def _opt_float(v: Any, what: str) -> float | None:
    return None if v is None else _float(v, what)


def _list(v: Any, what: str, n: int | None = None) -> list[Any]:
    if not isinstance(v, list) or (n is not None and len(v) != n):
        raise _bad(what)
    return v


def _enc_progress(p: Progress) -> list[Any]:
    return [p.state, p.count, p.ready_at, p.deadline, p.lease, p.epoch, p.vn, p.holder]


_U64 = 1 << 64


def _finite(x: Any) -> bool:
    return (type(x) is float or type(x) is int) and math.isfinite(x)


def _fast_progress(v: Any) -> Progress | None:
    """The common, well-formed case without a call per field (None: check it slowly)."""
    if type(v) is not list or len(v) != 8:
        return None
    state, count, ready_at, deadline, lease, epoch, vn, holder = v
    if (type(state) is int and 0 <= state <= 2 and type(count) is int and 0 <= count < _U64
            and _finite(ready_at) and (deadline is None or _finite(deadline))
            and type(lease) is int and 0 <= lease < _U64 and type(epoch) is int
            and 0 <= epoch < _U64 and type(vn) is int and 0 <= vn < _U64
            and type(holder) is str and len(holder) <= MAX_NAME + MAX_ID):
        return Progress(state, count, float(ready_at),
                        None if deadline is None else float(deadline), lease, epoch, vn,
                        holder)
    return None


def _fast_record(v: Any) -> Record | None:
    if type(v) is not list or len(v) != 10:
        return None
    mid, queue, index, inc, hlc, node, body, headers, expires, prog = v
    if (type(mid) is str and 0 < len(mid) <= MAX_ID and type(queue) is str
            and 0 < len(queue) <= MAX_NAME and type(index) is int and 0 <= index < _U64
            and type(inc) is int and 0 <= inc < _U64 and type(hlc) is int and 0 <= hlc < _U64
            and type(node) is str and 0 < len(node) <= MAX_ID and type(body) is bytes
            and (headers is None or type(headers) is bytes)
            and (expires is None or _finite(expires))):
        p = _fast_progress(prog)
        if p is not None:
            return Record(mid, queue, index, inc, hlc, node, body, headers,
                          None if expires is None else float(expires), p)
    return None


def _dec_progress(v: Any) -> Progress:
    fast = _fast_progress(v)
    if fast is not None:
        return fast
    state, count, ready_at, deadline, lease, epoch, vn, holder = _list(v, "progress", 8)
    if _int(state, "state") > 2:
        raise _bad("progress state")
    if not isinstance(holder, str) or len(holder) > MAX_NAME + MAX_ID:
        raise _bad("lease holder")
    return Progress(state, _int(count, "count"), _float(ready_at, "ready_at"),
                    _opt_float(deadline, "deadline"), _int(lease, "lease"),
                    _int(epoch, "epoch"), _int(vn, "vn"), holder)


def _enc_record(r: Record) -> list[Any]:
    return [r.id, r.queue, r.index, r.inc, r.hlc, r.node, r.body, r.headers, r.expires_at,
            _enc_progress(r.progress)]


def _dec_record(v: Any) -> Record:
    fast = _fast_record(v)
    if fast is not None:
        return fast
    mid, queue, index, inc, hlc, node, body, headers, expires, prog = _list(v, "record", 10)
    if not isinstance(body, bytes) or not (headers is None or isinstance(headers, bytes)):
        raise _bad("record body")
    return Record(_str(mid, "id", MAX_ID), _str(queue, "queue"), _int(index, "index"),
                  _int(inc, "inc"), _int(hlc, "hlc"), _str(node, "node", MAX_ID), body,
                  headers, _opt_float(expires, "expires_at"), _dec_progress(prog))


def _enc_change(c: Change) -> list[Any]:
    if type(c) is Put:
        if c.dedup_id is None:
            return ["P", _enc_record(c.record)]
        return ["P", _enc_record(c.record), c.dedup_id, c.dedup_expires]
    if type(c) is Step:
        return ["S", c.queue, c.index, c.id, _enc_progress(c.progress)]
    if type(c) is Tomb:
        return ["T", c.queue, c.index, c.id, c.at]
    if type(c) is Dedup:
        return ["K", c.queue, c.dedup_id, c.id, c.expires_at]
    if type(c) is Tally:
        return ["N", c.queue, c.index, c.node, c.dead_lettered, c.expired, c.dropped]
    if type(c) is Decl:
        return ["Q", c.queue, c.inc, c.options]
    if type(c) is Drop:
        return ["X", c.queue, c.upto, c.at]
    raise TypeError(f"not a change: {c!r}")


def _dec_change(v: Any) -> Change:
    v = _list(v, "change")
    tag = v[0] if v else None
    try:
        if tag == "P":
            if len(v) == 2:
                return Put(_dec_record(v[1]))
            _, rec, d, exp = v
            return Put(_dec_record(rec), _str(d, "dedup id", MAX_DEDUP_ID),
                       _float(exp, "dedup expiry"))
        if tag == "S":
            _, q, i, mid, prog = v
            return Step(_str(q, "queue"), _int(i, "index"), _str(mid, "id", MAX_ID),
                        _dec_progress(prog))
        if tag == "T":
            _, q, i, mid, at = v
            return Tomb(_str(q, "queue"), _int(i, "index"), _str(mid, "id", MAX_ID),
                        _float(at, "at"))
        if tag == "K":
            _, q, d, mid, exp = v
            return Dedup(_str(q, "queue"), _str(d, "dedup id", MAX_DEDUP_ID),
                         _str(mid, "id", MAX_ID), _float(exp, "expires_at"))
        if tag == "N":
            _, q, i, node, dl, ex, dr = v
            return Tally(_str(q, "queue"), _int(i, "index"), _str(node, "node", MAX_ID),
                         _int(dl, "tally"), _int(ex, "tally"), _int(dr, "tally"))
        if tag == "Q":
            _, q, inc, options = v
            if not isinstance(options, dict) or not all(isinstance(k, str) for k in options):
                raise _bad("options")
            return Decl(_str(q, "queue"), _int(inc, "inc"), options)
        if tag == "X":
            _, q, upto, at = v
            return Drop(_str(q, "queue"), _int(upto, "upto"), _float(at, "at"))
    except (ValueError, TypeError):  # the wrong number of fields, or an unhashable tag
        raise _bad(f"change {tag!r:.10}") from None
    raise _bad("change tag")


def _catalog(entries: Any) -> tuple[Decl | Drop, ...] | None:
    if entries is None:
        return None
    out = []
    for e in _list(entries, "catalog"):
        c = _dec_change(e)
        if not isinstance(c, Decl | Drop):
            raise _bad("catalog entry")
        out.append(c)
    return tuple(out)


def _part_epochs(v: Any, what: str) -> tuple[tuple[str, int, int], ...]:
    out = []
    for item in _list(v, what):
        q, i, e = _list(item, what, 3)
        out.append((_str(q, "queue"), _int(i, "index"), _int(e, "epoch")))
    return tuple(out)


def _node(v: Any) -> str:
    """A node's name, or "" for none."""
    return "" if v == "" else _str(v, "node")


def _dec_move(v: Any) -> Move:
    q, i, kind, source, target, phase, total, done, age = _list(v, "move", 9)
    return Move(_str(q, "queue"), _int(i, "index"), _str(kind, "kind", 16),
                _node(source), _node(target), _str(phase, "phase", 16),
                _int(total, "total"), _int(done, "done"), _float(age, "age"))


def _key(v: Any) -> tuple[Any, ...]:
    items = _list(v, "progress key", 8)
    for x in items[:7]:
        if isinstance(x, bool) or not (x is None or isinstance(x, int | float)):
            raise _bad("progress key")
    if not isinstance(items[7], str):
        raise _bad("progress key")
    return tuple(items)


def encode_change(c: Change) -> list[Any]:
    """One change as a list (for carrying a Decl inside a relayed client request)."""
    return _enc_change(c)


def decode_change(v: Any) -> Change:
    """A change from a peer; PeerProtocolError if malformed."""
    return _dec_change(v)


def encode(msg: Request | Answer) -> dict[str, Any]:
    """A request or answer as a frame map (``t`` names its type)."""
    t = type(msg)
    if t is ApplyReq:
        assert isinstance(msg, ApplyReq)
        frame = {"t": "apply", "e": [list(x) for x in msg.epochs],
                 "c": [_enc_change(c) for c in msg.changes]}
        if msg.bounds:
            frame["b"] = [list(x) for x in msg.bounds]
        return frame
    if t is ApplyAnswer:
        return {"t": "applied", "f": [list(x) for x in msg.fenced],  # type: ignore[union-attr]
                "m": [list(x) for x in msg.missing],  # type: ignore[union-attr]
                "x": [_enc_change(c) for c in msg.tombs]}  # type: ignore[union-attr]
    if t is PromiseReq:
        assert isinstance(msg, PromiseReq)
        return {"t": "promise", "q": msg.queue, "i": msg.index, "e": msg.epoch,
                "d": None if msg.decl is None else _enc_change(msg.decl)}
    if t is PromiseAnswer:
        assert isinstance(msg, PromiseAnswer)
        return {"t": "promised", "ok": msg.ok, "p": msg.promised, "c": msg.has_copy,
                "b": msg.bound}
    if t is DigestReq:
        assert isinstance(msg, DigestReq)
        return {"t": "digest", "q": msg.queue, "i": msg.index, "s": list(msg.sums),
                "d": None if msg.decl is None else _enc_change(msg.decl)}
    if t is DigestAnswer:
        assert isinstance(msg, DigestAnswer)
        return {"t": "digested", "diff": [[b, [[mid, list(k)] for mid, k in items]]
                                          for b, items in msg.diff], "p": msg.promised}
    if t is FetchReq:
        assert isinstance(msg, FetchReq)
        return {"t": "fetch", "q": msg.queue, "i": msg.index, "ids": list(msg.ids)}
    if t is FetchAnswer:
        assert isinstance(msg, FetchAnswer)
        return {"t": "fetched", "r": [_enc_record(r) for r in msg.records],
                "x": [_enc_change(c) for c in msg.tombs]}
    if t is CatalogReq or t is CatalogAnswer:
        assert isinstance(msg, CatalogReq | CatalogAnswer)
        return {"t": "catalog" if t is CatalogReq else "cataloged", "h": msg.digest,
                "c": None if msg.entries is None else [_enc_change(c) for c in msg.entries]}
    if t is MovesReq:
        return {"t": "moves"}
    if t is MovesAnswer:
        assert isinstance(msg, MovesAnswer)
        return {"t": "moving", "l": list(msg.live), "c": msg.catalog_ready,
                "m": [[m.queue, m.index, m.kind, m.source, m.target, m.phase, m.total,
                       m.done, m.age] for m in msg.moves]}
    raise TypeError(f"cannot encode {msg!r}")


def decode(frame: Any) -> Request | Answer:
    """A frame map from a peer as a request or answer; PeerProtocolError if malformed."""
    if not isinstance(frame, dict):
        raise _bad("frame")
    t = frame.get("t")
    try:
        if t == "apply":
            return ApplyReq(_part_epochs(frame["e"], "epochs"),
                            tuple(_dec_change(c) for c in _list(frame["c"], "changes")),
                            _part_epochs(frame.get("b", []), "bounds"))
        if t == "applied":
            missing = []
            for item in _list(frame["m"], "missing"):
                q, i, mid = _list(item, "missing", 3)
                missing.append((_str(q, "queue"), _int(i, "index"), _str(mid, "id", MAX_ID)))
            tombs = tuple(_dec_change(c) for c in _list(frame["x"], "tombs"))
            if not all(isinstance(c, Tomb) for c in tombs):
                raise _bad("tombs")
            return ApplyAnswer(_part_epochs(frame["f"], "fenced"), tuple(missing),
                               tombs)  # type: ignore[arg-type]
        if t == "promise":
            decl = None if frame["d"] is None else _dec_change(frame["d"])
            if decl is not None and not isinstance(decl, Decl):
                raise _bad("decl")
            return PromiseReq(_str(frame["q"], "queue"), _int(frame["i"], "index"),
                              _int(frame["e"], "epoch"), decl)
        if t == "promised":
            ok, has_copy = frame["ok"], frame["c"]
            if not isinstance(ok, bool) or not isinstance(has_copy, bool):
                raise _bad("promise answer")
            return PromiseAnswer(ok, _int(frame["p"], "promised"), has_copy,
                                 _int(frame.get("b", 0), "bound"))
        if t == "digest":
            decl = None if frame["d"] is None else _dec_change(frame["d"])
            if decl is not None and not isinstance(decl, Decl):
                raise _bad("decl")
            sums = tuple(_int(s, "sum") for s in _list(frame["s"], "sums"))
            return DigestReq(_str(frame["q"], "queue"), _int(frame["i"], "index"), decl, sums)
        if t == "digested":
            diff = []
            for entry in _list(frame["diff"], "diff"):
                b, items = _list(entry, "diff", 2)
                pairs = []
                for it in _list(items, "items"):
                    mid, key = _list(it, "item", 2)
                    pairs.append((_str(mid, "id", MAX_ID), _key(key)))
                diff.append((_int(b, "bucket"), tuple(pairs)))
            return DigestAnswer(tuple(diff), _int(frame.get("p", 0), "promised"))
        if t == "fetch":
            ids = tuple(_str(i, "id", MAX_ID) for i in _list(frame["ids"], "ids"))
            return FetchReq(_str(frame["q"], "queue"), _int(frame["i"], "index"), ids)
        if t == "fetched":
            tombs = tuple(_dec_change(c) for c in _list(frame["x"], "tombs"))
            if not all(isinstance(c, Tomb) for c in tombs):
                raise _bad("tombs")
            return FetchAnswer(tuple(_dec_record(r) for r in _list(frame["r"], "records")),
                               tombs)  # type: ignore[arg-type]
        if t in ("catalog", "cataloged"):
            cls = CatalogReq if t == "catalog" else CatalogAnswer
            return cls(_int(frame["h"], "digest"), _catalog(frame["c"]))
        if t == "moves":
            return MovesReq()
        if t == "moving":
            ready = frame["c"]
            if not isinstance(ready, bool):
                raise _bad("moves answer")
            return MovesAnswer(tuple(_str(n, "member") for n in _list(frame["l"], "live")),
                               ready, tuple(_dec_move(m) for m in _list(frame["m"], "moves")))
    except KeyError as exc:
        raise _bad(f"{t!r:.20} frame: no {exc}") from None
    raise PeerProtocolError(f"unknown peer message {t!r:.40}")
