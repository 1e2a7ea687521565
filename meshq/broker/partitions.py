"""Which partition a message goes to, how a consumer's prefetch is spread over a queue's
partitions, and receipts that name their partition. Pure functions, the same on every node.

A queue has P partitions (option ``partitions``), each placed on the ring by its own key
with its own replicas and dispatcher. A message with a ``partition_key`` goes to
``murmur3(key) mod P`` (Kafka's keyed partitioner; SQS's MessageGroupId), so equal keys
keep their order; one with only a ``dedup_id`` goes to ``murmur3(dedup_id) mod P``, so that
a resend through any node meets its first copy's dedup entry; one whose dedup id a client
made up to retry safely (``retry:…``, meshq.client) goes to a partition among those the
accepting node is the preferred primary of, by the same hash (its retries come through the
same node, and the ring decides those partitions, failovers or not: no relay hop); any
other goes where the accepting node chooses (a partition it dispatches itself, in turn).
Never: a key mapped to a different partition by two nodes, or a receipt of partition 0
that an older node cannot read (``id~lease`` as before; ``id~lease~index`` for the
others).
"""

from __future__ import annotations

import mmh3

from meshq.protocol import RETRY_DEDUP

__all__ = ["RECEIPT_SEP", "RETRY_DEDUP", "key_partition", "parse_receipt", "receipt",
           "spread"]

RECEIPT_SEP = "~"



def key_partition(key: str, partitions: int) -> int:
    """The partition of a partition key (or of a dedup id) among ``partitions``."""
    return mmh3.hash(key.encode(), signed=False) % partitions if partitions > 1 else 0


def spread(credit: int, partitions: int) -> list[int]:
    """A consumer's prefetch spread over ``partitions``: as even as can be, each at least
    one (so a prefetch below the number of partitions lets that many be unacked)."""
    base, extra = divmod(credit, partitions)
    return [max(1, base + (1 if i < extra else 0)) for i in range(partitions)]


def receipt(mid: str, lease_id: int, index: int) -> str:
    return (f"{mid}{RECEIPT_SEP}{lease_id:x}" if index == 0
            else f"{mid}{RECEIPT_SEP}{lease_id:x}{RECEIPT_SEP}{index}")


def parse_receipt(item: str) -> tuple[str, int | None, int | None]:
    """A message id, or a receipt: (id, lease id or None, partition index or None when
    the item does not say). A malformed lease matches no lease (-1)."""
    mid, sep, rest = item.partition(RECEIPT_SEP)
    if not sep:
        return mid, None, None
    lease, sep, idx = rest.partition(RECEIPT_SEP)
    index = 0
    if sep:
        index = int(idx) if idx.isdigit() and len(idx) <= 4 else -1
    try:
        return mid, int(lease, 16), index
    except ValueError:
        return mid, -1, index
