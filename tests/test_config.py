"""Tests for meshq.config: layering, the socket rule, default paths and error messages."""

from __future__ import annotations

import argparse
import json
import os
import socket
import tempfile
from pathlib import Path
from typing import Any

import pytest

from meshq import config as config_mod
from meshq.config import (
    Config,
    ConfigError,
    add_daemon_arguments,
    default_data_dir,
    default_runtime_dir,
    default_socket,
    load_config,
    parse_host_port,
    resolve_socket,
)


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="meshqd")
    add_daemon_arguments(parser)
    return parser.parse_args(list(argv))


@pytest.fixture
def base_env(tmp_path: Path) -> dict[str, str]:
    """An environment whose XDG defaults point into tmp_path, with nothing MESHQ_* set."""
    runtime = tmp_path / "runtime"
    runtime.mkdir()
    return {"XDG_DATA_HOME": str(tmp_path / "data"), "XDG_RUNTIME_DIR": str(runtime)}


def write_toml(tmp_path: Path, text: str, name: str = "meshq.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


# --------------------------------------------------------------------------- defaults


def test_defaults_without_file_env_or_flags(tmp_path: Path, base_env: dict[str, str]) -> None:
    cfg = load_config(parse(), base_env)
    assert cfg == Config(
        node_name=socket.gethostname(),
        data_dir=tmp_path / "data" / "meshq",
        socket=tmp_path / "runtime" / "meshq" / "meshq.sock",
    )
    assert cfg.bind == "127.0.0.1:7946"
    assert cfg.join == ()
    assert cfg.cluster_key_file is None
    assert cfg.max_frame_bytes == 8 * 1024 * 1024
    assert cfg.max_message_bytes == 1024 * 1024
    assert cfg.dedup_window == 300.0
    assert cfg.max_clock_offset_ms == 500
    assert cfg.max_connections == 1024
    assert cfg.log_level == "info"


def test_load_config_without_args(base_env: dict[str, str]) -> None:
    assert load_config(None, {**base_env, "MESHQ_BIND": "0.0.0.0:1"}).bind == "0.0.0.0:1"


def test_all_flags_default_to_none() -> None:
    ns = parse()
    for attr in (
        "config",
        "data_dir",
        "socket",
        "node_name",
        "bind",
        "join",
        "cluster_key_file",
        "log_level",
    ):
        assert getattr(ns, attr) is None, attr


def test_join_flag_is_repeatable() -> None:
    assert parse("--join", "a:1", "--join", "b:2").join == ["a:1", "b:2"]


# --------------------------------------------------------------------------- precedence

# (field, TOML line, env var and value, flag argv, attribute values expected for each layer)
LAYER_CASES = [
    pytest.param(
        "bind",
        'bind = "10.0.0.1:1000"',
        ("MESHQ_BIND", "10.0.0.2:2000"),
        ["--bind", "[::1]:3000"],
        ("127.0.0.1:7946", "10.0.0.1:1000", "10.0.0.2:2000", "[::1]:3000"),
        id="bind",
    ),
    pytest.param(
        "node_name",
        'node_name = "from-file"',
        ("MESHQ_NODE_NAME", "from-env"),
        ["--node-name", "from-flag"],
        (socket.gethostname(), "from-file", "from-env", "from-flag"),
        id="node_name",
    ),
    pytest.param(
        "join",
        'join = ["f1:1", "f2:2"]',
        ("MESHQ_JOIN", "e1:1, e2:2,"),
        ["--join", "g1:1", "--join", "[::1]:9"],
        ((), ("f1:1", "f2:2"), ("e1:1", "e2:2"), ("g1:1", "[::1]:9")),
        id="join",
    ),
    pytest.param(
        "log_level",
        'log_level = "warning"',
        ("MESHQ_LOG_LEVEL", "ERROR"),
        ["--log-level", "Debug"],
        ("info", "warning", "error", "debug"),
        id="log_level",
    ),
    pytest.param(
        "data_dir",
        'data_dir = "/srv/file"',
        ("MESHQ_DATA_DIR", "/srv/env"),
        ["--data-dir", "/srv/flag"],
        (None, Path("/srv/file"), Path("/srv/env"), Path("/srv/flag")),
        id="data_dir",
    ),
    pytest.param(
        "socket",
        'socket = "/srv/file.sock"',
        ("MESHQ_SOCKET", "/srv/env.sock"),
        ["--socket", "/srv/flag.sock"],
        (None, Path("/srv/file.sock"), Path("/srv/env.sock"), Path("/srv/flag.sock")),
        id="socket",
    ),
    pytest.param(
        "cluster_key_file",
        'cluster_key_file = "/k/file"',
        ("MESHQ_CLUSTER_KEY_FILE", "/k/env"),
        ["--cluster-key-file", "/k/flag"],
        (None, Path("/k/file"), Path("/k/env"), Path("/k/flag")),
        id="cluster_key_file",
    ),
]


@pytest.mark.parametrize(("field", "toml_line", "env_item", "flag_argv", "expected"), LAYER_CASES)
@pytest.mark.parametrize("layers", [0, 1, 2, 3], ids=["default", "file", "env", "flag"])
def test_each_layer_wins_over_the_ones_below(
    tmp_path: Path,
    base_env: dict[str, str],
    field: str,
    toml_line: str,
    env_item: tuple[str, str],
    flag_argv: list[str],
    expected: tuple[object, ...],
    layers: int,
) -> None:
    env = dict(base_env)
    argv: list[str] = []
    if layers >= 1:
        argv += ["--config", str(write_toml(tmp_path, toml_line + "\n"))]
    if layers >= 2:
        env[env_item[0]] = env_item[1]
    if layers >= 3:
        argv += flag_argv
    cfg = load_config(parse(*argv), env)
    want = expected[layers]
    if want is None:  # a path default: compare with the computed default
        want = {
            "data_dir": tmp_path / "data" / "meshq",
            "socket": tmp_path / "runtime" / "meshq" / "meshq.sock",
            "cluster_key_file": None,
        }[field]
    assert getattr(cfg, field) == want


@pytest.mark.parametrize(
    ("field", "toml_value", "env_value", "file_wins", "env_wins"),
    [
        ("max_frame_bytes", "2_000_000", "3000000", 2_000_000, 3_000_000),
        ("max_message_bytes", "1000", "2000", 1000, 2000),
        ("dedup_window", "12", "2.5", 12.0, 2.5),
        ("max_clock_offset_ms", "100", "250", 100, 250),
        ("max_connections", "10", "20", 10, 20),
        ("vnodes", "64", "256", 64, 256),
        ("write_quorum", "1", "2", 1, 2),
        ("default_partitions", "4", "8", 4, 8),
    ],
)
def test_numeric_fields_file_then_env(
    tmp_path: Path,
    base_env: dict[str, str],
    field: str,
    toml_value: str,
    env_value: str,
    file_wins: object,
    env_wins: object,
) -> None:
    path = write_toml(tmp_path, f"{field} = {toml_value}\n")
    env = {**base_env, "MESHQ_CONFIG": str(path)}
    from_file = load_config(None, env)
    assert getattr(from_file, field) == file_wins
    assert type(getattr(from_file, field)) is type(file_wins)
    from_env = load_config(None, {**env, f"MESHQ_{field.upper()}": env_value})
    assert getattr(from_env, field) == env_wins
    assert type(getattr(from_env, field)) is type(env_wins)


def test_config_flag_beats_meshq_config_env(tmp_path: Path, base_env: dict[str, str]) -> None:
    env_file = write_toml(tmp_path, 'node_name = "env-file"\n', "env.toml")
    flag_file = write_toml(tmp_path, 'node_name = "flag-file"\n', "flag.toml")
    env = {**base_env, "MESHQ_CONFIG": str(env_file)}
    assert load_config(parse(), env).node_name == "env-file"
    assert load_config(parse("--config", str(flag_file)), env).node_name == "flag-file"


def test_layers_merge_field_by_field(tmp_path: Path, base_env: dict[str, str]) -> None:
    path = write_toml(tmp_path, 'node_name = "n1"\nbind = "h:1"\nlog_level = "debug"\n')
    env = {**base_env, "MESHQ_CONFIG": str(path), "MESHQ_BIND": "h:2"}
    cfg = load_config(parse("--log-level", "error"), env)
    assert (cfg.node_name, cfg.bind, cfg.log_level) == ("n1", "h:2", "error")


def test_empty_env_var_counts_as_unset(tmp_path: Path, base_env: dict[str, str]) -> None:
    path = write_toml(tmp_path, 'bind = "h:1"\n')
    env = {**base_env, "MESHQ_CONFIG": str(path), "MESHQ_BIND": "", "MESHQ_MAX_CONNECTIONS": ""}
    cfg = load_config(None, env)
    assert cfg.bind == "h:1"
    assert cfg.max_connections == 1024


def test_unrelated_meshq_env_vars_are_ignored(base_env: dict[str, str]) -> None:
    cfg = load_config(None, {**base_env, "MESHQ_CLIENT_TIMEOUT": "x", "MESHQ_CONFIG": ""})
    assert cfg.bind == "127.0.0.1:7946"


def test_namespace_from_another_parser(base_env: dict[str, str]) -> None:
    # meshq-ctl's parser has --socket but none of the daemon flags.
    cfg = load_config(argparse.Namespace(socket="/x/ctl.sock"), base_env)
    assert cfg.socket == Path("/x/ctl.sock")
    assert cfg.bind == "127.0.0.1:7946"


def test_tilde_is_expanded(
    tmp_path: Path, base_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    home = tmp_path / "home"
    monkeypatch.setenv("HOME", str(home))
    path = write_toml(tmp_path, 'cluster_key_file = "~/key"\n')
    env = {**base_env, "MESHQ_CONFIG": str(path), "MESHQ_SOCKET": "~/s.sock"}
    cfg = load_config(parse("--data-dir", "~/d"), env)
    assert cfg.data_dir == home / "d"
    assert cfg.socket == home / "s.sock"
    assert cfg.cluster_key_file == home / "key"


# --------------------------------------------------------------------------- seeds


def test_seeds_is_the_toml_name_for_join(tmp_path: Path, base_env: dict[str, str]) -> None:
    path = write_toml(tmp_path, 'seeds = ["a.example:7946", "[fe80::1]:7000"]\n')
    cfg = load_config(parse("--config", str(path)), base_env)
    assert cfg.join == ("a.example:7946", "[fe80::1]:7000")


def test_seeds_and_join_together_is_an_error(tmp_path: Path, base_env: dict[str, str]) -> None:
    path = write_toml(tmp_path, 'seeds = ["a:1"]\njoin = ["b:2"]\n')
    with pytest.raises(ConfigError, match="seeds, join") as info:
        load_config(parse("--config", str(path)), base_env)
    assert str(path) in str(info.value)


@pytest.mark.parametrize(
    ("toml_line", "needle"),
    [
        ('seeds = "a:1"', "expected a list"),
        ("seeds = [1, 2]", "expected a list"),
        ('seeds = ["no-port"]', "no-port"),
        ('seeds = ["a:0"]', "out of range 1-65535"),
    ],
)
def test_bad_seeds(tmp_path: Path, base_env: dict[str, str], toml_line: str, needle: str) -> None:
    path = write_toml(tmp_path, toml_line + "\n")
    with pytest.raises(ConfigError) as info:
        load_config(parse("--config", str(path)), base_env)
    message = str(info.value)
    assert f"{path}: seeds:" in message
    assert needle in message


# --------------------------------------------------------------------------- errors


def test_unknown_toml_keys_are_listed(tmp_path: Path, base_env: dict[str, str]) -> None:
    path = write_toml(tmp_path, 'bind = "h:1"\nport = 1\nzz_top = true\n')
    with pytest.raises(ConfigError) as info:
        load_config(parse("--config", str(path)), base_env)
    message = str(info.value)
    assert message.startswith(f"{path}: unknown keys: port, zz_top ")
    assert "\n" not in message


def test_tables_in_toml_are_unknown_keys(tmp_path: Path, base_env: dict[str, str]) -> None:
    path = write_toml(tmp_path, "[meshq]\nbind = 'h:1'\n")
    with pytest.raises(ConfigError, match=r"unknown key: meshq"):
        load_config(parse("--config", str(path)), base_env)


@pytest.mark.parametrize(
    ("toml_line", "key", "needle"),
    [
        ('max_frame_bytes = "8M"', "max_frame_bytes", "expected an integer, got str"),
        ("max_frame_bytes = 1.5", "max_frame_bytes", "expected an integer, got float"),
        ("max_connections = true", "max_connections", "expected an integer, got bool"),
        ('dedup_window = "5"', "dedup_window", "expected a number, got str"),
        ("node_name = 7", "node_name", "expected a string, got int"),
        ("data_dir = 7", "data_dir", "expected a path string, got int"),
        ('data_dir = ""', "data_dir", "must not be empty"),
        ("join = 'a:1'", "join", "expected a list"),
        ('log_level = "loud"', "log_level", "must be one of debug, info, warning, error"),
        ("max_connections = 0", "max_connections", "must be a positive integer"),
        ("vnodes = 100000", "vnodes", "must be at most 4096"),
        ("default_partitions = 257", "default_partitions", "must be at most 256"),
        ("default_partitions = 0", "default_partitions", "must be a positive integer"),
        ('allow_unkeyed_bind = "yes"', "allow_unkeyed_bind", "expected true or false"),
        ("socket_mode = 0o1777", "socket_mode", "from 0o000 to 0o777"),
        ("socket_mode = 0o066", "socket_mode", "0o600 at least"),
        ('socket_mode = "0660"', "socket_mode", "expected an octal integer"),
        ('metrics_bind = "nohost"', "metrics_bind", "expected HOST:PORT"),
        ("client_frame_timeout = 0", "client_frame_timeout", "positive finite"),
        ("access = 1", "access", "expected a table"),
        ('[access]\ndelete_queue = "uid:0"', "access", "expected a list of principals"),
        ('[access]\ndelete_queue = ["root"]', "access", "bad principal 'root'"),
        ('[access]\ndelete_queue = ["uid:x"]', "access", "uid must be a number"),
        ("write_quorum = 0", "write_quorum", "must be a positive integer"),
        ("dedup_window = -1.0", "dedup_window", "positive finite"),
        ("dedup_window = inf", "dedup_window", "positive finite"),
    ],
)
def test_wrong_toml_values(
    tmp_path: Path, base_env: dict[str, str], toml_line: str, key: str, needle: str
) -> None:
    path = write_toml(tmp_path, toml_line + "\n")
    with pytest.raises(ConfigError) as info:
        load_config(parse("--config", str(path)), base_env)
    message = str(info.value)
    assert message.startswith(f"{path}: {key}: ")
    assert needle in message


@pytest.mark.parametrize(
    ("var", "value", "needle"),
    [
        ("MESHQ_MAX_FRAME_BYTES", "abc", "expected an integer, got 'abc'"),
        ("MESHQ_MAX_MESSAGE_BYTES", "1.5", "expected an integer"),
        ("MESHQ_MAX_CONNECTIONS", "0", "must be a positive integer"),
        ("MESHQ_MAX_CLOCK_OFFSET_MS", "-5", "must be a positive integer"),
        ("MESHQ_DEDUP_WINDOW", "soon", "expected a number"),
        ("MESHQ_DEDUP_WINDOW", "nan", "positive finite"),
        ("MESHQ_LOG_LEVEL", "loud", "must be one of"),
        ("MESHQ_BIND", "localhost", "expected HOST:PORT"),
        ("MESHQ_JOIN", "a:1,b", "expected HOST:PORT, got 'b'"),
    ],
)
def test_bad_env_value_names_the_variable(
    base_env: dict[str, str], var: str, value: str, needle: str
) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, {**base_env, var: value})
    message = str(info.value)
    assert message.startswith(f"{var}: ")
    assert needle in message


@pytest.mark.parametrize(
    ("argv", "prefix"),
    [
        (["--bind", "h:99999"], "--bind: port 99999 out of range"),
        (["--join", "ok:1", "--join", "::1:7946"], "--join: IPv6 addresses must be bracketed"),
        (["--data-dir", ""], "--data-dir: path must not be empty"),
    ],
)
def test_bad_flag_names_the_flag(base_env: dict[str, str], argv: list[str], prefix: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(parse(*argv), base_env)
    assert str(info.value).startswith(prefix)


def test_log_level_flag_rejects_unknown_level(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        parse("--log-level", "loud")
    assert "--log-level" in capsys.readouterr().err


def test_missing_config_file_names_path_and_source(
    tmp_path: Path, base_env: dict[str, str]
) -> None:
    missing = tmp_path / "nope.toml"
    with pytest.raises(ConfigError) as info:
        load_config(None, {**base_env, "MESHQ_CONFIG": str(missing)})
    message = str(info.value)
    assert str(missing) in message
    assert "MESHQ_CONFIG" in message


def test_invalid_toml_names_the_file(tmp_path: Path, base_env: dict[str, str]) -> None:
    path = write_toml(tmp_path, "bind = \n")
    with pytest.raises(ConfigError, match="invalid TOML") as info:
        load_config(parse("--config", str(path)), base_env)
    assert str(info.value).startswith(f"{path}: ")


def test_message_must_be_smaller_than_frame(tmp_path: Path, base_env: dict[str, str]) -> None:
    path = write_toml(tmp_path, "max_frame_bytes = 1000\n")
    with pytest.raises(ConfigError) as info:
        load_config(parse("--config", str(path)), {**base_env, "MESHQ_MAX_MESSAGE_BYTES": "1000"})
    message = str(info.value)
    assert "max_message_bytes (1000) must be less than max_frame_bytes (1000)" in message
    assert "MESHQ_MAX_MESSAGE_BYTES" in message
    assert f"{path}: max_frame_bytes" in message
    # Only the frame limit lowered below the default message limit is also caught.
    with pytest.raises(ConfigError, match=r"max_message_bytes \(1048576\)"):
        load_config(parse("--config", str(path)), base_env)


# --------------------------------------------------------------------------- bind / Config


@pytest.mark.parametrize(
    ("value", "parsed"),
    [
        ("127.0.0.1:7946", ("127.0.0.1", 7946)),
        ("0.0.0.0:0", ("0.0.0.0", 0)),
        ("node-1.example.com:65535", ("node-1.example.com", 65535)),
        ("[::1]:7946", ("::1", 7946)),
        ("[::]:1", ("::", 1)),
    ],
)
def test_good_bind(value: str, parsed: tuple[str, int]) -> None:
    assert parse_host_port(value) == parsed
    assert Config(node_name="n", data_dir=Path("/d"), socket=Path("/s"), bind=value).bind == value


@pytest.mark.parametrize(
    "value",
    [
        "localhost",
        "host:65536",
        "host:-1",
        "host:",
        "host:http",
        ":7946",
        "::1:7946",
        "[::1]",
        "[::1:7946",
        "[not-ipv6]:7946",
        "ho st:1",
        "",
    ],
)
def test_bad_bind(base_env: dict[str, str], value: str) -> None:
    with pytest.raises(ValueError):
        parse_host_port(value)
    with pytest.raises(ConfigError, match=r"^bind: "):
        Config(node_name="n", data_dir=Path("/d"), socket=Path("/s"), bind=value)
    if value:  # an empty MESHQ_BIND means unset
        with pytest.raises(ConfigError, match=r"^MESHQ_BIND: "):
            load_config(None, {**base_env, "MESHQ_BIND": value})


@pytest.mark.parametrize(
    ("kwargs", "prefix"),
    [
        ({"max_frame_bytes": 0}, "max_frame_bytes: "),
        ({"max_connections": -1}, "max_connections: "),
        ({"max_clock_offset_ms": True}, "max_clock_offset_ms: "),
        ({"dedup_window": 0.0}, "dedup_window: "),
        ({"memory_high_watermark": 1.5}, "memory_high_watermark: must be a fraction"),
        ({"memory_high_watermark": 0}, "memory_high_watermark: "),
        ({"disk_free_limit": -1}, "disk_free_limit: "),
        ({"log_level": "trace"}, "log_level: "),
        ({"node_name": ""}, "node_name: "),
        ({"join": ("a:1", "b:0")}, "join: "),
        ({"max_message_bytes": 8 * 1024 * 1024}, "max_message_bytes (8388608) must be less"),
    ],
)
def test_config_validates_on_construction(kwargs: dict[str, object], prefix: str) -> None:
    with pytest.raises(ConfigError) as info:
        Config(**{"node_name": "n", "data_dir": Path("/d"), "socket": Path("/s"), **kwargs})  # type: ignore[arg-type]
    assert str(info.value).startswith(prefix)


def test_config_is_frozen() -> None:
    cfg = Config(node_name="n", data_dir=Path("/d"), socket=Path("/s"))
    with pytest.raises(AttributeError):
        cfg.bind = "h:1"  # type: ignore[misc]


def test_to_dict_is_json_friendly() -> None:
    cfg = Config(
        node_name="n1",
        data_dir=Path("/var/lib/meshq"),
        socket=Path("/run/meshq.sock"),
        join=("a:1", "b:2"),
        cluster_key_file=Path("/etc/meshq/key"),
        dedup_window=60,
    )
    d = cfg.to_dict()
    assert d == {
        "node_name": "n1",
        "cluster_name": "meshq",
        "ntp_server": None,
        "data_dir": "/var/lib/meshq",
        "socket": "/run/meshq.sock",
        "bind": "127.0.0.1:7946",
        "join": ["a:1", "b:2"],
        "cluster_key_file": "/etc/meshq/key",
        "max_frame_bytes": 8388608,
        "max_message_bytes": 1048576,
        "dedup_window": 60.0,
        "disk_free_limit": 268435456,
        "memory_high_watermark": 0.4,
        "max_clock_offset_ms": 500,
        "max_connections": 1024,
        "allow_unkeyed_bind": False,
        "socket_mode": 0o660,
        "socket_group": None,
        "access": {},
        "client_frame_timeout": 30.0,
        "max_inflight_requests": 4096,
        "udp_packets_per_second": 2000,
        "metrics_bind": None,
        "amqp_bind": "127.0.0.1:5672",
        "amqp_users": [],
        "amqp_tls_cert": None,
        "amqp_tls_key": None,
        "allow_plaintext_amqp": False,
        "amqp_max_connections": 1024,
        "amqp_channel_max": 2047,
        "amqp_frame_max": 131072,
        "amqp_heartbeat": 60,
        "amqp_max_unconfirmed": 10000,
        "amqp_handshake_timeout": 10.0,
        "vnodes": 128,
        "write_quorum": None,
        "default_partitions": None,
        "log_level": "info",
    }
    assert json.loads(json.dumps(d)) == d
    no_key = Config(node_name="n1", data_dir=Path("/d"), socket=Path("/s")).to_dict()
    assert no_key["cluster_key_file"] is None


# --------------------------------------------------------------------------- socket rule


@pytest.mark.parametrize(
    ("flag", "env_socket", "expected"),
    [
        ("/f/flag.sock", "/e/env.sock", Path("/f/flag.sock")),
        ("/f/flag.sock", None, Path("/f/flag.sock")),
        (None, "/e/env.sock", Path("/e/env.sock")),
        (None, "", None),
        (None, None, None),
    ],
    ids=["flag-beats-env", "flag-only", "env", "empty-env-is-unset", "default"],
)
def test_resolve_socket(
    base_env: dict[str, str], flag: str | None, env_socket: str | None, expected: Path | None
) -> None:
    env = dict(base_env)
    if env_socket is not None:
        env["MESHQ_SOCKET"] = env_socket
    want = expected or Path(base_env["XDG_RUNTIME_DIR"]) / "meshq" / "meshq.sock"
    assert resolve_socket(flag, env) == want


def test_resolve_socket_reads_os_environ(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MESHQ_SOCKET", str(tmp_path / "from-os.sock"))
    assert resolve_socket(None) == tmp_path / "from-os.sock"
    monkeypatch.delenv("MESHQ_SOCKET")
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    assert resolve_socket(None) == tmp_path / "meshq" / "meshq.sock"
    assert default_socket() == tmp_path / "meshq" / "meshq.sock"


def test_load_config_uses_the_same_socket_rule(tmp_path: Path, base_env: dict[str, str]) -> None:
    for flag, env_socket in [("/f.sock", "/e.sock"), (None, "/e.sock"), (None, None)]:
        env = dict(base_env)
        if env_socket:
            env["MESHQ_SOCKET"] = env_socket
        argv = ["--socket", flag] if flag else []
        assert load_config(parse(*argv), env).socket == resolve_socket(flag, env)


# --------------------------------------------------------------------------- default dirs


@pytest.mark.parametrize(
    ("xdg", "expected"),
    [
        ("/xdg/data", Path("/xdg/data/meshq")),
        ("relative/data", None),
        ("", None),
        (None, None),
    ],
    ids=["absolute", "relative-ignored", "empty-ignored", "unset"],
)
def test_default_data_dir(xdg: str | None, expected: Path | None) -> None:
    env = {} if xdg is None else {"XDG_DATA_HOME": xdg}
    want = expected or Path.home() / ".local" / "share" / "meshq"
    assert default_data_dir(env) == want


def test_default_data_dir_reads_os_environ(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path))
    assert default_data_dir() == tmp_path / "meshq"
    monkeypatch.delenv("XDG_DATA_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "h"))
    assert default_data_dir() == tmp_path / "h" / ".local" / "share" / "meshq"


def test_default_runtime_dir_uses_existing_xdg_runtime_dir(tmp_path: Path) -> None:
    assert default_runtime_dir({"XDG_RUNTIME_DIR": str(tmp_path)}) == tmp_path / "meshq"
    assert default_socket({"XDG_RUNTIME_DIR": str(tmp_path)}) == tmp_path / "meshq" / "meshq.sock"


@pytest.fixture
def fake_run_user(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    run_user = tmp_path / "run-user"
    run_user.mkdir()
    monkeypatch.setattr(config_mod, "_RUN_USER", run_user)
    return run_user


@pytest.mark.parametrize(
    "xdg_runtime", ["missing", "file", "relative", None], ids=lambda v: f"xdg={v}"
)
def test_default_runtime_dir_falls_back_to_run_user(
    tmp_path: Path, fake_run_user: Path, xdg_runtime: str | None
) -> None:
    user_dir = fake_run_user / str(os.getuid())
    user_dir.mkdir()
    env: dict[str, str] = {}
    if xdg_runtime == "missing":
        env["XDG_RUNTIME_DIR"] = str(tmp_path / "does-not-exist")
    elif xdg_runtime == "file":
        (tmp_path / "a-file").write_text("")
        env["XDG_RUNTIME_DIR"] = str(tmp_path / "a-file")
    elif xdg_runtime == "relative":
        env["XDG_RUNTIME_DIR"] = "."
    assert default_runtime_dir(env) == user_dir / "meshq"


def test_default_runtime_dir_falls_back_to_tempdir(fake_run_user: Path) -> None:
    # fake_run_user has no <uid> subdirectory.
    want = Path(tempfile.gettempdir()) / f"meshq-{os.getuid()}"
    assert default_runtime_dir({}) == want
    assert default_socket({}) == want / "meshq.sock"


@pytest.mark.skipif(os.getuid() == 0, reason="root can write anywhere")
def test_unwritable_run_user_dir_is_skipped(fake_run_user: Path) -> None:
    user_dir = fake_run_user / str(os.getuid())
    user_dir.mkdir(mode=0o500)
    try:
        assert default_runtime_dir({}) == Path(tempfile.gettempdir()) / f"meshq-{os.getuid()}"
    finally:
        user_dir.chmod(0o700)


def test_load_config_defaults_follow_the_given_environ(tmp_path: Path) -> None:
    runtime = tmp_path / "rt"
    runtime.mkdir()
    env = {"XDG_DATA_HOME": str(tmp_path / "share"), "XDG_RUNTIME_DIR": str(runtime)}
    cfg = load_config(None, env)
    assert cfg.data_dir == tmp_path / "share" / "meshq"
    assert cfg.socket == runtime / "meshq" / "meshq.sock"


def test_security_settings_from_file_and_env(tmp_path: Path, base_env: dict[str, str]) -> None:
    path = write_toml(tmp_path, (
        'socket_mode = 0o640\nsocket_group = "meshq"\nmetrics_bind = "127.0.0.1:9464"\n'
        '[access]\ndelete_queue = ["uid:0", "group:admins"]\npurge = ["*"]\n'))
    cfg = load_config(parse("--config", str(path)), base_env)
    assert cfg.socket_mode == 0o640
    assert cfg.socket_group == "meshq"
    assert cfg.metrics_bind == "127.0.0.1:9464"
    assert cfg.access == {"delete_queue": ("uid:0", "group:admins"), "purge": ("*",)}
    assert cfg.to_dict()["access"] == {"delete_queue": ["uid:0", "group:admins"],
                                       "purge": ["*"]}
    env = {**base_env, "MESHQ_SOCKET_MODE": "0600", "MESHQ_ALLOW_UNKEYED_BIND": "yes",
           "MESHQ_CLIENT_FRAME_TIMEOUT": "2.5"}
    cfg = load_config(parse("--config", str(path)), env)
    assert (cfg.socket_mode, cfg.allow_unkeyed_bind, cfg.client_frame_timeout) == (
        0o600, True, 2.5)
    with pytest.raises(ConfigError, match="MESHQ_ACCESS: set access rules in the config file"):
        load_config(parse(), {**base_env, "MESHQ_ACCESS": "x"})
    with pytest.raises(ConfigError, match="MESHQ_ALLOW_UNKEYED_BIND: expected true or false"):
        load_config(parse(), {**base_env, "MESHQ_ALLOW_UNKEYED_BIND": "maybe"})


# --------------------------------------------------------------------------- AMQP


def _cfg(**kw: Any) -> Config:
    return Config(node_name="n", data_dir=Path("/d"), socket=Path("/s"), **kw)


def test_amqp_listens_on_loopback_5672_by_default_and_can_be_turned_off(
        base_env: dict[str, str]) -> None:
    assert _cfg().amqp_bind == "127.0.0.1:5672"
    assert load_config(None, {**base_env, "MESHQ_AMQP_BIND": "off"}).amqp_bind == "off"
    assert load_config(parse("--amqp-bind", "127.0.0.1:5673"), base_env).amqp_bind == (
        "127.0.0.1:5673")


def test_a_non_loopback_amqp_bind_needs_tls_or_the_opt_out(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"amqp_bind 0\.0\.0\.0:5672 is not a loopback"):
        _cfg(amqp_bind="0.0.0.0:5672")
    assert _cfg(amqp_bind="0.0.0.0:5672", allow_plaintext_amqp=True).allow_plaintext_amqp
    cert, key = tmp_path / "c.pem", tmp_path / "k.pem"
    assert _cfg(amqp_bind="[::]:5671", amqp_tls_cert=cert, amqp_tls_key=key).amqp_tls_key
    with pytest.raises(ConfigError, match="go together"):
        _cfg(amqp_tls_cert=cert)
    for loopback in ("[::1]:5672", "localhost:5672", "127.0.0.2:5672"):
        assert _cfg(amqp_bind=loopback).amqp_bind == loopback


def test_amqp_users_need_password_hashes_never_plaintext(tmp_path: Path,
                                                         base_env: dict[str, str]) -> None:
    from meshq.amqp.auth import hash_password, verify_password
    stored = hash_password("s3cret", iterations=1000)
    assert verify_password(stored, "s3cret") and not verify_password(stored, "other")
    path = tmp_path / "meshq.toml"
    path.write_text(f'[amqp_users]\napp = "{stored}"\n')
    cfg = load_config(parse("--config", str(path)), base_env)
    assert cfg.amqp_users == {"app": stored}
    assert cfg.to_dict()["amqp_users"] == ["app"]  # status shows names, never hashes
    path.write_text('[amqp_users]\napp = "s3cret"\n')
    with pytest.raises(ConfigError, match="amqp_users: app: expected pbkdf2-sha256"):
        load_config(parse("--config", str(path)), base_env)
