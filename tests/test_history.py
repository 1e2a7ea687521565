"""The history checker: each category on a tiny synthetic history, and a model queue that is ok."""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshq.testing.history import History, Reorder, Report, lease_end, overlaps_any

L = 10.0  # lease length used by the synthetic histories


def sent(h: History, *ids: str, at: float = 0.0) -> None:
    for i in ids:
        h.send_invoked("c", f"body-{i}")
        h.send_confirmed("c", f"body-{i}", i, at)


def clean() -> History:
    h = History()
    sent(h, "m1", "m2")
    h.delivered("A", "m1", 1, False, 1 + L, 1.0)
    h.ack_confirmed("A", "m1", 2.0)
    h.final_contents(["m2"])
    return h


def lost() -> History:
    h = History()
    sent(h, "m1", "m2")
    h.final_contents(["m2"])
    return h


def unknown_absent() -> History:
    h = History()
    sent(h, "m1")
    h.send_invoked("c", "body-x")
    h.send_failed("c", "body-x", "TIMEOUT", 1.0)
    h.send_invoked("c", "body-y")  # never completed
    h.send_invoked("c", "body-z")
    h.send_failed("c", "body-z", "UNAVAILABLE", 1.0)
    h.final_contents(["m1"])
    return h


def resurrected() -> History:
    h = History()
    sent(h, "m1")
    h.delivered("A", "m1", 1, False, 1 + L, 1.0)
    h.ack_confirmed("A", "m1", 2.0)
    h.final_contents(["m1"])
    return h


def overlapping(unstable: tuple[float, float] | None) -> History:
    h = History()
    sent(h, "m1")
    h.delivered("A", "m1", 1, False, 1 + L, 1.0)
    h.delivered("B", "m1", 2, True, 5 + L, 5.0)
    h.ack_confirmed("B", "m1", 6.0)
    if unstable is not None:
        h.unstable(*unstable)
    return h


def after_deadline() -> History:
    h = History()
    sent(h, "m1")
    h.delivered("A", "m1", 1, False, 1 + L, 1.0)
    h.delivered("B", "m1", 2, True, 1 + 2 * L, 1 + L)  # exactly at A's deadline
    h.ack_failed("A", "m1", 12.0)
    h.ack_confirmed("B", "m1", 13.0)
    return h


def after_ack_failed() -> History:
    h = History()
    sent(h, "m1")
    h.delivered("A", "m1", 1, False, None, 1.0)  # no deadline known: held until A lets go
    h.ack_failed("A", "m1", 3.0)
    h.delivered("B", "m1", 2, True, None, 4.0)
    h.final_contents(["m1"])
    return h


def gone_after_unknown_ack(outcome: str) -> History:
    h = History()
    sent(h, "m1")
    h.delivered("A", "m1", 1, False, 1 + L, 1.0)
    if outcome == "unknown":  # the connection broke: the ack may have been applied
        h.ack_unknown("A", "m1", 2.0)
    else:  # refused: the message must come back
        h.ack_failed("A", "m1", 2.0)
    return h  # and the drain found the queue empty


def no_deadline_overlap() -> History:
    h = History()
    sent(h, "m1")
    h.delivered("A", "m1", 1, False, None, 1.0)
    h.delivered("B", "m1", 2, True, None, 100.0)
    h.final_contents(["m1"])
    return h


def same_consumer_redelivery() -> History:
    h = History()
    sent(h, "m1")
    h.delivered("A", "m1", 1, False, None, 1.0)
    h.delivered("A", "m1", 2, True, None, 2.0)  # A's first lease ends here
    h.final_contents(["m1"])
    return h


# name, history, ok, lost, resurrected, #double, #dup-in-instability, #unknown, dup deliveries
CASES = [
    ("clean", clean, True, (), (), 0, 0, 0, 0),
    ("lost send", lost, False, ("m1",), (), 0, 0, 0, 0),
    ("unknown outcome absent", unknown_absent, True, (), (), 0, 0, 2, 0),
    ("acked then present", resurrected, False, (), ("m1",), 0, 0, 0, 0),
    ("overlap while stable", lambda: overlapping(None), False, (), (), 1, 0, 0, 1),
    ("overlap in partition", lambda: overlapping((3.0, 4.0)), True, (), (), 0, 1, 0, 1),
    ("unstable elsewhere", lambda: overlapping((50.0, 60.0)), False, (), (), 1, 0, 0, 1),
    ("redelivery at deadline", after_deadline, True, (), (), 0, 0, 0, 1),
    ("redelivery after ack failed", after_ack_failed, True, (), (), 0, 0, 0, 1),
    ("gone after an unknown ack", lambda: gone_after_unknown_ack("unknown"), True, (), (),
     0, 0, 0, 0),
    ("gone after a refused ack", lambda: gone_after_unknown_ack("refused"), False, ("m1",),
     (), 0, 0, 0, 0),
    ("no deadline, never released", no_deadline_overlap, False, (), (), 1, 0, 0, 1),
    ("same consumer twice", same_consumer_redelivery, True, (), (), 0, 0, 0, 1),
]


@pytest.mark.parametrize(
    ("make", "ok", "lost_ids", "res_ids", "n_double", "n_dup", "n_unknown", "n_dup_deliv"),
    [c[1:] for c in CASES],
    ids=[c[0] for c in CASES],
)
def test_categories(
    make: object,
    ok: bool,
    lost_ids: tuple[str, ...],
    res_ids: tuple[str, ...],
    n_double: int,
    n_dup: int,
    n_unknown: int,
    n_dup_deliv: int,
) -> None:
    assert callable(make)
    report = make().check()
    assert isinstance(report, Report)
    assert report.ok is ok
    assert report.lost == lost_ids
    assert report.resurrected == res_ids
    assert len(report.double_leases) == n_double
    assert len(report.duplicates_during_instability) == n_dup
    assert len(report.unknown_sends) == n_unknown
    assert report.duplicate_deliveries == n_dup_deliv
    if ok:
        report.assert_ok()
    else:
        with pytest.raises(AssertionError):
            report.assert_ok()


def test_unknown_sends_name_the_send_and_code() -> None:
    unknown = unknown_absent().check().unknown_sends
    assert {(u.body_key, u.error_code) for u in unknown} == {
        ("body-x", "TIMEOUT"),
        ("body-y", None),
    }


def test_double_lease_details_and_summary() -> None:
    report = overlapping(None).check()
    (d,) = report.double_leases
    assert (d.message_id, d.first_consumer, d.first_at, d.second_consumer, d.second_at) == (
        "m1",
        "A",
        1.0,
        "B",
        5.0,
    )
    with pytest.raises(AssertionError, match=r"DOUBLE LEASES 1 .*m1 \(A@1 / B@5\)"):
        report.assert_ok()


def test_summary_lists_a_few_ids() -> None:
    h = History()
    sent(h, *[f"m{i:02}" for i in range(8)])
    with pytest.raises(AssertionError, match=r"LOST 8 .*m00, m01, m02, m03, m04 and 3 more"):
        h.check().assert_ok()


def test_lease_slack_tolerates_clock_error() -> None:
    h = History(lease_slack=0.5)
    sent(h, "m1")
    h.delivered("A", "m1", 1, False, 11.0, 1.0)
    h.delivered("B", "m1", 2, True, 21.0, 10.6)
    h.ack_confirmed("B", "m1", 12.0)
    assert h.check().ok
    with pytest.raises(ValueError):
        History(lease_slack=-1.0)


def test_unstable_rejects_backwards_interval() -> None:
    with pytest.raises(ValueError):
        History().unstable(5.0, 4.0)


@pytest.mark.parametrize(
    ("start", "deadline", "later", "slack", "end"),
    [
        (1.0, None, [], 0.0, math.inf),
        (1.0, 11.0, [], 0.0, 11.0),
        (1.0, 11.0, [], 0.5, 10.5),
        (1.0, 11.0, [4.0, 3.0], 0.0, 3.0),
        (1.0, 11.0, [0.5], 0.0, 11.0),  # an event before the lease began does not end it
        (1.0, None, [1.0], 0.0, 1.0),
    ],
)
def test_lease_end(
    start: float, deadline: float | None, later: list[float], slack: float, end: float
) -> None:
    assert lease_end(start, deadline, later, slack) == end


@pytest.mark.parametrize(
    ("start", "end", "intervals", "expected"),
    [
        (1.0, 5.0, [], False),
        (1.0, 5.0, [(5.0, 6.0)], True),
        (1.0, 5.0, [(0.0, 1.0)], True),
        (1.0, 5.0, [(2.0, 3.0)], True),
        (1.0, 5.0, [(0.0, 9.0)], True),
        (1.0, 5.0, [(5.5, 6.0), (0.0, 0.5)], False),
    ],
)
def test_overlaps_any(
    start: float, end: float, intervals: list[tuple[float, float]], expected: bool
) -> None:
    assert overlaps_any(start, end, intervals) is expected


def test_recording_from_threads() -> None:
    h = History()

    def client(n: int) -> None:
        for i in range(200):
            h.send_invoked(f"c{n}", f"b{i}")
            h.send_confirmed(f"c{n}", f"b{i}", f"c{n}-m{i}", float(i))

    threads = [threading.Thread(target=client, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    report = h.check()
    assert report.confirmed_sends == 800
    assert len(report.lost) == 800


# -- the order of a partition key ----------------------------------------------------------


def keyed(h: History, client: str, key: str | None, *ids: str) -> None:
    """`client` sends `ids` one after the other, each confirmed before the next."""
    for i in ids:
        h.send_invoked(client, f"body-{i}", key)
        h.send_confirmed(client, f"body-{i}", i, 0.0, key)
    h.final_contents(ids)  # (not lost)


# (consumer, message id, delivery count) in the order the consumers got them, one a second,
# each lease over before the next delivery; count 2 and up is a redelivery
Got = tuple[str, str, int]


def got(h: History, *deliveries: Got) -> None:
    for t, (consumer, mid, count) in enumerate(deliveries, start=1):
        h.delivered(consumer, mid, count, count > 1, t + 0.5, float(t))


def one_key(*deliveries: Got) -> History:
    h = History()
    keyed(h, "p", "k", "m1", "m2", "m3")
    got(h, *deliveries)
    return h


def two_keys_or_clients(second: str) -> History:
    """m1 (key k of p), then m2 of another key or client; A gets m2 first."""
    h = History()
    keyed(h, "p", "k", "m1")
    if second == "key":
        keyed(h, "p", "j", "m2")
    elif second == "client":
        keyed(h, "q", "k", "m2")
    else:
        keyed(h, "p", None, "m2")
    got(h, ("A", "m2", 1), ("A", "m1", 1))
    return h


def overlapping_sends() -> History:
    """p sends m2 before m1 is confirmed: the two are not ordered."""
    h = History()
    h.send_invoked("p", "body-m1", "k")
    h.send_invoked("p", "body-m2", "k")
    h.send_confirmed("p", "body-m2", "m2", 1.0, "k")
    h.send_confirmed("p", "body-m1", "m1", 1.0, "k")
    h.final_contents(["m1", "m2"])
    got(h, ("A", "m2", 1), ("A", "m1", 1))
    return h


def reordered_in_instability() -> History:
    h = one_key(("A", "m2", 1), ("A", "m1", 1))
    h.unstable(0.0, 10.0)  # membership changes excuse no reordering
    return h


# name, history, how many reorders
ORDER_CASES = [
    ("in order", lambda: one_key(("A", "m1", 1), ("A", "m2", 1), ("A", "m3", 1)), 0),
    ("round-robin", lambda: one_key(("A", "m1", 1), ("B", "m2", 1), ("A", "m3", 1)), 0),
    ("later to another consumer first", lambda: one_key(("B", "m2", 1), ("A", "m1", 1)), 0),
    ("reordered", lambda: one_key(("A", "m2", 1), ("A", "m1", 1)), 1),
    ("reordered behind the last", lambda: one_key(("A", "m3", 1), ("A", "m1", 1),
                                                  ("A", "m2", 1)), 2),
    ("reordered after a redelivery of the later",
     lambda: one_key(("B", "m2", 1), ("A", "m2", 2), ("A", "m1", 1)), 1),
    ("reordered in instability", reordered_in_instability, 1),
    ("redelivered behind a later one",
     lambda: one_key(("A", "m1", 1), ("B", "m2", 1), ("B", "m1", 2)), 0),
    ("redelivered to the same consumer",
     lambda: one_key(("A", "m1", 1), ("A", "m2", 1), ("A", "m1", 2)), 0),
    # its first lease reached the client's node, never the program: counted all the same
    ("first seen redelivered", lambda: one_key(("A", "m2", 1), ("A", "m1", 2)), 0),
    # a failover's new dispatcher did not know of the first lease: not the first delivery
    ("delivered again uncounted",
     lambda: one_key(("A", "m1", 1), ("A", "m2", 1), ("A", "m1", 1)), 0),
    ("later sent again, earlier never delivered", lambda: one_key(("A", "m2", 1)), 0),
    ("another key", lambda: two_keys_or_clients("key"), 0),
    ("another client", lambda: two_keys_or_clients("client"), 0),
    ("no key", lambda: two_keys_or_clients("none"), 0),
    ("sends that overlap", overlapping_sends, 0),
]


@pytest.mark.parametrize(("make", "n"), [c[1:] for c in ORDER_CASES],
                         ids=[c[0] for c in ORDER_CASES])
def test_the_order_of_a_partition_key(make: object, n: int) -> None:
    assert callable(make)
    report = make().check()
    assert len(report.reorders) == n
    assert report.ok is (n == 0)
    assert report.double_leases == ()  # (these histories break nothing else)


def test_a_reorder_names_the_consumer_the_key_and_both_messages() -> None:
    report = one_key(("A", "m3", 1), ("A", "m1", 1), ("A", "m2", 1)).check()
    assert report.reorders == (
        Reorder("A", "p", "k", "m1", 2.0, "m3", 1.0),
        Reorder("A", "p", "k", "m2", 3.0, "m3", 1.0),
    )
    assert report.keyed_first_deliveries == 3
    with pytest.raises(AssertionError, match=r"REORDERED 2 .*A got m3@1 before m1@2 \(key 'k' "
                                             r"of p\)"):
        report.assert_ok()


# -- a tiny correct queue, run against the checker -----------------------------------------


@dataclass
class _Msg:
    written: bool
    acked: bool = False
    count: int = 0
    holder: str | None = None
    deadline: float = -math.inf


@dataclass
class ModelQueue:
    """Leases for L; while `unstable_until` is ahead it may forget leases (a partition)."""

    h: History = field(default_factory=History)
    now: float = 0.0
    unstable_until: float = -math.inf
    msgs: dict[str, _Msg] = field(default_factory=dict)
    dup_deliveries: int = 0

    def send(self, n: int, outcome: str, partition_key: str | None = None) -> None:
        key = f"b{n}"
        self.h.send_invoked("c", key, partition_key)
        mid = f"m{n}"
        if outcome == "confirmed":
            self.msgs[mid] = _Msg(True)
            self.h.send_confirmed("c", key, mid, self.now, partition_key)
        elif outcome == "unavailable":
            self.h.send_failed("c", key, "UNAVAILABLE", self.now)
        elif outcome in ("timeout_written", "timeout_lost"):
            if outcome == "timeout_written":
                self.msgs[mid] = _Msg(True)
            self.h.send_failed("c", key, "TIMEOUT", self.now)
        elif outcome == "no_reply_written":
            self.msgs[mid] = _Msg(True)

    def receive(self, consumer: str) -> None:
        """The first message free to lease, in send order (a key's order: one partition)."""
        partitioned = self.now <= self.unstable_until
        for mid, m in self.msgs.items():
            free = m.holder is None or m.deadline <= self.now
            if m.written and not m.acked and (free or (partitioned and m.holder != consumer)):
                m.count += 1
                self.dup_deliveries += m.count > 1
                m.holder, m.deadline = consumer, self.now + L
                self.h.delivered(consumer, mid, m.count, m.count > 1, m.deadline, self.now)
                return

    def ack(self, consumer: str, pick: int) -> None:
        mine = [mid for mid, m in self.msgs.items() if m.holder == consumer and not m.acked]
        if not mine:
            return
        mid = mine[pick % len(mine)]
        m = self.msgs[mid]
        if self.now < m.deadline:
            m.acked = True
            self.h.ack_confirmed(consumer, mid, self.now)
        else:
            self.h.ack_failed(consumer, mid, self.now)

    def partition(self, duration: float) -> None:
        self.unstable_until = max(self.unstable_until, self.now + duration)
        self.h.unstable(self.now, self.now + duration)

    def drain(self) -> None:
        self.h.final_contents(mid for mid, m in self.msgs.items() if m.written and not m.acked)


OUTCOMES = ["confirmed", "unavailable", "timeout_written", "timeout_lost", "no_reply_written"]
CONSUMERS = ["A", "B", "C"]
OPS = st.one_of(
    st.tuples(st.just("send"), st.sampled_from(OUTCOMES), st.sampled_from([None, "k", "j"])),
    st.tuples(st.just("recv"), st.sampled_from(CONSUMERS)),
    st.tuples(st.just("ack"), st.sampled_from(CONSUMERS), st.integers(0, 5)),
    st.tuples(st.just("tick"), st.sampled_from([0.0, 1.0, 3.0, L, 2 * L])),
    st.tuples(st.just("partition"), st.sampled_from([0.0, 2.0, 15.0])),
)


@settings(max_examples=200, deadline=None)
@given(ops=st.lists(OPS, max_size=60), partitions=st.booleans())
def test_a_correct_queue_checks_ok(ops: list[tuple[object, ...]], partitions: bool) -> None:
    q = ModelQueue()
    for n, op in enumerate(ops):
        kind = op[0]
        if kind == "send":
            key = op[2]
            assert key is None or isinstance(key, str)
            q.send(n, str(op[1]), key)
        elif kind == "recv":
            q.receive(str(op[1]))
        elif kind == "ack":
            pick = op[2]
            assert isinstance(pick, int)
            q.ack(str(op[1]), pick)
        elif kind == "tick":
            dt = op[1]
            assert isinstance(dt, float)
            q.now += dt
        elif kind == "partition" and partitions:
            d = op[1]
            assert isinstance(d, float)
            q.partition(d)
    q.drain()
    report = q.h.check()
    report.assert_ok()
    assert report.duplicate_deliveries == q.dup_deliveries
    if not partitions:
        assert report.duplicates_during_instability == ()
