"""What both clients share: request shapes, deliveries, receipts, dedup ids, the retry
policy, and turning error frames into errors.

Pure: no sockets and no clock here (callers pass ``now``), so the blocking and the trio
client cannot drift apart. State: the receipt book (message id -> latest receipt, bounded)
and the dedup-id counter. Never: a retried send without the dedup ids of its first try,
a request retried that could be applied twice.
"""

from __future__ import annotations

import itertools
import uuid
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from meshq.errors import MeshqError, PreconditionFailed, ProtocolError, Timeout, Unavailable
from meshq.errors import error_from_code as _error_from_code
from meshq.protocol import RETRY_DEDUP

__all__ = [
    "DEFAULT_RETRY_FOR",
    "MAX_RECEIPTS",
    "RECEIPT_SEP",
    "Backoff",
    "ConnectionLost",
    "DedupIds",
    "Delivery",
    "Receipts",
    "Retry",
    "budget",
    "check_failed",
    "error_of",
    "lost_error",
    "message_fields",
    "message_id",
    "result_of",
    "retryable",
    "settled",
]

RECEIPT_SEP = "~"  # a receipt is "<message id>~<lease id in hex>[~<partition>]"
MAX_RECEIPTS = 100_000  # receipts remembered per client; the oldest go first
DEFAULT_RETRY_FOR = 30.0  # seconds, when the client has no timeout either
FIRST_BACKOFF = 0.02
MAX_BACKOFF = 0.5


@dataclass(frozen=True)
class Delivery:
    """One message handed to a consumer. Settle it (ack, nack, extend) with the Delivery
    itself or its ``receipt``, from any connection while the lease runs; a bare ``id``
    works only on the connection that received it.

    ``received_at``: when it reached this client, on this client's clock
    (``trio.current_time()`` under AsyncClient, ``time.monotonic()`` under Client).
    ``lease_deadline``: when the lease ends, on the same clock, reckoned from the time
    left that the daemon stated; None when it did not. After it the message may be
    delivered to another consumer, so subscriptions skip deliveries that waited past it
    unread."""

    id: str
    queue: str
    body: bytes
    headers: dict[str, Any] = field(default_factory=dict)
    hlc: int = 0
    delivery_count: int = 1
    redelivered: bool = False
    consumer: str | None = None
    receipt: str | None = None
    received_at: float | None = None
    lease_deadline: float | None = None

    @classmethod
    def from_wire(cls, d: dict[str, Any], now: float, consumer: str | None = None,
                  ) -> Delivery:
        """Parse a delivery that arrived at ``now`` (this client's clock)."""
        try:
            receipt = d.get("receipt")
            left = d.get("lease_left")
            return cls(d["id"], d["queue"], d["body"], d.get("headers") or {}, d["hlc"],
                       d["delivery_count"], d["redelivered"], consumer,
                       receipt if isinstance(receipt, str) else None, now,
                       now + left if isinstance(left, int | float) else None)
        except (KeyError, TypeError, AttributeError) as exc:
            raise ProtocolError(f"malformed delivery from the daemon: {exc}") from None

    def text(self) -> str:
        return self.body.decode()

    def lapsed(self, now: float) -> bool:
        """Whether its lease ended by ``now`` (this client's clock)."""
        return self.lease_deadline is not None and self.lease_deadline <= now


def message_id(item: str) -> str:
    """The message id of an id or a receipt."""
    return item.partition(RECEIPT_SEP)[0]


class Receipts:
    """Message id -> the receipt of its latest delivery to this client, at most ``limit``
    of them (the oldest dropped first). Lets a caller settle by id while the request
    carries the receipt, which any connection (and any node) accepts."""

    def __init__(self, limit: int = MAX_RECEIPTS) -> None:
        self.limit = limit
        self._by_id: OrderedDict[str, str] = OrderedDict()

    def __len__(self) -> int:
        return len(self._by_id)

    def learn(self, d: Delivery) -> None:
        if d.receipt is None:
            return
        self._by_id.pop(d.id, None)
        self._by_id[d.id] = d.receipt
        while len(self._by_id) > self.limit:
            self._by_id.popitem(last=False)

    def item(self, x: Delivery | str) -> str:
        """What to send for ``x``: a Delivery's own receipt, a receipt as given, else the
        remembered receipt of a message id, else the bare id."""
        if isinstance(x, Delivery):
            return x.receipt or self._by_id.get(x.id, x.id)
        if not isinstance(x, str):
            raise TypeError(f"expected a Delivery, a message id or a receipt, not {x!r}")
        if RECEIPT_SEP in x:
            return x
        return self._by_id.get(x, x)

    def items(self, xs: Iterable[Delivery | str]) -> list[str]:
        if isinstance(xs, str | Delivery):
            raise TypeError("expected a list of deliveries, message ids or receipts")
        return [self.item(x) for x in xs]

    def forget(self, sent: Iterable[str]) -> None:
        """Drop the entries these receipts came from (a later delivery's stays)."""
        for item in sent:
            mid = message_id(item)
            if self._by_id.get(mid) == item:
                del self._by_id[mid]


class DedupIds:
    """Dedup ids for the messages a caller gave none: ``retry:``, a random per-client
    prefix and a counter, so a send repeated after a failure cannot create a second
    message. (``retry:`` tells a node of a partitioned queue that the id only guards
    retries, which come through it: it may keep the message on a partition it dispatches
    itself, meshq.broker.partitions.)"""

    def __init__(self, prefix: str | None = None) -> None:
        self.prefix = prefix if prefix is not None else uuid.uuid4().hex
        self._n = itertools.count(1)

    def fill(self, m: dict[str, Any]) -> dict[str, Any]:
        if m.get("dedup_id") is None:
            m["dedup_id"] = f"{RETRY_DEDUP}{self.prefix}-{next(self._n)}"
        return m


def message_fields(body: bytes | str, headers: dict[str, Any] | None = None,
                   ttl: float | None = None, delay: float | None = None,
                   dedup_id: str | None = None,
                   partition_key: str | None = None) -> dict[str, Any]:
    """One message of a ``send`` request, leaving out what is not set."""
    m: dict[str, Any] = {"body": body.encode() if isinstance(body, str) else body}
    if headers:
        m["headers"] = headers
    if ttl is not None:
        m["ttl"] = ttl
    if delay:
        m["delay"] = delay
    if dedup_id is not None:
        m["dedup_id"] = dedup_id
    if partition_key is not None:
        m["partition_key"] = partition_key
    return m


# -- errors ---------------------------------------------------------------------------


class ConnectionLost(Timeout):
    """The connection broke after the request was written: the outcome is unknown."""


def error_of(frame: dict[str, Any]) -> MeshqError | None:
    """The error a frame carries, if any."""
    err = frame.get("error")
    if err is None:
        return None
    if not isinstance(err, dict):
        return ProtocolError("malformed error from the daemon")
    return _error_from_code(str(err.get("code")), str(err.get("message", "")))


def result_of(frame: dict[str, Any]) -> dict[str, Any]:
    """The result map of a response frame, or the error it carries, raised."""
    err = error_of(frame)
    if err is not None:
        raise err
    result = frame.get("result")
    if not isinstance(result, dict):
        raise ProtocolError("response without a result")
    return result


def lost_error(op: str, why: str, farewell: dict[str, Any] | None, *,
               sent: bool) -> MeshqError:
    """The error for a request the connection left unanswered: the daemon's farewell when
    it said why it closed (e.g. UNAVAILABLE "too many connections": nothing it sent was
    run); else ConnectionLost when the request was written (outcome unknown), or
    Unavailable when it never was (nothing was done)."""
    if farewell is not None:
        err = error_of(farewell)
        if err is not None:
            return err
    if sent:
        return ConnectionLost(f"{op}: {why}; the outcome is unknown")
    return Unavailable(f"{op}: {why} before the request was sent")


# -- retries --------------------------------------------------------------------------


class Retry:
    """Which failures an op may be repeated after.

    - SEND: a send whose every message has a dedup id: repeated after anything whose
      outcome is unknown, as the daemon answers a repeat with the first ids.
    - SETTLE: ack, nack, extend: after Unavailable and after a lost connection (see
      ``settled`` for what a repeat reports).
    - SESSION: consume: what it did ended with the connection, so a lost connection is
      safe to repeat on the next one.
    - PLAIN: everything else: only after Unavailable (nothing was done), which includes a
      connection lost before the request was written.
    """

    SEND = "send"
    SETTLE = "settle"
    SESSION = "session"
    PLAIN = "plain"


def retryable(exc: BaseException, kind: str) -> bool:
    if isinstance(exc, Unavailable):
        return True
    if isinstance(exc, ConnectionLost):
        return kind in (Retry.SEND, Retry.SETTLE, Retry.SESSION)
    if isinstance(exc, Timeout):
        return kind == Retry.SEND
    return False


def budget(retry_for: float | None, timeout: float | None) -> float:
    """The retry budget of a client: ``retry_for``, else its ``timeout``, else 30 s."""
    if retry_for is None:
        retry_for = timeout if timeout is not None else DEFAULT_RETRY_FOR
    if not retry_for >= 0:
        raise ValueError(f"retry_for must be a number >= 0, not {retry_for!r}")
    return float(retry_for)


class Backoff:
    """Delays between attempts: 20 ms, doubling, at most 500 ms, for ``budget`` seconds
    counted from the first failure; the last delay is cut to end at the budget.

    ``next_delay(now)`` after each failure: the seconds to wait before trying again, or
    None when the budget is spent (then the caller raises the last error).
    """

    def __init__(self, budget: float) -> None:
        self.budget = budget
        self.started: float | None = None
        self._delay = FIRST_BACKOFF

    def next_delay(self, now: float) -> float | None:
        if self.started is None:
            self.started = now
        remaining = self.started + self.budget - now
        if remaining <= 0:
            return None
        delay = min(self._delay, remaining)
        self._delay = min(MAX_BACKOFF, self._delay * 2)
        return delay


# -- settling -------------------------------------------------------------------------


def _verbed(verb: str) -> str:
    return "extended" if verb == "extend" else f"{verb}ed"


def settled(result: dict[str, Any], verb: str, *, after_loss: bool = False) -> list[str]:
    """The message ids an ack/nack/extend settled; raises PreconditionFailed naming the
    items it could not settle (after the others were).

    ``after_loss``: this answer is to a repeat after a lost connection, so the first
    attempt may have been applied: an item now "no such message" counts as done (the
    first attempt most likely acked it), and any other failure leaves the outcome
    unknown (Timeout): the first attempt may have settled it before its lease was
    released elsewhere."""
    done = [str(mid) for mid in result.get(_verbed(verb), [])]
    failed = dict(result.get("failed") or {})
    if after_loss:
        for item, why in list(failed.items()):
            if str(why).startswith("no such message"):
                done.append(message_id(str(item)))
                del failed[item]
        if failed:
            detail = "; ".join(f"{message_id(str(i))}: {why}" for i, why in failed.items())
            raise Timeout(f"could not {verb} {len(failed)} message(s) on a repeat after a lost "
                          f"connection; the first attempt may have: {detail}")
    if failed:
        detail = "; ".join(f"{message_id(str(item))}: {why}" for item, why in failed.items())
        raise PreconditionFailed(f"could not {verb} {len(failed)} message(s): {detail}")
    return done


def check_failed(result: dict[str, Any], verb: str) -> list[str]:
    """Raise PreconditionFailed naming the ids an ack/nack could not settle."""
    return settled(result, verb)
