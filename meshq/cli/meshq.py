"""``meshq``: declare queues, send and receive messages, list, purge and delete queues.

Scripts rely on the output: ``send`` prints one id per confirmed message, in input
order, as each is confirmed (retrying for ``--retry-for`` seconds, with a dedup id per
message); ``recv`` prints bodies (or ``--json`` lines) and acks, by receipt, only what it
printed. Errors and exit statuses are those of ``meshq.cli._common``.
"""

from __future__ import annotations

import argparse
import base64
import os
import sys
from collections.abc import Iterator, Sequence
from typing import Any

from meshq._version import __version__
from meshq.cli._common import (
    EXIT_OK,
    add_socket_option,
    cmd_queues,
    connect,
    run,
    to_json,
)
from meshq.client import Delivery

__all__ = ["build_parser", "main"]

READ_CHUNK = 1 << 16

# declare flag (argparse dest) -> queue option name (SPEC section 2)
_DECLARE_OPTIONS = {
    "replicas": "replicas",
    "write_quorum": "write_quorum",
    "ttl": "message_ttl",
    "visibility_timeout": "visibility_timeout",
    "max_deliveries": "max_deliveries",
    "dead_letter_queue": "dead_letter_queue",
    "max_length": "max_length",
    "ordering": "ordering",
    "expires": "expires",
    "partitions": "partitions",
}


# --------------------------------------------------------------------------- arguments


def _positive_int(text: str) -> int:
    try:
        value = int(text, 10)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _seconds(text: str, *, allow_zero: bool) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds, got {text!r}") from None
    if not (value >= 0 if allow_zero else value > 0) or value == float("inf"):
        raise argparse.ArgumentTypeError(
            f"must be a finite number {'>= 0' if allow_zero else '> 0'}, got {text!r}")
    return value


def _positive_seconds(text: str) -> float:
    return _seconds(text, allow_zero=False)


def _wait_seconds(text: str) -> float:
    return _seconds(text, allow_zero=True)


def _header(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="meshq", description="Send and receive messages through the local meshqd.")
    parser.add_argument("--version", action="version", version=f"meshq {__version__}")
    add_socket_option(parser, top=True)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def command(name: str, help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help)
        add_socket_option(p, top=False)
        return p

    p = command("declare", "create a queue, or check that it exists with these options")
    p.add_argument("queue", metavar="QUEUE")
    p.add_argument("--replicas", metavar="N", type=_positive_int)
    p.add_argument("--write-quorum", metavar="W", type=_positive_int,
                   help="replicas that must commit a send before it is confirmed "
                        "(default: a majority of --replicas)")
    p.add_argument("--ttl", metavar="S", type=_positive_seconds, help="message TTL in seconds")
    p.add_argument("--visibility-timeout", metavar="S", type=_positive_seconds)
    p.add_argument("--max-deliveries", metavar="N", type=_positive_int)
    p.add_argument("--dead-letter-queue", metavar="Q")
    p.add_argument("--max-length", metavar="N", type=_positive_int)
    p.add_argument("--ordering", choices=("fifo", "fair"))
    p.add_argument("--expires", metavar="S", type=_positive_seconds,
                   help="delete the queue once unused (no consumer, receive or declare) "
                        "this long")
    p.add_argument("--partitions", metavar="P", type=_positive_int,
                   help="spread the queue over P partitions, each with its own replicas "
                        "(default: the cluster's default_partitions)")
    p.set_defaults(func=cmd_declare)

    p = command("send", "send BODY, or one message per line of stdin with '-'")
    p.add_argument("queue", metavar="QUEUE")
    p.add_argument("body", metavar="BODY", help="message body, or '-' for stdin lines")
    p.add_argument("--header", metavar="K=V", type=_header, action="append", default=[])
    p.add_argument("--ttl", metavar="S", type=_positive_seconds)
    p.add_argument("--delay", metavar="S", type=_positive_seconds)
    p.add_argument("--dedup-id", metavar="ID",
                   help="a resend with the same ID within the dedup window creates no "
                        "second message (default: a fresh id per message)")
    p.add_argument("--partition-key", metavar="KEY",
                   help="messages with the same KEY go to one partition, in order")
    p.add_argument("--retry-for", metavar="S", type=_wait_seconds, default=10.0,
                   help="keep retrying for up to S seconds while the daemon is unavailable "
                        "or the connection breaks (default 10; 0: fail at once). Every "
                        "message carries a dedup id, so a retry never sends one twice")
    p.set_defaults(func=cmd_send)

    p = command("recv", "receive messages, print them, and ack what was printed")
    p.add_argument("queue", metavar="QUEUE")
    p.add_argument("-n", metavar="N", dest="max", type=_positive_int, default=1,
                   help="receive up to N messages (default 1)")
    p.add_argument("--wait", metavar="S", type=_wait_seconds, default=0.0,
                   help="wait up to S seconds for a message (default 0)")
    p.add_argument("--no-ack", action="store_true",
                   help="do not ack: the messages come back once this command exits")
    p.add_argument("--json", action="store_true",
                   help="one JSON object per message: id, body (or body_b64), headers, hlc, "
                        "delivery_count, redelivered, receipt")
    p.set_defaults(func=cmd_recv)

    p = command("queues", "list queues and their counts")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_queues)

    p = command("purge", "remove every ready message of a queue")
    p.add_argument("queue", metavar="QUEUE")
    p.set_defaults(func=cmd_purge)

    p = command("delete", "delete a queue and all its messages")
    p.add_argument("queue", metavar="QUEUE")
    p.set_defaults(func=cmd_delete)
    return parser


# --------------------------------------------------------------------------- commands


def cmd_declare(args: argparse.Namespace) -> int:
    options = {opt: getattr(args, dest) for dest, opt in _DECLARE_OPTIONS.items()
               if getattr(args, dest) is not None}
    with connect(args) as client:
        result = client.declare(args.queue, **options)
    effective = result.get("options") or options
    shown = " ".join(f"{k}={v}" for k, v in effective.items() if v is not None)
    print(f"declared {args.queue}" + (f" ({shown})" if shown else ""))
    return EXIT_OK


def stdin_batches(fd: int) -> Iterator[list[bytes]]:
    """Lines of ``fd`` without their ending (b"\\n", or b"\\r\\n"), in batches of what
    is available now.

    Each ``os.read`` returns what a pipe or terminal holds, so a slow writer gets each
    line sent and confirmed as it comes, while a bulk writer gets large pipelined batches.
    A last line without b"\\n" is a message too, kept as it is.
    """
    pending = bytearray()
    while chunk := os.read(fd, READ_CHUNK):
        pending += chunk
        last = chunk.rfind(b"\n")  # search only the new bytes: long lines stay linear
        if last < 0:
            continue
        end = len(pending) - len(chunk) + last
        lines = bytes(pending[:end]).split(b"\n")
        del pending[: end + 1]
        yield [line[:-1] if line.endswith(b"\r") else line for line in lines]
    if pending:
        yield [bytes(pending)]


def cmd_send(args: argparse.Namespace) -> int:
    if args.body != "-":
        headers = dict(args.header) or None
        with connect(args) as client:
            mid = client.send(args.queue, os.fsencode(args.body), headers=headers,
                              ttl=args.ttl, delay=args.delay, dedup_id=args.dedup_id,
                              partition_key=args.partition_key)
        print(mid, flush=True)
        return EXIT_OK
    with connect(args) as client:
        for batch in stdin_batches(sys.stdin.fileno()):
            for mid in client.send_stream(args.queue, batch):
                print(mid, flush=True)
    return EXIT_OK


def delivery_json(d: Delivery) -> dict[str, Any]:
    """One ``recv --json`` line: ``body`` when the bytes are UTF-8, else ``body_b64``."""
    out: dict[str, Any] = {"id": d.id}
    try:
        out["body"] = d.body.decode("utf-8")
    except UnicodeDecodeError:
        out["body_b64"] = base64.b64encode(d.body).decode("ascii")
    out.update(headers=d.headers, hlc=d.hlc, delivery_count=d.delivery_count,
               redelivered=d.redelivered, receipt=d.receipt)
    return out


def cmd_recv(args: argparse.Namespace) -> int:
    out = sys.stdout.buffer
    with connect(args) as client:
        # A plain receive: with --no-ack the leases end when this connection closes.
        got = client.receive(args.queue, max=args.max, wait=args.wait)
        printed: list[Delivery] = []
        broken: BrokenPipeError | None = None
        for d in got:
            line = (to_json(delivery_json(d)).encode() if args.json else d.body) + b"\n"
            try:
                out.write(line)
                out.flush()
            except BrokenPipeError as exc:
                broken = exc
                break
            printed.append(d)
        if printed and not args.no_ack:
            client.ack(args.queue, printed)  # by receipt
    if broken is not None:
        raise broken
    return EXIT_OK



def cmd_purge(args: argparse.Namespace) -> int:
    with connect(args) as client:
        count = client.purge(args.queue)
    print(f"purged {count} message(s) from {args.queue}")
    return EXIT_OK


def cmd_delete(args: argparse.Namespace) -> int:
    with connect(args) as client:
        count = client.delete(args.queue)
    print(f"deleted {args.queue} ({count} message(s))")
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "send" and args.body == "-":
        given = [flag for flag, value in (("--header", args.header), ("--ttl", args.ttl),
                                          ("--delay", args.delay),
                                          ("--dedup-id", args.dedup_id),
                                          ("--partition-key", args.partition_key))
                 if value]
        if given:
            parser.error(f"send: {', '.join(given)} only apply to a single BODY, not '-'")
    return run(args.func, args)


if __name__ == "__main__":
    sys.exit(main())
