"""The command-line tools ``meshq`` and ``meshq-ctl``, run as real subprocesses.

Each test drives the scripts against a real meshqd (the ``daemon`` fixture) and checks
what scripts rely on (SPEC section 5): stdout, one-line errors and exit statuses.
"""

from __future__ import annotations

import base64
import json
import os
import selectors
import subprocess
import sys
from pathlib import Path

import pytest

from meshq.cli.ctl import main as ctl_main
from meshq.cli.meshq import main as meshq_main
from meshq.errors import EXIT_CODES
from meshq.testing import DaemonProcess

MODULES = {"meshq": "meshq.cli.meshq", "meshq-ctl": "meshq.cli.ctl"}


def run(*args: str, tool: str = "meshq", input: bytes = b"",
        env: dict[str, str] | None = None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([sys.executable, "-m", MODULES[tool], *args], input=input,
                          capture_output=True, env=env, timeout=30)


def cli(daemon: DaemonProcess, *args: str, **kw: object) -> subprocess.CompletedProcess[bytes]:
    return run("--socket", str(daemon.socket), *args, **kw)  # type: ignore[arg-type]


def ok(proc: subprocess.CompletedProcess[bytes]) -> str:
    assert proc.returncode == 0, proc.stderr.decode()
    assert proc.stderr == b""
    return proc.stdout.decode()


def failed(proc: subprocess.CompletedProcess[bytes], code: str) -> str:
    """The one stderr line of a failed command, checked against its code and exit status."""
    err = proc.stderr.decode()
    assert proc.returncode == EXIT_CODES[code], err
    assert err.startswith(f"{code}: ") and err.count("\n") == 1, err
    assert proc.stdout == b""
    return err


def counts(daemon: DaemonProcess, queue: str) -> tuple[int, int]:
    with daemon.client() as c:
        [s] = c.stats(queue)
    return s["ready"], s["leased"]


# --------------------------------------------------------------------------- declare


def test_declare_sets_options_and_mismatch_is_precondition_failed(daemon):
    out = ok(cli(daemon, "declare", "jobs", "--ttl", "60", "--visibility-timeout", "5",
                 "--max-deliveries", "3", "--dead-letter-queue", "dlq", "--max-length", "10",
                 "--ordering", "fifo", "--replicas", "2", "--expires", "3600"))
    assert out.startswith("declared jobs") and out.count("\n") == 1
    with daemon.client() as c:
        [s] = c.stats("jobs")
    assert s["options"] == {"replicas": 2, "write_quorum": None, "message_ttl": 60.0,
                            "visibility_timeout": 5.0,
                            "max_deliveries": 3, "dead_letter_queue": "dlq",
                            "max_length": 10, "ordering": "fifo", "expires": 3600.0,
                            "dead_letter_exchange": None, "dead_letter_routing_key": None,
                            "partitions": 1}
    ok(cli(daemon, "declare", "jobs", "--ttl", "60", "--visibility-timeout", "5",
           "--max-deliveries", "3", "--dead-letter-queue", "dlq", "--max-length", "10",
           "--ordering", "fifo", "--replicas", "2", "--expires", "3600"))  # idempotent
    err = failed(cli(daemon, "declare", "jobs", "--max-length", "11"), "PRECONDITION_FAILED")
    assert "jobs" in err and "max_length" in err


def test_declare_partitions_and_send_with_a_partition_key(daemon):
    out = ok(cli(daemon, "declare", "spread", "--partitions", "3"))
    assert "partitions=3" in out
    ids = [ok(cli(daemon, "send", "spread", f"m{i}", "--partition-key", "user7")).strip()
           for i in range(3)]
    with daemon.client() as c:
        got = c.receive("spread", max=10, wait=1)
        assert [d.id for d in got] == ids  # one key: one partition, in order
        assert len({d.receipt.count("~") for d in got}) == 1
        [s] = c.stats("spread")
    assert s["options"]["partitions"] == 3
    for args in (("declare", "bad", "--partitions", "0"),
                 ("send", "spread", "-", "--partition-key", "k")):  # one BODY only
        proc = cli(daemon, *args)
        assert proc.returncode == 2 and args[-2].encode() in proc.stderr


# --------------------------------------------------------------------------- send


def test_send_single_message_with_options(daemon):
    with daemon.client() as c:
        c.declare("q")
    mid = ok(cli(daemon, "send", "q", "héllo", "--header", "k=v", "--header", "eq=a=b",
                 "--ttl", "60", "--dedup-id", "d1")).strip()
    again = ok(cli(daemon, "send", "q", "other", "--dedup-id", "d1")).strip()
    assert again == mid  # same dedup id: no second message
    with daemon.client() as c:
        got = c.receive("q", max=5)
    assert [(d.id, d.body, d.headers) for d in got] == [
        (mid, "héllo".encode(), {"k": "v", "eq": "a=b"})]
    ok(cli(daemon, "send", "q", "later", "--delay", "60"))
    with daemon.client() as c:
        [s] = c.stats("q")
    assert (s["ready"], s["delayed"]) == (1, 1)  # the one received above came back


def test_send_stdin_one_message_per_line_ids_in_order(daemon):
    with daemon.client() as c:
        c.declare("q")
    out = ok(cli(daemon, "send", "q", "-", input=b"first\n\nthird\r\nlast\rline"))
    ids = out.splitlines()
    assert len(ids) == 4 and len(set(ids)) == 4
    with daemon.client() as c:
        got = c.receive("q", max=10)
    assert [d.id for d in got] == ids
    assert [d.body for d in got] == [b"first", b"", b"third", b"last\rline"]


def test_send_stdin_prints_each_id_before_the_next_line_arrives(daemon):
    with daemon.client() as c:
        c.declare("q")
    proc = subprocess.Popen([sys.executable, "-m", MODULES["meshq"], "--socket",
                             str(daemon.socket), "send", "q", "-"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert proc.stdin is not None and proc.stdout is not None
    try:
        ids = []
        for body in (b"slow-1", b"slow-2"):
            proc.stdin.write(body + b"\n")
            proc.stdin.flush()
            with selectors.DefaultSelector() as sel:  # the id is an event; 10 s a bound
                sel.register(proc.stdout, selectors.EVENT_READ)
                assert sel.select(10), f"no id printed for {body!r} while stdin stays open"
            ids.append(proc.stdout.readline().decode().strip())
        proc.stdin.close()
        assert proc.wait(10) == 0 and proc.stdout.read() == b""
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
    with daemon.client() as c:
        assert [(d.id, d.body) for d in c.receive("q", max=5)] == list(
            zip(ids, [b"slow-1", b"slow-2"], strict=True))


def test_recv_prints_bodies_and_acks_them(daemon):
    with daemon.client() as c:
        c.declare("q")
        c.send_batch("q", [b"one", b"two", b"three"])
    assert ok(cli(daemon, "recv", "q", "-n", "2")) == "one\ntwo\n"
    assert counts(daemon, "q") == (1, 0)  # the two printed are acked, not leased
    assert ok(cli(daemon, "recv", "q", "-n", "5")) == "three\n"
    assert counts(daemon, "q") == (0, 0)


def test_recv_json_text_and_binary_bodies(daemon):
    with daemon.client() as c:
        c.declare("q")
        text_id = c.send("q", "grüße", headers={"h": "1"})
        bin_id = c.send("q", b"\xff\x00\xfe")
    lines = ok(cli(daemon, "recv", "q", "-n", "2", "--json")).splitlines()
    first, second = (json.loads(line) for line in lines)
    assert first["id"] == text_id and first["body"] == "grüße"
    assert first["headers"] == {"h": "1"}
    assert isinstance(first["hlc"], int) and first["hlc"] > 0
    assert (first["delivery_count"], first["redelivered"]) == (1, False)
    assert first["receipt"].startswith(f"{text_id}~")
    assert second["id"] == bin_id and "body" not in second
    assert base64.b64decode(second["body_b64"]) == b"\xff\x00\xfe"
    assert second["hlc"] > first["hlc"]
    assert counts(daemon, "q") == (0, 0)


def test_recv_no_ack_leaves_the_message_to_come_back(daemon):
    with daemon.client() as c:
        c.declare("q")
        mid = c.send("q", b"again")
    assert ok(cli(daemon, "recv", "q", "--no-ack")) == "again\n"
    [back] = map(json.loads, ok(cli(daemon, "recv", "q", "--wait", "5", "--json")).splitlines())
    assert (back["id"], back["body"]) == (mid, "again")
    assert (back["delivery_count"], back["redelivered"]) == (2, True)
    assert counts(daemon, "q") == (0, 0)


def test_recv_exits_non_zero_when_the_ack_fails(daemon):
    """The lease runs out while recv is blocked writing a large body to a full pipe."""
    with daemon.client() as c:
        c.declare("q", visibility_timeout=0.05)
        mid = c.send("q", b"x" * (512 * 1024))  # far more than a pipe buffer holds
    proc = subprocess.Popen([sys.executable, "-m", MODULES["meshq"], "--socket",
                             str(daemon.socket), "recv", "q"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert proc.stdout is not None
        # One byte out: recv holds the lease and is stuck writing the rest.
        first = os.read(proc.stdout.fileno(), 1)
        with daemon.client() as other:
            # The lease expired and the message came back: another consumer gets it.
            [d] = other.receive("q", wait=10)
            assert (d.id, d.redelivered) == (mid, True)
            out, err = proc.communicate(timeout=30)
            assert first + out == b"x" * (512 * 1024) + b"\n"
            assert proc.returncode == EXIT_CODES["PRECONDITION_FAILED"], err
            assert err.startswith(b"PRECONDITION_FAILED: ") and err.count(b"\n") == 1
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def test_empty_and_missing_queues(daemon):
    with daemon.client() as c:
        c.declare("q")
    assert ok(cli(daemon, "recv", "q", "-n", "3")) == ""  # nothing waiting: exit 0, silent
    assert "missing" in failed(cli(daemon, "recv", "missing"), "NOT_FOUND")
    failed(cli(daemon, "send", "missing", "-", input=b"a\nb\n"), "NOT_FOUND")


# --------------------------------------------------------------------------- queues


def test_queues_purge_delete(daemon):
    with daemon.client() as c:
        c.declare("alpha")
        c.declare("beta")
        c.send_batch("alpha", [b"1", b"2"])
    table = ok(cli(daemon, "queues")).splitlines()
    assert table[0].split() == ["name", "ready", "leased", "delayed", "dead_lettered",
                                "consumers"]
    assert [row.split() for row in table[1:]] == [["alpha", "2", "0", "0", "0", "0"],
                                                  ["beta", "0", "0", "0", "0", "0"]]
    listed = json.loads(ok(cli(daemon, "queues", "--json")))
    assert [(q["name"], q["ready"]) for q in listed] == [("alpha", 2), ("beta", 0)]

    assert "2" in ok(cli(daemon, "purge", "alpha"))
    assert counts(daemon, "alpha") == (0, 0)
    ok(cli(daemon, "delete", "alpha"))
    failed(cli(daemon, "purge", "alpha"), "NOT_FOUND")
    with daemon.client() as c:
        assert [q["name"] for q in c.stats()] == ["beta"]


# --------------------------------------------------------------------------- meshq-ctl


def test_ctl_status_table(daemon):
    with daemon.client() as c:
        c.declare("orders")
        c.send("orders", b"x")
    out = ok(run("--socket", str(daemon.socket), "status", tool="meshq-ctl"))
    for section in ("node", "members", "queues", "replication", "store"):
        assert f"\n{section}\n" in f"\n{out}"
    assert "test-node" in out and "alive" in out and str(daemon.data_dir) in out
    [row] = [line.split() for line in out.splitlines() if line.strip().startswith("orders")]
    assert row == ["orders", "1", "0", "0", "0", "0", "test-node", "test-node"]
    assert "hinted messages" in out and "failed quorums" in out


def test_ctl_status_json(daemon):
    with daemon.client() as c:
        c.declare("orders")
        c.send_batch("orders", [b"a", b"b"])
        c.receive("orders")  # one leased while the status is taken
        status = json.loads(ok(run("status", "--json", "--socket", str(daemon.socket),
                                   tool="meshq-ctl")))
        listed = json.loads(ok(run("--socket", str(daemon.socket), "queues", "--json",
                                   tool="meshq-ctl")))
    node = status["node"]
    assert node["name"] == "test-node" and node["accepting_writes"] is True
    assert node["uptime_s"] >= 0 and node["version"]
    assert status["members"][0]["state"] == "alive"
    assert status["members"][0]["name"] == "test-node"
    [q] = status["queues"]
    assert (q["name"], q["ready"], q["leased"], q["delayed"], q["dead_lettered"]) == (
        "orders", 1, 1, 0, 0)
    assert [(q["name"], q["ready"], q["leased"]) for q in listed] == [("orders", 1, 1)]


# --------------------------------------------------------------------------- sockets, errors


def test_socket_from_environment_and_flag_wins(daemon, tmp_path):
    env = {**os.environ, "MESHQ_SOCKET": str(daemon.socket)}
    ok(run("declare", "viaenv", env=env))
    assert "viaenv" in ok(run("status", tool="meshq-ctl", env=env))
    bogus = {**os.environ, "MESHQ_SOCKET": str(tmp_path / "nobody.sock")}
    failed(run("queues", env=bogus), "UNAVAILABLE")
    assert "viaenv" in ok(run("queues", "--socket", str(daemon.socket), env=bogus))


@pytest.mark.parametrize("tool,args", [
    ("meshq", ["send", "q", "body"]),
    ("meshq", ["send", "q", "-", "--retry-for", "0"]),
    ("meshq", ["recv", "q"]),
    ("meshq-ctl", ["status"]),
])
def test_no_daemon_is_unavailable(tmp_path, tool, args):
    err = failed(run("--socket", str(tmp_path / "nobody.sock"), *args, tool=tool),
                 "UNAVAILABLE")
    assert "nobody.sock" in err


def test_usage_error_exits_2_without_traceback():
    proc = run("recv")
    assert proc.returncode == 2
    assert proc.stderr.startswith(b"usage: ") and b"Traceback" not in proc.stderr


@pytest.mark.parametrize("main,args", [
    (meshq_main, []),
    (meshq_main, ["frobnicate"]),
    (meshq_main, ["recv", "q", "-n", "0"]),
    (meshq_main, ["recv", "q", "--wait", "-1"]),
    (meshq_main, ["declare", "q", "--ordering", "lifo"]),
    (meshq_main, ["declare", "q", "--ttl", "soon"]),
    (meshq_main, ["send", "q", "body", "--header", "novalue"]),
    (meshq_main, ["send", "q", "-", "--ttl", "5"]),
    (meshq_main, ["send", "q", "body", "--retry-for", "-1"]),
    (ctl_main, []),
    (ctl_main, ["status", "--yaml"]),
])
def test_usage_errors_exit_2(main, args, tmp_path, capsys):
    """In process, for speed: argparse exits with status 2 before any connection."""
    with pytest.raises(SystemExit) as exc:
        main(["--socket", str(tmp_path / "unused.sock"), *args])
    assert exc.value.code == 2
    assert "usage:" in capsys.readouterr().err


@pytest.mark.parametrize("script", ["meshq", "meshq-ctl"])
def test_installed_console_scripts(script):
    path = Path(sys.executable).parent / script
    assert path.exists(), f"{path} missing: is the package installed in this venv?"
    proc = subprocess.run([str(path), "--help"], capture_output=True, timeout=30)
    assert proc.returncode == 0 and b"--socket" in proc.stdout
