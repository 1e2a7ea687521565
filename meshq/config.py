"""Daemon configuration: the ``Config`` record, default paths, and ``load_config``.

Precedence is defaults < TOML file (``--config`` or ``MESHQ_CONFIG``) < ``MESHQ_*``
environment < command-line flags; ``resolve_socket`` is the socket rule all three CLIs share.
"""

from __future__ import annotations

import argparse
import ipaddress
import math
import os
import tempfile
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from socket import gethostname
from typing import Any

from meshq.mesh.ring import DEFAULT_VNODES
from meshq.model import MAX_PARTITIONS

__all__ = [
    "AMQP_OFF",
    "DEFAULT_AMQP_BIND",
    "DEFAULT_BIND",
    "DEFAULT_MAX_FRAME_BYTES",
    "DEFAULT_MAX_MESSAGE_BYTES",
    "LOG_LEVELS",
    "Config",
    "ConfigError",
    "add_daemon_arguments",
    "default_data_dir",
    "default_runtime_dir",
    "default_socket",
    "load_config",
    "parse_host_port",
    "resolve_socket",
]

DEFAULT_BIND = "127.0.0.1:7946"
DEFAULT_AMQP_BIND = "127.0.0.1:5672"
AMQP_OFF = "off"
MAX_VNODES = 4096  # a ring point costs memory and start-up time on every node
DEFAULT_MAX_FRAME_BYTES = 8 * 1024 * 1024
DEFAULT_MAX_MESSAGE_BYTES = 1024 * 1024
# Room for a few of the largest batches (64 MiB of bodies each) and the WAL behind them.
DEFAULT_DISK_FREE_LIMIT = 256 * 1024 * 1024
LOG_LEVELS: tuple[str, ...] = ("debug", "info", "warning", "error")

ENV_PREFIX = "MESHQ_"
CONFIG_ENV = "MESHQ_CONFIG"
SOCKET_ENV = "MESHQ_SOCKET"

# Parent of the per-user runtime directories (systemd-logind); a module constant so
# tests can point it elsewhere.
_RUN_USER = Path("/run/user")


class ConfigError(Exception):
    """A configuration value is missing, malformed or out of range.

    The message is one line and names the bad key and where it came from (file path and
    key, environment variable, or command-line flag).
    """


# --------------------------------------------------------------------------- defaults


def _env(environ: Mapping[str, str] | None) -> Mapping[str, str]:
    return os.environ if environ is None else environ


def default_data_dir(environ: Mapping[str, str] | None = None) -> Path:
    """``$XDG_DATA_HOME/meshq`` if that is set and absolute, else ``~/.local/share/meshq``."""
    xdg = _env(environ).get("XDG_DATA_HOME", "")
    if xdg and Path(xdg).is_absolute():
        return Path(xdg) / "meshq"
    return Path.home() / ".local" / "share" / "meshq"


def default_runtime_dir(environ: Mapping[str, str] | None = None) -> Path:
    """Directory for the daemon's socket.

    ``$XDG_RUNTIME_DIR/meshq`` if that is set, absolute and an existing directory; else
    ``/run/user/<uid>/meshq`` if ``/run/user/<uid>`` exists and is writable; else
    ``<tempdir>/meshq-<uid>``.
    """
    uid = os.getuid()
    xdg = _env(environ).get("XDG_RUNTIME_DIR", "")
    if xdg and Path(xdg).is_absolute() and Path(xdg).is_dir():
        return Path(xdg) / "meshq"
    run_user = _RUN_USER / str(uid)
    if run_user.is_dir() and os.access(run_user, os.W_OK | os.X_OK):
        return run_user / "meshq"
    return Path(tempfile.gettempdir()) / f"meshq-{uid}"


def default_socket(environ: Mapping[str, str] | None = None) -> Path:
    """``default_runtime_dir() / "meshq.sock"``."""
    return default_runtime_dir(environ) / "meshq.sock"


def _expand(value: str | os.PathLike[str]) -> Path:
    return Path(os.fspath(value)).expanduser()


def resolve_socket(flag: str | None, environ: Mapping[str, str] | None = None) -> Path:
    """The socket rule shared by meshqd, meshq and meshq-ctl.

    ``--socket`` flag if given, else ``$MESHQ_SOCKET`` if set and non-empty, else
    ``default_socket()``. ``~`` is expanded.
    """
    if flag:
        return _expand(flag)
    env = _env(environ)
    from_env = env.get(SOCKET_ENV, "")
    if from_env:
        return _expand(from_env)
    return default_socket(env)


# --------------------------------------------------------------------------- validation


def parse_host_port(value: str, *, allow_port_zero: bool = True) -> tuple[str, int]:
    """Split ``HOST:PORT`` (IPv6 as ``[::1]:7946``) into ``(host, port)``.

    Raises ``ValueError`` with a short reason if ``value`` is malformed.
    """
    host, sep, port_text = value.rpartition(":")
    if not sep:
        raise ValueError(f"expected HOST:PORT, got {value!r}")
    if host.startswith("[") or host.endswith("]"):
        if not (host.startswith("[") and host.endswith("]")):
            raise ValueError(f"unbalanced brackets in {value!r}")
        host = host[1:-1]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{host!r} in {value!r} is not an IPv6 address") from None
    elif ":" in host:
        raise ValueError(f"IPv6 addresses must be bracketed, as in [::1]:7946, got {value!r}")
    if not host or any(c.isspace() for c in host) or any(c in host for c in "[]/"):
        raise ValueError(f"bad host in {value!r}")
    if not (port_text.isascii() and port_text.isdigit()):
        raise ValueError(f"port must be a number in {value!r}")
    port = int(port_text)
    low = 0 if allow_port_zero else 1
    if not low <= port <= 65535:
        raise ValueError(f"port {port} out of range {low}-65535 in {value!r}")
    return host, port


def _check_positive_int(value: object) -> str | None:
    if not isinstance(value, int) or isinstance(value, bool):
        return f"expected an integer, got {type(value).__name__} {value!r}"
    if value <= 0:
        return f"must be a positive integer, got {value}"
    return None


def _check_opt_positive_int(value: object) -> str | None:
    return None if value is None else _check_positive_int(value)


def _check_partitions(value: object) -> str | None:
    problem = None if value is None else _check_positive_int(value)
    if problem is None and isinstance(value, int) and value > MAX_PARTITIONS:
        return f"must be at most {MAX_PARTITIONS}, got {value}"
    return problem


def _check_vnodes(value: object) -> str | None:
    problem = _check_positive_int(value)
    if problem is None and value > MAX_VNODES:  # type: ignore[operator]
        return f"must be at most {MAX_VNODES}, got {value}"
    return problem


def _check_positive_float(value: object) -> str | None:
    if not isinstance(value, int | float) or isinstance(value, bool):
        return f"expected a number, got {type(value).__name__} {value!r}"
    if not math.isfinite(value) or value <= 0:
        return f"must be a positive finite number, got {value!r}"
    return None


def _check_fraction(value: object) -> str | None:
    problem = _check_positive_float(value)
    if problem is None and value > 1:  # type: ignore[operator]
        return f"must be a fraction of memory, above 0 and at most 1, got {value!r}"
    return problem


def _check_name(value: object) -> str | None:
    if not isinstance(value, str):
        return f"expected a string, got {type(value).__name__} {value!r}"
    if not value.strip():
        return "must not be empty"
    return None


def _check_path(value: object) -> str | None:
    if not isinstance(value, Path):
        return f"expected a path, got {type(value).__name__} {value!r}"
    return None


def _check_opt_path(value: object) -> str | None:
    return None if value is None else _check_path(value)


def _check_bind(value: object) -> str | None:
    if not isinstance(value, str):
        return f"expected HOST:PORT as a string, got {type(value).__name__} {value!r}"
    try:
        parse_host_port(value)
    except ValueError as exc:
        return str(exc)
    return None


def _check_join(value: object) -> str | None:
    if not isinstance(value, tuple):
        return f"expected a tuple of HOST:PORT strings, got {type(value).__name__}"
    for item in value:
        if not isinstance(item, str):
            return f"expected HOST:PORT strings, got {type(item).__name__} {item!r}"
        try:
            parse_host_port(item, allow_port_zero=False)
        except ValueError as exc:
            return str(exc)
    return None


def _check_opt_name(value: object) -> str | None:
    return None if value is None else _check_name(value)


def _check_bool(value: object) -> str | None:
    if not isinstance(value, bool):
        return f"expected true or false, got {type(value).__name__} {value!r}"
    return None


def _check_socket_mode(value: object) -> str | None:
    if not isinstance(value, int) or isinstance(value, bool):
        return f"expected an octal integer such as 0o660, got {type(value).__name__} {value!r}"
    if not 0 <= value <= 0o777:
        return f"must be a permission mode from 0o000 to 0o777, got {oct(value)}"
    if value & 0o600 != 0o600:
        return f"must let the owner read and write (0o600 at least), got {oct(value)}"
    return None


def _check_opt_bind(value: object) -> str | None:
    return None if value is None else _check_bind(value)


def _check_amqp_bind(value: object) -> str | None:
    return None if value == AMQP_OFF else _check_bind(value)


def _check_int_range(low: int, high: int) -> Callable[[object], str | None]:
    def check(value: object) -> str | None:
        if not isinstance(value, int) or isinstance(value, bool):
            return f"expected an integer, got {type(value).__name__} {value!r}"
        if not low <= value <= high:
            return f"must be from {low} to {high}, got {value}"
        return None
    return check


def _check_amqp_users(value: object) -> str | None:
    from meshq.amqp.auth import check_hash
    if not isinstance(value, Mapping):
        return f"expected a table of user = \"password hash\", got {type(value).__name__}"
    for user, stored in value.items():
        if not isinstance(user, str) or not user:
            return f"bad user name {user!r}"
        problem = check_hash(stored)
        if problem is not None:
            return f"{user}: {problem}"
    return None


_PRINCIPAL_KINDS = ("uid", "gid", "user", "group", "amqp")


def _check_access(value: object) -> str | None:
    if not isinstance(value, Mapping):
        return f"expected a table of operation = [principals], got {type(value).__name__}"
    for op, principals in value.items():
        if not isinstance(op, str) or not op:
            return f"bad operation name {op!r}"
        if not isinstance(principals, tuple):
            return f"{op}: expected a list of principals, got {type(principals).__name__}"
        for item in principals:
            problem = _principal_problem(item)
            if problem is not None:
                return f"{op}: {problem}"
    return None


def _principal_problem(item: object) -> str | None:
    """None if ``item`` is ``*``, ``uid:N``, ``gid:N``, ``user:NAME``, ``group:NAME`` or
    ``amqp:NAME`` (an AMQP login)."""
    if item == "*":
        return None
    if not isinstance(item, str):
        return f"expected a principal string, got {type(item).__name__} {item!r}"
    kind, sep, rest = item.partition(":")
    if not sep or kind not in _PRINCIPAL_KINDS or not rest:
        return (f"bad principal {item!r}: expected '*', 'uid:N', 'gid:N', 'user:NAME', "
                "'group:NAME' or 'amqp:NAME'")
    if kind in ("uid", "gid") and not (rest.isascii() and rest.isdigit()):
        return f"bad principal {item!r}: {kind} must be a number"
    return None


def _check_log_level(value: object) -> str | None:
    if value not in LOG_LEVELS:
        return f"must be one of {', '.join(LOG_LEVELS)}, got {value!r}"
    return None


_CHECKS: dict[str, Callable[[object], str | None]] = {
    "node_name": _check_name,
    "cluster_name": _check_name,
    "ntp_server": _check_opt_name,
    "data_dir": _check_path,
    "socket": _check_path,
    "bind": _check_bind,
    "join": _check_join,
    "cluster_key_file": _check_opt_path,
    "max_frame_bytes": _check_positive_int,
    "max_message_bytes": _check_positive_int,
    "dedup_window": _check_positive_float,
    "disk_free_limit": _check_int_range(0, 1 << 62),
    "memory_high_watermark": _check_fraction,
    "max_clock_offset_ms": _check_positive_int,
    "max_connections": _check_positive_int,
    "allow_unkeyed_bind": _check_bool,
    "socket_mode": _check_socket_mode,
    "socket_group": _check_opt_name,
    "access": _check_access,
    "client_frame_timeout": _check_positive_float,
    "max_inflight_requests": _check_positive_int,
    "udp_packets_per_second": _check_positive_int,
    "metrics_bind": _check_opt_bind,
    "amqp_bind": _check_amqp_bind,
    "amqp_users": _check_amqp_users,
    "amqp_tls_cert": _check_opt_path,
    "amqp_tls_key": _check_opt_path,
    "allow_plaintext_amqp": _check_bool,
    "amqp_max_connections": _check_positive_int,
    "amqp_channel_max": _check_int_range(1, 65535),
    "amqp_frame_max": _check_int_range(4096, 16 * 1024 * 1024),
    "amqp_heartbeat": _check_int_range(0, 65535),
    "amqp_max_unconfirmed": _check_positive_int,
    "amqp_handshake_timeout": _check_positive_float,
    "vnodes": _check_vnodes,
    "write_quorum": _check_opt_positive_int,
    "default_partitions": _check_partitions,
    "log_level": _check_log_level,
}


def _size_problem(max_message_bytes: int, max_frame_bytes: int) -> str | None:
    if max_message_bytes >= max_frame_bytes:
        return (
            f"max_message_bytes ({max_message_bytes}) must be less than "
            f"max_frame_bytes ({max_frame_bytes})"
        )
    return None


def _amqp_problem(c: Config) -> str | None:
    if (c.amqp_tls_cert is None) != (c.amqp_tls_key is None):
        return "amqp_tls_cert and amqp_tls_key go together"
    if c.amqp_bind == AMQP_OFF or c.amqp_tls_cert is not None or c.allow_plaintext_amqp:
        return None
    host, _ = parse_host_port(c.amqp_bind)
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = host == "localhost"
    if loopback:
        return None
    return (f"amqp_bind {c.amqp_bind} is not a loopback address: set amqp_tls_cert and "
            "amqp_tls_key (AMQPS, port 5671 by convention), or allow_plaintext_amqp = true "
            "to accept that logins and messages cross the network in the clear")


# --------------------------------------------------------------------------- Config


@dataclass(frozen=True)
class Config:
    """Everything meshqd needs to start. Construction validates every field."""

    node_name: str = field(default_factory=gethostname)
    cluster_name: str = "meshq"  # peers of another cluster name are refused
    ntp_server: str | None = None  # optional NTP check of this node's clock
    data_dir: Path = field(default_factory=default_data_dir)
    socket: Path = field(default_factory=default_socket)
    bind: str = DEFAULT_BIND
    join: tuple[str, ...] = ()
    cluster_key_file: Path | None = None
    max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    dedup_window: float = 300.0
    # Resource alarms (meshq/resources.py): sends are refused under this much free disk
    # space, or with the daemon's memory over this fraction of the machine's.
    disk_free_limit: int = DEFAULT_DISK_FREE_LIMIT
    memory_high_watermark: float = 0.4
    max_clock_offset_ms: int = 500
    max_connections: int = 1024
    # Binding a non-loopback address with no cluster key needs this opt-out.
    allow_unkeyed_bind: bool = False
    # The client socket: its mode, its group, and which principals may run which
    # operations (operation -> ("uid:0", "group:admins", ...); operations not listed are
    # open to everyone who can open the socket).
    socket_mode: int = 0o660
    socket_group: str | None = None
    access: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    # Hostile-input limits: seconds a client may take to finish a frame it has begun,
    # and UDP packets a second taken from one source address before the rest are dropped.
    client_frame_timeout: float = 30.0
    max_inflight_requests: int = 4096  # per connection; past it, its requests wait
    udp_packets_per_second: int = 2000
    # Prometheus text endpoint, HOST:PORT (loopback is the sane choice); None: off.
    metrics_bind: str | None = None
    # AMQP 0-9-1 (docs/amqp.md): HOST:PORT or "off"; users (name -> password hash from
    # meshq-ctl hash-password; guest/guest works from loopback while none is named
    # guest); TLS certificate and key (a non-loopback bind needs them, or the opt-out);
    # limits per connection.
    amqp_bind: str = DEFAULT_AMQP_BIND
    amqp_users: Mapping[str, str] = field(default_factory=dict)
    amqp_tls_cert: Path | None = None
    amqp_tls_key: Path | None = None
    allow_plaintext_amqp: bool = False
    amqp_max_connections: int = 1024
    amqp_channel_max: int = 2047
    amqp_frame_max: int = 131072
    amqp_heartbeat: int = 60
    amqp_max_unconfirmed: int = 10_000
    amqp_handshake_timeout: float = 10.0
    # Placement: points per node on the ring (the same on every node), and the default
    # write quorum of queues that set none (None: a majority of their replicas).
    vnodes: int = DEFAULT_VNODES
    write_quorum: int | None = None
    # Partitions of queues declared without the option (None: 1 on a lone node, else
    # twice the members, at most 16; a fifo queue, or one that expires, gets 1).
    default_partitions: int | None = None
    log_level: str = "info"

    def __post_init__(self) -> None:
        for name, check in _CHECKS.items():
            problem = check(getattr(self, name))
            if problem is not None:
                raise ConfigError(f"{name}: {problem}")
        problem = _size_problem(self.max_message_bytes, self.max_frame_bytes)
        if problem is not None:
            raise ConfigError(problem)
        problem = _amqp_problem(self)
        if problem is not None:
            raise ConfigError(problem)
        for name in _FLOAT_FIELDS:
            if isinstance(getattr(self, name), int):
                object.__setattr__(self, name, float(getattr(self, name)))

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly view (paths as str, ``join`` as a list), for status output;
        ``amqp_users`` as the users' names (never their password hashes)."""
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "amqp_users":
                value = sorted(value)
            elif isinstance(value, Path):
                value = str(value)
            elif isinstance(value, tuple):
                value = list(value)
            elif isinstance(value, Mapping):
                value = {k: list(v) for k, v in value.items()}
            out[f.name] = value
        return out


_FIELD_NAMES: tuple[str, ...] = tuple(f.name for f in fields(Config))
assert set(_FIELD_NAMES) == set(_CHECKS), "every Config field needs a check"

# How each field is spelled on the command line (attribute name on the Namespace, flag).
_FLAGS: dict[str, str] = {
    "data_dir": "--data-dir",
    "socket": "--socket",
    "node_name": "--node-name",
    "bind": "--bind",
    "amqp_bind": "--amqp-bind",
    "join": "--join",
    "cluster_key_file": "--cluster-key-file",
    "log_level": "--log-level",
}

_PATH_FIELDS = frozenset({"data_dir", "socket", "cluster_key_file", "amqp_tls_cert",
                          "amqp_tls_key"})
_INT_FIELDS = frozenset(
    {"max_frame_bytes", "max_message_bytes", "max_clock_offset_ms", "max_connections",
     "vnodes", "write_quorum", "default_partitions", "udp_packets_per_second",
     "max_inflight_requests",
     "amqp_max_connections", "amqp_channel_max", "amqp_frame_max", "amqp_heartbeat",
     "amqp_max_unconfirmed", "disk_free_limit"}
)
_BOOL_FIELDS = frozenset({"allow_unkeyed_bind", "allow_plaintext_amqp"})
_FLOAT_FIELDS = frozenset({"dedup_window", "client_frame_timeout", "amqp_handshake_timeout",
                           "memory_high_watermark"})
_BOOL_TEXT = {"true": True, "yes": True, "1": True, "on": True,
              "false": False, "no": False, "0": False, "off": False}


# --------------------------------------------------------------------------- argparse


def add_daemon_arguments(parser: argparse.ArgumentParser) -> None:
    """Add meshqd's configuration flags to ``parser``; every default is ``None``."""
    parser.add_argument(
        "--config",
        metavar="FILE",
        default=None,
        help="TOML configuration file (default: $MESHQ_CONFIG, else none)",
    )
    parser.add_argument(
        "--data-dir", metavar="DIR", default=None, help="directory for the replica database"
    )
    parser.add_argument(
        "--socket",
        metavar="PATH",
        default=None,
        help="local client socket (default: $MESHQ_SOCKET, else per-user)",
    )
    parser.add_argument(
        "--node-name",
        metavar="NAME",
        default=None,
        help="this node's name in the cluster (default: host name)",
    )
    parser.add_argument(
        "--bind",
        metavar="HOST:PORT",
        default=None,
        help=f"peer listen address (default: {DEFAULT_BIND})",
    )
    parser.add_argument(
        "--amqp-bind",
        metavar="HOST:PORT",
        default=None,
        help=f"AMQP 0-9-1 listen address, or 'off' (default: {DEFAULT_AMQP_BIND})",
    )
    parser.add_argument(
        "--join",
        metavar="HOST:PORT",
        action="append",
        default=None,
        help="seed peer to join; may be repeated",
    )
    parser.add_argument(
        "--cluster-key-file",
        metavar="FILE",
        default=None,
        help="file holding the shared cluster key",
    )
    parser.add_argument(
        "--log-level",
        metavar="LEVEL",
        default=None,
        type=str.lower,
        choices=LOG_LEVELS,
        help=f"one of {', '.join(LOG_LEVELS)}",
    )


# --------------------------------------------------------------------------- layers

# A layer maps field name -> (value, label); the label names where the value came from.
_Layer = dict[str, tuple[Any, str]]


def _text_to_value(name: str, text: str) -> Any:
    """Convert a string from the environment or a flag to ``name``'s type."""
    text = text.strip()
    if name in _PATH_FIELDS:
        if not text:
            raise ValueError("path must not be empty")
        return _expand(text)
    if name in _INT_FIELDS:
        try:
            return int(text, 10)
        except ValueError:
            raise ValueError(f"expected an integer, got {text!r}") from None
    if name in _FLOAT_FIELDS:
        try:
            return float(text)
        except ValueError:
            raise ValueError(f"expected a number, got {text!r}") from None
    if name == "join":
        return tuple(item.strip() for item in text.split(",") if item.strip())
    if name in _BOOL_FIELDS:
        if text.lower() not in _BOOL_TEXT:
            raise ValueError(f"expected true or false, got {text!r}")
        return _BOOL_TEXT[text.lower()]
    if name == "socket_mode":
        try:
            return int(text.removeprefix("0o"), 8)
        except ValueError:
            raise ValueError(f"expected an octal mode such as 0660, got {text!r}") from None
    if name == "access":
        raise ValueError("set access rules in the config file, not the environment")
    if name == "amqp_users":
        raise ValueError("set AMQP users in the config file, not the environment")
    if name == "log_level":
        return text.lower()
    return text


def _toml_to_value(name: str, value: Any) -> Any:
    """Check a TOML value's type and convert it to ``name``'s type."""
    got = f"got {type(value).__name__} {value!r}"
    if name in _PATH_FIELDS:
        if not isinstance(value, str):
            raise ValueError(f"expected a path string, {got}")
        if not value.strip():
            raise ValueError("path must not be empty")
        return _expand(value.strip())
    if name in _INT_FIELDS:
        if not isinstance(value, int) or isinstance(value, bool):
            raise ValueError(f"expected an integer, {got}")
        return value
    if name in _FLOAT_FIELDS:
        if not isinstance(value, int | float) or isinstance(value, bool):
            raise ValueError(f"expected a number, {got}")
        return float(value)
    if name == "join":
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ValueError(f"expected a list of HOST:PORT strings, {got}")
        return tuple(v.strip() for v in value)
    if name in _BOOL_FIELDS:
        if not isinstance(value, bool):
            raise ValueError(f"expected true or false, {got}")
        return value
    if name == "socket_mode":
        if not isinstance(value, int) or isinstance(value, bool):
            raise ValueError(f"expected an octal integer such as 0o660, {got}")
        return value
    if name == "access":
        if not isinstance(value, dict):
            raise ValueError(f"expected a table such as [access], {got}")
        rules: dict[str, tuple[str, ...]] = {}
        for op, principals in value.items():
            if not isinstance(principals, list):
                raise ValueError(f"{op}: expected a list of principals, got "
                                 f"{type(principals).__name__} {principals!r}")
            rules[op] = tuple(principals)
        return rules
    if name == "amqp_users":
        if not isinstance(value, dict):
            raise ValueError(f"expected a table such as [amqp_users], {got}")
        return dict(value)
    if not isinstance(value, str):
        raise ValueError(f"expected a string, {got}")
    return value.lower() if name == "log_level" else value


def _file_layer(path: Path, how: str) -> _Layer:
    try:
        with path.open("rb") as fh:
            data = tomllib.load(fh)
    except OSError as exc:
        raise ConfigError(
            f"cannot read config file {path} (from {how}): {exc.strerror or exc}"
        ) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from None

    unknown = sorted(k for k in data if k not in _FIELD_NAMES and k != "seeds")
    if unknown:
        raise ConfigError(
            f"{path}: unknown key{'s' if len(unknown) > 1 else ''}: {', '.join(unknown)} "
            f"(known: {', '.join((*_FIELD_NAMES, 'seeds'))})"
        )
    if "seeds" in data and "join" in data:
        raise ConfigError(f"{path}: seeds, join: give only one of them (they are the same key)")

    layer: _Layer = {}
    for key, raw in data.items():
        name = "join" if key == "seeds" else key
        label = f"{path}: {key}"
        try:
            layer[name] = (_toml_to_value(name, raw), label)
        except ValueError as exc:
            raise ConfigError(f"{label}: {exc}") from None
    return layer


def _env_layer(env: Mapping[str, str]) -> _Layer:
    layer: _Layer = {}
    for name in _FIELD_NAMES:
        var = ENV_PREFIX + name.upper()
        text = env.get(var, "")
        if not text.strip():
            continue  # unset and empty are the same
        try:
            layer[name] = (_text_to_value(name, text), var)
        except ValueError as exc:
            raise ConfigError(f"{var}: {exc}") from None
    return layer


def _flag_layer(args: argparse.Namespace) -> _Layer:
    layer: _Layer = {}
    for name, flag in _FLAGS.items():
        raw = getattr(args, name, None)
        if raw is None:
            continue
        try:
            if name == "join":
                items = [os.fspath(x).strip() for x in raw]
                layer[name] = (tuple(x for x in items if x), flag)
            else:
                layer[name] = (_text_to_value(name, os.fspath(raw)), flag)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{flag}: {exc}") from None
    return layer


def _config_file(
    args: argparse.Namespace | None, env: Mapping[str, str]
) -> tuple[Path, str] | None:
    flag = getattr(args, "config", None) if args is not None else None
    if flag:
        return _expand(flag), "--config"
    from_env = env.get(CONFIG_ENV, "")
    if from_env.strip():
        return _expand(from_env.strip()), CONFIG_ENV
    return None


def load_config(
    args: argparse.Namespace | None = None, environ: Mapping[str, str] | None = None
) -> Config:
    """Build the daemon's ``Config`` from defaults < TOML file < ``MESHQ_*`` env < flags.

    The file is ``--config`` or else ``$MESHQ_CONFIG``; with neither there is no file.
    ``environ`` defaults to ``os.environ`` and is also what the XDG defaults read.
    ``args`` may come from any parser: flags it lacks count as not given.
    Raises ``ConfigError`` naming the offending key and its source.
    """
    env = _env(environ)
    merged: _Layer = {}
    chosen = _config_file(args, env)
    if chosen is not None:
        merged.update(_file_layer(*chosen))
    merged.update(_env_layer(env))
    if args is not None:
        merged.update(_flag_layer(args))

    values: dict[str, Any] = {}
    for name in _FIELD_NAMES:
        if name in merged:
            value, label = merged[name]
            problem = _CHECKS[name](value)
            if problem is not None:
                raise ConfigError(f"{label}: {problem}")
            values[name] = value
    # Computed only when needed: they look at the host and the file system.
    if "node_name" not in values:
        values["node_name"] = gethostname()
    if "data_dir" not in values:
        values["data_dir"] = default_data_dir(env)
    if "socket" not in values:
        values["socket"] = default_socket(env)

    msg = values.get("max_message_bytes", DEFAULT_MAX_MESSAGE_BYTES)
    frame = values.get("max_frame_bytes", DEFAULT_MAX_FRAME_BYTES)
    problem = _size_problem(msg, frame)
    if problem is not None:
        where = [
            f"{n} from {merged[n][1]}"
            for n in ("max_message_bytes", "max_frame_bytes")
            if n in merged
        ]
        raise ConfigError(f"{problem} ({'; '.join(where) or 'defaults'})")
    return Config(**values)
