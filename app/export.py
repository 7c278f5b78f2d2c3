"""The model folder contract and the serving form of the two-tower model.

A model folder holds::

    model.json                 schema version, ModelSpec, objective, dataset it was trained on
    config.yaml                the resolved configuration of the run
    weights.pt                 consolidated weights of :class:`ExportedTwoTower` (plain torch)
    vocab/users.parquet        the dataset's vocabularies (index <-> id, item metadata)
    vocab/items.parquet
    item_popularity.npy        positives per item index in the training split
    sharding_plan.json         where each embedding table was placed during training
    metrics.json               final metrics: {"model": {"val": ..., "test": ...},
                                               "popularity": {"val": ..., "test": ...}}
    history.json               per-epoch metrics

:class:`ExportedTwoTower` is the same function as :class:`app.model.TwoTower` written with
``nn.EmbeddingBag`` and ``nn.Linear`` only, so one process loads it with ``torch.load`` and no
TorchRec runtime; :func:`export_state_dict` maps a training state dict onto it.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from torch import nn

from app.model import QUERY_FEATURES, TABLES, ModelSpec
from app.dataset import ItemFeatures

MODEL_SCHEMA_VERSION = 1
MODEL_JSON = "model.json"
WEIGHTS = "weights.pt"


class ModelError(ValueError):
    """A model folder is missing, incomplete, or does not match what the caller expects."""


class ExportedTower(nn.Module):
    """Sum-pooled ``nn.EmbeddingBag`` per feature -> Linear+ReLU layers -> Linear."""

    def __init__(self, rows: dict[str, int], dim: int, layers: tuple[int, ...]) -> None:
        super().__init__()
        self.tables = nn.ModuleDict({f: nn.EmbeddingBag(n, dim, mode="sum")
                                     for f, n in rows.items()})
        widths = [dim * len(rows)] + [int(x) for x in layers]
        hidden: list[nn.Module] = []
        for a, b in zip(widths[:-2], widths[1:-1]):
            hidden += [nn.Linear(a, b), nn.ReLU()]
        self.mlp = nn.Sequential(*hidden)
        self.proj = nn.Linear(widths[-2], widths[-1])

    def forward(self, bags: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """bags: feature -> (values, offsets), in table order; returns (B, output_dim)."""
        pooled = [self.tables[f](v, o) for f, (v, o) in bags.items()]
        return self.proj(self.mlp(torch.cat(pooled, dim=1)))


class ExportedTwoTower(nn.Module):
    """The trained towers for serving: user and item embeddings, pair scores.

    Item genres (when the model uses them) are stored inside as CSR buffers, so the module
    needs nothing but item indices.
    """

    def __init__(self, spec: ModelSpec, genres: Optional[ItemFeatures] = None) -> None:
        super().__init__()
        self.spec = spec
        rows = spec.table_rows()
        self.query = ExportedTower({f: rows[f] for f in QUERY_FEATURES},
                                   spec.embedding_dim, spec.tower_layers)
        self.candidate = ExportedTower({f: rows[f] for f in spec.candidate_features()},
                                       spec.embedding_dim, spec.tower_layers)
        if spec.num_genres:
            if genres is None:
                raise ModelError("this model uses item genres; pass the item features")
            self.register_buffer("genre_offsets", torch.from_numpy(genres.offsets))
            self.register_buffer("genre_values", torch.from_numpy(genres.values))

    def user_embeddings(self, users: torch.Tensor) -> torch.Tensor:
        """User indices (B,) -> (B, D)."""
        users = users.long()
        offsets = torch.arange(len(users), device=users.device)
        return self.query({"user_id": (users, offsets)})

    def item_embeddings(self, items: torch.Tensor) -> torch.Tensor:
        """Item indices (B,) -> (B, D)."""
        items = items.long()
        bags = {"item_id": (items, torch.arange(len(items), device=items.device))}
        if self.spec.num_genres:
            starts = self.genre_offsets[items]
            lengths = self.genre_offsets[items + 1] - starts
            row_first = torch.cumsum(lengths, 0) - lengths
            idx = (torch.repeat_interleave(starts - row_first, lengths)
                   + torch.arange(int(lengths.sum()), device=items.device))
            bags["item_genres"] = (self.genre_values[idx], row_first)
        return self.candidate(bags)

    def score(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """Dot-product score of each (user, item) pair: (B,)."""
        return (self.user_embeddings(users) * self.item_embeddings(items)).sum(-1)


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


def write_model_json(model_dir: str | os.PathLike, spec: ModelSpec, *,
                     data_dir: str, manifest: dict[str, Any],
                     calibration: Optional[dict[str, float]] = None) -> None:
    """The folder's contract file: schema version, spec, the dataset it was trained on, and
    the calibration of pair probabilities (``sigmoid(a * score + b)``)."""
    info = {"schema_version": MODEL_SCHEMA_VERSION, "spec": spec.to_dict(),
            "dataset": {"path": str(Path(data_dir).resolve()),
                        "created_unix": manifest["created_unix"],
                        "vocab": manifest["vocab"], "splits": manifest["counts"]["splits"]},
            "calibration": calibration or {"a": 1.0, "b": 0.0}}
    Path(model_dir, MODEL_JSON).write_text(json.dumps(info, indent=2) + "\n")


def read_model_json(model_dir: str | os.PathLike) -> dict[str, Any]:
    """Load and check ``model.json``.

    Raises:
        ModelError: no model folder there, or a schema version this code cannot read.
    """
    path = Path(model_dir, MODEL_JSON)
    if not path.is_file():
        raise ModelError(f"{model_dir} is not a model folder (no {MODEL_JSON})")
    info = json.loads(path.read_text())
    if info.get("schema_version") != MODEL_SCHEMA_VERSION:
        raise ModelError(f"{path}: schema version {info.get('schema_version')}, this code "
                         f"reads version {MODEL_SCHEMA_VERSION}")
    return info


def load_exported(model_dir: str | os.PathLike,
                  map_location: str | torch.device = "cpu") -> ExportedTwoTower:
    """The serving model of a model folder, in eval mode.

    Raises:
        ModelError: missing files, or weights that do not match the folder's spec.
    """
    info = read_model_json(model_dir)
    spec = ModelSpec.from_dict(info["spec"])
    genres = ItemFeatures.genres(model_dir) if spec.num_genres else None
    model = ExportedTwoTower(spec, genres)
    weights = Path(model_dir, WEIGHTS)
    if not weights.is_file():
        raise ModelError(f"{model_dir}: no {WEIGHTS}")
    state = torch.load(weights, map_location=map_location, weights_only=True)
    buffers = {k: v for k, v in model.state_dict().items() if k.startswith("genre_")}
    try:
        model.load_state_dict({**state, **buffers})
    except RuntimeError as e:
        raise ModelError(f"{weights} does not match {MODEL_JSON}: {e}") from None
    return model.to(map_location).eval()


def pair_probabilities(scores: np.ndarray, known: np.ndarray, calibration: dict[str, float]
                       ) -> tuple[np.ndarray, Any]:
    """(prediction_prob, predicted_class) of pair scores under the model's calibration
    ``sigmoid(a * score + b)``; the class is missing (NA) where a pair has an unknown id."""
    import pandas as pd

    prob = 1.0 / (1.0 + np.exp(-(calibration["a"] * scores.astype(np.float64)
                                 + calibration["b"])))
    cls = pd.Series((prob >= 0.5).astype(np.int8), dtype="Int8").where(known)
    return prob, cls


def item_popularity(model_dir: str | os.PathLike) -> np.ndarray:
    """Positives per item index in the training split (index 0 = unknown, always 0)."""
    return np.load(Path(model_dir, "item_popularity.npy"))
