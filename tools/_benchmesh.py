"""The multi-node part of tools/bench.py: a cluster of meshqd on loopback (start, wait until
every node sees every node alive, the scenarios on it, stop) with its figures as ratios to
the single daemon's, and the simulated network (SimCluster in virtual time, --sim-only).
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, ExitStack, contextmanager
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import trio
from _benchlib import cpu_cell, judge, markdown, scenario_label
from trio.testing import MockClock

from meshq.mesh._swim_math import suspicion_timeout
from meshq.mesh.swim import MemberState, SwimConfig
from meshq.testing import DaemonProcess
from meshq.testing.cluster import SimCluster, open_cluster
from meshq.testing.simnet import SimNet

# ----------------------------------------------------------------------------- cluster
CLUSTER_SCENARIOS = ("publish_p8_b1", "consume_c4", "latency")  # --nodes > 1, on both sides

D = TypeVar("D", bound=DaemonProcess)
OnError = Callable[[Exception], dict[str, Any]]


def queue_options(nodes: Sequence[object]) -> dict[str, Any]:
    """How a scenario's queue is declared: on a cluster {"replicas": min(3, nodes)}."""
    return {"replicas": min(3, len(nodes))} if len(nodes) > 1 else {}


@contextmanager
def running_cluster(bench_dir: Path, n: int,
                    start: Callable[[Path, str, str | None], AbstractContextManager[D]],
                    ) -> Iterator[list[D]]:
    """``n`` meshqd on loopback, bench-a, bench-b, ...: each its own data dir and a free
    peer port; all but the first join through the first. Stopped (SIGTERM) on leaving.
    ``start(data_dir, node_name, join)`` runs one node while its context is open."""
    bench_dir.mkdir(parents=True, exist_ok=True)  # the daemons' logs go beside their dirs
    with ExitStack() as stack:
        nodes: list[D] = []
        for i in range(n):
            name = f"bench-{chr(ord('a') + i)}"
            join = nodes[0].bind if nodes else None
            nodes.append(stack.enter_context(start(bench_dir / name, name, join)))
        yield nodes


def _member_states(node: DaemonProcess) -> dict[str, str]:
    # (a status asks every member for its moves, 2 s each: a node just restarted with a
    # deep backlog can take a few seconds to answer)
    with node.client(timeout=30) as c:
        return {m["name"]: m["state"] for m in c.status()["members"]}


def wait_converged(nodes: Sequence[DaemonProcess], timeout: float = 30.0) -> float:
    """Seconds until every node sees every node alive. Across processes there is no event
    to wait for: poll the daemons' status every 50 ms, up to ``timeout``."""
    want = dict.fromkeys((d.node_name for d in nodes), "alive")
    started = time.monotonic()
    while True:
        views = {d.node_name: _member_states(d) for d in nodes}
        if all(v == want for v in views.values()):
            return round(time.monotonic() - started, 3)
        if time.monotonic() - started > timeout:
            raise TimeoutError(f"the cluster did not converge within {timeout:g} s: {views}")
        time.sleep(0.05)


def _kind(key: str) -> str:
    return key.split("_", 1)[0]


def _failed(key: str, nodes: Sequence[DaemonProcess], log: Callable[[str], None],
            exc: Exception) -> dict[str, Any]:
    """The entry of a cluster scenario run that raised: its error, and the nodes down."""
    failed: dict[str, Any] = {"kind": _kind(key), "error": f"{type(exc).__name__}: {exc}"}
    for d in nodes:  # a node that died, or stopped serving its socket
        status = d.proc.poll() if d.proc is not None else None
        if status is not None or not d.socket.exists():
            failed.setdefault("down", {})[d.node_name] = {
                "exit_status": status, "log_tail": d.log_tail(2000)}
    log(f"{key} on {len(nodes)} nodes failed: {_brief(failed['error'])}")
    for name, e in failed.get("down", {}).items():
        how = ("its socket is gone" if e["exit_status"] is None
               else f"exited with status {e['exit_status']}")
        log(f"  {name}: {how} (log tail in the JSON)")
    return failed


def run_cluster(args: argparse.Namespace, bench_dir: Path, out: dict[str, Any], *,
                start: Callable[[Path, str, str | None], AbstractContextManager[D]],
                repeat: Callable[[str, list[D], argparse.Namespace, str, OnError],
                                 dict[str, Any]],
                log: Callable[[str], None]) -> bool:
    """The scenarios on a cluster of --nodes daemons, into ``out``. A scenario that fails
    (a daemon's error, a stalled worker) is reported in its entry, and the next one runs;
    a cluster that fails to start, converge or stop, in ``out["error"]``. ``start``: see
    running_cluster; ``repeat(key, nodes, args, what, on_error)``: the median of --repeat
    runs of one scenario. Returns False if the cluster or any scenario on it failed."""
    out["scenarios"] = {}
    try:
        with running_cluster(bench_dir / "cluster", args.nodes, start) as nodes:
            out["names"] = [d.node_name for d in nodes]
            out["binds"] = [d.bind for d in nodes]
            out["queue_options"] = queue_options(nodes)
            out["load"] = ("producers and consumers connect round-robin over the nodes; "
                           f"latency: producer on {nodes[0].node_name}, consumer on "
                           f"{nodes[-1].node_name}")
            log(f"{args.nodes}-node cluster: {', '.join(out['names'])}")
            out["converged_s"] = wait_converged(nodes)
            for key in args.scenarios:
                out["scenarios"][key] = repeat(key, nodes, args, f"{key} ({args.nodes} nodes)",
                                               partial(_failed, key, nodes, log))
    except Exception as exc:  # start-up, convergence or shutdown: the sim still runs
        out["error"] = f"{type(exc).__name__}: {exc}"
        log(f"{args.nodes}-node cluster failed: {out['error']}")
    return "error" not in out and not any("error" in s for s in out["scenarios"].values())


# ----------------------------------------------------------------------------- cluster report
PREFERRED = {"publish": ("publish_p8_b1", "publish_p8_b100", "publish_p1_b1", "publish_p1_b100"),
             "consume": ("consume_c4", "consume_c1"), "latency": ("latency",)}


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a is not None and b else None


def compare(single: dict[str, Any], cluster: dict[str, Any]) -> dict[str, Any]:
    """Each cluster figure as a ratio to the single-node figure of the same scenario in the
    same run (publish and consume throughput; latency p50/p99), with the targets. A
    scenario with an error fails its target: only confirmed, delivered messages count."""
    out: dict[str, Any] = {}
    for kind, preferred in PREFERRED.items():
        key = next((k for k in preferred if k in single and k in cluster), None)
        if key is None:
            continue
        one, many = single[key], cluster[key]
        row: dict[str, Any] = {"scenario": key}
        if kind == "latency":
            a, b = one.get("e2e_ms") or {}, many.get("e2e_ms") or {}
            for q in ("p50", "p99"):
                row[f"single_{q}_ms"], row[f"cluster_{q}_ms"] = a.get(q), b.get(q)
                row[f"{q}_ratio"] = _ratio(b.get(q), a.get(q))
            target, value = "cluster_latency_p99_ms", row["cluster_p99_ms"]
        else:
            row["single_msg_per_s"] = one.get("msg_per_s")
            row["cluster_msg_per_s"] = many.get("msg_per_s")
            row["ratio"] = value = _ratio(many.get("msg_per_s"), one.get("msg_per_s"))
            target = "cluster_publish_ratio" if kind == "publish" else ""
        if target:
            row["target"], row["pass"] = judge(target, value if value is not None else math.nan)
            if many.get("error"):
                row["pass"] = "FAIL"
        if many.get("error"):
            row["error"] = many["error"]
        out[kind] = row
    return out


def _brief(error: str) -> str:
    """One line of an error, fit for a table cell: a worker's traceback shortened to its
    first and last lines."""
    lines = [ln.strip() for ln in error.replace("|", "/").splitlines() if ln.strip()]
    return lines[0] if len(lines) == 1 else f"{lines[0]} ... {lines[-1]}" if lines else ""


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v:g} ms"


def _n(v: float | None, fmt: str = ",") -> str:
    return "-" if v is None else format(v, fmt)


def keyed_summary(vs_unkeyed: dict[str, Any]) -> str:
    """One line: the keyed cluster's figures as ratios to the unkeyed cluster's."""
    parts = []
    for kind in ("publish", "consume"):
        if kind in vs_unkeyed:
            parts.append(f"{kind} {_n(vs_unkeyed[kind].get('ratio'), '.2f')}")
    if "latency" in vs_unkeyed:
        parts.append(f"p99 {_n(vs_unkeyed['latency'].get('p99_ratio'), '.2f')}")
    return "keyed / unkeyed cluster, same run: " + (", ".join(parts) or "-")


def cluster_table(result: dict[str, Any], which: str = "cluster") -> str:
    """The markdown summary of the cluster: each figure beside the single node's."""
    c = result[which]
    nodes = c.get("nodes")
    head = [f"{nodes} nodes ({', '.join(c.get('names', []))}; queue options "
            f"{c.get('queue_options')}) vs 1 node, same run", "1 node", f"{nodes} nodes",
            "ratio", "target", "pass/fail", f"CPU cores ({nodes} nodes): meshqd + writers / "
            "load gen / other"]
    rows = []
    vs = c.get("vs_single_node", {})
    for key, s in c.get("scenarios", {}).items():
        row = vs.get(s["kind"], {})
        if row.get("scenario") != key:  # run, but not one of the compared figures
            row = {}
        try:
            label = scenario_label(s)
        except KeyError:  # failed before it measured anything
            label = key
        target, ok = row.get("target", ""), row.get("pass", "")
        if s["kind"] == "latency":
            rows.append([f"{label}: p50", _ms(row.get("single_p50_ms")),
                         _ms(row.get("cluster_p50_ms")), _n(row.get("p50_ratio"), ".2f"),
                         "", "", cpu_cell(s)])
            rows.append([f"{label}: p99", _ms(row.get("single_p99_ms")),
                         _ms(row.get("cluster_p99_ms")), _n(row.get("p99_ratio"), ".2f"),
                         target, ok, cpu_cell(s)])
        else:
            rows.append([label, _n(row.get("single_msg_per_s")), _n(s.get("msg_per_s")),
                         _n(row.get("ratio"), ".2f"), target, ok, cpu_cell(s)])
        if s.get("error"):
            rows.append([f"{key} error: {_brief(s['error'])}", "", "", "", "", "", ""])
    if c.get("error"):
        rows.append([f"cluster error: {_brief(c['error'])}", "", "", "", "", "", ""])
    return markdown([head, *rows])


# ----------------------------------------------------------------------------- simulated mesh
SIM_SETTLE = 10.0  # virtual seconds of steady state before each measurement


async def _bounded(c: SimCluster, predicate: Callable[[], bool], bound: float) -> float:
    """c.wait_until(predicate), raising trio.TooSlowError after ``bound`` virtual s."""
    with trio.fail_after(bound):
        return await c.wait_until(predicate)


async def sim_run(n: int, seed: int) -> dict[str, float]:
    """One SimCluster of ``n`` Membership nodes (SwimConfig() defaults, SimNet delay 1 ms)
    in virtual time: the n-th node joins through n1 (until every other node sees it
    alive), then one node is killed (its task cancelled, its endpoint closed: packets to
    it are lost and streams refused) until the first other node marks it SUSPECT and all
    others mark it DEAD. Virtual seconds from the join / the kill."""
    cfg = SwimConfig()
    async with open_cluster(SimNet(seed), config=cfg, seed=seed) as c:
        await c.add_many(n - 1)
        await _bounded(c, c.all_alive, cfg.push_pull_interval + 5.0)
        await trio.sleep(SIM_SETTLE)
        t_join = trio.current_time()
        new = (await c.add()).name  # joins through n1, a single seed
        others = [x for x in c.names() if x != new]
        joined = await _bounded(c, lambda: c.views_are(others, {new: MemberState.ALIVE}),
                                cfg.push_pull_interval + 5.0)
        await _bounded(c, c.all_alive, cfg.push_pull_interval + 5.0)
        await trio.sleep(SIM_SETTLE)
        victim = c.names()[n // 2]  # neither the seed nor the newcomer
        rest = [x for x in c.names() if x != victim]
        t_kill = trio.current_time()
        c[victim].scope.cancel()
        await c[victim].transport.aclose()
        longest = cfg.suspicion_max_timeout_mult * suspicion_timeout(
            cfg.suspicion_mult, n, cfg.probe_interval)
        all_dead = await _bounded(c, lambda: c.views_are(rest, {victim: MemberState.DEAD}),
                                  n * cfg.probe_interval + longest + 5.0)
        suspected = [ch.at for ch in c.changes_about(victim)
                     if ch.at >= t_kill and ch.new is MemberState.SUSPECT]
        out = {"dissemination_s": joined - t_join, "all_dead_s": all_dead - t_kill}
        if suspected:  # else every node learnt DEAD without suspecting first
            out["first_suspect_s"] = min(suspected) - t_kill
        return out


def simulate(sizes: list[int], seeds: int, budget_s: float,
             log: Callable[[str], None]) -> dict[str, Any]:
    """``sim_run`` for each size and seed 0..seeds-1 (each its own trio run on a
    MockClock(autojump_threshold=0)); median and max per figure. A run that fails says
    why in its entry; runs not started within ``budget_s`` of wall time are skipped."""
    t0 = time.perf_counter()
    out: dict[str, Any] = {
        "time": "virtual seconds (trio MockClock, autojump)",
        "network": "SimNet: 1 ms delay, no loss", "swim_config": "SwimConfig() defaults",
        "join": "the n-th node joins through n1; until every other node sees it alive",
        "failure": "node n/2 killed (task cancelled, endpoint closed); until the first "
                   "other node marks it SUSPECT, and until all others mark it DEAD",
        "sizes": {}}
    for n in sizes:
        runs: list[dict[str, Any]] = []
        for seed in range(seeds):
            if time.perf_counter() - t0 > budget_s:
                runs.append({"seed": seed, "error": f"skipped: over the {budget_s:g} s budget"})
                continue
            w = time.perf_counter()
            try:
                r: dict[str, Any] = trio.run(sim_run, n, seed,
                                             clock=MockClock(autojump_threshold=0))
            except trio.TooSlowError:
                r = {"error": "did not converge within its bound"}
            except Exception as exc:  # the mesh code is young: report, and go on
                r = {"error": f"{type(exc).__name__}: {exc}"}
            runs.append({"seed": seed, **{k: round(v, 3) if isinstance(v, float) else v
                                          for k, v in r.items()},
                         "wall_s": round(time.perf_counter() - w, 2)})
        entry: dict[str, Any] = {"nodes": n, "runs": runs}
        for key in ("dissemination_s", "first_suspect_s", "all_dead_s"):
            values = [r[key] for r in runs if key in r]
            entry[key] = ({"median": round(statistics.median(values), 3),
                           "max": round(max(values), 3), "n": len(values)} if values else None)
        out["sizes"][str(n)] = entry
        log(f"simulated {n} nodes: {len(runs)} seed(s), {time.perf_counter() - t0:.1f} s wall")
    out["wall_s"] = round(time.perf_counter() - t0, 1)
    return out


def sim_table(sim: dict[str, Any]) -> str:
    """The markdown summary of the simulated network (virtual seconds)."""
    def mm(v: dict[str, Any] | None) -> str:
        return "-" if not v else f"{v['median']:.2f} / {v['max']:.2f}"

    head = ["simulated nodes (virtual s)", "seeds", "join: all see it alive, median / max",
            "kill: first SUSPECT, median / max", "kill: all DEAD, median / max"]
    rows = []
    for n, e in sim["sizes"].items():
        done = sum(1 for r in e["runs"] if "error" not in r)
        rows.append([n, f"{done} of {len(e['runs'])}", mm(e["dissemination_s"]),
                     mm(e["first_suspect_s"]), mm(e["all_dead_s"])])
    return markdown([head, *rows]) + f"\n(simulation: {sim['wall_s']} s wall)"


# ----------------------------------------------------------------------------- failover
FAILOVER_QUEUE = "failover"
FAILOVER_TARGETS = {"median_s": 2.0, "max_s": 5.0}  # issue 9: first send / delivery


def _primary(node: DaemonProcess, name: str) -> str | None:
    with node.client(timeout=5, retry_for=0) as c:
        for q in c.status()["queues"]:
            if q["name"] == name:
                return q.get("primary")
    return None


def _wait(check: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll ``check`` every 20 ms (across processes there is no event to wait for)."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"not within {timeout:g} s: {what}")
        time.sleep(0.02)


def _one_kill(nodes: list[Any], k: int) -> dict[str, Any]:
    """Kill the queue's primary under a producer and a consumer on the other nodes; the
    seconds from the SIGKILL to the first send started after it being confirmed, and to
    the first delivery of such a message; then restart it on its address."""
    import threading

    from meshq.client import Client

    primary = _primary(nodes[0], FAILOVER_QUEUE)
    victim = next(d for d in nodes if d.node_name == primary)
    rest = [d for d in nodes if d is not victim]
    started: dict[bytes, float] = {}
    confirmed: list[tuple[float, float]] = []  # (started, confirmed)
    delivered: list[tuple[float, bytes]] = []
    stop = threading.Event()
    errors: list[BaseException] = []

    def produce() -> None:
        try:
            with Client(rest[0].socket, timeout=30) as c:
                i = 0
                while not stop.is_set():
                    body = f"k{k}-{i}".encode()
                    i += 1
                    started[body] = t = time.monotonic()
                    c.send(FAILOVER_QUEUE, body)
                    confirmed.append((t, time.monotonic()))
                    time.sleep(0.005)
        except BaseException as exc:  # reported below
            errors.append(exc)

    def consume() -> None:
        try:
            with Client(rest[-1].socket, timeout=30) as c, \
                    c.consume(FAILOVER_QUEUE, prefetch=50) as sub:
                while not stop.is_set():
                    d = sub.get(timeout=0.2)
                    if d is not None:
                        delivered.append((time.monotonic(), d.body))
                        sub.ack(d)
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=produce), threading.Thread(target=consume)]
    for t in threads:
        t.start()
    try:
        _wait(lambda: (len(confirmed) >= 50 and len(delivered) >= 20) or bool(errors), 60,
              "traffic flowing before the kill")
        t0 = time.monotonic()
        victim.kill()

        def after() -> tuple[float | None, float | None]:
            send = min((c - t0 for s, c in confirmed if s >= t0), default=None)
            dlv = min((at - t0 for at, body in list(delivered)
                       if started.get(body, -1.0) >= t0), default=None)
            return send, dlv

        _wait(lambda: None not in after() or bool(errors), 60, "a send and a delivery after")
        first_send, first_delivery = after()
    finally:
        stop.set()
        for t in threads:
            t.join(60)
    if errors:
        raise errors[0]
    victim.args = [a if a != "127.0.0.1:0" else str(victim.bind) for a in victim.args]
    if "--bind" in victim.args:
        victim.args[victim.args.index("--bind") + 1] = str(victim.bind)
    victim.start()
    return {"killed": victim.node_name, "first_send_s": round(first_send or 0, 3),
            "first_delivery_s": round(first_delivery or 0, 3)}


def failover(args: argparse.Namespace, bench_dir: Path,
             start: Callable[[Path, str, str | None], AbstractContextManager[D]],
             log: Callable[[str], None]) -> dict[str, Any]:
    """--failover-kills times: SIGKILL the queue's primary under load (a producer and a
    consumer on the other nodes, N = 3, W = 2), on a cluster of its own; median and max
    of the seconds to the first confirmed send and the first delivery after the kill."""
    out: dict[str, Any] = {"nodes": args.nodes, "kills": [],
                           "method": "producer (one send at a time, the client retries) and "
                                     "consumer (prefetch 50) on the two other nodes; SIGKILL "
                                     "of the primary; seconds from the kill to the first "
                                     "confirmed send started after it, and to the first "
                                     "delivery of such a message; then the node restarts on "
                                     "its address and the next kill waits for convergence"}
    try:
        with running_cluster(bench_dir / "failover", args.nodes, start) as nodes:
            wait_converged(nodes)
            with nodes[0].client(timeout=30) as c:
                c.declare(FAILOVER_QUEUE, replicas=min(3, len(nodes)), visibility_timeout=60)
            for k in range(args.failover_kills):
                _wait(lambda: _primary(nodes[0], FAILOVER_QUEUE) is not None, 30, "a primary")
                run = _one_kill(nodes, k)
                out["kills"].append(run)
                log(f"failover {k + 1}/{args.failover_kills}: killed {run['killed']}: first "
                    f"send {run['first_send_s']} s, first delivery {run['first_delivery_s']} s")
                wait_converged(nodes, timeout=60)
    except Exception as exc:
        out["error"] = f"{type(exc).__name__}: {exc}"
        log(f"failover failed: {out['error']}")
    for key in ("first_send_s", "first_delivery_s"):
        values = [r[key] for r in out["kills"]]
        if values:
            median, worst = statistics.median(values), max(values)
            out[key] = {"median": round(median, 3), "max": round(worst, 3), "n": len(values),
                        "pass": "PASS" if median <= FAILOVER_TARGETS["median_s"]
                        and worst <= FAILOVER_TARGETS["max_s"] else "FAIL"}
    return out


def failover_table(f: dict[str, Any]) -> str:
    head = [f"failover: SIGKILL of the primary, {f['nodes']} nodes (s)", "kills", "median",
            "max", "target", "pass/fail"]
    rows = []
    for key, label in (("first_send_s", "first confirmed send"),
                       ("first_delivery_s", "first delivery")):
        e = f.get(key)
        if e:
            rows.append([label, str(e["n"]), f"{e['median']:g}", f"{e['max']:g}",
                         "median <= 2, max <= 5", e["pass"]])
    if f.get("error"):
        rows.append([f"error: {_brief(f['error'])}", "", "", "", "", ""])
    return markdown([head, *rows])
