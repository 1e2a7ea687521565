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
import trio
from test_bad_input import Raw
from test_membership import all_alive, eventually

from meshq.cluster.peers import LINK_KIND
from meshq.cluster.placement import ring_key
from meshq.mesh.keyring import ENVELOPE_HEADER, Keyring, generate_key, parse_key
from meshq.mesh.ring import Ring
from meshq.mesh.transport import FramedStream, UdpTcpTransport, parse_address
from meshq.mesh.wire import hello_frame
from meshq.testing import DaemonProcess


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[list[DaemonProcess]]:
    key = tmp_path / "cluster.key"
    key.write_text(generate_key())
    # (a's limit well under what a flood gets through its socket buffer on a loaded box;
    # on a keyed node only failed packets count against it, so b's gossip is not limited)
    a = DaemonProcess(tmp_path / "a", node_name="a", args=[
        "--cluster-key-file", str(key)],
        env={**os.environ, "MESHQ_UDP_PACKETS_PER_SECOND": "100"}).start()
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
    eventually(lambda: security(a)["rejected_packets"]["rate_limited"] > 0, 10,
               "rate limited")  # one source, far above udp_packets_per_second
    rejected = security(a)["rejected_packets"]
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


async def _relay_as_a_peer(addr: str, key: str, ending: str) -> dict:
    """A keyed peer opening a relayed-client stream: asks for ``leave`` (not relayed),
    then ends the stream with a forged record or half a record."""
    keyring = Keyring([parse_key(key)])
    async with await UdpTcpTransport.bind("127.0.0.1:0", keyring=keyring) as t:
        raw = await t.open_stream(addr, 5)
        stream = FramedStream(raw)
        hello = hello_frame("meshq", "ghost")
        hello["kind"] = "client"
        with trio.fail_after(10):
            await stream.send(hello)
            assert (await stream.receive() or {}).get("t") == "hello"
            await stream.send({"op": "leave", "id": 1})
            answer = await stream.receive() or {}
            inner = raw.inner  # type: ignore[attr-defined]
            if ending == "forged":
                await inner.send_all(b"\x00\x00\x00\x20" + b"\x00" * 32)
            else:  # a record header and part of its body, as a node killed mid-send
                await inner.send_all(b"\x00\x00\x40\x10" + b"\x00" * 100)
        await raw.aclose()
        return answer


@pytest.mark.parametrize("ending", ["forged", "cut"])
def test_a_relayed_stream_runs_no_admin_op_and_its_bad_end_harms_nothing(
        pair: list[DaemonProcess], tmp_path: Path, ending: str) -> None:
    a, b = pair
    assert a.bind is not None
    key = (tmp_path / "cluster.key").read_text()
    answer = trio.run(_relay_as_a_peer, a.bind, key, ending)
    assert answer["error"]["code"] == "BAD_REQUEST", answer
    assert "not relayed" in answer["error"]["message"]
    with a.client() as c:  # still up, still a member, still serving
        assert c.ping()
        c.declare("after-" + ending, replicas=2)
        ids = [c.send("after-" + ending, "x") for _ in range(5)]
    assert a.proc is not None and a.proc.poll() is None
    assert all_alive(pair, {"a", "b"})
    assert drain(b, "after-" + ending) >= set(ids)


def test_a_relayed_request_may_have_any_msgpack_id(pair: list[DaemonProcess]) -> None:
    """Ids are any msgpack value (protocol.md); a list must not break the relay."""
    a = pair[0]
    ring = Ring.build(("a", "b"))
    name = next(f"ids-{i}" for i in range(1000)
                if ring.preference_list(ring_key(f"ids-{i}", 0), 2)[0] == "b")
    with a.client() as c:
        c.declare(name, replicas=2)
    raw = Raw(a.socket)
    try:
        answer = raw.request(op="stats", queue=name, id=[1, {"x": 2}])
        assert answer["id"] == [1, {"x": 2}] and answer["result"]["queues"], answer
    finally:
        raw.close()
    assert "Traceback" not in a.log_tail(20000)


async def _garbage_on_a_link(addr: str, key: str) -> list[dict]:
    """A keyed peer on a replication link: requests whose fields are wrong in depth
    (bytes map keys, junk changes) each get an error answer; a frame nested past what
    msgpack unpacks ends the link."""
    keyring = Keyring([parse_key(key)])
    answers = []
    async with await UdpTcpTransport.bind("127.0.0.1:0", keyring=keyring) as t:
        stream = FramedStream(await t.open_stream(addr, 5))
        hello = hello_frame("meshq", "ghost")
        hello["kind"] = LINK_KIND
        with trio.fail_after(10):
            try:
                await stream.send(hello)
                for rid, frame in enumerate([
                        {"t": "apply", "e": [], "c": [["P", {b"bytes": {b"k": 1}}]]},
                        {"t": "apply", "e": [["q", 0, {b"x": 1}]], "c": []},
                        {"t": "apply", "e": [], "c": [["Q", "q", 1, {b"opt": [1]}]]},
                        {"t": "digest", "q": "q", "i": 0, "s": [[[]]]}], start=1):
                    await stream.send({**frame, "rid": rid})
                    answers.append(await stream.receive() or {})
                nested = b"\x91" * 5000 + b"\xc0"
                payload = b"\x82\xa1t\xa5apply\xa1c" + nested
                await stream.stream.send_all(len(payload).to_bytes(4, "big") + payload)
                answers.append({"end": await stream.receive()})
            finally:
                await stream.aclose()
    return answers


def test_a_replication_link_refuses_malformed_requests_one_by_one(
        pair: list[DaemonProcess], tmp_path: Path) -> None:
    a, b = pair
    assert a.bind is not None
    key = (tmp_path / "cluster.key").read_text()
    answers = trio.run(_garbage_on_a_link, a.bind, key)
    assert [x.get("rid") for x in answers[:4]] == [1, 2, 3, 4], answers
    assert all("error" in x for x in answers[:4]), answers
    assert answers[4] == {"end": None}, answers  # the link closed, nothing else
    with a.client() as c:  # still up, still a member, still replicating
        c.declare("after-garbage", replicas=2)
        ids = [c.send("after-garbage", "x") for _ in range(5)]
    assert all_alive(pair, {"a", "b"})
    assert drain(b, "after-garbage") >= set(ids)
    assert "Traceback" not in a.log_tail(20000)
