"""Who may run which client op: the access policy, and the peer credentials it judges.

State here: the rules (op -> uids and gids, resolved from names once at start), the count
of refusals, and a short-lived cache of users' supplementary groups. Never: an op listed
in the rules run for a peer no rule names (root included), nor a rule naming an op, user
or group that does not exist (the daemon refuses to start).
"""

from __future__ import annotations

import grp
import logging
import os
import pwd
import socket as _socket
import struct
import time
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import trio

from meshq.errors import StartupError, Unauthorized

if TYPE_CHECKING:
    from meshq.config import Config

__all__ = [
    "UNKNOWN",
    "AccessConfigError",
    "AccessPolicy",
    "AccessStatistics",
    "GroupCache",
    "PeerCreds",
    "Rule",
    "build_policy",
    "peer_credentials",
    "resolve_group",
    "resolve_user",
]

log = logging.getLogger("meshq.server.access")
_UCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid (Linux)
GROUPS_TTL = 30.0  # seconds a user's supplementary groups are remembered
GROUPS_CACHE_MAX = 1024
GROUPS_LOOKUP_TIMEOUT = 2.0  # seconds; past it a connection is judged by its gid only


class AccessConfigError(StartupError):
    """A rule or ``socket_group`` names an op, user or group that does not exist."""


@dataclass(frozen=True)
class PeerCreds:
    """The process at the other end of a Unix socket (ids are None when unknown), or an
    AMQP connection's login (``amqp_user``)."""

    pid: int | None = None
    uid: int | None = None
    gid: int | None = None
    groups: frozenset[int] = frozenset()  # gid and the user's supplementary groups
    amqp_user: str | None = None

    def describe(self) -> str:
        if self.amqp_user is not None:
            return f"AMQP user {self.amqp_user!r}"
        if self.uid is None:
            return "a peer of unknown uid"
        return f"uid {self.uid}" + (f" (pid {self.pid})" if self.pid is not None else "")


UNKNOWN = PeerCreds()


def peer_credentials(sock: _socket.socket | trio.socket.SocketType) -> PeerCreds:
    """SO_PEERCRED of a connected Unix socket (Linux); UNKNOWN elsewhere or on failure."""
    opt = getattr(_socket, "SO_PEERCRED", None)
    if opt is None:
        return UNKNOWN
    try:
        raw = sock.getsockopt(_socket.SOL_SOCKET, opt, _UCRED.size)
        pid, uid, gid = _UCRED.unpack(raw)
    except (OSError, struct.error) as exc:
        log.warning("cannot read the peer's credentials: %s", exc)
        return UNKNOWN
    return PeerCreds(pid=pid, uid=uid, gid=gid, groups=frozenset({gid}))


def _lookup_groups(uid: int, gid: int) -> frozenset[int]:
    """``gid`` plus the groups of ``uid``'s account, as ``id USER`` lists them: its passwd
    group and every group that names it (blocking: NSS). Just ``gid`` without an account."""
    try:
        entry = pwd.getpwuid(uid)
        return frozenset(os.getgrouplist(entry.pw_name, entry.pw_gid)) | {gid}
    except (KeyError, OSError):
        return frozenset({gid})


class GroupCache:
    """Supplementary groups per (uid, gid), looked up in a thread, kept ``ttl`` seconds."""

    def __init__(self, ttl: float = GROUPS_TTL) -> None:
        self.ttl = ttl
        self._cache: dict[tuple[int, int], tuple[float, frozenset[int]]] = {}

    async def complete(self, creds: PeerCreds) -> PeerCreds:
        """``creds`` with the user's supplementary groups added."""
        if creds.uid is None or creds.gid is None:
            return creds
        key = (creds.uid, creds.gid)
        now = time.monotonic()
        hit = self._cache.get(key)
        if hit is not None and hit[0] > now:
            groups = hit[1]
        else:
            found = None
            with trio.move_on_after(GROUPS_LOOKUP_TIMEOUT):  # a hung NSS (LDAP, sssd)
                found = await trio.to_thread.run_sync(_lookup_groups, creds.uid, creds.gid,
                                                      abandon_on_cancel=True)
            if found is None:  # judge by the process's own gid alone; not remembered
                log.warning("group lookup for uid %d took over %g s; using its gid only",
                            creds.uid, GROUPS_LOOKUP_TIMEOUT)
                return PeerCreds(pid=creds.pid, uid=creds.uid, gid=creds.gid,
                                 groups=frozenset({creds.gid}))
            groups = found
            if len(self._cache) >= GROUPS_CACHE_MAX:
                self._cache.clear()
            self._cache[key] = (now + self.ttl, groups)
        return PeerCreds(pid=creds.pid, uid=creds.uid, gid=creds.gid, groups=groups)


def resolve_user(name: str) -> int:
    try:
        return pwd.getpwnam(name).pw_uid
    except KeyError:
        raise AccessConfigError(f"unknown user {name!r}") from None


def resolve_group(name: str) -> int:
    """A group name, or a numeric gid as text, as a gid."""
    if name.isascii() and name.isdigit():
        return int(name)
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        raise AccessConfigError(f"unknown group {name!r}") from None


@dataclass(frozen=True)
class Rule:
    """Who may run one op: anyone (``*``), or these uids, or members of these gids, or
    these AMQP logins."""

    anyone: bool = False
    uids: frozenset[int] = frozenset()
    gids: frozenset[int] = frozenset()
    amqp_users: frozenset[str] = frozenset()

    @classmethod
    def parse(cls, principals: Collection[str]) -> Rule:
        """From ``*``, ``uid:N``, ``gid:N``, ``user:NAME``, ``group:NAME`` (blocking: NSS)
        and ``amqp:NAME``."""
        anyone, uids, gids, logins = False, set(), set(), set()
        for item in principals:
            kind, _, rest = item.partition(":")
            if item == "*":
                anyone = True
            elif kind == "amqp":
                logins.add(rest)
            elif kind == "uid":
                uids.add(int(rest))
            elif kind == "gid":
                gids.add(int(rest))
            elif kind == "user":
                uids.add(resolve_user(rest))
            elif kind == "group":
                gids.add(resolve_group(rest))
            else:
                raise AccessConfigError(f"bad principal {item!r}")
        return cls(anyone, frozenset(uids), frozenset(gids), frozenset(logins))

    def admits(self, creds: PeerCreds) -> bool:
        if self.anyone:
            return True
        if creds.amqp_user is not None:
            return creds.amqp_user in self.amqp_users
        if creds.uid is None:
            return False
        return creds.uid in self.uids or not self.gids.isdisjoint(creds.groups)


@dataclass(frozen=True)
class AccessStatistics:
    rules: int  # ops with a rule
    refused: int  # requests refused since start


class AccessPolicy:
    """Ops without a rule are open to every peer that can open the socket; an op with a
    rule only to the peers it names. No one is implicit: not root, not the daemon's user.
    """

    def __init__(self, rules: Mapping[str, Rule] | None = None) -> None:
        self.rules: dict[str, Rule] = dict(rules or {})
        self.refused = 0
        self.needs_groups = any(rule.gids for rule in self.rules.values())
        self.groups = GroupCache()

    @classmethod
    def from_config(cls, access: Mapping[str, Collection[str]],
                    ops: Collection[str]) -> AccessPolicy:
        """Check op names against ``ops`` and resolve names to ids (blocking: NSS).

        Raises AccessConfigError naming the first bad op, user or group.
        """
        rules = {}
        for op, principals in access.items():
            if op not in ops:
                raise AccessConfigError(
                    f"access: unknown operation {op!r} (operations: {', '.join(sorted(ops))})")
            try:
                rules[op] = Rule.parse(principals)
            except AccessConfigError as exc:
                raise AccessConfigError(f"access: {op}: {exc}") from None
        return cls(rules)

    async def identify(self, sock: _socket.socket | trio.socket.SocketType) -> PeerCreds:
        """The peer of an accepted connection, with its groups when a rule needs them."""
        creds = peer_credentials(sock)
        return await self.groups.complete(creds) if self.needs_groups else creds

    def allowed(self, op: str, creds: PeerCreds) -> bool:
        rule = self.rules.get(op)
        return rule is None or rule.admits(creds)

    def check(self, op: str, creds: PeerCreds) -> None:
        """Raise Unauthorized (and count it) unless ``creds`` may run ``op``."""
        if not self.allowed(op, creds):
            self.refused += 1
            log.debug("refused %s to %s", op, creds.describe())
            raise Unauthorized(f"operation {op!r} is not allowed for {creds.describe()}")

    def statistics(self) -> AccessStatistics:
        return AccessStatistics(rules=len(self.rules), refused=self.refused)


def build_policy(config: Config, ops: Collection[str]) -> AccessPolicy:
    """``config.access`` as a policy, after checking ``socket_group`` (blocking: NSS).

    Raises AccessConfigError naming the setting and the unknown op, user or group.
    """
    if config.socket_group is not None:
        try:
            resolve_group(config.socket_group)
        except AccessConfigError as exc:
            raise AccessConfigError(f"socket_group: {exc}") from None
    return AccessPolicy.from_config(config.access, ops)
