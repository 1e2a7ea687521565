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
from typing import Any, TypeAlias

from pamqp import body as pbody
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
    "FrameReader",
    "FrameValue",
    "Received",
    "content_header",
    "marshal",
]

PROTOCOL_HEADER = b"AMQP\x00\x00\x09\x01"
FRAME_END = 0xCE
MIN_FRAME_MAX = 4096  # the spec's floor for frame_max
FRAME_ERROR = 501  # a malformed frame (connection exception)
SYNTAX_ERROR = 502  # a frame whose content does not parse (connection exception)
_HEAD = struct.Struct(">BHI")  # type, channel, payload size
_CONTENT_HEAD = struct.Struct(">HHQ")  # class id, weight, body size

FrameValue: TypeAlias = PFrame | pheader.ContentHeader | pbody.ContentBody | pheartbeat.Heartbeat


class AmqpError(Exception):
    """What a peer sent breaks the protocol: close the connection with ``code``
    (an AMQP reply code), naming ``class_id``/``method_id`` when a method was at fault."""

    def __init__(self, code: int, text: str, class_id: int = 0, method_id: int = 0) -> None:
        super().__init__(f"{code} {text}")
        self.code, self.text = code, text
        self.class_id, self.method_id = class_id, method_id


@dataclass(frozen=True)
class Received:
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
                out.append(Received(channel, _unmarshal(bytes(buf[pos:pos + total]), kind)))
                pos += total
        finally:
            del buf[:pos]
        return out


def _unmarshal(data: bytes, kind: int) -> FrameValue:
    if kind not in (1, 2, 3, 8):
        raise AmqpError(FRAME_ERROR, f"unknown frame type {kind}")
    try:
        _, _, value = pframe.unmarshal(data)
    except (PAMQPException, ValueError, KeyError, IndexError, TypeError, struct.error,
            UnicodeDecodeError, OverflowError) as exc:
        raise AmqpError(SYNTAX_ERROR, f"malformed frame: {_text(exc)}") from None
    if isinstance(value, pheader.ProtocolHeader):
        raise AmqpError(FRAME_ERROR, "a protocol header inside the connection")
    if kind == 2:  # the properties as sent: kept byte for byte (meshq.amqp.mapping)
        value.raw_properties = data[_HEAD.size + _CONTENT_HEAD.size:-1]  # type: ignore
    return value


def _text(exc: BaseException) -> str:
    return str(exc)[:200] or type(exc).__name__


def marshal(value: Any, channel: int) -> bytes:
    """One frame's bytes."""
    return pframe.marshal(value, channel)


def content_header(channel: int, body_size: int, raw_properties: bytes) -> bytes:
    """A basic content header frame carrying properties already encoded (flags first)."""
    payload = _CONTENT_HEAD.pack(60, 0, body_size) + raw_properties
    return _HEAD.pack(2, channel, len(payload)) + payload + b"\xce"
