"""The mesh (SPEC section 3): membership, clocks, placement and replication.

Pure protocol cores live here (no I/O: they take ``now`` and input events and return
effects); the daemon drives them over real sockets, the tests over meshq.testing.simnet.
"""

__all__: list[str] = []
