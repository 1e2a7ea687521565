"""``meshq-ctl``: the status of this node and its cluster, as a table or as ``--json``.

The JSON is the daemon's status map as it is (with any bytes made text); the table is
for people and may change. Errors and exit statuses are those of ``meshq.cli._common``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from meshq._version import __version__
from meshq.cli._common import (
    EXIT_OK,
    QUEUE_COLUMNS,
    add_socket_option,
    cmd_queues,
    connect,
    format_table,
    queue_rows,
    run,
    to_json,
)

__all__ = ["build_parser", "format_status", "main"]

MEMBER_COLUMNS = ("name", "address", "state", "incarnation", "clock_offset_ms", "rtt_ms",
                  "last_seen_s")
PLACEMENT_COLUMNS = ("primary", "holders")  # status adds these to each queue's row


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="meshq-ctl", description="Status of the local meshqd and its cluster.")
    parser.add_argument("--version", action="version", version=f"meshq-ctl {__version__}")
    add_socket_option(parser, top=True)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("status", help="node, members, queues and store",
                       description="node, members, queues and store")
    add_socket_option(p, top=False)
    p.add_argument("--json", action="store_true", help="the status map as JSON")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("members", help="the cluster's members as this node sees them",
                       description="the cluster's members as this node sees them")
    add_socket_option(p, top=False)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_members)

    p = sub.add_parser("ring", help="the share of the ring each live member owns",
                       description="the share of the ring each live member owns")
    add_socket_option(p, top=False)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_ring)

    p = sub.add_parser("leave", help="leave the cluster gracefully and stop the daemon",
                       description="leave the cluster gracefully and stop the daemon")
    add_socket_option(p, top=False)
    p.set_defaults(func=cmd_leave)

    p = sub.add_parser("queues", help="list queues and their counts",
                       description="list queues and their counts")
    add_socket_option(p, top=False)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_queues)
    return parser


# --------------------------------------------------------------------------- formatting


def _duration(seconds: Any) -> str:
    if not isinstance(seconds, int | float):
        return "-"
    whole = int(seconds)
    days, rest = divmod(whole, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d{hours:02d}h{minutes:02d}m"
    if hours:
        return f"{hours}h{minutes:02d}m{secs:02d}s"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{seconds:.1f}s"


def _hlc(hlc: Any) -> str:
    if not isinstance(hlc, dict):
        return "-" if hlc is None else str(hlc)
    wall, logical = hlc.get("wall_ms"), hlc.get("logical")
    if not isinstance(wall, int):
        return str(hlc.get("raw", "-"))
    when = datetime.fromtimestamp(wall / 1000, UTC).isoformat(timespec="milliseconds")
    return f"{when.replace('+00:00', 'Z')} +{logical} (raw {hlc.get('raw', '-')})"


def _size(n: Any) -> str:
    if not isinstance(n, int):
        return "-"
    value, unit = float(n), "B"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            break
        value /= 1024
    return f"{n} B" if unit == "B" else f"{value:.1f} {unit} ({n} B)"


def _writes(node: dict[str, Any]) -> str:
    if node.get("accepting_writes"):
        return "yes"
    return f"NO: {node.get('not_accepting_reason') or 'no reason given'}"


def _pairs(pairs: Sequence[tuple[str, str]]) -> str:
    width = max(len(k) for k, _ in pairs)
    return "\n".join(f"  {k.ljust(width)}  {v}" for k, v in pairs)


def _indent(text: str) -> str:
    return "\n".join("  " + line for line in text.splitlines())


def format_status(status: dict[str, Any]) -> str:
    """The ``status`` table: node, members, queues, replication, store."""
    node = status.get("node") or {}
    parts = ["node", _pairs([
        ("name", str(node.get("name", "-"))),
        ("id", str(node.get("id", "-"))),
        ("address", str(node.get("address", "-"))),
        ("version", str(node.get("version", "-"))),
        ("uptime", _duration(node.get("uptime_s"))),
        ("hlc", _hlc(node.get("hlc"))),
        ("accepting writes", _writes(node)),
    ])]
    members = status.get("members") or []
    parts += ["", "members", _indent(format_table(
        MEMBER_COLUMNS, [[m.get(c) for c in MEMBER_COLUMNS] for m in members]))]
    queues = status.get("queues") or []
    parts += ["", "queues"]
    rows = [[*row, q.get("primary"), ",".join(q.get("holders") or [])]
            for row, q in zip(queue_rows(queues), queues, strict=True)]
    parts.append(_indent(format_table(QUEUE_COLUMNS + PLACEMENT_COLUMNS, rows)) if queues
                 else "  (none)")
    repl = status.get("replication")
    if isinstance(repl, dict):
        repaired = repl.get("repaired") or {}
        parts += ["", "replication", _pairs([
            ("hinted messages", str(repl.get("hinted_messages", "-"))),
            ("taking over", ", ".join(repl.get("taking_over") or []) or "-"),
            ("waiting batches", str(repl.get("waiting_batches", "-"))),
            ("failed quorums", str(repl.get("failed_quorums", "-"))),
            ("repair rounds", str(repl.get("repair_rounds", "-"))),
            ("repaired", ", ".join(f"{k} {v}" for k, v in repaired.items()) or "-"),
            ("links", ", ".join(repl.get("links") or []) or "-"),
        ])]
    store = status.get("store") or {}
    parts += ["", "store", _pairs([
        ("path", str(store.get("path") or "-")),
        ("size", _size(store.get("size_bytes"))),
    ])]
    return "\n".join(parts)


# --------------------------------------------------------------------------- commands


def cmd_status(args: argparse.Namespace) -> int:
    with connect(args) as client:
        status = client.status()
    print(to_json(status, indent=2) if args.json else format_status(status))
    return EXIT_OK


def cmd_members(args: argparse.Namespace) -> int:
    with connect(args) as client:
        members = client.status().get("members") or []
    if args.json:
        print(to_json(members, indent=2))
    else:
        print(format_table(MEMBER_COLUMNS, [[m.get(c) for c in MEMBER_COLUMNS]
                                            for m in members]))
    return EXIT_OK


def cmd_ring(args: argparse.Namespace) -> int:
    with connect(args) as client:
        ring = client.status().get("ring") or {}
    if args.json:
        print(to_json(ring, indent=2))
        return EXIT_OK
    primary = ring.get("ownership") or {}
    replicas = ring.get("replica_ownership_n3") or {}
    rows = [[name, f"{100 * share:.1f}%", f"{100 * replicas.get(name, 0.0):.1f}%"]
            for name, share in primary.items()]
    print(format_table(("name", "primary", "replica (N=3)"), rows))
    print(f"\n{ring.get('vnodes_per_node')} virtual nodes per member; placement is not "
          "used for data yet (replication comes with the mesh)")
    return EXIT_OK


def cmd_leave(args: argparse.Namespace) -> int:
    with connect(args) as client:
        client.request("leave")
    print("leaving the cluster; the daemon stops once the news has spread")
    return EXIT_OK



def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run(args.func, args)


if __name__ == "__main__":
    sys.exit(main())
