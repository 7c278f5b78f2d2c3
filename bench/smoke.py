"""What the benchmarks' ``--smoke`` runs share: one temporary folder for all they write.

A smoke run (``bench/X.py --smoke``) takes tiny sizes (each benchmark its own), goes through
the same code as a full run and ends with the same JSON keys. Inside :func:`sandbox` every
file it writes lands in one temporary folder that is removed afterwards: the benchmark's cache
(its ``--cache`` is pointed there), Ray's session files (``RAY_TMPDIR``; with it, an embedded
Ray of its own, never a Ray already running on the machine: ``RAY_ADDRESS`` is dropped too),
and whatever this process, Ray's workers and the libraries put in the temp dir (``TMPDIR``,
inherited by every process Ray starts). Ray Train's controller polls its workers every 0.2 s
instead of 2 s (``RAY_TRAIN_HEALTH_CHECK_INTERVAL_S``): a worker group's start, its reports
and its end are noticed sooner, seconds of a smoke's training run; nothing else changes.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

_ENV = ("TMPDIR", "RAY_TMPDIR", "RAY_ADDRESS", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S")


@contextlib.contextmanager
def sandbox(enabled: bool) -> Iterator[Optional[Path]]:
    """Yield a fresh temporary folder (None when not ``enabled``: a full run, untouched).

    The folder's path is kept short: Ray's Unix sockets live under it (~107 characters at most).
    """
    if not enabled:
        yield None
        return
    root = Path(tempfile.mkdtemp(prefix="bs-"))
    saved = {name: os.environ.get(name) for name in _ENV}
    os.environ["TMPDIR"] = os.environ["RAY_TMPDIR"] = str(root)
    os.environ.pop("RAY_ADDRESS", None)
    os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] = "0.2"  # Ray Train's default: 2 s
    tempfile.tempdir = None  # tempfile reads TMPDIR again
    try:
        yield root
    finally:
        ray = sys.modules.get("ray")
        if ray is not None and ray.is_initialized():  # the Ray this run started (its own
            ray.shutdown()                            # RAY_TMPDIR): gone before its folder
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        tempfile.tempdir = None
        for _ in range(5):  # Ray's processes may still be closing their log files
            shutil.rmtree(root, ignore_errors=True)
            if not root.exists():
                break
            time.sleep(0.5)
        # the run is over: without this, the interpreter's exit collects the whole heap that
        # torch, Ray, MLflow and the rest left behind, seconds of a smoke that takes seconds
        gc.freeze()


def parse_and_run(p: argparse.ArgumentParser, smoke_sizes: dict[str, Any],
                  run: Callable[[argparse.Namespace], None]) -> None:
    """A benchmark's ``main``: parse its flags (``--smoke`` applies ``smoke_sizes``; flags
    given explicitly still win) and call ``run``, inside a :func:`sandbox` for a smoke (its
    ``--cache`` pointed into the sandbox)."""
    args = p.parse_args()
    if args.smoke:
        p.set_defaults(**smoke_sizes)
        args = p.parse_args()
    with sandbox(args.smoke) as tmp:
        if tmp is not None:
            args.cache = str(tmp / "cache")
        run(args)
