"""The merge rules (meshq.cluster.lattice): every join is commutative, associative and
idempotent, a tombstone absorbs, progress never moves backwards, and a queue's drop
absorbs its incarnation's messages but not a later one's."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from meshq.cluster.changes import Decl, Drop, Progress, Put, Record, Step, Tally, Tomb
from meshq.cluster.lattice import (
    CatalogEntry,
    PartState,
    catalog_digest,
    join_catalog,
    join_dedup,
    join_progress,
    join_record,
    progress_key,
)

IDS = ["m1", "m2", "m3", "m4"]

progress = st.builds(
    Progress,
    state=st.sampled_from([0, 1, 2]),
    count=st.integers(0, 3),
    ready_at=st.sampled_from([0.0, 5.0]),
    deadline=st.sampled_from([None, 10.0, 20.0]),
    lease=st.integers(0, 2),
    epoch=st.integers(0, 3),
    vn=st.integers(0, 3),
    holder=st.sampled_from(["", "a/1"]),
)


def record(mid: str, prog: Progress, body: bytes = b"x") -> Record:
    return Record(mid, "q", 0, 1, 100, "n1", body, None, None, prog)


records = st.builds(record, st.sampled_from(IDS), progress, st.sampled_from([b"x", b"y"]))
tombs = st.builds(Tomb, st.just("q"), st.just(0), st.sampled_from(IDS),
                  st.sampled_from([1.0, 2.0]))
items = st.one_of(records, tombs)
# join_record joins two versions of one message id
one_id = st.one_of(st.builds(record, st.just("m1"), progress, st.sampled_from([b"x", b"y"])),
                   st.builds(Tomb, st.just("q"), st.just(0), st.just("m1"),
                             st.sampled_from([1.0, 2.0])))


@st.composite
def states(draw: st.DrawFn) -> PartState:
    s = PartState()
    for item in draw(st.lists(items, max_size=6)):
        if isinstance(item, Record):
            s.apply(Put(item))
        else:
            s.apply(item)
    for node in draw(st.lists(st.sampled_from(["a", "b"]), max_size=2)):
        s.apply(Tally("q", 0, node, draw(st.integers(0, 3)), draw(st.integers(0, 3)),
                      draw(st.integers(0, 3))))
    s.promised = draw(st.integers(0, 5))
    return s


@given(one_id, one_id, one_id)
def test_join_record_is_a_semilattice(a, b, c) -> None:
    assert join_record(a, a) == a
    assert join_record(a, b) == join_record(b, a)
    assert join_record(join_record(a, b), c) == join_record(a, join_record(b, c))


@given(one_id, one_id)
def test_join_is_an_upper_bound(a, b) -> None:
    """Joining never loses a tombstone and never moves progress backwards."""
    j = join_record(a, b)
    if isinstance(a, Tomb) or isinstance(b, Tomb):
        assert isinstance(j, Tomb)
    else:
        assert isinstance(j, Record)
        assert progress_key(j.progress) >= progress_key(a.progress)
        assert progress_key(j.progress) >= progress_key(b.progress)


@given(progress, progress)
def test_progress_order_is_total(a, b) -> None:
    if a != b:
        assert progress_key(a) != progress_key(b)
    assert join_progress(a, b) in (a, b)


def test_a_later_epoch_wins_over_more_changes_in_an_earlier_one() -> None:
    old = Progress(2, 5, 0.0, 30.0, 7, epoch=1, vn=9, holder="a/1")
    new = Progress(0, 4, 0.0, None, 0, epoch=2, vn=1)
    assert join_progress(old, new) is new


@given(states(), states(), states())
@settings(max_examples=300)
def test_partition_states_form_a_semilattice(a, b, c) -> None:
    assert a.join(a).key() == a.key()
    assert a.join(b).key() == b.join(a).key()
    assert a.join(b).join(c).key() == a.join(b.join(c)).key()


@given(states(), st.lists(items, max_size=5))
def test_applying_changes_equals_joining_their_state(s, changes) -> None:
    """Merging change by change (as a replica does) and joining whole states (as
    anti-entropy does) give the same result."""
    delta = PartState()
    applied = PartState(dict(s.records), dict(s.tally), s.promised)
    for item in changes:
        change = Put(item) if isinstance(item, Record) else item
        delta.apply(change)
        applied.apply(change)
    assert applied.key() == s.join(delta).key()


def test_a_step_for_an_unknown_record_is_not_invented() -> None:
    s = PartState()
    s.apply(Step("q", 0, "m1", Progress(2, 1, 0.0, 5.0, 1, 1, 1)))
    assert s.records == {}


catalog_changes = st.one_of(
    st.builds(Decl, st.just("q"), st.integers(1, 5),
              st.sampled_from([{}, {"replicas": 2}])),
    st.builds(Drop, st.just("q"), st.integers(1, 5), st.sampled_from([1.0, 2.0])),
)


@given(st.lists(catalog_changes, max_size=6), st.randoms())
def test_catalog_join_is_order_independent(changes, rnd) -> None:
    a = CatalogEntry("q")
    for c in changes:
        a = join_catalog(a, c)
    shuffled = list(changes)
    rnd.shuffle(shuffled)
    b = CatalogEntry("q")
    for c in shuffled + shuffled[:2]:  # and idempotent
        b = join_catalog(b, c)
    assert a == b
    assert catalog_digest([a]) == catalog_digest([b])


def test_a_drop_absorbs_its_incarnation_and_not_a_redeclared_one() -> None:
    e = join_catalog(CatalogEntry("q"), Decl("q", 10, {}))
    assert e.live and not e.absorbs(11)
    dropped = join_catalog(e, Drop("q", 10, 1.0))
    assert not dropped.live and dropped.absorbs(10) and dropped.absorbs(3)
    # The replica that was down comes back with the old declaration: it stays deleted.
    assert join_catalog(dropped, Decl("q", 10, {})) == dropped
    again = join_catalog(dropped, Decl("q", 12, {"replicas": 2}))
    assert again.live and again.absorbs(10) and not again.absorbs(12)
    assert join_catalog(again, e) == again


def test_dedup_entries_join_to_the_later_expiry() -> None:
    assert join_dedup(None, ("m1", 5.0)) == ("m1", 5.0)
    assert join_dedup(("m1", 5.0), ("m2", 3.0)) == ("m1", 5.0)
    assert join_dedup(("m2", 3.0), ("m1", 5.0)) == ("m1", 5.0)
