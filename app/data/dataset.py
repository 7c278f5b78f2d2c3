"""The prepared-dataset contract and its readers.

A prepared dataset folder holds::

    manifest.json              schema version, source, counts, label and split rules, vocab sizes
    vocab/users.parquet        index (1..N; 0 = unknown id) <-> id
    vocab/items.parquet        index <-> id, plus item metadata (title, genres) when known
    train/ val/ test/          MDS shards (columns: mds.INTERACTION_COLUMNS), merged index.json
    rejects/                   quarantined input rows with their reason (Parquet), if any

Readers check the manifest before touching the shards. This module imports neither torch nor
streaming, so Ray workers of the data stage stay light; the training-side reader is
:mod:`app.data.reader`.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from app.core.contracts import Contract, Part
from app.core.errors import DatasetError  # noqa: F401  (raised here, importable from here)
from app.core.errors import OutputError, StorageError
from app.core.publish import local_dir, version_of, version_uri
from app.data.mds import INTERACTION_COLUMNS, record_dtype

SCHEMA_VERSION = 1
SPLITS = ("train", "val", "test")
MANIFEST = "manifest.json"
_YEAR = re.compile(r"\((\d{4})\)\s*$")  # a title's release year: "Heat (1995)"


@dataclass
class Duplicates(Part):
    """How repeated (user, item) rows were resolved (``--duplicates``)."""

    policy: str        # latest, max, mean or keep
    rows_merged: int   # accepted rows merged into another row of their pair (not written)
    pairs: int         # (user, item) pairs that had more than one row


@dataclass
class Counts(Part):
    """Rows at each step: read = accepted + rejected; accepted = the splits' rows +
    ``duplicates.rows_merged`` + ``outside_window``.

    ``outside_window``: accepted rows older than ``--window-days`` before the latest accepted
    timestamp, in no split (their ids enter the vocabularies only through ``--base``); 0
    without a window, and then left out of the file, as before the field existed.
    """

    read: int
    accepted: int
    rejected: int
    rejected_by_reason: dict[str, int]
    duplicates: Duplicates
    splits: dict[str, int]     # rows per split (train, val, test)
    positives: dict[str, int]  # rows labelled 1 per split
    outside_window: int = 0    # accepted rows before the window (--window-days), not written


@dataclass
class LabelRule(Part):
    """How ratings became labels: label = rating >= threshold."""

    rule: str           # threshold (--label-threshold) or mean (the mean rating)
    threshold: float
    mean_rating: float  # over the accepted rows kept (in the window), one per merged pair


@dataclass
class SplitRule(Part):
    """How rows were split."""

    rule: str                    # random (by a hash of the row) or temporal (per user)
    seed: int
    fractions: dict[str, float]  # share of rows per split


@dataclass
class VocabBase(Part):
    """The prepared dataset whose vocabularies these extend (``--base``): each of its ids keeps
    its index, ids new here follow its last one. Empty (None and zeros) without a base."""

    uri: Optional[str] = None              # the base's published version (path or URI)
    version: Optional[str] = None          # its version name (v-...); None if not versioned
    manifest_sha256: Optional[str] = None  # its fingerprint: sha256 of its manifest.json
    new_users: int = 0     # user ids of this data that the base lacks (indices after its own)
    new_items: int = 0
    absent_users: int = 0  # base user ids with no row in this data (their indices kept)
    absent_items: int = 0


@dataclass
class Vocab(Part):
    """The id vocabularies (``vocab/users.parquet``, ``vocab/items.parquet``)."""

    users: int          # distinct user ids; their indices are 1..users
    items: int          # distinct item ids; their indices are 1..items
    unknown_index: int  # the index of an id not in the vocabulary (0)
    user_id_type: str   # the ids' Arrow type as saved: int64 or string
    item_id_type: str
    item_metadata: list[str]  # item columns beside the id (title, year, genres)
    base: VocabBase = field(default_factory=VocabBase)  # what they extend (--base)


@dataclass
class Manifest(Contract):
    """``manifest.json`` of a prepared dataset: written last, so a folder with it is complete.

    ``source``: where the rows came from (credentials masked); ``columns``: the raw column
    names (user, item, rating, timestamp); ``mds_columns``: the shards' columns and encodings;
    ``config``: the data settings it was prepared with (credentials masked).
    """

    FILE = MANIFEST
    SCHEMA_VERSION = SCHEMA_VERSION
    Error = DatasetError
    REDO = "; prepare it again"

    schema_version: int
    created_unix: int
    source: dict[str, Any]
    columns: dict[str, str]
    mds_columns: dict[str, str]
    counts: Counts
    label: LabelRule
    split: SplitRule
    vocab: Vocab
    config: dict[str, Any]
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """As :meth:`Part.to_dict`, but ``vocab.base`` only when there is a base and
        ``counts.outside_window`` only when a window left rows out: a dataset prepared without
        ``--base`` or ``--window-days`` has the manifest it had before those fields existed."""
        data = super().to_dict()
        if self.vocab.base == VocabBase():
            del data["vocab"]["base"]
        if not self.counts.outside_window:
            del data["counts"]["outside_window"]
        return data

    @classmethod
    def missing(cls, folder: str) -> str:
        return (f"{folder}: not a prepared dataset (no {MANIFEST}); run "
                f"python -m pipelines.prepare_data --output {folder}")


def read_manifest(data_dir: str | os.PathLike) -> Manifest:
    """Load and check ``manifest.json`` of a prepared dataset (its published version).

    Raises:
        DatasetError: the folder is not a complete prepared dataset of this schema version.
    """
    data_dir = local_dir(data_dir)  # its published version (on S3: a local copy)
    manifest = Manifest.read(data_dir)
    if manifest.mds_columns != INTERACTION_COLUMNS:
        raise DatasetError(f"{data_dir}: MDS columns {manifest.mds_columns} differ from "
                           f"{INTERACTION_COLUMNS}")
    for split in SPLITS:
        if not (Path(data_dir) / split / "index.json").is_file():
            raise DatasetError(f"{data_dir}: split {split} has no index.json")
    return manifest


def load_vocab(data_dir: str | os.PathLike) -> dict[str, Any]:
    """User and item vocabularies as pyarrow tables (columns: index, id, [metadata]), each
    checked to hold every id once.

    Raises:
        DatasetError: an id occurs twice (its rows would be split over two indices), naming
            the file.
    """
    from app.data.validate import first_repeated

    root = local_dir(data_dir) / "vocab"
    vocab = {kind: pq.read_table(root / f"{kind}.parquet") for kind in ("users", "items")}
    for kind, table in vocab.items():
        repeated = first_repeated(table["id"])
        if repeated is not None:
            raise DatasetError(f"{root / (kind + '.parquet')}: id {repeated!r} occurs more "
                               f"than once; prepare the dataset again")
    return vocab


def id_text(ids: pa.Array | pa.ChunkedArray) -> pa.Array:
    """Vocabulary ids as the text they were read from: an int64 vocabulary holds only integers
    in their canonical form (``7``, never ``007``), so its decimal text is exactly its ids."""
    ids = ids.combine_chunks() if isinstance(ids, pa.ChunkedArray) else ids
    return ids if pa.types.is_string(ids.type) else ids.cast(pa.string())


def id_rows(data_dir: str | os.PathLike) -> dict[str, dict[str, int]]:
    """Each id of a prepared dataset -> its row (index) in that dataset's embedding tables:
    ``{"users": {id: row}, "items": {id: row}}``, ids as text (:func:`id_text`), so rows of two
    versions match by id whatever type each vocabulary was saved as."""
    return {kind: dict(zip(id_text(table["id"]).to_pylist(), table["index"].to_pylist()))
            for kind, table in load_vocab(data_dir).items()}


# Readers of a folder that is not a prepared dataset but carries one's vocabularies, for
# --base: folder -> (its Vocab record, the file that fingerprints it), or None. A model folder
# registers its own (app.train.model_folder), so a new dataset can keep a model's rows.
VOCAB_RECORDS: list[Callable[[Path], Optional[tuple["Vocab", Path]]]] = []


@dataclass
class BaseDataset:
    """A prepared dataset read as the base of a new version's vocabularies (``--base``)."""

    ref: VocabBase    # where it is and which version (the counts are the new version's)
    vocab: Vocab      # its manifest's vocabulary record
    users: pa.Table   # vocab/users.parquet: index 1..N in order, id
    items: pa.Table   # vocab/items.parquet: index, id, item metadata


def read_base(base: str) -> BaseDataset:
    """The published version of the prepared dataset ``base`` (a folder or URI; on an object
    store, read from this node's copy), checked for extending its vocabularies. A model folder
    is accepted too: its ``vocab/`` is the vocabularies of the dataset it was trained on, so a
    new dataset keeps the model's rows.

    Raises:
        DatasetError: one line naming ``--base`` and the dataset: not a prepared dataset, of
            another schema version, unreadable, or with ids other than int64 or string.
    """
    try:
        uri, version = version_uri(base), version_of(base)
        folder = local_dir(uri)
        found = None if (folder / MANIFEST).is_file() else next(
            (r for r in (read(folder) for read in VOCAB_RECORDS) if r is not None), None)
        if found is not None:
            record, fingerprint = found
        else:
            record, fingerprint = read_manifest(folder).vocab, folder / MANIFEST
        vocab = load_vocab(folder)
    except (DatasetError, OutputError, StorageError) as e:
        raise DatasetError(f"--base: {e}") from None
    except (OSError, pa.ArrowException) as e:  # a vocabulary file missing or not Parquet
        raise DatasetError(f"--base: {base}: unreadable vocabulary ({e})") from None
    for kind, size, kind_type in (("users", record.users, record.user_id_type),
                                  ("items", record.items, record.item_id_type)):
        _check_base_vocab(folder / "vocab" / f"{kind}.parquet", vocab[kind], size, kind_type)
    sha = hashlib.sha256(fingerprint.read_bytes()).hexdigest()
    return BaseDataset(VocabBase(uri=uri, version=version, manifest_sha256=sha),
                       record, vocab["users"], vocab["items"])


def _check_base_vocab(path: Path, table: pa.Table, size: int, kind_type: str) -> None:
    """A base vocabulary can be extended: exact ids (int64 or string, as its manifest says,
    none missing) at indices 1..N in order, N as its manifest says."""
    ids, index = table["id"], table["index"].to_numpy()
    if str(ids.type) not in ("int64", "string") or str(ids.type) != kind_type:
        raise DatasetError(f"--base: {path}: ids of type {ids.type} (its manifest says "
                           f"{kind_type}); only int64 or string ids can be extended")
    if ids.null_count or len(table) != size or not np.array_equal(index, np.arange(1, size + 1)):
        raise DatasetError(f"--base: {path}: not indices 1..{size} <-> one id each; prepare "
                           f"the base again")


def shard_records(path: str, columns: list[str], encodings: list[str]) -> np.ndarray:
    """Memory-map the sample records of one uncompressed MDS shard file.

    Args:
        path: the shard file.
        columns, encodings: the shard's column names and MDS encodings from its index entry.
    """
    expected = record_dtype(INTERACTION_COLUMNS)
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


def read_split_arrays(split_dir: str | os.PathLike,
                      columns: Optional[Sequence[str]] = None) -> dict[str, np.ndarray]:
    """All rows of one split, in stored order, as numpy arrays (for evaluation and checks).

    Args:
        split_dir: the split's folder (``index.json`` and its shards).
        columns: the columns to read (default: every one); each is copied out of the
            memory-mapped shards straight into its own array, so a split costs the memory of
            the columns asked for, once.
    """
    index = json.loads((Path(split_dir) / "index.json").read_text())
    record = record_dtype(INTERACTION_COLUMNS)
    names = list(record.names) if columns is None else list(columns)
    unknown = [n for n in names if n not in record.names]
    if unknown:
        raise DatasetError(f"{split_dir}: no column {unknown[0]!r} (the splits have "
                           f"{', '.join(record.names)})")
    parts = [shard_records(os.path.join(split_dir, s["raw_data"]["basename"]),
                           s["column_names"], s["column_encodings"])
             for s in index["shards"]]
    out = {n: np.empty(sum(len(p) for p in parts), record[n]) for n in names}
    at = 0
    for part in parts:
        for n in names:
            out[n][at:at + len(part)] = part[n]
        at += len(part)
    return out


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

    @classmethod
    def years(cls, data_dir: str | os.PathLike) -> Optional["ItemFeatures"]:
        """Release year of each item as a one-value bag: the item metadata's ``year``, else
        parsed from a title ending in "(YYYY)" (MovieLens' movies.csv); None without either."""
        items = load_vocab(data_dir)["items"]
        if "year" in items.column_names:
            years = [y or None for y in items["year"].cast(pa.string()).to_pylist()]
        elif "title" in items.column_names:
            found = [_YEAR.search(t or "") for t in items["title"].to_pylist()]
            years = [m.group(1) if m else None for m in found]
        else:
            return None
        vocab = ["<unknown>"] + sorted({y for y in years if y})
        if len(vocab) == 1:
            return None
        pos = {y: i for i, y in enumerate(vocab)}
        lengths = np.array([0] + [1 if y else 0 for y in years], np.int64)
        values = np.array([pos[y] for y in years if y], np.int64)
        return cls("item_year", np.concatenate([[0], np.cumsum(lengths)]), values, vocab)

    def lookup(self, items: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(lengths (B,), values (sum of lengths,)) for a batch of item indices, vectorised."""
        starts = self.offsets[items]
        lengths = self.offsets[items + 1] - starts
        total = int(lengths.sum())
        # position j of the output reads values[starts[row] + (j - first output index of row)]
        row_first = np.cumsum(lengths) - lengths
        idx = np.repeat(starts - row_first, lengths) + np.arange(total)
        return lengths, self.values[idx]
