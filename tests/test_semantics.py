"""Queue semantics of SPEC section 2 on one real meshqd, through the blocking meshq.Client.

Every wait is an event: a receive with ``wait=``, a subscription ``get(timeout)`` or a
response; timeouts are upper bounds only. The trio client twin is test_async_client.py.
"""

from __future__ import annotations

import itertools
import time

import pytest

import meshq

ALL_OPTIONS = dict(replicas=1, write_quorum=1, message_ttl=60.0, visibility_timeout=5.0,
                   max_deliveries=3,
                   dead_letter_queue="dlq", max_length=100, ordering="fifo", expires=3600.0,
                   dead_letter_exchange=None, dead_letter_routing_key=None, partitions=1)


@pytest.fixture
def daemon(shared_daemon):
    return shared_daemon


def collect(c: meshq.Client, queue: str, n: int) -> list[meshq.Delivery]:
    """Receive until ``n`` messages arrived (each receive waits up to 5 s)."""
    got: list[meshq.Delivery] = []
    while len(got) < n:
        more = c.receive(queue, max=n - len(got), wait=5)
        assert more, f"only {len(got)} of {n} messages arrived on {queue!r}"
        got += more
    return got


def stats(c: meshq.Client, queue: str) -> dict:
    [s] = c.stats(queue)
    return s


def death(d: meshq.Delivery) -> dict:
    return d.headers["x-death"]


# -- declare -------------------------------------------------------------------------------
def test_declare_is_idempotent_and_refuses_other_options(daemon):
    with daemon.client() as c:
        first = c.declare("q", **ALL_OPTIONS)
        assert first["options"] == ALL_OPTIONS
        assert c.declare("q", **ALL_OPTIONS) == first
        assert c.declare("q", passive=True)["name"] == "q"
        with pytest.raises(meshq.PreconditionFailed, match="max_length"):
            c.declare("q", **{**ALL_OPTIONS, "max_length": 7})
        with pytest.raises(meshq.PreconditionFailed):
            c.declare("q")  # defaults differ from what it was declared with
        assert stats(c, "q")["options"] == ALL_OPTIONS  # no silent change
        with pytest.raises(meshq.NotFound):
            c.declare("missing", passive=True)
        assert [s["name"] for s in c.stats()] == ["q"]


@pytest.mark.parametrize("options", [
    {"replicas": "3"}, {"replicas": 0}, {"message_ttl": "soon"}, {"visibility_timeout": -1},
    {"max_deliveries": 1.5}, {"max_length": True}, {"dead_letter_queue": 5},
    {"ordering": "lifo"}, {"colour": "blue"},
])
def test_declare_with_bad_option_types_is_bad_request(daemon, options):
    with daemon.client() as c:
        with pytest.raises(meshq.BadRequest):
            c.declare("q", **options)
        with pytest.raises(meshq.NotFound):
            c.declare("q", passive=True)  # nothing half-created
        assert c.ping()


# -- send ----------------------------------------------------------------------------------
def test_batch_ids_in_order_bodies_and_headers_round_trip(daemon):
    headers = {"k": "v", "n": 7, "nested": {"a": [1, 2.5, None]}, "raw": b"\x00\xff"}
    with daemon.client() as c:
        c.declare("q")
        ids = c.send_batch("q", [b"b0", "s1", b"", {"body": "h3", "headers": headers}])
        one = c.send("q", "\u00e9t\u00e9", headers={"single": True})
        assert len(set([*ids, one])) == 5
        got = c.receive("q", max=10)
        assert [d.id for d in got] == [*ids, one]
        assert [d.body for d in got] == [b"b0", b"s1", b"", b"h3", "\u00e9t\u00e9".encode()]
        assert got[3].headers == headers and got[4].headers == {"single": True}
        assert all(d.delivery_count == 1 and not d.redelivered for d in got)
        assert all(a.hlc < b.hlc for a, b in itertools.pairwise(got))
        assert c.ack("q", [d.id for d in got]) == [*ids, one]
        assert stats(c, "q")["ready"] == stats(c, "q")["leased"] == 0


def test_dedup_id_resend_returns_same_id_and_no_second_message(daemon):
    with daemon.client() as c:
        c.declare("q")
        first = c.send("q", b"x", dedup_id="order-1")
        assert c.send("q", b"x", dedup_id="order-1") == first
        other = c.send("q", b"x", dedup_id="order-2")
        assert other != first
        assert stats(c, "q")["ready"] == 2
        assert [d.id for d in c.receive("q", max=10)] == [first, other]


def test_ttl_expires_to_the_dead_letter_queue(daemon):
    with daemon.client() as c:
        c.declare("dlq")
        c.declare("q", dead_letter_queue="dlq")
        mid = c.send("q", b"stale", ttl=0.2, headers={"h": 1})
        [d] = c.receive("dlq", wait=5)
        assert (d.id, d.body, d.headers["h"]) == (mid, b"stale", 1)
        assert death(d)["reason"] == "expired" and death(d)["queue"] == "q"
        s = stats(c, "q")
        assert (s["ready"], s["dead_lettered"], s["expired"]) == (0, 1, 1)


def test_delay_holds_a_message_back(daemon):
    with daemon.client() as c:
        c.declare("q")
        t0 = time.monotonic()
        mid = c.send("q", b"later", delay=0.5)
        assert c.receive("q", wait=0) == []
        s = stats(c, "q")
        assert (s["delayed"], s["ready"]) == (1, 0)
        [d] = c.receive("q", wait=5)
        assert d.id == mid and time.monotonic() - t0 >= 0.45
        assert stats(c, "q")["delayed"] == 0


# -- receive ---------------------------------------------------------------------------------
def test_pull_receive_honours_max_and_wait(daemon):
    with daemon.client() as c, daemon.client() as other:
        c.declare("q")
        ids = c.send_batch("q", [f"m{i}" for i in range(5)])
        assert [d.id for d in c.receive("q", max=3)] == ids[:3]
        assert [d.id for d in c.receive("q", max=10, wait=5)] == ids[3:]
        assert c.receive("q", max=10, wait=0.1) == []
        rid = c.submit("receive", queue="q", max=1, wait=5)  # parked on the empty queue
        late = other.send("q", b"late")
        assert [m["id"] for m in c.wait(rid)["messages"]] == [late]
        with pytest.raises(meshq.NotFound):
            c.receive("nope")


def test_subscription_prefetch_limits_unacked_deliveries(daemon):
    with daemon.client() as c, daemon.client() as producer:
        c.declare("q")
        sub = c.consume("q", prefetch=2)
        ids = producer.send_batch("q", [f"m{i}" for i in range(5)])
        first = [sub.get(timeout=5), sub.get(timeout=5)]
        assert [d.id for d in first] == ids[:2]
        s = stats(c, "q")  # only 2 leased: the other 3 wait for credit
        assert (s["leased"], s["ready"], s["consumers"]) == (2, 3, 1)
        assert sub.get(timeout=0.05) is None
        sub.ack(first[0])
        third = sub.get(timeout=5)
        assert third.id == ids[2]
        c.ack("q", [first[1].id, third.id])
        rest = []
        for d in sub:  # iteration: ack each one so the next can come
            rest.append(d.id)
            sub.ack(d)
            if len(rest) == 2:
                break
        assert rest == ids[3:]


# -- ack / nack / reject / extend ----------------------------------------------------------------
def test_nack_requeues_now_or_after_a_delay(daemon):
    with daemon.client() as c:
        c.declare("q")
        mid = c.send("q", b"x")
        [d] = c.receive("q")
        assert c.nack("q", [d.id]) == [mid]
        [d] = c.receive("q", wait=5)
        assert (d.id, d.redelivered, d.delivery_count) == (mid, True, 2)
        c.nack("q", [d.id], delay=0.3)
        assert stats(c, "q")["delayed"] == 1
        assert c.receive("q", wait=0) == []
        [d] = c.receive("q", wait=5)
        assert (d.id, d.delivery_count) == (mid, 3)


def test_reject_dead_letters_with_reason(daemon):
    with daemon.client() as c:
        c.declare("dlq")
        c.declare("q", dead_letter_queue="dlq")
        mid = c.send("q", b"bad")
        [d] = c.receive("q")
        assert c.reject("q", [d.id]) == [mid]
        [dead] = c.receive("dlq", wait=5)
        assert (dead.id, dead.body, death(dead)["reason"]) == (mid, b"bad", "rejected")
        assert stats(c, "q")["dead_lettered"] == 1 and stats(c, "q")["leased"] == 0


def test_extend_keeps_a_lease_past_its_visibility_timeout(daemon):
    with daemon.client() as c, daemon.client() as other:
        c.declare("q", visibility_timeout=0.5)
        mid = c.send("q", b"long job")
        [d] = c.receive("q")
        assert c.extend("q", [d.id], 30) == [mid]
        assert other.receive("q", wait=1.0) == []
        assert stats(c, "q")["leased"] == 1
        assert c.ack("q", [d.id]) == [mid]


def test_ack_of_a_message_not_leased_to_this_connection_fails(daemon):
    with daemon.client() as c, daemon.client() as other:
        c.declare("q")
        mid = c.send("q", b"x")
        [d] = c.receive("q")
        with pytest.raises(meshq.PreconditionFailed, match=mid):
            other.ack("q", [mid])
        with pytest.raises(meshq.PreconditionFailed):
            c.ack("q", ["no-such-id"])
        with pytest.raises(meshq.PreconditionFailed):
            other.nack("q", [mid])
        assert c.ack("q", [d.id]) == [mid]
        with pytest.raises(meshq.PreconditionFailed):
            c.ack("q", [mid])  # twice


# -- lease ends ------------------------------------------------------------------------------
def test_unacked_message_comes_back_after_the_visibility_timeout(daemon):
    with daemon.client() as c, daemon.client() as other:
        c.declare("q", visibility_timeout=0.3)
        mid = c.send("q", b"x")
        [d] = c.receive("q")
        [again] = other.receive("q", wait=5)
        assert (again.id, again.redelivered, again.delivery_count) == (mid, True, 2)
        with pytest.raises(meshq.PreconditionFailed):
            c.ack("q", [d.id])  # that lease is over
        assert other.ack("q", [mid]) == [mid]
        # a per-receive visibility_timeout overrides the queue's
        c.send("q", b"y")
        c.receive("q", visibility_timeout=0.2)
        assert other.receive("q", wait=5)[0].redelivered


def test_consumer_disconnect_releases_its_leases_at_once(daemon):
    with daemon.client() as other:
        other.declare("q", visibility_timeout=30)
        ids = other.send_batch("q", [b"a", b"b"])
        c = daemon.client()
        c.receive("q")
        sub = c.consume("q", prefetch=5)
        assert sub.get(timeout=5).id == ids[1]
        c.close()
        t0 = time.monotonic()
        got = collect(other, "q", 2)
        assert sorted(d.id for d in got) == ids
        assert all(d.redelivered for d in got) and time.monotonic() - t0 < 5


# -- dead-lettering and limits ---------------------------------------------------------------
def test_max_deliveries_dead_letters_or_drops_and_counts(daemon):
    with daemon.client() as c:
        c.declare("dlq")
        c.declare("q", max_deliveries=2, dead_letter_queue="dlq")
        c.declare("nodlq", max_deliveries=1)
        mid = c.send("q", b"poison")
        for _ in range(2):
            [d] = c.receive("q", wait=5)
            c.nack("q", [d.id])
        [dead] = c.receive("dlq", wait=5)
        assert (dead.id, death(dead)["reason"], death(dead)["delivery_count"]) == (
            mid, "max_deliveries", 2)
        c.send("nodlq", b"poison")
        [d] = c.receive("nodlq")
        c.nack("nodlq", [d.id])
        s = stats(c, "nodlq")
        assert (s["ready"], s["dead_lettered"], s["dropped"]) == (0, 1, 1)


def test_max_length_drops_the_head_to_the_dlq(daemon):
    with daemon.client() as c:
        c.declare("dlq")
        c.declare("q", max_length=3, dead_letter_queue="dlq")
        ids = [c.send("q", f"m{i}") for i in range(5)]
        assert stats(c, "q")["ready"] == 3
        dead = collect(c, "dlq", 2)
        assert [d.id for d in dead] == ids[:2]
        assert {death(d)["reason"] for d in dead} == {"maxlen"}
        assert [d.id for d in c.receive("q", max=10)] == ids[2:]


# -- purge / delete / stats ------------------------------------------------------------------
def test_purge_keeps_leased_messages(daemon):
    with daemon.client() as c:
        c.declare("q")
        c.send_batch("q", [b"a", b"b", b"c"])
        c.send("q", b"d", delay=30)
        [d] = c.receive("q")
        assert c.purge("q") == 3
        s = stats(c, "q")
        assert (s["ready"], s["delayed"], s["leased"]) == (0, 0, 1)
        assert c.ack("q", [d.id]) == [d.id]
        assert c.purge("q") == 0


def test_delete_ends_subscriptions_and_later_sends_are_not_found(daemon):
    with daemon.client() as c, daemon.client() as consumer:
        c.declare("q")
        c.send_batch("q", [b"a", b"b"])
        sub = consumer.consume("q", prefetch=1)
        assert sub.get(timeout=5) is not None
        assert c.delete("q") == 2
        with pytest.raises(meshq.ConsumerCancelled):  # the daemon ended it, for good
            sub.get(timeout=5)
        with pytest.raises(meshq.NotFound):
            c.send("q", b"x")
        with pytest.raises(meshq.NotFound):
            c.delete("q")
        c.declare("q")
        assert stats(c, "q")["ready"] == 0 and c.receive("q") == []


def test_leaving_a_subscription_ended_by_delete_is_quiet(daemon):
    """Regression: Subscription.__exit__ after the daemon's cancel raised NotFound."""
    with daemon.client() as c, daemon.client() as consumer:
        c.declare("q")
        with consumer.consume("q", prefetch=1) as sub:
            c.delete("q")
            with pytest.raises(meshq.ConsumerCancelled):
                sub.get(timeout=5)
        assert consumer.ping()


def test_subscription_get_with_zero_timeout_polls(daemon):
    """Regression: get(timeout=0) made the socket non-blocking and dropped the connection."""
    with daemon.client() as c:
        c.declare("q")
        sub = c.consume("q", prefetch=1)
        assert sub.get(timeout=0) is None
        mid = c.send("q", b"x")
        assert sub.get(timeout=5).id == mid
        assert sub.get(timeout=0) is None
        assert c.ping()


# -- consumers -------------------------------------------------------------------------------
def test_competing_consumers_round_robin(daemon):
    clients = [daemon.client() for _ in range(3)]
    try:
        clients[0].declare("q")
        subs = [cl.consume("q", prefetch=100) for cl in clients]
        ids = clients[0].send_batch("q", [f"m{i}" for i in range(30)])
        got = [[sub.get(timeout=5).id for _ in range(10)] for sub in subs]
        assert sorted(itertools.chain(*got)) == sorted(ids)  # 3 x 10 distinct: nobody had more
        for k, mine in enumerate(got):
            assert mine == ids[k::3]
    finally:
        for cl in clients:
            cl.close()


def test_a_slow_consumer_does_not_hold_back_the_others(daemon):
    slow, f1, f2 = (daemon.client() for _ in range(3))
    try:
        slow.declare("q")
        held = slow.consume("q", prefetch=1)
        fast = [f1.consume("q", prefetch=1), f2.consume("q", prefetch=1)]
        ids = slow.send_batch("q", [f"m{i}" for i in range(30)])
        slow_id = held.get(timeout=5).id  # never acked
        seen: list[str] = []
        while len(seen) < 29:
            for sub in fast:
                if len(seen) < 29:
                    d = sub.get(timeout=5)
                    assert d is not None, f"stalled after {len(seen)} messages"
                    seen.append(d.id)
                    sub.ack(d)
        assert sorted([*seen, slow_id]) == sorted(ids)
        s = stats(slow, "q")
        assert (s["ready"], s["leased"]) == (0, 1)
    finally:
        for cl in (slow, f1, f2):
            cl.close()


def test_fifo_queue_delivers_in_hlc_order_even_after_a_nack(daemon):
    with daemon.client() as c:
        c.declare("q", ordering="fifo")
        ids = [c.send("q", f"m{i}") for i in range(6)]
        sub = c.consume("q", prefetch=1)
        out = []
        for d in sub:
            out.append(d)
            if d.id == ids[2] and not d.redelivered:
                c.nack("q", [d.id])  # must come back before m3
            else:
                sub.ack(d)
            if len(out) == 7:
                break
        assert [d.id for d in out] == ids[:3] + ids[2:]
        assert out[3].redelivered and out[3].delivery_count == 2
        firsts = [d.hlc for d in out if not d.redelivered]
        assert firsts == sorted(firsts) and len(set(firsts)) == 6


# -- bodies --------------------------------------------------------------------------------
def test_body_size_limit(daemon):
    limit = 1024 * 1024
    with daemon.client() as c:
        c.declare("q")
        big = bytes(range(256)) * (limit // 256)
        mid = c.send("q", big)
        with pytest.raises(meshq.TooLarge):
            c.send("q", big + b"!")
        with pytest.raises(meshq.TooLarge):
            c.send_batch("q", [b"ok", big + b"!"])  # all or nothing
        [d] = c.receive("q", max=10)
        assert d.id == mid and d.body == big
        with daemon.client() as other:  # still serving everyone
            assert other.send("q", b"after") and stats(other, "q")["ready"] == 1
