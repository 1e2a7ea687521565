"""The peer protocol's framing: versioned UDP packets and the hello that opens a TCP stream.

No state lives here; these are pure functions from messages to bytes and back. What must
never happen: any byte string given to a decoder does anything but decode or raise
PeerProtocolError (it is fuzzed), or a packet from a newer node is mistaken for ours.

UDP packet (one datagram)::

    +-------+---------+-------+----------------------------------------------+
    | "MQ"  | version | flags | msgpack array of messages (maps, each a "t") |
    +-------+---------+-------+----------------------------------------------+
      2 B      1 B      1 B     the rest of the datagram

Bytes 0-2 (magic and version) keep their meaning in every version, forever, so any node
can tell which version a packet speaks; everything after them is defined by the version.
In version 1 the flags byte must be 0 here. Bit 0 (FLAG_ENCRYPTED) marks the envelope a
keyed node sends instead (meshq/mesh/keyring.py): "MQ", 1, FLAG_ENCRYPTED, then a nonce
and the whole plain packet sealed with AES-256-GCM. The transport opens envelopes before
this decoder sees them; a node with no key that is handed one refuses it here.

TCP stream: each side's first frame is a hello, ``{"t": "hello", "v": version,
"cluster": name, "node": name}`` (see hello_frame / check_hello); after it, frames are
the client protocol's length-prefixed msgpack maps (meshq.protocol.codec.encode_frame;
read them with PeerFrameDecoder so that errors come out as PeerProtocolError). On a keyed
node the whole stream, hello included, runs inside meshq/mesh/secure.py's records.

The version rule:
- A node decodes every version from MIN_PROTOCOL_VERSION to PROTOCOL_VERSION (only 1
  exists now). A packet or hello outside that range raises UnsupportedVersion with the
  peer's ``version``, after only the version-independent header has been read: the caller
  logs "peer speaks version N" and drops the packet (or closes the stream).
- A node speaks to a peer at min(PROTOCOL_VERSION, the version it last heard from that
  peer), and answers a packet at the packet's version; the hello's ``v`` is the version
  the sender will speak on that stream, so a newer node that has heard an older one opens
  streams to it at the older version.
- Adding a message type or a map key that older nodes may ignore needs no new version:
  receivers ignore unknown "t" values and unknown keys (their dispatcher counts them).
  Changing the meaning or shape of anything that exists does.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import Any, NamedTuple

import msgpack

from meshq.errors import ProtocolError
from meshq.protocol.codec import DEFAULT_MAX_FRAME, MAX_DEPTH, FrameDecoder, pack_payload

__all__ = [
    "DEFAULT_MAX_PACKET_BYTES",
    "FLAG_ENCRYPTED",
    "HEADER",
    "HELLO",
    "MAGIC",
    "MAX_DATAGRAM",
    "MIN_PROTOCOL_VERSION",
    "PROTOCOL_VERSION",
    "TYPE_KEY",
    "Packet",
    "PeerFrameDecoder",
    "PeerProtocolError",
    "UnsupportedVersion",
    "check_hello",
    "decode_packet",
    "encode_packet",
    "hello_frame",
    "split_messages",
]

MAGIC = b"MQ"
PROTOCOL_VERSION = 1  # the version this node speaks (and the highest it understands)
MIN_PROTOCOL_VERSION = 1  # the oldest version this node still understands
HEADER = struct.Struct(">2sBB")  # magic, version, flags (the flags byte as of version 1)
FLAG_ENCRYPTED = 0x01  # the keyed envelope (keyring.py); opened by the transport
TYPE_KEY = "t"  # every message (and every stream frame) names its type under this key
HELLO = "hello"
DEFAULT_MAX_PACKET_BYTES = 1400  # what split_messages packs up to (one Ethernet frame)
MAX_DATAGRAM = 65_507  # the largest UDP payload over IPv4: decode_packet's default limit

_PREFIX = 3  # magic + version: the part of HEADER that every version shares
_SCALARS = (str, bytes, int, float, bool, type(None))


class PeerProtocolError(ProtocolError):
    """Bytes from a peer that are not a valid packet or stream frame. The only error
    the peer decoders raise; distinct from a client's ProtocolError."""


class UnsupportedVersion(PeerProtocolError):
    """The peer speaks a protocol version this node does not (``version``)."""

    def __init__(self, version: int) -> None:
        newer = "newer" if version > PROTOCOL_VERSION else "older"
        super().__init__(
            f"peer speaks protocol version {version} ({newer}); this node speaks "
            f"{_version_range()}"
        )
        self.version = version


class Packet(NamedTuple):
    """A decoded UDP packet: the version it was sent at and its messages, in order."""

    version: int
    messages: list[dict[str, Any]]


def _version_range() -> str:
    if MIN_PROTOCOL_VERSION == PROTOCOL_VERSION:
        return f"version {PROTOCOL_VERSION}"
    return f"versions {MIN_PROTOCOL_VERSION} to {PROTOCOL_VERSION}"


def _check_version_to_send(version: int) -> None:
    if not MIN_PROTOCOL_VERSION <= version <= PROTOCOL_VERSION:
        raise ValueError(f"cannot speak protocol version {version}; {_version_range()} only")


# ---------------------------------------------------------------------------- encoding
def _encode_message(message: dict[str, Any]) -> bytes:
    if not isinstance(message, dict) or not isinstance(message.get(TYPE_KEY), str):
        raise ValueError(f"a message must be a map with a str {TYPE_KEY!r}: {message!r:.60}")
    return pack_payload(message)


def _array_header(n: int) -> bytes:
    """msgpack's header for an array of n items (the items' bytes follow it)."""
    if n < 16:
        return bytes([0x90 | n])
    if n < 1 << 16:
        return b"\xdc" + n.to_bytes(2, "big")
    return b"\xdd" + n.to_bytes(4, "big")


def _assemble(encoded: Sequence[bytes], version: int) -> bytes:
    return HEADER.pack(MAGIC, version, 0) + _array_header(len(encoded)) + b"".join(encoded)


def encode_packet(messages: Sequence[dict[str, Any]], version: int = PROTOCOL_VERSION) -> bytes:
    """One packet holding ``messages`` (maps with str keys and a str "t"), at ``version``.

    Raises ValueError for a version this node cannot speak or a message without a "t".
    The size is not limited here: see split_messages.
    """
    _check_version_to_send(version)
    return _assemble([_encode_message(m) for m in messages], version)


def split_messages(
    messages: Sequence[dict[str, Any]],
    max_packet_bytes: int = DEFAULT_MAX_PACKET_BYTES,
    version: int = PROTOCOL_VERSION,
) -> list[bytes]:
    """Packets of at most ``max_packet_bytes`` each holding the messages in order, as many
    per packet as fit (greedy, which for in-order packing also gives the fewest packets).

    No messages give no packets. A message too large for a packet of its own raises
    ValueError (the caller sends it over a stream instead, or drops it).
    """
    _check_version_to_send(version)
    packets: list[bytes] = []
    batch: list[bytes] = []
    size = 0  # of the messages in batch
    for message in messages:
        encoded = _encode_message(message)
        if HEADER.size + len(_array_header(1)) + len(encoded) > max_packet_bytes:
            raise ValueError(
                f"a {message.get(TYPE_KEY)!r} message of {len(encoded)} bytes does not fit "
                f"in a packet of {max_packet_bytes} bytes"
            )
        fits = HEADER.size + len(_array_header(len(batch) + 1)) + size + len(encoded)
        if batch and fits > max_packet_bytes:
            packets.append(_assemble(batch, version))
            batch, size = [], 0
        batch.append(encoded)
        size += len(encoded)
    if batch:
        packets.append(_assemble(batch, version))
    return packets


# ---------------------------------------------------------------------------- decoding
def _check_value(value: Any, depth: int) -> None:
    """Maps have str keys, values are plain msgpack types, nesting stops at MAX_DEPTH."""
    kind = type(value)
    if kind is dict:
        if depth > MAX_DEPTH:
            raise PeerProtocolError(f"message nests deeper than {MAX_DEPTH} levels")
        for key, item in value.items():
            if type(key) is not str:
                raise PeerProtocolError(f"map keys must be strings, not {type(key).__name__}")
            _check_value(item, depth + 1)
    elif kind is list:
        if depth > MAX_DEPTH:
            raise PeerProtocolError(f"message nests deeper than {MAX_DEPTH} levels")
        for item in value:
            _check_value(item, depth + 1)
    elif kind not in _SCALARS:
        raise PeerProtocolError(f"unsupported msgpack type {kind.__name__}")


def _check_message(message: Any, what: str) -> dict[str, Any]:
    """A message or stream frame: a map (nesting counts from 1 at it) with a str "t"."""
    if type(message) is not dict:
        raise PeerProtocolError(f"{what} must be a map, not {type(message).__name__}")
    _check_value(message, 1)
    kind = message.get(TYPE_KEY)
    if type(kind) is not str or not kind:
        raise PeerProtocolError(f"{what} has no {TYPE_KEY!r} naming its type")
    return message


def decode_packet(data: bytes, max_size: int = MAX_DATAGRAM) -> Packet:
    """The version and messages of one received packet.

    Raises UnsupportedVersion (with ``.version``) for a version outside
    MIN_PROTOCOL_VERSION..PROTOCOL_VERSION, and PeerProtocolError for anything else that
    is not a valid packet: longer than ``max_size``, not "MQ", non-zero flags (see
    FLAG_ENCRYPTED), a body that is not one msgpack array of maps each with a str "t".
    """
    if len(data) > max_size:
        raise PeerProtocolError(f"packet of {len(data)} bytes exceeds the limit of {max_size}")
    if len(data) < _PREFIX or data[:2] != MAGIC:
        raise PeerProtocolError("not a meshq peer packet (bad magic)")
    version = data[2]
    if version == 0:
        raise PeerProtocolError("packet has version 0, which does not exist")
    if not MIN_PROTOCOL_VERSION <= version <= PROTOCOL_VERSION:
        raise UnsupportedVersion(version)
    # From here on: version 1's layout.
    if len(data) < HEADER.size:
        raise PeerProtocolError("packet ends inside its header")
    flags = data[3]
    if flags:
        raise PeerProtocolError(
            f"packet flags {flags:#04x} not understood"
            + (" (an encrypted packet? this node has no cluster key)"
               if flags & FLAG_ENCRYPTED else "")
        )
    try:
        body = msgpack.unpackb(
            data[HEADER.size :], raw=False, strict_map_key=True, use_list=True
        )
    except Exception as exc:  # msgpack raises many types on garbage; we promise one.
        raise PeerProtocolError(
            f"packet body is not valid msgpack: {exc.__class__.__name__}"
        ) from None
    if type(body) is not list:
        raise PeerProtocolError(f"packet body must be an array, not {type(body).__name__}")
    return Packet(version, [_check_message(m, "a packet's message") for m in body])


class PeerFrameDecoder(FrameDecoder):
    """FrameDecoder for peer streams: every frame must be a map with a str "t", and every
    error (garbage, oversize, bad frame) is a PeerProtocolError. As with FrameDecoder the
    stream cannot be resynchronised after an error."""

    def __init__(self, max_frame: int = DEFAULT_MAX_FRAME) -> None:
        super().__init__(max_frame)

    def next_frame(self) -> dict[str, Any] | None:
        try:
            frame = super().next_frame()
        except PeerProtocolError:
            raise
        except ProtocolError as exc:
            raise PeerProtocolError(exc.message) from None
        if frame is None:
            return None
        return _check_message(frame, "a stream frame")


# ---------------------------------------------------------------------------- hello
def hello_frame(cluster: str, node: str, version: int = PROTOCOL_VERSION) -> dict[str, Any]:
    """The first frame either side sends on a stream (send it with encode_frame).
    ``version`` is the one the sender will speak on this stream (see the version rule)."""
    _check_version_to_send(version)
    if not cluster or not node:
        raise ValueError("hello needs a cluster name and a node name")
    return {TYPE_KEY: HELLO, "v": version, "cluster": cluster, "node": node}


def check_hello(frame: dict[str, Any], expected_cluster: str) -> int:
    """The version the peer will speak, from the first frame of a stream.

    Raises UnsupportedVersion for a version this node does not speak, and
    PeerProtocolError for anything that is not a hello or for a peer of another cluster.
    After it returns, ``frame["node"]`` is the peer's name (a non-empty str).
    """
    if type(frame) is not dict or frame.get(TYPE_KEY) != HELLO:
        kind = frame.get(TYPE_KEY) if type(frame) is dict else type(frame).__name__
        raise PeerProtocolError(f"stream must open with a hello, not {kind!r:.40}")
    version = frame.get("v")
    if type(version) is not int or version < 1:
        raise PeerProtocolError(f"hello has no valid version: {version!r:.40}")
    if not MIN_PROTOCOL_VERSION <= version <= PROTOCOL_VERSION:
        raise UnsupportedVersion(version)
    cluster, node = frame.get("cluster"), frame.get("node")
    if type(node) is not str or not node:
        raise PeerProtocolError(f"hello has no valid node name: {node!r:.40}")
    if type(cluster) is not str:
        raise PeerProtocolError(f"hello from {node!r} has no valid cluster name")
    if cluster != expected_cluster:
        raise PeerProtocolError(
            f"peer {node!r:.80} belongs to cluster {cluster!r:.80}, not {expected_cluster!r}"
        )
    return version
