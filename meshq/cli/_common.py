"""What ``meshq`` and ``meshq-ctl`` share: the socket option, error reporting, output.

Exit statuses are ``meshq.errors.EXIT_CODES`` (0 success, 2 usage, 1 anything else); an
error is one line on stderr that starts with its code, never a traceback.
"""

from __future__ import annotations

import argparse
import base64
import json
import math
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from meshq.client import Client
from meshq.config import resolve_socket
from meshq.errors import EXIT_CODES, MeshqError

__all__ = [
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "EXIT_OTHER",
    "QUEUE_COLUMNS",
    "add_socket_option",
    "cmd_queues",
    "connect",
    "exit_code",
    "format_table",
    "print_queues",
    "queue_rows",
    "report",
    "run",
    "to_json",
]

EXIT_OK = 0
EXIT_OTHER = 1
EXIT_INTERRUPTED = 130

QUEUE_COLUMNS: tuple[str, ...] = (
    "name", "ready", "leased", "delayed", "dead_lettered", "consumers")


def add_socket_option(parser: argparse.ArgumentParser, *, top: bool) -> None:
    """``--socket PATH``, accepted before the subcommand (``top``) and after it.

    The subcommand's copy defaults to SUPPRESS so that it does not overwrite a value
    given before the subcommand.
    """
    parser.add_argument(
        "--socket",
        metavar="PATH",
        default=None if top else argparse.SUPPRESS,
        help="daemon socket (default: $MESHQ_SOCKET, else the per-user default)",
    )


def connect(args: argparse.Namespace) -> Client:
    """A client on the socket chosen by the rule of SPEC section 5, retrying for
    ``args.retry_for`` seconds when the command has that option (else the client's
    default)."""
    return Client(resolve_socket(getattr(args, "socket", None)),
                  retry_for=getattr(args, "retry_for", None))


def exit_code(err: MeshqError) -> int:
    return EXIT_CODES.get(err.code, EXIT_OTHER)


def report(code: str, message: str) -> None:
    """One line on stderr: ``CODE: message``."""
    line = " ".join(f"{code}: {message}".split()) if message else code
    print(line, file=sys.stderr, flush=True)


def _silence_stdout() -> None:
    """After a broken pipe: point stdout at /dev/null so the exit flush cannot fail."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


def run(command: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """Run a subcommand, turning the errors a user can cause into exit statuses."""
    try:
        return command(args)
    except MeshqError as err:
        report(err.code, err.message)
        return exit_code(err)
    except BrokenPipeError:
        _silence_stdout()
        report("INTERNAL", "standard output closed")
        return EXIT_OTHER
    except OSError as err:
        report("INTERNAL", str(err))
        return EXIT_OTHER
    except KeyboardInterrupt:
        report("INTERRUPTED", "stopped by the user")
        return EXIT_INTERRUPTED


def _json_default(value: Any) -> Any:
    if isinstance(value, bytes | bytearray | memoryview):
        raw = bytes(value)
        try:
            return raw.decode()
        except UnicodeDecodeError:
            return {"b64": base64.b64encode(raw).decode("ascii")}
    if isinstance(value, set | frozenset | tuple):
        return list(value)
    return str(value)


def _plain(value: Any) -> Any:
    """``value`` with text keys only and no NaN or infinity (null instead), which
    ``json.dumps`` would write as invalid JSON or refuse."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k if k is None or isinstance(k, str | int) else _key(k): _plain(v)
                for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def _key(key: Any) -> str:
    text = _json_default(key)
    return text if isinstance(text, str) else json.dumps(text)


def to_json(value: Any, *, indent: int | None = None) -> str:
    """Valid JSON text for ``value`` with no bytes in it (UTF-8 bytes become strings,
    other bytes ``{"b64": ...}``; NaN and infinity become null; keys become strings)."""
    return json.dumps(_plain(value), indent=indent, default=_json_default,
                      ensure_ascii=False, allow_nan=False)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    return str(value)


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Left-aligned columns; numbers right-aligned; ``None`` shown as ``-``."""
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [max([len(h), *(len(r[i]) for r in cells)]) for i, h in enumerate(headers)]
    numeric = [
        bool(rows) and all(isinstance(r[i], int | float) and not isinstance(r[i], bool)
                           for r in rows)
        for i in range(len(headers))
    ]

    def line(values: Sequence[str]) -> str:
        parts = [v.rjust(w) if num else v.ljust(w)
                 for v, w, num in zip(values, widths, numeric, strict=True)]
        return "  ".join(parts).rstrip()

    return "\n".join([line(list(headers)), *(line(r) for r in cells)])


def queue_rows(queues: Sequence[dict[str, Any]]) -> list[list[Any]]:
    return [[q.get(col) for col in QUEUE_COLUMNS] for q in queues]


def print_queues(queues: Sequence[dict[str, Any]], *, as_json: bool) -> None:
    """The ``queues`` subcommand of both tools: a table, or a JSON array."""
    if as_json:
        print(to_json(list(queues), indent=2))
    elif queues:
        print(format_table(QUEUE_COLUMNS, queue_rows(queues)))
    else:
        print("no queues")


def cmd_queues(args: argparse.Namespace) -> int:
    with connect(args) as client:
        queues = client.stats()
    print_queues(queues, as_json=args.json)
    return EXIT_OK
