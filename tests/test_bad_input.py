"""Bad client input (SPEC section 4, guarantee 4) against a real meshqd subprocess.

Garbage, truncated, oversize and non-map frames, wrong field types, unknown ops and
oversize bodies from one raw socket get an error (or a closed connection) while a
well-behaved Client, connected before the bad input, keeps declaring, sending,
receiving and acking, and a message confirmed before the bad input is still there.
"""

from __future__ import annotations

import itertools
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import meshq
from meshq.protocol.codec import HEADER, FrameDecoder, encode_frame
from meshq.testing import DaemonProcess

LIMIT = 10.0  # upper bound on any one wait; never the thing a test waits for
CODES = {"NOT_FOUND", "PRECONDITION_FAILED", "BAD_REQUEST", "TOO_LARGE", "UNAVAILABLE",
         "UNAUTHORIZED"}
BIG_BODY = b"x" * (1024 * 1024 + 1)  # one byte above the default max_message_bytes
_names = itertools.count()


class Raw:
    """A client that writes whatever bytes it is given and decodes what comes back."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(LIMIT)
        self.sock.connect(str(path))
        self.decoder = FrameDecoder(1 << 30)
        self.frames: list[dict[str, Any]] = []
        self.closed = False

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def read(self) -> None:
        """One read (TimeoutError after LIMIT s fails the test); EOF or a reset closes."""
        try:
            data = self.sock.recv(65536)
        except ConnectionResetError:
            data = b""
        if not data:
            self.closed = True
        self.decoder.feed(data)
        self.frames += self.decoder.frames()

    def response(self, rid: Any) -> dict[str, Any]:
        """The response to request ``rid`` (responses may come out of order)."""
        while True:
            for f in self.frames:
                if f.get("id") == rid:
                    self.frames.remove(f)
                    return f
            assert not self.closed, f"connection closed without answering {rid!r}"
            self.read()

    def request(self, **fields: Any) -> dict[str, Any]:
        self.send(encode_frame(fields))
        return self.response(fields.get("id"))

    def first_reply(self) -> None:
        """Wait until a frame arrives or the daemon closes the connection."""
        while not (self.frames or self.closed):
            self.read()

    def until_closed(self) -> list[dict[str, Any]]:
        """Every frame the daemon writes before it closes the connection."""
        while not self.closed:
            self.read()
        return self.frames

    def close(self) -> None:
        self.sock.close()


def frame(payload: bytes) -> bytes:
    return HEADER.pack(len(payload)) + payload


def assert_error(response: dict[str, Any], code: str, rid: Any) -> None:
    assert response.get("id") == rid
    assert response.get("error", {}).get("code") == code, response
    assert "result" not in response


def assert_usable(raw: Raw) -> None:
    assert raw.request(op="ping", id="still-there")["result"]["node"]


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProcess]:
    with DaemonProcess(tmp_path_factory.mktemp("bad-input") / "data") as d:
        yield d


class Good:
    """A well-behaved client, connected before the bad input, with a confirmed message."""

    def __init__(self, d: DaemonProcess) -> None:
        self.client = d.client(timeout=LIMIT)
        self.queue = f"survivor-{next(_names)}-q"  # longer than any fuzzed queue name
        self.client.declare(self.queue)
        self.mid = self.client.send(self.queue, b"confirmed before")

    def still_serving(self) -> None:
        c = self.client
        c.declare(self.queue)  # idempotent
        [old] = c.receive(self.queue, max=10, wait=LIMIT)
        assert (old.id, old.body) == (self.mid, b"confirmed before")
        new = c.send(self.queue, b"after")
        [d] = c.receive(self.queue, max=10, wait=LIMIT)
        assert (d.id, d.body) == (new, b"after")
        assert c.ack(self.queue, [new]) == [new]
        assert c.nack(self.queue, [old.id]) == [old.id]  # ready again for the next check


@pytest.fixture
def good(shared: DaemonProcess) -> Iterator[Good]:
    g = Good(shared)
    yield g
    g.still_serving()  # also after the bad client went away
    g.client.close()


@pytest.fixture
def raw(shared: DaemonProcess) -> Iterator[Raw]:
    r = Raw(shared.socket)
    yield r
    r.close()


# -- bytes that are not a request: one error frame (id nil), then the connection closes
NOT_REQUESTS = {
    "http": (b"GET / HTTP/1.1\r\nHost: meshq\r\n\r\n", "TOO_LARGE"),  # "GET " as a length
    "length 4 GiB-1": (b"\xff\xff\xff\xff", "TOO_LARGE"),
    "garbage payload": (frame(b"\xc1" * 16), "BAD_REQUEST"),  # 0xc1 is never valid msgpack
    "trailing bytes": (frame(b"\x80\x80"), "BAD_REQUEST"),
    "payload is a list": (frame(b"\x92\x01\x02"), "BAD_REQUEST"),
    "payload is an int": (frame(b"\x05"), "BAD_REQUEST"),
    "int keys": (frame(b"\x81\x01\xa4ping"), "BAD_REQUEST"),
    "bytes keys": (frame(b"\x81\xc4\x02op\xa4ping"), "BAD_REQUEST"),
    "invalid utf-8": (frame(b"\x81\xa2op\xa2\xff\xfe"), "BAD_REQUEST"),
}


@pytest.mark.parametrize("warm", [False, True], ids=["first-bytes", "after-a-request"])
@pytest.mark.parametrize(("data", "code"), NOT_REQUESTS.values(), ids=NOT_REQUESTS.keys())
def test_not_a_request_gets_an_error_then_the_connection_closes(
        good: Good, raw: Raw, data: bytes, code: str, warm: bool) -> None:
    if warm:
        assert_usable(raw)
    raw.send(data)
    frames = raw.until_closed()
    assert len(frames) == 1, frames
    assert_error(frames[0], code, None)
    good.still_serving()


def test_deep_nesting_does_not_kill_the_daemon(daemon: DaemonProcess) -> None:
    with daemon.client(timeout=LIMIT) as c:
        c.declare("q")
        mid = c.send("q", b"kept")
        raw = Raw(daemon.socket)
        raw.send(frame(b"\x82\xa2op\xa4ping\xa2id" + b"\x91" * 1000 + b"\x00"))
        raw.first_reply()  # an error, an answer, or a closed connection: all fine
        raw.close()
        assert daemon.proc is not None and daemon.proc.poll() is None, daemon.log_tail()
        assert [m.id for m in c.receive("q", max=10, wait=LIMIT)] == [mid]


# -- well-formed frames with bad content: an error naming the request, the connection lives
def _q(**fields: Any) -> dict[str, Any]:
    return {"queue": "target", **fields}


WRONG = {
    "unknown op": ({"op": "frobnicate"}, "BAD_REQUEST"),
    "op not a string": ({"op": 5}, "BAD_REQUEST"),
    "no op": ({}, "BAD_REQUEST"),
    "send messages str": ({"op": "send", **_q(messages="x")}, "BAD_REQUEST"),
    "send messages empty": ({"op": "send", **_q(messages=[])}, "BAD_REQUEST"),
    "send queue int": ({"op": "send", "queue": 5, "messages": [{"body": b"a"}]},
                       "BAD_REQUEST"),
    "send body int": ({"op": "send", **_q(messages=[{"body": 1}])}, "BAD_REQUEST"),
    "send ttl str": ({"op": "send", **_q(messages=[{"body": b"a", "ttl": "soon"}])},
                     "BAD_REQUEST"),
    "send headers list": ({"op": "send", **_q(messages=[{"body": b"a", "headers": [1]}])},
                          "BAD_REQUEST"),
    "send unknown field": ({"op": "send", **_q(messages=[{"body": b"a", "prio": 1}])},
                           "BAD_REQUEST"),
    "send one bad of two": ({"op": "send", **_q(messages=[{"body": b"a"}, {"body": None}])},
                            "BAD_REQUEST"),
    "send body too large": ({"op": "send", **_q(messages=[{"body": BIG_BODY}])}, "TOO_LARGE"),
    "ack ids ints": ({"op": "ack", **_q(ids=[1, 2])}, "BAD_REQUEST"),
    "ack ids str": ({"op": "ack", **_q(ids="abc")}, "BAD_REQUEST"),
    "receive max -1": ({"op": "receive", **_q(max=-1)}, "BAD_REQUEST"),
    "receive max str": ({"op": "receive", **_q(max="10")}, "BAD_REQUEST"),
    "receive wait str": ({"op": "receive", **_q(wait="soon")}, "BAD_REQUEST"),
    "receive wait nan": ({"op": "receive", **_q(wait=float("nan"))}, "BAD_REQUEST"),
    "receive auto_ack int": ({"op": "receive", **_q(auto_ack=1)}, "BAD_REQUEST"),
    "receive visibility -1": ({"op": "receive", **_q(visibility_timeout=-1)}, "BAD_REQUEST"),
    "declare replicas str": ({"op": "declare", **_q(options={"replicas": "three"})},
                             "BAD_REQUEST"),
    "declare unknown option": ({"op": "declare", **_q(options={"colour": "red"})},
                               "BAD_REQUEST"),
    "declare options list": ({"op": "declare", **_q(options=[1])}, "BAD_REQUEST"),
    "declare name empty": ({"op": "declare", "queue": ""}, "BAD_REQUEST"),
    "declare name list": ({"op": "declare", "queue": ["q"]}, "BAD_REQUEST"),
    "declare passive str": ({"op": "declare", **_q(passive="yes")}, "BAD_REQUEST"),
    "nack delay -1": ({"op": "nack", **_q(ids=[], delay=-1)}, "BAD_REQUEST"),
    "nack delay inf": ({"op": "nack", **_q(ids=[], delay=float("inf"))}, "BAD_REQUEST"),
    "nack requeue str": ({"op": "nack", **_q(ids=[], requeue="no")}, "BAD_REQUEST"),
    "consume prefetch 0": ({"op": "consume", **_q(prefetch=0)}, "BAD_REQUEST"),
    "consume prefetch str": ({"op": "consume", **_q(prefetch="many")}, "BAD_REQUEST"),
    "extend timeout str": ({"op": "extend", **_q(ids=[], timeout="x")}, "BAD_REQUEST"),
    "purge no queue": ({"op": "purge"}, "BAD_REQUEST"),
    "delete queue none": ({"op": "delete", "queue": None}, "BAD_REQUEST"),
    "stats queue list": ({"op": "stats", "queue": [1]}, "BAD_REQUEST"),
    "cancel consumer int": ({"op": "cancel", "consumer": 5}, "NOT_FOUND"),
}


@pytest.mark.parametrize(("request_", "code"), WRONG.values(), ids=WRONG.keys())
def test_bad_request_gets_an_error_and_the_connection_lives(
        good: Good, raw: Raw, request_: dict[str, Any], code: str) -> None:
    good.client.declare("target")
    assert_usable(raw)
    assert_error(raw.request(**request_, id=41), code, 41)
    assert_usable(raw)
    good.still_serving()
    [stats] = good.client.stats("target")
    assert (stats["ready"], stats["leased"], stats["options"]["replicas"]) == (0, 0, 3)


def test_request_ids_of_any_type_are_echoed(good: Good, raw: Raw) -> None:
    for rid in (None, 0, -1, 2**64 - 1, "x", b"\x00", 1.5, [1, "a"], {"k": [None]}):
        assert_error(raw.request(op="no-such-op", id=rid), "BAD_REQUEST", rid)
    assert_usable(raw)
    good.still_serving()


def test_body_too_large_from_the_client_library(good: Good) -> None:
    with pytest.raises(meshq.TooLarge):
        good.client.send(good.queue, BIG_BODY)
    good.still_serving()


def test_truncated_frame_then_close(shared: DaemonProcess, good: Good, raw: Raw) -> None:
    whole = encode_frame({"op": "send", "id": 1, **_q(messages=[{"body": b"cut"}])})
    raw.send(whole[: len(whole) // 2])
    raw.close()
    good.still_serving()
    other = Raw(shared.socket)
    assert_usable(other)
    other.close()


def test_half_a_frame_and_stall(good: Good, raw: Raw) -> None:
    whole = encode_frame({"op": "ping", "id": "late"})
    raw.send(whole[:5])
    good.still_serving()  # while the stalled client holds its half frame
    raw.send(whole[5:])
    assert raw.response("late")["result"]["node"]


# -- fuzz: arbitrary bytes, and frames of random ops with random fields, on fresh connections
values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats()
    | st.text(max_size=10) | st.binary(max_size=10),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner,
                                                                max_size=3),
    max_leaves=8,
)
fuzz_queue = st.sampled_from(["fz", "fz-dlq"]) | values
fuzz_message = st.fixed_dictionaries({}, optional={
    "body": st.binary(max_size=20) | values, "headers": values, "ttl": values,
    "delay": values, "dedup_id": values})
requests = st.fixed_dictionaries(
    {"op": st.sampled_from(["ping", "declare", "delete", "purge", "send", "receive", "consume",
                            "cancel", "ack", "nack", "extend", "stats", "status"]) | values},
    optional={
        "id": values, "queue": fuzz_queue, "messages": st.lists(fuzz_message, max_size=3) | values,
        "ids": st.lists(st.text(max_size=30), max_size=3) | values,
        "options": st.fixed_dictionaries({}, optional={
            k: values for k in ("replicas", "message_ttl", "visibility_timeout",
                                "max_deliveries", "dead_letter_queue", "max_length",
                                "ordering", "expires", "dead_letter_exchange",
                                "dead_letter_routing_key")}) | values,
        "max": values, "wait": st.floats(0, 0.05) | values, "prefetch": values,
        "delay": values, "requeue": values, "timeout": values, "consumer": values,
        "passive": values, "auto_ack": values, "visibility_timeout": values,
    },
)
streams = st.one_of(
    st.binary(max_size=300),
    st.lists(requests.map(encode_frame), min_size=1, max_size=4).map(b"".join),
    st.tuples(requests.map(encode_frame), st.binary(max_size=40)).map(b"".join),
    st.tuples(requests.map(encode_frame), st.integers(1, 40)).map(lambda t: t[0][: -t[1]]),
)


@pytest.fixture(scope="module")
def survivor(shared: DaemonProcess) -> Iterator[Good]:
    g = Good(shared)
    yield g
    g.client.close()


@settings(max_examples=50, deadline=None)
@given(data=streams)
def test_fuzzed_input_never_stops_the_daemon(shared: DaemonProcess, survivor: Good,
                                             data: bytes) -> None:
    raw = Raw(shared.socket)
    raw.send(data)
    raw.sock.shutdown(socket.SHUT_WR)  # the daemon sees EOF and closes its side
    try:
        frames = raw.until_closed()
    finally:
        raw.close()
    for f in frames:
        assert set(f) in ({"id", "result"}, {"id", "error"}), f
        if "error" in f:
            assert f["error"]["code"] in CODES, f  # a clear error, never an internal one
    survivor.still_serving()
