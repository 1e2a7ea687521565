"""Length-prefixed msgpack frames, as a pure codec (no I/O; see docs/protocol.md).

A frame is a 4-byte big-endian unsigned length, then that many bytes of msgpack that
decode to a map. The decoder's buffer holds at most one partial frame beyond what it
has handed out; any byte string fed to it yields frames or raises ProtocolError, never
anything else, and a length above ``max_frame`` is refused before its body is read.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from typing import Any

import msgpack

from meshq.errors import FrameTooLarge, ProtocolError

__all__ = ["DEFAULT_MAX_FRAME", "HEADER", "FrameDecoder", "decode_frame",
           "decode_frame_unchecked", "encode_frame", "pack_payload"]

DEFAULT_MAX_FRAME = 8 * 1024 * 1024
MAX_DEPTH = 32  # nesting of maps and lists in one frame
HEADER = struct.Struct(">I")
pack_payload = msgpack.Packer(use_bin_type=True).pack  # a frame's body, without its length


def encode_frame(obj: dict[str, Any]) -> bytes:
    """One frame holding ``obj`` (a map of str keys to msgpack-able values)."""
    payload = pack_payload(obj)
    return HEADER.pack(len(payload)) + payload


def decode_frame(payload: bytes) -> dict[str, Any]:
    """Decode one frame body; anything but a msgpack map raises ProtocolError."""
    obj = decode_frame_unchecked(payload)
    _check_keys(obj)
    return obj


def decode_frame_unchecked(payload: bytes) -> dict[str, Any]:
    """decode_frame without the walk over every key and list: for a peer link, whose
    decoder checks the type of every field it reads (msgpack itself bounds nesting)."""
    try:
        obj = msgpack.unpackb(payload, raw=False, strict_map_key=True, use_list=True)
    except Exception as exc:  # msgpack raises many types on garbage; we promise one.
        raise ProtocolError(f"frame is not valid msgpack: {exc.__class__.__name__}") from None
    if not isinstance(obj, dict):
        raise ProtocolError(f"frame must hold a map, not {type(obj).__name__}")
    return obj


def _check_keys(obj: dict[Any, Any], depth: int = 1) -> None:
    """msgpack lets bytes keys through strict_map_key; the protocol wants str keys only.
    Also bounds nesting (MAX_DEPTH), so that no later walk can blow the stack."""
    if depth > MAX_DEPTH:
        raise ProtocolError(f"frame nests deeper than {MAX_DEPTH} levels")
    for key, value in obj.items():
        if type(key) is not str:
            raise ProtocolError(f"map keys must be strings, not {type(key).__name__}")
        kind = type(value)
        if kind is dict:
            _check_keys(value, depth + 1)
        elif kind is list:
            _check_list(value, depth + 1)


def _check_list(items: list[Any], depth: int) -> None:
    if depth > MAX_DEPTH:
        raise ProtocolError(f"frame nests deeper than {MAX_DEPTH} levels")
    for item in items:
        kind = type(item)
        if kind is dict:
            _check_keys(item, depth + 1)
        elif kind is list:
            _check_list(item, depth + 1)


class FrameDecoder:
    """Incremental decoder: ``feed`` bytes as they arrive, then iterate ``frames()``.

    After a ProtocolError the stream cannot be resynchronised; the caller closes it.
    """

    def __init__(self, max_frame: int = DEFAULT_MAX_FRAME) -> None:
        self.max_frame = max_frame
        self.decode = decode_frame  # (or decode_frame_unchecked)
        self._buf = bytearray()
        self._pos = 0

    def feed(self, data: bytes | bytearray) -> None:
        if self._pos:
            del self._buf[: self._pos]
            self._pos = 0
        self._buf += data

    def pending(self) -> int:
        """Bytes buffered that are not yet a whole frame."""
        return len(self._buf) - self._pos

    def next_frame(self) -> dict[str, Any] | None:
        """The next whole frame, or None when more bytes are needed."""
        buf, pos = self._buf, self._pos
        if len(buf) - pos < 4:
            return None
        (length,) = HEADER.unpack_from(buf, pos)
        if length > self.max_frame:
            raise FrameTooLarge(f"frame of {length} bytes exceeds the limit of {self.max_frame}")
        end = pos + 4 + length
        if len(buf) < end:
            return None
        payload = bytes(buf[pos + 4 : end])
        self._pos = end
        return self.decode(payload)

    def frames(self) -> Iterator[dict[str, Any]]:
        """Each whole frame buffered now (possibly none), in order; a bad frame raises
        ProtocolError only once the good frames before it have been yielded."""
        while (frame := self.next_frame()) is not None:
            yield frame
