#!/usr/bin/env python3
"""Start a local meshq cluster of N daemons on loopback, for trying meshq out.

    .venv/bin/python tools/cluster.py 3            # until Ctrl-C
    .venv/bin/python tools/cluster.py 3 --dir /tmp/mycluster --keep

Each node gets its own data directory and socket under one directory, binds a free
loopback port for its peer traffic, and joins the first node. The script prints how to
reach each node, then waits; Ctrl-C (or SIGTERM) stops every node with SIGTERM, so each
leaves the cluster gracefully, and removes the directory unless --keep.
"""

from __future__ import annotations

import argparse
import shutil
import signal
import sys
import tempfile
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from meshq.testing import DaemonProcess  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("nodes", type=int, nargs="?", default=3, help="how many (default 3)")
    parser.add_argument("--dir", type=Path, help="where the nodes live (default: a temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the directory afterwards")
    args = parser.parse_args(argv)
    if not 1 <= args.nodes <= 50:
        parser.error("nodes must be from 1 to 50")
    base = args.dir or Path(tempfile.mkdtemp(prefix="meshq-cluster-"))
    base.mkdir(parents=True, exist_ok=True)
    nodes: list[DaemonProcess] = []
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        for i in range(args.nodes):
            name = f"node{i + 1}"
            join = ["--join", nodes[0].bind] if nodes and nodes[0].bind else []
            d = DaemonProcess(base / name, socket=base / name / "meshq.sock", node_name=name,
                              args=join)
            (base / name).mkdir(exist_ok=True)
            nodes.append(d.start())
            print(f"{name}: bind {d.bind}  socket {d.socket}  amqp amqp://{d.amqp}",
                  flush=True)
        first = nodes[0].socket
        print(f"\n{args.nodes} node(s) under {base}. Try:\n"
              f"  .venv/bin/meshq-ctl --socket {first} members\n"
              f"  .venv/bin/meshq --socket {first} declare q\n"
              f"  .venv/bin/meshq --socket {first} send q hello\n"
              "Ctrl-C stops them all.", flush=True)
        stop.wait()
    finally:
        for d in reversed(nodes):
            try:
                d.stop()
            except Exception as exc:  # keep stopping the others
                print(f"{d.node_name}: {exc}", file=sys.stderr)
        if not args.keep and args.dir is None:
            shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
