"""Benchmark: batch top-K inference through Ray Data against the same top-K in one process,
side by side in one run.

    .venv/bin/python bench/inference.py [--users 100000] [--items 50000] [--dim 64] [--k 100]
                                        [--actors 1,2] [--batch-sizes 1024] [--repeats 3]
                                        [--gpu] [--smoke]

Builds once (cached under .bench/) a synthetic model folder and a prepared dataset that
matches it, without training:
  model -- ``ModelSpec(num_users=U + 1, num_items=N + 1, num_genres=0, embedding_dim=D,
           tower_layers=(D,))``, one linear layer per tower, random weights saved as the
           ``ExportedTwoTower`` state dict (``weights.pt``); ``model.json`` by
           ``write_model_json``; ``vocab/users.parquet`` and ``vocab/items.parquet`` (index
           1..n, id = 1000 + index as int64); ``item_popularity.npy`` (train positives per item);
  data  -- the same vocab files, ``--rated`` random interactions per user written as MDS splits
           (train/val/test, 70/20/10) with ``app.data.mds.write_mds_columns`` and merged by
           ``app.data.prepare.merge_split_index``, and a manifest with the keys ``read_manifest``
           checks (schema version, MDS columns) and ``write_model_json`` reads (created_unix,
           vocab, counts.splits). The vocab files are copies of the model's, so
           ``check_dataset_matches`` passes; the splits are only read when exclusion is on.
Then, with Ray started and one untimed pipeline run on 64 users (a users file: one batch, so
one actor) done before any clock:
  ceiling  -- the same scoring in this process on in-memory tensors, with the serving core's
              kernels: query embeddings (U, D) x item embeddings (N + 1, D) in chunks of
              users (the pipeline's chunk rule) into one reused block with rows padded to 64
              bytes (``app.train.metrics.Product``), column 0 (unknown item) masked, the
              blocked top-K (``app.train.metrics.top_k``); every torch thread;
  pipeline -- ``app.serve.batch.batch_inference`` end to end (model and dataset checks, item
              embeddings, actor pool start-up, ``map_batches(TopK)``, each actor writing its
              batches' Parquet files, the counts added up), with ``exclude_rated="none"``
              so the work equals the ceiling's; one run per pool size in ``--actors`` (and
              batch size), users/s over its wall time. Ceiling and pipeline runs are
              interleaved ``--repeats`` times (medians are reported), so drift hits all
              alike;
  exclude  -- one pipeline run with the default exclusion (``exclude_rated="all"``) at the
              fastest pool size, for reference (``--no-exclude-run`` skips it).
The query and item embeddings of the ceiling come from the saved weights through
``ExportedTwoTower.user_embeddings`` / ``item_embeddings``, as the pipeline computes them, and
the first pipeline run's lists are checked against the ceiling's on a sample of users.
Then where the pipeline's time goes: the pool's start (to the first batch) and its batches
(to the last batch's end) as the summary gives them from the actors' clocks, the driver's
time before and after the pool being the rest of the wall time; and each part timed on its
own: one actor's work stage by stage on a few batches in this process with one torch thread
(an actor's share): matrix product + topk, the rest of ``Recommender.recommend`` (id lookup,
output DataFrame), Arrow conversion, Parquet writing; an actor's start alone (imports in a
fresh interpreter, the TopK constructor); the driver's set-up before the pool. Prints users/s
side by side, the ratio against the target, the batches' own rate against the ceiling
(``pipeline_batches_vs_ceiling``: what the pipeline does once its actors run, without their
fixed start ``pipeline_startup_s``), and one JSON line. At the defaults on 2 cores the whole
run takes about 3 minutes.
``--gpu``: the pipeline's actors score on a GPU each (``inference_device="gpu"``: one GPU per
actor, so pool sizes above the GPU count are left out), the ceiling's matrix product and topk
run on ``cuda`` (the embeddings moved there before the clock, one chunk scored untimed first:
CUDA's context and cuBLAS start-up), and so does the actor's work timed stage by stage; the
JSON keys are the same, with ``"device"`` saying which (``cpu`` without the flag).
``--smoke``: 2,000 users x 1,000 items (dim 16, top-10, batches of 256), one pool size (1
actor: each pool size is one more run, most of it actor start-up; the keys per pool size are
those of ``--actors 1``), everything written in a temporary folder (removed after): the same
code and the same JSON keys otherwise, in well under a minute, to check that the benchmark
runs.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import ray  # noqa: E402
import torch  # noqa: E402

from app.core.config import load_config  # noqa: E402
from app.core.publish import local_dir  # noqa: E402
from app.core.storage import resolve  # noqa: E402
from app.data.dataset import MANIFEST, SCHEMA_VERSION, SPLITS, Manifest, read_manifest  # noqa: E402
from app.data.mds import INTERACTION_COLUMNS, write_mds_columns  # noqa: E402
from app.data.prepare import merge_split_index  # noqa: E402
from app.data.sink import put_parquet  # noqa: E402
from app.serve.batch import (  # noqa: E402
    TopK,
    _device_and_pool,
    batch_inference,
    check_dataset_matches,
)
from app.train.export import ExportedTwoTower  # noqa: E402
from app.train.metrics import Product, top_k  # noqa: E402
from app.train.model_folder import (  # noqa: E402
    WEIGHTS,
    item_popularity,
    load_exported,
    rated_items,
    write_model_json,
)
from app.train.model import ModelSpec  # noqa: E402
from bench.smoke import parse_and_run  # noqa: E402

ID_BASE = 1000          # id of vocabulary index i is ID_BASE + i
SPLIT_FRACTIONS = (0.7, 0.2, 0.1)
SAMPLE_USERS = 200      # users whose pipeline lists are compared with the ceiling's
TARGET = 0.8  # pipeline users/s over the ceiling's
# --smoke's sizes (flags given explicitly still win)
SMOKE = {"users": 2_000, "items": 1_000, "dim": 16, "k": 10, "actors": [1],
         "batch_sizes": [256], "rated": 5, "stage_batches": 1, "repeats": 1}


# ---------------------------------------------------------------- synthetic model and dataset

def _vocab_table(n: int) -> pa.Table:
    index = np.arange(1, n + 1, dtype=np.int32)
    return pa.table({"index": index, "id": (index.astype(np.int64) + ID_BASE)})


def build_fixture(users: int, items: int, dim: int, rated: int, cache: Path,
                  seed: int = 0) -> tuple[Path, Path]:
    """(model folder, dataset folder) for these sizes, built once under ``cache``."""
    root = cache / f"inference-{users}x{items}x{dim}-r{rated}"
    model_dir, data_dir = root / "model", root / "data"
    if (model_dir / "model.json").is_file() and (data_dir / MANIFEST).is_file():
        return model_dir, data_dir
    shutil.rmtree(root, ignore_errors=True)
    tmp = cache / f".{root.name}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    m, d = tmp / "model", tmp / "data"
    for folder in (m / "vocab", d / "vocab"):
        folder.mkdir(parents=True)
    for kind, n in (("users", users), ("items", items)):
        table = _vocab_table(n)
        pq.write_table(table, m / "vocab" / f"{kind}.parquet")
        pq.write_table(table, d / "vocab" / f"{kind}.parquet")

    # interactions: `rated` distinct-enough random items per user, split at random
    rng = np.random.default_rng(seed)
    rows = users * rated
    user = np.repeat(np.arange(1, users + 1, dtype=np.int32), rated)
    item = rng.integers(1, items + 1, size=rows, dtype=np.int32)
    rating = rng.integers(1, 11, size=rows).astype(np.float32) / 2
    label = (rating >= 4.0).astype(np.uint8)
    ts = rng.integers(1_000_000_000, 1_700_000_000, size=rows, dtype=np.int64)
    u = rng.random(rows)
    code = np.where(u < SPLIT_FRACTIONS[0], 0, np.where(u < 1 - SPLIT_FRACTIONS[2], 1, 2))
    splits, positives = {}, {}
    for sid, name in enumerate(SPLITS):
        idx = np.flatnonzero(code == sid)
        write_mds_columns(str(d / name / "part-00000"),
                          {"user": user[idx], "item": item[idx], "label": label[idx],
                           "rating": rating[idx], "timestamp": ts[idx]})
        merge_split_index(resolve(d / name))
        splits[name], positives[name] = len(idx), int(label[idx].sum())
    # through the contract's own reader of JSON: checked as a prepared dataset's would be
    manifest = Manifest.from_dict({
        "schema_version": SCHEMA_VERSION, "created_unix": int(time.time()),
        "source": {"dataset": "bench-inference-synthetic", "seed": seed},
        "columns": {"user": "user", "item": "item", "rating": "rating",
                    "timestamp": "timestamp"},
        "mds_columns": dict(INTERACTION_COLUMNS),
        "counts": {"read": rows, "accepted": rows, "rejected": 0, "rejected_by_reason": {},
                   "duplicates": {"policy": "keep", "rows_merged": 0, "pairs": 0},
                   "splits": splits, "positives": positives},
        "label": {"rule": "threshold", "threshold": 4.0,
                  "mean_rating": float(rating.mean())},
        "split": {"rule": "random", "seed": seed,
                  "fractions": dict(zip(SPLITS, SPLIT_FRACTIONS))},
        "vocab": {"users": users, "items": items, "unknown_index": 0,
                  "user_id_type": "int64", "item_id_type": "int64", "item_metadata": []},
        "config": {}})
    manifest.write(d)
    read_manifest(d)

    torch.manual_seed(seed)
    spec = ModelSpec(num_users=users + 1, num_items=items + 1, num_genres=0,
                     embedding_dim=dim, tower_layers=(dim,))
    torch.save(ExportedTwoTower(spec).state_dict(), m / WEIGHTS)
    train = code == 0
    np.save(m / "item_popularity.npy",
            np.bincount(item[train & (label > 0)], minlength=items + 1).astype(np.int64))
    # model.json last, as training writes it: it seals the files written before it
    write_model_json(m, spec, data_dir=str(root / "data"), manifest=manifest)
    os.replace(tmp, root)
    return model_dir, data_dir


def embeddings(model_dir: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """(query embeddings of users 1..U, item embeddings of indices 0..N) from the weights."""
    model = load_exported(model_dir)
    step = 65536
    with torch.no_grad():
        q = torch.cat([model.user_embeddings(torch.arange(s, min(model.spec.num_users, s + step)))
                       for s in range(1, model.spec.num_users, step)])
        it = torch.cat([model.item_embeddings(torch.arange(s, min(model.spec.num_items, s + step)))
                        for s in range(0, model.spec.num_items, step)])
    return q.contiguous(), it.contiguous()


def chunk_rows(num_items: int) -> int:
    """Users scored at once: TopK's rule ((users, items) floats kept to ~64 MB)."""
    return max(1, min(4096, (1 << 24) // max(num_items, 1)))


# ---------------------------------------------------------------- the measured paths

def ceiling(q: torch.Tensor, items: torch.Tensor, k: int
            ) -> tuple[float, torch.Tensor, dict[str, float]]:
    """Top-k of every user in this process, on the device ``q`` and ``items`` are on:
    (users/s, indices (U, k) on the CPU, seconds per stage)."""
    chunk = chunk_rows(len(items))
    n = len(q)
    device = q.device
    # CUDA runs asynchronously: each stage's clock stops once the device has finished it
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    top_v = torch.empty(n, k, device=device)
    top_i = torch.empty(n, k, dtype=torch.int64, device=device)
    mm = tk = 0.0
    with torch.no_grad():
        product = Product(items)  # the serving core's kernels: padded product, blocked top-K
        if device.type == "cuda":  # untimed: CUDA's context, cuBLAS handles, topk's kernels
            top_k(product(q[:chunk]), k)
            sync()
        t0 = time.perf_counter()
        for s in range(0, n, chunk):
            a = time.perf_counter()
            scores = product(q[s:s + chunk])
            scores[:, 0] = float("-inf")
            sync()
            b = time.perf_counter()
            top_v[s:s + chunk], top_i[s:s + chunk] = top_k(scores, k)
            sync()
            mm += b - a
            tk += time.perf_counter() - b
        seconds = time.perf_counter() - t0
    return n / seconds, top_i.cpu(), {"matmul": mm, "topk": tk, "total": seconds}


def pipeline(model_dir: Path, data_dir: Path, out: Path, *, k: int, actors: int,
             batch_size: int, exclude: str, users: str = "all", device: str = "cpu"
             ) -> tuple[float, Any]:
    """``batch_inference`` end to end: (wall seconds, its summary); output left in ``out``
    (published: its files are in ``local_dir(out)``, the version ``CURRENT`` names).
    ``device``: the config's ``inference_device``, ``cpu`` (an actor per CPU) or ``gpu`` (an
    actor per GPU)."""
    cfg = load_config(overrides={"top_k": k, "inference_actors": actors,
                                 "inference_batch_size": batch_size, "exclude_rated": exclude,
                                 "inference_device": device})
    t0 = time.perf_counter()
    summary = batch_inference(cfg, str(model_dir), str(data_dir), str(out), users=users,
                              verbose=False)
    seconds = time.perf_counter() - t0
    want = "cuda" if device == "gpu" else "cpu"
    if summary.device != want:  # a figure of the wrong device must not pass for this one
        raise RuntimeError(f"the pipeline's actors ran on {summary.device}, not {want}")
    return seconds, summary


def agreement(out: Path, top_i: torch.Tensor, users: int, k: int) -> float:
    """Share of the ceiling's top-k items that the pipeline's lists hold, on a user sample."""
    rng = np.random.default_rng(1)
    sample = np.sort(rng.choice(users, size=min(SAMPLE_USERS, users), replace=False))
    ids = sample + 1 + ID_BASE  # user index sample + 1
    got = pq.read_table(out, columns=["userId", "movieId"],
                        filters=[("userId", "in", ids.tolist())]).to_pandas()
    lists = got.groupby("userId")["movieId"].apply(set).to_dict()
    hits = 0
    for row, uid in zip(sample, ids):
        want = set((top_i[row].numpy() + ID_BASE).tolist())
        hits += len(want & lists.get(int(uid), set()))
    return hits / float(len(sample) * k)


IMPORTS = """
import time
t0 = time.perf_counter()
import numpy, pandas, pyarrow, ray, torch
t1 = time.perf_counter()
import app.serve.batch
t2 = time.perf_counter()
print(t1 - t0, t2 - t1)
"""


def import_seconds() -> dict[str, float]:
    """What a fresh actor process spends importing before its constructor runs: the
    libraries, then app.serve.batch (which reaches neither streaming nor TorchRec)."""
    done = subprocess.run([sys.executable, "-c", IMPORTS], cwd=ROOT, capture_output=True,
                          text=True, check=True)
    libs, app = (float(x) for x in done.stdout.split()[-2:])
    return {"libraries_s": libs, "app_s": app}


def driver_seconds(model_dir: Path, data_dir: Path) -> dict[str, float]:
    """The driver's work in batch_inference before the pool starts, stage by stage:
    dataset check, model load and every item through the candidate tower; the rated items
    (only with exclusion on)."""
    t0 = time.perf_counter()
    read_manifest(data_dir)
    check_dataset_matches(model_dir, str(data_dir))
    model = load_exported(model_dir)
    with torch.no_grad():
        model.item_embeddings(torch.arange(model.spec.num_items)).numpy()
    item_popularity(model_dir)
    t1 = time.perf_counter()
    rated_items(str(data_dir), SPLITS, model.spec.num_users)
    return {"setup_s": t1 - t0, "rated_s": time.perf_counter() - t1}


def actor_stages(model_dir: Path, k: int, batch_size: int, batches: int,
                 scratch: Path, device: str = "cpu") -> dict[str, float]:
    """Where one actor's time goes, each stage timed on its own in this process with one
    torch thread, the scoring on ``device`` (``cpu`` or ``cuda``): ms per 1,000 users
    (``setup_s``: the TopK constructor, once per actor)."""
    vocab_u = pq.read_table(model_dir / "vocab" / "users.parquet")["id"]
    model = load_exported(model_dir)
    with torch.no_grad():
        items = model.item_embeddings(torch.arange(model.spec.num_items)).numpy()
    shared = {"items": items, "rated": None, "given": None, "faiss": None}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # an actor of the CPU pool gets one (Ray sets OMP_NUM_THREADS=1)
    try:
        t = time.perf_counter()
        topk = TopK(str(model_dir), [shared], k, device, resolve(scratch))
        setup = time.perf_counter() - t
        ids = vocab_u.to_pandas()
        n = min(batches * batch_size, len(ids))
        frames = [pd.DataFrame({"userId": ids.iloc[s:min(n, s + batch_size)]})
                  for s in range(0, n, batch_size)]
        exact = recommend = arrow = write = 0.0
        with torch.no_grad():
            for i, df in enumerate(frames):
                users = df["userId"].to_numpy() - ID_BASE
                a = time.perf_counter()
                core, chunk = topk.core, topk.core.chunk
                done = [core._exact(users[s:s + chunk], None, np.ones(len(users[s:s + chunk]),
                                                                       bool), topk.k)
                        for s in range(0, len(users), chunk)]
                b = time.perf_counter()
                # the rest of recommend alone: its scoring calls answered from `done`
                core._exact = lambda *args, it=iter(done): next(it)
                try:
                    out = core.recommend(df["userId"], topk.k)
                finally:
                    del core._exact
                c = time.perf_counter()
                table = pa.Table.from_pandas(out, preserve_index=False)
                d = time.perf_counter()
                put_parquet(table, resolve(scratch / f"stages-{i}.parquet"),  # as an actor
                            TopK.DICTIONARY)
                e = time.perf_counter()
                exact += b - a
                recommend += c - b
                arrow += d - c
                write += e - d
    finally:
        torch.set_num_threads(threads)
    per = 1e6 / n  # seconds over n users -> ms per 1,000 users
    return {"setup_s": setup, "topk_ms": exact * per,
            "rest_of_recommend_ms": recommend * per,
            "arrow_ms": arrow * per, "parquet_ms": write * per, "users": n}


# ---------------------------------------------------------------- driver

def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--users", type=int, default=100_000)
    p.add_argument("--items", type=int, default=50_000)
    p.add_argument("--dim", type=int, default=64, help="embedding and tower output dimension")
    p.add_argument("--k", type=int, default=100, help="items per user")
    p.add_argument("--actors", type=_ints, default=[1, 2],
                   help="pool sizes (inference_actors) to run the pipeline with, comma-separated")
    p.add_argument("--batch-sizes", type=_ints, default=[1024],
                   help="inference_batch_size values, comma-separated (each with every pool "
                        "size)")
    p.add_argument("--repeats", type=int, default=3,
                   help="interleaved rounds of ceiling and pipeline runs; medians are reported")
    p.add_argument("--rated", type=int, default=20,
                   help="synthetic interactions per user (what exclusion leaves out)")
    p.add_argument("--no-exclude-run", action="store_true",
                   help="skip the reference run with the default exclusion")
    p.add_argument("--stage-batches", type=int, default=4,
                   help="batches of one actor's work timed stage by stage in this process")
    p.add_argument("--gpu", action="store_true",
                   help="actors score on a GPU each, the ceiling on cuda (default: CPUs)")
    p.add_argument("--cache", default=str(ROOT / ".bench"))
    p.add_argument("--smoke", action="store_true",
                   help="tiny sizes in a temporary folder: checks the benchmark runs")
    parse_and_run(p, SMOKE, run)


def run(args: argparse.Namespace) -> None:
    cache = Path(args.cache)
    device = "gpu" if args.gpu else "cpu"
    if args.gpu:
        gpus = torch.cuda.device_count()
        if gpus == 0:
            raise SystemExit("--gpu: torch sees no CUDA device (is this the CUDA build of "
                             "torch, and does nvidia-smi work?)")
        # one GPU per actor: a larger pool would wait for GPUs that never come
        if [a for a in args.actors if a > gpus]:
            print(f"--gpu: {gpus} GPU(s), so pool sizes above {gpus} are left out of "
                  f"--actors {','.join(map(str, args.actors))}")
            args.actors = [a for a in args.actors if a <= gpus] or [gpus]
    t = time.perf_counter()
    model_dir, data_dir = build_fixture(args.users, args.items, args.dim, args.rated, cache)
    print(f"model: {model_dir}\ndata:  {data_dir} ({args.users:,} users, {args.items:,} items, "
          f"dim {args.dim}, {args.rated} interactions per user; ready in "
          f"{time.perf_counter() - t:.1f}s)")
    q, items = embeddings(model_dir)
    if args.gpu:  # the ceiling's operands live on the GPU, as an in-memory ceiling's would
        q, items = q.cuda(), items.cuda()

    # Ray workers start from the node's environment: let them import app from any cwd
    os.environ["PYTHONPATH"] = os.pathsep.join(
        [str(ROOT)] + [x for x in os.environ.get("PYTHONPATH", "").split(os.pathsep) if x])
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, _node_ip_address="127.0.0.1",
             log_to_driver=False, logging_level="ERROR")
    ray.data.DataContext.get_current().enable_progress_bars = False
    logging.getLogger("ray.data").setLevel(logging.ERROR)  # no per-dataset execution lines
    default_pool = _device_and_pool(load_config(), model_dir)[1]
    scratch = Path(tempfile.mkdtemp(prefix="inference-", dir=cache))
    configs = [(a, b) for b in args.batch_sizes for a in args.actors]
    ceilings: list[float] = []
    stages: list[dict[str, float]] = []
    runs: dict[tuple[int, int], list[float]] = {c: [] for c in configs}
    agree = None
    exclude_run = None
    seconds_of: dict[tuple[int, int], list[float]] = {c: [] for c in configs}
    # the summary's pool timing (the actors' clocks): (startup, batches) seconds per run
    pool_of: dict[tuple[int, int], list[tuple[float, float]]] = {c: [] for c in configs}
    t_all = time.perf_counter()
    try:
        # warm-up, untimed: the driver's first Ray Data execution (a users file read by its
        # tasks before the pool starts) and first actor process
        few = scratch / "few-users.parquet"
        pq.write_table(pa.table({"userId": np.arange(1, 65, dtype=np.int64) + ID_BASE}), few)
        seconds, _ = pipeline(model_dir, data_dir, scratch / "warm-up", k=args.k, actors=1,
                              batch_size=args.batch_sizes[0], exclude="none", users=str(few),
                              device=device)
        print(f"warm-up: pipeline on 64 users, 1 actor ({device}): {seconds:.1f}s", flush=True)
        for r in range(max(1, args.repeats)):  # interleaved, so drift hits every path alike
            c, top_i, st = ceiling(q, items, args.k)
            ceilings.append(c)
            stages.append(st)
            print(f"run {r + 1}: ceiling {st['total']:.1f}s ({c:,.0f} users/s)", flush=True)
            for a, b in configs:
                out = scratch / "out"
                seconds, summary = pipeline(model_dir, data_dir, out, k=args.k, actors=a,
                                            batch_size=b, exclude="none", device=device)
                if summary.users != args.users or summary.rows != args.users * args.k:
                    raise RuntimeError(f"pipeline wrote {summary.rows:,} rows for "
                                       f"{summary.users:,} users; expected "
                                       f"{args.users * args.k:,} for {args.users:,}")
                if agree is None:
                    agree = agreement(local_dir(out), top_i, args.users, args.k)
                shutil.rmtree(out, ignore_errors=True)
                runs[(a, b)].append(args.users / seconds)
                seconds_of[(a, b)].append(seconds)
                pool_of[(a, b)].append((summary.startup_seconds, summary.batch_seconds))
                print(f"run {r + 1}: pipeline, {a} actor(s), batch {b}: {seconds:.1f}s "
                      f"({args.users / seconds:,.0f} users/s)", flush=True)
            del top_i
        if not args.no_exclude_run:
            a, b = max(runs, key=lambda x: statistics.median(runs[x]))
            out = scratch / "out"
            seconds, summary = pipeline(model_dir, data_dir, out, k=args.k, actors=a,
                                        batch_size=b, exclude="all", device=device)
            shutil.rmtree(out, ignore_errors=True)
            exclude_run = {"actors": a, "batch_size": b, "seconds": seconds,
                           "users_per_s": args.users / seconds,
                           "short_lists": summary.short_lists}
            print(f"exclude_rated=all: pipeline, {a} actor(s), batch {b}: {seconds:.1f}s "
                  f"({args.users / seconds:,.0f} users/s)", flush=True)
        parts = actor_stages(model_dir, args.k, args.batch_sizes[0],
                             max(1, args.stage_batches), scratch,
                             "cuda" if args.gpu else "cpu")
        driver = driver_seconds(model_dir, data_dir)
        imports = import_seconds()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        ray.shutdown()
    total = time.perf_counter() - t_all

    c = statistics.median(ceilings)
    med = {cfg: statistics.median(v) for cfg, v in runs.items()}
    best = max(med, key=med.get)
    pl = med[best]
    st = {key: statistics.median(s[key] for s in stages) for key in stages[0]}
    where = (f"{torch.cuda.get_device_name(0)}: ceiling on cuda, actors with a GPU each"
             if args.gpu else f"ceiling with {torch.get_num_threads()} torch thread(s), "
                              f"actors with 1 each")
    print(f"\nbatch top-{args.k}: {args.users:,} users x {args.items:,} items, dim {args.dim}; "
          f"{os.cpu_count()} CPUs; {where}; {args.repeats} round(s), medians; {total:.0f}s in "
          f"all")
    print(f"{'':<34}{'actors':>7}{'batch':>7}{'seconds':>9}{'users/s':>10}{'vs ceiling':>12}")
    print(f"{'ceiling (one process, in memory)':<34}{'-':>7}{'-':>7}{args.users / c:>9.1f}"
          f"{c:>10,.0f}{1:>12.0%}")
    for (a, b), v in sorted(med.items()):
        print(f"{'pipeline (batch_inference)':<34}{a:>7}{b:>7}{args.users / v:>9.1f}"
              f"{v:>10,.0f}{v / c:>12.0%}")
    if exclude_run:
        e = exclude_run
        print(f"{'pipeline, exclude_rated=all':<34}{e['actors']:>7}{e['batch_size']:>7}"
              f"{e['seconds']:>9.1f}{e['users_per_s']:>10,.0f}{e['users_per_s'] / c:>12.0%}")
    print(f"ceiling seconds: matrix product {st['matmul']:.1f}, topk {st['topk']:.1f} "
          f"(chunks of {chunk_rows(args.items + 1)} users)")
    print(f"pipeline lists vs the ceiling's top-{args.k} on {SAMPLE_USERS} users: "
          f"{agree:.2%} of items shared")
    print(f"config default pool here (inference_actors=0, inference_device=auto): "
          f"{default_pool} actor(s)")
    per_k = parts["topk_ms"] + parts["rest_of_recommend_ms"]      # ms per 1,000 users
    write_k = parts["arrow_ms"] + parts["parquet_ms"]
    start_s = sum(imports.values()) + parts["setup_s"]
    print(f"one actor, stage by stage ({'scoring on cuda, ' if args.gpu else ''}1 torch "
          f"thread, {parts['users']:,} users in batches of "
          f"{args.batch_sizes[0]}), ms per 1,000 users: matrix product + topk "
          f"{parts['topk_ms']:.0f}, rest of Recommender.recommend (id lookup, output DataFrame) "
          f"{parts['rest_of_recommend_ms']:.0f}, to Arrow {parts['arrow_ms']:.0f}, Parquet "
          f"write {parts['parquet_ms']:.0f} -> {1e6 / (per_k + write_k):,.0f} users/s per "
          f"actor at most")
    print(f"actor start: imports in a fresh process {sum(imports.values()):.1f}s (numpy, "
          f"pandas, pyarrow, ray, torch {imports['libraries_s']:.1f}s; "
          f"app.serve.batch {imports['app_s']:.1f}s), TopK constructor "
          f"{parts['setup_s']:.2f}s")
    print(f"driver: set-up before the pool (dataset check, model, item embeddings) "
          f"{driver['setup_s']:.1f}s, rated items for exclusion {driver['rated_s']:.1f}s")
    print("where the pipeline's seconds go (medians; the pool's start and its batches as the "
          "actors' clocks saw them, the batches' share estimated from the stages above):")
    batches_of: dict[tuple[int, int], float] = {}
    for (a, b), secs in sorted(seconds_of.items()):
        wall = statistics.median(secs)
        startup = statistics.median(x[0] for x in pool_of[(a, b)])
        batches = batches_of[(a, b)] = statistics.median(x[1] for x in pool_of[(a, b)])
        score = args.users * per_k / 1e6 / a
        out_s = args.users * write_k / 1e6 / a
        print(f"  {a} actor(s), batch {b}: {wall:.1f}s = the driver before and after the pool "
              f"{wall - startup - batches:.1f} + the actors' start {startup:.1f} + the batches "
              f"{batches:.1f} (scoring {score:.1f}, Arrow and Parquet output {out_s:.1f}, the "
              f"rest {batches - score - out_s:.1f}: Ray Data between batches, the actors "
              f"sharing the cores)")
    on_batches = args.users / batches_of[best]
    print(f"the batches alone: {on_batches:,.0f} users/s with {best[0]} actor(s), "
          f"{on_batches / c:.1%} of the ceiling (a fixed start of "
          f"{statistics.median(x[0] for x in pool_of[best]):.1f}s on top)")
    print(f"pipeline / ceiling: {pl / c:.1%} with {best[0]} actor(s), batch {best[1]} "
          f"(target: >= {TARGET:.0%})")
    result: dict[str, Any] = {
        "users": args.users, "items": args.items, "dim": args.dim, "k": args.k,
        "device": device,
        "ceiling_users_per_s": round(c), "pipeline_users_per_s": round(pl),
        "pipeline_vs_ceiling": round(pl / c, 3),
        "pipeline_actors": best[0], "pipeline_batch_size": best[1],
        "lists_agree_with_ceiling": round(agree, 4)}
    for (a, b), v in sorted(med.items()):
        tag = f"{a}_actors" if len(args.batch_sizes) == 1 else f"{a}_actors_batch_{b}"
        result[f"pipeline_{tag}_users_per_s"] = round(v)
        result[f"pipeline_{tag}_vs_ceiling"] = round(v / c, 3)
    if exclude_run:
        result["pipeline_exclude_all_users_per_s"] = round(exclude_run["users_per_s"])
    result["stage_ms_per_1000_users"] = {
        "topk": round(parts["topk_ms"], 1),
        "recommend_rest": round(parts["rest_of_recommend_ms"], 1),
        "arrow": round(parts["arrow_ms"], 1), "parquet": round(parts["parquet_ms"], 1)}
    result["actor_start_s"] = round(start_s, 2)
    result["pipeline_startup_s"] = round(statistics.median(x[0] for x in pool_of[best]), 2)
    result["pipeline_batches_vs_ceiling"] = round(on_batches / c, 3)
    result["seconds_total"] = round(total)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
