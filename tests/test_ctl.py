"""``meshq-ctl`` against a real two-node cluster: every command's table and ``--json``.

The JSON is checked against docs/ctl-json.md itself: each documented field must be in
the real output, and each field of a documented object must be documented.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from test_membership import eventually

from meshq.cli import ctl
from meshq.cli._common import to_json
from meshq.testing import DaemonProcess

DOC = Path(__file__).resolve().parent.parent / "docs" / "ctl-json.md"
MAX_OFFSET_MS = 750  # not the default, so that the output shows the configured value
NTP_SERVER = "127.0.0.1"  # nothing answers NTP there: the daemon tries and logs it


def ctl_run(d: DaemonProcess, *args: str) -> str:
    proc = subprocess.run([sys.executable, "-m", "meshq.cli.ctl", "--socket", str(d.socket),
                           *args], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    return proc.stdout


def ctl_json(d: DaemonProcess, *args: str) -> Any:
    return json.loads(ctl_run(d, *args, "--json"))


def documented() -> dict[str, list[str]]:
    """Heading (its first code span) -> the fields of the table under it."""
    tables: dict[str, list[str]] = {}
    heading = None
    for line in DOC.read_text().splitlines():
        if line.startswith("#"):
            m = re.search(r"`([^`]+)`", line)
            heading = m.group(1) if m else None
        elif heading and (m := re.match(r"\| `([\w.]+)` \|", line)):
            tables.setdefault(heading, []).append(m.group(1))
    return tables


def field(obj: dict[str, Any], dotted: str) -> Any:
    for part in dotted.split("."):
        assert isinstance(obj, dict) and part in obj, f"{dotted} missing in {obj}"
        obj = obj[part]
    return obj


def check_documented(heading: str, value: Any) -> None:
    """Every field documented under ``heading`` is in ``value`` (an object, or a list of
    objects), and every first-level key of it is documented."""
    fields = documented()[heading]
    items = value if isinstance(value, list) else [value]
    assert items, f"nothing to check for {heading}"
    for item in items:
        for name in fields:
            field(item, name)
        assert set(item) <= set(fields), f"{heading}: undocumented {set(item) - set(fields)}"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[DaemonProcess]]:
    """Nodes a and b, b joined through a, with one queue; yields once each has
    measured the other's clock."""
    tmp = tmp_path_factory.mktemp("ctl")
    env = {**os.environ, "MESHQ_MAX_CLOCK_OFFSET_MS": str(MAX_OFFSET_MS),
           "MESHQ_NTP_SERVER": NTP_SERVER}
    nodes: list[DaemonProcess] = []
    try:
        a = DaemonProcess(tmp / "a", node_name="a", env=env).start()
        nodes.append(a)
        assert a.bind is not None
        nodes.append(DaemonProcess(tmp / "b", node_name="b", args=["--join", a.bind],
                                   env=env).start())

        def measured() -> bool:
            for d, peer in ((nodes[0], "b"), (nodes[1], "a")):
                with d.client() as c:
                    s = c.status()
                if s["mesh"]["median_clock_offset_ms"] is None or not any(
                        m["name"] == peer and m["clock_offset_ms"] is not None
                        for m in s["members"]):
                    return False
            return True

        eventually(measured, 15, "a and b measured each other's clock")
        with a.client() as c:
            c.declare("orders", dead_letter_queue="dlq")
            c.send("orders", b"x")
        yield nodes
    finally:
        for d in nodes:
            d.kill()


# --------------------------------------------------------------------------- JSON


def test_status_json_matches_the_documentation(cluster: list[DaemonProcess]) -> None:
    status = ctl_json(cluster[0], "status")
    for section in ("node", "members", "mesh", "clock", "ring", "queues", "store",
                    "broker", "replication", "security", "server", "access", "resources"):
        check_documented(section, status[section])
    parts = [p for q in status["queues"] for p in q["partitions"]]
    check_documented("queues[].partitions", parts)
    [q] = status["queues"]  # orders: two partitions per member, by default
    assert [p["index"] for p in q["partitions"]] == [0, 1, 2, 3]
    assert q["partitions"][0]["primary"] == q["primary"]
    assert {p["primary"] for p in q["partitions"]} == {"a", "b"}
    assert sum(p["ready"] for p in q["partitions"]) == q["ready"] == 1
    assert all(sorted(p["holders"]) == ["a", "b"] for p in q["partitions"])
    assert {p["counted_by"] for p in q["partitions"]} == {"a", "b"}
    assert status["clock"]["max_clock_offset_ms"] == MAX_OFFSET_MS
    assert status["clock"]["ntp_server"] == NTP_SERVER
    assert status["clock"]["peers_measured"] == 1 and status["clock"]["min_peers"] == 2
    assert abs(status["clock"]["wall_ms"] - time.time() * 1000) < 10_000


def test_members_ring_queues_json(cluster: list[DaemonProcess]) -> None:
    a = cluster[0]
    members = ctl_json(a, "members")
    check_documented("members", members)
    assert [(m["name"], m["state"], m["self"]) for m in members] == [
        ("a", "alive", True), ("b", "alive", False)]
    ring = ctl_json(a, "ring")
    check_documented("ring", ring)
    assert set(ring["ownership"]) == {"a", "b"}
    [q] = ctl_json(a, "queues")
    assert set(q) == {"name", "ready", "leased", "delayed", "dead_lettered", "expired",
                      "dropped", "consumers", "options",
                      "counted_by"}  # as docs/ctl-json.md lists them
    assert (q["name"], q["ready"], q["options"]["dead_letter_queue"]) == ("orders", 1, "dlq")


def test_clock_json_shows_each_peer_s_offset(cluster: list[DaemonProcess]) -> None:
    for me, peer in ((cluster[0], "b"), (cluster[1], "a")):
        view = ctl_json(me, "clock")
        check_documented("meshq-ctl clock --json", view)
        check_documented("peers", view["peers"])
        [p] = view["peers"]
        assert (p["name"], p["state"], p["address"]) == (peer, "alive", _bind(cluster, peer))
        assert abs(p["clock_offset_ms"]) < 100 and p["rtt_ms"] > 0  # one machine, one clock
        assert abs(view["median_clock_offset_ms"]) < 100
        assert view["accepting_writes"] is True and view["not_accepting_reason"] is None
        assert (view["max_clock_offset_ms"], view["ntp_server"]) == (MAX_OFFSET_MS,
                                                                     NTP_SERVER)
        assert view["peers_measured"] == 1
    view = ctl_json(cluster[0], "clock")  # a stamped a message: its HLC has a time
    assert view["hlc"]["raw"] == view["hlc"]["wall_ms"] << 16 | view["hlc"]["logical"]
    assert view["hlc"]["iso"] == _iso(view["hlc"]["wall_ms"])
    assert view["wall_iso"] == _iso(view["wall_ms"])


def _bind(cluster: list[DaemonProcess], name: str) -> str | None:
    return {d.node_name: d.bind for d in cluster}[name]


def _iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="milliseconds").replace(
        "+00:00", "Z")


# --------------------------------------------------------------------------- tables


def test_status_table(cluster: list[DaemonProcess]) -> None:
    out = ctl_run(cluster[0], "status")
    for section in ("node", "members", "mesh", "queues", "replication", "store"):
        assert f"\n{section}\n" in f"\n{out}", section
    assert not out.startswith("WARNING")
    [q] = ctl_json(cluster[0], "status")["queues"]  # orders: four partitions on two nodes
    [row] = [line.split() for line in _block(out, "queues") if line.split()[0] == "orders"]
    assert row == ["orders", "1", "0", "0", "0", "0", "(4", "partitions)"]
    rows = [line.split() for line in _block(out, "partitions")[2:]]
    assert [r[:2] for r in rows] == [["orders", str(i)] for i in range(4)]
    assert [(r[2], r[3]) for r in rows] == [
        (p["primary"], ",".join(p["holders"])) for p in q["partitions"]]
    assert {r[2] for r in rows} == {"a", "b"} and sum(int(r[4]) for r in rows) == 1
    assert "accepting writes  yes" in out and "median clock offset" in out
    assert {"a", "b"} <= {line.split()[0] for line in _block(out, "members")[1:]}


def test_members_ring_queues_tables(cluster: list[DaemonProcess]) -> None:
    a = cluster[0]
    members = [line.split() for line in ctl_run(a, "members").splitlines()]
    assert members[0][:3] == ["name", "address", "state"]
    assert [(r[0], r[1], r[2]) for r in members[1:]] == [("a", cluster[0].bind, "alive"),
                                                         ("b", cluster[1].bind, "alive")]
    ring = ctl_run(a, "ring")
    assert re.search(r"^a\s+\d+\.\d%\s+100\.0%$", ring, re.M), ring
    assert re.search(r"^b\s+\d+\.\d%\s+100\.0%$", ring, re.M), ring
    queues = [line.split() for line in ctl_run(a, "queues").splitlines()]
    assert queues == [["name", "ready", "leased", "delayed", "dead_lettered", "consumers"],
                      ["orders", "1", "0", "0", "0", "0"]]


def test_clock_table(cluster: list[DaemonProcess]) -> None:
    out = ctl_run(cluster[1], "clock")
    facts = dict(line.strip().split("  ", 1) for line in _block(out, "clock")[1:])
    facts = {k: v.strip() for k, v in facts.items()}
    assert facts["node"] == "b" and facts["accepting writes"] == "yes"
    assert facts["limit"].startswith(f"{MAX_OFFSET_MS} ms")
    assert facts["ntp"].startswith(f"{NTP_SERVER}: ")
    assert re.fullmatch(r"[+-]\d+\.\d{3} ms \(.*\)", facts["median offset"])
    assert re.match(r"\d{4}-\d\d-\d\dT[\d:.]+Z \(\d+ ms\)", facts["wall clock"])
    [peer] = [line.split() for line in _block(out, "peers")[2:]]
    assert peer[:3] == ["a", cluster[0].bind, "alive"]
    assert abs(float(peer[3])) < 100 and float(peer[4]) > 0


def _block(out: str, title: str) -> list[str]:
    """The lines of one section of a table: its title line and what follows to a blank."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.split(" ")[0] == title)
    end = next((i for i in range(start, len(lines)) if not lines[i].strip()), len(lines))
    return lines[start:end]


# --------------------------------------------------------------------------- leave


@pytest.mark.parametrize("as_json", [True, False])
def test_leave_stops_the_daemon(daemon: DaemonProcess, as_json: bool) -> None:
    if as_json:
        answer = ctl_json(daemon, "leave")
        check_documented("meshq-ctl leave --json", answer)
        assert answer == {"leaving": True}
    else:
        assert "leaving" in ctl_run(daemon, "leave")
    assert daemon.proc is not None and daemon.proc.wait(15) == 0


# --------------------------------------------------------------------------- in process


def test_status_table_warnings_security_and_unknown_sections(
        cluster: list[DaemonProcess]) -> None:
    """Sections other helpers add: warnings first, security shown, unknown ones too."""
    with cluster[0].client() as c:
        status = c.status()
    status["node"].update(accepting_writes=False,
                          not_accepting_reason="this node accepts no writes: shutting down")
    status["security"] = {"keyed": True, "primary_key": "0123456789abcdef",
                          "keys": ["0123456789abcdef", "fedcba9876543210"],
                          "warnings": ["key file is world-readable"],
                          "rejected_packets": {"unkeyed": 4, "bad_key": 2, "rate_limited": 0}}
    status["server"] = {"connections": 3, "by_op": {"send": 7}}
    status["mystery"] = [{"k": 1, "v": "x"}]
    out = ctl.format_status(status)
    assert out.splitlines()[:3] == ["WARNING: this node accepts no writes: shutting down",
                                    "WARNING: key file is world-readable", ""]
    security = _block(out, "security")
    assert "0123456789abcdef, fedcba9876543210" in security[3]
    assert security[4].split() == ["rejected", "packets", "unkeyed", "4,", "bad_key", "2,",
                                   "rate_limited", "0"]
    assert _block(out, "server")[1:] == ["  connections  3", "  by op        send 7"]
    assert _block(out, "mystery")[1:] == ["  k  v", "  1  x"]


def test_tables_tolerate_missing_and_odd_sections() -> None:
    for status in ({}, {"node": None, "members": "?", "queues": [None], "security": 3}):
        out = ctl.format_status(status)
        assert "\nmembers\n" in out and "WARNING" not in out
        clock = ctl.format_clock(ctl.clock_view(status))
        assert "peers" in clock and "(none)" in clock
    assert ctl.clock_view({})["median_clock_offset_ms"] is None


def test_json_is_always_valid() -> None:
    text = to_json({"nan": float("nan"), "inf": [float("inf")], b"k": b"\xff", 1: b"ok"})
    assert json.loads(text) == {"nan": None, "inf": [None], "k": {"b64": "/w=="}, "1": "ok"}


def test_a_command_group_gets_its_own_subcommands() -> None:
    """How ``keys`` plugs in: a group whose subcommands get --socket and --json."""
    parser = argparse.ArgumentParser(prog="t")
    sub = parser.add_subparsers(dest="command", required=True)
    group = ctl.add_group(sub, "keys", "the cluster key ring")
    ctl.add_command(group, "list", "list keys", lambda args: 0)
    ctl.add_command(group, "use", "make a key primary", lambda args: 0).add_argument("key")
    args = parser.parse_args(["keys", "use", "abc", "--json", "--socket", "/s"])
    assert (args.keys_command, args.key, args.json, args.socket) == ("use", "abc", True, "/s")
    with pytest.raises(SystemExit):
        parser.parse_args(["keys"])
