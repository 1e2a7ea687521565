"""Unit tests for meshq.states: the message state machine, checked exhaustively."""

from __future__ import annotations

import itertools

import pytest

from meshq.states import TERMINAL, TRANSITIONS, Event, IllegalTransition, State, advance

S, E = State, Event
ALL_PAIRS = list(itertools.product(State, Event))


def successors(state: State) -> set[State]:
    return {target for (src, _), target in TRANSITIONS.items() if src is state}


def reachable(start: State) -> set[State]:
    """Every state reachable from ``start`` (including itself)."""
    seen, todo = {start}, [start]
    while todo:
        for nxt in successors(todo.pop()) - seen:
            seen.add(nxt)
            todo.append(nxt)
    return seen


@pytest.mark.parametrize(
    ("state", "event"), ALL_PAIRS, ids=[f"{s.name}-{e.name}" for s, e in ALL_PAIRS]
)
def test_every_state_event_pair(state: State, event: Event) -> None:
    """Allowed pairs go to TRANSITIONS' target; every other pair raises IllegalTransition."""
    if (state, event) in TRANSITIONS:
        assert advance(state, event) is TRANSITIONS[state, event]
    else:
        with pytest.raises(IllegalTransition, match=state.name) as info:
            advance(state, event)
        assert event.value in str(info.value)


def test_transition_table_is_what_we_expect() -> None:
    """The table itself, spelled out, so that any change to it is a deliberate one."""
    assert TRANSITIONS == {
        (S.DELAYED, E.DUE): S.READY,
        (S.DELAYED, E.DEAD_LETTER): S.DEAD_LETTERED,
        (S.DELAYED, E.DROP): S.DROPPED,
        (S.READY, E.LEASE): S.LEASED,
        (S.READY, E.DEAD_LETTER): S.DEAD_LETTERED,
        (S.READY, E.DROP): S.DROPPED,
        (S.LEASED, E.ACK): S.ACKED,
        (S.LEASED, E.REQUEUE): S.READY,
        (S.LEASED, E.REQUEUE_LATER): S.DELAYED,
        (S.LEASED, E.DEAD_LETTER): S.DEAD_LETTERED,
        (S.LEASED, E.DROP): S.DROPPED,
    }


def test_terminal_states() -> None:
    assert {S.ACKED, S.DEAD_LETTERED, S.DROPPED} == TERMINAL


@pytest.mark.parametrize("state", sorted(TERMINAL), ids=lambda s: s.name)
def test_terminal_states_have_no_outgoing_transitions(state: State) -> None:
    assert successors(state) == set()
    for event in Event:
        with pytest.raises(IllegalTransition):
            advance(state, event)


@pytest.mark.parametrize("state", sorted(set(State) - TERMINAL), ids=lambda s: s.name)
def test_non_terminal_states_can_reach_a_terminal_state(state: State) -> None:
    assert successors(state), f"{state.name} is a dead end"
    assert reachable(state) & TERMINAL


@pytest.mark.parametrize("state", sorted(set(State) - TERMINAL), ids=lambda s: s.name)
def test_non_terminal_states_can_always_be_dropped_or_dead_lettered(state: State) -> None:
    """Purge and queue deletion (DROP) and the DLQ (DEAD_LETTER) apply in every live state."""
    assert advance(state, E.DROP) is S.DROPPED
    assert advance(state, E.DEAD_LETTER) is S.DEAD_LETTERED


def test_every_state_is_reachable_from_a_new_message() -> None:
    """A new message starts READY or DELAYED (send with delay); all states are reachable."""
    assert reachable(S.READY) | reachable(S.DELAYED) == set(State)


def test_targets_and_sources_are_states() -> None:
    for (src, event), target in TRANSITIONS.items():
        assert isinstance(src, State)
        assert isinstance(event, Event)
        assert isinstance(target, State)


LIFECYCLES = {
    "ready-leased-acked": (S.READY, [(E.LEASE, S.LEASED), (E.ACK, S.ACKED)]),
    "leased-requeue-ready": (S.LEASED, [(E.REQUEUE, S.READY)]),
    "leased-delayed-ready": (S.LEASED, [(E.REQUEUE_LATER, S.DELAYED), (E.DUE, S.READY)]),
    "ready-dead-lettered": (S.READY, [(E.DEAD_LETTER, S.DEAD_LETTERED)]),
    "delayed-dropped": (S.DELAYED, [(E.DROP, S.DROPPED)]),
    "redelivered-then-acked": (
        S.READY,
        [
            (E.LEASE, S.LEASED),
            (E.REQUEUE, S.READY),
            (E.LEASE, S.LEASED),
            (E.REQUEUE_LATER, S.DELAYED),
            (E.DUE, S.READY),
            (E.LEASE, S.LEASED),
            (E.ACK, S.ACKED),
        ],
    ),
}


@pytest.mark.parametrize(("start", "path"), LIFECYCLES.values(), ids=LIFECYCLES.keys())
def test_lifecycle_paths(start: State, path: list[tuple[Event, State]]) -> None:
    state = start
    for event, expected in path:
        state = advance(state, event)
        assert state is expected, f"{event.name} led to {state.name}, not {expected.name}"


@pytest.mark.parametrize(
    ("state", "event"),
    [
        (S.READY, E.ACK),  # ack without a lease
        (S.DELAYED, E.LEASE),  # lease before it is due
        (S.READY, E.DUE),
        (S.LEASED, E.LEASE),  # double lease
        (S.ACKED, E.REQUEUE),  # requeue after ack
        (S.DEAD_LETTERED, E.DUE),
        (S.DROPPED, E.DROP),
    ],
    ids=lambda x: x.name,
)
def test_notable_illegal_transitions(state: State, event: Event) -> None:
    with pytest.raises(IllegalTransition):
        advance(state, event)
