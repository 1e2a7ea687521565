"""The cluster key ring: the AES-256-GCM keys a node accepts, the one it sends with, and
the sealed UDP envelope.

State here: the keys (primary first) and the file they persist in. Never: a packet sent
in clear by a keyed node; a key file readable by others; the primary key removed (use
another key first, as Serf requires).

Envelope of a packet sent by a keyed node (the inner packet is the whole plain one)::

    "MQ" | 1 | FLAG_ENCRYPTED | nonce (12 B) | AES-GCM(inner packet) with its 16 B tag

The first four bytes are the associated data. A receiver tries every key in its ring,
primary first; a packet no key opens is dropped and counted. Nonces are random (96 bit),
as memberlist's are: rotate the key long before 2**32 packets have been sent with it.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import json
import os
import re
import secrets
import tempfile
from collections.abc import Iterable
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

__all__ = [
    "ENVELOPE_HEADER",
    "ENVELOPE_OVERHEAD",
    "KEY_BYTES",
    "Keyring",
    "KeyringError",
    "fingerprint",
    "generate_key",
    "parse_key",
    "write_keys",
]

KEY_BYTES = 32  # AES-256
NONCE_BYTES = 12
TAG_BYTES = 16
ENVELOPE_HEADER = b"MQ\x01\x01"  # magic, envelope version 1, FLAG_ENCRYPTED (wire.py)
ENVELOPE_OVERHEAD = len(ENVELOPE_HEADER) + NONCE_BYTES + TAG_BYTES
_FINGERPRINT = re.compile(r"[0-9a-f]{16}")


class KeyringError(ValueError):
    """A key that is malformed, unknown, or may not be removed; the message says which."""


def generate_key() -> str:
    """A new random key, as the base64 text that key files and ``meshq-ctl keys`` use."""
    return base64.b64encode(secrets.token_bytes(KEY_BYTES)).decode()


def parse_key(text: str) -> bytes:
    """The 32 key bytes of base64 ``text``; KeyringError if it is not exactly that."""
    try:
        key = base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise KeyringError("a cluster key must be base64 text (meshq-ctl keys generate)") \
            from None
    if len(key) != KEY_BYTES:
        raise KeyringError(f"a cluster key must be {KEY_BYTES} bytes (AES-256), "
                           f"got {len(key)}")
    return key


def fingerprint(key: bytes) -> str:
    """A name for a key that does not reveal it: 16 hex digits of its SHA-256."""
    return hashlib.sha256(b"meshq key fingerprint\0" + key).hexdigest()[:16]


def write_keys(path: Path, keys: list[bytes]) -> None:
    """Write ``keys`` to ``path`` atomically: a fresh 0600 temp file, fsync, rename, fsync
    of the directory. Safe to call from a worker thread; concurrent calls do not mix."""
    data = json.dumps({"keys": [base64.b64encode(k).decode() for k in keys]})
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


class Keyring:
    """The keys this node accepts; ``primary`` is the one it sends with (None: no key,
    and traffic is in clear). ``path``, when set, is rewritten (mode 0600) on each change.
    """

    def __init__(self, keys: Iterable[bytes] = (), path: Path | None = None) -> None:
        self._keys: list[bytes] = []
        self._ciphers: dict[bytes, AESGCM] = {}
        for key in keys:
            self._add(key)
        self.path = path

    # -- loading and saving ------------------------------------------------------
    @classmethod
    def load(cls, path: Path, initial: bytes | None = None) -> Keyring:
        """The ring persisted at ``path``; if there is none, a ring of ``initial`` (saved
        there) or an empty one (not saved). KeyringError for a damaged or empty file."""
        try:
            text = path.read_text()
        except FileNotFoundError:
            ring = cls([initial] if initial else [], path)
            if initial:
                ring.save()
            return ring
        try:
            data = json.loads(text)
            keys = [parse_key(k) for k in data["keys"]]
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise KeyringError(f"{path}: not a meshq keyring ({exc})") from None
        if not keys:
            raise KeyringError(f"{path}: the keyring holds no key (delete the file to start "
                               "again from cluster_key_file)")
        return cls(keys, path)

    def save(self) -> None:
        if self.path is not None:
            write_keys(self.path, self._keys)

    # -- the keys ----------------------------------------------------------------
    @property
    def keys(self) -> tuple[bytes, ...]:
        return tuple(self._keys)

    @property
    def primary(self) -> bytes | None:
        return self._keys[0] if self._keys else None

    def __bool__(self) -> bool:
        return bool(self._keys)

    def __contains__(self, key: object) -> bool:
        return key in self._ciphers

    def _add(self, key: bytes) -> None:
        if len(key) != KEY_BYTES:
            raise KeyringError(f"a cluster key must be {KEY_BYTES} bytes, got {len(key)}")
        if key not in self._ciphers:
            self._keys.append(key)
            self._ciphers[key] = AESGCM(key)

    def resolve(self, text: str) -> bytes | None:
        """The key named by ``text``, its base64 form or its fingerprint: the key if it
        is installed, None if it is not. KeyringError if ``text`` is neither form."""
        text = text.strip()
        for key in self._keys:
            if text == fingerprint(key):
                return key
        if _FINGERPRINT.fullmatch(text):
            return None
        key = parse_key(text)
        return key if key in self._ciphers else None

    def planned(self, action: str, key: bytes | None) -> list[bytes] | None:
        """The keys after ``action`` ("install", "use", "remove"), primary first; None
        when it changes nothing. KeyringError when it is not allowed. Pure: see replace."""
        keys = list(self._keys)
        if action == "install":
            assert key is not None
            if not keys:
                raise KeyringError("this node has no cluster key: start every node with "
                                   "cluster_key_file to turn encryption on")
            return None if key in keys else [*keys, key]
        if action == "use":
            if key is None:
                raise KeyringError("that key is not installed on this node; install it "
                                   "first")
            return None if key == keys[0] else [key, *(k for k in keys if k != key)]
        if action == "remove":
            if key is None or key not in keys:
                return None  # not there: done already (a second run is harmless)
            if key == keys[0]:
                raise KeyringError(f"key {fingerprint(key)} is the primary key: use another "
                                   "key first")
            return [k for k in keys if k != key]
        raise ValueError(f"unknown keyring action {action!r}")

    def replace(self, keys: list[bytes]) -> None:
        """Take ``keys`` (primary first) at once: readers never see a half-changed ring."""
        ciphers = {k: self._ciphers.get(k) or AESGCM(k) for k in keys}
        self._keys, self._ciphers = list(keys), ciphers

    def install(self, key: bytes) -> bool:
        """Accept ``key`` too (sending still uses the primary); False if it was there."""
        return self._apply("install", key)

    def use(self, key: bytes) -> None:
        """Send with ``key`` (it must be installed) from now on."""
        self._apply("use", key if key in self._ciphers else None)

    def remove(self, key: bytes) -> None:
        """Stop accepting ``key``; the primary cannot be removed; an absent key is fine."""
        self._apply("remove", key)

    def _apply(self, action: str, key: bytes | None) -> bool:
        keys = self.planned(action, key)
        if keys is None:
            return False
        if self.path is not None:
            write_keys(self.path, keys)
        self.replace(keys)
        return True

    # -- the packet envelope -----------------------------------------------------
    def seal(self, packet: bytes) -> bytes:
        """``packet`` in the envelope, with the primary key (which must exist)."""
        assert self._keys, "seal needs a key"
        nonce = secrets.token_bytes(NONCE_BYTES)
        sealed = self._ciphers[self._keys[0]].encrypt(nonce, packet, ENVELOPE_HEADER)
        return ENVELOPE_HEADER + nonce + sealed

    def open(self, data: bytes) -> bytes | None:
        """The packet inside an envelope that one of the keys opens; None otherwise."""
        if len(data) < ENVELOPE_OVERHEAD or data[:4] != ENVELOPE_HEADER:
            return None
        nonce = data[4:4 + NONCE_BYTES]
        body = data[4 + NONCE_BYTES:]
        for key in self._keys:
            try:
                return self._ciphers[key].decrypt(nonce, body, ENVELOPE_HEADER)
            except InvalidTag:
                continue
        return None
