"""Ring placement (SPEC section 3): a consistent-hash ring of virtual nodes, as a pure module.

State: an immutable ``Ring`` (node id -> vnode count, and the sorted vnode points derived from
it). Never: two nodes computing different rings from the same membership, so the point rule
below is fixed and must not change without a cluster-wide migration.

The rule every node follows, exactly:

* The ring is the integers ``[0, 2**64)``. ``position(data) = mmh3.hash64(data, seed=0,
  signed=False)[0]``, the low 64 bits of MurmurHash3_x64_128 (equivalently
  ``mmh3.hash128(data, signed=False) & (2**64 - 1)``).
* Node ``node`` with ``v`` vnodes has points ``position(f"{node}#{i}".encode("utf-8"))`` for
  ``i`` in ``range(v)`` (``i`` in decimal, no padding). Points are sorted by
  ``(position, node id)``; node ids compare by code point (the same as by their UTF-8 bytes).
* A key (``str`` as UTF-8, or ``bytes``) sits at ``position(key)``. Its primary is the node of
  the first point at or after that position, wrapping past ``2**64 - 1`` to the smallest
  point; so a point owns the half-open arc ``(previous point, point]``. Its preference list
  for N replicas is the first N distinct nodes met walking points clockwise from there.
  Two nodes at the same position: the smaller id owns the arc, the other's point owns nothing.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from types import MappingProxyType

import mmh3

__all__ = [
    "DEFAULT_VNODES",
    "RING_SIZE",
    "KeyRange",
    "PositionFn",
    "RangeChange",
    "RangeReplicas",
    "Ring",
    "mmh3_position",
    "moved_fraction",
    "ranges_changed",
    "vnode_label",
]

RING_SIZE = 1 << 64
DEFAULT_VNODES = 128

PositionFn = Callable[[bytes], int]
"""Maps bytes to a ring position in ``[0, RING_SIZE)``. Must be pure and deterministic."""


def mmh3_position(data: bytes) -> int:
    """The production position function: low 64 bits of MurmurHash3_x64_128, seed 0."""
    return mmh3.hash64(data, seed=0, signed=False)[0]


def vnode_label(node: str, index: int) -> bytes:
    """The bytes hashed for vnode ``index`` of ``node``: ``f"{node}#{index}"`` in UTF-8.

    Unambiguous even when node ids contain ``#``: the text after the last ``#`` is the index.
    """
    return f"{node}#{index}".encode()


def _key_bytes(key: str | bytes) -> bytes:
    if isinstance(key, str):
        return key.encode()
    if isinstance(key, bytes | bytearray | memoryview):
        return bytes(key)
    raise TypeError(f"ring keys are str or bytes, not {type(key).__name__}")


def _checked(pos: int) -> int:
    if not 0 <= pos < RING_SIZE:
        raise ValueError(f"position function returned {pos}, outside [0, 2**64)")
    return pos


@dataclass(frozen=True, slots=True)
class KeyRange:
    """The ring positions ``p`` with ``start < p <= end``, going clockwise modulo ``2**64``.

    ``start > end`` means the range wraps through 0; ``start == end`` means the whole ring.
    """

    start: int
    end: int

    @property
    def length(self) -> int:
        """How many positions the range holds (``RING_SIZE`` for the whole ring)."""
        return (self.end - self.start - 1) % RING_SIZE + 1

    @property
    def wraps(self) -> bool:
        return self.start >= self.end

    def __contains__(self, pos: object) -> bool:
        if not isinstance(pos, int) or not 0 <= pos < RING_SIZE:
            return False
        if self.start == self.end:
            return True
        return 0 < (pos - self.start) % RING_SIZE <= self.length

    def segments(self) -> list[tuple[int, int]]:
        """The range as inclusive ``(lo, hi)`` pairs that do not wrap: one, or two if it wraps.

        Convenient for ``pos BETWEEN lo AND hi`` queries. (SQLite integers are signed 64-bit:
        store ``pos - 2**63`` and shift these bounds the same way, which keeps the order.)
        """
        lo = (self.start + 1) % RING_SIZE
        if self.start < self.end:
            return [(lo, self.end)]
        if lo == 0:  # start is the top position: (2**64 - 1, end] is [0, end]
            return [(0, self.end)]
        return [(lo, RING_SIZE - 1), (0, self.end)]


@dataclass(frozen=True, slots=True)
class RangeReplicas:
    """A key range and the preference list shared by every key in it."""

    range: KeyRange
    replicas: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class RangeChange:
    """A key range whose replica set differs between two rings: what a rebalancer streams."""

    range: KeyRange
    old: tuple[str, ...]
    new: tuple[str, ...]

    @property
    def gained(self) -> frozenset[str]:
        """Nodes that must receive this range's data."""
        return frozenset(self.new) - frozenset(self.old)

    @property
    def lost(self) -> frozenset[str]:
        """Nodes that may drop this range's data once the gainers hold it."""
        return frozenset(self.old) - frozenset(self.new)


class Ring:
    """An immutable consistent-hash ring. Build one with :meth:`build`; change it with
    :meth:`with_node` / :meth:`without_node`, which return new rings.

    Two rings are equal when they have the same nodes with the same vnode counts and the same
    position function; equal rings place every key identically, whatever the order in which
    the nodes were added. Methods taking ``n`` (replicas) require ``n >= 1``; they return
    fewer than ``n`` nodes when the ring holds fewer.
    """

    __slots__ = ("_cache", "_nodes", "_owners", "_position_fn", "_positions", "_vnodes")

    _vnodes: Mapping[str, int]
    _position_fn: PositionFn
    _positions: tuple[int, ...]
    _owners: tuple[str, ...]
    _nodes: tuple[str, ...]
    _cache: dict[tuple[int, int], tuple[str, ...]]

    def __init__(self, vnodes: Mapping[str, int], position_fn: PositionFn) -> None:
        """Use :meth:`build`; this trusts ``vnodes`` to be validated already."""
        self._vnodes = MappingProxyType(dict(sorted(vnodes.items())))
        self._position_fn = position_fn
        points = sorted(
            (_checked(position_fn(vnode_label(node, i))), node)
            for node, count in self._vnodes.items()
            for i in range(count)
        )
        self._positions = tuple(p for p, _ in points)
        self._owners = tuple(node for _, node in points)
        self._nodes = tuple(self._vnodes)
        self._cache = {}

    @classmethod
    def build(
        cls,
        nodes: Mapping[str, int] | Iterable[str] = (),
        vnodes: int = DEFAULT_VNODES,
        *,
        position_fn: PositionFn = mmh3_position,
    ) -> Ring:
        """A ring of ``nodes``: a mapping of node id to its own vnode count (a weight), or an
        iterable of node ids that all get ``vnodes``. Every count must be at least 1."""
        if isinstance(nodes, Mapping):
            counts = {node: nodes[node] for node in nodes}
        else:
            counts = {}
            for node in nodes:
                if node in counts:
                    raise ValueError(f"duplicate node id {node!r}")
                counts[node] = vnodes
        for node, count in counts.items():
            _validate(node, count)
        return cls(counts, position_fn)

    # -- membership -----------------------------------------------------------------------

    def with_node(self, node: str, vnodes: int = DEFAULT_VNODES) -> Ring:
        """This ring plus ``node`` with ``vnodes`` points; re-weights ``node`` if present."""
        _validate(node, vnodes)
        if self._vnodes.get(node) == vnodes:
            return self
        return Ring({**self._vnodes, node: vnodes}, self._position_fn)

    def without_node(self, node: str) -> Ring:
        """This ring minus ``node``; the same ring if ``node`` is not in it."""
        if node not in self._vnodes:
            return self
        return Ring({k: v for k, v in self._vnodes.items() if k != node}, self._position_fn)

    @property
    def nodes(self) -> tuple[str, ...]:
        """The node ids, sorted."""
        return self._nodes

    @property
    def vnodes(self) -> Mapping[str, int]:
        """Node id -> vnode count (read-only)."""
        return self._vnodes

    @property
    def position_fn(self) -> PositionFn:
        return self._position_fn

    @property
    def points(self) -> tuple[tuple[int, str], ...]:
        """Every vnode as ``(position, node)``, in ring order."""
        return tuple(zip(self._positions, self._owners, strict=True))

    def __len__(self) -> int:
        return len(self._nodes)

    def __contains__(self, node: object) -> bool:
        return node in self._vnodes

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Ring):
            return NotImplemented
        return self._position_fn is other._position_fn and self._vnodes == other._vnodes

    def __hash__(self) -> int:
        return hash((self._position_fn, tuple(self._vnodes.items())))

    def __repr__(self) -> str:
        return f"Ring({dict(self._vnodes)!r})"

    # -- placement ------------------------------------------------------------------------

    def key_position(self, key: str | bytes) -> int:
        """Where ``key`` sits on the ring."""
        return _checked(self._position_fn(_key_bytes(key)))

    def preference_list(self, key: str | bytes, n: int) -> list[str]:
        """The first ``n`` distinct nodes clockwise from ``key`` (fewer if the ring is small)."""
        return list(self.preference_at(self.key_position(key), n))

    def preference_at(self, pos: int, n: int) -> tuple[str, ...]:
        """The preference list of every key at ring position ``pos``."""
        _check_n(n)
        if not self._positions:
            return ()
        return self._walk_from(self._index_at(pos), n)

    def owner(self, key: str | bytes) -> str:
        """The primary replica of ``key``. Raises LookupError on an empty ring."""
        if not self._positions:
            raise LookupError("the ring has no nodes")
        return self._owners[self._index_at(self.key_position(key))]

    def successors(self, key: str | bytes) -> Iterator[str]:
        """Every node, each once, in clockwise order from ``key``: the preference list
        extended to the whole ring (for sloppy quorum: walk past replicas that are down)."""
        if not self._positions:
            return
        start = self._index_at(self.key_position(key))
        seen: set[str] = set()
        total = len(self._positions)
        for step in range(total):
            node = self._owners[(start + step) % total]
            if node not in seen:
                seen.add(node)
                yield node
                if len(seen) == len(self._nodes):
                    return

    def _index_at(self, pos: int) -> int:
        """Index of the point that owns position ``pos`` (the first at or after it)."""
        if not 0 <= pos < RING_SIZE:
            raise ValueError(f"ring position out of range: {pos}")
        i = bisect_left(self._positions, pos)
        return 0 if i == len(self._positions) else i

    def _walk_from(self, index: int, n: int) -> tuple[str, ...]:
        want = min(n, len(self._nodes))
        cached = self._cache.get((index, want))
        if cached is not None:
            return cached
        found: list[str] = []
        total = len(self._positions)
        step = 0
        while len(found) < want:
            node = self._owners[(index + step) % total]
            if node not in found:
                found.append(node)
            step += 1
        result = tuple(found)
        self._cache[(index, want)] = result
        return result

    # -- ownership ------------------------------------------------------------------------

    def ranges(self, n: int) -> list[RangeReplicas]:
        """The ring cut at every point, each arc with its preference list; the arcs cover the
        ring exactly once (empty arcs of tied points are left out). Empty ring: ``[]``."""
        _check_n(n)
        out: list[RangeReplicas] = []
        pos = self._positions
        for i in range(len(pos)):
            prev = pos[i - 1]  # i == 0: the last point, so the first arc wraps
            if i > 0 and prev == pos[i]:
                continue
            out.append(RangeReplicas(KeyRange(prev, pos[i]), self._walk_from(i, n)))
        return out

    def ranges_of(self, node: str, n: int) -> list[RangeReplicas]:
        """The arcs ``node`` holds a replica of (what anti-entropy must restore on it)."""
        return [r for r in self.ranges(n) if node in r.replicas]

    def ownership(self) -> dict[str, float]:
        """Fraction of the key space each node owns as primary; sums to 1 (0 nodes: ``{}``)."""
        return self.replica_ownership(1)

    def replica_ownership(self, n: int) -> dict[str, float]:
        """Fraction of the key space for which each node is one of the ``n`` replicas; the
        fractions sum to ``min(n, len(ring))``."""
        arcs = dict.fromkeys(self._nodes, 0)
        for r in self.ranges(n):
            for node in r.replicas:
                arcs[node] += r.range.length
        return {node: length / RING_SIZE for node, length in arcs.items()}


def _validate(node: str, vnodes: int) -> None:
    if not isinstance(node, str) or not node:
        raise ValueError(f"node ids are non-empty strings, not {node!r}")
    if isinstance(vnodes, bool) or not isinstance(vnodes, int) or vnodes < 1:
        raise ValueError(f"vnode count for {node!r} must be an int >= 1, not {vnodes!r}")


def _check_n(n: int) -> None:
    if n < 1:
        raise ValueError(f"replica count must be >= 1, not {n}")


# -- comparing two rings ----------------------------------------------------------------------


def ranges_changed(old: Ring, new: Ring, n: int) -> list[RangeChange]:
    """The key ranges whose ``n``-replica set differs between ``old`` and ``new``, each with
    both preference lists; adjacent ranges with the same change are merged. Only the replica
    *set* counts: a reordering within the same nodes moves no data and is not reported.

    Exact: the ring is cut at the union of both rings' points, and between two consecutive
    cuts both preference lists are constant. Both rings must share a position function.
    """
    _check_n(n)
    if old.position_fn is not new.position_fn:
        raise ValueError("rings with different position functions cannot be compared")
    cuts = sorted(set(old._positions) | set(new._positions))
    if not cuts:
        return []
    pieces: list[RangeChange] = []
    for j, end in enumerate(cuts):
        before = old.preference_at(end, n)
        after = new.preference_at(end, n)
        if frozenset(before) == frozenset(after):
            continue
        rng = KeyRange(cuts[j - 1], end)
        last = pieces[-1] if pieces else None
        if last and last.range.end == rng.start and (last.old, last.new) == (before, after):
            pieces[-1] = RangeChange(KeyRange(last.range.start, end), before, after)
        else:
            pieces.append(RangeChange(rng, before, after))
    if len(pieces) > 1:  # the last piece may continue into the first, through the wrap
        first, last = pieces[0], pieces[-1]
        if last.range.end == first.range.start and (last.old, last.new) == (first.old, first.new):
            joined = KeyRange(last.range.start, first.range.end)
            pieces[0] = RangeChange(joined, first.old, first.new)
            pieces.pop()
    return pieces


def moved_fraction(old: Ring, new: Ring, n: int) -> float:
    """Exact fraction of the key space whose ``n``-replica set differs between the rings."""
    return sum(c.range.length for c in ranges_changed(old, new, n)) / RING_SIZE
