"""Membership: the daemon's driver of the pure SWIM core over a real (or simulated) Transport.

State here: the Swim engine, the outgoing packet queue, counters of bad packets, and the
clock verdict. Never: a packet of another cluster, version or shape merged into the
engine (it is counted, not logged one by one); the event loop blocked on the network.
The engine's ``now`` is trio's clock (monotonic, virtual under MockClock); ``wall`` is
the daemon's Clock, used only for clock-offset timestamps.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from meshq.clock import Clock
from meshq.errors import ProtocolError, Unavailable
from meshq.mesh.clocks import ClockTracker
from meshq.mesh.ntp import NtpError, query_ntp
from meshq.mesh.swim import (
    ClockSample,
    Effect,
    Member,
    MemberChanged,
    MemberState,
    PushPull,
    SendPacket,
    StartStream,
    Swim,
    message_from_wire,
)
from meshq.mesh.transport import FramedStream, Transport, source_host
from meshq.mesh.wire import (
    PeerProtocolError,
    check_hello,
    decode_packet,
    hello_frame,
    split_messages,
)

__all__ = ["ClockStatus", "Membership", "known_peers"]

log = logging.getLogger("meshq.mesh")

STREAM_TIMEOUT = 5.0  # connect and answer, for one push-pull
SEND_TIMEOUT = 1.0  # for one packet (address resolution included)
MAX_INCOMING_STREAMS = 16  # push-pulls served at once; more wait
MAX_PENDING_STREAMS = 1024  # incoming streams not yet past their hello (unauthenticated)
MAX_PENDING_PER_HOST = 64  # of those, from one host: one flooding host cannot block others
PEER_MAX_FRAME = 1024 * 1024  # a push-pull of thousands of members fits
REJOIN_INTERVAL = 10.0  # while alone with known seeds, try them again this often
NTP_INTERVAL = 60.0  # between two NTP checks


@dataclass(frozen=True)
class ClockStatus:
    """Whether this node's clock is fit to stamp messages, and why not.
    ``median_offset_ms`` is the cluster's median clock minus ours."""

    accepting_writes: bool
    reason: str | None
    median_offset_ms: float | None


class Membership:
    def __init__(self, *, swim: Swim, transport: Transport, cluster: str, clock: Clock,
                 seeds: Iterable[str] = (), max_offset_ms: float = 500.0,
                 members_path: Path | None = None, ntp_server: str | None = None,
                 on_change: Callable[[Member, MemberState | None], None] | None = None) -> None:
        self.swim = swim
        self.transport = transport
        self.cluster = cluster
        self.clock = clock
        self.seeds = [s for s in dict.fromkeys(seeds) if s != transport.local_address]
        self.max_offset_ms = max_offset_ms
        self.clocks = ClockTracker(max_offset_ms=max_offset_ms)
        self.ntp_server = ntp_server
        self.members_path = members_path
        self.on_change = on_change
        self.bad_packets = 0
        self.bad_streams = 0
        self.unsendable = 0
        self.clock_status = ClockStatus(True, None, None)
        self._outbox_send, self._outbox = trio.open_memory_channel[tuple[str, Any]](math.inf)
        self._wake = trio.Event()
        self._drained = trio.Event()  # after leave(): every broadcast went out
        self._nursery: trio.Nursery | None = None
        self._stream_slots = trio.CapacityLimiter(MAX_INCOMING_STREAMS)
        self._pending_streams: dict[str, int] = {}  # host -> streams awaiting their hello
        # hello "kind" -> handler(stream, hello) for streams other than push-pull
        self.stream_handlers: dict[str, Callable[[FramedStream, dict[str, Any]],
                                                 Awaitable[None]]] = {}
        self._dirty = False

    # -- running --------------------------------------------------------------------
    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Serve the mesh; report started once joined through a seed (or alone)."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(self._sender)
            nursery.start_soon(self._receiver)
            await nursery.start(self.transport.serve_streams, self._serve_stream)
            nursery.start_soon(self._ticker)
            if self.seeds and not await self.join(self.seeds):
                log.warning("no seed answered (%s); starting alone, will retry",
                            ", ".join(self.seeds))
            nursery.start_soon(self._rejoin_loop)
            if self.ntp_server is not None:
                nursery.start_soon(self._ntp_loop, self.ntp_server)
            task_status.started()

    async def join(self, addrs: Iterable[str]) -> bool:
        """Push-pull with every seed at once; True as soon as one answered (at most
        STREAM_TIMEOUT in all, however many seeds are silent)."""
        joined = False
        async with trio.open_nursery() as nursery:

            async def one(addr: str, payload: PushPull) -> None:
                nonlocal joined
                if await self._push_pull(addr, payload):
                    joined = True
                    nursery.cancel_scope.cancel()

            for effect in self.swim.join(addrs, trio.current_time()):
                if isinstance(effect, StartStream):
                    nursery.start_soon(one, effect.addr, effect.payload)
        return joined

    async def leave(self, grace: float = 2.0) -> None:
        """Announce that we leave; wait (up to ``grace`` s) until the news has gone out."""
        self._execute(self.swim.leave(trio.current_time()))
        others = [m for m in self.swim.members() if m.name != self.swim.name
                  and m.state in (MemberState.ALIVE, MemberState.SUSPECT)]
        if not others:
            return  # nobody to tell
        with trio.move_on_after(grace):
            await self._drained.wait()

    def _execute(self, effects: Iterable[Effect]) -> None:
        for e in effects:
            if isinstance(e, SendPacket):
                self._outbox_send.send_nowait((e.addr, [m.to_wire() for m in e.messages]))
            elif isinstance(e, StartStream):
                assert self._nursery is not None
                self._nursery.start_soon(self._push_pull, e.addr, e.payload)
            elif isinstance(e, ClockSample):
                self.clocks.observe(e.member, e.t0, e.t1, e.t2, e.t3, trio.current_time())
            elif isinstance(e, MemberChanged):
                if e.member.state is not MemberState.ALIVE:
                    self.clocks.forget(e.member.name)
                old = e.old_state.value if e.old_state else "new"
                log.info("member %s (%s): %s -> %s", e.member.name, e.member.address, old,
                         e.member.state.value)
                self._dirty = True
                if self.on_change is not None:
                    self.on_change(e.member, e.old_state)
        self._wake.set()

    async def _sender(self) -> None:
        limit = self.swim.config.max_packet_bytes
        async for addr, messages in self._outbox:
            try:
                packets = split_messages(messages, limit)
            except ValueError:  # a message too big for any packet: gossip is best-effort
                self.unsendable += 1
                continue
            for data in packets:
                with trio.move_on_after(SEND_TIMEOUT):  # never let one peer stall the rest
                    try:
                        await self.transport.send_packet(addr, data)
                    except ValueError:  # a malformed address: nothing to send it to
                        self.unsendable += 1

    async def _receiver(self) -> None:
        while True:
            src, data = await self.transport.receive_packet()
            try:
                packet = decode_packet(data, max_size=self.swim.config.max_packet_bytes)
                messages = [message_from_wire(m) for m in packet.messages]
            except (PeerProtocolError, ProtocolError, ValueError):
                self.bad_packets += 1
                continue
            self._execute(self.swim.on_packet(src, messages, trio.current_time(),
                                              self.clock.time()))

    async def _ticker(self) -> None:
        while True:
            deadline = self.swim.next_deadline()
            self._wake = trio.Event()
            with trio.move_on_at(deadline):
                await self._wake.wait()
            now = trio.current_time()
            if now >= deadline:
                self._execute(self.swim.tick(now, self.clock.time()))
                if self.swim.has_left and not self.swim.statistics().pending_broadcasts:
                    self._drained.set()
                self._judge_clock()
            if self._dirty:
                self._dirty = False
                await self._save_members()

    def _judge_clock(self) -> None:
        v = self.clocks.verdict(trio.current_time())
        median = -v.median_offset_ms if v.peers else None
        was = self.clock_status.accepting_writes
        self.clock_status = ClockStatus(v.accepting_writes, v.reason, median)
        if v.accepting_writes != was:  # tell the others: may this node dispatch?
            me = self.swim.member(self.swim.name)
            meta = dict(me.meta) if me is not None else {}
            meta["w"] = 1 if v.accepting_writes else 0
            self._execute(self.swim.set_meta(meta, trio.current_time()))

    def hint_unreachable(self, name: str) -> None:
        """Another path to ``name`` failed (a stream): probe it now, not in its turn."""
        self.swim.probe_soon(name, trio.current_time())
        self._wake.set()

    async def _ntp_loop(self, server: str) -> None:
        """Check our clock against an NTP server now and then (config ``ntp_server``)."""
        while True:
            try:
                offset_ms = await query_ntp(server)
            except NtpError as exc:
                log.warning("NTP check against %s failed: %s", server, exc)
            else:
                self.clocks.ntp_check(offset_ms, trio.current_time())
                self._judge_clock()
            await trio.sleep(NTP_INTERVAL)

    async def _rejoin_loop(self) -> None:
        """Like Consul's retry_join: while we know no live peer, keep trying the seeds."""
        while True:
            await trio.sleep(REJOIN_INTERVAL)
            alive = [m for m in self.swim.members()
                     if m.name != self.swim.name and m.state is MemberState.ALIVE]
            if not alive and self.seeds and not self.swim.has_left:
                await self.join(self.seeds)

    # -- push-pull streams ----------------------------------------------------------
    async def _push_pull(self, addr: str, payload: PushPull) -> bool:
        try:
            with trio.fail_after(STREAM_TIMEOUT):
                stream = FramedStream(await self.transport.open_stream(addr, STREAM_TIMEOUT),
                                      max_frame=PEER_MAX_FRAME)
                try:
                    await stream.send(hello_frame(self.cluster, self.swim.name))
                    await stream.send(payload.to_wire())
                    check_hello(_frame(await stream.receive()), self.cluster)
                    answer = PushPull.from_wire(await stream.receive())
                finally:
                    await stream.aclose()
        except (Unavailable, ProtocolError, ValueError, trio.TooSlowError,
                trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            log.debug("push-pull with %s failed: %s", addr, exc)
            return False
        self._execute(self.swim.merge_push_pull(answer, trio.current_time()))
        return True

    async def _serve_stream(self, raw: trio.abc.Stream, remote: str) -> None:
        """A push-pull, or (by the hello's ``kind``) a stream for ``stream_handlers``: the
        mesh's replication links and relayed client connections."""
        stream = FramedStream(raw, max_frame=PEER_MAX_FRAME)
        handler = None
        host = source_host(remote)
        pending = self._pending_streams
        if sum(pending.values()) >= MAX_PENDING_STREAMS or \
                pending.get(host, 0) >= MAX_PENDING_PER_HOST:
            self.bad_streams += 1  # a flood of connections: drop at once, keep the fds
            return
        pending[host] = pending.get(host, 0) + 1
        waiting = True
        try:
            with trio.fail_after(STREAM_TIMEOUT):  # unauthenticated until the hello
                hello = _frame(await stream.receive())
                check_hello(hello, self.cluster)
            waiting = self._done_waiting(host)
            kind = hello.get("kind")
            if kind is not None:
                handler = self.stream_handlers.get(kind)
                if handler is None:
                    raise PeerProtocolError(f"unknown stream kind {kind!r:.40}")
            else:
                with trio.fail_after(STREAM_TIMEOUT):
                    async with self._stream_slots:
                        await self._serve_one_stream(stream)
        except (ProtocolError, ValueError, trio.TooSlowError) as exc:
            self.bad_streams += 1
            log.debug("refused a stream from %s: %s", remote, exc)
            return
        finally:
            if waiting:
                self._done_waiting(host)
        if handler is not None:  # long-lived: outside the push-pull slots and timeout
            await handler(stream, hello)

    def _done_waiting(self, host: str) -> bool:
        left = self._pending_streams[host] - 1
        if left:
            self._pending_streams[host] = left
        else:
            del self._pending_streams[host]
        return False

    async def _serve_one_stream(self, stream: FramedStream) -> None:
        """The rest of a push-pull, after its hello (within the caller's time limit)."""
        theirs = PushPull.from_wire(await stream.receive())
        self._execute(self.swim.merge_push_pull(theirs, trio.current_time()))
        await stream.send(hello_frame(self.cluster, self.swim.name))
        await stream.send(self.swim.push_pull_payload().to_wire())

    # -- persistence and status -----------------------------------------------------
    async def _save_members(self) -> None:
        """Remember peers' addresses, so that a restarted node rejoins without --join."""
        if self.members_path is None:
            return
        peers = sorted({m.address for m in self.swim.members()
                        if m.name != self.swim.name and m.state is MemberState.ALIVE})
        if peers:
            try:
                await trio.to_thread.run_sync(_write_json, self.members_path, {"peers": peers})
            except OSError as exc:  # not fatal: we only lose a hint for the next start
                log.warning("could not remember peers in %s: %s", self.members_path, exc)
                self._dirty = True

    def status(self, now: float) -> list[dict[str, Any]]:
        """Every known member, ourselves included (``meshq-ctl status`` members)."""
        out = []
        offsets = self.clocks.offsets()  # the estimates the write verdict uses, in ms
        for m in sorted(self.swim.members(), key=lambda m: m.name):
            out.append({
                "name": m.name,
                "address": m.address,
                "state": m.state.value,
                "incarnation": m.incarnation,
                "clock_offset_ms": 0.0 if m.name == self.swim.name
                else _ms(offsets.get(m.name)),
                "rtt_ms": None if m.rtt is None else _ms(m.rtt * 1000.0),
                "last_seen_s": None if m.last_seen is None else round(now - m.last_seen, 3),
                "self": m.name == self.swim.name,
            })
        return out


def _ms(value: float | None) -> float | None:
    return None if value is None or not math.isfinite(value) else round(value, 3)


def _frame(frame: dict[str, Any] | None) -> dict[str, Any]:
    if frame is None:
        raise PeerProtocolError("the peer closed the stream early")
    return frame


def known_peers(path: Path) -> list[str]:
    """Peers remembered by a previous run (empty when none or unreadable)."""
    try:
        peers = json.loads(path.read_text())["peers"]
    except (OSError, ValueError, KeyError, TypeError):
        return []
    return [p for p in peers if isinstance(p, str)]


def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)
