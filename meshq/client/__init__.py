"""Clients for a local meshqd: :class:`Client` (blocking) and :class:`AsyncClient` (trio).

AsyncClient is imported on first use, so that blocking users do not pay for trio.
"""

from typing import TYPE_CHECKING, Any

from meshq.client._common import Delivery
from meshq.client._sync import Client, Subscription

if TYPE_CHECKING:
    from meshq.client._async import AsyncClient, AsyncSubscription


def __getattr__(name: str) -> Any:
    if name in ("AsyncClient", "AsyncSubscription"):
        from meshq.client import _async

        return getattr(_async, name)
    raise AttributeError(f"module 'meshq.client' has no attribute {name!r}")


__all__ = ["AsyncClient", "AsyncSubscription", "Client", "Delivery", "Subscription"]
