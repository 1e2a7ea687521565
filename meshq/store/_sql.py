"""The SQL side of SQLiteStore, shared by the daemon (schema, load) and the writer process.

No trio here. ``apply`` runs one batch of ops as one transaction; runs of same-kind ops
become multi-row statements. Never: a partial batch committed (any error rolls back).
"""

from __future__ import annotations

import functools
import itertools
import os
import sqlite3
from collections.abc import Sequence
from typing import Any

import sqlite_utils

from meshq.errors import StartupError
from meshq.store.base import (
    OP_DEDUP,
    OP_DEDUP_PRUNE,
    OP_DELETE,
    OP_DROP_QUEUE,
    OP_FORGET,
    OP_META,
    OP_PUT,
    OP_QUEUE,
    OP_TOMBSTONE,
    OP_TOMBSTONE_PRUNE,
    OP_UPDATE,
)

__all__ = ["MAX_BATCH_FRAME", "SCHEMA_VERSION", "SKIPPED", "apply", "connect"]

SKIPPED = "skipped: an earlier batch failed"  # the writer's answer after a failure
MAX_BATCH_FRAME = 1 << 30  # bytes of one batch, as sent to the writer process

SCHEMA_VERSION = 1

# An acked, expired or dropped message leaves a tombstone (queue, id, time), so that a
# replica that missed the deletion cannot bring the message back (meshq.mesh.replication).
_NOW = "(julianday('now') - 2440587.5) * 86400.0"
_TOMBSTONE_SELECT = ("INSERT OR REPLACE INTO tombstones (queue, id, at) SELECT queue, id, "
                     + _NOW + " FROM messages")

_SQL: dict[int, tuple[str, ...]] = {
    OP_PUT: ("INSERT OR REPLACE INTO messages (seq, id, queue, hlc, node, body, headers, state,"
             " delivery_count, ready_at, expires_at, lease_deadline)"
             " VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",),
    OP_UPDATE: ("UPDATE messages SET state=?, delivery_count=?, ready_at=?, lease_deadline=?"
                " WHERE seq=?",),
    OP_DELETE: (_TOMBSTONE_SELECT + " WHERE seq=?", "DELETE FROM messages WHERE seq=?"),
    OP_TOMBSTONE: ("INSERT OR REPLACE INTO tombstones (queue, id, at) VALUES (?, ?, "
                   + _NOW + ")",),
    OP_TOMBSTONE_PRUNE: ("DELETE FROM tombstones WHERE at < ?",),
    OP_FORGET: ("DELETE FROM messages WHERE seq=?",),
    OP_QUEUE: ("INSERT OR REPLACE INTO queues (name, options, dead_lettered, expired, dropped)"
               " VALUES (?,?,?,?,?)",),
    OP_DROP_QUEUE: ("DELETE FROM queues WHERE name=?", "DELETE FROM messages WHERE queue=?",
                    "DELETE FROM tombstones WHERE queue=?",
                    "DELETE FROM dedup WHERE queue=?"),
    OP_DEDUP: ("INSERT OR REPLACE INTO dedup (queue, dedup_id, message_id, expires_at)"
               " VALUES (?,?,?,?)",),
    OP_DEDUP_PRUNE: ("DELETE FROM dedup WHERE expires_at < ?",),
    OP_META: ("INSERT OR REPLACE INTO meta (key, value) VALUES (?,?)",),
}


# Runs of these op kinds become multi-row statements: one sqlite3_step per chunk instead of
# one per row. Each step drops and retakes the GIL, and with the event loop busy every
# retake can wait a whole switch interval, so per-row steps starve the commit thread.
_MULTI_CHUNK = {OP_PUT: 64, OP_DELETE: 256, OP_UPDATE: 128}
_OP_TOMBSTONE_SEQS = -1  # the tombstones of a multi-row delete (not an op kind)
_MULTI = frozenset(_MULTI_CHUNK)


@functools.cache
def _multi_sql(kind: int, rows: int) -> str:
    if kind == OP_PUT:
        head = _SQL[OP_PUT][0].split(" VALUES ")[0]
        return head + " VALUES " + ",".join(["(?,?,?,?,?,?,?,?,?,?,?,?)"] * rows)
    if kind == OP_DELETE:
        return "DELETE FROM messages WHERE seq IN (" + ",".join("?" * rows) + ")"
    if kind == _OP_TOMBSTONE_SEQS:
        return _TOMBSTONE_SELECT + " WHERE seq IN (" + ",".join("?" * rows) + ")"
    return ("UPDATE messages SET state=v.column1, delivery_count=v.column2, ready_at=v.column3,"
            " lease_deadline=v.column4 FROM (VALUES " + ",".join(["(?,?,?,?,?)"] * rows)
            + ") AS v WHERE messages.seq = v.column5")


def _execute_multi(conn: sqlite3.Connection, kind: int, params: list[Any]) -> None:
    if kind == OP_UPDATE:  # one row per seq, the last update winning (UPDATE FROM picks any)
        params = list({p[4]: p for p in params}.values())
    chunk = _MULTI_CHUNK[kind]
    for start in range(0, len(params), chunk):
        part = params[start:start + chunk]
        flat = list(itertools.chain.from_iterable(part))
        if kind == OP_DELETE:
            conn.execute(_multi_sql(_OP_TOMBSTONE_SEQS, len(part)), flat)
        conn.execute(_multi_sql(kind, len(part)), flat)


def _create_schema(conn: sqlite3.Connection) -> None:
    db = sqlite_utils.Database(conn)
    db.table("meta").create({"key": str, "value": str}, pk="key", if_not_exists=True)
    db.table("queues").create(
        {"name": str, "options": bytes, "dead_lettered": int, "expired": int, "dropped": int},
        pk="name", if_not_exists=True,
    )
    db.table("messages").create(
        {"seq": int, "id": str, "queue": str, "hlc": int, "node": str, "body": bytes,
         "headers": bytes, "state": int, "delivery_count": int, "ready_at": float,
         "expires_at": float, "lease_deadline": float},
        pk="seq", not_null={"id", "queue", "hlc", "node", "state"}, if_not_exists=True,
    )
    db.table("dedup").create(
        {"queue": str, "dedup_id": str, "message_id": str, "expires_at": float},
        pk=("queue", "dedup_id"), if_not_exists=True,
    )
    db.table("tombstones").create({"queue": str, "id": str, "at": float},
                                  pk=("queue", "id"), if_not_exists=True)
    conn.execute("INSERT OR IGNORE INTO meta (key, value) VALUES ('schema_version', ?)",
                 (str(SCHEMA_VERSION),))



def connect(path: str | os.PathLike[str]) -> sqlite3.Connection:
    """Open (and if new, create) the store file with the pragmas meshq relies on."""
    conn = sqlite3.connect(os.fspath(path), isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA busy_timeout=10000")
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("PRAGMA cache_size=-65536")
    _create_schema(conn)
    version = int(conn.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()[0])
    if version > SCHEMA_VERSION:
        conn.close()
        raise StartupError(f"{path} has schema version {version}; this meshqd knows up to "
                           f"{SCHEMA_VERSION}: upgrade meshqd")
    return conn


def apply(conn: sqlite3.Connection, ops: Sequence[Sequence[Any]]) -> None:
    """Apply ops ([kind, params] pairs) in order, in one durable transaction."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        i, n = 0, len(ops)
        while i < n:
            kind = ops[i][0]
            j = i + 1
            while j < n and ops[j][0] == kind:
                j += 1
            params = [op[1] for op in ops[i:j]]
            if kind in _MULTI and len(params) > 1:
                _execute_multi(conn, kind, params)
            else:
                for sql in _SQL[kind]:
                    conn.executemany(sql, params)
            i = j
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
