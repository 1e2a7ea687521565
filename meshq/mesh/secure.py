"""Encrypted, authenticated peer streams: a trio Stream over another, keyed by the ring.

State here: one stream's salts, direction keys and record counters. Never: a byte handed
to the caller that was not authenticated by a key in the ring; a record replayed,
reordered or carried over from another stream; a stream kept up after its key was
removed from the ring.

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
    ``on_refused(reason)`` is called once when the peer fails the handshake."""

    def __init__(self, inner: trio.abc.Stream, keyring: Keyring, *, initiator: bool,
                 on_refused: Callable[[str], None] | None = None) -> None:
        self.inner = inner
        self.keyring = keyring
        self.initiator = initiator
        self._on_refused = on_refused
        self._salt = secrets.token_bytes(SALT_BYTES)
        self._lock = trio.Lock()
        self._ready = False
        self._salts = b""
        self._send_key: bytes | None = None  # the cluster key each direction rests on
        self._send: AESGCM | None = None
        self._recv_key: bytes | None = None
        self._recv: AESGCM | None = None
        self._sent = self._received = 0
        self._inbuf = bytearray()  # raw bytes not yet a whole record
        self._plain = bytearray()  # decrypted bytes not yet handed out
        self._send_lock = trio.Lock()

    # -- handshake -------------------------------------------------------------------
    async def _handshake(self) -> None:
        async with self._lock:
            if self._ready:
                return
            primary = self.keyring.primary
            if primary is None:
                raise PeerProtocolError("no cluster key to open an encrypted stream with")
            await self.inner.send_all(PREAMBLE + self._salt)
            theirs = await self._read_exact(len(PREAMBLE) + SALT_BYTES)
            if theirs[:len(PREAMBLE)] != PREAMBLE:
                self._refuse("unkeyed", "peer did not open an encrypted stream "
                             "(it has no cluster key, or is not a meshq node)")
            peer_salt = theirs[len(PREAMBLE):]
            self._salts = (self._salt + peer_salt) if self.initiator else \
                (peer_salt + self._salt)
            self._send_key = primary
            self._send = _derive(primary, self._salts, self._direction(sending=True))
            self._ready = True

    def _direction(self, *, sending: bool) -> bytes:
        return b"opener" if sending == self.initiator else b"answerer"

    def _refuse(self, reason: str, message: str) -> None:
        if self._on_refused is not None:
            self._on_refused(reason)
            self._on_refused = None
        raise StreamRefused(reason, message)

    async def _read_exact(self, n: int) -> bytes:
        while len(self._inbuf) < n:
            chunk = await self.inner.receive_some()
            if not chunk:
                raise trio.BrokenResourceError("peer closed the stream during its handshake")
            self._inbuf += chunk
        out = bytes(self._inbuf[:n])
        del self._inbuf[:n]
        return out

    def _check_keys(self) -> None:
        for key in (self._send_key, self._recv_key):
            if key is not None and key not in self.keyring:
                raise PeerProtocolError("the stream's cluster key was removed from the ring")

    # -- trio.abc.Stream -------------------------------------------------------------
    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if not self._ready:
            await self._handshake()
        self._check_keys()
        assert self._send is not None
        view = memoryview(data)
        out = bytearray()
        async with self._send_lock:
            for start in range(0, max(len(view), 1), RECORD_BYTES):
                chunk = view[start:start + RECORD_BYTES]
                header = _LENGTH.pack(len(chunk) + TAG_BYTES)
                nonce = self._sent.to_bytes(12, "big")
                self._sent += 1
                out += header + self._send.encrypt(nonce, bytes(chunk), header)
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
            if not await self._fill():
                if self._inbuf:
                    raise PeerProtocolError("stream ended inside a record")
                return False
        (length,) = _LENGTH.unpack_from(self._inbuf)
        if not TAG_BYTES <= length <= RECORD_BYTES + TAG_BYTES:
            self._refuse("bad_key", f"record of {length} bytes on an encrypted stream")
        while len(self._inbuf) < _LENGTH.size + length:
            if not await self._fill():
                raise PeerProtocolError("stream ended inside a record")
        header = bytes(self._inbuf[:_LENGTH.size])
        body = bytes(self._inbuf[_LENGTH.size:_LENGTH.size + length])
        del self._inbuf[:_LENGTH.size + length]
        nonce = self._received.to_bytes(12, "big")
        self._received += 1
        if self._recv is None:
            self._plain += self._first_record(nonce, body, header)
        else:
            self._check_keys()
            try:
                self._plain += self._recv.decrypt(nonce, body, header)
            except InvalidTag:
                raise PeerProtocolError("a record failed authentication") from None
        return True

    def _first_record(self, nonce: bytes, body: bytes, header: bytes) -> bytes:
        direction = self._direction(sending=False)
        for key in self.keyring.keys:
            cipher = _derive(key, self._salts, direction)
            try:
                plain = cipher.decrypt(nonce, body, header)
            except InvalidTag:
                continue
            self._recv, self._recv_key = cipher, key
            return plain
        self._refuse("bad_key", "no key in the ring authenticates the peer")
        raise AssertionError("unreachable")  # pragma: no cover

    async def _fill(self) -> bool:
        chunk = await self.inner.receive_some()
        if not chunk:
            return False
        self._inbuf += chunk
        return True

    async def aclose(self) -> None:
        await self.inner.aclose()
