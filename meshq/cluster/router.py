"""The router, pure: where a client op on a queue partition is served, in this node's view.

``route`` takes the op, the partition's placement, whether this node dispatches it now,
and whether the request was itself relayed here, and returns one of:

- ``Local``: serve it here (this node is the primary and dispatches the partition);
- ``AwaitTakeover``: this node is the primary and is taking the partition over: wait for
  that (bounded), then serve it;
- ``Relay(node)``: send it to the primary;
- ``Refuse(reason)``: answer UNAVAILABLE (nothing was done): no eligible primary, fewer
  than W replicas reachable for an op that needs a quorum, or a relayed request that
  reached a node which (in its view) is not the primary -- never relayed twice.

Never: a relay to this node itself, a second hop, or a stateful op served by a node that
does not dispatch the partition.
"""

from __future__ import annotations

from dataclasses import dataclass

from meshq.cluster.placement import Replicas

__all__ = ["QUORUM_OPS", "AwaitTakeover", "Local", "Refuse", "Relay", "Route", "route"]

# Ops that write or lease: with fewer than W replicas reachable nothing can be confirmed,
# so they are refused up front (``stats`` and a passive ``declare`` only read).
QUORUM_OPS = frozenset({"declare", "delete", "purge", "send", "receive", "consume", "ack",
                        "nack", "extend"})


@dataclass(frozen=True)
class Local:
    pass


@dataclass(frozen=True)
class AwaitTakeover:
    pass


@dataclass(frozen=True)
class Relay:
    node: str


@dataclass(frozen=True)
class Refuse:
    reason: str


Route = Local | AwaitTakeover | Relay | Refuse


def route(op: str, queue: str, me: str, replicas: Replicas, *, active: bool,
          relayed: bool = False, read_only: bool = False) -> Route:
    """Where ``op`` on ``queue`` goes (see the module docstring). ``read_only``: the op
    needs no quorum even if its name is in QUORUM_OPS (a passive declare)."""
    if replicas.primary is None:
        if not replicas.holders:
            return Refuse(f"no replica of queue {queue!r} is reachable")
        return Refuse(f"no replica of queue {queue!r} may dispatch it now (reachable: "
                      f"{', '.join(replicas.holders)}; suspected, or clock refused)")
    if op in QUORUM_OPS and not read_only and not replicas.writable:
        return Refuse(f"queue {queue!r} needs {replicas.write_quorum} of its replicas and "
                      f"{len(replicas.holders)} are reachable ({', '.join(replicas.holders)})")
    if replicas.primary == me:
        return Local() if active else AwaitTakeover()
    if relayed:
        return Refuse(f"this node does not dispatch queue {queue!r} (node "
                      f"{replicas.primary!r} does, as this node sees the membership, which "
                      "is changing); retry")
    return Relay(replicas.primary)
