"""The node: one daemon's parts, assembled once, and the status it reports.

``build_node`` wires a store (already loaded), a broker restored from it, membership over
a transport, the peer links and the cluster layer; ``Node.run`` starts them. The daemon
(meshq.daemon) and the simulation (meshq.testing.sim) both assemble nodes this way, so
what the simulation proves is what the daemon runs. Listeners (the Unix socket, metrics,
keys) are the daemon's additions.

State here: name, id, boot id, start time, whether the node accepts writes (and why not),
and a nursery for tasks that outlive a client connection (relays saying ``bye``).
"""

from __future__ import annotations

import dataclasses
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from meshq._version import __version__
from meshq.broker import Broker, BrokerLimits
from meshq.clock import Clock
from meshq.cluster.changes import MovesAnswer
from meshq.cluster.driver import Cluster
from meshq.cluster.moves import annotate, summary
from meshq.cluster.peers import LINK_KIND, LinkPeers, serve_link
from meshq.cluster.placement import Placement
from meshq.errors import Unavailable
from meshq.hlc import unpack
from meshq.mesh.membership import Membership
from meshq.mesh.ring import DEFAULT_VNODES, Ring
from meshq.mesh.swim import Swim, SwimConfig
from meshq.mesh.transport import FramedStream, Transport
from meshq.mesh.wire import hello_frame
from meshq.server.access import AccessPolicy
from meshq.server.connection import Connection
from meshq.store import Snapshot, Store

if TYPE_CHECKING:
    from meshq.amqp.server import AmqpServer
    from meshq.mesh.keys import KeyService
    from meshq.resources import Alarms
    from meshq.server.listener import UnixServer

__all__ = ["Node", "NodeSettings", "build_node"]


@dataclass(frozen=True)
class NodeSettings:
    """What build_node needs beyond its parts (the daemon takes these from its Config)."""

    name: str
    cluster_name: str = "meshq"
    seeds: Sequence[str] = ()
    max_clock_offset_ms: int = 500
    ntp_server: str | None = None
    members_path: Path | None = None
    vnodes: int = DEFAULT_VNODES
    write_quorum: int | None = None
    default_partitions: int | None = None
    limits: BrokerLimits = field(default_factory=BrokerLimits)
    swim: SwimConfig = field(default_factory=SwimConfig)
    max_frame_bytes: int = 8 * 1024 * 1024


class Node:
    def __init__(self, *, name: str, node_id: str, address: str, broker: Broker, store: Store,
                 clock: Clock, membership: Membership | None = None,
                 transport: Transport | None = None, cluster: Cluster | None = None,
                 peers: LinkPeers | None = None, cluster_name: str = "meshq",
                 boot: str = "", max_frame_bytes: int = 8 * 1024 * 1024) -> None:
        self.name = name
        self.id = node_id
        self.boot = boot
        self.address = address
        self.broker = broker
        self.store = store
        self.clock = clock
        self.membership = membership
        self.transport = transport
        self.cluster = cluster
        self.peers = peers
        self.cluster_name = cluster_name
        self.max_frame_bytes = max_frame_bytes
        self.version = __version__
        self.started = time.monotonic()
        self.accepting_writes = True
        self.not_accepting_reason: str | None = None
        self.stop_requested = trio.Event()
        self.access = AccessPolicy()  # who may run which op; the daemon sets config.access
        self.keys: KeyService | None = None  # the cluster key ring's operations
        self.security: Callable[[], dict[str, Any]] | None = None  # the status section
        self.server: UnixServer | None = None  # the client socket, set by the daemon
        self.amqp: AmqpServer | None = None  # the AMQP listener, set by the daemon
        self.alarms: Alarms | None = None  # disk and memory alarms, set by the daemon
        self._nursery: trio.Nursery | None = None

    # -- running ---------------------------------------------------------------------------
    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Run membership (joined through a seed, or alone), the peer links, the cluster
        layer, the store's writer and the broker's timers; started() once all run."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            if self.membership is not None:
                await nursery.start(self.membership.run)
            if self.peers is not None:
                await nursery.start(self.peers.run)
            if self.cluster is not None:
                await nursery.start(self.cluster.run)
            await nursery.start(self.store.run)
            await nursery.start(self.broker.run)
            task_status.started()

    def spawn(self, fn: Callable[..., Awaitable[Any]], *args: Any) -> None:
        """Run a task that may outlive the client connection that asked for it."""
        assert self._nursery is not None
        self._nursery.start_soon(fn, *args)

    def stop(self) -> None:
        """Ask ``serve`` to shut down gracefully."""
        self.stop_requested.set()

    def address_of(self, node: str) -> str | None:
        if self.membership is None:
            return None
        m = self.membership.swim.member(node)
        return None if m is None else m.address

    def hint_unreachable(self, node: str) -> None:
        if self.membership is not None:
            self.membership.hint_unreachable(node)

    # -- writes ----------------------------------------------------------------------------
    def refuse_writes(self, reason: str) -> None:
        self.accepting_writes, self.not_accepting_reason = False, reason

    def check_writable(self) -> None:
        """Any write (declares and bindings too): not while shutting down or while the
        clock check fails."""
        if not self.accepting_writes:
            raise Unavailable(f"this node accepts no writes: {self.not_accepting_reason}")
        if self.membership is not None and not self.membership.clock_status.accepting_writes:
            raise Unavailable(f"this node accepts no writes: "
                              f"{self.membership.clock_status.reason}")

    def check_sendable(self) -> None:
        """A send: as any write, and not while a resource alarm is raised (consumers, and
        what they declare and bind to get going, go on: meshq/resources.py)."""
        self.check_writable()
        alarm = None if self.alarms is None else self.alarms.reason()
        if alarm is not None:
            raise Unavailable(f"this node accepts no writes: {alarm}")

    def writes(self) -> tuple[bool, str | None]:
        """Whether sends are accepted now, and why not."""
        try:
            self.check_sendable()
        except Unavailable as exc:
            return False, exc.message
        return True, None

    # -- status ----------------------------------------------------------------------------
    def clock_status(self) -> dict[str, Any]:
        """The status ``clock`` section: our wall clock and what the write check uses."""
        wall_ms = int(self.clock.time() * 1000)
        m = self.membership
        if m is None:
            return {"wall_ms": wall_ms, "max_clock_offset_ms": self.broker.hlc.max_offset_ms,
                    "peers_measured": 0, "min_peers": None, "ntp_server": None,
                    "ntp_offset_ms": None}
        verdict = m.clocks.verdict(trio.current_time())
        ntp = verdict.ntp_offset_ms
        return {"wall_ms": wall_ms, "max_clock_offset_ms": m.max_offset_ms,
                "peers_measured": verdict.peers, "min_peers": m.clocks.min_peers,
                "ntp_server": m.ntp_server, "ntp_offset_ms": None if ntp is None
                else round(ntp, 3)}

    def rebalance_here(self) -> dict[str, Any]:
        """The ``rebalance`` status from this node's moves alone (a client session asks
        every live node: ``Cluster.rebalance``)."""
        if self.cluster is None:
            return summary({self.name: MovesAnswer((self.name,), True, ())})
        return summary({self.name: self.cluster.moves_here()})

    def status(self) -> dict[str, Any]:
        """This node's status map (``meshq-ctl status``); queue counts are this node's
        copy and moves this node's (a client session replaces them with the dispatching
        nodes' counts and every node's moves)."""
        wall, logical = unpack(self.broker.hlc.last)
        store = self.store.statistics()
        accepting, why_not = self.writes()
        if self.membership is not None:
            members = self.membership.status(trio.current_time())
            mesh: dict[str, Any] | None = {
                "cluster": self.membership.cluster,
                "health_score": self.membership.swim.health_score,
                "median_clock_offset_ms": self.membership.clock_status.median_offset_ms,
                "bad_packets": self.membership.bad_packets,
                "bad_streams": self.membership.bad_streams,
            }
        else:
            members = [{"name": self.name, "address": self.address, "state": "alive",
                        "incarnation": 0, "clock_offset_ms": 0.0, "rtt_ms": None,
                        "last_seen_s": None, "self": True}]
            mesh = None
        cluster = self.cluster
        vnodes = cluster.placement.vnodes if cluster is not None else DEFAULT_VNODES
        ring = Ring.build((m["name"] for m in members if m["state"] in ("alive", "suspect")),
                          vnodes)
        queues = []
        for q in self.broker.stats():
            q = dict(q)
            parts = self.broker.queues[q["name"]]
            part = parts[0]  # the queue-level placement fields: partition 0's
            if cluster is not None:
                reps = cluster.replicas(part)
                q["primary"] = reps.primary
                q["holders"] = list(reps.holders)
                q["preferred"] = list(reps.preferred)
                q["write_quorum"] = reps.write_quorum
                q["replicas_effective"] = len(reps.holders)
            else:
                q["replicas_effective"] = 1
            q["dispatching_here"] = any(p.active for p in parts)
            q["copy_here"] = {"ready": sum(p.ready for p in parts),
                              "leased": sum(p.leased for p in parts),
                              "delayed": sum(p.delayed for p in parts),
                              "tombstones": sum(len(p.tombs) for p in parts),
                              "ready_on_disk": sum(p.cold for p in parts),
                              "delayed_on_disk": sum(p.late for p in parts)}
            q["counted_by"] = self.name if all(p.active for p in parts) else None
            q["partitions"] = []
            for p in parts:
                reps_p = cluster.replicas(p) if cluster is not None else None
                q["partitions"].append({
                    "index": p.index,
                    "primary": reps_p.primary if reps_p is not None else self.name,
                    "holders": list(reps_p.holders) if reps_p is not None else [self.name],
                    "dispatching_here": p.active, "ready": p.ready, "leased": p.leased,
                    "delayed": p.delayed, "counted_by": self.name if p.active else None})
            queues.append(q)
        status = {
            "node": {
                "name": self.name,
                "id": self.id,
                "address": self.address,
                "version": self.version,
                "uptime_s": round(time.monotonic() - self.started, 3),
                "hlc": {"wall_ms": wall, "logical": logical, "raw": self.broker.hlc.last},
                "accepting_writes": accepting,
                "not_accepting_reason": why_not,
            },
            "members": members,
            "mesh": mesh,
            "security": self.security() if self.security is not None else None,
            "clock": self.clock_status(),
            "ring": {
                "vnodes_per_node": vnodes,
                "ownership": {name: round(share, 6) for name, share
                              in sorted(ring.ownership().items())},
                "replica_ownership_n3": {name: round(share, 6) for name, share
                                         in sorted(ring.replica_ownership(3).items())},
            },
            "queues": queues,
            "store": {
                "path": store.path,
                "size_bytes": store.size_bytes,
                "commits": store.commits,
                "ops_committed": store.ops_committed,
                "failed_commits": store.failed_commits,
                "commit_seconds": round(store.commit_seconds, 6),
            },
            "broker": {"redeliveries": self.broker.redeliveries},
            "resources": self.alarms.status() if self.alarms is not None else None,
            "access": dataclasses.asdict(self.access.statistics()),
            "server": (dataclasses.asdict(self.server.statistics())
                       if self.server is not None else None),
            "amqp": (dataclasses.asdict(self.amqp.statistics())
                     if self.amqp is not None else None),
            "replication": (_replication(cluster) if cluster is not None else None),
        }
        annotate(status, self.rebalance_here())
        return status


def _replication(cluster: Cluster) -> dict[str, Any]:
    st = dataclasses.asdict(cluster.statistics())
    st["taking_over"] = list(st["taking_over"])
    st["links"] = list(st["links"])
    return st


def build_node(settings: NodeSettings, *, node_id: str, store: Store, snapshot: Snapshot,
               clock: Clock, transport: Transport, rng: random.Random | None = None,
               boot: str | None = None, incarnation: int | None = None) -> Node:
    """Assemble a node from its parts (see the module docstring). ``rng`` seeds every
    random choice (membership, lease ids, the boot id when none is given)."""
    rng = rng or random.Random()
    boot = boot or f"{rng.getrandbits(32):08x}"
    name = settings.name
    broker = Broker(store, clock, node_id=node_id, limits=settings.limits,
                    max_clock_offset_ms=settings.max_clock_offset_ms, rng=rng,
                    holder=f"{name}/{boot}")
    broker.tag_prefix = f"{name}."
    broker.dispatch_by_default = False
    broker.restore(snapshot)
    swim = Swim(name, transport.local_address, settings.swim, rng, meta={"b": boot},
                incarnation=int(clock.time()) if incarnation is None else incarnation,
                now=trio.current_time())
    membership = Membership(swim=swim, transport=transport, cluster=settings.cluster_name,
                            clock=clock, seeds=list(settings.seeds),
                            max_offset_ms=settings.max_clock_offset_ms,
                            members_path=settings.members_path, ntp_server=settings.ntp_server)
    placement = Placement(name, swim.members, vnodes=settings.vnodes)
    peers = LinkPeers(name, settings.cluster_name, transport, membership)
    cluster = Cluster(me=name, broker=broker, store=store, placement=placement, peers=peers,
                      members=swim.member, write_quorum=settings.write_quorum, boot=boot,
                      default_partitions=settings.default_partitions)
    membership.on_change = cluster.membership_changed
    peers.on_link_failure = membership.hint_unreachable
    node = Node(name=name, node_id=node_id, address=transport.local_address, broker=broker,
                store=store, clock=clock, membership=membership, transport=transport,
                cluster=cluster, peers=peers, cluster_name=settings.cluster_name, boot=boot,
                max_frame_bytes=settings.max_frame_bytes)

    async def serve_repl(stream: FramedStream, hello: dict[str, Any]) -> None:
        await serve_link(stream, hello, cluster.handle)

    async def serve_relayed(stream: FramedStream, hello: dict[str, Any]) -> None:
        """A client of another node, for a partition this node dispatches."""
        holder = hello.get("holder")
        if not isinstance(holder, str) or not holder or len(holder) > 512:
            holder = f"{hello.get('node')}/?"
        await stream.send(hello_frame(settings.cluster_name, name))
        await Connection(stream.stream, node, settings.max_frame_bytes,
                         relayed_holder=holder).serve()

    membership.stream_handlers[LINK_KIND] = serve_repl
    membership.stream_handlers["client"] = serve_relayed
    return node
