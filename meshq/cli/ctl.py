"""``meshq-ctl``: the status of this node and its cluster, as a table or as ``--json``.

Every command prints a table for people (it may change) or, with ``--json``, one JSON
value documented field by field in docs/ctl-json.md (any bytes made text). The tables
tolerate missing status sections, so an older or newer daemon still gets a table.
Errors and exit statuses are those of ``meshq.cli._common``.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Sequence
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
from meshq.cli._keys import KEY_ACTIONS, cmd_keys, cmd_keys_generate
from meshq.cluster.moves import fraction
from meshq.errors import Timeout

__all__ = ["add_command", "add_group", "build_parser", "clock_view", "format_clock",
           "format_rebalance", "format_status", "main", "progress_bar", "progress_line"]

Command = Callable[[argparse.Namespace], int]
SubParsers = Any  # argparse's _SubParsersAction, private in typeshed

MEMBER_COLUMNS = ("name", "address", "state", "incarnation", "clock_offset_ms", "rtt_ms",
                  "last_seen_s")
PEER_CLOCK_COLUMNS = ("name", "address", "state", "clock_offset_ms", "rtt_ms", "last_seen_s")
PLACEMENT_COLUMNS = ("primary", "holders")  # status adds these to each queue's row
PARTITION_COUNTS = ("ready", "leased", "delayed")  # per partition, of partitioned queues
MOVE_COLUMNS = ("queue", "index", "kind", "from", "to", "phase", "messages_done",
                "messages_total", "age_s")
BAR_WIDTH = 40
CLEAR = "\x1b[H\x1b[J"  # cursor home, clear to the end: a --watch redraw on a terminal
# Sections the status table shows in its own way (or leaves to another command); any
# other section is shown generically under its name.
KNOWN_SECTIONS = frozenset({"node", "members", "mesh", "clock", "ring", "queues",
                            "replication", "rebalance", "store", "security"})


# --------------------------------------------------------------------------- parser


def add_command(sub: SubParsers, name: str, help: str, func: Command, *,
                json: bool = True) -> argparse.ArgumentParser:
    """Add ``name`` (with ``--socket`` and, unless ``json`` is false, ``--json``) to a
    subparsers group; returns its parser for command-specific arguments."""
    p: argparse.ArgumentParser = sub.add_parser(name, help=help, description=help)
    add_socket_option(p, top=False)
    if json:
        p.add_argument("--json", action="store_true",
                       help="print JSON (docs/ctl-json.md) instead of a table")
    p.set_defaults(func=func)
    return p


def add_group(sub: SubParsers, name: str, help: str) -> SubParsers:
    """Add a command with subcommands of its own (``meshq-ctl NAME SUBCOMMAND``);
    returns the group's subparsers, for ``add_command``."""
    p: argparse.ArgumentParser = sub.add_parser(name, help=help, description=help)
    return p.add_subparsers(dest=f"{name}_command", metavar="SUBCOMMAND", required=True)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="meshq-ctl", description="Status of the local meshqd and its cluster.")
    parser.add_argument("--version", action="version", version=f"meshq-ctl {__version__}")
    add_socket_option(parser, top=True)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    add_command(sub, "status", "node, members, mesh, queues, replication, store and more",
                cmd_status)
    add_command(sub, "members", "the cluster's members as this node sees them", cmd_members)
    add_command(sub, "ring", "the share of the ring each live member owns", cmd_ring)
    add_command(sub, "queues", "list queues and their cluster-wide counts", cmd_queues)
    add_command(sub, "clock", "this node's clock, its offsets to its peers, and whether "
                "it accepts writes", cmd_clock)
    keys = add_group(sub, "keys", "the cluster key ring, on every live member")
    add_command(keys, "generate", "print a new random key (no daemon needed)",
                cmd_keys_generate, json=False)
    for action, text in KEY_ACTIONS.items():
        p = add_command(keys, action, text, cmd_keys)
        if action != "list":
            p.add_argument("key", help="the key, base64" + (
                "" if action == "install" else ", or its fingerprint")
                + "; - reads it from stdin (not shown by ps)")
    p = add_command(sub, "rebalance", "partitions moving after a join or leave, and their "
                    "progress, cluster-wide", cmd_rebalance)
    p.add_argument("--watch", action="store_true",
                   help="redraw until nothing moves, then exit 0 (with --json: one JSON "
                   "object per line per poll)")
    p.add_argument("--interval", type=_positive, default=1.0, metavar="S",
                   help="seconds between polls with --watch (default 1)")
    p.add_argument("--timeout", type=_positive, default=None, metavar="S",
                   help="with --watch: give up after S seconds, exit 6 (TIMEOUT)")
    add_command(sub, "leave", "leave the cluster gracefully and stop the daemon", cmd_leave)
    add_command(sub, "hash-password", "read an AMQP user's password from stdin and print "
                "its hash for [amqp_users] (no daemon needed)", cmd_hash_password, json=False)
    return parser


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"not a positive number of seconds: {text!r}")
    return value


# --------------------------------------------------------------------------- formatting


def _section(status: dict[str, Any], name: str) -> dict[str, Any]:
    value = status.get(name)
    return value if isinstance(value, dict) else {}


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def _dicts(value: Any) -> list[dict[str, Any]]:
    return [v for v in _list(value) if isinstance(v, dict)]


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


def _iso(wall_ms: Any) -> str | None:
    """``wall_ms`` (ms since the epoch) as ISO 8601 UTC; None if not a positive int."""
    if not isinstance(wall_ms, int) or isinstance(wall_ms, bool) or wall_ms <= 0:
        return None
    try:
        when = datetime.fromtimestamp(wall_ms / 1000, UTC)
    except (OverflowError, OSError, ValueError):
        return None
    return when.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _hlc(hlc: Any) -> str:
    if not isinstance(hlc, dict):
        return "-" if hlc is None else str(hlc)
    if hlc.get("raw") == 0:
        return "none yet (no message stamped)"
    when = _iso(hlc.get("wall_ms"))
    if when is None:
        return _text(hlc.get("raw"))
    return f"{when} +{hlc.get('logical')} (raw {hlc.get('raw', '-')})"


def _ms(value: Any, *, signed: bool = True) -> str:
    if not isinstance(value, int | float) or isinstance(value, bool):
        return "-"
    return f"{value + 0.0:+.3f} ms" if signed else f"{value:g} ms"


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
    if node.get("accepting_writes") is None:
        return "-"
    if node.get("accepting_writes"):
        return "yes"
    return f"NO: {node.get('not_accepting_reason') or 'no reason given'}"


def _text(value: Any) -> str:
    """One value on one line: ``-`` for none, lists joined, small maps as ``k v``."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, list):
        return ", ".join(_text(v) for v in value) or "-"
    if isinstance(value, dict):
        return ", ".join(f"{k} {_text(v)}" for k, v in value.items()) or "-"
    return str(value)


def _pairs(pairs: Sequence[tuple[str, str]]) -> str:
    width = max(len(k) for k, _ in pairs)
    return "\n".join(f"  {k.ljust(width)}  {v}" for k, v in pairs)


def _indent(text: str) -> str:
    return "\n".join("  " + line if line else "" for line in text.splitlines())


def _generic(value: Any) -> str:
    """An unknown status section: a map as ``key value`` lines, a list of maps as a table."""
    if isinstance(value, dict):
        pairs = [(str(k).replace("_", " "), _text(v)) for k, v in value.items()]
        return _pairs(pairs) if pairs else "  (empty)"
    rows = _dicts(value)
    if rows and len(rows) == len(value):
        columns = list(dict.fromkeys(k for r in rows for k in r))
        return _indent(format_table(columns, [[_text(r.get(c)) for c in columns]
                                              for r in rows]))
    return _indent(_text(value))


def status_warnings(status: dict[str, Any]) -> list[str]:
    """What an operator must see first: refused writes and every section's warnings."""
    node = _section(status, "node")
    out = [] if node.get("accepting_writes", True) else [
        str(node.get("not_accepting_reason") or "this node accepts no writes")]
    for section in status.values():
        if isinstance(section, dict):
            out += [str(w) for w in _list(section.get("warnings"))]
    return out


def _security(sec: dict[str, Any]) -> str:
    return _pairs([
        ("keyed", _text(sec.get("keyed"))),
        ("primary key", _text(sec.get("primary_key"))),
        ("keys", _text(sec.get("keys"))),
        ("rejected packets", _text(_section(sec, "rejected_packets"))),
        ("rejected streams", _text(_section(sec, "rejected_streams"))),
    ])


def _moving(partition: dict[str, Any]) -> str:
    """A partition's moves under way, ``copy a->c 20/50`` each; ``-`` when none."""
    return ", ".join(f"{m.get('kind')} {m.get('from') or '*'}->{m.get('to') or '?'} "
                     f"{_count(m.get('messages_done'))}/{_count(m.get('messages_total'))}"
                     for m in _dicts(partition.get("moves"))) or "-"


def format_status(status: dict[str, Any]) -> str:
    """The ``status`` table: warnings first, then node, members, mesh, queues,
    replication, store, security, and any other section generically."""
    parts = [f"WARNING: {w}" for w in status_warnings(status)]
    if parts:
        parts.append("")
    node = _section(status, "node")
    parts += ["node", _pairs([
        ("name", _text(node.get("name"))),
        ("id", _text(node.get("id"))),
        ("address", _text(node.get("address"))),
        ("version", _text(node.get("version"))),
        ("uptime", _duration(node.get("uptime_s"))),
        ("hlc", _hlc(node.get("hlc"))),
        ("accepting writes", _writes(node)),
    ])]
    members = _dicts(status.get("members"))
    parts += ["", "members", _indent(format_table(
        MEMBER_COLUMNS, [[m.get(c) for c in MEMBER_COLUMNS] for m in members]))]
    mesh = _section(status, "mesh")
    if mesh:
        parts += ["", "mesh", _pairs([
            ("cluster", _text(mesh.get("cluster"))),
            ("health score", _text(mesh.get("health_score"))),
            ("median clock offset", _ms(mesh.get("median_clock_offset_ms"))),
            ("bad packets", _text(mesh.get("bad_packets"))),
            ("bad streams", _text(mesh.get("bad_streams"))),
        ])]
    queues = _dicts(status.get("queues"))
    parts += ["", "queues"]
    rows = []
    spread: list[list[Any]] = []  # the partitions of queues of several
    for row, q in zip(queue_rows(queues), queues, strict=True):
        each = _dicts(q.get("partitions"))
        if len(each) > 1:
            rows.append([*row, f"({len(each)} partitions)", ""])
            spread += [[q.get("name"), p.get("index"), p.get("primary"),
                        ",".join(map(str, _list(p.get("holders")))),
                        *(p.get(c) for c in PARTITION_COUNTS), _moving(p)] for p in each]
        else:
            rows.append([*row, q.get("primary"), ",".join(map(str, _list(q.get("holders"))))])
    parts.append(_indent(format_table(QUEUE_COLUMNS + PLACEMENT_COLUMNS, rows)) if queues
                 else "  (none)")
    if spread:
        parts += ["", "partitions", _indent(format_table(
            ("queue", "index", "primary", "holders", *PARTITION_COUNTS, "moving"), spread))]
    reb = _section(status, "rebalance")
    if reb:
        parts += ["", "rebalance", _indent(format_rebalance(reb))]
    repl = _section(status, "replication")
    if repl:
        parts += ["", "replication", _pairs([
            ("hinted messages", _text(repl.get("hinted_messages"))),
            ("taking over", _text(repl.get("taking_over"))),
            ("waiting batches", _text(repl.get("waiting_batches"))),
            ("failed quorums", _text(repl.get("failed_quorums"))),
            ("repair rounds", _text(repl.get("repair_rounds"))),
            ("repaired", _text(repl.get("repaired"))),
            ("links", _text(repl.get("links"))),
        ])]
    store = _section(status, "store")
    parts += ["", "store", _pairs([
        ("path", _text(store.get("path"))),
        ("size", _size(store.get("size_bytes"))),
        ("commits", _text(store.get("commits"))),
        ("failed commits", _text(store.get("failed_commits"))),
    ])]
    security = _section(status, "security")
    if security:
        parts += ["", "security", _security(security)]
    for name, value in status.items():
        if name not in KNOWN_SECTIONS and value is not None:
            parts += ["", str(name), _generic(value)]
    return "\n".join(parts)


def progress_bar(done: float, width: int = BAR_WIDTH) -> str:
    """``[#####.....]  50%`` for ``done`` in 0..1 (clamped); 100% only when whole."""
    done = max(0.0, min(1.0, done))
    filled = int(done * width)
    percent = int(done * 100)
    return f"[{'#' * filled}{'.' * (width - filled)}] {percent:3d}%"


def _count(n: Any) -> str:
    return f"{n:,}" if isinstance(n, int) else "-"


def progress_line(reb: dict[str, Any]) -> str:
    """One line for a log: the bar, messages and moves, and why it is not final."""
    line = (f"{progress_bar(fraction(reb))} {_count(reb.get('messages_done'))}/"
            f"{_count(reb.get('messages_total'))} messages, "
            f"{_count(reb.get('moves_under_way'))} moves under way, "
            f"{_count(reb.get('moves_done'))} done")
    waits = [str(w) for w in _list(reb.get("settling"))]
    unreachable = _list(reb.get("unreachable"))
    if unreachable:
        waits.append(f"no answer from {', '.join(map(str, unreachable))}")
    return line + "".join(f"; {w}" for w in waits)


def format_rebalance(reb: dict[str, Any]) -> str:
    """The ``rebalance`` table: a headline, a progress bar, then the moves under way,
    what keeps the answer from being final (nodes settling or not answering)."""
    moving = reb.get("moving")
    done, under_way = reb.get("moves_done"), reb.get("moves_under_way")
    total, copied = reb.get("messages_total"), reb.get("messages_done")
    asked = len(_list(reb.get("nodes"))) + len(_list(reb.get("unreachable")))
    if not moving:
        head = f"nothing moving ({len(_list(reb.get('nodes')))} of {asked} nodes answered"
        if done:
            head += (f"; {_count(done)} moves done since the last membership change, "
                     f"{_count(copied)} messages")
        lines = [head + ")"]
    else:
        lines = [f"moving: {_count(reb.get('partitions_moving'))} partitions, "
                 f"{_count(under_way)} moves under way, {_count(done)} done",
                 f"{progress_bar(fraction(reb))}  {_count(copied)} of {_count(total)} "
                 "messages"]
    moves = _dicts(reb.get("moves"))
    if moves:
        lines += ["", format_table(MOVE_COLUMNS, [[m.get(c) for c in MOVE_COLUMNS]
                                                  for m in moves])]
    for why in _list(reb.get("settling")):
        lines.append(f"settling: {why}")
    unreachable = _list(reb.get("unreachable"))
    if unreachable:
        lines.append(f"no answer from: {', '.join(map(str, unreachable))} (its moves are "
                     "not known)")
    return "\n".join(lines)


def clock_view(status: dict[str, Any]) -> dict[str, Any]:
    """``meshq-ctl clock --json``: the clock facts gathered from the status map."""
    node, mesh, clock = (_section(status, s) for s in ("node", "mesh", "clock"))
    hlc = _section(node, "hlc")
    median = mesh.get("median_clock_offset_ms")
    return {
        "node": node.get("name"),
        "wall_ms": clock.get("wall_ms"),
        "wall_iso": _iso(clock.get("wall_ms")),
        "hlc": {"wall_ms": hlc.get("wall_ms"), "logical": hlc.get("logical"),
                "raw": hlc.get("raw"), "iso": _iso(hlc.get("wall_ms"))},
        "accepting_writes": node.get("accepting_writes"),
        "not_accepting_reason": node.get("not_accepting_reason"),
        "median_clock_offset_ms": round(median, 3) + 0.0 if isinstance(median, float)
        else median,
        "max_clock_offset_ms": clock.get("max_clock_offset_ms"),
        "peers_measured": clock.get("peers_measured"),
        "min_peers": clock.get("min_peers"),
        "ntp_server": clock.get("ntp_server"),
        "ntp_offset_ms": clock.get("ntp_offset_ms"),
        "peers": [{c: m.get(c) for c in PEER_CLOCK_COLUMNS}
                  for m in _dicts(status.get("members")) if not m.get("self")],
    }


def _ntp(view: dict[str, Any]) -> str:
    server = view.get("ntp_server")
    if not server:
        return "not checked (no ntp_server set)"
    offset = view.get("ntp_offset_ms")
    if offset is None:
        return f"{server}: no recent answer (see the daemon's log)"
    return f"{server}: {_ms(offset)} (the server's clock minus ours)"


def format_clock(view: dict[str, Any]) -> str:
    """The ``clock`` table, from ``clock_view``."""
    wall = view.get("wall_ms")
    measured, needed = view.get("peers_measured"), view.get("min_peers")
    median = _ms(view.get("median_clock_offset_ms"))
    if median == "-":
        median = "- (no recent peer measurement)"
    else:
        median += " (the cluster's median clock minus ours)"
    limit = _ms(view.get("max_clock_offset_ms"), signed=False)
    if needed is not None:
        limit += f" (max_clock_offset_ms; the peer check needs {needed} measured peers)"
    lines = ["clock", _pairs([
        ("node", _text(view.get("node"))),
        ("wall clock", f"{view.get('wall_iso')} ({wall} ms)" if wall is not None else "-"),
        ("hlc", _hlc(view.get("hlc"))),
        ("accepting writes", _writes(view)),
        ("median offset", median),
        ("peers measured", _text(measured)),
        ("limit", limit),
        ("ntp", _ntp(view)),
    ]), "", "peers (clock_offset_ms: their clock minus ours)"]
    peers = _dicts(view.get("peers"))
    lines.append(_indent(format_table(PEER_CLOCK_COLUMNS, [
        [p.get(c) for c in PEER_CLOCK_COLUMNS] for p in peers])) if peers else "  (none)")
    return "\n".join(lines)


# --------------------------------------------------------------------------- commands


def _status(args: argparse.Namespace) -> dict[str, Any]:
    with connect(args) as client:
        return client.status()


def _emit(args: argparse.Namespace, value: Any, table: Callable[[Any], str]) -> int:
    print(to_json(value, indent=2) if args.json else table(value))
    return EXIT_OK


def cmd_status(args: argparse.Namespace) -> int:
    return _emit(args, _status(args), format_status)


def cmd_members(args: argparse.Namespace) -> int:
    members = _dicts(_status(args).get("members"))
    return _emit(args, members, lambda ms: format_table(
        MEMBER_COLUMNS, [[m.get(c) for c in MEMBER_COLUMNS] for m in ms]))


def _format_ring(ring: dict[str, Any]) -> str:
    primary, replicas = _section(ring, "ownership"), _section(ring, "replica_ownership_n3")
    rows = [[name, f"{100 * share:.1f}%", f"{100 * replicas.get(name, 0.0):.1f}%"]
            for name, share in primary.items()]
    return (format_table(("name", "primary", "replica (N=3)"), rows)
            + f"\n\n{_text(ring.get('vnodes_per_node'))} virtual nodes per member; a "
            "queue's replicas are the first distinct members clockwise from its name")


def cmd_ring(args: argparse.Namespace) -> int:
    return _emit(args, _section(_status(args), "ring"), _format_ring)


def cmd_clock(args: argparse.Namespace) -> int:
    return _emit(args, clock_view(_status(args)), format_clock)


def cmd_rebalance(args: argparse.Namespace) -> int:
    """Print the rebalance once; with ``--watch``, poll until nothing moves (exit 0) or
    ``--timeout`` passes (TIMEOUT). A terminal gets the table redrawn in place, a pipe or
    file a progress line per poll and the final table."""
    if not args.watch:
        with connect(args) as client:
            return _emit(args, client.rebalance(), format_rebalance)
    deadline = None if args.timeout is None else time.monotonic() + args.timeout
    tty = sys.stdout.isatty()
    with connect(args) as client:
        while True:
            reb = client.rebalance()
            if args.json:
                print(to_json(reb), flush=True)
            elif tty:
                print(CLEAR + format_rebalance(reb), flush=True)
            elif reb.get("moving"):
                print(progress_line(reb), flush=True)
            if not reb.get("moving"):
                if not args.json and not tty:
                    print(format_rebalance(reb))
                return EXIT_OK
            if deadline is not None and time.monotonic() + args.interval > deadline:
                raise Timeout(f"partitions still moving after {args.timeout:g} s")
            time.sleep(args.interval)


def cmd_leave(args: argparse.Namespace) -> int:
    with connect(args) as client:
        result = client.request("leave")
    return _emit(args, result, lambda _: "leaving the cluster; the daemon stops once the "
                 "news has spread")


def cmd_hash_password(args: argparse.Namespace) -> int:
    from meshq.amqp.auth import hash_password
    if sys.stdin.isatty():
        import getpass
        password = getpass.getpass("password: ")
    else:
        password = sys.stdin.readline().rstrip("\n")
    if not password:
        print("meshq-ctl: BAD_REQUEST: an empty password", file=sys.stderr)
        return 2
    print(hash_password(password))
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run(args.func, args)


if __name__ == "__main__":
    sys.exit(main())
