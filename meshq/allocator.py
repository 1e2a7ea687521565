"""The C allocator (glibc's malloc) under meshqd and its writer: fewer arenas, big buffers
mapped apart, and free memory given back on demand. Elsewhere every call does nothing.
No imports beyond the standard library: the writer process loads this too."""

from __future__ import annotations

import ctypes

__all__ = ["malloc_trim", "tune_allocator"]

_M_MMAP_THRESHOLD, _M_ARENA_MAX = -3, -8  # glibc's mallopt parameters


def tune_allocator() -> None:
    """Keep the C allocator's memory near what is in use (glibc; elsewhere nothing).

    Big transient buffers (a frame of 500 messages, a batch packed for the writer) get
    their own mappings, given back when freed, instead of raising a heap that fragments
    and stays resident (a fixed threshold: glibc raises its default after the first such
    free); and at most two arenas, not eight per core for the worker threads."""
    try:
        libc = ctypes.CDLL(None)
        libc.mallopt(_M_MMAP_THRESHOLD, 128 * 1024)
        libc.mallopt(_M_ARENA_MAX, 2)
    except (OSError, AttributeError):
        pass


def malloc_trim() -> None:
    """Return the C allocator's free memory to the system (glibc); elsewhere nothing."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass


