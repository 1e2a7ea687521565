"""Deterministic simulation of whole meshq nodes (TigerBeetle's VOPR, in trio).

Each node is what the daemon runs -- assembled by meshq.node.build_node: broker, cluster
layer, membership, peer links -- on a SimNet endpoint, with a MemoryStore that survives
its "kill" and a TrioClock that can be skewed or stopped. A node (re)starts as meshqd
does, from ``load(HOT_READY)``: each partition's first HOT_READY READY messages and a
count of the rest, and no tombstones or dedup entries, which the broker reads back from
the store lazily (meshq.broker.backlog, meshq.broker.dedup). Clients are the real
AsyncClient, connected over in-memory streams to a Connection on their node. One seed
decides everything: the fault schedule, every packet's fate, every random choice of the
nodes and clients, and trio's scheduling order; ``simulate(seed)`` run twice gives the
same trace, and ``tools/simulate.py --seed N`` replays a seed.

A run: three nodes come up and a queue is declared; producers and consumers on random
nodes run while one fault at a time hits one node (kill and restart, pause, isolation,
one-way loss, packet loss, duplication, delay, clock skew, a graceful leave, or a
join of a fourth node); then everything heals, the replicas must converge (equal
digests) within CONVERGE_BOUND seconds of the membership being whole again, the
cluster's rebalance status must say nothing moves within CONVERGE_BOUND more; a heavy
run (``fairness``) then has a subscriber on every node share a backlog, each within
FAIR_TOLERANCE of an equal share; and a drain takes what is left. Half the sends carry a
partition key. ``History`` then checks that no confirmed send was lost, no confirmed ack
undone, no lease given twice while membership was stable, no consumer got a key's
message for the first time after a later one of the same producer, and a deleted queue
never came back; with the queue fifo (``fifo=P`` partitions, ``tools/simulate.py --fifo
P``), that each consumer's first deliveries came in HLC order, failovers or not.

State here: the nodes, the clients' tasks, the fault log and the history. Never: a
random draw outside the seed's generators, or wall-clock time.
"""

from __future__ import annotations

import functools
import hashlib
import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import trio
import trio.testing

from meshq.broker.backlog import HOT_READY, Backlog
from meshq.broker.core import Broker
from meshq.broker.queue import Queue
from meshq.broker.replica import message_key
from meshq.client import AsyncClient
from meshq.cluster.lattice import catalog_digest
from meshq.errors import MeshqError, NotFound, PreconditionFailed
from meshq.mesh.swim import MemberState
from meshq.node import Node, NodeSettings, build_node
from meshq.server.connection import Connection
from meshq.store import MemoryStore
from meshq.testing.clock import TrioClock
from meshq.testing.history import History, Report
from meshq.testing.simnet import SimNet, SimTransport

__all__ = ["CONVERGE_BOUND", "FAULT_KINDS", "Fault", "SeedOutcome", "SimResult", "Simulation",
           "replay_command", "run_scenario", "run_seed", "run_seeds", "simulate"]

QUEUE = "q"
DOOMED = "doomed"
VISIBILITY = 3.0  # the queue's visibility timeout: leases of lost consumers end soon
CONVERGE_BOUND = 30.0  # seconds, from the membership being whole to equal digests
MEMBERSHIP_BOUND = 90.0  # seconds, from the heal to every node seeing every node alive
CONNECT_WAIT = 20.0  # a client's connect waits this long for its node to be back
KEYS = ("k0", "k1", "k2", "k3")  # the partition keys producers send with
KEYED = 0.5  # the share of sends that carry one
# The fair-share phase (after the heal): one subscriber on every node, each with this
# prefetch, working this long on each message, and a backlog of this many keyed messages.
FAIR_PREFETCH = 6
FAIR_WORK = 0.05
FAIR_MESSAGES = 240
FAIR_TOLERANCE = 0.15  # each consumer's share of them within this much of an equal one
FAULT_KINDS = ("kill", "pause", "isolate", "oneway", "loss", "duplicate", "delay", "skew",
               "leave", "join")


@dataclass(frozen=True)
class Fault:
    kind: str
    node: str
    start: float
    end: float
    detail: str = ""


@dataclass
class SimResult:
    seed: int
    report: Report
    faults: list[Fault]
    converged_after: float | None  # seconds after the membership was whole again
    problems: list[str] = field(default_factory=list)
    trace: str = ""  # a digest of everything clients saw: equal runs, equal traces
    virtual_seconds: float = 0.0
    # summed over every node process: meshq.broker.backlog's counters (BACKLOG_COUNTERS)
    backlog: dict[str, int] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.report.ok and not self.problems

    def summary(self) -> str:
        faults = ", ".join(f"{f.kind}({f.node}{' ' + f.detail if f.detail else ''})"
                           f"@{f.start:.1f}-{f.end:.1f}" for f in self.faults)
        conv = "never" if self.converged_after is None else f"{self.converged_after:.1f} s"
        lines = [f"seed {self.seed}: faults: {faults or 'none'}; converged after {conv}",
                 self.report.summary(), *self.problems]
        return "\n".join(lines)


class SimNode:
    """One node's lasting parts (address, store, clock) and its current process."""

    def __init__(self, sim: Simulation, name: str, index: int) -> None:
        self.sim = sim
        self.name = name
        self.address = f"10.0.0.{index}:7946"
        self.node_id = f"{index:08x}"
        rng = random.Random(f"{sim.seed}:store:{name}")
        self.store = MemoryStore(delays=lambda: rng.uniform(0.0005, 0.004))
        self.clock = TrioClock()
        self.node: Node | None = None
        self.transport: SimTransport | None = None
        self.scope: trio.CancelScope | None = None
        self.starts = 0
        self.left = False
        self.started = trio.Event()  # set (and replaced) at each start
        self.backlogs: list[Backlog] = []  # each process's, for their statistics

    @property
    def running(self) -> bool:
        return self.node is not None

    async def start(self, seeds: list[str]) -> None:
        self.starts += 1
        self.left = False
        self.store.reset()
        self.transport = self.sim.net.endpoint(self.address)
        settings = NodeSettings(name=self.name, cluster_name="sim", seeds=seeds)
        rng = random.Random(f"{self.sim.seed}:node:{self.name}:{self.starts}")
        # As meshqd (meshq/daemon.py): only each partition's head of READY messages; the
        # rest, the tombstones and the dedup entries are read back from the store lazily.
        node = build_node(settings, node_id=self.node_id, store=self.store,
                          snapshot=self.store.load(self.sim.hot_ready), clock=self.clock,
                          transport=self.transport, rng=rng,
                          incarnation=int(trio.current_time() * 1000) + self.starts)
        node.broker.check_digests = True  # (kept digest sums must equal a walk, always)
        self.backlogs.append(node.broker.backlog)
        backlog = node.broker.backlog
        backlog.hot_ready = backlog.hot_delayed = self.sim.hot_ready
        backlog.refill_below = min(backlog.refill_below, max(1, self.sim.hot_ready * 3 // 4))
        self.node = node
        await self.sim.nursery.start(self._run, node)
        self.started.set()
        self.started = trio.Event()

    async def _run(self, node: Node, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        with trio.CancelScope() as scope:
            self.scope = scope
            try:
                await node.run(task_status=task_status)
            finally:
                if self.node is node:
                    self.node = None
                assert self.transport is not None
                with trio.CancelScope(shield=True):
                    await self.transport.aclose()

    def kill(self) -> None:
        """SIGKILL: every task ends at once; what the store committed stays."""
        if self.scope is not None:
            self.scope.cancel()
        self.node = None

    async def leave(self) -> None:
        """SIGTERM: leave gracefully, then stop."""
        node = self.node
        if node is None or node.membership is None:
            return
        node.refuse_writes("shutting down")
        with trio.move_on_after(5.0):
            await node.membership.leave(2.0)
            await node.store.flush()
        self.left = True
        self.kill()

    async def connect(self) -> trio.abc.Stream:
        """A client connection to this node. While it is down (being restarted) the
        connect waits for it, up to CONNECT_WAIT, then fails as a refused socket would."""
        with trio.move_on_after(CONNECT_WAIT):
            while self.node is None:
                await self.started.wait()
        node = self.node
        if node is None:
            raise ConnectionRefusedError(f"node {self.name} is down")
        client, server = trio.testing.memory_stream_pair()
        conn = Connection(server, node, 8 * 1024 * 1024)
        node.spawn(conn.serve)
        await trio.lowlevel.checkpoint()
        return client


class Simulation:
    def __init__(self, seed: int, *, nodes: int = 3, window: float = 12.0,
                 producers: int = 2, consumers: int = 2, faults: bool = True,
                 kinds: tuple[str, ...] = FAULT_KINDS,
                 send_gap: tuple[float, float] = (0.2, 1.0), ordering: str = "fair",
                 partitions: int | None = None, fairness: bool = False,
                 hot_ready: int = HOT_READY, delays: float = 0.0) -> None:
        self.seed = seed
        # The share of unkeyed sends delayed 0.5-5 s (a fair queue's; off by default, so
        # that a seed replays as before): with ``hot_ready``, what a restart leaves on disk
        # of them is read back before replication looks (meshq.broker.backlog's late)
        self.delays = delays if ordering == "fair" else 0.0
        # READY messages a partition held alone keeps in memory (meshq.broker.backlog):
        # a few instead of 2,048 make partitions that are alone for a while (a node cut
        # off, the others down) leave their backlog on disk, and read it back when the
        # other holders return
        self.hot_ready = hot_ready
        # QUEUE's: fifo records each consumer's order in the History (checked)
        self.ordering, self.partitions = ordering, partitions
        self._clients = 0
        self.rng = random.Random(f"{seed}:sim")
        self.net = SimNet(seed, delay=0.0005, jitter=0.001)
        self.window = window
        self.n_producers = producers
        self.n_consumers = consumers
        self.with_faults = faults
        self.kinds = kinds
        self.send_gap = send_gap
        self.fairness = fairness
        self.history = History(lease_slack=0.5)
        self.nodes: dict[str, SimNode] = {}
        for i in range(1, nodes + 1):
            self.nodes[f"n{i}"] = SimNode(self, f"n{i}", i)
        self.faults: list[Fault] = []
        self.problems: list[str] = []
        self.trace = hashlib.sha256()
        self.nursery: trio.Nursery = None  # type: ignore[assignment]
        self._unstable_since: float | None = None
        self._stop_producing = trio.Event()
        self._stop_consuming = trio.Event()
        self._acked: dict[str, float] = {}
        self._holding: dict[str, dict[str, None]] = {}  # consumer -> deliveries not acked
        self.deleted_at: float | None = None

    # -- the run --------------------------------------------------------------------------
    async def start_all(self) -> None:
        """Start every node (joining through the first) and wait until all see all."""
        first = next(iter(self.nodes.values()))
        for sn in self.nodes.values():
            await sn.start([] if sn is first else [first.address])
        await self._until(self._whole, 60.0, "the cluster forms")

    async def run(self) -> SimResult:
        async with trio.open_nursery() as nursery:
            self.nursery = nursery
            await self.start_all()
            await self._setup()
            async with trio.open_nursery() as work:
                for i in range(self.n_producers):
                    work.start_soon(self._producer, i)
                for i in range(self.n_consumers):
                    work.start_soon(self._consumer, i)
                work.start_soon(self._deleter)
                work.start_soon(self._monitor)
                if self.with_faults:
                    await self._faults()
                else:
                    await trio.sleep(self.window)
                self._stop_producing.set()
                await self._heal()
                whole_at = await self._until(self._whole, MEMBERSHIP_BOUND,
                                             "every node sees every node alive")
                self._stop_consuming.set()
                converged = await self._converge(whole_at)
                if self.fairness and converged is not None:
                    await self._fair_share()
                await self._drain()
                work.cancel_scope.cancel()
            await self._check_deleted()
            nursery.cancel_scope.cancel()
        report = self.history.check()
        return SimResult(self.seed, report, self.faults, converged, self.problems,
                         self.trace.hexdigest()[:16], trio.current_time(),
                         self.backlog_totals())

    def backlog_totals(self) -> dict[str, int]:
        """meshq.broker.backlog's counters, summed over every node process of the run."""
        out: dict[str, int] = {}
        for sn in self.nodes.values():
            for b in sn.backlogs:
                for key in BACKLOG_COUNTERS:
                    out[key] = out.get(key, 0) + getattr(b, key)
        return out

    async def _until(self, predicate: Callable[[], bool], bound: float, what: str) -> float:
        """Wait (polling virtual time) until ``predicate()``; a problem after ``bound``."""
        deadline = trio.current_time() + bound
        while not predicate():
            if trio.current_time() > deadline:
                self.problems.append(f"{what}: not within {bound:g} s")
                raise _Abort(what)
            await trio.sleep(0.1)
        return trio.current_time()

    def _whole(self) -> bool:
        """Every running node sees exactly the running nodes, all alive."""
        running = {n for n, sn in self.nodes.items() if sn.running}
        for name in running:
            node = self.nodes[name].node
            assert node is not None and node.membership is not None
            view = {m.name: m.state for m in node.membership.swim.members()}
            for other in running:
                if view.get(other) is not MemberState.ALIVE:
                    return False
        return True

    def client(self, node: str) -> AsyncClient:
        sn = self.nodes[node]
        self._clients += 1  # (its dedup ids place messages: fixed, so a seed replays)
        return AsyncClient(connect=sn.connect, retry_for=30.0,
                           dedup_prefix=f"s{self.seed}c{self._clients}")

    def _node_for(self, rng: random.Random) -> str:
        return rng.choice(sorted(self.nodes))

    async def _setup(self) -> None:
        async with self.client(self._node_for(self.rng)) as c:
            await c.declare(QUEUE, replicas=3, visibility_timeout=VISIBILITY,
                            ordering=self.ordering, partitions=self.partitions)
            await c.declare(DOOMED, replicas=3)
            await c.send_batch(DOOMED, [f"d{i}" for i in range(5)])

    # -- clients --------------------------------------------------------------------------
    def _record(self, *parts: Any) -> None:
        self.trace.update(repr(parts).encode())

    async def _producer(self, i: int) -> None:
        rng = random.Random(f"{self.seed}:producer:{i}")
        name = f"p{i}"
        node = self._node_for(rng)
        k = 0
        later = random.Random(f"{self.seed}:delays:{i}")  # (its own: seeds replay alike)
        async with self.client(node) as c:
            while not self._stop_producing.is_set():
                body = f"{name}-{k}"
                k += 1
                # Some sends carry a key (shared by the producers: each one's are in order).
                key = rng.choice(KEYS) if rng.random() < KEYED else None
                delay = (later.uniform(0.5, 5.0) if key is None and self.delays
                         and later.random() < self.delays else None)
                self.history.send_invoked(name, body, key)
                try:
                    mid = await c.send(QUEUE, body, partition_key=key, delay=delay)
                except MeshqError as exc:
                    self.history.send_failed(name, body, exc.code, trio.current_time())
                    self._record("send-failed", body, exc.code)
                else:
                    self.history.send_confirmed(name, body, mid, trio.current_time(), key)
                    self._record("sent", body, mid, key)
                await trio.sleep(rng.uniform(*self.send_gap))

    async def _consumer(self, i: int) -> None:
        rng = random.Random(f"{self.seed}:consumer:{i}")
        name = f"c{i}"
        node = self._node_for(rng)
        pull = rng.random() < 0.5
        self._holding[name] = {}
        async with self.client(node) as c:
            with trio.move_on_at(math.inf) as scope:
                self.nursery.start_soon(_cancel_when, self._stop_consuming, scope)
                if pull:
                    while True:
                        try:
                            got = await c.receive(QUEUE, max=5, wait=1.0)
                        except MeshqError:
                            await trio.sleep(0.2)
                            continue
                        for d in got:  # a batch: each lease runs from now
                            self._got(name, d)
                        for d in got:
                            await self._handle(c, name, d, rng)
                else:
                    while True:
                        try:
                            async with c.consume(QUEUE, prefetch=5) as sub:
                                async for d in sub:
                                    self._got(name, d)
                                    await self._handle(c, name, d, rng)
                        except MeshqError:
                            await trio.sleep(0.2)
        # Closing the connection released what it still held.
        for mid in self._holding.pop(name):
            self.history.ack_failed(name, mid, trio.current_time())

    def _got(self, name: str, d: Any) -> None:
        """A consumer got a delivery (a receive returned it, or a subscription yielded
        it): its lease ran from when it reached the client until the deadline the client
        reckoned."""
        at = trio.current_time() if d.received_at is None else d.received_at
        deadline = at + VISIBILITY if d.lease_deadline is None else d.lease_deadline
        self.history.delivered(name, d.id, d.delivery_count, d.redelivered, deadline, at)
        if self.ordering == "fifo":  # (ids are "<hlc>-<node>")
            self.history.fifo_delivered(name, d.id, d.hlc, d.id.partition("-")[2],
                                        d.redelivered, at)
        self._holding.setdefault(name, {})[d.id] = None
        self._record("delivered", name, d.id, d.delivery_count)
        acked_at = self._acked.get(d.id)
        if acked_at is not None and acked_at < at and not self._unstable_at(at):
            self.problems.append(f"ack undone: {d.id} delivered to {name} at {at:.2f} after "
                                 f"its ack was confirmed at {acked_at:.2f}")

    async def _handle(self, c: AsyncClient, name: str, d: Any, rng: random.Random,
                      work: float = 0.3) -> None:
        """Work on a delivery, then ack it (a pull consumer works through its batch)."""
        holding = self._holding[name]
        await trio.sleep(rng.uniform(0.0, work))  # the work
        holding.pop(d.id, None)
        outcome = "unknown"  # also when this consumer is stopped while its ack is out
        try:
            await c.ack(QUEUE, [d])
            outcome = "acked"
        except PreconditionFailed:
            outcome = "failed"
        except MeshqError:
            pass
        finally:
            at = trio.current_time()
            if outcome == "acked":
                self.history.ack_confirmed(name, d.id, at)
                self._acked.setdefault(d.id, at)
            elif outcome == "failed":
                self.history.ack_failed(name, d.id, at)
            else:
                self.history.ack_unknown(name, d.id, at)
            self._record(outcome, name, d.id)

    async def _deleter(self) -> None:
        """Delete the side queue once, at a random moment of the fault window."""
        rng = random.Random(f"{self.seed}:deleter")
        await trio.sleep(rng.uniform(1.0, self.window))
        async with self.client(self._node_for(rng)) as c:
            try:
                await c.delete(DOOMED)
            except NotFound:
                self.deleted_at = trio.current_time()  # a retry after it was done
            except MeshqError as exc:
                self._record("delete-failed", exc.code)
                return
            else:
                self.deleted_at = trio.current_time()
        self._record("deleted")

    # -- faults ---------------------------------------------------------------------------
    async def _monitor(self) -> None:
        """Record when membership was not stable: from a fault's start until every running
        node sees every running node alive again (and a takeover could finish). An
        instability still open when the run's clients stop counts until then."""
        try:
            while True:
                now = trio.current_time()
                whole = self._whole() and not self._faulty
                if not whole and self._unstable_since is None:
                    self._unstable_since = now
                elif whole and self._unstable_since is not None:
                    self.history.unstable(self._unstable_since, now + 1.0)
                    self._unstable_since = None
                await trio.sleep(0.1)
        finally:
            if self._unstable_since is not None:
                self.history.unstable(self._unstable_since, trio.current_time() + 1.0)

    _faulty = False

    def _unstable_at(self, t: float) -> bool:
        if self._unstable_since is not None:
            return True
        return any(s <= t <= e for s, e in self.history._unstable)

    async def _faults(self) -> None:
        end = trio.current_time() + self.window
        rng = self.rng
        while True:
            await trio.sleep(rng.uniform(0.5, 3.0))
            length = rng.uniform(1.5, 7.0)
            if trio.current_time() + length > end:
                break
            kind = rng.choice(self.kinds)
            if kind == "join" and len(self.nodes) >= 5:
                kind = "kill"
            running = sorted(n for n, sn in self.nodes.items() if sn.running)
            if not running:
                break
            victim = rng.choice(running)
            self._faulty = True
            self._unstable_since = self._unstable_since or trio.current_time()
            start = trio.current_time()
            detail = await self._inflict(kind, victim, rng)
            await trio.sleep(length)
            await self._repair(kind, victim, detail)
            self.faults.append(Fault(kind, victim, start, trio.current_time(), detail))
            self._record("fault", kind, victim, detail)
            self._faulty = False
        await trio.sleep(max(0.0, end - trio.current_time()))

    def _others(self, victim: str) -> list[str]:
        return [sn.address for n, sn in sorted(self.nodes.items()) if n != victim]

    async def _inflict(self, kind: str, victim: str, rng: random.Random) -> str:
        sn = self.nodes[victim]
        net = self.net
        if kind == "kill":
            sn.kill()
        elif kind == "leave":
            await sn.leave()
        elif kind == "pause":
            net.down(sn.address)
            sn.clock.freeze()
        elif kind == "isolate":
            net.partition([sn.address])
        elif kind == "oneway":
            for other in self._others(victim):
                net.set_link(sn.address, other, drop=1.0, both_ways=False)
        elif kind == "loss":
            for other in self._others(victim):
                net.set_link(sn.address, other, drop=0.3)
        elif kind == "duplicate":
            for other in self._others(victim):
                net.set_link(sn.address, other, duplicate=0.3)
        elif kind == "delay":
            for other in self._others(victim):
                net.set_link(sn.address, other, delay=0.05, jitter=0.2)
        elif kind == "skew":
            sn.clock.offset = rng.choice([-2.0, 2.0])
            return f"{sn.clock.offset:+g}s"
        elif kind == "join":
            name = f"n{len(self.nodes) + 1}"
            new = SimNode(self, name, len(self.nodes) + 1)
            self.nodes[name] = new
            await new.start([self.nodes["n1"].address])
            return name
        return ""

    async def _repair(self, kind: str, victim: str, detail: str) -> None:
        sn = self.nodes[victim]
        net = self.net
        if kind in ("kill", "leave"):
            await sn.start([s.address for n, s in sorted(self.nodes.items())
                            if n != victim and s.running])
        elif kind == "pause":
            sn.clock.thaw()
            net.up(sn.address)
        elif kind == "isolate":
            net.heal()
        elif kind in ("oneway", "loss", "duplicate", "delay"):
            for other in self._others(victim):
                net.clear_link(sn.address, other, both_ways=kind != "oneway")
        elif kind == "skew":
            sn.clock.offset = 0.0

    async def _heal(self) -> None:
        self.net.heal()
        for name, sn in sorted(self.nodes.items()):
            self.net.up(sn.address)
            sn.clock.thaw()
            sn.clock.offset = 0.0
            for other in self.nodes.values():
                if other is not sn:
                    self.net.clear_link(sn.address, other.address)
            if not sn.running:
                await sn.start([s.address for n, s in sorted(self.nodes.items())
                                if n != name and s.running])

    # -- the end ----------------------------------------------------------------------------
    def _copies_equal(self) -> bool:
        """Every node has the same catalog, and every holder's copy of every partition is
        the same (ids and progress)."""
        nodes = {n: sn.node for n, sn in self.nodes.items() if sn.node is not None}
        catalogs = {catalog_digest(node.broker.catalog.values()) for node in nodes.values()}
        if len(catalogs) > 1:
            return False
        for name, node in nodes.items():
            cluster = node.cluster
            assert cluster is not None
            for q in node.broker.parts.values():
                reps = cluster.replicas(q)
                if reps.primary != name:
                    continue
                if not q.active:
                    return False
                mine = _copy(node.broker, q)
                for holder in reps.holders:
                    other = nodes.get(holder)
                    if other is None:
                        return False
                    oq = other.broker.parts.get(q.part)
                    if oq is None or _copy(other.broker, oq) != mine:
                        return False
                for n, other in nodes.items():  # copies nobody should hold are gone
                    oq = other.broker.parts.get(q.part)
                    if n not in reps.holders and oq is not None and (oq.messages or oq.cold):
                        return False
        return True

    async def _converge(self, whole_at: float) -> float | None:
        try:
            at = await self._until(self._copies_equal, CONVERGE_BOUND,
                                   "replicas converge (equal copies)")
        except _Abort:
            self.problems.append(self.describe())
            return None
        await self._rebalanced(CONVERGE_BOUND)
        return at - whole_at

    async def _rebalanced(self, bound: float) -> None:
        """The copies are in place: the rebalance status (meshq.cluster.moves), asked of
        any node, must say so within ``bound`` (no move left hanging)."""
        deadline = trio.current_time() + bound
        while True:
            node = next((sn.node for _, sn in sorted(self.nodes.items())
                         if sn.node is not None), None)
            if node is None or node.cluster is None:
                return
            reb = await node.cluster.rebalance()
            if not reb["moving"]:
                return
            if trio.current_time() > deadline:
                self.problems.append(f"rebalance still moving {bound:g} s after the "
                                     f"copies converged: {reb}")
                return
            await trio.sleep(0.2)

    # -- for scripted scenarios ------------------------------------------------------------
    async def until(self, predicate: Callable[[], bool], bound: float, what: str) -> float:
        """Wait (virtual time) until ``predicate()`` holds; _Abort after ``bound`` s."""
        return await self._until(predicate, bound, what)

    async def wait_whole(self, bound: float = MEMBERSHIP_BOUND) -> float:
        return await self._until(self._whole, bound, "every node sees every node alive")

    async def wait_converged(self, bound: float = CONVERGE_BOUND) -> float:
        return await self._until(self._copies_equal, bound, "replicas converge")

    def primary(self, queue: str, index: int = 0) -> str | None:
        """The node that dispatches partition ``index`` of ``queue`` now (in its own
        view), if any."""
        for name, sn in sorted(self.nodes.items()):
            node = sn.node
            if node is not None and node.cluster is not None:
                q = node.broker.parts.get((queue, index))
                if q is not None and q.active and node.cluster.replicas(q).primary == name:
                    return name
        return None

    def describe(self) -> str:
        """Each node's view of each partition (for a failure report)."""
        lines = []
        for name, sn in sorted(self.nodes.items()):
            node = sn.node
            if node is None:
                lines.append(f"  {name}: down")
                continue
            assert node.cluster is not None
            for q in sorted(node.broker.parts.values(), key=lambda q: q.part):
                reps = node.cluster.replicas(q)
                states: dict[str, int] = {}
                for m in q.messages.values():
                    states[m.state.name] = states.get(m.state.name, 0) + 1
                lines.append(
                    f"  {name} {q.name}#{q.index}: primary={reps.primary}"
                    f" holders={','.join(reps.holders)}"
                    f" active={q.active} epoch={q.epoch:x} promised={q.promised:x}"
                    f" msgs={states} tombs={len(q.tombs)}"
                    f"{' (more may be on disk)' if q.tombs_on_disk else ''}"
                    f"{f' ready_on_disk={q.cold}' if q.cold else ''}")
            st = node.cluster.statistics()
            lines.append(f"  {name} cluster: {st}")
        return "\n".join(lines)

    def _nothing_anywhere(self) -> bool:
        """No copy of QUEUE holds a message, and no batch of changes waits for its quorum
        (a send whose outcome is unknown becomes visible where it committed once it does,
        and is repaired into the primary from there; a fair queue's). A batch of closed
        bounds only (a fifo queue's, raised while a receive waits) makes nothing visible."""
        for sn in self.nodes.values():
            node = sn.node
            if node is None:
                continue
            if node.cluster is not None and len(node.cluster.gate) and any(
                    b.changes for b in node.cluster._batches.values()):
                return False
            if any(q.messages or q.cold for q in node.broker.queues.get(QUEUE, ())):
                return False
        return True

    def _primaries_empty(self) -> bool:
        """Every partition of QUEUE has a dispatcher, and its copy is empty."""
        found: dict[int, bool] = {}
        for name, sn in sorted(self.nodes.items()):
            node = sn.node
            if node is None or node.cluster is None:
                continue
            for q in node.broker.queues.get(QUEUE, ()):
                if q.active and node.cluster.replicas(q).primary == name:
                    found[q.index] = not q.messages and not q.cold
        count = next((len(sn.node.broker.queues.get(QUEUE, ())) for sn in self.nodes.values()
                      if sn.node is not None), 0)
        return len(found) == count > 0 and all(found.values())

    async def _fair_share(self) -> None:
        """After the heal, with the cluster whole and the copies equal: a subscriber on
        every node, equal credit and speed, and a backlog of keyed messages sent in
        batches from one node. Every partition deals round-robin among the consumers with
        credit, and these get theirs back at one rate (the work dwarfs the network), so
        each gets an equal share of the whole within FAIR_TOLERANCE, wherever the faults
        left the partitions (SPEC section 2). Sound only after the heal: during a fault a
        consumer's node may be cut off, and the workload's consumers differ on purpose."""
        nodes = sorted(n for n, sn in self.nodes.items() if sn.running)
        counts = dict.fromkeys(nodes, 0)
        ids: list[str] = []
        rng = random.Random(f"{self.seed}:fair")

        async def consume(node: str) -> None:
            name = f"fair-{node}"
            self._holding[name] = {}
            async with self.client(node) as c, c.consume(QUEUE, prefetch=FAIR_PREFETCH) as sub:
                async for d in sub:
                    self._got(name, d)
                    counts[node] += 1
                    await trio.sleep(FAIR_WORK)  # the work
                    await self._handle(c, name, d, rng, work=0.0)

        def placed() -> bool:
            parts = [q for sn in self.nodes.values() if sn.node is not None
                     for q in sn.node.broker.queues.get(QUEUE, ()) if q.active]
            return all(len(q.consumers) >= len(nodes) for q in parts)

        async with trio.open_nursery() as nursery:
            for node in nodes:
                nursery.start_soon(consume, node)
            await self._until(placed, 20.0, "fair share: a consumer on every partition")
            async with self.client(self._node_for(rng)) as p:
                for start in range(0, FAIR_MESSAGES, 10):
                    batch = [(f"fair-{i}", f"f{i % 8}") for i in range(start, start + 10)]
                    for body, key in batch:
                        self.history.send_invoked("fair", body, key)
                    try:
                        got = await p.send_batch(QUEUE, [{"body": body, "partition_key": key}
                                                         for body, key in batch])
                    except MeshqError as exc:
                        for body, _ in batch:
                            self.history.send_failed("fair", body, exc.code,
                                                     trio.current_time())
                        continue
                    for (body, key), mid in zip(batch, got, strict=True):
                        self.history.send_confirmed("fair", body, mid, trio.current_time(),
                                                    key)
                    ids += got
            await self._until(lambda: all(m in self._acked for m in ids), 60.0,
                              "fair share: every message acked")
            nursery.cancel_scope.cancel()
        for node in nodes:  # (what they held of the rest went back as they closed)
            for mid in self._holding.pop(f"fair-{node}", {}):
                self.history.ack_failed(f"fair-{node}", mid, trio.current_time())
        self._record("fair share", counts)
        total, share = sum(counts.values()), sum(counts.values()) / len(nodes)
        if any(abs(n - share) > FAIR_TOLERANCE * share for n in counts.values()):
            self.problems.append(f"fair share: {total} deliveries to a consumer on each "
                                 f"node came out {counts}, not {share:.0f} each within "
                                 f"{FAIR_TOLERANCE:.0%}")

    async def _drain(self) -> None:
        """Take everything left, through a fresh consumer, until the primary's copy is
        empty (bounded: leases of stopped consumers end within VISIBILITY)."""
        rng = random.Random(f"{self.seed}:drain")
        deadline = trio.current_time() + 3 * VISIBILITY + 10.0
        async with self.client(self._node_for(rng)) as c:
            while trio.current_time() < deadline:
                if self._primaries_empty() and self._nothing_anywhere():
                    break
                try:
                    got = await c.receive(QUEUE, max=100, wait=0.5)
                except MeshqError:
                    continue
                for d in got:
                    self._got("drain", d)
                for d in got:
                    await self._handle(c, "drain", d, rng, work=0.0)
        # What is still there (it should be nothing) is not lost.
        left: set[str] = set()
        where: list[str] = []
        for name, sn in sorted(self.nodes.items()):
            if sn.node is not None:
                for q in sn.node.broker.queues.get(QUEUE, ()):
                    left.update(q.messages)
                    where += [f"{m.id} on {name} {q.name}/{q.index} {m.state.name}"
                              for m in q.messages.values()]
                    if q.cold:  # (on disk only)
                        cold = sn.node.broker.backlog.cold_messages(q)
                        left.update(m.id for m in cold)
                        where += [f"{m.id} on {name} {q.name}/{q.index} on disk"
                                  for m in cold]
        if left:
            self.problems.append(f"{len(left)} message(s) left after the drain: "
                                 + "; ".join(where[:6]) + "\n" + self.describe())
        self.history.final_contents(left)

    async def _check_deleted(self) -> None:
        if self.deleted_at is None:
            return
        for name, sn in sorted(self.nodes.items()):
            node = sn.node
            if node is not None and DOOMED in node.broker.queues:
                self.problems.append(f"queue deleted at {self.deleted_at:.2f} is back on "
                                     f"node {name}")
        async with self.client(self._node_for(self.rng)) as c:
            try:
                await c.send(DOOMED, "after")
            except NotFound:
                return
            except MeshqError as exc:
                self.problems.append(f"send to the deleted queue: {exc.code}, not NOT_FOUND")
                return
        self.problems.append("a send to the deleted queue was confirmed")


class _Abort(Exception):
    pass


async def _cancel_when(event: trio.Event, scope: trio.CancelScope) -> None:
    await event.wait()
    scope.cancel()


def _deterministic(seed: int) -> None:
    import trio._core._run as run

    # trio shuffles each batch of runnable tasks; with this flag it sorts them first and
    # shuffles with its own generator, which the seed then fixes (as under hypothesis).
    setattr(run, "_ALLOW_DETERMINISTIC_SCHEDULING", True)  # noqa: B010
    run._r.seed(seed)


def run_scenario(script: Callable[[Simulation], Any], *, seed: int = 0,
                 nodes: int = 3, hot_ready: int = HOT_READY) -> Any:
    """Run ``await script(sim)`` on a started cluster of ``nodes``, in virtual time, with
    no fault but those the script makes (its building blocks: ``sim.client(node)``,
    ``sim.nodes[name].kill()``/``start()``, ``sim.net``, ``sim.wait_whole()``,
    ``sim.wait_converged()``, ``sim.primary(queue)``); ``hot_ready``: as Simulation's."""
    _deterministic(seed)
    sim = Simulation(seed, nodes=nodes, faults=False, hot_ready=hot_ready)

    async def main() -> Any:
        async with trio.open_nursery() as nursery:
            sim.nursery = nursery
            await sim.start_all()
            result = await script(sim)
            nursery.cancel_scope.cancel()
        return result

    return trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


def simulate(seed: int, **kw: Any) -> SimResult:
    """Run one seed, deterministically, in virtual time (MockClock, autojump)."""
    _deterministic(seed)
    sim = Simulation(seed, **kw)

    async def main() -> SimResult:
        result: SimResult | None = None
        try:
            result = await sim.run()
        except* _Abort:
            pass
        if result is None:
            result = SimResult(seed, sim.history.check(), sim.faults, None, sim.problems,
                               sim.trace.hexdigest()[:16], trio.current_time(),
                               sim.backlog_totals())
        return result

    return trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


# -- many seeds ------------------------------------------------------------------------------
@dataclass(frozen=True)
class SeedOutcome:
    """What one seed's run came to (small, for sending between processes)."""

    seed: int
    ok: bool
    summary: str
    trace: str
    wall_seconds: float
    virtual_seconds: float
    converged_after: float | None
    confirmed_sends: int
    deliveries: int
    duplicates: int
    duplicates_during_instability: int
    faults: tuple[str, ...]
    backlog: tuple[tuple[str, int], ...] = ()  # SimResult.backlog's counters


def replay_command(seed: int, heavy: bool = False, hot_ready: int = HOT_READY,
                   fifo: int | None = None, delays: float = 0.0) -> str:
    return (f"PYTHONHASHSEED=0 .venv/bin/python tools/simulate.py --seed {seed}"
            + (" --heavy" if heavy else "")
            + (f" --hot-ready {hot_ready}" if hot_ready != HOT_READY else "")
            + (f" --fifo {fifo}" if fifo is not None else "")
            + (f" --delays {delays}" if delays else "") + " -v")


def _copy(broker: Broker, q: Queue) -> dict[str, tuple[Any, ...]]:
    """A node's copy of a partition: each message's id and progress, in memory or on disk
    only (meshq.broker.backlog)."""
    out = {m.id: message_key(m) for m in q.messages.values()}
    if q.cold:
        out.update((m.id, message_key(m)) for m in broker.backlog.cold_messages(q))
    return out


BACKLOG_COUNTERS = ("paged_out", "paged_out_shared", "restored", "paged_in",
                    "paged_in_by_id", "counts", "late_out", "late_in")
HEAVY = {"window": 30.0, "send_gap": (0.02, 0.3), "fairness": True}


class Stuck(Exception):
    """A seed ran past its real-time limit: something spins without virtual time moving."""


def _stuck(signum: int, frame: Any) -> None:
    raise Stuck("the seed ran past its real-time limit (a livelock in virtual time?)")


def run_seed(seed: int, heavy: bool = False, limit: float = 120.0,
             hot_ready: int = HOT_READY, fifo: int | None = None,
             delays: float = 0.0) -> SeedOutcome:
    """One seed, in this process; a seed still running after ``limit`` real seconds fails
    (virtual time stands still while a task spins, so a livelock would never end).
    ``fifo``: the queue is fifo over that many partitions (its order checked); ``delays``:
    as Simulation's."""
    import signal
    import time
    import traceback

    t0 = time.perf_counter()
    kw: dict[str, Any] = dict(HEAVY) if heavy else {}
    kw["hot_ready"] = hot_ready
    if delays:
        kw["delays"] = delays
    if fifo is not None:
        kw["ordering"], kw["partitions"] = "fifo", fifo
    old = signal.signal(signal.SIGALRM, _stuck)
    signal.setitimer(signal.ITIMER_REAL, limit)
    try:
        r = simulate(seed, **kw)
    except Exception as exc:  # a crash (or a livelock) of the harness or node code fails
        text = "".join(traceback.format_exception(exc))[-4000:]
        return SeedOutcome(seed, False, f"seed {seed}: crashed\n{text}", "", 0.0, 0.0, None,
                           0, 0, 0, 0, ())
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    return SeedOutcome(
        seed, r.ok, r.summary(), r.trace, time.perf_counter() - t0, r.virtual_seconds,
        r.converged_after, r.report.confirmed_sends, r.report.deliveries,
        r.report.duplicate_deliveries, len(r.report.duplicates_during_instability),
        tuple(f.kind for f in r.faults), tuple(sorted(r.backlog.items())))


def run_seeds(seeds: list[int], *, jobs: int = 2, heavy: bool = False,
              hot_ready: int = HOT_READY, fifo: int | None = None, delays: float = 0.0,
              progress: Callable[[SeedOutcome], None] | None = None) -> list[SeedOutcome]:
    """Run ``seeds`` in ``jobs`` fresh processes with PYTHONHASHSEED=0, so that a failing
    seed replays the same in ``tools/simulate.py --seed N``."""
    import multiprocessing
    import os

    old = os.environ.get("PYTHONHASHSEED")
    os.environ["PYTHONHASHSEED"] = "0"  # read by each spawned interpreter at its start
    try:
        ctx = multiprocessing.get_context("spawn")
        out = []
        with ctx.Pool(max(1, jobs)) as pool:
            fn = functools.partial(run_seed, heavy=heavy, hot_ready=hot_ready, fifo=fifo,
                                   delays=delays)
            for outcome in pool.imap_unordered(fn, seeds, chunksize=4):
                out.append(outcome)
                if progress is not None:
                    progress(outcome)
        return sorted(out, key=lambda o: o.seed)
    finally:
        if old is None:
            del os.environ["PYTHONHASHSEED"]
        else:
            os.environ["PYTHONHASHSEED"] = old
