"""One AMQP channel's bookkeeping: delivery tags, publisher confirms, consumers, held frames.

Plain state, no I/O (the bridge, meshq.amqp.bridge, acts on what these return). State
here: the next delivery tag and what each unacked one leases (a meshq receipt), the
publish sequence and which confirms are due, the channel's consumers. Never: a delivery
tag reused on its channel, a confirm sent twice or never, or ``basic.ack`` with
``multiple`` covering a publish whose outcome is still unknown.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any

from meshq.amqp.mapping import PRECONDITION_FAILED, ArgumentError

__all__ = ["Channel", "Confirms", "Consumer", "Unacked", "by_queue"]


@dataclass
class Unacked:
    """A delivery the client holds: its queue, the lease's receipt, and when the lease
    ends on this node's clock (renewed while the channel lives)."""

    queue: str
    receipt: str
    deadline: float


@dataclass
class Consumer:
    tag: str  # the AMQP consumer tag
    queue: str
    no_ack: bool
    meshq_tag: str = ""  # "" until meshq answered the consume


class Confirms:
    """Publisher confirms (confirm.select): publish sequence numbers from 1, settled in any
    order, announced as acks (``multiple`` over a settled run) and nacks."""

    def __init__(self) -> None:
        self.next_seq = 1
        self._due: dict[int, bool | None] = {}  # seq -> outcome (None: unknown yet)

    def publish(self) -> int:
        seq = self.next_seq
        self.next_seq += 1
        self._due[seq] = None
        return seq

    @property
    def unconfirmed(self) -> int:
        return len(self._due)

    def settle(self, seq: int, ok: bool) -> list[tuple[str, int, bool]]:
        """``seq`` is durable (``ok``) or failed: the confirms to send now, as
        ("ack" | "nack", delivery tag, multiple)."""
        if seq not in self._due:
            return []
        out: list[tuple[str, int, bool]] = []
        if not ok:
            del self._due[seq]
            out.append(("nack", seq, False))
        else:
            self._due[seq] = True
        run = []
        for s, outcome in self._due.items():  # ordered: the oldest first
            if outcome is not True:
                break
            run.append(s)
        for s in run:
            del self._due[s]
        if run:
            out.append(("ack", run[-1], len(run) > 1))
        return out


@dataclass
class Channel:
    number: int
    prefetch: int = 0  # basic.qos prefetch_count (0: no limit)
    confirms: Confirms | None = None
    tx: bool = False
    tx_held: list[Any] = field(default_factory=list)  # publishes and acks until commit
    split: dict[int, list[Any]] = field(default_factory=dict)  # seq -> [queues left, ok]
    next_tag: int = 1
    unacked: dict[int, Unacked] = field(default_factory=dict)
    consumers: dict[str, Consumer] = field(default_factory=dict)
    last_queue: str = ""  # the queue last declared: "" in a later method means it
    busy: bool = False  # a synchronous method's answer is due: later frames wait
    draining: bool = False  # held frames are being run (Bridge._answered)
    held: deque[Any] = field(default_factory=deque)
    closed: bool = False

    def delivered(self, unacked: Unacked | None) -> int:
        """A new delivery tag; ``unacked``: what it leases (None: no_ack)."""
        tag = self.next_tag
        self.next_tag += 1
        if unacked is not None:
            self.unacked[tag] = unacked
        return tag

    def take(self, tag: int, multiple: bool) -> list[Unacked]:
        """The deliveries an ack/nack/reject settles; an unknown tag is a channel error
        (406, as RabbitMQ: "unknown delivery tag")."""
        if multiple:
            tags = [t for t in self.unacked if tag == 0 or t <= tag]
            if tag >= self.next_tag:  # never delivered on this channel
                raise ArgumentError(PRECONDITION_FAILED,
                                    f"PRECONDITION_FAILED - unknown delivery tag {tag}")
            return [self.unacked.pop(t) for t in tags]
        got = self.unacked.pop(tag, None)
        if got is None:
            raise ArgumentError(PRECONDITION_FAILED,
                                f"PRECONDITION_FAILED - unknown delivery tag {tag}")
        return [got]

    def take_all(self) -> list[Unacked]:
        out = list(self.unacked.values())
        self.unacked.clear()
        return out

    def consumer_by_meshq(self, meshq_tag: str) -> Consumer | None:
        for c in self.consumers.values():
            if c.meshq_tag == meshq_tag:
                return c
        return None


def by_queue(items: list[Unacked]) -> dict[str, list[str]]:
    """Receipts grouped by queue, in order."""
    out: dict[str, list[str]] = {}
    for u in items:
        out.setdefault(u.queue, []).append(u.receipt)
    return out

