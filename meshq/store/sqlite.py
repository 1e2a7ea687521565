"""SQLiteStore: the node's durable state in one SQLite file (WAL, synchronous=FULL).

The schema is created with sqlite-utils; commits use sqlite3 directly in a worker thread,
one transaction per batch, runs of same-kind ops as one executemany. Never: a batch
reported durable before COMMIT returned, or a call into SQLite on the event loop thread.
"""

from __future__ import annotations

import os
import sqlite3
import threading
from typing import Any

import msgpack
import sqlite_utils
import trio

from meshq.model import Message
from meshq.states import State
from meshq.store.base import (
    OP_DEDUP,
    OP_DEDUP_PRUNE,
    OP_DELETE,
    OP_DROP_QUEUE,
    OP_META,
    OP_PUT,
    OP_QUEUE,
    OP_UPDATE,
    Op,
    Snapshot,
    Store,
    StoreStatistics,
)

__all__ = ["SCHEMA_VERSION", "SQLiteStore"]

SCHEMA_VERSION = 1

_SQL: dict[int, tuple[str, ...]] = {
    OP_PUT: ("INSERT OR REPLACE INTO messages (seq, id, queue, hlc, node, body, headers, state,"
             " delivery_count, ready_at, expires_at, lease_deadline)"
             " VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",),
    OP_UPDATE: ("UPDATE messages SET state=?, delivery_count=?, ready_at=?, lease_deadline=?"
                " WHERE seq=?",),
    OP_DELETE: ("DELETE FROM messages WHERE seq=?",),
    OP_QUEUE: ("INSERT OR REPLACE INTO queues (name, options, dead_lettered, expired, dropped)"
               " VALUES (?,?,?,?,?)",),
    OP_DROP_QUEUE: ("DELETE FROM queues WHERE name=?", "DELETE FROM messages WHERE queue=?",
                    "DELETE FROM dedup WHERE queue=?"),
    OP_DEDUP: ("INSERT OR REPLACE INTO dedup (queue, dedup_id, message_id, expires_at)"
               " VALUES (?,?,?,?)",),
    OP_DEDUP_PRUNE: ("DELETE FROM dedup WHERE expires_at < ?",),
    OP_META: ("INSERT OR REPLACE INTO meta (key, value) VALUES (?,?)",),
}


def _create_schema(conn: sqlite3.Connection) -> None:
    db = sqlite_utils.Database(conn)
    db["meta"].create({"key": str, "value": str}, pk="key", if_not_exists=True)
    db["queues"].create(
        {"name": str, "options": bytes, "dead_lettered": int, "expired": int, "dropped": int},
        pk="name", if_not_exists=True,
    )
    db["messages"].create(
        {"seq": int, "id": str, "queue": str, "hlc": int, "node": str, "body": bytes,
         "headers": bytes, "state": int, "delivery_count": int, "ready_at": float,
         "expires_at": float, "lease_deadline": float},
        pk="seq", not_null={"id", "queue", "hlc", "node", "state"}, if_not_exists=True,
    )
    db["dedup"].create(
        {"queue": str, "dedup_id": str, "message_id": str, "expires_at": float},
        pk=("queue", "dedup_id"), if_not_exists=True,
    )
    conn.execute("INSERT OR IGNORE INTO meta (key, value) VALUES ('schema_version', ?)",
                 (str(SCHEMA_VERSION),))


class SQLiteStore(Store):
    def __init__(self, path: str | os.PathLike[str]) -> None:
        super().__init__()
        self.path = os.fspath(path)
        self._conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self._lock = threading.Lock()  # one thread in SQLite at a time
        conn = self._conn
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("PRAGMA foreign_keys=OFF")
        conn.execute("PRAGMA cache_size=-65536")
        _create_schema(conn)
        version = int(conn.execute("SELECT value FROM meta WHERE key='schema_version'")
                      .fetchone()[0])
        if version > SCHEMA_VERSION:
            raise RuntimeError(
                f"{self.path} has schema version {version}; this meshqd knows up to "
                f"{SCHEMA_VERSION}: upgrade meshqd"
            )

    def load(self) -> Snapshot:
        with self._lock:
            conn = self._conn
            snap = Snapshot()
            snap.meta = dict(conn.execute("SELECT key, value FROM meta"))
            for name, options, dl, exp, dropped in conn.execute(
                "SELECT name, options, dead_lettered, expired, dropped FROM queues"
            ):
                counters = {"dead_lettered": dl or 0, "expired": exp or 0, "dropped": dropped or 0}
                snap.queues.append((name, msgpack.unpackb(options), counters))
            unpack = msgpack.unpackb
            for row in conn.execute(
                "SELECT seq, id, queue, body, headers, hlc, node, state, delivery_count,"
                " ready_at, expires_at, lease_deadline FROM messages ORDER BY seq"
            ):
                (seq, mid, queue, body, headers, hlc, node, state, count, ready_at, expires_at,
                 lease) = row
                snap.messages.append(Message(
                    seq, mid, queue, body, unpack(headers) if headers else {}, hlc, node,
                    State(state), count or 0, ready_at or 0.0, expires_at, lease,
                ))
            snap.dedup = list(conn.execute(
                "SELECT queue, dedup_id, message_id, expires_at FROM dedup"))
            return snap

    def _commit_sync(self, ops: list[Op]) -> None:
        with self._lock:
            conn = self._conn
            conn.execute("BEGIN IMMEDIATE")
            try:
                i, n = 0, len(ops)
                while i < n:
                    kind = ops[i][0]
                    j = i + 1
                    while j < n and ops[j][0] == kind:
                        j += 1
                    params = [op[1] for op in ops[i:j]]
                    for sql in _SQL[kind]:
                        if kind == OP_DROP_QUEUE:
                            conn.executemany(sql, params)
                        elif j - i == 1:
                            conn.execute(sql, params[0])
                        else:
                            conn.executemany(sql, params)
                    i = j
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise

    async def _commit(self, ops: list[Op]) -> None:
        await trio.to_thread.run_sync(self._commit_sync, ops)

    def statistics(self) -> StoreStatistics:
        size = 0
        for suffix in ("", "-wal", "-shm"):
            try:
                size += os.stat(self.path + suffix).st_size
            except OSError:
                pass
        return StoreStatistics(self.path, size, self.commits, self.ops_committed,
                               self.failed_commits)

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def meta_value(self, key: str) -> Any:
        with self._lock:
            row = self._conn.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return row[0] if row else None
