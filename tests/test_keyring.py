"""The cluster key ring, the sealed UDP envelope and encrypted streams (no daemons)."""

from __future__ import annotations

import base64
import json
import os
import stat
from pathlib import Path

import pytest
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

from meshq.mesh.keyring import (
    ENVELOPE_HEADER,
    ENVELOPE_OVERHEAD,
    Keyring,
    KeyringError,
    fingerprint,
    generate_key,
    parse_key,
)
from meshq.mesh.keys import KeyService
from meshq.mesh.secure import SecureStream, StreamRefused
from meshq.mesh.transport import RateLimit, source_host
from meshq.mesh.wire import PeerProtocolError, decode_packet, encode_packet

K1, K2, K3 = (bytes([n]) * 32 for n in (1, 2, 3))
PACKET = encode_packet([{"t": "ping", "seq": 7}])


def test_generated_keys_parse_and_bad_keys_are_refused() -> None:
    key = parse_key(generate_key())
    assert len(key) == 32
    assert parse_key(generate_key()) != key
    with pytest.raises(KeyringError, match="base64"):
        parse_key("not base64!")
    with pytest.raises(KeyringError, match="32 bytes"):
        parse_key(base64.b64encode(b"short").decode())
    assert fingerprint(K1) != fingerprint(K2)
    assert K1.hex() not in fingerprint(K1)


def test_seal_and_open_with_the_ring() -> None:
    ring = Keyring([K1])
    sealed = ring.seal(PACKET)
    assert sealed.startswith(ENVELOPE_HEADER)
    assert len(sealed) == len(PACKET) + ENVELOPE_OVERHEAD
    assert PACKET not in sealed
    assert ring.open(sealed) == PACKET
    assert ring.seal(PACKET) != sealed  # a fresh nonce each time
    assert Keyring([K2]).open(sealed) is None  # the wrong key
    assert Keyring([K2, K1]).open(sealed) == PACKET  # any installed key
    tampered = bytearray(sealed)
    tampered[-1] ^= 1
    assert ring.open(bytes(tampered)) is None
    assert ring.open(PACKET) is None  # in clear
    with pytest.raises(PeerProtocolError, match="encrypted packet"):
        decode_packet(sealed)  # what a node with no key makes of it


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_opening_any_bytes_gives_none_or_a_packet(data: bytes) -> None:
    ring = Keyring([K1, K2])
    assert ring.open(data) is None
    assert ring.open(ENVELOPE_HEADER + data) is None


def test_install_use_remove_and_persistence(tmp_path: Path) -> None:
    path = tmp_path / "keyring.json"
    ring = Keyring.load(path, K1)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert ring.primary == K1
    assert ring.install(K2) is True
    assert ring.install(K2) is False
    assert ring.primary == K1
    ring.use(K2)
    assert ring.primary == K2
    with pytest.raises(KeyringError, match="primary"):
        ring.remove(K2)
    ring.remove(K1)
    with pytest.raises(KeyringError, match="not installed"):
        ring.use(K1)
    assert ring.resolve(base64.b64encode(K3).decode()) is None  # valid, not installed
    assert ring.resolve(fingerprint(K3)) is None
    with pytest.raises(KeyringError, match="base64"):
        ring.resolve("neither a key nor a fingerprint")
    ring.remove(K1)  # already gone: a second run of a rotation step is harmless
    assert ring.resolve(fingerprint(K2)) == K2
    again = Keyring.load(path, K1)  # the file wins over the initial key
    assert again.keys == (K2,)
    assert json.loads(path.read_text())["keys"] == [base64.b64encode(K2).decode()]
    path.write_text("{nonsense")
    with pytest.raises(KeyringError, match="not a meshq keyring"):
        Keyring.load(path)
    path.write_text('{"keys": [1]}')
    with pytest.raises(KeyringError, match="not a meshq keyring"):
        Keyring.load(path)
    path.write_text('{"keys": []}')  # would silently turn encryption off
    with pytest.raises(KeyringError, match="holds no key"):
        Keyring.load(path, K1)
    assert list(tmp_path.glob("*.tmp")) == []


def test_an_empty_ring_refuses_install(tmp_path: Path) -> None:
    ring = Keyring.load(tmp_path / "keyring.json")
    assert not ring
    assert not (tmp_path / "keyring.json").exists()
    with pytest.raises(KeyringError, match="no cluster key"):
        ring.install(K1)


# ------------------------------------------------------------------ encrypted streams


def _pair(a: Keyring, b: Keyring) -> tuple[SecureStream, SecureStream, list[str]]:
    left, right = trio.testing.memory_stream_pair()
    refused: list[str] = []
    return (SecureStream(left, a, initiator=True, on_refused=refused.append),
            SecureStream(right, b, initiator=False, on_refused=refused.append), refused)


async def _read(stream: trio.abc.Stream, n: int) -> bytes:
    out = b""
    while len(out) < n:
        chunk = await stream.receive_some()
        if not chunk:
            break
        out += chunk
    return out


async def test_streams_carry_bytes_both_ways_with_any_shared_key() -> None:
    a, b, refused = _pair(Keyring([K1, K2]), Keyring([K2, K1]))  # mid-rotation
    big = bytes(range(256)) * 300  # several records
    async with trio.open_nursery() as nursery:
        nursery.start_soon(a.send_all, big)
        assert await _read(b, len(big)) == big
    async with trio.open_nursery() as nursery:
        nursery.start_soon(b.send_all, b"answer")  # b sends with its primary, K2
        assert await _read(a, 6) == b"answer"
    assert refused == []


async def test_a_stream_with_no_shared_key_is_refused() -> None:
    a, b, refused = _pair(Keyring([K1]), Keyring([K2]))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(a.send_all, b"secret")
        with pytest.raises(StreamRefused) as info:
            await b.receive_some()
    assert info.value.reason == "bad_key"
    assert refused == ["bad_key"]


async def test_a_stream_in_clear_is_refused() -> None:
    left, right = trio.testing.memory_stream_pair()
    refused: list[str] = []
    keyed = SecureStream(right, Keyring([K1]), initiator=False, on_refused=refused.append)
    await left.send_all(b"\x00\x00\x00\x10" + b"x" * 16 + b"more")
    with pytest.raises(StreamRefused) as info:
        await keyed.receive_some()
    assert info.value.reason == "unkeyed"
    assert refused == ["unkeyed"]


class Recorder(trio.abc.Stream):
    """A stream that keeps a copy of what is sent through it."""

    def __init__(self, inner: trio.abc.Stream) -> None:
        self.inner = inner
        self.sent: list[bytes] = []

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        self.sent.append(bytes(data))
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        return await self.inner.receive_some(max_bytes)

    async def aclose(self) -> None:
        await self.inner.aclose()


async def test_a_replayed_or_altered_record_is_refused() -> None:
    left, right = trio.testing.memory_stream_pair()
    ring = Keyring([K1])
    wire = Recorder(left)
    a = SecureStream(wire, ring, initiator=True)
    b = SecureStream(right, ring, initiator=False)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(a.send_all, b"first")
        assert await _read(b, 5) == b"first"
    preamble, record = wire.sent
    assert b"first" not in record
    await left.send_all(record)  # the same record again: its nonce is used up
    with pytest.raises(trio.BrokenResourceError, match="authentication"):
        await b.receive_some()  # after the peer authenticated: a broken stream

    left, right = trio.testing.memory_stream_pair()
    b = SecureStream(right, ring, initiator=False)
    await left.send_all(preamble)
    await left.send_all(record)  # a whole recorded stream, to a new one: new salts
    with pytest.raises(StreamRefused):
        await b.receive_some()


async def test_a_stream_outlives_the_removal_of_its_key_and_new_ones_need_the_new_key() -> None:
    ring_a, ring_b = Keyring([K1]), Keyring([K1])
    a, b, _ = _pair(ring_a, ring_b)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(a.send_all, b"hi")
        assert await _read(b, 2) == b"hi"
    ring_b.install(K2)
    ring_b.use(K2)
    ring_b.remove(K1)
    await a.send_all(b"more")  # its own stream keys: rotation does not cut it
    assert await _read(b, 4) == b"more"
    old, new, refused = _pair(Keyring([K1]), ring_b)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(old.send_all, b"late")
        with pytest.raises(StreamRefused):
            await new.receive_some()
    assert refused == ["bad_key"]


async def test_a_peer_that_connects_and_closes_is_counted_not_raised_as_broken() -> None:
    left, right = trio.testing.memory_stream_pair()
    refused: list[str] = []
    keyed = SecureStream(right, Keyring([K1]), initiator=False, on_refused=refused.append)
    await left.send_eof()
    with pytest.raises(StreamRefused):
        await keyed.receive_some()
    assert refused == ["unkeyed"]


async def test_a_silent_peer_breaks_the_handshake_in_time(autojump_clock: object) -> None:
    left, right = trio.testing.memory_stream_pair()
    keyed = SecureStream(left, Keyring([K1]), initiator=True, handshake_timeout=5)
    with pytest.raises(trio.BrokenResourceError, match="no handshake"):
        await keyed.send_all(b"hello?")
    assert trio.current_time() == pytest.approx(5)
    del right


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300), st.booleans())
async def test_any_bytes_on_a_keyed_stream_are_refused(data: bytes, with_preamble: bool) -> None:
    """Whatever an attacker without the key sends: a refusal or an end, never plaintext."""
    left, right = trio.testing.memory_stream_pair()
    keyed = SecureStream(right, Keyring([K1]), initiator=False)
    await left.send_all((b"MQS\x01" + bytes(16) if with_preamble else b"") + data)
    await left.send_eof()  # the keyed side can still send its own preamble
    try:
        got = await keyed.receive_some()
    except (PeerProtocolError, trio.BrokenResourceError):
        return
    assert got == b"" and with_preamble and data == b"", data  # a clean, empty stream


# ------------------------------------------------------------------ the UDP rate limit


def test_rate_limit_is_a_token_bucket_per_source() -> None:
    limit = RateLimit(10)
    assert sum(limit.allow("a", 0.0) for _ in range(15)) == 10  # a burst of one second
    assert limit.allow("b", 0.0)  # another source has its own bucket
    assert not limit.allow("a", 0.05)  # half a token
    assert limit.allow("a", 0.1)  # one token refilled
    assert sum(limit.allow("a", 5.0) for _ in range(15)) == 10  # refills up to the burst


@pytest.mark.parametrize(("addr", "host"), [
    ("10.0.0.5:7946", "10.0.0.5"),
    ("10.0.0.5:1", "10.0.0.5"),
    ("[2001:db8::1]:7946", "2001:db8::/64"),
    ("[2001:db8::ffff:1]:5", "2001:db8::/64"),
    ("[::1]:7946", "::/64"),
])
def test_limits_count_per_host_and_ipv6_per_64(addr: str, host: str) -> None:
    assert source_host(addr) == host


async def test_concurrent_key_changes_are_taken_one_at_a_time(tmp_path: Path) -> None:
    """Two operators at once: every change lands, and the file says what memory says."""
    path = tmp_path / "keyring.json"
    ring = Keyring.load(path, K1)
    service = KeyService(me="a", cluster="meshq", keyring=ring,
                         transport=None, membership=None)  # type: ignore[arg-type]
    new = [bytes([n]) * 32 for n in range(10, 30)]
    results: list[dict] = []

    async def install(key: bytes) -> None:
        results.append(await service.apply_local("install", base64.b64encode(key).decode()))

    async with trio.open_nursery() as nursery:
        for key in new:
            nursery.start_soon(install, key)
    assert all(r["ok"] and r["changed"] for r in results)
    assert set(ring.keys) == {K1, *new} and ring.primary == K1
    assert Keyring.load(path).keys == ring.keys
    assert [p.name for p in os.scandir(tmp_path)] == ["keyring.json"]  # no temp files left
    removed = await service.apply_local("remove", fingerprint(new[0]))
    again = await service.apply_local("remove", fingerprint(new[0]))
    assert (removed["changed"], again["ok"], again["changed"]) == (True, True, False)
