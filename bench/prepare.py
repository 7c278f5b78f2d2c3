"""Benchmark: the data stage against the practical floor, side by side in one run.

    .venv/bin/python bench/prepare.py [--rows 10000000] [--repeats 1] [--smoke]

Writes a synthetic CSV in the raw schema (cached under .bench/), then times
  floor    -- pyarrow reads the CSV and writes it as Parquet (multi-threaded, one process);
  pipeline -- app.data.prepare.prepare_dataset on the same CSV: Ray Data read, validation,
              vocabularies, labels, random split, MDS shards and manifest.
Ray starts before the clock. Prints rows/s for both, the time ratio, and one JSON line.
``--smoke``: 20,000 rows, one repeat, everything written in a temporary folder (removed after):
the same code and the same JSON keys in seconds, to check that the benchmark runs.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pyarrow.csv as pacsv  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import ray  # noqa: E402

from app.core.config import load_config  # noqa: E402
from app.data.prepare import prepare_dataset  # noqa: E402
from app.data.synthetic import generate_chunk, num_chunks  # noqa: E402
from bench.smoke import parse_and_run  # noqa: E402

SMOKE = {"rows": 20_000, "repeats": 1}  # --smoke's sizes (flags given explicitly still win)


def synthetic_csv(rows: int, seed: int, cache: Path) -> Path:
    path = cache / f"synthetic-{rows}-{seed}.csv"
    if path.exists():
        return path
    cache.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".partial")
    first = generate_chunk(0, rows=rows, seed=seed)
    with pacsv.CSVWriter(str(tmp), first.schema) as w:
        w.write_table(first)
        for c in range(1, num_chunks(rows)):
            w.write_table(generate_chunk(c, rows=rows, seed=seed))
    os.replace(tmp, path)
    return path


def warm(csv: Path) -> None:
    """Read the input once, untimed, so that each timed run starts with it in the page cache
    (this machine's kernel reclaims pages left idle for seconds; a run that read it from disk
    measured the disk, 3-4x the floor's in-memory time)."""
    with open(csv, "rb") as f:
        while f.read(1 << 24):
            pass


def floor(csv: Path, scratch: Path) -> float:
    warm(csv)
    t = time.perf_counter()
    table = pacsv.read_csv(csv)
    pq.write_table(table, scratch / "floor.parquet")
    return time.perf_counter() - t


def pipeline(csv: Path, scratch: Path) -> float:
    cfg = load_config(overrides={"dataset": "csv", "input": str(csv), "overwrite": True}).data
    warm(csv)
    t = time.perf_counter()
    prepare_dataset(cfg, str(scratch / "prepared"), verbose=False)
    return time.perf_counter() - t


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=10_000_000)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--repeats", type=int, default=1, help="runs of each; medians are reported")
    p.add_argument("--cache", default=str(Path(__file__).resolve().parents[1] / ".bench"))
    p.add_argument("--smoke", action="store_true",
                   help=f"tiny sizes ({SMOKE}) in a temporary folder: checks the benchmark runs")
    parse_and_run(p, SMOKE, run)


def run(args: argparse.Namespace) -> None:
    t = time.perf_counter()
    csv = synthetic_csv(args.rows, args.seed, Path(args.cache))
    print(f"input: {csv} ({csv.stat().st_size / 1e6:,.0f} MB, {args.rows:,} rows; "
          f"ready in {time.perf_counter() - t:.1f}s)")
    ray.init(include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False,
             logging_level="ERROR")
    ray.data.DataContext.get_current().enable_progress_bars = False
    scratch = Path(tempfile.mkdtemp(prefix="bench-prepare-"))
    try:
        floors, pipes = [], []
        for i in range(args.repeats):  # interleaved, so drift hits both alike
            floors.append(floor(csv, scratch))
            pipes.append(pipeline(csv, scratch))
            print(f"run {i + 1}: floor {floors[-1]:.2f}s  pipeline {pipes[-1]:.2f}s")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        ray.shutdown()
    f, pl = statistics.median(floors), statistics.median(pipes)
    print(f"{'':<10}{'seconds':>10}{'rows/s':>14}")
    print(f"{'floor':<10}{f:>10.2f}{args.rows / f:>14,.0f}")
    print(f"{'pipeline':<10}{pl:>10.2f}{args.rows / pl:>14,.0f}")
    print(f"pipeline time / floor time: {pl / f:.2f}x (target: <= 2.5x)")
    print(json.dumps({"rows": args.rows, "pipeline_rows_per_s": round(args.rows / pl),
                      "floor_rows_per_s": round(args.rows / f),
                      "time_ratio_vs_floor": round(pl / f, 3)}))


if __name__ == "__main__":
    main()
