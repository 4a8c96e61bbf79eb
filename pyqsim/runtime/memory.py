"""The block cache of program runs: NumPy arrays of 1 MiB and more allocated while a program runs come from a cache
of freed blocks (kept up to four times the peak in use) instead of fresh pages from the system, which a run would
otherwise pay for with a page fault per 4 KiB on every call (the same large arrays are allocated on every run)."""
from __future__ import annotations

import contextlib


def _native():
    try:
        from .. import _C
    except ImportError:
        return None
    return _C if hasattr(_C, "block_cache_enter") else None


@contextlib.contextmanager
def block_cache():
    """Arrays of >= 1 MiB allocated inside (in this thread or task) use the block cache; a no-op without the native
    extension or on a NumPy without allocation policies."""
    c = _native()
    prev = c.block_cache_enter() if c is not None else None
    try:
        yield
    finally:
        if prev is not None:
            c.block_cache_exit(prev)


def release() -> None:
    """Return every cached block to the system (the memory a later run needs is allocated again)."""
    c = _native()
    if c is not None:
        c.block_cache_release()


def stats() -> dict:
    """Bytes in use, cached and at the peak, and allocations served from the cache (hits) or not (misses)."""
    c = _native()
    return c.block_cache_stats() if c is not None else {}
