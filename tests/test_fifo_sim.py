"""A fifo queue of several partitions on three simulated nodes (meshq.testing.sim):
producers on every node, one consumer, which gets every message in (HLC, node) order
cluster-wide (closed timestamps and the merge: meshq.server.fifo); the same load on a fair
queue does not, so the check can fail. Deterministic: virtual time, one seed each."""

from __future__ import annotations

from typing import Any

import pytest
import trio

from meshq.testing.history import History
from meshq.testing.sim import Simulation, run_scenario

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
