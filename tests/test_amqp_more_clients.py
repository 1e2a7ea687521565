"""AMQP 0-9-1 with more of RabbitMQ's clients against a real meshqd: aio-pika (asyncio),
pika's asyncio adapter, py-amqp, kombu, and a Celery worker running a task and returning
its result through the rpc backend."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import aio_pika
import amqp
import kombu
import pika
import pytest
from pika.adapters.asyncio_connection import AsyncioConnection

from meshq.testing import DaemonProcess


def url(d: DaemonProcess) -> str:
    return f"amqp://guest:guest@{d.amqp}/"


def test_aio_pika_publishes_with_confirms_and_consumes(shared_daemon: DaemonProcess) -> None:
    async def main() -> list[tuple[bytes, dict[str, object], str | None]]:
        conn = await aio_pika.connect_robust(url(shared_daemon))
        async with conn:
            ch = await conn.channel(publisher_confirms=True)
            await ch.set_qos(prefetch_count=10)
            q = await ch.declare_queue("aio", durable=True)
            x = await ch.declare_exchange("aio.x", aio_pika.ExchangeType.TOPIC)
            await q.bind(x, "job.#")
            for i in range(10):
                await x.publish(aio_pika.Message(f"m{i}".encode(), headers={"i": i, "f": 1.5},
                                                 correlation_id=f"c{i}",
                                                 delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
                                routing_key=f"job.{i}")
            got = []
            async with q.iterator() as it:
                async for message in it:
                    async with message.process():
                        got.append((message.body, dict(message.headers),
                                    message.correlation_id))
                    if len(got) == 10:
                        break
            return got

    got = asyncio.run(main())
    assert [b for b, _, _ in got] == [f"m{i}".encode() for i in range(10)]
    assert got[3][1] == {"i": 3, "f": 1.5} and got[3][2] == "c3"


def test_pika_asyncio_adapter_round_trip(shared_daemon: DaemonProcess) -> None:
    assert shared_daemon.amqp is not None
    host, port = shared_daemon.amqp.rsplit(":", 1)

    async def main() -> bytes:
        loop = asyncio.get_running_loop()
        done: asyncio.Future[bytes] = loop.create_future()

        def on_open(conn: AsyncioConnection) -> None:
            conn.channel(on_open_callback=on_channel)

        def on_channel(ch: pika.channel.Channel) -> None:
            def declared(_: object) -> None:
                ch.basic_publish("", "pika.asyncio", b"hello from asyncio")
                ch.basic_consume("pika.asyncio", on_message)

            ch.queue_declare("pika.asyncio", callback=declared)

        def on_message(ch: pika.channel.Channel, method: object, props: object,
                       body: bytes) -> None:
            ch.basic_ack(method.delivery_tag)  # type: ignore[attr-defined]
            if not done.done():
                done.set_result(body)

        closed: asyncio.Future[None] = loop.create_future()
        conn = AsyncioConnection(pika.ConnectionParameters(host, int(port)),
                                 on_open_callback=on_open, custom_ioloop=loop,
                                 on_close_callback=lambda *_: closed.set_result(None))
        try:
            return await asyncio.wait_for(done, 20)
        finally:
            conn.close()
            await asyncio.wait_for(closed, 20)

    assert asyncio.run(main()) == b"hello from asyncio"


def test_py_amqp_round_trip_with_confirms(shared_daemon: DaemonProcess) -> None:
    with amqp.Connection(shared_daemon.amqp, userid="guest", password="guest",
                         confirm_publish=True) as conn:
        ch = conn.channel()
        ch.queue_declare("pyamqp", durable=True, auto_delete=False)
        ch.basic_publish(amqp.Message("body", application_headers={"d": 2.25, "n": -7},
                                      content_type="text/plain", message_id="x1"),
                         routing_key="pyamqp")
        msg = ch.basic_get("pyamqp")
        assert msg is not None and msg.body == "body"
        assert msg.properties["application_headers"] == {"d": 2.25, "n": -7}
        assert msg.properties["message_id"] == "x1"
        ch.basic_ack(msg.delivery_tag)
        assert ch.basic_get("pyamqp") is None


def test_kombu_producer_and_consumer_through_a_direct_exchange(
        shared_daemon: DaemonProcess) -> None:
    exchange = kombu.Exchange("kombu.x", type="direct", durable=True)
    queue = kombu.Queue("kombu.q", exchange, routing_key="work")
    with kombu.Connection(url(shared_daemon)) as conn:
        with conn.Producer() as producer:
            producer.publish({"n": 42}, exchange=exchange, routing_key="work",
                             declare=[queue], serializer="json")
        got = []
        with conn.Consumer(queue, callbacks=[lambda body, m: (got.append(body), m.ack())]):
            conn.drain_events(timeout=10)
        assert got == [{"n": 42}]


TASKS = """
from celery import Celery
app = Celery("meshqtasks", broker="{broker}", backend="rpc://")
app.conf.update(broker_connection_retry_on_startup=True, worker_hijack_root_logger=False)

@app.task
def add(x, y):
    return x + y
"""


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_a_celery_worker_runs_a_task_and_returns_its_result(
        shared_daemon: DaemonProcess, tmp_path: Path) -> None:
    (tmp_path / "meshqtasks.py").write_text(textwrap.dedent(TASKS.format(
        broker=f"amqp://guest:guest@{shared_daemon.amqp}//")))
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    worker = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "meshqtasks", "worker", "--pool=solo",
         "--concurrency=1", "--without-gossip", "--without-mingle", "--without-heartbeat",
         "--loglevel=WARNING"], cwd=tmp_path, env=env, stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE, text=True)
    sys.path.insert(0, str(tmp_path))
    try:
        import meshqtasks  # type: ignore[import-not-found]
        try:
            results = [meshqtasks.add.delay(i, 2) for i in range(3)]
            assert [r.get(timeout=60) for r in results] == [2, 3, 4]
        finally:
            meshqtasks.app.backend.result_consumer.stop()  # its connection
            meshqtasks.app.close()
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("meshqtasks", None)
        worker.kill()  # its warm shutdown waits out its event loop's 10 s timer
        _, err = worker.communicate()
    assert "Traceback" not in err, err
