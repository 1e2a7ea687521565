"""A simulated mesh: n Membership nodes on one SimNet, in one trio run and in virtual time.

State here: the nodes (transport, Membership, clock, cancel scope) and the log of every
MemberChanged each node reported, stamped with virtual time. Never: a node task that outlives
the cluster's nursery, nor a view change that the log missed (the log is the test oracle).
"""

from __future__ import annotations

import random
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import trio

from meshq.mesh.membership import Membership
from meshq.mesh.swim import Member, MemberState, Swim, SwimConfig
from meshq.testing.clock import TrioClock
from meshq.testing.simnet import SimNet, SimTransport

__all__ = ["ChangeRecord", "SimCluster", "SimNode", "open_cluster"]


@dataclass(frozen=True)
class ChangeRecord:
    """``observer`` saw ``member`` go from ``old`` (None: newly learnt) to ``new`` at ``at``
    (trio's virtual time)."""

    at: float
    observer: str
    member: str
    old: MemberState | None
    new: MemberState
    incarnation: int


@dataclass
class SimNode:
    name: str
    transport: SimTransport
    membership: Membership
    clock: TrioClock
    scope: trio.CancelScope

    @property
    def address(self) -> str:
        return self.transport.local_address

    def view(self) -> dict[str, MemberState]:
        """Every member this node knows (itself included) and the state it holds for it."""
        return {m.name: m.state for m in self.membership.swim.members()}


class SimCluster:
    """Nodes named ``n1``, ``n2``, ... at ``10.0.0.i:7946``, each a Membership on ``net``.

    A node's Swim draws from ``random.Random("<seed>:<name>")``, so one seed (with the
    SimNet's own) fixes a whole run. Nodes join through the first node unless told
    otherwise. Use ``open_cluster``; every node is cancelled when its block ends.
    """

    def __init__(self, net: SimNet, nursery: trio.Nursery, *, config: SwimConfig | None = None,
                 seed: int = 0, cluster: str = "sim") -> None:
        self.net = net
        self.config = config if config is not None else SwimConfig()
        self.seed = seed
        self.cluster = cluster
        self.nodes: dict[str, SimNode] = {}
        self.changes: list[ChangeRecord] = []
        self._nursery = nursery
        self._changed = trio.Event()

    # -- building ---------------------------------------------------------------------------
    async def add(self, name: str | None = None, *, seeds: Sequence[str] | None = None,
                  clock: TrioClock | None = None, max_offset_ms: float = 500.0) -> SimNode:
        """Start one node and return once it has joined (or found no seed answering)."""
        index = len(self.nodes) + 1
        name = name if name is not None else f"n{index}"
        if name in self.nodes:
            raise ValueError(f"a node named {name!r} already exists")
        transport = self.net.endpoint(f"10.0.0.{index}:7946")
        if seeds is None:
            seeds = [next(iter(self.nodes.values())).address] if self.nodes else []
        clock = clock if clock is not None else TrioClock()
        swim = Swim(name, transport.local_address, self.config,
                    random.Random(f"{self.seed}:{name}"), now=trio.current_time())
        membership = Membership(swim=swim, transport=transport, cluster=self.cluster,
                                clock=clock, seeds=seeds, max_offset_ms=max_offset_ms,
                                members_path=None, on_change=self._recorder(name))
        node = SimNode(name, transport, membership, clock, trio.CancelScope())
        self.nodes[name] = node
        await self._nursery.start(self._run, node)
        return node

    async def add_many(self, n: int) -> list[SimNode]:
        return [await self.add() for _ in range(n)]

    async def _run(self, node: SimNode, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        with node.scope:
            await node.membership.run(task_status=task_status)

    def _recorder(self, observer: str) -> Callable[[Member, MemberState | None], None]:
        def record(member: Member, old: MemberState | None) -> None:
            self.changes.append(ChangeRecord(trio.current_time(), observer, member.name, old,
                                             member.state, member.incarnation))
            self._changed.set()
            self._changed = trio.Event()

        return record

    # -- looking ----------------------------------------------------------------------------
    def __getitem__(self, name: str) -> SimNode:
        return self.nodes[name]

    def names(self) -> list[str]:
        return list(self.nodes)

    def views_are(self, observers: Iterable[str], expected: Mapping[str, MemberState]) -> bool:
        """Does every observer hold exactly ``expected`` (member -> state) about the others
        named in it? Members missing from an observer's view count as a mismatch."""
        for o in observers:
            view = self.nodes[o].view()
            if any(view.get(m) is not s for m, s in expected.items() if m != o):
                return False
        return True

    def all_alive(self, names: Iterable[str] | None = None) -> bool:
        """Does every named node (default: all) see every named node ALIVE?"""
        chosen = list(self.nodes if names is None else names)
        return self.views_are(chosen, dict.fromkeys(chosen, MemberState.ALIVE))

    def changes_about(self, member: str, *, observer: str | None = None) -> list[ChangeRecord]:
        return [c for c in self.changes
                if c.member == member and (observer is None or c.observer == observer)]

    def first_seen(self, observer: str, member: str, state: MemberState,
                   since: float = float("-inf")) -> float | None:
        """When ``observer`` first moved ``member`` into ``state`` at or after ``since``."""
        for c in self.changes:
            if (c.observer, c.member, c.new) == (observer, member, state) and c.at >= since:
                return c.at
        return None

    async def wait_until(self, predicate: Callable[[], bool]) -> float:
        """Wait until ``predicate()`` holds, re-checking it at every recorded change, and
        return the (virtual) time it first held. The predicate must depend only on member
        states, which only recorded changes alter. Bound the wait with trio.fail_after:
        under autojump a predicate that never holds runs the simulation forever."""
        while not predicate():
            await self._changed.wait()
        return trio.current_time()


@asynccontextmanager
async def open_cluster(net: SimNet, *, config: SwimConfig | None = None, seed: int = 0,
                       cluster: str = "sim") -> AsyncIterator[SimCluster]:
    """A SimCluster whose nodes all stop (are cancelled) when the block ends."""
    async with trio.open_nursery() as nursery:
        sim = SimCluster(net, nursery, config=config, seed=seed, cluster=cluster)
        try:
            yield sim
        finally:
            nursery.cancel_scope.cancel()
