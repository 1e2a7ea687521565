"""Hostile clients against a real meshqd: oversize frames, stalled and trickled frames,
thousands of idle connections, garbage, and a client that never reads its responses.

In each test a well-behaved client connected before the attack keeps working during it,
and every message it had confirmed (before or during the attack) is received after it.
"""

from __future__ import annotations

import itertools
import os
import resource
import selectors
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_bad_input import Raw

from meshq.client import Client
from meshq.errors import Unavailable
from meshq.protocol.codec import HEADER, encode_frame
from meshq.testing import DaemonProcess

LIMIT = 10.0  # upper bound on any one wait; never the thing a test waits for
FRAME_TIMEOUT = 1.5  # long enough for a round trip on a loaded machine
MAX_CONNECTIONS = 2000
MAX_INFLIGHT = 100
MAX_FRAME = 256 * 1024
_names = itertools.count()


def _raise_fd_limit(need: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < need:
        if hard != resource.RLIM_INFINITY and hard < need:
            pytest.skip(f"RLIMIT_NOFILE hard limit {hard} < {need}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))


@pytest.fixture(scope="module")
def daemon_(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProcess]:
    _raise_fd_limit(8000)  # before the start: the daemon inherits it
    env = {**os.environ, "MESHQ_CLIENT_FRAME_TIMEOUT": str(FRAME_TIMEOUT),
           "MESHQ_MAX_CONNECTIONS": str(MAX_CONNECTIONS),
           "MESHQ_MAX_INFLIGHT_REQUESTS": str(MAX_INFLIGHT),
           "MESHQ_MAX_FRAME_BYTES": str(MAX_FRAME),
           "MESHQ_MAX_MESSAGE_BYTES": str(MAX_FRAME // 2)}
    with DaemonProcess(tmp_path_factory.mktemp("hostile") / "data", env=env) as d:
        yield d


class Witness:
    """A well-behaved client, connected before the attack, with confirmed messages."""

    def __init__(self, d: DaemonProcess) -> None:
        self.client: Client = d.client(timeout=LIMIT)
        self.queue = f"witness-{next(_names)}"
        self.client.declare(self.queue)
        self.confirmed: list[str] = []
        self.send(10)

    def send(self, n: int = 1) -> None:
        for _ in range(n):
            self.confirmed.append(self.client.send(self.queue, b"m%d" % len(self.confirmed)))

    def server(self) -> dict[str, Any]:
        section: dict[str, Any] = self.client.status()["server"]
        return section

    def until(self, key: str, cond: Any) -> dict[str, Any]:
        """The server section once ``cond(section[key])`` holds (polled, LIMIT s at most)."""
        deadline = time.monotonic() + LIMIT
        while not cond((section := self.server())[key]):
            assert time.monotonic() < deadline, f"server {key} stuck at {section[key]}"
            time.sleep(0.02)
        return section

    def everything_there(self) -> None:
        """Every confirmed message is received (once), and then acked."""
        got = self.client.receive(self.queue, max=len(self.confirmed) + 10, wait=0.5)
        assert sorted(m.id for m in got) == sorted(self.confirmed)
        assert self.client.ack(self.queue, [m.id for m in got]) == [m.id for m in got]
        self.client.close()


@pytest.fixture
def witness(daemon_: DaemonProcess) -> Iterator[Witness]:
    w = Witness(daemon_)
    yield w
    w.send(5)  # still accepting writes after the attack
    w.everything_there()


def test_oversize_frame_gets_an_error_and_close(daemon_: DaemonProcess, witness: Witness) -> None:
    before = witness.server()["oversize_frames"]
    for length in (MAX_FRAME + 1, 2**32 - 1):
        raw = Raw(daemon_.socket)
        raw.sock.sendall(HEADER.pack(length))  # no body: refused on the header alone
        frames = raw.until_closed()
        raw.close()
        assert len(frames) == 1, frames
        assert frames[0]["id"] is None and frames[0]["error"]["code"] == "TOO_LARGE", frames
        witness.send()
    witness.until("oversize_frames", lambda n: n == before + 2)


def test_unfinished_frame_is_dropped_after_client_frame_timeout(
        daemon_: DaemonProcess, witness: Witness) -> None:
    before = witness.server()["frame_timeouts"]
    whole = encode_frame({"op": "send", "id": 1, "queue": witness.queue,
                          "messages": [{"body": b"never"}]})
    idle = Raw(daemon_.socket)  # no partial frame: may wait as long as it likes
    half_header = Raw(daemon_.socket)
    half_body = Raw(daemon_.socket)
    trickle = Raw(daemon_.socket)  # a byte at a time: each gap short, the frame too slow
    trickled = HEADER.pack(100_000)
    started = time.monotonic()
    half_header.sock.sendall(whole[:2])
    half_body.sock.sendall(whole[: len(whole) // 2])
    stalled = [half_header, half_body, trickle]
    sel = selectors.DefaultSelector()
    for r in stalled:
        sel.register(r.sock, selectors.EVENT_READ, r)
    sent = 0
    while not all(r.closed for r in stalled):
        assert time.monotonic() - started < LIMIT, "stalled clients were never dropped"
        witness.send()  # a normal client keeps sending meanwhile
        if not trickle.closed:
            try:
                trickle.sock.send(trickled[sent:sent + 1] or b"\x00")
                sent += 1
            except (BrokenPipeError, ConnectionResetError):
                pass
        for key, _ in sel.select(timeout=0.02):
            r = key.data
            r.read()
            if r.closed:
                sel.unregister(r.sock)
    elapsed = time.monotonic() - started
    sel.close()
    assert elapsed >= FRAME_TIMEOUT * 0.9, elapsed
    assert sent >= 3, sent  # it kept making progress, and was dropped all the same
    for r in stalled:
        assert [f["error"]["code"] for f in r.frames] == ["BAD_REQUEST"], r.frames
        assert "client_frame_timeout" in r.frames[0]["error"]["message"]
        r.close()
    assert idle.request(op="ping", id="idle")["result"]["node"]  # not dropped: no frame begun
    idle.close()
    witness.until("frame_timeouts", lambda n: n == before + 3)
    # (The witness fixture then finds exactly its confirmed messages: "never" was not run.)


def test_frames_that_keep_finishing_are_not_timed_out(daemon_: DaemonProcess,
                                                      witness: Witness) -> None:
    """Each write ends inside the next frame, for several client_frame_timeouts: each
    frame is finished quickly, so the connection stays (the clock is per frame)."""
    raw = Raw(daemon_.socket)
    cut = 5
    raw.sock.sendall(encode_frame({"op": "ping", "id": 0})[:cut])
    started = time.monotonic()
    rid = 0
    while time.monotonic() - started < 3 * FRAME_TIMEOUT:
        this, after = (encode_frame({"op": "ping", "id": i}) for i in (rid, rid + 1))
        raw.sock.sendall(this[cut:] + after[:cut])
        answer = raw.response(rid)
        assert answer.get("id") == rid and "result" in answer, answer
        rid += 1
    witness.send()
    raw.close()


def test_thousands_of_idle_connections(daemon_: DaemonProcess, witness: Witness) -> None:
    _raise_fd_limit(8000)
    start = witness.until("connections", lambda n: n == 1)  # the witness alone
    slots = MAX_CONNECTIONS - start["connections"]
    extra = 1000
    socks: list[socket.socket] = []
    sel = selectors.DefaultSelector()
    try:
        for i in range(slots + extra):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(str(daemon_.socket))  # blocking: waits while the backlog is full
            socks.append(s)
            sel.register(s, selectors.EVENT_READ, i)
            if i % 500 == 0:
                witness.send()  # the witness keeps its slot and keeps working
        # The ones over the limit get one UNAVAILABLE frame, then EOF; the others nothing.
        refused: dict[int, bytes] = {}
        ended: set[int] = set()
        deadline = time.monotonic() + LIMIT
        while len(ended) < extra:
            left = deadline - time.monotonic()
            assert left > 0, f"only {len(ended)} of {extra} refused connections closed"
            for key, _ in sel.select(timeout=left):
                i = key.data
                data = socks[i].recv(65536)
                refused[i] = refused.get(i, b"") + data
                if not data:
                    ended.add(i)
                    sel.unregister(socks[i])
        assert sorted(ended) == list(range(slots, slots + extra))
        assert sel.select(timeout=0) == []  # the connections kept got nothing
        expected = encode_frame({"id": None, "error": {
            "code": "UNAVAILABLE",
            "message": f"too many connections (max_connections={MAX_CONNECTIONS})"}})
        assert set(refused.values()) == {expected}
        section = witness.server()
        assert section["connections"] == MAX_CONNECTIONS
        assert section["refused_over_limit"] >= start["refused_over_limit"] + extra
        witness.send(3)
        # Full: a new client is refused; once some idle ones leave, a new client works.
        late = Raw(daemon_.socket)
        assert late.until_closed()[0]["error"]["code"] == "UNAVAILABLE"
        late.close()
        with daemon_.client(timeout=LIMIT) as refused_client, \
                pytest.raises(Unavailable, match="too many connections"):
            refused_client.ping()  # the client says why, not "outcome unknown"
        for s in socks[:10]:
            sel.unregister(s)
            s.close()
        witness.until("connections", lambda n: n <= MAX_CONNECTIONS - 10)
        with daemon_.client(timeout=LIMIT) as c:
            c.declare("after-the-flood")
            c.send("after-the-flood", b"x")
            assert [m.body for m in c.receive("after-the-flood", max=5)] == [b"x"]
            c.delete("after-the-flood")
    finally:
        sel.close()
        for s in socks:
            s.close()
    witness.until("connections", lambda n: n == 1)


def test_garbage_and_truncated_msgpack(daemon_: DaemonProcess, witness: Witness) -> None:
    good = encode_frame({"op": "send", "id": 1, "queue": witness.queue,
                         "messages": [{"body": b"x" * 100}]})
    cases = {
        b"\x00\x00\x00\x10" + bytes(range(200, 216)): "BAD_REQUEST",  # 16 bytes of garbage
        HEADER.pack(len(good) - 4 - 7) + good[4:-7]: "BAD_REQUEST",  # msgpack cut short
        b"\x00\x00\x00\x02\x81\xa1": "BAD_REQUEST",  # a map with half a key
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03": "TOO_LARGE",  # a TLS ClientHello
    }
    for data, code in cases.items():
        raw = Raw(daemon_.socket)
        raw.sock.sendall(data)
        frames = raw.until_closed()
        raw.close()
        assert [(f["id"], f["error"]["code"]) for f in frames] == [(None, code)], frames
        witness.send()
    # A frame cut off by the client's own close: nothing is run, nothing is answered.
    raw = Raw(daemon_.socket)
    raw.sock.sendall(good[:-7])
    raw.sock.shutdown(socket.SHUT_WR)
    assert raw.until_closed() == []
    raw.close()


def _rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def test_client_that_never_reads(daemon_: DaemonProcess, witness: Witness) -> None:
    """Requests whose answers are never read: the daemon stops reading once its outgoing
    buffer is full, so the client's writes block, and the daemon's memory stays bounded."""
    rss_before = _rss_bytes(daemon_.pid)
    raw = Raw(daemon_.socket)
    raw.sock.setblocking(False)
    writable = selectors.DefaultSelector()
    writable.register(raw.sock, selectors.EVENT_WRITE)
    request = encode_frame({"op": "ping", "id": b"\x00" * 60_000})  # echoed: 60 kB each way
    sent = 0
    while True:
        assert sent < 64 * 1024 * 1024, "the daemon kept reading a client that never reads"
        try:
            at = sent % len(request)  # a send may take part of a frame: go on from there
            sent += raw.sock.send(request[at:])
            continue
        except BlockingIOError:
            pass
        witness.send()  # the daemon serves others while this client is stuck
        if not writable.select(timeout=1.0):
            break  # the daemon has stopped reading it
    for _ in range(5):
        witness.send()
    assert not writable.select(timeout=0), "the daemon read on with its buffer full"
    writable.close()
    grown = _rss_bytes(daemon_.pid) - rss_before
    assert grown < 64 * 1024 * 1024, f"daemon RSS grew by {grown} bytes"
    section = witness.server()
    assert section["connections"] == 2
    raw.close()
    witness.until("connections", lambda n: n == 1)


def test_a_client_pipelining_without_end_is_read_no_further(daemon_: DaemonProcess,
                                                            witness: Witness) -> None:
    """Past max_inflight_requests unanswered requests the daemon reads no more of that
    client: the rest wait in its socket, not in the daemon's memory, and are read as
    answers go out."""
    name = f"inflight-{next(_names)}"
    witness.client.declare(name)
    extra = 50
    raw = Raw(daemon_.socket)
    try:
        raw.send(b"".join(encode_frame({"op": "receive", "queue": name, "wait": LIMIT * 3,
                                        "id": i}) for i in range(MAX_INFLIGHT + extra))
                 + encode_frame({"op": "ping", "id": "ping"}))
        for _ in range(extra):  # each answers one waiting receive and lets one more in
            witness.client.send(name, b"m")
        while len(raw.frames) < extra:
            raw.read()
        first = raw.frames[:extra]
        assert all(isinstance(f["id"], int) and f["id"] < MAX_INFLIGHT + extra for f in first)
        assert "ping" not in [f["id"] for f in first]  # not even read yet: 150 ahead of it
        witness.client.send(name, b"m")  # one more answer: the ping is read, and answered
        assert raw.response("ping")["result"]["node"]
    finally:
        raw.close()
