"""Load-generator workers for tools/bench.py: each runs in its own (spawned) process.

A worker opens its connections, reports ("ready", wid), waits for the shared ``go``
event, runs its load with trio + meshq.AsyncClient, and reports ("result", wid, dict)
or ("error", wid, traceback). Progress goes to the parent as ("progress", wid, n).
Timestamps that cross processes are ``time.monotonic_ns()`` (CLOCK_MONOTONIC, system
wide on Linux); latency is measured inside one process with ``time.perf_counter_ns()``.
"""

from __future__ import annotations

import array
import os
import sqlite3
import time
import traceback
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import trio

from meshq import AsyncClient, Delivery
from meshq.store import SQLiteStore

BODY = b"m" * 256
REPORT_EVERY = 0.2  # seconds between progress reports to the parent


class Reporter:
    """The worker's side of the parent channel: progress counts and the stop flag."""

    def __init__(self, wid: int, q: Any, stop: Any) -> None:
        self.wid, self.q, self.stop = wid, q, stop
        self.count = 0  # what the parent's progress bar counts
        self._sent = 0

    def flush(self) -> None:
        if self.count != self._sent:
            self.q.put(("progress", self.wid, self.count - self._sent))
            self._sent = self.count

    async def run(self, cancel: trio.CancelScope) -> None:
        """Report progress until the parent sets ``stop``; then cancel the load."""
        while True:
            await trio.sleep(REPORT_EVERY)
            self.flush()
            if self.stop.is_set():
                cancel.cancel()
                return


def _samples(values: array.array) -> bytes:
    return values.tobytes()


def _with_rest_of_push(sub: Any, first: Delivery) -> list[Delivery]:
    """``first`` and the deliveries already in the subscription's channel (the rest of its
    push), so that one ack request covers a push. AsyncSubscription has no public
    non-blocking receive; without the private channel this degrades to one at a time."""
    out = [first]
    channel = getattr(sub, "_receive", None)
    while channel is not None:
        try:
            item = channel.receive_nowait()
        except (trio.WouldBlock, trio.EndOfChannel):
            break
        if item is None:
            break
        out.append(item)
    return out


async def _connect(stack: AsyncExitStack, socket: str, n: int) -> list[AsyncClient]:
    return [await stack.enter_async_context(AsyncClient(socket)) for _ in range(n)]


async def _publish(p: dict[str, Any], rep: Reporter, go: Callable[[], Awaitable[None]],
                   ) -> dict[str, Any]:
    """``conns`` connections, each keeping ``window`` send requests of ``batch`` in flight."""
    batch, window, queue = p["batch"], p["window"], p["queue"]
    bodies = [BODY] * batch
    latencies = array.array("q")  # confirm latency of each request, ns
    state = {"confirmed": 0, "requests": 0, "t_last": 0}
    async with AsyncExitStack() as stack:
        clients = await _connect(stack, p["socket"], p["conns"])
        await go()
        t_first = time.monotonic_ns()
        deadline = t_first + int(p["duration"] * 1e9) if p["duration"] else None
        budget = [p["messages_per_conn"]] * len(clients) if p["messages_per_conn"] else None

        async def slot(i: int, client: AsyncClient) -> None:
            while True:
                if budget is not None:
                    if budget[i] < batch:
                        return
                    budget[i] -= batch
                elif time.monotonic_ns() >= deadline:  # type: ignore[operator]
                    return
                t0 = time.perf_counter_ns()
                if batch == 1:
                    await client.send(queue, BODY)
                else:
                    await client.send_batch(queue, bodies)
                latencies.append(time.perf_counter_ns() - t0)
                state["confirmed"] += batch
                state["requests"] += 1
                state["t_last"] = time.monotonic_ns()
                rep.count += batch

        async with trio.open_nursery() as nursery:
            done = trio.CancelScope()
            nursery.start_soon(rep.run, done)
            with done:
                async with trio.open_nursery() as load:
                    for i, client in enumerate(clients):
                        for _ in range(window):
                            load.start_soon(slot, i, client)
            nursery.cancel_scope.cancel()
    return {**state, "t_first": t_first, "latency_ns": _samples(latencies)}


async def _consume(p: dict[str, Any], rep: Reporter, go: Callable[[], Awaitable[None]],
                   ) -> dict[str, Any]:
    """``conns`` subscriptions with ``prefetch``; each push is acked in one pipelined ack."""
    queue, prefetch = p["queue"], p["prefetch"]
    state = {"acked": 0, "delivered": 0, "acks": 0, "t_last": 0}
    async with AsyncExitStack() as stack:
        clients = await _connect(stack, p["socket"], p["conns"])
        await go()
        t_first = time.monotonic_ns()

        async def ack(client: AsyncClient, ids: list[str], window: trio.Semaphore) -> None:
            try:
                await client.ack(queue, ids)
            finally:
                window.release()
            state["acked"] += len(ids)
            state["acks"] += 1
            state["t_last"] = time.monotonic_ns()
            rep.count += len(ids)

        async def consumer(client: AsyncClient) -> None:
            window = trio.Semaphore(p["ack_window"])
            async with trio.open_nursery() as acks, client.consume(queue, prefetch) as sub:
                async for d in sub:
                    ids = [m.id for m in _with_rest_of_push(sub, d)]
                    state["delivered"] += len(ids)
                    await window.acquire()
                    acks.start_soon(ack, client, ids, window)

        async with trio.open_nursery() as nursery:
            done = trio.CancelScope()
            nursery.start_soon(rep.run, done)
            with done:
                async with trio.open_nursery() as load:
                    for client in clients:
                        load.start_soon(consumer, client)
            nursery.cancel_scope.cancel()
    return {**state, "t_first": t_first}


async def _prefill(p: dict[str, Any], rep: Reporter, go: Callable[[], Awaitable[None]],
                   ) -> dict[str, Any]:
    return await _publish({**p, "batch": 100, "window": 8, "conns": 1, "duration": None,
                           "messages_per_conn": p["messages"]}, rep, go)


async def _latency(p: dict[str, Any], rep: Reporter, go: Callable[[], Awaitable[None]],
                   ) -> dict[str, Any]:
    """Open loop: send i at t0 + i/rate, whatever happened to earlier sends; a consumer
    on a second connection of this process records receive time minus scheduled time."""
    queue, rate = p["queue"], p["rate"]
    total = int(rate * (p["warmup"] + p["measure"]))
    step = 1e9 / rate
    e2e, e2e_actual, confirm, lag = (array.array("q") for _ in range(4))
    state = {"sent": 0, "confirmed": 0, "received": 0, "errors": 0}
    async with AsyncExitStack() as stack:
        producer, consumer = await _connect(stack, p["socket"], 2)
        received_all = trio.Event()
        measure_from = 0

        async def consume(task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
            async with trio.open_nursery() as acks, consumer.consume(queue, 100) as sub:
                task_status.started()
                async for d in sub:
                    batch = _with_rest_of_push(sub, d)
                    now = time.perf_counter_ns()
                    for m in batch:
                        sched, actual = m.headers["s"], m.headers["a"]
                        if sched >= measure_from:
                            e2e.append(now - sched)
                            e2e_actual.append(now - actual)
                    state["received"] += len(batch)
                    rep.count += len(batch)
                    acks.start_soon(consumer.ack, queue, [m.id for m in batch])
                    if state["received"] >= total:
                        received_all.set()

        async def send_one(sched: int) -> None:
            actual = time.perf_counter_ns()
            lag.append(actual - sched)
            state["sent"] += 1
            try:
                await producer.send(queue, BODY, headers={"s": sched, "a": actual})
            except Exception:
                state["errors"] += 1
                return
            state["confirmed"] += 1
            if sched >= measure_from:
                confirm.append(time.perf_counter_ns() - sched)

        async with trio.open_nursery() as nursery:
            await nursery.start(consume)
            done = trio.CancelScope()
            nursery.start_soon(rep.run, done)
            await go()
            t0 = time.perf_counter_ns() + 1_000_000
            measure_from = t0 + int(p["warmup"] * 1e9)
            with done:
                async with trio.open_nursery() as sends:
                    for i in range(total):
                        sched = t0 + int(i * step)
                        wait = sched - time.perf_counter_ns()
                        if wait > 0:
                            await trio.sleep(wait / 1e9)
                        else:  # behind schedule: catch up, but let the confirms in
                            await trio.lowlevel.checkpoint()
                        sends.start_soon(send_one, sched)
                with trio.move_on_after(p["drain_timeout"]):
                    await received_all.wait()
            nursery.cancel_scope.cancel()
    return {**state, "total": total, "e2e_ns": _samples(e2e),
            "e2e_actual_ns": _samples(e2e_actual), "confirm_ns": _samples(confirm),
            "lag_ns": _samples(lag)}


# ----------------------------------------------------------------------------- parent side
def pct(samples: array.array | list[int], scale: float = 1e6) -> dict[str, float] | None:
    """p50/p99/p999/max of nanosecond samples, in ms (scale 1e6)."""
    if not samples:
        return None
    s = sorted(samples)
    n = len(s)

    def at(q: float) -> float:
        return round(s[min(n - 1, int(q * n))] / scale, 3)

    return {"p50": at(0.50), "p99": at(0.99), "p999": at(0.999), "max": round(s[-1] / scale, 3),
            "mean": round(sum(s) / n / scale, 3), "n": n}


def merge(results: list[dict[str, Any]], key: str) -> array.array:
    out = array.array("q")
    for r in results:
        out.frombytes(r[key])
    return out


def sqlite_ceiling(directory: Path, rows_per_commit: int, seconds: float) -> dict[str, Any]:
    """Insert 256-byte rows into a copy of meshq's messages table, ``rows_per_commit`` rows
    per transaction, for ``seconds``; rows/s and the commit latency."""
    schema_db = directory / "schema.db"
    if not schema_db.exists():
        SQLiteStore(schema_db)  # creates meshq's own schema: the shape follows the code
    src = sqlite3.connect(schema_db)
    ddl = [sql for (sql,) in src.execute(
        "SELECT sql FROM sqlite_master WHERE tbl_name='messages' AND sql IS NOT NULL")]
    columns = [(name, notnull) for _, name, _, notnull, _, _
               in src.execute("PRAGMA table_info(messages)")]
    src.close()
    path = directory / f"ceiling-{rows_per_commit}.db"
    conn = sqlite3.connect(path, isolation_level=None)
    for pragma in ("journal_mode=WAL", "synchronous=FULL", "cache_size=-65536"):
        conn.execute(f"PRAGMA {pragma}")
    for sql in ddl:
        conn.execute(sql)
    names = [c[0] for c in columns]
    insert = (f"INSERT OR REPLACE INTO messages ({', '.join(names)}) "
              f"VALUES ({', '.join('?' * len(names))})")
    known = {"id": "", "queue": "bench", "hlc": 0, "node": "ceiling", "body": BODY,
             "headers": None, "state": 0, "delivery_count": 0, "ready_at": 0.0}
    template = [known.get(name, 0 if notnull else None) for name, notnull in columns]
    i_seq, i_id = names.index("seq"), names.index("id")
    commits = array.array("q")
    seq = 0
    t_first = time.perf_counter_ns()
    t_end = t_first + int(seconds * 1e9)
    while time.perf_counter_ns() < t_end:
        rows = []
        for _ in range(rows_per_commit):
            seq += 1
            row = list(template)
            row[i_seq], row[i_id] = seq, f"{seq:016x}-ceiling"
            rows.append(row)
        t0 = time.perf_counter_ns()
        conn.execute("BEGIN IMMEDIATE")
        if rows_per_commit == 1:
            conn.execute(insert, rows[0])
        else:
            conn.executemany(insert, rows)
        conn.execute("COMMIT")
        commits.append(time.perf_counter_ns() - t0)
    wall = (time.perf_counter_ns() - t_first) / 1e9
    conn.close()
    return {"rows_per_commit": rows_per_commit, "rows": seq, "commits": len(commits),
            "wall_s": round(wall, 3), "rows_per_s": round(seq / wall), "commit_ms": pct(commits)}




def _ticks(fields: list[str]) -> int:
    return int(fields[11]) + int(fields[12])  # utime + stime, after "pid (comm)"


def tree_cpu(pid: int) -> tuple[float, float]:
    """CPU seconds of process ``pid`` and of all its descendants (e.g. a writer process)."""
    stats: dict[int, list[str]] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                with open(f"/proc/{entry.name}/stat") as f:
                    stats[int(entry.name)] = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
    children: dict[int, list[int]] = {}
    for p, fields in stats.items():
        children.setdefault(int(fields[1]), []).append(p)
    own = _ticks(stats[pid]) if pid in stats else 0
    rest, todo = 0, list(children.get(pid, []))
    while todo:
        p = todo.pop()
        rest += _ticks(stats[p])
        todo += children.get(p, [])
    hz = os.sysconf("SC_CLK_TCK")
    return own / hz, rest / hz


def host_cpu() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine since boot, from /proc/stat."""
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
    total = sum(values[:8])  # guest time is already counted in user
    hz = os.sysconf("SC_CLK_TCK")
    return (total - idle) / hz, total / hz


KINDS = {"publish": _publish, "consume": _consume, "prefill": _prefill, "latency": _latency}


def worker_main(kind: str, wid: int, params: dict[str, Any], q: Any, go: Any,
                stop: Any) -> None:
    """Process entry point (multiprocessing, spawn)."""
    rep = Reporter(wid, q, stop)

    cpu0 = [0.0]

    async def wait_go() -> None:
        q.put(("ready", wid))
        await trio.to_thread.run_sync(go.wait)  # the parent kills us if it gives up
        cpu0[0] = time.process_time()

    try:
        result = trio.run(KINDS[kind], params, rep, wait_go)
        rep.flush()
        result["cpu_s"] = time.process_time() - cpu0[0]
        q.put(("result", wid, result))
    except BaseException:
        q.put(("error", wid, traceback.format_exc()))
