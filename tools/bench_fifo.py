#!/usr/bin/env python3
"""Benchmark what fifo order across partitions costs (SPEC section 2, issue 11): the
end-to-end latency of a fifo queue against a fair one, on three real meshqd, in one run.

Usage: .venv/bin/python tools/bench_fifo.py [--rate 300] [--seconds 5] [--repeat 3]
       [--partitions 6] [--kinds fair,fifo,fifo-1] [--dir DIR] [--out FILE]

Three daemons (a, b, c) on loopback, uncapped. Each round declares a fresh queue of each
kind, in turn: ``fair`` with --partitions P, ``fifo`` with P (closed timestamps and the
merge: meshq.server.fifo), and ``fifo`` with one partition (the default for fifo). One
subscriber on a (prefetch 100, acking what arrived meanwhile in one request) and a
producer on each of a, b, c, each sending one message at a time on a fixed schedule
(--rate messages/s in all), after a warm-up of 20 messages from each that are not
measured (the queue's partitions are dispatched by then). A message's latency is from
its scheduled send to its delivery to the subscriber (both clocks are this process's);
``confirm`` is from the scheduled send to its confirm; ``daemons_cpu_s`` the CPU seconds
the three daemons (and their writers) used in the round. Each figure is p50 and p99 per
round; then per kind the median over rounds with the spread (min..max), and the ratios
fifo / fair of the same round, also as median and spread.
"""

from __future__ import annotations

import argparse
import json
import statistics
import struct
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _benchlib import tree_cpu

from meshq.client import AsyncClient, Client
from meshq.errors import MeshqError
from meshq.testing import DaemonProcess

NAMES = ("a", "b", "c")
WARM_UP = 20  # messages each producer sends before the measured ones (not measured)
KINDS = (("fair", "fair", None), ("fifo", "fifo", None), ("fifo-1", "fifo", 1))


def start(base: Path) -> list[DaemonProcess]:
    first = DaemonProcess(base / "a", node_name="a").start()
    assert first.bind is not None
    nodes = [first] + [DaemonProcess(base / n, node_name=n, args=["--join", first.bind])
                       .start() for n in NAMES[1:]]
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        views = []
        for d in nodes:
            with d.client() as c:
                views.append({m["name"]: m["state"] for m in c.status()["members"]})
        if all(v == dict.fromkeys(NAMES, "alive") for v in views):
            return nodes
        time.sleep(0.2)
    raise SystemExit("the three nodes did not see each other alive within 30 s")


def pct(samples: list[float], q: float) -> float:
    s = sorted(samples)
    return s[min(len(s) - 1, int(q * len(s)))] * 1000


async def one_round(nodes: list[DaemonProcess], queue: str, args: argparse.Namespace,
                    ) -> dict[str, Any]:
    total = int(args.rate * args.seconds)
    gap = len(nodes) / args.rate  # each producer's interval
    lat: list[float] = []
    confirmed: list[float] = []  # scheduled send to confirm
    done = trio.Event()
    async with AsyncClient(nodes[0].socket) as sub_client, \
            sub_client.consume(queue, prefetch=100) as sub:

        acks: list[Any] = []
        more = trio.Event()

        warmed = trio.Event()
        warm_left = [WARM_UP * len(nodes)]

        async def consume() -> None:
            nonlocal more
            async for d in sub:
                (sched,) = struct.unpack(">d", d.body[:8])
                acks.append(d)
                more.set()
                if sched < 0:  # a warm-up message
                    warm_left[0] -= 1
                    if warm_left[0] == 0:
                        warmed.set()
                    continue
                lat.append(trio.current_time() - sched)
                if len(lat) >= total:
                    done.set()
                    return

        async def ack() -> None:  # what arrived meanwhile, in one request
            nonlocal more
            while True:
                await more.wait()
                more = trio.Event()
                batch = acks[:]
                del acks[:]
                try:
                    await sub_client.ack(queue, batch)
                except MeshqError:
                    pass  # (its lease runs out: delivered again, and counted again)

        async def produce(node: DaemonProcess, offset: float, start: float) -> None:
            async with AsyncClient(node.socket) as p:
                for i in range(total // len(nodes)):
                    at = start + offset + i * gap
                    await trio.sleep_until(at)
                    await p.send(queue, struct.pack(">d", at) + b"x" * 56)
                    confirmed.append(trio.current_time() - at)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(consume)
            nursery.start_soon(ack)
            for node in nodes:  # every partition dispatched and its part subscribed
                async with AsyncClient(node.socket) as p:
                    for _ in range(WARM_UP):
                        await p.send(queue, struct.pack(">d", -1.0))
            with trio.fail_after(60):
                await warmed.wait()
            start = trio.current_time() + 0.1
            for k, node in enumerate(nodes):
                nursery.start_soon(produce, node, k * gap / len(nodes), start)
            with trio.move_on_after(args.seconds + 60):
                await done.wait()
            nursery.cancel_scope.cancel()
    total = total // len(nodes) * len(nodes)
    return {"n": len(lat), "p50_ms": round(pct(lat, 0.5), 2),
            "p99_ms": round(pct(lat, 0.99), 2), "max_ms": round(max(lat) * 1000, 2),
            "confirm_p50_ms": round(pct(confirmed, 0.5), 2),
            "confirm_p99_ms": round(pct(confirmed, 0.99), 2),
            "complete": len(lat) >= total}


def spread(values: list[float]) -> str:
    return (f"{statistics.median(values):.2f} ({min(values):.2f}..{max(values):.2f})"
            if values else "-")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rate", type=float, default=300.0)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--partitions", type=int, default=6)
    ap.add_argument("--kinds", default=",".join(k for k, _, _ in KINDS),
                    help="which of fair, fifo, fifo-1 (default: all)")
    ap.add_argument("--dir")
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    kinds = [k for k in KINDS if k[0] in args.kinds.split(",")]
    base = Path(args.dir or tempfile.mkdtemp(prefix="bench-fifo-"))
    nodes = start(base)
    rounds: list[dict[str, Any]] = []
    try:
        for r in range(args.repeat):
            row: dict[str, Any] = {}
            for label, ordering, parts in kinds:
                name = f"{label}-{r}"
                with Client(nodes[0].socket) as c:
                    c.declare(name, ordering=ordering,
                              partitions=parts or args.partitions, replicas=3)
                cpu0 = sum(sum(tree_cpu(d.pid)) for d in nodes)
                row[label] = trio.run(one_round, nodes, name, args)
                row[label]["daemons_cpu_s"] = round(
                    sum(sum(tree_cpu(d.pid)) for d in nodes) - cpu0, 2)
                with Client(nodes[0].socket) as c:
                    c.delete(name)
                print(f"round {r + 1} {label}: {row[label]}", flush=True)
            rounds.append(row)
    finally:
        for d in nodes:
            d.kill()
    result: dict[str, Any] = {"args": vars(args), "rounds": rounds, "summary": {}}
    for label, _, _ in kinds:
        for q in ("p50_ms", "p99_ms", "confirm_p50_ms", "daemons_cpu_s"):
            result["summary"][f"{label} {q}"] = spread([row[label][q] for row in rounds])
    for label in ("fifo", "fifo-1"):
        for q in ("p50_ms", "p99_ms"):
            if label not in rounds[0] or "fair" not in rounds[0]:
                continue
            ratios = [row[label][q] / row["fair"][q] for row in rounds if row["fair"][q]]
            result["summary"][f"{label}/fair {q}"] = spread(ratios)
    for key, value in result["summary"].items():
        print(f"{key:>26}: {value}")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))
    return 0 if all(row[k]["complete"] for row in rounds for k, _, _ in kinds) else 1


if __name__ == "__main__":
    sys.exit(main())
