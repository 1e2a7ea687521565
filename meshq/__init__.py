"""meshq: a distributed message queue with no leader.

Programs talk to their local ``meshqd`` through a Unix socket with :class:`Client`
(blocking) or :class:`AsyncClient` (trio).
"""

from typing import TYPE_CHECKING, Any

from meshq._version import __version__
from meshq.client import Client, Delivery
from meshq.errors import (
    BadRequest,
    ConsumerCancelled,
    MeshqError,
    NotFound,
    PreconditionFailed,
    ProtocolError,
    Timeout,
    TooLarge,
    Unauthorized,
    Unavailable,
)

if TYPE_CHECKING:
    from meshq.client import AsyncClient


def __getattr__(name: str) -> Any:
    # AsyncClient pulls in trio; the command-line tools start faster without it.
    if name == "AsyncClient":
        from meshq.client import AsyncClient

        return AsyncClient
    raise AttributeError(f"module 'meshq' has no attribute {name!r}")


__all__ = [
    "AsyncClient",
    "BadRequest",
    "Client",
    "ConsumerCancelled",
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
