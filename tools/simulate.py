#!/usr/bin/env python3
"""Run the deterministic simulation of whole meshq nodes (meshq/testing/sim.py) over seeds.

    .venv/bin/python tools/simulate.py --seeds 2000         # seeds 1..2000, every core
    .venv/bin/python tools/simulate.py --seeds 500 --heavy  # 30 s windows, 10x the traffic,
                                                            # and a fair-share phase
    .venv/bin/python tools/simulate.py --seeds 400 --hot-ready 2  # nodes keep 2 READY
                                                            # messages a partition in memory
    .venv/bin/python tools/simulate.py --seeds 300 --fifo 6  # the queue fifo over six
                                                            # partitions: order checked
    .venv/bin/python tools/simulate.py --seed 1234 -v       # replay one seed, with its log

Every seed fixes the whole run: faults, packet fates, random choices, trio's scheduling.
The interpreter's string hashing must be fixed too, so this re-runs itself with
PYTHONHASHSEED=0 when it is not. Exit status 1 when any seed failed; each failure
prints the one command that replays it.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import time
from pathlib import Path

if os.environ.get("PYTHONHASHSEED") != "0":
    os.environ["PYTHONHASHSEED"] = "0"
    os.execv(sys.executable, [sys.executable, *sys.argv])

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from meshq.broker.backlog import HOT_READY
from meshq.testing.sim import (
    BACKLOG_COUNTERS,
    SeedOutcome,
    replay_command,
    run_seed,
    run_seeds,
)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=200, help="how many seeds (default 200)")
    parser.add_argument("--start", type=int, default=1, help="the first seed (default 1)")
    parser.add_argument("--seed", type=int, help="run this one seed in this process")
    parser.add_argument("--heavy", action="store_true",
                        help="30 s fault windows, about ten times the traffic, and a "
                        "fair-share phase after the heal")
    parser.add_argument("--hot-ready", type=int, default=HOT_READY,
                        help="READY messages a partition held alone keeps in memory (default "
                        f"{HOT_READY}, as meshqd): a few put backlogs on disk")
    parser.add_argument("--delays", type=float, default=0.0, metavar="F",
                        help="delay this share of the unkeyed sends 0.5-5 s (a fair queue's)")
    parser.add_argument("--fifo", type=int, metavar="P",
                        help="the queue fifo over P partitions: each consumer's order "
                        "is checked (SPEC section 2)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--json", action="store_true", help="print a JSON summary on stdout")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="with --seed: the nodes' log (virtual time) on stderr")
    args = parser.parse_args()
    if args.seed is not None:
        if args.verbose:
            _log_in_virtual_time()
        outcome = run_seed(args.seed, heavy=args.heavy, hot_ready=args.hot_ready,
                           fifo=args.fifo, delays=args.delays)
        print(outcome.summary)
        print(f"trace {outcome.trace}, {outcome.virtual_seconds:.1f} virtual s, "
              f"{outcome.wall_seconds:.2f} s")
        return 0 if outcome.ok else 1
    seeds = list(range(args.start, args.start + args.seeds))
    t0 = time.perf_counter()
    done = 0

    def progress(o: SeedOutcome) -> None:
        nonlocal done
        done += 1
        if not o.ok:
            replay = replay_command(o.seed, args.heavy, args.hot_ready, args.fifo, args.delays)
            print(f"\nFAILED {o.summary}\nreplay: {replay}\n", file=sys.stderr)
        if done % 100 == 0:
            print(f"{done}/{len(seeds)} seeds, {time.perf_counter() - t0:.0f} s",
                  file=sys.stderr)

    outcomes = run_seeds(seeds, jobs=args.jobs, heavy=args.heavy, hot_ready=args.hot_ready,
                         fifo=args.fifo, delays=args.delays, progress=progress)
    wall = time.perf_counter() - t0
    failed = [o for o in outcomes if not o.ok]
    converged = [o.converged_after for o in outcomes if o.converged_after is not None]
    summary = {
        "seeds": len(outcomes),
        "failed": [o.seed for o in failed],
        "wall_seconds": round(wall, 1),
        "jobs": args.jobs,
        "heavy": args.heavy,
        "virtual_seconds": round(sum(o.virtual_seconds for o in outcomes), 1),
        "confirmed_sends": sum(o.confirmed_sends for o in outcomes),
        "deliveries": sum(o.deliveries for o in outcomes),
        "duplicate_deliveries": sum(o.duplicates for o in outcomes),
        "duplicates_during_instability": sum(o.duplicates_during_instability
                                             for o in outcomes),
        "converged_after_s": {
            "median": round(statistics.median(converged), 2) if converged else None,
            "max": round(max(converged), 2) if converged else None,
        },
        # the backlog on disk (meshq.broker.backlog), summed over the seeds
        "backlog": {key: sum(dict(o.backlog).get(key, 0) for o in outcomes)
                    for key in BACKLOG_COUNTERS},
    }
    print(f"{len(outcomes)} seeds ({args.start}..{args.start + len(seeds) - 1}), "
          f"{len(failed)} failed, {wall:.0f} s on {args.jobs} processes; "
          f"{summary['confirmed_sends']} confirmed sends, "
          f"{summary['duplicate_deliveries']} duplicate deliveries; replicas converged "
          f"within {summary['converged_after_s']['max']} s of the membership being whole",
          file=sys.stderr)
    print("backlog on disk: " + ", ".join(f"{k} {v}" for k, v in summary["backlog"].items())
          + f" (seeds that left a replicated one: "
          f"{sum(1 for o in outcomes if dict(o.backlog).get('paged_out_shared'))})",
          file=sys.stderr)
    for o in failed:
        replay = replay_command(o.seed, args.heavy, args.hot_ready, args.fifo, args.delays)
        print(f"  replay: {replay}", file=sys.stderr)
    if args.json:
        print(json.dumps(summary))
    return 1 if failed else 0


def _log_in_virtual_time() -> None:
    import trio

    class VirtualTime(logging.Formatter):
        def format(self, record: logging.LogRecord) -> str:
            try:
                now = f"{trio.current_time():9.3f}"
            except RuntimeError:
                now = "        -"
            return f"{now} {record.name}: {record.getMessage()}"

    handler = logging.StreamHandler()
    handler.setFormatter(VirtualTime())
    logging.getLogger("meshq").addHandler(handler)
    logging.getLogger("meshq").setLevel(logging.INFO)


if __name__ == "__main__":
    sys.exit(main())
