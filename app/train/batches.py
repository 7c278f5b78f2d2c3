"""Batches for the two-tower model: each tower's features as TorchRec ``KeyedJaggedTensor`` s.

:class:`BatchMaker` turns training rows into a :class:`TwoTowerBatch`: the query side (user id,
the user's latest earlier positives as a history bag), the candidate side (item id, genres,
year) and the negatives the objective needs. TorchRec is imported inside functions.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Optional, Sequence

import numpy as np
import torch

from app.data.dataset import ItemFeatures
from app.train.model import ModelSpec


@dataclass
class TwoTowerBatch:
    """One training batch: query features, candidate features, labels, item indices.

    ``candidate`` holds the rows' items followed by ``extra_items`` (sampled negatives), or,
    when the task's negatives are the whole catalog, every item index 0..N-1 and nothing else.

    Implements the ``Pipelineable`` protocol (``to``, ``record_stream``, ``pin_memory``) that
    TorchRec's sparse-dist train pipeline uses to copy batches to the GPU ahead of time.
    """

    query: Any        # KeyedJaggedTensor (user_id, user_history)
    candidate: Any    # KeyedJaggedTensor (item_id[, item_genres][, item_year])
    labels: torch.Tensor  # (B,) float 0/1
    items: torch.Tensor   # (B,) int64, for log-Q correction and accidental-hit masking
    extra_items: torch.Tensor  # (M,) int64 candidates after the rows' (sampled negatives)

    def _map(self, fn: Any) -> "TwoTowerBatch":
        return TwoTowerBatch(*(fn(getattr(self, f.name)) for f in fields(self)))

    def to(self, device: torch.device, non_blocking: bool = False) -> "TwoTowerBatch":
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def record_stream(self, stream: Any) -> None:
        for f in fields(self):
            getattr(self, f.name).record_stream(stream)

    def pin_memory(self) -> "TwoTowerBatch":
        return self._map(lambda t: t.pin_memory())

    def __len__(self) -> int:
        return len(self.labels)


def _kjt(keys: list[str], values: list[np.ndarray], lengths: list[np.ndarray]) -> Any:
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    return KeyedJaggedTensor.from_lengths_sync(
        keys=keys, values=torch.from_numpy(np.concatenate(values).astype(np.int64)),
        lengths=torch.from_numpy(np.concatenate(lengths).astype(np.int64)))


def query_kjt(users: np.ndarray, history: Optional[tuple[np.ndarray, np.ndarray]] = None, *,
              use_user_id: bool = True) -> Any:
    """User indices (B,) and, when the model reads histories, each row's history bag
    (``(lengths (B,), item indices)``) -> the query tower's KeyedJaggedTensor."""
    users = np.ascontiguousarray(users, dtype=np.int64)
    keys, values, lengths = [], [], []
    if use_user_id:
        keys.append("user_id")
        values.append(users)
        lengths.append(np.ones(len(users), np.int64))
    if history is not None:
        keys.append("user_history")
        lengths.append(history[0])
        values.append(history[1])
    return _kjt(keys, values, lengths)


def candidate_kjt(items: np.ndarray, features: Sequence[ItemFeatures] = ()) -> Any:
    """Item indices (B,) -> KeyedJaggedTensor: ``item_id`` (one per row) and a bag per item
    feature (genres, year), in the given order. Built with array operations only."""
    items = np.ascontiguousarray(items, dtype=np.int64)
    keys, values, lengths = ["item_id"], [items], [np.ones(len(items), np.int64)]
    for feature in features:
        lens, vals = feature.lookup(items)
        keys.append(feature.name)
        values.append(vals)
        lengths.append(lens)
    return _kjt(keys, values, lengths)


@dataclass
class BatchMaker:
    """Turns decoded rows into :class:`TwoTowerBatch` es for one model.

    Args:
        spec: the model (which features, which negatives).
        item_features: the candidate tower's item features, in the spec's order.
        history: the users' positives in time order (:class:`app.data.history.UserHistory`); a row's
            history bag holds positives strictly before the row's timestamp only.
        seed: seed of the sampled negatives and of history dropout.
        history_dropout: share of history items dropped at random from training batches
            (denoising, as in Mult-DAE: the towers cannot memorise a user's exact bag).
        user_id_dropout: share of training rows whose user id is replaced by 0 (unknown) and
            whose history is kept whole, so the query tower also learns to recommend from a
            history alone (new users).
    """

    spec: ModelSpec
    item_features: Sequence[ItemFeatures] = ()
    history: Any = None
    seed: int = 0
    history_dropout: float = 0.0
    user_id_dropout: float = 0.0

    def __post_init__(self) -> None:
        self._rng = np.random.default_rng(self.seed)
        self._catalog = None

    def reseed(self, seed: int) -> None:
        """Restart the negatives' random stream (per epoch, so a resumed run samples alike)."""
        self._rng = np.random.default_rng(seed)

    def query(self, users: np.ndarray, history: Optional[tuple[np.ndarray, np.ndarray]] = None
              ) -> Any:
        """Query KJT of users; their latest history unless a jagged history is given."""
        if self.spec.history_length and history is None:
            history = self.history.latest(users, self.spec.history_length)
        return query_kjt(users, history if self.spec.history_length else None,
                         use_user_id=self.spec.use_user_id)

    def candidate(self, items: np.ndarray) -> Any:
        return candidate_kjt(items, self.item_features)

    def __call__(self, rows: dict[str, np.ndarray], *, train: bool = False) -> TwoTowerBatch:
        """Decoded rows (``user``, ``item``, ``label``[, ``timestamp``]) -> a batch; ``train``
        applies history dropout."""
        spec = self.spec
        users = rows["user"]
        hidden = np.zeros(len(users), bool)  # rows that play a new user: id hidden
        if train and self.user_id_dropout > 0 and spec.use_user_id:
            hidden = self._rng.random(len(users)) < self.user_id_dropout
            users = np.where(hidden, 0, users)
        history = None
        if spec.history_length:
            history = self.history.before(rows["user"], rows["timestamp"], rows["item"],
                                          spec.history_length)
            if train and self.history_dropout > 0:
                # a row whose id is hidden keeps its whole history, as a new user brings it
                lengths, values = history
                rows_of = np.repeat(np.arange(len(lengths)), lengths)
                keep = (self._rng.random(len(values)) >= self.history_dropout) | hidden[rows_of]
                history = (np.bincount(rows_of[keep], minlength=len(lengths)), values[keep])
        extra = np.empty(0, np.int64)
        if spec.objective == "softmax" and spec.negatives == "catalog":
            if self._catalog is None:  # the same every batch: built once
                self._catalog = self.candidate(np.arange(spec.num_items))
            candidate = self._catalog
        else:
            if spec.objective == "softmax" and spec.negatives == "mixed":
                extra = self._rng.integers(1, spec.num_items, spec.sampled_negatives)
            candidate = self.candidate(np.concatenate([rows["item"].astype(np.int64), extra]))
        return TwoTowerBatch(query=query_kjt(users, history, use_user_id=spec.use_user_id),
                             candidate=candidate,
                             labels=torch.from_numpy(rows["label"].astype(np.float32)),
                             items=torch.from_numpy(rows["item"].astype(np.int64)),
                             extra_items=torch.from_numpy(extra.astype(np.int64)))
