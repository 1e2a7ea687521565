"""The cluster key with real daemons: a keyed cluster refuses nodes with another key or
none, counts what it refused, rotates its key while messages flow without losing one, and
a node with no key may bind only loopback addresses unless the config opts out.

Waiting across processes polls status (``eventually``, bounded).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_membership import all_alive, eventually, states
from test_replication import queue_with_primary

from meshq.errors import EXIT_CODES, MeshqError
from meshq.mesh.keyring import fingerprint, generate_key, parse_key
from meshq.testing import DaemonProcess


def key_file(tmp_path: Path, name: str, key: str | None = None) -> tuple[Path, str]:
    key = key or generate_key()
    path = tmp_path / f"{name}.key"
    path.write_text(key + "\n")
    return path, key


def security(d: DaemonProcess) -> dict:
    with d.client(timeout=5) as c:
        return c.status()["security"]


def keys(d: DaemonProcess, action: str, key: str | None = None) -> dict:
    with d.client(timeout=30) as c:
        return c.request("keys", action=action, key=key)


@pytest.fixture
def keyed(tmp_path: Path) -> Iterator[tuple[dict[str, DaemonProcess], str]]:
    path, key = key_file(tmp_path, "k1")
    a = DaemonProcess(tmp_path / "a", node_name="a",
                      args=["--cluster-key-file", str(path)]).start()
    assert a.bind is not None
    nodes = {"a": a}
    for n in ("b", "c"):
        nodes[n] = DaemonProcess(tmp_path / n, node_name=n, args=[
            "--cluster-key-file", str(path), "--join", a.bind]).start()
    eventually(lambda: all_alive(list(nodes.values()), {"a", "b", "c"}), 15, "all alive")
    yield nodes, key
    for d in nodes.values():
        d.kill()


def test_a_node_with_another_key_or_none_is_refused(keyed, tmp_path: Path) -> None:
    nodes, key = keyed
    a = nodes["a"]
    assert a.bind is not None
    sec = security(a)
    assert sec["keyed"] is True
    assert sec["primary_key"] == fingerprint(parse_key(key))
    assert sec["warnings"] == []

    other, _ = key_file(tmp_path, "other")
    wrong = DaemonProcess(tmp_path / "wrong", node_name="wrong", args=[
        "--cluster-key-file", str(other), "--join", a.bind]).start()
    none = DaemonProcess(tmp_path / "none", node_name="none", args=["--join", a.bind]).start()
    try:
        eventually(lambda: security(a)["rejected_streams"]["bad_key"] > 0, 15,
                   "the wrong key's join refused")
        eventually(lambda: security(a)["rejected_streams"]["unkeyed"] > 0, 15,
                   "the unkeyed join refused")
        for d in nodes.values():
            assert set(states(d)) == {"a", "b", "c"}
        assert set(states(wrong)) == {"wrong"}
        assert set(states(none)) == {"none"}
        with a.client() as c:  # the keyed cluster still serves
            c.declare("still-here", replicas=3)
            assert c.send("still-here", "x")
    finally:
        wrong.kill()
        none.kill()


def test_rotating_the_key_under_load_loses_no_message(keyed) -> None:
    """Rotation from the queue's primary (b), while a client on a sends through a relay
    to b and a client on c consumes through another: nothing fails, nothing is lost,
    and the relayed subscription keeps delivering after the old key is gone."""
    nodes, old = keyed
    new = generate_key()
    name = queue_with_primary("b", "rot")
    with nodes["a"].client() as c:
        c.declare(name, replicas=3)
    confirmed: list[str] = []
    errors: list[str] = []
    consumed: list[str] = []
    stop = threading.Event()

    def sender() -> None:
        i = 0
        with nodes["a"].client(timeout=10) as c:
            while not stop.is_set():
                try:
                    confirmed.append(c.send(name, f"m{i}"))
                except MeshqError as exc:
                    errors.append(f"send: {exc}")
                i += 1

    def consumer() -> None:
        with nodes["c"].client(timeout=10) as c:
            sub = c.consume(name, prefetch=50)
            while not stop.is_set():
                d = sub.get(timeout=0.2)
                if d is not None:
                    try:
                        sub.ack(d)
                        consumed.append(d.id)
                    except MeshqError as exc:
                        errors.append(f"ack: {exc}")

    threads = [threading.Thread(target=sender), threading.Thread(target=consumer)]
    for t in threads:
        t.start()

    def flowing(what: str) -> None:
        sent, got = len(confirmed), len(consumed)
        eventually(lambda: len(confirmed) >= sent + 50 and len(consumed) >= got + 50, 20,
                   what)

    try:
        flowing("sends and deliveries before the rotation")
        got = keys(nodes["b"], "install", new)
        assert got["ok"] == got["total"] == 3, got
        assert got["keys"] == {fingerprint(parse_key(old)): 3,
                               fingerprint(parse_key(new)): 3}
        flowing("with two keys")
        got = keys(nodes["b"], "use", new)
        assert got["ok"] == 3 and got["primaries"] == {fingerprint(parse_key(new)): 3}, got
        flowing("on the new key")
        got = keys(nodes["b"], "remove", fingerprint(parse_key(old)))
        assert got["ok"] == 3 and got["keys"] == {fingerprint(parse_key(new)): 3}, got
        flowing("after the old key went")
        again = keys(nodes["a"], "remove", fingerprint(parse_key(old)))  # a second run
        assert again["ok"] == 3 and not any(n["changed"] for n in again["nodes"].values())
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert errors == []
    assert all_alive(list(nodes.values()), {"a", "b", "c"})
    for d in nodes.values():
        assert security(d)["keys"] == [fingerprint(parse_key(new))]
    received = set(consumed)
    with nodes["c"].client(timeout=10) as c:
        while batch := c.receive(name, max=500, wait=2):
            received.update(m.id for m in batch)
            c.ack(name, [m.id for m in batch])
    missing = set(confirmed) - received
    assert not missing, f"{len(missing)} of {len(confirmed)} confirmed messages lost"


def test_keys_refuses_bad_requests_and_needs_a_keyed_cluster(tmp_path: Path) -> None:
    with DaemonProcess(tmp_path / "solo", node_name="solo") as d, d.client() as c:
        listed = c.request("keys", action="list")
        assert listed["nodes"]["solo"]["keys"] == []
        refused = c.request("keys", action="install", key=generate_key())
        assert refused["ok"] == 0
        assert "no cluster key" in refused["nodes"]["solo"]["error"]
        with pytest.raises(MeshqError, match=r"BAD_REQUEST.*action"):
            c.request("keys", action="shred")
        with pytest.raises(MeshqError, match=r"BAD_REQUEST.*base64"):
            c.request("keys", action="install", key="not base64!")
        assert c.ping()


def test_without_a_key_only_loopback_binds(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="no cluster key"):
        DaemonProcess(tmp_path / "open", node_name="open", args=["--bind", "0.0.0.0:0"]).start()
    optout = DaemonProcess(tmp_path / "optout", node_name="optout",
                           args=["--bind", "0.0.0.0:0"],
                           env={**os.environ, "MESHQ_ALLOW_UNKEYED_BIND": "true"})
    with optout:
        warnings = security(optout)["warnings"]
        assert len(warnings) == 1 and "allow_unkeyed_bind" in warnings[0]
    path, _ = key_file(tmp_path, "k")
    with DaemonProcess(tmp_path / "keyed", node_name="keyed",
                       args=["--bind", "0.0.0.0:0", "--cluster-key-file", str(path)]) as d:
        assert security(d)["warnings"] == []



def ctl(d: DaemonProcess, *args: str, stdin: str | None = None
        ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "meshq.cli.ctl", "--socket", str(d.socket),
                           *args], capture_output=True, text=True, timeout=60, input=stdin)


def test_meshq_ctl_keys(keyed) -> None:
    nodes, old = keyed
    old_fp = fingerprint(parse_key(old))
    listed = ctl(nodes["a"], "keys", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    assert json.loads(listed.stdout)["keys"] == {old_fp: 3}
    new = ctl(nodes["a"], "keys", "generate").stdout.strip()
    installed = ctl(nodes["b"], "keys", "install", "-", stdin=new + "\n")
    assert installed.returncode == 0, installed.stderr
    assert "3 of 3 node(s) answered yes" in installed.stdout
    assert fingerprint(parse_key(new)) in installed.stdout
    refused = ctl(nodes["c"], "keys", "remove", old_fp)  # still everyone's primary
    assert refused.returncode == 5
    assert "not done on:" in refused.stdout and "primary" in refused.stdout
    bad = ctl(nodes["c"], "keys", "install", "not-a-key")
    assert bad.returncode == EXIT_CODES["BAD_REQUEST"], bad
    assert bad.stderr.startswith("BAD_REQUEST: a cluster key must be base64")
