"""Evaluation during training: full-catalog ranking metrics computed jointly by all ranks,
the validation loss, and the popularity and driver-side baselines on the same users.

Per-epoch validation ranks a fixed sample of the validation users (``--val-sample-users``):
ranking costs users x items, which grows with the square of the data when users and items
both grow. Validation's figures are the sample's throughout (``users`` says how many); the
held-out test split is ranked once, at the end, on every user by the exported epoch
(:func:`exported_metrics`).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as dist

from app.data.dataset import read_split_arrays
from app.data.reader import InteractionStream
from app.train.batches import BatchMaker
from app.train.inputs import BATCH_COLUMNS, equal_share
from app.train.metrics import (
    Product,
    UserItems,
    binary_auroc,
    finish,
    fit_platt,
    popularity_order,
    popularity_top,
    ranking_sums,
    sample_users,
    score_rows,
    top_sums,
)
from app.train.model import ModelSpec, TwoTower
from app.train.model_folder import load_exported


QUERY_CHUNK = 8192  # users per query-tower forward while ranking (their scores in chunks)


class Evaluator:
    """Full-catalog retrieval metrics, computed jointly by all ranks.

    Item embeddings: each rank runs the candidate tower on a slice of the catalog and the
    slices are all-gathered. Users: each rank ranks the catalog for its share of the users
    (of the validation sample too); metric sums are all-reduced. Every rank runs the same
    number of sharded forward calls.
    """

    def __init__(self, data_dir: str, spec: ModelSpec, maker: BatchMaker,
                 train_rows: dict[str, np.ndarray], ks: list[int], device: torch.device,
                 val_sample_users: int = 0) -> None:
        self.spec, self.maker, self.ks, self.device = spec, maker, [int(k) for k in ks], device
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.exclude = UserItems.build(train_rows["user"].astype(np.int64),
                                       train_rows["item"].astype(np.int64), spec.num_users)
        self.positives: dict[str, UserItems] = {}
        for split in ("val", "test"):
            rows = read_split_arrays(Path(data_dir, split))
            pos = rows["label"] > 0
            self.positives[split] = UserItems.build(rows["user"][pos].astype(np.int64),
                                                    rows["item"][pos].astype(np.int64),
                                                    spec.num_users)
        self.chunk = score_rows(spec.num_items)  # users scored at once
        # per-epoch validation's users: drawn once, so every epoch is scored on the same ones
        self.sample = sample_users(self.positives["val"], val_sample_users)
        self.sampled = len(self.sample) < len(self.positives["val"].users())
        # seconds spent by this rank since the last reset: the candidate tower over the
        # catalog ("items"), the query tower ("queries"), the scores' matrix product
        # ("scores"), exclusions, top-K and metrics ("ranking")
        self.timing = {"items": 0.0, "queries": 0.0, "scores": 0.0, "ranking": 0.0}

    def _my_users(self, split: str, sample: bool = False) -> np.ndarray:
        """This rank's share of a split's users with positives (of the validation sample)."""
        assert not sample or split == "val", "only validation is sampled"
        users = self.sample if sample else self.positives[split].users()
        return users[self.rank::self.world]

    def _n_chunks(self, n: int, chunk: int) -> int:
        t = torch.tensor([(n + chunk - 1) // chunk], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return int(t.item())

    def _reduce(self, sums: dict[str, float]) -> dict[str, float]:
        keys = sorted(sums)
        t = torch.tensor([sums[k] for k in keys], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return finish(dict(zip(keys, t.cpu().tolist())))

    @torch.no_grad()
    def item_embeddings(self, model: TwoTower) -> torch.Tensor:
        """(num_items, D) candidate-tower outputs for every item index, on every rank."""
        t0 = time.perf_counter()
        n = self.spec.num_items
        per = (n + self.world - 1) // self.world
        mine = np.arange(self.rank * per, min(n, (self.rank + 1) * per))
        out = []
        chunk = 8192
        for c in range(self._n_chunks(len(mine), chunk)):
            part = mine[c * chunk:(c + 1) * chunk]
            items = part if len(part) else np.zeros(1, np.int64)  # keep collectives in step
            emb = model.candidate(self.maker.candidate(items).to(self.device))
            out.append(emb[: len(part)])
        local = torch.cat(out) if out else torch.empty(0, self.spec.output_dim,
                                                       device=self.device)
        padded = torch.zeros(per, self.spec.output_dim, device=self.device)
        padded[: len(local)] = local
        parts = [torch.empty_like(padded) for _ in range(self.world)]
        dist.all_gather(parts, padded)
        self.timing["items"] += time.perf_counter() - t0
        return torch.cat(parts)[:n]

    @torch.no_grad()
    def ranking(self, model: TwoTower, split: str, items: torch.Tensor, *,
                sample: bool = False) -> dict[str, float]:
        """Recall@K / NDCG@K of the model on a split's positives (this rank's users, reduced),
        over every user with positives or, with ``sample``, the validation sample."""
        users = self._my_users(split, sample)
        sums: dict[str, float] = {}
        product = Product(items, host=True)
        for c in range(self._n_chunks(len(users), QUERY_CHUNK)):
            batch = users[c * QUERY_CHUNK:(c + 1) * QUERY_CHUNK]
            # the query tower reads each user's latest training positives: one sharded
            # forward (collectives on every rank) per QUERY_CHUNK users, not per score chunk
            t0 = time.perf_counter()
            q = model.query(self.maker.query(batch if len(batch) else np.zeros(1, np.int64))
                            .to(self.device))
            self.timing["queries"] += time.perf_counter() - t0
            for s in range(0, len(batch), self.chunk):
                part = batch[s:s + self.chunk]
                t1 = time.perf_counter()
                scores = product(q[s:s + self.chunk])                          # (U, num_items)
                t2 = time.perf_counter()
                for k, v in ranking_sums(scores, part, exclude=self.exclude,
                                         positives=self.positives[split], ks=self.ks,
                                         owned=True).items():
                    sums[k] = sums.get(k, 0.0) + v
                self.timing["scores"] += t2 - t1
                self.timing["ranking"] += time.perf_counter() - t2
        return self._reduce(sums or {"users": 0.0, **{f"{m}@{k}": 0.0 for k in self.ks
                                                      for m in ("recall", "ndcg")}})

    def popularity(self, split: str, positive_counts: np.ndarray, *,
                   sample: bool = False) -> dict[str, float]:
        """The same metrics for the popularity baseline (no model involved)."""
        users = self._my_users(split, sample)
        sums: dict[str, float] = {"users": 0.0, **{f"{m}@{k}": 0.0 for k in self.ks
                                                    for m in ("recall", "ndcg")}}
        order = popularity_order(positive_counts)
        kmax = min(max(self.ks), self.spec.num_items)
        for start in range(0, len(users), self.chunk):
            part = users[start:start + self.chunk]
            top = popularity_top(order, part, self.exclude, kmax)
            for k, v in top_sums(top, part, positives=self.positives[split], ks=self.ks,
                                 n_items=self.spec.num_items).items():
                sums[k] += v
        return self._reduce(sums)


def validation_loss(dmp: Any, stream: InteractionStream, maker: BatchMaker,
                     batch_size: int, device: torch.device, objective: str,
                     users: Optional[np.ndarray] = None) -> dict[str, float]:
    """Mean validation loss (weighted by rows, or positives for softmax); AUROC for bce.

    Args:
        users: only the rows of these users (the validation sample); None: every row.
    """
    ids = stream.epoch_sample_ids(epoch=0)
    if users is not None:  # (the user column is decoded once per shard, then kept)
        ids = ids[np.isin(stream.gather(ids, ("user",))["user"], users)]
    ids = equal_share(ids, device)
    total, weight = 0.0, 0.0
    scores, labels = [], []
    with torch.no_grad():
        for start in range(0, len(ids), batch_size):
            batch = maker(stream.gather(ids[start:start + batch_size], BATCH_COLUMNS)
                          ).to(device)
            loss, (_, s, y) = dmp(batch)
            w = float(len(y)) if objective == "bce" else float((y > 0).sum())
            total += float(loss) * w
            weight += w
            if objective == "bce":
                scores.append(s.cpu().numpy())
                labels.append(y.cpu().numpy())
    t = torch.tensor([total, weight], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    out = {"val_loss": float(t[0] / max(float(t[1]), 1.0))}
    if objective == "bce":
        gathered: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, (np.concatenate(scores) if scores else np.empty(0),
                                          np.concatenate(labels) if labels else np.empty(0)))
        out["val_auroc"] = binary_auroc(np.concatenate([g[0] for g in gathered]),
                                        np.concatenate([g[1] for g in gathered]))
    return out


def prefixed(prefix: str, metrics: dict[str, float]) -> dict[str, float]:
    """``<prefix>_<metric>`` entries, the user count among them (``<prefix>_users``)."""
    return {f"{prefix}_{k}": v for k, v in metrics.items()}


def baseline_metrics(baselines: dict[str, Any]) -> dict[str, float]:
    """Flat ``<baseline>_<split>_<metric>`` entries of baselines computed by the driver, on
    the users the model is scored on: validation's sample and every test user."""
    out: dict[str, float] = {}
    for name, result in baselines.items():
        out.update(prefixed(f"{name}_val", result.get("val", {})))
        out.update(prefixed(f"{name}_test", result.get("test", {})))
    return out


def popularity_metrics(evaluator: Evaluator, positive_counts: np.ndarray
                         ) -> dict[str, float]:
    """Popularity on the users the model is scored on every epoch: validation's sample and
    every test user."""
    return {**prefixed("popularity_val", evaluator.popularity("val", positive_counts,
                                                              sample=True)),
            **prefixed("popularity_test", evaluator.popularity("test", positive_counts))}


def exported_metrics(evaluator: Evaluator, model: TwoTower) -> dict[str, float]:
    """The exported epoch on every test user, once at the end (``test_*``)."""
    return prefixed("test", evaluator.ranking(model, "test", evaluator.item_embeddings(model)))


def epoch_line(m: dict[str, Any], best_epoch: int) -> str:
    """One line per epoch: losses, validation Recall@20 of the model and the baselines (on
    the same users)."""
    key = "recall@20" if "val_recall@20" in m else next(
        k[4:] for k in m if k.startswith("val_recall@"))
    base = ", ".join(f"{name} {m[f'{prefix}_val_{key}']:.4f}"
                     for name, prefix in (("popularity", "popularity"), ("EASE", "ease"),
                                          ("iALS", "ials"))
                     if f"{prefix}_val_{key}" in m)
    users = f" on {m['val_users']:,} users" if "val_users" in m else ""
    return (f"epoch {m['epoch']}: train_loss {m['train_loss']:.4f} val_loss "
            f"{m['val_loss']:.4f} val {key} {m[f'val_{key}']:.4f}{users} ({base})"
            + (f"; best epoch {best_epoch}" if best_epoch else ""))


# ---------------------------------------------------------------- the exported model

def final_metrics(history: list[dict[str, Any]], best_epoch: int,
                  baselines: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """The ``metrics.json`` shape: the model (its exported epoch), popularity and the driver's
    baselines (EASE, iALS), each on the same users: validation's per-epoch sample and every
    test user (``users``: how many); ``epochs`` trained and the ``best_epoch`` exported."""
    best = next(h for h in history if h["epoch"] == best_epoch)

    def pick(prefix: str) -> dict[str, float]:
        return {k[len(prefix):]: v for k, v in best.items() if k.startswith(prefix)}

    out: dict[str, Any] = {"model": {"val": pick("val_"), "test": pick("test_")},
                           "popularity": {"val": pick("popularity_val_"),
                                          "test": pick("popularity_test_")}}
    for name, result in (baselines or {}).items():  # ease, ials (app.train.baselines)
        # with what it chose and how long it took; a skipped one says why
        out[name] = {"skipped": result["skipped"]} if "skipped" in result else dict(result)
    out.update({"epochs": history[-1]["epoch"], "best_epoch": best_epoch})
    return out


CALIBRATION_CHUNK = 16_384  # pairs scored at once by calibrate()


def calibrate(model_dir: Path, data_dir: str, objective: str,
              max_pairs: int = 500_000) -> dict[str, float]:
    """Pair probabilities: ``bce`` logits are probabilities already (a=1, b=0); a ``softmax``
    model's dot products are mapped by Platt scaling fitted on validation pairs."""
    if objective == "bce":
        return {"a": 1.0, "b": 0.0}
    import torch

    from app.data.dataset import read_split_arrays

    rows = read_split_arrays(Path(data_dir, "val"), ("user", "item", "label"))
    pick = np.random.default_rng(0).permutation(len(rows["user"]))[:max_pairs]
    model = load_exported(model_dir)
    users = torch.from_numpy(rows["user"][pick].astype(np.int64))
    items = torch.from_numpy(rows["item"][pick].astype(np.int64))
    # in chunks: a user's embedding gathers its history bag (up to --history-length items),
    # so 500,000 pairs at once would index ~25M history entries several times over
    with torch.no_grad():
        scores = np.concatenate([model.score(users[s:s + CALIBRATION_CHUNK],
                                             items[s:s + CALIBRATION_CHUNK]).numpy()
                                 for s in range(0, len(pick), CALIBRATION_CHUNK)]
                                or [np.empty(0, np.float32)])
    a, b = fit_platt(scores, rows["label"][pick])
    return {"a": a, "b": b, "fitted_on": "val", "pairs": int(len(pick))}
