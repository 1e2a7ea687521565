"""``meshq-ctl keys``: the cluster key ring, on every live member at once (as Serf does).

``generate`` prints a new key and needs no daemon. ``list``, ``install``, ``use`` and
``remove`` go to the local daemon, which applies them to itself and to every live member
(meshq/mesh/keys.py). The exit status is 0 only when every node answered and agreed;
otherwise it is UNAVAILABLE's (5), and the table or ``--json`` says which node did not.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from meshq.cli._common import EXIT_OK, connect, format_table, to_json
from meshq.errors import EXIT_CODES
from meshq.mesh.keyring import generate_key

__all__ = ["KEY_ACTIONS", "cmd_keys", "cmd_keys_generate", "format_keys"]

KEY_ACTIONS = {
    "list": "the keys each node accepts and the one it sends with",
    "install": "add a key on every node (they still send with their primary key)",
    "use": "make an installed key the primary, the one every node sends with",
    "remove": "stop accepting a key on every node (not the primary: use another first)",
}
EXIT_PARTIAL = EXIT_CODES["UNAVAILABLE"]


def cmd_keys_generate(args: argparse.Namespace) -> int:
    print(generate_key())
    return EXIT_OK


def cmd_keys(args: argparse.Namespace) -> int:
    action = args.keys_command
    key = getattr(args, "key", None)
    if key == "-":  # from stdin: a key on the command line shows in ps and the history
        key = sys.stdin.readline().strip()
    with connect(args) as client:
        result = client.request("keys", action=action, key=key)
    print(to_json(result, indent=2) if args.json else format_keys(action, result))
    return EXIT_OK if result.get("ok") == result.get("total") else EXIT_PARTIAL


def format_keys(action: str, result: dict[str, Any]) -> str:
    total = result.get("total", 0)
    keys = result.get("keys") or {}
    primaries = result.get("primaries") or {}
    rows = [[fp, f"{count}/{total}", primaries.get(fp, 0)] for fp, count in keys.items()]
    lines = [f"keys {action}: {result.get('ok', 0)} of {total} node(s) answered yes", ""]
    lines.append(format_table(("key fingerprint", "installed on", "primary on"), rows)
                 if rows else "no keys: the cluster's peer traffic is not encrypted")
    failed = [(name, r.get("error")) for name, r in (result.get("nodes") or {}).items()
              if not r.get("ok")]
    if failed:
        lines += ["", "not done on:"]
        lines += [f"  {name}: {error}" for name, error in failed]
    return "\n".join(lines)
