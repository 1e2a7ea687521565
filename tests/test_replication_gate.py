"""The replication gate in virtual time: a batch completes once durable here and on
W - 1 holders, in batch order; a holder that fails is replaced while the quorum can still
be met, and the batch fails UNAVAILABLE only once it cannot.

A Broker over a MemoryStore with a Replicator whose peer sends are recorded instead of
sent; the test answers for the peers.
"""

from __future__ import annotations

import pytest
import trio
import trio.testing

from meshq.broker import Broker
from meshq.errors import Unavailable
from meshq.mesh._rops import bucket_of
from meshq.mesh.placement import Placement
from meshq.mesh.replication import Replicator, _Held
from meshq.mesh.swim import Member, MemberState
from meshq.store import MemoryStore
from meshq.testing import TrioClock


def _members(states: dict[str, MemberState]) -> list[Member]:
    return [Member(name, f"127.0.0.1:{7000 + i}", 1, state, 0.0)
            for i, (name, state) in enumerate(states.items())]


class Env:
    def __init__(self, nursery: trio.Nursery, states: dict[str, MemberState],
                 write_quorum: int | None = None) -> None:
        self.states = states
        self.store = MemoryStore()
        self.broker = Broker(self.store, TrioClock(), node_id="a")
        placement = Placement("a", lambda: _members(self.states))
        self.repl = Replicator(me="a", broker=self.broker, store=self.store,
                               placement=placement, transport=None,  # type: ignore[arg-type]
                               cluster="test", write_quorum=write_quorum)
        self.sent: list[tuple[_Held, str]] = []
        self.repl._send_rops = lambda held, node, rops: self.sent.append(  # type: ignore[method-assign]
            (held, node))
        nursery.start_soon(self.store.run)

    def answer(self, node: str, ok: bool = True, index: int = 0) -> None:
        held, _ = [s for s in self.sent if s[1] == node][index]
        self.repl._acked(held, node, {} if ok else None)


ALIVE = MemberState.ALIVE


@pytest.fixture
async def env(nursery: trio.Nursery) -> Env:
    e = Env(nursery, {"a": ALIVE, "b": ALIVE, "c": ALIVE})
    e.broker.declare("q", {"replicas": 3})
    await trio.testing.wait_all_tasks_blocked()
    e.answer("b")  # the declaration's quorum
    assert e.broker.queue("q").created.done
    e.sent.clear()
    return e


async def test_confirmed_after_one_of_two_holders(env: Env) -> None:
    pending = env.broker.send("q", [{"body": b"x"}])
    await trio.testing.wait_all_tasks_blocked()
    assert sorted(node for _, node in env.sent) == ["b", "c"]
    assert not pending.batch.done  # durable here, not yet on a holder
    env.answer("b")
    assert pending.batch.done and pending.batch.error is None


async def test_a_failed_holder_does_not_fail_the_batch_while_another_can_answer(
        env: Env) -> None:
    pending = env.broker.send("q", [{"body": b"x"}])
    await trio.testing.wait_all_tasks_blocked()
    env.answer("b", ok=False)
    assert not pending.batch.done  # c may still confirm
    env.answer("c")
    assert pending.batch.done and pending.batch.error is None


async def test_both_holders_failing_is_unavailable(env: Env) -> None:
    pending = env.broker.send("q", [{"body": b"x"}])
    await trio.testing.wait_all_tasks_blocked()
    env.answer("b", ok=False)
    env.answer("c", ok=False)
    with pytest.raises(Unavailable):
        await pending.wait()


async def test_the_cluster_default_write_quorum_applies_to_queues_without_one(
        nursery: trio.Nursery) -> None:
    env = Env(nursery, {"a": ALIVE, "b": ALIVE, "c": ALIVE}, write_quorum=3)
    env.broker.declare("all", {"replicas": 3})
    env.broker.declare("own", {"replicas": 3, "write_quorum": 1})
    assert env.repl.replicas(env.broker.queue("all")).write_quorum == 3
    assert env.repl.replicas(env.broker.queue("own")).write_quorum == 1
    await trio.testing.wait_all_tasks_blocked()
    env.answer("b")
    assert not env.sent[0][0].batch.done  # W = 3: c must confirm the declarations too
    env.answer("c")
    assert env.sent[0][0].batch.done


async def test_batches_complete_in_order(env: Env) -> None:
    first = env.broker.send("q", [{"body": b"1"}])
    await trio.testing.wait_all_tasks_blocked()
    second = env.broker.send("q", [{"body": b"2"}])
    await trio.testing.wait_all_tasks_blocked()
    env.answer("b", index=1)  # the second batch's quorum arrives first
    assert not second.batch.done
    env.answer("c", index=0)
    assert first.batch.done and second.batch.done


async def test_below_the_quorum_a_send_is_refused_up_front(env: Env) -> None:
    env.states.update(b=MemberState.DEAD, c=MemberState.DEAD)
    env.repl.placement.refresh()
    with pytest.raises(Unavailable, match="needs 2"):
        env.repl.check_writable(env.broker.queue("q"))


async def test_a_dead_holder_is_replaced_by_a_stand_in(nursery: trio.Nursery) -> None:
    env = Env(nursery, {n: ALIVE for n in "abcd"})
    env.broker.declare("q", {"replicas": 3})
    await trio.testing.wait_all_tasks_blocked()
    for _, node in list(env.sent):  # the declaration went to every node: all confirm
        env.answer(node)
    assert env.broker.queue("q").created.done
    env.sent.clear()
    holders = env.repl.replicas(env.broker.queue("q")).holders
    spare = next(n for n in "abcd" if n not in holders)
    pending = env.broker.send("q", [{"body": b"x"}])
    await trio.testing.wait_all_tasks_blocked()
    targets = [node for held, node in env.sent if held.batch is pending.batch]
    env.states[targets[0]] = env.states[targets[1]] = MemberState.DEAD
    env.repl.placement.refresh()
    env.answer(targets[0], ok=False)
    env.answer(targets[1], ok=False)
    assert [node for _, node in env.sent][-1] == spare  # sloppy quorum: the next live node
    assert not pending.batch.done
    env.answer(spare)
    assert pending.batch.done and pending.batch.error is None



async def test_a_malformed_answer_from_a_holder_ends_only_that_exchange(env: Env) -> None:
    name = next(f"t{i}" for i in range(1000)
                if env.repl.placement.replicas(f"t{i}", 3).primary == "a")
    env.broker.declare(name, {"replicas": 3})
    q = env.broker.queue(name)
    q.active = False  # as after a start: this node must take it over

    class Garbage:
        async def call(self, frame: dict, **_: object) -> dict:
            return {"diff": [["not", "a", "bucket"]]}

    env.repl._link = lambda node: Garbage()  # type: ignore[assignment, return-value]
    await env.repl._takeover(q)  # both holders answer garbage: logged, skipped
    assert q.active


async def test_anti_entropy_never_deletes_what_arrived_after_its_digest(env: Env) -> None:
    """The holder lists a message sent after the primary took its digest, and not yet
    confirmed here (holders apply at once): it must not be deleted there."""
    q = env.broker.queue("q")
    sent_rops: list[list] = []

    class Holder:
        async def call(self, frame: dict, **_: object) -> dict:
            if frame["t"] == "digest":  # a send lands while the digest travels
                [mid] = env.broker.send("q", [{"body": b"late"}]).result
                return {"diff": [[bucket_of(mid), [[mid, 0, 0, 0.0, None]]]]}
            sent_rops.extend(frame["ops"])
            return {}

    env.repl._link = lambda node: Holder()  # type: ignore[assignment, return-value]
    await env.repl._sync(q, "b", merge=False)
    assert [r for r in sent_rops if r[0] == "d"] == []
