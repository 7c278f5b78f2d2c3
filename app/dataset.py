"""The prepared-dataset contract and its readers.

A prepared dataset folder holds::

    manifest.json              schema version, source, counts, label and split rules, vocab sizes
    vocab/users.parquet        index (1..N; 0 = unknown id) <-> id
    vocab/items.parquet        index <-> id, plus item metadata (title, genres) when known
    train/ val/ test/          MDS shards (columns: mds.INTERACTION_COLUMNS), merged index.json
    rejects/                   quarantined input rows with their reason (Parquet), if any

Readers check the manifest before touching the shards. :class:`InteractionStream` is a
``StreamingDataset`` (so it partitions samples across ranks and shuffles like one) that yields
whole batches decoded with numpy instead of one sample at a time; :func:`to_kjt` turns such a
batch into TorchRec's ``KeyedJaggedTensor`` with tensor operations only.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np
import pyarrow.parquet as pq
from streaming import StreamingDataset

from app.mds import INTERACTION_COLUMNS, record_dtype

SCHEMA_VERSION = 1
SPLITS = ("train", "val", "test")
MANIFEST = "manifest.json"


class DatasetError(ValueError):
    """A prepared dataset is missing, incomplete, or not what the reader expects."""


def read_manifest(data_dir: str | os.PathLike) -> dict[str, Any]:
    """Load and check ``manifest.json`` of a prepared dataset.

    Raises:
        DatasetError: the folder is not a complete prepared dataset of this schema version.
    """
    path = Path(data_dir) / MANIFEST
    if not path.is_file():
        raise DatasetError(f"{data_dir}: not a prepared dataset (no {MANIFEST}); run "
                           f"python -m pipelines.prepare_data --output {data_dir}")
    manifest = json.loads(path.read_text())
    if manifest.get("schema_version") != SCHEMA_VERSION:
        raise DatasetError(f"{data_dir}: dataset schema version {manifest.get('schema_version')}"
                           f", this code reads version {SCHEMA_VERSION}; prepare it again")
    if manifest.get("mds_columns") != INTERACTION_COLUMNS:
        raise DatasetError(f"{data_dir}: MDS columns {manifest.get('mds_columns')} differ from "
                           f"{INTERACTION_COLUMNS}")
    for split in SPLITS:
        if not (Path(data_dir) / split / "index.json").is_file():
            raise DatasetError(f"{data_dir}: split {split} has no index.json")
    return manifest


def load_vocab(data_dir: str | os.PathLike) -> dict[str, Any]:
    """User and item vocabularies as pyarrow tables (columns: index, id, [metadata])."""
    root = Path(data_dir) / "vocab"
    return {"users": pq.read_table(root / "users.parquet"),
            "items": pq.read_table(root / "items.parquet")}


def _shard_records(path: str, expected: np.dtype, columns: list[str],
                   encodings: list[str]) -> np.ndarray:
    """Memory-map the sample records of one uncompressed MDS shard file."""
    want = sorted(INTERACTION_COLUMNS)
    if columns != want or encodings != [INTERACTION_COLUMNS[c] for c in want]:
        raise DatasetError(f"{path}: shard columns {dict(zip(columns, encodings))} differ from "
                           f"{INTERACTION_COLUMNS}")
    with open(path, "rb") as f:
        head = np.frombuffer(f.read(8), np.uint32)
    n, start = int(head[0]), int(head[1])
    size = os.path.getsize(path)
    if size != start + n * expected.itemsize:
        raise DatasetError(f"{path}: {size} bytes, expected {start + n * expected.itemsize} "
                           f"for {n} samples (truncated or not fixed-size)")
    if n == 0:
        return np.empty(0, expected)
    return np.memmap(path, dtype=expected, mode="r", offset=start, shape=(n,))


def read_split_arrays(split_dir: str | os.PathLike) -> dict[str, np.ndarray]:
    """All rows of one split, in stored order, as numpy arrays (for evaluation and checks)."""
    index = json.loads((Path(split_dir) / "index.json").read_text())
    record = record_dtype(INTERACTION_COLUMNS)
    parts = [_shard_records(os.path.join(split_dir, s["raw_data"]["basename"]), record,
                            s["column_names"], s["column_encodings"])
             for s in index["shards"]]
    rows = np.concatenate(parts) if parts else np.empty(0, record)
    return {name: np.ascontiguousarray(rows[name]) for name in record.names}


class InteractionStream(StreamingDataset):
    """A ``StreamingDataset`` over one split that yields decoded batches of this rank's rows.

    Inside Ray Train workers RANK / WORLD_SIZE / LOCAL_RANK are set, so each rank gets its own
    partition; every call of :meth:`iter_batches` is one epoch (shuffled per epoch when
    ``shuffle`` is on, reproducibly from ``shuffle_seed``).
    """

    def __init__(self, split_dir: str, *, batch_size: int, shuffle: bool = False,
                 shuffle_seed: int = 9176, **kwargs: Any) -> None:
        super().__init__(local=split_dir, batch_size=batch_size, shuffle=shuffle,
                         shuffle_seed=shuffle_seed, **kwargs)
        self._record = record_dtype(INTERACTION_COLUMNS)
        self._maps: dict[int, np.ndarray] = {}

    def _shard_array(self, shard_id: int) -> np.ndarray:
        if shard_id not in self._maps:
            self.prepare_shard(shard_id)  # downloads/decompresses a remote shard if needed
            shard = self.shards[shard_id]
            path = os.path.join(shard.dirname, shard.split, shard.raw_data.basename)
            self._maps[shard_id] = _shard_records(path, self._record, list(shard.column_names),
                                                  list(shard.column_encodings))
        return self._maps[shard_id]

    def epoch_sample_ids(self) -> np.ndarray:
        """This rank's sample ids for the next epoch, in iteration order (advances the epoch)."""
        self._unique_worker_world = self._unique_rank_world.detect_workers()
        self._parallel_worker_world = self._parallel_rank_world.detect_workers()
        epoch, sample_in_epoch = self._resume_incr_epoch()
        ids = self._get_work(epoch, sample_in_epoch)
        return ids[ids >= 0]

    def gather(self, sample_ids: np.ndarray) -> dict[str, np.ndarray]:
        """Decode the given global sample ids (any order, any shards) as numpy columns."""
        shard_of = np.searchsorted(self.sample_offset_per_shard, sample_ids, side="right") - 1
        local = sample_ids - self.sample_offset_per_shard[shard_of]
        out = np.empty(len(sample_ids), self._record)
        for shard_id in np.unique(shard_of):
            where = np.flatnonzero(shard_of == shard_id)
            out[where] = self._shard_array(int(shard_id))[local[where]]
        return {name: out[name] for name in self._record.names}

    def iter_batches(self, batch_size: Optional[int] = None, *,
                     drop_last: bool = False) -> Iterator[dict[str, np.ndarray]]:
        """One epoch of this rank's rows in batches of numpy columns.

        Args:
            batch_size: rows per batch (default: the dataset's ``batch_size``).
            drop_last: drop a final batch smaller than ``batch_size``.
        """
        size = batch_size or self.batch_size
        ids = self.epoch_sample_ids()
        for start in range(0, len(ids), size):
            chunk = ids[start:start + size]
            if drop_last and len(chunk) < size:
                break
            yield self.gather(chunk)


@dataclass
class ItemFeatures:
    """Multi-valued item features as CSR arrays: values of item i are
    ``values[offsets[i]:offsets[i + 1]]`` (index 0 of every feature means unknown)."""

    name: str
    offsets: np.ndarray  # (num_items + 2,) int64: item index 0..num_items
    values: np.ndarray   # (nnz,) int64
    vocab: list[str]     # value index -> text; index 0 is unknown

    @classmethod
    def genres(cls, data_dir: str | os.PathLike) -> Optional["ItemFeatures"]:
        """Genres of each item from the item metadata ("A|B|C"), or None when there is none."""
        items = load_vocab(data_dir)["items"]
        if "genres" not in items.column_names:
            return None
        lists = [(g or "").split("|") if g and g != "(no genres listed)" else []
                 for g in items["genres"].to_pylist()]
        vocab = ["<unknown>"] + sorted({g for gs in lists for g in gs})
        pos = {g: i for i, g in enumerate(vocab)}
        lengths = np.array([0] + [len(gs) for gs in lists], np.int64)  # item 0 has none
        values = np.array([pos[g] for gs in lists for g in gs], np.int64)
        return cls("item_genres", np.concatenate([[0], np.cumsum(lengths)]), values, vocab)

    def lookup(self, items: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(lengths (B,), values (sum of lengths,)) for a batch of item indices, vectorised."""
        starts = self.offsets[items]
        lengths = self.offsets[items + 1] - starts
        total = int(lengths.sum())
        # position j of the output reads values[starts[row] + (j - first output index of row)]
        row_first = np.cumsum(lengths) - lengths
        idx = np.repeat(starts - row_first, lengths) + np.arange(total)
        return lengths, self.values[idx]


def to_kjt(batch: dict[str, np.ndarray], item_features: Optional[ItemFeatures] = None) -> Any:
    """A decoded batch as TorchRec's ``KeyedJaggedTensor`` (keys: user_id, item_id[, ...]).

    Every key has one length per row: 1 for the id features, the number of values for
    multi-valued item features. Built from whole arrays, no per-row Python.

    Returns:
        KeyedJaggedTensor with ``stride`` = batch size.
    """
    import torch
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    b = len(batch["user"])
    keys = ["user_id", "item_id"]
    values = [batch["user"].astype(np.int64), batch["item"].astype(np.int64)]
    lengths = [np.ones(b, np.int64), np.ones(b, np.int64)]
    if item_features is not None:
        lens, vals = item_features.lookup(batch["item"].astype(np.int64))
        keys.append(item_features.name)
        values.append(vals)
        lengths.append(lens)
    return KeyedJaggedTensor.from_lengths_sync(
        keys=keys, values=torch.from_numpy(np.concatenate(values)),
        lengths=torch.from_numpy(np.concatenate(lengths)))
