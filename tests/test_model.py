"""QueueOptions: the validation table of from_dict, and diff() used by re-declare.

Every bad option must raise BadRequest naming the option, so that a client sees which
field of its declare was wrong; good values come back normalised (times as floats).
"""

from __future__ import annotations

import math
from typing import Any

import pytest

from meshq.errors import BadRequest
from meshq.model import QueueOptions

DEFAULTS = {"replicas": 3, "write_quorum": None, "message_ttl": None, "visibility_timeout": 30.0,
            "max_deliveries": None, "dead_letter_queue": None, "max_length": None,
            "ordering": "fair", "expires": None, "dead_letter_exchange": None,
            "dead_letter_routing_key": None, "partitions": None}

GOOD: list[tuple[dict[str, Any], dict[str, Any]]] = [
    ({}, {}),
    ({"replicas": 1}, {"replicas": 1}),
    ({"replicas": 5}, {"replicas": 5}),
    ({"message_ttl": 60}, {"message_ttl": 60.0}),
    ({"message_ttl": 0.001}, {"message_ttl": 0.001}),
    ({"message_ttl": None}, {}),
    ({"visibility_timeout": 2}, {"visibility_timeout": 2.0}),
    ({"visibility_timeout": 0.5}, {"visibility_timeout": 0.5}),
    ({"max_deliveries": 1}, {"max_deliveries": 1}),
    ({"max_deliveries": None}, {}),
    ({"dead_letter_queue": "dlq"}, {"dead_letter_queue": "dlq"}),
    ({"dead_letter_queue": None}, {}),
    ({"max_length": 1}, {"max_length": 1}),
    ({"max_length": 10**6}, {"max_length": 10**6}),
    ({"ordering": "fifo"}, {"ordering": "fifo"}),
    ({"ordering": "fair"}, {}),
]

BAD: list[tuple[str, Any]] = [
    ("replicas", None),
    ("replicas", 0),
    ("replicas", -1),
    ("replicas", 1.0),
    ("replicas", 2.5),
    ("replicas", "3"),
    ("replicas", True),
    ("message_ttl", 0),
    ("message_ttl", 0.0001),
    ("message_ttl", -5),
    ("message_ttl", "60"),
    ("message_ttl", True),
    ("message_ttl", math.nan),
    ("message_ttl", math.inf),
    ("message_ttl", [60]),
    ("visibility_timeout", None),
    ("visibility_timeout", 0),
    ("visibility_timeout", -1.0),
    ("visibility_timeout", "30"),
    ("visibility_timeout", False),
    ("visibility_timeout", math.inf),
    ("max_deliveries", 0),
    ("max_deliveries", 2.0),
    ("max_deliveries", "2"),
    ("max_deliveries", False),
    ("dead_letter_exchange", 5),
    ("dead_letter_routing_key", ["k"]),
    ("expires", 0),
    ("expires", "60"),
    ("expires", math.nan),
    ("max_length", 0),
    ("max_length", -10),
    ("max_length", 1.5),
    ("max_length", {"n": 1}),
    ("dead_letter_queue", ""),
    ("dead_letter_queue", 5),
    ("dead_letter_queue", b"dlq"),
    ("dead_letter_queue", ["dlq"]),
    ("ordering", "lifo"),
    ("ordering", "FIFO"),
    ("ordering", None),
    ("ordering", 1),
]


def test_defaults() -> None:
    assert QueueOptions().to_dict() == DEFAULTS
    assert QueueOptions.from_dict({}) == QueueOptions()


@pytest.mark.parametrize(("given", "changed"), GOOD, ids=[repr(g) for g, _ in GOOD])
def test_good_options(given: dict[str, Any], changed: dict[str, Any]) -> None:
    opts = QueueOptions.from_dict(given)
    assert opts.to_dict() == {**DEFAULTS, **changed}
    for key in ("message_ttl", "visibility_timeout"):
        value = getattr(opts, key)
        assert value is None or type(value) is float
    assert QueueOptions.from_dict(opts.to_dict()) == opts  # round-trips through the store


def test_every_option_at_once() -> None:
    given = {"replicas": 2, "write_quorum": 2, "message_ttl": 5, "visibility_timeout": 7,
             "max_deliveries": 3,
             "dead_letter_queue": "dead", "max_length": 100, "ordering": "fifo",
             "expires": 60, "dead_letter_exchange": None, "dead_letter_routing_key": None,
             "partitions": 4}
    assert QueueOptions.from_dict(given).to_dict() == {
        **given, "message_ttl": 5.0, "visibility_timeout": 7.0, "expires": 60.0}


@pytest.mark.parametrize(("key", "value"), BAD, ids=[f"{k}={v!r}" for k, v in BAD])
def test_bad_option_names_the_option(key: str, value: Any) -> None:
    with pytest.raises(BadRequest, match=f"'{key}'"):
        QueueOptions.from_dict({key: value})
    # ...also next to good options.
    with pytest.raises(BadRequest, match=f"'{key}'"):
        QueueOptions.from_dict({"replicas": 1, "ordering": "fifo", **{key: value}})


def test_huge_integer_is_a_bad_request() -> None:
    with pytest.raises(BadRequest, match="'max_length'"):
        QueueOptions.from_dict({"max_length": 10**400})


@pytest.mark.parametrize("extra", [{"durable": True}, {"ttl": 5}, {"Replicas": 3}, {1: 2}])
def test_unknown_option(extra: dict[Any, Any]) -> None:
    [name] = extra
    with pytest.raises(BadRequest, match=f"unknown queue option.*{name}"):
        QueueOptions.from_dict({"replicas": 1, **extra})


def test_unknown_options_are_all_named() -> None:
    with pytest.raises(BadRequest, match="durable, exclusive"):
        QueueOptions.from_dict({"exclusive": 1, "durable": 1})


@pytest.mark.parametrize("opts", [None, [], "replicas=3", [("replicas", 3)], 3])
def test_options_must_be_a_map(opts: Any) -> None:
    with pytest.raises(BadRequest, match="map"):
        QueueOptions.from_dict(opts)


def test_diff() -> None:
    base = QueueOptions.from_dict({"message_ttl": 10})
    assert base.diff(base) == []
    assert base.diff(QueueOptions.from_dict({"message_ttl": 10.0})) == []  # 10 == 10.0
    assert base.diff(QueueOptions()) == ["message_ttl"]
    other = QueueOptions.from_dict({"replicas": 1, "ordering": "fifo", "max_length": 5})
    assert base.diff(other) == ["replicas", "message_ttl", "max_length", "ordering"]
    assert other.diff(base) == base.diff(other)
    # Only what was asked matters once defaults are filled in.
    assert QueueOptions.from_dict({"visibility_timeout": 30}).diff(QueueOptions()) == []


def test_a_dead_letter_queue_and_exchange_exclude_each_other() -> None:
    assert QueueOptions.from_dict({"dead_letter_exchange": "dlx",
                                   "dead_letter_routing_key": "k"}).dead_letter_exchange == "dlx"
    with pytest.raises(BadRequest, match="exclude each other"):
        QueueOptions.from_dict({"dead_letter_queue": "q", "dead_letter_exchange": "dlx"})
