"""A partition's digest sums kept as its messages change (meshq.broker.digests): they always
settle to what a walk of the messages computes, and a digest counts only the messages
changed since the last one."""

from __future__ import annotations

import itertools
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from trio.testing import MockClock

from meshq.broker.digests import Sums, walk
from meshq.broker.queue import Queue
from meshq.broker.replica import progress_of, record_of
from meshq.cluster import repair
from meshq.cluster.changes import Progress, Put, Step, Tomb
from meshq.cluster.lattice import BUCKETS, bucket_of
from meshq.model import Message, QueueOptions
from meshq.states import State
from tests.test_broker import Conn, Env

_seqs = itertools.count(1)


def _msg(n: int) -> Message:
    return Message(next(_seqs), f"{n:016x}-n1", "q", b"x", {}, n, "n1", epoch=1 << 32, vn=1)


# Each step: (0, n) add message n; (1, n) move its progress; (2, n) remove it; (3, k)
# settle at most k stale shares.
_steps = st.lists(st.tuples(st.integers(0, 3), st.integers(0, 30)), max_size=80)


@settings(max_examples=200)
@given(_steps)
def test_sums_settle_to_a_walk_whatever_happened_meanwhile(steps: list[tuple[int, int]]) -> None:
    q = Queue("q", QueueOptions())
    for kind, n in steps:
        mid = f"{n:016x}-n1"
        msg = q.messages.get(mid)
        if kind == 0 and msg is None:
            q.add(_msg(n))
        elif kind == 1 and msg is not None:
            msg.vn += 1
            msg.state = State.LEASED if msg.state == State.READY else State.READY
            q.changed(msg)
        elif kind == 2 and msg is not None:
            q.remove(msg)
        elif kind == 3:
            q.sums.settle(n)
    while not q.sums.settle(7):
        pass
    assert q.sums.hot == walk(q.messages.values())
    assert all(m.fp for m in q.messages.values())  # (a share of 0 has odds 2**-64)


def test_a_message_not_in_the_partition_is_not_counted() -> None:
    q = Queue("q", QueueOptions())
    stray = _msg(1)  # (a send not yet committed: its lease moved before it was indexed)
    q.changed(stray)
    q.remove(stray)
    assert q.sums.settle(10) and q.sums.hot == [0] * BUCKETS


def test_clear_forgets_everything() -> None:
    s = Sums()
    m = _msg(1)
    s.changed(m)
    s.settle(1)
    assert any(s.hot)
    s.clear()
    assert s.hot == [0] * BUCKETS and not s.stale


@pytest.fixture
def shares(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The ids whose share was computed (every call of the fingerprint)."""
    import meshq.broker.digests as digests

    seen: list[str] = []
    real = digests.fingerprint

    def counting(mid: str, key: tuple[Any, ...]) -> int:
        seen.append(mid)
        return real(mid, key)

    monkeypatch.setattr(digests, "fingerprint", counting)
    return seen


async def test_a_digest_counts_only_what_changed_since_the_last(
        env: Env, autojump_clock: MockClock, shares: list[str]) -> None:
    env.broker.check_digests = False  # (the check walks every message: not counted here)
    await env.declare()
    ids = await env.send(*(f"m{i}".encode() for i in range(300)))
    q = env.broker.queues["q"][0]
    first = await repair.digest(env.broker, q)
    assert len(shares) == 300
    shares.clear()
    assert await repair.digest(env.broker, q) == first and shares == []  # nothing changed
    conn = Conn(env)
    got = await conn.receive(n=5)  # five leases: their progress moved
    await conn.ack([m.id for m in got[:2]])  # two of them gone: nothing to count
    sums = await repair.digest(env.broker, q)
    assert sorted(shares) == sorted(m.id for m in got[2:])
    assert sums == walk(q.messages.values()) != first
    assert set(ids) - set(q.messages) == {m.id for m in got[:2]}


async def test_merged_changes_keep_the_sums(env: Env, autojump_clock: MockClock) -> None:
    """A holder's copy changes by merges only: a Put adds, a Step moves, a Tomb removes."""
    env.broker.check_digests = True  # (each digest below checks its sums against a walk)
    await env.declare()
    q = env.broker.queues["q"][0]
    q.active = False
    msgs = [_msg(n) for n in range(1, 40)]
    for m in msgs:
        m.inc = q.inc
    env.broker.replica.merge([Put(record_of(m)) for m in msgs])
    assert await repair.digest(env.broker, q) == walk(q.messages.values())
    p = progress_of(msgs[3])
    later = Progress(int(State.LEASED), 1, p.ready_at, 99.0, 7, p.epoch, p.vn + 1, "n2/1")
    env.broker.replica.merge([Step("q", 0, msgs[3].id, later),
                              Tomb("q", 0, msgs[5].id, 1.0)])
    assert q.messages[msgs[3].id].state == State.LEASED and msgs[5].id not in q.messages
    assert await repair.digest(env.broker, q) == walk(q.messages.values())


async def test_members_are_the_messages_of_the_buckets_asked(
        env: Env, autojump_clock: MockClock) -> None:
    await env.declare()
    await env.send(*(f"m{i}".encode() for i in range(200)))
    q = env.broker.queues["q"][0]
    found = await repair.members(env.broker, q, [3, 17])
    assert set(found.hot) == {3, 17}
    for b in (3, 17):
        assert {m.id for m in found.hot[b]} == {mid for mid in q.messages
                                                if bucket_of(mid) == b}
        assert found.cold[b] == []
    assert (await repair.members(env.broker, q, [])).hot == {}
