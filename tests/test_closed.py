"""Closed timestamps and the fifo merge (meshq.broker.closed), and the History's fifo
check (meshq.testing.history.fifo_breaks): pure, table-driven."""

from __future__ import annotations

import random

import pytest

from meshq.broker.closed import FifoMerge, closed_timestamp, renewed_bound, to_restamp
from meshq.hlc import pack
from meshq.server.fifo import order_key
from meshq.testing.history import History, fifo_breaks


@pytest.mark.parametrize(("stamp", "ceiling", "unconfirmed", "head", "pending", "closed"), [
    (100, 1000, None, None, (), 101),  # nothing in the way: above the stamp just taken
    (100, 50, None, None, (), 50),  # never above the durable ceiling (a restart's floor)
    (100, 1000, 40, None, (), 40),  # a send stamped and not yet committed
    (100, 1000, None, 30, (), 30),  # a ready message not yet delivered
    (100, 1000, 40, 30, (60, 20), 20),  # a lease granted, not yet handed over
    (100, 1000, 400, 300, (), 101),  # (those can only be below a fresh stamp)
])
def test_closed_timestamp(stamp: int, ceiling: int, unconfirmed: int | None,
                          head: int | None, pending: tuple[int, ...], closed: int) -> None:
    assert closed_timestamp(stamp, ceiling, unconfirmed, head, pending) == closed


def test_the_merge_releases_the_lowest_once_every_other_partition_passed_it() -> None:
    m = FifoMerge(3)
    m.add(0, (10, "a"), "a10")
    assert m.release() == []
    assert m.waits_on() == (10, [1, 2])
    m.close(1, 11)
    assert m.waits_on() == (10, [2])
    m.add(2, (12, "c"), "c12")  # partition 2 holds something behind it: no wait on it
    assert m.release() == ["a10"]
    assert m.waits_on() == (12, [0, 1])  # closed[0] is 0: nothing reported yet
    m.close(0, 12)
    assert m.release() == []  # 12 is not above 12
    assert m.waits_on() == (12, [0, 1])
    m.add(1, (11, "b"), "b11")
    assert m.release() == ["b11"]
    m.close(0, 13)
    m.close(1, 13)
    assert m.release() == ["c12"]
    assert m.waits_on() is None
    m.add(1, (20, "b"), "b20")
    m.add(1, (21, "b"), "b21")
    assert m.drain() == ["b20", "b21"]
    assert m.release() == []


def test_the_merge_of_random_streams_is_in_order() -> None:
    """Partitions deliver their own messages in order, each closing at its next stamp:
    what the merge releases is every message, in (HLC, node) order."""
    rng = random.Random(7)
    streams = [sorted(rng.sample(range(1, 10_000), 200)) for _ in range(4)]
    m = FifoMerge(4)
    cursor = [0] * 4
    out: list[int] = []
    while any(cursor[i] < len(s) for i, s in enumerate(streams)):
        i = rng.randrange(4)
        if cursor[i] < len(streams[i]):
            ts = streams[i][cursor[i]]
            cursor[i] += 1
            m.add(i, (ts, str(i)), ts)
        nxt = streams[i][cursor[i]] if cursor[i] < len(streams[i]) else 10_000
        m.close(i, nxt)
        out += m.release()
    for i in range(4):
        m.close(i, 10_001)
    out += m.release()
    assert out == sorted(ts for s in streams for ts in s)


def test_fifo_breaks_ignore_redeliveries_and_name_what_came_before() -> None:
    seen = [("m1", (1, "n1"), False, 1.0), ("m3", (3, "n2"), False, 2.0),
            ("m2", (2, "n1"), True, 3.0), ("m4", (3, "n3"), False, 4.0),
            ("m0", (0, "n1"), False, 5.0)]
    breaks = fifo_breaks("c", seen)
    assert [(b.message_id, b.after_id, b.after_at, b.at) for b in breaks] == [
        ("m0", "m4", 4.0, 5.0)]
    h = History()
    for mid, key, again, at in seen:
        h.fifo_delivered("c", mid, key[0], key[1], again, at)
    report = h.check()
    assert not report.ok
    assert "FIFO ORDER broken 1" in report.summary()
    with pytest.raises(AssertionError, match="m0 after m4"):
        report.assert_ok()
    h.unstable(4.5, 6.0)  # a failover between the two: judged all the same
    report = h.check()
    assert not report.ok and len(report.fifo_breaks) == 1
    fine = History()
    fine.fifo_delivered("c", "a", 1, "n1", False, 1.0)
    fine.fifo_delivered("d", "b", 0, "n1", False, 2.0)  # another consumer's is its own
    assert fine.check().ok


@pytest.mark.parametrize(("closed", "floor", "bound"), [
    (pack(1000), (), pack(1200)),  # 200 ms of wall time above what it closes at
    (pack(1000, 7), (), pack(1200)),  # (the logical part goes: a whole millisecond)
    (pack(1000), (None, None), pack(1200)),
    (pack(1000), (pack(1100), None), pack(1100)),  # not above its ready head ...
    (pack(1000), (pack(1150), pack(1050)), pack(1050)),  # ... nor an uncommitted send
    (pack(1000, 3), (pack(1000, 3),), pack(1000, 3)),  # never below what it closes at
])
def test_renewed_bound(closed: int, floor: tuple[int | None, ...], bound: int) -> None:
    assert renewed_bound(closed, 200, floor) == bound


@pytest.mark.parametrize(("ready", "bound", "seqs"), [
    ([], 100, []),
    ([(50, "n1", 1, 0)], 0, []),  # no bound (a fair queue, a new one): nothing
    ([(50, "n1", 1, 0)], 100, [1]),  # never delivered, below what may have been closed
    ([(50, "n1", 1, 1)], 100, []),  # a redelivery: outside the order, left alone
    ([(100, "n1", 1, 0)], 100, []),  # at the bound: nothing was closed above it
    ([(70, "n2", 9, 0), (60, "n1", 4, 0), (70, "n1", 8, 0), (150, "n1", 2, 0)], 100,
     [4, 8, 9, 2]),  # in (HLC, node) order, and those after them: the order is kept
    ([(40, "n1", 1, 0), (60, "n1", 2, 2), (90, "n1", 3, 0)], 50, [1, 3]),  # (not 2)
    ([(150, "n1", 1, 0), (160, "n1", 2, 0)], 100, []),  # a backlog above it: untouched
])
def test_what_a_takeover_stamps_again(ready: list[tuple[int, str, int, int]], bound: int,
                                      seqs: list[int]) -> None:
    assert to_restamp(ready, bound) == seqs


def test_the_order_key_is_hlc_then_node_whatever_the_id_says() -> None:
    """(HLC, node), SPEC section 2; from an id, a key as it travels, or an earlier
    version's [HLC, id]. Two nodes stamping two messages alike (each stamped again after
    a failover, keeping its id) are ordered by node, as the ready heap orders them, not
    by their ids."""
    assert order_key(7, "0000000000070000-0000000a") == (7, "0000000a")
    assert order_key(7, "0000000a") == (7, "0000000a")
    x, y = order_key(9, "0000000000060000-00000002"), order_key(9, "0000000000050000-00000003")
    assert x < y
