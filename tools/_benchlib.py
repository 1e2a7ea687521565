"""What tools/bench.py runs and computes: load-generator workers, measurements, the report.

Workers run in spawned processes: each opens its connections, reports ("ready", wid),
waits for the shared ``go`` event, runs its load with trio + meshq.AsyncClient, and
reports ("result", wid, dict) or ("error", wid, traceback); progress goes to the parent
as ("progress", wid, n). Timestamps that cross processes are ``time.monotonic_ns()``
(CLOCK_MONOTONIC, system wide on Linux); latency is measured inside one process with
``time.perf_counter_ns()``. A worker's ``sockets`` list its connections' daemons,
round-robin (one entry on a single node). The rest is for the parent: percentiles, the
SQLite ceiling, CPU accounting from /proc, the targets, and the single-node tables (the
cluster's and the simulated network's are in tools/_benchmesh.py).
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

from meshq import AsyncClient, Delivery, MeshqError
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

    async def run(self, on_stop: Callable[[], None]) -> None:
        """Report progress until cancelled; call ``on_stop`` once the parent says stop."""
        stopped = False
        while True:
            await trio.sleep(REPORT_EVERY)
            self.flush()
            if not stopped and self.stop.is_set():
                stopped = True
                on_stop()


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


async def _connect(stack: AsyncExitStack, sockets: list[str], n: int) -> list[AsyncClient]:
    """``n`` connections, round-robin over ``sockets`` (one daemon each)."""
    return [await stack.enter_async_context(AsyncClient(sockets[i % len(sockets)]))
            for i in range(n)]


async def _subscribe(client: AsyncClient, queue: str, prefetch: int, ack_window: int,
                     on_push: Callable[[list[Delivery]], bool], on_acked: Callable[[int], None],
                     receiving: trio.CancelScope,
                     task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
    """Subscribe; hand each push to ``on_push`` and ack it with one pipelined request (at
    most ``ack_window`` in flight). It stops receiving when ``receiving`` is cancelled or
    ``on_push`` returns True; then it cancels the subscription and waits for its acks, so
    the connection closes with nothing left for the daemon to write."""
    window = trio.Semaphore(ack_window)

    async def ack(ids: list[str]) -> None:
        try:
            await client.ack(queue, ids)
        finally:
            window.release()
        on_acked(len(ids))

    async with trio.open_nursery() as acks, client.consume(queue, prefetch) as sub:
        task_status.started()
        with receiving:
            async for d in sub:
                batch = _with_rest_of_push(sub, d)
                done = on_push(batch)
                await window.acquire()
                acks.start_soon(ack, [m.id for m in batch])
                if done:
                    break


async def _publish(p: dict[str, Any], rep: Reporter, go: Callable[[], Awaitable[None]],
                   ) -> dict[str, Any]:
    """``conns`` connections, each keeping ``window`` send requests of ``batch`` in flight.
    Only confirmed messages count; a slot whose send the daemon refuses (or whose
    connection fails) stops, and its batch counts as unconfirmed, with the first error."""
    batch, window, queue = p["batch"], p["window"], p["queue"]
    bodies = [BODY] * batch
    latencies = array.array("q")  # confirm latency of each request, ns
    state = {"confirmed": 0, "requests": 0, "t_last": 0, "unconfirmed": 0}
    first_error: list[str] = []
    async with AsyncExitStack() as stack:
        clients = await _connect(stack, p["sockets"], p["conns"])
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
                try:
                    if batch == 1:
                        await client.send(queue, BODY)
                    else:
                        await client.send_batch(queue, bodies)
                except MeshqError as exc:
                    state["unconfirmed"] += batch
                    if not first_error:
                        first_error.append(str(exc))
                    return
                latencies.append(time.perf_counter_ns() - t0)
                state["confirmed"] += batch
                state["requests"] += 1
                state["t_last"] = time.monotonic_ns()
                rep.count += batch

        async with trio.open_nursery() as nursery:
            async with trio.open_nursery() as load:
                nursery.start_soon(rep.run, load.cancel_scope.cancel)
                for i, client in enumerate(clients):
                    for _ in range(window):
                        load.start_soon(slot, i, client)
            nursery.cancel_scope.cancel()
    return {**state, "t_first": t_first, "latency_ns": _samples(latencies),
            "first_error": first_error[0] if first_error else None}


async def _consume(p: dict[str, Any], rep: Reporter, go: Callable[[], Awaitable[None]],
                   ) -> dict[str, Any]:
    """``conns`` subscriptions with ``prefetch``, until the parent says all were acked."""
    state = {"acked": 0, "delivered": 0, "acks": 0, "t_last": 0}
    scopes = [trio.CancelScope() for _ in range(p["conns"])]

    def on_push(batch: list[Delivery]) -> bool:
        state["delivered"] += len(batch)
        return False

    def on_acked(n: int) -> None:
        state["acked"] += n
        state["acks"] += 1
        state["t_last"] = time.monotonic_ns()
        rep.count += n

    def stop() -> None:
        for scope in scopes:
            scope.cancel()

    async with AsyncExitStack() as stack:
        clients = await _connect(stack, p["sockets"], p["conns"])
        await go()
        t_first = time.monotonic_ns()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(rep.run, stop)
            async with trio.open_nursery() as load:
                for client, scope in zip(clients, scopes, strict=True):
                    load.start_soon(_subscribe, client, p["queue"], p["prefetch"],
                                    p["ack_window"], on_push, on_acked, scope)
            nursery.cancel_scope.cancel()
    return {**state, "t_first": t_first}


async def _prefill(p: dict[str, Any], rep: Reporter, go: Callable[[], Awaitable[None]],
                   ) -> dict[str, Any]:
    return await _publish({**p, "batch": 100, "window": 8, "conns": 1, "duration": None,
                           "messages_per_conn": p["messages"]}, rep, go)


async def _latency(p: dict[str, Any], rep: Reporter, go: Callable[[], Awaitable[None]],
                   ) -> dict[str, Any]:
    """Open loop: send i at t0 + i/rate, whatever happened to earlier sends; a consumer
    on a second connection of this process records receive time minus scheduled time.
    ``sockets``: [producer's daemon, consumer's daemon] (the same one on a single node)."""
    queue, rate = p["queue"], p["rate"]
    total = int(rate * (p["warmup"] + p["measure"]))
    step = 1e9 / rate
    e2e, e2e_actual, confirm, lag = (array.array("q") for _ in range(4))
    state = {"sent": 0, "confirmed": 0, "received": 0, "errors": 0}
    first_error: list[str] = []
    measure_from = 0
    receiving = trio.CancelScope()

    def on_push(batch: list[Delivery]) -> bool:
        now = time.perf_counter_ns()
        for m in batch:
            sched, actual = m.headers["s"], m.headers["a"]
            if sched >= measure_from:
                e2e.append(now - sched)
                e2e_actual.append(now - actual)
        state["received"] += len(batch)
        rep.count += len(batch)
        return state["received"] >= total

    async def send_one(producer: AsyncClient, sched: int) -> None:
        actual = time.perf_counter_ns()
        lag.append(actual - sched)
        state["sent"] += 1
        try:
            await producer.send(queue, BODY, headers={"s": sched, "a": actual})
        except Exception as exc:
            state["errors"] += 1
            if not first_error:
                first_error.append(f"{type(exc).__name__}: {exc}")
            return
        state["confirmed"] += 1
        if sched >= measure_from:
            confirm.append(time.perf_counter_ns() - sched)

    async with AsyncExitStack() as stack:
        producer, consumer = await _connect(stack, p["sockets"], 2)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(rep.run, receiving.cancel)
            async with trio.open_nursery() as load:
                await load.start(_subscribe, consumer, queue, 100, 1 << 16, on_push,
                                 lambda n: None, receiving)
                await go()
                t0 = time.perf_counter_ns() + 1_000_000
                measure_from = t0 + int(p["warmup"] * 1e9)
                async with trio.open_nursery() as sends:
                    for i in range(total):
                        sched = t0 + int(i * step)
                        wait = sched - time.perf_counter_ns()
                        if wait > 0:
                            await trio.sleep(wait / 1e9)
                        else:  # behind schedule: catch up, but let the confirms in
                            await trio.lowlevel.checkpoint()
                        sends.start_soon(send_one, producer, sched)
                receiving.deadline = trio.current_time() + p["drain_timeout"]
            nursery.cancel_scope.cancel()
    return {**state, "total": total, "first_error": first_error[0] if first_error else None,
            "e2e_ns": _samples(e2e),
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


# ----------------------------------------------------------------------------- report
# What the issue asks for; key -> (comparison, threshold).
TARGETS: dict[str, tuple[str, float]] = {
    "publish_p8_b1": (">=", 25_000),
    "publish_p8_b100": (">=", 150_000),
    "consume_c1": (">=", 40_000),
    "consume_c4": (">=", 40_000),
    "latency_p99_ms": ("<=", 2.0),
    "cluster_publish_ratio": (">=", 0.45),  # of the single node's, same run (--nodes)
    "cluster_latency_p99_ms": ("<=", 25.0),
}


def judge(key: str, value: float) -> tuple[str, str]:
    if key not in TARGETS:
        return "", ""
    op, threshold = TARGETS[key]
    ok = value >= threshold if op == ">=" else value <= threshold  # NaN: no figure, FAIL
    unit = " ms" if key.endswith("_ms") else ""
    return f"{op} {threshold:,g}{unit}", "PASS" if ok else "FAIL"


def annotate(result: dict[str, Any]) -> None:
    """Ratios to the SQLite ceiling and pass/fail against the targets, in place."""
    ceiling = result["sqlite_ceiling"]
    c100, c1 = ceiling["batch_100"]["rows_per_s"], ceiling["batch_1"]["rows_per_s"]
    for key, s in result["scenarios"].items():
        if s["kind"] == "latency":
            commit = ceiling["batch_1"]["commit_ms"]
            if s["e2e_ms"] and commit:
                s["ratio_to_sqlite_commit_latency"] = {
                    q: round(s["e2e_ms"][q] / commit[q], 2) if commit[q] else None
                    for q in ("p50", "p99")}
                s["target"], s["pass"] = judge("latency_p99_ms", s["e2e_ms"]["p99"])
            continue
        s["ratio_to_ceiling"] = round(s["msg_per_s"] / c100, 3)
        if s.get("batch") == 1:
            s["ratio_to_ceiling_1_row_per_commit"] = round(s["msg_per_s"] / c1, 3)
        s["target"], s["pass"] = judge(key, s["msg_per_s"])


def scenario_label(s: dict[str, Any]) -> str:
    if s["kind"] == "publish":
        return f"publish, {s['producers']} producer(s), batch {s['batch']}"
    if s["kind"] == "consume":
        return f"consume+ack, {s['consumers']} consumer(s), prefetch {s['prefetch']}"
    return f"e2e latency @ {s['offered_msg_per_s']:,} msg/s"


def cpu_cell(s: dict[str, Any]) -> str:
    c = s.get("accounting")
    if not c:
        return ""
    return (f"{c['daemon']:.2f} + {c['daemon_children']:.2f} / {c['load_generator']:.2f}"
            f" / {c['other_processes']:.2f}")


def _store(s: dict[str, Any]) -> str:
    st = (s.get("accounting") or {}).get("store")
    if not st:
        return ""
    return (f"{st['ops_per_commit']:,.0f} ops, {st['commit_ms_mean']:.1f} ms, "
            f"{100 * st['committing_fraction']:.0f}%")


def table(result: dict[str, Any]) -> str:
    """The markdown summary: one row per figure."""
    ceiling = result["sqlite_ceiling"]
    c100, c1 = ceiling["batch_100"], ceiling["batch_1"]
    rows = [["scenario", "msg/s", "ratio to SQLite ceiling", "target", "pass/fail",
             "CPU cores: meshqd + writer / load gen / other",
             "commits: ops/commit, mean time, time committing"],
            ["SQLite ceiling: 100 rows/commit (commit p50 "
             f"{c100['commit_ms']['p50']} ms)", f"{c100['rows_per_s']:,}", "1.00", "", "", "",
             ""],
            ["SQLite: 1 row/commit (commit p50 "
             f"{c1['commit_ms']['p50']} ms, p99 {c1['commit_ms']['p99']} ms)",
             f"{c1['rows_per_s']:,}", f"{c1['rows_per_s'] / c100['rows_per_s']:.2f}", "", "", "",
             ""]]
    for s in result["scenarios"].values():
        if s["kind"] == "latency":
            e2e, ratio = s["e2e_ms"] or {}, s.get("ratio_to_sqlite_commit_latency") or {}
            for q in ("p50", "p99"):
                target, ok = (s.get("target", ""), s.get("pass", "")) if q == "p99" else ("", "")
                rows.append([f"{scenario_label(s)}: {q}", f"{e2e.get(q)} ms",
                             f"{ratio.get(q)} x SQLite 1-row commit {q}", target, ok,
                             cpu_cell(s), _store(s)])
            continue
        extra = (f" ({s['ratio_to_ceiling_1_row_per_commit']:.2f} x 1 row/commit)"
                 if "ratio_to_ceiling_1_row_per_commit" in s else "")
        rows.append([scenario_label(s), f"{s['msg_per_s']:,}",
                     f"{s['ratio_to_ceiling']:.2f}{extra}", s.get("target", ""),
                     s.get("pass", ""), cpu_cell(s), _store(s)])
    return markdown(rows)


def summarize_pyspy(raw: Path, top: int = 20) -> dict[str, dict[str, Any]]:
    """Per process (the daemon, its writer), from py-spy's raw collapsed stacks of on-CPU
    samples: the busiest functions by self time, and meshq's functions by inclusive time."""
    procs: dict[str, dict[str, Any]] = {}
    for line in raw.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack or not n.isdigit():
            continue
        frames = stack.split(";")
        at = max(i for i, f in enumerate(frames) if f.startswith("process ")) if any(
            f.startswith("process ") for f in frames) else -1
        label = frames[at].split(" -m ", 1)[-1].split()[0] if at >= 0 else "main"
        p = procs.setdefault(label, {"samples": 0, "self": {}, "incl": {}})
        p["samples"] += int(n)
        funcs = [f.rsplit(":", 1)[0] + ")" if ":" in f else f for f in frames[at + 1:]]
        if funcs:
            p["self"][funcs[-1]] = p["self"].get(funcs[-1], 0) + int(n)
        for f in set(funcs):
            if "meshq/" in f or "(ops.py" in f or "(connection.py" in f:
                p["incl"][f] = p["incl"].get(f, 0) + int(n)

    def ranked(d: dict[str, int], total: int) -> list[str]:
        best = sorted(d.items(), key=lambda kv: -kv[1])[:top]
        return [f"{100 * v / total:5.1f}%  {k}" for k, v in best]

    return {label: {"on_cpu_samples": p["samples"],
                    "top_self": ranked(p["self"], p["samples"]),
                    "top_inclusive_meshq": ranked(p["incl"], p["samples"])}
            for label, p in procs.items() if p["samples"]}


def markdown(rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    return "\n".join(out + ["| " + " | ".join(r) + " |" for r in rows[1:]])


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
    except BaseException as exc:
        while isinstance(exc, BaseExceptionGroup):  # 256 slots fail alike: show one
            exc = exc.exceptions[0]
        q.put(("error", wid, "".join(traceback.format_exception(exc))[-3000:]))
