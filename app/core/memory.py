"""Handing freed memory back to the operating system between a long process's stages.

A driver that runs every stage in one process keeps, after each stage, the heap pages its
freed objects left behind: glibc's allocator holds them for reuse, and so does Arrow's pool.
The process's resident size then carries each stage's high-water mark into the next, and the
run's peak is the sum of several stages' leftovers instead of the largest stage's own need.
:func:`release_freed` returns those pages (``malloc_trim``, as Dask's workers do, and
Arrow's ``release_unused``); objects still referenced are untouched.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
from functools import lru_cache
from typing import Any, Optional


@lru_cache(maxsize=1)
def _libc() -> Optional[Any]:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    return libc if libc is not None and hasattr(libc, "malloc_trim") else None  # glibc only


def release_freed() -> None:
    """Collect garbage and return the freed heap pages of this process (a no-op where the C
    library has no ``malloc_trim``)."""
    gc.collect()
    import pyarrow as pa

    pa.default_memory_pool().release_unused()
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)
