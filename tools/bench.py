#!/usr/bin/env python3
"""Benchmark meshqd: publish, consume+ack and latency, against a SQLite ceiling, on one
daemon and (--nodes N) on a cluster of N, as ratios to the single daemon.

Usage: .venv/bin/python tools/bench.py [--quick] [--nodes N [--keyed]] [--sim-only] [--out FILE]
       [--profile] [--dir DIR]

First the raw SQLite ceiling, in a scratch directory under --dir (default: the system
temp dir): 256-byte rows into a table with meshq's own ``messages`` schema, WAL,
synchronous=FULL, 100 rows and 1 row per commit. Then its own meshqd on a data dir in
the same directory, and each scenario on a fresh queue:

- publish: 1 or 8 producers (connections), batch 1 (``send``) or 100 (``send_batch``),
  each connection keeping --window / --batch-window requests in flight; confirmed
  messages / (last confirm - first send).
- consume: prefill, then 1 or 4 subscriptions with prefetch 100; each delivery push is
  acked with one pipelined ack request; acked / (last ack confirm - subscribe).
- latency: open loop at --rate msg/s, a producer and a consumer (prefetch 100) on two
  connections of one process; receive time - scheduled send time, after a warm-up.

With --nodes N (N > 1; the issue asks for 3) the run then also starts N meshqd on
loopback (bench-a, bench-b, ...; each its own data dir, nodes 2..N joining through node 1),
waits until every node sees every node alive, and runs publish_p8_b1, consume_c4 and
latency (or --scenarios) again, on both sides: queues declared on every node with
{"replicas": min(3, N)}, producers and consumers round-robin over the nodes, the latency
producer on the first node and its consumer on the last. Each figure is reported as a
ratio to the single daemon's (targets: publish >= 0.45 of it, latency p99 <= 25 ms). A
cluster scenario that fails (a daemon's error, unconfirmed sends, undelivered messages,
no progress for a minute) is reported in its entry, the others still run, and the exit
status is 1. With --keyed the same cluster runs again with a cluster key (every peer
packet and stream encrypted), reported beside the single daemon and as ratios to the
unkeyed cluster of the same run. Then failover (--failover-kills, default 10): on a
cluster of its own, the queue's primary is SIGKILLed under a producer and a consumer on the
other nodes, and restarted, that many times; median and max seconds from the kill to the
first confirmed send and the first delivery (targets: median <= 2 s, max <= 5 s). Last,
the simulated network (meshq.testing SimCluster,
virtual time; --sim-only runs just this): for 5, 20 and 50 nodes and a few seeds, how long
a join through one seed takes to reach every node, and how long after a node is killed the
first other node suspects it and all of them hold it dead.

The load runs in spawned worker processes (tools/_benchlib.py), all connections of a
scenario in one process unless --producer-procs, so the daemon keeps a core (the cluster
and the simulated network: tools/_benchmesh.py). Each figure is a ratio to the ceiling,
with the CPU used by meshqd, its writer, the load generator and everything else on the
machine (a shared machine makes figures noisy: see --wait-idle).
Progress bars and a markdown table go to stderr, the JSON result to stdout (and --out).
Everything it starts, it stops; only Unix sockets and a loopback peer port are used.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import multiprocessing as mp
import os
import platform
import queue as _queue
import shlex
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from functools import partial
from pathlib import Path
from typing import Any

from _benchlib import (
    BODY,
    annotate,
    host_cpu,
    merge,
    pct,
    sqlite_ceiling,
    summarize_pyspy,
    table,
    tree_cpu,
    worker_main,
)
from _benchmesh import (
    CLUSTER_SCENARIOS,
    cluster_table,
    compare,
    failover,
    failover_table,
    keyed_summary,
    queue_options,
    run_cluster,
    sim_table,
    simulate,
)
from tqdm import tqdm

import meshq
from meshq.mesh.keyring import generate_key
from meshq.testing import DaemonProcess

ROOT = Path(__file__).resolve().parent.parent


def log(msg: str) -> None:
    tqdm.write(msg, file=sys.stderr)


# ----------------------------------------------------------------------------- facts
def _run(cmd: list[str]) -> str | None:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=10, cwd=ROOT)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _filesystem(path: Path) -> dict[str, str]:
    best = ("", "", "")
    try:
        for line in Path("/proc/mounts").read_text().splitlines():
            dev, mnt, fstype = line.split()[:3]
            if str(path).startswith(mnt) and len(mnt) >= len(best[1]):
                best = (dev, mnt, fstype)
    except OSError:
        pass
    return {"device": best[0], "mount": best[1], "type": best[2]}


def machine_info(bench_dir: Path) -> dict[str, Any]:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    commit = _run(["git", "rev-parse", "HEAD"])
    dirty = _run(["git", "status", "--porcelain", "--untracked-files=no"])
    return {
        "nproc": os.cpu_count(), "cpu_model": model,
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "python": platform.python_version(), "platform": platform.platform(),
        "meshq_version": meshq.__version__, "sqlite_version": sqlite3.sqlite_version,
        "git_commit": commit, "git_dirty": bool(dirty) if dirty is not None else None,
        "bench_dir": str(bench_dir), "filesystem": _filesystem(bench_dir),
    }


# ----------------------------------------------------------------------------- daemon
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class BenchDaemon(DaemonProcess):
    """meshqd on loopback only, optionally run under pyinstrument (``profile`` = path).
    ``bind`` defaults to a free loopback port; ``join``: a peer address to join through."""

    def __init__(self, data_dir: Path, profile: Path | None = None, *,
                 node_name: str = "bench", bind: str | None = None,
                 join: str | None = None) -> None:
        sock = Path(tempfile.mkdtemp(prefix="meshq-bench-")) / "meshq.sock"  # short path
        args = ["--bind", bind or f"127.0.0.1:{free_port()}", "--log-level", "warning"]
        super().__init__(data_dir, sock, args=[*args, *(["--join", join] if join else [])],
                         node_name=node_name)
        self.profile = profile
        self.exit_status: int | None = None

    @contextmanager
    def running(self) -> Iterator[BenchDaemon]:
        """Start; on leaving, SIGTERM and wait (a non-zero exit status is an error)."""
        try:
            self.start()
            yield self
        finally:
            try:
                if self.proc is not None:
                    self.exit_status = self.stop(timeout=120)
            finally:
                shutil.rmtree(self.socket.parent, ignore_errors=True)
        if self.exit_status != 0:
            raise RuntimeError(f"meshqd {self.node_name} exited with status {self.exit_status}")

    def command(self) -> list[str]:
        cmd = super().command()
        if self.profile is None:
            return cmd
        return [cmd[0], "-m", "pyinstrument", "-r", "pyisession", "-o", str(self.profile),
                *cmd[1:]]


# ----------------------------------------------------------------------------- workers
STORE_COUNTERS = ("commits", "ops_committed", "commit_seconds")


class Meter:
    """What one measured run cost: CPU of the daemons, of their child processes (the
    store's writers), of the load generator and of everything else on the machine, in
    cores; and the daemons' own commit counters (``status``), to tell a CPU limit from a
    wait. With several daemons (a cluster) each figure is their sum."""

    def __init__(self, daemons: Sequence[BenchDaemon]) -> None:
        self.daemons = list(daemons)

    def _store(self) -> dict[str, float]:
        total: dict[str, float] = dict.fromkeys(STORE_COUNTERS, 0)
        for daemon in self.daemons:
            try:
                with daemon.client(timeout=10) as c:
                    store = c.status().get("store") or {}
            except Exception:
                store = {}
            for k in STORE_COUNTERS:
                total[k] += store.get(k, 0)
        return total

    def _cpu(self) -> list[tuple[float, float]]:
        return [tree_cpu(d.pid) for d in self.daemons]

    def start(self) -> None:
        self.s0 = self._store()
        self.t0, self.d0, self.h0 = time.monotonic(), self._cpu(), host_cpu()[0]

    def report(self, client_cpu_s: float) -> dict[str, Any]:
        wall = max(time.monotonic() - self.t0, 1e-9)
        per_node = [(b[0] - a[0], b[1] - a[1]) for a, b in zip(self.d0, self._cpu(), strict=True)]
        own, kids = sum(o for o, _ in per_node), sum(k for _, k in per_node)
        host = (host_cpu()[0] - self.h0) / wall
        used = (own + kids + client_cpu_s) / wall
        out: dict[str, Any] = {
            "daemon": round(own / wall, 3), "daemon_children": round(kids / wall, 3),
            "load_generator": round(client_cpu_s / wall, 3), "host_busy": round(host, 3),
            "other_processes": round(max(0.0, host - used), 3)}
        if len(per_node) > 1:
            out["daemon_per_node"] = [round(o / wall, 3) for o, _ in per_node]
        s1 = self._store()
        d = {k: s1[k] - self.s0[k] for k in STORE_COUNTERS}
        if d["commits"] > 0:
            out["store"] = {"commits": d["commits"],
                            "ops_per_commit": round(d["ops_committed"] / d["commits"], 1),
                            "commit_ms_mean": round(1000 * d["commit_seconds"] / d["commits"], 3),
                            "committing_fraction": round(d["commit_seconds"] / wall, 3)}
        return out


def settle(args: argparse.Namespace, what: str) -> dict[str, Any] | None:
    """With --wait-idle S: wait up to S seconds for the machine to be quiet (others use
    under --idle-threshold cores over 1 s; our idle daemon counts as others, it is ~0)."""
    if not args.wait_idle:
        return None
    t0 = time.monotonic()
    while True:
        b0 = host_cpu()[0]
        time.sleep(1.0)
        busy = host_cpu()[0] - b0
        waited = time.monotonic() - t0
        if busy < args.idle_threshold or waited >= args.wait_idle:
            quiet = busy < args.idle_threshold
            if not quiet:
                log(f"{what}: machine still busy ({busy:.2f} cores) after {waited:.0f} s")
            return {"quiet": quiet, "waited_s": round(waited, 1), "busy_cores": round(busy, 2)}


STALL_S = 60.0  # a scenario with no progress for this long has failed


def run_workers(kind: str, params: list[dict[str, Any]], *, desc: str, total: int | None,
                timeout: float, daemons: Sequence[BenchDaemon], stop_at: int | None = None,
                ) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """Run one worker process per params entry; all start together. Returns the results
    and the CPU accounting from the start to the last result. Gives up (TimeoutError)
    after ``timeout`` s, or after STALL_S s without progress."""
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    go, stop = ctx.Event(), ctx.Event()
    procs = [ctx.Process(target=worker_main, args=(kind, i, p, q, go, stop), daemon=True)
             for i, p in enumerate(params)]
    for p in procs:
        p.start()
    results: dict[int, dict[str, Any]] = {}
    errors: dict[int, str] = {}
    ready, count = 0, 0
    meter = Meter(daemons)
    deadline = time.monotonic() + 60
    last_progress: float | None = None  # from the go signal
    bar = tqdm(total=total, desc=desc, unit="msg", unit_scale=True, file=sys.stderr,
               dynamic_ncols=True, mininterval=0.5)
    try:
        while len(results) + len(errors) < len(procs):
            if errors and not go.is_set():
                break  # the others wait for a go that will never come
            if time.monotonic() > deadline:
                raise TimeoutError(f"{desc}: workers did not finish in time")
            if last_progress is not None and time.monotonic() - last_progress > STALL_S:
                raise TimeoutError(f"{desc}: no progress for {STALL_S:g} s")
            try:
                msg = q.get(timeout=0.2)
            except _queue.Empty:
                for i, p in enumerate(procs):  # died without a word (e.g. an import error)
                    if p.exitcode is not None and i not in results and q.empty():
                        errors.setdefault(i, f"worker {i} exited with status {p.exitcode}")
                continue
            if msg[0] == "ready":
                ready += 1
                if ready == len(procs):
                    meter.start()
                    go.set()
                    deadline = time.monotonic() + timeout
                    last_progress = time.monotonic()
            elif msg[0] == "progress":
                count += msg[2]
                bar.update(msg[2])
                last_progress = time.monotonic()
                if stop_at is not None and count >= stop_at:
                    stop.set()
            elif msg[0] == "result":
                results[msg[1]] = msg[2]
            else:
                errors[msg[1]] = msg[2]
        cpu = meter.report(sum(r["cpu_s"] for r in results.values())) if go.is_set() else {}
    finally:
        stop.set()
        bar.close()
        for p in procs:
            p.join(10 if go.is_set() else 1)
            if p.is_alive():
                p.terminate()
                p.join(5)
    if errors:
        raise RuntimeError(f"{desc}: worker failed:\n{next(iter(errors.values()))}")
    return [results[i] for i in range(len(procs))], cpu


# ----------------------------------------------------------------------------- scenarios
# Every scenario takes the daemons it runs on: one, or a cluster. On a cluster its queue
# is declared on every node with {"replicas": min(3, nodes)} (idempotent, and correct
# whether queues are node-local or cluster-wide), producers and consumers connect
# round-robin over the nodes, and the latency producer and consumer sit on the first and
# the last node.
def _fresh_queue(nodes: Sequence[BenchDaemon], prefix: str) -> str:
    name = f"bench-{prefix}-{uuid.uuid4().hex[:8]}"
    for daemon in nodes:
        with daemon.client(timeout=60) as c:
            c.declare(name, **queue_options(nodes))
    return name


def _drop_queue(nodes: Sequence[BenchDaemon], name: str) -> None:
    for i, daemon in enumerate(nodes):
        with daemon.client(timeout=300) as c:
            try:
                c.delete(name)
            except meshq.NotFound:  # a cluster-wide delete on an earlier node got it
                if i == 0:
                    raise


def _split(n: int, parts: int) -> list[int]:
    return [n // parts + (1 if i < n % parts else 0) for i in range(parts)]


def _spread(nodes: Sequence[BenchDaemon], conns: int, procs: int,
            ) -> list[tuple[int, list[str]]]:
    """``conns`` connections over ``procs`` worker processes, connection j (counted over
    all of them) to node j mod len(nodes): (connections, their sockets) per process."""
    sockets = [str(d.socket) for d in nodes]
    out, j = [], 0
    for k in _split(conns, procs):
        out.append((k, [sockets[(j + i) % len(sockets)] for i in range(k)]))
        j += k
    return out


def _span_s(results: list[dict[str, Any]]) -> float:
    """First send (or subscribe) to last confirm, over all workers (CLOCK_MONOTONIC)."""
    return (max(r["t_last"] for r in results) - min(r["t_first"] for r in results)) / 1e9


def _unconfirmed(results: list[dict[str, Any]], what: str) -> str | None:
    """An error line when some sends were not confirmed (only confirmed ones count)."""
    n = sum(r["unconfirmed"] for r in results)
    if not n:
        return None
    first = next(r["first_error"] for r in results if r["first_error"])
    sent = n + sum(r["confirmed"] for r in results)
    return f"{what}: {n} of {sent} messages not confirmed; first error: {first}"


Measured = Callable[[], AbstractContextManager[object]]  # wraps just the measured run


def publish(nodes: Sequence[BenchDaemon], args: argparse.Namespace, producers: int,
            batch: int, measured: Measured = nullcontext) -> dict[str, Any]:
    key = f"publish_p{producers}_b{batch}"
    name = _fresh_queue(nodes, key)
    window = args.window if batch == 1 else args.batch_window
    per_conn = -(-args.messages // producers // batch) * batch if args.messages else None
    procs = min(producers, args.producer_procs)
    params = [{"sockets": sockets, "queue": name, "conns": n, "batch": batch,
               "window": window, "duration": None if per_conn else args.duration,
               "messages_per_conn": per_conn} for n, sockets in _spread(nodes, producers, procs)]
    with measured():
        results, cpu = run_workers("publish", params, desc=key, daemons=nodes,
                                   total=per_conn * producers if per_conn else None,
                                   timeout=(args.duration or 0) + 300)
    confirmed, wall = sum(r["confirmed"] for r in results), _span_s(results)
    _drop_queue(nodes, name)
    out = {"kind": "publish", "producers": producers, "batch": batch,
           "window_requests_per_conn": window, "worker_processes": procs,
           "confirmed": confirmed, "wall_s": round(wall, 3),
           "msg_per_s": round(confirmed / wall) if wall > 0 else 0,
           "requests": sum(r["requests"] for r in results),
           "request_latency_ms": pct(merge(results, "latency_ns")), "accounting": cpu}
    if error := _unconfirmed(results, key):
        out["error"] = error
    return out


def consume(nodes: Sequence[BenchDaemon], args: argparse.Namespace, consumers: int,
            measured: Measured = nullcontext) -> dict[str, Any]:
    """Prefilled through the consumers' own nodes, in proportion to their consumers (so
    node-local queues drain too); it waits for every confirmed message to be acked."""
    key = f"consume_c{consumers}"
    name = _fresh_queue(nodes, key)
    spread = _spread(nodes, consumers, min(consumers, args.producer_procs))
    share: dict[str, int] = {}
    for sock, k in zip((s for _, ss in spread for s in ss),
                       _split(args.consume_messages // 100, consumers), strict=True):
        share[sock] = share.get(sock, 0) + 100 * k  # the prefill sends batches of 100
    prefill = [{"sockets": [sock], "queue": name, "messages": m}
               for sock, m in share.items() if m]
    filled, _ = run_workers("prefill", prefill, desc=f"{key} prefill",
                            total=sum(share.values()), daemons=nodes, timeout=600)
    ready = sum(r["confirmed"] for r in filled)
    settle(args, key)
    params = [{"sockets": sockets, "queue": name, "conns": k,
               "prefetch": args.prefetch, "ack_window": args.window} for k, sockets in spread]
    with measured():
        results, cpu = run_workers("consume", params, desc=key, total=ready, daemons=nodes,
                                   timeout=600, stop_at=ready)
    acked, wall = sum(r["acked"] for r in results), _span_s(results)
    _drop_queue(nodes, name)
    out = {"kind": "consume", "consumers": consumers, "prefetch": args.prefetch,
           "ack": "one ack request per delivery push, pipelined", "prefilled": ready,
           "acked": acked, "ack_requests": sum(r["acks"] for r in results),
           "wall_s": round(wall, 3), "msg_per_s": round(acked / wall) if wall > 0 else 0,
           "accounting": cpu}
    if error := _unconfirmed(filled, f"{key} prefill"):
        out["error"] = error
    return out


def latency(nodes: Sequence[BenchDaemon], args: argparse.Namespace,
            measured: Measured = nullcontext) -> dict[str, Any]:
    name = _fresh_queue(nodes, "latency")
    producer, consumer = nodes[0], nodes[-1]
    p = {"sockets": [str(producer.socket), str(consumer.socket)], "queue": name,
         "rate": args.rate, "warmup": args.latency_warmup, "measure": args.latency_seconds,
         "drain_timeout": 10.0}
    total = int(args.rate * (args.latency_warmup + args.latency_seconds))
    with measured():
        [r], cpu = run_workers("latency", [p], desc=f"latency @{args.rate}/s", total=total,
                               daemons=nodes,
                               timeout=args.latency_warmup + args.latency_seconds + 60)
    _drop_queue(nodes, name)
    out = {"kind": "latency", "offered_msg_per_s": args.rate, "warmup_s": args.latency_warmup,
           "measured_s": args.latency_seconds, "sent": r["sent"], "confirmed": r["confirmed"],
           "received": r["received"], "errors": r["errors"],
           "e2e_ms": pct(merge([r], "e2e_ns")),
           "e2e_from_actual_send_ms": pct(merge([r], "e2e_actual_ns")),
           "confirm_ms": pct(merge([r], "confirm_ns")),
           "generator_lag_ms": pct(merge([r], "lag_ns")), "accounting": cpu}
    if len(nodes) > 1:
        out["producer_node"], out["consumer_node"] = producer.node_name, consumer.node_name
    if r["errors"]:
        out["error"] = (f"{r['errors']} of {r['sent']} sends not confirmed; "
                        f"first error: {r['first_error']}")
    elif r["received"] < r["confirmed"]:
        out["error"] = (f"the consumer on {consumer.node_name} received {r['received']} of "
                        f"the {r['confirmed']} messages confirmed to the producer on "
                        f"{producer.node_name} within {p['drain_timeout']:g} s of the last send")
    return out


SCENARIOS = ("publish_p1_b1", "publish_p1_b100", "publish_p8_b1", "publish_p8_b100",
             "consume_c1", "consume_c4", "latency")
PROFILED = ("publish_p8_b1", "publish_p8_b100", "consume_c1")


def _figure(r: dict[str, Any]) -> float | None:
    """msg/s, or e2e p99 for latency; None for a run that failed before measuring."""
    if r["kind"] == "latency":
        return (r.get("e2e_ms") or {}).get("p99")
    return r.get("msg_per_s")


def median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The run with the median figure (msg/s, or e2e p99 for latency), with every run's
    figure attached: on a shared machine one run can be unlucky."""
    if len(runs) == 1:
        return runs[0]
    measured = [r for r in runs if _figure(r) is not None] or runs[:1]
    ordered = sorted(measured, key=lambda r: _figure(r) or 0.0)
    chosen = dict(ordered[(len(ordered) - 1) // 2])
    chosen["repeats"] = [_figure(r) for r in runs]
    return chosen


def run_scenario(key: str, nodes: Sequence[BenchDaemon], args: argparse.Namespace,
                 measured: Measured = nullcontext) -> dict[str, Any]:
    if key.startswith("publish_p"):
        producers, batch = key.removeprefix("publish_p").split("_b")
        return publish(nodes, args, int(producers), int(batch), measured)
    if key.startswith("consume_c"):
        return consume(nodes, args, int(key.removeprefix("consume_c")), measured)
    return latency(nodes, args, measured)


def run_repeated(key: str, nodes: list[BenchDaemon], args: argparse.Namespace, what: str,
                 on_error: Callable[[Exception], dict[str, Any]] | None = None,
                 ) -> dict[str, Any]:
    """--repeat runs of scenario ``key`` on ``nodes``, each after settle(args, what); the
    median run. A run that raises is replaced by ``on_error``'s entry, if given."""
    runs = []
    for _ in range(args.repeat):
        quiet = settle(args, what)
        try:
            runs.append(run_scenario(key, nodes, args))
        except Exception as exc:
            if on_error is None:
                raise
            runs.append(on_error(exc))
        if quiet is not None:
            runs[-1]["settle"] = quiet
    return median_run(runs)


def cluster_node(data_dir: Path, name: str, join: str | None, key_file: Path | None = None,
                 ) -> AbstractContextManager[BenchDaemon]:
    """One node of --nodes (see _benchmesh.running_cluster): a free loopback peer port;
    with ``key_file``, keyed."""
    daemon = BenchDaemon(data_dir, node_name=name, bind="127.0.0.1:0", join=join)
    if key_file is not None:
        daemon.args += ["--cluster-key-file", str(key_file)]
    return daemon.running()


# ----------------------------------------------------------------------------- profile
@contextmanager
def _pyspy(pid: int, raw: Path) -> Iterator[None]:
    """py-spy attached to ``pid`` and its children (the writer) for the measured run only."""
    exe = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    spy = subprocess.Popen([exe, "record", "--pid", str(pid), "--subprocesses", "--rate", "250",
                            "--format", "raw", "--nonblocking", "-o", str(raw)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        yield
    finally:
        spy.send_signal(signal.SIGINT)  # py-spy writes its output on Ctrl-C
        try:
            spy.wait(30)
        except subprocess.TimeoutExpired:
            spy.kill()
            spy.wait()


def profile(args: argparse.Namespace, bench_dir: Path, out_dir: Path) -> dict[str, Any]:
    """Re-run the main throughput scenarios, each on a fresh daemon under the profiler."""
    report: dict[str, Any] = {"profiler": args.profiler, "dir": str(out_dir), "scenarios": {}}
    for key in PROFILED:
        log(f"profiling {key} with {args.profiler}")
        session, raw = out_dir / f"{key}.pyisession", out_dir / f"{key}.pyspy.txt"
        daemon = BenchDaemon(bench_dir / f"profile-{key}",
                             profile=session if args.profiler == "pyinstrument" else None)
        entry: dict[str, Any] = {}
        spying = args.profiler == "py-spy"
        with daemon.running():  # SIGTERM at the end: a graceful exit lets pyinstrument write
            measured = partial(_pyspy, daemon.pid, raw) if spying else nullcontext
            run = run_scenario(key, [daemon], args, measured)
            entry["msg_per_s_under_profiler"] = run["msg_per_s"]
        if spying:
            entry["report"], entry["processes"] = str(raw), summarize_pyspy(raw)
        else:
            tree, flat = out_dir / f"{key}.txt", out_dir / f"{key}.flat.txt"
            base = [sys.executable, "-m", "pyinstrument", "--load", str(session), "-r", "text",
                    "--no-color"]
            subprocess.run([*base, "-o", str(tree)], check=True, timeout=120)
            subprocess.run([*base, "--show-all", "-p", "flat=true", "-o", str(flat)],
                           check=True, timeout=120)
            entry["report"], entry["flat_report"] = str(tree), str(flat)
            entry["top_self"] = [ln for ln in flat.read_text().splitlines() if ln.strip()][:30]
        report["scenarios"][key] = entry
    return report


# ----------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="a ~15 s smoke run (with --nodes 3: about a minute)")
    p.add_argument("--nodes", type=int, default=1, metavar="N",
                   help="with N > 1, after the single daemon: the same scenarios on a cluster "
                   "of N daemons, as ratios to the single daemon's figures; then the "
                   "simulated-network figures")
    p.add_argument("--keyed", action="store_true",
                   help="with --nodes N: then the same cluster again with a cluster key "
                   "(encrypted peer traffic), as ratios to the unkeyed cluster")
    p.add_argument("--failover-kills", type=int, default=None,
                   help="with --nodes N: SIGKILL the queue's primary this many times under "
                   "a producer and a consumer, on a cluster of its own (default 10; 0: skip)")
    p.add_argument("--sim-only", action="store_true",
                   help="only the simulated-network figures (no daemon, no SQLite)")
    p.add_argument("--sim-sizes", default="5,20,50", help="simulated cluster sizes")
    p.add_argument("--sim-seeds", type=int, help="seeds per simulated size (5; quick 3)")
    p.add_argument("--sim-budget", type=float, default=50.0, metavar="S",
                   help="wall seconds for the simulation; later seeds are skipped")
    p.add_argument("--duration", type=float, help="seconds per publish scenario (8; quick 1.5)")
    p.add_argument("--messages", type=int,
                   help="a fixed message count per publish scenario instead of --duration")
    p.add_argument("--consume-messages", type=int,
                   help="messages prefilled per consume scenario (150000; quick 15000)")
    p.add_argument("--dir", help="parent of the scratch directory (default: the system temp "
                   "dir); use a directory on the disk you want measured")
    p.add_argument("--keep", action="store_true", help="keep the scratch directory")
    p.add_argument("--out", help="also write the JSON result to this file")
    p.add_argument("--scenarios", help="comma-separated subset of the scenarios (default: "
                   f"all; with --nodes > 1: {','.join(CLUSTER_SCENARIOS)}, on both sides)")
    p.add_argument("--window", type=int, default=256,
                   help="in-flight requests per connection, batch 1 (and acks in flight)")
    p.add_argument("--batch-window", type=int, default=16,
                   help="in-flight requests per connection, batch 100")
    p.add_argument("--producer-procs", type=int, default=1,
                   help="worker processes the producers (and consumers) are spread over")
    p.add_argument("--prefetch", type=int, default=100)
    p.add_argument("--repeat", type=int, default=1,
                   help="run each scenario N times and report the median run")
    p.add_argument("--rate", type=int, default=1000, help="offered rate of the latency test")
    p.add_argument("--latency-seconds", type=float, help="measured seconds (10; quick 1.5)")
    p.add_argument("--latency-warmup", type=float, help="warm-up seconds (1; quick 0.5)")
    p.add_argument("--ceiling-seconds", type=float, help="seconds per SQLite run (3; quick 0.5)")
    p.add_argument("--profile", action="store_true",
                   help=f"afterwards, re-run {', '.join(PROFILED)} with the daemon profiled")
    p.add_argument("--profiler", choices=("py-spy", "pyinstrument"),
                   default="py-spy" if shutil.which("py-spy") or Path(
                       sys.executable).with_name("py-spy").exists() else "pyinstrument",
                   help="py-spy: attached to the daemon and its writer process, on-CPU "
                   "samples; pyinstrument: the daemon's main thread, started under it")
    p.add_argument("--profile-dir", help="where profile reports go (default: a new temp dir)")
    p.add_argument("--wait-idle", type=float, default=0, metavar="S",
                   help="before each measurement, wait up to S s for other processes to go "
                   "quiet (a shared machine); 0: do not wait")
    p.add_argument("--idle-threshold", type=float, default=0.15, metavar="CORES",
                   help="what --wait-idle counts as quiet")
    p.add_argument("--max-time", type=float, default=900, help="give up after this many s")
    args = p.parse_args(argv)
    quick = args.quick
    for name, full, short in (("duration", 8.0, 1.5), ("consume_messages", 150_000, 15_000),
                              ("latency_seconds", 10.0, 1.5), ("latency_warmup", 1.0, 0.5),
                              ("ceiling_seconds", 3.0, 0.5), ("sim_seeds", 5, 3)):
        if getattr(args, name) is None:
            setattr(args, name, short if quick else full)
    if args.messages:
        args.duration = None
    if not 1 <= args.nodes <= 26:
        p.error("--nodes: 1 to 26")
    if args.failover_kills is None:
        args.failover_kills = 10 if args.nodes > 1 else 0
    args.sim_sizes = [int(n) for n in args.sim_sizes.split(",") if n.strip()]
    if any(n < 3 for n in args.sim_sizes):
        p.error("--sim-sizes: at least 3 nodes each")
    if args.scenarios is None:
        args.scenarios = ",".join(CLUSTER_SCENARIOS if args.nodes > 1 else SCENARIOS)
    args.scenarios = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    unknown = set(args.scenarios) - set(SCENARIOS)
    if unknown:
        p.error(f"unknown scenario(s): {', '.join(sorted(unknown))}; known: {', '.join(SCENARIOS)}")
    return args


class OutOfTime(BaseException):
    """--max-time passed. Not an Exception, so no scenario's error handler swallows it."""


def _alarm(signum: int, frame: Any) -> None:
    raise OutOfTime("bench: --max-time exceeded")


def measure(args: argparse.Namespace, bench_dir: Path, result: dict[str, Any]) -> int:
    """The SQLite ceiling, the scenarios on one daemon, then (--nodes > 1) on a cluster,
    then (--profile) the profiles; into ``result``. Returns the exit status: 1 if the
    cluster, or any scenario on it, failed (the error is in its entry), else 0."""
    code = 0
    for rows in (100, 1):
        settle(args, "SQLite ceiling")
        log(f"SQLite ceiling: {rows} row(s) per commit, {args.ceiling_seconds} s")
        result["sqlite_ceiling"][f"batch_{rows}"] = sqlite_ceiling(
            bench_dir, rows, args.ceiling_seconds)
    daemon = BenchDaemon(bench_dir / "data")
    try:
        with daemon.running():
            for key in args.scenarios:
                result["scenarios"][key] = run_repeated(key, [daemon], args, key)
    except BaseException:
        if daemon.proc is not None and daemon.proc.poll() not in (None, 0):
            result["daemon_exit_status"] = daemon.proc.returncode
            result["daemon_log_tail"] = daemon.log_tail(4000)
            log(f"meshqd exited with status {daemon.proc.returncode}; its log ends with:\n"
                + daemon.log_tail(1500))
        raise
    if args.nodes > 1:
        result["cluster"] = {"nodes": args.nodes}
        if not run_cluster(args, bench_dir, result["cluster"], start=cluster_node,
                           repeat=run_repeated, log=log):
            code = 1
        if args.failover_kills:
            result["failover"] = failover(args, bench_dir, cluster_node, log)
            if any(e.get("pass") == "FAIL" for e in result["failover"].values()
                   if isinstance(e, dict)) or "error" in result["failover"]:
                code = 1
        if args.keyed:
            key_file = bench_dir / "cluster.key"
            key_file.write_text(generate_key())
            result["cluster_keyed"] = {"nodes": args.nodes, "keyed": True}
            if not run_cluster(args, bench_dir / "keyed", result["cluster_keyed"],
                               start=partial(cluster_node, key_file=key_file),
                               repeat=run_repeated, log=log):
                code = 1
    if args.profile:
        out_dir = Path(args.profile_dir or tempfile.mkdtemp(prefix="meshq-bench-profile-"))
        out_dir.mkdir(parents=True, exist_ok=True)
        result["profile"] = profile(args, bench_dir, out_dir)
    return code


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(int(args.max_time))
    started = time.monotonic()
    bench_dir = Path(tempfile.mkdtemp(prefix="meshq-bench-", dir=args.dir))
    result: dict[str, Any] = {
        "tool": "tools/bench.py", "command": shlex.join([sys.executable, *sys.argv]),
        "started_at": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "machine": machine_info(bench_dir),
        "config": {k: v for k, v in vars(args).items() if k not in ("out", "keep", "max_time")},
        "body_bytes": len(BODY), "sqlite_ceiling": {}, "scenarios": {},
    }
    fs = result["machine"]["filesystem"]["type"]
    if fs in ("tmpfs", "ramfs"):
        log(f"warning: {bench_dir} is on {fs}: fsync is free there, not a disk measurement")
    code = 0
    try:
        if not args.sim_only:
            code = measure(args, bench_dir, result)
        if args.nodes > 1 or args.sim_only:
            log(f"simulated network: {', '.join(map(str, args.sim_sizes))} nodes, "
                f"{args.sim_seeds} seed(s) each")
            result["simulated"] = simulate(args.sim_sizes, args.sim_seeds, args.sim_budget, log)
    except BaseException as exc:  # report what was measured, then fail
        result["error"] = f"{type(exc).__name__}: {exc}"
        code = 130 if isinstance(exc, KeyboardInterrupt) else 1
        log(f"bench failed: {result['error']}")
    finally:
        signal.alarm(0)
        if not args.keep:
            shutil.rmtree(bench_dir, ignore_errors=True)
    if result["sqlite_ceiling"].get("batch_1"):
        annotate(result)
    if result.get("cluster", {}).get("scenarios"):
        result["cluster"]["vs_single_node"] = compare(result["scenarios"],
                                                      result["cluster"]["scenarios"])
    if result.get("cluster_keyed", {}).get("scenarios"):
        keyed = result["cluster_keyed"]
        keyed["vs_single_node"] = compare(result["scenarios"], keyed["scenarios"])
        # "single" in these rows is the unkeyed cluster of the same run
        keyed["vs_unkeyed_cluster"] = compare(result["cluster"].get("scenarios", {}),
                                              keyed["scenarios"])
    result["duration_s"] = round(time.monotonic() - started, 1)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    if result["sqlite_ceiling"].get("batch_1"):
        log("\n" + table(result))
    if "cluster" in result:
        log("\n" + cluster_table(result))
    if "failover" in result:
        log("\n" + failover_table(result["failover"]))
    if "cluster_keyed" in result:
        log("\nkeyed (encrypted peer traffic):\n" + cluster_table(result, "cluster_keyed"))
        log(keyed_summary(result["cluster_keyed"].get("vs_unkeyed_cluster", {})))
    if "simulated" in result:
        log("\n" + sim_table(result["simulated"]))
    if "profile" in result:
        log(f"\nprofile reports: {result['profile']['dir']}")
    return code


if __name__ == "__main__":
    sys.exit(main())
