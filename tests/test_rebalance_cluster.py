"""Rebalancing on real daemons: a third meshqd joins two that hold a queue of six
partitions; ``meshq-ctl rebalance --watch`` exits 0 once the moves are done, and by then
every copy is where the placement says (each message on exactly its two holders, the
former holders' copies dropped), and ``status`` shows no moves. Then it leaves again, and
the watch exits once the two left hold everything again."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from test_ctl import check_documented, ctl_json
from test_membership import all_alive, eventually, states
from test_replication import copy_here

from meshq.testing import DaemonProcess

P = 6
PER_PARTITION = 50
NAME = "moving"


def ctl(d: DaemonProcess, *args: str, timeout: float = 90) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "meshq.cli.ctl", "--socket", str(d.socket),
                           *args], capture_output=True, text=True, timeout=timeout)


def test_rebalance_watch_exits_once_a_join_s_moves_are_done(tmp_path: Path) -> None:
    a = DaemonProcess(tmp_path / "a", node_name="a").start()
    assert a.bind is not None
    nodes = [a, DaemonProcess(tmp_path / "b", node_name="b", args=["--join", a.bind]).start()]
    try:
        eventually(lambda: all_alive(nodes, {"a", "b"}), 15, "a and b alive")
        with a.client() as c:
            c.declare(NAME, partitions=P, replicas=2)
            for p in range(P):
                c.request("send", queue=NAME, partition=p, messages=[
                    {"body": f"{p}.{i}"} for i in range(PER_PARTITION)])
        total = P * PER_PARTITION
        eventually(lambda: all(copy_here(d, NAME).get("ready") == total for d in nodes), 30,
                   "a and b each hold every partition")
        before = ctl_json(a, "rebalance")
        assert before["moving"] is False and before["nodes"] == ["a", "b"], before

        nodes.append(DaemonProcess(tmp_path / "c", node_name="c",
                                   args=["--join", a.bind]).start())
        eventually(lambda: all_alive(nodes, {"a", "b", "c"}), 15, "a, b and c alive")
        watch = ctl(a, "rebalance", "--watch", "--interval", "0.2", "--timeout", "60")
        assert watch.returncode == 0 and watch.stderr == "", (watch.stdout, watch.stderr)
        assert "nothing moving (3 of 3 nodes answered" in watch.stdout, watch.stdout
        # Done means done: read at once, no waiting. Each message is on its two holders
        # only (c was filled, the copies it took over were dropped where they were).
        held = {d.node_name: copy_here(d, NAME).get("ready") for d in nodes}
        assert sum(held.values()) == 2 * total and 0 < held["c"] < total, held

        status = ctl_json(nodes[1], "status")
        reb = status["rebalance"]
        check_documented("rebalance", reb)
        assert reb["moving"] is False and reb["moves"] == [] and reb["unreachable"] == []
        assert reb["nodes"] == ["a", "b", "c"]
        [q] = [q for q in status["queues"] if q["name"] == NAME]
        assert all(p["moves"] == [] for p in q["partitions"])
        assert any("c" in p["holders"] for p in q["partitions"])
        once = ctl(nodes[2], "rebalance")
        assert once.returncode == 0 and once.stdout.startswith("nothing moving"), once
        as_json = json.loads(ctl(nodes[2], "rebalance", "--json").stdout)
        check_documented("meshq-ctl rebalance --json", as_json)
        assert as_json["moving"] is False

        assert nodes[2].stop() == 0  # SIGTERM: c leaves, its copies are made again
        eventually(lambda: all(states(d)["c"] == "left" for d in nodes[:2]), 15, "c left")
        watch = ctl(nodes[1], "rebalance", "--watch", "--interval", "0.2", "--timeout", "60")
        assert watch.returncode == 0 and watch.stderr == "", (watch.stdout, watch.stderr)
        assert "nothing moving (2 of 2 nodes answered" in watch.stdout, watch.stdout
        assert [copy_here(d, NAME).get("ready") for d in nodes[:2]] == [total, total]
    finally:
        for d in nodes:
            d.kill()
