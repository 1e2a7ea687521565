"""meshq/amqp/mapping.py: AMQP properties and queue arguments to meshq and back."""

from __future__ import annotations

import datetime
import decimal

import msgpack
import pytest
from pamqp import commands as spec
from pamqp import header as pheader

from meshq.amqp.frames import scan_properties
from meshq.amqp.mapping import ArgumentError, add_headers, from_meshq, queue_options, to_meshq


def decode(raw: bytes) -> spec.Basic.Properties:
    head = pheader.ContentHeader()
    head.unmarshal(b"\x00\x3c\x00\x00" + bytes(8) + raw)
    return head.properties


HEADERS = {"s": "text", "i8": -3, "i64": 2 ** 62, "f": 1.0000001, "d": decimal.Decimal("3.14"),
           "t": datetime.datetime(2026, 1, 2, 3, 4, 5, tzinfo=datetime.UTC),
           "b": True, "x": b"\x00\x01", "v": None, "a": [1, "two", [3.5]],
           "tbl": {"nested": {"deeper": "yes"}}}


def test_properties_are_kept_byte_for_byte_through_meshq_storage() -> None:
    props = spec.Basic.Properties(
        content_type="application/json", content_encoding="gzip",
        delivery_mode=2, priority=9, correlation_id="c", reply_to="r", expiration="1500",
        message_id="m", timestamp=datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC),
        message_type="t", user_id="guest", app_id="a")
    raw = add_headers(props.marshal(), HEADERS)  # every field type, as a client sends it
    sent = decode(raw)
    assert sent.headers == HEADERS and sent.app_id == "a"
    headers, expiration = scan_properties(raw)  # what the frame reader reads of them
    assert (headers, expiration) == (HEADERS, "1500")
    msg = to_meshq("", "q", "q", b"body", raw, headers, expiration)
    assert msg["ttl"] == 1.5
    stored = msgpack.unpackb(msgpack.packb(msg["headers"]))  # as the store keeps it
    assert stored["s"] == "text" and stored["f"] == 1.0000001  # plain ones readable too
    assert from_meshq({"queue": "q", "headers": stored, "delivery_count": 1}) == ("", "q", raw)
    _, _, again = from_meshq({"queue": "q", "headers": stored, "delivery_count": 3})
    back = decode(again)
    assert back.headers == {**HEADERS, "x-delivery-count": 2}
    for name in props.attributes():
        if name != "headers":
            assert getattr(back, name) == getattr(props, name), name


def test_a_plain_publish_stores_nothing_but_its_body() -> None:
    assert to_meshq("", "q", "q", b"x") == {"body": b"x"}
    _, _, raw = from_meshq({"queue": "q", "headers": {"h": 1.5, "b": b"\xff"},
                            "delivery_count": 3})
    assert decode(raw).headers == {"h": 1.5, "b": b"\xff", "x-delivery-count": 2}


@pytest.mark.parametrize("expiration", ["-1", "1.5", "soon", "1e3"])
def test_a_bad_expiration_is_a_precondition_failure(expiration: str) -> None:
    with pytest.raises(ArgumentError) as err:
        props = spec.Basic.Properties(expiration=expiration)
        to_meshq("", "q", "q", b"x", props.marshal(), None, expiration)
    assert err.value.code == 406


def test_queue_arguments() -> None:
    assert queue_options({"x-message-ttl": 2500, "x-max-length": 10, "x-delivery-limit": 2,
                          "x-dead-letter-exchange": "", "x-dead-letter-routing-key": "dlq",
                          "x-queue-type": "quorum", "x-expires": 60000}) == {
        "message_ttl": 2.5, "max_length": 10, "max_deliveries": 3,
        "dead_letter_queue": "dlq", "expires": 60.0}
    assert queue_options({"x-meshq-partitions": 6}) == {"partitions": 6}
    for bad in ({"x-meshq-partitions": 0},
                {"x-message-ttl": "10"}, {"x-max-length": -1}, {"x-queue-type": "stream"},
                {"x-dead-letter-exchange": 5}, {"x-dead-letter-routing-key": "q"},
                {"x-overflow": "reject-publish"}, {"x-expires": 0}):
        with pytest.raises(ArgumentError) as err:
            queue_options(bad)
        assert err.value.code == 406, bad


@pytest.mark.parametrize("raw", [b"", b"\x80", b"\x80\x00\x05ab", b"\x00\x01",
                                 b"\x20\x00\x00\x00\x00\x09\x01a", b"\x00\x00x"])
def test_malformed_properties_are_refused(raw: bytes) -> None:
    with pytest.raises((ValueError, IndexError)):
        scan_properties(raw)


def test_dead_letter_arguments() -> None:
    assert queue_options({"x-dead-letter-exchange": "dlx"}) == {"dead_letter_exchange": "dlx"}
    assert queue_options({"x-dead-letter-exchange": "dlx",
                          "x-dead-letter-routing-key": "k"}) == {
        "dead_letter_exchange": "dlx", "dead_letter_routing_key": "k"}
    assert queue_options({"x-dead-letter-exchange": "", "x-dead-letter-routing-key": "q"}
                         ) == {"dead_letter_queue": "q"}  # one queue: meshq's own DLQ
