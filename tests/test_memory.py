"""Freed heap memory goes back to the operating system between a driver's stages."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from tests.conftest import ROOT

_PROBE = textwrap.dedent("""
    import numpy as np, psutil
    from app.core.memory import release_freed
    rss = lambda: psutil.Process().memory_info().rss
    import pyarrow  # noqa: F401  (release_freed uses it: imported before measuring)
    big = np.ones(16 << 20, np.uint8)
    del big                          # freeing a mapped block raises glibc's mmap threshold,
    kept, holes = [], []             # so the 4 MB arrays below come from the heap
    for i in range(60):
        (kept if i % 2 else holes).append(np.ones(4 << 20, np.uint8))
    holes.clear()                    # 120 MB freed between live arrays: not trimmed by free()
    before = rss()
    release_freed()
    print(before - rss(), len(kept))
""")


def test_release_freed_returns_the_heap_pages_of_freed_arrays():
    out = subprocess.run([sys.executable, "-c", _PROBE], cwd=ROOT, capture_output=True,
                         text=True, check=True).stdout.split()
    released, kept = int(out[0]), int(out[1])
    assert kept == 30
    assert released > 60 << 20, f"only {released / 2**20:.0f} MB of 120 MB freed came back"
