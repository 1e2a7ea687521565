"""Replication as one layer (SPEC section 3), shaped as the membership layer is.

Pure parts, tested without I/O: ``changes`` (the typed vocabulary and its codec),
``lattice`` (the merge rules), ``gate`` (the quorum gate), ``router`` (where an op is
served), ``placement`` (a partition's replicas and primary). Written against the
``peers.Peers`` interface: ``repair`` (digest sync and takeover). The driver: ``driver``
(``Cluster``). The broker's side is meshq.broker.replica. Import the modules directly;
this package re-exports nothing (the broker imports the pure parts, the driver imports
the broker).
"""

__all__: list[str] = []
