"""SQLiteStore: the node's durable state in one SQLite file (WAL, synchronous=FULL).

Schema and start-up load run in-process (sqlite-utils creates the schema); commits run in
a writer process (meshq.store._writer), one transaction per batch; the backlog's pages
are read in a worker thread (``read_ready_async``), as are a replicated backlog's keys
(``scan_ready_async``) and the messages repair fetches by id or seq. Never: a batch
reported durable before the writer's COMMIT returned, or a read of a whole backlog on the
event loop thread (a point read by id there is the rare fallback of a merge or a dedup
hit into a cold message, meshq.broker.backlog).
If the writer dies, ``run`` raises and the daemon stops rather than confirm nothing.
The dedup filters saved at a clean stop sit in a file next to the store's, with a token
that the store's meta row ``dedup_filters`` must match; ``load`` (or ``run``, without a
load) deletes the file before anything more is written. Never: filters loaded that miss
a key written after they were saved.
"""

from __future__ import annotations

import logging
import os
import secrets
import select
import sqlite3
import struct
import subprocess
import sys
import threading
import zlib
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

import msgpack
import trio

from meshq.model import Message
from meshq.states import State
from meshq.store._sql import SCHEMA_VERSION, SKIPPED, connect
from meshq.store.base import Batch, Op, Snapshot, Store, StoreFatal, StoreStatistics

__all__ = ["SCHEMA_VERSION", "SQLiteStore", "WriterDied"]

log = logging.getLogger("meshq")


_pack = msgpack.Packer(use_bin_type=True).pack
PIPELINE_DEPTH = 2  # batches handed to the writer and not yet confirmed


_SELECT = ("SELECT seq, id, queue, body, headers, hlc, node, state, delivery_count, ready_at,"
           " expires_at, lease_deadline, idx, inc, lease_id, holder, epoch, vn FROM messages")
# A partition's READY messages: its queue, index and state go without saying.
_SELECT_READY = ("SELECT seq, id, body, headers, hlc, node, delivery_count, ready_at,"
                 " expires_at, lease_deadline, inc, lease_id, holder, epoch, vn FROM messages"
                 " WHERE state = 0 AND queue = ? AND idx = ?")
READER_CACHE_KIB = 8192  # the page cache of the connection that pages the backlog in
# A partition's READY messages after a key, keys only (a replicated backlog's digests and
# repair, meshq.broker.backlog): no body, no headers.
_SELECT_KEYS = ("SELECT seq, id, hlc, node, delivery_count, ready_at, expires_at,"
                " lease_deadline, inc, lease_id, holder, epoch, vn FROM messages"
                " WHERE state = 0 AND queue = ? AND idx = ? AND (hlc, seq) > (?, ?)")
IN_CHUNK = 500  # ids or seqs looked up per statement
_T = TypeVar("_T")
# The saved dedup filters' file: magic, token (as in meta), CRC-32 and length of the rest.
FILTERS_SUFFIX = ".dedup-filters"
FILTERS_META = "dedup_filters"
_FILTERS_MAGIC = b"meshqdf1"
_FILTERS_HEAD = struct.Struct("<8s16sIQ")


_STATES = tuple(State)  # (indexed by value: State(n) is an enum lookup, 5x slower)


def _messages(rows: Iterable[tuple[Any, ...]]) -> list[Message]:
    unpack = msgpack.unpackb
    states = _STATES
    out = []
    for (seq, mid, queue, body, headers, hlc, node, state, count, ready_at, expires_at,
         lease, idx, inc, lease_id, holder, epoch, vn) in rows:
        out.append(Message(seq, mid, queue, body, unpack(headers) if headers else {}, hlc,
                           node, states[state], count or 0, ready_at or 0.0, expires_at, lease,
                           idx or 0, inc or 0, lease_id or 0, holder or "", epoch or 0,
                           vn or 0))
    return out


def _ready_messages(rows: Iterable[tuple[Any, ...]], queue: str, index: int) -> list[Message]:
    """``_messages`` of rows read by ``_SELECT_READY`` (the backlog's pages: the hot path)."""
    unpack = msgpack.unpackb
    ready = State.READY
    return [Message(seq, mid, queue, body, unpack(headers) if headers else {}, hlc, node, ready,
                    count or 0, ready_at or 0.0, expires_at, lease, index, inc or 0,
                    lease_id or 0, holder or "", epoch or 0, vn or 0)
            for (seq, mid, body, headers, hlc, node, count, ready_at, expires_at, lease, inc,
                 lease_id, holder, epoch, vn) in rows]


def _key_messages(rows: Iterable[tuple[Any, ...]], queue: str, index: int
                  ) -> Iterator[Message]:
    """Rows read by ``_SELECT_KEYS`` as keys-only messages, one at a time."""
    ready = State.READY
    for (seq, mid, hlc, node, count, ready_at, expires_at, lease, inc, lease_id, holder,
         epoch, vn) in rows:
        yield Message(seq, mid, queue, b"", {}, hlc, node, ready, count or 0, ready_at or 0.0,
                      expires_at, lease, index, inc or 0, lease_id or 0, holder or "",
                      epoch or 0, vn or 0)


def _filters_problem(data: bytes, token: str | None) -> str:
    """What is wrong with a saved filters' file whose token should be ``token``; ""."""
    if len(data) < _FILTERS_HEAD.size:
        return "too short"
    magic, saved, crc, length = _FILTERS_HEAD.unpack_from(data)
    if magic != _FILTERS_MAGIC:
        return "not a filters file"
    if length != len(data) - _FILTERS_HEAD.size or crc != zlib.crc32(
            memoryview(data)[_FILTERS_HEAD.size:]):
        return "truncated or corrupt"
    if token is None or saved.hex() != token:
        return "not saved at the last stop: the store was written since"
    return ""


def _fsync_dir(path: str) -> None:
    fd = os.open(os.path.dirname(path) or ".", os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove_durably(path: str) -> None:
    os.remove(path)
    _fsync_dir(path)


class WriterDied(StoreFatal):
    """The writer process is gone; nothing more can be made durable."""


async def _ended(proc: trio.Process) -> str:
    """How the writer process ended, once it has (its pipe just closed)."""
    with trio.move_on_after(1):
        await proc.wait()
    code = proc.returncode
    if code is None:
        return "closed its pipe"
    return f"was killed by signal {-code}" if code < 0 else f"exited with status {code}"


class SQLiteStore(Store):
    pages = True

    def __init__(self, path: str | os.PathLike[str]) -> None:
        super().__init__()
        self.path = os.fspath(path)
        connect(self.path).close()  # create the schema, check its version
        self._proc: trio.Process | None = None
        self._reply_buf = bytearray()
        self._send_lock = trio.Lock()
        self._unanswered: deque[Batch] = deque()  # written to the writer, oldest first
        self._room = trio.Event()  # set when a batch was answered
        self._reader: sqlite3.Connection | None = None  # read_ready's (from any thread)
        self._read_lock = threading.Lock()
        self.filters_path = self.path + FILTERS_SUFFIX
        self._filters_taken = False  # the saved filters' file deleted (by load or run)

    def load(self, hot_ready: int | None = None) -> Snapshot:
        conn = connect(self.path)
        try:
            snap = Snapshot()
            unpack = msgpack.unpackb
            snap.meta = dict(conn.execute("SELECT key, value FROM meta"))
            filters = self._take_filters(snap.meta.get(FILTERS_META))
            for name, inc, options, dropped, dropped_at in conn.execute(
                    "SELECT name, inc, options, dropped, dropped_at FROM catalog"):
                snap.catalog.append((name, inc or 0, unpack(options) if options else None,
                                     dropped or 0, dropped_at or 0.0))
            for queue, idx, promised, tally in conn.execute(
                    "SELECT queue, idx, promised, tally FROM partitions"):
                snap.partitions.append((queue, idx, promised or 0,
                                        unpack(tally) if tally else {}))
            if hot_ready is None:
                snap.messages = _messages(conn.execute(f"{_SELECT} ORDER BY seq"))
            else:
                snap.messages = _messages(conn.execute(  # (leased, and the rest: DELAYED below)
                    f"{_SELECT} WHERE state > 0 AND state != 1"))
                delayed = conn.execute("SELECT queue, idx, COUNT(*) FROM messages"
                                       " WHERE state = 1 GROUP BY queue, idx").fetchall()
                for queue, idx, count in delayed:
                    head = _messages(conn.execute(
                        f"{_SELECT} WHERE state = 1 AND queue = ? AND idx = ?"
                        " ORDER BY ready_at, seq LIMIT ?", (queue, idx or 0, hot_ready)))
                    snap.messages += head
                    if count > len(head):
                        last = head[-1]
                        snap.late[queue, idx or 0] = (count - len(head),
                                                      (last.ready_at, last.seq))
                counts = conn.execute("SELECT queue, idx, COUNT(*) FROM messages"
                                      " WHERE state = 0 GROUP BY queue, idx").fetchall()
                for queue, idx, count in counts:
                    head = _ready_messages(conn.execute(
                        f"{_SELECT_READY} ORDER BY hlc, seq LIMIT ?",
                        (queue, idx or 0, hot_ready)), queue, idx or 0)
                    snap.messages += head
                    if count > len(head):
                        last = head[-1]
                        snap.cold[queue, idx or 0] = (count - len(head), (last.hlc, last.seq))
                        top = conn.execute("SELECT MAX(hlc) FROM messages WHERE state = 0"
                                           " AND queue = ? AND idx = ?", (queue, idx)).fetchone()
                        snap.max_hlc = max(snap.max_hlc, top[0] or 0)
                snap.messages.sort(key=lambda m: m.seq)
            snap.max_seq = conn.execute("SELECT MAX(seq) FROM messages").fetchone()[0] or 0
            if hot_ready is None:
                snap.dedup = list(conn.execute(
                    "SELECT queue, dedup_id, message_id, expires_at FROM dedup"))
                snap.tombstones = list(conn.execute(
                    "SELECT queue, idx, id, at FROM tombstones"))
            else:
                snap.dedup_on_disk = snap.tombs_on_disk = True
                snap.dedup_filters = filters
            return snap
        finally:
            conn.close()

    def _take_filters(self, token: str | None) -> bytes | None:
        """The saved dedup filters if their token is ``token`` (the store's), else None;
        the file is deleted either way (durably) before this returns."""
        self._filters_taken = True
        try:
            with open(self.filters_path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return None
        except OSError as exc:
            data, problem = b"", f"unreadable: {exc}"
        else:
            problem = _filters_problem(data, token)
        try:
            _remove_durably(self.filters_path)
        except OSError as exc:
            problem = problem or f"not deleted: {exc}"
        if problem:
            log.warning("ignoring the saved dedup filters %s (%s): rebuilding them from the"
                        " store", self.filters_path, problem)
            return None
        return data[_FILTERS_HEAD.size:]

    def save_dedup_filters(self, filters: bytes) -> None:
        """Write the file (fsynced, renamed into place), then its token to meta: a crash
        between the two leaves a file whose token does not match. A failure is logged
        (the next start rebuilds the filters), not raised: the stop was clean."""
        if self._proc is not None and self._proc.returncode is None:
            raise RuntimeError("save_dedup_filters while the writer runs")
        try:
            self._save_filters(filters)
        except (OSError, sqlite3.Error) as exc:
            log.warning("could not save the dedup filters to %s (%s): the next start"
                        " rebuilds them", self.filters_path, exc)

    def _save_filters(self, filters: bytes) -> None:
        token = secrets.token_bytes(16)
        tmp = self.filters_path + ".tmp"
        with open(tmp, "wb") as f:
            f.write(_FILTERS_HEAD.pack(_FILTERS_MAGIC, token, zlib.crc32(filters),
                                       len(filters)))
            f.write(filters)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.filters_path)
        _fsync_dir(self.filters_path)
        conn = connect(self.path, schema=False)
        try:
            conn.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)",
                         (FILTERS_META, token.hex()))
        finally:
            conn.close()

    def _read(self, sql: str, params: tuple[Any, ...]) -> list[Any]:
        with self._read_lock:
            if self._reader is None:
                self._reader = sqlite3.connect(self.path, isolation_level=None,
                                               check_same_thread=False)
                self._reader.execute("PRAGMA query_only=1")
                self._reader.execute(f"PRAGMA cache_size=-{READER_CACHE_KIB}")
            return self._reader.execute(sql, params).fetchall()

    def read_tombs(self, queue: str, index: int) -> list[tuple[str, float]]:
        return self._read("SELECT id, at FROM tombstones WHERE queue = ? AND idx = ?",
                          (queue, index))

    async def read_tombs_async(self, queue: str, index: int) -> list[tuple[str, float]]:
        return await trio.to_thread.run_sync(self.read_tombs, queue, index)

    def read_dedup(self, queue: str, dedup_id: str) -> tuple[str, float] | None:
        rows = self._read("SELECT message_id, expires_at FROM dedup WHERE queue = ?"
                          " AND dedup_id = ?", (queue, dedup_id))
        return (rows[0][0], rows[0][1]) if rows else None

    def dedup_keys(self, after: int, limit: int) -> list[tuple[int, str, str, float]]:
        return self._read("SELECT rowid, queue, dedup_id, expires_at FROM dedup"
                          " WHERE rowid > ? ORDER BY rowid LIMIT ?", (after, limit))

    async def dedup_keys_async(self, after: int,
                               limit: int) -> list[tuple[int, str, str, float]]:
        return await trio.to_thread.run_sync(self.dedup_keys, after, limit)

    def read_delayed(self, queue: str, index: int, after: tuple[float, int],
                     limit: int) -> list[Message]:
        return _messages(self._read(
            f"{_SELECT} WHERE state = 1 AND queue = ? AND idx = ?"
            " AND (ready_at, seq) > (?, ?) ORDER BY ready_at, seq LIMIT ?",
            (queue, index, after[0], after[1], limit)))

    async def read_delayed_async(self, queue: str, index: int, after: tuple[float, int],
                                 limit: int) -> list[Message]:
        return await trio.to_thread.run_sync(self.read_delayed, queue, index, after, limit)

    def read_ready(self, queue: str, index: int, after: tuple[int, int],
                   limit: int) -> list[Message]:
        return _ready_messages(self._read(
            f"{_SELECT_READY} AND (hlc, seq) > (?, ?) ORDER BY hlc, seq LIMIT ?",
            (queue, index, after[0], after[1], limit)), queue, index)

    async def read_ready_async(self, queue: str, index: int, after: tuple[int, int],
                               limit: int) -> list[Message]:
        return await trio.to_thread.run_sync(self.read_ready, queue, index, after, limit)

    def scan_ready(self, queue: str, index: int, after: tuple[int, int],
                   fold: Callable[[Iterator[Message]], _T], max_seq: int | None = None) -> _T:
        # A connection of its own: a long scan does not hold up the pages of others.
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        try:
            conn.execute("PRAGMA query_only=1")
            sql = _SELECT_KEYS + (" AND seq <= ?" if max_seq is not None else "")
            params: tuple[Any, ...] = (queue, index, after[0], after[1])
            if max_seq is not None:
                params += (max_seq,)
            cursor = conn.execute(sql + " ORDER BY hlc, seq", params)
            return fold(_key_messages(cursor, queue, index))
        finally:
            conn.close()

    async def scan_ready_async(self, queue: str, index: int, after: tuple[int, int],
                               fold: Callable[[Iterator[Message]], _T],
                               max_seq: int | None = None) -> _T:
        return await trio.to_thread.run_sync(self.scan_ready, queue, index, after, fold,
                                             max_seq)

    def read_ids(self, queue: str, index: int, ids: Iterable[str]) -> list[Message]:
        wanted = list(dict.fromkeys(ids))
        out: list[Message] = []
        for start in range(0, len(wanted), IN_CHUNK):
            part = wanted[start:start + IN_CHUNK]
            out += _messages(self._read(
                f"{_SELECT} WHERE queue = ? AND idx = ? AND id IN ({','.join('?' * len(part))})",
                (queue, index, *part)))
        return out

    async def read_ids_async(self, queue: str, index: int, ids: Iterable[str]) -> list[Message]:
        return await trio.to_thread.run_sync(self.read_ids, queue, index, list(ids))

    def read_seqs(self, seqs: Iterable[int]) -> list[Message]:
        wanted = sorted(set(seqs))
        out: list[Message] = []
        for start in range(0, len(wanted), IN_CHUNK):
            part = wanted[start:start + IN_CHUNK]
            out += _messages(self._read(
                f"{_SELECT} WHERE seq IN ({','.join('?' * len(part))})", tuple(part)))
        return out

    async def read_seqs_async(self, seqs: Iterable[int]) -> list[Message]:
        return await trio.to_thread.run_sync(self.read_seqs, list(seqs))

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Commit batches through the writer process, PIPELINE_DEPTH of them in flight:
        the writer starts on the next batch while the daemon answers the last one."""
        if not self._filters_taken:  # (no load: the saved filters go before any write)
            await trio.to_thread.run_sync(self._take_filters, None)
        self._proc = await trio.lowlevel.open_process(
            [sys.executable, "-m", "meshq.store._writer", self.path],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._confirm)
                task_status.started()
                while True:
                    while len(self._unanswered) >= PIPELINE_DEPTH:
                        self._room = trio.Event()
                        await self._room.wait()
                    batch = await self.next_batch()
                    self._unanswered.append(batch)  # (before the reply can come)
                    await self._send(batch.ops)
        finally:
            self.abandon()
            with trio.CancelScope(shield=True):
                await self._stop_writer()

    def ship_now(self) -> None:
        """Nothing in flight and a small open batch: write it to the idle writer's pipe
        here, in one write that the pipe takes whole (PIPE_BUF), or leave it to ``run``."""
        proc = self._proc
        if (not self._open.ops or self._inflight or self._sealed or proc is None
                or proc.stdin is None or self._send_lock.locked()):
            return
        if self._open.body_bytes > select.PIPE_BUF or len(self._open.ops) > 64:
            return  # (surely too big: not worth packing twice)
        data = _pack(self._open.ops)
        if len(data) > select.PIPE_BUF:
            return
        try:
            written = os.write(proc.stdin.fileno(), data)  # type: ignore[attr-defined]
        except BlockingIOError:
            return  # (an idle writer's pipe is empty; if not, run sends it)
        except OSError:
            return  # run's own write reports the lost writer
        assert written == len(data)  # a write of at most PIPE_BUF bytes is all or nothing
        batch, self._open = self._open, Batch()
        self._unanswered.append(self._take(batch))

    async def _confirm(self) -> None:
        while True:
            error = await self._reply()
            batch = self._unanswered.popleft()
            self._room.set()
            if error is not None and not str(error).startswith(SKIPPED):
                # The writer now refuses what was sent after the failed batch (it may
                # build on it) until this marker tells it that we know.
                await self._send(None)
            self.finish(batch, error)

    async def _stop_writer(self) -> None:
        proc = self._proc
        if proc is None:
            return
        if proc.stdin is not None:
            await proc.stdin.aclose()  # EOF: the writer exits after its current commit
        with trio.move_on_after(5):
            await proc.wait()
        if proc.returncode is None:
            proc.kill()
            await proc.wait()

    async def _send(self, ops: list[Op] | None) -> None:
        proc = self._proc
        assert proc is not None and proc.stdin is not None
        try:
            async with self._send_lock:
                await proc.stdin.send_all(_pack(ops))
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise WriterDied(f"lost the store's writer process: {exc}") from None

    async def _reply(self) -> OSError | None:
        """The writer's answer to the oldest batch sent: None once it committed."""
        proc = self._proc
        assert proc is not None and proc.stdout is not None
        buf = self._reply_buf
        try:
            while not buf or (buf[0] != 0 and b"\n" not in buf):
                data = await proc.stdout.receive_some(65536)
                if not data:
                    raise WriterDied(f"the store's writer process {await _ended(proc)}")
                buf += data
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise WriterDied(f"lost the store's writer process: {exc}") from None
        if buf[0] == 0:
            del buf[:1]
            return None
        end = buf.index(b"\n")
        message = buf[1:end].decode(errors="replace")
        del buf[: end + 1]
        return OSError(message)

    async def _commit(self, ops: list[Op]) -> None:
        await self._send(ops)
        error = await self._reply()
        if error is not None:
            raise error

    def helper_pids(self) -> tuple[int, ...]:
        proc = self._proc  # (its returncode would reap it: a dead pid just reads as 0 B)
        return () if proc is None else (proc.pid,)

    def close(self) -> None:
        with self._read_lock:
            if self._reader is not None:
                self._reader.close()
                self._reader = None

    def statistics(self) -> StoreStatistics:
        size = 0
        for suffix in ("", "-wal", "-shm"):
            try:
                size += os.stat(self.path + suffix).st_size
            except OSError:
                pass
        return StoreStatistics(self.path, size, self.commits, self.ops_committed,
                               self.failed_commits, self.commit_seconds)
