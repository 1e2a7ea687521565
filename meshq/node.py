"""The node: this daemon's identity and the status it reports (``meshq-ctl status``).

State here: name, id, start time, and whether the node accepts writes (and why not).
The mesh will add members and clock offsets here; for now the node is its only member.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import trio

from meshq._version import __version__
from meshq.broker import Broker
from meshq.clock import Clock
from meshq.errors import Unavailable
from meshq.hlc import unpack
from meshq.mesh.keys import KeyService
from meshq.mesh.membership import Membership
from meshq.mesh.replication import Replicator
from meshq.mesh.ring import DEFAULT_VNODES, Ring
from meshq.server.access import AccessPolicy
from meshq.store import Store

if TYPE_CHECKING:
    from meshq.server.listener import UnixServer

__all__ = ["Node"]


class Node:
    def __init__(self, *, name: str, node_id: str, address: str, broker: Broker, store: Store,
                 clock: Clock, membership: Membership | None = None) -> None:
        self.name = name
        self.id = node_id
        self.address = address
        self.broker = broker
        self.store = store
        self.clock = clock
        self.membership = membership
        self.version = __version__
        self.started = time.monotonic()
        self.accepting_writes = True
        self.not_accepting_reason: str | None = None
        self.stop_requested = trio.Event()
        self.replicator: Replicator | None = None  # set by the daemon (the mesh)
        self.access = AccessPolicy()  # who may run which op; the daemon sets config.access
        self.keys: KeyService | None = None  # the cluster key ring's operations
        self.security: Callable[[], dict[str, Any]] | None = None  # the status section
        self.server: UnixServer | None = None  # the client socket, set by the daemon

    def stop(self) -> None:
        """Ask ``serve`` to shut down gracefully."""
        self.stop_requested.set()

    def refuse_writes(self, reason: str) -> None:
        self.accepting_writes, self.not_accepting_reason = False, reason

    def check_writable(self) -> None:
        if not self.accepting_writes:
            raise Unavailable(f"this node accepts no writes: {self.not_accepting_reason}")
        if self.membership is not None and not self.membership.clock_status.accepting_writes:
            raise Unavailable(f"this node accepts no writes: "
                              f"{self.membership.clock_status.reason}")

    def writes(self) -> tuple[bool, str | None]:
        """Whether writes are accepted now, and why not."""
        try:
            self.check_writable()
        except Unavailable as exc:
            return False, exc.message
        return True, None

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

    def status(self) -> dict[str, Any]:
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
        repl = self.replicator
        vnodes = repl.placement.vnodes if repl is not None else DEFAULT_VNODES
        ring = Ring.build((m["name"] for m in members if m["state"] in ("alive", "suspect")),
                          vnodes)
        queues = []
        for q in self.broker.stats():
            q = dict(q)
            if repl is not None:
                reps = repl.replicas(self.broker.queues[q["name"]])
                q["primary"] = reps.primary
                q["holders"] = list(reps.holders)
                q["preferred"] = list(reps.preferred)
                q["write_quorum"] = reps.write_quorum
                q["replicas_effective"] = len(reps.holders)
            else:
                q["replicas_effective"] = 1
            q["dispatching_here"] = self.broker.queues[q["name"]].active
            queues.append(q)
        return {
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
            "access": dataclasses.asdict(self.access.statistics()),
            "server": (dataclasses.asdict(self.server.statistics())
                       if self.server is not None else None),
            "replication": repl.status() if repl is not None else None,
        }
