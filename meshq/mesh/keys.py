"""Cluster-wide key operations: ``meshq-ctl keys list|install|use|remove``, as Serf does.

State here: none beyond the node's Keyring. The node that a ``keys`` request reaches
applies it to itself, then asks every live member over a peer stream (hello kind
``keys``) to do the same, and reports each node's answer. A member that is down misses
the change: run the command again once it is back (the answers say who did not answer).

Rotation without downtime: ``install`` the new key everywhere, ``use`` it everywhere,
then ``remove`` the old one. Each step is safe on its own: every node accepts every
installed key, so nodes that have switched and nodes that have not still understand
each other.
"""

from __future__ import annotations

import ipaddress
import logging
from typing import TYPE_CHECKING, Any

import trio

from meshq.config import Config, parse_host_port
from meshq.errors import BadRequest, MeshqError, StartupError
from meshq.mesh.keyring import Keyring, KeyringError, fingerprint, parse_key, write_keys
from meshq.mesh.swim import MemberState
from meshq.mesh.transport import FramedStream, UdpTcpTransport
from meshq.mesh.wire import check_hello, hello_frame

if TYPE_CHECKING:
    from meshq.mesh.membership import Membership
    from meshq.mesh.transport import Transport

__all__ = ["ACTIONS", "KeyService", "check_unkeyed_bind", "load_keyring", "security_status"]

log = logging.getLogger("meshq.mesh.keys")
ACTIONS = ("list", "install", "use", "remove")
PEER_TIMEOUT = 5.0
KEYS_MAX_FRAME = 64 * 1024


# ---------------------------------------------------------------------------- start-up
def load_keyring(config: Config) -> Keyring:
    """The ring kept in the data directory (``keyring.json``); on first start, the key of
    ``cluster_key_file``. Once the ring exists it wins, as Consul's keyring file does:
    later changes go through ``meshq-ctl keys``. StartupError for an unreadable key."""
    initial = None
    if config.cluster_key_file is not None:
        try:
            initial = parse_key(config.cluster_key_file.read_text())
        except OSError as exc:
            raise StartupError(f"cannot read cluster_key_file {config.cluster_key_file}: "
                               f"{exc.strerror or exc}") from None
        except KeyringError as exc:
            raise StartupError(f"cluster_key_file {config.cluster_key_file}: {exc}") from None
    path = config.data_dir / "keyring.json"
    try:
        ring = Keyring.load(path, initial)
    except KeyringError as exc:
        raise StartupError(str(exc)) from None
    if initial is not None and initial not in ring:
        log.warning("cluster_key_file %s holds a key that is not in %s, which wins once it "
                    "exists; change keys with meshq-ctl keys", config.cluster_key_file, path)
    return ring


async def _is_loopback(host: str) -> bool:
    try:
        infos = await trio.socket.getaddrinfo(host, None)
    except OSError:
        return False
    return bool(infos) and all(ipaddress.ip_address(str(i[4][0]).split("%")[0]).is_loopback
                               for i in infos)


async def check_unkeyed_bind(config: Config, keyring: Keyring) -> bool:
    """Without a key a node may bind only loopback addresses, unless the config opts out
    (``allow_unkeyed_bind``); StartupError otherwise. True when it runs exposed: no key,
    a non-loopback bind, allowed by the opt-out (``meshq-ctl status`` then warns)."""
    if keyring:
        return False
    host, _ = parse_host_port(config.bind)
    if await _is_loopback(host):
        return False
    if not config.allow_unkeyed_bind:
        raise StartupError(
            f"bind {config.bind} is not a loopback address and there is no cluster key: "
            "anyone on the network could join, read and inject. Set cluster_key_file "
            "(meshq-ctl keys generate), or set allow_unkeyed_bind = true to accept that")
    log.warning("no cluster key and bind %s: peer traffic is neither authenticated nor "
                "encrypted (allow_unkeyed_bind)", config.bind)
    return True


def security_status(config: Config, transport: UdpTcpTransport,
                    exposed: bool) -> dict[str, Any]:
    """The status section ``security`` (docs/ctl-json.md)."""
    ring = transport.keyring
    warnings = []
    if exposed:
        warnings.append(f"no cluster key and bind {config.bind} allowed by "
                        "allow_unkeyed_bind: peer traffic is neither authenticated nor "
                        "encrypted")
    if config.access and not ring:
        warnings.append("access rules hold on the socket only: with no cluster key, any "
                        "local user can relay queue ops through the peer port")
    return {"keyed": bool(ring),
            "primary_key": fingerprint(ring.primary) if ring.primary else None,
            "keys": [fingerprint(k) for k in ring.keys],
            "warnings": warnings,
            "rejected_packets": dict(transport.rejected.packets),
            "rejected_streams": dict(transport.rejected.streams)}


# ---------------------------------------------------------------------------- the ring ops
def _answer(answer: dict[str, Any]) -> dict[str, Any]:
    """A peer's answer, checked: a malformed one counts as that node saying no."""
    keys, primary, error = answer.get("keys"), answer.get("primary"), answer.get("error")
    if not (isinstance(keys, list) and all(isinstance(k, str) for k in keys)
            and isinstance(primary, str | None) and isinstance(error, str | None)):
        return {"ok": False, "error": "a malformed answer", "changed": False, "keys": [],
                "primary": None}
    return {"ok": answer.get("ok") is True, "error": error,
            "changed": answer.get("changed") is True, "keys": keys, "primary": primary}


class KeyService:
    def __init__(self, *, me: str, cluster: str, keyring: Keyring, transport: Transport,
                 membership: Membership | None) -> None:
        self.me = me
        self.cluster = cluster
        self.keyring = keyring
        self.transport = transport
        self.membership = membership
        self._lock = trio.Lock()

    # -- this node ---------------------------------------------------------------------
    def describe(self) -> dict[str, Any]:
        ring = self.keyring
        return {"keys": [fingerprint(k) for k in ring.keys],
                "primary": fingerprint(ring.primary) if ring.primary else None}

    async def apply_local(self, action: str, key_text: str | None) -> dict[str, Any]:
        """Apply one action to this node's ring: {"ok", "error", "changed", "keys",
        "primary"}. A refused action changes nothing."""
        ring = self.keyring
        async with self._lock:  # one change at a time: each plans from the last one's ring
            try:
                if action == "list":
                    keys = None
                elif action == "install":
                    keys = ring.planned(action, parse_key(key_text or ""))
                else:
                    keys = ring.planned(action, ring.resolve(key_text or ""))
                if keys is not None and ring.path is not None:
                    await trio.to_thread.run_sync(write_keys, ring.path, keys)
            except (KeyringError, OSError) as exc:
                return {"ok": False, "error": str(exc), "changed": False, **self.describe()}
            if keys is not None:
                ring.replace(keys)  # on the event loop: packets never see half a change
                log.info("keyring: %s %s", action, self.describe())
        return {"ok": True, "error": None, "changed": keys is not None, **self.describe()}

    # -- the cluster -------------------------------------------------------------------
    async def request(self, action: Any, key_text: Any) -> dict[str, Any]:
        """The client op: apply ``action`` here and on every live member."""
        if action not in ACTIONS:
            raise BadRequest(f"keys: action must be one of {', '.join(ACTIONS)}, "
                             f"got {action!r:.40}")
        if action != "list" and not isinstance(key_text, str):
            raise BadRequest(f"keys {action} needs a key (base64, or its fingerprint)")
        if action == "install":
            try:
                parse_key(key_text)
            except KeyringError as exc:
                raise BadRequest(str(exc)) from None
        nodes: dict[str, dict[str, Any]] = {self.me: await self.apply_local(action, key_text)}
        if not nodes[self.me]["ok"] and action != "list":
            return self._summary(nodes)  # refused here: do not spread it
        peers = self._peers()
        async with trio.open_nursery() as nursery:
            for name, addr in peers:
                nursery.start_soon(self._ask, name, addr, action, key_text, nodes)
        return self._summary(nodes)

    def _peers(self) -> list[tuple[str, str]]:
        if self.membership is None:
            return []
        return [(m.name, m.address) for m in self.membership.swim.members()
                if m.name != self.me and m.state in (MemberState.ALIVE, MemberState.SUSPECT)]

    async def _ask(self, name: str, addr: str, action: str, key_text: str | None,
                   nodes: dict[str, dict[str, Any]]) -> None:
        try:
            with trio.fail_after(PEER_TIMEOUT):
                raw = await self.transport.open_stream(addr, PEER_TIMEOUT)
                stream = FramedStream(raw, max_frame=KEYS_MAX_FRAME)
                try:
                    hello = hello_frame(self.cluster, self.me)
                    hello["kind"] = "keys"
                    await stream.send(hello)
                    await stream.send({"t": "keys", "action": action, "key": key_text})
                    answer = await stream.receive()
                finally:
                    await trio.aclose_forcefully(raw)
            if answer is None or answer.get("t") != "keys":
                raise MeshqError("no answer")
            nodes[name] = _answer(answer)
        except (OSError, MeshqError, trio.BrokenResourceError, trio.TooSlowError) as exc:
            nodes[name] = {"ok": False, "error": f"no answer: {exc}", "changed": False,
                           "keys": [], "primary": None}

    async def serve(self, stream: FramedStream, hello: dict[str, Any]) -> None:
        """A ``keys`` stream from another node (membership stream handler)."""
        with trio.fail_after(PEER_TIMEOUT):
            check_hello(hello, self.cluster)
            req = await stream.receive()
            if req is None or req.get("t") != "keys" or req.get("action") not in ACTIONS:
                return
            key = req.get("key")
            result = await self.apply_local(req["action"], key if isinstance(key, str)
                                            else None)
            await stream.send({"t": "keys", **result})

    @staticmethod
    def _summary(nodes: dict[str, dict[str, Any]]) -> dict[str, Any]:
        counts: dict[str, int] = {}
        primaries: dict[str, int] = {}
        for result in nodes.values():
            for fp in result["keys"]:
                counts[fp] = counts.get(fp, 0) + 1
            if result["primary"]:
                primaries[result["primary"]] = primaries.get(result["primary"], 0) + 1
        return {"nodes": dict(sorted(nodes.items())),
                "total": len(nodes),
                "ok": sum(1 for r in nodes.values() if r["ok"]),
                "keys": dict(sorted(counts.items())),
                "primaries": dict(sorted(primaries.items()))}
