"""Unit tests for meshq.mesh.clocks (offset math, filter, verdict) and meshq.mesh.ntp."""

from __future__ import annotations

import math
import socket
from typing import Any

import ntplib
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshq.mesh.clocks import ClockTracker, ClockVerdict, ntp_offset
from meshq.mesh.ntp import NtpError, query_ntp

BASE = 1024.0  # wall-clock base for probes; with 1/128 s legs all arithmetic is exact
LEG = 1 / 128  # one-way delay used by the table tests (about 8 ms)


def probe(tracker: ClockTracker, peer: str, offset_ms: float, *, now: float = 0.0,
          fwd: float = LEG, back: float = LEG, proc: float = 0.0, t0: float = BASE) -> bool:
    """One simulated probe round trip to a peer whose clock is ``offset_ms`` ahead of ours:
    ``fwd``/``back`` the one-way network delays, ``proc`` the peer's time to answer."""
    t1 = t0 + fwd + offset_ms / 1000.0
    t2 = t1 + proc
    t3 = t0 + fwd + proc + back
    return tracker.observe(peer, t0, t1, t2, t3, now)


# ----------------------------------------------------------------------- ntp_offset
NTP_TABLE = {
    # name: (t0, t1, t2, t3, offset, delay)
    "same-clock-symmetric": (0.0, 0.010, 0.011, 0.021, 0.0, 0.020),
    "peer-ahead-100ms": (100.0, 100.110, 100.111, 100.021, 0.100, 0.020),
    "peer-behind-250ms": (100.0, 99.760, 99.765, 100.025, -0.250, 0.020),
    "asymmetric-fwd-slower": (0.0, 0.030, 0.030, 0.040, 0.010, 0.040),  # error (a - b) / 2
    "asymmetric-back-slower": (0.0, 0.010, 0.010, 0.040, -0.010, 0.040),
    "behind-and-asymmetric": (0.0, -0.498, -0.498, 0.020, -0.508, 0.020),
    "slow-peer-processing-not-delay": (5.0, 5.001, 6.001, 6.002, 0.0, 0.002),
    "zero-delay": (7.0, 7.5, 7.5, 7.0, 0.5, 0.0),
}


@pytest.mark.parametrize("row", NTP_TABLE.values(), ids=NTP_TABLE.keys())
def test_ntp_offset_table(row: tuple[float, ...]) -> None:
    t0, t1, t2, t3, offset, delay = row
    got_offset, got_delay = ntp_offset(t0, t1, t2, t3)
    assert got_offset == pytest.approx(offset, abs=1e-9)
    assert got_delay == pytest.approx(delay, abs=1e-9)


@settings(max_examples=200)
@given(
    theta=st.floats(-1000, 1000),
    fwd=st.floats(0, 5),
    back=st.floats(0, 5),
    proc=st.floats(0, 5),
)
def test_ntp_offset_error_is_bounded_by_half_the_delay(
    theta: float, fwd: float, back: float, proc: float
) -> None:
    t0 = 1.7e9
    t1 = t0 + fwd + theta
    t2 = t1 + proc
    t3 = t0 + fwd + proc + back
    offset, delay = ntp_offset(t0, t1, t2, t3)
    assert delay == pytest.approx(fwd + back, abs=1e-5)
    assert abs(offset - theta) <= delay / 2 + 1e-5
    assert offset - theta == pytest.approx((fwd - back) / 2, abs=1e-5)


# ----------------------------------------------------------------------- verdict
VERDICTS = {
    # name: (peer offsets in ms, accepting, our offset to the median in ms)
    "no-peers": ([], True, 0.0),
    "three-agree": ([5.0, -3.0, 10.0], True, -2.5),
    "we-600-ahead-of-all": ([-600.0, -600.0, -600.0], False, 600.0),
    "we-600-behind-all": ([600.0, 600.0, 600.0], False, -600.0),
    "one-bad-peer-ahead": ([5000.0, 0.0, 0.0], True, 0.0),
    "one-bad-peer-behind": ([-5000.0, 10.0, -10.0], True, 5.0),
    "two-of-four-bad-peers": ([-900.0, -900.0, 0.0, 0.0], True, 0.0),
    "at-the-limit": ([-500.0, -500.0, -500.0], True, 500.0),
    "just-past-the-limit": ([-501.0, -501.0, -501.0], False, 501.0),
    "two-nodes-900-apart": ([900.0], True, -450.0),  # median of two is their mean
    # ... but with one peer there is no telling whose clock is wrong: no refusal
    "two-nodes-1200-apart": ([1200.0], True, -600.0),
}


@pytest.mark.parametrize("row", VERDICTS.values(), ids=VERDICTS.keys())
def test_verdict_table(row: tuple[list[float], bool, float]) -> None:
    peers, accepting, median = row
    tracker = ClockTracker(max_offset_ms=500)
    for i, offset in enumerate(peers):
        assert probe(tracker, f"peer-{i}", offset, now=10.0)
    verdict = tracker.verdict(now=11.0)
    assert verdict.accepting_writes is accepting
    assert verdict.median_offset_ms == pytest.approx(median, abs=1e-6)
    assert tracker.cluster_median_offset(now=11.0) == pytest.approx(median, abs=1e-6)
    assert verdict.peers == len(peers)
    assert (verdict.reason is None) is accepting


def test_refusal_names_the_offset_the_direction_and_the_limit() -> None:
    tracker = ClockTracker(max_offset_ms=500)
    for peer in ("a", "b", "c"):
        probe(tracker, peer, -600.0)
    verdict = tracker.verdict(now=1.0)
    assert not verdict.accepting_writes and verdict.reason is not None
    assert "600 ms ahead of the cluster median" in verdict.reason
    assert "max_clock_offset of 500 ms" in verdict.reason
    behind = ClockTracker(max_offset_ms=250)
    probe(behind, "a", 700.0)
    probe(behind, "b", 700.0)
    reason = behind.verdict(now=1.0).reason
    assert reason is not None and "700 ms behind" in reason and "250 ms" in reason


def test_no_negative_zero_in_the_median() -> None:
    verdict = ClockTracker().verdict(now=0.0)
    assert verdict == ClockVerdict(True, None, 0.0, 0, None)
    assert math.copysign(1.0, verdict.median_offset_ms) == 1.0


def test_recovers_when_the_clock_comes_back_even_over_slower_round_trips() -> None:
    """Refused at 600 ms ahead; after our clock is set right, the first probes (with a
    longer round trip than the bad ones) bring writes back at once: the bad samples
    cannot be true together with the new ones, so they are dropped."""
    tracker = ClockTracker(max_offset_ms=500)
    for peer in ("a", "b", "c", "d"):
        for k in range(3):
            probe(tracker, peer, -600.0, now=float(k))
    assert not tracker.verdict(now=3.0).accepting_writes
    probe(tracker, "a", 20.0, now=4.0, fwd=0.05, back=0.05)
    assert not tracker.verdict(now=4.0).accepting_writes  # one of four: median still bad
    probe(tracker, "b", -15.0, now=5.0, fwd=0.05, back=0.05)
    verdict = tracker.verdict(now=5.0)  # {0, 20, -15, -600, -600}: median -15
    assert verdict.accepting_writes and verdict.reason is None
    assert verdict.median_offset_ms == pytest.approx(15.0)
    assert tracker.offsets(now=5.0) == pytest.approx(
        {"a": 20.0, "b": -15.0, "c": -600.0, "d": -600.0})


def test_stale_samples_are_ignored() -> None:
    tracker = ClockTracker(max_offset_ms=500, max_age=30.0)
    for peer in ("a", "b"):
        probe(tracker, peer, -900.0, now=100.0)
    assert not tracker.verdict(now=130.0).accepting_writes  # exactly max_age: still fresh
    stale = tracker.verdict(now=130.5)
    assert stale.accepting_writes and stale.peers == 0
    assert tracker.offsets(now=130.5) == {}
    assert tracker.offsets() == pytest.approx({"a": -900.0, "b": -900.0})  # for status
    probe(tracker, "a", 0.0, now=131.0)
    probe(tracker, "c", 0.0, now=131.0)
    assert tracker.offsets(now=131.0) == pytest.approx({"a": 0.0, "c": 0.0})


def test_forget_drops_a_peer_from_the_median() -> None:
    tracker = ClockTracker(max_offset_ms=500)
    for peer, offset in (("a", -700.0), ("b", -700.0), ("c", -700.0), ("d", 0.0)):
        probe(tracker, peer, offset)
    assert not tracker.verdict(now=1.0).accepting_writes  # {0, 0, -700 x 3}: median -700
    tracker.forget("a")
    tracker.forget("unknown")
    verdict = tracker.verdict(now=1.0)  # {0, 0, -700, -700}: median -350
    assert verdict.accepting_writes and verdict.peers == 3
    assert set(tracker.offsets()) == {"b", "c", "d"}


# ----------------------------------------------------------------------- the filter
def test_min_delay_filter_picks_the_shortest_round_trip() -> None:
    """True offset 100 ms; asymmetric legs skew each estimate by (fwd - back) / 2."""
    tracker = ClockTracker()
    probe(tracker, "p", 100.0, fwd=0.040, back=0.000, now=1.0)  # 120 ms, delay 40 ms
    probe(tracker, "p", 100.0, fwd=0.005, back=0.003, now=2.0)  # 101 ms, delay 8 ms
    probe(tracker, "p", 100.0, fwd=0.000, back=0.030, now=3.0)  # 85 ms, delay 30 ms
    assert tracker.offsets(now=3.0)["p"] == pytest.approx(101.0)
    probe(tracker, "p", 100.0, fwd=0.001, back=0.001, proc=0.5, now=4.0)  # 100, delay 2 ms
    assert tracker.offsets(now=4.0)["p"] == pytest.approx(100.0)  # processing isn't delay


def test_filter_window_evicts_the_oldest_sample() -> None:
    tracker = ClockTracker(window=3)
    probe(tracker, "p", 100.0, fwd=0.002, back=0.000, now=1.0)  # 101 ms, the best
    for k, fwd in enumerate((0.030, 0.020, 0.040)):  # 115, 110, 120 ms
        assert tracker.offsets(now=2.0 + k)["p"] == pytest.approx(101.0)
        probe(tracker, "p", 100.0, fwd=fwd, back=0.0, now=2.0 + k)
    assert tracker.offsets(now=5.0)["p"] == pytest.approx(110.0)  # best of the last 3


def test_filter_skips_a_stale_best_sample() -> None:
    tracker = ClockTracker(max_age=10.0)
    probe(tracker, "p", 100.0, fwd=0.002, back=0.000, now=0.0)  # 101 ms, best but old
    probe(tracker, "p", 100.0, fwd=0.020, back=0.000, now=5.0)  # 110 ms
    assert tracker.offsets(now=10.0)["p"] == pytest.approx(101.0)
    assert tracker.offsets(now=11.0)["p"] == pytest.approx(110.0)


@settings(max_examples=100)
@given(
    theta_ms=st.floats(-2000, 2000),
    legs=st.lists(st.tuples(st.floats(0, 0.2), st.floats(0, 0.2)), min_size=1, max_size=12),
)
def test_filtered_offset_is_within_the_best_bound(
    theta_ms: float, legs: list[tuple[float, float]]
) -> None:
    """Samples of one true offset always agree, so none is dropped, and the estimate is
    the shortest round trip of the last ``window``, within half its delay of the truth."""
    tracker = ClockTracker(window=8)
    for k, (fwd, back) in enumerate(legs):
        assert probe(tracker, "p", theta_ms, fwd=fwd, back=back, now=float(k))
    best_fwd, best_back = min(legs[-8:], key=lambda fb: fb[0] + fb[1])
    expected = theta_ms + (best_fwd - best_back) / 2 * 1000
    got = tracker.offsets(now=float(len(legs)))["p"]
    assert got == pytest.approx(expected, abs=1e-3)
    assert abs(got - theta_ms) <= (best_fwd + best_back) / 2 * 1000 + 1e-3


@pytest.mark.parametrize(
    "times",
    [
        (BASE, BASE + 0.5, BASE + 0.6, BASE + 0.05),  # peer took longer than the round trip
        (BASE, BASE, BASE, BASE - 1.0),  # our clock stepped back during the probe
        (BASE, math.nan, BASE, BASE + 0.01),
        (BASE, math.inf, BASE, BASE + 0.01),
    ],
    ids=["peer-processing-exceeds-rtt", "our-clock-stepped-back", "nan", "inf"],
)
def test_impossible_samples_are_not_recorded(times: tuple[float, float, float, float]) -> None:
    tracker = ClockTracker()
    assert tracker.observe("p", *times, now=1.0) is False
    assert tracker.offsets() == {}
    assert ClockTracker().observe("p", BASE, BASE, BASE, BASE, now=math.nan) is False


@pytest.mark.parametrize(
    "kwargs", [{"max_offset_ms": 0}, {"max_offset_ms": -1}, {"window": 0}, {"max_age": 0}]
)
def test_bad_parameters_are_refused(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        ClockTracker(**kwargs)


# ----------------------------------------------------------------------- NTP input
NTP_VERDICTS = {
    # name: (peer offsets ms, ntp offset ms or None, ntp taken at, accepting, in reason)
    "ntp-agrees": ([0.0, 0.0], 30.0, 0.0, True, None),
    "ntp-says-we-are-behind": ([0.0, 0.0], 800.0, 0.0, False, "800 ms behind its NTP server"),
    "ntp-says-we-are-ahead": ([], -800.0, 0.0, False, "800 ms ahead of its NTP server"),
    "ntp-stale": ([0.0], 800.0, -100.0, True, None),
    "both-bad": ([-700.0, -700.0], -700.0, 0.0, False, "cluster median (of 3 nodes)"),
}


@pytest.mark.parametrize("row", NTP_VERDICTS.values(), ids=NTP_VERDICTS.keys())
def test_ntp_check_table(row: tuple[list[float], float, float, bool, str | None]) -> None:
    peers, ntp, ntp_at, accepting, text = row
    tracker = ClockTracker(max_offset_ms=500, max_age=60.0)
    for i, offset in enumerate(peers):
        probe(tracker, f"p{i}", offset, now=0.0)
    tracker.ntp_check(ntp, now=ntp_at)
    verdict = tracker.verdict(now=1.0)
    assert verdict.accepting_writes is accepting
    fresh = 1.0 - ntp_at <= 60.0
    assert verdict.ntp_offset_ms == (ntp if fresh else None)
    if text is not None:
        assert verdict.reason is not None and text in verdict.reason


def test_both_reasons_are_given_and_a_bad_ntp_value_is_ignored() -> None:
    tracker = ClockTracker(max_offset_ms=500)
    probe(tracker, "a", -700.0)
    probe(tracker, "b", -700.0)
    tracker.ntp_check(-700.0, now=0.0)
    tracker.ntp_check(math.nan, now=0.0)  # ignored: the last good measurement stays
    reason = tracker.verdict(now=0.0).reason
    assert reason is not None
    assert "cluster median" in reason and "NTP server" in reason and reason.count(";") == 1


class _Stats:
    offset = 0.25  # ntplib: the server's clock minus ours, in seconds


async def test_query_ntp_returns_the_offset_in_ms(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[Any, ...]] = []

    def fake_request(self: ntplib.NTPClient, *args: Any) -> _Stats:
        calls.append(args)
        return _Stats()

    monkeypatch.setattr(ntplib.NTPClient, "request", fake_request)
    assert await query_ntp("ntp.example", timeout=2.0) == 250.0
    assert calls == [("ntp.example", 3, 123, 2.0)]


@pytest.mark.parametrize(
    "error", [ntplib.NTPException("no response"), socket.gaierror("no such host"),
              TimeoutError("timed out")]
)
async def test_query_ntp_failures_are_ntp_errors(
    monkeypatch: pytest.MonkeyPatch, error: Exception
) -> None:
    def fake_request(self: ntplib.NTPClient, *args: Any) -> _Stats:
        raise error

    monkeypatch.setattr(ntplib.NTPClient, "request", fake_request)
    with pytest.raises(NtpError, match=r"ntp\.example"):
        await query_ntp("ntp.example", timeout=2.0)
