"""A history checker for SPEC section 4, guarantees 1 to 3; for SPEC section 2's fifo order
(each consumer's first deliveries of a fifo queue) and the order of each `partition_key`:
record sends, deliveries and acks.

State here: every recorded client event (with caller-supplied times, and its place in the order
of recording), the drain's final contents and the intervals when membership was not stable.
Never: an event silently dropped or reordered by recording; `check()` is a pure function of what
was recorded and never mutates it.
"""

from __future__ import annotations

import math
import threading
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass

__all__ = ["DoubleLease", "FifoBreak", "History", "Reorder", "Report", "UnknownSend",
           "fifo_breaks", "lease_end", "overlaps_any"]

#: The one send failure that means "definitely not written"; any other code is an unknown outcome.
DEFINITELY_NOT_WRITTEN = "UNAVAILABLE"
_SHOWN = 5  # offending items listed per category by Report.assert_ok


@dataclass(frozen=True)
class UnknownSend:
    """A send whose outcome the client never learned (timeout, crash, no reply at all)."""

    client: str
    body_key: str
    error_code: str | None  # None: invoked and never completed


@dataclass(frozen=True)
class DoubleLease:
    """`message_id` was delivered to `second_consumer` at `second_at` while `first_consumer`'s
    lease from `first_at` still ran (not acked, ack not failed, deadline not reached)."""

    message_id: str
    first_consumer: str
    first_at: float
    second_consumer: str
    second_at: float


@dataclass(frozen=True)
class Reorder:
    """`consumer` got `earlier` (sent by `client` with `partition_key`, confirmed before
    `later` was sent) in its first delivery at `earlier_at`, after it had got `later` at
    `later_at`."""

    consumer: str
    client: str
    partition_key: str
    earlier: str
    earlier_at: float
    later: str
    later_at: float


@dataclass(frozen=True)
class FifoBreak:
    """`consumer` got `message_id` (HLC order key `key`) as a first delivery of a fifo
    queue at `at`, after `after_id` (at `after_at`), whose key is higher."""

    consumer: str
    message_id: str
    key: tuple[int, str]
    at: float
    after_id: str
    after_key: tuple[int, str]
    after_at: float


@dataclass(frozen=True)
class Report:
    """What `History.check()` found. `ok` covers guarantees 1-3; the rest is counted, not judged."""

    lost: tuple[str, ...]
    resurrected: tuple[str, ...]
    double_leases: tuple[DoubleLease, ...]
    duplicates_during_instability: tuple[DoubleLease, ...]
    unknown_sends: tuple[UnknownSend, ...]
    duplicate_deliveries: int
    confirmed_sends: int
    deliveries: int
    # delivered, then an ack whose outcome is unknown (the connection broke), and gone:
    # acked as far as anyone can tell, so not lost
    gone_after_unknown_ack: tuple[str, ...] = ()
    reorders: tuple[Reorder, ...] = ()
    # first deliveries of keyed messages whose order the check compared (it did something)
    keyed_first_deliveries: int = 0
    # first deliveries out of HLC order, whatever the membership did (a failover too)
    fifo_breaks: tuple[FifoBreak, ...] = ()

    @property
    def ok(self) -> bool:
        return not (self.lost or self.resurrected or self.double_leases or self.reorders
                    or self.fifo_breaks)

    def summary(self) -> str:
        lines = [
            f"confirmed sends={self.confirmed_sends} deliveries={self.deliveries} "
            f"duplicate deliveries={self.duplicate_deliveries} "
            f"duplicates during instability={len(self.duplicates_during_instability)} "
            f"unknown sends={len(self.unknown_sends)} "
            f"gone after an ack of unknown outcome={len(self.gone_after_unknown_ack)} "
            f"keyed first deliveries={self.keyed_first_deliveries}"
        ]
        if self.lost:
            lines.append(f"LOST {len(self.lost)} confirmed send(s): {_few(self.lost)}")
        if self.resurrected:
            lines.append(
                f"RESURRECTED {len(self.resurrected)} acked message(s): {_few(self.resurrected)}"
            )
        if self.double_leases:
            shown = _few(
                tuple(
                    f"{d.message_id} ({d.first_consumer}@{d.first_at:g} / "
                    f"{d.second_consumer}@{d.second_at:g})"
                    for d in self.double_leases
                )
            )
            lines.append(
                f"DOUBLE LEASES {len(self.double_leases)} while membership was stable: {shown}"
            )
        if self.reorders:
            shown = _few(
                tuple(
                    f"{r.consumer} got {r.later}@{r.later_at:g} before {r.earlier}@"
                    f"{r.earlier_at:g} (key {r.partition_key!r} of {r.client})"
                    for r in self.reorders
                )
            )
            lines.append(f"REORDERED {len(self.reorders)} first deliveries of a key: {shown}")
        if self.fifo_breaks:
            shown = _few(tuple(f"{b.message_id} after {b.after_id} ({b.consumer})"
                               for b in self.fifo_breaks))
            lines.append(f"FIFO ORDER broken {len(self.fifo_breaks)} time(s): {shown}")
        return "\n".join(lines)

    def assert_ok(self) -> None:
        """Raise AssertionError with a readable summary if a guarantee was broken."""
        if not self.ok:
            raise AssertionError("history check failed:\n" + self.summary())


def _few(ids: tuple[str, ...]) -> str:
    more = len(ids) - _SHOWN
    return ", ".join(ids[:_SHOWN]) + (f" and {more} more" if more > 0 else "")


@dataclass(frozen=True)
class _Delivery:
    consumer: str
    delivery_count: int
    redelivered: bool
    lease_deadline: float | None
    at: float
    seq: int = 0  # its place in the order of recording


@dataclass(frozen=True)
class _Keyed:
    """A confirmed send with a partition key: its chain (client, key) and the places in the
    order of recording of its (first) invocation and its confirmation."""

    client: str
    key: str
    invoked: int
    confirmed: int


@dataclass(frozen=True)
class _AckEvent:
    consumer: str
    confirmed: bool
    at: float


@dataclass(frozen=True)
class _Lease:
    consumer: str
    start: float
    end: float  # exclusive: a delivery to someone else at `end` is fine


def lease_end(
    start: float,
    deadline: float | None,
    later_same_consumer: Iterable[float],
    slack: float = 0.0,
) -> float:
    """When a lease stops counting as held: the earliest of its deadline (minus `slack`, the
    clock tolerance), and any later ack (confirmed or failed) or redelivery to the same
    consumer. `later_same_consumer` are the times of those events; earlier ones are ignored."""
    end = math.inf if deadline is None else deadline - slack
    for at in later_same_consumer:
        if at >= start:
            end = min(end, at)
    return end


def fifo_breaks(consumer: str,
                seen: Iterable[tuple[str, tuple[int, str], bool, float]]) -> list[FifoBreak]:
    """The first deliveries among ``seen`` ((message id, (HLC, node), redelivered, when),
    in the order ``consumer`` got them) below an earlier first delivery's key.
    Redeliveries are outside fifo order (they take their place again when requeued)."""
    out: list[FifoBreak] = []
    top: tuple[str, tuple[int, str], float] | None = None
    for mid, key, redelivered, at in seen:
        if redelivered:
            continue
        if top is not None and key < top[1]:
            out.append(FifoBreak(consumer, mid, key, at, top[0], top[1], top[2]))
        elif top is None or key > top[1]:
            top = (mid, key, at)
    return out


def overlaps_any(start: float, end: float, intervals: Iterable[tuple[float, float]]) -> bool:
    """True if the closed interval [start, end] meets any of the closed `intervals`."""
    return any(s <= end and start <= e for s, e in intervals)


class History:
    """Records client-observed events; safe to feed from several threads (one lock).

    Times are floats on one clock the caller chooses (e.g. `time.monotonic()`); lease deadlines
    passed to `delivered` must be on that same clock. `lease_slack` shortens every lease by that
    much, to tolerate clock error between the broker that set the deadline and the recorder.
    Events are also numbered in the order they are recorded: a consumer's deliveries must be
    recorded in the order it got them, and a client's send confirmed before it invokes the next.

    The order of a partition key (SPEC section 2: equal keys go to one partition, in order).
    Two confirmed sends of one client with the same `partition_key` are ordered, m1 before m2,
    when m1's confirmation was recorded before m2 was first invoked (sends of one client that
    overlap are not ordered; nor are sends of different clients). A delivery of m1 is *first*
    when it is the first delivery of m1 recorded for anyone and says so itself (delivery count 1,
    not redelivered). The rule: a consumer that has got m2 (in any delivery) must not then get a
    first delivery of m1; each such first delivery is a `Reorder`, whatever the membership did.
    Allowed, because meshq deals a partition's ready messages round-robin in HLC order and
    m1's HLC is below m2's:

    - any delivery of m1 that is not first, to anyone: a redelivery, after a nack, a lease
      deadline, a disconnect, a failover, or a lease that reached the client's node but never
      the program (the broker counts those), comes back behind what was dealt meanwhile;
    - m1 and m2 going to different consumers, in any order between them;
    - a consumer getting m2 (again) after m1.

    Why a first delivery after m2 is a fault of meshq. Either m2 was leased first: then m1 was
    not ready at the dispatcher that leased m2 although it was committed there or on a write
    quorum (a takeover reads one) before m2 existed, or was confirmed without one (seen, and
    fixed: a retry confirmed by the dedup entry of a Put the holders had refused); or m1's HLC
    was not below m2's (seen, and fixed: a takeover stamped below what a clock too far ahead had
    stamped); or an earlier lease of m1 ended uncounted. Or m1 was leased first and reached the
    consumer after m2 (seen: a former dispatcher handed its lease over late, after the new one
    had dealt m2). meshq takes a lease back uncounted when its write quorum failed before it
    was durable; with a backlog, m2 can be leased to another consumer in that window, which
    then gets m1 as a first delivery: the check reports that too, since nothing tells the
    consumer. A lease durable whose consumer went away before it was handed over stays
    counted (m1 comes back "redelivered", as RabbitMQ marks the messages of a closed
    channel): uncounted, it broke `--heavy --hot-ready 2` seed 314 (m1 leased to a consumer
    whose connection closed, m2 leased meanwhile to c1, which then got m1). (Counting it
    broke fifo seeds `--heavy --fifo 6 --hot-ready 2` 11012 and 11021 on an earlier build;
    both pass with it now.)
    The seeds are in tests/test_sim.py. """

    def __init__(self, *, lease_slack: float = 0.0) -> None:
        if lease_slack < 0:
            raise ValueError("lease_slack must be >= 0")
        self._lease_slack = lease_slack
        self._lock = threading.Lock()
        self._invoked: dict[tuple[str, str], None] = {}
        self._confirmed: dict[tuple[str, str], str] = {}
        self._failed: dict[tuple[str, str], str] = {}
        self._deliveries: dict[str, list[_Delivery]] = defaultdict(list)
        self._acks: dict[str, list[_AckEvent]] = defaultdict(list)
        self._final: set[str] | None = None
        self._unstable: list[tuple[float, float]] = []
        self._unknown_acks: set[str] = set()
        self._fifo: dict[str, list[tuple[str, tuple[int, str], bool, float]]] = (
            defaultdict(list))
        self._seq = 0  # the next event's place in the order of recording
        self._invoked_at: dict[tuple[str, str], int] = {}  # (its first invocation)
        self._confirmed_at: dict[tuple[str, str], int] = {}
        self._keys: dict[tuple[str, str], str] = {}  # a send's partition key

    def _next(self) -> int:
        self._seq += 1
        return self._seq

    # -- recorders ---------------------------------------------------------------------------

    def send_invoked(self, client: str, body_key: str, partition_key: str | None = None) -> None:
        with self._lock:
            self._invoke(client, body_key, partition_key)

    def send_confirmed(
        self,
        client: str,
        body_key: str,
        message_id: str,
        at: float,
        partition_key: str | None = None,
    ) -> None:
        with self._lock:
            self._invoke(client, body_key, partition_key)
            self._confirmed[(client, body_key)] = message_id
            self._confirmed_at.setdefault((client, body_key), self._next())

    def _invoke(self, client: str, body_key: str, partition_key: str | None) -> None:
        self._invoked[(client, body_key)] = None
        self._invoked_at.setdefault((client, body_key), self._next())
        if partition_key is not None:
            self._keys[(client, body_key)] = partition_key

    def send_failed(self, client: str, body_key: str, error_code: str, at: float) -> None:
        """UNAVAILABLE means definitely not written; any other code leaves the outcome unknown."""
        with self._lock:
            self._invoked[(client, body_key)] = None
            self._failed[(client, body_key)] = error_code

    def delivered(
        self,
        consumer: str,
        message_id: str,
        delivery_count: int,
        redelivered: bool,
        lease_deadline: float | None,
        at: float,
    ) -> None:
        """A receive returned `message_id` to `consumer`; None deadline: the lease never lapses."""
        with self._lock:
            d = _Delivery(consumer, delivery_count, redelivered, lease_deadline, at, self._next())
            self._deliveries[message_id].append(d)

    def fifo_delivered(self, consumer: str, message_id: str, hlc: int, node: str,
                       redelivered: bool, at: float) -> None:
        """`consumer` got `message_id` of a fifo queue, stamped `hlc` by `node`, at `at`:
        calls in the order the consumer got them (record `delivered` too). Fifo order is
        judged whatever the membership did: a failover must not break it either
        (docs/architecture.md, fifo across partitions)."""
        with self._lock:
            self._fifo[consumer].append((message_id, (hlc, node), redelivered, at))

    def ack_confirmed(self, consumer: str, message_id: str, at: float) -> None:
        with self._lock:
            self._acks[message_id].append(_AckEvent(consumer, True, at))

    def ack_unknown(self, consumer: str, message_id: str, at: float) -> None:
        """The ack's outcome is unknown (no answer: the connection broke). The lease is over
        for this consumer; the message may or may not have been acked."""
        with self._lock:
            self._acks[message_id].append(_AckEvent(consumer, False, at))
            self._unknown_acks.add(message_id)

    def ack_failed(self, consumer: str, message_id: str, at: float) -> None:
        """The ack was refused or its outcome is unknown; that consumer's lease is over."""
        with self._lock:
            self._acks[message_id].append(_AckEvent(consumer, False, at))

    def final_contents(self, message_ids: Iterable[str]) -> None:
        """What a drain after the run found. Calling it again adds to the set. Not calling it
        at all means "the queue was found empty"."""
        ids = list(message_ids)
        with self._lock:
            if self._final is None:
                self._final = set()
            self._final.update(ids)

    def unstable(self, start: float, end: float) -> None:
        """Membership was not stable during [start, end] (partition, kill, join, restart)."""
        if end < start:
            raise ValueError(f"unstable interval ends before it starts: {start} > {end}")
        with self._lock:
            self._unstable.append((start, end))

    # -- the check ---------------------------------------------------------------------------

    def check(self) -> Report:
        with self._lock:
            confirmed = dict(self._confirmed)
            failed = dict(self._failed)
            invoked = list(self._invoked)
            deliveries = {m: list(ds) for m, ds in self._deliveries.items()}
            acks = {m: list(a) for m, a in self._acks.items()}
            final = set(self._final or ())
            unstable = list(self._unstable)
            unknown_acks = set(self._unknown_acks)
            keyed = {
                confirmed[send]: _Keyed(
                    send[0], key, self._invoked_at[send], self._confirmed_at[send]
                )
                for send, key in self._keys.items()
                if send in confirmed
            }
            fifo = {c: list(seen) for c, seen in self._fifo.items()}

        acked = {m for m, events in acks.items() if any(a.confirmed for a in events)}
        confirmed_ids = set(confirmed.values())
        missing = confirmed_ids - acked - final
        lost = sorted(missing - unknown_acks)
        resurrected = sorted(acked & final)
        unknown = tuple(
            UnknownSend(client, body_key, failed.get((client, body_key)))
            for client, body_key in invoked
            if (client, body_key) not in confirmed
            and failed.get((client, body_key)) != DEFINITELY_NOT_WRITTEN
        )

        breaks = [b for c in sorted(fifo) for b in fifo_breaks(c, fifo[c])]
        stable_doubles: list[DoubleLease] = []
        unstable_doubles: list[DoubleLease] = []
        for message_id in sorted(deliveries):
            for dl in self._double_leases(message_id, deliveries[message_id], acks.get(message_id)):
                if overlaps_any(dl.first_at, dl.second_at, unstable):
                    unstable_doubles.append(dl)
                else:
                    stable_doubles.append(dl)

        reorders, first = _reorders(keyed, deliveries)
        return Report(
            lost=tuple(lost),
            resurrected=tuple(resurrected),
            double_leases=tuple(stable_doubles),
            duplicates_during_instability=tuple(unstable_doubles),
            unknown_sends=unknown,
            duplicate_deliveries=sum(len(ds) - 1 for ds in deliveries.values()),
            confirmed_sends=len(confirmed),
            deliveries=sum(len(ds) for ds in deliveries.values()),
            gone_after_unknown_ack=tuple(sorted(missing & unknown_acks)),
            reorders=tuple(reorders),
            keyed_first_deliveries=first,
            fifo_breaks=tuple(breaks),
        )

    def _double_leases(
        self, message_id: str, deliveries: list[_Delivery], acks: list[_AckEvent] | None
    ) -> list[DoubleLease]:
        """One DoubleLease per delivery that began while another consumer's lease still ran."""
        ordered = sorted(deliveries, key=lambda d: d.at)
        leases: list[_Lease] = []
        for d in ordered:
            ends = [a.at for a in acks or () if a.consumer == d.consumer]
            ends += [o.at for o in ordered if o.consumer == d.consumer and o.at > d.at]
            end = lease_end(d.at, d.lease_deadline, ends, self._lease_slack)
            leases.append(_Lease(d.consumer, d.at, end))
        found: list[DoubleLease] = []
        for i, second in enumerate(leases):
            for first in leases[:i]:
                if first.consumer != second.consumer and first.start <= second.start < first.end:
                    found.append(
                        DoubleLease(
                            message_id, first.consumer, first.start, second.consumer, second.start
                        )
                    )
                    break
        return found


def _reorders(
    keyed: dict[str, _Keyed], deliveries: dict[str, list[_Delivery]]
) -> tuple[list[Reorder], int]:
    """The first deliveries that came to a consumer after a later send of their key (the rule in
    `History`'s docstring), and how many first deliveries of keyed messages there were."""
    first: set[tuple[str, int]] = set()  # (message id, seq) of each message's first delivery
    by_consumer: dict[str, list[tuple[int, str, _Delivery]]] = defaultdict(list)
    for mid in keyed.keys() & deliveries.keys():
        ds = deliveries[mid]
        d0 = min(ds, key=lambda d: d.seq)
        if d0.delivery_count == 1 and not d0.redelivered:
            first.add((mid, d0.seq))
        for d in ds:
            by_consumer[d.consumer].append((d.seq, mid, d))
    found: list[Reorder] = []
    for consumer in sorted(by_consumer):
        # per chain (client, key): the message got so far that was invoked last, and when
        latest: dict[tuple[str, str], tuple[int, str, float]] = {}
        for seq, mid, d in sorted(by_consumer[consumer], key=lambda e: e[0]):
            k = keyed[mid]
            chain = (k.client, k.key)
            seen = latest.get(chain)
            if seen is not None and (mid, seq) in first and seen[0] > k.confirmed:
                found.append(Reorder(consumer, k.client, k.key, mid, d.at, seen[1], seen[2]))
            if seen is None or k.invoked > seen[0]:
                latest[chain] = (k.invoked, mid, d.at)
    return found, len(first)
