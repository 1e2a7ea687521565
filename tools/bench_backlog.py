#!/usr/bin/env python3
"""Benchmark a deep backlog on one meshqd (issue 11): memory, restart, and throughput
against a shallow queue in the same run.

Usage: .venv/bin/python tools/bench_backlog.py [--messages 2000000] [--sample 100000]
       [--body 1024] [--nodes 1] [--delayed 0] [--dir DIR] [--out FILE]

It starts its own meshqd (embedded default, a scratch data dir under --dir) and, on it:

1. shallow: --sample messages published into an empty queue (batches of 100, 8 in
   flight), then consumed with one subscription (prefetch 100) acking each one;
2. the deep queue filled with --messages bodies of --body bytes (batches of 500); with
   --delayed N, a queue "later" filled with N messages delayed by a day, too (its
   memory, and after step 4 how many of them are counted and how many on disk only);
3. --sample more published into the deep queue, then --sample into an empty queue beside
   it (the same store: what the queue's depth costs apart from the store's size), then
   --sample consumed and acked from the deep queue (its head: the oldest messages);
4. meshqd stopped (SIGTERM) and started again: seconds from the start to its ready
   line, and its memory once ready;
5. shallow again, on a fresh queue beside the restored backlog.

Each publish measurement also gives meshqd's and its writer's CPU per message (from
``/proc``): on a busy machine, steadier than msg/s.

With ``--nodes 3``: the same on three meshqd on loopback (b and c joined through a), the
queues declared with three copies (and the cluster's default partitions), every client
on a; every copy of the backlog, the dispatchers' and the other holders', must stay
within the bound; step 4 restarts c (a holder of every partition).

Throughout, a thread samples the resident memory of each meshqd and its writer process
(``/proc/<pid>/statm``) every 0.1 s; the peak of each phase (the largest daemon's) is
reported. Figures are
ratios deep / shallow of the same run, against issue 11's targets: RSS <= 150 MiB
throughout, restart to ready <= 3 s, consume+ack from the deep queue >= 0.8x a shallow
one, publish into it >= 0.8x an empty one.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import trio
from _benchlib import tree_cpu
from _benchmesh import wait_converged

from meshq import AsyncClient
from meshq.resources import resident_bytes
from meshq.testing import DaemonProcess

MIB = 1024 * 1024
TARGETS = {"rss_mib": 150.0, "restart_s": 3.0, "consume_ratio": 0.8, "publish_ratio": 0.8}


def children(pid: int) -> list[int]:
    """The child processes of ``pid``, whichever of its threads started them (meshqd's
    writer is started from a worker thread: the main thread's list has it only once that
    thread is gone; before 2026-12-08 this read the main thread's alone, so the RSS
    figures left the writer out until then)."""
    out: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for task in tasks:
        try:
            with open(f"/proc/{pid}/task/{task}/children") as f:
                out += [int(p) for p in f.read().split()]
        except OSError:
            continue
    return sorted(set(out))


class MemoryWatch:
    """Samples meshqd's and its writer's resident memory; the peak per phase."""

    def __init__(self) -> None:
        self.pid: int | None = None
        self.peak = 0
        self.now = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.1):
            pid = self.pid
            if pid is None:
                continue
            self.now = resident_bytes(pid) + sum(resident_bytes(c) for c in children(pid))
            self.peak = max(self.peak, self.now)

    def phase(self) -> int:
        """The peak since the last call (MiB), and start a new phase."""
        peak, self.peak = self.peak, self.now
        return round(peak / MIB)

    def stop(self) -> None:
        self._stop.set()


class Watches:
    """A MemoryWatch per daemon; a phase's peak is the largest daemon's."""

    def __init__(self, n: int) -> None:
        self.each = [MemoryWatch() for _ in range(n)]

    @property
    def now(self) -> int:
        return max(w.now for w in self.each)

    def phase(self) -> int:
        return max(w.phase() for w in self.each)

    def stop(self) -> None:
        for w in self.each:
            w.stop()


OPTIONS: dict[str, Any] = {}  # how the queues are declared (--nodes 3: three copies)


async def publish(socket: str, queue: str, n: int, body: bytes, batch: int,
                  window: int = 8, delay: float | None = None) -> float:
    """Confirmed messages per second, ``window`` batches in flight (each message
    delayed ``delay`` s, if given)."""
    item: bytes | dict[str, Any] = body if delay is None else {"body": body, "delay": delay}
    async with AsyncClient(socket) as c:
        await c.declare(queue, **OPTIONS)
        left = n
        t0 = time.perf_counter()

        async def worker() -> None:
            nonlocal left
            while left > 0:
                k = min(batch, left)
                left -= k
                await c.send_batch(queue, [item] * k)

        async with trio.open_nursery() as nursery:
            for _ in range(window):
                nursery.start_soon(worker)
        return n / (time.perf_counter() - t0)


async def consume(socket: str, queue: str, n: int, prefetch: int = 100) -> float:
    """Acked messages per second, one subscription acking each delivery (pipelined)."""
    async with AsyncClient(socket) as c:
        got = 0
        t0 = time.perf_counter()
        async with c.consume(queue, prefetch=prefetch) as sub, trio.open_nursery() as acks:
            async for d in sub:
                acks.start_soon(sub.ack, d)
                got += 1
                if got == n:
                    break
        return n / (time.perf_counter() - t0)


def measured(out: dict[str, Any], key: str, pid: int | None, n: int, fn: Any,
             *args: Any) -> None:
    """``out[key]`` = msg/s of ``trio.run(fn, *args)``, and ``out[key + "_cpu_us"]`` = the
    daemon's and its writer's CPU per message meanwhile (steadier than msg/s on a busy
    machine)."""
    before = tree_cpu(pid) if pid else (0.0, 0.0)
    out[key] = trio.run(fn, *args)
    after = tree_cpu(pid) if pid else (0.0, 0.0)
    out[key + "_cpu_us"] = [round((a - b) * 1e6 / n, 1) for a, b in zip(after, before,
                                                                          strict=True)]


def start_nodes(work: Path, n: int) -> list[DaemonProcess]:
    """One embedded meshqd, or ``n`` on loopback joined through the first, all alive."""
    if n == 1:
        return [DaemonProcess(work / "data").start()]
    first = DaemonProcess(work / "a", node_name="a").start()
    nodes = [first] + [DaemonProcess(work / chr(ord("a") + i), node_name=chr(ord("a") + i),
                                     args=["--join", str(first.bind)]).start()
                       for i in range(1, n)]
    wait_converged(nodes)
    OPTIONS["replicas"] = min(3, n)
    return nodes


def run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    watches = Watches(args.nodes)
    body = b"m" * args.body
    nodes = start_nodes(work, args.nodes)
    daemon = nodes[0]
    out: dict[str, Any] = {"messages": args.messages, "sample": args.sample,
                           "body_bytes": args.body, "nodes": args.nodes}
    try:
        for w, d in zip(watches.each, nodes, strict=True):
            w.pid = d.proc.pid if d.proc else None
        sock = str(daemon.socket)
        time.sleep(0.3)
        out["rss_idle_mib"] = watches.phase()
        pid = daemon.proc.pid if daemon.proc else None  # (on a cluster: a's CPU only)
        measured(out, "publish_empty", pid, args.sample, publish, sock, "shallow", args.sample,
                 body, 100)
        out["consume_shallow"] = trio.run(consume, sock, "shallow", args.sample)
        out["rss_shallow_mib"] = watches.phase()
        t0 = time.perf_counter()
        done = 0
        while done < args.messages:  # in slices, with progress
            k = min(100_000, args.messages - done)
            trio.run(publish, sock, "deep", k, body, 500)
            done += k
            print(f"  filled {done:,} / {args.messages:,} ({watches.now / MIB:,.0f} MiB)",
                  file=sys.stderr, flush=True)
        out["fill_rate"] = args.messages / (time.perf_counter() - t0)
        out["rss_filled_mib"] = watches.phase()
        if args.delayed:  # a second backlog, of delays due in a day (on disk past 4,096)
            t0 = time.perf_counter()
            done = 0
            while done < args.delayed:
                k = min(100_000, args.delayed - done)
                trio.run(publish, sock, "later", k, body, 500, 8, 86_400.0)
                done += k
                print(f"  delayed {done:,} / {args.delayed:,} ({watches.now / MIB:,.0f} MiB)",
                      file=sys.stderr, flush=True)
            out["delayed_rate"] = args.delayed / (time.perf_counter() - t0)
            out["rss_delayed_mib"] = watches.phase()
        measured(out, "publish_deep", pid, args.sample, publish, sock, "deep", args.sample,
                 body, 100)
        # An empty queue of the same store: what the queue's depth costs, apart from what
        # the store's size costs (its dedup table holds every send of the last window).
        measured(out, "publish_beside", pid, args.sample, publish, sock, "beside",
                 args.sample, body, 100)
        trio.run(consume, sock, "beside", args.sample)
        out["consume_deep"] = trio.run(consume, sock, "deep", args.sample)
        out["rss_deep_ops_mib"] = watches.phase()
        restarted, its_watch = nodes[-1], watches.each[-1]
        restarted.stop(timeout=60)
        its_watch.pid = None
        t0 = time.perf_counter()
        restarted.start(timeout=600)
        out["restart_s"] = time.perf_counter() - t0
        its_watch.pid = restarted.proc.pid if restarted.proc else None
        if len(nodes) > 1:
            wait_converged(nodes, timeout=120)
        time.sleep(0.3)
        out["rss_restarted_mib"] = watches.phase()
        if args.delayed:
            with daemon.client() as c:
                [later] = [q for q in c.status()["queues"] if q["name"] == "later"]
                out["delayed_on_disk"] = later["copy_here"].get("delayed_on_disk", 0)
                out["delayed_counted"] = later["copy_here"]["delayed"]
        out["publish_empty_after"] = trio.run(publish, sock, "shallow2", args.sample, body, 100)
        out["consume_shallow_after"] = trio.run(consume, sock, "shallow2", args.sample)
        out["rss_after_mib"] = watches.phase()
    finally:
        for d in nodes:
            d.kill()
        watches.stop()
    out["rss_peak_mib"] = max(v for k, v in out.items() if k.startswith("rss_"))
    out["publish_ratio"] = out["publish_deep"] / out["publish_empty"]
    out["publish_beside_ratio"] = out["publish_deep"] / out["publish_beside"]
    out["consume_ratio"] = out["consume_deep"] / out["consume_shallow"]
    return out


def report(r: dict[str, Any]) -> str:
    def verdict(key: str, value: float) -> str:
        target = TARGETS[key]
        ok = value <= target if key in ("rss_mib", "restart_s") else value >= target
        return "met" if ok else "MISSED"
    rows = [
        ("meshqd + writer RSS, peak", f"{r['rss_peak_mib']:,} MiB", "<= 150 MiB",
         verdict("rss_mib", r["rss_peak_mib"])),
        ("  idle / shallow / filled / deep ops / restarted / after",
         " / ".join(str(r[k]) for k in ("rss_idle_mib", "rss_shallow_mib", "rss_filled_mib",
                                         "rss_deep_ops_mib", "rss_restarted_mib",
                                         "rss_after_mib")) + " MiB", "", ""),
        ("restart to ready", f"{r['restart_s']:.2f} s", "<= 3 s",
         verdict("restart_s", r["restart_s"])),
        ("publish into the deep queue / an empty one",
         f"{r['publish_deep']:,.0f} / {r['publish_empty']:,.0f} msg/s = "
         f"{r['publish_ratio']:.2f}", ">= 0.8", verdict("publish_ratio", r["publish_ratio"])),
        ("  publish into the deep queue / an empty one beside it (same store)",
         f"{r['publish_deep']:,.0f} / {r['publish_beside']:,.0f} msg/s = "
         f"{r['publish_beside_ratio']:.2f}", "", ""),
        ("consume+ack from the deep queue / a shallow one",
         f"{r['consume_deep']:,.0f} / {r['consume_shallow']:,.0f} msg/s = "
         f"{r['consume_ratio']:.2f}", ">= 0.8", verdict("consume_ratio", r["consume_ratio"])),
        ("shallow again after the restart: publish / consume",
         f"{r['publish_empty_after']:,.0f} / {r['consume_shallow_after']:,.0f} msg/s", "", ""),
        ("filling", f"{r['fill_rate']:,.0f} msg/s", "", ""),
        *([("delays: filling, RSS after it, after the restart counted / on disk",
            f"{r['delayed_rate']:,.0f} msg/s, {r['rss_delayed_mib']} MiB, "
            f"{r['delayed_counted']:,} / {r['delayed_on_disk']:,}", "", "")]
          if "delayed_rate" in r else []),
        ("CPU per message published, meshqd / writer: empty, deep, beside",
         ", ".join(" / ".join(f"{v:.1f}" for v in r[k + "_cpu_us"])
                   for k in ("publish_empty", "publish_deep", "publish_beside")) + " µs",
         "", ""),
    ]
    where = (f" on {r['nodes']} meshqd, 3 copies (RSS: the largest daemon's; restart: c)"
             if r["nodes"] > 1 else "")
    lines = [f"{r['messages']:,} x {r['body_bytes']:,} B queued{where}; samples of "
             f"{r['sample']:,}",
             "| measure | figure | target | |", "|---|---|---|---|"]
    lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--messages", type=int, default=2_000_000, help="depth of the backlog")
    p.add_argument("--sample", type=int, default=100_000,
                   help="messages per publish / consume measurement")
    p.add_argument("--body", type=int, default=1024, help="body bytes")
    p.add_argument("--nodes", type=int, default=1, choices=(1, 3),
                   help="meshqd daemons (3: a cluster, queues of three copies)")
    p.add_argument("--delayed", type=int, default=0,
                   help="also fill a queue with this many messages delayed by a day")
    p.add_argument("--dir", help="parent of the scratch directory (default: system temp)")
    p.add_argument("--out", help="write the figures as JSON here")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="meshq-bench-backlog-", dir=args.dir) as tmp:
        result = run(args, Path(tmp))
    print(report(result))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
