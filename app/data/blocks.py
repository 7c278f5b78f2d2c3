"""The data stage's per-block functions, run in Ray tasks on the validated blocks.

- :func:`block_stats`: one summary row per block (distinct ids, rating sum, latest timestamp,
  rejects by reason), from which the driver counts rows and builds the id vocabularies;
- :func:`window_block`: a block without its accepted rows before a cutoff (``--window-days``),
  and its new summary;
- :func:`encode_blocks`: vocabulary indices, label and split code of each block's rows;
- :func:`temporal_split`: the temporal rule, per user, after a repartition by user.

Split codes: 0, 1, 2 index :data:`app.data.dataset.SPLITS`; :data:`REJECTED` marks quarantined
rows, :data:`MERGED` repeated rows merged into another (never written).
"""

from __future__ import annotations

import json
from typing import Any, Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray

from app.data import duplicates
from app.data.dataset import SPLITS
from app.data.validate import VALIDATED_SCHEMA

REJECTED = len(SPLITS)  # split code of quarantined rows
MERGED = REJECTED + 1   # split code of repeated rows merged into another (never written)


def block_stats(table: pa.Table) -> pa.Table:
    """One row summarising a validated block: distinct ids, rating sum, latest timestamp (epoch
    seconds; null without an accepted row), counts by reason."""
    if table.num_rows == 0:  # an empty block may come without columns
        table = VALIDATED_SCHEMA.empty_table()
    ok = pc.is_null(table["reason"])
    # a filter copies every column even when it keeps every row: skip it when nothing failed
    acc = table if table["reason"].null_count == table.num_rows else table.filter(ok)
    reasons = pc.value_counts(table["reason"].filter(pc.invert(ok)))
    by_reason = {r["values"].as_py(): r["counts"].as_py() for r in reasons}

    def one_list(col: pa.ChunkedArray) -> pa.Array:
        ids = pc.unique(col).cast(pa.string())
        return pa.ListArray.from_arrays(pa.array([0, len(ids)], pa.int32()), ids)

    return pa.table({
        "users": one_list(acc["user"]),
        "items": one_list(acc["item"]),
        "rating_sum": [pc.sum(acc["rating"]).as_py() or 0.0],
        "ts_max": pa.array([pc.max(acc["timestamp"]).as_py()], pa.int64()),
        "accepted": [acc.num_rows],
        "rejected": [json.dumps(by_reason)],
    })


# A plain task per materialised block: a tiny summary each, without a second Dataset plan.
remote_block_stats = ray.remote(num_cpus=1)(block_stats)


def window_block(table: pa.Table, cutoff: int) -> tuple[pa.Table, pa.Table]:
    """A validated block without its accepted rows older than ``cutoff`` (epoch seconds), and
    the summary of what is left (:func:`block_stats`). Rejected rows stay, for the rejects."""
    if table.num_rows:
        keep = pc.or_(pc.is_valid(table["reason"]),
                      pc.fill_null(pc.greater_equal(table["timestamp"], cutoff), False))
        if not pc.all(keep).as_py():  # a filter copies every column: only when it drops rows
            table = table.filter(keep)
    return table, block_stats(table)


# A task per materialised block, returning the new block and its summary as two objects.
remote_window_block = ray.remote(num_cpus=1, num_returns=2)(window_block)


def split_hash(user: np.ndarray, item: np.ndarray, ts: np.ndarray, seed: int) -> np.ndarray:
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


def encode(table: pa.Table, *, user: np.ndarray, item: np.ndarray, threshold: float,
            split: str, val_fraction: float, test_fraction: float, seed: int,
            merged: Optional[tuple[np.ndarray, np.ndarray]] = None) -> pa.Table:
    """Vocabulary indices, label, and (for the random rule) the split code of a block.

    Args:
        table: a validated block.
        user, item: its rows' vocabulary indices, int32 (rows,).
        threshold, split, val_fraction, test_fraction, seed: the label and split rules.
        merged: the block's duplicate decisions (:func:`duplicates.decisions_for`): rows, and
            their new rating or NaN for rows merged into another (split code ``MERGED``:
            marked rather than removed, which would copy the block).
    """
    ok = pc.is_null(table["reason"]).to_numpy(zero_copy_only=False)
    rating = pc.fill_null(table["rating"], 0.0).to_numpy().astype(np.float32)
    ts = pc.fill_null(table["timestamp"], 0).to_numpy()
    rows, new_rating = merged if merged is not None else (np.empty(0, np.int64), np.empty(0))
    rerate = ~np.isnan(new_rating)
    rating[rows[rerate]] = new_rating[rerate]  # the mean policy: before the label
    code = np.full(len(ok), REJECTED, np.uint8)
    if split == "random":
        u = split_hash(user, item, ts, seed)
        code[ok] = np.where(u[ok] < 1 - val_fraction - test_fraction, 0,
                            np.where(u[ok] < 1 - test_fraction, 1, 2))
    else:
        code[ok] = 0  # assigned per user by temporal_split
    code[rows[~rerate]] = MERGED
    return table.append_column("user_idx", pa.array(user)) \
        .append_column("item_idx", pa.array(item)) \
        .append_column("label", pa.array((rating >= threshold).astype(np.uint8))) \
        .append_column("rating32", pa.array(rating)) \
        .append_column("split", pa.array(code))


def encode_blocks(batch: dict[str, np.ndarray], *, blocks: list, users: pa.Array,
                   items: pa.Array, indices: Optional[list], decisions: Optional[list],
                   **rules: Any) -> pa.Table:
    """Encode validated blocks by position (a Ray Data task over block numbers, so that each
    block meets its own vocabulary indices and duplicate decisions).

    Args:
        batch: ``{"id": block numbers}``.
        blocks: object references of the validated blocks.
        users, items: the vocabularies as text.
        indices: references of each block's vocabulary indices (:func:`duplicates.plan`), or
            None to look the ids up here.
        decisions: references of every partition's duplicate decisions, or None.
        rules: keyword arguments of :func:`encode`.
    """
    out = []
    resolved = ray.get(decisions) if decisions else []
    for b in batch["id"].tolist():
        table = ray.get(blocks[b])
        if table.num_rows == 0:
            continue  # the sink skips empty blocks; one may come without columns
        if indices is not None:
            idx = ray.get(indices[b])
            user, item = idx["user_idx"].to_numpy(), idx["item_idx"].to_numpy()
        else:
            user, item = duplicates.vocab_indices(table, users, items)
        merged = duplicates.decisions_for(b, resolved) if resolved else None
        out.append(encode(table, user=user, item=item, merged=merged, **rules))
    return pa.concat_tables(out) if out else VALIDATED_SCHEMA.empty_table()


def temporal_split(table: pa.Table, *, val_fraction: float, test_fraction: float) -> pa.Table:
    """Per user, the latest ``test_fraction`` of rows -> test, the ones before -> val.

    The block holds every row of each of its users (hash-partitioned by user). Ties in time
    are broken by item index so the result does not depend on row order.
    """
    if table.num_rows == 0:
        return table
    merged = table["split"].to_numpy() == MERGED
    if merged.any():  # merged rows are not interactions of their user
        table = table.filter(pa.array(~merged))
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

