#!/usr/bin/env python3
"""Benchmark meshqd's AMQP port with RabbitMQ's own clients, and (--compare URL) another
AMQP broker in the same run, printed as ratios.

Usage: .venv/bin/python tools/bench_amqp.py [--compare amqp://guest:guest@127.0.0.1:5673/]
       [--repeat 3] [--messages 20000] [--url URL] [--only amqplib|latency|pika] [--out FILE]

meshq: its own meshqd (one node, embedded default, AMQP on a free loopback port) unless
--url names one. Workloads, each on a fresh durable queue, 256-byte bodies:

- amqplib publish: a confirm channel, publishes in windows of 1,000 (sendToQueue with
  persistent, then waitForConfirms); confirmed messages / seconds.
- amqplib consume+ack: the queue prefilled, one consumer with prefetch 100 acking each
  delivery; acked / seconds from consume to the last delivery.
- amqplib latency: open loop at --rate (1,000) msg/s for --latency-seconds, a publisher
  and a consumer (prefetch 100, ack each) on two connections of one process, after a
  one-second warm-up: p50/p99/max of receive time minus the time the message was handed
  to amqplib (the stamp written into the body at publish, as RabbitMQ's PerfTest does),
  and sched_p99 from the time it was due: Node's 1 ms timer adds up to a tick of lateness
  to that one, for every broker alike.
- pika publish: BlockingConnection with confirm_delivery, one publish at a time (each
  waits for its confirm, as pika's blocking adapter does); --pika-messages of them.
- pika consume+ack: prefetch 100, basic_ack per delivery.

Each workload runs --repeat times, alternating meshq and the compared broker, and the
medians are printed with their spread (min-max) and the ratio meshq / other (for latency:
other / meshq, so that higher is better everywhere). Load generators run outside the
brokers; on a 2-core machine they share the cores with them, for both brokers alike.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import pika

from meshq.testing import DaemonProcess
from meshq.testing.amqplib import node_env, node_modules

BODY_SIZE = 256

NODE_BENCH = r"""
const amqp = require('amqplib');
const [url, mode, queue, nText, sizeText, rateText, secondsText] = process.argv.slice(2);
const n = Number(nText), size = Number(sizeText);
const now = () => Number(process.hrtime.bigint()) / 1e9;
(async () => {
  const conn = await amqp.connect(url);
  const body = Buffer.alloc(size, 'm');
  if (mode === 'publish' || mode === 'fill') {
    const ch = await conn.createConfirmChannel();
    await ch.assertQueue(queue, {durable: true});
    const t0 = now();
    for (let sent = 0; sent < n;) {
      const k = Math.min(1000, n - sent);
      for (let i = 0; i < k; i++) ch.sendToQueue(queue, body, {persistent: true});
      sent += k;
      await ch.waitForConfirms();
    }
    console.log(JSON.stringify({rate: n / (now() - t0)}));
  } else if (mode === 'consume') {
    const ch = await conn.createChannel();
    await ch.assertQueue(queue, {durable: true});
    await ch.prefetch(100);
    const t0 = now();
    let got = 0;
    await new Promise((resolve) => ch.consume(queue, (msg) => {
      ch.ack(msg);
      if (++got === n) resolve();
    }));
    console.log(JSON.stringify({rate: n / (now() - t0)}));
  } else if (mode === 'latency') {
    const rate = Number(rateText), seconds = Number(secondsText);
    const pubConn = await amqp.connect(url);
    const pub = await pubConn.createConfirmChannel();
    const ch = await conn.createChannel();
    await ch.assertQueue(queue, {durable: true});
    await ch.prefetch(100);
    const samples = [], late = [];
    const total = Math.round(rate * seconds);
    const warm = rate;  // the first second is warm-up
    let got = 0;
    const done = new Promise((resolve) => ch.consume(queue, (msg) => {
      const i = msg.content.readUInt32BE(0);
      const sent = msg.content.readDoubleBE(4), sched = msg.content.readDoubleBE(12);
      const t = now();
      if (i >= warm) { samples.push(t - sent); late.push(t - sched); }
      ch.ack(msg);
      if (++got === total) resolve();
    }));
    const start = now() + 0.05;
    let next = 0;
    while (next < total) {  // each timer tick sends every message now due (open loop)
      await new Promise((r) => setTimeout(r, 1));
      const t = now();
      while (next < total && start + next / rate <= t) {
        const b = Buffer.alloc(size, 'm');
        b.writeUInt32BE(next, 0);
        b.writeDoubleBE(now(), 4);
        b.writeDoubleBE(start + next / rate, 12);
        pub.sendToQueue(queue, b, {persistent: true});
        next++;
      }
    }
    await done;
    samples.sort((a, b) => a - b);
    late.sort((a, b) => a - b);
    const q = (s, p) => s[Math.min(s.length - 1, Math.floor(p * s.length))];
    console.log(JSON.stringify({p50_ms: q(samples, 0.5) * 1e3, p99_ms: q(samples, 0.99) * 1e3,
                                max_ms: samples[samples.length - 1] * 1e3,
                                sched_p99_ms: q(late, 0.99) * 1e3}));
    await pubConn.close();
  }
  await conn.close();
})().catch((e) => { console.error(e); process.exit(1); });
"""


def run_node(script: Path, env: dict[str, str], url: str, mode: str, queue: str, n: int,
             rate: float = 0, seconds: float = 0) -> dict[str, float]:
    out = subprocess.run(["node", str(script), url, mode, queue, str(n), str(BODY_SIZE),
                          str(rate), str(seconds)], env=env, capture_output=True, text=True,
                         timeout=600)
    if out.returncode != 0:
        raise RuntimeError(f"amqplib {mode} failed: {out.stderr[-2000:]}")
    result: dict[str, float] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def pika_params(url: str) -> pika.URLParameters:
    return pika.URLParameters(url)


def pika_publish(url: str, queue: str, n: int) -> dict[str, float]:
    conn = pika.BlockingConnection(pika_params(url))
    ch = conn.channel()
    ch.queue_declare(queue, durable=True)
    ch.confirm_delivery()
    body = b"m" * BODY_SIZE
    props = pika.BasicProperties(delivery_mode=2)
    t0 = time.perf_counter()
    for _ in range(n):
        ch.basic_publish("", queue, body, props)
    rate = n / (time.perf_counter() - t0)
    conn.close()
    return {"rate": rate}


def pika_consume(url: str, queue: str, n: int) -> dict[str, float]:
    conn = pika.BlockingConnection(pika_params(url))
    ch = conn.channel()
    ch.queue_declare(queue, durable=True)
    ch.basic_qos(prefetch_count=100)
    t0 = time.perf_counter()
    for got, (method, _, _) in enumerate(ch.consume(queue, inactivity_timeout=30)):
        if method is None:
            raise RuntimeError(f"pika consume: only {got} of {n} came")
        ch.basic_ack(method.delivery_tag)
        if got + 1 == n:
            break
    rate = n / (time.perf_counter() - t0)
    ch.cancel()
    conn.close()
    return {"rate": rate}


def delete(url: str, queue: str) -> None:
    conn = pika.BlockingConnection(pika_params(url))
    conn.channel().queue_delete(queue)
    conn.close()


def workloads(args: argparse.Namespace, script: Path, env: dict[str, str],
              url: str) -> dict[str, dict[str, float]]:
    """One round of every workload against ``url`` (those --only names, if given)."""
    out: dict[str, dict[str, float]] = {}
    tag = uuid.uuid4().hex[:8]
    if args.only in (None, "amqplib"):
        q = f"bench.pub.{tag}"
        out["amqplib publish (confirms)"] = run_node(script, env, url, "publish", q,
                                                     args.messages)
        out["amqplib consume+ack (prefetch 100)"] = run_node(script, env, url, "consume",
                                                             q, args.messages)
        delete(url, q)
    if args.only in (None, "latency"):
        q = f"bench.lat.{tag}"
        out["amqplib latency at fixed rate"] = run_node(script, env, url, "latency", q, 0,
                                                        args.rate, args.latency_seconds)
        delete(url, q)
    if args.only in (None, "pika"):
        q = f"bench.pika.{tag}"
        out["pika publish (confirms, blocking)"] = pika_publish(url, q, args.pika_messages)
        out["pika consume+ack (prefetch 100)"] = pika_consume(url, q, args.pika_messages)
        delete(url, q)
    return out


def summarize(runs: list[dict[str, dict[str, float]]]) -> dict[str, dict[str, list[float]]]:
    table: dict[str, dict[str, list[float]]] = {}
    for run in runs:
        for name, figures in run.items():
            for key, value in figures.items():
                table.setdefault(name, {}).setdefault(key, []).append(value)
    return table


def fmt(values: list[float]) -> str:
    med = statistics.median(values)
    spread = f" ({min(values):,.1f}-{max(values):,.1f})" if len(values) > 1 else ""
    return f"{med:,.1f}{spread}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", help="meshq's AMQP URL (default: start a meshqd)")
    p.add_argument("--compare", help="another broker's AMQP URL, e.g. a RabbitMQ")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--messages", type=int, default=20_000)
    p.add_argument("--pika-messages", type=int, default=3_000)
    p.add_argument("--rate", type=float, default=1000.0)
    p.add_argument("--latency-seconds", type=float, default=5.0)
    p.add_argument("--only", choices=("amqplib", "latency", "pika"),
                   help="run one group of workloads")
    p.add_argument("--out", help="write the figures as JSON here")
    args = p.parse_args(argv)
    modules = node_modules()
    env = node_env(modules)
    daemon = None
    with tempfile.TemporaryDirectory(prefix="meshq-bench-amqp-") as tmp:
        script = Path(tmp) / "bench.js"
        script.write_text(NODE_BENCH)
        url = args.url
        if url is None:
            daemon = DaemonProcess(Path(tmp) / "data").start()
            url = f"amqp://guest:guest@{daemon.amqp}/%2F"
        try:
            mine, theirs = [], []
            for i in range(args.repeat):
                print(f"round {i + 1}/{args.repeat}: meshq", flush=True)
                mine.append(workloads(args, script, env, url))
                if args.compare:
                    print(f"round {i + 1}/{args.repeat}: compared broker", flush=True)
                    theirs.append(workloads(args, script, env, args.compare))
        finally:
            if daemon is not None:
                daemon.stop()
    a, b = summarize(mine), summarize(theirs) if theirs else {}
    print(f"\nmedian (min-max) of {args.repeat} rounds; msg/s or ms")
    print(f"{'workload':40} {'figure':7} {'meshq':>26} {'other':>26} {'ratio':>6}")
    for name, figures in a.items():
        for key, values in figures.items():
            other = b.get(name, {}).get(key)
            ratio = ""
            if other:
                m, o = statistics.median(values), statistics.median(other)
                ratio = f"{(m / o if key == 'rate' else o / m):.2f}"
            print(f"{name:40} {key:7} {fmt(values):>26} "
                  f"{fmt(other) if other else '-':>26} {ratio:>6}")
    if args.out:
        Path(args.out).write_text(json.dumps({"meshq": a, "other": b}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
