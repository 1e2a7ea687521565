"""The dedup entries of a node, without one object in memory per message sent.

Every send a client may retry carries a dedup id, so a node that takes 30,000 messages a
second holds millions of entries through a five-minute window. Memory keeps the newest
``keep`` entries (and every one whose commit is not settled); older ones are only in the
store's dedup table, and a Bloom filter in memory says which keys may be there, so that a
new id (nearly every send) costs no disk read, and a retry of an older one costs one.

State here: ``recent`` (key -> (message id, expires_at, batch, CONFIRMED or None), oldest first),
Bloom filters of spilled keys (the newest one open, taking them; it is closed once it
holds FILTER_KEYS keys or has been open a ``window``, and a closed one is dropped a
``window`` after it closed: each key in it expired by then; so their number follows the
send rate, about one per 1.5 million sends in a window), and, after a start, whether
keys in the store are still to be read into the filter. Never: an entry dropped from
memory before it is durable (its batch settled) unless the filter says "maybe" for it; a
key the filter forgets before its entry expired. The filters outlive a clean stop
(``dump``, then ``restore`` from it): bit positions come from a hash that is the same in
every process.
"""

from __future__ import annotations

import logging
import math
import struct
from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import Any

import mmh3

__all__ = ["BLOOM_BITS", "CONFIRMED", "KEEP", "DedupIndex"]

log = logging.getLogger("meshq")

KEEP = 8192  # entries kept in memory
LOAD_PAGE = 20000  # stored keys read into the filter at a time, after a start
BLOOM_BITS = 1 << 24  # bits per filter (2 MiB) ...
FILTER_KEYS = 1_500_000  # ... closed at this many keys: about 0.6 % false hits
_MASK = BLOOM_BITS - 1

Key = tuple[str, str]
# (message id, expires_at, the batch writing it; CONFIRMED once this node's own send of it
# was confirmed; None for an entry merged from a peer or read from the store, which proves
# nothing about where its message is)
Entry = tuple[str, float, Any]


class _Confirmed:
    """The batch slot of an entry whose send this node confirmed (a done batch, no error)."""

    done = True
    error = None

    def __repr__(self) -> str:
        return "CONFIRMED"


CONFIRMED = _Confirmed()


def _bits(key: Key, _h64: Any = mmh3.hash64, _h32: Any = mmh3.hash) -> tuple[int, ...]:
    """The key's five bit positions: double hashing of the halves of a murmur3 (x64, 128
    bits) of the dedup id seeded with a murmur3 of the queue name. Not Python's ``hash``:
    that is salted per process, and the filters are saved at a clean stop and loaded at
    the next start (0.1-0.15 µs more per call, measured; twice per new id)."""
    a, b = _h64(key[1], _h32(key[0], 0, False), True, False)
    b |= 1
    return (a & _MASK, (a + b) & _MASK, (a + 2 * b) & _MASK, (a + 3 * b) & _MASK,
            (a + 4 * b) & _MASK)


# The saved filters: a header (magic, bits per filter, window, number of filters), then
# each filter's opened_at, closed_at (NaN: open) and count, then its bits.
_MAGIC = b"meshqbf1"  # (a new hash or layout: a new magic)
_HEAD = struct.Struct("<8sQdI")
_FILTER = struct.Struct("<ddQ")


class _Bloom:
    __slots__ = ("bits", "closed_at", "count", "opened_at")

    def __init__(self, now: float) -> None:
        self.bits = bytearray(BLOOM_BITS // 8)
        self.count = 0
        self.opened_at = now
        self.closed_at: float | None = None

    def add(self, key: Key) -> None:
        bits = self.bits
        for i in _bits(key):
            bits[i >> 3] |= 1 << (i & 7)
        self.count += 1

    def has(self, positions: tuple[int, ...]) -> bool:
        bits = self.bits
        for i in positions:  # noqa: SIM110 (a loop: all() of a generator is 3x slower)
            if not bits[i >> 3] & (1 << (i & 7)):
                return False
        return True


class DedupIndex:
    """The dedup entries of one Broker; see the module docstring. ``read(queue, dedup_id)``
    reads the store's entry, (message id, expires_at) or None (blocking: a point read)."""

    def __init__(self, read: Callable[[str, str], tuple[str, float] | None] | None,
                 window: float, clock: Callable[[], float], keep: int = KEEP) -> None:
        self._clock = clock
        # (an OrderedDict: taking the oldest of a plain dict whose front was deleted
        # scans the deleted slots, every time)
        self.recent: OrderedDict[Key, Entry] = OrderedDict()
        self._read = read
        self.window = window
        self.keep = keep if read is not None else 1 << 62  # (no store to read: keep all)
        self._filters: list[_Bloom] = []  # oldest first; the last one open
        self._unloaded = False  # keys in the store not yet in a filter (after a start)
        self.reads = 0  # store reads: retries of spilled entries, and false hits

    def get(self, key: Key, now: float) -> Entry | None:
        entry = self.recent.get(key)
        if entry is not None or self._read is None:
            return entry
        if not self._unloaded:
            if not self._filters:
                return None  # (nothing spilled: no key to hash)
            positions = _bits(key)
            for f in self._filters:
                if f.has(positions):
                    break
            else:
                return None
        self.reads += 1
        row = self._read(*key)
        if row is None or row[1] <= now:
            return None
        return (row[0], row[1], None)

    def __setitem__(self, key: Key, entry: Entry) -> None:
        recent = self.recent
        recent[key] = entry
        recent.move_to_end(key)  # (the newest)
        keep = self.keep
        if len(recent) > keep + (keep >> 3):  # (spilled down to keep an eighth at a time)
            self._spill(self._clock())

    def settle(self, key: Key, batch: Any) -> None:
        """``batch`` was confirmed: the entry no longer needs it (a batch held for the
        window would keep its ops and messages alive), only that it was (CONFIRMED)."""
        entry = self.recent.get(key)
        if entry is not None and entry[2] is batch:
            self.recent[key] = (entry[0], entry[1], CONFIRMED)

    def discard(self, key: Key, mid: str) -> None:
        """The entry for ``mid`` was never written."""
        entry = self.recent.get(key)
        if entry is not None and entry[0] == mid:
            del self.recent[key]

    def _spill(self, now: float) -> None:
        """Move the oldest entries past ``keep`` to the filter (they are in the store)."""
        recent, keep = self.recent, self.keep
        into: _Bloom | None = None
        bits = bytearray()
        for _ in range(len(recent)):  # (each entry looked at once at most)
            if len(recent) <= keep:
                return
            key, (mid, expires_at, batch) = recent.popitem(last=False)
            if batch is not None and batch is not CONFIRMED:
                if not batch.done:
                    recent[key] = (mid, expires_at, batch)
                    recent.move_to_end(key, last=False)
                    return  # not durable yet: it and what came after stay
                if batch.error is not None:
                    recent[key] = (mid, expires_at, batch)  # (kept: a retry replicates it)
                    continue
            if expires_at > now:
                if into is None or into.count >= FILTER_KEYS:
                    into = self._open(now)
                    bits = into.bits
                for i in _bits(key):  # (_Bloom.add, inline: every send spills one)
                    bits[i >> 3] |= 1 << (i & 7)
                into.count += 1

    def prune(self, now: float) -> bool:
        """Forget what expired; True if some entry may have, in memory or in the store
        (the caller prunes the store's then)."""
        for f in self._filters:
            if f.closed_at is None and now - f.opened_at >= self.window:
                f.closed_at = now
        self._filters = [f for f in self._filters  # (every key in them has expired)
                         if f.closed_at is None or now - f.closed_at < self.window]
        stale = [k for k, (_, exp, _) in self.recent.items() if exp <= now]
        for key in stale:
            del self.recent[key]
        return bool(stale) or bool(self._filters)

    def drop_queue(self, name: str) -> None:
        for key in [k for k in self.recent if k[0] == name]:
            del self.recent[key]

    def restore(self, entries: Iterable[tuple[str, str, str, float]], now: float, *,
                on_disk: bool = False, filters: bytes | None = None) -> None:
        """At start-up: the stored entries still in their window (``on_disk``: they were
        not read; until ``load`` has listed them, every key not in memory is looked up),
        or, with ``filters`` (what ``dump`` gave at a clean stop, the store says they are
        current), those filters instead of the listing. Filters that do not decode are
        ignored with a log line (the keys are listed then)."""
        loaded = False
        if on_disk and filters is not None and self._read is not None:
            try:
                self._filters = _decode(filters, self.window)
                loaded = True
            except ValueError as exc:
                log.warning("the saved dedup filters are not usable (%s): rebuilding them"
                            " from the store", exc)
        for queue, dedup_id, mid, expires_at in entries:
            if expires_at > now:
                self.recent[queue, dedup_id] = (mid, expires_at, None)
        self._spill(now)
        self._unloaded = on_disk and self._read is not None and not loaded

    async def load(self, store: Any, clock: Any) -> None:
        """After a start that left the entries on disk: put their keys in the filter, a
        page at a time, in a worker thread."""
        after = 0
        while self._unloaded:
            rows = await store.dedup_keys_async(after, LOAD_PAGE)
            now = clock.time()
            for position, queue, dedup_id, expires_at in rows:
                if expires_at > now:
                    self._open(now).add((queue, dedup_id))
                after = max(after, position)
            if len(rows) < LOAD_PAGE:
                self._unloaded = False

    def dump(self, now: float) -> bytes | None:
        """The filters as bytes for ``restore``, with every entry in memory (unexpired) in
        them too: each key in the store, and perhaps some that are not (a batch that
        failed or never committed: a false hit costs a read). None while keys in the store
        are still to be read into the filters (the next start rebuilds). For a clean stop,
        once nothing more is written: a key written after it is not in them."""
        if self._unloaded or self._read is None:
            return None
        filters = list(self._filters)
        if filters and filters[-1].closed_at is None:
            last = _Bloom(filters[-1].opened_at)  # (a copy: this index may go on)
            last.bits[:] = filters[-1].bits
            last.count = filters[-1].count
            filters[-1] = last
        for key, (_, expires_at, _) in self.recent.items():
            if expires_at <= now:
                continue
            if not filters or filters[-1].closed_at is not None:
                filters.append(_Bloom(now))
            elif filters[-1].count >= FILTER_KEYS:  # (as _open does)
                filters[-1].closed_at = now
                filters.append(_Bloom(now))
            filters[-1].add(key)
        out: list[bytes | bytearray] = [_HEAD.pack(_MAGIC, BLOOM_BITS, self.window, len(filters))]
        for f in filters:
            closed = math.nan if f.closed_at is None else f.closed_at
            out += [_FILTER.pack(f.opened_at, closed, f.count), f.bits]
        return b"".join(out)

    def _open(self, now: float) -> _Bloom:
        """The filter taking keys: a new one once the last is full or closed."""
        filters = self._filters
        if filters and filters[-1].closed_at is None:
            if filters[-1].count < FILTER_KEYS:
                return filters[-1]
            filters[-1].closed_at = now
        filters.append(_Bloom(now))
        return filters[-1]

    def __len__(self) -> int:
        return len(self.recent) + sum(f.count for f in self._filters)


def _decode(data: bytes, window: float) -> list[_Bloom]:
    """The filters ``DedupIndex.dump`` wrote; ValueError if these bytes are not that, or
    were written for another filter size or window."""
    view = memoryview(data)
    if len(view) < _HEAD.size:
        raise ValueError("too short")
    magic, bits, saved_window, n = _HEAD.unpack_from(view)
    if magic != _MAGIC or bits != BLOOM_BITS:
        raise ValueError("another format")
    if saved_window != window:
        raise ValueError(f"written for a {saved_window:g} s window, not {window:g} s")
    size = BLOOM_BITS // 8
    if len(view) != _HEAD.size + n * (_FILTER.size + size):
        raise ValueError("truncated or too long")
    filters: list[_Bloom] = []
    at = _HEAD.size
    for i in range(n):
        opened_at, closed_at, count = _FILTER.unpack_from(view, at)
        at += _FILTER.size
        f = _Bloom.__new__(_Bloom)
        f.bits = bytearray(view[at:at + size])
        at += size
        f.count, f.opened_at = count, opened_at
        f.closed_at = None if math.isnan(closed_at) else closed_at
        if f.closed_at is None and i < n - 1:
            raise ValueError("an open filter before the last")
        filters.append(f)
    return filters
