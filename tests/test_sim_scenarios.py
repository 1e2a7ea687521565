"""The bugs of issue 9, each as a named scenario on the simulation of whole nodes
(meshq/testing/sim.py): three real nodes (build_node: broker, cluster layer, membership)
on a simulated network, in virtual time, driven by the real AsyncClient. Each scenario is
deterministic; the many-seed runs with random faults are in tests/test_sim.py.
"""

from __future__ import annotations

import random

import pytest
import trio

from meshq.broker.queue import Queue
from meshq.cluster import driver
from meshq.cluster.driver import FULL_EVERY, ROUND
from meshq.errors import MeshqError, NotFound, Unavailable
from meshq.mesh.swim import Dead
from meshq.mesh.wire import encode_packet
from meshq.testing.sim import Simulation, run_scenario

Q = "jobs"
BOUND = 300.0  # virtual seconds: a scenario that hangs fails instead


def scenario(script, *, seed: int, nodes: int = 3):
    """run_scenario with a bound on the script's virtual time."""
    async def bounded(sim: Simulation):
        with trio.fail_after(BOUND):
            return await script(sim)
    return run_scenario(bounded, seed=seed, nodes=nodes)


async def declare(sim: Simulation, node: str = "n1", **options) -> None:
    async with sim.client(node) as c:
        await c.declare(Q, replicas=3, visibility_timeout=10, **{"partitions": 1, **options})
    await sim.wait_converged()


async def two_rounds(sim: Simulation) -> None:
    """Until every running node has run two more rounds of catalog exchange and repair."""
    def rounds() -> dict[str, int]:
        return {n: sn.node.cluster.rounds for n, sn in sim.nodes.items()
                if sn.node is not None and sn.node.cluster is not None}
    start = rounds()
    await sim.until(lambda: all(r >= start.get(n, 0) + 2 for n, r in rounds().items()),
                    30.0, "two repair rounds everywhere")


def others(sim: Simulation, *not_these: str | None) -> list[str]:
    return [n for n in sorted(sim.nodes) if n not in not_these]


async def drain(sim: Simulation, node: str, *, wait: float = 1.0) -> list[str]:
    """Receive and ack everything there is now, through ``node``."""
    got: list[str] = []
    async with sim.client(node) as c:
        while batch := await c.receive(Q, max=100, wait=wait):
            await c.ack(Q, batch)
            got += [d.id for d in batch]
    return got


def test_confirmed_acks_do_not_come_back_after_a_failover() -> None:
    """Bug 1: 50 sent; the primary SIGKILLed; all 50 received and acked through another
    node; the old primary restarted: nothing is ready again."""

    async def script(sim: Simulation) -> None:
        await declare(sim)
        async with sim.client("n2") as c:
            ids = await c.send_batch(Q, [f"m{i}" for i in range(50)])
        await sim.wait_converged()
        old = sim.primary(Q)
        assert old is not None
        sim.nodes[old].kill()
        via = others(sim, old)[0]
        got = await drain(sim, via, wait=5.0)
        assert sorted(got) == sorted(ids)
        await sim.nodes[old].start([sim.nodes[n].address for n in others(sim, old)])
        await sim.wait_whole()
        await sim.wait_converged()
        for node in sorted(sim.nodes):
            assert await drain(sim, node, wait=0.5) == [], node
            live = sim.nodes[node].node
            assert live is not None and not live.broker.queues[Q][0].messages

    scenario(script, seed=11)


def test_a_takeover_reads_a_copy_of_tombstones_left_on_disk_by_a_restart() -> None:
    """The ack of a message reaches the primary and one follower (the write quorum); the
    other follower, cut off, still holds the message. The primary dies and the follower
    that took the ack restarts as meshqd does: its tombstone is in the store only, and it
    holds nothing else of the partition. The cut-off follower, healed, takes over: it
    reads that copy of one tombstone before it dispatches, and so holds the acked message
    as acked from its first moment. (The restarted node answered the promise "no copy",
    and the acked message was READY on the new dispatcher until a lease of it met the
    tombstone on a holder, or its first repair did.)"""

    async def script(sim: Simulation) -> None:
        await declare(sim)
        async with sim.client("n1") as c:
            [mid] = await c.send_batch(Q, ["m"])
        await sim.wait_converged()
        primary = sim.primary(Q)
        assert primary is not None
        live = sim.nodes[primary].node
        assert live is not None and live.cluster is not None
        cut, acker = live.cluster.replicas(live.broker.parts[Q, 0]).followers
        sim.net.partition([sim.nodes[cut].address])
        async with sim.client(primary) as c:
            [d] = await c.receive(Q, max=1, wait=5.0)
            await c.ack(Q, [d])  # confirmed: on the primary and on ``acker``
        assert d.id == mid
        sim.nodes[primary].kill()
        sim.nodes[acker].kill()
        await trio.sleep(1.0)  # (both down for a second)
        sim.net.heal()
        here = sim.nodes[cut].node
        assert here is not None and here.cluster is not None
        cluster, q = here.cluster, here.broker.parts[Q, 0]
        await sim.until(lambda: cluster.replicas(q).primary == cut, 60.0,
                        f"{cut} sees itself the primary (its takeovers lack a quorum)")
        assert not q.active and mid in q.messages
        await sim.nodes[acker].start([sim.nodes[cut].address])
        restarted = sim.nodes[acker].node
        assert restarted is not None
        copy = restarted.broker.parts[Q, 0]
        assert not copy.messages and not copy.tombs and copy.tombs_on_disk  # (as meshqd)
        await cluster.until_active(q)  # (woken as its takeover activates the partition)
        assert q.active
        assert mid not in q.messages and mid in q.tombs, f"{mid} acked, then READY again"

    scenario(script, seed=14)


def test_a_restarted_node_that_holds_nothing_of_a_partition_hands_nothing_off() -> None:
    """Four nodes, three replicas: the fourth holds no copy. Restarted as meshqd starts,
    it cannot know that without reading the partition's tombstones back (a copy of
    tombstones alone is handed off); it reads them, finds none, and makes no hand-off (a
    move, in the rebalance status, of nothing)."""

    async def script(sim: Simulation) -> None:
        await declare(sim)
        await two_rounds(sim)  # (the catalog reaches the fourth node)
        live = sim.nodes["n1"].node
        assert live is not None and live.cluster is not None
        [spare] = set(sim.nodes) - set(live.cluster.replicas(live.broker.parts[Q, 0]).holders)
        sim.nodes[spare].kill()
        await trio.sleep(1.0)  # (down for a second)
        await sim.nodes[spare].start([sim.nodes[n].address for n in others(sim, spare)])
        node = sim.nodes[spare].node
        assert node is not None and node.cluster is not None
        q = node.broker.parts[Q, 0]
        assert q.tombs_on_disk  # (as meshqd starts)
        await sim.wait_whole()
        await two_rounds(sim)
        assert not q.tombs_on_disk and not q.has_copy
        assert node.cluster.repaired["handed_off"] == 0
        assert node.cluster.moves_here().moves == ()

    scenario(script, seed=17, nodes=4)


def test_acks_made_while_a_holder_was_down_stay_acked() -> None:
    async def script(sim: Simulation) -> None:
        await declare(sim)
        async with sim.client("n1") as c:
            await c.send_batch(Q, [f"m{i}" for i in range(30)])
        await sim.wait_converged()
        primary = sim.primary(Q)
        holder = others(sim, primary)[0]
        sim.nodes[holder].kill()
        assert len(await drain(sim, others(sim, holder)[0], wait=5.0)) == 30
        await sim.nodes[holder].start([sim.nodes[n].address for n in others(sim, holder)])
        await sim.wait_whole()
        await sim.wait_converged()
        assert await drain(sim, holder, wait=0.5) == []

    scenario(script, seed=12)


def test_a_deleted_queue_stays_deleted_when_a_replica_returns() -> None:
    """Bug 2: one replica SIGKILLed, the queue deleted, the replica restarted: the queue
    does not come back anywhere, and a send to it is NOT_FOUND."""

    async def script(sim: Simulation) -> None:
        await declare(sim)
        async with sim.client("n1") as c:
            await c.send_batch(Q, [f"m{i}" for i in range(10)])
        await sim.wait_converged()
        victim = others(sim, sim.primary(Q))[-1]
        sim.nodes[victim].kill()
        async with sim.client(others(sim, victim)[0]) as c:
            assert await c.delete(Q) == 10
        await sim.nodes[victim].start([sim.nodes[n].address for n in others(sim, victim)])
        await sim.wait_whole()
        await two_rounds(sim)  # of catalog exchange and repair, everywhere
        for name, sn in sorted(sim.nodes.items()):
            assert sn.node is not None and Q not in sn.node.broker.queues, name
            async with sim.client(name) as c:
                with pytest.raises(NotFound):
                    await c.send(Q, "after")
        async with sim.client(victim) as c:  # declared again: a new, empty queue
            await c.declare(Q, replicas=3, visibility_timeout=10, partitions=1)
            assert await c.receive(Q, max=10, wait=1.0) == []

    scenario(script, seed=13)


def test_sends_confirmed_in_a_partition_are_delivered_after_the_heal() -> None:
    """Bug 3: the primary is cut off while producers on the other nodes go on; after the
    heal every confirmed message is delivered and the copies converge."""

    async def script(sim: Simulation) -> None:
        await declare(sim)
        old = sim.primary(Q)
        assert old is not None
        rest = others(sim, old)
        confirmed: list[str] = []
        async with sim.client(old) as c:  # before the cut, through the old primary
            confirmed += await c.send_batch(Q, [f"before{i}" for i in range(10)])
        sim.net.partition([sim.nodes[old].address])
        async with sim.client(rest[0]) as c:
            for i in range(40):
                confirmed.append(await c.send(Q, f"during{i}"))
        await trio.sleep(5.0)
        sim.net.heal()
        await sim.wait_whole()
        whole = trio.current_time()
        at = await sim.wait_converged()
        assert at - whole < 15.0
        got = await drain(sim, rest[1], wait=2.0)
        assert sorted(got) == sorted(confirmed)

    scenario(script, seed=14)


def test_one_sided_suspicion_does_not_strand_or_duel() -> None:
    """Bug 3, the way it happened: the nodes disagree for a while about who is alive
    (one node's packets are lost one way), producers and consumers go on; afterwards
    nothing confirmed is stranded."""

    async def script(sim: Simulation) -> None:
        await declare(sim)
        sender, odd = "n1", sim.primary(Q)
        assert odd is not None
        for other in others(sim, odd):
            sim.net.set_link(sim.nodes[odd].address, sim.nodes[other].address, drop=1.0,
                             both_ways=False)
        confirmed: list[str] = []
        async with sim.client(sender) as c:
            for i in range(30):
                try:
                    confirmed.append(await c.send(Q, f"m{i}"))
                except MeshqError:
                    pass
                await trio.sleep(0.2)
        for other in others(sim, odd):
            sim.net.clear_link(sim.nodes[odd].address, sim.nodes[other].address,
                               both_ways=False)
        await sim.wait_whole()
        await sim.wait_converged()
        got = await drain(sim, "n3", wait=2.0)
        assert set(confirmed) <= set(got)
        assert len(confirmed) >= 20

    scenario(script, seed=15)


def test_failover_costs_latency_not_errors() -> None:
    """Bug 4: a consumer (on a node that is not the primary) holds leases when the primary
    is SIGKILLed: its acks succeed afterwards, its subscription goes on by itself, and a
    producer sees no error; first send and first delivery within 5 s of the kill."""

    async def script(sim: Simulation) -> dict[str, float]:
        await declare(sim)
        primary = sim.primary(Q)
        assert primary is not None
        consumer_node, producer_node = others(sim, primary)
        async with sim.client(producer_node) as p, sim.client(consumer_node) as c:
            await p.send_batch(Q, [f"m{i}" for i in range(10)])
            async with c.consume(Q, prefetch=5) as sub:
                held = []
                async for d in sub:
                    held.append(d)
                    if len(held) == 5:
                        break
                killed = trio.current_time()
                sim.nodes[primary].kill()
                first_send = None
                mid = await p.send(Q, "after the kill")  # retried, deduplicated
                first_send = trio.current_time() - killed
                acked = await c.ack(Q, held)  # by receipt, through the new primary
                assert sorted(acked) == sorted(d.id for d in held)
                first_delivery = None
                seen = []
                async for d in sub:  # the same subscription, re-homed by the daemon
                    if first_delivery is None:
                        first_delivery = trio.current_time() - killed
                    seen.append(d.id)
                    await c.ack(Q, [d])
                    if mid in seen:
                        break
        return {"send": first_send, "delivery": first_delivery}

    times = scenario(script, seed=16)
    assert times["send"] < 5.0 and times["delivery"] < 5.0, times


def test_a_node_that_dispatched_while_the_primary_seemed_dead_hands_it_its_writes() -> None:
    """The primary's followers hear that it died (a rumour: as a suspicion that outlived
    the one-way fault that caused it reached them in seed 1820); it never saw itself
    suspected, so it goes on dispatching at its epoch and still counts its followers
    current. The next holder takes the partition over for the moment the rumour lasts,
    and a send is written there; the primary refutes the rumour, and the stand-in steps
    down. What it wrote reaches the primary at once, not when the primary next compares
    every copy (FULL_EVERY rounds: it took 45 s), and the primary learns of the later
    epoch from it and takes over above it."""

    async def script(sim: Simulation) -> None:
        await declare(sim)
        await two_rounds(sim)  # (the primary has compared its followers: current)
        primary = sim.primary(Q)
        assert primary is not None
        old = sim.nodes[primary].node
        assert old is not None and old.cluster is not None and old.membership is not None
        stand_in, third = old.cluster.replicas(old.broker.parts[Q, 0]).followers
        rumour = encode_packet([Dead(old.membership.swim.incarnation, primary,
                                     stand_in).to_wire()])
        gossip = sim.net.endpoint("10.0.0.99:7946")
        for node in (stand_in, third):
            await gossip.send_packet(sim.nodes[node].address, rumour)
        via, here = sim.nodes[third].node, sim.nodes[stand_in].node
        assert via is not None and via.cluster is not None and here is not None
        vq, hq, oq = (n.broker.parts[Q, 0] for n in (via, here, old))
        await sim.until(lambda: via.cluster.replicas(vq).primary == stand_in, 2.0,
                        f"{third} believes the rumour")
        async with sim.client(third) as c:
            mid = await c.send(Q, "written by the stand-in")
        assert mid in hq.messages and hq.active and oq.active and hq.epoch > oq.epoch
        assert mid not in oq.messages
        await sim.until(lambda: not hq.active, 5.0, f"{stand_in} steps down")
        await sim.until(lambda: mid in oq.messages and oq.active and oq.epoch > hq.epoch,
                        5.0, f"{primary} has the send and dispatches above {stand_in}")
        await sim.wait_converged(10.0)
        assert await drain(sim, third) == [mid]

    scenario(script, seed=16)


def test_a_primary_whose_clock_is_refused_hands_over() -> None:
    """Bug 5: a primary 2 s ahead of the others stops dispatching and another node takes
    the queue; writes go on."""

    async def script(sim: Simulation) -> None:
        await declare(sim)
        old = sim.primary(Q)
        assert old is not None
        sim.nodes[old].clock.offset = 2.0
        await sim.until(lambda: sim.primary(Q) not in (old, None), 30, "another primary")
        async with sim.client(old) as c:  # relayed by the refused node to the new one
            await c.send(Q, "after")
        assert len(await drain(sim, others(sim, old)[0])) == 1

    scenario(script, seed=17)


def test_a_join_moves_data_without_not_found_or_failed_acks() -> None:
    """Bug 5: while a join moves the queue to a new node, receives and acks go on."""

    async def script(sim: Simulation) -> None:
        await declare(sim)
        async with sim.client("n1") as c:
            ids = await c.send_batch(Q, [f"m{i}" for i in range(40)])
        await sim.wait_converged()
        from meshq.testing.sim import SimNode

        got: list[str] = []
        async with sim.client("n2") as c:
            first = await c.receive(Q, max=20, wait=1.0)
            for i in range(4, 8):  # join nodes until the queue's placement changes
                name = f"n{i}"
                sim.nodes[name] = SimNode(sim, name, i)
                await sim.nodes[name].start([sim.nodes["n1"].address])
            await c.ack(Q, first)  # during the move
            got += [d.id for d in first]
            while batch := await c.receive(Q, max=20, wait=2.0):
                await c.ack(Q, batch)
                got += [d.id for d in batch]
        assert set(got) == set(ids), (len(got), len(set(got)), set(ids) - set(got))
        await sim.wait_whole()
        await sim.wait_converged()

    scenario(script, seed=18)


def test_receive_without_a_write_quorum_is_unavailable() -> None:
    async def script(sim: Simulation) -> None:
        await declare(sim)
        survivor = "n1"
        for name in others(sim, survivor):
            sim.nodes[name].kill()
        with trio.fail_after(30):
            while True:  # until the survivor sees them dead
                async with sim.client(survivor) as c:
                    c.retry_for = 0.0
                    try:
                        await c.receive(Q, max=1, wait=0.5)
                    except Unavailable as exc:  # first "being taken over", then:
                        if "needs 2" in exc.message:
                            return
                await trio.sleep(1.0)

    scenario(script, seed=19)


def test_status_counts_are_the_clusters() -> None:
    async def script(sim: Simulation) -> None:
        await declare(sim)
        async with sim.client("n1") as c:
            await c.send_batch(Q, [f"m{i}" for i in range(7)])
        for name in sorted(sim.nodes):
            async with sim.client(name) as c:
                status = await c.status()
            [q] = [q for q in status["queues"] if q["name"] == Q]
            assert (q["ready"], q["counted_by"]) == (7, sim.primary(Q)), name

    scenario(script, seed=20)


def test_repair_forgets_a_deleted_queues_partitions() -> None:
    """What repair keeps per partition (changes that may have missed a holder, holders
    known current) goes with the queue: a cluster that creates and deletes many queues
    does not grow."""
    async def script(sim: Simulation) -> None:
        await declare(sim)
        async with sim.client("n2") as c:
            await c.send(Q, "m")
            await c.delete(Q)
        await two_rounds(sim)
        for name, sn in sim.nodes.items():
            cluster = sn.node.cluster
            assert not [k for k in cluster._misses if k[0][0] == Q], name
            assert not [p for p in cluster._current if p[0] == Q], name
    scenario(script, seed=41)


def test_a_dedup_id_holds_across_a_failover() -> None:
    """A send's dedup entry replicates with its message (inside its Put): the same dedup
    id sent again after the primary died gets the first message's id, not a second one."""
    async def script(sim: Simulation) -> None:
        await declare(sim)
        primary = sim.primary(Q)
        node = others(sim, primary)[0]
        async with sim.client(node) as c:
            first = await c.send(Q, "once", dedup_id="order-17")
        sim.nodes[primary].kill()
        async with sim.client(node) as c:
            assert await c.send(Q, "once", dedup_id="order-17") == first
        assert await drain(sim, node) == [first]
    scenario(script, seed=43)


def test_reserved_catalog_entries_replicate_and_a_drop_stays() -> None:
    """AMQP's exchanges and bindings are reserved catalog entries: written on one node,
    they reach every node (never as a queue); dropped while a node is down, they do not
    come back when it returns."""
    name = "\x00xorders"

    async def script(sim: Simulation) -> None:
        await declare(sim)  # (the scenario's queue, for the catalog to carry it too)
        writer = sim.nodes["n1"].node
        assert writer is not None
        await writer.broker.put_entry(name, {"type": "fanout"}).wait()
        await sim.until(lambda: all(
            sn.node is not None and (e := sn.node.broker.catalog.get(name)) is not None
            and e.live for sn in sim.nodes.values()), 30.0, "the entry everywhere")
        victim = "n3"
        sim.nodes[victim].kill()
        await writer.broker.drop_entry(name).wait()
        await sim.nodes[victim].start([sim.nodes[n].address for n in others(sim, victim)])
        await sim.wait_whole()
        await two_rounds(sim)
        for node_name, sn in sorted(sim.nodes.items()):
            assert sn.node is not None, node_name
            entry = sn.node.broker.catalog.get(name)
            assert entry is not None and not entry.live, node_name
            assert name not in sn.node.broker.queues, node_name

    scenario(script, seed=47)


def test_an_unused_queue_expires_after_a_failover_and_stays_deleted() -> None:
    """A queue with ``expires`` whose primary dies: the new primary counts from its
    takeover and deletes it; the old primary, back, does not bring it back."""
    async def script(sim: Simulation) -> None:
        await declare(sim, expires=20.0)
        old = sim.primary(Q)
        assert old is not None
        sim.nodes[old].kill()
        await sim.until(lambda: all(
            sn.node is not None and Q not in sn.node.broker.queues
            for n, sn in sim.nodes.items() if n != old), 120.0, "expired on the others")
        await sim.nodes[old].start([sim.nodes[n].address for n in others(sim, old)])
        await sim.wait_whole()
        await two_rounds(sim)
        for node_name, sn in sorted(sim.nodes.items()):
            assert sn.node is not None and Q not in sn.node.broker.queues, node_name

    scenario(script, seed=53)


def test_a_partition_held_alone_hands_over_before_commit_and_loses_nothing_to_kills(
        ) -> None:
    """One node holds the partition (the embedded single node): leases and direct sends go
    to their consumer before their commit. Killed again and again under a producer (dedup
    ids, retrying) and a consumer, with commits taking 0.5-4 virtual ms so that kills land
    between a hand-over and its commit: every message the producer sent is delivered, a
    confirmed ack never comes back, and what a kill took back before its commit (seen,
    never confirmed, sent again) comes again under a new id: at-least-once."""

    async def script(sim: Simulation) -> int:
        node = sim.nodes["n1"]
        async with sim.client("n1") as c:
            await c.declare(Q, replicas=1, visibility_timeout=10, partitions=1)
        live = node.node
        assert live is not None and live.cluster is not None
        assert live.cluster._held_alone(live.broker.queues[Q][0])  # the early path is on
        confirmed: set[str] = set()
        bodies: set[bytes] = set()
        delivered: dict[str, float] = {}
        acked: dict[str, float] = {}
        problems: list[str] = []
        done = trio.Event()

        async def produce() -> None:
            async with sim.client("n1") as c:
                for i in range(300):
                    confirmed.update(await c.send_batch(
                        Q, [{"body": f"m{i}", "dedup_id": f"d{i}"}]))
                    await trio.sleep(0.004)
            done.set()

        async def consume() -> None:
            async with sim.client("n1") as c:
                while True:
                    try:
                        async with c.consume(Q, prefetch=10) as sub:
                            async for d in sub:
                                if d.id in acked:
                                    problems.append(f"{d.id} delivered after its ack")
                                delivered.setdefault(d.id, trio.current_time())
                                bodies.add(d.body)
                                await sub.ack(d)
                                acked.setdefault(d.id, trio.current_time())
                    except MeshqError:
                        await trio.sleep(0.2)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(produce)
            nursery.start_soon(consume)
            rng = random.Random(sim.seed)
            for _ in range(8):
                await trio.sleep(rng.uniform(0.05, 0.2))
                node.kill()
                await trio.sleep(rng.uniform(0.05, 0.5))
                await node.start([])
            await done.wait()
            await sim.until(lambda: confirmed <= set(delivered), 60.0,
                            "every confirmed message delivered")
            nursery.cancel_scope.cancel()
        assert not problems, problems
        assert bodies == {f"m{i}".encode() for i in range(300)}
        assert set(await drain(sim, "n1", wait=1.0)) <= set(delivered)  # no stranger
        return len(delivered) - len(confirmed)  # seen, then taken back by a kill

    taken_back = [scenario(script, seed=seed, nodes=1) for seed in (21, 22, 23)]
    assert any(taken_back), "no kill landed between a hand-over and its commit"


HOT = 8  # READY messages a dispatcher keeps in memory in the next scenario


def test_the_dispatcher_of_a_replicated_partition_pages_its_deep_backlog() -> None:
    """A replicated queue (three copies) with 300 messages: its dispatcher holds at most
    HOT READY ones in memory, the rest on disk only (meshq.broker.backlog), yet its
    digests (checked against a walk of memory and store at each one) and repair make
    every copy equal; a follower restarted with part of its copy on disk, and then the
    dispatcher itself, change nothing; every message is then received exactly once, the
    dispatcher still holding at most HOT READY in memory (plus one page) as it goes."""

    async def script(sim: Simulation) -> None:
        await declare(sim, "n1")
        ids: list[str] = []
        async with sim.client("n2") as c:
            for start in range(0, 300, 20):
                ids += await c.send_batch(Q, [f"m{i}" for i in range(start, start + 20)])
        await sim.wait_converged()

        def dispatcher() -> tuple[str, Queue]:
            name = sim.primary(Q)
            assert name is not None
            node = sim.nodes[name].node
            assert node is not None
            return name, node.broker.parts[Q, 0]

        name, q = dispatcher()
        assert q.ready == 300 and q.cold >= 300 - HOT and q.ready - q.cold <= HOT
        assert len(q.messages) <= HOT
        follower = others(sim, name)[0]
        sim.nodes[follower].kill()
        await trio.sleep(1.0)
        await sim.nodes[follower].start([sim.nodes[name].address])
        node = sim.nodes[follower].node
        assert node is not None and node.broker.parts[Q, 0].cold  # (its head only)
        await sim.wait_whole()
        await two_rounds(sim)
        await sim.wait_converged()
        sim.nodes[name].kill()
        await trio.sleep(1.0)
        await sim.nodes[name].start([sim.nodes[follower].address])
        await sim.wait_whole()
        await sim.until(lambda: sim.primary(Q) == name, 60.0, f"{name} dispatches again")
        await sim.wait_converged()
        name, q = dispatcher()
        assert q.active and q.cold and q.ready == 300
        got: list[str] = []
        most = 0
        async with sim.client(name) as c:
            while batch := await c.receive(Q, max=10, wait=2.0):
                most = max(most, q.ready - q.cold)
                await c.ack(Q, batch)
                got += [d.id for d in batch]
        assert sorted(got) == sorted(ids)  # each once
        assert most <= 2 * HOT
        await sim.wait_converged()
        counts = {n: sn.node.broker.backlog.counts for n, sn in sim.nodes.items()
                  if sn.node is not None}
        assert sum(counts.values()) >= 1, counts  # a restarted node counted its cold shares

    run_scenario(script, seed=3, hot_ready=HOT)


def test_a_purge_of_a_replicated_backlog_on_disk_reaches_every_copy() -> None:
    """The dispatcher's cold messages are purged with one statement, their tombstones in
    its store only: the next repair rounds read them back and take them to the other
    copies, so nothing comes back after a failover."""

    async def script(sim: Simulation) -> None:
        await declare(sim, "n1")
        async with sim.client("n2") as c:
            for start in range(0, 100, 20):
                await c.send_batch(Q, [f"m{i}" for i in range(start, start + 20)])
        await sim.wait_converged()
        name = sim.primary(Q)
        assert name is not None
        node = sim.nodes[name].node
        assert node is not None and node.broker.parts[Q, 0].cold
        async with sim.client(name) as c:
            assert await c.purge(Q) == 100
        await two_rounds(sim)
        await sim.wait_converged()
        sim.nodes[name].kill()
        for other in others(sim, name):
            assert await drain(sim, other, wait=3.0) == [], other

    run_scenario(script, seed=5, hot_ready=HOT)


def test_a_partition_written_to_is_compared_whole_once_it_is_quiet(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Holders that replication keeps current are compared whole every FULL_EVERY rounds,
    but not while a deep partition is written to: then batches in flight make most
    buckets differ and each differing bucket lists every message in it, on disk too (a
    deep partition under a steady stream took every node's memory and event loop). Once
    a round passes without a write, the next round compares them. (Deep: any size here.)"""
    monkeypatch.setattr(driver, "FULL_BUSY_MIN", 0)

    async def script(sim: Simulation) -> None:
        await declare(sim)
        await two_rounds(sim)
        primary = sim.primary(Q)
        assert primary is not None
        cluster = sim.nodes[primary].node.cluster  # type: ignore[union-attr]
        assert cluster is not None
        synced: list[int] = []
        real = cluster._sync

        async def counted(q: Queue, node: str) -> None:
            synced.append(cluster.rounds)
            await real(q, node)

        cluster._sync = counted  # type: ignore[method-assign]
        start = cluster.rounds
        async with sim.client(primary) as c:
            while cluster.rounds < start + 2 * FULL_EVERY:  # a send every second
                await c.send(Q, "tick")
                await trio.sleep(1.0)
        assert synced == [], synced  # (its holders stayed current)
        quiet = cluster.rounds
        await sim.until(lambda: len(synced) >= 2, 2 * FULL_EVERY * ROUND, "a full compare")
        assert min(synced) <= quiet + 2, (quiet, synced)  # (both followers, at once)

    scenario(script, seed=5)
