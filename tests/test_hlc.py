"""Unit tests for meshq.hlc: table-driven steps in the style of CockroachDB's TestHLCClock."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meshq.hlc import HLC, LOGICAL_BITS, ClockOffsetError, pack, physical_ms, unpack

MAX_LOGICAL = (1 << LOGICAL_BITS) - 1


@dataclass(frozen=True)
class Step:
    """One event at wall time ``wall``: ``now()`` when ``remote`` is None, else ``receive``."""

    wall: int
    remote: int | None
    expected: int | type[Exception]


def now(wall: int, expected: int | type[Exception]) -> Step:
    return Step(wall, None, expected)


def recv(wall: int, remote: int, expected: int | type[Exception]) -> Step:
    return Step(wall, remote, expected)


def run_steps(clock: HLC, steps: list[Step]) -> None:
    """Run ``steps`` in order on ``clock``, checking each result (or error) and ``last``."""
    for i, step in enumerate(steps):
        before = clock.last
        if isinstance(step.expected, type):
            assert step.remote is not None, "only receive can fail"
            with pytest.raises(step.expected):
                clock.receive(step.remote, step.wall)
            assert clock.last == before, f"step {i}: a rejected receive moved the clock"
            continue
        remote = step.remote
        got = clock.now(step.wall) if remote is None else clock.receive(remote, step.wall)
        assert got == step.expected, f"step {i}: {unpack(got)} != {unpack(step.expected)}"
        assert got > before, f"step {i}: timestamp did not increase"
        assert clock.last == got


BASIC = [
    now(5, pack(5, 0)),
    now(10, pack(10, 0)),  # wall clock advances: logical resets
    now(10, pack(10, 1)),  # wall clock stands still: logical increments
    now(10, pack(10, 2)),
    now(9, pack(10, 3)),  # wall clock goes backwards: still increasing
    now(3, pack(10, 4)),
    recv(9, pack(10, 10), pack(10, 11)),  # remote ahead of last on the logical part
    recv(10, pack(50, 3), pack(50, 4)),  # remote 40 ms ahead (within 100): pulls us forward
    now(10, pack(50, 5)),  # stays pulled forward while wall catches up
    recv(10, pack(111, 0), ClockOffsetError),  # 101 ms ahead: rejected
    recv(10, pack(5000, 0), ClockOffsetError),
    now(10, pack(50, 6)),  # the rejected receives left `last` alone
    recv(10, pack(110, 0), pack(110, 1)),  # exactly max_offset ahead is allowed
    recv(200, pack(20, 0), pack(200, 0)),  # remote behind: wall wins
    recv(200, pack(200, 7), pack(200, 8)),  # same wall, remote logical ahead
    recv(200, pack(150, 9), pack(200, 9)),  # remote behind: just our own logical + 1
    now(300, pack(300, 0)),
]

OVERFLOW = [
    now(10, pack(10, MAX_LOGICAL)),  # last logical value of wall 10
    now(10, pack(11, 0)),  # carries into the wall part
    now(10, pack(11, 1)),
    now(11, pack(11, 2)),  # wall catches up: logical keeps counting
    now(12, pack(12, 0)),
    recv(12, pack(12, MAX_LOGICAL), pack(13, 0)),  # a remote at the limit also carries
    now(12, pack(13, 1)),
]


@pytest.mark.parametrize(
    ("clock", "steps"),
    [
        pytest.param(HLC(max_offset_ms=100), BASIC, id="basic"),
        pytest.param(HLC(last=pack(10, MAX_LOGICAL - 1), max_offset_ms=100), OVERFLOW,
                     id="logical-overflow"),
    ],
)
def test_hlc_clock(clock: HLC, steps: list[Step]) -> None:
    run_steps(clock, steps)


def test_restore_beats_a_wall_clock_that_is_behind() -> None:
    """After restore(high_water) every timestamp is above high_water, even with wall << it."""
    clock = HLC(max_offset_ms=100)
    high_water = pack(1_000, 5)
    clock.restore(high_water)
    run_steps(clock, [
        now(10, pack(1_000, 6)),
        recv(10, pack(20, 0), pack(1_000, 7)),
        now(999, pack(1_000, 8)),
        now(1_001, pack(1_001, 0)),
    ])


def test_restore_never_moves_the_clock_back() -> None:
    clock = HLC()
    clock.now(5_000)
    last = clock.last
    clock.restore(pack(10, 0))
    assert clock.last == last
    assert clock.now(10) == last + 1


def test_restore_at_logical_limit_carries() -> None:
    clock = HLC()
    clock.restore(pack(7, MAX_LOGICAL))
    assert clock.now(0) == pack(8, 0)


@pytest.mark.parametrize(
    ("wall", "logical"),
    [(0, 0), (0, MAX_LOGICAL), (1, 0), (1_700_000_000_000, 42), (2**47 - 1, MAX_LOGICAL)],
)
def test_pack_unpack_round_trip(wall: int, logical: int) -> None:
    ts = pack(wall, logical)
    assert unpack(ts) == (wall, logical)
    assert physical_ms(ts) == wall


def test_pack_defaults_logical_to_zero() -> None:
    assert pack(123) == pack(123, 0) == 123 << LOGICAL_BITS


@pytest.mark.parametrize("logical", [-1, MAX_LOGICAL + 1, 2**32])
def test_pack_rejects_logical_out_of_range(logical: int) -> None:
    with pytest.raises(ValueError, match="logical"):
        pack(1, logical)


@given(
    a=st.tuples(st.integers(0, 2**47), st.integers(0, MAX_LOGICAL)),
    b=st.tuples(st.integers(0, 2**47), st.integers(0, MAX_LOGICAL)),
)
def test_pack_preserves_order(a: tuple[int, int], b: tuple[int, int]) -> None:
    """Packed timestamps compare like their (wall, logical) pairs."""
    assert unpack(pack(*a)) == a
    assert (pack(*a) < pack(*b)) == (a < b)


_walls = st.integers(0, 2_000)
_remotes = st.builds(pack, st.integers(0, 2_200), st.sampled_from([0, 1, 2, MAX_LOGICAL]))
_ops = st.one_of(
    st.tuples(_walls, st.just("now"), st.just(0)),
    st.tuples(_walls, st.just("receive"), _remotes),
    st.tuples(_walls, st.just("restore"), _remotes),
)


@given(ops=st.lists(_ops, max_size=60), max_offset=st.integers(0, 300))
def test_timestamps_strictly_increase(ops: list[tuple[int, str, int]], max_offset: int) -> None:
    """Whatever the wall clock and peers do, handed-out timestamps strictly increase,
    stay above every accepted remote and restored high water, and never lag the wall."""
    clock = HLC(max_offset_ms=max_offset)
    floor = -1  # every later timestamp must be above this
    for wall, op, arg in ops:
        if op == "restore":
            clock.restore(arg)
            floor = max(floor, arg)
            continue
        if op == "now":
            ts = clock.now(wall)
        else:
            before = clock.last
            try:
                ts = clock.receive(arg, wall)
            except ClockOffsetError:
                assert physical_ms(arg) - wall > max_offset
                assert clock.last == before
                continue
            assert ts > arg
        assert ts > floor
        assert physical_ms(ts) >= wall
        assert clock.last == ts
        floor = ts
