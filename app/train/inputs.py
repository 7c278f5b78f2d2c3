"""What every training rank reads before building the model, and how an epoch's batches come.

:func:`training_inputs` gives the model's shape (:class:`~app.train.model.ModelSpec`), the
candidate tower's item features, the training rows, positives per item and the users'
histories; :func:`epoch_batches` gives this rank's equal share of an epoch's samples as
training batches, built ahead in a background thread while the model steps.
"""

from __future__ import annotations

import os
import queue
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
import torch.distributed as dist

from app.core.config import ModelConfig
from app.data.dataset import Manifest, read_split_arrays
from app.data.history import UserHistory
from app.data.reader import InteractionStream, ItemFeatures
from app.train.batches import BatchMaker
from app.train.model import ModelSpec

BATCH_COLUMNS = ("user", "item", "label", "timestamp")  # what a training batch reads


def item_features(model_cfg: Any, data_dir: str | os.PathLike) -> list[ItemFeatures]:
    """The candidate tower's item features (genres, year) that the config asks for and the
    dataset (or model folder) has, in the model's feature order."""
    found = [ItemFeatures.genres(data_dir) if model_cfg.use_genres else None,
             ItemFeatures.years(data_dir) if model_cfg.use_year else None]
    return [f for f in found if f is not None]


def model_spec(m: ModelConfig, manifest: Manifest, features: list[ItemFeatures]
               ) -> ModelSpec:
    """The model's shape from the model settings, the dataset's vocabularies and its item
    features."""
    rows = {f.name: len(f.vocab) for f in features}
    num_items = manifest.vocab.items + 1
    return ModelSpec(num_users=manifest.vocab.users + 1, num_items=num_items,
                     num_genres=rows.get("item_genres", 0), num_years=rows.get("item_year", 0),
                     embedding_dim=m.embedding_dim,
                     tower_layers=tuple(int(x) for x in m.tower_layers),
                     objective=m.objective, temperature=m.temperature,
                     history_length=m.history_length, use_user_id=m.use_user_id,
                     normalize=m.normalize,
                     negatives=m.resolved_negatives(num_items,
                                                    manifest.counts.splits["train"]),
                     in_batch_negatives=m.in_batch_negatives,
                     sampled_negatives=m.sampled_negatives)


@dataclass
class TrainingInputs:
    """What every rank reads before building the model."""

    spec: ModelSpec
    features: list[ItemFeatures]     # the candidate tower's item features
    rows: dict[str, np.ndarray]      # the training rows (exclusions in evaluation)
    positive_counts: np.ndarray      # (num_items,) positives per item: log-Q, popularity
    history: UserHistory             # training positives per user in time order

    def batch_maker(self, seed: int = 0, history_dropout: float = 0.0,
                    user_id_dropout: float = 0.0) -> BatchMaker:
        return BatchMaker(self.spec, self.features, self.history, seed, history_dropout,
                          user_id_dropout)


def training_rows(data_dir: str, splits: tuple[str, ...]) -> dict[str, np.ndarray]:
    """The rows of the given splits, concatenated (split order)."""
    parts = [read_split_arrays(Path(data_dir, s)) for s in splits]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def training_inputs(model: ModelConfig, data_dir: str, splits: tuple[str, ...] = ("train",)
                    ) -> TrainingInputs:
    """The model's shape, its item features, the training rows (of ``splits``: the train
    split, or every split for a refit), positives per item and the users' histories."""
    from app.data.dataset import read_manifest

    manifest = read_manifest(data_dir)
    features = item_features(model, data_dir)
    spec = model_spec(model, manifest, features)
    rows = training_rows(data_dir, splits)
    pos = rows["label"] > 0
    counts = np.bincount(rows["item"][pos].astype(np.int64), minlength=spec.num_items)
    history = UserHistory.build(rows["user"][pos], rows["item"][pos], rows["timestamp"][pos],
                                spec.num_users)
    return TrainingInputs(spec, features, rows, counts, history)


def equal_share(ids: np.ndarray, device: torch.device) -> np.ndarray:
    """Truncate this rank's sample ids to the shortest rank's count, so that every rank runs
    the same number of steps (sharded lookups are collective); at most a few rows per epoch."""
    n = torch.tensor([len(ids)], device=device)
    dist.all_reduce(n, op=dist.ReduceOp.MIN)
    return ids[: int(n.item())]


def prefetch(make: Callable[[int], Any], n: int, depth: int = 2) -> Iterator[Any]:
    """Yield make(0..n-1), building up to ``depth`` items ahead in a background thread
    (decoding and KJT building overlap the model step)."""
    q: queue.Queue = queue.Queue(maxsize=depth)

    def run() -> None:
        try:
            for i in range(n):
                q.put(make(i))
        except BaseException as e:  # surfaced in the consumer
            q.put(e)

    threading.Thread(target=run, daemon=True).start()
    for _ in range(n):
        item = q.get()
        if isinstance(item, BaseException):
            raise item
        yield item


@dataclass
class EpochShare:
    """This rank's part of a training epoch (:func:`training_share`)."""

    ids: np.ndarray     # the sample ids its batches read, in order
    batch_size: int     # ids per batch: the same on every rank
    rows: int           # the epoch's rows this share stands for (what samples/s counts)
    total_rows: int     # the epoch's rows all the ranks' shares cover

    def rows_in(self, steps: int) -> int:
        """The epoch rows the first ``steps`` batches stand for."""
        return round(min(steps * self.batch_size, len(self.ids)) * self.rows
                     / max(len(self.ids), 1))


def training_share(stream: InteractionStream, epoch_ids: np.ndarray, device: torch.device,
                   batch_size: int, positives_only: bool) -> EpochShare:
    """This rank's share of an epoch's sample ids, and the batch size its steps take (a
    collective call: every rank gets as many ids and the same batch size).

    ``positives_only`` (a softmax, whose loss is over positives alone: a label-0 row's towers
    would be computed for nothing): the batches take only the positive rows, ``batch_size``
    times the positives' share of the epoch, so that an epoch takes as many steps as with
    every row and a step as many positives as a batch of ``batch_size`` rows holds on
    average. The ranks' positives are evened out (:func:`balanced`), not each batch filtered:
    TorchRec's sharded tables exchange batches between ranks and need them the same size.
    """
    world = dist.get_world_size()
    if positives_only:
        positive = epoch_ids[stream.gather(epoch_ids, ("label",))["label"] > 0]
        counts: list[Any] = [None] * world
        dist.all_gather_object(counts, (len(epoch_ids), len(positive)))
        rows, positives = (sum(c[i] for c in counts) for i in (0, 1))
        if positives > 0:
            kept = balanced(positive, [c[1] for c in counts])
            total = rows - (positives - world * len(kept))
            return EpochShare(kept, max(1, round(batch_size * positives / rows)),
                              round(total / world), total)
    kept = equal_share(epoch_ids, device)
    return EpochShare(kept, batch_size, len(kept), len(kept) * world)


def balanced(ids: np.ndarray, counts: list[int]) -> np.ndarray:
    """This rank's ids evened out with the other ranks' (``counts``: every rank's number of
    ids) to ``sum(counts) // ranks`` each: a rank with more hands the ids past that to the
    ranks with fewer (a collective call), so fewer ids than ranks are left out."""
    rank, world = dist.get_rank(), dist.get_world_size()
    target = sum(counts) // world
    surplus: list[Any] = [None] * world
    dist.all_gather_object(surplus, ids[target:])
    pool = np.concatenate(surplus)
    need = [max(0, target - c) for c in counts]
    start = sum(need[:rank])
    return np.concatenate([ids[:target], pool[start:start + need[rank]]])


def epoch_batches(stream: InteractionStream, maker: BatchMaker, epoch: int,
                  device: torch.device, batch_size: int, max_steps: int = 0
                  ) -> tuple[EpochShare, int, Iterator[Any]]:
    """This rank's share of an epoch as training batches.

    Returns:
        (share, steps, batches): this rank's share (:func:`training_share`), the number of
        steps (at most ``max_steps`` when given) and the batches, prefetched.
    """
    share = training_share(stream, stream.epoch_sample_ids(epoch=epoch), device, batch_size,
                           positives_only=maker.spec.objective == "softmax")
    ids, size = share.ids, share.batch_size
    steps = (len(ids) + size - 1) // size
    steps = min(steps, max_steps) if max_steps else steps
    batches = prefetch(lambda i: maker(stream.gather(ids[i * size:(i + 1) * size],
                                                     BATCH_COLUMNS), train=True), steps)
    return share, steps, batches
