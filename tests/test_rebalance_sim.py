"""Rebalancing progress (meshq.cluster.moves) on simulated nodes: a third node joins two
that hold a queue of four partitions with a backlog, or one of three leaves; the
cluster-wide rebalance status says ``moving`` while copies travel and turns to done only
when every holder has its copy and no other node holds one. Deterministic: virtual time,
a simulated network, one seed each."""

from __future__ import annotations

from typing import Any

import pytest
import trio

from meshq.testing.sim import SimNode, Simulation, run_scenario

Q = "jobs"
PARTITIONS = 4
MESSAGES = 100  # per partition


def scenario(script, *, seed: int, nodes: int):
    async def bounded(sim: Simulation):
        with trio.fail_after(300):
            return await script(sim)
    return run_scenario(bounded, seed=seed, nodes=nodes)


async def join(sim: Simulation) -> str:
    name = f"n{len(sim.nodes) + 1}"
    new = sim.nodes[name] = SimNode(sim, name, len(sim.nodes) + 1)
    await new.start([sim.nodes["n1"].address])
    return name


async def watch(sim: Simulation, node: str, bound: float) -> list[dict[str, Any]]:
    """The rebalance status asked of ``node`` every 0.1 s (virtual) until nothing moves,
    each with whether the copies were in place at that moment."""
    seen = []
    deadline = trio.current_time() + bound
    while True:
        cluster = sim.nodes[node].node.cluster
        reb = await cluster.rebalance()
        reb["copies_in_place"] = sim._copies_equal()
        seen.append(reb)
        if not reb["moving"]:
            return seen
        assert trio.current_time() < deadline, f"still moving after {bound} s: {reb}"
        await trio.sleep(0.1)


async def backlog(sim: Simulation) -> None:
    """Q with MESSAGES in each partition, on two holders each, copies equal."""
    async with sim.client("n1") as c:
        await c.declare(Q, replicas=2, partitions=PARTITIONS)
        for p in range(PARTITIONS):
            await c.request("send", queue=Q, partition=p, messages=[
                {"body": f"m{p}.{i}".encode()} for i in range(MESSAGES)])
    await sim.wait_converged()
    before = await sim.nodes["n2"].node.cluster.rebalance()
    assert not before["moving"], before


def check_watched(seen: list[dict[str, Any]], nodes: list[str], kinds: set[str]) -> None:
    moving = [r for r in seen if r["moving"]]
    assert moving, "the change was never seen moving"
    assert kinds <= {m["kind"] for r in moving for m in r["moves"]}
    assert max(r["messages_total"] for r in moving) > 0
    # While it said "moving" the copies were not all in place at some point, and once it
    # said done they were: done means done.
    assert not all(r["copies_in_place"] for r in moving)
    final = seen[-1]
    assert final["copies_in_place"], final
    assert final["moves"] == [] and final["unreachable"] == [] and final["settling"] == []
    assert final["moves_done"] >= 1
    assert final["messages_done"] == final["messages_total"] > 0
    assert final["nodes"] == nodes


@pytest.mark.parametrize("seed", [1, 2])
def test_a_join_shows_moves_until_every_copy_is_in_place(seed: int) -> None:
    async def script(sim: Simulation) -> list[dict[str, Any]]:
        await backlog(sim)
        new = await join(sim)
        await sim.wait_whole()
        seen = await watch(sim, "n2", 60.0)
        assert any(sim.nodes[new].node.broker.parts[(Q, i)].messages
                   for i in range(PARTITIONS)), "the new node got no partition"
        return seen

    seen = scenario(script, seed=seed, nodes=2)
    check_watched(seen, ["n1", "n2", "n3"], {"copy", "handoff"})
    to_new = [m for r in seen for m in r["moves"] if m["to"] == "n3"]
    assert to_new and max(m["messages_total"] for m in to_new) > 0


@pytest.mark.parametrize("seed", [1, 2])
def test_a_leave_shows_the_copies_made_again_until_they_are_in_place(seed: int) -> None:
    async def script(sim: Simulation) -> list[dict[str, Any]]:
        await backlog(sim)
        await sim.nodes["n3"].leave()
        await sim.wait_whole()  # (of the nodes still running)
        return await watch(sim, "n1", 60.0)

    seen = scenario(script, seed=seed, nodes=3)
    check_watched(seen, ["n1", "n2"], {"copy"})


def test_partitions_held_alone_move_with_their_backlog_on_disk() -> None:
    """replicas = 1: each partition on one node, most of its messages on disk only
    (meshq.broker.backlog); on a join the new primaries take theirs over, the former
    holders hand theirs off, and done means the new node holds them and nobody else."""
    per = 3000  # past the 2,048 a partition held alone keeps in memory

    async def script(sim: Simulation) -> list[dict[str, Any]]:
        async with sim.client("n1") as c:
            await c.declare(Q, replicas=1, partitions=PARTITIONS)
            for p in range(PARTITIONS):
                for k in range(0, per, 1000):
                    await c.request("send", queue=Q, partition=p, messages=[
                        {"body": f"m{p}.{i}".encode()} for i in range(k, k + 1000)])
        await sim.wait_converged()
        assert any(q.cold for sn in sim.nodes.values() for q in sn.node.broker.queues[Q])
        await join(sim)
        await sim.wait_whole()
        seen = await watch(sim, "n2", 60.0)
        held = {name: sum(len(q.messages) + q.cold for q in sn.node.broker.queues[Q])
                for name, sn in sim.nodes.items()}
        assert sum(held.values()) == PARTITIONS * per and held["n3"] > 0, held
        return seen

    seen = scenario(script, seed=1, nodes=2)
    check_watched(seen, ["n1", "n2", "n3"], {"handoff"})
