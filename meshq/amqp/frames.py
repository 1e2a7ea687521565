"""AMQP 0-9-1 frames off the wire, a byte at a time if need be (pamqp does the marshalling).

State here: the bytes received and not yet a whole frame, and whether the protocol
header has been read. Never: a frame handed on before its frame-end octet was checked,
a frame bigger than the negotiated ``frame_max`` buffered, or anything but AmqpError
raised for what a peer sent (garbage, a wrong header, a bad frame-end, an unknown or
malformed method): the caller turns it into the connection close the spec asks for.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any, NamedTuple, TypeAlias

from pamqp import body as pbody
from pamqp import commands as spec
from pamqp import decode as pdecode
from pamqp import frame as pframe
from pamqp import header as pheader
from pamqp import heartbeat as pheartbeat
from pamqp.base import Frame as PFrame
from pamqp.exceptions import PAMQPException

__all__ = [
    "FRAME_END",
    "FRAME_ERROR",
    "MIN_FRAME_MAX",
    "PROTOCOL_HEADER",
    "SYNTAX_ERROR",
    "AmqpError",
    "ContentHeader",
    "FrameReader",
    "FrameValue",
    "Received",
    "basic_ack",
    "content_header",
    "deliver",
    "marshal",
    "scan_properties",
]

PROTOCOL_HEADER = b"AMQP\x00\x00\x09\x01"
FRAME_END = 0xCE
MIN_FRAME_MAX = 4096  # the spec's floor for frame_max
FRAME_ERROR = 501  # a malformed frame (connection exception)
SYNTAX_ERROR = 502  # a frame whose content does not parse (connection exception)
_HEAD = struct.Struct(">BHI")  # type, channel, payload size
_CONTENT_HEAD = struct.Struct(">HHQ")  # class id, weight, body size

FrameValue: TypeAlias = "PFrame | ContentHeader | pbody.ContentBody | pheartbeat.Heartbeat"


class AmqpError(Exception):
    """What a peer sent breaks the protocol: close the connection with ``code``
    (an AMQP reply code), naming ``class_id``/``method_id`` when a method was at fault."""

    def __init__(self, code: int, text: str, class_id: int = 0, method_id: int = 0) -> None:
        super().__init__(f"{code} {text}")
        self.code, self.text = code, text
        self.class_id, self.method_id = class_id, method_id


class Received(NamedTuple):
    """One whole frame: its channel and its value (a pamqp method, content header,
    content body or heartbeat)."""

    channel: int
    value: FrameValue


class FrameReader:
    """Feed bytes with ``feed``; ``frames()`` returns every whole frame they completed.
    The first 8 bytes must be the AMQP 0-9-1 protocol header (``header_ok`` tells when it
    was read). ``frame_max`` bounds a frame (header and end octet included)."""

    def __init__(self, frame_max: int) -> None:
        self.frame_max = frame_max
        self.header_ok = False
        self._buf = bytearray()

    def feed(self, data: bytes) -> None:
        self._buf += data

    def frames(self) -> list[Received]:
        out: list[Received] = []
        buf = self._buf
        if not self.header_ok:
            if len(buf) < len(PROTOCOL_HEADER):
                if not PROTOCOL_HEADER.startswith(bytes(buf)):
                    raise AmqpError(FRAME_ERROR, "not an AMQP 0-9-1 protocol header")
                return out
            if bytes(buf[:8]) != PROTOCOL_HEADER:
                raise AmqpError(FRAME_ERROR, "not an AMQP 0-9-1 protocol header")
            del buf[:8]
            self.header_ok = True
        pos = 0
        try:
            while len(buf) - pos >= _HEAD.size:
                kind, channel, size = _HEAD.unpack_from(buf, pos)
                total = _HEAD.size + size + 1
                if total > self.frame_max:
                    raise AmqpError(FRAME_ERROR, f"frame of {total} bytes exceeds frame_max "
                                    f"{self.frame_max}")
                if len(buf) - pos < total:
                    break
                if buf[pos + total - 1] != FRAME_END:
                    raise AmqpError(FRAME_ERROR, "frame does not end with 0xCE")
                try:
                    value = _unmarshal(bytes(buf[pos:pos + total]), kind)
                finally:  # a frame that does not parse is skipped: the close-ok after it
                    pos += total  # must be readable
                out.append(Received(channel, value))
        finally:
            del buf[:pos]
        return out


def _unmarshal(data: bytes, kind: int) -> FrameValue:
    if kind not in (1, 2, 3, 8):
        raise AmqpError(FRAME_ERROR, f"unknown frame type {kind}")
    try:
        if kind == 3:
            return pbody.ContentBody(data[_HEAD.size:-1])
        if kind == 2:
            return _content_header(data)
        if kind == 1:
            fast = _fast_method(data)
            if fast is not None:
                return fast
        _, _, value = pframe.unmarshal(data)
    except (PAMQPException, ValueError, KeyError, IndexError, TypeError, struct.error,
            UnicodeDecodeError, ArithmeticError, OSError,  # decimals, timestamps
            RecursionError) as exc:  # tables nested past the interpreter's depth
        raise AmqpError(SYNTAX_ERROR, f"malformed frame: {_text(exc)}") from None
    if isinstance(value, pheader.ProtocolHeader):
        raise AmqpError(FRAME_ERROR, "a protocol header inside the connection")
    assert not isinstance(value, pheader.ContentHeader)  # kind 2 is ours, above
    return value


@dataclass(slots=True)
class ContentHeader:
    """A content header as received: the body size and the properties' bytes (kept as
    sent, meshq.amqp.mapping), with the two meshq reads: headers and expiration."""

    body_size: int
    raw_properties: bytes
    headers: dict[str, Any] | None
    expiration: str | None


_SHORT = 1  # property kinds, in flag order from bit 15: short string, table, octet, 64 bits
_TABLE, _OCTET, _LONGLONG = 2, 3, 4
_LAYOUT = (_SHORT, _SHORT, _TABLE, _OCTET, _OCTET, _SHORT, _SHORT, _SHORT, _SHORT, _LONGLONG,
           _SHORT, _SHORT, _SHORT, _SHORT)
_HEADERS_BIT, _EXPIRATION_BIT = 2, 7  # their places in _LAYOUT


def scan_properties(raw: bytes, *, decode: bool = True
                    ) -> tuple[dict[str, Any] | None, str | None]:
    """Check basic properties' layout; their headers table (decoded, unless not
    ``decode``) and expiration. ValueError (or IndexError, struct.error) when malformed."""
    flags = int.from_bytes(raw[:2], "big")
    if len(raw) < 2 or flags & 0x3:
        raise ValueError("property flags with reserved or continuation bits set")
    pos, headers, expiration = 2, None, None
    for i, kind in enumerate(_LAYOUT):
        if not flags & (1 << (15 - i)):
            continue
        if kind == _SHORT:
            end = pos + 1 + raw[pos]
            if i == _EXPIRATION_BIT:
                expiration = raw[pos + 1:end].decode("utf-8")
        elif kind == _TABLE:
            end = pos + 4 + int.from_bytes(raw[pos:pos + 4], "big")
            if decode:
                _, headers = pdecode.field_table(raw[pos:end])
        else:
            end = pos + (1 if kind == _OCTET else 8)
        if end > len(raw):
            raise ValueError("properties cut short")
        pos = end
    if pos != len(raw):
        raise ValueError("bytes after the properties")
    return headers, expiration


def _content_header(data: bytes) -> ContentHeader:
    cls, _, size = _CONTENT_HEAD.unpack_from(data, _HEAD.size)
    if cls != 60:
        raise ValueError(f"a content header of class {cls} (only basic, 60, has content)")
    raw = data[_HEAD.size + _CONTENT_HEAD.size:-1]
    headers, expiration = scan_properties(raw)
    return ContentHeader(size, raw, headers, expiration)


_METHOD = struct.Struct(">HH")
_ACK = struct.Struct(">QB")


def _short_at(data: bytes, pos: int) -> tuple[str, int]:
    end = pos + 1 + data[pos]
    return data[pos + 1:end].decode("utf-8"), end


def _fast_method(data: bytes) -> PFrame | None:
    """basic.publish and basic.ack, the methods of the hot path, decoded directly (pamqp's
    generic decoder for the rest)."""
    body = _HEAD.size
    cls, meth = _METHOD.unpack_from(data, body)
    if cls != 60:
        return None
    if meth == 80:
        if len(data) != body + 4 + _ACK.size + 1:
            raise ValueError("basic.ack of the wrong length")
        tag, bits = _ACK.unpack_from(data, body + 4)
        return spec.Basic.Ack(tag, bool(bits & 1))
    if meth == 40:
        ticket = int.from_bytes(data[body + 4:body + 6], "big")
        exchange, pos = _short_at(data, body + 6)
        routing_key, pos = _short_at(data, pos)
        bits = data[pos]
        if pos + 1 != len(data) - 1:
            raise ValueError("basic.publish of the wrong length")
        return spec.Basic.Publish(ticket, exchange, routing_key, bool(bits & 1),
                                  bool(bits & 2))
    return None


def _text(exc: BaseException) -> str:
    return str(exc)[:200] or type(exc).__name__


def marshal(value: Any, channel: int) -> bytes:
    """One frame's bytes."""
    return pframe.marshal(value, channel)


def _short(text: str) -> bytes:
    data = text.encode()
    if len(data) > 255:
        raise ValueError("a short string over 255 bytes")
    return bytes((len(data),)) + data


_DELIVER = struct.Struct(">BHIHH")  # frame type, channel, size; class, method


def deliver(channel: int, consumer_tag: str, delivery_tag: int, redelivered: bool,
            exchange: str, routing_key: str) -> bytes:
    """A basic.deliver method frame (the hot path's, written directly)."""
    args = (_short(consumer_tag) + delivery_tag.to_bytes(8, "big")
            + (b"\x01" if redelivered else b"\x00") + _short(exchange) + _short(routing_key))
    return _DELIVER.pack(1, channel, 4 + len(args), 60, 60) + args + b"\xce"


_BASIC_ACK = struct.Struct(">BHIHHQB")


def basic_ack(channel: int, delivery_tag: int, multiple: bool) -> bytes:
    """A basic.ack method frame (publisher confirms), written directly."""
    return _BASIC_ACK.pack(1, channel, 13, 60, 80, delivery_tag, multiple) + b"\xce"


def content_header(channel: int, body_size: int, raw_properties: bytes) -> bytes:
    """A basic content header frame carrying properties already encoded (flags first)."""
    payload = _CONTENT_HEAD.pack(60, 0, body_size) + raw_properties
    return _HEAD.pack(2, channel, len(payload)) + payload + b"\xce"
