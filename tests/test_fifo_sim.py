"""A fifo queue of several partitions on three simulated nodes (meshq.testing.sim):
producers on every node, one consumer, which gets every message in (HLC, node) order
cluster-wide (closed timestamps and the merge: meshq.server.fifo); the same load on a fair
queue does not, so the check can fail. Deterministic: virtual time, one seed each."""

from __future__ import annotations

from typing import Any

import pytest
import trio

from meshq.broker import Session
from meshq.cluster.changes import Progress, Put, Record
from meshq.hlc import pack
from meshq.states import State
from meshq.testing.history import History, fifo_breaks
from meshq.testing.sim import Simulation, run_scenario, run_seeds

Q = "orders"
PER_PRODUCER = 60


def node_of(mid: str) -> str:
    return mid.split("-", 1)[1]  # ids are "<hlc hex>-<node>"


async def run(sim: Simulation, ordering: str, prefetch: int, pull: bool = False,
              auto_ack: bool = False) -> tuple[History, int]:
    """Declare Q with six partitions; two producers on each node send at once while one
    consumer on n1 takes everything (a subscription, or ``pull``: receives of up to
    ``prefetch``, acked by the receive itself if ``auto_ack``); its deliveries recorded
    in a History, and how many of them came redelivered (put back: outside the order
    check)."""
    async with sim.client("n1") as c:
        await c.declare(Q, replicas=3, partitions=6, ordering=ordering)
    await sim.wait_converged()
    history = History()
    total = 6 * PER_PRODUCER
    got: list[str] = []
    again: list[bool] = []
    done = trio.Event()

    async def take(c: Any, d: Any) -> None:
        history.delivered("c", d.id, d.delivery_count, d.redelivered, None,
                          trio.current_time())
        history.fifo_delivered("c", d.id, d.hlc, node_of(d.id), d.redelivered,
                               trio.current_time())
        got.append(d.id)
        again.append(d.redelivered)
        if not auto_ack:
            await c.ack(Q, [d])
        history.ack_confirmed("c", d.id, trio.current_time())
        if len(set(got)) == total:
            done.set()

    async def consume() -> None:
        async with sim.client("n1") as c:
            if pull:
                while True:
                    for d in await c.receive(Q, max=prefetch, wait=5.0,
                                             auto_ack=auto_ack):
                        await take(c, d)
            async with c.consume(Q, prefetch=prefetch) as sub:
                async for d in sub:
                    await take(c, d)

    async def produce(node: str, k: int) -> None:
        async with sim.client(node) as p:
            for i in range(PER_PRODUCER):
                body = f"{node}.{k}.{i}"
                history.send_invoked(body, body)
                mid = await p.send(Q, body)
                history.send_confirmed(body, body, mid, trio.current_time())
                if i % 7 == 0:
                    await trio.sleep(0.003 * k)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(consume)
        nursery.cancel_scope.deadline = trio.current_time() + 300

        def subscribed() -> bool:
            return all(len(q.consumers) == 1 for sn in sim.nodes.values()
                       for q in sn.node.broker.queues[Q] if q.active)
        if not pull:
            await sim.until(subscribed, 10, "the consumer on every partition")
        async with trio.open_nursery() as producers:
            for node in ("n1", "n2", "n3"):
                for k in (1, 2):
                    producers.start_soon(produce, node, k)
        with trio.fail_after(60):
            await done.wait()
        nursery.cancel_scope.cancel()
    return history, sum(again)


@pytest.mark.parametrize("seed", [1, 2, 3])
@pytest.mark.parametrize(("prefetch", "pull", "auto_ack"), [
    (1, False, False), (20, False, False), (1, True, False), (20, True, False),
    (20, True, True)])
def test_one_consumer_gets_a_fifo_queue_in_hlc_order_from_producers_everywhere(
        seed: int, prefetch: int, pull: bool, auto_ack: bool) -> None:
    async def script(sim: Simulation) -> None:
        history, redelivered = await run(sim, "fifo", prefetch, pull, auto_ack)
        report = history.check()
        report.assert_ok()
        assert report.confirmed_sends == 6 * PER_PRODUCER
        assert report.deliveries == 6 * PER_PRODUCER  # each once
        # (a receive puts back what it took beyond its max: rare, and counted)
        assert redelivered <= (6 * PER_PRODUCER // 50 if pull else 0), redelivered

    run_scenario(script, seed=seed)


def test_a_fair_queue_under_the_same_load_breaks_hlc_order() -> None:
    """The control: what the check above finds without closed timestamps."""
    async def script(sim: Simulation) -> None:
        report = (await run(sim, "fair", 20))[0].check()
        assert report.fifo_breaks
        assert not (report.lost or report.double_leases)

    run_scenario(script, seed=1)


def test_a_send_stamped_by_a_cut_off_primary_comes_in_above_what_was_closed() -> None:
    """Seed 21's case (docs/architecture.md, fifo across partitions: failovers). n3, the
    primary of two partitions, is cut off from the consumer's side; a producer on n3
    sends, stamped there and confirmed by no holder, while n1 and n2 take n3's partitions
    over and the consumer on n1 gets later messages from a producer on n1. After the
    heal, n3's send (taken back, or stamped again where a copy of it comes in below what
    was closed) and the producer's retry of it (same dedup id) must not reach the
    consumer below what it already got; every confirmed send is delivered."""
    async def script(sim: Simulation) -> tuple[list[Any], History]:
        async with sim.client("n1") as c:
            await c.declare(Q, replicas=3, partitions=6, ordering="fifo")
        await sim.wait_converged()
        assert sim.primary(Q, 0) is not None
        assert "n3" in {sim.primary(Q, i) for i in range(6)}
        history = History()
        seen: list[Any] = []  # (id, (hlc, node), redelivered, at), as fifo_breaks takes
        confirmed: set[str] = set()
        delivered: set[str] = set()

        async def consume() -> None:
            async with sim.client("n1") as c, c.consume(Q, prefetch=5) as sub:
                async for d in sub:
                    now = trio.current_time()
                    history.delivered("c", d.id, d.delivery_count, d.redelivered, None, now)
                    history.fifo_delivered("c", d.id, d.hlc, node_of(d.id), d.redelivered,
                                           now)
                    seen.append((d.id, (d.hlc, node_of(d.id)), d.redelivered, now))
                    delivered.add(d.id)
                    await c.ack(Q, [d])
                    history.ack_confirmed("c", d.id, trio.current_time())

        async def produce(node: str, n: int, gap: float) -> None:
            async with sim.client(node) as p:
                for i in range(n):
                    body = f"{node}.{i}"
                    history.send_invoked(node, body)
                    mid = await p.send(Q, body)  # (retried with its dedup id until then)
                    history.send_confirmed(node, body, mid, trio.current_time())
                    confirmed.add(mid)
                    await trio.sleep(gap)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(consume)
            await sim.until(lambda: all(len(q.consumers) == 1 for sn in sim.nodes.values()
                                        for q in sn.node.broker.queues[Q] if q.active),
                            10, "the consumer on every partition")
            nursery.start_soon(produce, "n1", 150, 0.1)
            await trio.sleep(1.0)
            sim.net.partition([sim.nodes["n3"].address])  # n3 alone; n1, n2 and the consumer
            async with trio.open_nursery() as cut_off:
                cut_off.start_soon(produce, "n3", 3, 0.05)  # stamped on n3, unconfirmed
                await trio.sleep(12.0)  # its batches fail; n1 and n2 took over meanwhile
                sim.net.heal()
            await sim.wait_whole()
            await sim.until(lambda: len(confirmed) == 153 and confirmed <= delivered, 60,
                            "every confirmed send delivered")
            nursery.cancel_scope.cancel()
        return seen, history

    seen, history = run_scenario(script, seed=21)
    assert fifo_breaks("c", seen) == []
    report = history.check()
    report.assert_ok()
    assert report.confirmed_sends == 153



def test_a_new_primary_stamps_above_what_its_predecessor_closed() -> None:
    """The second failover case (docs/architecture.md): n3's clock jumped 2 s ahead (not
    yet caught), so its partitions close 2 s ahead of the other clocks. n3 dies, and the
    node that takes each of its partitions over within those 2 s must stamp above what n3
    closed (it reads the partition's closed bound from a write quorum of its holders);
    its closed timestamps are no higher than a bound confirmed at its own epoch."""
    async def script(sim: Simulation) -> None:
        async with sim.client("n1") as c:
            await c.declare(Q, replicas=3, partitions=6, ordering="fifo")
        await sim.wait_converged()
        mine = [i for i in range(6) if sim.primary(Q, i) == "n3"]
        assert mine
        n3 = sim.nodes["n3"]
        n3.clock.offset = 2.0
        broker = n3.node.broker
        closed = {}
        for _ in range(20):  # a fifo merge asking, as it does while it waits
            for i in mine:
                closed[i] = broker.closed_of(broker.queues[Q][i], [])
            await trio.sleep(0.01)
        for i in mine:
            q = broker.queues[Q][i]
            assert 0 < closed[i] <= q.bound_ok <= q.bound
        n3.kill()
        await sim.until(lambda: all(sim.primary(Q, i) not in (None, "n3") for i in mine),
                        10, "n3's partitions taken over")
        for i in mine:
            new = sim.nodes[sim.primary(Q, i)].node.broker  # type: ignore[index, union-attr]
            wall_ms = int(new.clock.time() * 1000)
            assert pack(wall_ms) < closed[i]  # (taken over within n3's lead)
            assert new.queues[Q][i].bound >= closed[i]
            assert new.hlc.now(wall_ms) > closed[i]

    run_scenario(script, seed=5)


def test_a_send_merged_in_below_the_closed_bound_is_stamped_again() -> None:
    """A copy of a send that no write quorum confirmed (a holder applied it before its
    sender was deposed) reaches the partition's dispatcher after it closed above it: it
    keeps its id (a retry of it is still answered with it) and takes a new stamp, above
    what was closed; one at or above the closed bound keeps its stamp."""
    async def script(sim: Simulation) -> None:
        async with sim.client("n1") as c:
            await c.declare(Q, replicas=3, partitions=6, ordering="fifo")
        await sim.wait_converged()
        name = sim.primary(Q, 0)
        assert name is not None
        broker = sim.nodes[name].node.broker  # type: ignore[union-attr]
        q = broker.queues[Q][0]
        closed = 0
        for _ in range(20):
            closed = broker.closed_of(q, [])
            await trio.sleep(0.01)
        assert closed > 0 and q.bound > closed

        def record(hlc: int) -> Record:
            return Record(f"{hlc:016x}-00000009", Q, 0, q.inc, hlc, "00000009", b"late",
                          None, None, Progress(int(State.READY), 0, 0.0, None, 0, 1, 1))

        low, high = record(closed - 1), record(q.bound + (1 << 16))
        broker.replica.merge([Put(low), Put(high)])
        assert q.messages[low.id].hlc > closed  # stamped again, under its own id
        assert q.messages[high.id].hlc == high.hlc

    run_scenario(script, seed=1)


def test_a_copy_stamped_again_elsewhere_takes_back_its_first_stamp() -> None:
    """(--heavy --fifo 6 --hot-ready 2 seed 11049) A dispatcher stamps again, in order, a
    key's messages m1 and m2 (not replicated). A holder has m2 with its first stamp, and
    gets m1 by repair with its new one, above m2's: it keeps m1 at its first stamp, so that
    when it takes the partition over, m1 still comes before m2."""
    async def script(sim: Simulation) -> None:
        async with sim.client("n1") as c:
            await c.declare(Q, replicas=3, partitions=6, ordering="fifo")
        await sim.wait_converged()
        primary = sim.primary(Q, 0)
        holders = [sim.nodes[n].node.broker for n in ("n1", "n2", "n3") if n != primary]
        q = holders[0].queues[Q][0]  # type: ignore[union-attr]

        def record(first: int, hlc: int) -> Record:
            return Record(f"{first:016x}-00000009", Q, 0, q.inc, hlc, "00000009", b"k",
                          None, None, Progress(int(State.READY), 0, 0.0, None, 0, 1, 1))

        base = max(max(sn.node.broker.queues[Q][0].bound,  # type: ignore[union-attr]
                       sn.node.broker.hlc.last)  # type: ignore[union-attr]
                   for sn in sim.nodes.values()) + (1 << 16)
        m2 = record(base + 2, base + 2)  # its first stamp
        m1 = record(base + 1, base + 3)  # stamped again above m2 by another dispatcher
        for broker in holders:  # (whichever takes over)
            broker.replica.merge([Put(m2)])  # type: ignore[union-attr]
            broker.replica.merge([Put(m1)])  # type: ignore[union-attr]
            assert broker.queues[Q][0].messages[m1.id].hlc == base + 1  # type: ignore[union-attr]
        sim.nodes[primary].kill()  # type: ignore[index]
        await sim.until(lambda: sim.primary(Q, 0) not in (None, primary), 10, "taken over")
        new = sim.nodes[sim.primary(Q, 0)].node.broker  # type: ignore[index, union-attr]
        got: list[Any] = []
        while len(got) < 2:
            got += await new.receive(Session(), Q, 2 - len(got), 5.0, None, [0])
        assert [m.id for m in got] == [m1.id, m2.id]

    run_scenario(script, seed=1)


def test_a_lease_raises_the_closed_bound_on_the_holders() -> None:
    """(--fifo 6 seed 69) A copy of an unconfirmed send below a message its partition has
    already delivered must be stamped again by the next primary: the lease's batch carries
    the bound above the delivered message to the holders, and a takeover reads it. (No
    closed timestamp is asked here, which raises the bound too.)"""
    async def script(sim: Simulation) -> None:
        async with sim.client("n1") as c:
            await c.declare(Q, replicas=3, partitions=6, ordering="fifo")
            await sim.wait_converged()
            mid = await c.send(Q, "m", partition_key="k")
        await sim.wait_converged()
        index = next(q.index for q in sim.nodes["n1"].node.broker.queues[Q]  # type: ignore[union-attr]
                     if mid in q.messages)
        name = sim.primary(Q, index)
        assert name is not None
        broker = sim.nodes[name].node.broker  # type: ignore[union-attr]
        [m] = await broker.receive(Session(), Q, 1, 0.0, None, [index])
        assert m.id == mid
        await sim.wait_converged()
        for sn in sim.nodes.values():
            assert sn.node.broker.queues[Q][index].bound > m.hlc  # type: ignore[union-attr]

    run_scenario(script, seed=2)


def test_a_fifo_takeover_stamps_again_through_a_backlog_on_disk() -> None:
    """Seed 3 with six fifo partitions and two READY messages of a partition kept in
    memory: a takeover stamps again a message below the closed bound, and the rest of
    the partition's order after it, which reaches messages on disk only: it reads them
    back first, or a key's later message (on disk, not stamped again) came out ahead."""
    [outcome] = run_seeds([3], jobs=1, hot_ready=2, fifo=6)
    assert outcome.ok, outcome.summary


def test_heavy_fifo_seeds_that_once_failed_keep_every_guarantee() -> None:
    """`--heavy --fifo 6 --hot-ready 2` seed 11049: a holder got by repair a copy another
    dispatcher had stamped again, above the key's later message it held with its first
    stamp, and stamped them again in that order when it took over
    (test_a_copy_stamped_again_elsewhere_takes_back_its_first_stamp keeps the case)."""
    [outcome] = run_seeds([11049], jobs=1, heavy=True, hot_ready=2, fifo=6)
    assert outcome.ok, outcome.summary


def test_dead_letters_into_a_fifo_queue_come_once_each_in_hlc_order() -> None:
    """Dead letters into a fifo queue of six partitions, from a fair one rejected by
    consumers on every node: each takes a fresh stamp on the node that dead-letters it
    and goes to a partition of the dead-letter queue that node dispatches (as a send
    does); a fifo subscriber of the dead-letter queue gets every one, once, in (HLC,
    node) order. (With the dead-letter queue fair, 18 of the 30 came out of that
    order.)"""
    async def script(sim: Simulation) -> tuple[list[Any], list[str], list[str]]:
        async with sim.client("n1") as c:
            await c.declare("dlq", replicas=3, partitions=6, ordering="fifo")
            await c.declare("src", replicas=3, partitions=6, dead_letter_queue="dlq")
        await sim.wait_converged()
        sent: list[str] = []
        rejected: list[str] = []
        seen: list[Any] = []  # (id, (hlc, node), redelivered, at), as fifo_breaks takes
        bodies: list[str] = []

        async def consume() -> None:
            async with sim.client("n3") as c, c.consume("dlq", prefetch=5) as sub:
                async for d in sub:
                    seen.append((d.id, (d.hlc, node_of(d.id)), d.redelivered,
                                 trio.current_time()))
                    bodies.append(d.body.decode())
                    await c.ack("dlq", [d])

        async def reject(node: str) -> None:
            async with sim.client(node) as c:
                while len(rejected) < 30:
                    got = await c.receive("src", max=3, wait=0.5)
                    if got:
                        await c.reject("src", got)
                        rejected.extend(d.body.decode() for d in got)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(consume)
            for node in ("n1", "n2", "n3"):
                async with sim.client(node) as p:
                    for i in range(10):
                        body = f"{node}.{i}"
                        await p.send("src", body)
                        sent.append(body)
            async with trio.open_nursery() as rejecters:
                for node in ("n1", "n2", "n3"):
                    rejecters.start_soon(reject, node)
            await sim.until(lambda: len(set(bodies)) == 30, 30, "every dead letter delivered")
            nursery.cancel_scope.cancel()
        return seen, sent, bodies

    seen, sent, bodies = run_scenario(script, seed=4)
    assert sorted(bodies) == sorted(sent)  # each once
    assert not any(redelivered for _, _, redelivered, _ in seen)
    assert fifo_breaks("c", seen) == []


def test_a_graceful_leave_waits_out_a_batch_whose_quorum_failed() -> None:
    """Seed 329 with six fifo partitions: a node leaving gracefully flushes its store,
    and the last batch had failed its write quorum (a Timeout): the flush waits for it,
    it does not raise (meshqd's SIGTERM path flushes the same way)."""
    [outcome] = run_seeds([329], jobs=1, fifo=6)
    assert outcome.ok, outcome.summary
