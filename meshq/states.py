"""Message states and the only transitions between them, as data (h11-style).

A message is in exactly one state; ``advance`` is the single way to change it and raises
IllegalTransition for any pair not in TRANSITIONS. ACKED, DEAD_LETTERED and DROPPED are
terminal: the message leaves its queue.
"""

from __future__ import annotations

import enum

__all__ = ["TERMINAL", "TRANSITIONS", "Event", "IllegalTransition", "State", "advance"]


class State(enum.IntEnum):
    READY = 0
    DELAYED = 1
    LEASED = 2
    ACKED = 3
    DEAD_LETTERED = 4
    DROPPED = 5


class Event(enum.Enum):
    DUE = "due"                  # a delay (send delay or nack delay) has passed
    LEASE = "lease"              # granted to a consumer
    ACK = "ack"
    REQUEUE = "requeue"          # nack, lease deadline, consumer gone: back to ready
    REQUEUE_LATER = "requeue_later"  # nack with a delay
    DEAD_LETTER = "dead_letter"  # reject, max_deliveries, TTL, overflow: to the DLQ
    DROP = "drop"                # purge, queue deleted, or dead-lettering with no DLQ


S, E = State, Event
TRANSITIONS: dict[tuple[State, Event], State] = {
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
del S, E

TERMINAL = frozenset({State.ACKED, State.DEAD_LETTERED, State.DROPPED})


class IllegalTransition(RuntimeError):
    pass


# The same table by position, for the hot path: hashing an enum runs Python code, indexing
# a list by an IntEnum or a plain int attribute does not. None marks an illegal pair.
for _i, _event in enumerate(Event):
    _event.index = _i  # type: ignore[attr-defined]
del _i, _event
_FAST: list[list[State | None]] = [[TRANSITIONS.get((state, event)) for event in Event]
                                   for state in State]


def advance(state: State, event: Event) -> State:
    """The state after ``event``; raises IllegalTransition when the event is not allowed."""
    new = _FAST[state][event.index]  # type: ignore[attr-defined]
    if new is None:
        raise IllegalTransition(f"{event.value} is not allowed in state {state.name}")
    return new
