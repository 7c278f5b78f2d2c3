"""Benchmark: real-time serving latency and throughput, beside the framework's floor.

    .venv/bin/python bench/serve.py [--model DIR] [--requests 3000] [--seconds 20] [--smoke]

Trains a movielens-small model with the defaults (once, cached under ``.bench/``; ``--model``
gives one) and starts, on one local Ray, two Serve applications side by side:

- the app (``app.serve.http``: FastAPI ingress, ``@serve.batch``, the serving core, one CPU
  replica: what ``python -m pipelines.serve`` deploys), asked ``POST /recommend`` for a random
  known user with k=20;
- the floor: an identity deployment with the same ingress, replica and request limits that
  returns the request body (what Ray Serve's proxy, routing and FastAPI cost alone).

A closed-loop load generator (asyncio + aiohttp on 127.0.0.1, in this process) keeps
``c`` requests in flight for c = 1, 16 and 64, each level bounded by ``--requests`` and
``--seconds``, after a warm-up; the app and the floor alternate, ``--rounds`` times, and the
figures are medians over rounds (machines here are noisy). Also times the serving core in this
process (one user, and a batch of 16 users in one call). Prints p50/p99 latency and QPS for
both, and ends with one JSON line.

``--smoke``: a model folder built without training (unless ``--model`` gives one): the
synthetic model and dataset of bench/inference.py (``build_fixture``: random weights, a real
sealed model folder over a prepared-format dataset; 2,000 users x 1,000 items, dim 32), so
what is timed is serving alone, as in a full run; 100 requests or 3 seconds per level, one
round, everything written in a temporary folder (removed after): the same code and the same
JSON keys, to check that the benchmark runs.
"""

import argparse
import asyncio
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

import numpy as np  # noqa: E402

from app.core.config import load_config  # noqa: E402
from bench.smoke import parse_and_run  # noqa: E402

LEVELS = (1, 16, 64)
K = 20
# --smoke's sizes (flags given explicitly still win), and its untrained model's
SMOKE = {"requests": 100, "seconds": 3.0, "rounds": 1}
SMOKE_MODEL = {"users": 2_000, "items": 1_000, "dim": 32, "rated": 5}


def smoke_model(cache: Path) -> Path:
    """--smoke's model folder: random weights over a synthetic dataset, no training."""
    from bench.inference import build_fixture

    return build_fixture(**SMOKE_MODEL, cache=cache)[0]


def trained_model(cache: Path, overrides: Optional[dict[str, Any]] = None) -> Path:
    """A movielens-small model with the default settings, trained once under ``cache``
    (``overrides``: other data or training settings)."""
    from app.core.publish import current
    from app.data.prepare import prepare_dataset
    from app.train.driver import train

    model = cache / "serve-model"
    if (current(model) / "model.json").is_file():
        return current(model)
    data = cache / "serve-data"
    if not (current(data) / "manifest.json").is_file():
        prepare_dataset(load_config(overrides={**(overrides or {}), "overwrite": True}).data,
                        str(data), verbose=False)
    work = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    try:
        cfg = load_config(overrides={**(overrides or {}), "workdir": str(work),
                                     "num_workers": 2, "registered_model_name": "bench-serve"})
        print(f"training a {cfg.data.dataset} model with the defaults"
              f"{f' and {overrides}' if overrides else ''} (once) ...", flush=True)
        train(cfg, str(current(data)), str(model), verbose=False)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return current(model)


def identity_app(cfg: Any) -> Any:
    """The floor: the app's ingress and replica settings around a handler that echoes."""
    from fastapi import FastAPI, Request
    from ray import serve

    api = FastAPI()

    @serve.deployment(ray_actor_options={"num_cpus": cfg.serve.replica_cpus},
                      max_ongoing_requests=max(4 * cfg.serve.max_batch_size, 16))
    @serve.ingress(api)
    class Identity:
        @api.post("/recommend")
        async def recommend(self, request: Request) -> Any:
            return await request.json()

    return Identity.bind()


async def _load(url: str, bodies: list[bytes], concurrency: int, requests: int,
                seconds: float) -> dict[str, float]:
    """Closed loop: ``concurrency`` workers, each sending its next request when the last
    answered; stops after ``requests`` answers or ``seconds``."""
    import aiohttp

    latencies: list[float] = []
    errors = 0
    sent = 0
    deadline = time.perf_counter() + seconds
    connector = aiohttp.TCPConnector(limit=concurrency)
    headers = {"Content-Type": "application/json"}
    async with aiohttp.ClientSession(connector=connector) as session:
        async def worker() -> None:
            nonlocal sent, errors
            while sent < requests and time.perf_counter() < deadline:
                body = bodies[sent % len(bodies)]
                sent += 1
                t = time.perf_counter()
                async with session.post(url, data=body, headers=headers) as r:
                    await r.read()
                    if r.status != 200:
                        errors += 1
                latencies.append(time.perf_counter() - t)

        t0 = time.perf_counter()
        await asyncio.gather(*[worker() for _ in range(concurrency)])
        wall = time.perf_counter() - t0
    ms = np.asarray(latencies) * 1000
    return {"p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99)),
            "qps": len(ms) / wall, "requests": len(ms), "errors": errors}


def load(url: str, bodies: list[bytes], concurrency: int, requests: int,
         seconds: float) -> dict[str, float]:
    asyncio.run(_load(url, bodies, concurrency, max(concurrency * 4, requests // 10), 3.0))
    return asyncio.run(_load(url, bodies, concurrency, requests, seconds))


def core_latency(model_dir: Path, users: list[Any]) -> dict[str, float]:
    """The serving core alone, in this process: one user per call, and 16 per call."""
    import torch

    from app.serve.core import Recommender

    core = Recommender(model_dir)
    torch.set_num_threads(1)  # a replica's share
    one, sixteen = [], []
    for i in range(300):
        t = time.perf_counter()
        core.recommend([users[i % len(users)]], K)
        one.append(time.perf_counter() - t)
    for i in range(100):
        batch = [users[(i * 16 + j) % len(users)] for j in range(16)]
        t = time.perf_counter()
        core.recommend(batch, K)
        sixteen.append(time.perf_counter() - t)
    return {"one_user_ms": statistics.median(one) * 1000,
            "sixteen_users_ms": statistics.median(sixteen) * 1000}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="a model folder (default: train one with the defaults)")
    p.add_argument("--requests", type=int, default=3000, help="answers per level and round")
    p.add_argument("--seconds", type=float, default=20.0, help="time limit per level and round")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--cache", default=str(ROOT / ".bench"))
    p.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                   help="a serving setting for the app, e.g. --set batch_wait_ms=0")
    p.add_argument("--smoke", action="store_true",
                   help="tiny sizes in a temporary folder: checks the benchmark runs")
    parse_and_run(p, SMOKE, run_bench)


def run_bench(args: argparse.Namespace) -> None:
    import ray
    from ray import serve

    from app.core.cluster import _free_port, init_ray
    from app.data.dataset import load_vocab
    from app.serve.http import run

    os.environ["PYTHONPATH"] = os.pathsep.join(
        [str(ROOT)] + [x for x in os.environ.get("PYTHONPATH", "").split(os.pathsep) if x])
    init_ray(load_config(overrides={"num_cpus": max(2, os.cpu_count() or 2)}).cluster)
    ray.data.DataContext.get_current().enable_progress_bars = False
    try:
        model_dir = (Path(args.model) if args.model else
                     smoke_model(Path(args.cache)) if args.smoke else
                     trained_model(Path(args.cache)))
        users = load_vocab(model_dir)["users"]["id"].to_pylist()
        rng = np.random.default_rng(0)
        bodies = [json.dumps({"user_id": str(u), "k": K}).encode()
                  for u in rng.choice(users, size=4096)]
        cfg = load_config(overrides={"port": _free_port(), "reload_interval": 0,
                                     **dict(kv.split("=", 1) for kv in args.set)})
        base = run(cfg, str(model_dir), block=False, say=lambda msg: print(msg, flush=True))
        serve.run(identity_app(cfg), name="identity", route_prefix="/identity",
                  logging_config={"enable_access_log": False, "log_level": "WARNING"})
        targets = {"app": f"{base}/recommend", "floor": f"{base}/identity/recommend"}
        runs: dict[tuple[str, int], list[dict[str, float]]] = {}
        for r in range(args.rounds):
            for c in LEVELS:
                order = list(targets) if r % 2 == 0 else list(targets)[::-1]
                for name in order:
                    res = load(targets[name], bodies, c, args.requests, args.seconds)
                    if res["errors"]:
                        raise SystemExit(f"{name} at concurrency {c}: {res['errors']} "
                                         f"request(s) failed")
                    runs.setdefault((name, c), []).append(res)
                    print(f"round {r + 1} c={c:<3} {name:<6} p50 {res['p50_ms']:7.2f} ms  "
                          f"p99 {res['p99_ms']:7.2f} ms  {res['qps']:8.1f} req/s "
                          f"({res['requests']} requests)", flush=True)
        serve.shutdown()
        core = core_latency(model_dir, users)
    finally:
        ray.shutdown()

    med = {key: {m: statistics.median(x[m] for x in v) for m in ("p50_ms", "p99_ms", "qps")}
           for key, v in runs.items()}
    print(f"\nPOST /recommend (k={K}, random known users) vs an identity deployment, "
          f"medians of {args.rounds} round(s):")
    print(f"{'concurrency':>11} | {'app p50':>8} {'p99':>8} {'QPS':>8} | {'floor p50':>9} "
          f"{'p99':>8} {'QPS':>8} | QPS vs floor")
    for c in LEVELS:
        a, f = med[("app", c)], med[("floor", c)]
        print(f"{c:>11} | {a['p50_ms']:8.2f} {a['p99_ms']:8.2f} {a['qps']:8.1f} | "
              f"{f['p50_ms']:9.2f} {f['p99_ms']:8.2f} {f['qps']:8.1f} | "
              f"{a['qps'] / f['qps']:.2f}x")
    print(f"serving core in-process (one torch thread): one user {core['one_user_ms']:.2f} ms, "
          f"16 users in one call {core['sixteen_users_ms']:.2f} ms")
    a16, a64, f64 = med[("app", 16)], med[("app", 64)], med[("floor", 64)]
    print(f"targets: p50 <= 10 ms at c=16: {a16['p50_ms']:.1f} ms; p99 <= 50 ms at c=16: "
          f"{a16['p99_ms']:.1f} ms; QPS at c=64 >= 0.5x the floor: "
          f"{a64['qps'] / f64['qps']:.2f}x")
    print(json.dumps({
        "concurrency": {str(c): {"p50_ms": round(med[("app", c)]["p50_ms"], 2),
                                 "p99_ms": round(med[("app", c)]["p99_ms"], 2),
                                 "qps": round(med[("app", c)]["qps"], 1),
                                 "floor_p50_ms": round(med[("floor", c)]["p50_ms"], 2),
                                 "floor_p99_ms": round(med[("floor", c)]["p99_ms"], 2),
                                 "floor_qps": round(med[("floor", c)]["qps"], 1)}
                        for c in LEVELS},
        "p50_ms_c16": round(a16["p50_ms"], 2), "p99_ms_c16": round(a16["p99_ms"], 2),
        "qps_c64": round(a64["qps"], 1), "floor_qps_c64": round(f64["qps"], 1),
        "qps_vs_floor_c64": round(a64["qps"] / f64["qps"], 3),
        "core_one_user_ms": round(core["one_user_ms"], 3),
        "core_sixteen_users_ms": round(core["sixteen_users_ms"], 3)}))


if __name__ == "__main__":
    main()
