"""The quorum gate (meshq.cluster.gate), sans-IO: batches complete in order once durable
here and on W replicas of each partition; a failed or silent replica is replaced by a
stand-in; a fenced partition fails its batch and is reported."""

from __future__ import annotations

from meshq.cluster.gate import DEADLINE, SPARE_AFTER, Complete, Fenced, Gate, Need, Ship

Q = ("q", 0)
D = ("dlq", 0)


def completes(fx) -> list[tuple[int, str | None]]:
    return [(e.batch, e.failure) for e in fx if isinstance(e, Complete)]


def test_complete_after_local_commit_and_one_ack_in_batch_order() -> None:
    g = Gate()
    g.shipped(1, {Q: Need(1, ("b", "c"))}, 0.0)
    g.shipped(2, {Q: Need(1, ("b", "c"))}, 0.0)
    assert g.answered(2, "c", {Q}, {}) == []
    assert g.local_done(2, None) == []  # batch 1 is older and not done
    assert g.local_done(1, None) == []
    assert completes(g.answered(1, "b", {Q}, {})) == [(1, None), (2, None)]
    assert len(g) == 0


def test_no_need_completes_at_local_commit_and_a_local_failure_fails() -> None:
    g = Gate()
    g.shipped(1, {}, 0.0)
    g.shipped(2, {Q: Need(0, ())}, 0.0)
    assert completes(g.local_done(1, OSError("disk"))) == [(1, "local")]
    assert completes(g.local_done(2, None)) == [(2, None)]


def test_every_partition_needs_its_own_quorum() -> None:
    g = Gate()
    g.shipped(1, {Q: Need(1, ("b",)), D: Need(1, ("c",))}, 0.0)
    g.local_done(1, None)
    assert g.answered(1, "b", {Q}, {}) == []
    assert completes(g.answered(1, "c", {D}, {})) == [(1, None)]


def test_a_failed_replica_is_replaced_by_a_stand_in() -> None:
    g = Gate()
    g.shipped(1, {Q: Need(2, ("b", "c"), spares=("d", "e"))}, 0.0)
    g.local_done(1, None)
    assert g.failed(1, "b") == [Ship(1, "d", (Q,))]
    assert g.answered(1, "c", {Q}, {}) == []
    # d answers without having made it durable (a record it lacks): try e
    assert g.answered(1, "d", set(), {}) == [Ship(1, "e", (Q,))]
    assert completes(g.answered(1, "e", {Q}, {})) == [(1, None)]


def test_too_few_replicas_fails_with_quorum() -> None:
    g = Gate()
    g.shipped(1, {Q: Need(2, ("b",))}, 0.0)
    assert completes(g.local_done(1, None)) == [(1, "quorum")]
    g.shipped(2, {Q: Need(1, ("b",))}, 0.0)
    g.local_done(2, None)
    assert completes(g.failed(2, "b")) == [(2, "quorum")]
    assert g.failed_quorums == 2


def test_a_fenced_partition_fails_its_batch_and_is_reported() -> None:
    g = Gate()
    g.shipped(1, {Q: Need(1, ("b", "c"))}, 0.0)
    g.local_done(1, None)
    fx = g.answered(1, "b", set(), {Q: 42})
    assert Fenced(Q, 42) in fx
    assert completes(fx) == [(1, "fenced")]
    assert g.answered(1, "c", {Q}, {}) == []  # late answers of a completed batch: ignored


def test_a_silent_replica_gets_a_stand_in_then_the_deadline_fails_it() -> None:
    g = Gate()
    g.shipped(1, {Q: Need(1, ("b",), spares=("c",))}, 0.0)
    g.local_done(1, None)
    assert g.next_deadline() == SPARE_AFTER
    assert g.tick(SPARE_AFTER - 0.1) == []
    assert g.tick(SPARE_AFTER) == [Ship(1, "c", (Q,))]
    assert g.next_deadline() == DEADLINE
    assert completes(g.tick(DEADLINE)) == [(1, "quorum")]


def test_the_stand_in_confirms_when_the_replica_stays_silent() -> None:
    g = Gate()
    g.shipped(1, {Q: Need(1, ("b",), spares=("c",))}, 0.0)
    g.local_done(1, None)
    g.tick(SPARE_AFTER)
    assert completes(g.answered(1, "c", {Q}, {})) == [(1, None)]
    assert g.answered(1, "b", {Q}, {}) == []


def test_an_answer_counts_once_per_replica() -> None:
    g = Gate()
    g.shipped(1, {Q: Need(2, ("b", "c"))}, 0.0)
    g.local_done(1, None)
    g.answered(1, "b", {Q}, {})
    assert g.answered(1, "b", {Q}, {}) == []
    assert completes(g.answered(1, "c", {Q}, {})) == [(1, None)]


def test_abandon_completes_everything_with_an_unknown_outcome() -> None:
    g = Gate()
    g.shipped(1, {Q: Need(1, ("b",))}, 0.0)
    g.shipped(2, {}, 0.0)
    assert completes(g.abandon()) == [(1, "stopped"), (2, "stopped")]
    assert len(g) == 0


def test_a_batch_waiting_only_for_its_local_commit_has_no_timer() -> None:
    """Regression: a deadline in the past made the driver's timer spin (and, in virtual
    time, stopped the clock)."""
    g = Gate()
    g.shipped(1, {Q: Need(1, ("b",))}, 0.0)
    assert g.next_deadline() == DEADLINE
    assert g.tick(DEADLINE) == []  # failed, but not complete: no local commit yet
    assert g.next_deadline() == float("inf")
    assert completes(g.local_done(1, None)) == [(1, "quorum")]


def test_a_deadline_that_floats_round_is_still_due() -> None:
    """Regression: (x + 2.0) - x < 2.0 for some floats x, so "age >= 2" missed a deadline
    that next_deadline() said was due, and the driver's timer spun."""
    shipped = 2.9574963966907064
    g = Gate()
    g.shipped(1, {Q: Need(1, ("b",), spares=("c",))}, shipped)
    g.local_done(1, None)
    at = g.next_deadline()
    assert at - shipped < SPARE_AFTER  # the rounding that bit
    assert g.tick(at) == [Ship(1, "c", (Q,))]
    assert g.next_deadline() > at
