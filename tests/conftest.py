from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import trio
from hypothesis import settings
from test_broker import Env
from test_membership import all_alive, eventually

from meshq.errors import NotFound
from meshq.testing import DaemonProcess

# Property tests assert what the code does, not how fast: hypothesis's per-example deadline
# (200 ms) failed test_changes' fuzzed frames once on a machine loaded by other runs.
settings.register_profile("meshq", deadline=None)
settings.load_profile("meshq")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--slow", action="store_true", help="also run slow crash/soak tests")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--slow") or "slow" in (config.getoption("-m") or ""):
        return
    skip = pytest.mark.skip(reason="slow: run with --slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
async def env() -> AsyncIterator[Env]:
    """A Broker over a MemoryStore in virtual time (tests/test_broker.py's Env)."""
    async with trio.open_nursery() as nursery:
        e = Env(nursery)
        await nursery.start(e.store.run)
        await e.start(e.broker)
        yield e
        nursery.cancel_scope.cancel()


@pytest.fixture
def daemon(tmp_path) -> Iterator[DaemonProcess]:
    """A real meshqd subprocess on a fresh data dir and socket."""
    d = DaemonProcess(tmp_path / "data")
    d.start()
    yield d
    d.kill()


@pytest.fixture(scope="module")
def module_daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProcess]:
    """One meshqd for a whole test module (start-up dominates otherwise)."""
    d = DaemonProcess(tmp_path_factory.mktemp("meshqd") / "data")
    d.start()
    yield d
    d.kill()


@pytest.fixture
def shared_daemon(module_daemon: DaemonProcess) -> Iterator[DaemonProcess]:
    """The module's meshqd, checked alive after each test and emptied of queues."""
    yield module_daemon
    assert module_daemon.proc is not None and module_daemon.proc.poll() is None, (
        module_daemon.log_tail())
    with module_daemon.client() as c:
        for s in c.stats():
            try:
                c.delete(s["name"])
            except NotFound:
                pass  # deleted meanwhile (an AMQP exclusive or auto-delete queue)


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[dict[str, DaemonProcess]]:
    """Three meshqd (a, b, c; b and c joined through a), once all see all alive."""
    a = DaemonProcess(tmp_path / "a", node_name="a").start()
    assert a.bind is not None
    nodes = {"a": a}
    for n in ("b", "c"):
        nodes[n] = DaemonProcess(tmp_path / n, node_name=n, args=["--join", a.bind]).start()
    eventually(lambda: all_alive(list(nodes.values()), {"a", "b", "c"}), 15, "all alive")
    yield nodes
    for d in nodes.values():
        d.kill()
