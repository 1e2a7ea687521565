"""The broker: queue semantics (SPEC section 2) over a Store, driven by the server."""

from meshq.broker.core import Broker, BrokerLimits, Pending
from meshq.broker.queue import Consumer, Queue, Session

__all__ = ["Broker", "BrokerLimits", "Consumer", "Pending", "Queue", "Session"]
