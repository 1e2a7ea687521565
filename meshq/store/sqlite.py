"""SQLiteStore: the node's durable state in one SQLite file (WAL, synchronous=FULL).

Schema and start-up load run in-process (sqlite-utils creates the schema); commits run in
a writer process (meshq.store._writer), one transaction per batch. Never: a batch reported
durable before the writer's COMMIT returned, or SQLite called on the event loop thread.
If the writer dies, ``run`` raises and the daemon stops rather than confirm nothing.
"""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any

import msgpack
import trio

from meshq.model import Message
from meshq.states import State
from meshq.store._sql import SCHEMA_VERSION, connect
from meshq.store.base import Op, Snapshot, Store, StoreFatal, StoreStatistics

__all__ = ["SCHEMA_VERSION", "SQLiteStore", "WriterDied"]


_pack = msgpack.Packer(use_bin_type=True).pack


class WriterDied(StoreFatal):
    """The writer process is gone; nothing more can be made durable."""


class SQLiteStore(Store):
    def __init__(self, path: str | os.PathLike[str]) -> None:
        super().__init__()
        self.path = os.fspath(path)
        connect(self.path).close()  # create the schema, check its version
        self._proc: trio.Process | None = None
        self._reply = bytearray()

    def load(self) -> Snapshot:
        conn = connect(self.path)
        try:
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
        finally:
            conn.close()

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        self._proc = await trio.lowlevel.open_process(
            [sys.executable, "-m", "meshq.store._writer", self.path],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        try:
            await super().run(task_status=task_status)
        finally:
            with trio.CancelScope(shield=True):
                await self._stop_writer()

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

    async def _commit(self, ops: list[Op]) -> None:
        proc = self._proc
        if proc is None or proc.stdin is None or proc.stdout is None:
            raise WriterDied("the store's writer process is not running")
        try:
            await proc.stdin.send_all(_pack(ops))
            buf = self._reply
            while not buf or (buf[0] != 0 and b"\n" not in buf):
                data = await proc.stdout.receive_some(65536)
                if not data:
                    raise WriterDied(f"the store's writer process exited ({proc.poll()})")
                buf += data
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise WriterDied(f"lost the store's writer process: {exc}") from None
        if buf[0] == 0:
            del buf[:1]
            return
        end = buf.index(b"\n")
        message = buf[1:end].decode(errors="replace")
        del buf[: end + 1]
        raise OSError(message)

    def statistics(self) -> StoreStatistics:
        size = 0
        for suffix in ("", "-wal", "-shm"):
            try:
                size += os.stat(self.path + suffix).st_size
            except OSError:
                pass
        return StoreStatistics(self.path, size, self.commits, self.ops_committed,
                               self.failed_commits, self.commit_seconds)
