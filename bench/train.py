"""Benchmark: training throughput of the data path against the model step alone, and against
the seed notebook's data path, side by side in one run.

    .venv/bin/python bench/train.py [--rows 1000000] [--repeats 3] [--steps 80]
                                    [--objective-batch-size 2048] [--gpu] [--smoke]

Prepares a synthetic dataset once (cached under .bench/), then measures training samples/s
per worker with the ``bce`` objective at batch size 8192, each inside a Ray Train
``TorchTrainer`` (CPU workers, gloo) on the real sharded model (``build_sharded``):
  ceiling  -- ``train_step`` on batches built in memory before the clock, cycled over:
              the model step alone, no data path;
  pipeline -- this project's data path, as the epoch loop of app/train/loop.py runs it
              (``app.train.inputs.epoch_batches``): ``InteractionStream`` over the MDS train
              split -> ``epoch_sample_ids`` -> ``gather`` -> the batch maker in the
              ``prefetch`` background thread -> ``train_step``; with 1 worker and with 2;
  seed     -- the seed notebook's data path: a ``streaming.StreamingDataLoader`` over a plain
              ``StreamingDataset`` of the same split (default collate, one loader worker
              process unless --seed-loader-workers says otherwise), then a per-row Python
              loop that fills lists and builds the KeyedJaggedTensors -> ``train_step``.
Every worker warms up (2 steps) before its clock starts. Ceiling and pipeline run in the same
1-worker group, interleaved ``--repeats`` times (medians are reported), so drift hits both
alike; each pipeline repeat is a fresh epoch order and a fresh prefetch thread, timed from the
thread's start as the epoch loop times itself. The seed path is slow, so it times a fixed
``--seed-batches``. Also reports where a batch's time goes (gather, make_batch, step).
Two worker groups take every measurement, each running its jobs one after the other (a
group's start-up, ~10 s on 2 cores, is paid twice, not once per job): the 1-worker group
ceiling + pipeline, then seed; the 2-worker group pipeline, then the objective comparison
(bce, then the defaults, at the training default batch: ``--objective-batch-size``), then a
full softmax against mixed negatives on a ``--catalog-items`` catalog (the default model at the
same batch): what a full softmax costs per training row and catalog item, the figure the
``auto`` negatives' limit (``--catalog-max-logits``) is written from. Each job builds its own sharded model in the group's process group (the job before it released),
seeded as a group of its own would; worker imports come before any job. ``--gpu``: every
worker on its own GPU (nccl, FBGEMM's CUDA kernels).
Prints samples/s per worker, the ratios against the targets, and one JSON line.
``--smoke``: tiny sizes (20,000 rows, batch 1024, a few steps; a 2,000-item catalog for the
objective comparison, with ``catalog_max_items`` below it so the default objective takes mixed
negatives as at full size), everything written in a temporary folder (removed after): the
same code and the same JSON keys, to check that the benchmark runs.
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
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import ray  # noqa: E402

from app.core.config import load_config  # noqa: E402
from app.core.publish import current  # noqa: E402
from app.data.dataset import Manifest  # noqa: E402
from app.data.prepare import prepare_dataset  # noqa: E402
from bench.smoke import parse_and_run  # noqa: E402

BATCH_SIZE = 8192
WARMUP = 2
# --smoke's sizes (flags given explicitly still win)
SMOKE = {"rows": 20_000, "repeats": 1, "steps": 3, "memory_batches": 2, "seed_batches": 1,
         "objective_items": 2_000, "objective_steps": 3, "batch_size": 1024,
         "objective_batch_size": 512, "catalog_items": 500}


def prepared(rows: int, cache: Path, items: int = 0) -> Path:
    """The synthetic dataset of ``rows`` rows (``items`` items; 0: the generator's default),
    prepared once under ``cache``."""
    out = cache / (f"train-synthetic-{rows}" + (f"-{items}-items" if items else ""))
    if (current(out) / "manifest.json").exists():  # prepared before (any layout)
        return current(out)
    cache.mkdir(parents=True, exist_ok=True)
    cfg = load_config(overrides={"dataset": "synthetic", "rows": rows, "overwrite": True,
                                 "synthetic_items": items}).data
    prepare_dataset(cfg, str(out), verbose=False)
    return current(out)


# ---------------------------------------------------------------- worker side (Ray Train)

def _seed_batch(batch: dict[str, Any], genre_lists: Any) -> Any:
    """The seed notebook's conversion: one default-collated batch -> KJTs, row by row."""
    import torch
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    from app.train.batches import TwoTowerBatch

    user_values, user_lengths = [], []
    item_values, item_lengths = [], []
    genre_values, genre_lengths = [], []
    labels = []
    for user, item, label in zip(batch["user"], batch["item"], batch["label"]):
        user_values.append(int(user))
        user_lengths.append(1)
        item_values.append(int(item))
        item_lengths.append(1)
        if genre_lists is not None:
            ids = genre_lists[int(item)]
            genre_values.extend(ids)
            genre_lengths.append(len(ids))
        labels.append(float(label))
    query = KeyedJaggedTensor.from_lengths_sync(
        keys=["user_id"], values=torch.tensor(user_values, dtype=torch.int64),
        lengths=torch.tensor(user_lengths, dtype=torch.int64))
    keys = ["item_id"] + (["item_genres"] if genre_lists is not None else [])
    candidate = KeyedJaggedTensor.from_lengths_sync(
        keys=keys, values=torch.tensor(item_values + genre_values, dtype=torch.int64),
        lengths=torch.tensor(item_lengths + genre_lengths, dtype=torch.int64))
    return TwoTowerBatch(query=query, candidate=candidate,
                         labels=torch.tensor(labels, dtype=torch.float32),
                         items=torch.tensor(item_values, dtype=torch.int64),
                         extra_items=torch.empty(0, dtype=torch.int64))


def bench_worker(config: dict[str, Any]) -> None:
    """Ray Train worker: run ``config["jobs"]`` one after the other in this worker group, and
    (rank 0) write their figures, ``[{mode: [samples/s per worker, ...], ...}, ...]``, in
    order to ``config["out"]``. Each job builds its own sharded model (the one before it
    released) in the group's process group."""
    import gc
    import logging

    for name in ("", "torchrec", "fbgemm_gpu", "streaming"):
        logging.getLogger(name).setLevel(logging.WARNING)
    import ray.train

    # what every job imports, imported before any job's clock starts
    import app.data.reader  # noqa: F401
    import app.train.inputs  # noqa: F401
    import app.train.sharding  # noqa: F401

    results = []
    for job in config["jobs"]:
        t = time.perf_counter()
        results.append({**measure(job), "seconds": time.perf_counter() - t})
        gc.collect()  # the job's model, stream and batches gone before the next one's
    if ray.train.get_context().get_world_rank() == 0:
        Path(config["out"]).write_text(json.dumps(results))


def measure(config: dict[str, Any]) -> dict[str, Any]:
    """One job on this worker: build the sharded model of ``config["overrides"]``, time the
    requested mode(s); its figures."""
    import ray.train
    import torch

    from app.data.reader import InteractionStream
    from app.train.inputs import (BATCH_COLUMNS, epoch_batches, training_inputs,
                                  training_share)
    from app.train.sharding import build_sharded, train_step

    cfg = load_config(overrides=config["overrides"])
    data_dir = config["data_dir"]
    ctx = ray.train.get_context()
    device = ray.train.torch.get_device()
    torch.manual_seed(cfg.train.train_seed)
    inputs = training_inputs(cfg.model, data_dir)
    genres = next((f for f in inputs.features if f.name == "item_genres"), None)
    maker = inputs.batch_maker(seed=1, history_dropout=cfg.train.history_dropout,
                               user_id_dropout=cfg.train.user_id_dropout)

    def make_batch(rows: dict[str, Any]) -> Any:  # a training batch, as the epoch loop builds it
        return maker(rows, train=True)

    dmp, optimizer, _ = build_sharded(cfg.train, inputs.spec, inputs.positive_counts,
                                      device=device,
                                      local_world_size=ctx.get_local_world_size())
    dmp.train()
    bs = cfg.train.batch_size
    split = str(Path(data_dir, "train"))
    repeats, steps = int(config["repeats"]), int(config["steps"])
    out: dict[str, Any] = {"world_size": ctx.get_world_size(),
                           "torch_threads": torch.get_num_threads()}

    losses: list[float] = []

    def step(batch: Any) -> None:  # as the epoch loop steps (it keeps every step's loss)
        losses.append(float(train_step(dmp, optimizer, batch.to(device)).detach()))

    if config["mode"] == "seed":
        from streaming import StreamingDataLoader, StreamingDataset

        genre_lists = None
        if genres is not None:
            genre_lists = [genres.values[genres.offsets[i]:genres.offsets[i + 1]].tolist()
                           for i in range(len(genres.offsets) - 1)]
        ds = StreamingDataset(local=split, batch_size=bs, shuffle=True,
                              shuffle_seed=cfg.train.train_seed + 1)
        loader = StreamingDataLoader(ds, batch_size=bs, num_workers=config["loader_workers"])
        it = iter(loader)
        for _ in range(WARMUP):
            step(_seed_batch(next(it), genre_lists))
        n = int(config["seed_batches"])
        parts = {"load": 0.0, "kjt": 0.0, "step": 0.0}
        samples = 0
        t0 = time.perf_counter()
        for _ in range(n):
            a = time.perf_counter()
            raw = next(it)
            b = time.perf_counter()
            batch = _seed_batch(raw, genre_lists)
            c = time.perf_counter()
            step(batch)
            parts["load"] += b - a
            parts["kjt"] += c - b
            parts["step"] += time.perf_counter() - c
            samples += len(batch)
        out["seed"] = [samples / (time.perf_counter() - t0)]
        out["seed_ms_per_batch"] = {k: 1e3 * v / n for k, v in parts.items()}
    else:
        stream = InteractionStream(split, batch_size=bs, shuffle=True,
                                   shuffle_seed=cfg.train.train_seed + 1)

        def pipeline(epoch: int) -> float:
            """One epoch's first ``steps`` steps, as the epoch loop runs them."""
            share, n, batches = epoch_batches(stream, maker, epoch, device, bs,
                                              max_steps=steps)
            wait = 0.0
            t0 = time.perf_counter()
            for _ in range(n):
                a = time.perf_counter()
                batch = next(batches)
                wait += time.perf_counter() - a
                step(batch)
            seconds = time.perf_counter() - t0
            out["pipeline_ms_per_step"].append({"wait": 1e3 * wait / n,
                                                "step": 1e3 * (seconds - wait) / n})
            return share.rows_in(n) / seconds

        # the in-memory batches of the ceiling: full batches of epoch 0, built before any clock
        # (a softmax's batches hold positives alone, as the epoch loop's)
        share0 = training_share(stream, stream.epoch_sample_ids(epoch=0), device, bs,
                                positives_only=inputs.spec.objective == "softmax")
        ids0, bs0 = share0.ids, share0.batch_size
        n_mem = max(1, min(int(config["memory_batches"]), len(ids0) // bs0))
        gathered = [stream.gather(ids0[i * bs0:(i + 1) * bs0], BATCH_COLUMNS)
                    for i in range(n_mem)]
        in_memory = [make_batch(g) for g in gathered]
        for i in range(WARMUP):
            step(in_memory[i % n_mem])

        def ceiling() -> float:
            t0 = time.perf_counter()
            for s in range(steps):
                step(in_memory[s % n_mem])
            return steps * bs0 * share0.rows / max(len(ids0), 1) / (time.perf_counter() - t0)

        modes = config["modes"]
        for m in modes:
            out[m] = []
        out["pipeline_ms_per_step"] = []
        for r in range(repeats):  # interleaved, so drift hits every mode alike
            if "ceiling" in modes:
                out["ceiling"].append(ceiling())
            if "pipeline" in modes:
                out["pipeline"].append(pipeline(epoch=r + 1))

        if config.get("breakdown"):  # where one batch's time goes, each stage on its own
            k = min(n_mem, 8)
            t0 = time.perf_counter()
            for i in range(k):
                stream.gather(ids0[i * bs0:(i + 1) * bs0], BATCH_COLUMNS)
            t1 = time.perf_counter()
            for g in gathered[:k]:
                make_batch(g)
            t2 = time.perf_counter()
            for b in in_memory[:k]:
                step(b)
            t3 = time.perf_counter()
            out["ms_per_batch"] = {"gather": 1e3 * (t1 - t0) / k,
                                   "make_batch": 1e3 * (t2 - t1) / k,
                                   "step": 1e3 * (t3 - t2) / k}
        if torch.distributed.is_initialized():
            torch.distributed.barrier()  # every rank has read its last batch
        stream.release()
    return out


# ---------------------------------------------------------------- driver side

def run_group(workers: int, jobs: list[dict[str, Any]], scratch: Path, tag: str,
              gpu: bool = False) -> list[dict[str, Any]]:
    """Run ``jobs`` in order in one Ray Train worker group of ``workers`` (one GPU each and
    nccl with ``gpu``, else CPU workers and gloo); rank 0's figures of each, with its
    ``seconds`` (model build included, group start-up not)."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    out = scratch / f"{tag}.json"
    t = time.perf_counter()
    TorchTrainer(bench_worker, train_loop_config={"jobs": jobs, "out": str(out)},
                 scaling_config=ScalingConfig(num_workers=workers, use_gpu=gpu),
                 torch_config=TorchConfig(backend="nccl" if gpu else "gloo"),
                 run_config=RunConfig(name=tag, storage_path=str(scratch / "runs"))).fit()
    results = json.loads(out.read_text())
    busy = sum(r["seconds"] for r in results)
    print(f"{workers} worker(s), {len(jobs)} job(s): {time.perf_counter() - t:.0f}s "
          f"({time.perf_counter() - t - busy:.0f}s of it the group's start, imports and stop)")
    return results


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=1_000_000, help="synthetic rows to prepare")
    p.add_argument("--repeats", type=int, default=3,
                   help="timed windows of ceiling and pipeline (1 worker); medians are reported")
    p.add_argument("--steps", type=int, default=80, help="timed steps per window")
    p.add_argument("--memory-batches", type=int, default=16,
                   help="in-memory batches the ceiling cycles over")
    p.add_argument("--seed-batches", type=int, default=10, help="timed batches of the seed path")
    p.add_argument("--seed-loader-workers", type=int, default=1,
                   help="DataLoader worker processes of the seed path")
    p.add_argument("--objective-items", type=int, default=50_000,
                   help="catalog size of the default-objective vs bce comparison")
    p.add_argument("--catalog-items", type=int, default=5_000,
                   help="catalog size of the full-softmax vs mixed-negatives comparison")
    p.add_argument("--objective-steps", type=int, default=30,
                   help="timed steps per window of that comparison")
    p.add_argument("--batch-size", type=int, default=BATCH_SIZE,
                   help="batch of the data-path comparison (ceiling, pipeline, seed)")
    p.add_argument("--objective-batch-size", type=int,
                   default=load_config().train.batch_size,
                   help="batch of the default-objective vs bce comparison (default: the "
                        "training default, what users run)")
    p.add_argument("--gpu", action="store_true",
                   help="one GPU per worker (nccl, FBGEMM's CUDA kernels) instead of CPU "
                        "workers")
    p.add_argument("--cache", default=str(ROOT / ".bench"))
    p.add_argument("--smoke", action="store_true",
                   help="tiny sizes in a temporary folder: checks the benchmark runs")
    parse_and_run(p, SMOKE, run)


def show_data(rows: int, cache: Path, items: int = 0) -> Path:
    """:func:`prepared`, and a line about it."""
    t = time.perf_counter()
    data_dir = prepared(rows, cache, items)
    manifest = Manifest.read(data_dir).to_dict()  # plain JSON values, typed parts or not
    print(f"data: {data_dir} ({manifest['counts']['splits']['train']:,} train rows, "
          f"{manifest['vocab']['users']:,} users, {manifest['vocab']['items']:,} items; ready "
          f"in {time.perf_counter() - t:.1f}s)", flush=True)
    return data_dir


def run(args: argparse.Namespace) -> None:
    # Ray workers start from the node's environment: let them import app from any cwd
    os.environ["PYTHONPATH"] = os.pathsep.join(
        [str(ROOT)] + [x for x in os.environ.get("PYTHONPATH", "").split(os.pathsep) if x])
    ray.init(num_cpus=max(2, os.cpu_count() or 2), include_dashboard=False,
             _node_ip_address="127.0.0.1", log_to_driver=False, logging_level="ERROR")
    ray.data.DataContext.get_current().enable_progress_bars = False
    # the data paths' dataset, and the objective comparison's (--objective-items items)
    data_dir = show_data(args.rows, Path(args.cache))
    big = show_data(args.rows, Path(args.cache), items=args.objective_items)
    # the cost of a full softmax against mixed negatives, per logit (auto's limit)
    mid = show_data(args.rows, Path(args.cache), items=args.catalog_items)

    # the first release's model shape (user id only), so the data paths compare as before
    base = {"overrides": {"objective": "bce", "batch_size": args.batch_size,
                          "history_length": 0, "use_user_id": True, "use_year": False,
                          "use_genres": True},
            "data_dir": str(data_dir), "repeats": args.repeats, "steps": args.steps,
            "memory_batches": args.memory_batches, "seed_batches": args.seed_batches,
            "loader_workers": args.seed_loader_workers}
    # a smoke's small catalog would take a full softmax: keep the full run's mixed negatives
    smoke_model = {"catalog_max_items": args.objective_items // 2} if args.smoke else {}
    # the default objective (and model) against bce, same batch and workers, 50k items
    objective_jobs = [
        {**base, "overrides": {"batch_size": args.objective_batch_size, **smoke_model,
                               **over},
         "data_dir": str(big), "mode": "train", "modes": ["pipeline"], "repeats": 2,
         "steps": args.objective_steps} for over in ({"objective": "bce"}, {})]
    catalog_jobs = [
        {**base, "overrides": {"batch_size": args.objective_batch_size, "negatives": neg},
         "data_dir": str(mid), "mode": "train", "modes": ["pipeline"], "repeats": 2,
         "steps": args.objective_steps} for neg in ("catalog", "mixed")]
    scratch = Path(tempfile.mkdtemp(prefix="bench-train-"))
    try:
        # two worker groups, each running its jobs in turn: 1 worker, then 2
        one, seed = run_group(1, [{**base, "mode": "train", "modes": ["ceiling", "pipeline"],
                                   "breakdown": True},
                                  {**base, "mode": "seed"}], scratch, "one-worker", args.gpu)
        print(f"  ceiling + pipeline, 1 worker: {one['seconds']:.0f}s")
        for r, (c, pl) in enumerate(zip(one["ceiling"], one["pipeline"])):
            print(f"    run {r + 1}: ceiling {c:,.0f}  pipeline {pl:,.0f} samples/s")
        print(f"  seed, 1 worker: {seed['seconds']:.0f}s")
        two, *objective = run_group(2, [{**base, "mode": "train", "modes": ["pipeline"],
                                         "repeats": 1, "breakdown": True}, *objective_jobs,
                                     *catalog_jobs], scratch, "two-workers", args.gpu)
        objective, (full, mixed) = objective[:2], objective[2:]
        print(f"  pipeline, 2 workers: {two['seconds']:.0f}s")
        print(f"  default objective vs bce, 2 workers, {args.objective_items:,} items: "
              f"{sum(o['seconds'] for o in objective):.0f}s")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        ray.shutdown()

    c = statistics.median(one["ceiling"])
    pl = statistics.median(one["pipeline"])
    pl2 = statistics.median(two["pipeline"])
    s = seed["seed"][0]
    ms, ms2, sms = one["ms_per_batch"], two["ms_per_batch"], seed["seed_ms_per_batch"]
    kind = "GPU workers" if args.gpu else \
        f"CPU workers ({one['torch_threads']} torch thread(s) each)"
    print(f"\nsamples/s per worker, batch {args.batch_size}, objective bce, {kind}")
    print(f"{'':<22}{'workers':>8}{'samples/s':>12}")
    print(f"{'ceiling (in memory)':<22}{1:>8}{c:>12,.0f}")
    print(f"{'pipeline':<22}{1:>8}{pl:>12,.0f}")
    print(f"{'pipeline':<22}{2:>8}{pl2:>12,.0f}")
    print(f"{'seed notebook path':<22}{1:>8}{s:>12,.0f}")
    for w, m in ((1, ms), (2, ms2)):
        print(f"ms per batch ({w} worker(s), each stage alone): gather {m['gather']:.1f}, "
              f"make_batch {m['make_batch']:.1f}, step {m['step']:.1f}")
    for w, res in ((1, one), (2, two)):
        per = res["pipeline_ms_per_step"]
        wait = statistics.median(x["wait"] for x in per)
        st = statistics.median(x["step"] for x in per)
        print(f"ms per step inside the pipeline ({w} worker(s)): waiting for the batch "
              f"{wait:.1f}, step {st:.1f}")
    print(f"ms per batch (seed path): loader {sms['load']:.0f}, per-row KJT loop "
          f"{sms['kjt']:.0f}, step {sms['step']:.0f}")
    d_bce = statistics.median(objective[0]["pipeline"])
    d_def = statistics.median(objective[1]["pipeline"])
    defaults = load_config(overrides=smoke_model)
    big_rows = Manifest.read(big).counts.splits["train"]
    print(f"default objective ({defaults.model.objective}, "
          f"{defaults.model.resolved_negatives(args.objective_items + 1, big_rows)} negatives, "
          f"history "
          f"{defaults.model.history_length}) vs bce, batch {args.objective_batch_size}, 2 "
          f"workers, {args.objective_items:,} items: {d_def:,.0f} vs {d_bce:,.0f} samples/s "
          f"per worker = {d_def / d_bce:.2f} (target: >= 0.6)")
    # one step reads batch rows and scores each positive against the catalog or the mixed
    # negatives; per row of the split, a full softmax costs (1/full - 1/mixed) s more
    s_full, s_mixed = statistics.median(full["pipeline"]), statistics.median(mixed["pipeline"])
    ns_per_logit = 1e9 * (1 / s_full - 1 / s_mixed) / (args.catalog_items + 1)
    print(f"full softmax vs mixed negatives, default model, batch {args.objective_batch_size}, "
          f"2 workers, {args.catalog_items:,} items: {s_full:,.0f} vs {s_mixed:,.0f} samples/s "
          f"per worker = {s_full / s_mixed:.2f}; {ns_per_logit:.1f} ns per row and catalog "
          f"item (the limit `auto` uses, --catalog-max-logits, is written for about 8)")
    print(f"pipeline / ceiling: {pl / c:.1%} (target: >= 80%)")
    print(f"pipeline / seed: {pl / s:.1f}x (target: >= 20x)")
    print(json.dumps({"rows": args.rows, "device": "gpu" if args.gpu else "cpu",
                      "batch_size": args.batch_size,
                      "objective_batch_size": args.objective_batch_size,
                      "ceiling_samples_per_s": round(c),
                      "pipeline_samples_per_s": round(pl), "seed_samples_per_s": round(s),
                      "pipeline_vs_ceiling": round(pl / c, 3),
                      "pipeline_vs_seed": round(pl / s, 3),
                      "pipeline_2_workers_samples_per_s": round(pl2),
                      "default_objective_samples_per_s": round(d_def),
                      "bce_same_model_samples_per_s": round(d_bce),
                      "default_vs_bce": round(d_def / d_bce, 3),
                      "catalog_items": args.catalog_items,
                      "catalog_samples_per_s": round(s_full),
                      "mixed_samples_per_s": round(s_mixed),
                      "catalog_vs_mixed": round(s_full / s_mixed, 3),
                      "catalog_ns_per_logit": round(ns_per_logit, 2)}))


if __name__ == "__main__":
    main()
