"""Recommendations and pair scores from a model folder, in one process (no TorchRec runtime).

:class:`Recommender` maps raw ids to indices with the model's vocabularies, computes every
item's embedding once, and answers two questions: top-K items for users (unknown users get the
popularity list, flagged) and scores of (user, item) pairs (unknown ids flagged, score NaN).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import pandas as pd
import torch

from app.dataset import load_vocab
from app.export import item_popularity, load_exported, pair_probabilities, read_model_json
from app.publish import local_dir


class Recommender:
    """A loaded model folder.

    Args:
        model_dir: a model folder (see :mod:`app.export`).
        device: where the towers run.
    """

    def __init__(self, model_dir: str | os.PathLike, device: str = "cpu") -> None:
        self.model_dir = model_dir = local_dir(model_dir)  # one version, however long we serve
        self.device = torch.device(device)
        self.model = load_exported(model_dir, map_location=self.device)
        self.calibration = read_model_json(model_dir).get("calibration", {"a": 1.0, "b": 0.0})
        vocab = load_vocab(model_dir)  # every id once, or a one-line error
        self.user_ids = vocab["users"]["id"].to_pandas()
        items = vocab["items"]
        self.item_ids = items["id"].to_pandas()
        self.titles = items["title"].to_pylist() if "title" in items.column_names else None
        # raw id -> index (1..N); 0 = unknown
        self._user_index = pd.Index(self.user_ids)
        self._item_index = pd.Index(self.item_ids)
        self.popularity = item_popularity(model_dir)
        with torch.no_grad():
            n = self.model.spec.num_items
            self.item_embeddings = torch.cat([
                self.model.item_embeddings(torch.arange(s, min(n, s + 65536),
                                                        device=self.device))
                for s in range(0, n, 65536)])                                  # (num_items, D)

    def user_indices(self, user_ids: Sequence[Any]) -> np.ndarray:
        """Raw user ids -> indices (0 for unknown ids)."""
        pos = self._user_index.get_indexer(pd.Index(user_ids))
        return (pos + 1).astype(np.int64)  # get_indexer gives -1 for unknown -> 0

    def item_indices(self, item_ids: Sequence[Any]) -> np.ndarray:
        """Raw item ids -> indices (0 for unknown ids)."""
        pos = self._item_index.get_indexer(pd.Index(item_ids))
        return (pos + 1).astype(np.int64)

    @torch.no_grad()
    def top_k_indices(self, users: np.ndarray, k: int,
                      given: Optional[list] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(scores (U, k), item indices (U, k)) over the whole catalog for user indices; rows
        with a ``given`` history (item indices) are queried with it, its items left out."""
        q = self.model.user_embeddings_given(torch.from_numpy(users).to(self.device),
                                             given or [None] * len(users))
        scores = q @ self.item_embeddings.T                                   # (U, num_items)
        scores[:, 0] = float("-inf")  # the unknown-item row is never recommended
        for row, g in enumerate(given or []):
            if g is not None and len(g):
                scores[row, torch.from_numpy(np.asarray(g, np.int64))] = float("-inf")
        return scores.topk(min(k, scores.shape[1] - 1), dim=1)

    def histories(self, lists: Sequence[Any]) -> tuple[list, int]:
        """Lists of raw item ids (or None) -> arrays of item indices (None where no list was
        given), and the number of unknown item ids ignored."""
        out, unknown = [], 0
        for ids in lists:
            if ids is None or (not isinstance(ids, (list, tuple, np.ndarray))
                               and pd.isna(ids)):
                out.append(None)
                continue
            idx = self.item_indices(list(ids))
            unknown += int((idx == 0).sum())
            out.append(idx[idx > 0])
        return out, unknown

    def recommend(self, user_ids: Sequence[Any], k: int = 10,
                  histories: Optional[Sequence[Any]] = None) -> pd.DataFrame:
        """Top-k items per user: columns userId, rank, movieId, score, fallback, source
        (+ title).

        Args:
            user_ids: raw user ids.
            k: items per user.
            histories: per user, a list of raw item ids it interacted with recently (oldest
                first) or None. A user with one is recommended from it (``source``
                "history"), its items left out; unknown item ids are ignored (counted in
                ``self.unknown_history_items``). Users neither known nor with a history get
                the k most popular items (``fallback`` True, ``source`` "popularity", score =
                the item's training positives).
        """
        user_ids = list(user_ids)
        idx = self.user_indices(user_ids)
        given, self.unknown_history_items = (self.histories(histories) if histories is not None
                                             else ([None] * len(idx), 0))
        if not self.model.spec.history_length:
            given = [None] * len(idx)  # a model without the feature: histories do not apply
        has_history = np.array([g is not None for g in given], bool)
        known = (idx > 0) | has_history
        k = min(k, self.model.spec.num_items - 1)
        scores = np.zeros((len(idx), k), np.float32)
        items = np.zeros((len(idx), k), np.int64)
        if known.any():
            rows = np.flatnonzero(known)
            s, i = self.top_k_indices(idx[rows], k, [given[r] for r in rows])
            scores[known], items[known] = s.cpu().numpy(), i.cpu().numpy()
        if (~known).any():
            pop = np.argsort(-self.popularity[1:], kind="stable")[:k] + 1
            items[~known] = pop
            scores[~known] = self.popularity[pop]
        out = pd.DataFrame({
            "userId": np.repeat(np.asarray(user_ids, dtype=object), k),
            "rank": np.tile(np.arange(1, k + 1, dtype=np.int32), len(user_ids)),
            "movieId": self.item_ids.to_numpy()[items.ravel() - 1],
            "score": scores.ravel(),
            "fallback": np.repeat(~known, k),
            "source": np.repeat(np.where(has_history, "history",
                                         np.where(known, "model", "popularity")), k)})
        out["userId"] = out["userId"].astype(self.user_ids.dtype)
        if self.titles is not None:
            out["title"] = [self.titles[i - 1] for i in items.ravel()]
        return out

    @torch.no_grad()
    def score_pairs(self, user_ids: Sequence[Any], item_ids: Sequence[Any]) -> pd.DataFrame:
        """Scores of (user, item) pairs: userId, movieId, score (the towers' dot product),
        prediction_prob (calibrated, see ``model.json``), predicted_class, known. Pairs with
        an unknown id keep their row with NaN scores and ``known`` False."""
        u, i = self.user_indices(list(user_ids)), self.item_indices(list(item_ids))
        known = (u > 0) & (i > 0)
        score = np.full(len(u), np.nan, np.float32)
        if known.any():
            s = self.model.score(torch.from_numpy(u[known]).to(self.device),
                                 torch.from_numpy(i[known]).to(self.device))
            score[known] = s.cpu().numpy()
        prob, cls = pair_probabilities(score, known, self.calibration)
        return pd.DataFrame({"userId": list(user_ids), "movieId": list(item_ids),
                             "score": score, "prediction_prob": prob,
                             "predicted_class": cls, "known": known})
