"""Warm start (``train --init-from MODEL``): a new run's tables and towers from a trained model.

The driver (:func:`warm_start_from`) opens the model (a folder, a URI or ``models:/name@alias``),
checks that its shape matches the new run's (:func:`check_spec`: one line naming the first
field that differs) and matches rows by id: for every row of every embedding table of the new
run, the model's row of the same user, item, genre or year, or -1 where the id is new
(:func:`source_rows`). Each worker (:func:`apply_warm_start`) then copies those rows into its
own shards and the dense layers as they are; new ids keep the fresh initialisation a run from
scratch gives them, and the optimizer starts fresh, at ``--warm-lr-scale`` times the learning
rates (a fresh optimizer's first steps are its largest: at the full rates they undo much of
what the model learnt before it learns the new ratings). The rows are matched by the ids' exact
text, so a model whose vocabulary has another row order, or fewer ids, warm-starts the same.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import pandas as pd
import torch

from app.core.config import ClusterConfig
from app.core.errors import ModelError
from app.core.redact import redact
from app.data.dataset import ItemFeatures, id_text, load_vocab
from app.train.export import export_state_dict
from app.train.model import ModelSpec
from app.train.model_folder import (
    WEIGHTS,
    ModelRef,
    fixed_reference,
    read_model_json,
    resolve_model,
    verify_files,
)

# the fields that fix the weights' shapes and meaning; the rest (objective, negatives,
# temperature, history length) may change between a model and the run it starts
SHAPE_FIELDS = ("embedding_dim", "tower_layers", "normalize")
# table feature -> which vocabulary its rows are
ROWS_OF = {"user_id": "users", "user_history": "items", "item_id": "items",
           "item_genres": "item_genres", "item_year": "item_year"}


@dataclass
class WarmStart:
    """What the workers copy: per table feature, the model's row of each new row (-1: a new
    id) and the model's table; the dense layers by their exported names."""

    label: str                                   # what the run started from, in words
    tables: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    dense: dict[str, np.ndarray] = field(default_factory=dict)

    def counts(self) -> dict[str, tuple[int, int]]:
        """feature -> (rows copied, rows new)."""
        return {f: (int((src >= 0).sum()), int((src < 0).sum()))
                for f, (src, _) in self.tables.items()}

    def describe(self, lr_scale: float = 1.0) -> str:
        c = self.counts()
        parts = [f"{c[f][0]:,} of {c[f][0] + c[f][1]:,} {noun} rows"
                 for f, noun in (("user_id", "user"), ("item_id", "item")) if f in c]
        return f"warm start from {self.label}: " + ", ".join(parts) + \
            " copied by id, the rest fresh; dense layers copied; a fresh optimizer" + \
            (f" at {lr_scale:g}x the learning rates" if lr_scale != 1 else "")


def check_spec(model: ModelSpec, run: ModelSpec, where: str) -> None:
    """The run can start from the model: the same dimension, tower layers, normalisation and
    features.

    Raises:
        ModelError: one line naming the first field that differs and both values.
    """
    for name in SHAPE_FIELDS:
        have, want = getattr(model, name), getattr(run, name)
        if have != want:
            raise ModelError(f"--init-from {where}: its {name} is {_shown(have)}, this run's "
                             f"is {_shown(want)}; a warm start needs the same "
                             f"{', '.join(SHAPE_FIELDS)} and features")
    for tower in ("query_features", "candidate_features"):
        have, want = getattr(model, tower)(), getattr(run, tower)()
        if have != want:
            raise ModelError(f"--init-from {where}: its {tower} are {list(have)}, this run's "
                             f"are {list(want)}; a warm start needs the same features")


def _shown(value: Any) -> str:
    return str(list(value)) if isinstance(value, tuple) else str(value)


def source_rows(old_ids: Any, new_ids: Any) -> np.ndarray:
    """For a new vocabulary (index 1..N, ids as text) the old vocabulary's index of each id:
    ``(N + 1,)`` int64, -1 for a new id; row 0 (the unknown id) maps to row 0."""
    old = pd.Index(pd.Series(old_ids, dtype="string"))
    found = old.get_indexer(pd.Index(pd.Series(new_ids, dtype="string")))
    return np.concatenate([[0], np.where(found >= 0, found + 1, -1)]).astype(np.int64)


def vocab_ids(folder: str | Path) -> dict[str, list[str]]:
    """users, items (ids as text, index order) and the genre and year values of a dataset
    or model folder."""
    vocab = load_vocab(folder)
    out = {kind: id_text(table.sort_by("index")["id"]).to_pylist()
           for kind, table in vocab.items()}
    for name, read in (("item_genres", ItemFeatures.genres), ("item_year", ItemFeatures.years)):
        feature = read(folder)
        out[name] = feature.vocab[1:] if feature is not None else []
    return out


def warm_start_from(init_from: str, cluster: ClusterConfig, spec: ModelSpec, data_dir: str,
                    say: Any = None, lr_scale: float = 1.0) -> WarmStart:
    """Open ``init_from``, check its shape against ``spec`` and match every table's rows by id
    with the dataset ``data_dir`` (the run's vocabularies).

    Raises:
        ModelError: not a model, a damaged one, or one of another shape (one line).
    """
    shown = redact(init_from)
    try:
        folder = resolve_model(init_from, cluster)
    except ModelError as e:
        raise ModelError(f"--init-from: {str(e).removeprefix('--model ')}") from None
    info = read_model_json(folder)
    verify_files(folder, info)
    model = ModelSpec.from_dict(info.spec)
    check_spec(model, spec, shown)
    state = torch.load(Path(folder, WEIGHTS), map_location="cpu", weights_only=True)
    old, new = vocab_ids(folder), vocab_ids(data_dir)
    warm = WarmStart(label=_label(init_from, folder, cluster))
    rows = spec.table_rows()
    for feature, n in rows.items():
        tower = "query" if feature in spec.query_features() else "candidate"
        table = state[f"{tower}.tables.{feature}.weight"].numpy()
        src = source_rows(old[ROWS_OF[feature]], new[ROWS_OF[feature]])
        if len(src) != n:
            raise ModelError(f"--init-from {shown}: the dataset has {len(src) - 1:,} "
                             f"{ROWS_OF[feature]} and this run's table {n - 1:,}")
        warm.tables[feature] = (src, table)
    warm.dense = {k: v.numpy() for k, v in state.items() if ".tables." not in k}
    if say is not None:
        say(warm.describe(lr_scale))
    return warm


def _label(init_from: str, folder: Path, cluster: ClusterConfig) -> str:
    """``models:/name/N`` for a registered model (an alias with the version it names now),
    the reference for another MLflow model, else the folder (its published version)."""
    ref = ModelRef(init_from)
    if ref.registered and ref.alias is not None:
        try:
            return f"{init_from} ({fixed_reference(init_from, cluster)})"
        except ModelError:
            return init_from
    return redact(init_from) if ref.mlflow else str(folder)


# ------------------------------------------------------------------------- on every worker

def apply_warm_start(dmp: Any, warm: dict[str, Any]) -> dict[str, int]:
    """Copy a warm start's rows into this rank's shards of every table and its dense layers
    into this rank's replica (a local operation on every rank: the same values everywhere).

    Args:
        dmp: the sharded train task (``DistributedModelParallel``).
        warm: ``{"tables": {feature: (src, table)}, "dense": {exported key: array}}``.

    Returns:
        The number of table rows this rank copied.
    """
    sd = dmp.state_dict()
    exported = export_state_dict({k: k for k in sd})  # exported name -> this state dict's key
    copied = 0
    for name, key in exported.items():
        if ".tables." in name:
            feature = name.split(".tables.")[1].rsplit(".weight", 1)[0]
            src, table = warm["tables"][feature]
            copied += _copy_rows(sd[key], src, torch.from_numpy(np.asarray(table)))
        else:
            value = torch.from_numpy(np.asarray(warm["dense"][name]))
            target = sd[key]
            if tuple(target.shape) != tuple(value.shape):
                raise ModelError(f"warm start: {name} has shape {tuple(value.shape)}, this "
                                 f"run's {tuple(target.shape)}")
            with torch.no_grad():
                target.copy_(value.to(target.device, target.dtype))
    dmp.load_state_dict(sd)
    return copied


def _copy_rows(value: Any, src: np.ndarray, table: torch.Tensor) -> int:
    """Rows ``src >= 0`` of a (possibly sharded) table from ``table[src]``, on this rank's
    shards; returns the rows copied."""
    from torch.distributed._shard.sharded_tensor import ShardedTensor
    from torch.distributed.tensor import DTensor

    if isinstance(value, ShardedTensor):
        n = 0
        for shard in value.local_shards():
            (r0, c0), (nr, nc) = shard.metadata.shard_offsets, shard.metadata.shard_sizes
            n += _fill(shard.tensor, src[r0:r0 + nr], table[:, c0:c0 + nc])
        return n
    if isinstance(value, DTensor):
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        shape, (r0, c0) = compute_local_shape_and_global_offset(
            value.shape, value.device_mesh, value.placements)
        return _fill(value.to_local(), src[r0:r0 + shape[0]], table[:, c0:c0 + shape[1]])
    return _fill(value, src, table)


def _fill(local: torch.Tensor, src: np.ndarray, table: torch.Tensor) -> int:
    """``local[r] = table[src[r]]`` where ``src[r] >= 0``, in place."""
    keep = np.flatnonzero(src >= 0)
    if not len(keep):
        return 0
    with torch.no_grad():
        local[torch.from_numpy(keep).to(local.device)] = table[torch.from_numpy(src[keep])].to(
            local.device, local.dtype)
    return len(keep)


def payload(warm: Optional[WarmStart]) -> Optional[dict[str, Any]]:
    """What the workers need of a warm start (None: a run from scratch)."""
    if warm is None:
        return None
    return {"label": warm.label, "tables": warm.tables, "dense": warm.dense}
