"""meshqd: one ``serve(config)`` that owns every task of the daemon, and its ``main``.

Start-up order: store opened and loaded, broker restored, writer and timer loops
started, then the socket listens and ``task_status.started(node)`` reports ready.
Shutdown (SIGTERM/SIGINT, or ``node.stop``): stop accepting, refuse new writes, commit
what is staged, write out the answers, then cancel; once every task has ended, save the
dedup filters (the next start loads them instead of listing the dedup table). A send is
thus either confirmed after its commit, or never confirmed.
"""

from __future__ import annotations

import argparse
import fcntl
import gc
import logging
import os
import secrets
import signal
import sys
from collections.abc import AsyncIterator
from functools import partial
from pathlib import Path
from typing import Any

import trio

from meshq._version import __version__
from meshq.allocator import tune_allocator
from meshq.amqp.server import AmqpServer, amqp_settings
from meshq.broker import BrokerLimits
from meshq.broker.backlog import HOT_READY
from meshq.clock import Clock, SystemClock
from meshq.cluster.lattice import TOMBSTONE_WINDOW
from meshq.config import AMQP_OFF, Config, ConfigError, add_daemon_arguments, load_config
from meshq.errors import StartupError
from meshq.mesh.keys import KeyService, check_unkeyed_bind, load_keyring, security_status
from meshq.mesh.membership import known_peers
from meshq.mesh.transport import UdpTcpTransport
from meshq.metrics import open_metrics_server
from meshq.node import Node, NodeSettings, build_node
from meshq.resources import Alarms, system_sample
from meshq.sdnotify import Notifier, status_line
from meshq.server.access import AccessConfigError, build_policy
from meshq.server.listener import UnixServer
from meshq.server.ops import OPS
from meshq.store import OP_META, Snapshot, SQLiteStore, StoreFatal

__all__ = ["main", "serve"]

log = logging.getLogger("meshq")
SHUTDOWN_GRACE = 5.0
LEAVE_GRACE = 2.0  # of SIGTERM's 10 s, for the news that we leave to spread
GC_THRESHOLD = 50_000


def _lock_data_dir(data_dir: Path) -> int:
    """Hold an exclusive lock on the data dir for the life of the process."""
    fd = os.open(data_dir / "meshqd.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise StartupError(f"another meshqd is using the data directory {data_dir}") from None
    return fd


def _node_id(data_dir: Path) -> str:
    """This node's id: random, made once, kept in the data directory."""
    path = data_dir / "node-id"
    try:
        node_id = path.read_text().strip()
    except FileNotFoundError:
        node_id = ""
    if node_id:
        return node_id
    node_id = secrets.token_hex(4)  # new, or lost to a power cut before it reached disk
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w") as f:
        f.write(node_id + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(data_dir, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return node_id


ALIVE_EVERY = 60.0  # how often a running node notes in its store that it is alive


def check_away_too_long(config: Config, snapshot: Snapshot, clock: Clock) -> None:
    """Refuse to start a node that was away for longer than the tombstone window and
    holds data, when it has peers: what was deleted meanwhile could come back through
    it (as with Cassandra's gc_grace_seconds). Wipe its data directory to rejoin."""
    last = float(snapshot.meta.get("last_alive", 0) or 0)
    has_data = bool(snapshot.messages or snapshot.catalog)
    has_peers = bool(config.join) or bool(known_peers(config.data_dir / "members.json"))
    away = clock.time() - last
    if last and has_data and has_peers and away > TOMBSTONE_WINDOW:
        raise StartupError(
            f"this node was away for {away / 3600:.1f} h, longer than the "
            f"{TOMBSTONE_WINDOW / 3600:g} h tombstone window: messages and queues deleted "
            "meanwhile could come back through its copy. Remove its data directory "
            f"({config.data_dir}) and start it again; its peers refill it.")


async def _remember_alive(node: Node) -> None:
    """Note in the store, now and then, that this node is alive (check_away_too_long)."""
    while True:
        node.store.stage((OP_META, ("last_alive", repr(node.clock.time()))))
        await trio.sleep(ALIVE_EVERY)


async def serve(config: Config, *, clock: Clock | None = None,
                task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
    """Run a node until cancelled or until ``node.stop_requested`` is set."""
    clock = clock or SystemClock()
    config.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    lock = await trio.to_thread.run_sync(_lock_data_dir, config.data_dir)
    try:
        await _serve_locked(config, clock, task_status)
    finally:
        os.close(lock)


async def _serve_locked(config: Config, clock: Clock, task_status: Any) -> None:
    node_id = await trio.to_thread.run_sync(_node_id, config.data_dir)
    store = await trio.to_thread.run_sync(SQLiteStore, config.data_dir / "meshq.db")
    try:
        # (only the head of each partition's READY messages: the rest is paged in)
        snapshot = await trio.to_thread.run_sync(store.load, HOT_READY)
        check_away_too_long(config, snapshot, clock)
        keyring = await trio.to_thread.run_sync(load_keyring, config)
        exposed = await check_unkeyed_bind(config, keyring)
        transport = await UdpTcpTransport.bind(
            config.bind, keyring=keyring, packets_per_second=config.udp_packets_per_second)
        async with transport:
            node = build_node(_settings(config), node_id=node_id, store=store,
                              snapshot=snapshot, clock=clock, transport=transport)
            del snapshot
            gc.freeze()  # a restored backlog is long-lived: keep it out of every collection
            await _run_node(config, task_status, node, transport, exposed)
            # A clean stop: the writer has exited. Save the dedup filters for the next start.
            filters = node.broker.dedup_filters()
            if filters is not None:
                await trio.to_thread.run_sync(store.save_dedup_filters, filters)
    finally:
        store.close()


def _settings(config: Config) -> NodeSettings:
    members_file = config.data_dir / "members.json"
    return NodeSettings(
        name=config.node_name, cluster_name=config.cluster_name,
        seeds=list(config.join) or known_peers(members_file),
        max_clock_offset_ms=config.max_clock_offset_ms, ntp_server=config.ntp_server,
        members_path=members_file, vnodes=config.vnodes, write_quorum=config.write_quorum,
        default_partitions=config.default_partitions,
        limits=BrokerLimits(max_message_bytes=config.max_message_bytes,
                            dedup_window=config.dedup_window),
        max_frame_bytes=config.max_frame_bytes)


async def _run_node(config: Config, task_status: Any, node: Node,
                    transport: UdpTcpTransport, exposed: bool) -> None:
    """Everything runs here, under the nursery that owns it, until stop or cancel."""
    assert node.membership is not None
    node.keys = KeyService(me=config.node_name, cluster=config.cluster_name,
                           keyring=transport.keyring, transport=transport,
                           membership=node.membership)
    node.membership.stream_handlers["keys"] = node.keys.serve
    node.security = partial(security_status, config, transport, exposed)
    node.access = await trio.to_thread.run_sync(build_policy, config, OPS)
    server = UnixServer(node, config.socket, config.max_frame_bytes, config.max_connections,
                        mode=config.socket_mode, group=config.socket_group,
                        frame_timeout=config.client_frame_timeout,
                        max_inflight=config.max_inflight_requests)
    node.server = server  # its counters go in the status ("server")
    await server.bind()
    metrics = (None if config.metrics_bind is None  # StartupError when it cannot listen
               else await open_metrics_server(config.metrics_bind, node))
    amqp = None if config.amqp_bind == AMQP_OFF else AmqpServer(node, amqp_settings(config))
    if amqp is not None:
        await amqp.bind()  # StartupError when it cannot listen
        node.amqp = amqp
    async with trio.open_nursery() as nursery:
        if metrics is not None:
            await nursery.start(metrics.run)  # GET /metrics (meshq/metrics.py)
        await nursery.start(node.run)  # membership, links, cluster layer, store, broker
        node.alarms = Alarms(config.data_dir, config.disk_free_limit,
                             config.memory_high_watermark,
                             partial(system_sample, config.data_dir), node.store.helper_pids)
        await nursery.start(node.alarms.run)  # disk and memory (meshq/resources.py)
        nursery.start_soon(_remember_alive, node)
        await nursery.start(server.run)
        if amqp is not None:
            await nursery.start(amqp.run)
        log.info("meshqd %s ready: node %s (%s), socket %s, bind %s, data %s", __version__,
                 config.node_name, node.id, config.socket, node.address, config.data_dir)
        task_status.started(node)
        await node.stop_requested.wait()
        log.info("shutting down")
        await server.stop_accepting()
        if amqp is not None:
            await amqp.stop_accepting()
        node.refuse_writes("shutting down")
        with trio.move_on_after(SHUTDOWN_GRACE):
            await node.membership.leave(LEAVE_GRACE)
            await node.store.flush()
            await server.drain()
        nursery.cancel_scope.cancel()


async def _main_async(config: Config, banner: bool) -> int:
    ready: list[Node] = []
    notifier = Notifier.from_environ()  # and unset: children must not inherit NOTIFY_SOCKET
    async with trio.open_nursery() as nursery:
        nursery.start_soon(notifier.run)  # WATCHDOG=1 from this loop: a stuck loop goes quiet

        async def run_node(task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
            await serve(config, task_status=task_status)
            nursery.cancel_scope.cancel()  # stopped gracefully: end the signal watcher

        async def watch_signals(signals: AsyncIterator[int]) -> None:
            async for _ in signals:
                if not ready or ready[0].stop_requested.is_set():
                    notifier.stopping()
                    nursery.cancel_scope.cancel()  # not started yet, or a second signal
                    return
                ready[0].stop()

        async def announce_stop(node: Node) -> None:
            await node.stop_requested.wait()  # SIGTERM, or node.stop from anywhere
            notifier.stopping(status_line(node, config.socket))

        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            nursery.start_soon(watch_signals, signals)  # also during start-up (a slow join)
            try:
                node: Node = await nursery.start(run_node)
            except StartupError as exc:
                print(f"meshqd: {exc}", file=sys.stderr)
                nursery.cancel_scope.cancel()
                return 1
            ready.append(node)
            notifier.ready(lambda: status_line(node, config.socket))
            nursery.start_soon(announce_stop, node)
            amqp = f" amqp={node.amqp.address}" if node.amqp is not None else ""
            print(f"meshqd ready: socket={config.socket} node={config.node_name} "
                  f"bind={node.address}{amqp}", flush=True)
            if banner:
                amqp_url = (f"amqp://guest:guest@{node.amqp.address}/" if node.amqp
                            is not None else "off")
                print(f"\n  data:   {config.data_dir}\n  socket: {config.socket}\n"
                      f"  AMQP:   {amqp_url} (RabbitMQ's clients; docs/amqp.md)\n\n"
                      "Try it from another terminal:\n"
                      "  . .venv/bin/activate\n"
                      "  meshq declare hello\n"
                      "  meshq send hello 'Hello, meshq!'\n"
                      "  meshq recv hello\n"
                      "  meshq-ctl status\n\n"
                      "Ctrl-C stops the daemon.", flush=True)
            await trio.sleep_forever()  # keep the signal handlers until the node has stopped
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="meshqd", description="The meshq daemon.")
    add_daemon_arguments(parser)
    parser.add_argument("--banner", action="store_true",
                        help="print a short how-to-try-it text once ready")
    parser.add_argument("--version", action="version", version=f"meshqd {__version__}")
    args = parser.parse_args(argv)
    try:
        config = load_config(args)
        build_policy(config, OPS)  # an unknown op, user or group is a configuration error
    except (ConfigError, AccessConfigError) as exc:
        print(f"meshqd: {exc}", file=sys.stderr)
        return 2
    # Every request allocates; the default gen-0 threshold (700) runs the collector
    # thousands of times a second under load, and each pass re-walks young messages.
    gc.set_threshold(GC_THRESHOLD, 20, 100)
    tune_allocator()
    logging.basicConfig(level=config.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return _run(config, args.banner)
    except KeyboardInterrupt:
        return 130


def _run(config: Config, banner: bool) -> int:
    try:
        return trio.run(_main_async, config, banner)
    except* StoreFatal as group:
        first: BaseException = group
        while isinstance(first, BaseExceptionGroup):  # (nurseries nest them)
            first = first.exceptions[0]
        print(f"meshqd: {first}; stopping", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
