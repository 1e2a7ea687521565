"""The SQL side of SQLiteStore, shared by the daemon (schema, load) and the writer process.

No trio here. ``apply`` runs one batch of ops as one transaction; runs of same-kind ops
become multi-row statements. Never: a partial batch committed (any error rolls back).

Schema version 2 (replication as a lattice, meshq.cluster.lattice): ``catalog`` holds
every queue name with its newest incarnation and its newest drop; ``partitions`` each
queue partition's promised dispatch epoch and its counters (a G-counter per dispatching
node); ``messages`` carry their partition, incarnation, lease id and progress version;
``tombstones`` are per partition. A version 1 file is migrated on open.
"""

from __future__ import annotations

import functools
import itertools
import os
import sqlite3
from collections.abc import Callable, Sequence
from typing import Any

import msgpack

from meshq.errors import StartupError
from meshq.store._ops import (
    BOUND_PREFIX,
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
)

__all__ = ["MAX_BATCH_FRAME", "SCHEMA_VERSION", "SKIPPED", "apply", "connect"]

SKIPPED = "skipped: an earlier batch failed"  # the writer's answer after a failure
MAX_BATCH_FRAME = 1 << 30  # bytes of one batch, as sent to the writer process

SCHEMA_VERSION = 2
# The page cache of a connection. The messages table is appended to, and its indexes are
# appended to or trimmed at their head, so commits touch few pages; the rest is the OS's
# file cache, which a deep backlog does not make this process's memory.
CACHE_KIB = 8192

_MSG_COLUMNS = ("seq, id, queue, idx, inc, hlc, node, body, headers, state, delivery_count,"
                " ready_at, expires_at, lease_deadline, lease_id, holder, epoch, vn")
_MSG_MARKS = "(" + ",".join("?" * 18) + ")"
_AFTER_PREFIX = len(BOUND_PREFIX) + 1  # (SQL counts from 1) where a bound key's index is

Pick = Callable[[Sequence[Any]], Sequence[Any]] | None

# Each op kind: its statements, each with a function picking its parameters from the
# op's params (None: all of them, in order).
_SQL: dict[int, tuple[tuple[str, Pick], ...]] = {
    OP_PUT: ((f"INSERT OR REPLACE INTO messages ({_MSG_COLUMNS}) VALUES {_MSG_MARKS}",
              None),),
    OP_UPDATE: (("UPDATE messages SET state=?, delivery_count=?, ready_at=?,"
                 " lease_deadline=?, lease_id=?, holder=?, epoch=?, vn=? WHERE seq=?", None),),
    OP_DELETE: (("INSERT OR REPLACE INTO tombstones (queue, idx, id, at) VALUES (?,?,?,?)",
                 lambda p: p[1:]),
                ("DELETE FROM messages WHERE seq=?", lambda p: p[:1])),
    OP_DISCARD: (("DELETE FROM messages WHERE seq=?", None),),
    OP_TOMBSTONE: (("INSERT OR REPLACE INTO tombstones (queue, idx, id, at) VALUES (?,?,?,?)",
                    None),),
    OP_TOMBSTONE_PRUNE: (("DELETE FROM tombstones WHERE at < ?", None),),
    OP_FORGET: (("DELETE FROM messages WHERE queue=? AND idx=?", None),
                ("DELETE FROM tombstones WHERE queue=? AND idx=?", None)),
    OP_QUEUE: (("INSERT OR REPLACE INTO catalog (name, inc, options, dropped, dropped_at)"
                " VALUES (?,?,?,?,?)", None),),
    OP_DROP_QUEUE: (("DELETE FROM messages WHERE queue=? AND inc<=?", lambda p: p[:2]),
                    ("DELETE FROM tombstones WHERE queue=?", lambda p: p[:1]),
                    ("DELETE FROM dedup WHERE queue=?", lambda p: p[:1]),
                    ("INSERT INTO catalog (name, inc, options, dropped, dropped_at)"
                     " VALUES (?, 0, NULL, ?, ?) ON CONFLICT(name) DO UPDATE SET"
                     " dropped=max(dropped, excluded.dropped),"
                     " dropped_at=excluded.dropped_at", None)),
    OP_PARTITION: (("INSERT OR REPLACE INTO partitions (queue, idx, promised, tally)"
                    " VALUES (?,?,?,?)", None),),
    OP_CATALOG_PRUNE: (("DELETE FROM catalog WHERE dropped >= inc AND dropped_at < ?", None),
                       ("DELETE FROM partitions WHERE queue NOT IN (SELECT name FROM catalog)",
                        lambda p: ()),
                       # (bound_key: the name after the index's space)
                       (f"DELETE FROM meta WHERE key GLOB '{BOUND_PREFIX}*' AND substr(key,"
                        f" {_AFTER_PREFIX} + instr(substr(key, {_AFTER_PREFIX}), ' '))"
                        " NOT IN (SELECT name FROM catalog)", lambda p: ())),
    OP_DEDUP: (("INSERT OR REPLACE INTO dedup (queue, dedup_id, message_id, expires_at)"
                " VALUES (?,?,?,?)", None),),
    OP_DEDUP_PRUNE: (("DELETE FROM dedup WHERE expires_at < ?", None),),
    OP_PURGE_READY: (("INSERT OR REPLACE INTO tombstones (queue, idx, id, at) SELECT queue,"
                      " idx, id, ? FROM messages WHERE state=0 AND queue=? AND idx=?"
                      " AND (hlc, seq) > (?, ?) AND seq < ?", lambda p: (p[5], *p[:5])),
                     ("DELETE FROM messages WHERE state=0 AND queue=? AND idx=?"
                      " AND (hlc, seq) > (?, ?) AND seq < ?", lambda p: p[:5])),
    OP_PURGE_DELAYED: (("INSERT OR REPLACE INTO tombstones (queue, idx, id, at) SELECT queue,"
                        " idx, id, ? FROM messages WHERE state=1 AND queue=? AND idx=?"
                        " AND (ready_at, seq) > (?, ?) AND seq < ?", lambda p: (p[5], *p[:5])),
                       ("DELETE FROM messages WHERE state=1 AND queue=? AND idx=?"
                        " AND (ready_at, seq) > (?, ?) AND seq < ?", lambda p: p[:5])),
    OP_META: (("INSERT OR REPLACE INTO meta (key, value) VALUES (?,?)", None),),
}


# Runs of these op kinds become multi-row statements: one sqlite3_step per chunk instead of
# one per row. Each step drops and retakes the GIL, and with the event loop busy every
# retake can wait a whole switch interval, so per-row steps starve the commit thread.
_MULTI_CHUNK = {OP_PUT: 48, OP_DELETE: 128, OP_UPDATE: 96, OP_DEDUP: 128}
_TOMBSTONES_OF_DELETES = -1  # the tombstones of a multi-row delete (not an op kind)
_MULTI = frozenset(_MULTI_CHUNK)


@functools.cache
def _multi_sql(kind: int, rows: int) -> str:
    if kind == OP_PUT:
        return (f"INSERT OR REPLACE INTO messages ({_MSG_COLUMNS}) VALUES "
                + ",".join([_MSG_MARKS] * rows))
    if kind == OP_DELETE:
        return "DELETE FROM messages WHERE seq IN (" + ",".join("?" * rows) + ")"
    if kind == OP_DEDUP:
        return ("INSERT OR REPLACE INTO dedup (queue, dedup_id, message_id, expires_at) VALUES "
                + ",".join(["(?,?,?,?)"] * rows))
    if kind == _TOMBSTONES_OF_DELETES:
        return ("INSERT OR REPLACE INTO tombstones (queue, idx, id, at) VALUES "
                + ",".join(["(?,?,?,?)"] * rows))
    return ("UPDATE messages SET state=v.column1, delivery_count=v.column2,"
            " ready_at=v.column3, lease_deadline=v.column4, lease_id=v.column5,"
            " holder=v.column6, epoch=v.column7, vn=v.column8 FROM (VALUES "
            + ",".join(["(?,?,?,?,?,?,?,?,?)"] * rows) + ") AS v WHERE messages.seq = v.column9")


def _execute_multi(conn: sqlite3.Connection, kind: int, params: list[Any]) -> None:
    if kind == OP_UPDATE:  # one row per seq, the last update winning (UPDATE FROM picks any)
        params = list({p[8]: p for p in params}.values())
    chunk = _MULTI_CHUNK[kind]
    for start in range(0, len(params), chunk):
        part = params[start:start + chunk]
        if kind == OP_DELETE:
            conn.execute(_multi_sql(_TOMBSTONES_OF_DELETES, len(part)),
                         list(itertools.chain.from_iterable(p[1:] for p in part)))
            conn.execute(_multi_sql(kind, len(part)), [p[0] for p in part])
        else:
            conn.execute(_multi_sql(kind, len(part)), list(itertools.chain.from_iterable(part)))


def _create_schema(conn: sqlite3.Connection) -> None:
    import sqlite_utils  # (here: the writer process, which never creates it, loads less)

    db = sqlite_utils.Database(conn)
    db.table("meta").create({"key": str, "value": str}, pk="key", if_not_exists=True)
    db.table("catalog").create(
        {"name": str, "inc": int, "options": bytes, "dropped": int, "dropped_at": float},
        pk="name", if_not_exists=True)
    db.table("partitions").create(
        {"queue": str, "idx": int, "promised": int, "tally": bytes},
        pk=("queue", "idx"), if_not_exists=True)
    db.table("messages").create(
        {"seq": int, "id": str, "queue": str, "idx": int, "inc": int, "hlc": int,
         "node": str, "body": bytes, "headers": bytes, "state": int, "delivery_count": int,
         "ready_at": float, "expires_at": float, "lease_deadline": float, "lease_id": int,
         "holder": str, "epoch": int, "vn": int},
        pk="seq", not_null={"id", "queue", "hlc", "node", "state"}, if_not_exists=True)
    # The READY messages of a partition in order, without reading them: what the backlog
    # on disk pages in (meshq.broker.backlog), and what a start-up counts; and the others
    # (leased, delayed), which a start-up reads whole. Two partial indexes rather than one
    # on (state, ...): a lease moves a row from the first to the small second, and the ack
    # of a leased message touches the first not at all (1 us less of the writer's time per
    # message consumed). (An index over every state, messages_ready, came before them.)
    conn.execute("DROP INDEX IF EXISTS messages_ready")
    conn.execute("CREATE INDEX IF NOT EXISTS messages_ready0"
                 " ON messages (queue, idx, hlc, seq) WHERE state = 0")
    # The DELAYED messages of a partition by when they are due: past the first few
    # thousand, a partition held alone leaves them on disk too (meshq.broker.backlog).
    conn.execute("CREATE INDEX IF NOT EXISTS messages_delayed"
                 " ON messages (queue, idx, ready_at, seq) WHERE state = 1")
    conn.execute("CREATE INDEX IF NOT EXISTS messages_held ON messages (state) WHERE state > 0")
    # A message by its id: what a fetch or a merge names that is on disk only (a
    # replicated partition's cold messages, meshq.broker.backlog).
    conn.execute("CREATE INDEX IF NOT EXISTS messages_id ON messages (queue, idx, id)")
    db.table("dedup").create(
        {"queue": str, "dedup_id": str, "message_id": str, "expires_at": float},
        pk=("queue", "dedup_id"), if_not_exists=True)
    conn.execute("CREATE INDEX IF NOT EXISTS dedup_expiry ON dedup (expires_at)")
    db.table("tombstones").create({"queue": str, "idx": int, "id": str, "at": float},
                                  pk=("queue", "idx", "id"), if_not_exists=True)
    conn.execute("INSERT OR IGNORE INTO meta (key, value) VALUES ('schema_version', ?)",
                 (str(SCHEMA_VERSION),))


def _migrate_1_to_2(conn: sqlite3.Connection) -> None:
    """Version 1 had ``queues`` (with counters) and unpartitioned tombstones."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        for column, default in (("idx", 0), ("inc", 1), ("lease_id", 0), ("epoch", 0),
                                ("vn", 0)):
            conn.execute(f"ALTER TABLE messages ADD COLUMN {column} INTEGER DEFAULT {default}")
        conn.execute("ALTER TABLE messages ADD COLUMN holder TEXT DEFAULT ''")
        conn.execute("UPDATE messages SET idx=0, inc=1, lease_id=0, holder='', epoch=0, vn=0")
        conn.execute("CREATE TABLE catalog (name TEXT PRIMARY KEY, inc INTEGER, options BLOB,"
                     " dropped INTEGER, dropped_at FLOAT)")
        conn.execute("CREATE TABLE partitions (queue TEXT, idx INTEGER, promised INTEGER,"
                     " tally BLOB, PRIMARY KEY (queue, idx))")
        rows = conn.execute(
            "SELECT name, options, dead_lettered, expired, dropped FROM queues").fetchall()
        for name, options, dl, exp, dropped in rows:
            conn.execute("INSERT INTO catalog VALUES (?, 1, ?, 0, 0.0)", (name, options))
            tally = msgpack.packb({"v1": [dl or 0, exp or 0, dropped or 0]})
            conn.execute("INSERT INTO partitions VALUES (?, 0, 0, ?)", (name, tally))
        conn.execute("DROP TABLE queues")
        conn.execute("CREATE TABLE tombstones2 (queue TEXT, idx INTEGER, id TEXT, at FLOAT,"
                     " PRIMARY KEY (queue, idx, id))")
        conn.execute("INSERT INTO tombstones2 SELECT queue, 0, id, at FROM tombstones")
        conn.execute("DROP TABLE tombstones")
        conn.execute("ALTER TABLE tombstones2 RENAME TO tombstones")
        conn.execute("UPDATE meta SET value='2' WHERE key='schema_version'")
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


def connect(path: str | os.PathLike[str], *, schema: bool = True) -> sqlite3.Connection:
    """Open (and if new, create; if version 1, migrate) the store file with the pragmas
    meshq relies on. ``schema=False``: the daemon made it already (the writer process)."""
    conn = sqlite3.connect(os.fspath(path), isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA busy_timeout=10000")
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute(f"PRAGMA cache_size=-{CACHE_KIB}")
    if not schema:
        return conn
    tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master")}
    if "meta" in tables:
        row = conn.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
        version = int(row[0]) if row else SCHEMA_VERSION
        if version > SCHEMA_VERSION:
            conn.close()
            raise StartupError(f"{path} has schema version {version}; this meshqd knows up "
                               f"to {SCHEMA_VERSION}: upgrade meshqd")
        if version == 1:
            _migrate_1_to_2(conn)
    _create_schema(conn)
    return conn


# Ops that touch the dedup table besides OP_DEDUP itself.
_DEDUP_BARRIERS = frozenset((OP_DEDUP_PRUNE, OP_DROP_QUEUE))


def _grouped(ops: Sequence[Sequence[Any]]) -> Sequence[Sequence[Any]]:
    """``ops`` with each dedup entry moved after the ops that follow it, up to the next op
    that touches the dedup table: a send stages a message and its dedup entry in turn, and
    grouped, both become multi-row statements. Only those barrier ops (a prune, a queue
    drop) write the dedup table besides the entries, so the outcome is the same."""
    if not any(op[0] == OP_DEDUP for op in ops):
        return ops
    out: list[Sequence[Any]] = []
    held: list[Sequence[Any]] = []
    for op in ops:
        kind = op[0]
        if kind == OP_DEDUP:
            held.append(op)
            continue
        if held and kind in _DEDUP_BARRIERS:
            out += held
            held = []
        out.append(op)
    out += held
    return out


def apply(conn: sqlite3.Connection, ops: Sequence[Sequence[Any]]) -> None:
    """Apply ops ([kind, params] pairs) in order (but for the grouping of dedup entries,
    see _grouped), in one durable transaction."""
    ops = _grouped(ops)
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
                for sql, pick in _SQL[kind]:
                    conn.executemany(sql, params if pick is None else [pick(p) for p in params])
            i = j
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
