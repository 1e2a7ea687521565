"""A partition's range digests, kept as its messages change, so that anti-entropy pays for
what changed since the last digest instead of walking every message.

State here, per partition (``Queue.sums``): ``hot``, per bucket of message ids
(meshq.cluster.lattice.bucket_of), the sum modulo 2**64 of the *shares* counted for the
messages in memory, a share being ``fingerprint(id, message_key)``, and each message's
counted share on the message (``Message.fp``, 0: none counted); ``stale``, the messages in
memory whose counted share may be out of date (just added, or their progress moved since);
``cold``, per bucket, the sum of the shares of the partition's READY messages on disk only
(meshq.broker.backlog keeps it: added when a message stays cold, moved to ``hot`` when one
is paged in, zeroed when they are dropped), or None while unknown (after a start, until
the first digest counts them from the store; on a partition held alone, which no digest
reads). Never: a message in memory whose progress moved and that is not in ``stale`` (its
bucket would keep its old share for good: the broker marks it wherever it stages a
progress change, and where ``Replica._schedule_all`` sets a lease's missing deadline); a
share still counted once its message left memory; a cold message's share in ``hot`` or a
hot one's in ``cold``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from meshq.cluster.lattice import BUCKETS, bucket_of, fingerprint
from meshq.model import Message

__all__ = ["MOD", "Sums", "add_share", "message_key", "share", "walk"]

MOD = 1 << 64


def message_key(m: Message) -> tuple[Any, ...]:
    """progress_key(progress_of(m)) without building the Progress."""
    return (m.epoch, m.vn, m.delivery_count, int(m.state),
            -1.0 if m.lease_deadline is None else m.lease_deadline, m.ready_at, m.lease_id,
            m.holder)


def share(m: Message) -> int:
    """A message's share of its bucket's sum."""
    return fingerprint(m.id, message_key(m))


def walk(msgs: Iterable[Message]) -> list[int]:
    """The sums computed from scratch (what ``Sums`` must always settle to)."""
    out = [0] * BUCKETS
    for m in msgs:
        b = bucket_of(m.id)
        out[b] = (out[b] + share(m)) % MOD
    return out


class Sums:
    """The digest sums of one partition's messages in memory; see the module docstring.

    ``changed`` and ``removed`` are O(1) and compute no share (``removed`` hashes the id
    for its bucket; they run on every lease, ack and merge); ``settle`` counts the stale
    shares, at most ``most`` per call, so a digest costs O(buckets + messages changed
    since the last one)."""

    __slots__ = ("cold", "counting", "hot", "stale")

    def __init__(self) -> None:
        self.hot = [0] * BUCKETS
        self.stale: dict[Message, None] = {}  # (identity keys: Message has eq=False)
        self.cold: list[int] | None = [0] * BUCKETS
        self.counting: Any = None  # a count of the cold shares under way (backlog)

    def counted(self, msg: Message, fp: int) -> None:
        """``msg`` came into memory with its share ``fp`` known (a page-in)."""
        b = bucket_of(msg.id)
        self.hot[b] = (self.hot[b] + fp) % MOD
        msg.fp = fp

    def total(self) -> list[int]:
        """What a digest answers: the sums of the messages in memory and on disk (the
        caller makes sure ``cold`` is known and nothing is ``stale``)."""
        cold = self.cold
        if cold is None:
            raise ValueError("the cold shares are not counted")
        return [(h + c) % MOD for h, c in zip(self.hot, cold, strict=True)]

    def changed(self, msg: Message) -> None:
        """``msg`` was added to memory, or its progress moved."""
        self.stale[msg] = None

    def removed(self, msg: Message) -> None:
        """``msg`` left memory (deleted, dropped, forgotten)."""
        self.stale.pop(msg, None)
        if msg.fp:
            b = bucket_of(msg.id)
            self.hot[b] = (self.hot[b] - msg.fp) % MOD
            msg.fp = 0

    def settle(self, most: int) -> bool:
        """Count up to ``most`` stale shares; True when none is left stale."""
        stale, hot = self.stale, self.hot
        for _ in range(min(most, len(stale))):
            msg = stale.popitem()[0]  # (LIFO: O(1), unlike taking from the front)
            new = share(msg)
            b = bucket_of(msg.id)
            hot[b] = (hot[b] + new - msg.fp) % MOD
            msg.fp = new
        return not stale

    def clear(self) -> None:
        """Every message left memory at once (a dropped partition)."""
        self.hot = [0] * BUCKETS
        self.stale = {}


def add_share(sums: list[int], msg: Message, sign: int = 1) -> int:
    """Add (``sign`` -1: take away) ``msg``'s share to ``sums``; returns the share."""
    s = share(msg)
    b = bucket_of(msg.id)
    sums[b] = (sums[b] + sign * s) % MOD
    return s
