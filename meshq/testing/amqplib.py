"""amqplib (RabbitMQ's Node client) for tests and benchmarks, installed on first use into a
cache ($XDG_CACHE_HOME or ~/.cache, under meshq-tests/), never into the repository.

``node_modules()`` returns the directory to put in NODE_PATH, or raises Unavailable with
a reason (no ``node``/``npm``, or npm could not install): tests skip with it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

__all__ = ["AMQPLIB", "NodeUnavailable", "node_env", "node_modules"]

AMQPLIB = "amqplib@0.10.4"


class NodeUnavailable(Exception):
    """Why amqplib cannot be run here."""


def node_modules() -> Path:
    if shutil.which("node") is None or shutil.which("npm") is None:
        raise NodeUnavailable("node and npm are needed for amqplib")
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    cache = base / "meshq-tests" / AMQPLIB.replace("@", "-")
    if not (cache / "node_modules" / "amqplib" / "package.json").exists():
        cache.mkdir(parents=True, exist_ok=True)
        try:
            subprocess.run(["npm", "install", "--no-audit", "--no-fund", "--prefix",
                            str(cache), AMQPLIB], check=True, capture_output=True,
                           timeout=180)
        except (subprocess.SubprocessError, OSError) as exc:
            raise NodeUnavailable(f"could not install {AMQPLIB} with npm: {exc}") from None
    return cache / "node_modules"


def node_env(modules: Path) -> dict[str, str]:
    """The environment for ``node`` with amqplib resolvable."""
    return {**os.environ, "NODE_PATH": str(modules)}
