"""The backlog on disk against a real meshqd (meshq.broker.backlog): a queue deeper than a
partition keeps in memory survives a SIGKILL, comes back counted, and is consumed whole,
once each, in send order; a purge empties it on disk too; on three meshqd, the dispatcher
of a replicated queue pages its backlog as well. (Memory and restart time are measured by
tools/bench_backlog.py, not here.)"""

from __future__ import annotations

from pathlib import Path

from test_membership import all_alive, eventually
from test_replication import copy_here, queue_with_primary, restarted, status_of

from meshq.broker.backlog import HOT_DELAYED, HOT_READY
from meshq.testing import DaemonProcess

DEPTH = 2 * HOT_READY + 500
assert HOT_DELAYED == HOT_READY  # (DEPTH is past what memory keeps of either)


def test_a_deep_queue_survives_a_crash_and_comes_back_whole_in_order(tmp_path: Path) -> None:
    d = DaemonProcess(tmp_path / "d").start()
    try:
        with d.client() as c:
            c.declare("deep")
            ids: list[str] = []
            for start in range(0, DEPTH, 500):
                ids += c.send_batch("deep", [f"m{i}".encode()
                                             for i in range(start, min(DEPTH, start + 500))])
        d.kill()  # SIGKILL: every send above was confirmed
        d.start()
        with d.client() as c:
            assert c.stats("deep")[0]["ready"] == DEPTH
            (entry,) = [q for q in c.status()["queues"] if q["name"] == "deep"]
            assert entry["copy_here"]["ready_on_disk"] == DEPTH - HOT_READY  # read: the head
            got: list[str] = []
            while len(got) < DEPTH:  # pulls of 500, each acked: paging keeps up
                batch = c.receive("deep", max=500, wait=5.0)
                assert batch, f"nothing more after {len(got)}"
                c.ack("deep", batch)
                got += [m.id for m in batch]
            assert got == ids  # each once, in send order, through every page
            assert c.stats("deep")[0]["ready"] == 0
            assert c.receive("deep", max=10) == []
    finally:
        d.kill()


def test_a_purge_empties_a_deep_queue_on_disk_too(tmp_path: Path) -> None:
    d = DaemonProcess(tmp_path / "d").start()
    try:
        with d.client() as c:
            c.declare("deep")
            for start in range(0, DEPTH, 500):
                c.send_batch("deep", [b"x"] * min(500, DEPTH - start))
            assert c.purge("deep") == DEPTH
        d.stop()
        d.start()
        with d.client() as c:
            assert c.stats("deep")[0]["ready"] == 0
            fresh = c.send_batch("deep", [b"after"])
            assert [m.id for m in c.receive("deep", max=10)] == fresh
    finally:
        d.kill()


def test_delays_past_what_memory_keeps_stay_on_disk_and_still_come(tmp_path: Path) -> None:
    """Past twice HOT_DELAYED delayed messages, those due last stay in SQLite only: counted
    delayed, still there after a SIGKILL (a restart reads the first HOT_READY due), gone
    with a purge; and a flood of them due at once is read back and delivered whole."""
    d = DaemonProcess(tmp_path / "d").start()
    try:
        with d.client() as c:
            c.declare("later")
            for start in range(0, DEPTH, 500):
                c.send_batch("later", [{"body": b"x", "delay": 3600.0}]
                             * min(500, DEPTH - start))
            here = copy_here(d, "later")
            assert here["delayed"] == DEPTH
            assert DEPTH - 2 * HOT_DELAYED <= here["delayed_on_disk"] <= DEPTH - HOT_DELAYED
        d.kill()
        d.start()
        with d.client() as c:
            here = copy_here(d, "later")
            assert here["delayed"] == DEPTH and here["delayed_on_disk"] == DEPTH - HOT_READY
            assert c.purge("later") == DEPTH
            ids: list[str] = []
            for start in range(0, DEPTH, 500):
                ids += c.send_batch("later", [{"body": f"m{i}".encode(), "delay": 1.0}
                                              for i in range(start, min(DEPTH, start + 500))])
            assert copy_here(d, "later")["delayed_on_disk"] > 0
            got: list[str] = []
            while len(got) < DEPTH:
                batch = c.receive("later", max=500, wait=10.0)
                assert batch, f"nothing more after {len(got)}"
                c.ack("later", batch)
                got += [m.id for m in batch]
            assert sorted(got) == sorted(ids)
            assert c.stats("later")[0]["delayed"] == 0
        d.stop()
        d.start()
        with d.client() as c:
            assert c.stats("later")[0]["delayed"] == 0 and c.stats("later")[0]["ready"] == 0
    finally:
        d.kill()


def test_the_dispatcher_of_a_replicated_queue_pages_its_deep_backlog(
        cluster: dict[str, DaemonProcess]) -> None:
    """Three meshqd, a queue of three copies dispatched by a: past HOT_READY its READY
    messages stay on disk only, on a and on the holders that do not dispatch (b, c), also
    after a SIGKILL and restart of a (which then dispatches again, its copy read back as
    the head and a count, its digest counting the rest from disk); every message is then
    received once, the memory of every copy staying bounded as a pages and the others
    read in what a's leases and acks name."""
    name = queue_with_primary("a", "deep")
    a = cluster["a"]
    with cluster["b"].client() as b:
        b.declare(name, partitions=1, replicas=3)
        ids: list[str] = []
        for start in range(0, DEPTH, 500):
            ids += b.send_batch(name, [f"m{i}".encode()
                                       for i in range(start, min(DEPTH, start + 500))])

    def in_memory(d: DaemonProcess) -> int:  # the READY messages it holds in memory
        here = copy_here(d, name)
        return here["ready"] - here["ready_on_disk"]

    here = copy_here(a, name)
    assert here["ready"] == DEPTH and here["ready_on_disk"] >= DEPTH - HOT_READY
    assert in_memory(a) <= HOT_READY
    for d in (cluster["b"], cluster["c"]):  # (their copies commit after a's)
        eventually(lambda d=d: copy_here(d, name).get("ready") == DEPTH, 30, d.node_name)
        assert in_memory(d) <= HOT_READY
    a.kill()
    cluster["a"] = a = restarted(a, cluster["b"])
    eventually(lambda: all_alive(list(cluster.values()), {"a", "b", "c"}), 30, "a back")
    eventually(lambda: status_of(a, name).get("dispatching_here") is True, 30,
               "a dispatches again")
    eventually(lambda: copy_here(a, name)["ready"] == DEPTH, 30, "a counts them all")
    assert copy_here(a, name)["ready_on_disk"] >= DEPTH - HOT_READY
    got: list[str] = []
    most = 0
    with cluster["c"].client(timeout=30) as c:
        while len(got) < DEPTH:
            batch = c.receive(name, max=500, wait=10.0)
            assert batch, f"nothing more after {len(got)}"
            c.ack(name, batch)
            got += [m.id for m in batch]
            most = max(most, *(in_memory(d) for d in cluster.values()))
        assert c.receive(name, max=10, wait=0.5) == []
    assert sorted(got) == sorted(ids) and len(got) == len(set(got))  # each once
    assert most <= 2 * HOT_READY
    for d in cluster.values():  # every copy empties (the acks reach the cold ones too)
        eventually(lambda d=d: copy_here(d, name).get("ready") == 0, 30, d.node_name)
