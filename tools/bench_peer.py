#!/usr/bin/env python3
"""Round trips of one peer stream over loopback, in clear and with a cluster key.

Usage: .venv/bin/python tools/bench_peer.py [--frames N] [--body BYTES] [--rounds R]

Two UdpTcpTransports on 127.0.0.1; one opens a stream to the other, which echoes each
frame. After a warm-up, N round trips of a frame with a BODY-byte body are timed, for
each mode, R times alternating (clear, keyed, clear, keyed, ...). Printed: p50 and p99 of
each run, and the keyed / clear ratio of the medians of each round, so that both are
measured in the same invocation.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import trio

from meshq.mesh.keyring import Keyring, generate_key, parse_key
from meshq.mesh.transport import FramedStream, UdpTcpTransport


async def _echo(stream: trio.abc.Stream, remote: str) -> None:
    framed = FramedStream(stream)
    async for frame in framed:
        await framed.send(frame)


async def round_trips(keyed: bool, frames: int, body: int) -> list[float]:
    key = parse_key(generate_key())

    def ring() -> Keyring | None:
        return Keyring([key]) if keyed else None

    async with (await UdpTcpTransport.bind("127.0.0.1:0", keyring=ring()) as a,
                await UdpTcpTransport.bind("127.0.0.1:0", keyring=ring()) as b,
                trio.open_nursery() as nursery):
        await nursery.start(b.serve_streams, _echo)
        raw = await a.open_stream(b.local_address, 5)
        stream = FramedStream(raw)
        frame: dict[str, Any] = {"t": "x", "body": b"x" * body}
        for _ in range(200):  # warm-up: the handshake, the first allocations
            await stream.send(frame)
            await stream.receive()
        times = []
        for _ in range(frames):
            started = time.perf_counter()
            await stream.send(frame)
            await stream.receive()
            times.append(time.perf_counter() - started)
        await raw.aclose()
        nursery.cancel_scope.cancel()
    return sorted(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--frames", type=int, default=3000)
    p.add_argument("--body", type=int, default=200)
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args()
    ratios = []
    for _ in range(args.rounds):
        medians = {}
        for keyed in (False, True):
            t = trio.run(round_trips, keyed, args.frames, args.body)
            medians[keyed] = statistics.median(t)
            print(f"{'keyed' if keyed else 'clear'}: p50 {medians[keyed] * 1e6:.0f} us, "
                  f"p99 {t[int(len(t) * 0.99)] * 1e6:.0f} us")
        ratios.append(medians[True] / medians[False])
    print("keyed / clear round trip, p50, per round: "
          + ", ".join(f"{r:.2f}" for r in ratios))


if __name__ == "__main__":
    main()
