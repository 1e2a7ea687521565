"""AMQP 0-9-1 and meshq's records, each way: message properties, queue arguments, errors.

Pure functions, no state. A message published over AMQP keeps what only AMQP knows (its
exchange, routing key and properties, field tables of every type included) in one
reserved meshq header, ``x-amqp``, as the properties' own wire encoding; its plain
application headers are copied beside it so that ``meshq recv`` shows them. A message
sent through the socket reaches AMQP consumers with its meshq headers as the headers
table. Never: a property lost or changed on the way through, or a peer's bad value
raising anything but ArgumentError.
"""

from __future__ import annotations

import decimal
import math
import struct
from datetime import UTC, datetime
from typing import Any

from meshq.amqp.frames import scan_properties
from meshq.errors import (
    BadRequest,
    MeshqError,
    NotFound,
    PreconditionFailed,
    TooLarge,
    Unauthorized,
)

__all__ = [
    "ACCESS_REFUSED",
    "NOT_FOUND",
    "PRECONDITION_FAILED",
    "RESERVED",
    "RESOURCE_LOCKED",
    "ArgumentError",
    "add_headers",
    "check_expiration",
    "error_reply",
    "from_meshq",
    "queue_options",
    "table_value",
    "to_meshq",
]

RESERVED = "x-amqp"  # the meshq header holding [exchange, routing key, properties]
ACCESS_REFUSED = 403
NOT_FOUND = 404
RESOURCE_LOCKED = 405
PRECONDITION_FAILED = 406
_PLAIN = (str, int, float, bool)


class ArgumentError(Exception):
    """A peer's value AMQP cannot take: a channel exception ``code`` with ``text``."""

    def __init__(self, code: int, text: str) -> None:
        super().__init__(f"{code} {text}")
        self.code, self.text = code, text


# -- messages ------------------------------------------------------------------------------

_NO_PROPERTIES = b"\x00\x00"
_CONTENT_TYPE, _CONTENT_ENCODING, _HEADERS = 1 << 15, 1 << 14, 1 << 13


def to_meshq(exchange: str, routing_key: str, queue: str, body: bytes,
             raw: bytes = _NO_PROPERTIES, headers: dict[str, Any] | None = None,
             expiration: str | None = None) -> dict[str, Any]:
    """The message for meshq's ``send``: body, headers, and ``ttl`` from ``expiration``
    (milliseconds as a string, as RabbitMQ reads it). ``raw``: the properties as the
    client encoded them, kept byte for byte; ``headers``: their headers table."""
    msg: dict[str, Any] = {"body": body}
    if exchange == "" and routing_key == queue and raw == _NO_PROPERTIES:
        return msg  # the common case (sender.js): nothing to keep
    kept: dict[str, Any] = {RESERVED: [exchange, routing_key, raw]}
    for key, value in (headers or {}).items():
        if isinstance(key, str) and key != RESERVED and isinstance(value, _PLAIN):
            kept[key] = value
    msg["headers"] = kept
    if expiration is not None:
        msg["ttl"] = check_expiration(expiration)
    return msg


def check_expiration(text: Any) -> float:
    if isinstance(text, bytes):
        text = text.decode("latin-1")
    if not isinstance(text, str) or not text.isascii() or not text.isdigit():
        raise ArgumentError(PRECONDITION_FAILED, f"PRECONDITION_FAILED - invalid expiration "
                            f"{text!r} (milliseconds as a string of digits)")
    return max(int(text), 1) / 1000.0  # 0: expire unless a consumer takes it at once


def from_meshq(d: dict[str, Any]) -> tuple[str, str, bytes]:
    """(exchange, routing key, encoded properties) of a meshq delivery for an AMQP
    consumer: with ``x-delivery-count`` once it was delivered before, and RabbitMQ's
    ``x-death`` when it was dead-lettered."""
    headers = d.get("headers") or {}
    kept = headers.get(RESERVED)
    extra: dict[str, Any] = {}
    if isinstance(kept, list) and len(kept) == 3 and isinstance(kept[2], bytes) and (
            _plausible(kept[2])):
        exchange, routing_key, raw = str(kept[0]), str(kept[1]), kept[2]
    else:  # sent through the socket: its meshq headers are the headers table
        exchange, routing_key, raw = "", d["queue"], _NO_PROPERTIES
        extra = {k: v for k, v in headers.items() if k not in (RESERVED, "x-death")}
    death = headers.get("x-death")
    if isinstance(death, dict):
        extra.update(_x_death(death, exchange, routing_key))
        if isinstance(death.get("exchange"), str):  # through a dead-letter exchange
            exchange, routing_key = death["exchange"], str(death.get("routing_key", ""))
    count = d.get("delivery_count", 1)
    if isinstance(count, int) and count > 1:
        extra["x-delivery-count"] = count - 1
    return exchange, routing_key, add_headers(raw, extra) if extra else raw


def _plausible(raw: bytes) -> bool:
    """Properties laid out as AMQP writes them (AMQP's were checked on receipt); a socket
    client that wrote something else under the reserved header gets its bytes dropped."""
    try:
        scan_properties(raw, decode=False)
    except (ValueError, IndexError, UnicodeDecodeError):
        return False
    return True


def _skip_short(raw: bytes, pos: int) -> int:
    return pos + 1 + raw[pos]


def add_headers(raw: bytes, extra: dict[str, Any]) -> bytes:
    """``raw`` properties with ``extra`` entries appended to their headers table (made if
    there is none), everything else left byte for byte as it was."""
    flags = int.from_bytes(raw[:2], "big")
    if flags & 1:  # a continuation flag word: 0-9-1 defines no such property
        return raw
    pos = 2
    if flags & _CONTENT_TYPE:
        pos = _skip_short(raw, pos)
    if flags & _CONTENT_ENCODING:
        pos = _skip_short(raw, pos)
    entries = b"".join(_short(k) + table_value(v) for k, v in extra.items())
    if flags & _HEADERS:
        size = int.from_bytes(raw[pos:pos + 4], "big")
        end = pos + 4 + size
        return (raw[:pos] + (size + len(entries)).to_bytes(4, "big") + raw[pos + 4:end]
                + entries + raw[end:])
    return ((flags | _HEADERS).to_bytes(2, "big") + raw[2:pos]
            + len(entries).to_bytes(4, "big") + entries + raw[pos:])


def _short(text: str) -> bytes:
    data = text.encode()[:255]
    return bytes([len(data)]) + data


def table_value(v: Any) -> bytes:
    """One field-table value, losslessly (pamqp writes floats as 32-bit and cannot write
    bytes): the types msgpack gives meshq headers, and timestamps and decimals."""
    if v is None:
        return b"V"
    if isinstance(v, bool):
        return b"t" + bytes([v])
    if isinstance(v, int):
        if -(1 << 63) <= v < (1 << 63):
            return b"l" + struct.pack(">q", v)
        return b"S" + _long(str(v).encode())
    if isinstance(v, float):
        return b"d" + struct.pack(">d", v)
    if isinstance(v, str):
        return b"S" + _long(v.encode())
    if isinstance(v, bytes | bytearray):
        return b"x" + _long(bytes(v))
    if isinstance(v, datetime):
        return b"T" + struct.pack(">Q", int(v.timestamp()) if v.tzinfo else int(
            v.replace(tzinfo=UTC).timestamp()))
    if isinstance(v, decimal.Decimal):
        exponent = v.as_tuple().exponent
        if isinstance(exponent, int) and 0 <= -exponent <= 255 and (
                -(1 << 31) <= int(v.scaleb(-exponent)) < (1 << 31)):
            return b"D" + struct.pack(">Bi", -exponent, int(v.scaleb(-exponent)))
        return b"S" + _long(str(v).encode())
    if isinstance(v, list | tuple):
        return b"A" + _long(b"".join(table_value(x) for x in v))
    if isinstance(v, dict):
        return b"F" + _long(b"".join(_short(str(k)) + table_value(x) for k, x in v.items()))
    return b"S" + _long(str(v).encode())


def _long(data: bytes) -> bytes:
    return len(data).to_bytes(4, "big") + data


def _x_death(death: dict[str, Any], exchange: str, routing_key: str) -> dict[str, Any]:
    """meshq's ``x-death`` (queue, reason, delivery_count, time) as RabbitMQ writes it."""
    reason = {"max_deliveries": "delivery_limit", "maxlen": "maxlen",
              "expired": "expired", "rejected": "rejected"}.get(
        str(death.get("reason")), str(death.get("reason")))
    when = death.get("time")
    stamp = datetime.fromtimestamp(int(when), UTC) if isinstance(when, int | float) and (
        math.isfinite(when)) else datetime.fromtimestamp(0, UTC)
    queue = str(death.get("queue", ""))
    entry = {"count": 1, "reason": reason, "queue": queue, "time": stamp,
             "exchange": exchange, "routing-keys": [routing_key]}
    return {"x-death": [entry], "x-first-death-reason": reason,
            "x-first-death-queue": queue, "x-first-death-exchange": exchange}


# -- queues --------------------------------------------------------------------------------

_QUEUE_TYPES = ("classic", "quorum")
_OVERFLOWS = ("drop-head",)


def _int_arg(args: dict[str, Any], key: str, minimum: int) -> int | None:
    value = args.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ArgumentError(PRECONDITION_FAILED, f"PRECONDITION_FAILED - invalid arg "
                            f"'{key}' for queue: {value!r} (an integer >= {minimum})")
    return value


def queue_options(arguments: dict[str, Any] | None) -> dict[str, Any]:
    """meshq queue options for queue.declare's arguments (only those given: an existing
    queue is checked against these alone). Unsupported ones raise ArgumentError 406."""
    args = dict(arguments or {})
    out: dict[str, Any] = {}
    ttl = _int_arg(args, "x-message-ttl", 0)
    if ttl is not None:
        out["message_ttl"] = max(ttl, 1) / 1000.0
    length = _int_arg(args, "x-max-length", 0)
    if length is not None:
        if length == 0:
            raise ArgumentError(PRECONDITION_FAILED, "PRECONDITION_FAILED - x-max-length 0 "
                                "is not supported (meshq keeps at least one message)")
        out["max_length"] = length
    limit = _int_arg(args, "x-delivery-limit", 0)
    if limit is not None:
        out["max_deliveries"] = limit + 1  # RabbitMQ counts returns, meshq deliveries
    dlx = args.get("x-dead-letter-exchange")
    dlrk = args.get("x-dead-letter-routing-key")
    if dlrk is not None and not isinstance(dlrk, str):
        raise ArgumentError(PRECONDITION_FAILED, f"PRECONDITION_FAILED - invalid arg "
                            f"'x-dead-letter-routing-key' for queue: {dlrk!r}")
    if dlx is not None:
        if not isinstance(dlx, str):
            raise ArgumentError(PRECONDITION_FAILED, f"PRECONDITION_FAILED - invalid arg "
                                f"'x-dead-letter-exchange' for queue: {dlx!r}")
        if dlx == "" and dlrk:  # the default exchange to one queue: meshq's own DLQ
            out["dead_letter_queue"] = dlrk
        else:
            out["dead_letter_exchange"] = dlx
            if dlrk is not None:
                out["dead_letter_routing_key"] = dlrk
    elif dlrk is not None:
        raise ArgumentError(PRECONDITION_FAILED, "PRECONDITION_FAILED - "
                            "x-dead-letter-routing-key without x-dead-letter-exchange")
    kind = args.get("x-queue-type")
    if kind is not None and kind not in _QUEUE_TYPES:
        raise ArgumentError(PRECONDITION_FAILED, f"PRECONDITION_FAILED - invalid arg "
                            f"'x-queue-type' for queue: {kind!r} (meshq takes "
                            f"{' or '.join(_QUEUE_TYPES)}; every queue is replicated)")
    overflow = args.get("x-overflow")
    if overflow is not None and overflow not in _OVERFLOWS:
        raise ArgumentError(PRECONDITION_FAILED, f"PRECONDITION_FAILED - x-overflow "
                            f"{overflow!r} is not supported (meshq drops the head)")
    expires = _int_arg(args, "x-expires", 1)
    if expires is not None:
        out["expires"] = expires / 1000.0
    partitions = _int_arg(args, "x-meshq-partitions", 1)
    if partitions is not None:
        out["partitions"] = partitions
    return out


def error_reply(exc: MeshqError) -> tuple[int, str]:
    """The channel exception for a meshq error."""
    if isinstance(exc, NotFound):
        return NOT_FOUND, f"NOT_FOUND - {exc.message}"
    if isinstance(exc, Unauthorized):
        return ACCESS_REFUSED, f"ACCESS_REFUSED - {exc.message}"
    if isinstance(exc, PreconditionFailed | BadRequest | TooLarge):
        return PRECONDITION_FAILED, f"PRECONDITION_FAILED - {exc.message}"
    return PRECONDITION_FAILED, f"PRECONDITION_FAILED - {exc.code}: {exc.message}"
