"""Socket permissions and access rules (issue 4) against real meshqd subprocesses.

The daemon sets the socket's mode and group as configured; every accepted connection's
peer is read with SO_PEERCRED; an op with a rule runs only for the uids, gids, users and
groups it names (root included), else UNAUTHORIZED, with nothing changed and the
connection still usable. Tests that need a second real uid fork a child that drops to
``nobody`` (65534): they run only as root.
"""

from __future__ import annotations

import errno
import grp
import json
import os
import pwd
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
from test_membership import all_alive, eventually

from meshq.client import Client
from meshq.cluster.placement import ring_key
from meshq.errors import EXIT_CODES, MeshqError, Unauthorized
from meshq.mesh.ring import Ring
from meshq.server import listener
from meshq.server.access import (
    UNKNOWN,
    AccessConfigError,
    AccessPolicy,
    GroupCache,
    PeerCreds,
    peer_credentials,
)
from meshq.server.ops import OPS
from meshq.testing import DaemonProcess

UID, GID = os.getuid(), os.getgid()
USER = pwd.getpwuid(UID).pw_name
GROUP = grp.getgrgid(GID).gr_name
NOBODY = 65534
OTHER_GID = max([GID, *os.getgroups()]) + 1  # a gid this process is not in
as_root = pytest.mark.skipif(UID != 0, reason="needs root to act as a second uid")


def write_config(path: Path, access: dict[str, list[str]] | None = None,
                 **top: Any) -> Path:
    lines = [f"{k} = {oct(v) if k == 'socket_mode' else json.dumps(v)}"
             for k, v in top.items()]
    if access is not None:
        lines.append("[access]")
        lines += [f"{op} = {json.dumps(who)}" for op, who in access.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def daemon_with(tmp_path: Path, name: str, socket_path: Path | None = None,
                access: dict[str, list[str]] | None = None, **top: Any) -> DaemonProcess:
    config = write_config(tmp_path / f"{name}.toml", access, **top)
    return DaemonProcess(tmp_path / name, socket_path, args=["--config", str(config)],
                         node_name=name).start()


def refused(fn: Callable[[], object], op: str, uid: int) -> str:
    with pytest.raises(Unauthorized) as info:
        fn()
    assert f"{op!r}" in info.value.message and f"uid {uid}" in info.value.message
    return info.value.message


# --------------------------------------------------------------------------- the policy


def test_no_principal_is_implicit_and_an_unknown_peer_matches_only_star() -> None:
    policy = AccessPolicy.from_config(
        {"delete": ["uid:1000"], "purge": [], "leave": [f"group:{GROUP}"], "stats": ["*"]},
        OPS)
    root = PeerCreds(pid=1, uid=0, gid=0, groups=frozenset({0}))
    member = PeerCreds(pid=2, uid=1234, gid=77, groups=frozenset({77, GID}))
    assert not policy.allowed("delete", root)  # root is not all-powerful
    assert policy.allowed("delete", PeerCreds(uid=1000, gid=1, groups=frozenset({1})))
    assert not policy.allowed("purge", root)  # an empty list: no one
    assert policy.allowed("leave", member)  # a supplementary group counts
    assert not policy.allowed("leave", UNKNOWN)
    assert policy.allowed("stats", UNKNOWN) and policy.allowed("send", UNKNOWN)  # no rule
    with pytest.raises(Unauthorized, match="'purge' is not allowed for uid 0"):
        policy.check("purge", root)
    assert policy.statistics().refused == 1 and policy.statistics().rules == 4


@pytest.mark.parametrize(("access", "named"), [
    ({"delete_queue": ["*"]}, "unknown operation 'delete_queue'"),
    ({"delete": ["user:no-such-user-4711"]}, "delete: unknown user 'no-such-user-4711'"),
    ({"delete": ["group:no-such-group-4711"]}, "delete: unknown group 'no-such-group-4711'"),
])
def test_bad_names_fail_at_build_time(access: dict[str, list[str]], named: str) -> None:
    with pytest.raises(AccessConfigError, match=named):
        AccessPolicy.from_config(access, OPS)


async def test_peer_credentials_and_groups_of_a_real_socket() -> None:
    a, b = socket.socketpair(socket.AF_UNIX)
    with a, b:
        creds = peer_credentials(a)
        assert (creds.pid, creds.uid, creds.gid) == (os.getpid(), UID, GID)
        full = await GroupCache().complete(creds)
        account = pwd.getpwuid(UID)
        assert set(os.getgrouplist(USER, account.pw_gid)) | {GID} == full.groups


def test_the_socket_is_never_more_open_than_0600_before_its_chmod(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[int] = []
    real_chmod = os.chmod

    def spy(path: Any, mode: int, **kw: Any) -> None:
        seen.append(stat.S_IMODE(os.stat(path).st_mode))
        real_chmod(path, mode, **kw)

    monkeypatch.setattr(os, "chmod", spy)
    old = os.umask(0)  # the worst umask a daemon could inherit
    try:
        sock = listener._bind(tmp_path / "s.sock", 0o660, None, None)
    finally:
        os.umask(old)
    sock.close()
    assert seen and seen[0] & 0o177 == 0, oct(seen[0])
    assert stat.S_IMODE(os.stat(tmp_path / "s.sock").st_mode) == 0o660


# --------------------------------------------------------------------------- one uid


@pytest.fixture(scope="module")
def ruled(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProcess]:
    """A meshqd whose rules refuse ``delete`` and ``leave`` to this uid, allow the rest."""
    tmp = tmp_path_factory.mktemp("ruled")
    d = daemon_with(tmp, "ruled", access={
        "delete": [f"uid:{UID + 1}", f"gid:{OTHER_GID}"],
        "leave": [],
        "purge": [f"uid:{UID}"],
        "send": [f"gid:{GID}"],
        "stats": [f"group:{GROUP}"],
        "declare": [f"user:{USER}"],
        "receive": ["*"],
    })
    yield d
    d.kill()


def test_a_refused_op_changes_nothing_and_the_connection_goes_on(
        ruled: DaemonProcess) -> None:
    with ruled.client(timeout=10) as c:
        before = c.status()["access"]
        c.declare("kept")  # user:NAME
        c.send("kept", b"one")  # gid:N
        refused(lambda: c.delete("kept"), "delete", UID)
        refused(lambda: c.request("leave"), "leave", UID)  # an empty list: no one
        [s] = c.stats("kept")  # the same connection, group:NAME
        assert s["ready"] == 1
        [m] = c.receive("kept", wait=5)  # "*"
        assert m.body == b"one"
        c.ack("kept", [m.id])  # no rule: open
        assert c.purge("kept") == 0  # uid:N
        assert c.ping()["node"] == "ruled"
        after = c.status()["access"]
    assert after == {"rules": 7, "refused": before["refused"] + 2}
    assert ruled.proc is not None and ruled.proc.poll() is None


def test_meshq_delete_prints_one_unauthorized_line_and_exits_7(ruled: DaemonProcess) -> None:
    with ruled.client() as c:
        c.declare("cli-kept")
    proc = subprocess.run([sys.executable, "-m", "meshq.cli.meshq", "--socket",
                           str(ruled.socket), "delete", "cli-kept"],
                          capture_output=True, timeout=30)
    err = proc.stderr.decode()
    assert proc.returncode == EXIT_CODES["UNAUTHORIZED"] == 7, err
    assert err.startswith("UNAUTHORIZED: operation 'delete' is not allowed for uid ")
    assert err.count("\n") == 1 and proc.stdout == b""
    with ruled.client() as c:
        assert [s["name"] for s in c.stats("cli-kept")] == ["cli-kept"]


def test_any_matching_principal_allows_and_the_socket_has_its_mode_and_group(
        tmp_path: Path) -> None:
    d = daemon_with(tmp_path, "open", socket_mode=0o640, socket_group=str(GID),
                    access={"delete": [f"uid:{UID + 1}", f"group:{GROUP}"]})
    try:
        st = os.stat(d.socket)
        assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o640
        assert st.st_gid == GID
        with d.client() as c:
            c.declare("gone")
            assert c.delete("gone") == 0
            assert c.stats() == []
            assert c.status()["access"] == {"rules": 1, "refused": 0}
    finally:
        d.kill()


@pytest.mark.parametrize(("config", "named"), [
    ({"socket_group": "no-such-group-4711"}, "socket_group: unknown group 'no-such-group-4711'"),
    ({"access": {"delete_queue": ["*"]}}, "access: unknown operation 'delete_queue'"),
    ({"access": {"purge": ["user:no-such-user-4711"]}},
     "access: purge: unknown user 'no-such-user-4711'"),
])
def test_a_bad_name_stops_meshqd_with_status_2_and_one_line(
        tmp_path: Path, config: dict[str, Any], named: str) -> None:
    top = dict(config)
    path = write_config(tmp_path / "bad.toml", top.pop("access", None), **top)
    sock = tmp_path / "s.sock"
    proc = subprocess.run([sys.executable, "-m", "meshq.daemon", "--config", str(path),
                           "--data-dir", str(tmp_path / "data"), "--socket", str(sock),
                           "--bind", "127.0.0.1:0"], capture_output=True, timeout=30)
    err = proc.stderr.decode()
    assert proc.returncode == 2, err
    assert err.startswith(f"meshqd: {named}") and err.count("\n") == 1, err
    assert not sock.exists()


def test_relayed_ops_are_checked_only_where_the_client_connected(tmp_path: Path) -> None:
    a = DaemonProcess(tmp_path / "a", node_name="a").start()
    b = None
    try:
        assert a.bind is not None
        config = write_config(tmp_path / "b.toml", {"delete": [f"uid:{UID + 1}"]})
        b = DaemonProcess(tmp_path / "b", node_name="b",
                          args=["--config", str(config), "--join", a.bind]).start()
        eventually(lambda: all_alive([a, b], {"a", "b"}), 15, "a and b alive")
        ring = Ring.build(("a", "b"))
        name = next(f"relay-{i}" for i in range(1000)
                    if ring.preference_list(ring_key(f"relay-{i}", 0), 2)[0] == "b")
        with a.client(timeout=10) as c:
            c.declare(name, replicas=2)
            assert c.delete(name) == 0  # a allows it; b, which runs it, does not ask
        with b.client(timeout=10) as c:
            c.declare(name, replicas=2)
            refused(lambda: c.delete(name), "delete", UID)
            assert [s["name"] for s in c.stats(name)] == [name]
    finally:
        a.kill()
        if b is not None:
            b.kill()


# --------------------------------------------------------------------------- two uids


@pytest.fixture
def public_dir() -> Iterator[Path]:
    """A socket directory that ``nobody`` can search (short: AF_UNIX paths are)."""
    path = Path(tempfile.mkdtemp(prefix="meshq-acc-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def as_nobody(fn: Callable[[], Any], gid: int = NOBODY) -> dict[str, Any]:
    """``fn()`` in a forked child running as uid 65534 and ``gid``, with no other groups:
    ``{"ok": result}``, ``{"code": ..., "message": ...}`` or ``{"errno": n}``."""
    r, w = os.pipe()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # fork with threads (3.12+)
        pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        status = 1
        try:
            os.close(r)
            os.setgroups([])
            os.setgid(gid)
            os.setuid(NOBODY)
            try:
                out: dict[str, Any] = {"ok": fn()}
            except MeshqError as exc:
                out = {"code": exc.code, "message": exc.message}
            except OSError as exc:
                out = {"errno": exc.errno}
            os.write(w, json.dumps(out).encode())
            status = 0
        finally:
            os._exit(status)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        data = f.read()
    _, status = os.waitpid(pid, 0)
    assert status == 0 and data, "the nobody child failed"
    result: dict[str, Any] = json.loads(data)
    return result


def _delete_then_stats(path: Path, queue: str) -> Callable[[], Any]:
    def child() -> Any:
        with Client(path, timeout=10) as c:
            try:
                c.delete(queue)
            except Unauthorized as exc:
                return {"refused": exc.message, "stats": c.stats(queue)}
            return {"deleted": True}
    return child


def _raw_connect(path: Path) -> Callable[[], Any]:
    def child() -> Any:
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(str(path))
        return "connected"
    return child


@as_root
def test_nobody_in_the_socket_group_connects_but_a_root_only_op_is_refused(
        tmp_path: Path, public_dir: Path) -> None:
    group = grp.getgrgid(NOBODY).gr_name
    d = daemon_with(tmp_path, "groupy", public_dir / "s.sock", socket_mode=0o660,
                    socket_group=group, access={"delete": ["uid:0"]})
    try:
        st = os.stat(d.socket)
        assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o660, 0, NOBODY)
        with d.client() as c:
            c.declare("roots")
        got = as_nobody(_delete_then_stats(d.socket, "roots"))["ok"]
        assert "'delete' is not allowed for uid 65534" in got["refused"], got
        assert [s["name"] for s in got["stats"]] == ["roots"]
        with d.client() as c:
            assert c.delete("roots") == 0  # uid:0 is named
            assert c.status()["access"]["refused"] == 1
    finally:
        d.kill()


@as_root
def test_a_socket_directory_meshqd_makes_lets_the_socket_group_in(
        tmp_path: Path, public_dir: Path) -> None:
    made = public_dir / "made"
    d = daemon_with(tmp_path, "mkdir", made / "s.sock", socket_group=grp.getgrgid(NOBODY).gr_name)
    try:
        st = os.stat(made)
        assert (stat.S_IMODE(st.st_mode), st.st_gid) == (0o750, NOBODY)
        assert as_nobody(_raw_connect(d.socket)) == {"ok": "connected"}
    finally:
        d.kill()


@as_root
def test_mode_0600_keeps_nobody_out_even_in_the_socket_group(
        tmp_path: Path, public_dir: Path) -> None:
    d = daemon_with(tmp_path, "private", public_dir / "s.sock", socket_mode=0o600,
                    socket_group=grp.getgrgid(NOBODY).gr_name)
    try:
        assert stat.S_IMODE(os.stat(d.socket).st_mode) == 0o600
        assert as_nobody(_raw_connect(d.socket)) == {"errno": errno.EACCES}
        with d.client() as c:  # root still can
            assert c.ping()["node"] == "private"
    finally:
        d.kill()


@as_root
def test_a_group_rule_sees_the_groups_of_the_peers_account(
        tmp_path: Path, public_dir: Path) -> None:
    """The child runs with gid 4711, so only nobody's account (passwd group 65534) can
    match ``gid:65534``."""
    assert pwd.getpwuid(NOBODY).pw_gid == NOBODY
    d = daemon_with(tmp_path, "grouprule", public_dir / "s.sock", socket_mode=0o666,
                    access={"delete": [f"gid:{NOBODY}"]})
    try:
        with d.client() as c:
            c.declare("theirs")
        assert as_nobody(_delete_then_stats(d.socket, "theirs"), gid=4711) == {
            "ok": {"deleted": True}}
        with d.client() as c:
            assert c.stats() == []
    finally:
        d.kill()



async def test_a_hung_group_lookup_judges_by_the_gid_alone(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """NSS (LDAP, sssd) that hangs must not hold up new connections."""
    import time as _time

    from meshq.server import access

    started = trio.Event()

    def hung(uid: int, gid: int) -> frozenset[int]:
        trio.from_thread.run_sync(started.set)
        _time.sleep(1.0)
        return frozenset({gid, 4242})

    monkeypatch.setattr(access, "_lookup_groups", hung)
    monkeypatch.setattr(access, "GROUPS_LOOKUP_TIMEOUT", 0.1)
    cache = access.GroupCache()
    creds = PeerCreds(pid=1, uid=1000, gid=100, groups=frozenset({100}))
    with trio.fail_after(0.8):
        got = await cache.complete(creds)
    assert started.is_set()
    assert got.groups == frozenset({100})  # not 4242: unknown, so not granted
