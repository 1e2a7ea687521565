"""meshq/amqp/topology.py: exchanges and bindings as catalog entries, and routing."""

from __future__ import annotations

import pytest

from meshq.amqp.topology import (
    Binding,
    Exchange,
    Topology,
    binding_name,
    exchange_name,
    headers_match,
    topic_match,
)
from meshq.cluster.changes import Decl, Drop
from meshq.cluster.lattice import Catalog, CatalogEntry, join_catalog


@pytest.mark.parametrize(("pattern", "key", "hit"), [
    ("a.b.c", "a.b.c", True), ("a.*.c", "a.x.c", True), ("a.*.c", "a.c", False),
    ("a.#", "a", True), ("a.#", "a.b.c", True), ("#", "", True), ("#", "x.y", True),
    ("*", "x.y", False), ("#.c", "a.b.c", True), ("a.#.c", "a.c", True),
    ("a.#.c", "a.b.d", False), ("*.*", "a", False), ("a.b", "a.b.c", False),
    ("*", "", False), ("", "", True), ("", "a", False), ("#.#", "", True),
])
def test_topic_match(pattern: str, key: str, hit: bool) -> None:
    assert topic_match(pattern, key) is hit


def test_headers_match_all_and_any() -> None:
    assert headers_match({"x-match": "all", "a": 1, "b": "x"}, {"a": 1, "b": "x", "c": 0})
    assert not headers_match({"a": 1, "b": "x"}, {"a": 1})
    assert headers_match({"x-match": "any", "a": 1, "b": "x"}, {"b": "x"})
    assert not headers_match({"x-match": "any", "a": 1}, {"a": 2})


def put(catalog: Catalog, name: str, inc: int, options: dict) -> None:
    catalog[name] = join_catalog(catalog.get(name) or CatalogEntry(name),
                                 Decl(name, inc, options))


def drop(catalog: Catalog, name: str) -> None:
    e = catalog[name]
    catalog[name] = join_catalog(e, Drop(name, e.inc, 1.0))


def test_bindings_live_through_redeclares_and_die_with_their_queue_or_exchange() -> None:
    cat = Catalog()
    topo = Topology(cat)
    put(cat, "q", 10, {})
    x = Exchange("fan", "fanout", inc=20)
    put(cat, exchange_name("fan"), 20, x.options())
    b = Binding("fan", "q", "", {}, 20, 10)
    put(cat, binding_name("fan", "q", "", {}), 30, b.options())
    route = lambda: topo.route(topo.exchange("fan"), "", None)  # noqa: E731
    assert route() == ["q"]
    put(cat, "q", 40, {})  # declared again elsewhere: a newer incarnation, no deletion
    put(cat, exchange_name("fan"), 50, x.options())
    assert route() == ["q"]
    drop(cat, "q")
    assert route() == []
    put(cat, "q", 60, {})  # a new queue of that name is not bound
    assert route() == []
    b2 = Binding("fan", "q", "", {}, 50, 60)
    put(cat, binding_name("fan", "q", "", {}), 70, b2.options())
    assert route() == ["q"]
    drop(cat, exchange_name("fan"))
    assert topo.exchange("fan") is None
    put(cat, exchange_name("fan"), 80, x.options())  # the exchange again: unbound
    assert route() == []
