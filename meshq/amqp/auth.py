"""AMQP logins: users with hashed passwords from the config, and RabbitMQ's guest rule.

A password is stored as ``pbkdf2-sha256$ITERATIONS$SALT$HASH`` (base64, from
``meshq-ctl hash-password``); a login that succeeded once is remembered by a keyed digest
so that a reconnecting client does not cost the event loop another key derivation.
``guest``/``guest`` is accepted from loopback only (RabbitMQ's ``loopback_users``), and
only while the config names no ``guest`` of its own. Never: a plaintext password kept,
or a malformed hash accepted.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
from collections.abc import Callable, Mapping

__all__ = ["HASH_SCHEME", "Logins", "check_hash", "hash_password", "verify_password"]

HASH_SCHEME = "pbkdf2-sha256"
ITERATIONS = 120_000
_REMEMBER = 1024  # successful logins remembered


def hash_password(password: str, *, iterations: int = ITERATIONS,
                  salt: bytes | None = None) -> str:
    salt = os.urandom(16) if salt is None else salt
    digest = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, iterations)
    return (f"{HASH_SCHEME}${iterations}${base64.b64encode(salt).decode()}$"
            f"{base64.b64encode(digest).decode()}")


def check_hash(stored: object) -> str | None:
    """None if ``stored`` is a well-formed hash, else what is wrong with it."""
    if not isinstance(stored, str):
        return f"expected a password hash string, got {type(stored).__name__}"
    parts = stored.split("$")
    if len(parts) != 4 or parts[0] != HASH_SCHEME:
        return (f"expected {HASH_SCHEME}$ITERATIONS$SALT$HASH "
                "(from meshq-ctl hash-password), not a plaintext password")
    try:
        if int(parts[1]) < 1000:
            return "too few iterations (at least 1000)"
        base64.b64decode(parts[2], validate=True)
        if len(base64.b64decode(parts[3], validate=True)) != 32:
            return "the hash must be 32 bytes"
    except ValueError:
        return "malformed iterations, salt or hash"
    return None


def verify_password(stored: str, password: str) -> bool:
    if check_hash(stored) is not None:
        return False
    _, iterations, salt, digest = stored.split("$")
    got = hashlib.pbkdf2_hmac("sha256", password.encode(), base64.b64decode(salt),
                              int(iterations))
    return hmac.compare_digest(got, base64.b64decode(digest))


class Logins:
    def __init__(self, users: Mapping[str, str]) -> None:
        self.users = dict(users)
        self._key = os.urandom(32)
        self._ok: dict[bytes, None] = {}
        self.refused = 0

    def checker(self, loopback: bool) -> Callable[[str, str], bool | None]:
        """The login check for a connection from loopback (or not): True or False when
        it is quick to say, None when a key derivation must decide (``verify``, off the
        event loop)."""
        def check(user: str, password: str) -> bool | None:
            ok = self._quick(user, password, loopback)
            self.refused += ok is False
            return ok
        return check

    def _quick(self, user: str, password: str, loopback: bool) -> bool | None:
        stored = self.users.get(user)
        if stored is None:
            return user == "guest" and password == "guest" and loopback
        if user == "guest" and not loopback:
            return False
        if self._key_of(user, password, stored) in self._ok:
            return True
        return None

    def _key_of(self, user: str, password: str, stored: str) -> bytes:
        return hmac.digest(self._key, f"{user}\0{password}\0{stored}".encode(), "sha256")

    def verify(self, user: str, password: str) -> bool:
        """The key derivation (blocking: run it in a thread); a success is remembered."""
        stored = self.users.get(user)
        ok = stored is not None and verify_password(stored, password)
        if not ok:
            self.refused += 1
            return False
        assert stored is not None
        if len(self._ok) >= _REMEMBER:
            self._ok.pop(next(iter(self._ok)))
        self._ok[self._key_of(user, password, stored)] = None
        return True
