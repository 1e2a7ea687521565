"""The seed's sender.js and receiver.js (tests/amqp_seed/, copied unchanged from the
document meshq started from) run with amqplib on Node against a real meshqd.

amqplib is installed by meshq.testing.amqplib into a cache ($XDG_CACHE_HOME or ~/.cache, under
meshq-tests/); without ``node`` and ``npm``, or without the registry, the tests skip
and say why. The scripts connect to amqp://localhost, RabbitMQ's default port 5672, so
the daemon here listens there: the test skips when something else holds the port.
"""

from __future__ import annotations

import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from meshq.testing import DaemonProcess
from meshq.testing.amqplib import NodeUnavailable, node_env, node_modules

SEED = Path(__file__).parent / "amqp_seed"


def port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


@pytest.fixture(scope="module")
def modules() -> Path:
    try:
        return node_modules()
    except NodeUnavailable as exc:
        pytest.skip(str(exc))


@pytest.fixture
def rabbit_port_daemon(tmp_path: Path, modules: Path) -> Iterator[DaemonProcess]:
    if not port_free(5672):
        pytest.skip("127.0.0.1:5672 is in use (a RabbitMQ or a meshqd of ./tools/run?)")
    d = DaemonProcess(tmp_path / "data", args=["--amqp-bind", "127.0.0.1:5672"])
    d.start()
    yield d
    d.kill()


def test_the_seed_sender_and_receiver_run_unchanged(rabbit_port_daemon: DaemonProcess,
                                                    modules: Path) -> None:
    env = node_env(modules)
    receiver = subprocess.Popen(["node", str(SEED / "receiver.js")], env=env, cwd=SEED,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert receiver.stdout is not None
        first = receiver.stdout.readline()
        assert first.startswith("[*] Waiting for messages in hello"), first
        sent = subprocess.run(["node", str(SEED / "sender.js")], env=env, cwd=SEED,
                              capture_output=True, text=True, timeout=30)
        assert sent.returncode == 0, sent.stdout + sent.stderr
        assert sent.stdout.strip() == "[x] Sent 'Hello, RabbitMQ!'"
        got = receiver.stdout.readline()
        assert got.strip() == "[x] Received 'Hello, RabbitMQ!'", got
    finally:
        receiver.kill()
        receiver.wait()
        if receiver.stdout is not None:
            receiver.stdout.close()
    with rabbit_port_daemon.client() as c:
        [m] = c.receive("hello", max=1, wait=0) or [None]  # acked: nothing left but it
        assert m is None or m.body == b"Hello, RabbitMQ!"


CONFIRMS_JS = r"""
const amqp = require('amqplib');
(async () => {
  const conn = await amqp.connect(process.argv[2]);
  const ch = await conn.createConfirmChannel();
  await ch.assertQueue('node.confirms', {durable: true});
  for (let i = 0; i < 100; i++) {
    ch.sendToQueue('node.confirms', Buffer.from('m' + i),
                   {persistent: true, headers: {i}, contentType: 'text/plain'});
  }
  await ch.waitForConfirms();
  const rx = await conn.createChannel();
  await rx.prefetch(10);
  let n = 0;
  await new Promise((resolve) => rx.consume('node.confirms', (msg) => {
    if (msg.content.toString() !== 'm' + msg.properties.headers.i) throw new Error('bad');
    rx.ack(msg);
    if (++n === 100) resolve();
  }));
  await conn.close();
  console.log('ok ' + n);
})().catch((e) => { console.error(e); process.exit(1); });
"""


def test_amqplib_confirm_channel_and_prefetch(shared_daemon: DaemonProcess,
                                              modules: Path, tmp_path: Path) -> None:
    script = tmp_path / "confirms.js"
    script.write_text(CONFIRMS_JS)
    out = subprocess.run(["node", str(script), f"amqp://{shared_daemon.amqp}"],
                         env=node_env(modules), capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.strip() == "ok 100"
