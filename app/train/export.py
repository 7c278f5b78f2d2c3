"""The serving form of the two-tower model, in plain PyTorch.

:class:`ExportedTwoTower` is the same function as :class:`app.train.model.TwoTower` written with
``nn.EmbeddingBag`` and ``nn.Linear`` only, so one process loads it with ``torch.load`` and no
TorchRec runtime; :func:`export_state_dict` maps a training state dict onto it. The folder it is
saved in is :mod:`app.train.model_folder`.
"""

from __future__ import annotations

import re
from typing import Any, Optional, Sequence

import numpy as np
import torch
from torch import nn

from app.core.errors import ModelError  # noqa: F401  (raised here, importable from here)
from app.data.dataset import ItemFeatures
from app.data.history import UserHistory
from app.train.model import MEAN_POOLED, TABLES, ModelSpec


class ExportedTower(nn.Module):
    """Pooled ``nn.EmbeddingBag`` per feature -> Linear+ReLU layers -> Linear [-> L2 norm]."""

    def __init__(self, rows: dict[str, int], dim: int, layers: tuple[int, ...],
                 normalize: bool = False) -> None:
        super().__init__()
        self.tables = nn.ModuleDict({
            f: nn.EmbeddingBag(n, dim, mode="mean" if f in MEAN_POOLED else "sum")
            for f, n in rows.items()})
        self.normalize = normalize
        widths = [dim * len(rows)] + [int(x) for x in layers]
        hidden: list[nn.Module] = []
        for a, b in zip(widths[:-2], widths[1:-1]):
            hidden += [nn.Linear(a, b), nn.ReLU()]
        self.mlp = nn.Sequential(*hidden)
        self.proj = nn.Linear(widths[-2], widths[-1])

    def forward(self, bags: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """bags: feature -> (values, offsets), in table order; returns (B, output_dim)."""
        pooled = [self.tables[f](*bags[f]) for f in self.tables]
        out = self.proj(self.mlp(torch.cat(pooled, dim=1)))
        return nn.functional.normalize(out, dim=-1) if self.normalize else out


def _jagged(offsets: torch.Tensor, values: torch.Tensor, rows: torch.Tensor
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, bag offsets) of the given rows of a CSR feature, for ``nn.EmbeddingBag``."""
    starts = offsets[rows]
    lengths = offsets[rows + 1] - starts
    row_first = torch.cumsum(lengths, 0) - lengths
    idx = (torch.repeat_interleave(starts - row_first, lengths)
           + torch.arange(int(lengths.sum()), device=rows.device))
    return values[idx], row_first


class ExportedTwoTower(nn.Module):
    """The trained towers for serving: user and item embeddings, pair scores.

    Item features (genres, year) and each user's latest positives (the history bag) are
    stored inside as CSR buffers, so the module needs nothing but indices; a caller may pass
    another history for some users (a new user's recent items).

    Args:
        spec: the model.
        features: the candidate tower's item features (see ``spec.candidate_features()``).
        history: the users' positives in time order (when the model reads histories).
    """

    def __init__(self, spec: ModelSpec, features: Sequence[ItemFeatures] = (),
                 history: Optional[UserHistory] = None) -> None:
        super().__init__()
        self.spec = spec
        rows = spec.table_rows()
        self.query = ExportedTower({f: rows[f] for f in spec.query_features()},
                                   spec.embedding_dim, spec.tower_layers, spec.normalize)
        self.candidate = ExportedTower({f: rows[f] for f in spec.candidate_features()},
                                       spec.embedding_dim, spec.tower_layers, spec.normalize)
        given = {f.name: f for f in features}
        for name in spec.candidate_features()[1:]:
            if name not in given:
                raise ModelError(f"this model uses the item feature {name}; pass it")
            self.register_buffer(f"{name}_offsets", torch.from_numpy(given[name].offsets))
            self.register_buffer(f"{name}_values", torch.from_numpy(given[name].values))
        if spec.history_length:
            if history is None:
                raise ModelError("this model reads user histories; pass them")
            lengths, values = history.latest(np.arange(spec.num_users), spec.history_length)
            self.register_buffer("history_offsets", torch.from_numpy(
                np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)))
            self.register_buffer("history_values", torch.from_numpy(values.astype(np.int64)))

    def user_embeddings(self, users: torch.Tensor,
                        history: Optional[tuple[torch.Tensor, torch.Tensor]] = None
                        ) -> torch.Tensor:
        """User indices (B,) -> (B, D).

        Args:
            users: user indices (0: unknown).
            history: ``(values, bag offsets)`` of each row's history bag, replacing the stored
                one (a new user's recent items); default: each user's latest positives.
        """
        users = users.long()
        bags = {"user_id": (users, torch.arange(len(users), device=users.device))}
        if self.spec.history_length:
            bags["user_history"] = history if history is not None else _jagged(
                self.history_offsets, self.history_values, users)
        return self.query(bags)

    def user_embeddings_given(self, users: torch.Tensor,
                              given: Sequence[Optional[np.ndarray]]) -> torch.Tensor:
        """Like :meth:`user_embeddings`, but a row whose ``given`` entry is an array of item
        indices (oldest first) reads its latest ``history_length`` items instead of the
        stored history: a new user's (index 0) or a known user's recent items."""
        if not self.spec.history_length or all(g is None for g in given):
            return self.user_embeddings(users)
        n = self.spec.history_length
        stored_v, stored_o = _jagged(self.history_offsets, self.history_values, users.long())
        ends = torch.cat([stored_o[1:], torch.tensor([len(stored_v)], device=users.device)])
        bags = [np.asarray(g[-n:], np.int64) if g is not None
                else stored_v[stored_o[r]:ends[r]].cpu().numpy()
                for r, g in enumerate(given)]
        lengths = np.array([len(b) for b in bags], np.int64)
        values = torch.from_numpy(np.concatenate(bags) if len(bags) else np.empty(0, np.int64))
        offsets = torch.from_numpy(np.concatenate([[0], np.cumsum(lengths)[:-1]]))
        return self.user_embeddings(users, (values.to(users.device), offsets.to(users.device)))

    def item_embeddings(self, items: torch.Tensor) -> torch.Tensor:
        """Item indices (B,) -> (B, D)."""
        items = items.long()
        bags = {"item_id": (items, torch.arange(len(items), device=items.device))}
        for name in self.spec.candidate_features()[1:]:
            bags[name] = _jagged(getattr(self, f"{name}_offsets"),
                                 getattr(self, f"{name}_values"), items)
        return self.candidate(bags)

    def score(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """Dot-product score of each (user, item) pair: (B,)."""
        return (self.user_embeddings(users) * self.item_embeddings(items)).sum(-1)

    def buffers_for(self) -> dict[str, torch.Tensor]:
        """The stored features (not part of the trained weights)."""
        return {k: v for k, v in self.state_dict().items()
                if k.endswith(("_offsets", "_values"))}


_MLP_KEY = re.compile(r"^(query|candidate)\.mlp\._mlp\.(\d+)\._linear\.(weight|bias)$")
_TABLE_KEY = re.compile(r"^(query|candidate)\.ebc\.embedding_bags\.(\w+)\.weight$")


def export_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A :class:`TwoTower` (or train task, prefix ``model.``) state dict -> the
    :class:`ExportedTwoTower` state dict. Pure: renames keys, keeps tensors.

    Raises:
        ModelError: a key that belongs to neither tower.
    """
    feature_of = {table: feature for feature, table in TABLES.items()}
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        key = key.removeprefix("model.")
        if m := _TABLE_KEY.match(key):
            out[f"{m[1]}.tables.{feature_of[m[2]]}.weight"] = value
        elif m := _MLP_KEY.match(key):
            # torchrec MLP layer i (Linear + ReLU) -> Sequential index 2i (Linear), 2i+1 (ReLU)
            out[f"{m[1]}.mlp.{2 * int(m[2])}.{m[3]}"] = value
        elif re.match(r"^(query|candidate)\.proj\.(weight|bias)$", key):
            out[key] = value
        else:
            raise ModelError(f"unexpected key in a two-tower state dict: {key}")
    return out


def pair_probabilities(scores: np.ndarray, known: np.ndarray, calibration: dict[str, float]
                       ) -> tuple[np.ndarray, Any]:
    """(prediction_prob, predicted_class) of pair scores under the model's calibration
    ``sigmoid(a * score + b)``; the class is missing (NA) where a pair has an unknown id."""
    import pandas as pd

    prob = 1.0 / (1.0 + np.exp(-(calibration["a"] * scores.astype(np.float64)
                                 + calibration["b"])))
    cls = pd.Series((prob >= 0.5).astype(np.int8), dtype="Int8").where(known)
    return prob, cls


