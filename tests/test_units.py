"""systemd/: the unit passes systemd-analyze verify, the example config loads, and the unit,
sysusers and tmpfiles files agree with each other."""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from meshq.config import load_config
from meshq.server.ops import OPS

SYSTEMD = Path(__file__).resolve().parent.parent / "systemd"
EXEC_START = "ExecStart=/opt/meshq/bin/meshqd "


def unit_settings() -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    for line in (SYSTEMD / "meshq.service").read_text().splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, value = line.split("=", 1)
            settings.setdefault(key, []).append(value)
    return settings


def run(*cmd: str | os.PathLike[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([os.fspath(c) for c in cmd], capture_output=True, text=True,
                          timeout=60, check=False)


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze")
def test_unit_verifies_without_errors_or_warnings(tmp_path: Path) -> None:
    text = (SYSTEMD / "meshq.service").read_text()
    assert text.count(EXEC_START) == 1
    meshqd = Path(sys.executable).parent / "meshqd"  # verify wants ExecStart to exist
    assert meshqd.exists(), "pip install -e . puts meshqd beside the venv's python"
    unit = tmp_path / "meshq.service"
    unit.write_text(text.replace(EXEC_START, f"ExecStart={meshqd} "))
    result = run("systemd-analyze", "verify", "--man=no", unit)
    # verify exits 0 on unknown keys and unparsable values: its warnings count as errors.
    assert (result.returncode, result.stderr, result.stdout) == (0, "", "")


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze")
def test_verify_catches_a_bad_setting(tmp_path: Path) -> None:
    """The check above can fail: verify reports a typo in the unit."""
    text = (SYSTEMD / "meshq.service").read_text()
    unit = tmp_path / "meshq.service"
    unit.write_text(text.replace(EXEC_START, f"ExecStart={sys.executable} ")
                    .replace("WatchdogSec=30s", "WatchdogSec=thirty"))
    result = run("systemd-analyze", "verify", "--man=no", unit)
    assert "WatchdogSec" in result.stderr or "thirty" in result.stderr


def test_unit_is_notify_with_watchdog_and_static_user() -> None:
    s = unit_settings()
    assert s["Type"] == ["notify"]
    assert s["NotifyAccess"] == ["main"]
    assert s["WatchdogSec"] == ["30s"]
    assert (s["User"], s["Group"]) == (["meshq"], ["meshq"])
    assert "DynamicUser" not in s
    assert s["KillMode"] == ["mixed"]  # SIGTERM to meshqd only, not to its writer process
    assert s["RestartPreventExitStatus"] == ["2"]
    env = dict(e.split("=", 1) for e in s["Environment"])
    assert env["MESHQ_DATA_DIR"] == "/var/lib/" + s["StateDirectory"][0]
    assert Path(env["MESHQ_SOCKET"]).parent == Path("/run") / s["RuntimeDirectory"][0]
    assert s["RuntimeDirectoryMode"] == ["0755"]  # meshq-clients reach the 0660 socket
    assert "--config /etc/meshq/meshq.toml" in s["ExecStart"][0]


def test_sysusers_and_tmpfiles_name_the_units_user() -> None:
    users = [line.split()[:2] for line in (SYSTEMD / "meshq.sysusers").read_text().splitlines()
             if line and not line.startswith("#")]
    assert ["u", "meshq"] in users and ["g", "meshq"] in users
    assert ["g", "meshq-admin"] in users  # the example config's [access] names it
    assert ["g", "meshq-clients"] in users  # the example config's socket_group
    assert ["m", "meshq"] in users  # the daemon may give its socket to meshq-clients
    tmpfiles = (SYSTEMD / "meshq.tmpfiles").read_text()
    assert "d /etc/meshq 0750 root meshq -" in tmpfiles


@pytest.mark.skipif(shutil.which("systemd-sysusers") is None
                    or shutil.which("systemd-tmpfiles") is None,
                    reason="no systemd-sysusers or systemd-tmpfiles")
def test_sysusers_and_tmpfiles_apply_to_an_empty_root(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    result = run("systemd-sysusers", f"--root={tmp_path}", SYSTEMD / "meshq.sysusers")
    assert result.returncode == 0, result.stderr
    passwd = (tmp_path / "etc" / "passwd").read_text()
    assert any(line.startswith("meshq:") and line.endswith(":/var/lib/meshq:/usr/sbin/nologin")
               for line in passwd.splitlines()), passwd
    if os.geteuid() != 0:
        pytest.skip("systemd-tmpfiles --root needs root to chown")
    result = run("systemd-tmpfiles", f"--root={tmp_path}", "--create",
                 SYSTEMD / "meshq.tmpfiles")
    assert (result.returncode, result.stderr) == (0, "")
    etc = (tmp_path / "etc" / "meshq").stat()
    assert etc.st_mode & 0o777 == 0o750 and etc.st_uid == 0
    group = next(line for line in (tmp_path / "etc" / "group").read_text().splitlines()
                 if line.startswith("meshq:"))
    assert etc.st_gid == int(group.split(":")[2])


def test_example_config_loads() -> None:
    path = SYSTEMD / "meshq.toml"
    config = load_config(argparse.Namespace(config=str(path)), environ={})
    assert config.cluster_key_file == Path("/etc/meshq/cluster.key")
    assert config.bind == "10.0.0.11:7946"
    assert config.join == ("10.0.0.12:7946", "10.0.0.13:7946")
    assert (config.socket_mode, config.socket_group) == (0o660, "meshq-clients")
    assert config.metrics_bind == "127.0.0.1:9464"
    assert config.log_level == "info"
    assert set(config.access) == {"delete", "purge", "leave", "keys"}
    assert set(config.access) <= set(OPS)  # meshqd refuses an unknown operation
    assert config.access["delete"] == ("uid:0", "group:meshq-admin")
