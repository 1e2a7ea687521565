"""meshq: a distributed message queue with no leader.

Programs talk to their local ``meshqd`` through a Unix socket with :class:`Client`
(blocking) or :class:`AsyncClient` (trio).
"""

__version__ = "0.1.0"

from meshq.client import AsyncClient, Client, Delivery
from meshq.errors import (
    BadRequest,
    MeshqError,
    NotFound,
    PreconditionFailed,
    ProtocolError,
    Timeout,
    TooLarge,
    Unauthorized,
    Unavailable,
)

__all__ = [
    "AsyncClient",
    "BadRequest",
    "Client",
    "Delivery",
    "MeshqError",
    "NotFound",
    "PreconditionFailed",
    "ProtocolError",
    "Timeout",
    "TooLarge",
    "Unauthorized",
    "Unavailable",
    "__version__",
]
