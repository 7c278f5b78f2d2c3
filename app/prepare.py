"""The data stage: raw ratings -> Ray Data -> a prepared dataset folder of MDS splits.

Recipe (:func:`prepare_dataset`):
    read -> validate (bad rows tagged with a reason) -> materialise
    -> per-block statistics -> id vocabularies and the label threshold (driver)
    -> encode ids, label, split -> one write: MDS shards per split + quarantined rejects
    -> merged index.json per split, manifest.json -> atomic rename into place.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import time
from collections import Counter
from pathlib import Path
from typing import Any, Iterable, Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray
from ray.data import Datasink
from ray.data.block import Block

from app import logs
from app.config import DataConfig
from app.dataset import MANIFEST, SCHEMA_VERSION, SPLITS, read_manifest
from app.mds import INTERACTION_COLUMNS, write_mds_columns
from app.publish import staged
from app.sources import DataError, Source, open_source
from app.validate import VALIDATED_SCHEMA, Columns, validate_table

REJECTED = len(SPLITS)  # split code of quarantined rows
_INT_ID = r"^[+-]?\d+$"


# ---------------------------------------------------------------- per-block functions (workers)

def _block_stats(table: pa.Table) -> pa.Table:
    """One row summarising a validated block: distinct ids, rating sum, counts by reason."""
    if table.num_rows == 0:  # an empty block may come without columns
        table = VALIDATED_SCHEMA.empty_table()
    ok = pc.is_null(table["reason"])
    acc = table.filter(ok)
    reasons = pc.value_counts(table["reason"].filter(pc.invert(ok)))
    by_reason = {r["values"].as_py(): r["counts"].as_py() for r in reasons}
    def one_list(col: pa.ChunkedArray) -> pa.Array:
        ids = pc.unique(col).cast(pa.string())
        return pa.ListArray.from_arrays(pa.array([0, len(ids)], pa.int32()), ids)

    return pa.table({
        "users": one_list(acc["user"]),
        "items": one_list(acc["item"]),
        "rating_sum": [pc.sum(acc["rating"]).as_py() or 0.0],
        "accepted": [acc.num_rows],
        "rejected": [json.dumps(by_reason)],
    })


# A plain task per materialised block: a tiny summary each, without a second Dataset plan.
_remote_block_stats = ray.remote(num_cpus=1)(_block_stats)


def _split_hash(user: np.ndarray, item: np.ndarray, ts: np.ndarray, seed: int) -> np.ndarray:
    """A uniform number in [0, 1) per row from its content (splitmix64), independent of order."""
    with np.errstate(over="ignore"):
        x = (user.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)
             ^ item.astype(np.uint64) * np.uint64(0xC2B2AE3D27D4EB4F)
             ^ ts.astype(np.uint64) * np.uint64(0x165667B19E3779F9)
             ^ np.uint64(seed & 0xFFFFFFFFFFFFFFFF))
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        x = x ^ (x >> np.uint64(31))
    return (x >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def _encode(table: pa.Table, *, users: pa.Array, items: pa.Array, threshold: float,
            split: str, val_fraction: float, test_fraction: float, seed: int) -> pa.Table:
    """Ids -> vocabulary indices, label, and (for the random rule) the split code."""
    if table.num_rows == 0:
        return table  # nothing to encode; the sink skips empty blocks
    ok = pc.is_null(table["reason"]).to_numpy(zero_copy_only=False)
    user = pc.fill_null(pc.add(pc.index_in(table["user"], value_set=users), 1), 0)
    item = pc.fill_null(pc.add(pc.index_in(table["item"], value_set=items), 1), 0)
    user = user.to_numpy().astype(np.int32)
    item = item.to_numpy().astype(np.int32)
    rating = pc.fill_null(table["rating"], 0.0).to_numpy().astype(np.float32)
    ts = pc.fill_null(table["timestamp"], 0).to_numpy()
    code = np.full(len(ok), REJECTED, np.uint8)
    if split == "random":
        u = _split_hash(user, item, ts, seed)
        code[ok] = np.where(u[ok] < 1 - val_fraction - test_fraction, 0,
                            np.where(u[ok] < 1 - test_fraction, 1, 2))
    else:
        code[ok] = 0  # assigned per user by _temporal_split
    return table.append_column("user_idx", pa.array(user)) \
        .append_column("item_idx", pa.array(item)) \
        .append_column("label", pa.array((rating >= threshold).astype(np.uint8))) \
        .append_column("rating32", pa.array(rating)) \
        .append_column("split", pa.array(code))


def _temporal_split(table: pa.Table, *, val_fraction: float, test_fraction: float) -> pa.Table:
    """Per user, the latest ``test_fraction`` of rows -> test, the ones before -> val.

    The block holds every row of each of its users (hash-partitioned by user). Ties in time
    are broken by item index so the result does not depend on row order.
    """
    if table.num_rows == 0:
        return table
    user = table["user_idx"].to_numpy()
    order = np.lexsort((table["item_idx"].to_numpy(), table["timestamp"].to_numpy(), user))
    table = table.take(pa.array(order))
    user = user[order]
    code = table["split"].to_numpy().copy()
    starts = np.flatnonzero(np.r_[True, user[1:] != user[:-1]])
    counts = np.diff(np.r_[starts, len(user)])
    n = np.repeat(counts, counts)
    from_end = np.repeat(starts + counts, counts) - 1 - np.arange(len(user))
    n_test = np.floor(n * test_fraction + 0.5).astype(np.int64)
    n_val = np.floor(n * val_fraction + 0.5).astype(np.int64)
    n_val = np.minimum(n_val, np.maximum(n - 1 - n_test, 0))  # keep one row for training
    n_test = np.minimum(n_test, n - 1)
    accepted = code != REJECTED
    code[accepted & (from_end < n_test + n_val)] = 1
    code[accepted & (from_end < n_test)] = 2
    return table.set_column(table.schema.get_field_index("split"), "split", pa.array(code))


class InteractionSink(Datasink):
    """Writes each split as MDS shards (one folder per write task) plus quarantined rejects.

    ``on_write_complete`` (on the driver) merges each split's per-task ``index.json`` files
    into one and adds up what the tasks wrote into :attr:`written`: rows per split and
    ``rejected``, and positives per split as ``<split>_positives``.
    """

    def __init__(self, root: str, *, columns: Columns, size_limit: int) -> None:
        self.root = root
        self.columns = columns
        self.size_limit = size_limit
        self.written: Counter = Counter()

    def write(self, blocks: Iterable[Block], ctx: Any) -> dict[str, int]:
        tables = [b for b in blocks if b.num_rows]
        counts: dict[str, int] = {}
        if not tables:
            return counts
        table = pa.concat_tables(tables)
        code = table["split"].to_numpy()
        part = f"part-{ctx.task_idx:05d}"
        for sid, name in enumerate(SPLITS):
            idx = np.flatnonzero(code == sid)
            if len(idx):
                t = table.take(pa.array(idx))
                write_mds_columns(os.path.join(self.root, name, part), {
                    "user": t["user_idx"].to_numpy(), "item": t["item_idx"].to_numpy(),
                    "label": t["label"].to_numpy(), "rating": t["rating32"].to_numpy(),
                    "timestamp": t["timestamp"].to_numpy()}, size_limit=self.size_limit)
                counts[name] = len(idx)
                counts[f"{name}_positives"] = int(t["label"].to_numpy().sum())
        rejected = np.flatnonzero(code == REJECTED)
        if len(rejected):
            t = table.take(pa.array(rejected))
            c = self.columns
            os.makedirs(os.path.join(self.root, "rejects"), exist_ok=True)
            pq.write_table(pa.table({c.user: t["user"], c.item: t["item"],
                                     c.rating: t["rating_raw"], c.timestamp: t["timestamp_raw"],
                                     "reason": t["reason"]}),
                           os.path.join(self.root, "rejects", f"{part}.parquet"))
            counts["rejected"] = len(rejected)
        return counts

    def on_write_complete(self, write_result: Any) -> None:
        for counts in write_result.write_returns:
            self.written.update(counts)
        for name in SPLITS:
            merge_split_index(os.path.join(self.root, name))


def merge_split_index(split_dir: str) -> None:
    """One ``index.json`` for a split from its per-task folders, in task order.

    The same merge as ``streaming.base.util.merge_index`` (shard entries of each part, basenames
    prefixed by the part folder), done here so the driver need not import streaming (and torch).
    An empty split gets a valid index with no shards.
    """
    shards = []
    for part in sorted(glob.glob(os.path.join(split_dir, "part-*", "index.json"))):
        folder = os.path.basename(os.path.dirname(part))
        for shard in json.loads(Path(part).read_text())["shards"]:
            for key in ("raw_data", "zip_data", "raw_meta", "zip_meta"):
                if shard.get(key):
                    shard[key]["basename"] = f"{folder}/{shard[key]['basename']}"
            shards.append(shard)
    os.makedirs(split_dir, exist_ok=True)
    Path(split_dir, "index.json").write_text(json.dumps({"version": 2, "shards": shards}))


# ---------------------------------------------------------------- driver side

def _vocabulary(id_lists: pa.ChunkedArray) -> tuple[pa.Array, pa.Array]:
    """Distinct ids in a stable order: numeric order when every id is an integer.

    Args:
        id_lists: one list of distinct ids (text) per block.

    Returns:
        (ids as text, for lookups; ids in their natural type, for the saved vocabulary)
    """
    text = pc.unique(pc.list_flatten(id_lists.combine_chunks()))
    if len(text) and pc.all(pc.match_substring_regex(text, _INT_ID)).as_py():
        natural = pc.cast(text, pa.int64())
        order = pc.sort_indices(natural)
        return pc.take(text, order), pc.take(natural, order)
    text = pc.take(text, pc.sort_indices(text))
    return text, text


def _save_vocab(path: Path, ids: pa.Array, extra: Optional[pa.Table] = None,
                text: Optional[pa.Array] = None) -> None:
    table = pa.table({"index": pa.array(np.arange(1, len(ids) + 1, dtype=np.int32)),
                      "id": ids})
    if extra is not None and text is not None:
        pos = pc.index_in(text, value_set=extra["item"])
        for col in extra.column_names:
            if col != "item":
                table = table.append_column(col, pc.take(extra[col], pos))
    pq.write_table(table, path)


def _malformed_rejects(source: Source, rejects_dir: Path) -> Counter:
    """Turn recorded unreadable CSV lines into a rejects Parquet file; count them."""
    counts: Counter = Counter()
    if not source.malformed_dir or not os.path.isdir(source.malformed_dir):
        return counts
    records = []
    for f in sorted(glob.glob(os.path.join(source.malformed_dir, "*.jsonl"))):
        records += [json.loads(line) for line in Path(f).read_text().splitlines() if line]
    if records:
        records.sort(key=lambda r: (r["line"] is None, r["line"] or 0, r["text"]))
        rejects_dir.mkdir(exist_ok=True)
        pq.write_table(pa.Table.from_pylist(records, schema=pa.schema(
            [("line", pa.int64()), ("text", pa.string()), ("reason", pa.string())])),
            rejects_dir / "malformed-lines.parquet")
        counts.update(r["reason"] for r in records)
    return counts


def _check_output(out: Path, overwrite: bool) -> None:
    if not out.exists():
        return
    if not out.is_dir():
        raise DataError(f"{out}: exists and is not a folder")
    if (out / MANIFEST).exists() and not overwrite:
        raise DataError(f"{out}: already holds a prepared dataset; pass --overwrite to "
                        f"replace it")
    if any(out.iterdir()) and not (out / MANIFEST).exists():
        raise DataError(f"{out}: folder is not empty and holds no prepared dataset; choose "
                        f"another --output")


def prepare_dataset(cfg: DataConfig, output: str, *, verbose: bool = True) -> dict[str, Any]:
    """Prepare ``cfg``'s source into the folder ``output``, atomically.

    Args:
        cfg: the data configuration.
        output: the prepared dataset folder; it appears only when complete.
        verbose: print a line per step.

    Returns:
        The manifest (also written to ``output/manifest.json``).
    """
    out = Path(output).absolute()
    _check_output(out, cfg.overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    for stale in out.parent.glob(f".{out.name}.partial-*"):  # left by an interrupted run
        shutil.rmtree(stale, ignore_errors=True)
    with logs.stage("prepare"), staged(out) as tmp:
        manifest = _build(cfg, tmp, verbose=verbose)
        shutil.rmtree(tmp / "_scratch", ignore_errors=True)
    return manifest


def _build(cfg: DataConfig, tmp: Path, *, verbose: bool) -> dict[str, Any]:
    t0 = time.perf_counter()

    def say(msg: str) -> None:
        if verbose:
            logs.say("prepare", f"{time.perf_counter() - t0:5.1f}s {msg}")

    def detail(msg: str) -> None:  # a step worth a line only with --verbose
        if logs.level() == "verbose":
            say(msg)

    ray.data.DataContext.get_current().execution_options.preserve_order = True
    source = open_source(cfg, scratch_dir=str(tmp / "_scratch"))
    cols = source.columns
    validated = source.dataset.map_batches(
        validate_table, batch_size=None, batch_format="pyarrow", zero_copy_batch=True,
        fn_kwargs=dict(columns=cols, rating_min=cfg.rating_min, rating_max=cfg.rating_max),
    ).materialize()
    detail(f"validated {validated.num_blocks()} blocks")
    block_stats = [_remote_block_stats.remote(ref) for ref in validated.to_arrow_refs()]
    # the empty summary first keeps the table typed when there are no blocks at all
    stats = pa.concat_tables([_block_stats(VALIDATED_SCHEMA.empty_table())]
                             + ray.get(block_stats))
    accepted = int(pc.sum(stats["accepted"]).as_py() or 0)
    rejected: Counter = Counter()
    for text in stats["rejected"].to_pylist():
        rejected.update(json.loads(text))
    rejects_dir = tmp / "rejects"
    malformed = _malformed_rejects(source, rejects_dir)
    rejected.update(malformed)
    n_read = accepted + sum(rejected.values())
    where = source.description.get("input") or source.description["dataset"]
    say(f"read {n_read:,} rows from {where}: {accepted:,} accepted, "
        f"{sum(rejected.values()):,} rejected")
    if accepted == 0:
        detail = "; ".join(f"{r}: {n}" for r, n in rejected.most_common()) or "no data rows"
        raise DataError(f"{where}: no valid rows to prepare ({n_read} read; {detail})")

    users_text, users = _vocabulary(stats["users"])
    items_text, items = _vocabulary(stats["items"])
    (tmp / "vocab").mkdir()
    _save_vocab(tmp / "vocab" / "users.parquet", users)
    _save_vocab(tmp / "vocab" / "items.parquet", items, source.item_metadata, items_text)
    mean = float(pc.sum(stats["rating_sum"]).as_py()) / accepted
    threshold = mean if cfg.label_rule == "mean" else cfg.label_threshold
    say(f"vocabularies: {len(users):,} users, {len(items):,} items; label: rating >= "
        f"{threshold:.4g} ({cfg.label_rule})")

    encoded = validated.map_batches(
        _encode, batch_size=None, batch_format="pyarrow", zero_copy_batch=True,
        fn_kwargs=dict(users=users_text, items=items_text, threshold=threshold,
                       split=cfg.split, val_fraction=cfg.val_fraction,
                       test_fraction=cfg.test_fraction, seed=cfg.seed))
    if cfg.split == "temporal":
        encoded = encoded.repartition(max(1, validated.num_blocks()), keys=["user_idx"]) \
            .map_batches(_temporal_split, batch_size=None, batch_format="pyarrow",
                         fn_kwargs=dict(val_fraction=cfg.val_fraction,
                                        test_fraction=cfg.test_fraction))
    sink = InteractionSink(str(tmp), columns=cols, size_limit=cfg.shard_size_limit)
    encoded.write_datasink(sink)
    validated = None  # release the materialised blocks
    detail("wrote MDS shards")

    # What the indexes and reject files on disk hold must match what the tasks wrote.
    split_rows = {name: _index_rows(tmp / name) for name in SPLITS}
    rejects_written = _rejects_rows(rejects_dir)
    if (split_rows != {name: sink.written[name] for name in SPLITS}
            or sum(split_rows.values()) != accepted
            or rejects_written != sum(rejected.values())):
        raise RuntimeError(f"written rows do not add up: splits {split_rows} vs {accepted} "
                           f"accepted, {rejects_written} rejects vs {sum(rejected.values())}")
    positives = {name: sink.written[f"{name}_positives"] for name in SPLITS}
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "created_unix": int(time.time()),
        "source": source.description,
        "columns": {"user": cols.user, "item": cols.item, "rating": cols.rating,
                    "timestamp": cols.timestamp},
        "mds_columns": INTERACTION_COLUMNS,
        "counts": {"read": n_read, "accepted": accepted, "rejected": sum(rejected.values()),
                   "rejected_by_reason": dict(sorted(rejected.items())),
                   "splits": split_rows, "positives": positives},
        "label": {"rule": cfg.label_rule, "threshold": threshold, "mean_rating": mean},
        "split": {"rule": cfg.split, "seed": cfg.seed,
                  "fractions": {"train": cfg.train_fraction, "val": cfg.val_fraction,
                                "test": cfg.test_fraction}},
        "vocab": {"users": len(users), "items": len(items), "unknown_index": 0,
                  "user_id_type": str(users.type), "item_id_type": str(items.type),
                  "item_metadata": [c for c in (source.item_metadata.column_names
                                                if source.item_metadata is not None else [])
                                    if c != "item"]},
        "config": dict(vars(cfg)),
        "seconds": round(time.perf_counter() - t0, 2),
    }
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    say("splits: " + ", ".join(f"{k} {v:,}" for k, v in split_rows.items())
         + f"; rejected {sum(rejected.values()):,}; {manifest['seconds']:.1f}s")
    read_manifest(tmp)  # the contract check a reader will run
    return manifest


def _index_rows(split_dir: Path) -> int:
    index = json.loads((split_dir / "index.json").read_text())
    return sum(s["samples"] for s in index["shards"])


def _rejects_rows(rejects_dir: Path) -> int:
    if not rejects_dir.is_dir():
        return 0
    return sum(pq.read_metadata(p).num_rows for p in rejects_dir.glob("*.parquet"))
