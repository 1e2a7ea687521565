"""Moves of partitions between nodes: what this node knows of them, and their cluster sum.

A *move* is a copy of a partition on its way after a join, a leave or a failover. Kinds:
``copy`` (a holder that lacks its synced copy; the primary sends it, and only the
primary knows, so only it reports it), ``handoff`` (a node that holds a copy it should
not -- a former holder, a stand-in's hints -- pushes it to the primary, then drops it)
and ``takeover`` (a new primary reads its holders before it dispatches). A node reports
the moves it makes (``Moves.report``); ``summary`` sums the reports of every live node
into the ``rebalance`` status (docs/ctl-json.md), which says ``moving`` until every node
answered, all see the same live members, all know the queues, and nothing moves.

State here (``Moves``): per partition this node dispatches, the epoch and followers it last
saw and the holders that have not had a complete sync since they became holders (or since
it took over without reading them); the progress of syncs and hand-offs under way; the
moves finished since the last placement change. Never: a holder reported as synced by a
sync that started before it was waiting; a finished move counted as moving.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from meshq.cluster.changes import Move, MovesAnswer, PartKey

__all__ = ["KINDS", "PHASES", "Moves", "PartView", "annotate", "fraction", "summary"]

KINDS = ("copy", "handoff", "takeover")
# waiting: for the next repair round; comparing: digests; copying: records on their way;
# reading: a takeover's reads; done: finished since the last placement change.
PHASES = ("waiting", "comparing", "copying", "reading", "done")
MAX_FINISHED = 4096  # finished moves remembered (the latest), for the progress totals


@dataclass(frozen=True)
class PartView:
    """What ``Moves.report`` needs of one partition here, in this node's view."""

    part: PartKey
    primary: str | None
    holders: tuple[str, ...]
    active: bool  # dispatched here
    messages: int  # records of the copy here (in memory and on disk only)
    tombs: int  # its tombstones


@dataclass
class _Progress:
    since: float
    phase: str = "waiting"
    total: int | None = None  # known once compared
    done: int = 0
    target: str = ""


@dataclass
class Moves:
    _seen: dict[PartKey, tuple[int, frozenset[str]]] = field(default_factory=dict)
    _copies: dict[PartKey, dict[str, _Progress]] = field(default_factory=dict)
    _handoffs: dict[PartKey, _Progress] = field(default_factory=dict)
    _finished: list[Move] = field(default_factory=list)

    # -- as the primary ------------------------------------------------------------------
    def taken_over(self, part: PartKey, epoch: int, followers: Iterable[str],
                   synced: Iterable[str], now: float) -> None:
        """This node dispatches ``part`` from ``epoch`` on; the followers it did not
        sync while taking over wait for their copy."""
        fs = frozenset(followers)
        self._seen[part] = (epoch, fs)
        done = set(synced)
        self._copies[part] = {n: _Progress(now) for n in sorted(fs - done)}

    def dispatching(self, part: PartKey, epoch: int, followers: Iterable[str],
                    now: float) -> None:
        """``part`` is dispatched here at ``epoch`` with these followers: holders new
        since last seen at that epoch wait for their copy, former ones wait no more. The
        first sight at an epoch not taken over here (a declare here: nothing to copy) is
        the baseline."""
        fs = frozenset(followers)
        seen = self._seen.get(part)
        self._seen[part] = (epoch, fs)
        if seen is None or seen[0] != epoch:
            return
        waiting = self._copies.setdefault(part, {})
        for node in set(waiting) - fs:
            del waiting[node]
        for node in sorted(fs - seen[1]):
            waiting.setdefault(node, _Progress(now))

    def stopped(self, part: PartKey) -> None:
        """``part`` is not dispatched here (any more): its copies are another's to make."""
        self._seen.pop(part, None)
        self._copies.pop(part, None)

    def waiting(self, part: PartKey, node: str) -> bool:
        return node in self._copies.get(part, {})

    def syncing(self, part: PartKey, node: str, phase: str, done: int = 0,
                total: int | None = None) -> None:
        """A sync of ``part`` with ``node`` got this far (if ``node`` waits for a copy)."""
        p = self._copies.get(part, {}).get(node)
        if p is not None:
            p.phase, p.done, p.total = phase, done, total

    def synced(self, part: PartKey, node: str, started: float) -> None:
        """A sync of ``part`` with ``node`` that started at ``started`` completed: its
        copy is complete if it was waiting since before then."""
        waiting = self._copies.get(part, {})
        p = waiting.get(node)
        if p is not None and p.since <= started:
            del waiting[node]
            n = p.total or 0
            self._finish(Move(part[0], part[1], "copy", "", node, "done", n, n, 0.0))
        elif p is not None:  # the next sync will do
            p.phase, p.done, p.total = "waiting", 0, None

    # -- as a former holder ----------------------------------------------------------------
    def handing_off(self, part: PartKey, target: str, phase: str, now: float, done: int = 0,
                    total: int | None = None) -> None:
        p = self._handoffs.get(part)
        if p is None or p.target != target:
            p = self._handoffs[part] = _Progress(now, target=target)
        p.phase, p.done, p.total = phase, done, total

    def handed_off(self, part: PartKey, dropped: bool) -> None:
        """The hand-off ended; ``dropped``: this node's copy is gone."""
        p = self._handoffs.pop(part, None)
        if dropped and p is not None:
            n = p.total or 0
            self._finish(Move(part[0], part[1], "handoff", "", p.target, "done", n, n,
                              0.0))

    # -- reports ---------------------------------------------------------------------------
    def retain(self, parts: Iterable[PartKey]) -> None:
        """Forget what is kept of partitions not among ``parts`` (their queue is gone)."""
        keep = set(parts)
        for table in (self._seen, self._copies, self._handoffs):
            for part in [p for p in table if p not in keep]:
                del table[part]

    def _finish(self, move: Move) -> None:
        self._finished.append(move)
        del self._finished[:-MAX_FINISHED]

    def placement_changed(self) -> None:
        """A new rebalance: what finished before it is history."""
        self._finished.clear()

    def report(self, me: str, views: Iterable[PartView], now: float) -> tuple[Move, ...]:
        """The moves this node makes, in progress (``done`` ones since the last
        placement change last). A copy not compared yet counts the primary's records as
        its total (what a holder that has nothing needs); a hand-off not started, its
        own records and tombstones."""
        out: list[Move] = []
        for v in views:
            q, i = v.part
            if v.primary == me and not v.active:
                out.append(Move(q, i, "takeover", "", me, "reading", 0, 0, 0.0))
            elif v.primary == me:
                for node, p in sorted(self._copies.get(v.part, {}).items()):
                    if node in v.holders:
                        total = v.messages if p.total is None else p.total
                        out.append(Move(q, i, "copy", me, node, p.phase, total,
                                        min(p.done, total), round(now - p.since, 3)))
            elif me not in v.holders and (v.messages or v.tombs):
                h = self._handoffs.get(v.part)
                held = v.messages + v.tombs
                if h is None:
                    out.append(Move(q, i, "handoff", me, v.primary or "", "waiting", held, 0,
                                    0.0))
                else:
                    total = held if h.total is None else h.total
                    out.append(Move(q, i, "handoff", me, h.target, h.phase, total,
                                    min(h.done, total), round(now - h.since, 3)))
        out.sort(key=_order)
        fin = [Move(m.queue, m.index, m.kind, me, m.target, m.phase, m.total, m.done, 0.0)
               for m in self._finished]
        return tuple(out) + tuple(sorted(fin, key=_order))


def _order(m: Move) -> tuple[Any, ...]:
    return (m.queue, m.index, KINDS.index(m.kind) if m.kind in KINDS else 9, m.source,
            m.target)


def _move_dict(m: Move) -> dict[str, Any]:
    return {"queue": m.queue, "index": m.index, "kind": m.kind, "from": m.source or None,
            "to": m.target or None, "phase": m.phase, "messages_total": m.total,
            "messages_done": m.done, "age_s": m.age}


def summary(answers: Mapping[str, MovesAnswer | None]) -> dict[str, Any]:
    """The ``rebalance`` status from every live node's answer (None: it did not answer).
    ``moving`` is false only when every node answered, all see the same live members,
    all know the queues, and no move is under way."""
    asked = sorted(answers)
    unreachable = [n for n in asked if answers[n] is None]
    got = {n: a for n, a in answers.items() if a is not None}
    settling = []
    views = {a.live for a in got.values()}
    if len(views) > 1:
        settling.append("members disagree on who is live: " + "; ".join(
            f"{n} sees {','.join(a.live)}" for n, a in sorted(got.items())))
    settling += [f"{n} has not learned the cluster's queues yet"
                 for n, a in sorted(got.items()) if not a.catalog_ready]
    under_way = sorted((m for a in got.values() for m in a.moves if m.phase != "done"),
                       key=_order)
    finished = [m for a in got.values() for m in a.moves if m.phase == "done"]
    total = sum(m.total for m in under_way) + sum(m.total for m in finished)
    done = sum(m.done for m in under_way) + sum(m.total for m in finished)
    return {
        "moving": bool(under_way or unreachable or settling),
        "partitions_moving": len({(m.queue, m.index) for m in under_way}),
        "moves_under_way": len(under_way),
        "moves_done": len(finished),
        "messages_total": total,
        "messages_done": done,
        "nodes": sorted(got),
        "unreachable": unreachable,
        "settling": settling,
        "moves": [_move_dict(m) for m in under_way],
    }


def fraction(rebalance: Mapping[str, Any]) -> float:
    """How far the rebalance is, 0..1: by messages when any are counted, else by moves;
    1.0 when nothing moves."""
    total, done = rebalance.get("messages_total"), rebalance.get("messages_done")
    if isinstance(total, int) and isinstance(done, int) and total > 0:
        return max(0.0, min(1.0, done / total))
    under_way, finished = rebalance.get("moves_under_way"), rebalance.get("moves_done")
    if isinstance(under_way, int) and isinstance(finished, int) and under_way + finished:
        return finished / (under_way + finished)
    return 0.0 if rebalance.get("moving") else 1.0


def annotate(status: dict[str, Any], rebalance: dict[str, Any]) -> None:
    """Put ``rebalance`` into a status map: its own section, and each partition of
    ``queues[].partitions[]`` its ``moves`` (those under way)."""
    status["rebalance"] = rebalance
    each: dict[tuple[Any, Any], list[dict[str, Any]]] = {}
    for m in rebalance["moves"]:
        each.setdefault((m["queue"], m["index"]), []).append(
            {k: v for k, v in m.items() if k not in ("queue", "index")})
    for q in status.get("queues") or ():
        for p in q.get("partitions") or ():
            p["moves"] = each.get((q.get("name"), p.get("index")), [])
