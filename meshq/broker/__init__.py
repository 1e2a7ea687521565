"""The broker: queue semantics (SPEC section 2) over a Store, driven by the server."""

from meshq.broker.core import Broker, BrokerLimits, Moved, Pending, parse_receipt
from meshq.broker.queue import Consumer, Queue, Session

__all__ = ["Broker", "BrokerLimits", "Consumer", "Moved", "Pending", "Queue", "Session",
           "parse_receipt"]
