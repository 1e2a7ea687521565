"""What both clients share: request shapes, deliveries, and turning error frames into errors.

Pure: no sockets here, so the blocking and the trio client cannot drift apart.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from meshq.errors import PreconditionFailed, ProtocolError, error_from_code

__all__ = ["Delivery", "check_failed", "message_fields", "result_of"]


@dataclass(frozen=True)
class Delivery:
    """One message handed to a consumer. Ack it by ``id`` on the same connection."""

    id: str
    queue: str
    body: bytes
    headers: dict[str, Any] = field(default_factory=dict)
    hlc: int = 0
    delivery_count: int = 1
    redelivered: bool = False
    consumer: str | None = None

    @classmethod
    def from_wire(cls, d: dict[str, Any], consumer: str | None = None) -> Delivery:
        try:
            return cls(d["id"], d["queue"], d["body"], d.get("headers") or {}, d["hlc"],
                       d["delivery_count"], d["redelivered"], consumer)
        except (KeyError, TypeError) as exc:
            raise ProtocolError(f"malformed delivery from the daemon: {exc}") from None

    def text(self) -> str:
        return self.body.decode()


def message_fields(body: bytes | str, headers: dict[str, Any] | None = None,
                   ttl: float | None = None, delay: float | None = None,
                   dedup_id: str | None = None) -> dict[str, Any]:
    """One message of a ``send`` request, leaving out what is not set."""
    m: dict[str, Any] = {"body": body.encode() if isinstance(body, str) else body}
    if headers:
        m["headers"] = headers
    if ttl is not None:
        m["ttl"] = ttl
    if delay:
        m["delay"] = delay
    if dedup_id is not None:
        m["dedup_id"] = dedup_id
    return m


def result_of(frame: dict[str, Any]) -> dict[str, Any]:
    """The result map of a response frame, or the error it carries, raised."""
    err = frame.get("error")
    if err is not None:
        if not isinstance(err, dict):
            raise ProtocolError("malformed error from the daemon")
        raise error_from_code(str(err.get("code")), str(err.get("message", "")))
    result = frame.get("result")
    if not isinstance(result, dict):
        raise ProtocolError("response without a result")
    return result


def check_failed(result: dict[str, Any], verb: str) -> list[str]:
    """Raise PreconditionFailed naming the ids an ack/nack could not settle."""
    failed = result.get("failed") or {}
    if failed:
        detail = "; ".join(f"{mid}: {why}" for mid, why in failed.items())
        raise PreconditionFailed(f"could not {verb} {len(failed)} message(s): {detail}")
    return list(result.get(f"{verb}ed", []))
