"""Clients for a local meshqd: :class:`Client` (blocking) and :class:`AsyncClient` (trio)."""

from meshq.client._async import AsyncClient, AsyncSubscription
from meshq.client._common import Delivery
from meshq.client._sync import Client, Subscription

__all__ = ["AsyncClient", "AsyncSubscription", "Client", "Delivery", "Subscription"]
