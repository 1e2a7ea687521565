"""The records that pass between broker and store: queue options and messages.

A Message's persistent fields are what the store writes; ``owner`` and ``token`` are the
broker's runtime bookkeeping and are never stored.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from meshq.errors import BadRequest
from meshq.states import State

__all__ = ["MAX_PARTITIONS", "ORDERINGS", "Message", "QueueOptions", "id_stamp", "message_id"]

ORDERINGS = ("fair", "fifo")
MAX_PARTITIONS = 256


def finite(value: float) -> bool:
    """math.isfinite that says False (instead of raising) for ints too big for a float."""
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def _number(opts: dict[str, Any], key: str, *, integer: bool, minimum: float) -> Any:
    value = opts[key]
    if value is None:
        return None
    ok_types = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, ok_types) or not finite(value):
        kind = "an integer" if integer else "a number"
        raise BadRequest(f"option {key!r} must be {kind}, not {value!r}")
    if value < minimum:
        raise BadRequest(f"option {key!r} must be >= {minimum}, not {value!r}")
    return value


@dataclass(frozen=True)
class QueueOptions:
    """Options of a queue (SPEC section 2). Times are in seconds."""

    replicas: int = 3
    write_quorum: int | None = None  # commits that confirm a write; None: a majority
    message_ttl: float | None = None
    visibility_timeout: float = 30.0
    max_deliveries: int | None = None
    dead_letter_queue: str | None = None
    max_length: int | None = None
    ordering: str = "fair"
    expires: float | None = None  # deleted once unused this long (AMQP's x-expires)
    # Dead letters through an AMQP exchange (when no dead_letter_queue): its name, and
    # the routing key (None: the message's own).
    dead_letter_exchange: str | None = None
    dead_letter_routing_key: str | None = None
    # Partitions (meshq.broker.partitions): None asks for the node's default when the
    # queue is made; a queue made before partitions existed reads None, and has one.
    partitions: int | None = None

    @property
    def partition_count(self) -> int:
        return self.partitions or 1

    @classmethod
    def from_dict(cls, opts: dict[str, Any]) -> QueueOptions:
        """Validated options; unknown keys and wrong types raise BadRequest."""
        if not isinstance(opts, dict):
            raise BadRequest("options must be a map")
        known = cls.__dataclass_fields__
        unknown = sorted(set(opts) - set(known))
        if unknown:
            raise BadRequest(f"unknown queue option(s): {', '.join(map(str, unknown))}")
        merged = {**asdict(cls()), **opts}
        for key in ("replicas", "write_quorum", "max_deliveries", "max_length",
                    "partitions"):
            _number(merged, key, integer=True, minimum=1)
        if merged["partitions"] is not None and merged["partitions"] > MAX_PARTITIONS:
            raise BadRequest(f"option 'partitions' must be at most {MAX_PARTITIONS}")
        for key in ("message_ttl", "visibility_timeout", "expires"):
            _number(merged, key, integer=False, minimum=0.001)
        if merged["visibility_timeout"] is None:
            raise BadRequest("option 'visibility_timeout' may not be null")
        if merged["replicas"] is None:
            raise BadRequest("option 'replicas' may not be null")
        dlq = merged["dead_letter_queue"]
        if dlq is not None and (not isinstance(dlq, str) or not dlq):
            raise BadRequest("option 'dead_letter_queue' must be a queue name")
        for key in ("dead_letter_exchange", "dead_letter_routing_key"):
            if merged[key] is not None and not isinstance(merged[key], str):
                raise BadRequest(f"option {key!r} must be a string")
        if dlq is not None and merged["dead_letter_exchange"] is not None:
            raise BadRequest("options 'dead_letter_queue' and 'dead_letter_exchange' "
                             "exclude each other")
        if merged["ordering"] not in ORDERINGS:
            raise BadRequest(f"option 'ordering' must be one of {', '.join(ORDERINGS)}")
        for key in ("message_ttl", "visibility_timeout", "expires"):
            if merged[key] is not None:
                merged[key] = float(merged[key])
        return cls(**merged)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def diff(self, other: QueueOptions) -> list[str]:
        """Names of the options that differ (``other`` asking no particular number of
        partitions matches any)."""
        mine, theirs = self.to_dict(), other.to_dict()
        mine["partitions"] = self.partition_count  # (None, on a queue made before: one)
        if theirs["partitions"] is None:
            theirs["partitions"] = mine["partitions"]
        return [key for key in mine if mine[key] != theirs[key]]



def message_id(hlc: int, node: str) -> str:
    """A new message's id: the HLC it was stamped with, then the node that stamped it."""
    return f"{hlc:016x}-{node}"


def id_stamp(mid: str) -> int | None:
    """The HLC a message id was made with (``message_id``); None for an id not made so."""
    try:
        return int(mid[:16], 16)
    except ValueError:
        return None

@dataclass(slots=True, eq=False, weakref_slot=True)
class Message:
    seq: int  # this node's store key
    id: str
    queue: str
    body: bytes
    headers: dict[str, Any]
    hlc: int
    node: str  # id of the node that stamped it; order is (hlc, node)
    state: State = State.READY
    delivery_count: int = 0
    ready_at: float = 0.0  # when a DELAYED message becomes READY
    expires_at: float | None = None
    lease_deadline: float | None = None
    index: int = 0  # its queue partition
    inc: int = 0  # the incarnation of its queue it was sent to
    lease_id: int = 0  # the current lease's id (its receipt), 0 when not leased
    holder: str = ""  # "node/boot" of the leasing consumer's connection ("" when none)
    epoch: int = 0  # progress version: the dispatch epoch of its last change ...
    vn: int = 0  # ... and the changes within that epoch (meshq.cluster.lattice)
    # runtime only
    owner: Any = field(default=None, repr=False)
    token: int = field(default=0, repr=False)
    early: bool = field(default=False, repr=False)  # handed over before its put committed
    # its share counted in its partition's digest sums (0: none; meshq.broker.digests)
    fp: int = field(default=0, repr=False)
