"""Replica ops and range digests (meshq.mesh._rops): which copy of a message wins when two
holders disagree, and digests that differ exactly where the copies do."""

from __future__ import annotations

import pytest

from meshq.broker.queue import Queue
from meshq.mesh._rops import BUCKETS, bucket_of, chunks, digests, item, merged, put_rop
from meshq.model import Message, QueueOptions
from meshq.states import State

R, L, D = int(State.READY), int(State.LEASED), int(State.DELAYED)


@pytest.mark.parametrize(
    ("mine", "theirs", "winner"),
    [
        (["m", R, 1, 0.0, None], ["m", L, 2, 0.0, 50.0], "theirs"),  # more deliveries
        (["m", L, 2, 0.0, 50.0], ["m", R, 1, 0.0, None], "mine"),
        (["m", R, 1, 0.0, None], ["m", L, 1, 0.0, 40.0], "theirs"),  # a lease over none
        (["m", L, 1, 0.0, 40.0], ["m", L, 1, 0.0, 45.0], "theirs"),  # the later deadline
        (["m", D, 1, 9.0, None], ["m", R, 1, 0.0, None], "mine"),  # a tie keeps ours
    ],
)
def test_the_copy_further_along_wins(mine: list, theirs: list, winner: str) -> None:
    assert merged(mine, theirs) is (mine if winner == "mine" else theirs)


def _queue(n: int) -> Queue:
    q = Queue("q", QueueOptions())
    for i in range(n):
        q.add(Message(i + 1, f"id-{i}", "q", b"x", {}, i, "n"))
    return q


def test_equal_copies_have_equal_digests_and_a_change_shows_in_its_range_only() -> None:
    a, b = _queue(200), _queue(200)
    assert digests(a)[0] == digests(b)[0]
    msg = b.messages["id-7"]
    b.set_state(msg, State.LEASED)
    msg.delivery_count, msg.lease_deadline = 1, 30.0
    ours, theirs = digests(a)[0], digests(b)[0]
    assert [i for i in range(BUCKETS) if ours[i] != theirs[i]] == [bucket_of("id-7")]
    assert item(msg) == ["id-7", L, 1, 0.0, 30.0]


def test_a_missing_message_shows_in_its_range() -> None:
    a, b = _queue(50), _queue(50)
    b.remove(b.messages["id-3"])
    ours, theirs = digests(a)[0], digests(b)[0]
    assert [i for i in range(BUCKETS) if ours[i] != theirs[i]] == [bucket_of("id-3")]


def test_repairs_are_cut_into_bounded_chunks() -> None:
    q = Queue("q", QueueOptions())
    big = b"x" * (1024 * 1024)
    for i in range(10):
        q.add(Message(i + 1, f"id-{i}", "q", big, {}, i, "n"))
    parts = chunks([put_rop(m) for m in q.messages.values()])
    assert [len(p) for p in parts] == [4, 4, 2]  # a chunk closes once past 4 MiB
