"""Queue semantics of SPEC section 2 on one real meshqd, through meshq.AsyncClient (trio).

Concurrent consumers are tasks in a nursery, each on its own connection; every wait is an
event (a delivery, a receive with ``wait=``, nursery.start) under a fail_after bound.
The blocking client twin is test_semantics.py.
"""

from __future__ import annotations

import itertools

import pytest
import trio
import trio.testing

import meshq
from meshq.testing import DaemonProcess

OPTIONS = dict(replicas=2, write_quorum=None, message_ttl=30.0, visibility_timeout=4.0,
               max_deliveries=5,
               dead_letter_queue="dead", max_length=50, ordering="fair", expires=None,
               dead_letter_exchange=None, dead_letter_routing_key=None, partitions=1)


@pytest.fixture
def daemon(shared_daemon):
    return shared_daemon


def connect(daemon: DaemonProcess) -> meshq.AsyncClient:
    return meshq.AsyncClient(daemon.socket)


async def stats(c: meshq.AsyncClient, queue: str) -> dict:
    [s] = await c.stats(queue)
    return s


async def collect(c: meshq.AsyncClient, queue: str, n: int) -> list[meshq.Delivery]:
    got: list[meshq.Delivery] = []
    while len(got) < n:
        more = await c.receive(queue, max=n - len(got), wait=5)
        assert more, f"only {len(got)} of {n} messages arrived on {queue!r}"
        got += more
    return got


async def test_declare_options_idempotence_and_errors(daemon):
    async with connect(daemon) as c:
        first = await c.declare("q", **OPTIONS)
        assert first["options"] == OPTIONS
        assert await c.declare("q", **OPTIONS) == first
        assert (await c.declare("q", passive=True))["options"] == OPTIONS
        with pytest.raises(meshq.PreconditionFailed, match="ordering"):
            await c.declare("q", **{**OPTIONS, "ordering": "fifo"})
        with pytest.raises(meshq.NotFound):
            await c.declare("ghost", passive=True)
        for bad in ({"visibility_timeout": "30s"}, {"max_length": 0}, {"replicas": 2.0},
                    {"ordering": None}, {"message_ttl": float("nan")}, {"dlq": "x"}):
            with pytest.raises(meshq.BadRequest):
                await c.declare("other", **bad)
        assert [s["name"] for s in await c.stats()] == ["q"]


async def test_send_batch_bodies_and_headers(daemon):
    async with connect(daemon) as c:
        await c.declare("q")
        ids = await c.send_batch("q", [b"\x00bin", "text", b"",
                                       {"body": "h", "headers": {"trace": [1, "a"]}}])
        assert len(set(ids)) == 4
        got = await c.receive("q", max=10)
        assert [d.id for d in got] == ids
        assert [d.body for d in got] == [b"\x00bin", b"text", b"", b"h"]
        assert got[3].headers == {"trace": [1, "a"]} and got[0].headers == {}
        assert await c.ack("q", ids) == ids


async def test_concurrent_requests_on_one_connection(daemon):
    async with connect(daemon) as c:
        await c.declare("q")
        ids: list[str] = []

        async def send(i: int) -> None:
            ids.append(await c.send("q", f"m{i}"))

        async with trio.open_nursery() as nursery:
            for i in range(50):
                nursery.start_soon(send, i)
        assert len(set(ids)) == 50
        assert (await stats(c, "q"))["ready"] == 50


async def test_dedup_id_single_and_within_a_batch(daemon):
    async with connect(daemon) as c:
        await c.declare("q")
        mid = await c.send("q", b"x", dedup_id="k1")
        again = await c.send_batch("q", [{"body": b"x", "dedup_id": "k1"},
                                         {"body": b"y", "dedup_id": "k2"},
                                         {"body": b"y", "dedup_id": "k2"}])
        assert again[0] == mid and again[1] == again[2] != mid
        assert (await stats(c, "q"))["ready"] == 2


async def test_message_and_queue_ttl_expire_to_the_dlq(daemon):
    async with connect(daemon) as c:
        await c.declare("dead")
        await c.declare("q", dead_letter_queue="dead")
        await c.declare("short", message_ttl=0.2, dead_letter_queue="dead")
        mid = await c.send("q", b"a", ttl=0.2)
        keep = await c.send("q", b"b", ttl=60)
        other = await c.send("short", b"c")
        dead = await collect(c, "dead", 2)
        assert {d.id for d in dead} == {mid, other}
        assert {(d.headers["x-death"]["queue"], d.headers["x-death"]["reason"])
                for d in dead} == {("q", "expired"), ("short", "expired")}
        assert [d.id for d in await c.receive("q")] == [keep]


async def test_delay(daemon):
    async with connect(daemon) as c:
        await c.declare("q")
        t0 = trio.current_time()
        mid = await c.send("q", b"later", delay=0.4)
        assert await c.receive("q", wait=0) == []
        assert (await stats(c, "q"))["delayed"] == 1
        [d] = await c.receive("q", wait=5)
        assert d.id == mid and trio.current_time() - t0 >= 0.35


async def test_a_waiting_receive_is_woken_by_a_send(daemon):
    async with connect(daemon) as c, connect(daemon) as producer:
        await c.declare("q")
        got: list[meshq.Delivery] = []

        async def receiver() -> None:
            got.extend(await c.receive("q", max=5, wait=5))

        with trio.fail_after(4):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(receiver)
                await trio.testing.wait_all_tasks_blocked()
                mid = await producer.send("q", b"wake")
        assert [d.id for d in got] == [mid]
        assert await c.receive("q", max=3, wait=0.1) == []


async def test_subscription_prefetch(daemon):
    async with connect(daemon) as c, connect(daemon) as producer:
        await c.declare("q")
        with trio.fail_after(5):
            async with c.consume("q", prefetch=2) as sub:
                ids = await producer.send_batch("q", [f"m{i}" for i in range(5)])
                first = [await anext(sub), await anext(sub)]
                assert [d.id for d in first] == ids[:2]
                s = await stats(c, "q")
                assert (s["leased"], s["ready"], s["consumers"]) == (2, 3, 1)
                await sub.ack(first[0])
                third = await anext(sub)
                assert third.id == ids[2]
                await c.ack("q", [first[1].id, third.id])
                rest = []
                async for d in sub:
                    rest.append(d.id)
                    await sub.ack(d)
                    if len(rest) == 2:
                        break
                assert rest == ids[3:]
        assert (await stats(c, "q"))["consumers"] == 0


async def test_nack_reject_extend_and_foreign_ack(daemon):
    async with connect(daemon) as c, connect(daemon) as other:
        await c.declare("dead")
        await c.declare("q", visibility_timeout=0.5, dead_letter_queue="dead")
        a, b = await c.send_batch("q", [b"a", b"b"])
        [d] = await c.receive("q")
        await c.nack("q", [d.id])
        [d] = await c.receive("q", wait=5)
        assert (d.id, d.redelivered, d.delivery_count) == (a, True, 2)
        await c.nack("q", [a], delay=0.3)
        assert (await stats(c, "q"))["delayed"] == 1
        [d] = await c.receive("q")
        assert d.id == b
        with pytest.raises(meshq.PreconditionFailed):
            await other.ack("q", [b])
        assert await c.reject("q", [b]) == [b]
        [dead] = await c.receive("dead", wait=5)
        assert (dead.id, dead.headers["x-death"]["reason"]) == (b, "rejected")
        [d] = await c.receive("q", wait=5)  # a, back from its nack delay
        assert (d.id, d.delivery_count) == (a, 3)
        assert await c.extend("q", [a], 30) == [a]
        assert await other.receive("q", wait=1.0) == []  # well past the 0.5 s timeout
        assert await c.ack("q", [a]) == [a]
        with pytest.raises(meshq.PreconditionFailed):
            await c.ack("q", [a])


async def test_ack_by_receipt_from_another_connection(daemon):
    async with connect(daemon) as c, connect(daemon) as other:
        await c.declare("q")
        a, b, x = await c.send_batch("q", [b"a", b"b", b"x"])
        da, db, _ = await c.receive("q", max=3)
        assert da.receipt is not None and da.receipt.startswith(f"{a}~")
        with pytest.raises(meshq.PreconditionFailed, match="not leased to this connection"):
            await other.ack("q", [db.id])  # a bare id: only on the leasing connection
        assert await other.ack("q", [da]) == [a]  # the Delivery carries its receipt
        assert await other.extend("q", [db.receipt], 30) == [b]
        assert await other.nack("q", [db.receipt]) == [b]
        assert await c.ack("q", [x]) == [x]  # an id: the client sends the receipt it knows
        [again] = await c.receive("q", wait=5)
        assert again.id == b and again.receipt != db.receipt
        with pytest.raises(meshq.PreconditionFailed, match="lease"):
            await other.ack("q", [db.receipt])  # the old lease's receipt
        assert await other.ack("q", [again]) == [b]
        assert (await stats(c, "q"))["ready"] == 0


async def test_a_daemon_restart_costs_latency_not_errors(tmp_path):
    """meshqd is killed and started again under a producer and a consumer: the next send
    connects again, and the subscription subscribes again behind the same object."""
    d = DaemonProcess(tmp_path / "data")
    await trio.to_thread.run_sync(d.start)
    try:
        with trio.fail_after(60):  # an upper bound only
            async with meshq.AsyncClient(d.socket) as c:
                await c.declare("q")
                async with c.consume("q", prefetch=5) as sub:
                    before = await c.send("q", b"before")
                    assert (await anext(sub)).id == before
                    await trio.to_thread.run_sync(d.kill)
                    await trio.to_thread.run_sync(d.start)
                    after = await c.send("q", b"after")
                    seen = [await anext(sub)]
                    while seen[-1].id != after:
                        seen.append(await anext(sub))
                    assert {m.consumer for m in seen} == {sub.tag}  # a new daemon's tag
                    assert await c.ack("q", seen) == [m.id for m in seen]
    finally:
        await trio.to_thread.run_sync(d.kill)


async def test_lease_deadline_and_disconnect_redeliver(daemon):
    async with connect(daemon) as other:
        await other.declare("short", visibility_timeout=0.3)
        await other.declare("long", visibility_timeout=30)
        s_id = await other.send("short", b"s")
        l_id = await other.send("long", b"l")
        async with connect(daemon) as c:
            await c.receive("short")
            await c.receive("long")
            [d] = await other.receive("short", wait=5)  # after the 0.3 s deadline
            assert (d.id, d.redelivered, d.delivery_count) == (s_id, True, 2)
            with pytest.raises(meshq.PreconditionFailed):
                await c.ack("short", [s_id])
            t0 = trio.current_time()
        [d] = await other.receive("long", wait=5)  # c closed: released at once
        assert (d.id, d.redelivered) == (l_id, True)
        assert trio.current_time() - t0 < 5


async def test_max_deliveries_and_max_length(daemon):
    async with connect(daemon) as c:
        await c.declare("dead")
        await c.declare("q", max_deliveries=1, dead_letter_queue="dead")
        await c.declare("drop", max_deliveries=1)
        await c.declare("short", max_length=2, dead_letter_queue="dead")
        mid = await c.send("q", b"poison")
        await c.receive("q")
        await c.nack("q", [mid])
        [d] = await c.receive("dead", wait=5)
        assert (d.id, d.headers["x-death"]["reason"]) == (mid, "max_deliveries")
        await c.send("drop", b"poison")
        [d] = await c.receive("drop")
        await c.nack("drop", [d.id])
        s = await stats(c, "drop")
        assert (s["ready"], s["dropped"], s["dead_lettered"]) == (0, 1, 1)
        ids = [await c.send("short", f"m{i}") for i in range(3)]
        [d] = await c.receive("dead", wait=5)
        assert (d.id, d.headers["x-death"]["reason"]) == (ids[0], "maxlen")
        assert [d.id for d in await c.receive("short", max=5)] == ids[1:]


async def test_purge_and_delete(daemon):
    async with connect(daemon) as c, connect(daemon) as consumer:
        await c.declare("q")
        await c.send_batch("q", [b"a", b"b", b"c"])
        [leased] = await c.receive("q")
        assert await c.purge("q") == 2
        s = await stats(c, "q")
        assert (s["ready"], s["leased"]) == (0, 1)
        await c.send("q", b"d")
        with trio.fail_after(5):
            async with consumer.consume("q", prefetch=1) as sub:
                assert (await anext(sub)).body == b"d"
                assert await c.delete("q") == 2
                with pytest.raises(meshq.ConsumerCancelled, match="deleted"):
                    async for d in sub:  # the daemon ends the subscription
                        pytest.fail(f"delivery after delete: {d}")
        with pytest.raises(meshq.NotFound):
            await c.send("q", b"x")
        with pytest.raises(meshq.NotFound):
            await c.ack("q", [leased.id])
        with pytest.raises(meshq.NotFound):
            await c.stats("q")


async def test_competing_consumers_round_robin(daemon):
    got: list[list[str]] = [[], [], []]

    async def consumer(k: int, task_status=trio.TASK_STATUS_IGNORED) -> None:
        async with connect(daemon) as c, c.consume("q", prefetch=100) as sub:
            task_status.started()
            async for d in sub:
                got[k].append(d.id)
                await sub.ack(d)
                if len(got[k]) == 10:
                    return

    async with connect(daemon) as producer:
        await producer.declare("q")
        with trio.fail_after(5):
            async with trio.open_nursery() as nursery:
                for k in range(3):
                    await nursery.start(consumer, k)
                ids = await producer.send_batch("q", [f"m{i}" for i in range(30)])
        assert sorted(itertools.chain(*got)) == sorted(ids)
        assert sorted(map(sorted, got)) == sorted(sorted(ids[j::3]) for j in range(3))
        s = await stats(producer, "q")
        assert (s["ready"], s["leased"]) == (0, 0)


async def test_a_slow_consumer_does_not_hold_back_the_others(daemon):
    seen: list[str] = []
    held: list[str] = []
    done, release = trio.Event(), trio.Event()
    fast_clients = [connect(daemon), connect(daemon)]

    async def slow(task_status=trio.TASK_STATUS_IGNORED) -> None:
        async with connect(daemon) as c, c.consume("q", prefetch=1) as sub:
            task_status.started()
            held.append((await anext(sub)).id)
            await release.wait()  # holds its lease, never acks

    async def fast(c: meshq.AsyncClient, task_status=trio.TASK_STATUS_IGNORED) -> None:
        async with c, c.consume("q", prefetch=1) as sub:
            task_status.started()
            async for d in sub:  # ends when the test closes the connection
                await sub.ack(d)
                seen.append(d.id)
                if len(seen) == 29:
                    done.set()

    async with connect(daemon) as producer:
        await producer.declare("q")
        with trio.fail_after(5):
            async with trio.open_nursery() as nursery:
                await nursery.start(slow)
                for c in fast_clients:
                    await nursery.start(fast, c)
                ids = await producer.send_batch("q", [f"m{i}" for i in range(30)])
                await done.wait()
                s = await stats(producer, "q")
                for c in fast_clients:
                    await c.aclose()
                release.set()  # only now: its disconnect would hand the message on
        assert (s["ready"], s["leased"]) == (0, 1)
        assert sorted(seen + held) == sorted(ids)


async def test_fifo_order_survives_a_nack(daemon):
    async with connect(daemon) as c:
        await c.declare("q", ordering="fifo")
        ids = [await c.send("q", f"m{i}") for i in range(6)]
        out: list[meshq.Delivery] = []
        with trio.fail_after(5):
            async with c.consume("q", prefetch=1) as sub:
                async for d in sub:
                    out.append(d)
                    if d.id == ids[2] and not d.redelivered:
                        await c.nack("q", [d.id])
                    else:
                        await sub.ack(d)
                    if len(out) == 7:
                        break
        assert [d.id for d in out] == ids[:3] + ids[2:]
        assert out[3].redelivered and out[3].delivery_count == 2
        assert all(a.hlc < b.hlc for a, b in itertools.pairwise(out[3:]))
        assert all(a.hlc < b.hlc for a, b in itertools.pairwise(out[:3]))


async def test_body_size_limit_and_daemon_keeps_serving(daemon):
    limit = 1024 * 1024
    async with connect(daemon) as c:
        await c.declare("q")
        big = b"\xab" * limit
        mid = await c.send("q", big)
        with pytest.raises(meshq.TooLarge):
            await c.send("q", big + b"!")
        [d] = await c.receive("q", max=5)
        assert (d.id, d.body) == (mid, big)
        assert await c.ack("q", [mid]) == [mid]  # the same connection still works
    async with connect(daemon) as fresh:
        assert await fresh.send("q", b"") and (await stats(fresh, "q"))["ready"] == 1


async def test_cancelling_a_task_inside_an_async_client_is_clean(daemon):
    """Regression: __aexit__ under cancellation used to corrupt trio's nursery stack."""
    async with connect(daemon) as c:
        await c.declare("q")

    async def receiver() -> None:
        async with connect(daemon) as c:
            await c.receive("q", wait=30)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(receiver)
        await trio.testing.wait_all_tasks_blocked()
        nursery.cancel_scope.cancel()


async def test_cancelling_a_consumer_task_returns_promptly(daemon):
    """Regression: consume()'s exit used to wait for a reader the cancel had stopped."""
    c = connect(daemon)
    hung = False

    async def consumer(task_status=trio.TASK_STATUS_IGNORED) -> None:
        async with c, c.consume("q") as sub:
            task_status.started()
            async for _ in sub:
                pass

    async def watchdog() -> None:
        nonlocal hung
        await trio.sleep(1)  # an upper bound only: unblocks the client if it hangs
        hung = True
        await c.aclose()

    async with connect(daemon) as admin:
        await admin.declare("q")
    async with trio.open_nursery() as outer:
        outer.start_soon(watchdog)
        async with trio.open_nursery() as nursery:
            await nursery.start(consumer)
            nursery.cancel_scope.cancel()
        outer.cancel_scope.cancel()
    assert not hung
