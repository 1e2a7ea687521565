"""Hostile traffic on the peer port of a keyed two-node cluster, with real daemons: floods
of unauthenticated UDP packets and of idle or half-open TCP connections are dropped and
counted, the members stay alive to each other, and confirmed messages are all delivered.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_membership import all_alive, eventually

from meshq.mesh.keyring import ENVELOPE_HEADER, generate_key
from meshq.mesh.transport import parse_address
from meshq.testing import DaemonProcess


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[list[DaemonProcess]]:
    key = tmp_path / "cluster.key"
    key.write_text(generate_key())
    a = DaemonProcess(tmp_path / "a", node_name="a", args=[
        "--cluster-key-file", str(key)]).start()
    assert a.bind is not None
    b = DaemonProcess(tmp_path / "b", node_name="b", args=[
        "--cluster-key-file", str(key), "--join", a.bind]).start()
    nodes = [a, b]
    eventually(lambda: all_alive(nodes, {"a", "b"}), 15, "both alive")
    yield nodes
    for d in nodes:
        d.kill()


def security(d: DaemonProcess) -> dict:
    with d.client(timeout=5) as c:
        return c.status()["security"]


def confirmed_sends(d: DaemonProcess, queue: str, n: int) -> list[str]:
    with d.client(timeout=10) as c:
        return [c.send(queue, f"{queue}-{i}") for i in range(n)]


def drain(d: DaemonProcess, queue: str) -> set[str]:
    got: set[str] = set()
    with d.client(timeout=10) as c:
        while batch := c.receive(queue, max=500, wait=1):
            got.update(m.id for m in batch)
            c.ack(queue, [m.id for m in batch])
    return got


def closed_by_peer(s: socket.socket, timeout: float = 15) -> bool:
    """Read until the daemon closes the connection (its handshake bytes come first)."""
    s.settimeout(timeout)
    try:
        while s.recv(4096):
            pass
    except ConnectionResetError:
        pass
    return True


def test_a_udp_flood_is_dropped_and_counted(pair: list[DaemonProcess]) -> None:
    a, b = pair
    assert a.bind is not None
    with a.client() as c:
        c.declare("flood", replicas=2)
    before = confirmed_sends(a, "flood", 20)
    target = parse_address(a.bind)
    junk = os.urandom(1400)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.setblocking(False)
        sent = 0
        for i in range(30_000):
            packet = (ENVELOPE_HEADER + junk) if i % 2 else junk[: 20 + i % 500]
            try:
                s.sendto(packet, target)
                sent += 1
            except BlockingIOError:
                pass
    during = confirmed_sends(a, "flood", 20)
    eventually(lambda: sum(security(a)["rejected_packets"].values()) > 0, 10, "counted")
    rejected = security(a)["rejected_packets"]
    assert rejected["rate_limited"] > 0  # one source, far above udp_packets_per_second
    assert rejected["unkeyed"] + rejected["bad_key"] > 0
    assert sum(rejected.values()) <= sent
    assert all_alive(pair, {"a", "b"})
    assert drain(b, "flood") >= set(before) | set(during)


def test_idle_and_half_open_peer_connections_are_bounded(pair: list[DaemonProcess]) -> None:
    a, b = pair
    assert a.bind is not None
    with a.client() as c:
        c.declare("idle", replicas=2)
    target = parse_address(a.bind)
    conns = []
    try:
        for i in range(1500):
            s = socket.create_connection(target, timeout=5)
            if i % 3 == 0:
                s.sendall(b"MQS\x01" + b"\0" * 7)  # half a handshake, then nothing
            conns.append(s)
        ids = confirmed_sends(a, "idle", 30)  # replication over the existing link
        # The pending ones are closed within the stream timeout (5 s); the rest at once.
        assert all(closed_by_peer(s) for s in conns)
    finally:
        for s in conns:
            s.close()
    eventually(lambda: all_alive(pair, {"a", "b"}), 15, "both alive")
    with a.client() as c:
        assert c.status()["mesh"]["bad_streams"] >= len(conns) - 64
    assert drain(b, "idle") >= set(ids)
