"""Publishing an output folder: it appears complete, or not at all.

A stage writes into a staging folder beside the final one (``.<name>.partial-<id>``) and
:func:`staged` renames it into place when the block succeeds; on any exception or interrupt
the staging folder is removed and what was published before stays as it was.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from pathlib import Path
from typing import Iterator


@contextlib.contextmanager
def staged(out: Path) -> Iterator[Path]:
    """Yield an empty staging folder for ``out``; on success it replaces ``out`` (an existing
    folder is moved aside first and removed after the switch)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.partial-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        if out.exists():
            old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
