"""Membership with real meshqd subprocesses on loopback: join, failure, leave, rejoin.

Across processes there is no event to await, so ``eventually`` polls the daemons'
status (every 50 ms, up to a bound): the bound is a limit, not a wait.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from meshq.testing import DaemonProcess


def eventually(check: Callable[[], bool], timeout: float, what: str) -> float:
    """Seconds until ``check()`` held; fails the test after ``timeout``."""
    start = time.monotonic()
    while not check():
        if time.monotonic() - start > timeout:
            pytest.fail(f"not within {timeout} s: {what}")
        time.sleep(0.05)
    return time.monotonic() - start


def states(d: DaemonProcess) -> dict[str, str]:
    with d.client(timeout=5) as c:
        return {m["name"]: m["state"] for m in c.status()["members"]}


@pytest.fixture
def trio_of_nodes(tmp_path: Path) -> Iterator[list[DaemonProcess]]:
    a = DaemonProcess(tmp_path / "a", node_name="a").start()
    assert a.bind is not None
    nodes = [a] + [DaemonProcess(tmp_path / n, node_name=n, args=["--join", a.bind]).start()
                   for n in ("b", "c")]
    yield nodes
    for d in nodes:
        d.kill()


def all_alive(nodes: list[DaemonProcess], names: set[str]) -> bool:
    return all(states(d) == dict.fromkeys(names, "alive") for d in nodes)


def test_three_nodes_join_through_one_seed(trio_of_nodes: list[DaemonProcess]) -> None:
    eventually(lambda: all_alive(trio_of_nodes, {"a", "b", "c"}), 10, "all alive everywhere")
    with trio_of_nodes[2].client() as c:
        status = c.status()
    assert status["node"]["accepting_writes"] is True
    c_view = {m["name"]: m for m in status["members"]}
    assert c_view["c"]["self"] and c_view["a"]["address"] == trio_of_nodes[0].bind
    assert status["mesh"]["cluster"] == "meshq"


def test_a_killed_node_is_suspected_then_declared_dead(
        trio_of_nodes: list[DaemonProcess]) -> None:
    a, b, c = trio_of_nodes
    eventually(lambda: all_alive(trio_of_nodes, {"a", "b", "c"}), 10, "all alive")
    c.kill()
    # Suspicion lasts at least 4 probe intervals with 3 nodes (memberlist's LAN defaults).
    took = eventually(lambda: states(a)["c"] == "dead" and states(b)["c"] == "dead", 30,
                      "c dead on a and b")
    assert took >= 3.0
    assert states(a)["b"] == "alive"


def test_sigterm_leaves_gracefully(trio_of_nodes: list[DaemonProcess]) -> None:
    a, b, _ = trio_of_nodes
    eventually(lambda: all_alive(trio_of_nodes, {"a", "b", "c"}), 10, "all alive")
    started = time.monotonic()
    assert b.stop() == 0
    assert time.monotonic() - started < 10
    eventually(lambda: states(a)["b"] == "left", 5, "b left, as seen by a")


def test_a_restarted_node_rejoins_its_known_peers_without_join(
        trio_of_nodes: list[DaemonProcess]) -> None:
    a, _b, c = trio_of_nodes
    eventually(lambda: all_alive(trio_of_nodes, {"a", "b", "c"}), 10, "all alive")
    eventually(lambda: (c.data_dir / "members.json").exists(), 5, "c remembered its peers")
    c.kill()
    c.args = []  # no --join: the peers come from the data dir
    c.start()
    eventually(lambda: states(c).get("a") == "alive" and states(a).get("c") == "alive", 30,
               "c back in a's view and a in c's")


def test_meshq_ctl_members_lists_the_cluster(trio_of_nodes: list[DaemonProcess]) -> None:
    eventually(lambda: all_alive(trio_of_nodes, {"a", "b", "c"}), 10, "all alive")
    out = subprocess.run(
        [sys.executable, "-m", "meshq.cli.ctl", "--socket", str(trio_of_nodes[1].socket),
         "members", "--json"], capture_output=True, text=True, timeout=30, check=True)
    members = json.loads(out.stdout)
    assert sorted((m["name"], m["state"]) for m in members) == [
        ("a", "alive"), ("b", "alive"), ("c", "alive")]


def test_another_cluster_cannot_join(tmp_path: Path) -> None:
    with DaemonProcess(tmp_path / "a", node_name="a") as a:
        env = {**os.environ, "MESHQ_CLUSTER_NAME": "other"}
        assert a.bind is not None
        with DaemonProcess(tmp_path / "x", node_name="x", args=["--join", a.bind],
                           env=env) as x:
            with a.client() as c:
                assert c.status()["mesh"]["bad_streams"] >= 1  # x's join was refused
            assert set(states(a)) == {"a"} and set(states(x)) == {"x"}


def test_garbage_packets_are_counted_and_the_node_keeps_serving(tmp_path: Path) -> None:
    with DaemonProcess(tmp_path / "a", node_name="a") as a:
        assert a.bind is not None
        host, port = a.bind.rsplit(":", 1)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            for payload in (b"", b"MQ", b"MQ\x01\x00\xc1", b"\x00" * 1500, os.urandom(200)):
                s.sendto(payload, (host, int(port)))
        eventually(lambda: _bad_packets(a) >= 4, 5, "bad packets counted")
        with a.client() as c:
            c.declare("q")
            mid = c.send("q", b"still here")
            assert c.receive("q")[0].id == mid


def _bad_packets(d: DaemonProcess) -> int:
    with d.client() as c:
        return int(c.status()["mesh"]["bad_packets"])


def test_meshq_ctl_ring_shows_every_live_member_s_share(
        trio_of_nodes: list[DaemonProcess]) -> None:
    eventually(lambda: all_alive(trio_of_nodes, {"a", "b", "c"}), 10, "all alive")
    out = subprocess.run(
        [sys.executable, "-m", "meshq.cli.ctl", "--socket", str(trio_of_nodes[0].socket),
         "ring", "--json"], capture_output=True, text=True, timeout=30, check=True)
    ring = json.loads(out.stdout)
    assert set(ring["ownership"]) == {"a", "b", "c"}
    assert abs(sum(ring["ownership"].values()) - 1.0) < 1e-3
    assert max(ring["ownership"].values()) / min(ring["ownership"].values()) < 1.5
    assert abs(sum(ring["replica_ownership_n3"].values()) - 3.0) < 1e-3


def test_hostile_addresses_and_names_in_gossip_do_not_take_the_node_down(
        tmp_path: Path) -> None:
    from meshq.mesh.wire import encode_packet

    with DaemonProcess(tmp_path / "a", node_name="a") as a:
        assert a.bind is not None
        host, port = a.bind.rsplit(":", 1)
        bad = [{"t": "ping_req", "seq": 1, "target": "x", "addr": addr}
               for addr in ("a:b:1", "[zz]:1", "a..b:1", "never.resolves.example:1")]
        bad.append({"t": "alive", "inc": 1, "node": "\U0001d51e" * 100, "addr": "10.0.0.1:1",
                    "meta": {}})
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            for message in bad:
                s.sendto(encode_packet([message]), (host, int(port)))
        eventually(lambda: _bad_packets(a) >= len(bad), 5, "every hostile packet counted")
        assert a.proc is not None and a.proc.poll() is None
        assert set(states(a)) == {"a"}


def test_sigterm_during_a_slow_join_stops_at_once(tmp_path: Path) -> None:
    with socket.socket() as silent:  # accepts TCP connections, never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        seed = f"127.0.0.1:{silent.getsockname()[1]}"
        d = DaemonProcess(tmp_path / "a", node_name="a", args=["--join", seed])
        proc = subprocess.Popen(d.command(), stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        silent.settimeout(10)
        try:
            conn, _ = silent.accept()  # the join reached the seed and now waits on it
            with conn:
                started = time.monotonic()
                proc.terminate()
                proc.wait(10)
                assert time.monotonic() - started < 2.0
        finally:
            proc.kill()
            proc.wait()
