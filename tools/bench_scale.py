#!/usr/bin/env python3
"""Benchmark scale-out (issue 11): one queue's confirmed publish and consume+ack on one
meshqd and on three, each daemon capped at a share of a core, in one run.

Usage: .venv/bin/python tools/bench_scale.py [--quota-us 50000] [--seconds 5]
       [--repeat 3] [--partitions 6] [--replicas 1,2] [--producers 6] [--consumers 3]
       [--dir DIR] [--out FILE]

Each meshqd (and the SQLite writer process it starts) runs in a cgroup v1 ``cpu`` group of
its own under /sys/fs/cgroup/cpu, with ``cpu.cfs_quota_us`` = --quota-us per 100 ms period
(50000: half a core), so that on this 2-core box three daemons have 1.5 cores between
them and one has half a core; the load generators (worker processes, one connection
each) run outside the caps. For each setup, in turn, --repeat rounds:

- 1 node: a queue of one partition (the lone node's default);
- 3 nodes, for each --replicas R: the queue declared with --partitions P and replicas R
  (R = 1: every message on one node, pure scale-out; R = 2: each on two, W = 2).
  Each round reports how many of the queue's partitions each primary had.

A round: --producers connections, spread round-robin over the setup's nodes, each
``send_stream`` (one message per send, 64 in flight, each confirmed) of 256-byte bodies
for --seconds; then --consumers subscriptions (prefetch 100), spread the same way, ack
every delivery (those at hand in one request, as AMQP's ``multiple``) until the queue is
empty. Publish: confirmed messages / seconds;
consume+ack: acked / (last ack - subscribe). Each figure is the median of the rounds
with their spread, and the ratio 3 nodes / 1 node of the same run (target: >= 2.0).
Also each daemon's CPU time and the time its group was throttled (cpu.stat), to show the
caps held. Needs root (to make the groups); everything it starts, it stops and removes.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _benchlib import host_cpu, tree_cpu

from meshq.client import Client
from meshq.errors import MeshqError
from meshq.testing import DaemonProcess

CGROUP_CPU = Path("/sys/fs/cgroup/cpu")
PERIOD_US = 100_000
BODY = b"x" * 256
TARGET = 2.0


class CappedDaemon(DaemonProcess):
    """A meshqd that moves itself into a cpu cgroup before it starts (its writer, which it
    forks later, is in the group too)."""

    def __init__(self, *a: Any, group: Path, **kw: Any) -> None:
        super().__init__(*a, **kw)
        self.group = group

    def command(self) -> list[str]:
        return ["sh", "-c", 'echo $$ > "$0/cgroup.procs" && exec "$@"', str(self.group),
                *super().command()]


def make_group(name: str, quota_us: int) -> Path:
    group = CGROUP_CPU / name
    group.mkdir(exist_ok=True)
    (group / "cpu.cfs_period_us").write_text(str(PERIOD_US))
    (group / "cpu.cfs_quota_us").write_text(str(quota_us))
    return group


def remove_group(group: Path) -> None:
    for _ in range(50):
        try:
            group.rmdir()
            return
        except OSError:  # its last processes are still exiting
            time.sleep(0.1)


def group_cpu(group: Path) -> dict[str, float]:
    """CPU seconds used by the group's processes (their /proc stat) and seconds it was
    throttled."""
    stat = dict(line.split() for line in (group / "cpu.stat").read_text().splitlines())
    return {"throttled_s": int(stat.get("throttled_time", 0)) / 1e9,
            "periods_throttled": int(stat.get("nr_throttled", 0))}


def daemons_cpu(nodes: list[DaemonProcess]) -> float:
    return sum(sum(tree_cpu(d.pid)) for d in nodes)


# -- load (worker processes) ----------------------------------------------------------------
def _produce(socket: str, queue: str, seconds: float, go: Any, out: Any) -> None:
    deadline = [0.0]

    def bodies():  # type: ignore[no-untyped-def]
        while time.monotonic() < deadline[0]:
            yield BODY

    with Client(socket, timeout=60) as c:
        go.wait()
        start = time.monotonic()
        deadline[0] = start + seconds
        n, failed = 0, 0
        try:
            for _ in c.send_stream(queue, bodies(), window=64):
                n += 1
        except MeshqError as exc:  # (reported; what it confirmed counts)
            failed = 1
            print(f"send failed: {exc.message[:200]}", file=sys.stderr)
        out.put(("sent", n, start, time.monotonic(), failed))


def _consume(socket: str, queue: str, go: Any, out: Any) -> None:
    n, last, failed = 0, 0.0, 0
    with Client(socket, timeout=60) as c:
        sub = c.consume(queue, prefetch=100)
        go.wait()
        start = time.monotonic()
        while True:
            d = sub.get(timeout=2.0)
            if d is None:
                break
            batch = [d]
            while len(batch) < 100 and (more := sub.get(timeout=0)) is not None:
                batch.append(more)
            try:
                c.ack(queue, batch)  # every delivery acked, those at hand in one request
            except MeshqError as exc:  # (counted; what was not acked comes back later)
                failed += len(batch)
                print(f"ack failed: {exc.message[:200]}", file=sys.stderr)
                continue
            n += len(batch)
            last = time.monotonic()
        sub.cancel()
    out.put(("acked", n, start, last, failed))


def run_round(nodes: list[DaemonProcess], queue: str, args: argparse.Namespace,
              ) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    out: Any = ctx.Queue()
    result: dict[str, Any] = {}
    for phase, count in (("publish", args.producers), ("consume", args.consumers)):
        go = ctx.Event()
        procs = []
        for i in range(count):
            sock = str(nodes[i % len(nodes)].socket)
            target, extra = ((_produce, (args.seconds,)) if phase == "publish"
                             else (_consume, ()))
            p = ctx.Process(target=target, args=(sock, queue, *extra, go, out))
            p.start()
            procs.append(p)
        time.sleep(1.0 if phase == "publish" else 2.0)  # connected (and subscribed)
        cpu0, host0 = daemons_cpu(nodes), host_cpu()
        go.set()
        got = [out.get(timeout=args.seconds + 300) for _ in procs]
        cpu1, host1 = daemons_cpu(nodes), host_cpu()
        for p in procs:
            p.join(30)
        total = sum(g[1] for g in got)
        start = min(g[2] for g in got)
        end = max(g[3] for g in got)
        result[phase] = {"messages": total, "seconds": round(end - start, 3),
                         "failed": sum(g[4] for g in got),
                         "msg_per_s": round(total / (end - start)) if end > start else 0,
                         "daemon_cpu_s": round(cpu1 - cpu0, 2),
                         # the machine's busy share of its cores, load generators included
                         "host_busy": round((host1[0] - host0[0]) / (host1[1] - host0[1]), 2)}
    if result["publish"]["failed"]:
        result["error"] = f"{result['publish']['failed']} producers failed"
    elif result["consume"]["failed"]:
        result["error"] = f"{result['consume']['failed']} acks failed"
    elif result["consume"]["messages"] != result["publish"]["messages"]:
        result["error"] = (f"published {result['publish']['messages']}, consumed "
                           f"{result['consume']['messages']}")
    return result


def start_nodes(base: Path, count: int, quota_us: int) -> tuple[list[DaemonProcess], list[Path]]:
    base.mkdir(parents=True, exist_ok=True)
    groups = [make_group(f"meshq-bench-{i}", quota_us) for i in range(count)]
    nodes: list[DaemonProcess] = []
    for i, group in enumerate(groups):
        join = ["--join", nodes[0].bind] if nodes and nodes[0].bind else []
        d = CappedDaemon(base / f"n{i}", node_name=f"n{i}", group=group, args=join)
        nodes.append(d.start())
    if count > 1:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with nodes[-1].client(timeout=5) as c:
                alive = [m for m in c.status()["members"] if m["state"] == "alive"]
            if len(alive) == count:
                break
            time.sleep(0.2)
        else:
            raise RuntimeError("the cluster did not converge")
    return nodes, groups


def setup_run(base: Path, name: str, count: int, options: dict[str, Any],
              args: argparse.Namespace) -> dict[str, Any]:
    nodes, groups = start_nodes(base / name, count, args.quota_us)
    rounds = []
    try:
        for r in range(args.repeat):
            queue = f"bench-{r}"
            with nodes[0].client(timeout=30) as c:
                c.declare(queue, **options)
                entry = next(q for q in c.status()["queues"] if q["name"] == queue)
            rounds.append(run_round(nodes, queue, args))
            rounds[-1]["primaries"] = sorted(
                Counter(p["primary"] for p in entry["partitions"]).values(), reverse=True)
            print(f"  {name} round {r + 1}: publish {rounds[-1]['publish']['msg_per_s']:,} "
                  f"consume {rounds[-1]['consume']['msg_per_s']:,} msg/s, partitions per "
                  f"primary {rounds[-1]['primaries']}", file=sys.stderr)
        throttled = [group_cpu(g) for g in groups]
    finally:
        for d in nodes:
            d.kill()
        for g in groups:
            remove_group(g)
    return {"nodes": count, "options": options, "rounds": rounds, "groups": throttled}


def summary(setup: dict[str, Any], phase: str) -> dict[str, Any]:
    values = [r[phase]["msg_per_s"] for r in setup["rounds"]]
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quota-us", type=int, default=50_000)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--partitions", type=int, default=6)
    parser.add_argument("--replicas", default="1,2")
    parser.add_argument("--producers", type=int, default=6)
    parser.add_argument("--consumers", type=int, default=3)
    parser.add_argument("--dir", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if not (CGROUP_CPU / "cgroup.procs").exists() or not os.access(CGROUP_CPU, os.W_OK):
        parser.error(f"needs a writable cgroup v1 cpu controller at {CGROUP_CPU} (root)")
    base = Path(tempfile.mkdtemp(prefix="meshq-scale-", dir=args.dir))
    setups = {"1 node": (1, {"partitions": 1})}
    for r in (int(x) for x in args.replicas.split(",")):
        setups[f"3 nodes, R={r}"] = (3, {"partitions": args.partitions, "replicas": r})
    result: dict[str, Any] = {"args": {k: str(v) for k, v in vars(args).items()},
                              "setups": {}}
    for name, (count, options) in setups.items():
        print(f"{name}: {options}", file=sys.stderr)
        result["setups"][name] = setup_run(base, name.replace(" ", "_").replace(",", ""),
                                           count, options, args)
    single = result["setups"]["1 node"]
    rows = ["| setup | publish msg/s (min-max) | ratio | consume+ack msg/s (min-max) | ratio "
            "| daemon CPU µs/msg, publish / consume | machine busy, publish / consume "
            "| throttled s per daemon |", "|---|---|---|---|---|---|---|---|"]
    for name, setup in result["setups"].items():
        cells = [name]
        for phase in ("publish", "consume"):
            s, base_s = summary(setup, phase), summary(single, phase)
            setup[f"{phase}_summary"] = s
            ratio = s["median"] / base_s["median"] if base_s["median"] else 0
            setup[f"{phase}_ratio"] = round(ratio, 2)
            cells += [f"{s['median']:,.0f} ({s['min']:,}-{s['max']:,})", f"{ratio:.2f}"]
        per_msg, busy = [], []
        for phase in ("publish", "consume"):
            rs = setup["rounds"]
            per_msg.append(statistics.median(
                1e6 * r[phase]["daemon_cpu_s"] / max(1, r[phase]["messages"]) for r in rs))
            busy.append(statistics.median(r[phase]["host_busy"] for r in rs))
        cells += [f"{per_msg[0]:.0f} / {per_msg[1]:.0f}", f"{busy[0]:.0%} / {busy[1]:.0%}"]
        cells.append(", ".join(f"{g['throttled_s']:.1f}" for g in setup["groups"]))
        rows.append("| " + " | ".join(cells) + " |")
    print("\n".join(rows), file=sys.stderr)
    errors = [r["error"] for s in result["setups"].values() for r in s["rounds"] if "error" in r]
    text = json.dumps(result, indent=1)
    if args.out:
        args.out.write_text(text)
    print(text)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
