"""Benchmark: recommendation quality of a ladder of model settings, beside popularity and EASE.

    .venv/bin/python bench/quality.py [--datasets movielens-small,synthetic] [--rows 300000]
                                      [--rungs 0,-1] [--no-refit] [--smoke]

Prepares movielens-small and a synthetic dataset (``--rows``, sized so that a rung takes a
minute or two on 2 CPU cores), then trains each rung of the ladder with the
real pipeline (``app.train.driver.train``: 2 CPU workers, TorchRec sharding, evaluation each epoch)
on the same split. Each rung adds one lever to the one before:

  today's defaults          the first release: user id only, in-batch softmax, 3 epochs
  + early stopping          up to --max-epochs, stop after `patience` epochs without a
                            better validation Recall@20, export the best epoch
  + history                 the query tower reads the user's latest positives (a mean-pooled
                            bag, with dropout in training), the candidate tower the year
  + normalisation and temp  L2-normalised towers, softmax temperature
  + catalog/mixed negatives a full softmax over the catalog (mixed in-batch + sampled
                            negatives above --catalog-max-items)
  + linear towers           one linear projection per tower instead of an MLP: the defaults
  + refit                   the last rung retrained on every split for its best epoch count
                            (no held-out data left: reports its training rows)

Settings are chosen on validation only; the table prints test Recall@20 / NDCG@20 per rung
beside popularity and EASE (λ chosen on validation), wall time and training samples/s, and
ends with one JSON line (the model = the default rung, the last held-out one).

``--rungs`` trains only the rungs named (indices into the ladder, -1 the last); the settings
of the rungs in between still accumulate (each one's configuration is checked), and the refit
runs unless ``--no-refit``. ``--smoke``: a 20,000-row synthetic dataset, the last rung (the
defaults, with every rung's settings checked on the way: ``--rungs -1``) for at most 2 epochs,
no refit (``--no-refit``: a second training run, as long as the first; ``--smoke --refit``
adds it), everything written in a temporary folder (removed after): the same code and the
same JSON keys (one dataset: no ``others``), to check that the benchmark runs.
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
from typing import Any, Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from app.core.config import load_config  # noqa: E402
from app.data.dataset import Manifest  # noqa: E402
from bench.smoke import parse_and_run  # noqa: E402

# The first release's settings, spelled out (the defaults have moved on since).
TODAY = {"epochs": 3, "patience": 0, "history_length": 0, "use_user_id": True,
         "use_year": False, "normalize": False, "temperature": 0.05, "negatives": "in_batch",
         "history_dropout": 0.0, "user_id_dropout": 0.0, "embedding_dim": 64,
         "tower_layers": [128, 64], "batch_size": 8192}
# --smoke's sizes (flags given explicitly still win)
SMOKE = {"datasets": "synthetic", "rows": 20_000, "max_epochs": 2, "rungs": "-1",
         "refit": False}


def ladder(max_epochs: int) -> list[tuple[str, dict[str, Any]]]:
    """Cumulative rungs: (name, overrides on top of the previous rung)."""
    defaults = load_config()
    m, t = defaults.model, defaults.train
    return [
        ("today's defaults", dict(TODAY)),
        ("+ early stopping", {"epochs": max_epochs, "patience": t.patience or 3}),
        ("+ history", {"history_length": m.history_length or 50,
                       "history_dropout": t.history_dropout,
                       "user_id_dropout": t.user_id_dropout, "use_user_id": m.use_user_id,
                       "use_year": m.use_year, "batch_size": t.batch_size}),
        ("+ normalisation and temperature", {"normalize": m.normalize,
                                             "temperature": m.temperature}),
        ("+ catalog/mixed negatives", {"negatives": m.negatives}),
        ("+ linear towers (defaults)", {"embedding_dim": m.embedding_dim,
                                        "tower_layers": list(m.tower_layers)}),
    ]


def prepare(name: str, rows: int, cache: Path) -> Path:
    """The dataset prepared once under ``cache`` (defaults otherwise: random 70/20/10 split)."""
    from app.core.publish import current
    from app.data.prepare import prepare_dataset

    out = cache / (f"quality-{name}" + (f"-{rows}" if name == "synthetic" else ""))
    if not (current(out) / "manifest.json").exists():  # prepared before (any layout)
        cache.mkdir(parents=True, exist_ok=True)
        cfg = load_config(overrides={"dataset": name, "rows": rows, "overwrite": True}).data
        prepare_dataset(cfg, str(out), verbose=False)
    return current(out)


def run_rung(overrides: dict[str, Any], data_dir: Path, work: Path, tag: str, *,
             refit: bool = False) -> dict[str, Any]:
    """Train one rung; its held-out figures (or, for a refit, its training rows)."""
    from app.train.driver import train

    cfg = load_config(overrides={**overrides, "workdir": str(work),
                                 "registered_model_name": "bench-quality",
                                 "num_workers": 2, "log_every": 10_000})
    t = time.perf_counter()
    result = train(cfg, str(data_dir), str(work / tag), verbose=False, refit=refit)
    seconds = time.perf_counter() - t
    history = result.history
    rate = statistics.median(h["train_samples_per_s_per_worker"] for h in history) * 2
    m = result.metrics
    out = {"seconds": round(seconds, 1), "samples_per_s": round(rate),
           "epochs": m["epochs"], "best_epoch": m["best_epoch"]}
    if refit:
        return {**out, "training_rows": result.training_rows}
    test = m["model"]["test"]
    out.update({"test_recall@20": round(test["recall@20"], 4),
                "test_ndcg@20": round(test["ndcg@20"], 4),
                "val_recall@20": round(m["model"]["val"]["recall@20"], 4),
                "_baselines": {"popularity": m["popularity"]["test"],
                               "ease": m.get("ease", {}).get("test")}})
    return out


def bench_dataset(name: str, data_dir: Path, work: Path, max_epochs: int,
                  only: Optional[str] = None, refit: bool = True) -> dict[str, Any]:
    """The ladder on one dataset (``only``: the rungs to train, comma-separated indices; the
    others' settings still accumulate), then (``refit``) the refit of the last."""
    manifest = Manifest.read(data_dir).to_dict()  # plain JSON values, typed parts or not
    print(f"\n== {name}: {manifest['counts']['splits']['train']:,} train rows, "
          f"{manifest['vocab']['users']:,} users, {manifest['vocab']['items']:,} items",
          flush=True)
    settings: dict[str, Any] = {}
    rungs, baselines = [], {}
    steps = ladder(max_epochs)
    chosen = ({int(x) % len(steps) for x in only.split(",") if x.strip()} if only
              else set(range(len(steps))))
    if not chosen:
        raise SystemExit("--rungs: name at least one rung")
    for i, (rung, overrides) in enumerate(steps):
        settings.update(overrides)
        if i not in chosen:
            load_config(overrides=dict(settings))  # not trained: its settings still valid
            print(f"  {rung:<34} (not trained: --rungs)", flush=True)
            continue
        r = run_rung(dict(settings), data_dir, work, f"{name}-{i}")
        baselines = r.pop("_baselines")
        rungs.append({"name": rung, **r})
        print(f"  {rung:<34} test recall@20 {r['test_recall@20']:.4f} ndcg@20 "
              f"{r['test_ndcg@20']:.4f} (val {r['val_recall@20']:.4f}; best epoch "
              f"{r['best_epoch']}/{r['epochs']}) {r['seconds']:.0f}s "
              f"{r['samples_per_s']:,} samples/s", flush=True)
    model = rungs[-1]  # the last held-out rung
    if refit:
        r = run_rung({**settings, "epochs": model["best_epoch"], "patience": 0}, data_dir,
                     work, f"{name}-refit", refit=True)
        rungs.append({"name": "+ refit", "test_recall@20": None, "test_ndcg@20": None, **r})
        print(f"  {'+ refit':<34} trains on {r['training_rows']:,} rows (every split) for "
              f"{r['epochs']} epoch(s): {r['seconds']:.0f}s {r['samples_per_s']:,} "
              f"samples/s; no held-out split left to score", flush=True)
    else:
        print(f"  {'+ refit':<34} (not trained: --no-refit)", flush=True)
    pop, ease = baselines["popularity"], baselines["ease"]
    return {"dataset": name, "rungs": rungs,
            "popularity_test_recall@20": round(pop["recall@20"], 4),
            "popularity_test_ndcg@20": round(pop["ndcg@20"], 4),
            "ease_test_recall@20": round(ease["recall@20"], 4) if ease else None,
            "ease_test_ndcg@20": round(ease["ndcg@20"], 4) if ease else None,
            "model_vs_ease": (round(model["test_recall@20"] / ease["recall@20"], 3)
                              if ease else None),
            "model_vs_popularity": round(model["test_recall@20"] / pop["recall@20"], 3)}


def table(res: dict[str, Any]) -> str:
    lines = [f"\n{res['dataset']}: test split, full-catalog ranking",
             f"  {'rung':<34}{'recall@20':>10}{'ndcg@20':>9}{'vs EASE':>9}{'seconds':>9}"
             f"{'samples/s':>11}"]
    ease = res["ease_test_recall@20"]
    for r in res["rungs"]:
        rec, ndcg = r["test_recall@20"], r["test_ndcg@20"]
        held_out = rec is not None
        cells = (f"{rec:.4f}" if held_out else "-", f"{ndcg:.4f}" if held_out else "-",
                 f"{rec / ease:.2f}x" if held_out and ease else "-")
        lines.append(f"  {r['name']:<34}{cells[0]:>10}{cells[1]:>9}{cells[2]:>9}"
                     f"{r['seconds']:>9.0f}{r['samples_per_s']:>11,}")
    lines.append(f"  {'popularity':<34}{res['popularity_test_recall@20']:>10.4f}"
                 f"{res['popularity_test_ndcg@20']:>9.4f}")
    if ease:
        lines.append(f"  {'EASE (λ chosen on val)':<34}{ease:>10.4f}"
                     f"{res['ease_test_ndcg@20']:>9.4f}")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--datasets", default="movielens-small,synthetic")
    p.add_argument("--rows", type=int, default=300_000, help="synthetic rows")
    p.add_argument("--max-epochs", type=int, default=load_config().train.epochs,
                   help="upper bound of epochs from the early-stopping rung on")
    p.add_argument("--rungs", default=None,
                   help="ladder rungs to train, comma-separated indices (default: all)")
    p.add_argument("--refit", action=argparse.BooleanOptionalAction, default=True,
                   help="retrain the last rung on every split (default; --no-refit skips it)")
    p.add_argument("--cache", default=str(ROOT / ".bench"))
    p.add_argument("--smoke", action="store_true",
                   help="tiny sizes in a temporary folder: checks the benchmark runs")
    parse_and_run(p, SMOKE, run)


def run(args: argparse.Namespace) -> None:
    import ray

    from app.core.cluster import init_ray

    os.environ["PYTHONPATH"] = os.pathsep.join(
        [str(ROOT)] + [x for x in os.environ.get("PYTHONPATH", "").split(os.pathsep) if x])
    init_ray(load_config(overrides={"num_cpus": max(2, os.cpu_count() or 2)}).cluster)
    ray.data.DataContext.get_current().enable_progress_bars = False
    work = Path(tempfile.mkdtemp(prefix="bench-quality-"))
    results = []
    try:
        for name in [d.strip() for d in args.datasets.split(",") if d.strip()]:
            data_dir = prepare(name, args.rows, Path(args.cache))
            results.append(bench_dataset(name, data_dir, work, args.max_epochs, args.rungs,
                                         refit=args.refit))
    finally:
        shutil.rmtree(work, ignore_errors=True)
        ray.shutdown()
    for res in results:
        print(table(res))
    first, rest = results[0], results[1:]
    print(json.dumps({**first, **({"others": rest} if rest else {})}))


if __name__ == "__main__":
    main()
