"""The Store interface: durable state of one node, written in group-committed batches.

Contract:
- ``load()`` returns everything stored (``load(hot_ready)``: all but the READY messages
  past the first ``hot_ready`` of each partition, which ``read_ready`` pages in later).
  It may block; call it once, before writing.
- ``stage(op)`` appends a mutation to the open batch and returns that batch. It never
  blocks. Ops apply in the order staged; batches commit in the order they were opened,
  one transaction each, so a batch is all-or-nothing.
- ``Batch.wait()`` / ``Batch.add_callback`` report when the batch is durable (error None)
  or failed. Callbacks run on the event loop, in registration order.
- ``run()`` is the writer loop and must be running for anything to commit. It never
  blocks the event loop: a real store does its I/O in a worker thread.
- ``flush()`` waits until everything staged so far is durable.
Ops are plain tuples (see the OP_* constants) so that the hot path allocates little.
"""

from typing import TYPE_CHECKING, Any

from meshq.store._ops import (
    OP_CATALOG_PRUNE,
    OP_DEDUP,
    OP_DEDUP_PRUNE,
    OP_DELETE,
    OP_DISCARD,
    OP_DROP_QUEUE,
    OP_FORGET,
    OP_META,
    OP_PARTITION,
    OP_PURGE_DELAYED,
    OP_PURGE_READY,
    OP_PUT,
    OP_QUEUE,
    OP_TOMBSTONE,
    OP_TOMBSTONE_PRUNE,
    OP_UPDATE,
    bound_key,
)

if TYPE_CHECKING:
    from meshq.store.base import (
        Batch,
        Snapshot,
        Store,
        StoreError,
        StoreFatal,
        StoreStatistics,
    )
    from meshq.store.memory import MemoryStore
    from meshq.store.sqlite import SQLiteStore

_LAZY = {"Batch": "base", "Snapshot": "base", "Store": "base", "StoreError": "base",
         "StoreFatal": "base", "StoreStatistics": "base", "MemoryStore": "memory",
         "SQLiteStore": "sqlite"}


def __getattr__(name: str) -> Any:
    # The classes pull in trio; the writer process, which imports this package for its
    # op kinds and SQL only, loads without them (about 20 MiB less resident).
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'meshq.store' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f"meshq.store.{module}"), name)


__all__ = [
    "OP_CATALOG_PRUNE",
    "OP_DEDUP",
    "OP_DEDUP_PRUNE",
    "OP_DELETE",
    "OP_DISCARD",
    "OP_DROP_QUEUE",
    "OP_FORGET",
    "OP_META",
    "OP_PARTITION",
    "OP_PURGE_DELAYED",
    "OP_PURGE_READY",
    "OP_PUT",
    "OP_QUEUE",
    "OP_TOMBSTONE",
    "OP_TOMBSTONE_PRUNE",
    "OP_UPDATE",
    "Batch",
    "MemoryStore",
    "SQLiteStore",
    "Snapshot",
    "Store",
    "StoreError",
    "StoreFatal",
    "StoreStatistics",
    "bound_key",
]
