"""Local first (meshq.server.steal): the capacities a subscription's parts get, as a table,
and the bookkeeping of what its parts elsewhere may still hold."""

from __future__ import annotations

import pytest

from meshq.server.steal import Steal, capacities

# prefetch, partitions, local, busy (local with ready messages), held by the parts here,
# what remote parts may hold, expected capacity per partition
CASES = [
    # no part here: each its share, as without local first
    (100, 6, [], [], {}, {}, [17, 17, 17, 17, 16, 16]),
    # local first: the parts here share the prefetch, the others are paused
    (100, 6, [1, 4], [1, 4], {}, {}, [0, 50, 0, 0, 50, 0]),
    (101, 6, [1, 4], [1, 4], {}, {}, [0, 51, 0, 0, 50, 0]),
    # ... less what paused parts elsewhere may still hold
    (100, 6, [1, 4], [1, 4], {1: 3}, {0: 17, 2: 5}, [0, 39, 0, 0, 39, 0]),
    # ... and a part holding more than its share keeps that, and takes nothing
    (100, 6, [1, 4], [1, 4], {1: 70, 4: 10}, {}, [0, 70, 0, 0, 30, 0]),
    # ... at least one each, whatever the others hold
    (6, 6, [0, 1], [0, 1], {}, {2: 1, 3: 1, 4: 1, 5: 1}, [1, 1, 0, 0, 0, 0]),
    (6, 6, [0, 1], [0, 1], {}, {2: 6}, [1, 1, 0, 0, 0, 0]),
    # a part here whose partition has nothing ready: what it holds, at least one
    (100, 6, [1, 4], [4], {}, {}, [0, 1, 0, 0, 99, 0]),
    (100, 6, [1, 4], [4], {1: 30, 4: 20}, {}, [0, 30, 0, 0, 70, 0]),
    # (a partition that is busy but not here counts as not busy)
    (100, 6, [1, 4], [0], {}, {}, [17, 17, 17, 17, 16, 16]),
    # stealing: each part here its share (or what it holds), the others share the rest
    (100, 6, [1, 4], [], {}, {}, [17, 17, 17, 17, 16, 16]),
    (100, 6, [1, 4], [], {1: 40, 4: 10}, {}, [11, 40, 11, 11, 16, 11]),
    # ... each only what is left once what the ones before it may hold is counted
    (100, 6, [1, 4], [], {1: 40, 4: 50}, {}, [3, 40, 3, 2, 50, 2]),
    (100, 6, [1, 4], [], {}, {0: 60}, [17, 17, 7, 0, 16, 0]),
    (12, 6, [0, 1], [], {}, {}, [2, 2, 2, 2, 2, 2]),
]


@pytest.mark.parametrize(("prefetch", "partitions", "local", "busy", "held", "holds",
                          "expected"), CASES)
def test_capacities(prefetch: int, partitions: int, local: list[int], busy: list[int],
                    held: dict[int, int], holds: dict[int, int], expected: list[int]) -> None:
    caps = capacities(prefetch, partitions, local, busy, held, holds)
    assert [caps[i] for i in range(partitions)] == expected
    # Never more than the prefetch, counting what parts may hold beyond their capacity
    # (or one for each part here, which the prefetch covers when prefetch >= P).
    total = sum(max(caps[i], held.get(i, 0), holds.get(i, 0)) for i in range(partitions))
    assert total <= max(prefetch, sum(held.values()) + sum(holds.values()) + len(local))


def test_a_part_paused_elsewhere_counts_what_it_held_until_the_client_settles_it() -> None:
    steal = Steal(100, 6)
    steal.placed(2, 17)
    assert steal.holds() == {2: 17}
    steal.asking(2, 0)  # paused: until it answers, it may hold what it could before
    assert steal.holds() == {2: 17}
    steal.answered(2, 0, 9)  # it held nine when it took capacity 0
    assert steal.holds() == {2: 9}
    steal.settled(2, 4)  # the client acked four of them: those are free
    assert steal.holds() == {2: 5}
    steal.settled(2, 10)
    assert steal.holds() == {2: 0}


def test_a_part_given_capacity_again_may_hold_that_much() -> None:
    steal = Steal(100, 6)
    steal.placed(3, 0)
    steal.asking(3, 20)
    assert steal.holds() == {3: 20}
    steal.answered(3, 20, 0)
    assert steal.holds() == {3: 20}
    steal.settled(3, 5)  # (it may take as many again: its capacity is what counts)
    assert steal.holds() == {3: 20}
    steal.asking(3, 0)
    steal.answered(3, 10, 7)  # an older answer: the newer ask stays counted
    assert steal.holds() == {3: 20}
    steal.gone(3)  # placed again: nothing counted there
    assert steal.holds() == {}


def test_a_part_whose_node_takes_no_capacity_counts_its_share_and_is_asked_no_more() -> None:
    """An older node gives a part its share whatever it is asked (its consume answer does
    not echo the capacity, its _flow is refused): counted at that, until placed again."""
    steal = Steal(100, 6)
    steal.placed(5, None)
    assert steal.holds() == {5: 16} and steal.refused == {5}
    steal.placed(4, 0)
    steal.asking(4, 0)
    steal.refuse(4)  # its _flow was refused
    assert steal.holds() == {4: 16, 5: 16} and steal.refused == {4, 5}
    assert capacities(100, 6, [0, 1], [0, 1], {}, steal.holds()) == {
        0: 34, 1: 34, 2: 0, 3: 0, 4: 0, 5: 0}
    steal.gone(5)
    assert steal.refused == {4}
