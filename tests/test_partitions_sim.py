"""A queue of six partitions on three simulated nodes (meshq.testing.sim), served to one
client as one queue by its node (meshq.server.spread): a waiting receive over partitions
here and elsewhere, with and without auto_ack; bad input refused before any partition is
touched. Deterministic: virtual time, a simulated network, one seed each."""

from __future__ import annotations

import pytest
import trio

from meshq.broker.partitions import parse_receipt
from meshq.errors import BadRequest, MeshqError
from meshq.testing.sim import Simulation, run_scenario

Q = "jobs"


def scenario(script, *, seed: int):
    async def bounded(sim: Simulation):
        with trio.fail_after(300):
            return await script(sim)
    return run_scenario(bounded, seed=seed)


async def six(sim: Simulation, **options) -> tuple[list[int], list[int]]:
    """Declare Q with six partitions; which n1 dispatches, and which it does not."""
    async with sim.client("n1") as c:
        await c.declare(Q, replicas=3, partitions=6, visibility_timeout=30, **options)
    await sim.wait_converged()
    qs = sim.nodes["n1"].node.broker.queues[Q]
    return [q.index for q in qs if q.active], [q.index for q in qs if not q.active]


async def consumers_on_every_partition(sim: Simulation, n: int) -> None:
    """Until every partition's primary has ``n`` consumers (subscriptions' parts, or the
    parts of waiting receives)."""
    def there() -> bool:
        live = [q for sn in sim.nodes.values() for q in sn.node.broker.queues[Q] if q.active]
        return len(live) == 6 and all(len(q.consumers) >= n for q in live)
    await sim.until(there, 10, f"{n} consumer(s) on every partition")


def copies(sim: Simulation) -> dict[str, tuple[str, int]]:
    """Message id -> (state, delivery count) on each partition's primary."""
    out = {}
    for sn in sim.nodes.values():
        for q in sn.node.broker.queues[Q]:
            if q.active:
                out.update({m.id: (m.state.name, m.delivery_count)
                            for m in q.messages.values()})
    return out


@pytest.mark.parametrize("seed", [1, 2, 3])
@pytest.mark.parametrize("auto_ack", [False, True])
def test_a_waiting_receive_returns_what_arrives_anywhere_and_loses_nothing(
        seed: int, auto_ack: bool) -> None:
    async def script(sim: Simulation) -> None:
        here, elsewhere = await six(sim)
        assert here and elsewhere
        async with sim.client("n1") as c, sim.client("n2") as p:
            got: list = []

            async def receive() -> None:
                got.extend(await c.receive(Q, max=5, wait=20.0, auto_ack=auto_ack))

            async with trio.open_nursery() as nursery:
                nursery.start_soon(receive)
                await consumers_on_every_partition(sim, 1)  # it waits on all of them
                t_send = trio.current_time()
                await p.request("send", queue=Q, partition=elsewhere[0],
                                messages=[{"body": b"first"}])
            assert [d.body for d in got] == [b"first"]
            assert trio.current_time() - t_send < 1.0  # woken, not at the end of its wait
            assert got[0].delivery_count == 1
            # Its other parts stopped waiting: what comes next is there for the next one.
            sent = await p.request("send", queue=Q, partition=elsewhere[-1],
                                   messages=[{"body": b"second"}])
            again = await c.receive(Q, max=5, wait=0, auto_ack=auto_ack)
            assert [(d.id, d.delivery_count) for d in again] == [(sent["ids"][0], 1)]
            if not auto_ack:
                await c.ack(Q, got + again)
            keyed = [{"body": f"k{i}".encode(), "partition_key": f"key{i}"} for i in range(8)]
            ids = (await p.request("send", queue=Q, messages=keyed))["ids"]
            seen: list = []
            while len(seen) < len(ids):
                batch = await c.receive(Q, max=3, wait=5.0, auto_ack=auto_ack)
                assert batch, seen
                seen += batch
                if not auto_ack:
                    await c.ack(Q, batch)
            assert sorted(d.id for d in seen) == sorted(ids)
            assert await c.receive(Q, max=10, wait=1.0) == []
        await sim.wait_converged()
        assert not copies(sim)  # every one acked, on every primary

    scenario(script, seed=seed)


def test_a_wait_the_first_part_answers_ends_the_other_parts_waits() -> None:
    """Messages that arrive on several partitions while a receive waits: the first
    part's win; the others' waits end, and what they took goes back (counted)."""
    async def script(sim: Simulation) -> None:
        _, elsewhere = await six(sim)
        async with sim.client("n1") as c, sim.client("n3") as p:
            got: list = []

            async def receive() -> None:
                got.extend(await c.receive(Q, max=10, wait=20.0))

            async with trio.open_nursery() as nursery:
                nursery.start_soon(receive)
                await consumers_on_every_partition(sim, 1)  # it waits on all of them
                msgs = [{"body": f"m{i}".encode()} for i in range(3)]
                ids = []
                for index in elsewhere[:3]:
                    r = await p.request("send", queue=Q, partition=index, messages=msgs)
                    ids += r["ids"]
            assert got
            await c.ack(Q, got)
            rest: list = []
            while len(got) + len(rest) < len(ids):
                batch = await c.receive(Q, max=10, wait=5.0)
                assert batch
                rest += batch
                await c.ack(Q, batch)
            assert sorted(d.id for d in got + rest) == sorted(ids)
            assert all(parse_receipt(d.receipt)[2] in elsewhere for d in got + rest)

    scenario(script, seed=4)


def test_bad_input_is_refused_before_any_partition_is_touched() -> None:
    async def script(sim: Simulation) -> None:
        await six(sim)
        async with sim.client("n1") as c:
            for fields, why in ((dict(max=20000), "'max'"),
                                (dict(visibility_timeout="x"), "visibility_timeout"),
                                (dict(auto_ack="yes"), "auto_ack"),
                                (dict(partition=1), "'partition' names a send's"),
                                (dict(partitions="x"), "'partitions'")):
                with pytest.raises(BadRequest, match=why):
                    await c.request("receive", queue=Q, **fields)
            with pytest.raises(BadRequest, match="'partition' names a send's"):
                await c.request("consume", queue=Q, prefetch=5, partition="x")
            for bad in ({"body": b"b", "partition_key": 5}, {"body": b"b", "ttl": "x",
                                                            "partition_key": "b"}):
                with pytest.raises(MeshqError) as err:
                    await c.request("send", queue=Q, messages=[
                        {"body": b"good", "partition_key": "a"}, bad])
                assert err.value.code == "BAD_REQUEST", err.value
            with pytest.raises(BadRequest, match="at most"):
                await c.request("send", queue=Q, messages=[
                    {"body": b"x", "partition_key": str(i)} for i in range(100_000)])
            assert await c.receive(Q, max=10, wait=1.0) == []  # no part was written

    scenario(script, seed=5)


@pytest.mark.parametrize("seed", [6, 7])
def test_consumers_on_every_node_share_the_queue_and_each_key_keeps_its_order(
        seed: int) -> None:
    """One consumer per node, slow enough that each holds its credit: every partition
    deals round-robin among them, so each gets about a third of the queue; and each key's
    messages, sent in order from one node, reach every consumer in that order."""
    async def script(sim: Simulation) -> None:
        await six(sim)
        total, keys = 600, [f"user{k}" for k in range(10)]
        got: dict[str, list[tuple[str, int]]] = {n: [] for n in ("n1", "n2", "n3")}
        done = trio.Event()

        async def consume(node: str) -> None:
            async with sim.client(node) as c, c.consume(Q, prefetch=12) as sub:
                async for d in sub:
                    await trio.sleep(0.01)  # the work
                    key, n = d.body.decode().split(":")
                    got[node].append((key, int(n)))
                    await c.ack(Q, [d])
                    if sum(map(len, got.values())) == total:
                        done.set()

        async with trio.open_nursery() as nursery:
            for node in got:
                nursery.start_soon(consume, node)
            await consumers_on_every_partition(sim, 3)  # all three subscribed
            async with sim.client("n2") as p:
                for start in range(0, total, 20):
                    await p.request("send", queue=Q, messages=[
                        {"body": f"{keys[i % len(keys)]}:{i}".encode(),
                         "partition_key": keys[i % len(keys)]}
                        for i in range(start, start + 20)])
            with trio.fail_after(120):
                await done.wait()
            nursery.cancel_scope.cancel()
        counts = {node: len(ds) for node, ds in got.items()}
        assert sum(counts.values()) == total
        assert all(total / 3 * 0.9 <= n <= total / 3 * 1.1 for n in counts.values()), counts
        for ds in got.values():
            for key in keys:
                ns = [n for k, n in ds if k == key]
                assert ns == sorted(ns), (key, ns)

    scenario(script, seed=seed)


def test_the_configured_default_partitions_spare_fifo_and_expiring_queues() -> None:
    """``default_partitions`` (config) applies to fair queues declared without
    ``partitions``; fifo and ``expires`` queues get one either way (docs/operations.md)."""
    async def script(sim: Simulation) -> None:
        for sn in sim.nodes.values():
            sn.node.cluster.partitions_setting = 4
        async with sim.client("n1") as c:
            await c.declare("fair")
            await c.declare("ordered", ordering="fifo")
            await c.declare("brief", expires=60)
        broker = sim.nodes["n1"].node.broker
        assert [len(broker.queues[n]) for n in ("fair", "ordered", "brief")] == [4, 1, 1]

    scenario(script, seed=8)


def leased(sim: Simulation) -> int:
    """Messages of Q leased, on the partitions' primaries."""
    return sum(q.leased for sn in sim.nodes.values() for q in sn.node.broker.queues[Q]
               if q.active)


def parts_elsewhere(sim: Simulation, node: str) -> list:
    """Every subscription part on the partitions the nodes other than ``node`` dispatch
    (the tests that call it have one subscriber, on ``node``)."""
    return [c for name, sn in sim.nodes.items() if name != node
            for q in sn.node.broker.queues[Q] if q.active for c in q.consumers]


def test_a_consumer_is_fed_from_its_own_nodes_partitions_first_then_from_the_others(
        ) -> None:
    """Local first (meshq.server.steal): with every partition holding messages, a
    subscriber on n1 gets the messages of the partitions n1 dispatches while they have
    any (no delivery, no ack crosses to another node), its whole prefetch from them,
    then the others' too; at no time more than its prefetch."""
    async def script(sim: Simulation) -> None:
        here, elsewhere = await six(sim)
        assert len(here) == 2
        async with sim.client("n2") as p:
            for i in range(6):
                await p.request("send", queue=Q, partition=i, messages=[
                    {"body": f"{i}:{k}".encode()} for k in range(20)])
        seen: list[int] = []
        async with sim.client("n1") as c, c.consume(Q, prefetch=12) as sub:
            while len(seen) < 120:
                held: list = []
                while True:  # what it is given, until nothing more comes for a while
                    with trio.move_on_after(1.0):
                        held.append(await sub.__anext__())
                        continue
                    break
                assert held, seen
                assert len(held) == leased(sim) <= 12  # (nothing more leased to it)
                if len(seen) + 12 <= 40:  # its whole prefetch from the two partitions here
                    assert len(held) == 12
                seen += [parse_receipt(d.receipt)[2] or 0 for d in held]
                await c.ack(Q, held)
            assert set(seen[:40]) == set(here)  # first its own node's 40
            assert sorted(seen[40:]) == sorted(elsewhere * 20)
            # Messages on a partition here again, not acked: it takes them first again,
            # and its parts elsewhere take nothing more (paused).
            async with sim.client("n3") as p:
                await p.request("send", queue=Q, partition=here[0], messages=[
                    {"body": b"again"}] * 30)
            await sim.until(lambda: all(c.capacity == 0 for c in parts_elsewhere(sim, "n1")),
                            10, "its parts elsewhere paused")
            got = [await sub.__anext__() for _ in range(11)]  # (one for here[1], empty)
            assert {parse_receipt(d.receipt)[2] for d in got} == {here[0]}
            assert leased(sim) == 11
            await c.ack(Q, got)

    scenario(script, seed=8)


def test_a_consumer_on_a_node_that_dispatches_no_partition_gets_every_message() -> None:
    """Local first has nothing local there: its parts take from every partition."""
    async def script(sim: Simulation) -> None:
        async with sim.client("n1") as c:
            await c.declare(Q, replicas=3, partitions=2)
        await sim.wait_converged()
        idle = [name for name, sn in sim.nodes.items()
                if not any(q.active for q in sn.node.broker.queues[Q])]
        assert idle
        async with sim.client(idle[0]) as c, c.consume(Q, prefetch=4) as sub:
            async with sim.client("n2") as p:
                ids = []
                for i in range(2):
                    r = await p.request("send", queue=Q, partition=i, messages=[
                        {"body": b"m"}] * 10)
                    ids += r["ids"]
            got = []
            while len(got) < len(ids):
                d = await sub.__anext__()
                got.append(d)
                await c.ack(Q, [d])
            assert sorted(d.id for d in got) == sorted(ids)

    scenario(script, seed=9)


def test_a_stalled_consumer_holds_back_nobody_and_none_of_its_nodes_messages() -> None:
    """Local first does not tie a partition to its node's consumer: one on n1 that takes
    its prefetch and never acks; one on n2, whose own partitions are empty, takes the
    rest of n1's partitions' messages."""
    async def script(sim: Simulation) -> None:
        here, _ = await six(sim)
        async with sim.client("n3") as p:
            ids = []
            for i in here:
                r = await p.request("send", queue=Q, partition=i, messages=[
                    {"body": b"m"}] * 30)
                ids += r["ids"]
        async with sim.client("n1") as c1, c1.consume(Q, prefetch=12) as stalled:
            held = [await stalled.__anext__() for _ in range(12)]
            async with sim.client("n2") as c2, c2.consume(Q, prefetch=12) as sub:
                got = []
                while len(got) < len(ids) - len(held):
                    d = await sub.__anext__()
                    got.append(d)
                    await c2.ack(Q, [d])
            assert sorted(d.id for d in held + got) == sorted(ids)

    scenario(script, seed=10)
