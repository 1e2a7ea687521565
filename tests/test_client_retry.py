"""Failover costs latency, not errors: the clients' dedup ids, retries, receipts,
reconnects and final cancels, against a scripted fake daemon.

The blocking Client talks to the fake over a real Unix socket served from a thread; the
AsyncClient talks to the same fake served by a trio task, over in-memory streams (its
``connect`` hook) in virtual time, or over a real Unix socket. The fake records every
request; tests wait for what it saw (a condition or a trio event), never for time.
"""

from __future__ import annotations

import itertools
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

import meshq
from meshq.client._common import Backoff, DedupIds, Delivery, Receipts, settled
from meshq.protocol.codec import FrameDecoder, encode_frame

GONE = "no such message (already acked, expired or deleted)"


def delivery(mid: str, lease: int, queue: str = "q", left: float | None = None,
             ) -> dict[str, Any]:
    d = {"id": mid, "queue": queue, "body": mid.encode(), "headers": {}, "hlc": 1,
         "delivery_count": 1, "redelivered": False, "receipt": f"{mid}~{lease:x}"}
    if left is not None:
        d["lease_left"] = left
    return d


class Script:
    """What the fake daemon answers: a toy broker, and the faults a test sets up.

    ``faults[op]`` lists what happens to the next requests of ``op``: "unavailable" and
    "timeout" answer that error; "drop" closes the connection without doing anything;
    "lose" does the op, then closes the connection without answering.
    """

    def __init__(self) -> None:
        self.requests: list[tuple[int, dict[str, Any]]] = []  # (connection, request)
        self.faults: dict[str, list[str]] = {}
        self.ids: dict[str, str] = {}  # dedup id -> message id
        self.ready: list[str] = []  # message ids for receive and new consumers
        self.leases: dict[str, str] = {}  # message id -> its receipt
        self.acked: set[str] = set()
        self._leases = itertools.count(1)
        self._tags = itertools.count(1)

    def of(self, op: str) -> list[tuple[int, dict[str, Any]]]:
        return [(n, r) for n, r in self.requests if r["op"] == op]

    def answer(self, conn: int, req: dict[str, Any]) -> tuple[list[dict[str, Any]], bool]:
        """The frames to write for ``req``, and whether to close the connection after."""
        self.requests.append((conn, req))
        op, rid = req["op"], req["id"]
        pending = self.faults.get(op)
        fault = pending.pop(0) if pending else None
        if fault == "drop":
            return [], True
        if fault in ("unavailable", "timeout"):
            code = fault.upper()
            return [{"id": rid, "error": {"code": code, "message": f"scripted {code}"}}], False
        result, pushes = self.apply(conn, req)
        if fault == "lose":
            return [], True
        return [{"id": rid, "result": result}, *pushes], False

    def lease(self, mid: str) -> dict[str, Any]:
        d = delivery(mid, next(self._leases))
        self.leases[mid] = d["receipt"]
        return d

    def apply(self, conn: int, req: dict[str, Any]) -> tuple[dict[str, Any], list[dict]]:
        op = req["op"]
        if op == "send":
            ids = []
            for m in req["messages"]:
                key = m.get("dedup_id") or f"no-dedup-{len(self.ids)}"
                ids.append(self.ids.setdefault(key, f"m{len(self.ids) + 1}"))
            return {"ids": ids}, []
        if op == "receive":
            taken, self.ready = self.ready[: req["max"]], self.ready[req["max"]:]
            return {"messages": [self.lease(mid) for mid in taken]}, []
        if op == "consume":
            tag = f"t{conn}-{next(self._tags)}"
            taken, self.ready = self.ready[: req["prefetch"]], self.ready[req["prefetch"]:]
            pushes = [{"push": "deliver", "consumer": tag,
                       "messages": [self.lease(mid) for mid in taken]}] if taken else []
            return {"consumer": tag}, pushes
        if op in ("ack", "nack", "extend"):
            done, failed = [], {}
            for item in req["ids"]:
                mid = item.partition("~")[0]
                if mid in self.acked or (mid not in self.leases and "~" in item):
                    failed[item] = GONE
                elif "~" not in item:
                    failed[item] = "not leased to this connection (lease expired or released)"
                elif self.leases[mid] != item:
                    failed[item] = "lease expired or released (another lease holds it now)"
                else:
                    done.append(mid)
                    if op == "ack":
                        self.acked.add(mid)
                    if op != "extend":
                        del self.leases[mid]
            return {f"{op}ed" if op != "extend" else "extended": done, "failed": failed}, []
        if op == "stats":
            return {"queues": []}, []
        if op == "ping":
            return {"version": "fake", "node": "fake"}, []
        return {}, []


# -- the fake over a real Unix socket, from a thread (blocking client) ----------------


class ThreadedFake:
    def __init__(self, path: Path, script: Script) -> None:
        self.path, self.script = path, script
        self.cond = threading.Condition()
        self.conns: dict[int, socket.socket] = {}
        self.closed: set[int] = set()
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(str(path))
        self.listener.listen()
        self.threads = [threading.Thread(target=self._accept, daemon=True)]
        self.threads[0].start()

    def _accept(self) -> None:
        for n in itertools.count():
            try:
                sock, _ = self.listener.accept()
            except OSError:
                return
            with self.cond:
                self.conns[n] = sock
                self.cond.notify_all()
            t = threading.Thread(target=self._serve, args=(n, sock), daemon=True)
            self.threads.append(t)
            t.start()

    def _serve(self, n: int, sock: socket.socket) -> None:
        decoder = FrameDecoder()
        try:
            while data := sock.recv(65536):
                decoder.feed(data)
                for frame in decoder.frames():
                    with self.cond:
                        out, close = self.script.answer(n, frame)
                        for f in out:
                            sock.sendall(encode_frame(f))
                        if close:
                            self._close(n)
                        self.cond.notify_all()
                    if close:
                        return
        except OSError:
            pass
        with self.cond:
            self._close(n)
            self.cond.notify_all()

    def _close(self, n: int) -> None:
        if n not in self.closed:
            self.closed.add(n)
            try:
                self.conns[n].shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self.conns[n].close()

    def push(self, n: int, frame: dict[str, Any]) -> None:
        with self.cond:
            self.conns[n].sendall(encode_frame(frame))

    def drop(self, n: int) -> None:
        with self.cond:
            self._close(n)
            self.cond.notify_all()

    def wait_for(self, predicate: Callable[[], Any], timeout: float = 10.0) -> None:
        """Block until ``predicate()`` holds; ``timeout`` is only an upper bound."""
        with self.cond:
            assert self.cond.wait_for(predicate, timeout), "the fake daemon never saw it"

    def close(self) -> None:
        try:
            self.listener.shutdown(socket.SHUT_RDWR)  # wakes the accepting thread
        except OSError:
            pass
        self.listener.close()
        with self.cond:
            for n in list(self.conns):
                self._close(n)


@pytest.fixture
def sock_path() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="meshq-"))  # AF_UNIX paths are short
    yield d / "fake.sock"
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def script() -> Script:
    return Script()


@pytest.fixture
def fake(sock_path: Path, script: Script) -> Iterator[ThreadedFake]:
    f = ThreadedFake(sock_path, script)
    yield f
    f.close()


def client(fake: ThreadedFake, **kw: Any) -> meshq.Client:
    kw.setdefault("timeout", 10)
    return meshq.Client(fake.path, **kw)


def dedup_ids(reqs: list[tuple[int, dict[str, Any]]]) -> list[list[str]]:
    return [[m.get("dedup_id") for m in r["messages"]] for _, r in reqs]


# -- the pure parts ---------------------------------------------------------------------


@pytest.mark.parametrize("budget,failures,delays", [
    (0.0, [0.0], [None]),
    (1.0, [0.0, 0.02, 0.06, 0.14, 0.30, 0.62, 1.0], [0.02, 0.04, 0.08, 0.16, 0.32, 0.38, None]),
    (5.0, [0.0, 1.0, 2.0, 3.0, 4.9], [0.02, 0.04, 0.08, 0.16, 0.1]),
    (10.0, [0.0] + [0.1] * 7, [0.02, 0.04, 0.08, 0.16, 0.32, 0.5, 0.5, 0.5]),
])
def test_backoff_doubles_from_20ms_to_500ms_within_the_budget(budget, failures, delays):
    b = Backoff(budget)
    got = [b.next_delay(now) for now in failures]
    assert got == [None if d is None else pytest.approx(d) for d in delays]


def test_receipts_latest_wins_forget_and_bound():
    book = Receipts(limit=3)
    book.learn(Delivery("a", "q", b"", receipt="a~1"))
    book.learn(Delivery("a", "q", b"", receipt="a~2"))  # redelivered: the latest wins
    assert book.items(["a", "b", "b~9"]) == ["a~2", "b", "b~9"]
    assert book.item(Delivery("a", "q", b"", receipt="a~1")) == "a~1"  # its own receipt
    assert book.item(Delivery("a", "q", b"")) == "a~2"  # an older daemon's delivery
    book.forget(["a~1"])  # not the receipt it holds
    assert book.item("a") == "a~2"
    book.forget(["a~2"])
    assert book.item("a") == "a" and len(book) == 0
    for mid in "cdef":
        book.learn(Delivery(mid, "q", b"", receipt=f"{mid}~1"))
    assert len(book) == 3 and book.item("c") == "c"  # the oldest went first
    with pytest.raises(TypeError):
        book.items("abc")


def test_settled_counts_gone_messages_as_done_only_after_a_lost_connection():
    result = {"acked": ["a"], "failed": {"b~1": GONE}}
    with pytest.raises(meshq.PreconditionFailed, match="b: no such message"):
        settled(result, "ack")
    assert settled(result, "ack", after_loss=True) == ["a", "b"]
    other = {"nacked": [], "failed": {"c~2": "lease expired or released"}}
    with pytest.raises(meshq.PreconditionFailed):
        settled(other, "nack")
    # after a lost connection the first attempt may have settled it: outcome unknown
    with pytest.raises(meshq.Timeout, match="c: lease expired"):
        settled(other, "nack", after_loss=True)
    assert settled({"extended": ["d"], "failed": {}}, "extend") == ["d"]


def test_dedup_ids_are_unique_per_client_and_keep_the_callers():
    a, b = DedupIds(), DedupIds()
    ids = [a.fill({})["dedup_id"] for _ in range(3)] + [b.fill({})["dedup_id"]]
    assert len(set(ids)) == 4 and a.prefix != b.prefix
    assert a.fill({"dedup_id": "mine"})["dedup_id"] == "mine"


# -- the blocking client ----------------------------------------------------------------


def test_the_budget_is_retry_for_else_the_timeout_else_30s(fake):
    with client(fake, timeout=7) as c, meshq.Client(fake.path) as d, \
            client(fake, retry_for=0) as e:
        assert (c.retry_for, d.retry_for, e.retry_for) == (7, 30, 0)
    with pytest.raises(ValueError):
        meshq.Client(fake.path, retry_for=-1)


def test_every_message_carries_a_dedup_id_and_a_callers_own_is_kept(fake, script):
    with client(fake) as c, client(fake) as other:
        c.send("q", b"a")
        c.send("q", b"b", dedup_id="mine")
        c.send_batch("q", [b"c", {"body": b"d", "dedup_id": "also-mine"}, {"body": b"e"}])
        assert len(list(c.send_stream("q", [b"f", b"g"]))) == 2
        other.send("q", b"h")
    sent = [m for _, r in script.of("send") for m in r["messages"]]
    assert len(sent) == 8 and all(m.get("dedup_id") for m in sent)
    assert sent[1]["dedup_id"] == "mine" and sent[3]["dedup_id"] == "also-mine"
    assert len({m["dedup_id"] for m in sent}) == 8


def test_a_send_refused_unavailable_is_repeated_with_the_same_dedup_ids(fake, script):
    script.faults["send"] = ["unavailable", "unavailable"]
    with client(fake) as c:
        ids = c.send_batch("q", [b"a", b"b"])
    sends = script.of("send")
    assert len(sends) == 3 and ids == ["m1", "m2"]
    assert dedup_ids(sends)[0] == dedup_ids(sends)[1] == dedup_ids(sends)[2]
    assert {n for n, _ in sends} == {0}  # the same connection


@pytest.mark.parametrize("fault", ["lose", "drop", "timeout"])
def test_a_send_with_an_unknown_outcome_is_repeated_and_creates_one_message(fake, script,
                                                                            fault):
    script.faults["send"] = [fault]
    with client(fake) as c:
        mid = c.send("q", b"x")
        assert c.send("q", b"y") == "m2"
    sends = script.of("send")
    assert mid == "m1" and len(script.ids) == 2
    assert dedup_ids(sends)[0] == dedup_ids(sends)[1]
    if fault != "timeout":  # the connection broke: the repeat went on a new one
        assert [n for n, _ in sends] == [0, 1, 1]


def test_send_stream_sends_the_unconfirmed_again_in_input_order(fake, script):
    script.faults["send"] = ["", "", "lose"]
    with client(fake) as c:
        ids = list(c.send_stream("q", [b"a", b"b", b"c", b"d", b"e"]))
    assert ids == ["m1", "m2", "m3", "m4", "m5"]  # one message each, in order
    again = [r["messages"][0]["body"] for n, r in script.of("send") if n == 1]
    assert again == sorted(again) and again[-1] == b"e" and b"c" in again


def test_the_budget_ends_with_the_last_error(fake, script):
    script.faults["send"] = ["unavailable"] * 1000
    with client(fake, retry_for=0.2) as c, pytest.raises(meshq.Unavailable, match="scripted"):
        c.send("q", b"x")
    assert len(script.of("send")) >= 3 and len(set(map(tuple, dedup_ids(script.of("send"))))) == 1
    script.faults["send"] = ["lose"] * 1000
    with client(fake, retry_for=0.2) as c, pytest.raises(meshq.Timeout):
        c.send("q", b"x")


def test_retry_for_zero_raises_at_once(fake, script):
    script.faults["send"] = ["unavailable"]
    with client(fake, retry_for=0) as c:
        with pytest.raises(meshq.Unavailable):
            c.send("q", b"x")
        assert len(script.of("send")) == 1
        script.faults["send"] = ["lose"]
        with pytest.raises(meshq.Timeout):
            c.send("q", b"x")
        assert len(script.of("send")) == 2


def test_only_sends_and_settles_are_repeated_after_an_unknown_outcome(fake, script):
    script.faults["purge"] = ["unavailable", "lose"]
    with client(fake) as c:
        with pytest.raises(meshq.Timeout):
            c.purge("q")  # repeated after UNAVAILABLE, not after the lost connection
        assert [n for n, _ in script.of("purge")] == [0, 0]
        assert c.stats() == []  # the next request connects again


def test_ack_sends_the_receipts_learnt_from_deliveries(fake, script):
    script.ready = ["m1", "m2", "m3", "m4"]
    with client(fake) as c:
        d1, d2, d3, d4 = c.receive("q", max=4)
        assert d1.receipt == script.leases["m1"] and d1.id == "m1"
        assert c.ack("q", [d1.id, d2]) == ["m1", "m2"]
        assert script.of("ack")[-1][1]["ids"] == [d1.receipt, d2.receipt]
        assert c.extend("q", ["m3"], 30) == ["m3"]
        assert c.nack("q", ["m3"]) == ["m3"]  # extend keeps the receipt, nack forgets it
        assert script.of("extend")[-1][1]["ids"] == script.of("nack")[-1][1]["ids"] == [
            d3.receipt]
        assert c.reject("q", [d4.receipt]) == ["m4"]
        with pytest.raises(meshq.PreconditionFailed, match="m1: no such message"):
            c.ack("q", ["m1"])  # forgotten once acked: the bare id goes
        assert script.of("ack")[-1][1]["ids"] == ["m1"]


def test_an_ack_repeated_after_a_lost_connection_counts_a_gone_message_as_acked(fake, script):
    script.ready = ["m1", "m2"]
    with client(fake) as c:
        d1, d2 = c.receive("q", max=2)
        script.faults["ack"] = ["unavailable", "lose"]
        assert c.ack("q", [d1, d2]) == ["m1", "m2"]  # acked by the attempt that was lost
        acks = script.of("ack")
        assert [n for n, _ in acks] == [0, 0, 1]
        assert acks[-1][1]["ids"] == [d1.receipt, d2.receipt]
        assert script.acked == {"m1", "m2"}


def test_a_final_cancel_raises_consumer_cancelled(fake, script):
    with client(fake) as c:
        sub = c.consume("q", prefetch=5)
        assert sub.get(timeout=0) is None  # None means a timeout, nothing else
        fake.push(0, {"push": "deliver", "consumer": sub.tag, "messages": [delivery("a", 1)]})
        fake.push(0, {"push": "cancel", "consumer": sub.tag, "reason": "queue deleted",
                      "final": True})
        assert sub.get(timeout=10).id == "a"
        with pytest.raises(meshq.ConsumerCancelled, match="queue deleted") as err:
            sub.get(timeout=10)
        assert err.value.code == "CANCELLED" and isinstance(err.value, meshq.MeshqError)
        with pytest.raises(meshq.ConsumerCancelled):
            next(iter(sub))
        sub.cancel()  # ended by the daemon: nothing to cancel
        other = c.consume("q")
        fake.push(0, {"push": "cancel", "consumer": other.tag, "reason": "gone"})  # old style
        with pytest.raises(meshq.ConsumerCancelled, match="gone"):
            for d in other:
                pytest.fail(f"delivery after the cancel: {d}")
        assert c.ping()
    assert script.of("cancel") == []


def test_a_subscription_skips_deliveries_whose_lease_ended_unread(fake, script):
    """A delivery that waited in the client past its lease may be another consumer's by
    now (its lease ended, the daemon gave it out again): get() never returns it."""
    with client(fake) as c, c.consume("q", prefetch=5) as sub:
        fake.push(0, {"push": "deliver", "consumer": sub.tag, "messages": [
            delivery("late", 1, left=0.0), delivery("fresh", 2, left=30.0),
            delivery("old-daemon", 3)]})
        fresh = sub.get(timeout=10)
        assert fresh.id == "fresh"
        assert 0 < fresh.lease_deadline - time.monotonic() <= 30.0
        unstated = sub.get(timeout=10)  # a daemon that does not say: never skipped
        assert (unstated.id, unstated.lease_deadline) == ("old-daemon", None)
        assert sub.get(timeout=0) is None


def test_a_lost_connection_subscribes_again_under_a_new_tag(fake, script):
    script.ready = ["m1"]
    with client(fake) as c, c.consume("q", prefetch=7) as sub:
        first = sub.get(timeout=10)
        assert (first.id, first.consumer, sub.tag) == ("m1", "t0-1", "t0-1")
        script.ready = ["m2"]
        fake.drop(0)  # the daemon restarted
        second = sub.get(timeout=10)
        assert (second.id, second.consumer, sub.tag) == ("m2", "t1-2", "t1-2")
        assert [(n, r["queue"], r["prefetch"]) for n, r in script.of("consume")] == [
            (0, "q", 7), (1, "q", 7)]
        assert c.ack("q", [first, second]) == ["m1", "m2"]  # by receipt, on the new one
        n, req = script.of("ack")[-1]
        assert (n, req["ids"]) == (1, [first.receipt, second.receipt])
        fake.push(1, {"push": "deliver", "consumer": "t1-2", "messages": [delivery("m3", 9)]})
        assert sub.get(timeout=10).id == "m3"
    assert [(n, r["consumer"]) for n, r in script.of("cancel")] == [(1, "t1-2")]


def test_a_subscription_waits_through_a_restart(fake, script, sock_path):
    """The socket is gone for a while (connect fails): get() keeps trying, then the new
    daemon's deliveries arrive."""
    with client(fake, retry_for=30) as c:
        sub = c.consume("q")
        fake.close()
        sock_path.unlink()
        assert sub.get(timeout=0.1) is None  # get's own timeout, while reconnecting
        script.ready = ["m1"]
        again = ThreadedFake(sock_path, script)
        try:
            assert sub.get(timeout=10).id == "m1"
        finally:
            again.close()


def test_the_next_request_connects_again(fake, script):
    with client(fake, retry_for=0) as c:
        assert c.ping()
        fake.drop(0)
        fake.wait_for(lambda: 0 in fake.closed)
        assert c.stats() == []  # written on a new connection, not retried
    assert [n for n, r in script.requests] == [0, 1]


# -- the trio client --------------------------------------------------------------------


class TrioFake:
    """The same fake, served by trio tasks over any trio Stream."""

    def __init__(self, script: Script, nursery: trio.Nursery) -> None:
        self.script, self.nursery = script, nursery
        self.streams: dict[int, trio.abc.Stream] = {}
        self.locks: dict[int, trio.Lock] = {}
        self.count = itertools.count()
        self.refuse = False
        self._changed = trio.Event()

    async def connect(self) -> trio.abc.Stream:
        if self.refuse:
            raise ConnectionRefusedError("the fake daemon is down")
        mine, theirs = trio.testing.memory_stream_pair()
        self.nursery.start_soon(self.serve, theirs)
        await trio.lowlevel.checkpoint()
        return mine

    def _pulse(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def wait_for(self, predicate: Callable[[], Any]) -> None:
        while not predicate():
            await self._changed.wait()

    async def serve(self, stream: trio.abc.Stream) -> None:
        n = next(self.count)
        self.streams[n], self.locks[n] = stream, trio.Lock()
        self._pulse()
        decoder = FrameDecoder()
        try:
            while data := await stream.receive_some(65536):
                decoder.feed(data)
                for frame in decoder.frames():
                    out, close = self.script.answer(n, frame)
                    self._pulse()
                    for f in out:
                        await self.push(n, f)
                    if close:
                        await stream.aclose()
                        return
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    async def push(self, n: int, frame: dict[str, Any]) -> None:
        async with self.locks[n]:
            await self.streams[n].send_all(encode_frame(frame))

    async def drop(self, n: int) -> None:
        await self.streams[n].aclose()


@pytest.fixture
async def tfake(script: Script) -> Any:
    async with trio.open_nursery() as nursery:
        yield TrioFake(script, nursery)
        nursery.cancel_scope.cancel()


def aclient(tfake: TrioFake, **kw: Any) -> meshq.AsyncClient:
    return meshq.AsyncClient(connect=tfake.connect, **kw)


async def test_async_sends_carry_dedup_ids_and_are_repeated(tfake, script, autojump_clock):
    script.faults["send"] = ["unavailable", "timeout", "lose"]
    async with aclient(tfake) as c:
        t0 = trio.current_time()
        ids = await c.send_batch("q", [b"a", {"body": b"b", "dedup_id": "mine"}])
        assert await c.send("q", b"c") == "m3"
        took = trio.current_time() - t0
    sends = script.of("send")
    assert ids == ["m1", "m2"] and [n for n, _ in sends] == [0, 0, 0, 1, 1]
    assert len({tuple(ids) for ids in dedup_ids(sends[:4])}) == 1
    assert dedup_ids(sends)[0][1] == "mine" and all(dedup_ids(sends)[4])
    assert took == pytest.approx(0.02 + 0.04 + 0.08)  # the backoff, in virtual time


async def test_async_receive_repeats_with_the_rest_of_its_wait(tfake, script,
                                                              autojump_clock):
    script.faults["receive"] = ["unavailable"] * 3
    async with aclient(tfake) as c:
        assert c.retry_for == 30
        assert await c.receive("q", wait=1.0) == []
    waits = [r["wait"] for _, r in script.of("receive")]
    assert waits == pytest.approx([1.0, 0.98, 0.94, 0.86])


async def test_async_budget_ends_with_the_last_error(tfake, script, autojump_clock):
    script.faults["send"] = ["unavailable"] * 1000
    async with aclient(tfake, retry_for=5) as c:
        t0 = trio.current_time()
        with pytest.raises(meshq.Unavailable, match="scripted"):
            await c.send("q", b"x")
        assert trio.current_time() - t0 == pytest.approx(5.0)
    async with aclient(tfake, retry_for=0) as c:
        before = len(script.of("send"))
        with pytest.raises(meshq.Unavailable):
            await c.send("q", b"x")
        assert len(script.of("send")) == before + 1
        script.faults["send"] = ["lose"]
        with pytest.raises(meshq.Timeout):
            await c.send("q", b"x")


async def test_async_unreachable_daemon_is_unavailable_after_the_budget(tfake, script,
                                                                       autojump_clock):
    async with aclient(tfake, retry_for=3) as c:
        assert await c.ping()
        tfake.refuse = True
        await tfake.drop(0)
        t0 = trio.current_time()
        with pytest.raises(meshq.Unavailable, match="the fake daemon is down"):
            await c.send("q", b"x")
        assert trio.current_time() - t0 == pytest.approx(3.0)
        tfake.refuse = False
        assert await c.send("q", b"x") == "m1"  # the next request connects again
    tfake.refuse = True
    with pytest.raises(meshq.Unavailable):
        async with aclient(tfake):
            pass


async def test_async_ack_by_receipt_and_after_a_lost_connection(tfake, script, autojump_clock):
    script.ready = ["m1", "m2", "m3"]
    async with aclient(tfake) as c:
        d1, d2, d3 = await c.receive("q", max=3)
        assert await c.ack("q", ["m1"]) == ["m1"]
        assert script.of("ack")[-1][1]["ids"] == [d1.receipt]
        assert await c.extend("q", [d2], 10) == ["m2"]
        script.faults["ack"] = ["lose"]
        assert await c.ack("q", [d2.id, d3.receipt]) == ["m2", "m3"]
        assert [n for n, _ in script.of("ack")] == [0, 0, 1]
        assert script.of("ack")[-1][1]["ids"] == [d2.receipt, d3.receipt]


async def test_async_subscription_skips_deliveries_whose_lease_ended_unread(
        tfake, script, autojump_clock):
    async with aclient(tfake) as c, c.consume("q", prefetch=5) as sub:
        await tfake.push(0, {"push": "deliver", "consumer": sub.tag, "messages": [
            delivery("m1", 1, left=5.0), delivery("m2", 2, left=5.0),
            delivery("m3", 3, left=60.0)]})
        arrived = trio.current_time()
        first = await anext(sub)
        assert first.id == "m1" and first.lease_deadline == pytest.approx(arrived + 5.0)
        await trio.sleep(10.0)  # the work outlasts the lease of m2, still unread
        third = await anext(sub)
        assert third.id == "m3" and third.lease_deadline == pytest.approx(arrived + 60.0)


async def test_async_final_cancel_ends_iteration_with_consumer_cancelled(tfake, script,
                                                                        autojump_clock):
    script.ready = ["m1"]
    async with aclient(tfake) as c:
        with pytest.raises(meshq.ConsumerCancelled, match="queue deleted"):
            async with c.consume("q") as sub:
                seen = []
                async for d in sub:
                    seen.append(d.id)
                    await tfake.push(0, {"push": "cancel", "consumer": sub.tag,
                                         "reason": "queue deleted", "final": True})
        assert seen == ["m1"]
        async with c.consume("q") as old_style:
            await tfake.push(0, {"push": "cancel", "consumer": old_style.tag,
                                 "reason": "gone"})
            with pytest.raises(meshq.ConsumerCancelled, match="gone"):
                await anext(old_style)
        assert script.of("cancel") == []  # nothing left to cancel


async def test_async_lost_connection_subscribes_again_over_a_unix_socket(script, sock_path):
    async def serve(fake: TrioFake, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        listen = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        await listen.bind(str(sock_path))
        listen.listen()
        await trio.serve_listeners(fake.serve, [trio.SocketListener(listen)],
                                   task_status=task_status)

    script.ready = ["m1"]
    with trio.fail_after(10):  # an upper bound only
        async with trio.open_nursery() as nursery:
            fake = TrioFake(script, nursery)
            await nursery.start(serve, fake)
            async with meshq.AsyncClient(sock_path) as c:
                async with c.consume("q", prefetch=3) as sub:
                    first = await anext(sub)
                    assert (first.id, first.consumer) == ("m1", "t0-1")
                    script.ready = ["m2"]
                    await fake.drop(0)  # no request from us: it subscribes again itself
                    second = await anext(sub)
                    assert (second.id, second.consumer, sub.tag) == ("m2", "t1-2", "t1-2")
                    assert [(n, r["prefetch"]) for n, r in script.of("consume")] == [
                        (0, 3), (1, 3)]
                    assert await c.ack("q", [first, second]) == ["m1", "m2"]
                    assert script.of("ack")[-1][0] == 1
                assert await c.ping()  # answered after the cancel went out
            await fake.wait_for(lambda: script.of("cancel"))
            assert [(n, r["consumer"]) for n, r in script.of("cancel")] == [(1, "t1-2")]
            nursery.cancel_scope.cancel()


async def test_async_subscription_ends_with_the_error_once_the_budget_is_spent(
        tfake, script, autojump_clock):
    async with aclient(tfake, retry_for=2) as c, c.consume("q") as sub:
        tfake.refuse = True
        await tfake.drop(0)
        t0 = trio.current_time()
        with pytest.raises(meshq.Unavailable, match="down"):
            await anext(sub)
        assert trio.current_time() - t0 == pytest.approx(2.0)
