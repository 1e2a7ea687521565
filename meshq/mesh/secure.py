"""Encrypted, authenticated peer streams: a trio Stream over another, keyed by the ring.

State here: one stream's salts, direction keys and record counters. Never: a byte handed
to the caller that was not authenticated by a key in the ring; a record replayed,
reordered or carried over from another stream. A stream cut at a record boundary reads
as a clean end (there is no authenticated close): every protocol above treats an end
like a reset, so a cut gives an attacker on the path nothing a TCP reset does not.

Handshake: each side first sends ``"MQS" | 1 | salt`` (16 random bytes) and reads the
other's. Each direction's key is HKDF-SHA256 of a cluster key, salted with the opener's
salt then the answerer's, for that direction; a side sends with the key derived from its
primary and finds the peer's key by trying each key in its ring on the first record.
Records: a 4-byte big-endian length in clear (the associated data), then AES-GCM of up to
RECORD_BYTES bytes, the nonce being the record's number in its direction. Fresh salts on
both sides make every stream's keys new, so a recorded stream cannot be replayed.
"""

from __future__ import annotations

import secrets
import struct
from collections.abc import Callable
from typing import NoReturn

import trio
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from meshq.mesh.keyring import TAG_BYTES, Keyring
from meshq.mesh.wire import PeerProtocolError

__all__ = ["PREAMBLE", "RECORD_BYTES", "SecureStream", "StreamRefused"]

PREAMBLE = b"MQS\x01"
SALT_BYTES = 16
RECORD_BYTES = 16 * 1024  # plaintext per record
SEND_BYTES = 256 * 1024  # what send_all hands the inner stream at once, at most
HANDSHAKE_TIMEOUT = 5.0  # for the peer's preamble
_LENGTH = struct.Struct(">I")


class StreamRefused(PeerProtocolError):
    """The peer is not keyed (``reason`` "unkeyed") or no key in the ring authenticates
    it ("bad_key")."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def _derive(key: bytes, salts: bytes, direction: bytes) -> AESGCM:
    hkdf = HKDF(algorithm=hashes.SHA256(), length=32, salt=salts,
                info=b"meshq stream v1 " + direction)
    return AESGCM(hkdf.derive(key))


class SecureStream(trio.abc.Stream):
    """``inner`` wrapped; ``initiator`` is True on the side that opened the connection.
    ``on_refused(reason)`` is called once when the peer fails the handshake.

    Errors: until the peer's first record is authenticated, StreamRefused (a
    PeerProtocolError: the peer is not one of us). After it, anything wrong on the wire
    (a forged, altered or truncated record) is trio.BrokenResourceError, as with a broken
    connection, which is what every user of a peer stream already handles. A key
    removed from the ring does not end the streams it opened: their keys are their own.
    """

    def __init__(self, inner: trio.abc.Stream, keyring: Keyring, *, initiator: bool,
                 on_refused: Callable[[str], None] | None = None,
                 handshake_timeout: float = HANDSHAKE_TIMEOUT) -> None:
        self.inner = inner
        self.keyring = keyring
        self.initiator = initiator
        self._on_refused = on_refused
        self._handshake_timeout = handshake_timeout
        self._salt = secrets.token_bytes(SALT_BYTES)
        self._lock = trio.Lock()
        self._preamble_sent = False
        self._ready = False
        self._salts = b""
        self._send: AESGCM | None = None
        self._recv: AESGCM | None = None  # set once the peer's first record checks out
        self._sent = self._received = 0
        self._inbuf = bytearray()  # raw bytes not yet a whole record
        self._plain = bytearray()  # decrypted bytes not yet handed out

    # -- handshake -------------------------------------------------------------------
    async def _handshake(self) -> None:
        async with self._lock:
            if self._ready:
                return
            primary = self.keyring.primary
            if primary is None:
                raise PeerProtocolError("no cluster key to open an encrypted stream with")
            with trio.move_on_after(self._handshake_timeout) as scope:
                if not self._preamble_sent:  # once, even if a first try was cancelled
                    self._preamble_sent = True
                    await self.inner.send_all(PREAMBLE + self._salt)
                theirs = await self._read_exact(len(PREAMBLE) + SALT_BYTES)
            if scope.cancelled_caught:
                raise trio.BrokenResourceError(
                    f"no handshake from the peer within {self._handshake_timeout:g} s")
            if theirs[:len(PREAMBLE)] != PREAMBLE:
                self._refuse("unkeyed", "peer did not open an encrypted stream "
                             "(it has no cluster key, or is not a meshq node)")
            peer_salt = theirs[len(PREAMBLE):]
            self._salts = (self._salt + peer_salt) if self.initiator else \
                (peer_salt + self._salt)
            self._send = _derive(primary, self._salts, self._direction(sending=True))
            self._ready = True

    def _direction(self, *, sending: bool) -> bytes:
        return b"opener" if sending == self.initiator else b"answerer"

    def _refuse(self, reason: str, message: str) -> NoReturn:
        if self._on_refused is not None:
            self._on_refused(reason)
            self._on_refused = None
        raise StreamRefused(reason, message)

    def _broken(self, message: str) -> NoReturn:
        """Wrong bytes: a refusal before the peer authenticated, a broken stream after."""
        if self._recv is None:
            self._refuse("bad_key", message)
        raise trio.BrokenResourceError(message)

    async def _read_exact(self, n: int) -> bytes:
        while len(self._inbuf) < n:
            chunk = await self.inner.receive_some(n - len(self._inbuf))
            if not chunk:
                self._refuse("unkeyed", "peer closed the stream before its handshake")
            self._inbuf += chunk
        out = bytes(self._inbuf[:n])
        del self._inbuf[:n]
        return out

    # -- trio.abc.Stream -------------------------------------------------------------
    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if not self._ready:
            await self._handshake()
        assert self._send is not None
        # No lock: as with any trio Stream, one task sends at a time (the inner stream
        # raises BusyResourceError otherwise), and a lock would add a schedule point to
        # every send, which costs latency on a busy node.
        view = memoryview(data)
        out = bytearray()
        for start in range(0, max(len(view), 1), RECORD_BYTES):
            chunk = view[start:start + RECORD_BYTES]
            header = _LENGTH.pack(len(chunk) + TAG_BYTES)
            nonce = self._sent.to_bytes(12, "big")
            self._sent += 1
            out += header
            out += self._send.encrypt(nonce, bytes(chunk), header)
            if len(out) >= SEND_BYTES:  # a big frame: in pieces, letting others run
                await self.inner.send_all(out)
                out = bytearray()
        if out:
            await self.inner.send_all(out)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if not self._ready:
            await self._handshake()
        while not self._plain:
            if not await self._next_record():
                return b""
        n = len(self._plain) if max_bytes is None else min(max_bytes, len(self._plain))
        out = bytes(self._plain[:n])
        del self._plain[:n]
        return out

    async def _next_record(self) -> bool:
        """Decrypt the next record into the plain buffer; False at a clean end."""
        while len(self._inbuf) < _LENGTH.size:
            if not await self._fill(_LENGTH.size - len(self._inbuf)):
                if self._inbuf:
                    self._broken("stream ended inside a record")
                return False
        (length,) = _LENGTH.unpack_from(self._inbuf)
        if not TAG_BYTES <= length <= RECORD_BYTES + TAG_BYTES:
            self._broken(f"record of {length} bytes on an encrypted stream")
        while len(self._inbuf) < _LENGTH.size + length:
            if not await self._fill(_LENGTH.size + length - len(self._inbuf)):
                self._broken("stream ended inside a record")
        header = bytes(self._inbuf[:_LENGTH.size])
        body = bytes(self._inbuf[_LENGTH.size:_LENGTH.size + length])
        del self._inbuf[:_LENGTH.size + length]
        nonce = self._received.to_bytes(12, "big")
        self._received += 1
        if self._recv is None:
            self._plain += self._first_record(nonce, body, header)
        else:
            try:
                self._plain += self._recv.decrypt(nonce, body, header)
            except InvalidTag:
                self._broken("a record failed authentication")
        return True

    def _first_record(self, nonce: bytes, body: bytes, header: bytes) -> bytes:
        direction = self._direction(sending=False)
        for key in self.keyring.keys:
            cipher = _derive(key, self._salts, direction)
            try:
                plain = cipher.decrypt(nonce, body, header)
            except InvalidTag:
                continue
            self._recv = cipher
            return plain
        self._refuse("bad_key", "no key in the ring authenticates the peer")

    async def _fill(self, needed: int) -> bool:
        # Until the peer is authenticated, read no more than the record needs.
        chunk = await self.inner.receive_some(needed if self._recv is None else None)
        if not chunk:
            return False
        self._inbuf += chunk
        return True

    async def aclose(self) -> None:
        await self.inner.aclose()
