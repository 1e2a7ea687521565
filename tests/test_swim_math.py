"""Table tests for meshq.mesh._swim_math; the tables marked "memberlist" are its own tests'
values (util_test.go, suspicion_test.go, awareness_test.go), in seconds."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshq.mesh._swim_math import (
    Suspicion,
    TransmitQueue,
    apply_awareness_delta,
    clock_offset,
    ewma,
    expected_confirmations,
    median_offset,
    push_pull_scale,
    remaining_suspicion_time,
    retransmit_limit,
    scaled_interval,
    suspicion_timeout,
)


@pytest.mark.parametrize(
    ("mult", "n", "expected"),
    [
        (3, 0, 0), (3, 1, 3), (3, 99, 6),  # memberlist TestRetransmitLimit
        (4, 9, 4), (4, 10, 8), (4, 999, 12), (4, 1000, 16),
    ],
)
def test_retransmit_limit(mult: int, n: int, expected: int) -> None:
    assert retransmit_limit(mult, n) == expected


def test_retransmit_limit_rejects_negative_n() -> None:
    with pytest.raises(ValueError, match="member count"):
        retransmit_limit(4, -1)


@pytest.mark.parametrize(
    ("n", "expected"),
    [
        # memberlist TestSuspicionTimeout: suspicionTimeout(3, n, 1s) / 3
        (5, 1.0), (10, 1.0), (50, 1.698), (100, 2.0), (500, 2.698), (1000, 3.0),
        (0, 1.0), (1, 1.0),  # the scale never drops below 1
    ],
)
def test_suspicion_timeout(n: int, expected: float) -> None:
    assert suspicion_timeout(3, n, 1.0) / 3 == pytest.approx(expected, abs=1e-9)


def test_suspicion_timeout_lan_defaults() -> None:
    """suspicion_mult 4, probe 1 s: 4 s up to 10 members, 8 s at 100."""
    assert suspicion_timeout(4, 5, 1.0) == pytest.approx(4.0)
    assert suspicion_timeout(4, 100, 1.0) == pytest.approx(8.0)
    assert suspicion_timeout(4, 5, 0.5) == pytest.approx(2.0)


@pytest.mark.parametrize(
    ("n", "k", "elapsed", "expected"),
    [
        # memberlist TestSuspicion_remainingSuspicionTime, min 2 s, max 30 s
        (0, 3, 0.0, 30.0),
        (1, 3, 2.0, 14.0),
        (2, 3, 3.0, 4.81),
        (3, 3, 4.0, -2.0),
        (4, 3, 5.0, -3.0),
        (5, 3, 10.0, -8.0),
        # no confirmations expected: the minimum from the start
        (0, 0, 0.0, 2.0),
        (0, 0, 3.0, -1.0),
    ],
)
def test_remaining_suspicion_time(n: int, k: int, elapsed: float, expected: float) -> None:
    assert remaining_suspicion_time(n, k, elapsed, 2.0, 30.0) == pytest.approx(expected, abs=1e-9)


@given(n=st.integers(0, 20), k=st.integers(0, 10))
@settings(max_examples=200)
def test_remaining_suspicion_time_is_bounded_and_shrinks(n: int, k: int) -> None:
    t = remaining_suspicion_time(n, k, 0.0, 2.0, 30.0)
    assert 2.0 <= t <= 30.0
    assert remaining_suspicion_time(n + 1, k, 0.0, 2.0, 30.0) <= t


SUSPICION_CASES = [
    # memberlist TestSuspicion_Timer: k = 3, min 0.5 s, max 2 s, started by "me":
    # (confirmations offered and whether each was new information, expected timeout)
    ([], 2.0),
    ([("me", False), ("foo", True)], 1.25),
    ([("me", False), ("foo", True), ("foo", False), ("foo", False)], 1.25),
    # memberlist says 810 ms within its 25 ms timer fudge; the formula gives 811 ms
    ([("me", False), ("foo", True), ("bar", True)], 0.811),
    ([("me", False), ("foo", True), ("bar", True), ("baz", True)], 0.5),
    ([("me", False), ("foo", True), ("bar", True), ("baz", True), ("zoo", False)], 0.5),
]


@pytest.mark.parametrize(("confirms", "timeout"), SUSPICION_CASES)
def test_suspicion_timer(confirms: list[tuple[str, bool]], timeout: float) -> None:
    s = Suspicion("me", 3, 0.5, 2.0, started_at=100.0)
    for who, new in confirms:
        assert s.confirm(who) is new, who
    assert s.deadline == pytest.approx(100.0 + timeout, abs=1e-9)
    assert s.confirmations == sum(new for _, new in confirms)


def test_suspicion_timer_zero_k_uses_min_and_takes_no_confirmations() -> None:
    s = Suspicion("me", 0, 0.025, 30.0, started_at=0.0)
    assert s.confirm("foo") is False  # memberlist TestSuspicion_Timer_ZeroK
    assert s.deadline == pytest.approx(0.025)


@pytest.mark.parametrize(
    ("k", "n", "expected"),
    [(4, 5, 2), (4, 4, 2), (4, 3, 0), (4, 1, 0), (6, 6, 4), (6, 5, 0), (2, 10, 0), (1, 10, 0)],
)
def test_expected_confirmations(k: int, n: int, expected: int) -> None:
    assert expected_confirmations(k, n) == expected


def test_awareness() -> None:
    """memberlist TestAwareness: max 8, so the score stays within 0..7."""
    cases = [
        (0, 0, 1.0), (-1, 0, 1.0), (-10, 0, 1.0), (1, 1, 2.0), (-1, 0, 1.0), (10, 7, 8.0),
        (-1, 6, 7.0), (-1, 5, 6.0), (-1, 4, 5.0), (-1, 3, 4.0), (-1, 2, 3.0), (-1, 1, 2.0),
        (-1, 0, 1.0), (-1, 0, 1.0),
    ]
    score = 0
    for i, (delta, expected_score, expected_timeout) in enumerate(cases):
        score = apply_awareness_delta(score, delta, 8)
        assert score == expected_score, f"case {i}"
        assert scaled_interval(1.0, score) == expected_timeout, f"case {i}"


@pytest.mark.parametrize(
    ("base", "awareness", "expected"), [(1.0, 0, 1.0), (1.0, 3, 4.0), (0.5, 7, 4.0), (0.2, 1, 0.4)]
)
def test_scaled_interval(base: float, awareness: int, expected: float) -> None:
    assert scaled_interval(base, awareness) == pytest.approx(expected)


def test_scaled_interval_rejects_negative_awareness() -> None:
    with pytest.raises(ValueError, match="awareness"):
        scaled_interval(1.0, -1)


def test_push_pull_scale() -> None:
    """memberlist TestPushPullScale."""
    for n in range(33):
        assert push_pull_scale(1.0, n) == 1.0, n
    for n in range(33, 65):
        assert push_pull_scale(1.0, n) == 2.0, n
    for n in range(65, 129):
        assert push_pull_scale(1.0, n) == 3.0, n


@pytest.mark.parametrize(
    ("t0", "t1", "t2", "t3", "offset", "rtt"),
    [
        (0.0, 0.05, 0.05, 0.10, 0.0, 0.10),  # same clocks, 50 ms each way
        (0.0, 10.05, 10.06, 0.11, 10.0, 0.10),  # peer 10 s ahead, 10 ms in the peer
        (100.0, 99.51, 99.52, 100.03, -0.5, 0.02),  # peer 500 ms behind
        (0.0, 0.08, 0.08, 0.10, 0.03, 0.10),  # 80 ms out, 20 ms back: error rtt/2 at most
    ],
)
def test_clock_offset(
    t0: float, t1: float, t2: float, t3: float, offset: float, rtt: float
) -> None:
    got_offset, got_rtt = clock_offset(t0, t1, t2, t3)
    assert got_offset == pytest.approx(offset, abs=1e-9)
    assert got_rtt == pytest.approx(rtt, abs=1e-9)


@given(
    theta=st.floats(-1000, 1000), d_out=st.floats(0, 1), d_back=st.floats(0, 1),
    hold=st.floats(0, 1), t0=st.floats(0, 1e6),
)
@settings(max_examples=200)
def test_clock_offset_error_is_within_half_rtt(
    theta: float, d_out: float, d_back: float, hold: float, t0: float
) -> None:
    t1 = t0 + d_out + theta
    t2 = t1 + hold
    t3 = t2 - theta + d_back
    offset, rtt = clock_offset(t0, t1, t2, t3)
    assert rtt == pytest.approx(d_out + d_back, abs=1e-6)
    assert abs(offset - theta) <= rtt / 2 + 1e-6


@pytest.mark.parametrize(
    ("values", "expected"),
    [([], None), ([0.3], 0.3), ([0.0, 0.2, -5.0], 0.0), ([0.0, 1.0, 2.0, 10.0], 1.5)],
)
def test_median_offset(values: list[float], expected: float | None) -> None:
    assert median_offset(values) == expected


def test_ewma() -> None:
    assert ewma(None, 4.0, 0.25) == 4.0
    assert ewma(4.0, 8.0, 0.25) == 5.0
    assert ewma(4.0, 8.0, 1.0) == 8.0


# ------------------------------------------------------------------------- TransmitQueue
def test_queue_supersedes_by_key_and_hands_out_newest_first() -> None:
    q: TransmitQueue[str] = TransmitQueue()
    q.put("a", "alive a 1", 10)
    q.put("b", "alive b 1", 10)
    q.put("a", "suspect a 1", 10)  # replaces the older news about a
    assert len(q) == 2
    assert q.pending() == ["alive b 1", "suspect a 1"]
    assert q.take(1000, limit=5) == ["suspect a 1", "alive b 1"]


def test_queue_prefers_least_sent_and_drops_at_the_limit() -> None:
    q: TransmitQueue[str] = TransmitQueue()
    q.put("a", "A", 10)
    assert q.take(1000, limit=2) == ["A"]
    q.put("b", "B", 10)  # never sent: goes before A although both fit
    assert q.take(15, limit=2) == ["B"]
    assert q.take(1000, limit=2) == ["B", "A"]  # both sent once: newest first; now gone
    assert len(q) == 0
    assert q.take(1000, limit=2) == []


def test_queue_skips_what_does_not_fit() -> None:
    q: TransmitQueue[str] = TransmitQueue()
    q.put("small-old", "s", 5)
    q.put("big", "B", 100)
    q.put("small-new", "t", 5)
    assert q.take(50, limit=3) == ["t", "s"]
    assert "big" in q
    assert q.take(100, limit=3) == ["B"]


def test_queue_limit_zero_still_sends_once() -> None:
    q: TransmitQueue[str] = TransmitQueue()
    q.put("a", "A", 1)
    assert q.take(10, limit=0) == ["A"]
    assert len(q) == 0


@given(
    ops=st.lists(
        st.tuples(st.sampled_from("abcde"), st.integers(1, 60), st.integers(0, 200)),
        max_size=40,
    ),
    limit=st.integers(1, 5),
)
@settings(max_examples=150)
def test_queue_budget_and_limit_hold(ops: list[tuple[str, int, int]], limit: int) -> None:
    """Every take stays within its budget, and no queued item is sent more than limit."""
    q: TransmitQueue[tuple[str, int]] = TransmitQueue()
    sizes: dict[tuple[str, int], int] = {}
    sent: dict[tuple[str, int], int] = {}
    for i, (key, size, budget) in enumerate(ops):
        item = (key, i)
        sizes[item] = size
        q.put(key, item, size)
        got = q.take(budget, limit)
        assert sum(sizes[x] for x in got) <= budget
        for x in got:
            sent[x] = sent.get(x, 0) + 1
    assert all(n <= limit for n in sent.values())
    assert len(q) <= 5
