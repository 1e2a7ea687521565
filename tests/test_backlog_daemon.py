"""The backlog on disk against a real meshqd (meshq.broker.backlog): a queue deeper than a
partition keeps in memory survives a SIGKILL, comes back counted, and is consumed whole,
once each, in send order; a purge empties it on disk too. (Memory and restart time are
measured by tools/bench_backlog.py, not here.)"""

from __future__ import annotations

from pathlib import Path

from meshq.broker.backlog import HOT_READY
from meshq.testing import DaemonProcess

DEPTH = 2 * HOT_READY + 500


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
